#!/usr/bin/env bash
# Failover under the real Linux aoe driver: the VM of linux-aoe.sh (same kernel and initramfs) on
# the lab's client network, against the replicated pair (appliance/lab.sh up --target pair), with
# the primary lost in the middle of the guest's I/O. One VM boot runs every guest phase; the host
# drives them over the serial console (the guest reads its next command from it) and does the
# faults with appliance/lab.sh.
#
# Usage: initiator-tests/linux-failover.sh [--runs N] [--mtu 1500|9000] [--profile default|fast]
#                                          [--keep-lab | --use-lab] [--timeout SECONDS]
#
# Tests, each with one summary line of figures (pass criteria are correctness only, no timing):
#   dd survival     the guest holds /dev/etherd/e0.3 open (exec 3<) and writes 100 numbered,
#                   random 1 MiB blocks with `dd conv=fsync`; after block 40 the host cuts the
#                   primary's power (lab.sh fail: links down, then SIGKILL); nothing is done in the
#                   guest; every block must complete, read back correct in the guest, and be on the
#                   survivor's disk (host check), and later on the healed node's disk too. Prints the
#                   longest gap between completed writes and the driver's rto (debugfs) before the
#                   loss. --runs N repeats it (the primary alternates) and prints median and worst.
#   switchover      the guest writes while the host runs lab.sh switchover (`twinblade switchover r0` on the primary), and back (asked on the secondary): no I/O
#                   error, data read back correct, the pauses printed.
#   filesystem      mkfs.ext4, mount, files written and synced, power loss of the primary while the
#                   guest keeps writing; the synced files are intact, the later ones too after a
#                   remount, `e2fsck -f -n` clean.
#   kill -9         the primary's daemon gets SIGKILL with its node's links up: each node's eth0
#                   keeps its own MAC, the killed node holds no floating IP once its daemon is back,
#                   and the client namespace captured the new primary's gratuitous ARPs.
#   nbd             nbdcopy of a random file to nbd://<floating IP>/r0 from the client namespace,
#                   retried until it succeeds, with the primary's power cut during the copy; the
#                   export's md5 matches.
#   floating IP     through all of it both nodes' `ip -4 addr` are sampled every 100 ms: the
#                   samples where two nodes hold the floating IP on a live link must be 0.
# The kill -9, nbd and floating-IP tests need a daemon with floating-ip support; without it they
# are reported as SKIP (the lab then serves r0 from each node's own MAC, no floating IP).
#
#   --runs N      dd survival runs (default 1)
#   --mtu         lab MTU (default 9000)
#   --profile     the pair's heartbeat profile (lab.sh up --profile; default default)
#   --keep-lab    leave the lab up afterwards; --use-lab: use the lab that is up (must be the pair)
#   --timeout     seconds the VM may run (default 540)
#
# Exit status 0 only if every test passed (SKIPs allowed). The console log and the floating-IP
# samples are kept under the lab dir.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lab=$repo/appliance/lab.sh
runs=1 mtu=9000 profile=default lab_mode=own timeout_s=540
NBLK=100 LOSS_AT=40 DD_OFF=8 NBD_MIB=128

log() { printf 'linux-failover: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while (($#)); do
    case $1 in
    --runs) runs=${2:?--runs needs a value}; shift ;;
    --mtu) mtu=${2:?--mtu needs a value}; shift ;;
    --profile) profile=${2:?--profile needs a value}; shift ;;
    --keep-lab) lab_mode=keep ;;
    --use-lab) lab_mode=use ;;
    --timeout) timeout_s=${2:?--timeout needs a value}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1" ;;
    esac
    shift
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive integer"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (see .ci/run)"

t0=$(date +%s.%N)
vmdir=$("$repo/initiator-tests/vm/build.sh")

tap=tbvf$$
qemu_pid='' sampler_pid='' watch_pid='' capture_pid='' run=''
cleanup() {
    local rc=$? p
    for p in "$watch_pid" "$sampler_pid" "$capture_pid"; do
        if [[ -n $p ]]; then kill "$p" 2>/dev/null || true; fi
    done
    if [[ -n $qemu_pid ]]; then kill "$qemu_pid" 2>/dev/null || true; fi
    "$lab" del-tap "$tap" 2>/dev/null || true
    # A node left frozen or dark by a failed test: bring the lab back to a usable state.
    if [[ $lab_mode != own && -n $run ]]; then
        "$lab" heal alpha --no-wait >/dev/null 2>&1 || true
        "$lab" heal beta --no-wait >/dev/null 2>&1 || true
    fi
    if [[ $lab_mode == own ]]; then "$lab" down >&2 || true; fi
    [[ -n $run ]] && rm -rf "$run"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $lab_mode == use ]]; then
    "$lab" status >/dev/null || die "--use-lab: the lab is not (fully) up; see appliance/lab.sh status"
else
    "$lab" up --mtu "$mtu" --target pair --profile "$profile" >&2
fi
LAB_FLOATING_IP='' LAB_NBD=''
eval "$("$lab" env)"
[[ $LAB_TARGET == pair ]] || die "the lab runs $LAB_TARGET, not the pair"
mtu=$LAB_MTU
tb=${TWINBLADE_BIN:-$repo/target/release/twinblade}
beta_img=${LAB_IMAGE%.img}-beta.img
"$lab" add-tap "$tap" >&2
run=$(mktemp -d "$LAB_DIR/linux-failover.XXXXXX")
console=$LAB_DIR/vm-linux-failover.log
fiplog=$LAB_DIR/linux-failover-fip.log
: >"$console"
: >"$fiplog"

# --- Host helpers ---------------------------------------------------------------------------------
declare -a summary=()
failures=0
result() { # TEST PASS|FAIL|SKIP DETAIL...: one summary line
    local t=$1 r=$2
    shift 2
    summary+=("$(printf '%-22s %-4s %s' "$t" "$r" "$*")")
    log "$t: $r $*"
    [[ $r != FAIL ]] || failures=$((failures + 1))
}
field() { # NODE KEY
    # shellcheck disable=SC2020 # three characters to three newlines
    timeout 2 "$tb" status --control "$LAB_DIR/$1.sock" r0 --json 2>/dev/null | tr ',{}' '\n\n\n' |
        sed -n "s/^\"$2\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -1
}
primary() { # the node that is Primary and serving
    local n
    for n in alpha beta; do
        [[ $(field "$n" role) == Primary && $(field "$n" serving) == true ]] && { echo "$n"; return 0; }
    done
    return 1
}
other() { [[ $1 == alpha ]] && echo beta || echo alpha; }
disk_of() { [[ $1 == alpha ]] && echo "$LAB_IMAGE" || echo "$beta_img"; }
clean_console() { tr -d '\r' <"$console"; }
# await PATTERN SECONDS: until a console line matches PATTERN (grep -E); fails on a guest FAIL or
# a VM that is gone.
await() {
    local pat=$1 secs=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        if clean_console | grep -qaE -- "$pat"; then return 0; fi
        if clean_console | grep -qa 'TWINBLADE-VM-TEST: FAIL'; then
            die "guest failed: $(clean_console | grep -a 'TWINBLADE-VM-TEST: FAIL' | tail -1)"
        fi
        kill -0 "$qemu_pid" 2>/dev/null || die "the VM is gone while waiting for /$pat/"
        sleep 0.1
    done
    die "timed out after ${secs}s waiting for the guest to print /$pat/"
}
gline() { clean_console | grep -aE -- "$1" | tail -1; } # PATTERN: the last matching console line
gval() { sed -n "s/.*[ ]$2=\([^ ]*\).*/\1/p" <<<"$1"; }  # LINE KEY: KEY=value from a line
send() { printf '%s\n' "$*" >&7; }                         # a command to the guest
region_md5() { # FILE OFFSET-MIB COUNT-MIB
    dd if="$1" bs=1M skip="$2" count="$3" status=none | md5sum | cut -d' ' -f1
}
wait_primary() { # SECONDS: until a node serves; prints it
    local i p
    for ((i = 0; i < $1 * 10; i++)); do
        if p=$(primary); then echo "$p"; return 0; fi
        sleep 0.1
    done
    return 1
}

# Floating IP sampler: both nodes' eth0 every 100 ms, read alpha, beta, alpha again: `time
# alpha-state alpha-has beta-state beta-has alpha-state alpha-has` (state from `ip -br`: UP, or
# LOWERLAYERDOWN when the node's link is cut). The reads are not one instant (tens of ms apart on
# a loaded machine, more than a switchover's handover), so a sample shows two holders only if
# alpha held it both before and after beta was seen holding it.
sample_fip() {
    local ns line st has out
    while :; do
        out=$(date +%s.%N)
        for ns in tb-alpha tb-beta tb-alpha; do
            line=$(ip -n "$ns" -br -4 addr show dev eth0 2>/dev/null || echo "eth0 GONE")
            st=$(awk '{print $2}' <<<"$line")
            has=0
            [[ " $line " == *" $LAB_FLOATING_IP/"* ]] && has=1
            out+=" $st $has"
        done
        echo "$out"
        sleep 0.1
    done
}
if [[ -n $LAB_FLOATING_IP ]]; then
    sample_fip >>"$fiplog" 2>/dev/null &
    sampler_pid=$!
fi

# --- The guest's /init ----------------------------------------------------------------------------
mkdir -p "$run/root"
cat >"$run/root/init" <<'EOF'
#!/bin/sh
# Guest side of initiator-tests/linux-failover.sh: waits for commands on the console.
. /lib/twinblade/common.sh
tb_basics
mtu=$(tb_cmdline tb.mtu)
name=$(tb_cmdline tb.aoe)
dev=/dev/etherd/$name
sysdev=/sys/block/etherd!$name
dbg=/sys/kernel/debug/aoe/$name
now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "TB: $*"; }
bad=0

tb_load_modules || tb_fail modules "insmod failed: $(dmesg | tail -n 3 | tr '\n' ' ')"
ip link set eth0 mtu "$mtu" || tb_fail net "cannot set mtu $mtu"
ip link set eth0 up || tb_fail net "eth0 does not come up"
i=0
until [ -b "$dev" ] && [ "$(cat "$sysdev/size" 2>/dev/null || echo 0)" -gt 0 ]; do
    [ $i -ge 40 ] && tb_fail discover "no $dev after 20 s; dmesg: $(dmesg | grep -i aoe | tail -n 3 | tr '\n' ' ')"
    echo >/dev/etherd/discover 2>/dev/null
    usleep 500000
    i=$((i + 1))
done
# Held open for the whole run, as a mounted filesystem would: the driver then never resets its
# RTT estimate (aoe.md: IDENTIFY after the last close).
exec 3<"$dev"
tb_result "discover ok $dev $(cat "$sysdev/size") sectors, payload $(cat "$sysdev/payload" 2>/dev/null) bytes, held open"
if [ -r "$dbg" ]; then
    tb_result "debugfs ok $dbg"
else
    tb_result "debugfs missing: no $dbg ($(ls /sys/kernel/debug/aoe 2>&1 | tr '\n' ' '))"
fi

debug_snapshot() { # TAG: the driver's state, and its rto computed as aoecmd.c does
    local tag=$1 avg dev_
    [ -r "$dbg" ] || { say "$tag debugfs none"; return; }
    sed "s/^/TB: $tag debugfs | /" "$dbg"
    avg=$(sed -n 's/.*rttavg: *\([0-9-]*\).*/\1/p' "$dbg" | head -n 1)
    dev_=$(sed -n 's/.*rttdev: *\([0-9-]*\).*/\1/p' "$dbg" | head -n 1)
    if [ -n "$avg" ] && [ -n "$dev_" ]; then
        say "$tag rto_us=$(((2 * avg >> 8) + (8 * dev_ >> 3))) rttavg=$avg rttdev=$dev_"
    fi
}

# w TAG N OFFSET-MIB SNAP: N random 1 MiB blocks, one `dd conv=fsync` each at OFFSET+i-1 MiB,
# each completion reported with its time; a debugfs snapshot before block SNAP's line; then the
# read-back (O_DIRECT) against what was written.
write_run() {
    local tag=$1 n=$2 off=$3 snap=$4 i=1 t errs=0 sum got
    dd if=/dev/urandom of=/tmp/data bs=1M count="$n" 2>/dev/null || { say "$tag done errors=1 verify=nodata"; return; }
    sum=$(md5sum </tmp/data | cut -d' ' -f1)
    t=$(now)
    echo "0 $t" >/tmp/times
    say "$tag start t=$t"
    while [ $i -le "$n" ]; do
        if ! dd if=/tmp/data of="$dev" bs=1M skip=$((i - 1)) seek=$((off + i - 1)) count=1 conv=fsync 2>/tmp/dd.err; then
            errs=$((errs + 1))
            say "$tag error block $i: $(tr '\n' ' ' </tmp/dd.err)"
        fi
        t=$(now)
        echo "$i $t" >>/tmp/times
        [ "$i" = "$snap" ] && debug_snapshot "$tag"
        say "$tag block $i t=$t"
        i=$((i + 1))
    done
    gap=$(awk 'NR > 1 { g = $2 - p; if (g > m) { m = g; at = $1 } } { p = $2 } END { printf "%.2f at=%d", m, at }' /tmp/times)
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if="$dev" bs=1M skip="$off" count="$n" iflag=direct 2>/tmp/dd.err | md5sum | cut -d' ' -f1)
    if [ "$got" = "$sum" ]; then verify=ok; else verify=bad; bad=1; fi
    [ "$errs" = 0 ] || bad=1
    # The driver's targets (one per MAC that answered): one, if the service MAC moved.
    macs=$(grep -oE '^[0-9a-f]{12}:' "$dbg" 2>/dev/null | tr -d ':' | tr '\n' ',')
    say "$tag done errors=$errs verify=$verify md5=$sum off=$off n=$n targets=${macs%,} gap=$gap"
}

# fs: ext4, 16 files synced, then 24 more written one by one (synced each) while the host cuts
# the primary; then caches dropped, everything checked, remounted, checked, e2fsck.
fs_run() {
    local i t e=0 want got n
    mke2fs.full -q -F -t ext4 "$dev" 96M >/tmp/mkfs.log 2>&1 || { say "fs done ok=0 why=mkfs"; bad=1; return; }
    mount -t ext4 "$dev" /mnt 2>/tmp/mount.err || { say "fs done ok=0 why=mount"; bad=1; return; }
    mkdir -p /mnt/synced /mnt/after
    i=1
    while [ $i -le 16 ]; do
        dd if=/dev/urandom of=/mnt/synced/f$i bs=1M count=1 2>/dev/null || e=$((e + 1))
        i=$((i + 1))
    done
    sync
    (cd /mnt && md5sum synced/*) >/tmp/synced.md5
    say "fs synced t=$(now)"
    i=1
    t=$(now)
    echo "0 $t" >/tmp/times
    while [ $i -le 24 ]; do
        if ! { dd if=/dev/urandom of=/mnt/after/f$i bs=1M count=1 2>/dev/null && sync; }; then
            e=$((e + 1))
            say "fs error writing after/f$i"
        fi
        echo "$i $(now)" >>/tmp/times
        say "fs file $i t=$(now)"
        i=$((i + 1))
    done
    (cd /mnt && md5sum after/*) >/tmp/after.md5
    gap=$(awk 'NR > 1 { g = $2 - p; if (g > m) { m = g; at = $1 } } { p = $2 } END { printf "%.2f at=%d", m, at }' /tmp/times)
    echo 3 >/proc/sys/vm/drop_caches
    (cd /mnt && md5sum -c /tmp/synced.md5) >/tmp/c1 2>&1 || e=$((e + 1))
    umount /mnt || e=$((e + 1))
    echo 3 >/proc/sys/vm/drop_caches
    mount -t ext4 -o ro "$dev" /mnt || e=$((e + 1))
    (cd /mnt && md5sum -c /tmp/synced.md5 && md5sum -c /tmp/after.md5) >/tmp/c2 2>&1 || e=$((e + 1))
    umount /mnt || e=$((e + 1))
    if e2fsck.full -f -n "$dev" >/tmp/fsck.log 2>&1; then fsck=clean; else fsck=rc$?; e=$((e + 1)); fi
    [ $e = 0 ] || { bad=1; sed 's/^/TB: fs detail | /' /tmp/c1 /tmp/c2 /tmp/fsck.log | grep -v ': OK$' | tail -n 20; }
    say "fs done ok=$([ $e = 0 ] && echo 1 || echo 0) errors=$e files=40 fsck=$fsck gap=$gap"
}

say "ready"
while read -r cmd a1 a2 a3 a4; do
    case $cmd in
    w) write_run "$a1" "$a2" "$a3" "$a4" ;;
    fs) fs_run ;;
    dbg) debug_snapshot "$a1" ;;
    quit) break ;;
    *) ;;
    esac
done
exec 3<&-
if [ $bad = 0 ]; then tb_finish PASS; else tb_finish "FAIL see the TB: lines"; fi
EOF
chmod +x "$run/root/init"
(cd "$run/root" && echo init | cpio -o -H newc --quiet -R 0:0) | gzip >"$run/test.cpio.gz"
cat "$vmdir/base.cpio.gz" "$run/test.cpio.gz" >"$run/initrd.gz"

# --- Boot: the console's input is a fifo the host writes commands to. ----------------------------
mkfifo "$run/in"
exec 7<>"$run/in"
mac=$(printf '52:54:00:%02x:%02x:%02x' $((RANDOM % 256)) $((RANDOM % 256)) $((RANDOM % 256)))
log "booting $(cat "$vmdir/kernel.version") (tcg), tap $tap, mtu $mtu; console -> $console"
timeout -k 10 "$timeout_s" qemu-system-x86_64 -accel tcg -cpu "${TWINBLADE_VM_CPU:-max}" -m 768 -smp 1 \
    -nographic -no-reboot \
    -kernel "$vmdir/vmlinuz" -initrd "$run/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet tb.mtu=$mtu tb.aoe=$LAB_AOE" \
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "e1000,netdev=n0,mac=$mac" \
    <&7 >"$console" 2>&1 &
qemu_pid=$!
# The guest's RESULT lines as they come.
tail -n +1 --pid="$qemu_pid" -F "$console" 2>/dev/null | tr -d '\r' | grep --line-buffered -aE '(RESULT|TWINBLADE-VM-TEST):' |
    sed -u 's/^.*\(RESULT\|TWINBLADE-VM-TEST\):/  guest: \1:/' >&2 &
watch_pid=$!
await '^TB: ready' 180

# --- dd survival --------------------------------------------------------------------------------
declare -a gaps=()
for ((r = 1; r <= runs; r++)); do
    tag=dd$r
    p=$(wait_primary 30) || die "no primary before $tag"
    s=$(other "$p")
    send w "$tag" "$NBLK" "$DD_OFF" "$LOSS_AT"
    await "^TB: $tag block $LOSS_AT t=" 240
    failout=$("$lab" fail "$p")
    took=$(sed -n 's/.* is Primary and serving \([0-9.]*\) s after.*/\1/p' <<<"$failout")
    log "$tag: power loss of $p after block $LOSS_AT; $s serving after ${took:-?} s"
    await "^TB: $tag done" 300
    line=$(gline "^TB: $tag done")
    rto=$(gval "$(gline "^TB: $tag rto_us=")" rto_us)
    rto=${rto:-$(gline "^TB: $tag rto_us=" | sed -n 's/.*rto_us=\([0-9-]*\).*/\1/p')}
    gap=$(gval "$line" gap)
    gat=$(sed -n 's/.* gap=[0-9.]* at=\([0-9]*\).*/\1/p' <<<"$line")
    errs=$(gval "$line" errors) verify=$(gval "$line" verify) want=$(gval "$line" md5)
    got=$(region_md5 "$(disk_of "$s")" "$DD_OFF" "$NBLK")
    host=ok
    [[ $got == "$want" ]] || host="survivor's disk md5 $got, guest wrote $want"
    healout=$("$lab" heal "$p" 2>&1 | tail -n 1)
    got2=$(region_md5 "$(disk_of "$p")" "$DD_OFF" "$NBLK")
    healed=ok
    [[ $got2 == "$want" ]] || healed="healed $p's disk md5 $got2, guest wrote $want"
    gaps+=("$gap")
    fig="primary $p lost after block $LOSS_AT; blocks $NBLK errors $errs readback $verify; longest gap ${gap} s (before block $gat); rto before loss ${rto:-?} us; driver targets $(gval "$line" targets); $s serving ${took:-?} s after the loss; survivor disk $host; healed disk $healed"
    if [[ $errs == 0 && $verify == ok && $host == ok && $healed == ok ]]; then
        result "dd survival run $r" PASS "$fig"
    else
        result "dd survival run $r" FAIL "$fig"
    fi
    log "  heal: $healout"
done
if ((runs > 1)); then
    read -r med worst < <(printf '%s\n' "${gaps[@]}" | sort -g |
        awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.2f %.2f\n", m, a[NR] }')
    result "dd survival x$runs" INFO "guest's longest gap: median $med s, worst $worst s (runs: ${gaps[*]})"
fi

# --- switchover, and back, with the guest writing ---------------------------------------------
p=$(wait_primary 30) || die "no primary before the switchover"
send w sw 60 "$DD_OFF" 0
await '^TB: sw block 10 t=' 120
sw1=$("$lab" switchover 2>&1 | head -n 1) || true
await '^TB: sw block 30 t=' 240
sw2=$("$lab" switchover --on secondary 2>&1 | head -n 1) || true
await '^TB: sw done' 240
line=$(gline '^TB: sw done')
errs=$(gval "$line" errors) verify=$(gval "$line" verify) gap=$(gval "$line" gap)
pause1=$(sed -n 's/.*no node serving for \([0-9.]*\) s.*/\1/p' <<<"$sw1")
pause2=$(sed -n 's/.*no node serving for \([0-9.]*\) s.*/\1/p' <<<"$sw2")
split1=$(sed -n 's/.*: \(demote [0-9.?]* s, promote [0-9.]* s\),.*/\1/p' <<<"$sw1")
split2=$(sed -n 's/.*: \(demote [0-9.?]* s, promote [0-9.]* s\),.*/\1/p' <<<"$sw2")
fig="$p -> $(other "$p") -> $p: no-service ${pause1:-?} s ($split1) and ${pause2:-?} s ($split2) (lab); guest longest gap $gap s; errors $errs readback $verify"
if [[ $errs == 0 && $verify == ok && -n $pause1 && -n $pause2 ]]; then
    result "switchover and back" PASS "$fig"
else
    result "switchover and back" FAIL "$fig [lab said: $sw1 / $sw2]"
fi

# --- filesystem survival ------------------------------------------------------------------------
p=$(wait_primary 30) || die "no primary before the filesystem test"
send fs
await '^TB: fs synced' 240
failout=$("$lab" fail "$p")
took=$(sed -n 's/.* is Primary and serving \([0-9.]*\) s after.*/\1/p' <<<"$failout")
await '^TB: fs done' 300
line=$(gline '^TB: fs done')
"$lab" heal "$p" >/dev/null 2>&1 || true
fig="primary $p lost after the sync; $(other "$p") serving ${took:-?} s later; files 40 errors $(gval "$line" errors); e2fsck -f -n $(gval "$line" fsck); guest longest gap between file writes $(gval "$line" gap) s"
if [[ $(gval "$line" ok) == 1 ]]; then
    result "filesystem survival" PASS "$fig"
else
    result "filesystem survival" FAIL "$fig"
fi

# --- kill -9 of a daemon whose node stays up -------------------------------------------------------
own_mac() { ip -n "tb-$1" -o link show eth0 | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2; }
has_fip() { ip -n "tb-$1" -o -4 addr show dev eth0 | grep -q " $LAB_FLOATING_IP/"; }
if [[ -z $LAB_FLOATING_IP ]]; then
    result "kill -9" SKIP "the daemon has no floating IP yet"
else
    p=$(wait_primary 30) || die "no primary before the kill -9 test"
    s=$(other "$p")
    mac_p=$(own_mac "$p") mac_s=$(own_mac "$s")
    command -v tshark >/dev/null || die "tshark missing (the kill -9 test captures ARP with it; see .ci/run)"
    ip netns exec tb-client tshark -q -i eth0 -f arp -w "$run/arp.pcap" >/dev/null 2>&1 &
    capture_pid=$!
    for _ in $(seq 50); do [[ -s $run/arp.pcap ]] && break; sleep 0.1; done
    sleep 0.5 # tshark writes the file's header just before it captures
    kout=$("$lab" kill "$p" 2>&1)
    took=$(sed -n 's/.* is Primary and serving \([0-9.]*\) s after.*/\1/p' <<<"$kout")
    sleep 1.5 # the gratuitous ARPs: 5 x 200 ms
    held_dead=$(has_fip "$p" && echo yes || echo no)
    # The lab's unit removed the address when the daemon died (ExecStopPost); a stale copy
    # the daemon must remove itself at start: put one back, with the node's client link cut
    # so that it is never a second live holder, then restart (heal starts the daemon before
    # it brings the links up).
    "$lab" cut client "$p" >/dev/null
    ip -n "tb-$p" addr add "$LAB_FLOATING_IP/24" dev eth0 2>/dev/null || true
    stale=$(has_fip "$p" && echo yes || echo no)
    "$lab" heal "$p" >/dev/null 2>&1 || true
    sleep 0.5
    held_back=$(has_fip "$p" && echo yes || echo no)
    kill "$capture_pid" 2>/dev/null || true
    wait "$capture_pid" 2>/dev/null || true
    capture_pid=''
    svc_mac=$(field "$s" service-mac)
    garps=$(tshark -r "$run/arp.pcap" -Y "arp.src.proto_ipv4 == $LAB_FLOATING_IP && arp.dst.proto_ipv4 == $LAB_FLOATING_IP" \
        -T fields -e arp.src.hw_mac 2>/dev/null | sort | uniq -c | awk '{printf "%s x%s ", $2, $1}')
    garp_ok=no
    [[ $garps == *"$mac_s "* || (-n $svc_mac && $garps == *"$svc_mac "*) ]] && garp_ok=yes
    macs_ok=no
    [[ $(own_mac "$p") == "$mac_p" && $(own_mac "$s") == "$mac_s" ]] && macs_ok=yes
    fig="$p killed, $s serving ${took:-?} s later; own MACs kept: $macs_ok ($p $mac_p, $s $mac_s); $p holds the floating IP: after the kill $held_dead, stale copy added $stale, after its restart $held_back; GARPs for $LAB_FLOATING_IP seen by the client: ${garps:-none}(service-mac $svc_mac)"
    if [[ $macs_ok == yes && $held_back == no && $garp_ok == yes ]]; then
        result "kill -9" PASS "$fig"
    else
        result "kill -9" FAIL "$fig"
    fi
fi

# --- NBD on the floating IP through a power loss -----------------------------------------------
if [[ -z $LAB_NBD ]] || ! command -v nbdcopy >/dev/null; then
    result "nbd floating IP" SKIP "${LAB_NBD:+no nbdcopy}${LAB_NBD:-the daemon has no floating IP yet}"
else
    p=$(wait_primary 30) || die "no primary before the NBD test"
    src=$run/nbd.src
    head -c $((NBD_MIB << 20)) /dev/urandom >"$src"
    want=$(md5sum <"$src" | cut -d' ' -f1)
    # nbdcopy (1.14) has no retry and no I/O timeout: a request whose reply died with the old
    # primary waits forever on a connection that has nothing left to send (nothing makes the
    # new primary's RST arrive). So: a watchdog ends an attempt that made no progress for 5 s,
    # as nbd-client's -timeout would, and the whole copy runs again until one succeeds. Small
    # requests, one at a time, so that the copy lasts long enough to be cut in the middle.
    # shellcheck disable=SC2016 # the variables belong to the inner bash
    ip netns exec tb-client bash -c '
        src=$1 uri=$2 out=$3 n=0
        attempt() {
            nbdcopy --flush --request-size=4096 -C 1 -R 1 --progress=3 "$src" "$uri" \
                3>"$out.progress" 2>>"$out.err" &
            local cp=$! last="" since=$SECONDS cur
            while kill -0 "$cp" 2>/dev/null; do
                cur=$(tail -n 1 "$out.progress" 2>/dev/null)
                if [[ $cur != "$last" ]]; then last=$cur since=$SECONDS; fi
                if ((SECONDS - since >= 5)); then
                    echo "attempt stalled at $cur for 5 s: ended" >>"$out"
                    kill "$cp" 2>/dev/null
                fi
                sleep 0.2
            done
            wait "$cp"
        }
        until attempt; do
            n=$((n + 1))
            echo "attempt $n failed at $(date +%s.%N)" >>"$out"
            ((n < 30)) || exit 1
            sleep 0.2
        done
        echo "done after $n failed attempts at $(date +%s.%N)" >>"$out"' sh "$src" "$LAB_NBD" "$run/nbd.log" &
    copier=$!
    # Cut the power once the copy is well under way (16 MiB written through the primary).
    w0=$(field "$p" written)
    for _ in $(seq 300); do
        (($(field "$p" written) - w0 >= 16 << 20)) && break
        kill -0 "$copier" 2>/dev/null || break
        sleep 0.1
    done
    early=$(kill -0 "$copier" 2>/dev/null && echo no || echo yes)
    tl=$(date +%s.%N)
    "$lab" fail "$p" >/dev/null
    rc=0
    wait "$copier" || rc=$?
    done_at=$(sed -n 's/^done after .* at \([0-9.]*\)$/\1/p' "$run/nbd.log")
    attempts=$(sed -n 's/^done after \([0-9]*\) failed.*/\1/p' "$run/nbd.log")
    # The export as a client reads it, and the survivor's disk.
    # (nbdcopy fails on the pipe head closes: only the md5 matters)
    got=$(ip netns exec tb-client nbdcopy "$LAB_NBD" - 2>/dev/null | head -c $((NBD_MIB << 20)) | md5sum | cut -d' ' -f1) || true
    gotdisk=$(region_md5 "$(disk_of "$(other "$p")")" 0 "$NBD_MIB")
    "$lab" heal "$p" >/dev/null 2>&1 || true
    after=$([[ -n $done_at ]] && awk -v a="$tl" -v b="$done_at" 'BEGIN { printf "%.2f", b - a }')
    stalls=$(grep -c stalled "$run/nbd.log" || true)
    fig="primary $p lost during a $NBD_MIB MiB nbdcopy to $LAB_NBD; failed attempts ${attempts:-?} (stalled $stalls); copy done ${after:-?} s after the loss; export md5 $([[ $got == "$want" ]] && echo matches || echo "$got != $want"); survivor disk $([[ $gotdisk == "$want" ]] && echo matches || echo differs)"
    [[ $early == no ]] || fig+="; the copy ended before the loss: nothing tested"
    if [[ $rc == 0 && $early == no && $got == "$want" && $gotdisk == "$want" ]]; then
        result "nbd floating IP" PASS "$fig"
    else
        result "nbd floating IP" FAIL "$fig (rc $rc; $(tail -n 2 "$run/nbd.log.err" 2>/dev/null | tr '\n' ' '))"
    fi
fi

# --- the end of the guest, and the floating-IP samples ----------------------------------------
send quit
for _ in $(seq 300); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
verdict=$(clean_console | sed -n 's/^.*TWINBLADE-VM-TEST: //p' | tail -n 1)
if [[ $verdict == PASS ]]; then
    result "guest" PASS "no I/O error, every read-back correct"
else
    result "guest" FAIL "${verdict:-no verdict}"
fi
qemu_pid=''
if [[ -n $sampler_pid ]]; then
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=''
    read -r total live raw none < <(awk '
        NF >= 7 { n++; a = ($3 == 1 && $7 == 1); b = ($5 == 1)
          if (a && b) raw++
          if (a && b && $2 == "UP" && $4 == "UP" && $6 == "UP") live++
          if (!($3 == 1 && $2 == "UP") && !(b && $4 == "UP")) none++ }
        END { print n + 0, live + 0, raw + 0, none + 0 }' "$fiplog")
    fig="$total samples: two holders on live links $live, two holders at all $raw, no live holder $none (samples: $fiplog)"
    if ((live == 0 && total > 0)); then
        result "floating IP holders" PASS "$fig"
    else
        result "floating IP holders" FAIL "$fig"
    fi
else
    result "floating IP holders" SKIP "the daemon has no floating IP yet"
fi

total=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
printf '\n===== linux-failover summary (mtu %s, profile %s, %s)\n' "$mtu" "${LAB_PROFILE:-default}" \
    "$([[ -n $LAB_FLOATING_IP ]] && echo "floating IP $LAB_FLOATING_IP" || echo "no floating IP")" >&2
printf '  %s\n' "${summary[@]}" >&2
if ((failures)); then
    log "console tail ($console):"
    tail -n 40 "$console" | tr -d '\r' | sed -E 's/\x1b(\[[0-9;?]*[a-zA-Z]|.)//g; s/^/  | /' >&2
    log "FAIL: $failures test(s) failed [total ${total}s]"
    exit 1
fi
log "PASS [total ${total}s]"
