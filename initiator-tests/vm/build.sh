#!/usr/bin/env bash
# Build the client VM used by the initiator tests: a stock Debian kernel plus a small busybox
# initramfs that carries the Linux aoe driver, e1000, ext4 and e2fsprogs.
#
# Usage: initiator-tests/vm/build.sh [--force]
#
#   Prints the directory holding the result on stdout (progress goes to stderr):
#     DIR/vmlinuz          the kernel
#     DIR/base.cpio.gz     base initramfs (gzip'd newc cpio), without a test /init
#     DIR/kernel.version   uname -r of the kernel, e.g. 6.1.0-56-amd64
#     DIR/modules.order    modules in the order the guest insmods them
#   A test appends its own gzip'd cpio holding /init (concatenated archives are one valid initrd).
#   The base archive also has /lib/twinblade/common.sh, shell helpers the test /init can source.
#
# Environment:
#   TWINBLADE_CACHE   cache root (default /var/cache/twinblade); results go to $TWINBLADE_CACHE/vm
#
# The cache is keyed by the exact kernel package (name_version). Within it, kernel and initramfs
# are rebuilt when this script, busybox or e2fsprogs change. --force rebuilds them regardless; the
# downloaded .deb is kept either way.
set -euo pipefail

cache_root=${TWINBLADE_CACHE:-/var/cache/twinblade}/vm
force=0
PATH=$PATH:/usr/sbin:/sbin # depmod, mke2fs, e2fsck live there; sudo may not have it in PATH

log() { printf 'vm-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while (($#)); do
    case $1 in
    --force) force=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1" ;;
    esac
    shift
done

for tool in apt-cache apt-get dpkg dpkg-deb depmod cpio gzip busybox ldd flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (see .ci/run for the package list)"
done
# busybox must be the static one: it runs inside the guest without any libraries.
if [[ ! -x /bin/busybox ]] || ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox missing or not static: apt-get install busybox-static"
fi
# e2fsprogs' own binaries, not busybox's mke2fs applet (too limited for ext4 + e2fsck).
mke2fs_bin=$(command -v mke2fs || true)
e2fsck_bin=$(command -v e2fsck || true)
for b in "$mke2fs_bin" "$e2fsck_bin"; do
    [[ -n $b && $(readlink -f "$b") != */busybox ]] || die "e2fsprogs mke2fs/e2fsck not found"
done

# --- Which kernel: the versioned package behind the linux-image-amd64 metapackage. -------------
# A glob like linux-image-6.1.0-* would match (and download) every version, so resolve one name.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
[[ -n $kpkg ]] || die "cannot resolve linux-image-amd64 (apt-get update?)"
kver_pkg=$(apt-cache policy "$kpkg" | sed -n 's/^ *Candidate: //p')
[[ -n $kver_pkg && $kver_pkg != "(none)" ]] || die "no candidate version for $kpkg"
key="${kpkg}_${kver_pkg}"
out="$cache_root/$key"
debdir="$cache_root/debs"
mkdir -p "$out" "$debdir"
# One build at a time (tests may call this concurrently); the others wait and then find it cached.
exec 9>"$cache_root/.lock"
flock 9

# --- Is the result up to date? -------------------------------------------------------------------
stamp_want=$(
    {
        sha256sum "${BASH_SOURCE[0]}"
        dpkg-query -W -f '${Package} ${Version}\n' busybox-static e2fsprogs 2>/dev/null || true
        echo "$key"
    } | sha256sum | cut -d' ' -f1
)
if [[ $force == 0 && -s $out/base.cpio.gz && -s $out/vmlinuz &&
    $(cat "$out/stamp" 2>/dev/null || true) == "$stamp_want" ]]; then
    log "cached: $out (kernel $(cat "$out/kernel.version"))"
    ln -sfn "$key" "$cache_root/current"
    printf '%s\n' "$out"
    exit 0
fi

# --- Download (kept in the cache) and unpack (deleted after the build: 400 MB). -----------------
deb="$debdir/${kpkg}_${kver_pkg//:/%3a}_amd64.deb"
if [[ ! -s $deb ]]; then
    log "downloading $kpkg $kver_pkg"
    tmp=$(mktemp -d "$debdir/dl.XXXXXX")
    # apt drops privileges to _apt for downloads; let it write here to avoid the sandbox warning.
    if id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
    (cd "$tmp" && apt-get download -q "$kpkg=$kver_pkg" >&2)
    mv "$tmp"/*.deb "$deb"
    rm -rf "$tmp"
fi
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
kroot=$work/kernel
root=$work/root
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$kroot"
moddir=$(find "$kroot/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)
[[ -n $moddir ]] || die "no lib/modules in $deb"
kver=$(basename "$moddir")
# The package ships no modules.dep (its postinst runs depmod): generate it in the unpacked tree.
depmod -b "$kroot" "$kver"
log "building initramfs for kernel $kver in $out"

# Replace, never rewrite in place: a VM of another test may be booting from the old one.
cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$kver" >"$out/kernel.version"

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,run,root,lib/modules,lib/twinblade}
# The kernel opens /dev/console for /init before anything is mounted (devtmpfs is not automounted
# in this config): without the node, /init runs with no stdout and the test prints nothing.
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3

# --- Kernel modules, in load order. ------------------------------------------------------------
# Wanted: NIC, AoE initiator, ext4. Dependencies come from modules.dep, so a kernel that splits
# things differently still works. crc32c_generic is a soft dependency of ext4 (it asks the crypto
# API for "crc32c" at mount time), which modules.dep does not list: name it explicitly.
wanted=(e1000 aoe crc32c_generic ext4)
declare -A seen=()
order=()
modpath() { # module name -> path relative to $moddir, from modules.dep
    local name=${1//[-_]/[-_]} line # modules.dep spells some names with -, some with _
    line=$(grep -E "(^|/)${name}\.ko(\.(xz|zst|gz))?:" "$moddir/modules.dep" | head -n1) ||
        return 1
    printf '%s\n' "${line%%:*}"
}
add_module() { # depth-first: dependencies before the module itself
    local rel dep deps
    rel=$(modpath "$1") || die "module $1 not in $kver (built in? check modules.builtin)"
    [[ -n ${seen[$rel]:-} ]] && return 0
    seen[$rel]=1
    read -ra deps < <(grep -E "^${rel//./\\.}:" "$moddir/modules.dep" | cut -d: -f2-) || true
    for dep in "${deps[@]}"; do
        dep=$(basename "$dep")
        add_module "${dep%%.ko*}"
    done
    order+=("$rel")
}
for m in "${wanted[@]}"; do
    if grep -qE "/${m}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
        log "module $m is built in, skipping"
        continue
    fi
    add_module "$m"
done
: >"$out/modules.order"
for rel in "${order[@]}"; do
    src="$moddir/$rel"
    name=$(basename "$rel")
    # Debian 6.1 ships plain .ko, but newer kernels compress: insmod in busybox wants plain files.
    case $name in
    *.ko.xz) xz -dc "$src" >"$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$src" >"$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *.ko.gz) gzip -dc "$src" >"$root/lib/modules/${name%.gz}"; name=${name%.gz} ;;
    *) cp "$src" "$root/lib/modules/$name" ;;
    esac
    echo "$name" >>"$out/modules.order"
done
cp "$out/modules.order" "$root/lib/modules/load.order"
log "modules: $(tr '\n' ' ' <"$out/modules.order")"

# --- busybox and its applets. -------------------------------------------------------------------
cp /bin/busybox "$root/bin/busybox"
while read -r applet; do
    [[ $applet == bin/busybox ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done < <(/bin/busybox --list-full)

# --- e2fsprogs under names busybox does not shadow, plus their libraries. -----------------------
# busybox's shell runs its own applet for "mke2fs" even if a real binary sits in PATH, and a cp onto
# the applet symlink would overwrite busybox itself: hence the .full names and cp --remove-destination.
copy_with_libs() { # SRC DEST-in-root
    cp --remove-destination -L "$1" "$root/$2"
    local lib
    for lib in $(ldd "$1" | grep -oE '/[^ ]+\.so[^ ]*'); do
        mkdir -p "$root/$(dirname "$lib")"
        [[ -e $root/$lib ]] || cp -L "$lib" "$root/$lib"
    done
}
copy_with_libs "$mke2fs_bin" sbin/mke2fs.full
copy_with_libs "$e2fsck_bin" sbin/e2fsck.full
# Without mke2fs.conf, "mke2fs -t ext4" does not know which features ext4 means.
cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
ln -s /proc/mounts "$root/etc/mtab"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"

# --- Guest helpers shared by the test /init scripts. --------------------------------------------
cat >"$root/lib/twinblade/common.sh" <<'EOF'
# Sourced by a test's /init. Output lines on the serial console are the test's result:
#   RESULT: <step> ok|FAIL <detail>     one per step
#   TWINBLADE-VM-TEST: PASS | FAIL <reason>   exactly once, last
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# Each line carries the guest uptime, to show where the time goes.
tb_result() { echo "RESULT: $* [t=$(cut -d' ' -f1 /proc/uptime)s]"; }
tb_finish() { # PASS | FAIL reason...
    sync
    echo "TWINBLADE-VM-TEST: $*"
    poweroff -f
    sleep 5
}
tb_fail() { # step reason...: record a failed step and end the test
    local step=$1; shift
    tb_result "$step FAIL $*"
    # The kernel's view (aoe driver, ext4) usually says why.
    dmesg | tail -n 25 | sed 's/^/dmesg: /'
    tb_finish "FAIL $step: $*"
}
tb_basics() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
    mount -t tmpfs -o size=256m tmpfs /tmp
    # Kernel messages on the console would interleave with our output: keep them in dmesg only.
    echo 1 >/proc/sys/kernel/printk
    # Firmware and kernel leave terminal escapes on the console line: start our output on a fresh one.
    echo
}
tb_load_modules() {
    local m
    while read -r m; do
        insmod "/lib/modules/$m" || return 1
    done </lib/modules/load.order
}
# Value of key=value on the kernel command line, e.g. tb_cmdline tb.mtu
tb_cmdline() {
    local kv
    for kv in $(cat /proc/cmdline); do
        case $kv in "$1"=*) echo "${kv#*=}"; return 0 ;; esac
    done
    return 1
}
EOF

# Default /init: a test archive appended after this one replaces it.
cat >"$root/init" <<'EOF'
#!/bin/sh
. /lib/twinblade/common.sh
tb_basics
tb_finish "FAIL no test /init appended to the base initramfs"
EOF
chmod +x "$root/init"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) |
    gzip -9 >"$out/base.cpio.gz.tmp"
mv "$out/base.cpio.gz.tmp" "$out/base.cpio.gz"
echo "$stamp_want" >"$out/stamp"
ln -sfn "$key" "$cache_root/current"
log "done: $out (kernel $kver, initramfs $(du -h "$out/base.cpio.gz" | cut -f1))"
printf '%s\n' "$out"
