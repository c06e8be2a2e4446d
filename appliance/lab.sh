#!/usr/bin/env bash
# The one-machine lab: two storage nodes and a client in network namespaces, cabled as the seeds
# cable a pair (a client network and a separate replication network), and e0.3 served either by
# the replicated pair (`twinblade run` on alpha and beta: the appliance) or by a single AoE
# target (twinblade or Debian's vblade) on node alpha.
#
# Usage:
#   appliance/lab.sh up [--mtu 1500|9000] [--size 256M] [--target pair|twinblade|vblade]
#                       [--profile default|fast]
#
#   --target pair (the default) runs the appliance in the shape of appliance/examples/lab.toml,
#   written to the state dir with the lab's paths: alpha's disk is the image (internal
#   meta-data at its end), beta's a second file with external meta-data. The heartbeat runs on
#   both networks; resource r0 has the floating IP 10.77.0.100/24 (on the primary's eth0), NBD on
#   10.77.0.100:10809 (export r0) and the virtual MAC (mac = "auto"). `up` waits until a node
#   (alpha, the preferred primary, unless beta took over) is Primary with both disks UpToDate
#   (the first up does the initial sync with `primary --force`). --profile fast: heartbeat every
#   0.1 s, peer dead after 0.5 s (default profile: 0.2 s and 1.0 s).
#   Control: twinblade status --control <state dir>/alpha.sock r0 (or beta.sock); a live stream
#   of state changes: twinblade events --control <state dir>/alpha.sock r0.
#   appliance/lab.sh down [--purge]     tear everything down (--purge also deletes image and logs)
#   appliance/lab.sh status             networks, nodes, roles, who holds the floating IP
#   appliance/lab.sh add-tap NAME       tap NAME in the root namespace on the client bridge (a VM)
#   appliance/lab.sh del-tap NAME
#   appliance/lab.sh env                lab facts as shell assignments (for test scripts to eval)
#
# Faults (the pair only; NODE is alpha or beta):
#   appliance/lab.sh fail NODE [--no-wait]   power loss: the host ends of both of NODE's links go
#                       down first (nothing more leaves or arrives: no FIN, no RST), then its
#                       daemon gets SIGKILL. Then waits (unless --no-wait) until the other node
#                       serves and prints how long that took.
#   appliance/lab.sh kill NODE          a daemon crash on a node that stays up: SIGKILL, links stay.
#   appliance/lab.sh heal NODE [--no-wait]   daemon restarted if it is gone, links up, SIGCONT;
#                       waits (unless --no-wait) until both disks are UpToDate again.
#   appliance/lab.sh cut replication|client NODE   that node's link on that network goes down
#                       (`heal NODE` brings it back)
#   appliance/lab.sh freeze NODE / thaw NODE   SIGSTOP / SIGCONT of NODE's daemon
#   appliance/lab.sh switchover [--on secondary]   `twinblade switchover r0` on the primary (or
#                       the secondary): a planned move; prints the time no node served (the
#                       pause a client sees)
#
# Topology (one MTU everywhere):
#   client network, bridge tbbr0 (10.77.0.0/24):
#     netns tb-alpha   eth0 10.77.0.1    storage node; AoE e0.3 and the floating IP are served here
#     netns tb-beta    eth0 10.77.0.2    storage node
#     netns tb-client  eth0 10.77.0.10   client
#     taps (add-tap)                     the client VM's NIC
#     floating IP 10.77.0.100 (the pair's r0): on the primary's eth0 only
#   replication network, bridge tbrep0 (192.168.100.0/24):
#     netns tb-alpha   eth1 192.168.100.1  the nodes' `address` (replication) and heartbeat path 1
#     netns tb-beta    eth1 192.168.100.2
# The heartbeat runs on both networks. Each ethN is one end of a veth pair whose other end is a
# bridge port in the root namespace: tbv-alpha, tbv-beta, tbv-client (client network),
# tbr-alpha, tbr-beta (replication network). `fail`/`cut` take those host ends down.
#
# The lab runs each daemon as its systemd unit (appliance/systemd/twinblade.service) would: when
# the daemon exits for any reason, `twinblade release-ips` removes the floating IP from the node's
# eth0 (the unit's ExecStopPost); the daemon itself also removes a stale copy when it starts.
#
# Environment:
#   TWINBLADE_BIN        twinblade binary (default <repo>/target/release/twinblade; built if absent)
#   TWINBLADE_LAB_DIR    state dir: pid files, logs, lab.env (default /run/twinblade-lab)
#   TWINBLADE_LAB_IMAGE  backing file (default /var/tmp/twinblade-lab/e0.3.img: a real disk
#                        filesystem, so O_DIRECT works and RAM is not used)
#   TWINBLADE_LAB_TARGET_OPTS  options put before "SHELF SLOT NETIF FILE" (default: "" for
#                        twinblade, "-b 64" for vblade, which drops frames with its default -b 16)
#   TWINBLADE_LAB_MAC    the pair's `mac` for r0 (default auto; own: the node's own MAC)
#
# up and down are idempotent: they converge from whatever (partial) state they find.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state_dir=${TWINBLADE_LAB_DIR:-/run/twinblade-lab}
default_image=${TWINBLADE_LAB_IMAGE:-/var/tmp/twinblade-lab/e0.3.img}

readonly BRIDGE=tbbr0 REPL_BRIDGE=tbrep0
readonly NODES=(tb-alpha tb-beta tb-client)
# Client network (eth0) and replication network (eth1; storage nodes only).
declare -rA ADDR=([tb-alpha]=10.77.0.1/24 [tb-beta]=10.77.0.2/24 [tb-client]=10.77.0.10/24)
declare -rA REPL_ADDR=([tb-alpha]=192.168.100.1/24 [tb-beta]=192.168.100.2/24)
readonly FLOATING_IP=10.77.0.100/24 NBD_PORT=10809
readonly TARGET_NODE=tb-alpha TARGET_IF=eth0 SHELF=0 SLOT=3

log() { printf 'lab: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# Root-side names of a node's veths: tb-alpha -> tbv-alpha on the client network, tbr-alpha on
# the replication network (interface names have 15 chars at most).
veth_of() { printf 'tbv-%s\n' "${1#tb-}"; }
rveth_of() { printf 'tbr-%s\n' "${1#tb-}"; }
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
bridge_up() { # BRIDGE: exists (the MTU is set last, in net_up)
    if ! link_exists "$1"; then
        ip link add "$1" type bridge
    fi
}

# ns_link NAMESPACE HOST-END INSIDE-NAME BRIDGE MTU ADDRESS: the veth pair, on the bridge, up,
# with exactly ADDRESS (addresses left from an older lab layout are removed; the floating IP,
# which the running primary holds, is left alone).
ns_link() {
    local ns=$1 host=$2 dev=$3 br=$4 mtu=$5 addr=$6 a
    # Deleting either end of a veth deletes the pair, and deleting the namespace deletes its
    # end: so a missing root end means the pair is gone and must be made again.
    if ! link_exists "$host"; then
        # Create the inner end directly inside the namespace: no clash with the host's own eth0.
        ip link add "$host" type veth peer name "$dev" netns "$ns"
    fi
    ip link set "$host" mtu "$mtu" master "$br" up
    ip -n "$ns" link set "$dev" mtu "$mtu" up
    for a in $(ip -n "$ns" -o -4 addr show dev "$dev" | awk '{print $4}'); do
        [[ $a == "$addr" || $a == "$FLOATING_IP" ]] || ip -n "$ns" addr del "$a" dev "$dev"
    done
    ip -n "$ns" addr replace "$addr" dev "$dev"
}

net_up() { # MTU
    local mtu=$1 ns tap
    bridge_up "$BRIDGE"
    bridge_up "$REPL_BRIDGE"
    for ns in "${NODES[@]}"; do
        [[ -e /run/netns/$ns ]] || ip netns add "$ns"
        ip -n "$ns" link set lo up
        ns_link "$ns" "$(veth_of "$ns")" eth0 "$BRIDGE" "$mtu" "${ADDR[$ns]}"
        if [[ -n ${REPL_ADDR[$ns]:-} ]]; then
            ns_link "$ns" "$(rveth_of "$ns")" eth1 "$REPL_BRIDGE" "$mtu" "${REPL_ADDR[$ns]}"
        fi
    done
    # Taps that a previous "up" or add-tap made follow the MTU too.
    for tap in $(lab_taps); do
        ip link set "$tap" mtu "$mtu" master "$BRIDGE" up
    done
    # The bridges last: with their ports at the new MTU they can take it in either direction.
    ip link set "$BRIDGE" mtu "$mtu" up
    ip link set "$REPL_BRIDGE" mtu "$mtu" up
}

net_down() {
    local ns dev tap
    for tap in $(lab_taps); do
        tap_del "$tap"
    done
    for ns in "${NODES[@]}"; do
        for dev in "$(veth_of "$ns")" "$(rveth_of "$ns")"; do
            if link_exists "$dev"; then ip link del "$dev"; fi
        done
        if [[ -e /run/netns/$ns ]]; then ip netns del "$ns"; fi
    done
    for dev in "$BRIDGE" "$REPL_BRIDGE"; do
        if link_exists "$dev"; then ip link del "$dev"; fi
    done
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
    local pid ns node first=beta
    local -a namespaces=("$@")
    ((${#namespaces[@]})) || namespaces=("${NODES[@]}")
    # The pair: the secondary first, so that stopping the primary is not a failover. A frozen
    # daemon cannot act on SIGTERM: thaw it first.
    if [[ -S $state_dir/beta.sock ]] && [[ $(pair_field beta role) == Primary ]]; then first=alpha; fi
    for node in "$first" $([[ $first == beta ]] && echo alpha || echo beta); do
        if pid=$(node_pid "$node"); then
            log "stopping $node pid $pid"
            kill -CONT "$pid" 2>/dev/null || true
            stop_pid "$pid"
        fi
        rm -f "$state_dir/$node.pid"
    done
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
            kill -CONT "$pid" 2>/dev/null || true
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

pair_field() { # NODE KEY: one value of status --json (nothing if the node does not answer in 2 s)
    # shellcheck disable=SC2020 # three characters to three newlines
    timeout 2 "$(twinblade_bin)" status --control "$state_dir/$1.sock" r0 --json 2>/dev/null | tr ',{}' '\n\n\n' |
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

# Does the binary know the keys of the moving service (floating-ip, mac)? A binary from before
# them refuses the whole configuration (unknown keys are errors), so the lab falls back to the
# node's own MAC and no floating IP, and says so.
pair_has_service_keys() { # CONFIG-WITH-THE-KEYS
    local out
    out=$("$(twinblade_bin)" dump-md --config "$1" --node alpha r0 2>&1) || true
    ! grep -qiE 'unknown (field|key)' <<<"$out"
}

pair_config() { # IMAGE BETA-IMAGE BETA-MD SERVICE(0|1) PROFILE: the configuration on stdout
    local img=$1 beta_img=$2 beta_md=$3 service=$4 profile=$5 interval=0.2 dead=1.0 node ns
    [[ $profile == fast ]] && interval=0.1 dead=0.5
    cat <<EOF
# Written by appliance/lab.sh (the shape of appliance/examples/lab.toml, with the lab's paths).
[cluster]
shared-secret = "lab-only-not-secret"
# profile $profile: heartbeat every ${interval} s on each path, peer dead after ${dead} s of silence on all
heartbeat-interval = $interval
heartbeat-dead-time = $dead
EOF
    for node in alpha beta; do
        ns=tb-$node
        cat <<EOF
[node.$node]
address = "${REPL_ADDR[$ns]%/*}"
interface = "eth0"
heartbeat = ["${REPL_ADDR[$ns]%/*}", "${ADDR[$ns]%/*}"]
EOF
    done
    cat <<EOF
[resource.r0]
aoe = "e$SHELF.$SLOT"
port = 7788
protocol = "C"
durability = "node"
preferred-primary = "alpha"
dead-time = 3
timeout = 2
ko-count = 3
EOF
    if ((service)); then
        cat <<EOF
mac = "${TWINBLADE_LAB_MAC:-auto}"
floating-ip = "$FLOATING_IP"
nbd = "${FLOATING_IP%/*}:$NBD_PORT"
EOF
    fi
    cat <<EOF
[resource.r0.on.alpha]
disk = "$img"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "$beta_img"
meta-disk = "$beta_md"
EOF
}

node_pid() { # NODE: the daemon's pid, if it is running
    local pid
    pid=$(cat "$state_dir/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && proc_alive "$pid" || return 1
    echo "$pid"
}

# node_start NODE: `twinblade run` in the node's namespace, under a small shell that plays the
# systemd unit (appliance/systemd/twinblade.service): when the daemon exits (also by SIGKILL) it
# runs the unit's ExecStopPost, `twinblade release-ips`, which takes back a floating IP left on eth0.
node_start() {
    local node=$1 bin
    bin=$(twinblade_bin)
    load_env
    rm -f "$state_dir/$node.sock" "$state_dir/$node.pid"
    printf '\n=== %s: ip netns exec tb-%s %s run --node %s\n' "$(date -Is)" "$node" "$bin" "$node" \
        >>"$state_dir/$node.log"
    # shellcheck disable=SC2016 # the variables belong to the inner sh
    NO_COLOR=1 setsid ip netns exec "tb-$node" sh -c '
        pidfile=$1 fip=$2 bin=$3
        shift 3
        "$bin" run "$@" &
        echo $! >"$pidfile"
        wait $!
        rc=$?
        if [ -n "$fip" ] && ip -o addr show dev eth0 | grep -q " inet $fip "; then
            # release-ips is what the unit runs; plain ip if this binary predates it.
            "$bin" release-ips "$@" || ip addr del "$fip" dev eth0
            echo "lab: daemon exited ($rc): floating IP $fip released from eth0 (the unit'"'"'s ExecStopPost)"
        fi' sh "$state_dir/$node.pid" "${LAB_FLOATING_IP:+$FLOATING_IP}" "$bin" \
        --config "$state_dir/pair.toml" --node "$node" --control "$state_dir/$node.sock" \
        </dev/null >>"$state_dir/$node.log" 2>&1 &
    pair_wait 20 "$node's control socket" test -S "$state_dir/$node.sock"
}

pair_start() { # IMAGE PROFILE: alpha's disk; prints alpha's pid
    local img=$1 profile=$2 bin cfg beta_img beta_md usable service=1 marker=${1%.img}.pair
    bin=$(twinblade_bin)
    cfg=$state_dir/pair.toml
    beta_img=${img%.img}-beta.img
    beta_md=${img%.img}-beta.md
    mkdir -p "$state_dir"
    rm -f "$state_dir/alpha.sock" "$state_dir/beta.sock"
    pair_config "$img" "$beta_img" "$beta_md" 1 "$profile" >"$cfg"
    if ! pair_has_service_keys "$cfg"; then
        log "WARNING: $bin does not know floating-ip/mac yet: running r0 without a floating IP" \
            "or NBD, on each node's own MAC"
        service=0
        pair_config "$img" "$beta_img" "$beta_md" 0 "$profile" >"$cfg"
    fi
    if ((service)); then
        echo "LAB_FLOATING_IP=${FLOATING_IP%/*}" >>"$state_dir/lab.env"
        echo "LAB_NBD=nbd://${FLOATING_IP%/*}:$NBD_PORT/r0" >>"$state_dir/lab.env"
    fi
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
    node_start alpha
    node_start beta
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

target_start() { # TARGET IMAGE [PROFILE]
    local target=$1 img=$2 profile=${3:-default} pid i
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
        pair_start "$img" "$profile"
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
    local mtu=1500 size=256M target=pair profile=default bytes pid mac
    while (($#)); do
        case $1 in
        --mtu) mtu=${2:?--mtu needs a value}; shift ;;
        --profile) profile=${2:?--profile needs a value}; shift ;;
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
    case $profile in default | fast) ;; *) die "bad --profile $profile (default|fast)" ;; esac
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
LAB_REPL_BRIDGE=$REPL_BRIDGE
LAB_TARGET_NODE=$TARGET_NODE
LAB_AOE=e$SHELF.$SLOT
LAB_DIR=$state_dir
LAB_PROFILE=$profile
LAB_CLIENT_NS=tb-client
LAB_CLIENT_ADDR=${ADDR[tb-client]%/*}
EOF
    pid=$(target_start "$target" "$default_image" "$profile")
    load_env
    mac=$(mac_of "$TARGET_NODE")
    cat <<EOF
lab is up: client network $BRIDGE (10.77.0.0/24), replication network $REPL_BRIDGE (192.168.100.0/24), MTU $mtu
  nodes: tb-alpha eth0 10.77.0.1 eth1 192.168.100.1, tb-beta eth0 10.77.0.2 eth1 192.168.100.2,
         tb-client eth0 10.77.0.10
  backing file: $default_image ($bytes bytes)
EOF
    if [[ $target == pair ]]; then
        cat <<EOF
  the pair (profile $profile): alpha pid $(cat "$state_dir/alpha.pid"), beta pid $(cat "$state_dir/beta.pid"), configuration $state_dir/pair.toml
  $(pair_primary) is Primary serving e$SHELF.$SLOT on eth0$( [[ -n ${LAB_FLOATING_IP:-} ]] &&
            echo ", floating IP $LAB_FLOATING_IP, NBD $LAB_NBD" ||
            echo " (no floating IP: this binary predates it)")
  logs: $state_dir/alpha.log, $state_dir/beta.log
watch it:
  $(twinblade_bin) status --control $state_dir/alpha.sock r0   (or beta.sock)
  $(twinblade_bin) events --control $state_dir/beta.sock r0    (a live stream of state changes)
  $0 status
break it:  $0 fail alpha | kill alpha | cut replication alpha | freeze alpha | switchover
mend it:   $0 heal alpha | thaw alpha
EOF
    else
        cat <<EOF
  AoE target e$SHELF.$SLOT: $target, pid $pid, in netns $TARGET_NODE on eth0 ($mac)
  target log:   $state_dir/target.log
EOF
    fi
    cat <<EOF
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

mac_of() { # NAMESPACE: eth0's own MAC
    ip -n "$1" -o link show eth0 2>/dev/null | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2
}

fip_holders() { # the nodes whose eth0 holds the floating IP (whatever their link state)
    local ns
    for ns in tb-alpha tb-beta; do
        if ip -n "$ns" -o -4 addr show dev eth0 2>/dev/null | grep -q " ${FLOATING_IP%/*}/"; then
            echo "${ns#tb-}"
        fi
    done
}

cmd_status() {
    local ns pid up=1 dev node
    load_env
    for dev in "$BRIDGE" "$REPL_BRIDGE"; do
        if link_exists "$dev"; then
            echo "bridge $dev: $(ip -o link show "$dev" | grep -o 'mtu [0-9]*'), $(cat "/sys/class/net/$dev/operstate")"
        else
            echo "bridge $dev: absent"
            up=0
        fi
    done
    for ns in "${NODES[@]}"; do
        if [[ -e /run/netns/$ns ]] && ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            for dev in eth0 eth1; do
                ip -n "$ns" link show "$dev" >/dev/null 2>&1 || continue
                echo "netns $ns: $dev $(ip -n "$ns" -o -4 addr show "$dev" | awk '{print $4}' | tr '\n' ' ')" \
                    "$(ip -n "$ns" -o link show "$dev" | grep -o 'mtu [0-9]*')" \
                    "$(ip -n "$ns" -o link show "$dev" | grep -o 'link/ether [0-9a-f:]*')" \
                    "$(ip -n "$ns" -o link show "$dev" | grep -q 'NO-CARRIER' && echo '(no carrier: link cut)')"
            done
        else
            echo "netns $ns: absent or without eth0"
            up=0
        fi
    done
    local taps
    taps=$(lab_taps | tr '\n' ' ')
    echo "taps: ${taps:-none}"
    if [[ $LAB_TARGET == pair ]]; then
        for node in alpha beta; do
            if pid=$(node_pid "$node"); then
                local st
                st=$(awk '{print $3}' "/proc/$pid/stat")
                echo "$node: pid $pid$([[ $st == T ]] && echo ' (frozen: SIGSTOP)')" \
                    "$(timeout 2 "$(twinblade_bin)" status --control "$state_dir/$node.sock" r0 2>/dev/null |
                        grep -E '^r0 |disk:|service ' | sed 's/^ *//' | tr '\n' ' ')"
            else
                echo "$node: not running"
                up=0
            fi
        done
        if [[ -n ${LAB_FLOATING_IP:-} ]]; then
            echo "floating IP $LAB_FLOATING_IP on: $(fip_holders | tr '\n' ' ')"
        fi
    elif pid=$(target_pid); then
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

# ---------------------------------------------------------------------------------------------
# Faults (the pair)
# ---------------------------------------------------------------------------------------------
now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
other_node() { [[ $1 == alpha ]] && echo beta || echo alpha; }
need_pair() { # [NODE]: the lab runs the pair (and NODE is one of its nodes)
    load_env
    [[ $LAB_TARGET == pair ]] || die "this verb needs the pair: $0 up (--target pair)"
    if (($#)); then
        [[ $1 == alpha || $1 == beta ]] || die "NODE must be alpha or beta, not '$1'"
    fi
}
watch_hint() { # NODE: what to look at while it happens
    local bin
    bin=$(twinblade_bin)
    cat <<EOF
  watch:  $bin status --control $state_dir/$1.sock r0
          $bin events --control $state_dir/$1.sock r0     (the failover's state changes as they happen)
          $0 status                                    (roles$([[ -n ${LAB_FLOATING_IP:-} ]] && echo ", who holds the floating IP"))
EOF
}
serving() { # NODE: Primary and serving
    [[ $(pair_field "$1" role) == Primary && $(pair_field "$1" serving) == true ]]
}
wait_serving() { # NODE SECONDS START: prints the seconds since START until NODE serves
    local node=$1 secs=$2 t0=$3 i
    for ((i = 0; i < secs * 20; i++)); do
        if serving "$node"; then
            echo "  $node is Primary and serving $(secs_since "$t0") s after it started"
            return 0
        fi
        sleep 0.05
    done
    echo "  $node is still not serving after ${secs} s: see $state_dir/$node.log"
    return 1
}

cmd_fail() { # NODE [--no-wait]
    local node=${1:-} wait=1 pid t0 other
    need_pair "$node"
    [[ ${2:-} == --no-wait ]] && wait=0
    other=$(other_node "$node")
    t0=$(now)
    ip link set "$(veth_of "tb-$node")" down
    ip link set "$(rveth_of "tb-$node")" down
    if pid=$(node_pid "$node"); then
        kill -KILL "$pid"
        echo "power loss of $node at $(date +%T.%3N): links $(veth_of "tb-$node") and $(rveth_of "tb-$node") down, then daemon pid $pid killed (SIGKILL)"
    else
        echo "power loss of $node at $(date +%T.%3N): links $(veth_of "tb-$node") and $(rveth_of "tb-$node") down (its daemon was not running)"
    fi
    echo "  $other hears nothing more on either network: it declares $node dead after the heartbeat dead time ($([[ ${LAB_PROFILE:-default} == fast ]] && echo 0.5 || echo 1.0) s), then takes over"
    watch_hint "$other"
    echo "  bring $node back: $0 heal $node"
    if ((wait)); then wait_serving "$other" 30 "$t0" || true; fi
}

cmd_kill() { # NODE: a daemon crash on a node that stays up
    local node=${1:-} pid t0
    need_pair "$node"
    pid=$(node_pid "$node") || die "$node's daemon is not running"
    t0=$(now)
    kill -KILL "$pid"
    echo "killed $node's daemon pid $pid (SIGKILL); its links stay up, so the kernel resets its connections: $(other_node "$node") can learn sooner than from a power loss"
    watch_hint "$(other_node "$node")"
    echo "  restart it: $0 heal $node"
    wait_serving "$(other_node "$node")" 30 "$t0" || true
}

cmd_heal() { # NODE [--no-wait]
    local node=${1:-} wait=1 pid started=0
    need_pair "$node"
    [[ ${2:-} == --no-wait ]] && wait=0
    if pid=$(node_pid "$node"); then
        ip link set "$(veth_of "tb-$node")" up
        ip link set "$(rveth_of "tb-$node")" up
        kill -CONT "$pid"
        echo "healed $node: links up, daemon pid $pid running (SIGCONT sent)"
    else
        # As a machine powering on: the daemon starts (and removes a stale floating IP) while
        # the links are still coming up.
        node_start "$node"
        ip link set "$(veth_of "tb-$node")" up
        ip link set "$(rveth_of "tb-$node")" up
        started=1
        echo "healed $node: daemon restarted (pid $(cat "$state_dir/$node.pid")), links up"
    fi
    watch_hint "$node"
    if ((wait)); then
        local i
        for ((i = 0; i < 1200; i++)); do
            if [[ $(pair_field alpha disk) == UpToDate && $(pair_field beta disk) == UpToDate &&
                $(pair_field alpha replication) == Established && $(pair_field beta replication) == Established &&
                $(pair_field alpha out-of-sync) == 0 && $(pair_field beta out-of-sync) == 0 ]]; then
                echo "  both disks UpToDate again after $((i / 10)).$((i % 10)) s$( ((started)) && echo " ($node resynced from $(other_node "$node"))")"
                return 0
            fi
            sleep 0.1
        done
        echo "  not in sync after 120 s: see $0 status"
        return 1
    fi
}

cmd_cut() { # replication|client NODE
    local net=${1:-} node=${2:-} dev
    need_pair "$node"
    case $net in
    replication) dev=$(rveth_of "tb-$node") ;;
    client) dev=$(veth_of "tb-$node") ;;
    *) die "usage: $0 cut replication|client NODE" ;;
    esac
    ip link set "$dev" down
    echo "cut $node's $net link ($dev down) at $(date +%T.%3N)"
    if [[ $net == replication ]]; then
        echo "  replication stops; the heartbeat still flows on the client network, so the pair knows both nodes live"
    else
        echo "  clients cannot reach $node; the heartbeat still flows on the replication network"
    fi
    watch_hint "$node"
    echo "  mend it: $0 heal $node"
}

cmd_freeze() { # NODE
    local node=${1:-} pid
    need_pair "$node"
    pid=$(node_pid "$node") || die "$node's daemon is not running"
    kill -STOP "$pid"
    echo "froze $node's daemon pid $pid (SIGSTOP) at $(date +%T.%3N): it neither sends nor answers, its links stay up"
    echo "  past the heartbeat dead time $(other_node "$node") takes over; on thaw $node must notice it lost the resource"
    watch_hint "$(other_node "$node")"
    echo "  (status against $node hangs while it is frozen)"
    echo "  thaw it: $0 thaw $node"
}

cmd_thaw() { # NODE
    local node=${1:-} pid
    need_pair "$node"
    pid=$(node_pid "$node") || die "$node's daemon is not running"
    kill -CONT "$pid"
    echo "thawed $node's daemon pid $pid (SIGCONT) at $(date +%T.%3N)"
    watch_hint "$node"
}

cmd_switchover() { # [--on primary|secondary]: `twinblade switchover r0` run on that node
    local from to on=primary t0 said demote promote
    case ${1:-} in
    '') ;;
    --on) on=${2:?--on needs primary or secondary} ;;
    *) die "unknown argument to switchover: $1" ;;
    esac
    [[ $on == primary || $on == secondary ]] || die "--on: primary or secondary, not $on"
    need_pair
    from=$(pair_primary) || die "no node is Primary and serving"
    to=$(other_node "$from")
    t0=$(now)
    if [[ $on == primary ]]; then
        said=$(pair_ctl "$from" switchover r0) || die "switchover r0 on $from failed: $said"
        # r0: switchover alpha -> beta: alpha stopped serving after A s, beta primary after B s
        demote=$(sed -n 's/.* stopped serving after \([0-9.]*\) s.*/\1/p' <<<"$said")
        promote=$(sed -n 's/.* primary after \([0-9.]*\) s.*/\1/p' <<<"$said")
        promote=$(awk -v a="$demote" -v b="$promote" 'BEGIN { printf "%.3f", b - a }')
    else
        said=$(pair_ctl "$to" switchover r0) || die "switchover r0 on $to failed: $said"
        demote=? promote=$(sed -n 's/.* serving after \([0-9.]*\) s.*/\1/p' <<<"$said")
    fi
    local i
    for ((i = 0; i < 300; i++)); do
        serving "$to" && break
        sleep 0.02
    done
    serving "$to" || die "$to is not serving after the switchover ($said)"
    echo "switchover $from -> $to (asked on the $on): demote $demote s, promote $promote s," \
        "no node serving for $(secs_since "$t0") s (the pause a client sees, at most)"
    watch_hint "$to"
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
fail) cmd_fail "$@" ;;
kill) cmd_kill "$@" ;;
heal) cmd_heal "$@" ;;
cut) cmd_cut "$@" ;;
freeze) cmd_freeze "$@" ;;
thaw) cmd_thaw "$@" ;;
switchover) cmd_switchover "$@" ;;
-h | --help | help) usage ;;
*) usage >&2; exit 2 ;;
esac
