#!/usr/bin/env bash
# A two-node Pacemaker + Corosync cluster in network namespaces driving the resource agent
# (appliance/ocf/twinblade) as a promotable clone, through a failover:
#
#   1. the pair's initial sync is done without the cluster (both UpToDate, both Secondary,
#      auto-promote = false: the external-manager mode), then each node runs corosync and
#      pacemakerd in its namespace (a mount and UTS namespace of its own: host name alpha or
#      beta, its own pids, private /var/lib/pacemaker, /etc/corosync, /dev/shm, /run, and the agent
#      under /usr/lib/ocf/resource.d/twinblade)
#   2. Pacemaker starts the clone on both nodes and promotes exactly one: one twinblade Primary,
#      the other Secondary
#   3. the Primary's node loses power (its links down, then corosync, pacemaker and twinblade
#      killed): Pacemaker on the survivor promotes its instance, and the survivor serves
#
# STONITH is disabled (no fence device in the lab) and quorum is corosync's two_node.
# Usage: initiator-tests/ocf-cluster.sh [--keep]
# Needs root, pacemaker and corosync; uses namespaces tbo-a, tbo-b and bridges tbobr0, tbobr1
# (as ocf.sh: run one at a time).
set -euo pipefail

P=tbo NET=88 TAG=ocf-cluster BLADE=e8.9 EXTRA_RESOURCE='auto-promote = false'
# shellcheck source=initiator-tests/ocf-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/ocf-lib.sh"

for t in corosync pacemakerd cibadmin crm_mon nsenter unshare; do
    command -v "$t" >/dev/null || { log "FAIL: $t not installed (packages pacemaker, corosync)"; exit 1; }
done

declare -A leader # NODE: the pid of the node's cluster shell (its mount/UTS namespaces)
eval "lab_$(declare -f cleanup)"
cleanup() {
    local rc=$? n p
    set +e
    for n in alpha beta; do
        [[ -n ${leader[$n]:-} ]] || continue
        # Everything in the node's namespaces: pacemaker, corosync, the agent's daemon.
        for p in $(node_pids "$n"); do kill -9 "$p" 2>/dev/null; done
    done
    (exit "$rc")
    lab_cleanup
}
node_pids() { # NODE: the processes in the node's mount namespace (its cluster shell's)
    local want p
    want=$(readlink "/proc/${leader[$1]}/ns/mnt" 2>/dev/null) || return 0
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$want" ]] && echo "${p#/proc/}"
    done
}
on() { # NODE COMMAND...: in the node's namespaces (network, mount, UTS)
    local n=$1
    shift
    nsenter --target "${leader[$n]}" --net --mount --uts "$@"
}

lab_up
write_config
create_md $((32 << 20))

# --- 1. the initial sync without the cluster --------------------------------------------------------
pair_up
wait_for 60 "initial sync" settled
ctl alpha secondary r0 >/dev/null || fail "alpha refused to demote"
wait_for 5 "alpha Secondary" state_is alpha role Secondary
stop alpha
stop beta
pids=()
log "initial sync done; both Secondary and stopped"

# --- the cluster ----------------------------------------------------------------------------------
cat >"$work/corosync.conf" <<EOF
totem {
    version: 2
    cluster_name: tbo
    transport: knet
    crypto_cipher: none
    crypto_hash: none
}
nodelist {
    node {
        ring0_addr: $RNET.1
        name: alpha
        nodeid: 1
    }
    node {
        ring0_addr: $RNET.2
        name: beta
        nodeid: 2
    }
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_stderr: yes
    to_syslog: no
    to_logfile: no
    timestamp: on
}
EOF
for n in alpha beta; do
    root=$work/$n-root
    mkdir -p "$root"/{pacemaker/{cib,pengine,blackbox,cores},corosync-lib,corosync-etc,log,run-twinblade,run-pcmk}
    cp "$work/corosync.conf" "$root/corosync-etc/corosync.conf"
    cp -a /usr/lib/ocf/resource.d "$root/ocf"
    install -D -m 755 "$repo/appliance/ocf/twinblade" "$root/ocf/twinblade/twinblade"
    chown -R hacluster:haclient "$root/pacemaker" "$root/log"
    ns=$(ns_of "$n")
    # shellcheck disable=SC2016 # expanded by the node's shell
    ip netns exec "$ns" unshare --mount --uts --pid --fork --mount-proc --propagation private bash -c '
        set -e
        root=$1
        hostname "$2"
        mount --bind "$root/pacemaker" /var/lib/pacemaker
        mount --bind "$root/corosync-lib" /var/lib/corosync
        mount --bind "$root/corosync-etc" /etc/corosync
        mount --bind "$root/log" /var/log/pacemaker
        mount --bind "$root/ocf" /usr/lib/ocf/resource.d
        mount -t tmpfs tmpfs /run # corosync.pid and the like: one node each
        mkdir -p /run/twinblade /run/pacemaker
        mount --bind "$root/run-twinblade" /run/twinblade
        mount --bind "$root/run-pcmk" /run/pacemaker
        mount -t tmpfs tmpfs /dev/shm
        corosync -f >"$root/corosync.log" 2>&1 &
        sleep 1
        pacemakerd -f >"$root/pacemakerd.log" 2>&1 &
        wait
    ' node "$root" "$n" &
    disown # its end (SIGKILL at cleanup) is no news
    # The node's shell, inside the namespaces (unshare --fork's child).
    for _ in $(seq 50); do
        leader[$n]=$(cat "/proc/$!/task/$!/children" 2>/dev/null | awk '{print $1}')
        [[ -n ${leader[$n]} ]] && break
        sleep 0.1
    done
    [[ -n ${leader[$n]} ]] || fail "$n's cluster shell did not start"
done
for n in alpha beta; do
    wait_for 60 "$n's cluster is up" on "$n" crm_mon -1 -Q
done
both_online() { on alpha crm_mon -1 | grep -q 'Online: \[ alpha beta \]'; }
wait_for 90 "both nodes online" both_online
log "cluster up: $(on alpha crm_mon -1 | grep Online)"

on alpha crm_attribute -t crm_config -n stonith-enabled -v false
on alpha crm_attribute -t crm_config -n no-quorum-policy -v ignore
on alpha cibadmin -C -o resources -X "
<clone id=\"tb-r0-clone\">
  <meta_attributes id=\"tb-r0-clone-meta\">
    <nvpair id=\"tb-r0-clone-promotable\" name=\"promotable\" value=\"true\"/>
    <nvpair id=\"tb-r0-clone-promoted-max\" name=\"promoted-max\" value=\"1\"/>
    <nvpair id=\"tb-r0-clone-clone-max\" name=\"clone-max\" value=\"2\"/>
    <nvpair id=\"tb-r0-clone-notify\" name=\"notify\" value=\"true\"/>
  </meta_attributes>
  <primitive id=\"tb-r0\" class=\"ocf\" provider=\"twinblade\" type=\"twinblade\">
    <instance_attributes id=\"tb-r0-params\">
      <nvpair id=\"tb-r0-config\" name=\"config\" value=\"$cfg\"/>
      <nvpair id=\"tb-r0-resource\" name=\"resource\" value=\"r0\"/>
      <nvpair id=\"tb-r0-binary\" name=\"binary\" value=\"$tb\"/>
      <nvpair id=\"tb-r0-logfile\" name=\"logfile\" value=\"/run/twinblade/twinblade.log\"/>
    </instance_attributes>
    <operations>
      <op id=\"tb-r0-mon-u\" name=\"monitor\" interval=\"3s\" role=\"Unpromoted\" timeout=\"20s\"/>
      <op id=\"tb-r0-mon-p\" name=\"monitor\" interval=\"2s\" role=\"Promoted\" timeout=\"20s\"/>
      <op id=\"tb-r0-start\" name=\"start\" interval=\"0s\" timeout=\"60s\"/>
    </operations>
  </primitive>
</clone>"

tbctl() { # NODE VERB...: the node's daemon (the agent's default control socket, in its /run)
    local n=$1
    shift
    "$tb" "$1" --control "$work/$n-root/run-twinblade/control.sock" "${@:2}"
}
role_of() { tbctl "$1" status r0 2>/dev/null | sed -n '1s/.* role:\([A-Za-z]*\).*/\1/p'; }
one_primary() {
    local a b
    a=$(role_of alpha) b=$(role_of beta)
    [[ "$a$b" == PrimarySecondary || "$a$b" == SecondaryPrimary ]]
}
# --- 2. one Primary ------------------------------------------------------------------------------
wait_for 120 "Pacemaker promotes exactly one node" one_primary
primary=$([[ $(role_of alpha) == Primary ]] && echo alpha || echo beta)
survivor=$([[ $primary == alpha ]] && echo beta || echo alpha)
log "PASS Pacemaker promoted $primary; $survivor is Secondary"
on alpha crm_mon -1 -A >&2 || true

# --- 3. failover -----------------------------------------------------------------------------------
i=$([[ $primary == alpha ]] && echo 1 || echo 2)
ip link set "${P}v$i" down
ip link set "${P}r$i" down
for p in $(node_pids "$primary"); do kill -9 "$p" 2>/dev/null || true; done
log "$primary lost power"
is_primary() { [[ $(role_of "$1") == Primary ]]; }
wait_for 120 "Pacemaker promotes $survivor" is_primary "$survivor"
grep -q "promote operation tb-r0_promote_0 .*on $survivor" "$work/$survivor-root/log/pacemaker.log" ||
    fail "$survivor is Primary, but Pacemaker's log has no promote of it"
! grep -q 'auto-promote:' "$work/$survivor-root/run-twinblade/twinblade.log" ||
    fail "$survivor promoted itself (auto-promote), not Pacemaker"
log "PASS failover: Pacemaker promoted $survivor"
on "$survivor" crm_mon -1 -A >&2 || true
log "PASS all"
