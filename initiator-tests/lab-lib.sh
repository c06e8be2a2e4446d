# Shared by replication.sh and resync.sh (sourced, not run): two storage namespaces ${P}-a
# (alpha, .1) and ${P}-b (beta, .2) and a client namespace ${P}-c (.10) on bridge ${P}br0 through
# veths ${P}v1..3, subnet 192.168.${NET}.0/24; the daemons' logs, sockets and disks in $work.
#
# The caller sets P, NET and TAG (log prefix), sources this file, calls lab_up, writes its
# configuration to $cfg (or defines node_config NODE to give each node its own file), creates the
# meta-data and then uses start/stop/ctl/field/wait_for/in_sync/aoe. Daemons run with
# TWINBLADE_TEST_FAULTS=1, so `twinblade fault` works. `--keep` as the script's first argument
# leaves the namespaces and $work in place.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keep=0
[[ ${1:-} == --keep ]] && keep=1
bin=$repo/target/release
tb=$bin/twinblade
init=$bin/aoe-init
[[ -x $tb && -x $init ]] || (cd "$repo" && cargo build --release --workspace --quiet)

work=$(mktemp -d "/tmp/tb-$TAG.XXXXXX")
cfg=$work/pair.toml
pids=()
declare -A pid
log() { printf '%s: %s\n' "$TAG" "$*" >&2; }
fail() { log "FAIL: $*"; dump; exit 1; }
dump() {
    for n in alpha beta; do
        echo "----- $n log (tail)" >&2; tail -30 "$work/$n.log" >&2 || true
    done
}

net_down() {
    for ns in "$P-a" "$P-b" "$P-c"; do ip netns del "$ns" 2>/dev/null || true; done
    ip link del "${P}br0" 2>/dev/null || true
    # A deleted namespace's veths go away asynchronously; do not race a quick rerun.
    for i in 1 2 3; do ip link del "${P}v$i" 2>/dev/null || true; done
}
cleanup() {
    local rc=$?
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    ((keep)) || { net_down; rm -rf "$work"; }
    exit "$rc"
}
trap cleanup EXIT

lab_up() {
    net_down
    ip link add "${P}br0" type bridge
    ip link set "${P}br0" up
    local i=1 ns addr
    for ns in "$P-a" "$P-b" "$P-c"; do
        ip netns add "$ns"
        ip link add "${P}v$i" type veth peer name eth0 netns "$ns"
        ip link set "${P}v$i" master "${P}br0" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        addr=$([[ $ns == "$P-c" ]] && echo 10 || echo "$i")
        ip -n "$ns" addr add "192.168.$NET.$addr/24" dev eth0
        i=$((i + 1))
    done
}

node_config() { echo "$cfg"; } # NODE: its configuration file (a script may redefine this)
start() { # NODE
    local n=$1 ns
    ns=$([[ $n == alpha ]] && echo "$P-a" || echo "$P-b")
    TWINBLADE_TEST_FAULTS=1 ip netns exec "$ns" "$tb" run --config "$(node_config "$n")" --node "$n" \
        --control "$work/$n.sock" >>"$work/$n.log" 2>&1 &
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
ctl() { # NODE VERB...
    local n=$1
    shift
    "$tb" "$1" --control "$work/$n.sock" "${@:2}"
}
field() { # NODE KEY: the first value of KEY in status --json
    ctl "$1" status r0 --json | tr ',{}' '\n\n\n' | sed -n "s/^\"$2\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -1
}
wait_for() { # SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 20))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    fail "timed out after ${secs}s waiting for: $what"
}
state_is() { [[ $(field "$1" "$2") == "$3" ]]; } # NODE KEY VALUE
peer_role_is() { # NODE ROLE: the peer's role as NODE sees it
    [[ $(ctl "$1" status r0 --json | sed -n 's/.*"peer":{[^}]*"role":"\([A-Za-z]*\)".*/\1/p') == "$2" ]]
}
in_sync() { # both UpToDate and connected
    state_is alpha disk UpToDate && state_is beta disk UpToDate &&
        state_is alpha replication Established && state_is beta replication Established
}
aoe() { ip netns exec "$P-c" "$init" -i eth0 "$@"; }
