#!/usr/bin/env bash
# Placement (issue 16): active/active, auto-failback and the switchover verb, with real
# `twinblade run` nodes in namespaces (failover-lib.sh's two networks: client and replication)
# and two clients writing versioned blocks, one per blade, over every MAC that answers it (as
# the Linux aoe driver does), each with a probe counting the moments two nodes answered.
#
# The pair carries two resources, each with its own blade, virtual MAC (`mac = "auto"`),
# floating IP and replication port: r1 (e9.1, preferred alpha) and r2 (e9.2, preferred beta),
# both with auto-failback = true and failback-delay = 5. Steps, each checked:
#   1. both start: alpha serves r1, beta serves r2 (active/active)
#   2. alpha's power loss (links dark, then kill -9) with both clients writing: beta serves
#      both, r2 never moves
#   3. alpha comes back: it resyncs r1, and failback-delay later takes r1 back by a planned
#      switchover; beta keeps r2
#   4. `twinblade switchover r2` on beta (the primary), then `switchover r2` asked on beta
#      again once alpha serves it (the secondary asks): r2 moves both ways; the pauses printed
#   5. the clients stop: no probe (nor a client's discovery) answered twice for either blade,
#      every acknowledged version on each device, never two holders of a floating IP, the
#      disks identical after the final resync
#
# Usage: initiator-tests/placement.sh [--keep]. Needs root; namespaces tbx-a, tbx-b, tbx-c,
# tbx-r, bridges tbxbr0/tbxbr1. Exit status 1 if any check failed.
set -euo pipefail

P=tbx NET=96 TAG=placement BLADE=e9.1
# shellcheck source=initiator-tests/failover-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/failover-lib.sh"
lab_up
summary=$work/summary.tsv
: >"$summary"
sc=placement
failures=0
FIP1=$CNET.101 FIP2=$CNET.102
RESOURCES=(r1 r2)
declare -A blade=([r1]=e9.1 [r2]=e9.2) fip=([r1]=$FIP1 [r2]=$FIP2) home=([r1]=alpha [r2]=beta)

write_pair_config() {
    {
        printf '[cluster]\nshared-secret = "pair-secret"\n%s\n' "$(cluster_options)"
        for n in alpha beta; do
            printf '[node.%s]\naddress = "%s"\ninterface = "eth0"\n%s\n' "$n" \
                "$(replication_address "$n")" "$(node_options "$n")"
        done
        local r port=7791
        for r in "${RESOURCES[@]}"; do
            cat <<EOF
[resource.$r]
aoe = "${blade[$r]}"
port = $port
dead-time = 2
timeout = 1
preferred = "${home[$r]}"
auto-failback = true
failback-delay = 5
floating-ip = "${fip[$r]}/24"
mac = "auto"
[resource.$r.on.alpha]
disk = "$work/alpha.$r.img"
meta-disk = "internal"
[resource.$r.on.beta]
disk = "$work/beta.$r.img"
meta-disk = "internal"
EOF
            port=$((port + 1))
        done
    } >"$cfg"
}

rfield() { # NODE RES KEY
    "$tb" status --control "$work/$1.sock" "$2" --json 2>/dev/null | tr ',{}' '\n\n\n' |
        sed -n "s/^\"$3\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -1
}
serves() { [[ $(rfield "$1" "$2" role) == Primary && $(rfield "$1" "$2" serving) == true ]]; } # NODE RES
res_settled() { # RES: both UpToDate, established, nothing out of sync
    local n
    for n in alpha beta; do
        [[ $(rfield "$n" "$1" disk) == UpToDate && $(rfield "$n" "$1" replication) == Established &&
            $(rfield "$n" "$1" out-of-sync) == 0 ]] || return 1
    done
}
holds() { # NODE IP: the node (not powered off) has IP
    [[ ! -e $work/off.$1 && $(ip -n "$(ns_of "$1")" -4 -o addr show 2>/dev/null) == *" $2/"* ]]
}

# --- clients, one per blade ------------------------------------------------------------------------
declare -A vpids ppids
client_start() { # RES
    local r=$1 c=$work/$1
    ip netns exec "$P-c" "$init" -i eth0 versioned "${blade[$r]}" --blocks 256 --offset 1M \
        --retransmit-ms 200 --acks "$c.acks" --ack-log "$c.acklog" >"$c.versioned" 2>&1 &
    vpids[$r]=$!
    pids+=("$!")
    ip netns exec "$P-c" "$init" -i eth0 probe "${blade[$r]}" --log "$c.probes" >"$c.probe" 2>&1 &
    ppids[$r]=$!
    pids+=("$!")
}
client_stop() { # RES: stops its client, records its checks
    local r=$1 c=$work/$1 vrc=0
    kill -TERM "${vpids[$r]}" "${ppids[$r]}" 2>/dev/null || true
    wait "${vpids[$r]}" || vrc=$?
    wait "${ppids[$r]}" || true
    local acked two vdouble probes stall_max errors
    acked=$(kv "$c.versioned" acked) vdouble=$(kv "$c.versioned" double_answers)
    stall_max=$(kv "$c.versioned" stall_max_ms) errors=$(kv "$c.versioned" errors)
    probes=$(kv "$c.probe" probes) two=$(kv "$c.probe" two)
    info "$sc" "$r client" "acked $acked, errors $errors, longest stall $stall_max ms; probes $probes, answered twice $two, client saw two answers $vdouble"
    check "$sc" "$r: the client ran to the end" test "$vrc" == 0
    check "$sc" "$r: writes acknowledged" test "${acked:-0}" -gt 0
    check "$sc" "$r: never two nodes answering (probes $probes, two $two; client $vdouble)" \
        test "${two:-x}" == 0 -a "${vdouble:-x}" == 0
    check "$sc" "$r: every acknowledged version on the device" \
        ip netns exec "$P-c" "$init" -i eth0 verify-versions "${blade[$r]}" --acks "$c.acks"
}

# --- floating IPs: sampled every 100 ms (`seconds a1 b1 a2 b2`) ----------------------------------
fips_start() {
    (
        while :; do
            printf '%s' "$(date +%s.%N)"
            for r in r1 r2; do
                for n in alpha beta; do
                    if holds "$n" "${fip[$r]}"; then printf ' 1'; else printf ' 0'; fi
                done
            done
            printf '\n'
            sleep 0.1
        done
    ) >>"$work/fips.log" 2>/dev/null &
    fipspid=$!
    pids+=("$fipspid")
}

# --- 1. start ------------------------------------------------------------------------------------
write_pair_config
for n in alpha beta; do
    for r in "${RESOURCES[@]}"; do
        truncate -s $((64 << 20)) "$work/$n.$r.img"
        "$tb" create-md --config "$cfg" --node "$n" "$r" >/dev/null
    done
done
start alpha
start beta
connected() { [[ $(rfield "$1" "$2" connection) == Connected ]]; } # NODE RES
wait_for 20 "r1 connected" connected alpha r1
wait_for 20 "r2 connected" connected beta r2
"$tb" primary --control "$work/alpha.sock" r1 --force >/dev/null
"$tb" primary --control "$work/beta.sock" r2 --force >/dev/null
wait_for 60 "initial sync of r1" res_settled r1
wait_for 60 "initial sync of r2" res_settled r2
wait_check "$sc" 10 "active/active: alpha serves r1" serves alpha r1
wait_check "$sc" 10 "active/active: beta serves r2" serves beta r2
neither_crossed() { ! serves alpha r2 && ! serves beta r1; }
check "$sc" "alpha does not serve r2, beta not r1" neither_crossed
fips_start
client_start r1
client_start r2
sleep 3

# --- 2. alpha's power loss -----------------------------------------------------------------------
t0=$(date +%s.%N)
power_loss alpha
wait_check "$sc" 30 "after alpha's power loss beta serves r1" serves beta r1
took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
info "$sc" "failover of r1" "beta serving ${took} s after the power loss (polled)"
check "$sc" "beta still serves r2" serves beta r2
refused=$("$tb" switchover --control "$work/beta.sock" r1 2>&1) && refused="(accepted) $refused"
check "$sc" "switchover refused while the peer is down ($refused)" grep -q "refused: not connected" <<<"$refused"
sleep 3

# --- 3. alpha comes back: resync, then failback of r1 only ------------------------------------------
for r in "${RESOURCES[@]}"; do ip -n "$P-a" addr del "${fip[$r]}/24" dev eth0 2>/dev/null || true; done
link alpha client up
link alpha repl up
rm -f "$work/off.alpha"
t1=$(date +%s.%N)
start alpha
wait_check "$sc" 60 "alpha resyncs r1" res_settled r1
wait_check "$sc" 40 "auto-failback: alpha serves r1 again" serves alpha r1
back=$(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
info "$sc" "failback of r1" "alpha serving r1 ${back} s after its restart (failback-delay 5 s)"
check "$sc" "beta keeps r2" serves beta r2
check "$sc" "the failback was a planned switchover (alpha's log)" \
    grep -q "switchover (auto-failback): asking the peer to hand over" "$work/alpha.log"
sleep 2

# --- 4. switchover r2 both ways --------------------------------------------------------------------
switch_r2() { # WHAT TO: `switchover r2` asked on beta; then TO must serve r2
    local out
    if out=$("$tb" switchover --control "$work/beta.sock" r2 2>&1); then
        info "$sc" "switchover r2 $1" "$out"
    else
        log "switchover said: $out"
    fi
    wait_check "$sc" 10 "$2 serves r2 after the switchover" serves "$2" r2
}
switch_r2 "beta -> alpha (asked on the primary)" alpha
sleep 2
switch_r2 "alpha -> beta (asked on the secondary)" beta
sleep 2

# --- 5. the checks ----------------------------------------------------------------------------------
client_stop r1
client_stop r2
kill "$fipspid" 2>/dev/null || true
wait "$fipspid" 2>/dev/null || true
doubles=$(awk '($2 + $3 > 1) || ($4 + $5 > 1) { n++ } END { print n + 0 }' "$work/fips.log")
check "$sc" "never two holders of a floating IP ($doubles of $(wc -l <"$work/fips.log") samples)" test "$doubles" == 0
wait_check "$sc" 60 "r1 in sync" res_settled r1
wait_check "$sc" 60 "r2 in sync" res_settled r2
for r in "${RESOURCES[@]}"; do
    size=$(rfield alpha "$r" size)
    check "$sc" "$r: both disks identical in the data area" \
        cmp -n "${size:-1}" "$work/alpha.$r.img" "$work/beta.$r.img"
done

printf '\n===== placement summary\n'
awk -F '\t' '{ printf "  %-5s %s%s\n", $3, $2, ($4 == "" ? "" : ": " $4) }' "$summary"
if ((failures)); then
    dump
    log "FAILED: $failures check(s)"
    exit 1
fi
log "all passed"
