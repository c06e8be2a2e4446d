#!/usr/bin/env bash
# The real Linux aoe driver against the lab's AoE target: boot a Debian kernel in qemu (TCG) on a
# tap on the lab bridge, discover e0.3, write/read a 32 MiB pattern, then mkfs/mount/fsck ext4.
#
# Usage: initiator-tests/linux-aoe.sh [--mtu 1500|9000] [--target twinblade|vblade|pair]
#                                     [--keep-lab | --use-lab] [--timeout SECONDS]
#                                     [--expect-payload BYTES]
#
#   default       bring the lab up with --mtu/--target (appliance/lab.sh up), run, bring it down
#   --lab         the same as the default (explicit)
#   --keep-lab    bring the lab up, run, and leave it up afterwards
#   --use-lab     use the lab that is already up as it is (its MTU unless --mtu is given)
#   --timeout     seconds the VM may run (default 300)
#   --expect-payload  bytes per frame the driver must choose (default: 1024 at MTU 1500,
#                 8704 at MTU 9000; none checked at other MTUs)
#
# Exit status 0 only if the guest printed "TWINBLADE-VM-TEST: PASS" and the backing file holds the
# pattern the guest wrote. The console log is saved under the lab dir (see appliance/lab.sh).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lab=$repo/appliance/lab.sh
mtu='' target=twinblade lab_mode=own timeout_s=300 expect_payload=''

log() { printf 'linux-aoe: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while (($#)); do
    case $1 in
    --mtu) mtu=${2:?--mtu needs a value}; shift ;;
    --target) target=${2:?--target needs a value}; shift ;;
    --lab) lab_mode=own ;;
    --keep-lab) lab_mode=keep ;;
    --use-lab) lab_mode=use ;;
    --timeout) timeout_s=${2:?--timeout needs a value}; shift ;;
    --expect-payload) expect_payload=${2:?--expect-payload needs a value}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1" ;;
    esac
    shift
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (see .ci/run)"

# --- The VM image (cached) and the lab. ----------------------------------------------------------
t0=$(date +%s.%N)
vmdir=$("$repo/initiator-tests/vm/build.sh")

tap=tbvm$$ # unique per run: another VM may be on the bridge
qemu_pidfile=''
cleanup() {
    local rc=$?
    if [[ -n $qemu_pidfile && -s $qemu_pidfile ]]; then
        # Only our own qemu, by the pid it wrote.
        kill "$(cat "$qemu_pidfile")" 2>/dev/null || true
    fi
    "$lab" del-tap "$tap" 2>/dev/null || true
    if [[ $lab_mode == own ]]; then "$lab" down >&2 || true; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $lab_mode == use ]]; then
    "$lab" status >/dev/null || die "--use-lab: the lab is not (fully) up; see appliance/lab.sh status"
else
    "$lab" up --mtu "${mtu:-1500}" --target "$target" >&2
fi
eval "$("$lab" env)" # LAB_MTU LAB_IMAGE LAB_DIR LAB_TARGET LAB_AOE ...
mtu=${mtu:-$LAB_MTU}
[[ $mtu == "$LAB_MTU" ]] || die "lab MTU is $LAB_MTU, not $mtu"
if [[ -z $expect_payload ]]; then
    case $mtu in
    1500) expect_payload=1024 ;;
    9000) expect_payload=8704 ;; # vblade and twinblade advertise 17 sectors per frame (aoe.md)
    *) expect_payload=any ;;
    esac
fi
"$lab" add-tap "$tap"

# --- The test's /init, appended to the base initramfs as a second archive. -------------------------
run=$(mktemp -d "$LAB_DIR/linux-aoe.XXXXXX")
mkdir -p "$run/root"
cat >"$run/root/init" <<'EOF'
#!/bin/sh
# Guest side of initiator-tests/linux-aoe.sh. Parameters come from the kernel command line.
. /lib/twinblade/common.sh
tb_basics
mtu=$(tb_cmdline tb.mtu)
want_payload=$(tb_cmdline tb.payload)
name=$(tb_cmdline tb.aoe)
dev=/dev/etherd/$name
sysdev=/sys/block/etherd!$name
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }

tb_load_modules || tb_fail modules "insmod failed: $(dmesg | tail -n 3 | tr '\n' ' ')"
tb_result "modules ok kernel $(uname -r)"

ip link set eth0 mtu "$mtu" || tb_fail net "cannot set mtu $mtu"
ip link set eth0 up || tb_fail net "eth0 does not come up"
tb_result "net ok eth0 mtu $(cat /sys/class/net/eth0/mtu) $(cat /sys/class/net/eth0/address)"

# Discovery: the driver broadcasts a config query on module load, but eth0 was down then.
t=$(now)
i=0
until [ -b "$dev" ] && [ "$(cat "$sysdev/size" 2>/dev/null || echo 0)" -gt 0 ]; do
    [ $i -ge 40 ] && tb_fail discover "no $dev after 20 s; dmesg: $(dmesg | grep -i aoe | tail -n 3 | tr '\n' ' ')"
    echo >/dev/etherd/discover 2>/dev/null
    usleep 500000
    i=$((i + 1))
done
sectors=$(cat "$sysdev/size")
tb_result "discover ok $dev $sectors sectors in $(since "$t"); dmesg: $(dmesg | grep -o 'aoe: .* has [0-9]* sectors' | tail -n 1)"

payload=$(cat "$sysdev/payload" 2>/dev/null || echo '?')
frames=$(dmesg | grep -o 'setting [0-9]* byte data frames' | tail -n 1)
if [ "$want_payload" = any ] || [ "$payload" = "$want_payload" ]; then
    tb_result "payload ok $payload bytes (want $want_payload; dmesg: ${frames:-none})"
else
    tb_fail payload "driver uses $payload-byte frames, want $want_payload (dmesg: ${frames:-none})"
fi

# 32 MiB random pattern in the last 32 MiB of the device: the filesystem below stays clear of it,
# so the host can check the backing file after the VM has exited.
size_mib=$((sectors / 2048))
[ "$size_mib" -ge 96 ] || tb_fail size "device is $size_mib MiB, need >= 96"
off=$((size_mib - 32))
dd if=/dev/urandom of=/tmp/pattern bs=1M count=32 2>/dev/null || tb_fail pattern "no pattern"
want=$(md5sum </tmp/pattern | cut -d' ' -f1)
t=$(now)
dd if=/tmp/pattern of="$dev" bs=1M seek="$off" conv=fsync oflag=direct 2>/tmp/dd.err ||
    tb_fail write "dd: $(cat /tmp/dd.err)"
tb_result "write ok 32 MiB at $off MiB in $(since "$t") (O_DIRECT, fsync)"
echo 3 >/proc/sys/vm/drop_caches
t=$(now)
dd if="$dev" of=/tmp/readback bs=1M skip="$off" count=32 iflag=direct 2>/tmp/dd.err ||
    tb_fail read "dd: $(cat /tmp/dd.err)"
got=$(md5sum </tmp/readback | cut -d' ' -f1)
[ "$got" = "$want" ] || tb_fail readback "md5 $got, wrote $want"
tb_result "readback ok md5 $got in $(since "$t")"
echo "PATTERN: offset_mib=$off count_mib=32 md5=$want"
rm -f /tmp/readback

# ext4 on the first (size - 64) MiB.
fs_mib=$((size_mib - 64))
t=$(now)
mke2fs.full -q -F -t ext4 "$dev" "${fs_mib}M" >/tmp/mkfs.log 2>&1 ||
    tb_fail mkfs "$(tail -n 3 /tmp/mkfs.log | tr '\n' ' ')"
tb_result "mkfs ok ext4 ${fs_mib} MiB in $(since "$t")"
mount -t ext4 "$dev" /mnt 2>/tmp/mount.err || tb_fail mount "$(cat /tmp/mount.err) $(dmesg | tail -n 2 | tr '\n' ' ')"
mkdir /mnt/dir
i=0
while [ $i -lt 100 ]; do
    echo "file $i" >/mnt/dir/f$i
    i=$((i + 1))
done
cp /tmp/pattern /mnt/pattern
sync
tb_result "mount ok wrote 101 files"
umount /mnt || tb_fail umount "umount failed"
# Read back through a fresh mount with caches dropped: the data must come from the target.
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 -o ro "$dev" /mnt || tb_fail remount "ro mount failed"
fgot=$(md5sum </mnt/pattern | cut -d' ' -f1)
[ "$fgot" = "$want" ] || tb_fail fileread "md5 of /mnt/pattern $fgot, wrote $want"
[ "$(cat /mnt/dir/f99)" = "file 99" ] || tb_fail fileread "/mnt/dir/f99 wrong"
umount /mnt || tb_fail umount "umount failed"
tb_result "remount ok file md5 matches"
e2fsck.full -fn "$dev" >/tmp/fsck.log 2>&1 || tb_fail fsck "exit $?: $(tail -n 5 /tmp/fsck.log | tr '\n' ' ')"
tb_result "fsck ok $(tail -n 1 /tmp/fsck.log)"
tb_finish PASS
EOF
chmod +x "$run/root/init"
(cd "$run/root" && echo init | cpio -o -H newc --quiet -R 0:0) | gzip >"$run/test.cpio.gz"
cat "$vmdir/base.cpio.gz" "$run/test.cpio.gz" >"$run/initrd.gz"

# --- Boot. ---------------------------------------------------------------------------------------
console=$LAB_DIR/vm-linux-aoe-mtu$mtu.log
qemu_pidfile=$run/qemu.pid
mac=$(printf '52:54:00:%02x:%02x:%02x' $((RANDOM % 256)) $((RANDOM % 256)) $((RANDOM % 256)))
log "booting $(cat "$vmdir/kernel.version") (tcg), tap $tap, mtu $mtu, target $LAB_TARGET; console -> $console"
t_boot=$(date +%s.%N)
# /dev/kvm exists on these machines but hangs a stock kernel (lab.md): TCG only.
set +e
timeout -k 10 "$timeout_s" qemu-system-x86_64 -accel tcg -cpu "${TWINBLADE_VM_CPU:-max}" -m 768 -smp 1 \
    -nographic -no-reboot -pidfile "$qemu_pidfile" \
    -kernel "$vmdir/vmlinuz" -initrd "$run/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet tb.mtu=$mtu tb.payload=$expect_payload tb.aoe=$LAB_AOE" \
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "e1000,netdev=n0,mac=$mac" \
    </dev/null 2>&1 | tee "$console" | grep --line-buffered -aE '(RESULT|TWINBLADE-VM-TEST|PATTERN):' |
    sed -u -E 's/\r$//; s/^.*(RESULT|TWINBLADE-VM-TEST|PATTERN):/  guest: \1:/' >&2
qemu_rc=${PIPESTATUS[0]}
set -e
vm_secs=$(awk -v a="$t_boot" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

verdict=$(tr -d '\r' <"$console" | sed -n 's/^.*TWINBLADE-VM-TEST: //p' | tail -n 1)
fail=''
if [[ $qemu_rc == 124 || $qemu_rc == 137 ]]; then
    fail="VM timed out after ${timeout_s}s"
elif [[ $verdict != PASS ]]; then
    fail="guest: ${verdict:-no verdict (qemu exit $qemu_rc)}"
fi

# --- Host side: the backing file must hold what the guest wrote. ----------------------------------
if [[ -z $fail ]]; then
    read -r off want < <(tr -d '\r' <"$console" |
        sed -n 's/^.*PATTERN: offset_mib=\([0-9]*\) count_mib=32 md5=\([0-9a-f]*\)$/\1 \2/p' | tail -n 1)
    if [[ -z ${off:-} ]]; then
        fail="guest printed no PATTERN line"
    else
        got=$(dd if="$LAB_IMAGE" bs=1M skip="$off" count=32 status=none | md5sum | cut -d' ' -f1)
        if [[ $got == "$want" ]]; then
            log "host check ok: $LAB_IMAGE at $off MiB has md5 $got"
        else
            fail="backing file at $off MiB has md5 $got, guest wrote $want"
        fi
        if [[ -z $fail && $LAB_TARGET == pair ]]; then
            # The replicated pair: the secondary's disk must hold it too.
            beta_img=${LAB_IMAGE%.img}-beta.img
            got=$(dd if="$beta_img" bs=1M skip="$off" count=32 status=none | md5sum | cut -d' ' -f1)
            if [[ $got == "$want" ]]; then
                log "host check ok: secondary's $beta_img at $off MiB has md5 $got"
            else
                fail="secondary's disk at $off MiB has md5 $got, guest wrote $want"
            fi
        fi
    fi
fi

total=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
rm -rf "$run"
if [[ -n $fail ]]; then
    log "console tail ($console):"
    # Without the firmware's terminal escapes, which garble a terminal.
    tail -n 60 "$console" | tr -d '\r' | sed -E 's/\x1b(\[[0-9;?]*[a-zA-Z]|.)//g; s/^/  | /' >&2
    log "FAIL (mtu $mtu, target $LAB_TARGET): $fail [vm ${vm_secs}s, total ${total}s]"
    exit 1
fi
log "PASS (mtu $mtu, target $LAB_TARGET, payload $(tr -d '\r' <"$console" | sed -n 's/^.*RESULT: payload ok \([0-9]*\).*/\1/p')) [vm ${vm_secs}s, total ${total}s]"
