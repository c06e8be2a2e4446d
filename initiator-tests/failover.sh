#!/usr/bin/env bash
# Failover without split brain (issue 13): real `twinblade run` nodes in namespaces on two
# networks (failover-lib.sh: a client network with AoE and a separate replication network, a
# heartbeat on both), a client that writes versioned blocks over every MAC answering the blade
# as the Linux driver does (`aoe-init versioned`), and a probe counting the moments two nodes
# answer (`aoe-init probe`: answers per query, each query sent once with a tag of its own, so
# two nodes at one shared service MAC count as two). The blade answers from the MAC both nodes
# share (`mac = "auto"`) and the pair has a floating IP on the client network (SERVICE_KEYS=0
# leaves both keys out). Every fault scenario ends with: no probe (nor the client's
# discovery) answered twice, every acknowledged version on the device (`aoe-init
# verify-versions`), the pair reconnected and resynced by itself, both disks identical in the
# data area; link_cut, power_loss and freeze also sample both nodes' addresses every 100 ms:
# never two holders of the floating IP.
#
#   tools       the client tooling against `twinblade vblade`: one target, two targets on one
#               file (two answers seen, writes spread over both), a target that moves (the
#               stall), blocks zeroed or damaged behind its back (verify-versions fails);
#               two answers from one shared MAC are tests/probe_shared_mac.rs's (cargo test)
#   baseline    the pair without faults: alpha's serving MAC (the shared one) alone answers,
#               once per probe, every version there, disks identical, alpha holds the IP
#   link_cut    replication link down for --cut-seconds (30): alpha keeps serving, beta is
#               Outdated and never primary; after the heal a resync without admin action
#   power_loss  the primary's links go dark, then kill -9; the survivor serves; --repeat (5)
#               times, alternating; prints `power-loss stall: median X ms, worst Y ms over N runs`
#   freeze      SIGSTOP of the primary for each of --freeze ("3 15 30") seconds, then SIGCONT:
#               never two answers; the woken node rejoins as secondary and resyncs
#   path_cut    each heartbeat path cut alone for 10 s (replication link; the client network's
#               heartbeat port dropped by nftables in alpha's namespace): no failover; then both
#               heartbeat paths blocked while alpha serves (the link still up): nothing happens;
#               then both blocked and the link cut too, only the client network left: the wire
#               guard keeps beta from a second primary
#   rogue       a rogue `twinblade vblade` answering the same blade on the client network:
#               alpha stops serving and logs "multiple-mount"
#   restore     service restoration: from the primary's power loss (links dark, then kill -9)
#               until a write is acknowledged again (the client resending every 100 ms), at
#               the MAC it knew; --repeat (5) runs each for the default heartbeat profile
#               (interval 0.2 s, dead time 1.0 s), the fast one (0.1 s, 0.5 s) and two vblade
#               baselines (Debian's vblade 25, else `twinblade vblade`: the target's power
#               loss, and another started in the other node's namespace on the same file, from
#               that node's MAC, at once: a failover with no detection at all; or 1.0 s later:
#               what a manager with the default dead time and nothing else to do could reach).
#               Prints one table, median and worst; figures only, the checks are the usual
#               correctness ones
#   soak        --soak-seconds (600) of client load on a busy machine (CPU hogs on every
#               core): no role change on either node, no "lease lapsed", never two answers
#   fence       a fence command ([cluster] fence-peer = a test script, fence-timeout = 2) that
#               exits 4, 7, 5, 1 with garbage on stdout, or hangs past the timeout, at the
#               primary's power loss: the survivor promotes exactly for 4 and 7 (its log names
#               the exit); otherwise it stays Secondary, retries, and no probe hears anybody
#               until the old primary is back and promoted by hand; the usual client checks
#               (every acknowledged version there once it serves). Then appliance/fence/
#               fence-peer-ask with the prefix `ip netns exec <peer namespace>`: both
#               heartbeat paths blocked in alpha's namespace and the replication link cut
#               (only the client network left): alpha asks beta to `outdate` through the
#               namespace and serves again; beta's status says Outdated
#   witness     `twinblade witness` in the spare namespace (tbf-r, $CNET.20 on the client
#               network), the pair configured with it ([cluster] name, witness,
#               witness-timeout = 0.3): the primary's power loss with the witness up: the survivor
#               promotes with the grant (its log names it, status shows the verdict); then with
#               the witness stopped: the survivor stays Secondary, status warns the witness is
#               unreachable, no probe hears anybody; the witness started again (same book): it
#               promotes. Never two answers
#
# Usage: initiator-tests/failover.sh [--keep] [--repeat N] [--soak-seconds S] [--cut-seconds S]
#                                    [--freeze "S..."] [SCENARIO...]   (default: all, in order)
#
# HB_KEYS=0 leaves the heartbeat keys out of the configuration (for a binary without them). The
# results go to a summary table at the end; a failed expectation prints the daemons' log tails
# and the script exits 1. Needs root; namespaces tbf-a, tbf-b, tbf-c, tbf-r, bridges tbfbr0
# (client network) and tbfbr1 (replication network).
set -euo pipefail

# TWINBLADE_FAILOVER_PREFIX / _NET move the lab (namespaces, bridges, 10.77.NET.0/24) so that two
# runs can share a machine.
P=${TWINBLADE_FAILOVER_PREFIX:-tbf} NET=${TWINBLADE_FAILOVER_NET:-93} TAG=failover BLADE=e9.3
repeat=5 soak_seconds=600 cut_seconds=30 freeze_list="3 15 30"
all=(tools baseline link_cut power_loss freeze path_cut rogue restore soak fence witness)
scenarios=()
keep=0
while (($#)); do
    case $1 in
    --keep) keep=1 ;;
    --repeat) repeat=${2:?--repeat needs a value}; shift ;;
    --soak-seconds) soak_seconds=${2:?--soak-seconds needs a value}; shift ;;
    --cut-seconds) cut_seconds=${2:?--cut-seconds needs a value}; shift ;;
    --freeze) freeze_list=${2:?--freeze needs a value}; shift ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    -*) echo "${0##*/}: unknown argument: $1" >&2; exit 2 ;;
    *)
        [[ " ${all[*]} " == *" $1 "* ]] || { echo "${0##*/}: unknown scenario: $1 (${all[*]})" >&2; exit 2; }
        scenarios+=("$1")
        ;;
    esac
    shift
done
((${#scenarios[@]})) || scenarios=("${all[@]}")
for n in "$repeat" "$soak_seconds" "$cut_seconds" $freeze_list; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "${0##*/}: not a number of seconds/runs: $n" >&2; exit 2; }
done

# shellcheck source=initiator-tests/failover-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/failover-lib.sh"
lab_up
top=$work
((HB_KEYS)) || log "HB_KEYS=0: the configuration leaves the heartbeat keys out"
((SERVICE_KEYS)) || log "SERVICE_KEYS=0: the configuration leaves floating-ip and mac out"
summary=$top/summary.tsv
: >"$summary"
shelf=${BLADE#e} slot=${BLADE##*.}
shelf=${shelf%.*}

pair_rebuild() { # after a failure that left the pair unusable: both killed, a new pair
    local n
    for n in alpha beta; do
        kill -CONT "${pid[$n]}" 2>/dev/null || true
        kill -9 "${pid[$n]}" 2>/dev/null || true
        wait "${pid[$n]}" 2>/dev/null || true
    done
    rm -f "$work/alpha.img" "$work/beta.img" "$work/beta.md"
    log "rebuilding the pair"
    pair_fresh
}
stall() { info "$1" "stall${2:+ ($2)}" "max ${stall_max} ms, p50 ${stall_p50} ms, gaps over 500 ms ${gaps}, acked ${acked}, errors ${errors}"; }
# the client's usual end checks: no two answers, the client never gave up, every version there
client_checks() { # SCENARIO NAME
    check "$1" "$2: no probe answered twice ($two of $probes; two MACs $two_macs, one MAC twice $same_mac; client discoveries $vdouble)" no_two_answers
    check "$1" "$2: the client got every write acknowledged (exit $vrc)" client_ok
    check "$1" "$2: every acknowledged version on the device" verify_versions "$2"
}
heal_checks() { # SCENARIO WHAT: reconnect and resync by themselves, disks identical; status 1
    # if they did not (the pair is not usable for more)
    wait_check "$1" 60 "$2: reconnected and resynced without admin action" settled || return 1
    check "$1" "$2: both disks identical in the data area" disks_identical
}

# --- tools: the client tooling against plain targets ---------------------------------------------
vblade_start() { # NAMESPACE FILE [COMMAND...]: a `twinblade vblade` (or COMMAND) for the blade; sets $vbpid
    local ns=$1 file=$2
    shift 2
    (($#)) || set -- "$tb" vblade
    ip netns exec "$ns" "$@" "$shelf" "$slot" eth0 "$file" >>"$work/vblade-$ns.log" 2>&1 &
    vbpid=$!
    pids+=("$vbpid")
}
sc_tools() {
    local sc=tools img=$work/tools.img vb1 vb2 n
    truncate -s $((64 << 20)) "$img"
    vblade_start "$P-r" "$img"
    vb1=$vbpid
    sleep 0.5
    clients_start one
    sleep 3
    clients_stop
    client_checks $sc one
    check $sc "one: acknowledged writes ($acked)" served_something
    # Once per answered probe (client_checks) and always by the same MAC; a probe the busy
    # machine left unanswered within its window is no second server.
    local macs_one
    macs_one=$(kv "$work/one.probe" macs)
    check $sc "one: one MAC answered the probes ($macs_one; $(kv "$work/one.probe" one) of $probes answered)" \
        eval '[[ -n $macs_one && $macs_one != *,* ]] && (($(kv "$work/one.probe" one) > 0))'
    # A second target on the same file: two answers, writes spread over both MACs.
    vblade_start "$P-a" "$img"
    vb2=$vbpid
    sleep 0.5
    clients_start two
    sleep 3
    clients_stop
    check $sc "two: probes answered twice ($two of $probes)" [ "$two" -gt 0 ]
    check $sc "two: ... by two MACs ($two_macs)" [ "$two_macs" -gt 0 ]
    check $sc "two: the client's discovery saw it too ($vdouble)" [ "$vdouble" -gt 0 ]
    n=$(kv "$work/two.versioned" acked_by | tr ',' '\n' | grep -c .)
    check $sc "two: the client's writes were acknowledged by both MACs ($n)" [ "$n" == 2 ]
    check $sc "two: every acknowledged version on the (shared) file" verify_versions two
    # The target moves: the one serving dies, another starts 2 s later.
    kill -9 "$vb1"
    wait "$vb1" 2>/dev/null || true
    sleep 2.5 # the dead MAC is forgotten (2.5 s without an answer)
    clients_start move
    sleep 1
    kill -9 "$vb2"
    wait "$vb2" 2>/dev/null || true
    sleep 2
    vblade_start "$P-r" "$img"
    sleep 3
    clients_stop
    stall $sc "target moved after 2 s"
    check $sc "move: a stall of at least the 2 s without a target (${stall_max} ms)" \
        awk -v s="$stall_max" 'BEGIN { exit !(s >= 2000) }'
    check $sc "move: the client got every write acknowledged (exit $vrc)" client_ok
    check $sc "move: every acknowledged version on the file" verify_versions move
    # Lost and torn writes behind the client's back must show.
    local base=$((1 << 20))
    dd if=/dev/zero of="$img" bs=4096 seek=$((base / 4096 + 5)) count=1 conv=notrunc status=none
    dd if=/dev/urandom of="$img" bs=512 seek=$((base / 512 + 9 * 8 + 3)) count=1 conv=notrunc status=none
    if verify_versions move; then n=0; else n=1; fi
    check $sc "verify-versions fails on a zeroed and a damaged block" [ "$n" == 1 ]
    check $sc "... and counts them (behind=1 torn=1)" grep -q 'behind=1 torn=1' "$work/move.verify"
    kill -9 "$vbpid"
}

# --- baseline: the pair without faults ------------------------------------------------------------
sc_baseline() {
    local sc=baseline
    pair_fresh
    clients_start baseline
    sleep 5
    clients_stop
    client_checks $sc baseline
    check $sc "acknowledged writes ($acked)" served_something
    local amac
    amac=$(serving_mac alpha)
    check $sc "only alpha's serving MAC answered ($amac)" [ "$(kv "$work/baseline.probe" macs)" == "$amac" ]
    if ((SERVICE_KEYS)); then
        check $sc "alpha answers from the shared MAC, not its interface's" [ "$amac" != "$(mac_of alpha)" ]
        check $sc "alpha holds the floating IP, beta not" eval 'holds_fip alpha && ! holds_fip beta'
    fi
    heal_checks $sc baseline
}

# --- link_cut ----------------------------------------------------------------------------------------
sc_link_cut() {
    local sc=link_cut
    pair_fresh
    events_start
    roles_start
    fip_start
    clients_start link_cut
    sleep 2
    log "replication link down for ${cut_seconds}s"
    repl_cut
    sleep "$cut_seconds"
    check $sc "alpha stayed primary during the cut" eval "! seen alpha role Secondary"
    check $sc "beta never became primary" eval "! seen beta role Primary"
    check $sc "beta marked Outdated (status disk)" seen beta disk Outdated
    log "healing the replication link"
    repl_heal
    # Resynced with the client still writing; the disks are compared once it stopped (a write
    # in flight lands on one disk an instant before the other).
    wait_check $sc 60 "after the heal: reconnected and resynced without admin action" settled || true
    clients_stop
    roles_stop
    fip_stop
    check $sc "after the heal: both disks identical in the data area" disks_identical
    stall $sc
    client_checks $sc link_cut
    fip_checks $sc link_cut
    info $sc "role changes (sampled)" "alpha $(role_changes alpha), beta $(role_changes beta)"
}

# --- power_loss --------------------------------------------------------------------------------------
sc_power_loss() {
    local sc=power_loss r prim sec stalls=()
    pair_fresh
    for r in $(seq "$repeat"); do
        prim=$(primary_node)
        [[ -n $prim ]] || { check $sc "run $r: a primary to cut" false; return; }
        sec=$(other "$prim")
        fip_start
        clients_start "power_loss.$r"
        sleep 2
        log "run $r: power loss of $prim"
        power_loss "$prim"
        if ! wait_check $sc 30 "run $r: $sec serves after $prim's power loss" state_is "$sec" role Primary; then
            clients_stop
            fip_stop
            return
        fi
        sleep 3
        clients_stop
        stalls+=("$stall_max")
        stall $sc "run $r"
        client_checks $sc "power_loss.$r"
        if ((SERVICE_KEYS)); then
            check $sc "run $r: $sec holds the floating IP" holds_fip "$sec"
        fi
        power_back "$prim"
        heal_checks $sc "run $r: $prim back" || { fip_stop; return; }
        fip_stop
        fip_checks $sc "run $r (through $prim's return and resync)"
    done
    local sorted median worst
    sorted=$(printf '%s\n' "${stalls[@]}" | sort -n)
    median=$(awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }' <<<"$sorted")
    worst=$(tail -1 <<<"$sorted")
    echo "power-loss stall: median $median ms, worst $worst ms over ${#stalls[@]} runs"
    info $sc "power-loss stall" "median $median ms, worst $worst ms over ${#stalls[@]} runs"
}

# --- freeze ------------------------------------------------------------------------------------------
sc_freeze() {
    local sc=freeze d prim sec now_primary woke
    pair_fresh
    for d in $freeze_list; do
        prim=$(primary_node)
        [[ -n $prim ]] || { check $sc "${d}s: a primary to freeze" false; pair_rebuild; prim=alpha; }
        sec=$(other "$prim")
        roles_start
        fip_start
        clients_start "freeze.$d"
        sleep 2
        log "SIGSTOP $prim for ${d}s"
        kill -STOP "${pid[$prim]}"
        sleep "$d"
        kill -CONT "${pid[$prim]}"
        woke=$(date +%s.%N)
        sleep 5
        clients_stop
        roles_stop
        fip_stop
        # The frozen daemon cannot remove the address its kernel holds: the doubles while it
        # is stopped and those after it woke are told apart.
        fip_checks $sc "${d}s"
        if ((SERVICE_KEYS)); then
            info $sc "${d}s: two holders of the floating IP" "$(fip_doubles 0 "$woke") samples while $prim was stopped, $(fip_doubles "$woke") after it woke"
            check $sc "${d}s: the woken $prim gave the floating IP up ($(fip_doubles "$woke") samples with two holders after the wake)" \
                [ "$(fip_doubles "$woke")" == 0 ]
        fi
        now_primary=$(primary_node)
        stall $sc "${d}s freeze"
        info $sc "${d}s: primary after the wake" "${now_primary:-none} (was $prim)"
        client_checks $sc "freeze.$d"
        # Every freeze is longer than the dead time: the secondary must have taken over (an
        # earlier freeze must not have left it unable to).
        check $sc "${d}s: $sec took over during the freeze" [ "$now_primary" == "$sec" ]
        if [[ $now_primary == "$sec" ]]; then
            wait_check $sc 30 "${d}s: the woken $prim rejoins as secondary" state_is "$prim" role Secondary || true
        fi
        heal_checks $sc "${d}s" || pair_rebuild
    done
}

# --- path_cut ----------------------------------------------------------------------------------------
# path_step NAME WHAT CUT UNCUT: the clients run, CUT for 10 s, UNCUT; beta must stay secondary
# (unless NAME is both: then it is reported); the usual client and heal checks, and a new pair
# if the old one did not heal (so the next step starts clean).
path_step() {
    local sc=path_cut name=$1 what=$2
    : >"$work/roles.log"
    roles_start
    clients_start "path_cut.$name"
    sleep 2
    log "$what for 10s"
    $3
    sleep 10
    [[ $name != both ]] || info $sc "$what" "$(states alpha); $(states beta)"
    $4
    sleep 3
    clients_stop
    roles_stop
    if [[ $name == both ]]; then
        info $sc "$what: role changes" "alpha $(role_changes alpha), beta $(role_changes beta)"
    else
        check $sc "$what: beta stayed secondary" eval "! seen beta role Primary"
        check $sc "$what: alpha stayed primary" eval "! seen alpha role Secondary"
    fi
    stall $sc "$name"
    client_checks $sc "path_cut.$name"
    heal_checks $sc "$what" || pair_rebuild
}
guard_cut() { hb_block alpha eth0 eth1; repl_cut; }
guard_heal() { repl_heal; hb_unblock alpha; }
sc_path_cut() {
    pair_fresh
    events_start
    path_step repl "replication path cut" repl_cut repl_heal
    path_step client "client-network heartbeat dropped in alpha's namespace" "hb_block alpha eth0" "hb_unblock alpha"
    path_step both "both heartbeat paths blocked in alpha's namespace (replication TCP still up)" \
        "hb_block alpha eth0 eth1" "hb_unblock alpha"
    # Only the client network is left between them: each is silent to the other everywhere.
    # The primary's wire guard finds nobody and it serves on; the secondary's, asked later,
    # finds the primary answering: no second primary.
    path_step guard "both heartbeat paths blocked and the replication link cut (the wire guard)" \
        guard_cut guard_heal
    check path_cut "beta's wire guard found alpha answering" \
        grep -q "wire guard: another MAC answers" "$work/beta.log"
    info path_cut "role changes in the event streams (the first pair)" "alpha $(event_role_changes alpha), beta $(event_role_changes beta)"
}

# --- rogue -------------------------------------------------------------------------------------------
alpha_silent() { # the last 5 probes did not hear alpha's serving MAC ($amac)
    [[ $(tail -5 "$work/rogue.probes" | wc -l) == 5 ]] && ! tail -5 "$work/rogue.probes" | grep -q "$amac"
}
sc_rogue() {
    local sc=rogue rogue amac
    pair_fresh
    amac=$(serving_mac alpha)
    truncate -s "$usable" "$work/rogue.img"
    clients_start rogue
    sleep 2
    log "a rogue responder for $BLADE on the client network"
    vblade_start "$P-r" "$work/rogue.img"
    rogue=$vbpid
    wait_check $sc 15 "alpha stops answering $BLADE" alpha_silent || true
    check $sc "alpha logs multiple-mount" grep -q "multiple-mount" "$work/alpha.log"
    info $sc "alpha after the rogue appeared" "$(states alpha)"
    kill -9 "$rogue"
    wait "$rogue" 2>/dev/null || true
    sleep 3
    clients_stop
    info $sc "the last probes after the rogue left" "$(tail -3 "$work/rogue.probes" | tr '\n' ';')"
    if verify_versions rogue; then
        info $sc "versions" "every acknowledged version on the pair"
    else
        info $sc "versions" "$(head -1 "$work/rogue.verify") (writes the rogue acknowledged are not on the pair)"
    fi
}

# --- restore -----------------------------------------------------------------------------------------
# restored NAME: from $loss_ms to the end of the client's outage: the first acknowledgement
# after the first gap of 50 ms or more between acknowledgements that began after (or just
# before) the loss (else the first acknowledgement after the loss: the client writes without
# gaps of more than a few ms otherwise); sets $restored (ms, or "none") and $restored_mac (same|new: from the MAC
# the client wrote to before the loss, or another) and $restored_detail.
restored() {
    local out
    out=$(awk -v start="$vstarted" -v loss="$loss_ms" '
        { t = start + $1 }
        NR > 1 && t > loss && prev >= loss - 1000 && t - prev >= 50 {
            printf "%d %s %s %s\n", t - loss, ($4 == pmac ? "same" : "new"), pmac, $4; found = 1; exit
        }
        t > loss && first == "" { first = sprintf("%d %s %s %s", t - loss, ($4 == pmac ? "same" : "new"), pmac, $4) }
        { prev = t; pmac = $4 }
        END { if (!found) print (first != "" ? first : "none - - -") }' "$work/$1.acklog")
    local before after
    read -r restored restored_mac before after <<<"$out"
    restored_detail="$restored_mac ($before before, $after after)"
}
restore_run() { # PROFILE RUN: the client writing, the primary's power loss, the figure
    local profile=$1 r=$2 prim sec name=restore.$1.$2
    prim=$(primary_node)
    [[ -n $prim ]] || { check restore "$profile run $r: a primary to cut" false; return 1; }
    sec=$(other "$prim")
    clients_start "$name"
    sleep 2
    log "$profile run $r: power loss of $prim"
    power_loss "$prim"
    if ! wait_check restore 30 "$profile run $r: $sec serves after $prim's power loss" state_is "$sec" role Primary; then
        clients_stop
        return 1
    fi
    sleep 2
    clients_stop
    restored "$name"
    echo "$profile $restored $restored_mac" >>"$work/restore.tsv"
    info restore "$profile run $r" "restored after $restored ms, MAC $restored_detail"
    info restore "$profile run $r: $sec's failover timeline" "$(grep -h 'failover timeline' "$work/$sec.log" |
        tail -1 | sed 's/.*failover timeline[^:]*: //; s/ resource=.*//')"
    client_checks restore "$name"
    power_back "$prim"
    heal_checks restore "$profile run $r: $prim back" || return 1
}
restore_vblade() { # LABEL DELAY: the baseline: a plain target's power loss, another started elsewhere DELAY s later
    local label=$1 delay=$2 r from=alpha to=beta img=$work/vblade.img vb name cmd=()
    if [[ -x /usr/sbin/vblade ]]; then cmd=(/usr/sbin/vblade); else cmd=("$tb" vblade); fi
    log "vblade baseline with: ${cmd[*]}"
    info restore "vblade baseline target" "${cmd[*]} ($(
        [[ ${cmd[0]} == /usr/sbin/vblade ]] && dpkg-query -W -f='Debian vblade ${Version}' vblade 2>/dev/null
    ))"
    rm -f "$img"
    truncate -s $((64 << 20)) "$img"
    vblade_start "$(ns_of $from)" "$img" "${cmd[@]}"
    vb=$vbpid
    sleep 0.5
    for r in $(seq "$repeat"); do
        name=restore.$label.$r
        clients_start "$name"
        sleep 2
        log "$label run $r: power loss of the target in $from, another started in $to ${delay}s later"
        : >"$work/off.$from"
        loss_ms=$(date +%s%3N)
        link $from client down
        { kill -9 "$vb" && wait "$vb"; } 2>/dev/null || true
        sleep "$delay"
        vblade_start "$(ns_of $to)" "$img" "${cmd[@]}"
        vb=$vbpid
        sleep 3
        clients_stop
        restored "$name"
        echo "$label $restored $restored_mac" >>"$work/restore.tsv"
        info restore "$label run $r" "restored after $restored ms, MAC $restored_detail"
        check restore "$label run $r: the client got every write acknowledged (exit $vrc)" client_ok
        check restore "$label run $r: every acknowledged version on the file" verify_versions "$name"
        link $from client up
        rm -f "$work/off.$from"
        from=$to to=$(other "$to")
    done
    { kill -9 "$vb" && wait "$vb"; } 2>/dev/null || true
}
sc_restore() {
    local profile n
    : >"$work/restore.tsv"
    info restore "machine load at the start" "$(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, $(nproc) cores)"
    for profile in default fast; do
        if [[ $profile == fast ]]; then HB_INTERVAL=0.1 HB_DEAD=0.5; else HB_INTERVAL=0.2 HB_DEAD=1.0; fi
        RETRANSMIT_MS=100
        log "restore: the $profile profile (heartbeat-interval $HB_INTERVAL, heartbeat-dead-time $HB_DEAD)"
        if [[ -n ${pid[alpha]:-} ]]; then pair_rebuild; else pair_fresh; fi
        for n in $(seq "$repeat"); do
            restore_run $profile "$n" || { pair_rebuild; continue; }
        done
    done
    for n in alpha beta; do
        kill -CONT "${pid[$n]:-}" 2>/dev/null || true
        kill -9 "${pid[$n]:-}" 2>/dev/null || true
        wait "${pid[$n]:-}" 2>/dev/null || true
    done
    restore_vblade vblade 0
    restore_vblade vblade-dead 1.0
    info restore "machine load at the end" "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf '\nservice restoration: from the primary'"'"'s power loss to the first write acknowledged again\n'
    printf '(the project'"'"'s initiator writing continuously, resending every 100 ms; load %s)\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf '  %-34s %5s %10s %10s  %s\n' "target" "runs" "median ms" "worst ms" "at the MAC the client knew"
    local label
    for profile in default fast vblade vblade-dead; do
        case $profile in
        default) label="twinblade pair, default (0.2/1.0 s)" ;;
        fast) label="twinblade pair, fast (0.1/0.5 s)" ;;
        vblade) label="vblade restarted elsewhere at once" ;;
        vblade-dead) label="vblade restarted after 1.0 s" ;;
        esac
        awk -v p="$profile" -v label="$label" '
            $1 == p && $2 != "none" { v[++n] = $2; if ($3 == "same") same++ }
            $1 == p && $2 == "none" { lost++ }
            END {
                if (n == 0) { printf "  %-34s %5d %10s %10s  %s\n", label, 0, "-", "-", (lost ? lost " never restored" : "-"); exit }
                for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
                med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
                printf "  %-34s %5d %10d %10d  %d of %d%s\n", label, n, med, v[n], same + 0, n, (lost ? ", " lost " never restored" : "")
            }' "$work/restore.tsv" | tee -a "$work/restore.table"
    done
    while read -r line; do info restore "table" "$line"; done <"$work/restore.table"
}

# --- soak --------------------------------------------------------------------------------------------
sc_soak() {
    local sc=soak i hogs=() lapses
    pair_fresh
    events_start
    roles_start
    clients_start soak
    for i in $(seq "$(nproc)"); do
        (while :; do :; done) &
        hogs+=("$!")
        pids+=("$!")
    done
    log "soak: ${soak_seconds}s of client load with ${#hogs[@]} CPU hogs"
    sleep "$soak_seconds"
    kill "${hogs[@]}"
    clients_stop
    roles_stop
    stall $sc
    check $sc "no role change on alpha (sampled $(role_changes alpha), events $(event_role_changes alpha))" \
        [ "$(role_changes alpha)$(event_role_changes alpha)" == 00 ]
    check $sc "no role change on beta (sampled $(role_changes beta), events $(event_role_changes beta))" \
        [ "$(role_changes beta)$(event_role_changes beta)" == 00 ]
    lapses=$(cat "$work/alpha.log" "$work/beta.log" | grep -c "lease lapsed" || true)
    check $sc "no lease lapsed ($lapses)" [ "$lapses" == 0 ]
    client_checks $sc soak
    heal_checks $sc soak
}

# --- fence: the fence command as a condition of the promotion gate ---------------------------------
FENCE_TIMEOUT=2
# fence_script: $work/fence-peer, the command both nodes run: it logs its environment to
# $work/fence.calls, then execs $work/fence.exec if that exists, else does what
# $work/fence.mode says (an exit code, garbage, hang).
fence_script() {
    cat >"$work/fence-peer" <<EOF
#!/bin/sh
echo "\$(date +%s.%N) node=\$TWINBLADE_NODE peer=\$TWINBLADE_PEER resource=\$TWINBLADE_RESOURCE drbd=\$DRBD_RESOURCE/\$DRBD_PEER addresses=\$TWINBLADE_PEER_ADDRESSES mode=\$(cat $work/fence.mode)" >>$work/fence.calls
[ -x $work/fence.exec ] && exec $work/fence.exec
case \$(cat $work/fence.mode) in
hang) sleep 60; exit 7 ;;
garbage) echo "garbage from the fence command"; exit 1 ;;
*) exit \$(cat $work/fence.mode) ;;
esac
EOF
    chmod +x "$work/fence-peer"
}
fence_calls() { grep -c "node=$1 " "$work/fence.calls" 2>/dev/null || true; } # NODE
# nobody_answered_after AT-MS: no probe logged after AT-MS (ms since the probe started) heard
# an answer
nobody_answered_after() { [[ $(awk -v t="$1" '$1 > t && $2 > 0' "$cl.probes" | wc -l) == 0 ]]; }
logged() { grep -q -- "$2" "$work/$1.log"; } # NODE REGEX
fence_run() { # MODE EXIT: a power loss of the primary with the fence command in MODE
    local sc=fence mode=$1 code=$2 prim sec name=fence.$1 started loss_at vouches=0 expect
    [[ $code == 4 || $code == 7 ]] && vouches=1
    prim=$(primary_node)
    [[ -n $prim ]] || { check $sc "$mode: a primary to cut" false; return 1; }
    sec=$(other "$prim")
    echo "$mode" >"$work/fence.mode"
    : >"$work/fence.calls"
    : >"$work/roles.log"
    roles_start
    started=$(date +%s%3N)
    clients_start "$name"
    sleep 2
    log "$mode: power loss of $prim"
    power_loss "$prim"
    loss_at=$((loss_ms - started + 300))
    if ((vouches)); then
        wait_check $sc 20 "$mode: $sec promotes after $prim's power loss" state_is "$sec" role Primary || true
        sleep 2
    else
        # Dead time, takeover delay, the command (up to its timeout) and at least one retry.
        sleep $((4 * FENCE_TIMEOUT + 3))
        check $sc "$mode: $sec stays Secondary" state_is "$sec" role Secondary
        check $sc "$mode: $sec was never Primary (sampled)" eval "! seen $sec role Primary"
        check $sc "$mode: no probe heard anybody after the power loss" nobody_answered_after "$loss_at"
        check $sc "$mode: $sec ran the command again after the back-off ($(fence_calls "$sec") runs)" \
            [ "$(fence_calls "$sec")" -ge 2 ]
    fi
    roles_stop
    case $mode in
    hang) expect="fence-peer timed out" ;;
    *) expect="fence-peer exit $code" ;;
    esac
    check $sc "$mode: $sec ran the fence command with the contract's environment" \
        grep -q "node=$sec peer=$prim resource=r0 drbd=r0/$prim addresses=$(replication_address "$prim") " "$work/fence.calls"
    if ((vouches)); then
        check $sc "$mode: $sec's log names the vouch (auto-promote: ... $expect)" logged "$sec" "auto-promote: .*$expect"
    else
        check $sc "$mode: $sec's log names the refusal ($expect ...: not serving alone)" logged "$sec" "$expect.*: not serving alone"
        [[ $mode != garbage ]] || check $sc "$mode: the command's output is in the log" logged "$sec" "fence command stdout: garbage from the fence command"
        check $sc "$mode: status shows the last fence result" eval "\"$tb\" status --control \"$work/$sec.sock\" r0 | grep -q 'last fence-peer: .*refused'"
    fi
    power_back "$prim"
    if ! ((vouches)); then
        # Nobody serves: the old primary, back and reconnected, is promoted by hand.
        wait_for 30 "$prim and $sec reconnected" state_is "$prim" connection Connected
        sleep 1
        if [[ -z $(primary_node) ]]; then
            ctl "$prim" primary r0 >/dev/null || check $sc "$mode: $prim promoted by hand after its return" false
        fi
        sleep 2
    fi
    clients_stop
    client_checks $sc "$name"
    heal_checks $sc "$mode: $prim back" || return 1
}
fence_ask() { # fence-peer-ask through `ip netns exec`: the peer outdates itself
    local sc=fence prim sec
    cat >"$work/fence.exec" <<EOF
#!/bin/sh
# The sample, reaching the peer's namespace instead of its ssh (one script for both nodes).
case \$TWINBLADE_PEER in alpha) ns=$P-a ;; *) ns=$P-b ;; esac
FENCE_ASK_PREFIX="ip netns exec \$ns" FENCE_ASK_COMMAND="$tb outdate --control $work/\$TWINBLADE_PEER.sock" FENCE_ASK_CONF=/dev/null
export FENCE_ASK_PREFIX FENCE_ASK_COMMAND FENCE_ASK_CONF
exec $repo/appliance/fence/fence-peer-ask
EOF
    chmod +x "$work/fence.exec"
    echo ask >"$work/fence.mode"
    prim=$(primary_node)
    [[ -n $prim ]] || { check $sc "ask: a primary" false; return 1; }
    sec=$(other "$prim")
    clients_start fence.ask
    sleep 2
    log "ask: both heartbeat paths blocked in $prim's namespace and the replication link cut"
    hb_block "$prim" eth0 eth1
    repl_cut
    wait_check $sc 20 "ask: $sec persisted Outdated (its status)" state_is "$sec" disk Outdated || true
    wait_check $sc 10 "ask: $prim answers again" eval "\"$tb\" status --control \"$work/$prim.sock\" r0 | grep -q 'answering:true'" || true
    check $sc "ask: $prim's fence command (fence-peer-ask) exited 4" logged "$prim" "fence-peer exit 4 (peer outdated)"
    check $sc "ask: $prim serves without the peer by that vouch" logged "$prim" "serving without the peer: .*fence-peer exit 4"
    check $sc "ask: $sec stayed Secondary" state_is "$sec" role Secondary
    sleep 2
    clients_stop
    client_checks $sc fence.ask
    info $sc "ask: what $prim's fence command said" "$(grep -h 'fence command stderr' "$work/$prim.log" | sed 's/.*fence command stderr: //' | tr '\n' ';' | cut -c1-300)"
    rm -f "$work/fence.exec"
    hb_unblock "$prim"
    repl_heal
    heal_checks $sc "ask: after the heal" || return 1
}
sc_fence() {
    eval "hb_$(declare -f cluster_options)"
    # shellcheck disable=SC2317 # called by write_config
    cluster_options() {
        hb_cluster_options
        printf 'fence-peer = "%s"\nfence-timeout = %s\n' "$work/fence-peer" "$FENCE_TIMEOUT"
    }
    fence_script
    pair_fresh
    local run
    for run in "4 4" "7 7" "5 5" "garbage 1" "hang -"; do
        # shellcheck disable=SC2086
        fence_run $run || pair_rebuild
    done
    fence_ask
}

# --- witness: the third vote as a condition of the promotion gate -----------------------------------
WITNESS=$CNET.20:7791
witness_start() { # the witness in the spare namespace, on the client network; sets $wpid
    ip netns exec "$P-r" "$tb" witness -c "$work/witness.toml" >>"$work/witness.log" 2>&1 &
    wpid=$!
    pids+=("$wpid")
    sleep 0.5
}
witness_stop() { kill "$wpid" 2>/dev/null || true; wait "$wpid" 2>/dev/null || true; }
witness_run() { # up|down: the primary's power loss with the witness running or stopped
    local sc=witness mode=$1 prim sec started loss_at
    prim=$(primary_node)
    [[ -n $prim ]] || { check $sc "$mode: a primary to cut" false; return 1; }
    sec=$(other "$prim")
    : >"$work/roles.log"
    [[ $mode == up ]] || witness_stop
    roles_start
    started=$(date +%s%3N)
    clients_start "witness.$mode"
    sleep 2
    log "$mode: power loss of $prim (witness $mode)"
    power_loss "$prim"
    loss_at=$((loss_ms - started + 300))
    if [[ $mode == up ]]; then
        wait_check $sc 20 "up: $sec promotes after $prim's power loss" state_is "$sec" role Primary || true
        sleep 2
    else
        # Dead time, takeover delay, the tries (0.9 s) and a retry or more.
        sleep 8
        check $sc "down: $sec stays Secondary" state_is "$sec" role Secondary
        check $sc "down: $sec was never Primary (sampled)" eval "! seen $sec role Primary"
        check $sc "down: no probe heard anybody after the power loss" nobody_answered_after "$loss_at"
        check $sc "down: $sec's log names the refusal" logged "$sec" "witness unreachable: not serving alone"
        check $sc "down: status warns that the witness is unreachable" \
            eval "ctl $sec status r0 | grep -q 'witness: .*unreachable.*warning'"
        log "down: the witness starts again"
        witness_start
        wait_check $sc 20 "down: $sec promotes once the witness answers" state_is "$sec" role Primary || true
        sleep 2
    fi
    roles_stop
    check $sc "$mode: $sec's log names the grant (auto-promote: ... witness granted generation)" \
        logged "$sec" "auto-promote: .*witness granted generation"
    check $sc "$mode: status shows the witness's verdict" \
        eval "ctl $sec status r0 | grep -q 'witness: $WITNESS as tbf-lab/$sec, last verdict: granted generation'"
    clients_stop
    client_checks $sc "witness.$mode"
    power_back "$prim"
    heal_checks $sc "$mode: $prim back" || return 1
}
sc_witness() {
    eval "hb_$(declare -f cluster_options)"
    # shellcheck disable=SC2317 # called by write_config
    cluster_options() {
        hb_cluster_options
        printf 'name = "tbf-lab"\nwitness = "%s"\nwitness-timeout = 0.3\n' "$WITNESS"
    }
    ip -n "$P-r" addr add "$CNET.20/24" dev eth0
    printf 'listen = "%s"\nstate = "%s"\n[pair.tbf-lab]\nshared-secret = "%s"\n' \
        "$WITNESS" "$work/witness.book" "${SECRET:-pair-secret}" >"$work/witness.toml"
    witness_start
    pair_fresh
    witness_run up || pair_rebuild
    witness_run down
    info witness "the book" "$(tr '\n' ';' <"$work/witness.book")"
    witness_stop
}

# --- running them ------------------------------------------------------------------------------------
scenario_cleanup() {
    local rc=$? p
    for p in "${pids[@]}"; do
        kill -CONT "$p" 2>/dev/null || true
        kill -9 "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit "$rc"
}
failed=()
for sc in "${scenarios[@]}"; do
    log "===== $sc"
    rc=0
    (
        work=$top/$sc
        mkdir -p "$work"
        cfg=$work/pair.toml
        model=$work/model.img
        pids=()
        failures=0
        trap scenario_cleanup EXIT
        net_up
        "sc_$sc"
        if ((failures)); then
            log "$failures expectation(s) of $sc failed; the daemons' logs end:"
            dump
            exit 1
        fi
    ) || rc=$?
    if ((rc != 0)); then
        failed+=("$sc")
        grep -q "^$sc	" "$summary" || record "$sc" "(setup)" FAIL "ended with $rc"
        grep -q "^$sc	.*	FAIL	" "$summary" || record "$sc" "(scenario)" FAIL "ended with $rc: see the log above"
    fi
    log "===== $sc: $( ((rc == 0)) && echo PASS || echo FAIL)"
done

printf '\n===== failover summary\n'
awk -F '\t' '{ printf "  %-11s %-5s %s%s\n", $1, $3, $2, ($4 == "" ? "" : ": " $4) }' "$summary"
if ((${#failed[@]})); then
    # Repeated last: a log cut to its tail still says what failed.
    printf '\n===== failed checks\n'
    awk -F '\t' '$3 == "FAIL" { printf "  %-11s %s%s\n", $1, $2, ($4 == "" ? "" : ": " $4) }' "$summary"
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all passed"
