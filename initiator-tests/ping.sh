#!/usr/bin/env bash
# Ping targets ([cluster] ping, issue 15 item 3): real `twinblade run` nodes in the two-network
# lab of the failover tests (failover-lib.sh: a client network with AoE and the floating IP, a
# replication network, the heartbeat on both), with two ping targets on the client network:
# the client namespace ($CNET.10) and the spare namespace given $CNET.20.
#
#   config      `ping = []` makes `twinblade check-config` and `twinblade run` fail, naming
#               cluster.ping
#   cut         alpha primary, a client writing (`aoe-init versioned`) and probing; alpha's
#               client-facing veth goes down (the replication link stays up): within
#               ping-switch-delay + a few seconds beta serves, the client goes on, no
#               acknowledged write is lost (verify-versions), no probe is answered twice; then
#               alpha's veth comes up again and alpha does not take the resource back. Prints
#               the time from the cut to beta primary and the client's longest stall. Runs
#               about 30 s
#
# Usage: initiator-tests/ping.sh [--keep] [SCENARIO...]   (default: config cut)
#
# Needs root; namespaces tbp-a, tbp-b, tbp-c, tbp-r, bridges tbpbr0 and tbpbr1, subnets
# 10.77.94.0/24 and 192.168.94.0/24 (TWINBLADE_PING_PREFIX / _NET move them). Exits 1 if any
# check failed, after a summary table.
set -euo pipefail

P=${TWINBLADE_PING_PREFIX:-tbp} NET=${TWINBLADE_PING_NET:-94} TAG=ping BLADE=e9.4
PING_INTERVAL=0.5 PING_DEAD=1.5 PING_DELAY=5
all=(config cut)
# shellcheck source=initiator-tests/failover-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/failover-lib.sh"
parse_scenarios "$@"
lab_up
summary=$work/summary.tsv
: >"$summary"
failures=0
TARGET2=$CNET.20 # the spare namespace's address: the second ping target

# failover-lib's [cluster] lines, then the ping keys (PING_LIST overrides the list).
eval "fl_$(declare -f cluster_options)"
cluster_options() {
    fl_cluster_options
    printf 'ping = [%s]\nping-interval = %s\nping-dead-time = %s\nping-switch-delay = %s\n' \
        "${PING_LIST-\"$CNET.10\", \"$TARGET2\"}" "$PING_INTERVAL" "$PING_DEAD" "$PING_DELAY"
}

now_ms() { date +%s%3N; }
reaches() { grep -q "ping: reaching $2 of 2 targets" "$work/$1.log"; } # NODE COUNT: said last?
reach_now() { # NODE COUNT: the node's last reach line says COUNT
    [[ $(grep -o 'ping: reaching [0-9]* of 2 targets' "$work/$1.log" | tail -1) == "ping: reaching $2 of 2 targets" ]]
}

# --- config: an empty list is refused by name ----------------------------------------------------
sc_config() {
    local sc=config bad=$work/bad.toml out rc
    PING_LIST="" write_config "$bad"
    grep -q '^ping = \[\]$' "$bad" || fail "the bad configuration has no empty ping list"
    rc=0
    out=$("$tb" check-config -c "$bad" --node alpha --offline 2>&1) || rc=$?
    check $sc "check-config refuses ping = [] (exit $rc)" [ "$rc" != 0 ]
    check $sc "... naming cluster.ping: ${out//$'\n'/ }" eval '[[ $out == *"cluster.ping: empty list"* ]]'
    rc=0
    out=$(timeout 20 ip netns exec "$P-a" "$tb" run --config "$bad" --node alpha \
        --control "$work/bad.sock" 2>&1) || rc=$?
    check $sc "run refuses ping = [] (exit $rc)" eval '[[ $rc != 0 && $rc != 124 ]]'
    check $sc "... naming cluster.ping" eval '[[ $out == *"cluster.ping: empty list"* ]]'
}

# --- cut: alpha loses its client network, the replication link stays up -------------------------
sc_cut() {
    local sc=cut cut_ms served_ms t alpha_role beta_role
    ip -n "$P-r" addr add "$TARGET2/24" dev eth0
    pair_fresh
    wait_for 20 "alpha reaches both targets" reach_now alpha 2
    wait_for 20 "beta reaches both targets" reach_now beta 2
    fip_start
    clients_start cut
    sleep 3
    cut_ms=$(now_ms)
    log "cutting alpha's client network (${P}v1 down)"
    ip link set "${P}v1" down
    served_ms=
    for _ in $(seq $(((PING_DELAY + 20) * 10))); do
        if [[ $(qfield beta role) == Primary ]]; then
            served_ms=$(now_ms)
            break
        fi
        sleep 0.1
    done
    if [[ -n $served_ms ]]; then
        t=$((served_ms - cut_ms))
        info $sc "from the cut to beta primary" "$t ms (ping-switch-delay ${PING_DELAY} s, dead time ${PING_DEAD} s, interval ${PING_INTERVAL} s)"
        check $sc "beta primary within switch delay + dead time + 5 s ($t ms)" \
            awk -v t="$t" -v lim="$(awk -v d="$PING_DELAY" -v x="$PING_DEAD" 'BEGIN { print (d + x + 5) * 1000 }')" \
            'BEGIN { exit !(t <= lim) }'
    else
        check $sc "beta primary within $((PING_DELAY + 20)) s of the cut" false
    fi
    check $sc "alpha says it reaches 0 of 2" reaches alpha 0
    sleep 4
    log "alpha's veth up again"
    ip link set "${P}v1" up
    wait_for 20 "alpha reaches both targets again" reach_now alpha 2
    sleep $((PING_DELAY + 5))
    alpha_role=$(qf alpha role) beta_role=$(qf beta role)
    check $sc "no failback: beta still primary ($beta_role), alpha secondary ($alpha_role)" \
        eval '[[ $beta_role == Primary && $alpha_role == Secondary ]]'
    clients_stop
    fip_stop
    check $sc "no probe answered twice ($two of $probes; client discoveries $vdouble)" no_two_answers
    check $sc "the client got every write acknowledged (exit $vrc)" client_ok
    check $sc "acknowledged writes ($acked)" served_something
    check $sc "every acknowledged version on the device" verify_versions cut
    info $sc "client stall (the service interruption)" "max ${stall_max} ms, p50 ${stall_p50} ms, gaps over 500 ms ${gaps}, acked ${acked}"
    fip_checks $sc "cut"
    wait_check $sc 60 "reconnected and in sync" settled || true
}

start_s=$(date +%s)
for sc in "${scenarios[@]}"; do
    log "===== $sc"
    "sc_$sc"
done
log "ran $(($(date +%s) - start_s)) s"
printf '\n===== ping summary\n'
awk -F '\t' '{ printf "  %-7s %-5s %s%s\n", $1, $3, $2, ($4 == "" ? "" : ": " $4) }' "$summary"
if ((failures)); then
    log "$failures check(s) failed; the daemons' logs end:"
    dump
    exit 1
fi
log "all passed"
