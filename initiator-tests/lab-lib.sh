# shellcheck shell=bash
# The namespace lab of the replicated-pair tests (sourced, not run): replication.sh, resync.sh,
# power-cut.sh and chaos.sh use all of it; bench-repl.sh only the network (net_up, net_down) and
# log, fail, ctl, wait_for and aoe.
#
# Two storage namespaces ${P}-a (alpha, .1) and ${P}-b (beta, .2) and a client namespace ${P}-c
# (.10) with the project's AoE initiator, on bridge ${P}br0 through veths ${P}v1..3, subnet
# 192.168.${NET}.0/24, MTU ${MTU:-1500}; the daemons' configuration, logs, sockets and disks in
# $work, and a model file $model of what the device must hold (for the model tests).
#
# The caller sets P (namespace prefix), NET (third octet), TAG (log prefix), BLADE (e.g. e8.3),
# optionally MTU, SECRET (default pair-secret), DURABILITY (default node), EXTRA_RESOURCE (more
# lines for [resource.r0]) and POWER_CUT=1 (daemons behind the volatile write cache: kill -9 or
# `fault RES power-cut` is a power cut); sources this file; calls lab_up; writes the
# configuration with write_config (a script may redefine resource_options, or node_config to
# give each node its own file); creates the meta-data with create_md; then uses pair_up, start,
# stop, ctl, field, wait_for, in_sync, settled and aoe. The model tests (power-cut.sh, chaos.sh)
# parse their arguments with model_args, set up with model_lab_up and use the model helpers.
# Daemons run with TWINBLADE_TEST_FAULTS=1, so `twinblade fault` works. `--keep` (the script's
# first argument, or anywhere for model_args) leaves the namespaces and $work in place; after a
# failure $work stays too.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keep=${keep:-0}
[[ ${1:-} == --keep ]] && keep=1
bin=$repo/target/release
tb=$bin/twinblade
init=$bin/aoe-init
pids=()
declare -A pid

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

# --- the lab ------------------------------------------------------------------------------------
net_down() {
    local ns i
    for ns in "$P-a" "$P-b" "$P-c"; do ip netns del "$ns" 2>/dev/null || true; done
    # A deleted namespace's veth pairs go away asynchronously: delete our ends now.
    for i in 1 2 3; do ip link del "${P}v$i" 2>/dev/null || true; done
    ip link del "${P}br0" 2>/dev/null || true
}
net_up() { # the namespaces and the bridge, afresh
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
}
cleanup() {
    local rc=$? p
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    ((keep)) || net_down
    if ((keep || rc != 0)); then
        log "logs and images kept in $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
lab_up() { # builds the binaries if missing; a fresh $work (cleaned up at exit) and net_up
    [[ -x $tb && -x $init ]] || (cd "$repo" && cargo build --release --workspace --quiet)
    work=$(mktemp -d "/tmp/tb-$TAG.XXXXXX")
    cfg=$work/pair.toml
    model=$work/model.img
    trap cleanup EXIT
    net_up
}

# write_config [FILE [SECRET]]: the pair's configuration (default $cfg, $SECRET): alpha's disk
# $work/alpha.img with internal meta-data, beta's $work/beta.img with external $work/beta.md.
# shellcheck disable=SC2120 # both arguments are optional
write_config() {
    cat >"${1:-$cfg}" <<EOF
[cluster]
shared-secret = "${2:-${SECRET:-pair-secret}}"
$(cluster_options)
[node.alpha]
address = "$(replication_address alpha)"
interface = "eth0"
$(node_options alpha)
[node.beta]
address = "$(replication_address beta)"
interface = "eth0"
$(node_options beta)
[resource.r0]
aoe = "$BLADE"
$(resource_options)
[resource.r0.on.alpha]
disk = "$work/alpha.img"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "$work/beta.img"
meta-disk = "$work/beta.md"
EOF
}
# The pieces of write_config a script may redefine: more [cluster] lines, a node's replication
# address, more lines of its [node.NODE], and the lines of [resource.r0] after aoe.
cluster_options() { :; }
replication_address() { [[ $1 == alpha ]] && echo "192.168.$NET.1" || echo "192.168.$NET.2"; }
node_options() { :; }
resource_options() {
    cat <<EOF
port = 7788
protocol = "C"
durability = "${DURABILITY:-node}"
dead-time = 2
timeout = 1
ko-count = 3
wfc-timeout = 0
degr-wfc-timeout = 3
${EXTRA_RESOURCE:-}
EOF
}
node_config() { echo "$cfg"; } # NODE: its configuration file (a script may redefine this)

# create_md ALPHA-BYTES [BETA-EXTRA]: alpha's disk of ALPHA-BYTES (internal meta-data takes its
# tail; a script may write data into it first), beta's of its usable size plus BETA-EXTRA bytes
# with 1 MiB of external meta-data, create-md on both; sets $usable. The device starts as zeros:
# so does $model.
create_md() {
    truncate -s "$1" "$work/alpha.img"
    usable=$("$tb" create-md --config "$(node_config alpha)" --node alpha r0 |
        sed -n 's/^usable size: \([0-9]*\) bytes.*/\1/p')
    [[ -n $usable ]] || fail "create-md did not report the usable size"
    truncate -s $((usable + ${2:-0})) "$work/beta.img"
    truncate -s $((1 << 20)) "$work/beta.md"
    "$tb" create-md --config "$(node_config beta)" --node beta r0 >/dev/null
    truncate -s "$usable" "$model"
}

# --- the daemons ----------------------------------------------------------------------------
ns_of() { [[ $1 == alpha ]] && echo "$P-a" || echo "$P-b"; }
start() { # NODE
    local n=$1 _
    rm -f "$work/$n.sock"
    env TWINBLADE_TEST_FAULTS=1 ${POWER_CUT:+TWINBLADE_TEST_POWER_CUT=1} ip netns exec "$(ns_of "$n")" \
        "$tb" run --config "$(node_config "$n")" --node "$n" --control "$work/$n.sock" \
        >>"$work/$n.log" 2>&1 &
    pid[$n]=$!
    pids+=("$!")
    for _ in $(seq 50); do [[ -S $work/$n.sock ]] && return 0; sleep 0.1; done
    fail "$n did not open its control socket"
}
stop() { # NODE: SIGTERM, a clean stop
    kill -TERM "${pid[$1]}"
    wait "${pid[$1]}" || true
    rm -f "$work/$1.sock"
}
pair_up() { # start both, wait for their connection, `primary --force` on alpha
    start alpha
    start beta
    wait_for 15 "connection" state_is alpha connection Connected
    ctl alpha primary r0 --force >/dev/null || fail "primary --force refused"
}
ctl() { # NODE VERB...
    local n=$1
    shift
    "$tb" "$1" --control "$work/$n.sock" "${@:2}"
}
field() { # NODE KEY: the first value of KEY in status --json
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
    for _ in $(seq $((secs * 20))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    log "$(states alpha)"
    log "$(states beta)"
    fail "timed out after ${secs}s waiting for: $what"
}
state_is() { [[ $(field "$1" "$2") == "$3" ]]; } # NODE KEY VALUE
peer_role_is() { # NODE ROLE: the peer's role as NODE sees it
    [[ $(ctl "$1" status r0 --json | sed -n 's/.*"peer":{[^}]*"role":"\([A-Za-z]*\)".*/\1/p') == "$2" ]]
}
running() { kill -0 "${pid[$1]}" 2>/dev/null; } # NODE
in_sync() { # both UpToDate and connected
    state_is alpha disk UpToDate && state_is beta disk UpToDate &&
        state_is alpha replication Established && state_is beta replication Established
}
settled() { # both running and in sync, nothing out of sync
    running alpha && running beta && in_sync &&
        state_is alpha out-of-sync 0 && state_is beta out-of-sync 0
}
aoe() { ip netns exec "$P-c" "$init" -i eth0 "$@"; }
answering() { aoe discover --wait-ms 700 2>/dev/null | grep -c "${BLADE//./\\.}" || true; }

# --- the model tests --------------------------------------------------------------------------
# model_args [--NAME...] -- ARGS...: the model tests' arguments: --keep, --seed N (sets $seed, a
# non-negative integer; by default from the clock), --NAME VALUE for each --NAME given before
# the -- (sets $NAME), -h/--help (prints the script's header comment).
model_args() {
    local opts=(--seed) o
    while [[ $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    keep=0
    seed=$(($(date +%s) % 100000))
    while (($#)); do
        case $1 in
        --keep) keep=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            for o in "${opts[@]}"; do [[ $1 == "$o" ]] && break; done
            [[ $1 == "$o" ]] || { echo "${0##*/}: unknown argument: $1" >&2; exit 2; }
            printf -v "${o#--}" %s "${2:?$1 needs a value}"
            shift
            ;;
        esac
        shift
    done
    [[ $seed =~ ^[0-9]+$ ]] || {
        echo "${0##*/}: --seed wants a non-negative integer, got '$seed'" >&2
        exit 2
    }
}
model_lab_up() { # lab_up, write_config, create_md of 64 MiB, pair_up and the initial sync
    lab_up
    write_config
    create_md $((64 << 20))
    pair_up
    wait_for 30 "initial sync" settled
}
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
    # shellcheck disable=SC2034 # for the caller
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
