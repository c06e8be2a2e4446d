#!/usr/bin/env bash
# A model test of a replicated pair: two real `twinblade run` nodes, a seeded random sequence of
#
#   write     a write through AoE (random offset, size, pattern seed, sometimes random frame
#             order); once acknowledged it is applied to a model image on the host
#             (`aoe-init model`, the initiator's own pattern generator)
#   cut       the replication link is cut: nft drops TCP port 7788 in the secondary's namespace
#   restore   the link comes back (the pair reconnects and resyncs while the test goes on)
#   delay     the secondary's disk gets slow: the `fault` verb's write delay (no netem on this
#             kernel), so the primary waits for every replicated write; cleared a few steps later
#   disk      one node's disk fails (`fault` write-error read-error): it detaches, I/O goes on
#             through the peer; the node is restarted (a failed primary hands over first)
#   power     the primary loses power mid-write (`fault RES power-cut keep-subset SEED`: a seeded
#             subset of its unflushed sectors survives); the test promotes the other node, the
#             client's write completes there; the cut node restarts and resyncs
#   check     a checkpoint: link restored, delay cleared, wait for the pair to be in sync; the
#             device read through AoE equals the model, and both backing files equal the model
#             in their data area (alpha internal meta-data: the first `size` bytes; beta
#             external: the whole file)
#
# and a final checkpoint. auto-promote is off so that a cut link does not split the brain: the
# test moves the primary role itself. Durability is "node"; the backing files sit behind the
# volatile write cache, so a stop must flush and a power cut loses what was not flushed.
#
# Usage: initiator-tests/chaos.sh [--seed N] [--steps N] [--keep]
# The seed is printed; the same seed gives the same sequence of steps (timings differ).
# Needs root; uses namespaces tbx-a, tbx-b, tbx-c, bridge tbxbr0 (nothing else touches them).
set -euo pipefail

steps=60
P=tbx NET=79 TAG=chaos BLADE=e9.3 DURABILITY=node MTU=9000 EXTRA_RESOURCE="auto-promote = false" POWER_CUT=1
# shellcheck source=initiator-tests/lab-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab-lib.sh"
model_args --steps -- "$@"
[[ $steps =~ ^[0-9]+$ ]] && ((steps > 0 && steps <= 1000)) || {
    echo "chaos.sh: --steps wants an integer from 1 to 1000, got '$steps'" >&2
    exit 2
}
RANDOM=$seed
log "seed $seed, $steps steps (rerun with --seed $seed --steps $steps)"
t0=$(date +%s)

model_lab_up

primary=alpha
other() { [[ $1 == alpha ]] && echo beta || echo alpha; }
link=up
delay_left=0
declare -A count=()

one_serves() { [[ $(answering) == 1 ]]; }
link_cut() {
    ip netns exec "$(ns_of "$(other "$primary")")" nft -f - <<EOF
table inet chaos {
    chain in { type filter hook input priority 0; policy accept; tcp dport 7788 drop; tcp sport 7788 drop; }
    chain out { type filter hook output priority 0; policy accept; tcp dport 7788 drop; tcp sport 7788 drop; }
}
EOF
    link=cut
    link_ns=$(ns_of "$(other "$primary")")
}
link_restore() {
    [[ $link == cut ]] || return 0
    ip netns exec "$link_ns" nft delete table inet chaos
    link=up
}
delayed=""
delay_clear() {
    if [[ -n $delayed ]]; then
        ctl "$delayed" fault r0 clear >/dev/null || fail "clearing the delay failed"
        delayed=""
        delay_left=0
    fi
}
checkpoint() {
    link_restore
    delay_clear
    wait_for 60 "in sync at a checkpoint" settled
    device_matches_model || fail "the device read through AoE differs from the model"
    disks_match_model || fail "a backing file differs from the model"
}
# random_write [MAX-SECTORS]
random_write() {
    local max=${1:-2048} sectors off wseed extra=()
    sectors=$((1 + (RANDOM * 32768 + RANDOM) % max))
    off=$((((RANDOM * 32768 + RANDOM) % (usable / 512 - sectors + 1)) * 512))
    wseed=$((RANDOM * 32768 + RANDOM))
    ((RANDOM % 3 == 0)) && extra=(--random)
    write_acked "$off" $((sectors * 512)) "$wseed" "${extra[@]}"
    count[bytes]=$((${count[bytes]:-0} + sectors * 512))
}

for ((i = 1; i <= steps; i++)); do
    r=$((RANDOM % 13))
    if ((r < 6)); then
        op=write
    elif ((r <= 7)); then
        op=$([[ $link == up ]] && echo cut || echo restore)
    elif ((r == 8)); then
        op=delay
    elif ((r == 9)); then
        op=disk
    elif ((r == 10)); then
        op=power
    else
        op=check
    fi
    count[$op]=$((${count[$op]:-0} + 1))
    log "step $i: $op (primary $primary, link $link)"
    case $op in
    write) random_write ;;
    cut)
        link_cut
        random_write 256
        ;;
    restore) link_restore ;;
    delay)
        delay_clear
        ms=$((1 + RANDOM % 10))
        delayed=$(other "$primary")
        log "  $delayed's disk: ${ms} ms per write"
        ctl "$delayed" fault r0 write-delay-ms=$ms >/dev/null || fail "delay refused"
        delay_left=$((2 + RANDOM % 3))
        random_write 256
        ;;
    disk)
        # A failed disk while the link is cut would leave no replica: restore it first, and
        # start from a synced pair so the other node can take over.
        checkpoint
        victim=$([[ $((RANDOM % 2)) == 0 ]] && echo alpha || echo beta)
        log "  $victim's disk fails"
        ctl "$victim" fault r0 write-error read-error >/dev/null || fail "disk fault refused"
        random_write 512
        if [[ $victim == "$primary" ]]; then
            # Reads went through the peer; the write was served by it too.
            random_write 64
        fi
        wait_for 10 "$victim detached" state_is "$victim" detached true
        ctl "$victim" fault r0 clear >/dev/null
        if [[ $victim == "$primary" ]]; then
            ctl "$victim" secondary r0 >/dev/null || fail "a detached primary cannot demote"
            primary=$(other "$victim")
            out=$(ctl "$primary" primary r0 2>&1) || fail "$primary cannot take over: $out"
        fi
        kill -TERM "${pid[$victim]}"
        wait "${pid[$victim]}" || fail "$victim did not stop cleanly"
        start "$victim"
        wait_for 20 "$primary serving" one_serves
        random_write 256
        ;;
    power)
        # The primary loses power in the middle of a write (a seeded subset of its unflushed
        # sectors survives); the test promotes the other node, the client's write completes
        # there, and the cut node comes back and resyncs while the test goes on. From a synced
        # pair: at durability=node the survivor must hold every acknowledged write.
        checkpoint
        victim=$primary
        sectors=$((1 + (RANDOM * 32768 + RANDOM) % 16384))
        off=$((((RANDOM * 32768 + RANDOM) % (usable / 512 - sectors + 1)) * 512))
        wseed=$((RANDOM * 32768 + RANDOM))
        start_writer "$off" $((sectors * 512)) "$wseed"
        power_cut "$victim" $((RANDOM * 32768 + RANDOM))
        primary=$(other "$victim")
        wait_for 20 "$primary promoted" ctl "$primary" primary r0
        wait "$wpid" || fail "the client's write did not complete after the failover: $(cat "$work/writer.log")"
        "$init" model "$model" --seed "$wseed" --offset "$off" --bytes $((sectors * 512)) >/dev/null
        count[bytes]=$((${count[bytes]:-0} + sectors * 512))
        start "$victim"
        random_write 256
        ;;
    check)
        checkpoint
        log "  checkpoint: device and both disks equal the model"
        ;;
    esac
    if [[ -n $delayed ]]; then
        delay_left=$((delay_left - 1))
        ((delay_left > 0)) || delay_clear
    fi
done
checkpoint
summary=""
for k in write cut restore delay disk power check; do summary+="$k=${count[$k]:-0} "; done
log "PASS $steps steps (${summary}written=${count[bytes]:-0} bytes): device and both disks equal the model"
log "all passed in $(($(date +%s) - t0))s (seed $seed)"
