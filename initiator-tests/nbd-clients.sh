#!/usr/bin/env bash
# Real third-party NBD clients (Debian's libnbd-bin, qemu-utils, fio) against `twinblade nbd`
# on loopback: nbdinfo (name, size, list), nbdcopy in and out with a checksum match,
# qemu-img convert/compare, fio's nbd engine writing with verification, qemu-io's flush, FUA,
# write-zeroes, discard and an out-of-range read, a read-only export, the client allowlist,
# and a clean shutdown on SIGTERM.
#
# Usage: initiator-tests/nbd-clients.sh [--bin PATH] [--size MiB] [--target IGNORED]
#
#   --bin     twinblade binary (default: build target/release/twinblade)
#   --size    export size in MiB (default 64)
#   --target  accepted for all.sh's sake (it selects the AoE target); ignored
#
# Exit status is non-zero if any check failed. Needs nbdinfo, nbdcopy, qemu-img, qemu-io, fio.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin='' size_mib=64
while (($#)); do
    case $1 in
    --bin) bin=${2:?--bin needs a value}; shift ;;
    --size) size_mib=${2:?--size needs a value}; shift ;;
    --target) shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "nbd-clients: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf 'nbd-clients: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in nbdinfo nbdcopy qemu-img qemu-io fio md5sum; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install libnbd-bin qemu-utils fio)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

if [[ -z $bin ]]; then
    (cd "$repo" && cargo build --release --quiet)
    bin=$repo/target/release/twinblade
fi
[[ -x $bin ]] || die "no binary at $bin"

work=$(mktemp -d /tmp/nbd-clients.XXXXXX)
server_pid=''
cleanup() {
    local rc=$?
    if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

failures=0 passes=0
check() { # check LABEL COMMAND...: run, record pass/fail
    local label=$1
    shift
    if "$@"; then
        passes=$((passes + 1)); log "PASS $label"
    else
        failures=$((failures + 1)); log "FAIL $label"
    fi
}

# start_server ARGS...: start twinblade nbd on a free loopback port; sets port and uri.
start_server() {
    # Emptied here, not only by the child's redirection: the loop below must never read the
    # previous server's port while the child has not opened the file yet.
    : >"$work/server.log"
    "$bin" nbd --bind 127.0.0.1 --port 0 "$@" 2>>"$work/server.log" &
    server_pid=$!
    local i
    for i in $(seq 100); do
        port=$(sed -n 's/^twinblade nbd: serving .* on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/server.log")
        [[ -n $port ]] && return 0
        kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; die "server exited"; }
        sleep 0.1
    done
    die "server did not report ready"
}

# stop_server: SIGTERM, which must end the server cleanly (exit 0) within 10 s.
stop_server() {
    kill -TERM "$server_pid"
    local rc=0 i
    for i in $(seq 100); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    wait "$server_pid" || rc=$?
    server_pid=''
    return "$rc"
}

size=$((size_mib << 20))
name=tb-export
disk=$work/disk.img
truncate -s "$size" "$disk"
head -c "$size" /dev/urandom >"$work/src.img"
head -c "$size" /dev/urandom >"$work/src2.img"

start_server --name "$name" "$disk"
uri=nbd://127.0.0.1:$port/$name
log "server up at $uri"

# --- nbdinfo: export name, size, list. ---------------------------------------------------------
nbdinfo_ok() {
    local out
    out=$(nbdinfo "$uri") || return 1
    grep -q "export=\"$name\"" <<<"$out" && grep -q "export-size: $size" <<<"$out" &&
        grep -q 'can_flush: true' <<<"$out" && grep -q 'can_fua: true' <<<"$out" &&
        grep -q 'can_multi_conn: true' <<<"$out" &&
        [[ $(nbdinfo --size "$uri") == "$size" ]] &&
        out=$(nbdinfo --list "nbd://127.0.0.1:$port") && grep -q "export=\"$name\"" <<<"$out"
}
check "nbdinfo name/size/flags/list" nbdinfo_ok

# --- nbdcopy in and out (multi-conn, many requests in flight). -----------------------------------
nbdcopy_ok() {
    nbdcopy --flush "$work/src.img" "$uri" &&
        nbdcopy "$uri" "$work/out.img" &&
        [[ $(md5sum <"$work/src.img") == $(md5sum <"$work/out.img") ]] &&
        [[ $(md5sum <"$work/src.img") == $(md5sum <"$disk") ]]
}
check "nbdcopy in/out md5" nbdcopy_ok

# --- qemu-img convert and compare. ---------------------------------------------------------------
qemu_ok() {
    qemu-img convert -n -f raw -O raw "$work/src2.img" "$uri" &&
        qemu-img compare -f raw -F raw "$work/src2.img" "$uri" &&
        qemu-img convert -f raw -O qcow2 "$uri" "$work/out.qcow2" &&
        qemu-img compare -f raw -F qcow2 "$work/src2.img" "$work/out.qcow2" &&
        ! qemu-img compare -q -f raw -F raw "$work/src.img" "$uri"
}
check "qemu-img convert/compare" qemu_ok

# --- fio's nbd engine: random writes with verification, then sequential. -------------------------
fio_ok() {
    fio --name=randverify --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
        --size=$((size_mib / 2))M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        --output="$work/fio1.log" &&
        fio --name=seqverify --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 \
            --size="${size_mib}M" --verify=md5 --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
            --output="$work/fio2.log" &&
        ! grep -q 'verify: bad' "$work/fio1.log" "$work/fio2.log"
}
check "fio nbd engine with verify" fio_ok

# --- qemu-io: flush, FUA write, write-zeroes, discard, out-of-range. -----------------------------
qemu_io_ok() {
    local out
    out=$(qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'write -f -P 0xcd 64k 4k' -c flush \
        -c 'write -z 128k 64k' -c 'discard 1M 1M' -c 'read -P 0xab 0 64k' \
        -c 'read -P 0xcd 64k 4k' -c 'read -P 0 128k 64k' "$uri" 2>&1) || { echo "$out" >&2; return 1; }
    ! grep -qiE 'error|fail|mismatch' <<<"$out" || { echo "$out" >&2; return 1; }
    # A read past the end must fail (qemu-io exits 1), not hang or crash the server.
    ! timeout 20 qemu-io -f raw -c "read $size 4k" "$uri" >/dev/null 2>&1 &&
        nbdinfo --size "$uri" >/dev/null
}
check "qemu-io flush/fua/zeroes/discard" qemu_io_ok

check "SIGTERM shuts down cleanly" stop_server

# --- A read-only export refuses writes. -----------------------------------------------------------
start_server --name ro --read-only "$work/src.img"
uri=nbd://127.0.0.1:$port/ro
readonly_ok() {
    local out
    out=$(nbdinfo "$uri") && grep -q 'is_read_only: true' <<<"$out" &&
        ! qemu-io -f raw -c 'write 0 4k' "$uri" >/dev/null 2>&1 &&
        nbdcopy "$uri" "$work/ro.img" &&
        cmp -s "$work/src.img" "$work/ro.img"
}
check "read-only export" readonly_ok
check "SIGTERM shuts down cleanly (read-only)" stop_server

# --- The allowlist: loopback clients are refused unless their address is listed. ------------------
start_server --name acl --allow 10.0.0.0/8 --allow 127.0.0.2 "$disk"
acl_refuses() { ! timeout 20 nbdinfo --size "nbd://127.0.0.1:$port/acl" >/dev/null 2>&1; }
check "allowlist refuses 127.0.0.1" acl_refuses
check "SIGTERM shuts down cleanly (allowlist)" stop_server
start_server --name acl --allow 10.0.0.0/8 --allow 127.0.0.0/8 "$disk"
acl_admits() { [[ $(timeout 20 nbdinfo --size "nbd://127.0.0.1:$port/acl") == "$size" ]]; }
check "allowlist admits 127.0.0.0/8" acl_admits
check "SIGTERM shuts down cleanly (allowlist 2)" stop_server

log "$passes passed, $failures failed"
echo "nbd-clients: $passes passed, $failures failed"
((failures == 0))
