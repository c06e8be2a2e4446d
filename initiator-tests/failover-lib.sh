# shellcheck shell=bash
# The two-network lab of the failover tests (sourced by failover.sh, not run). It sources
# lab-lib.sh and keeps its helpers (start, stop, ctl, field, wait_for, in_sync, settled,
# create_md, pair_up ...), but replaces the network and the configuration:
#
#   client network      bridge ${P}br0: alpha ${P}-a eth0 10.77.$NET.1, beta ${P}-b eth0 .2,
#                       client ${P}-c eth0 .10, and a spare ${P}-r eth0 (no address) for a rogue
#                       AoE responder; AoE is served here (interface = "eth0")
#   replication network bridge ${P}br1: alpha eth1 192.168.$NET.1, beta eth1 .2 (the nodes'
#                       `address`)
#
# Host ends of the veths: ${P}v1 ${P}v2 ${P}v3 ${P}v4 (client network: alpha, beta, client,
# rogue), ${P}r1 ${P}r2 (replication network: alpha, beta).
#
# The configuration carries the heartbeat keys ([cluster] heartbeat-port/-interval/-dead-time,
# [node.X] heartbeat = [replication address, client address]) unless HB_KEYS=0: a binary
# without the heartbeat refuses them, and HB_KEYS=0 lets the tooling be tried on it. The
# heartbeat's interval and dead time are $HB_INTERVAL and $HB_DEAD (0.2 and 1.0 s; the fast
# profile is 0.1 and 0.5).
#
# The service keys ([resource.r0] floating-ip = "$FIP/24" on the client network and
# mac = "$AOE_MAC", default "auto": the blade answers from a MAC shared by both nodes) are
# written when SERVICE_KEYS=1 (the default); SERVICE_KEYS=0 leaves them out, for a binary
# without them. fip_start samples who holds the floating IP every 100 ms (fip_doubles: samples
# with two holders); serving_mac NODE is the MAC the blade answers from on NODE.
#
# The client side: clients_start NAME runs `aoe-init versioned` and `aoe-init probe` in the
# client namespace in the background; clients_stop ends them (SIGTERM) and sets $acked,
# $stall_max, $stall_p50, $gaps, $probes, $two, $errors, $vrc; verify_versions NAME checks the
# device against the acknowledged versions. Checks are recorded with check/record (the summary
# table at the end), so one scenario's failed expectation does not hide the others'.

# shellcheck source=initiator-tests/lab-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab-lib.sh"

HB_KEYS=${HB_KEYS:-1}
HB_PORT=7790
HB_INTERVAL=${HB_INTERVAL:-0.2}
HB_DEAD=${HB_DEAD:-1.0}
SERVICE_KEYS=${SERVICE_KEYS:-1}
AOE_MAC=${AOE_MAC:-auto}
CNET=10.77.$NET   # the client network
RNET=192.168.$NET # the replication network
FIP=$CNET.100     # the floating IP (with SERVICE_KEYS=1)

# --- the network (replaces lab-lib's) -----------------------------------------------------------
net_down() {
    local ns i
    for ns in "$P-a" "$P-b" "$P-c" "$P-r"; do ip netns del "$ns" 2>/dev/null || true; done
    for i in v1 v2 v3 v4 r1 r2; do ip link del "${P}$i" 2>/dev/null || true; done
    ip link del "${P}br0" 2>/dev/null || true
    ip link del "${P}br1" 2>/dev/null || true
}
# veth NAMESPACE HOST-END INSIDE-NAME BRIDGE [ADDRESS]
veth() {
    ip link add "$2" type veth peer name "$3" netns "$1"
    ip link set "$2" master "$4" mtu "${MTU:-1500}" up
    ip -n "$1" link set "$3" mtu "${MTU:-1500}" up
    [[ -z ${5:-} ]] || ip -n "$1" addr add "$5/24" dev "$3"
}
net_up() {
    net_down
    local br ns
    for br in "${P}br0" "${P}br1"; do
        ip link add "$br" type bridge
        ip link set "$br" mtu "${MTU:-1500}" up
    done
    for ns in "$P-a" "$P-b" "$P-c" "$P-r"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    veth "$P-a" "${P}v1" eth0 "${P}br0" "$CNET.1"
    veth "$P-b" "${P}v2" eth0 "${P}br0" "$CNET.2"
    veth "$P-c" "${P}v3" eth0 "${P}br0" "$CNET.10"
    veth "$P-r" "${P}v4" eth0 "${P}br0"
    veth "$P-a" "${P}r1" eth1 "${P}br1" "$RNET.1"
    veth "$P-b" "${P}r2" eth1 "${P}br1" "$RNET.2"
}
hostend() { # NODE NET(client|repl): the host end of NODE's veth on that network
    local i
    i=$([[ $1 == alpha ]] && echo 1 || echo 2)
    [[ $2 == client ]] && echo "${P}v$i" || echo "${P}r$i"
}
mac_of() { ip -n "$(ns_of "$1")" -o link show eth0 | sed -n 's/.*link\/ether \([0-9a-f:]*\).*/\1/p'; }

# --- the configuration (lab-lib's write_config, with these pieces) ---------------------------------
replication_address() { [[ $1 == alpha ]] && echo "$RNET.1" || echo "$RNET.2"; }
cluster_options() {
    ((HB_KEYS)) || return 0
    printf 'heartbeat-port = %s\nheartbeat-interval = %s\nheartbeat-dead-time = %s\n' \
        "$HB_PORT" "$HB_INTERVAL" "$HB_DEAD"
}
node_options() { # the heartbeat on both networks: the replication link and the client network
    ((HB_KEYS)) || return 0
    local i
    i=$([[ $1 == alpha ]] && echo 1 || echo 2)
    echo "heartbeat = [\"$RNET.$i\", \"$CNET.$i\"]"
}

# lab-lib's [resource.r0] lines, then the service keys.
eval "lab_$(declare -f resource_options)"
resource_options() {
    lab_resource_options
    ((SERVICE_KEYS)) || return 0
    printf 'floating-ip = "%s/24"\nmac = "%s"\n' "$FIP" "$AOE_MAC"
}

# --- faults -------------------------------------------------------------------------------------
link() { ip link set "$(hostend "$1" "$2")" "$3"; } # NODE client|repl up|down
repl_cut() { link alpha repl down; link beta repl down; }
repl_heal() { link alpha repl up; link beta repl up; }
# hb_block NODE IFACE...: drop the heartbeat's UDP port (either direction) on those interfaces in
# NODE's namespace; hb_unblock NODE removes it.
hb_block() {
    local n=$1 ifs
    shift
    ifs=$(printf '"%s", ' "$@")
    ip netns exec "$(ns_of "$n")" nft -f - <<EOF
table inet tbf_hb {
    chain input {
        type filter hook input priority 0; policy accept;
        iifname { ${ifs%, } } udp dport $HB_PORT drop
        iifname { ${ifs%, } } udp sport $HB_PORT drop
    }
    chain output {
        type filter hook output priority 0; policy accept;
        oifname { ${ifs%, } } udp dport $HB_PORT drop
        oifname { ${ifs%, } } udp sport $HB_PORT drop
    }
}
EOF
}
hb_unblock() { ip netns exec "$(ns_of "$1")" nft delete table inet tbf_hb 2>/dev/null || true; }
# power_loss NODE: its links go dark from the host side (nothing more leaves or arrives, no
# FIN or RST), then kill -9: what a power loss looks like to the peer and the client.
# Sets $loss_ms (the moment the links went dark, ms since the epoch); $work/off.NODE marks the
# node powered off (it holds nothing, whatever its namespace still has).
power_loss() {
    : >"$work/off.$1"
    loss_ms=$(date +%s%3N)
    link "$1" client down
    link "$1" repl down
    kill -9 "${pid[$1]}"
    wait "${pid[$1]}" 2>/dev/null || true
}
power_back() { # NODE: it boots without the addresses its kernel had (the floating IP), links up, the daemon restarts
    ip -n "$(ns_of "$1")" addr del "$FIP/24" dev eth0 2>/dev/null || true
    link "$1" client up
    link "$1" repl up
    rm -f "$work/off.$1"
    start "$1"
}

# --- the floating IP ----------------------------------------------------------------------------
holds_fip() { # NODE: its namespace has the floating IP on a node not powered off
    # (No `| grep -q`: with pipefail, ip's SIGPIPE after grep's early exit would read as "no".)
    [[ ! -e $work/off.$1 && $(ip -n "$(ns_of "$1")" -4 -o addr show 2>/dev/null) == *" $FIP/"* ]]
}
# fip_start: samples `ip -n NS -4 addr` of both nodes every 100 ms into $work/fip.log
# (`seconds alpha beta`, 1 for a holder); fip_stop ends it; fip_doubles: samples with both.
fip_start() {
    : >"$work/fip.log"
    (
        local a b
        while :; do
            a=0 b=0
            holds_fip alpha && a=1
            holds_fip beta && b=1
            printf '%s %s %s\n' "$(date +%s.%N)" "$a" "$b"
            sleep 0.1
        done
    ) >>"$work/fip.log" 2>/dev/null &
    fippid=$!
    pids+=("$fippid")
}
fip_stop() { kill "$fippid" 2>/dev/null || true; wait "$fippid" 2>/dev/null || true; }
# fip_doubles [FROM [TO]]: samples with two holders (between the epoch seconds FROM and TO)
fip_doubles() {
    awk -v from="${1:-0}" -v to="${2:-1e12}" '$1 >= from && $1 <= to && $2 + $3 > 1 { n++ } END { print n + 0 }' "$work/fip.log"
}
fip_nobody() { awk '$2 + $3 == 0 { n++ } END { print n + 0 }' "$work/fip.log"; }
fip_samples() { wc -l <"$work/fip.log"; }
fip_single() { [[ $(fip_doubles) == 0 ]]; }
# fip_checks SCENARIO WHAT: no sample with two holders (with SERVICE_KEYS=1)
fip_checks() {
    ((SERVICE_KEYS)) || return 0
    check "$1" "$2: never two holders of the floating IP ($(fip_doubles) of $(fip_samples) samples; nobody in $(fip_nobody))" fip_single
}
serving_mac() { # NODE: the MAC its blade answers from (status service-mac=, else its interface's)
    local m
    m=$(field "$1" service-mac 2>/dev/null || true)
    [[ $m =~ ^[0-9a-f]{2}(:[0-9a-f]{2}){5}$ ]] || m=$(mac_of "$1")
    echo "$m"
}

# --- state that must not hang on a stopped node -----------------------------------------------
# qfield NODE KEY: as field, but gives up after 1 s (a SIGSTOPped daemon does not answer).
qfield() {
    timeout 1 "$tb" status --control "$work/$1.sock" r0 --json 2>/dev/null | tr ',{}' '\n\n\n' |
        sed -n "s/^\"$2\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -1
}
qf() { # NODE KEY: qfield, or - when the node does not answer
    local v
    v=$(qfield "$1" "$2" || true)
    echo "${v:--}"
}
primary_node() { # the node that says it is primary (alpha first), or nothing
    local n
    for n in alpha beta; do
        [[ $(qfield "$n" role) == Primary ]] && { echo "$n"; return; }
    done
    true
}
other() { [[ $1 == alpha ]] && echo beta || echo alpha; }
# roles_start: samples both nodes' role and disk state every 0.25 s into $work/roles.log
# (`seconds alpha-role alpha-disk beta-role beta-disk`, `-` when a node does not answer);
# roles_stop ends it. seen NODE ROLE|DISK: was the value ever sampled?
roles_start() {
    (
        while :; do
            printf '%s %s %s %s %s\n' "$(date +%s.%N)" "$(qf alpha role)" "$(qf alpha disk)" \
                "$(qf beta role)" "$(qf beta disk)"
            sleep 0.25
        done
    ) >>"$work/roles.log" 2>/dev/null &
    rolespid=$!
    pids+=("$rolespid")
}
roles_stop() { kill "$rolespid" 2>/dev/null || true; wait "$rolespid" 2>/dev/null || true; }
seen() { # NODE FIELD(role|disk) VALUE
    local col
    col=$([[ $1 == alpha ]] && echo 2 || echo 4)
    [[ $2 == disk ]] && col=$((col + 1))
    awk -v c="$col" -v v="$3" '$c == v { f = 1 } END { exit !f }' "$work/roles.log"
}
role_changes() { # NODE: how many times its sampled role changed (ignoring unanswered samples)
    local col
    col=$([[ $1 == alpha ]] && echo 2 || echo 4)
    awk -v c="$col" '$c != "-" { if (last != "" && $c != last) n++; last = $c } END { print n + 0 }' \
        "$work/roles.log"
}
events_start() { # both nodes' event streams into $work/NODE.events
    local n
    for n in alpha beta; do
        "$tb" events --control "$work/$n.sock" r0 >>"$work/$n.events" 2>&1 &
        pids+=("$!")
    done
}
event_role_changes() { # NODE: `change ... role:` lines in its event stream
    grep -c '^change resource.* role:' "$work/$1.events" 2>/dev/null || true
}

# --- the client side ----------------------------------------------------------------------------
VBLOCKS=${VBLOCKS:-256}
VOFFSET=${VOFFSET:-1M}
RETRANSMIT_MS=${RETRANSMIT_MS:-200}
# clients_start NAME: versioned writes (every acknowledgement logged in $work/NAME.acklog,
# resent after $RETRANSMIT_MS) and probes, in the background.
clients_start() {
    cl=$work/$1
    ip netns exec "$P-c" "$init" -i eth0 versioned "$BLADE" --blocks "$VBLOCKS" --offset "$VOFFSET" \
        --retransmit-ms "$RETRANSMIT_MS" --acks "$cl.acks" --ack-log "$cl.acklog" >"$cl.versioned" 2>&1 &
    vpid=$!
    pids+=("$vpid")
    ip netns exec "$P-c" "$init" -i eth0 probe "$BLADE" --log "$cl.probes" >"$cl.probe" 2>&1 &
    ppid=$!
    pids+=("$ppid")
    sleep 1
    kill -0 "$vpid" 2>/dev/null || fail "versioned ended at once: $(cat "$cl.versioned")"
    kill -0 "$ppid" 2>/dev/null || fail "probe ended at once: $(cat "$cl.probe")"
}
kv() { sed -n "s/.*\<$2=\([^ ]*\).*/\1/p" "$1" | tail -1; } # FILE KEY
clients_stop() {
    kill -TERM "$vpid" "$ppid" 2>/dev/null || true
    vrc=0
    wait "$vpid" || vrc=$?
    wait "$ppid" || true
    acked=$(kv "$cl.versioned" acked)
    stall_max=$(kv "$cl.versioned" stall_max_ms)
    stall_p50=$(kv "$cl.versioned" stall_p50_ms)
    gaps=$(kv "$cl.versioned" gaps_over_500ms)
    errors=$(kv "$cl.versioned" errors)
    vdouble=$(kv "$cl.versioned" double_answers)
    vstarted=$(kv "$cl.versioned" started_unix_ms)
    probes=$(kv "$cl.probe" probes)
    two=$(kv "$cl.probe" two)
    two_macs=$(kv "$cl.probe" two_macs)
    same_mac=$(kv "$cl.probe" same_mac)
    log "client: $(grep -h 'acked=' "$cl.versioned" | cut -c1-300)"
    log "probe: $(grep -h 'probes=' "$cl.probe")"
    [[ -n $acked && -n $two && -n $vdouble ]] || fail "no summary from the clients: $(tail -3 "$cl.versioned" "$cl.probe")"
}
# verify_versions NAME: the device (whichever node answers) holds every acknowledged version.
verify_versions() {
    ip netns exec "$P-c" "$init" -i eth0 verify-versions "$BLADE" --acks "$work/$1.acks" \
        >"$work/$1.verify" 2>&1
    local rc=$?
    log "verify: $(head -1 "$work/$1.verify")"
    return "$rc"
}
# restoration NAME LOSS-MS: from LOSS-MS (ms since the epoch) to the first write acknowledged
# after it, in ms, and whether it came from the MAC of the last acknowledgement before it:
# `MS same|new MAC-BEFORE MAC-AFTER`, or `none` if nothing was acknowledged after the loss.
restoration() {
    awk -v start="$vstarted" -v loss="$2" '
        { t = start + $1 }
        t <= loss { before = $4; next }
        { printf "%d %s %s %s\n", t - loss, ($4 == before ? "same" : "new"), (before == "" ? "-" : before), $4; found = 1; exit }
        END { if (!found) print "none" }' "$work/$1.acklog"
}
disks_identical() { cmp -n "$usable" "$work/alpha.img" "$work/beta.img"; }

# --- results ------------------------------------------------------------------------------------
# record SCENARIO WHAT RESULT [DETAIL]: a line of the summary table ($summary, shared by all
# scenarios). check SCENARIO WHAT COMMAND...: run COMMAND, record PASS or FAIL; on FAIL the
# scenario fails at its end, with the daemons' log tails.
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$summary"; }
check() {
    local sc=$1 what=$2
    shift 2
    if "$@"; then
        record "$sc" "$what" PASS
    else
        record "$sc" "$what" FAIL
        log "FAIL [$sc] $what"
        failures=$((failures + 1))
    fi
}
# wait_check SCENARIO SECONDS WHAT COMMAND...: check that COMMAND succeeds within SECONDS.
wait_check() {
    local sc=$1 secs=$2 what=$3 _
    shift 3
    for _ in $(seq $((secs * 4))); do
        if "$@" >/dev/null 2>&1; then
            record "$sc" "$what" PASS
            return 0
        fi
        sleep 0.25
    done
    log "$(states alpha)"
    log "$(states beta)"
    check "$sc" "$what (waited ${secs}s)" false
    return 1
}
info() { record "$1" "$2" INFO "$3"; log "[$1] $2: $3"; } # SCENARIO WHAT FIGURES

# --- what the scenario scripts share ----------------------------------------------------------------
# parse_scenarios ARGS...: --keep, -h/--help (the script's header) and scenario names from $all
# into $scenarios (all of them when none is named). For scripts with no options of their own.
parse_scenarios() {
    scenarios=()
    while (($#)); do
        case $1 in
        --keep) keep=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*) echo "${0##*/}: unknown argument: $1" >&2; exit 2 ;;
        *)
            [[ " ${all[*]} " == *" $1 "* ]] || { echo "${0##*/}: unknown scenario: $1 (${all[*]})" >&2; exit 2; }
            scenarios+=("$1")
            ;;
        esac
        shift
    done
    ((${#scenarios[@]})) || scenarios=("${all[@]}")
}
pair_fresh() { # a new pair: fresh disks, alpha primary, initial sync done
    write_config
    create_md $((64 << 20))
    pair_up
    wait_for 60 "initial sync" settled
}
# After clients_stop:
no_two_answers() { [[ $two == 0 && $vdouble == 0 ]]; }
client_ok() { [[ $vrc == 0 ]]; }
served_something() { ((acked > 0)); }
