#!/usr/bin/env bash
# Power cuts of a replicated pair at `durability = "power"`: two real `twinblade run` nodes whose
# backing files sit behind the volatile write cache (TWINBLADE_TEST_POWER_CUT=1), so that the
# `fault RES power-cut` verb (or kill -9) loses every write that was not flushed or FUA.
#
#   1. initial sync; writes through AoE
#   2. power cut of the primary, every unflushed sector lost, while a client writes: the survivor
#      takes over and serves every acknowledged write; the cut node restarts, attaches its
#      meta-data, resyncs, and both backing files equal the model
#   3. the same with a seeded subset of the unflushed sectors reaching the disk (the other node
#      is primary now)
#   3b. power cut of the secondary while the primary writes: writes go on, the secondary resyncs
#   4. power cut of both nodes at once (kill -9 of both, every unflushed sector lost), then
#      staggered (the power-cut verb on both, a subset kept on one): restart both, promote one
#      if the state machine does not, every acknowledged write is there and the disks end equal
#      to the model
#   5. at `durability = "node"`: a power cut of the primary alone still loses nothing (the
#      survivor has it; the cut node's activity log names what it lost); and the harness bites:
#      a power cut of both nodes does lose acknowledged writes, and this test detects it
#
# Usage: initiator-tests/power-cut.sh [--keep] [--seed N]
# Needs root; uses namespaces tbp-a, tbp-b, tbp-c, bridge tbpbr0 (nothing else touches them).
set -euo pipefail

P=tbp NET=78 TAG=power-cut BLADE=e8.3 DURABILITY=power POWER_CUT=1
# shellcheck source=initiator-tests/lab-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab-lib.sh"
model_args -- "$@"
RANDOM=$seed
log "seed $seed (rerun with --seed $seed)"
t0=$(date +%s)

# --- 1. initial sync ----------------------------------------------------------------------------
model_lab_up
write_acked 0 8M $((seed + 1))
wait_for 10 "in sync after writes" settled
disks_match_model || fail "disks differ from the model after the initial writes"
log "PASS initial sync and replicated writes ($usable bytes)"

# cut_primary PRIMARY SURVIVOR [KEEP-SEED]: power-cut the primary while a client writes.
cut_primary() {
    local prim=$1 surv=$2 keep_seed=${3:-} wseed woff
    wseed=$((seed + 10 + RANDOM % 1000))
    woff=$(((RANDOM % 32) << 20))
    # In flight at the cut: the initiator resends whatever the dead node did not answer, to the
    # survivor, so once it finishes every frame of it is acknowledged.
    start_writer "$woff" 24M "$wseed"
    sleep "0.$((RANDOM % 5))"
    power_cut "$prim" "$keep_seed"
    wait "$wpid" || fail "the client's write did not complete on the survivor: $(cat "$work/writer.log")"
    "$init" model "$model" --seed "$wseed" --offset "$woff" --bytes 24M >/dev/null
    wait_for 20 "$surv takes over" state_is "$surv" role Primary
    [[ $(answering) == 1 ]] || fail "not exactly one node answers $BLADE after the cut"
    device_matches_model || fail "an acknowledged write is missing on the survivor $surv"
    write_acked $((40 << 20)) 4M $((wseed + 1))
    start "$prim"
    grep -q "meta-data was not cleanly closed" "$work/$prim.log" ||
        fail "$prim did not notice its unclean meta-data"
    log "$prim: $(grep "not cleanly closed" "$work/$prim.log" | tail -1 | sed 's/.*meta-data/meta-data/')"
    wait_for 60 "resync after $prim's return" settled
    state_is "$surv" role Primary || fail "$surv lost its role"
    device_matches_model || fail "an acknowledged write is missing after the resync"
    disks_match_model || fail "the backing files differ from the model after the resync"
}

# --- 2. power cut of the primary, nothing unflushed survives ---------------------------------------
cut_primary alpha beta
log "PASS power cut of the primary (all unflushed lost): takeover, every write there, resynced"

# --- 3. the same with a seeded subset surviving -----------------------------------------------------
cut_primary beta alpha "$seed"
log "PASS power cut of the primary (keep-subset $seed): takeover, every write there, resynced"

# --- 3b. power cut of the secondary while the primary writes ---------------------------------------
wseed=$((seed + 100 + RANDOM % 1000))
start_writer $((20 << 20)) 16M "$wseed"
sleep "0.$((RANDOM % 5))"
power_cut beta $((seed + 7))
wait "$wpid" || fail "the client's write failed while the secondary lost power: $(cat "$work/writer.log")"
"$init" model "$model" --seed "$wseed" --offset $((20 << 20)) --bytes 16M >/dev/null
state_is alpha role Primary || fail "alpha is no longer primary"
log "out-of-sync on alpha after beta's power cut: $(field alpha out-of-sync) bytes"
start beta
wait_for 60 "resync after the secondary's return" settled
device_matches_model || fail "an acknowledged write is missing after the secondary's power cut"
disks_match_model || fail "the backing files differ from the model after the secondary's power cut"
log "PASS power cut of the secondary while writing: writes went on, resynced, equal to the model"

# --- 4. both nodes at once ----------------------------------------------------------------------------
# restart_both_and_promote: after both lost power; prints what the state machine says.
restart_both_and_promote() {
    start alpha
    start beta
    wait_for 15 "connection after both restarted" state_is alpha connection Connected
    sleep 1
    log "after restart: $(states alpha)"
    log "after restart: $(states beta)"
    if ! state_is alpha role Primary && ! state_is beta role Primary; then
        local out
        out=$(ctl alpha primary r0 2>&1) || log "primary on alpha refused: $out"
        log "nobody promoted itself: primary on alpha: $out"
    fi
    wait_for 60 "in sync after both restarted" settled
    log "in sync: $(states alpha)"
}
# cut_both: both nodes lose power at the same instant: one kill -9 of both processes, which
# with the volatile cache loses every unflushed sector on both.
cut_both() {
    kill -9 "${pid[alpha]}" "${pid[beta]}"
    wait "${pid[alpha]}" || true
    wait "${pid[beta]}" || true
}
write_acked $((8 << 20)) 16M $((seed + 3))
write_acked $((2 << 20)) 1M $((seed + 4)) --random
cut_both
restart_both_and_promote
device_matches_model || fail "an acknowledged write is missing after a power cut of both nodes"
disks_match_model || fail "the backing files differ from the model after a power cut of both"
log "PASS power cut of both nodes at once at durability=power: every acknowledged write there"

# Staggered: the power-cut verbs on both at once (a seeded subset kept on one); the nodes die
# a few milliseconds apart, and the later one may notice the first one's death.
write_acked $((24 << 20)) 8M $((seed + 8))
ctl alpha fault r0 power-cut keep-subset $((seed + 5)) >/dev/null &
ctl beta fault r0 power-cut >/dev/null &
wait "${pid[alpha]}" || true
wait "${pid[beta]}" || true
restart_both_and_promote
device_matches_model || fail "an acknowledged write is missing after a staggered power cut of both"
disks_match_model || fail "the backing files differ from the model after a staggered power cut of both"
log "PASS staggered power cut of both nodes at durability=power: every acknowledged write there"

# --- 5. the harness bites: durability = node ---------------------------------------------------------
ctl alpha secondary r0 >/dev/null 2>&1 || true
kill -TERM "${pid[alpha]}" "${pid[beta]}"
wait "${pid[alpha]}" || true
wait "${pid[beta]}" || true
DURABILITY=node write_config
restart_both_and_promote
state_is alpha durability node || fail "the pair did not switch to durability=node"
# At durability=node a power cut of the primary alone loses nothing acknowledged: the survivor
# has it, and the cut node's activity log must name every block it may have lost.
prim=$(state_is alpha role Primary && echo alpha || echo beta)
surv=$([[ $prim == alpha ]] && echo beta || echo alpha)
cut_primary "$prim" "$surv" $((seed + 9))
log "PASS durability=node, power cut of the primary ($prim, keep-subset $((seed + 9))): the activity log covered every lost write"
# The same for the secondary (now $prim): what it acknowledged from its cache and then lost must
# be resynced from the primary, which its own activity log makes happen.
wseed=$((seed + 300 + RANDOM % 1000))
start_writer $((40 << 20)) 16M "$wseed"
sleep "0.$((RANDOM % 5))"
power_cut "$prim" $((seed + 11))
wait "$wpid" || fail "the client's write failed while the secondary lost power: $(cat "$work/writer.log")"
"$init" model "$model" --seed "$wseed" --offset $((40 << 20)) --bytes 16M >/dev/null
start "$prim"
wait_for 60 "resync after the secondary's return" settled
device_matches_model || fail "an acknowledged write is missing after the secondary's power cut (node)"
disks_match_model || fail "the secondary lost acknowledged writes to a power cut and they were not resynced (node)"
log "PASS durability=node, power cut of the secondary ($prim) while writing: its activity log made the resync cover what it lost"
write_acked $((16 << 20)) 16M $((seed + 6))
cut_both
restart_both_and_promote
if device_matches_model 2>/dev/null; then
    fail "at durability=node a power cut of both nodes lost nothing: the harness does not bite"
fi
lost=$({ cmp -l "$model" "$work/device.img" || true; } | awk '{ s = int(($1 - 1) / 512); if (!(s in seen)) { seen[s]; n++ } } END { print n + 0 }')
((lost > 0)) || fail "no lost sector counted"
log "PASS the harness bites: at durability=node a power cut of both nodes lost $lost acknowledged sectors, detected"
log "all passed in $(($(date +%s) - t0))s (seed $seed)"
