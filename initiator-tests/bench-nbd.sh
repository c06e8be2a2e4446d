#!/usr/bin/env bash
# NBD throughput: twinblade vs qemu-nbd vs nbdkit's file plugin, same clients, same file, one run.
#
# Usage: initiator-tests/bench-nbd.sh [--bin PATH] [--size MiB] [--rounds N] [--runtime SECONDS]
#                                     [--only ROW-REGEX]
#
#   --bin      twinblade binary (default: cargo build --release, target/release/twinblade)
#   --size     size of the exported file in MiB (default 1024)
#   --rounds   interleaved rounds, each running every server once per row (default 3)
#   --runtime  seconds per fio job (default 6)
#   --only     run only the rows whose name matches this regex
#
# One fully written file of random data (not sparse) is served by each server in turn over
# loopback, all three through the page cache (no O_DIRECT): `twinblade nbd FILE`,
# `qemu-nbd -f raw --cache=writeback --aio=threads -e 8 -t FILE`, `nbdkit file FILE`. Rows:
#
#   nbdcopy-read    nbdcopy nbd://... null:         (MiB/s; default 4 connections if multi-conn)
#   nbdcopy-write   nbdcopy SRC nbd://...           (MiB/s; SRC: a second random file, cached)
#   fio-4k-randread / fio-4k-randwrite   fio --ioengine=nbd, bs=4k, iodepth=32 (IOPS)
#   fio-4k-randread-qd1                  fio --ioengine=nbd, bs=4k, iodepth=1 (IOPS)
#   fio-1m-read / fio-1m-write           fio --ioengine=nbd, bs=1M, iodepth=8, sequential (MiB/s)
#
# A second table shows each server's CPU time (user + system, from /proc) per request or per
# GiB for the same runs: less noisy than throughput on a machine that is busy with other work.
#
# Rounds are interleaved, the order rotating (A B C, B C A, C A B, ...); the table shows the
# median of each server, the spread (min-max) and twinblade's median divided by the better
# peer's median. As root the whole run is reniced to -10 so that other work on the machine
# disturbs it less.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin='' size_mib=1024 rounds=3 runtime=6 only='.'
while (($#)); do
    case $1 in
    --bin) bin=${2:?}; shift ;;
    --size) size_mib=${2:?}; shift ;;
    --rounds) rounds=${2:?}; shift ;;
    --runtime) runtime=${2:?}; shift ;;
    --only) only=${2:?}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-nbd: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf 'bench-nbd: %s\n' "$*" >&2; }
# The machine may be busy with other work (builds): as root, run servers and clients at a
# higher priority than that, equally for all three servers.
if ((EUID == 0)); then renice -n -10 $$ >/dev/null; fi
die() { log "error: $*"; exit 1; }
for tool in nbdcopy nbdinfo qemu-nbd nbdkit fio python3; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install libnbd-bin qemu-utils nbdkit fio)"
done
if [[ -z $bin ]]; then
    (cd "$repo" && cargo build --release --quiet)
    bin=$repo/target/release/twinblade
fi

work=$(mktemp -d /var/tmp/bench-nbd.XXXXXX)
pid=''
cleanup() {
    local rc=$?
    [[ -n $pid ]] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

file=$work/disk.img
src=$work/src.img
log "writing $size_mib MiB of random data (twice)"
head -c $((size_mib << 20)) /dev/urandom >"$file"
head -c $((size_mib << 20)) /dev/urandom >"$src"
sync

port=10899
uri=nbd://127.0.0.1:$port/bench

wait_ready() {
    local i
    for i in $(seq 200); do
        nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || die "server died: $(cat "$work/server.log")"
        sleep 0.05
    done
    die "server not ready: $(cat "$work/server.log")"
}

start() { # start SERVER
    case $1 in
    twinblade) "$bin" nbd --bind 127.0.0.1 --port $port --name bench "$file" 2>"$work/server.log" & ;;
    qemu-nbd) qemu-nbd -f raw --cache=writeback --aio=threads -e 8 -t -b 127.0.0.1 -p $port \
        -x bench "$file" 2>"$work/server.log" & ;;
    nbdkit) nbdkit -f -i 127.0.0.1 -p $port -e bench file "$file" 2>"$work/server.log" & ;;
    esac
    pid=$!
    wait_ready
}

stop() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=''
}

# Each row prints "FIGURE WORK": the figure (IOPS for 4k rows, MiB/s otherwise) and the work
# done (requests for 4k rows, MiB otherwise), to relate the server's CPU time to.
fio_job() { # fio_job RW BS DEPTH
    local rw=$1 bs=$2 depth=$3
    fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --size="${size_mib}M" --time_based --runtime="$runtime" \
        --randrepeat=0 --output-format=json --output="$work/fio.json" >/dev/null 2>&1 ||
        { log "fio failed"; echo 0 1; return; }
    python3 - "$work/fio.json" "$rw" "$bs" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["write" if "write" in sys.argv[2] else "read"]
if sys.argv[3] == "4k":
    print("%.0f %d" % (side["iops"], side["total_ios"]))
else:
    print("%.0f %.0f" % (side["bw_bytes"] / 2**20, side["io_bytes"] / 2**20))
PY
}

nbdcopy_rate() { # nbdcopy_rate SRC DST
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy "$1" "$2" || { log "nbdcopy failed"; echo 0 1; return; }
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v m="$size_mib" 'BEGIN { printf "%.0f %d\n", m / (b - a), m }'
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # user + system, in clock ticks

run_row() { # run_row ROW -> prints the figure
    case $1 in
    nbdcopy-read) nbdcopy_rate "$uri" null: ;;
    nbdcopy-write) nbdcopy_rate "$src" "$uri" ;;
    fio-4k-randread) fio_job randread 4k 32 ;;
    fio-4k-randwrite) fio_job randwrite 4k 32 ;;
    fio-4k-randread-qd1) fio_job randread 4k 1 ;;
    fio-1m-read) fio_job read 1M 8 ;;
    fio-1m-write) fio_job write 1M 8 ;;
    esac
}

rows=()
for r in nbdcopy-read nbdcopy-write fio-4k-randread fio-4k-randwrite fio-4k-randread-qd1 fio-1m-read fio-1m-write; do
    [[ $r =~ $only ]] && rows+=("$r")
done
servers=(twinblade qemu-nbd nbdkit)
results=$work/results.txt
: >"$results"

hz=$(getconf CLK_TCK)
for round in $(seq "$rounds"); do
    # Rotate the order every round (A B C, B C A, C A B, ...) so that no server always runs
    # first or last in a round.
    for i in "${!servers[@]}"; do
        s=${servers[$(((i + round - 1) % ${#servers[@]}))]}
        start "$s"
        for r in "${rows[@]}"; do
            c0=$(cpu_ticks "$pid")
            read -r v units < <(run_row "$r")
            c1=$(cpu_ticks "$pid")
            echo "$r $s $v $units $((c1 - c0)) $hz" >>"$results"
            log "round $round $s $r: $v"
        done
        stop
    done
done

echo
echo "NBD benchmark: $(nproc) CPUs, ${size_mib} MiB file, $rounds interleaved rounds, fio runtime ${runtime}s"
echo "throughput: IOPS for 4k rows, MiB/s otherwise; median (min-max); ratio = twinblade / better peer"
python3 - "$results" "${rows[@]}" <<'PY'
import sys, statistics
res, cpu = {}, {}
for line in open(sys.argv[1]):
    r, s, v, work, ticks, hz = line.split()
    res.setdefault((r, s), []).append(float(v))
    # Server CPU per unit of work: microseconds per request (4k rows), ms per GiB otherwise.
    seconds = float(ticks) / float(hz)
    per = seconds * 1e6 / max(float(work), 1) if "4k" in r else seconds * 1e3 * 1024 / max(float(work), 1)
    cpu.setdefault((r, s), []).append(per)
servers = ["twinblade", "qemu-nbd", "nbdkit"]
print("%-20s %22s %22s %22s %8s" % ("row", *servers, "ratio"))
for r in sys.argv[2:]:
    cells, med = [], {}
    for s in servers:
        v = res.get((r, s), [0])
        med[s] = statistics.median(v)
        cells.append("%.0f (%.0f-%.0f)" % (med[s], min(v), max(v)))
    best = max(med["qemu-nbd"], med["nbdkit"])
    ratio = med["twinblade"] / best if best else float("nan")
    print("%-20s %22s %22s %22s %7.2fx" % (r, *cells, ratio))
print()
print("server CPU: us per request for 4k rows, ms per GiB otherwise; median; ratio = better peer / twinblade")
print("%-20s %22s %22s %22s %8s" % ("row", *servers, "ratio"))
for r in sys.argv[2:]:
    med = {s: statistics.median(cpu.get((r, s), [float("nan")])) for s in servers}
    best = min(med["qemu-nbd"], med["nbdkit"])
    print("%-20s %22.1f %22.1f %22.1f %7.2fx" % (r, *(med[s] for s in servers), best / med["twinblade"]))
PY
