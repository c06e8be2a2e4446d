#!/usr/bin/env bash
# Replication benchmark (issue 7): in one run on one lab, with the same initiator (aoe-init) on
# the same fully written backing file:
#
#   vblade -b 64 | twinblade vblade (standalone) | twinblade pair, protocol C, durability node |
#   the same pair at durability power | raw TCP between the two storage nodes (tcp-bench)
#
# Rows: write MiB/s at 16 and 64 outstanding, read MiB/s at 16 and 64, p50/p99 write latency at
# 1 outstanding, CPU seconds per GB of the target processes (both nodes summed for the pair).
# Each round also times a full sync of a mostly-zero device and of random data. Then, once: bytes
# moved and time of the resync after an outage in which N MiB were written (secondary stopped),
# and the same after the primary also crashed (plus its hot activity-log extents). Ends with one
# summary table: figure, value, goal, ratio, verdict (ok / SHORT / info), short rows included,
# and notes on where each shortfall comes from.
#
# Usage: initiator-tests/bench-repl.sh [--quick] [--rounds N] [--mtu 9000] [--size-mib 256]
#            [--power-mib 8] [--dev-mib 1024] [--outage-mib 64] [--no-build]
#
#   --quick       smoke run (about 2 minutes): 1 round, 64 MiB rows, a 256 MiB device
#   --rounds      interleaved rounds (full syncs, raw TCP, vblade, standalone, pair node, pair
#                 power; again)
#   --mtu         MTU of the client-facing bridge (AoE frames); the replication link uses 9000
#   --size-mib    bytes per throughput row (durability node and the single-node targets)
#   --power-mib   bytes per throughput row at durability power (a flush per write on each node
#                 costs milliseconds on this machine's disk, so these rows are kept short)
#   --dev-mib     backing file size (the device for the full-sync rows; 1024 = the issue's 1 GiB)
#   --outage-mib  N, the MiB written while the secondary is down
#
# Topology: namespaces tbq-a (alpha) and tbq-b (beta) each have eth0 on the client-facing
# bridge tbqbr0 (MTU --mtu) and eth1 on a direct veth between them (the replication link,
# 192.168.79.1/.2, MTU 9000); the client namespace tbq-c has eth0 on tbqbr0. Nothing else uses
# these names. Backing files are plain buffered files under /var/tmp/twinblade-bench-repl, fully
# written first (alpha.img, beta.img random; zero.img mostly zeros, alpha's disk for the
# mostly-zero sync); alpha.img serves vblade and standalone twinblade too.
# Durability of the single-node targets: page cache (no -d/-s, no flush), like bench-aoe.sh.
# The figures drift on a shared machine: only the ratios within one run mean much.
set -euo pipefail

P=tbq NET=78 TAG=bench-repl
# shellcheck source=initiator-tests/lab-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab-lib.sh"
rounds=3 mtu=9000 size_mib=256 power_mib=8 dev_mib=1024 outage_mib=64 build=1
for a in "$@"; do
    [[ $a == --quick ]] && rounds=1 size_mib=64 power_mib=4 dev_mib=256 outage_mib=32
done
while (($#)); do
    case $1 in
    --quick) ;;
    --rounds) rounds=$2; shift ;;
    --mtu) mtu=$2; shift ;;
    --size-mib) size_mib=$2; shift ;;
    --power-mib) power_mib=$2; shift ;;
    --dev-mib) dev_mib=$2; shift ;;
    --outage-mib) outage_mib=$2; shift ;;
    --no-build) build=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-repl.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
((size_mib * 2 <= dev_mib && outage_mib * 4 <= dev_mib)) ||
    { echo "bench-repl.sh: --dev-mib must be at least 2 x --size-mib and 4 x --outage-mib" >&2; exit 2; }
((EUID == 0)) || { echo "bench-repl.sh: needs root (network namespaces)" >&2; exit 1; }
command -v vblade >/dev/null || { echo "bench-repl.sh: vblade is not installed (apt-get install vblade)" >&2; exit 1; }

cd "$repo"
if ((build)); then
    cargo build --release --workspace --quiet
fi
work=/var/tmp/twinblade-bench-repl
bin=$work/bin
mkdir -p "$bin"
# Private copies: a build running elsewhere in this checkout must not swap binaries mid-run.
for b in twinblade aoe-init tcp-bench; do
    [[ -x $repo/target/release/$b ]] || { echo "bench-repl.sh: target/release/$b missing (cargo build --release --workspace)" >&2; exit 1; }
    cp "$repo/target/release/$b" "$bin/"
done
tb=$bin/twinblade
init=$bin/aoe-init
results=$work/results.txt
: >"$results"
rm -f "$work"/*.log "$work"/*.sock
load() { cut -d' ' -f1-3 /proc/loadavg; }
record() { echo "$*" >>"$results"; } # round=R target=T row=ROW value=V ...

teardown() {
    local p
    for p in "${pid[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pid[@]}"; do
        for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    pid=()
    for ns in tbq-a tbq-b tbq-c; do
        # Whatever an earlier run killed with SIGKILL left in our namespaces.
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    done
    net_down
    ip link del tbqr-a 2>/dev/null || true
    # The backing files are written afresh by every run; logs and results.txt stay.
    if [[ -n ${work:-} ]]; then rm -f "$work/alpha.img" "$work/beta.img" "$work/zero.img"; fi
}
trap teardown EXIT
trap 'exit 130' INT TERM

# --- the lab ---------------------------------------------------------------------------------
teardown
MTU=$mtu net_up
ip link add tbqr-a type veth peer name tbqr-b
ip link set tbqr-a netns tbq-a
ip link set tbqr-b netns tbq-b
for n in a b; do
    ip -n "tbq-$n" link set "tbqr-$n" name eth1
    ip -n "tbq-$n" link set eth1 mtu 9000 up
done
ip -n tbq-a addr add 192.168.79.1/24 dev eth1
ip -n tbq-b addr add 192.168.79.2/24 dev eth1

frame=$((((mtu - 36) / 512) * 512)) # AoE payload per frame = one replicated write
dev_bytes=$((dev_mib << 20))
log "$(nproc) CPUs, load average at start: $(load); commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src initiator-tests || echo ' (with local changes)'); MTU $mtu (AoE frame $frame bytes), $rounds round(s)"

# --- processes -------------------------------------------------------------------------------
halt() { # NAME: SIGTERM, then SIGKILL after 10 s
    local p=${pid[$1]:-}
    [[ -n $p ]] || return 0
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    unset "pid[$1]"
}
crash() { # NAME: SIGKILL
    local p=${pid[$1]}
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    unset "pid[$1]"
}
wait_blade() { # NAME
    for _ in $(seq 50); do
        aoe discover --wait-ms 100 2>/dev/null | grep -q 'target=e0\.3 ' && return 0
    done
    fail "$1 did not answer e0.3"
}
start_single() { # vblade | standalone
    case $1 in
    vblade) ip netns exec tbq-a vblade -b 64 0 3 eth0 "$work/alpha.img" >"$work/vblade.log" 2>&1 & ;;
    standalone) ip netns exec tbq-a "$tb" vblade 0 3 eth0 "$work/alpha.img" >"$work/standalone.log" 2>&1 & ;;
    esac
    pid[$1]=$!
    wait_blade "$1"
}

cfg=$work/pair.toml
bench_config() { # DURABILITY [ALPHA-DISK]
    cat >"$cfg" <<EOF
[cluster]
shared-secret = "bench-only"
[node.alpha]
address = "192.168.79.1"
interface = "eth0"
[node.beta]
address = "192.168.79.2"
interface = "eth0"
[resource.r0]
aoe = "e0.3"
port = 7788
protocol = "C"
durability = "$1"
preferred-primary = "alpha"
dead-time = 3
timeout = 2
ko-count = 5
degr-wfc-timeout = 10
[resource.r0.on.alpha]
disk = "${2:-$work/alpha.img}"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "$work/beta.img"
meta-disk = "internal"
EOF
}
start_node() { # NODE
    local n=$1 ns
    ns=$([[ $n == alpha ]] && echo tbq-a || echo tbq-b)
    rm -f "$work/$n.sock"
    echo "=== $(date -Is) start" >>"$work/$n.log"
    ip netns exec "$ns" "$tb" run --config "$cfg" --node "$n" --control "$work/$n.sock" >>"$work/$n.log" 2>&1 &
    pid[$n]=$!
    for _ in $(seq 100); do [[ -S $work/$n.sock ]] && return 0; sleep 0.1; done
    fail "$n did not open its control socket"
}
json() { ctl "$1" status r0 --json 2>/dev/null || true; }
jfield() { # JSON KEY: a top-level or peer value from status --json
    tr ',{}' '\n\n\n' <<<"$1" | sed -n "s/^\"$2\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -1
}
pair_ready() { # both UpToDate, replication established, alpha Primary and serving (one status call)
    local a
    a=$(json alpha)
    [[ $(jfield "$a" disk) == UpToDate && $(jfield "$a" peer-disk) == UpToDate &&
        $(jfield "$a" replication) == Established && $(jfield "$a" role) == Primary &&
        $(jfield "$a" serving) == true ]]
}
resync_log_secs() { # the daemon's own account of its last resync: "resync started" to "finished"
    python3 - "$work/alpha.log" <<'PY'
import sys, datetime
start = end = None
for line in open(sys.argv[1], errors="replace"):
    if "resync started" in line or "resync finished (source)" in line:
        try:
            t = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
        except ValueError:
            continue
        if "resync started" in line:
            start, end = t, None
        else:
            end = t
print(f"{(end - start).total_seconds():.2f}" if start and end else "n/a")
PY
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
start_pair() { # DURABILITY
    bench_config "$1"
    start_node alpha
    start_node beta
    wait_for 60 "the pair connected, UpToDate, alpha Primary" pair_ready
    wait_blade "pair"
}
stop_pair() { # the secondary first, as the lab does
    halt beta
    halt alpha
}
resync_counters() { # NODE: sent same zero (bytes, or n/a when status --json lacks the field)
    json "$1" | python3 -c '
import json, sys
try:
    d = json.loads(sys.stdin.readline())
except Exception:
    d = {}
found = {}
def walk(o, path):
    if isinstance(o, dict):
        for k, v in o.items():
            full = (path + "_" if path else "") + k.replace("-", "_")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                for x in ("sent", "same", "zero"):
                    for suffix in ("resync_" + x, "resync_" + x + "_bytes"):
                        if full.endswith(suffix):
                            found.setdefault(x, int(v))
            walk(v, full)
    elif isinstance(o, list):
        for v in o:
            walk(v, path)
walk(d, "")
print(" ".join(str(found.get(x, "n/a")) for x in ("sent", "same", "zero")))'
}
md_field() { # NODE KEY: from dump-md (the node must not be running)
    "$tb" dump-md --config "$cfg" --node "$1" r0 2>/dev/null | sed -n "s/^$2: //p" | head -1
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
cpu_of() { # TARGET: summed ticks of its processes
    local t=0 p
    for p in $(pids_of "$1"); do t=$((t + $(cpu_ticks "$p"))); done
    echo "$t"
}
pids_of() { case $1 in pair-*) echo "${pid[alpha]} ${pid[beta]}" ;; *) echo "${pid[$1]}" ;; esac; }
kv() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; } # KEY LINE: a value of a key=value line
hz=$(getconf CLK_TCK)
cpu_per_gb() { awk -v t="$1" -v hz="$hz" -v b="$2" 'BEGIN { printf "%.3f", t / hz / (b / 1e9) }'; }

# --- backing files: fully written ----------------------------------------------------------------
# alpha.img and beta.img: different random data. zero.img: alpha's disk for the mostly-zero full
# sync, zeros (written, not sparse) except the first 1/128 random.
for n in alpha beta; do
    log "writing $work/$n.img: $dev_mib MiB of random data"
    head -c "$dev_bytes" /dev/urandom >"$work/$n.img"
done
log "writing $work/zero.img: $dev_mib MiB of zeros, the first 1/128 random"
head -c "$dev_bytes" /dev/zero >"$work/zero.img"
head -c $((dev_bytes / 128)) /dev/urandom | dd of="$work/zero.img" conv=notrunc status=none
sync "$work/alpha.img" "$work/beta.img" "$work/zero.img" # no writeback competing with what is measured
bench_config node
usable=$("$tb" create-md --force --config "$cfg" --node alpha r0 2>/dev/null | sed -n 's/^usable size: \([0-9]*\) bytes.*/\1/p')
"$tb" create-md --force --config "$cfg" --node beta r0 >/dev/null 2>&1 || fail "create-md on beta failed"
[[ -n $usable ]] || fail "create-md did not report the usable size"
same_data() { cmp -s -n "$usable" "${1:-$work/alpha.img}" "$work/beta.img"; } # [ALPHA-DISK]

full_sync() { # KIND ROUND: fresh meta-data on both, primary --force on alpha, time to both UpToDate
    local kind=$1 round=$2 disk=$work/alpha.img t0 secs c
    [[ $kind == zero ]] && disk=$work/zero.img
    bench_config node "$disk"
    "$tb" create-md --force --config "$cfg" --node alpha r0 >/dev/null 2>&1 || fail "create-md on alpha failed"
    "$tb" create-md --force --config "$cfg" --node beta r0 >/dev/null 2>&1 || fail "create-md on beta failed"
    start_node alpha
    start_node beta
    wait_for 30 "alpha connected" eval '[[ $(jfield "$(json alpha)" connection) == Connected ]]'
    t0=$(now)
    ctl alpha primary r0 --force >/dev/null || fail "primary --force refused"
    wait_for 600 "the full sync ($kind)" pair_ready
    secs=$(since "$t0")
    c=$(resync_counters alpha)
    read -r sent same zero <<<"$c"
    record "round=$round target=sync row=full_$kind bytes=$usable seconds=$secs copy_seconds=$(resync_log_secs) sent=$sent same=$same zero=$zero identical=$(same_data "$disk" && echo yes || echo no)"
    log "full sync of $kind data: $usable bytes in ${secs}s (resync sent/same/zero: $c)"
    stop_pair
}

# --- 1. interleaved rounds -----------------------------------------------------------------------
ip netns exec tbq-b "$bin/tcp-bench" serve 192.168.79.2:7799 >"$work/tcp.log" 2>&1 &
pid[tcp]=$!
for _ in $(seq 50); do grep -q serving "$work/tcp.log" && break; sleep 0.1; done
tcp() { ip netns exec tbq-a "$bin/tcp-bench" "$1" 192.168.79.2:7799 "${@:2}"; }
size_bytes=$((size_mib << 20))
power_bytes=$((power_mib << 20))
for round in $(seq "$rounds"); do
    log "round $round/$rounds, load average $(load)"
    # Beta holds other data each time: alpha.img's after the rounds' pair rows, zero.img's after
    # the mostly-zero sync. The random sync is also the pair's initial sync for this round.
    full_sync zero "$round"
    full_sync random "$round"
    line=$(tcp stream --msg 256K --bytes $((size_bytes * 4)))
    record "round=$round target=tcp row=stream-256k value=$(kv mb_s "$line")"
    line=$(tcp stream --msg "$frame" --bytes "$size_bytes")
    record "round=$round target=tcp row=stream-frame value=$(kv mb_s "$line")"
    for q in 16 64; do
        line=$(tcp rr --msg "$frame" --window "$q" --count $((size_bytes / frame)))
        record "round=$round target=tcp row=rr-frame-q$q value=$(kv mb_s "$line")"
    done
    line=$(tcp rr --msg "$frame" --window 1 --count 3000)
    record "round=$round target=tcp row=rr-frame-q1 p50_us=$(kv p50_us "$line") p99_us=$(kv p99_us "$line")"
    for target in vblade standalone pair-node pair-power; do
        bytes=$size_bytes lat_bytes=$((16 << 20))
        case $target in
        pair-node) start_pair node ;;
        pair-power) start_pair power; bytes=$power_bytes lat_bytes=$((power_bytes / 2)) ;;
        *) start_single "$target" ;;
        esac
        aoe read e0.3 -q 16 --bytes "$bytes" >/dev/null # warm the path
        for op in write read; do
            t0=$(cpu_of "$target")
            for q in 16 64; do
                line=$(aoe "$op" e0.3 -q "$q" --bytes "$bytes" --seed "$round")
                record "round=$round target=$target row=$op-q$q value=$(kv mb_s "$line") retransmits=$(kv retransmits "$line")"
            done
            record "round=$round target=$target row=cpu-$op value=$(cpu_per_gb $(($(cpu_of "$target") - t0)) $((2 * bytes)))"
        done
        line=$(aoe write e0.3 -q 1 --bytes "$lat_bytes" --latency --seed "$round")
        record "round=$round target=$target row=lat-q1 p50_us=$(kv p50_us "$line") p99_us=$(kv p99_us "$line")"
        case $target in
        pair-*) stop_pair ;;
        *) halt "$target" ;;
        esac
    done
done
halt tcp

# --- 2. resync after an outage --------------------------------------------------------------------
# The pair at durability node; the secondary is stopped, N MiB are written through AoE at
# 16 outstanding (away from the blocks the rounds wrote), the secondary returns.
outage() { # KIND: stop (secondary stopped) | crash (and then the primary killed -9 too)
    local kind=$1 off t0 secs oos c al seed
    off=$(((dev_mib / 2) << 20))
    seed=$([[ $kind == stop ]] && echo 71 || echo 72)
    start_pair node
    halt beta
    wait_for 20 "alpha noticed beta left" eval '[[ $(jfield "$(json alpha)" connection) != Connected ]]'
    aoe write e0.3 -q 16 --offset "$off" --bytes "${outage_mib}M" --seed "$seed" >/dev/null || fail "writes during the outage failed"
    oos=$(jfield "$(json alpha)" out-of-sync)
    al=0
    if [[ $kind == crash ]]; then
        crash alpha
        al=$(md_field alpha al-state | sed -n 's/^dirty: \([0-9]*\) extents.*/\1/p')
        al=${al:-n/a}
        local after
        after=$(md_field alpha out-of-sync-after-attach | sed -n 's/^\([0-9]*\) bytes.*/\1/p')
        log "alpha killed -9 after the outage: AL dirty extents $al, out-of-sync after attach ${after:-?} bytes"
        oos=${after:-$oos}
        start_node alpha
    fi
    c0=$(resync_counters alpha)
    t0=$(now)
    start_node beta
    wait_for 300 "resync after the outage ($kind)" pair_ready
    secs=$(since "$t0")
    c=$(resync_counters alpha)
    read -r s0 m0 z0 <<<"$c0"
    read -r sent same zero <<<"$c"
    # Counters may be cumulative (take the difference) or per resync (a smaller value after).
    [[ $s0 =~ ^[0-9]+$ && $sent =~ ^[0-9]+$ ]] && ((sent >= s0)) && sent=$((sent - s0))
    [[ $m0 =~ ^[0-9]+$ && $same =~ ^[0-9]+$ ]] && ((same >= m0)) && same=$((same - m0))
    [[ $z0 =~ ^[0-9]+$ && $zero =~ ^[0-9]+$ ]] && ((zero >= z0)) && zero=$((zero - z0))
    aoe read e0.3 -q 16 --offset "$off" --bytes "${outage_mib}M" --seed "$seed" --verify >/dev/null || fail "the outage's writes do not read back"
    record "round=0 target=resync row=outage_$kind written=$((outage_mib << 20)) oos=$oos al_extents=$al seconds=$secs copy_seconds=$(resync_log_secs) sent=$sent same=$same zero=$zero identical=$(same_data && echo yes || echo no)"
    log "outage ($kind): $outage_mib MiB written, out-of-sync at reconnect $oos bytes, resync ${secs}s (sent/same/zero: $sent $same $zero)"
    stop_pair
}
outage stop
outage crash

# --- report ----------------------------------------------------------------------------------------
log "load average at end: $(load)"
python3 - "$results" "$rounds" "$mtu" "$frame" "$size_mib" "$power_mib" "$dev_mib" "$outage_mib" <<'PY'
import sys, statistics, collections
path, rounds, mtu, frame, size_mib, power_mib, dev_mib, outage_mib = sys.argv[1:]
rows = collections.defaultdict(list)
single = {}
syncs = collections.defaultdict(list)
for line in open(path):
    kv = dict(p.split("=", 1) for p in line.split())
    if kv["target"] == "sync":
        syncs[kv["row"]].append(kv)
        continue
    if kv["round"] == "0":
        single[kv["row"]] = kv
        continue
    key = (kv["target"], kv["row"])
    for k in ("value", "p50_us", "p99_us"):
        if k in kv and kv[k] not in ("", "n/a"):
            rows[key + (k,)].append(float(kv[k]))
    if "retransmits" in kv:
        rows[key + ("rt",)].append(int(kv["retransmits"] or 0))

def med(t, r, k="value"):
    v = rows.get((t, r, k))
    return statistics.median(v) if v else None

def cell(t, r, k="value"):
    v = rows.get((t, r, k))
    if not v:
        return "-"
    return f"{statistics.median(v):.1f} [{min(v):.0f}-{max(v):.0f}]"

targets = ["vblade", "standalone", "pair-node", "pair-power"]
print(f"\nReplication benchmark, MTU {mtu} (AoE frame {frame} B), {rounds} interleaved round(s), median [min-max]")
print(f"rows of {size_mib} MiB ({power_mib} MiB at durability power); single-node targets: page cache, no flush")
print(f"{'row':<18}" + "".join(f"{t:>22}" for t in ["vblade -b 64", "tb standalone", "pair C node", "pair C power"]))
for r, k, label in [("write-q16", "value", "write q16 MB/s"), ("write-q64", "value", "write q64 MB/s"),
                    ("read-q16", "value", "read q16 MB/s"), ("read-q64", "value", "read q64 MB/s"),
                    ("lat-q1", "p50_us", "write q1 p50 us"), ("lat-q1", "p99_us", "write q1 p99 us"),
                    ("cpu-write", "value", "CPU s/GB written"), ("cpu-read", "value", "CPU s/GB read")]:
    print(f"{label:<18}" + "".join(f"{cell(t, r, k):>22}" for t in targets))
rts = {t: sum(sum(rows.get((t, r, "rt"), [])) for r in ("write-q16", "write-q64", "read-q16", "read-q64")) for t in targets}
print(f"retransmits (all rounds): {rts}")
print(f"raw TCP alpha->beta, one stream: 256 KiB writes {cell('tcp', 'stream-256k')} MB/s; {frame} B writes {cell('tcp', 'stream-frame')} MB/s;")
print(f"  {frame} B messages each acked (protocol C's shape): window 16 {cell('tcp', 'rr-frame-q16')} MB/s, window 64 {cell('tcp', 'rr-frame-q64')} MB/s,"
      f" window 1 p50 {cell('tcp', 'rr-frame-q1', 'p50_us')} us p99 {cell('tcp', 'rr-frame-q1', 'p99_us')} us")

# Summary: figure, value, goal, ratio, verdict.
summary = []
def row(figure, value, goal, ratio, verdict):
    summary.append((figure, value, goal, ratio, verdict))
def fmt(x, unit=""):
    return "n/a" if x is None else f"{x:.1f}{unit}"
tcp = med("tcp", "stream-256k")
for q in (16, 64):
    sa, rep, pw = med("standalone", f"write-q{q}"), med("pair-node", f"write-q{q}"), med("pair-power", f"write-q{q}")
    base = min(x for x in (sa, tcp) if x is not None) if (sa or tcp) else None
    goal = 0.8 * base if base else None
    ratio = rep / base if rep and base else None
    row(f"replicated write q{q} (C, node)", fmt(rep, " MB/s"), f">= {fmt(goal)} (0.8 x min(standalone {fmt(sa)}, TCP {fmt(tcp)}))",
        "n/a" if ratio is None else f"{ratio:.2f}", "n/a" if ratio is None else ("ok" if ratio >= 0.8 else "SHORT"))
    ratio = pw / base if pw and base else None
    row(f"replicated write q{q} (C, power)", fmt(pw, " MB/s"), "info (a flush per write per node)",
        "n/a" if ratio is None else f"{ratio:.2f}", "info")
for q in (16, 64):
    sa, rep = med("standalone", f"read-q{q}"), med("pair-node", f"read-q{q}")
    row(f"replicated read q{q} (C, node)", fmt(rep, " MB/s"), f"info (standalone {fmt(sa)})",
        f"{rep / sa:.2f}" if rep and sa else "n/a", "info")
for k in ("p50_us", "p99_us"):
    sa, rep, pw = med("standalone", "lat-q1", k), med("pair-node", "lat-q1", k), med("pair-power", "lat-q1", k)
    ratio = rep / sa if rep and sa else None
    row(f"write latency q1 {k[:3]} (C, node)", fmt(rep, " us"), f"<= {fmt(2 * sa if sa else None)} (2 x standalone {fmt(sa)})",
        "n/a" if ratio is None else f"{ratio:.2f}", "n/a" if ratio is None else ("ok" if ratio <= 2 else "SHORT"))
    row(f"write latency q1 {k[:3]} (C, power)", fmt(pw, " us"), "info", f"{pw / sa:.2f}" if pw and sa else "n/a", "info")
sa = med("standalone", "cpu-write")
for t in ("vblade", "standalone", "pair-node", "pair-power"):
    v = med(t, "cpu-write")
    row(f"CPU s/GB written, {t}" + (" (both nodes)" if t.startswith("pair") else ""), fmt(v, " s"), "reported",
        f"{v / sa:.2f}" if v and sa else "n/a", "ok" if v is not None else "n/a")
row("raw TCP, 1 stream, 256 KiB writes", fmt(tcp, " MB/s"), "reference", "", "info")
row(f"raw TCP, {frame} B messages acked, window 16", fmt(med("tcp", "rr-frame-q16"), " MB/s"), "reference (protocol C's shape)", "", "info")
row(f"raw TCP, {frame} B messages acked, window 64", fmt(med("tcp", "rr-frame-q64"), " MB/s"), "reference (protocol C's shape)", "", "info")
row(f"raw TCP, {frame} B round trip p50 / p99", f"{fmt(med('tcp', 'rr-frame-q1', 'p50_us'))} / {fmt(med('tcp', 'rr-frame-q1', 'p99_us'))} us", "reference", "", "info")
mib = 1 << 20
def moved(kv):
    if kv.get("sent", "n/a") != "n/a":
        return int(kv["sent"]), "resync_sent"
    return int(kv["oos"]), "out-of-sync at reconnect"
def counters(kv):
    return f"sent {kv.get('sent', 'n/a')} same {kv.get('same', 'n/a')} zero {kv.get('zero', 'n/a')}"
for kind in ("stop", "crash"):
    kv = single.get(f"outage_{kind}")
    if not kv:
        row(f"resync after outage ({kind})", "n/a", "", "", "n/a")
        continue
    n = int(kv["written"])
    m, src = moved(kv)
    al = kv.get("al_extents", "0")
    extra = int(al) * 4 * mib if al.isdigit() and kind == "crash" else 0
    goal = 1.1 * n + extra
    what = "secondary stopped" if kind == "stop" else f"then primary killed -9, {al} hot AL extents"
    row(f"resync after outage: {n // mib} MiB written, {what}", f"{m / mib:.1f} MiB ({src})",
        f"<= {goal / mib:.1f} MiB (1.1 x N" + (" + AL extents x 4 MiB)" if kind == "crash" else ")"),
        f"{m / n:.2f} x N", "ok" if m <= goal else "SHORT")
    row(f"  resync time ({kind}), reconnect to UpToDate", f"{float(kv['seconds']):.2f} s (copy {kv.get('copy_seconds', 'n/a')} s)", counters(kv),
        f"{m / mib / max(float(kv['seconds']), 1e-9):.0f} MiB/s", "info")
    row(f"  data identical after ({kind})", kv["identical"], "yes", "", "ok" if kv["identical"] == "yes" else "SHORT")
def sync_summary(kind):
    """The rounds' full syncs of one kind: medians, spread, and whether every one ended identical."""
    runs = syncs.get(f"full_{kind}")
    if not runs:
        return None
    out = {"bytes": runs[0]["bytes"], "n": len(runs)}
    secs = [float(r["seconds"]) for r in runs]
    out["seconds"], out["smin"], out["smax"] = statistics.median(secs), min(secs), max(secs)
    for k in ("copy_seconds", "sent", "same", "zero"):
        v = [float(r[k]) for r in runs if r.get(k, "n/a") not in ("n/a", "")]
        out[k] = "n/a" if not v else (f"{statistics.median(v):.2f}" if k == "copy_seconds" else str(int(statistics.median(v))))
    ok = sum(1 for r in runs if r["identical"] == "yes")
    out["identical"] = "yes" if ok == len(runs) else f"no ({len(runs) - ok} of {len(runs)} differ)"
    return out

for kind in ("zero", "random"):
    kv = sync_summary(kind)
    if not kv:
        row(f"full sync ({kind})", "n/a", "", "", "n/a")
        continue
    b, s = int(kv["bytes"]), kv["seconds"]
    rate = b / s / 1e6
    spread = f"[{kv['smin']:.2f}-{kv['smax']:.2f}]"
    if kind == "zero":
        goal = 5.0 * b / (1 << 30)
        row(f"full sync, {b / mib:.0f} MiB mostly zero", f"{s:.2f} s {spread} (copy {kv['copy_seconds']} s)", f"<= {goal:.2f} s (5 s per GiB)",
            f"{s / goal:.2f}", "ok" if s <= goal else "SHORT")
    else:
        goal = 0.8 * tcp if tcp else None
        row(f"full sync, {b / mib:.0f} MiB random", f"{rate:.1f} MB/s ({s:.2f} s {spread}, copy {kv['copy_seconds']} s)", f">= {fmt(goal)} MB/s (0.8 x TCP)",
            f"{rate / tcp:.2f} x TCP" if tcp else "n/a", "n/a" if not goal else ("ok" if rate >= goal else "SHORT"))
    row(f"  full sync ({kind}) resync counters", counters(kv), "", "", "info")
    row(f"  data identical after full sync ({kind})", kv["identical"], "yes", "", "ok" if kv["identical"] == "yes" else "SHORT")

print("\nSummary (issue 7 goals)")
w = [max(len(r[i]) for r in summary + [("figure", "value", "goal", "ratio", "verdict")]) for i in range(5)]
print("  ".join(h.ljust(w[i]) for i, h in enumerate(("figure", "value", "goal", "ratio", "verdict"))))
for r in summary:
    print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
short = sum(1 for r in summary if r[4] == "SHORT")
print(f"{short} row(s) SHORT" if short else "every goal met")

# Where each shortfall comes from, as far as this run's own figures tell.
notes = []
for q in (16, 64):
    sa, rep, rr = med("standalone", f"write-q{q}"), med("pair-node", f"write-q{q}"), med("tcp", f"rr-frame-q{q}")
    if sa and rep and rep < 0.8 * min(x for x in (sa, tcp) if x):
        if rr:
            where = "the link's" if rr < 0.8 * sa else "the daemon's (the link carries more)"
            notes.append(f"write q{q}: the pair {rep:.0f} MB/s; raw TCP with {q} frame-sized messages in flight, each acked, {rr:.0f} MB/s "
                         f"({rep / rr:.0%} of it reached): the limit is {where}; CPU {fmt(med('pair-node', 'cpu-write'))} s/GB on both nodes "
                         f"against {fmt(med('standalone', 'cpu-write'))} standalone")
sa, rep, rtt = med("standalone", "lat-q1", "p50_us"), med("pair-node", "lat-q1", "p50_us"), med("tcp", "rr-frame-q1", "p50_us")
if sa and rep and rtt and rep > 2 * sa:
    notes.append(f"latency q1 p50: standalone {sa:.0f} us + one frame's TCP round trip {rtt:.0f} us = {sa + rtt:.0f} us; "
                 f"the pair {rep:.0f} us, so {rep - sa - rtt:.0f} us come from the replication path beyond the wire (hand-offs, the peer's write)")
for kind in ("zero", "random"):
    kv = sync_summary(kind)
    if not kv:
        continue
    b, secs = int(kv["bytes"]), kv["seconds"]
    if kind == "zero" and kv.get("zero", "n/a") == "n/a":
        notes.append(f"full sync, mostly zero ({secs:.2f} s): status --json has no resync zero counter, so zero blocks are presumably "
                     f"copied like any other; the time is then that of copying {b / mib:.0f} MiB")
    if kind == "random" and tcp and b / secs / 1e6 < 0.8 * tcp:
        copy = kv.get("copy_seconds", "n/a")
        copy_s = float(copy) if copy != "n/a" else secs
        notes.append(f"full sync, random: {secs:.2f} s wall of which the daemon logs {copy} s of copying "
                     f"({b / 1e6 / max(copy_s, 1e-9):.0f} MB/s while copying); raw TCP carries {tcp:.0f} MB/s in 256 KiB writes, "
                     f"so the copier (checksums per 1 MiB, then data; the rate controller's window) and the peer's single applier thread are the limit, not the wire")
p99 = rows.get(("standalone", "lat-q1", "p99_us"))
if p99 and max(p99) > 20 * (med("standalone", "lat-q1", "p50_us") or 1):
    notes.append(f"p99 at 1 outstanding: standalone p99 {max(p99):.0f} us at worst is scheduler noise (the load average above), "
                 f"so the p99 verdicts mean little in this run")
if notes:
    print("\nNotes")
    for n in notes:
        print(f"- {n}")
PY
