#!/usr/bin/env bash
# Two real `twinblade run` nodes in network namespaces, a client namespace with the project's
# AoE initiator, and the failures a pair must survive:
#
#   1. initial sync after `primary --force` (create-md on both, internal and external meta-data)
#   2. exactly one node answers e0.3; writes through AoE reach both disks (byte-identical)
#   3. kill -9 the primary: the survivor promotes itself, the client keeps writing; the old
#      primary restarts, resyncs, and both disks end byte-identical with every acknowledged write
#   3b. a primary that is still a resync target reads stale blocks from its peer
#   4. kill -9 the secondary while the primary writes: writes go on (dirty bits), resync on return
#   5. a split brain made on purpose is detected and not synced; `connect --discard-my-data` on
#      the loser resolves it and the loser ends identical
#   6. a wrong shared secret is refused
#   7. the secondary's flush fails, then its writes fail (FUA writes at durability power), at
#      durability node and power: it detaches and says so; the primary's FLUSH and writes still
#      succeed, but everything the secondary may hold only in its cache is marked out of sync,
#      and the resync after its return makes both disks identical
#
# Usage: initiator-tests/replication.sh [--keep]
# Needs root; uses namespaces tbr-a, tbr-b, tbr-c and bridge tbrbr0 (nothing else touches them).
set -euo pipefail

P=tbr NET=77 TAG=replication BLADE=e7.3
# shellcheck source=initiator-tests/lab-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab-lib.sh"
lab_up

node_config() { echo "$cfg.$1"; } # each node has its own copy (test 6 changes alpha's secret)
write_config "$cfg.alpha"
write_config "$cfg.beta"
# External meta-data: the whole disk is usable. 1 MiB more than alpha's, so the pair must
# agree on the smaller size.
create_md $((64 << 20)) $((1 << 20))

data_size() { ctl alpha status r0 --json | tr ',{}' '\n\n\n' | sed -n 's/^"size":\([0-9]*\)$/\1/p'; }
same_data() {
    local n
    n=$(data_size)
    cmp -n "$n" "$work/alpha.img" "$work/beta.img"
}
nobody_answers() { [[ $(answering) == 0 ]]; }

# --- 1. initial sync -------------------------------------------------------------------------
pair_up
wait_for 30 "initial sync" in_sync
state_is alpha role Primary || fail "alpha is not primary"
same_data || fail "disks differ after the initial sync"
[[ $(ctl beta status r0 --json | tr ',{}' '\n\n\n' | sed -n 's/^"size":\([0-9]*\)$/\1/p') == "$usable" ]] ||
    fail "beta did not shrink to the smaller usable size $usable"
# The agreed size is in beta's meta-data, so beta keeps it when it later runs alone.
[[ $("$tb" dump-md --config "$cfg.beta" --node beta r0) == *"agreed-size: $usable bytes"* ]] ||
    fail "beta did not record the agreed size in its meta-data"
log "PASS initial sync ($(data_size) bytes)"

# --- 2. one answer, writes reach both --------------------------------------------------------
n=$(answering)
[[ $n == 1 ]] || fail "$n nodes answer e7.3 (want exactly 1)"
aoe write e7.3 -q 16 --seed 11 --bytes 16M >/dev/null || fail "write through AoE failed"
aoe read e7.3 -q 16 --seed 11 --bytes 16M --verify >/dev/null || fail "read-back mismatch"
wait_for 5 "no pending writes" in_sync
same_data || fail "disks differ after replicated writes"
log "PASS exactly one node answers; replicated writes identical"

# --- 3. kill -9 the primary -------------------------------------------------------------------
kill -9 "${pid[alpha]}"
wait_for 20 "beta takes over" state_is beta role Primary
n=$(answering)
[[ $n == 1 ]] || fail "$n nodes answer e7.3 after the failover"
aoe write e7.3 -q 16 --seed 12 --offset 8M --bytes 8M >/dev/null || fail "write to the survivor failed"
start alpha
wait_for 60 "resync after the primary's return" in_sync
state_is beta role Primary || fail "beta lost its role"
aoe read e7.3 -q 16 --seed 12 --offset 8M --bytes 8M --verify >/dev/null || fail "acknowledged write lost"
same_data || fail "disks differ after the returning primary resynced"
log "PASS kill -9 primary: failover, resync, identical"

# --- 3b. a primary that is still a resync target ---------------------------------------------
# alpha's disk gets garbage behind the daemon's back, then `invalidate` makes it a full-sync
# target; with the sync paused, alpha becomes primary. Its stale blocks must be read from beta,
# and writes made meanwhile must survive the resync that follows.
dd if=/dev/urandom of="$work/alpha.img" bs=1M count=16 conv=notrunc,fsync status=none
# beta's slow reads keep the full sync running long enough to pause it.
ctl beta fault r0 read-delay-ms=300 >/dev/null
ctl alpha invalidate r0 >/dev/null || fail "invalidate refused"
ctl alpha pause-sync r0 >/dev/null || fail "pause-sync refused"
ctl beta fault r0 clear >/dev/null
ctl beta secondary r0 >/dev/null || fail "beta refused to become secondary"
wait_for 5 "alpha sees beta secondary" peer_role_is alpha Secondary
ctl alpha primary r0 >/dev/null || fail "alpha (a resync target with an UpToDate peer) refused primary"
wait_for 10 "alpha serves" state_is alpha role Primary
aoe read e7.3 -q 16 --seed 11 --bytes 8M --verify >/dev/null || fail "a resync target served stale blocks"
aoe read e7.3 -q 16 --seed 12 --offset 8M --bytes 8M --verify >/dev/null || fail "a resync target served stale blocks"
aoe write e7.3 -q 16 --seed 18 --offset 2M --bytes 3M >/dev/null || fail "write to a primary resync target failed"
ctl alpha resume-sync r0 >/dev/null || fail "resume-sync refused"
wait_for 60 "the paused resync finished" in_sync
aoe read e7.3 -q 16 --seed 18 --offset 2M --bytes 3M --verify >/dev/null || fail "a write made during the resync was lost"
same_data || fail "disks differ after a primary resync target finished"
ctl alpha secondary r0 >/dev/null || fail "alpha refused to become secondary"
wait_for 5 "beta sees alpha secondary" peer_role_is beta Secondary
ctl beta primary r0 >/dev/null || fail "beta refused primary"
wait_for 10 "beta serves again" state_is beta role Primary
log "PASS a primary resync target reads stale blocks from its peer and keeps its own writes"

# --- 4. kill -9 the secondary while writing ---------------------------------------------------
aoe write e7.3 -q 16 --seed 13 --bytes 32M >/dev/null &
wpid=$!
sleep 0.3
kill -9 "${pid[alpha]}"
wait "$wpid" || fail "writes failed while the secondary died"
oos=$(field beta out-of-sync)
log "out-of-sync on beta after losing alpha: $oos bytes"
start alpha
wait_for 60 "resync after the secondary's return" in_sync
aoe read e7.3 -q 16 --seed 13 --bytes 32M --verify >/dev/null || fail "acknowledged write lost"
same_data || fail "disks differ after the secondary resynced"
log "PASS kill -9 secondary: writes went on, resync, identical"

# --- 4b. a secondary that stops completing writes while it still answers pings (ko-count) -----
# beta is primary, alpha secondary. With alpha's disk taking 20 s per write, beta must drop it
# after ko-count x timeout (3 x 1 s), not wait 20 s per write.
ctl alpha fault r0 write-delay-ms=20000 >/dev/null
t0=$(date +%s.%N)
aoe write e7.3 -q 4 --seed 16 --bytes 64K >/dev/null || fail "write failed while the secondary was stuck"
took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
log "64 KiB written in ${took}s with a stuck secondary (ko-count 3 x timeout 1 s)"
awk -v t="$took" 'BEGIN { exit !(t < 10) }' || fail "the primary waited ${took}s for a stuck secondary"
grep -q "ko-count\|not completing\|KoCount\|ko_count" "$work/beta.log" || log "(no ko-count wording in beta's log)"
ctl alpha fault r0 clear >/dev/null
wait_for 90 "resync after the stuck secondary recovered" in_sync
aoe read e7.3 -q 16 --seed 16 --bytes 64K --verify >/dev/null || fail "acknowledged write lost"
same_data || fail "disks differ after the stuck secondary recovered"
log "PASS a stuck secondary is dropped after ko-count; resync on recovery"

# --- 4c. on-io-error detach: the primary's disk fails, I/O goes on through the peer ----------
ctl beta fault r0 write-error read-error >/dev/null
aoe write e7.3 -q 16 --seed 17 --bytes 1M >/dev/null || fail "write failed after the primary's disk failed"
aoe read e7.3 -q 16 --seed 17 --bytes 1M --verify >/dev/null || fail "read through the peer failed"
wait_for 5 "beta detached" state_is beta detached true
log "PASS primary's disk failed: detached, reads and writes served through the peer"
ctl beta fault r0 clear >/dev/null
# A detached disk stays out until the node restarts (as DRBD's until attach): restart beta.
kill -TERM "${pid[beta]}"
wait "${pid[beta]}" || true
start beta
wait_for 60 "beta back and resynced" in_sync
same_data || fail "disks differ after the detached disk came back"
log "PASS detached disk resynced after restart"

# --- 5. split brain on purpose ----------------------------------------------------------------
# beta's event stream, like drbdsetup events2 (read back below).
ctl beta events r0 >"$work/beta.events" 2>&1 &
pids+=("$!")
ctl alpha disconnect r0 >/dev/null
ctl beta disconnect r0 >/dev/null
ctl alpha secondary r0 >/dev/null
ctl beta secondary r0 >/dev/null
wait_for 5 "both silent" nobody_answers
ctl alpha primary r0 >/dev/null || fail "alpha cannot be promoted while disconnected"
aoe write e7.3 -q 16 --seed 14 --bytes 4M >/dev/null || fail "write to alpha failed"
ctl alpha secondary r0 >/dev/null
# alpha outdated beta when the link went (resource-only fencing): beta needs --force.
ctl beta primary r0 --force >/dev/null || fail "beta cannot be forced primary while disconnected"
aoe write e7.3 -q 16 --seed 15 --offset 4M --bytes 4M >/dev/null || fail "write to beta failed"
# alpha wrote seed 14 while beta was primary too: both changed since they parted.
ctl alpha connect r0 >/dev/null
ctl beta connect r0 >/dev/null
wait_for 15 "split brain detected" state_is alpha connection StandAlone
sleep 1
state_is beta connection StandAlone || fail "beta did not notice the split brain"
if same_data; then fail "split brain made no difference?"; fi
grep -qi "split-brain" "$work/alpha.log" || fail "split brain not logged"
ctl alpha connect r0 --discard-my-data >/dev/null
ctl beta connect r0 >/dev/null
wait_for 60 "split brain resolved" in_sync
same_data || fail "loser differs after discard-my-data"
aoe read e7.3 -q 16 --seed 15 --offset 4M --bytes 4M --verify >/dev/null || fail "the winner's writes are gone"
log "PASS split brain detected, not synced, resolved by discard-my-data"
grep -q '^exists resource name:r0' "$work/beta.events" || fail "events: no initial state"
grep -q '^change resource name:r0 role:Primary' "$work/beta.events" || fail "events: no promotion seen"
grep -q 'split-brain' "$work/beta.events" || fail "events: split brain not reported"
log "PASS events stream: $(wc -l <"$work/beta.events") lines, promotion and split brain seen"

# --- 6. wrong secret --------------------------------------------------------------------------
ctl alpha disconnect r0 >/dev/null
kill -TERM "${pid[alpha]}"
wait "${pid[alpha]}" || fail "alpha did not stop cleanly on SIGTERM"
grep -q "meta-data marked clean" "$work/alpha.log" || fail "no clean meta-data at stop"
write_config "$cfg.alpha" wrong-secret
start alpha
sleep 3
state_is alpha connection Connected && fail "a wrong secret was accepted"
grep -q "authentication failed" "$work/alpha.log" "$work/beta.log" || fail "wrong secret not logged"
log "PASS wrong shared secret refused"

# --- 7. the secondary's flush fails ------------------------------------------------------------
# Both nodes restart with DURABILITY ($1; the configuration is the same on both), beta primary,
# alpha secondary; alpha's disk then fails every flush.
# alpha_returns DURABILITY SEED OFFSET BYTES WHAT: alpha's faults cleared, it restarts and
# resyncs; the write of SEED at OFFSET reads back and both disks are identical.
alpha_returns() {
    ctl alpha fault r0 clear >/dev/null
    stop alpha
    start alpha
    wait_for 60 "alpha back and resynced after its $5 at durability $1" in_sync
    aoe read e7.3 -q 16 --seed "$2" --offset "$3" --bytes "$4" --verify >/dev/null || fail "$1: acknowledged write lost"
    same_data || fail "$1: disks differ after the secondary with $5 came back"
}
secondary_flush_fails() { # DURABILITY SEED
    DURABILITY=$1
    write_config "$cfg.alpha"
    write_config "$cfg.beta"
    local n
    for n in alpha beta; do
        if running "$n"; then stop "$n"; fi
    done
    start alpha
    start beta
    wait_for 15 "connection at durability $1" state_is alpha connection Connected
    state_is beta role Primary || ctl beta primary r0 >/dev/null || fail "beta refused primary"
    wait_for 60 "in sync at durability $1" in_sync
    ctl alpha fault r0 flush-error >/dev/null
    aoe write e7.3 -q 16 --seed "$2" --offset 16M --bytes 2M >/dev/null || fail "$1: write failed"
    state_is beta out-of-sync 0 || fail "$1: out of sync before the flush"
    aoe flush e7.3 >/dev/null || fail "$1: FLUSH failed although the primary's disk is fine"
    wait_for 5 "alpha detached after its flush failed" state_is alpha detached true
    local oos
    oos=$(field beta out-of-sync)
    ((oos >= 2 << 20)) || fail "$1: after alpha's failed flush beta marked $oos bytes out of sync (want the 2 MiB alpha may have lost)"
    grep -q "flush failed; detaching" "$work/alpha.log" || fail "$1: alpha did not log its failed flush"
    alpha_returns "$1" "$2" 16M 2M "failing flush"
    log "PASS durability $1: the secondary's failed flush marked $oos bytes out of sync; resynced, identical"
    # Now its writes fail (each one FUA at durability power).
    ctl alpha fault r0 write-error >/dev/null
    aoe write e7.3 -q 16 --seed "$(($2 + 100))" --offset 20M --bytes 1M >/dev/null || fail "$1: write failed although the primary's disk is fine"
    wait_for 5 "alpha detached after its write failed" state_is alpha detached true
    oos=$(field beta out-of-sync)
    ((oos >= 1 << 20)) || fail "$1: after alpha's failed writes beta marked only $oos bytes out of sync"
    alpha_returns "$1" "$(($2 + 100))" 20M 1M "failing writes"
    log "PASS durability $1: the secondary's failed writes marked $oos bytes out of sync; resynced, identical"
}
write_config "$cfg.alpha" # the right secret again
secondary_flush_fails node 21
secondary_flush_fails power 22
log "all passed"
