# shellcheck shell=bash
# The pair of the Pacemaker agent's tests (sourced by ocf.sh and ocf-cluster.sh, not run): lab-lib.sh
# with its network replaced by two networks and no client namespace:
#
#   client network      bridge ${P}br0: alpha ${P}-a eth0 10.78.$NET.1, beta ${P}-b eth0 .2
#   replication network bridge ${P}br1: alpha eth1 192.168.$NET.1, beta eth1 .2 (`address`)
#
# Host ends of the veths: ${P}v1 ${P}v2 (client), ${P}r1 ${P}r2 (replication). The heartbeat
# runs on both networks.

# shellcheck source=initiator-tests/lab-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab-lib.sh"

CNET=10.78.$NET RNET=192.168.$NET
# --- the network: alpha and beta on a client and a replication bridge (replaces lab-lib's) -----
net_down() {
    local ns i
    for ns in "$P-a" "$P-b"; do ip netns del "$ns" 2>/dev/null || true; done
    for i in v1 v2 r1 r2; do ip link del "${P}$i" 2>/dev/null || true; done
    ip link del "${P}br0" 2>/dev/null || true
    ip link del "${P}br1" 2>/dev/null || true
}
veth() { # NAMESPACE HOST-END INSIDE-NAME BRIDGE ADDRESS
    ip link add "$2" type veth peer name "$3" netns "$1"
    ip link set "$2" master "$4" up
    ip -n "$1" link set "$3" up
    ip -n "$1" addr add "$5/24" dev "$3"
}
net_up() {
    net_down
    local br ns
    for br in "${P}br0" "${P}br1"; do
        ip link add "$br" type bridge
        ip link set "$br" up
    done
    for ns in "$P-a" "$P-b"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    veth "$P-a" "${P}v1" eth0 "${P}br0" "$CNET.1"
    veth "$P-b" "${P}v2" eth0 "${P}br0" "$CNET.2"
    veth "$P-a" "${P}r1" eth1 "${P}br1" "$RNET.1"
    veth "$P-b" "${P}r2" eth1 "${P}br1" "$RNET.2"
}
replication_address() { [[ $1 == alpha ]] && echo "$RNET.1" || echo "$RNET.2"; }
node_options() { # the heartbeat on both networks
    local i
    i=$([[ $1 == alpha ]] && echo 1 || echo 2)
    echo "heartbeat = [\"$RNET.$i\", \"$CNET.$i\"]"
}
