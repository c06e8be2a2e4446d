# Shared by power-cut.sh and chaos.sh (sourced, not run): a replicated pair of real
# `twinblade run` nodes in namespaces ${P}-a (alpha) and ${P}-b (beta), a client namespace ${P}-c
# with the project's AoE initiator, on bridge ${P}br0, subnet 192.168.${NET}.0/24; a model file
# of what the device must hold.
#
# The caller sets: P (namespace prefix), NET (third octet), TAG (log prefix), BLADE (e.g. e8.3),
# DURABILITY, optionally MTU (default 1500) and EXTRA_RESOURCE (more lines for [resource.r0]),
# and then calls pair_setup. alpha has internal meta-data, beta external.
# Daemons run with TWINBLADE_TEST_FAULTS=1 and TWINBLADE_TEST_POWER_CUT=1 (kill -9 = power cut).

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$repo/target/release
tb=$bin/twinblade
init=$bin/aoe-init
[[ -x $tb && -x $init ]] || (cd "$repo" && cargo build --release --workspace --quiet)

work=$(mktemp -d "/tmp/tb-$TAG.XXXXXX")
model=$work/model.img
pids=()
declare -A pid
keep=${keep:-0}

log() { printf '%s: %s\n' "$TAG" "$*" >&2; }
fail() {
    log "FAIL: $*"
    dump
    exit 1
}
dump() {
    for n in alpha beta; do
        echo "----- $n log (tail)" >&2
        tail -40 "$work/$n.log" >&2 || true
    done
}

net_down() {
    local ns
    for ns in "$P-a" "$P-b" "$P-c"; do ip netns del "$ns" 2>/dev/null || true; done
    # A deleted namespace's veth pairs go away asynchronously: delete our ends now.
    for i in 1 2 3; do ip link del "${P}v$i" 2>/dev/null || true; done
    ip link del "${P}br0" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    net_down
    if ((keep || rc != 0)); then
        log "logs and images kept in $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT

ns_of() { [[ $1 == alpha ]] && echo "$P-a" || echo "$P-b"; }

write_config() { # DURABILITY
    cat >"$work/pair.toml" <<EOF
[cluster]
shared-secret = "pair-secret"
[node.alpha]
address = "192.168.$NET.1"
interface = "eth0"
[node.beta]
address = "192.168.$NET.2"
interface = "eth0"
[resource.r0]
aoe = "$BLADE"
port = 7788
protocol = "C"
durability = "$1"
dead-time = 2
timeout = 1
ko-count = 3
wfc-timeout = 0
degr-wfc-timeout = 3
${EXTRA_RESOURCE:-}
[resource.r0.on.alpha]
disk = "$work/alpha.img"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "$work/beta.img"
meta-disk = "$work/beta.md"
EOF
}

pair_setup() {
    net_down
    ip link add "${P}br0" type bridge
    ip link set "${P}br0" mtu "${MTU:-1500}" up
    local i=1 ns addr
    for ns in "$P-a" "$P-b" "$P-c"; do
        ip netns add "$ns"
        ip link add "${P}v$i" type veth peer name eth0 netns "$ns"
        ip link set "${P}v$i" master "${P}br0" mtu "${MTU:-1500}" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 mtu "${MTU:-1500}" up
        addr=$([[ $ns == "$P-c" ]] && echo 10 || echo "$i")
        ip -n "$ns" addr add "192.168.$NET.$addr/24" dev eth0
        i=$((i + 1))
    done
    write_config "$DURABILITY"
    truncate -s $((64 << 20)) "$work/alpha.img"
    usable=$("$tb" create-md --config "$work/pair.toml" --node alpha r0 |
        sed -n 's/^usable size: \([0-9]*\) bytes.*/\1/p')
    [[ -n $usable ]] || fail "create-md did not report the usable size"
    truncate -s "$usable" "$work/beta.img"
    truncate -s $((1 << 20)) "$work/beta.md"
    "$tb" create-md --config "$work/pair.toml" --node beta r0 >/dev/null
    # The device starts as zeros: so does the model.
    truncate -s "$usable" "$model"
}

start() { # NODE
    local n=$1
    rm -f "$work/$n.sock"
    TWINBLADE_TEST_FAULTS=1 TWINBLADE_TEST_POWER_CUT=1 ip netns exec "$(ns_of "$n")" \
        "$tb" run --config "$work/pair.toml" --node "$n" --control "$work/$n.sock" \
        >>"$work/$n.log" 2>&1 &
    pid[$n]=$!
    pids+=("$!")
    local _
    for _ in $(seq 50); do [[ -S $work/$n.sock ]] && return 0; sleep 0.1; done
    fail "$n did not open its control socket"
}
ctl() { # NODE VERB...
    local n=$1
    shift
    "$tb" "$1" --control "$work/$n.sock" "${@:2}"
}
field() { # NODE KEY: a value from status --json
    ctl "$1" status r0 --json 2>/dev/null | tr ',{}' '\n\n\n' |
        sed -n "s/^\"$2\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -1
}
states() { # NODE: one line of the interesting fields
    local k out=""
    for k in role disk connection replication out-of-sync; do out+="$k=$(field "$1" "$k") "; done
    echo "$1: $out"
}
wait_for() { # SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local secs=$1 what=$2 _
    shift 2
    for _ in $(seq $((secs * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "$(states alpha)"
    log "$(states beta)"
    fail "timed out after ${secs}s waiting for: $what"
}
state_is() { [[ $(field "$1" "$2") == "$3" ]]; }
running() { kill -0 "${pid[$1]}" 2>/dev/null; }
in_sync() {
    running alpha && running beta &&
        state_is alpha disk UpToDate && state_is beta disk UpToDate &&
        state_is alpha replication Established && state_is beta replication Established &&
        state_is alpha out-of-sync 0 && state_is beta out-of-sync 0
}
aoe() { ip netns exec "$P-c" "$init" -i eth0 "$@"; }
answering() { aoe discover --wait-ms 700 2>/dev/null | grep -c "${BLADE//./\\.}" || true; }

# write_acked OFFSET BYTES SEED [aoe-init args...]: a write through AoE; once the initiator
# reports every frame acknowledged, the model gets it too.
write_acked() {
    local off=$1 bytes=$2 seed=$3
    shift 3
    aoe write "$BLADE" -q 16 --seed "$seed" --offset "$off" --bytes "$bytes" "$@" >/dev/null ||
        fail "write $bytes at $off (seed $seed) failed"
    "$init" model "$model" --seed "$seed" --offset "$off" --bytes "$bytes" >/dev/null
}
# device_matches_model: the whole device read through AoE equals the model.
device_matches_model() {
    rm -f "$work/device.img"
    aoe read "$BLADE" -q 16 --bytes "$usable" --out "$work/device.img" >/dev/null ||
        fail "reading the device through AoE failed"
    cmp "$model" "$work/device.img"
}
# disks_match_model: both backing files hold the model in their data area. A FLUSH through
# AoE first: the files behind the volatile cache hold only what was flushed (or written back).
disks_match_model() {
    local size
    aoe flush "$BLADE" >/dev/null || fail "FLUSH through AoE failed"
    size=$(field alpha size)
    [[ $size == "$usable" ]] || fail "alpha reports size $size, expected $usable"
    cmp -n "$usable" "$model" "$work/alpha.img" || return 1
    cmp -n "$usable" "$model" "$work/beta.img" || return 1
}
# writing_to NODE BYTES: NODE has served more than BYTES of writes (status io.written).
writing_to() { (($(field "$1" written) > $2)); }
# start_writer OFFSET BYTES SEED: a write through AoE in the background ($wpid), returning once
# it reaches the primary's disk (so a cut lands mid-write, not while the client looks for the
# blade); its output goes to $work/writer.log.
start_writer() {
    local prim w0
    prim=$(state_is alpha role Primary && echo alpha || echo beta)
    w0=$(field "$prim" written)
    aoe write "$BLADE" -q 16 --seed "$3" --offset "$1" --bytes "$2" >"$work/writer.log" 2>&1 &
    wpid=$!
    wait_for 10 "the client's writes reach $prim" writing_to "$prim" "$w0"
}

# power_cut NODE [SEED]: the node loses power (every cached sector lost, or a seeded subset
# kept); waits until the process is gone.
power_cut() {
    local n=$1
    if [[ -n ${2:-} ]]; then
        ctl "$n" fault r0 power-cut keep-subset "$2" >/dev/null || fail "power-cut $n refused"
    else
        ctl "$n" fault r0 power-cut >/dev/null || fail "power-cut $n refused"
    fi
    local rc=0
    wait "${pid[$n]}" || rc=$?
    ((rc == 134)) || fail "$n ended with $rc after the power cut (expected SIGABRT, 134)"
    grep "power cut:" "$work/$n.log" | tail -2 | sed "s/^.*power cut: /$TAG: $n power cut: /" >&2
}
