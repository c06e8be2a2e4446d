#!/usr/bin/env bash
# AoE frame-path benchmark: vblade -b 64, twinblade, and a no-I/O batched responder (the
# ceiling of the lab path), side by side in one run, with the same initiator on the same fully
# written file.
#
# Usage: initiator-tests/bench-aoe.sh [--rounds N] [--size-mib N] [--mtus "9000 1500"]
#
# Topology: namespaces tbb-target and tbb-client, each with an eth0 whose veth peer is on the
# bridge tbbbr0 (the lab's shape, separate names so the lab can stay up). Rows: for each MTU,
# write/read x 16/64 outstanding (MB/s), and p50/p99 latency at 1 outstanding (4 KiB-ish
# frames: one frame = what the MTU carries). Targets run in interleaved rounds (A B C A B C ...);
# each figure is the median of the rounds, with min-max spread. CPU seconds per GB is the
# target process's user+system time over the bytes it moved in the throughput rows.
# Durability: page cache (buffered file), no flush: the frame path is what is measured.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=3 size_mib=512 mtus="9000 1500"
while (($#)); do
    case $1 in
    --rounds) rounds=$2; shift ;;
    --size-mib) size_mib=$2; shift ;;
    --mtus) mtus=$2; shift ;;
    *) echo "bench-aoe.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
command -v vblade >/dev/null || { echo "bench-aoe.sh: vblade is not installed (apt-get install vblade)" >&2; exit 1; }

cd "$repo"
cargo build --release --workspace --quiet
work=/var/tmp/twinblade-bench
mkdir -p "$work/bin"
# Private copies: a build running elsewhere in this checkout must not swap binaries mid-run.
bin=$work/bin
cp "$repo/target/release/twinblade" "$repo/target/release/aoe-init" "$repo/target/release/aoe-ceiling" "$bin/"
load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "bench: $(nproc) CPUs, load average at start: $(load); commit $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src/net src/export/aoe src/wire src/block initiator-tests || echo ' (with local changes)')"
image=$work/bench.img
results=$work/results.txt
: >"$results"

teardown() {
    for pidfile in "$work"/*.pid; do
        [[ -e $pidfile ]] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    ip netns del tbb-target 2>/dev/null || true
    ip netns del tbb-client 2>/dev/null || true
    ip link del tbbbr0 2>/dev/null || true
}
trap teardown EXIT

topology() { # MTU
    teardown
    ip link add tbbbr0 type bridge
    ip link set tbbbr0 mtu "$1" up
    for ns in tbb-target tbb-client; do
        ip netns add "$ns"
        ip link add "${ns#tbb-}-br" type veth peer name tbbtmp
        ip link set tbbtmp netns "$ns"
        ip -n "$ns" link set tbbtmp name eth0
        ip link set "${ns#tbb-}-br" master tbbbr0 mtu "$1" up
        ip -n "$ns" link set eth0 mtu "$1" up
        ip -n "$ns" link set lo up
    done
}

size_bytes=$((size_mib << 20))
if [[ ! -f $image ]] || (($(stat -c %s "$image") != size_bytes)); then
    echo "bench: writing a fully allocated ${size_mib} MiB image"
    dd if=/dev/urandom of="$image" bs=1M count="$size_mib" status=none
fi
sectors=$((size_bytes / 512))

start_target() { # NAME
    local name=$1
    case $name in
    vblade) ip netns exec tbb-target vblade -b 64 0 3 eth0 "$image" >"$work/$name.log" 2>&1 & ;;
    twinblade) ip netns exec tbb-target "$bin/twinblade" vblade 0 3 eth0 "$image" >"$work/$name.log" 2>&1 & ;;
    ceiling) ip netns exec tbb-target "$bin/aoe-ceiling" eth0 0 3 "$sectors" >"$work/$name.log" 2>&1 & ;;
    esac
    echo $! >"$work/$name.pid"
    for _ in $(seq 50); do
        ip netns exec tbb-client "$bin/aoe-init" -i eth0 discover --wait-ms 100 | grep -q e0.3 && return 0
    done
    echo "bench: $name did not come up" >&2
    cat "$work/$name.log" >&2
    return 1
}

stop_target() { # NAME
    local pid
    pid=$(cat "$work/$1.pid")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$work/$1.pid"
}

cpu_ticks() { # PID -> utime+stime in clock ticks
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

context_switches() { # PID -> voluntary + involuntary context switches of all its threads
    cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ { n += $2 } END { print n }'
}

field() { # KEY LINE
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"
}

initiator() {
    ip netns exec tbb-client "$bin/aoe-init" -i eth0 "$@"
}

hz=$(getconf CLK_TCK)
for mtu in $mtus; do
    topology "$mtu"
    bytes=$size_bytes
    ((mtu < 9000)) && bytes=$((size_bytes / 2))
    for round in $(seq "$rounds"); do
        echo "bench: MTU $mtu round $round, load average $(load)"
        for target in vblade twinblade ceiling; do
            start_target "$target"
            pid=$(cat "$work/$target.pid")
            # Warm the page cache and the path.
            initiator read e0.3 -q 16 --bytes "$bytes" >/dev/null
            t0=$(cpu_ticks "$pid")
            c0=$(context_switches "$pid")
            moved=0
            for op in write read; do
                for q in 16 64; do
                    line=$(initiator "$op" e0.3 -q "$q" --bytes "$bytes" --seed "$round")
                    echo "mtu=$mtu round=$round target=$target row=$op-q$q mb_s=$(field mb_s "$line") retransmits=$(field retransmits "$line")" >>"$results"
                    moved=$((moved + bytes))
                done
            done
            t1=$(cpu_ticks "$pid")
            c1=$(context_switches "$pid")
            frames=$((moved / (mtu >= 9000 ? 8704 : 1024)))
            echo "mtu=$mtu round=$round target=$target row=switches_per_kframe value=$(awk -v c="$((c1 - c0))" -v f="$frames" 'BEGIN { printf "%.1f", c * 1000 / f }')" >>"$results"
            cpu=$(awk -v t="$((t1 - t0))" -v hz="$hz" -v b="$moved" 'BEGIN { printf "%.3f", t / hz / (b / 1e9) }')
            echo "mtu=$mtu round=$round target=$target row=cpu_s_per_gb value=$cpu" >>"$results"
            line=$(initiator write e0.3 -q 1 --bytes $((16 << 20)) --latency --seed "$round")
            echo "mtu=$mtu round=$round target=$target row=lat-q1 p50_us=$(field p50_us "$line") p99_us=$(field p99_us "$line")" >>"$results"
            stop_target "$target"
        done
    done
done

# Report: medians with spread, ratios twinblade/ceiling and twinblade/vblade.
echo "bench: load average at end: $(load)"
python3 - "$results" "$rounds" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    kv = dict(p.split("=", 1) for p in line.split())
    key = (int(kv["mtu"]), kv["row"], kv["target"])
    if kv["row"].startswith("lat"):
        rows[key + ("p50",)].append(float(kv["p50_us"]))
        rows[key + ("p99",)].append(float(kv["p99_us"]))
    elif kv["row"] in ("cpu_s_per_gb", "switches_per_kframe"):
        rows[key + ("v",)].append(float(kv["value"]))
    else:
        rows[key + ("v",)].append(float(kv["mb_s"]))
        rows[key + ("rt",)].append(int(kv["retransmits"]))

def cell(key):
    v = rows.get(key)
    if not v:
        return "-", None
    m = statistics.median(v)
    return f"{m:8.1f} [{min(v):.0f}-{max(v):.0f}]", m

print(f"\nAoE frame path, {sys.argv[2]} interleaved rounds, median [min-max]; page cache, no flush")
print(f"{'MTU':>5} {'row':<14} {'vblade -b 64':>22} {'twinblade':>22} {'ceiling (no I/O)':>22} {'tb/ceil':>8} {'tb/vblade':>9}")
for mtu in sorted({k[0] for k in rows}, reverse=True):
    for row, sub, unit in [("write-q16", "v", "MB/s"), ("read-q16", "v", "MB/s"), ("write-q64", "v", "MB/s"),
                           ("read-q64", "v", "MB/s"), ("lat-q1", "p50", "us"), ("lat-q1", "p99", "us"),
                           ("cpu_s_per_gb", "v", "s/GB"), ("switches_per_kframe", "v", "")]:
        cells = [cell((mtu, row, t, sub)) for t in ("vblade", "twinblade", "ceiling")]
        label = f"{row if sub == 'v' else row + ' ' + sub} {unit}"
        ratios = ["", ""]
        if cells[1][1] and cells[2][1] and cells[0][1]:
            ratios = [f"{cells[1][1] / cells[2][1]:.2f}", f"{cells[1][1] / cells[0][1]:.2f}"]
        print(f"{mtu:>5} {label:<22} {cells[0][0]:>22} {cells[1][0]:>22} {cells[2][0]:>22} {ratios[0]:>8} {ratios[1]:>9}")
    rts = {t: sum(sum(rows.get((mtu, r, t, "rt"), [])) for r in ("write-q16", "read-q16", "write-q64", "read-q64")) for t in ("vblade", "twinblade", "ceiling")}
    print(f"{mtu:>5} retransmits (all rounds): {rts}")
print("(for latency and CPU rows, lower is better: a ratio below 1 is a win)")
PY
