#!/usr/bin/env bash
# The witness against network splits (issue 15): real `twinblade run` nodes in namespaces
# (failover-lib.sh's two networks, prefix tbw), with the client network in two halves joined by
# a trunk: bridge tbwbr0 (alpha, client 1 in tbw-c) and bridge tbwbr2 (beta, client 2 in
# tbw-d), the trunk a veth pair tbwj0–tbwj2 between them. Splitting the client network is
# taking the trunk down. The witness (`twinblade witness`, in tbw-r) has a leg on each half
# (eth0 on tbwbr0 with 10.77.95.20/24, eth1 on tbwbr2 with the same address as a /32 and host
# routes to beta and client 2; arp_filter so that each leg answers only for its half), so both
# halves reach it whatever the trunk does. Each client runs `aoe-init versioned` (its own 1 MiB
# of versioned blocks) and `aoe-init probe`; "two answers" counts probes answered twice by one
# client, plus probes of client 1 and client 2 answered within 200 ms of each other while the
# trunk is down (each half can only hear its own node: both answering is two nodes serving).
#
#   split_witness  trunk and replication link cut while both clients write, the pair configured
#                  with the witness: exactly one node serves (no probe with two answers, across
#                  both clients), the other hears `held by` and never serves; after the heal the
#                  loser resyncs by itself and every version either client was told was written
#                  is on the device (the losing half's client gets no acknowledgement while cut)
#   split_none     the same split without a witness: README's warning shown true: both nodes
#                  serve (probes of both halves answered), and the handshake reports split brain
#                  when the networks return (`Split-Brain detected` in a node's log)
#   witness_restart  the witness stopped, the primary's power loss (links dark, kill -9), the
#                  witness started again 2 s later (same book): the survivor promotes only after
#                  the witness is back, with the grant; never two answers; nothing acknowledged
#                  lost. Then the witness restarted once more: the survivor still holds its grant
#                  (`witness-ask` says `held NODE`, a claim by the other node is refused)
#   witness_oneway nftables in beta's namespace drops its packets to the witness: beta's status
#                  warns; the pair keeps serving; alpha's power loss (alpha reaches the witness):
#                  beta does not promote and its log says why; alpha back, the roles swapped by
#                  hand, beta's power loss: alpha promotes with the grant
#   two_pairs      a second pair (prefix tbw2, 10.77.96.0/24, pair name tbw-lab2, blade e9.6) on
#                  the same witness (a third leg of tbw-r, 10.77.96.20): pair 1's primary's power
#                  loss fails pair 1 over and leaves pair 2 alone (same primary answering, still
#                  in sync, no auto-promote on its secondary); then pair 2's primary's: pair 2
#                  fails over with its own grant; the book holds both pairs' grants. (Pair 2 has
#                  its own namespaces, bridges and blade; its resource is also named r0, which
#                  the witness keeps apart by pair name; ports are the same numbers, in other
#                  namespaces.)
#   no_quorum      on-no-quorum (`on-no-quorum = "io-error"`, `on-no-quorum-timeout = 3`, NBD on
#                  0.0.0.0:10809): qemu-io connected to alpha's own address writes, then alpha
#                  loses the witness (nftables) and its peer (beta's power loss): the next write
#                  fails with EIO, not before the bound; a new connection's read fails at once;
#                  AoE probes hear nothing after the lease. Then `suspend-io`: the write is held
#                  past the bound and completes once the witness is reachable again (the grant)
#
# Usage: initiator-tests/split.sh [--keep] [SCENARIO...]   (default: all, in order)
#
# Prints a summary table (probes and probes with two answers per scenario, failover times) and
# exits 1 if any check failed. Needs root; namespaces tbw-a, tbw-b, tbw-c, tbw-d, tbw-r and
# tbw2-a, tbw2-b, tbw2-c, tbw2-r; bridges tbwbr0, tbwbr1, tbwbr2, tbw2br0, tbw2br1.
set -euo pipefail

P=tbw NET=95 TAG=split BLADE=e9.5
all=(split_witness split_none witness_restart witness_oneway two_pairs no_quorum)
# shellcheck source=initiator-tests/failover-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/failover-lib.sh"
parse_scenarios "$@"

WNS=tbw-r                 # the witness's namespace
WADDR=10.77.95.20         # the witness on pair 1's client network (both halves)
W2ADDR=10.77.96.20        # and on pair 2's
WPORT=7791
WITNESS_ON=1              # the pair's configuration names the witness
PAIR_NAME=tbw-lab
WITNESS=$WADDR:$WPORT

# --- the split network ----------------------------------------------------------------------
eval "lib_$(declare -f net_down)"
eval "lib_$(declare -f net_up)"
net_down() {
    lib_net_down
    ip netns del "$P-d" 2>/dev/null || true
    local i
    for i in v5 v6 v7 j0 j2; do ip link del "${P}$i" 2>/dev/null || true; done
    ip link del "${P}br2" 2>/dev/null || true
}
# split_net_up: failover-lib's two networks, then the client network's second half: bridge
# ${P}br2 with beta (its veth moved there) and client 2, the trunk, the witness's second leg.
split_net_up() {
    net_up
    ip link add "${P}br2" type bridge
    ip link set "${P}br2" mtu "${MTU:-1500}" up
    ip link set "${P}v2" master "${P}br2"
    ip netns add "$P-d"
    ip -n "$P-d" link set lo up
    veth "$P-d" "${P}v5" eth0 "${P}br2" "$CNET.11"
    ip link add "${P}j0" type veth peer name "${P}j2"
    ip link set "${P}j0" master "${P}br0" up
    ip link set "${P}j2" master "${P}br2" up
    # The witness: eth0 on the first half, eth1 on the second (same address, host routes).
    ip -n "$WNS" addr add "$WADDR/24" dev eth0
    ip link add "${P}v6" type veth peer name eth1 netns "$WNS"
    ip link set "${P}v6" master "${P}br2" up
    ip -n "$WNS" link set eth1 up
    ip -n "$WNS" addr add "$WADDR/32" dev eth1
    ip -n "$WNS" route add "$CNET.2/32" dev eth1 src "$WADDR"
    ip -n "$WNS" route add "$CNET.11/32" dev eth1 src "$WADDR"
    ip netns exec "$WNS" sysctl -qw net.ipv4.conf.all.arp_filter=1 net.ipv4.conf.eth0.arp_filter=1 \
        net.ipv4.conf.eth1.arp_filter=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0 \
        net.ipv4.conf.eth1.rp_filter=0
}
trunk() { ip link set "${P}j0" "$1"; ip link set "${P}j2" "$1"; } # up|down
split_cut() { trunk down; repl_cut; split_ms=$(date +%s%3N); }
split_heal() { trunk up; repl_heal; }

# --- the configuration ----------------------------------------------------------------------
eval "hb_$(declare -f cluster_options)"
cluster_options() {
    hb_cluster_options
    ((WITNESS_ON)) || return 0
    printf 'name = "%s"\nwitness = "%s"\nwitness-timeout = 0.3\n' "$PAIR_NAME" "$WITNESS"
}
eval "svc_$(declare -f resource_options)"
resource_options() {
    svc_resource_options
    [[ -z ${NBD_KEYS:-} ]] || printf '%s\n' "$NBD_KEYS"
}
witness_config() {
    printf 'listen = "0.0.0.0:%s"\nstate = "%s"\n[pair.tbw-lab]\nshared-secret = "%s"\n[pair.tbw-lab2]\nshared-secret = "%s"\n' \
        "$WPORT" "$wbook" "${SECRET:-pair-secret}" "${SECRET:-pair-secret}" >"$wbase/witness.toml"
}
witness_start() { # sets $wpid, $wstart_ms
    ip netns exec "$WNS" "$tb" witness -c "$wbase/witness.toml" >>"$wbase/witness.log" 2>&1 &
    wpid=$!
    pids+=("$wpid")
    wstart_ms=$(date +%s%3N)
    sleep 0.3
    kill -0 "$wpid" 2>/dev/null || fail "the witness did not start: $(tail -3 "$wbase/witness.log")"
}
witness_stop() { kill "$wpid" 2>/dev/null || true; wait "$wpid" 2>/dev/null || true; }
witness_ask() { # NODE GENERATION [--claim]: what the witness says of pair 1's r0 at GENERATION
    local f=$wbase/secret
    printf '%s' "${SECRET:-pair-secret}" >"$f"
    chmod 600 "$f"
    local out _
    for _ in 1 2 3; do # the first datagram to a witness just started may find it still loading
        out=$(ip netns exec "$P-c" "$tb" witness-ask --witness "$WITNESS" --secret-file "$f" --pair "$PAIR_NAME" \
            --node "$1" --resource r0 --generation "$2" "${@:3}" 2>&1 || true)
        [[ $out == *"no answer"* ]] || break
        sleep 1
    done
    echo "$out"
}


# --- the clients: one per half (or per pair), each with its own acknowledgement log -----------
declare -A cv cp cstart
# client_start NAME NAMESPACE OFFSET: versioned writes and probes in NAMESPACE
client_start() {
    local name=$1 ns=$2 c=$work/$1
    cstart[$name]=$(date +%s%3N)
    ip netns exec "$ns" "$init" -i eth0 versioned "$BLADE" --blocks "$VBLOCKS" --offset "$3" \
        --retransmit-ms "$RETRANSMIT_MS" --acks "$c.acks" --ack-log "$c.acklog" >"$c.versioned" 2>&1 &
    cv[$name]=$!
    pids+=("$!")
    ip netns exec "$ns" "$init" -i eth0 probe "$BLADE" --log "$c.probes" >"$c.probe" 2>&1 &
    cp[$name]=$!
    pids+=("$!")
}
client_alive() { kill -0 "${cv[$1]}" 2>/dev/null && kill -0 "${cp[$1]}" 2>/dev/null; }
# client_stop NAME: ends it; sets acked, two, probes, vrc, vdouble, stall_max, vstarted, cl
client_stop() {
    cl=$work/$1
    kill -TERM "${cv[$1]}" "${cp[$1]}" 2>/dev/null || true
    vrc=0
    wait "${cv[$1]}" || vrc=$?
    wait "${cp[$1]}" || true
    acked=$(kv "$cl.versioned" acked)
    stall_max=$(kv "$cl.versioned" stall_max_ms)
    vdouble=$(kv "$cl.versioned" double_answers)
    vstarted=$(kv "$cl.versioned" started_unix_ms)
    probes=$(kv "$cl.probe" probes)
    two=$(kv "$cl.probe" two)
    log "$1: $(grep -h 'acked=' "$cl.versioned" | cut -c1-200)"
    log "$1 probe: $(grep -h 'probes=' "$cl.probe")"
    [[ -n $acked && -n $two && -n $vdouble ]] || fail "no summary from client $1: $(tail -3 "$cl.versioned" "$cl.probe")"
}
# verify NAME: every version client NAME was told was written is on the device (read from
# client 1's namespace, which reaches the serving node once the networks are whole).
verify() {
    ip netns exec "$P-c" "$init" -i eth0 verify-versions "$BLADE" --acks "$work/$1.acks" >"$work/$1.verify" 2>&1
    local rc=$?
    log "verify $1: $(head -1 "$work/$1.verify")"
    return "$rc"
}
# answered_ms NAME: the absolute times (ms) of NAME's probes that heard an answer
answered_ms() { awk -v s="${cstart[$1]}" '$2 > 0 { print s + $1 }' "$work/$1.probes"; }
# both_halves A B FROM TO: probes of A answered within 200 ms of an answered probe of B, both
# between FROM and TO (ms since the epoch): two nodes serving at once
both_halves() {
    awk -v from="$3" -v to="$4" 'NR == FNR { if ($1 >= from && $1 <= to) b[n++] = $1; next }
        $1 >= from && $1 <= to { for (i = 0; i < n; i++) if (b[i] - $1 <= 200 && $1 - b[i] <= 200) { c++; break } }
        END { print c + 0 }' <(answered_ms "$2") <(answered_ms "$1")
}
probes_between() { # NAME FROM TO: probes of NAME between FROM and TO, and how many heard an answer
    awk -v s="${cstart[$1]}" -v from="$2" -v to="$3" '{ t = s + $1 } t >= from && t <= to { n++; if ($2 > 0) a++ }
        END { printf "%d probes, %d answered", n, a }' "$work/$1.probes"
}
first_primary_ms() { # NODE: the first roles.log sample (ms) with NODE Primary, or nothing
    local col
    col=$([[ $1 == alpha ]] && echo 2 || echo 4)
    awk -v c="$col" '$c == "Primary" { printf "%d\n", $1 * 1000; exit }' "$work/roles.log"
}
logged() { grep -q -- "$2" "$work/$1.log"; } # NODE REGEX
is_zero() { [[ $1 == 0 ]]; }
positive() { (($1 > 0)); }
one_serves() { [[ $(serves alpha && echo 1)$(serves beta && echo 1) == 1 ]]; }
serves() { state_is "$1" role Primary && ctl "$1" status r0 2>/dev/null | grep -q 'answering:true'; }
heal_checks() { # SCENARIO WHAT
    wait_check "$1" 60 "$2: reconnected and resynced without admin action" settled || return 1
    check "$1" "$2: both disks identical in the data area" disks_identical
}

# --- split_witness / split_none -----------------------------------------------------------------
split_run() { # SCENARIO: the split with or without the witness
    local sc=$1 cut_at heal_at winner loser cross p1 p2
    split_net_up
    if ((WITNESS_ON)); then
        witness_config
        witness_start
    fi
    pair_fresh
    : >"$work/roles.log"
    roles_start
    client_start c1 "$P-c" 1M
    client_start c2 "$P-d" 4M
    sleep 3
    { client_alive c1 && client_alive c2; } || fail "a client ended at once"
    log "split: trunk and replication link cut"
    split_cut
    cut_at=$split_ms
    sleep 12
    heal_at=$(date +%s%3N)
    p1=$(probes_between c1 "$cut_at" "$heal_at")
    p2=$(probes_between c2 "$cut_at" "$heal_at")
    # From 500 ms after the cut: until the trunk is down, client 2 still reaches alpha through
    # it, and a probe's time is known to some tens of ms (beta cannot serve before its dead time,
    # a second, anyway).
    cross=$(both_halves c1 c2 $((cut_at + 500)) "$heal_at")
    info "$sc" "while split (12 s)" "client 1 (alpha's half): $p1; client 2 (beta's half): $p2; both halves answered within 200 ms: $cross"
    log "$(states alpha)"
    log "$(states beta)"
    if ((WITNESS_ON)); then
        check "$sc" "exactly one node serves while split" one_serves
        winner=$(serves alpha && echo alpha || echo beta)
        loser=$(other "$winner")
        info "$sc" "winner" "$winner (its log: $(grep -h -o 'witness granted generation [0-9A-F]*' "$work/$winner.log" | tail -1))"
        check "$sc" "no moment where both halves were answered ($cross)" is_zero "$cross"
        check "$sc" "$loser never Primary (sampled)" eval "! seen $loser role Primary"
        check "$sc" "$loser heard the witness name the holder" logged "$loser" "held by $winner"
    else
        check "$sc" "README's warning shown true: both halves answered while split ($cross probes)" positive "$cross"
        check "$sc" "both nodes Primary while split" eval 'state_is alpha role Primary && state_is beta role Primary'
    fi
    roles_stop
    log "heal: trunk and replication link back"
    split_heal
    if ((WITNESS_ON)); then
        wait_check "$sc" 60 "after the heal: reconnected and resynced without admin action" settled || true
        sleep 2
    else
        wait_check "$sc" 20 "the handshake reports split brain" eval 'logged alpha "Split-Brain detected" || logged beta "Split-Brain detected"' || true
        info "$sc" "split brain" "$(grep -h 'Split-Brain detected' "$work/alpha.log" "$work/beta.log" | head -1 | sed 's/.*Split-Brain/Split-Brain/' | cut -c1-200)"
    fi
    client_stop c1
    local a1=$acked two1=$two pr1=$probes d1=$vdouble s1=$stall_max
    client_stop c2
    local a2=$acked two2=$two pr2=$probes d2=$vdouble s2=$stall_max
    info "$sc" "probes" "client 1: $pr1 (two answers $two1), client 2: $pr2 (two answers $two2), across the halves $cross; acked: client 1 $a1, client 2 $a2"
    info "$sc" "longest stall" "client 1 ${s1} ms, client 2 ${s2} ms (the losing half's client waits for the heal)"
    echo "$sc: probes $((pr1 + pr2)), probes with two answers $((two1 + two2 + cross))"
    if ((WITNESS_ON)); then
        # With the clients stopped (they write until here):
        check "$sc" "after the heal: both disks identical in the data area" disks_identical
        check "$sc" "no probe answered twice (client 1 $two1, client 2 $two2, discoveries $d1/$d2)" eval "[[ $two1$two2$d1$d2 == 0000 ]]"
        check "$sc" "every version client 1 was told was written is on the device" verify c1
        check "$sc" "every version client 2 was told was written is on the device" verify c2
    fi
}
sc_split_witness() { WITNESS_ON=1 split_run split_witness; }
sc_split_none() { WITNESS_ON=0 split_run split_none; }

# --- witness_restart ----------------------------------------------------------------------------
sc_witness_restart() {
    local sc=witness_restart prim sec loss_at back_at prom gen verdict
    split_net_up
    witness_config
    witness_start
    pair_fresh
    prim=$(primary_node)
    sec=$(other "$prim")
    : >"$work/roles.log"
    roles_start
    client_start c1 "$P-c" 1M
    sleep 2
    log "the witness stops; power loss of $prim; the witness starts again 2 s later"
    witness_stop
    power_loss "$prim"
    loss_at=$loss_ms
    sleep 2
    witness_start
    back_at=$wstart_ms
    wait_check $sc 20 "$sec promotes once the witness is back" state_is "$sec" role Primary || true
    sleep 2
    roles_stop
    prom=$(first_primary_ms "$sec")
    check $sc "$sec was not Primary before the witness was back (first sampled Primary at +$((${prom:-0} - loss_at)) ms, witness back at +$((back_at - loss_at)) ms)" \
        eval "[[ -n '$prom' ]] && ((${prom:-0} >= back_at))"
    check $sc "$sec promoted with the grant (auto-promote: ... witness granted generation)" logged "$sec" "auto-promote: .*witness granted generation"
    info $sc "failover" "power loss to $sec Primary (sampled): $((${prom:-0} - loss_at)) ms; witness back to Primary: $((${prom:-0} - back_at)) ms; refusals meanwhile: $(grep -c 'witness unreachable: not serving alone' "$work/$sec.log" || true)"
    client_stop c1
    info $sc "the client's longest stall" "${stall_max} ms (acked $acked)"
    echo "$sc: probes $probes, probes with two answers $two"
    check $sc "no probe answered twice ($two of $probes; discoveries $vdouble)" eval "[[ $two$vdouble == 00 ]]"
    check $sc "the client never gave up (exit $vrc)" eval "((vrc == 0))"
    check $sc "every acknowledged version on the device" verify c1
    # The grant across another restart of the witness.
    gen=$(grep -h -o 'witness granted generation [0-9A-F]*' "$work/$sec.log" | tail -1 | awk '{ print $4 }')
    witness_stop
    witness_start
    verdict=$(witness_ask "$sec" "$gen")
    info $sc "after another restart, the witness on generation $gen" "$(tr '\n' ' ' <<<"$verdict")"
    check $sc "the book kept the grant: $sec still holds generation $gen" grep -q "held $sec" <<<"$verdict"
    verdict=$(witness_ask "$prim" "$gen" --claim)
    check $sc "a claim by $prim for that generation is refused (held $sec)" grep -q "held $sec" <<<"$verdict"
    power_back "$prim"
    heal_checks $sc "$prim back" || true
}

# --- witness_oneway -----------------------------------------------------------------------------
wblock() { # NODE: drop its packets to the witness
    ip netns exec "$(ns_of "$1")" nft -f - <<EOF
table inet tbw_wit {
    chain output {
        type filter hook output priority 0; policy accept;
        ip daddr $WADDR udp dport $WPORT drop
    }
}
EOF
}
wunblock() { ip netns exec "$(ns_of "$1")" nft delete table inet tbw_wit 2>/dev/null || true; }
status_warns() { ctl "$1" status r0 2>/dev/null | grep -q 'witness: .*unreachable (warning'; }
sc_witness_oneway() {
    local sc=witness_oneway loss_at prom tot=0 tw=0
    split_net_up
    witness_config
    witness_start
    pair_fresh
    wblock beta
    log "beta cannot reach the witness"
    wait_check $sc 15 "beta's status warns that the witness is unreachable" status_warns beta || true
    check $sc "alpha's status does not warn" eval "! status_warns alpha"
    info $sc "beta's witness line" "$(ctl beta status r0 | grep 'witness:' | sed 's/^ *//' | cut -c1-220)"
    client_start c1 "$P-c" 1M
    sleep 3
    check $sc "the pair keeps serving (alpha Primary and answering)" serves alpha
    : >"$work/roles.log"
    roles_start
    log "power loss of alpha (which reaches the witness)"
    power_loss alpha
    loss_at=$loss_ms
    sleep 8
    roles_stop
    check $sc "beta (no witness) stays Secondary" state_is beta role Secondary
    check $sc "beta was never Primary (sampled)" eval "! seen beta role Primary"
    check $sc "beta's log says why: witness unreachable: not serving alone" logged beta "witness unreachable: not serving alone"
    info $sc "beta's refusal" "$(grep -h 'witness unreachable: not serving alone' "$work/beta.log" | tail -1 | sed 's/.*witness unreachable/witness unreachable/' | cut -c1-200)"
    check $sc "no probe heard anybody after the power loss" eval "[[ \$(answered_ms c1 | awk -v f=$((loss_at + 300)) '\$1 > f' | wc -l) == 0 ]]"
    power_back alpha
    wait_for 30 "alpha and beta reconnected" state_is alpha connection Connected
    sleep 1
    [[ -n $(primary_node) ]] || ctl alpha primary r0 >/dev/null || check $sc "alpha promoted by hand after its return" false
    wait_for 60 "resynced" settled
    client_stop c1
    tot=$((tot + probes)) tw=$((tw + two))
    check $sc "part 1: no probe answered twice ($two of $probes)" eval "[[ $two$vdouble == 00 ]]"
    check $sc "part 1: every acknowledged version on the device" verify c1
    log "the roles swapped by hand: beta primary"
    ctl alpha secondary r0 >/dev/null
    ctl beta primary r0 >/dev/null || check $sc "beta promoted by hand" false
    wait_for 10 "beta serves" serves beta
    client_start c2 "$P-c" 2M
    sleep 3
    : >"$work/roles.log"
    roles_start
    log "power loss of beta (which cannot reach the witness)"
    power_loss beta
    loss_at=$loss_ms
    wait_check $sc 20 "alpha (reaches the witness) promotes" state_is alpha role Primary || true
    sleep 2
    roles_stop
    prom=$(first_primary_ms alpha)
    info $sc "failover to alpha" "power loss to Primary (sampled): $((${prom:-0} - loss_at)) ms"
    check $sc "alpha promoted with the grant" logged alpha "auto-promote: .*witness granted generation"
    client_stop c2
    tot=$((tot + probes)) tw=$((tw + two))
    info $sc "part 2: the client's longest stall" "${stall_max} ms"
    check $sc "part 2: no probe answered twice ($two of $probes)" eval "[[ $two$vdouble == 00 ]]"
    check $sc "part 2: every acknowledged version on the device" verify c2
    echo "$sc: probes $tot, probes with two answers $tw"
    wunblock beta
    power_back beta
    heal_checks $sc "beta back" || true
}

# --- two_pairs ----------------------------------------------------------------------------------
# pair_ctx 1|2: switch the lab's globals (prefix, networks, work directory, pids, blade, pair
# name, witness address) to pair 1 or pair 2; the daemons' pids are kept per pair.
declare -A ppid
cur=1
pair_ctx() {
    ppid[$cur.alpha]=${pid[alpha]:-}
    ppid[$cur.beta]=${pid[beta]:-}
    cur=$1
    if ((cur == 1)); then
        P=tbw NET=95 BLADE=e9.5 PAIR_NAME=tbw-lab WITNESS=$WADDR:$WPORT work=$base1
    else
        P=tbw2 NET=96 BLADE=e9.6 PAIR_NAME=tbw-lab2 WITNESS=$W2ADDR:$WPORT work=$base1/pair2
    fi
    CNET=10.77.$NET RNET=192.168.$NET FIP=$CNET.100 cfg=$work/pair.toml
    pid[alpha]=${ppid[$cur.alpha]:-}
    pid[beta]=${ppid[$cur.beta]:-}
}
sc_two_pairs() {
    local sc=two_pairs loss_at prom rc2 tot=0 tw=0
    base1=$work
    mkdir -p "$base1/pair2"
    split_net_up
    witness_config
    pair_ctx 2
    net_up
    ip link add tbwv7 type veth peer name eth2 netns "$WNS"
    ip link set tbwv7 master "${P}br0" up
    ip -n "$WNS" link set eth2 up
    ip -n "$WNS" addr add "$W2ADDR/24" dev eth2
    pair_ctx 1
    witness_start
    pair_fresh
    pair_ctx 2
    pair_fresh
    client_start p2 "$P-c" 1M
    pair_ctx 1
    client_start p1 "$P-c" 1M
    sleep 3
    log "pair 1: power loss of alpha"
    power_loss alpha
    loss_at=$loss_ms
    wait_check $sc 20 "pair 1: beta promotes" state_is beta role Primary || true
    sleep 2
    check $sc "pair 1: beta promoted with the grant" logged beta "auto-promote: .*witness granted generation"
    pair_ctx 2
    check $sc "pair 2: alpha still Primary and answering" serves alpha
    check $sc "pair 2: beta still Secondary" state_is beta role Secondary
    check $sc "pair 2: still connected and in sync" in_sync
    check $sc "pair 2: beta never tried to take over (no auto-promote in its log)" eval "! logged beta 'auto-promote'"
    log "pair 2: power loss of alpha"
    power_loss alpha
    wait_check $sc 20 "pair 2: beta promotes" state_is beta role Primary || true
    sleep 2
    check $sc "pair 2: beta promoted with the grant" logged beta "auto-promote: .*witness granted generation"
    client_stop p2
    tot=$((tot + probes)) tw=$((tw + two))
    info $sc "pair 2's client" "acked $acked, stall max ${stall_max} ms (its own power loss included)"
    check $sc "pair 2: no probe answered twice ($two of $probes)" eval "[[ $two$vdouble == 00 ]]"
    check $sc "pair 2: every acknowledged version on the device" verify p2
    pair_ctx 1
    client_stop p1
    tot=$((tot + probes)) tw=$((tw + two))
    info $sc "pair 1's client" "acked $acked, stall max ${stall_max} ms"
    check $sc "pair 1: no probe answered twice ($two of $probes)" eval "[[ $two$vdouble == 00 ]]"
    check $sc "pair 1: every acknowledged version on the device" verify p1
    echo "$sc: probes $tot, probes with two answers $tw"
    info $sc "the book" "$(tr '\n' ';' <"$wbook" | cut -c1-400)"
    check $sc "the book holds grants of both pairs" eval "grep -q tbw-lab2 '$wbook' && grep -q 'tbw-lab[^2]' '$wbook'"
    rc2=0
    pair_ctx 2
    for n in alpha beta; do kill -9 "${pid[$n]}" 2>/dev/null || true; done
    net_down
    pair_ctx 1
    ip link del tbwv7 2>/dev/null || true
    return "$rc2"
}

# --- no_quorum: on-no-quorum, seen by an NBD client ------------------------------------------------
NOQ_TIMEOUT=3
# qemu_io NAME COMMANDS...: qemu-io against alpha's NBD export at alpha's own address (a
# connection through the floating IP loses it with the gate: see README, on-no-quorum), from the
# client namespace, in the background ($qpid; output in $work/NAME.qio, exit time in NAME.end)
qemu_io() {
    local name=$1 a=()
    shift
    for c in "$@"; do a+=(-c "$c"); done
    (
        ip netns exec "$P-c" timeout 60 qemu-io -f raw "${a[@]}" "nbd://$CNET.1:10809/r0" >"$work/$name.qio" 2>&1
        echo $? >"$work/$name.rc"
        date +%s%3N >"$work/$name.end"
    ) &
    qpid=$!
    pids+=("$qpid")
}
noq_run() { # io-error|suspend-io
    local sc=no_quorum mode=$1 loss_at end rc held
    if [[ $mode == io-error ]]; then
        NBD_KEYS=$(printf 'nbd = "0.0.0.0:10809"\non-no-quorum = "io-error"\non-no-quorum-timeout = %s' "$NOQ_TIMEOUT")
    else
        NBD_KEYS='nbd = "0.0.0.0:10809"
on-no-quorum = "suspend-io"'
    fi
    rm -f "$work/alpha.img" "$work/beta.img" "$work/beta.md" "$work/off.alpha" "$work/off.beta"
    pair_fresh
    wait_for 10 "alpha serves" serves alpha
    ip netns exec "$P-c" timeout 10 qemu-io -f raw -c 'write -P 0x11 0 64k' "nbd://$CNET.1:10809/r0" >"$work/$mode.first" 2>&1 ||
        check $sc "$mode: a first NBD write through the floating IP" false
    client_start "noq.$mode" "$P-c" 1M
    # Connected and writing; the second write is issued 3 s later, after the cut.
    qemu_io "$mode" 'write -P 0x22 0 64k' 'sleep 3000' 'write -P 0x33 0 64k'
    sleep 1
    log "$mode: alpha loses the witness (nftables), then beta loses power: alpha has neither"
    wblock alpha
    power_loss beta
    loss_at=$loss_ms
    if [[ $mode == io-error ]]; then
        wait_check $sc 30 "io-error: qemu-io ends" test -e "$work/$mode.end" || true
        end=$(cat "$work/$mode.end" 2>/dev/null || echo 0)
        rc=$(cat "$work/$mode.rc" 2>/dev/null || echo -)
        info $sc "io-error: what qemu-io said (exit $rc)" "$(tr '\n' ';' <"$work/$mode.qio" | cut -c1-300)"
        check $sc "io-error: the write after the cut failed with EIO" grep -q 'write failed: Input/output error' "$work/$mode.qio"
        check $sc "io-error: only the first write of that connection succeeded" eval "[[ \$(grep -c '^wrote' '$work/$mode.qio') == 1 ]]"
        info $sc "io-error: EIO after the power loss" "$((end - loss_at)) ms (on-no-quorum-timeout ${NOQ_TIMEOUT} s, from when the gate shut: dead time ${HB_DEAD} s after the loss)"
        check $sc "io-error: not before the bound ($((end - loss_at)) ms >= ${NOQ_TIMEOUT} s)" eval "(($end - $loss_at >= $NOQ_TIMEOUT * 1000))"
        check $sc "io-error: alpha logged on-no-quorum" logged alpha "on-no-quorum"
        ip netns exec "$P-c" timeout 10 qemu-io -f raw -c 'read 0 4k' "nbd://$CNET.1:10809/r0" >"$work/$mode.late" 2>&1 || true
        check $sc "io-error: a new connection's read fails at once with EIO" grep -q 'read failed: Input/output error' "$work/$mode.late"
    else
        sleep $((NOQ_TIMEOUT + 5))
        check $sc "suspend-io: the write after the cut is still held past $((NOQ_TIMEOUT + 5)) s" eval "[[ ! -e '$work/$mode.end' ]]"
        held=$(($(date +%s%3N) - loss_at))
        log "suspend-io: the witness reachable again"
        wunblock alpha
        wait_check $sc 20 "suspend-io: qemu-io ends once alpha has the witness's grant" test -e "$work/$mode.end" || true
        end=$(cat "$work/$mode.end" 2>/dev/null || echo 0)
        info $sc "suspend-io: what qemu-io said" "$(tr '\n' ';' <"$work/$mode.qio" | cut -c1-300)"
        check $sc "suspend-io: both writes succeeded (held ${held} ms, done $((end - loss_at)) ms after the loss)" \
            eval "[[ \$(grep -c '^wrote' '$work/$mode.qio') == 2 ]]"
        check $sc "suspend-io: alpha serves alone with the grant" logged alpha "witness granted generation"
    fi
    check $sc "$mode: beta (powered off) never served, alpha never answered AoE after the lease" \
        eval "[[ \$(answered_ms noq.$mode | awk -v f=$((loss_at + 1500)) '\$1 > f' | wc -l) == 0 || $mode == suspend-io ]]"
    client_stop "noq.$mode"
    echo "$sc ($mode): probes $probes, probes with two answers $two"
    check $sc "$mode: no probe answered twice ($two of $probes)" eval "[[ $two$vdouble == 00 ]]"
    [[ $mode == io-error ]] || check $sc "$mode: every acknowledged AoE version on the device" verify "noq.$mode"
    wunblock alpha
    for n in alpha beta; do kill -9 "${pid[$n]}" 2>/dev/null || true; wait "${pid[$n]}" 2>/dev/null || true; done
    ip -n "$P-a" addr del "$FIP/24" dev eth0 2>/dev/null || true
    link beta client up
    link beta repl up
}
sc_no_quorum() {
    split_net_up
    witness_config
    witness_start
    noq_run io-error
    noq_run suspend-io
}

# --- running them -------------------------------------------------------------------------------
lab_up
top=$work
summary=$top/summary.tsv
: >"$summary"
scenario_cleanup() {
    local rc=$? p
    for p in "${pids[@]}"; do
        kill -CONT "$p" 2>/dev/null || true
        kill -9 "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    P=tbw2 net_down 2>/dev/null || true
    exit "$rc"
}
failed=()
began=$(date +%s)
for sc in "${scenarios[@]}"; do
    log "===== $sc"
    rc=0
    t0=$(date +%s)
    (
        work=$top/$sc
        mkdir -p "$work"
        cfg=$work/pair.toml
        model=$work/model.img
        wbase=$work wbook=$work/witness.book
        pids=()
        failures=0
        trap scenario_cleanup EXIT
        "sc_$sc"
        if ((failures)); then
            log "$failures expectation(s) of $sc failed; the daemons' logs end:"
            dump
            exit 1
        fi
    ) || rc=$?
    if ((rc != 0)); then
        failed+=("$sc")
        grep -q "^$sc	.*	FAIL	" "$summary" || record "$sc" "(scenario)" FAIL "ended with $rc: see the log above"
    fi
    record "$sc" "run time" INFO "$(($(date +%s) - t0)) s"
    log "===== $sc: $( ((rc == 0)) && echo PASS || echo FAIL)"
done
net_down

printf '\n===== split summary (%s s)\n' "$(($(date +%s) - began))"
awk -F '\t' '{ printf "  %-15s %-5s %s%s\n", $1, $3, $2, ($4 == "" ? "" : ": " $4) }' "$summary"
if ((${#failed[@]})); then
    printf '\n===== failed checks\n'
    awk -F '\t' '$3 == "FAIL" { printf "  %-15s %s%s\n", $1, $2, ($4 == "" ? "" : ": " $4) }' "$summary"
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all passed"
