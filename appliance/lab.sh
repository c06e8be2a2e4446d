#!/usr/bin/env bash
# The one-machine lab: two storage nodes and a client in network namespaces on one bridge, and
# e0.3 served either by the replicated pair (`twinblade run` on alpha and beta: the appliance) or
# by a single AoE target (twinblade or Debian's vblade) on node alpha.
#
# Usage:
#   appliance/lab.sh up [--mtu 1500|9000] [--size 256M] [--target pair|twinblade|vblade]
#
#   --target pair (the default) runs the appliance in the shape of appliance/examples/lab.toml,
#   written to the state dir with the lab's paths: alpha's disk is the image (internal
#   meta-data at its end), beta's a second file with external meta-data. `up` waits until a
#   node (alpha, the preferred primary, unless beta took over) is Primary with both disks UpToDate (the first up does the initial sync with `primary
#   --force`). Control: twinblade status --control <state dir>/alpha.sock (or beta.sock).
#   appliance/lab.sh down [--purge]     tear everything down (--purge also deletes image and logs)
#   appliance/lab.sh status
#   appliance/lab.sh add-tap NAME       tap NAME in the root namespace on the bridge (for a VM)
#   appliance/lab.sh del-tap NAME
#   appliance/lab.sh env                lab facts as shell assignments (for test scripts to eval)
#
# Topology (all on bridge tbbr0 in the root namespace, one MTU everywhere):
#   netns tb-alpha   eth0 192.168.100.1/24   storage node, runs the AoE target e0.3 on eth0
#   netns tb-beta    eth0 192.168.100.2/24   storage node
#   netns tb-client  eth0 192.168.100.10/24  client
#   taps (add-tap)                            the client VM's NIC
# Each eth0 is one end of a veth pair whose other end (tbv-alpha, tbv-beta, tbv-client) is a
# bridge port.
#
# Environment:
#   TWINBLADE_BIN        twinblade binary (default <repo>/target/release/twinblade; built if absent)
#   TWINBLADE_LAB_DIR    state dir: pid file, logs, lab.env (default /run/twinblade-lab)
#   TWINBLADE_LAB_IMAGE  backing file (default /var/tmp/twinblade-lab/e0.3.img: a real disk
#                        filesystem, so O_DIRECT works and RAM is not used)
#   TWINBLADE_LAB_TARGET_OPTS  options put before "SHELF SLOT NETIF FILE" (default: "" for
#                        twinblade, "-b 64" for vblade, which drops frames with its default -b 16)
#
# Both up and down are idempotent: they converge from whatever (partial) state they find.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state_dir=${TWINBLADE_LAB_DIR:-/run/twinblade-lab}
default_image=${TWINBLADE_LAB_IMAGE:-/var/tmp/twinblade-lab/e0.3.img}

readonly BRIDGE=tbbr0
readonly NODES=(tb-alpha tb-beta tb-client)
declare -rA ADDR=([tb-alpha]=192.168.100.1/24 [tb-beta]=192.168.100.2/24 [tb-client]=192.168.100.10/24)
readonly TARGET_NODE=tb-alpha TARGET_IF=eth0 SHELF=0 SLOT=3

log() { printf 'lab: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# Root-side name of a node's veth: tb-alpha -> tbv-alpha (interface names have 15 chars at most).
veth_of() { printf 'tbv-%s\n' "${1#tb-}"; }
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

load_env() { # the settings of the last "up", if any
    LAB_MTU=1500 LAB_TARGET='' LAB_IMAGE=$default_image
    if [[ -r $state_dir/lab.env ]]; then
        # shellcheck source=/dev/null
        . "$state_dir/lab.env"
    fi
}

# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------
net_up() { # MTU
    local mtu=$1 ns veth tap
    if ! link_exists "$BRIDGE"; then
        ip link add "$BRIDGE" type bridge
    fi
    for ns in "${NODES[@]}"; do
        veth=$(veth_of "$ns")
        [[ -e /run/netns/$ns ]] || ip netns add "$ns"
        ip -n "$ns" link set lo up
        # Deleting either end of a veth deletes the pair, and deleting the namespace deletes its
        # end: so a missing root end means the pair is gone and must be made again.
        if ! link_exists "$veth"; then
            # Create eth0 directly inside the namespace: no clash with the host's own eth0.
            ip link add "$veth" type veth peer name eth0 netns "$ns"
        fi
        ip link set "$veth" mtu "$mtu" master "$BRIDGE" up
        ip -n "$ns" link set eth0 mtu "$mtu" up
        ip -n "$ns" addr replace "${ADDR[$ns]}" dev eth0
    done
    # Taps that a previous "up" or add-tap made follow the MTU too.
    for tap in $(lab_taps); do
        ip link set "$tap" mtu "$mtu" master "$BRIDGE" up
    done
    # The bridge last: with its ports at the new MTU it can take it in either direction.
    ip link set "$BRIDGE" mtu "$mtu" up
}

net_down() {
    local ns veth tap
    for tap in $(lab_taps); do
        tap_del "$tap"
    done
    for ns in "${NODES[@]}"; do
        veth=$(veth_of "$ns")
        if link_exists "$veth"; then ip link del "$veth"; fi
        if [[ -e /run/netns/$ns ]]; then ip netns del "$ns"; fi
    done
    if link_exists "$BRIDGE"; then ip link del "$BRIDGE"; fi
}

# Taps on our bridge plus those recorded by add-tap (one may have lost its bridge already).
lab_taps() {
    {
        [[ -r $state_dir/taps ]] && cat "$state_dir/taps"
        if link_exists "$BRIDGE"; then
            ip -o link show master "$BRIDGE" | awk -F': ' '{print $2}' | cut -d@ -f1 |
                while read -r dev; do
                    [[ -e /sys/class/net/$dev/tun_flags ]] && echo "$dev"
                done
        fi
    } | sort -u | while read -r dev; do link_exists "$dev" && echo "$dev"; done
    return 0
}

tap_add() { # NAME
    local tap=$1
    link_exists "$BRIDGE" || die "lab is not up (no bridge $BRIDGE): run '$0 up' first"
    load_env
    if ! link_exists "$tap"; then
        ip tuntap add dev "$tap" mode tap
    fi
    ip link set "$tap" mtu "$LAB_MTU" master "$BRIDGE" up
    mkdir -p "$state_dir"
    { [[ -r $state_dir/taps ]] && cat "$state_dir/taps"; echo "$tap"; } | sort -u >"$state_dir/taps.new"
    mv "$state_dir/taps.new" "$state_dir/taps"
    log "tap $tap on $BRIDGE, mtu $LAB_MTU"
}

tap_del() { # NAME
    local tap=$1
    if link_exists "$tap"; then ip link del "$tap"; fi
    if [[ -r $state_dir/taps ]]; then
        grep -vx -- "$tap" "$state_dir/taps" >"$state_dir/taps.new" || true
        mv "$state_dir/taps.new" "$state_dir/taps"
    fi
}

# ---------------------------------------------------------------------------------------------
# Backing file and target
# ---------------------------------------------------------------------------------------------
image_ensure() { # PATH BYTES
    local img=$1 bytes=$2
    if [[ -f $img && $(stat -c %s "$img") == "$bytes" ]]; then
        log "reusing image $img ($bytes bytes)"
        return
    fi
    mkdir -p "$(dirname "$img")"
    log "writing image $img ($bytes bytes of random data)"
    # Fully written, not sparse: a sparse file makes writes several times slower and reads faster,
    # which would skew every measurement. Random, so a test can never pass by reading zeros.
    # Written under a temporary name, so an interrupted "up" never leaves a short image behind.
    head -c "$bytes" /dev/urandom >"$img.tmp"
    sync -d "$img.tmp" 2>/dev/null || sync
    mv "$img.tmp" "$img"
}

target_pid() { # prints the pid of the running target, if any
    local pid
    pid=$(cat "$state_dir/target.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    proc_alive "$pid" || return 1
    echo "$pid"
}

proc_alive() { # PID: exists and is not a zombie
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# Ready = alive and holding an AF_PACKET socket in its namespace (it can receive AoE frames).
target_ready() { # PID
    local pid=$1 fd link inodes
    proc_alive "$pid" || return 1
    inodes=$(awk 'NR > 1 {print $NF}' "/proc/$pid/net/packet" 2>/dev/null) || return 1
    for fd in /proc/"$pid"/fd/*; do
        link=$(readlink "$fd" 2>/dev/null) || continue
        [[ $link == socket:* ]] || continue
        link=${link#socket:[}
        if grep -qx -- "${link%]}" <<<"$inodes"; then return 0; fi
    done
    return 1
}

stop_pid() { # PID: TERM, then KILL after 5 s
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        proc_alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

target_stop() { # [NAMESPACE...] whose leftover processes to stop too (default: all nodes)
    local pid ns
    local -a namespaces=("$@")
    ((${#namespaces[@]})) || namespaces=("${NODES[@]}")
    # The pair: the secondary (beta) first, so that stopping the primary is not a failover.
    pid=$(cat "$state_dir/beta.pid" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && proc_alive "$pid"; then
        log "stopping beta pid $pid"
        stop_pid "$pid"
    fi
    rm -f "$state_dir/beta.pid"
    if pid=$(target_pid); then
        log "stopping target pid $pid"
        stop_pid "$pid"
    fi
    rm -f "$state_dir/target.pid"
    # Anything else still running in the lab's namespaces was started for the lab (by tests or an
    # earlier up whose pid file is gone): it would keep the old interfaces busy, or serve e0.3 too.
    for ns in "${namespaces[@]}"; do
        [[ -e /run/netns/$ns ]] || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            log "stopping pid $pid left in $ns: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
            stop_pid "$pid"
        done
    done
}

twinblade_bin() {
    local bin=${TWINBLADE_BIN:-$repo/target/release/twinblade}
    if [[ ! -x $bin ]]; then
        [[ -z ${TWINBLADE_BIN:-} ]] || die "TWINBLADE_BIN=$bin is not an executable"
        log "$bin missing: cargo build --release"
        (cd "$repo" && cargo build --release) >&2
        [[ -x $bin ]] || die "cargo build did not produce $bin"
    fi
    echo "$bin"
}

# --- the replicated pair -----------------------------------------------------------------------
pair_ctl() { # NODE VERB...: a control verb against one node of the pair
    local node=$1
    shift
    "$(twinblade_bin)" "$1" --control "$state_dir/$node.sock" "${@:2}"
}

pair_field() { # NODE KEY: one value of status --json
    pair_ctl "$1" status r0 --json 2>/dev/null | tr ',{}' '\n\n\n' |
        sed -n "s/^\"$2\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -1
}

pair_wait() { # SECONDS WHAT COMMAND...: poll until COMMAND succeeds
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 10; i++)); do
        if "$@"; then return 0; fi
        sleep 0.1
    done
    tail -n 20 "$state_dir/alpha.log" "$state_dir/beta.log" >&2 || true
    die "timed out after ${secs}s waiting for: $what"
}

pair_sockets() { [[ -S $state_dir/alpha.sock && -S $state_dir/beta.sock ]]; }
pair_connected() { [[ $(pair_field alpha connection) == Connected ]]; }
pair_primary() { # prints the node that is Primary and serving, if one is
    local node
    for node in alpha beta; do
        if [[ $(pair_field "$node" role) == Primary && $(pair_field "$node" serving) == true ]]; then
            echo "$node"
            return 0
        fi
    done
    return 1
}

pair_ready() { # one node Primary and serving, both disks UpToDate, replication established
    pair_primary >/dev/null && [[ $(pair_field alpha disk) == UpToDate &&
        $(pair_field beta disk) == UpToDate && $(pair_field alpha replication) == Established ]]
}

pair_start() { # IMAGE: alpha's disk; prints alpha's pid
    local img=$1 bin cfg beta_img beta_md node usable marker=${1%.img}.pair
    bin=$(twinblade_bin)
    cfg=$state_dir/pair.toml
    beta_img=${img%.img}-beta.img
    beta_md=${img%.img}-beta.md
    mkdir -p "$state_dir"
    rm -f "$state_dir/alpha.sock" "$state_dir/beta.sock"
    cat >"$cfg" <<EOF
# Written by appliance/lab.sh (the shape of appliance/examples/lab.toml, with the lab's paths).
[cluster]
shared-secret = "lab-only-not-secret"
[node.alpha]
address = "${ADDR[tb-alpha]%/*}"
interface = "eth0"
[node.beta]
address = "${ADDR[tb-beta]%/*}"
interface = "eth0"
[resource.r0]
aoe = "e$SHELF.$SLOT"
port = 7788
protocol = "C"
durability = "node"
preferred-primary = "alpha"
dead-time = 3
timeout = 2
ko-count = 3
[resource.r0.on.alpha]
disk = "$img"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "$beta_img"
meta-disk = "$beta_md"
EOF
    # Meta-data: kept only if the last user of the image was the pair (the marker) and both
    # nodes' meta-data reads back; otherwise both are written fresh (these are the lab's own
    # files) and the first up syncs beta from alpha. A standalone target may have changed the
    # image behind the meta-data's back.
    local fresh=0
    if [[ ! -f $marker ]] || ! "$bin" dump-md --config "$cfg" --node alpha r0 >/dev/null 2>&1 ||
        ! "$bin" dump-md --config "$cfg" --node beta r0 >/dev/null 2>&1; then
        fresh=1
        "$bin" create-md --force --config "$cfg" --node alpha r0 >/dev/null ||
            die "create-md on alpha failed"
    fi
    usable=$("$bin" dump-md --config "$cfg" --node alpha r0 | sed -n 's/^data-size: \([0-9]*\) bytes.*/\1/p')
    [[ -n $usable ]] || die "cannot tell alpha's usable size (no data-size in dump-md)"
    if ((fresh)) || [[ ! -f $beta_img || $(stat -c %s "$beta_img") != "$usable" ]]; then
        rm -f "$beta_img" "$beta_md"
        truncate -s "$usable" "$beta_img"
        truncate -s 8M "$beta_md"
        "$bin" create-md --force --config "$cfg" --node beta r0 >/dev/null ||
            die "create-md on beta failed"
    fi
    for node in alpha beta; do
        printf '\n=== %s: ip netns exec tb-%s %s run --node %s\n' "$(date -Is)" "$node" "$bin" "$node" \
            >>"$state_dir/$node.log"
        # shellcheck disable=SC2016 # $$ and $@ belong to the inner sh
        NO_COLOR=1 setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$state_dir/$node.pid" \
            ip netns exec "tb-$node" "$bin" run --config "$cfg" --node "$node" \
            --control "$state_dir/$node.sock" </dev/null >>"$state_dir/$node.log" 2>&1 &
    done
    pair_wait 20 "both nodes' control sockets" pair_sockets
    pair_wait 30 "alpha connected to beta" pair_connected
    if [[ $(pair_field alpha disk) != UpToDate && $(pair_field beta disk) != UpToDate ]]; then
        log "fresh pair: initial sync from alpha (primary --force)"
        pair_ctl alpha primary r0 --force >&2 || die "primary --force on alpha failed"
    fi
    pair_wait 300 "a Primary serving, both disks UpToDate" pair_ready
    # Normally alpha (preferred-primary); beta if it took over when alpha was stopped first.
    log "pair up: $(pair_primary) is Primary"
    touch "$marker"
    cp "$state_dir/alpha.pid" "$state_dir/target.pid"
    cat "$state_dir/alpha.pid"
}

target_start() { # TARGET IMAGE
    local target=$1 img=$2 pid i
    local -a cmd opts
    case $target in
    twinblade)
        read -ra opts <<<"${TWINBLADE_LAB_TARGET_OPTS-}"
        cmd=("$(twinblade_bin)" vblade "${opts[@]}")
        ;;
    vblade)
        command -v vblade >/dev/null || die "vblade not installed (apt-get install vblade)"
        read -ra opts <<<"${TWINBLADE_LAB_TARGET_OPTS--b 64}"
        cmd=(vblade "${opts[@]}")
        ;;
    pair) ;;
    *) die "unknown target '$target' (pair|twinblade|vblade)" ;;
    esac
    cmd+=("$SHELF" "$SLOT" "$TARGET_IF" "$img")

    if [[ $target == pair ]]; then
        pair_start "$img"
        return
    fi
    rm -f "${img%.img}.pair" # a standalone target changes the image behind the pair's meta-data
    mkdir -p "$state_dir"
    printf '\n=== %s: ip netns exec %s %s\n' "$(date -Is)" "$TARGET_NODE" "${cmd[*]}" \
        >>"$state_dir/target.log"
    # setsid: own session, so the target survives this shell and its terminal. The inner sh writes
    # its own pid before exec'ing, so the pid file is right whether or not setsid had to fork.
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner sh
    # NO_COLOR: the log is a file; keep terminal colour codes out of it.
    NO_COLOR=1 setsid sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$state_dir/target.pid" \
        ip netns exec "$TARGET_NODE" "${cmd[@]}" \
        </dev/null >>"$state_dir/target.log" 2>&1 &

    for ((i = 0; i < 150; i++)); do
        pid=$(cat "$state_dir/target.pid" 2>/dev/null || true)
        if [[ -n $pid ]] && target_ready "$pid"; then
            # Still alive a moment later: it did not just fail after opening the socket.
            sleep 0.3
            if proc_alive "$pid"; then
                echo "$pid"
                return 0
            fi
        fi
        sleep 0.1
    done
    tail -n 20 "$state_dir/target.log" >&2 || true
    die "target did not come up (log: $state_dir/target.log)"
}

# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------
cmd_up() {
    local mtu=1500 size=256M target=pair bytes pid mac
    while (($#)); do
        case $1 in
        --mtu) mtu=${2:?--mtu needs a value}; shift ;;
        --size) size=${2:?--size needs a value}; shift ;;
        --target) target=${2:?--target needs a value}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument to up: $1" ;;
        esac
        shift
    done
    if ! [[ $mtu =~ ^[0-9]+$ ]] || ((mtu < 1280 || mtu > 65535)); then die "bad --mtu $mtu"; fi
    bytes=$(numfmt --from=iec "$size" 2>/dev/null) || die "bad --size $size"
    ((bytes >= 1048576 && bytes % 512 == 0)) || die "--size must be >= 1M and a multiple of 512"
    case $target in pair | twinblade | vblade) ;; *) die "bad --target $target (pair|twinblade|vblade)" ;; esac
    # Build before touching anything, so a compile error leaves the lab as it was.
    if [[ $target != vblade ]]; then twinblade_bin >/dev/null; fi

    mkdir -p "$state_dir"
    # Only the target's node: tests may have their own processes in the other namespaces.
    target_stop "$TARGET_NODE" tb-beta
    net_up "$mtu"
    image_ensure "$default_image" "$bytes"
    # lab.env first: add-tap reads the MTU from it.
    cat >"$state_dir/lab.env" <<EOF
LAB_MTU=$mtu
LAB_SIZE=$bytes
LAB_TARGET=$target
LAB_IMAGE=$default_image
LAB_BRIDGE=$BRIDGE
LAB_TARGET_NODE=$TARGET_NODE
LAB_AOE=e$SHELF.$SLOT
LAB_DIR=$state_dir
EOF
    pid=$(target_start "$target" "$default_image")
    mac=$(ip -n "$TARGET_NODE" -o link show eth0 | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2)
    cat <<EOF
lab is up: bridge $BRIDGE, MTU $mtu
  AoE target e$SHELF.$SLOT: $target, pid $pid, in netns $TARGET_NODE on eth0 ($mac)
  backing file: $default_image ($bytes bytes)
  target log:   $state_dir/target.log
  nodes: tb-alpha 192.168.100.1, tb-beta 192.168.100.2, tb-client 192.168.100.10 (dev eth0)
reach it:
  from a namespace:  ip netns exec tb-client <initiator> eth0
  from a VM:         $0 add-tap tbtap0; qemu-system-x86_64 ... \\
                       -netdev tap,id=n0,ifname=tbtap0,script=no,downscript=no -device e1000,netdev=n0
  stop:              $0 down
EOF
}

cmd_down() {
    local purge=0
    while (($#)); do
        case $1 in
        --purge) purge=1 ;;
        *) die "unknown argument to down: $1" ;;
        esac
        shift
    done
    load_env
    target_stop
    net_down
    rm -f "$state_dir/taps" "$state_dir/lab.env"
    if ((purge)); then
        rm -f "$LAB_IMAGE" "$LAB_IMAGE.tmp"
        rmdir "$(dirname "$LAB_IMAGE")" 2>/dev/null || true
        rm -rf "$state_dir"
    fi
    log "down"
}

cmd_status() {
    local ns pid up=1
    load_env
    if link_exists "$BRIDGE"; then
        echo "bridge $BRIDGE: $(ip -o link show "$BRIDGE" | grep -o 'mtu [0-9]*'), $(cat "/sys/class/net/$BRIDGE/operstate")"
    else
        echo "bridge $BRIDGE: absent"
        up=0
    fi
    for ns in "${NODES[@]}"; do
        if [[ -e /run/netns/$ns ]] && ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            echo "netns $ns: eth0 $(ip -n "$ns" -o -4 addr show eth0 | awk '{print $4}')" \
                "$(ip -n "$ns" -o link show eth0 | grep -o 'mtu [0-9]*')" \
                "$(ip -n "$ns" -o link show eth0 | grep -o 'link/ether [0-9a-f:]*')"
        else
            echo "netns $ns: absent or without eth0"
            up=0
        fi
    done
    local taps
    taps=$(lab_taps | tr '\n' ' ')
    echo "taps: ${taps:-none}"
    if pid=$(target_pid); then
        echo "target: pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline")"
    else
        echo "target: not running"
        up=0
    fi
    if [[ -f $LAB_IMAGE ]]; then
        echo "image: $LAB_IMAGE ($(stat -c %s "$LAB_IMAGE") bytes)"
    fi
    echo "state dir: $state_dir"
    if ((up)); then
        echo "status: up (mtu $LAB_MTU, target $LAB_TARGET)"
    else
        echo "status: down or partial"
        return 1
    fi
}

cmd_env() {
    [[ -r $state_dir/lab.env ]] || die "lab is not up"
    cat "$state_dir/lab.env"
}

[[ $(id -u) == 0 ]] || die "must run as root (namespaces, bridge, taps)"
sub=${1:-}
(($#)) && shift
case $sub in
up) cmd_up "$@" ;;
down) cmd_down "$@" ;;
status) cmd_status "$@" ;;
add-tap) tap_add "${1:?usage: $0 add-tap NAME}" ;;
del-tap) tap_del "${1:?usage: $0 del-tap NAME}" ;;
env) cmd_env ;;
-h | --help | help) usage ;;
*) usage >&2; exit 2 ;;
esac
