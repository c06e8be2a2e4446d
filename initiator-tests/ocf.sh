#!/usr/bin/env bash
# The Pacemaker resource agent (appliance/ocf/twinblade) on a real pair, without a cluster: beta
# runs `twinblade run` as usual, alpha is driven by the agent alone, both with auto-promote =
# false (the external-manager mode). A stub crm_attribute/crm_master on PATH records the
# promotion scores the agent sets.
#
#   1. meta-data is valid against ra-api-1.dtd; validate-all passes, warns when the resource has
#      auto-promote = true, and fails for a missing file (5) or an unknown resource (6)
#   2. monitor is 7 before start; start runs the daemon, Secondary: monitor 0
#   3. fresh (Inconsistent) data: promote is refused (1), alpha stays Secondary, and no score
#      is set (only removed)
#   4. a resync target (paused; beta `primary --force`, then `secondary`): promote refused, no
#      score, though `twinblade primary` itself would accept it; after the initial sync, monitor
#      sets a score (master-RESOURCE, lifetime reboot, this node); promote: monitor 8 and alpha
#      Primary; demote: monitor 0 and alpha Secondary
#  4b. alpha Primary, its disk fails (reads) while beta, invalidated, pulls everything: alpha is
#      Diskless with no UpToDate peer: monitor 9 (failed promoted); a stop and start reattach it
#   5. restarted without its peer, the data is only Consistent: promote refused, no score; stop
#      removes the score; with the peer back, UpToDate and scored again
#   6. ocf-tester (resource-agents) passes: meta-data, validate-all, start, monitor, notify,
#      promote, demote, stop, each repeated where the OCF API wants it idempotent
#   7. daemon_unit mode (the daemon run by a service manager): start and stop leave the daemon
#      running; monitor is 7 after stop all the same
#
# Usage: initiator-tests/ocf.sh [--keep]
# Needs root, ocf-tester and xmllint (packages resource-agents, libxml2-utils); uses namespaces
# tbo-a, tbo-b and bridges tbobr0 (client network), tbobr1 (replication network), nothing else.
set -euo pipefail

# The initial sync is slowed down (4 MiB/s over 32 MiB of random data), so a resync target
# can be caught mid-way.
P=tbo NET=88 TAG=ocf BLADE=e8.8 EXTRA_RESOURCE='auto-promote = false
resync-rate-max = "4M"
resync-rate-min = "1M"'

# shellcheck source=initiator-tests/ocf-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/ocf-lib.sh"

# The daemon the agent started is not in lab-lib's pids: end it too (by its pid file).
eval "lab_$(declare -f cleanup)"
cleanup() {
    local rc=$? p
    set +e
    if [[ -n ${work:-} && -r $work/alpha.pid ]]; then
        p=$(cat "$work/alpha.pid")
        [[ -z $p ]] || kill -9 "$p" 2>/dev/null || true
    fi
    [[ -z ${radir:-} ]] || rm -rf "$radir"
    (exit "$rc")
    lab_cleanup
}

# running NODE: alpha's daemon is the agent's (its pid file) unless lab-lib started it.
running() {
    local p
    if [[ $1 == alpha && -z ${pid[alpha]:-} ]]; then
        p=$(cat "$work/alpha.pid" 2>/dev/null) && [[ -n $p ]] && kill -0 "$p" 2>/dev/null
    else
        kill -0 "${pid[$1]}" 2>/dev/null
    fi
}

command -v ocf-tester >/dev/null || { log "FAIL: ocf-tester not installed (package resource-agents)"; exit 1; }
command -v xmllint >/dev/null || { log "FAIL: xmllint not installed (package libxml2-utils)"; exit 1; }

lab_up
write_config
create_md $((32 << 20))
head -c "$usable" /dev/urandom >"$work/beta.img" # beta's data counts (external meta-data)

# The agent, where ocf-tester's permission check (meta-data as user nobody) can reach it.
radir=$(mktemp -d /tmp/tbo-ra.XXXXXX)
chmod 755 "$radir"
install -m 755 "$repo/appliance/ocf/twinblade" "$radir/twinblade"
agent=$radir/twinblade
# Stub cluster tools: each call's arguments, one line, in $work/crm.log.
mkdir "$work/stubs"
for t in crm_attribute crm_master; do
    printf '#!/bin/sh\necho "%s $*" >>%s\n' "$t" "$work/crm.log" >"$work/stubs/$t"
    chmod 755 "$work/stubs/$t"
done
touch "$work/crm.log"
crm_node=$(uname -n)

# ra ACTION [VAR=VALUE...]: the agent in alpha's namespace as Pacemaker runs it; its output
# (stdout and stderr) goes to $work/ra.out (and is appended to $work/ra.log).
ra() {
    local action=$1 rc=0
    shift
    ip netns exec "$P-a" env PATH="$work/stubs:$PATH" OCF_ROOT=/usr/lib/ocf HA_LOGFACILITY=none \
        OCF_RESOURCE_INSTANCE=tb-r0:0 OCF_RESKEY_CRM_meta_timeout=60000 \
        OCF_RESKEY_config="$cfg" OCF_RESKEY_resource=r0 OCF_RESKEY_node=alpha \
        OCF_RESKEY_binary="$tb" OCF_RESKEY_control="$work/alpha.sock" \
        OCF_RESKEY_logfile="$work/alpha.log" OCF_RESKEY_pidfile="$work/alpha.pid" \
        TWINBLADE_TEST_FAULTS=1 "$@" "$agent" "$action" >"$work/ra.out" 2>&1 || rc=$?
    echo "--- $action $* -> $rc" >>"$work/ra.log"
    cat "$work/ra.out" >>"$work/ra.log"
    return "$rc"
}
# expect RC ACTION [VAR=VALUE...]: the agent's action exits with RC.
expect() {
    local want=$1 rc=0
    shift
    ra "$@" || rc=$?
    ((rc == want)) || {
        cat "$work/ra.out" >&2
        fail "agent $*: exit status $rc, expected $want"
    }
}
mark() { wc -l <"$work/crm.log"; }
scores_since() { tail -n +$(($1 + 1)) "$work/crm.log"; } # MARK: the stub calls since MARK
no_score_since() { # MARK WHY: no score was set since MARK
    ! scores_since "$1" | grep -q -- ' -v ' || {
        scores_since "$1" >&2
        fail "a promotion score was set for $2"
    }
}
score_is() { # VALUE: the last stub call set VALUE for this resource on this node, until reboot
    local last
    last=$(tail -n 1 "$work/crm.log")
    [[ $last == "crm_attribute -Q -N $crm_node -n master-tb-r0 -l reboot -v $1" ]] ||
        fail "the last score call was '$last', expected score $1"
}
score_removed() { # the last stub call removed the score
    local last
    last=$(tail -n 1 "$work/crm.log")
    [[ $last == "crm_attribute -Q -N $crm_node -n master-tb-r0 -l reboot -D" ]] ||
        fail "the last score call was '$last', expected the score removed"
}

# --- 1. meta-data, validate-all ------------------------------------------------------------------
ra meta-data || fail "meta-data failed"
(cd /usr/share/resource-agents && xmllint --noout --valid - <"$work/ra.out") ||
    fail "meta-data does not validate against ra-api-1.dtd"
expect 0 validate-all
! grep -q auto-promote "$work/ra.out" || fail "validate-all warned about auto-promote although it is off"
grep -v '^auto-promote' "$cfg" >"$work/auto.toml"
expect 0 validate-all OCF_RESKEY_config="$work/auto.toml"
grep -q 'auto-promote = true' "$work/ra.out" || fail "validate-all did not warn about auto-promote = true"
expect 5 validate-all OCF_RESKEY_config="$work/missing.toml"
expect 6 validate-all OCF_RESKEY_resource=r9
sed 's/^port = 7788$/port = "seventy"/' "$cfg" >"$work/bad.toml"
expect 6 validate-all OCF_RESKEY_config="$work/bad.toml"
log "PASS meta-data and validate-all"

# --- 2. start ---------------------------------------------------------------------------------
expect 7 monitor
start beta
expect 0 start
state_is alpha connection Connected || fail "start returned before the peer connected"
expect 0 monitor
state_is alpha role Secondary || fail "alpha is not Secondary after start"
log "PASS start: Secondary, monitor 0"

# --- 3. Inconsistent data: no promotion, no score ---------------------------------------------
m=$(mark)
state_is alpha disk Inconsistent || fail "alpha's fresh disk is $(field alpha disk), expected Inconsistent"
expect 1 promote
grep -q 'not UpToDate' "$work/ra.out" || fail "promote did not say why it refused"
state_is alpha role Secondary || fail "alpha was promoted with Inconsistent data"
expect 0 monitor
no_score_since "$m" "Inconsistent data"
score_removed
log "PASS Inconsistent: promote refused (1), no score"

# A resync target, which `twinblade primary` would promote (reading from its UpToDate peer), is
# not promoted by the cluster either.
ctl beta primary r0 --force >/dev/null || fail "primary --force on beta refused"
wait_for 10 "alpha a resync target" state_is alpha replication SyncTarget
ctl alpha pause-sync r0 >/dev/null || fail "pause-sync refused"
ctl beta secondary r0 >/dev/null || fail "beta refused to demote"
wait_for 5 "beta Secondary" state_is beta role Secondary
m=$(mark)
expect 1 promote
grep -q 'Inconsistent, not UpToDate' "$work/ra.out" || fail "promote of a resync target: $(cat "$work/ra.out")"
state_is alpha role Secondary || fail "alpha was promoted as a resync target"
expect 0 monitor
no_score_since "$m" "a resync target"
score_removed
ctl alpha resume-sync r0 >/dev/null || fail "resume-sync refused"
log "PASS resync target: promote refused (1), no score"

# --- 4. UpToDate: score, promote, demote ----------------------------------------------------------
wait_for 60 "initial sync" settled
expect 0 monitor
score_is 10000
expect 0 promote
state_is alpha role Primary || fail "alpha is not Primary after promote"
expect 8 monitor
score_is 10000
expect 0 promote
expect 0 demote
state_is alpha role Secondary || fail "alpha is not Secondary after demote"
expect 0 monitor
expect 0 demote
log "PASS UpToDate: score 10000, promote (monitor 8), demote (monitor 0)"

# --- 4b. failed promoted: alpha Primary, its disk fails while beta has nothing usable ------------
expect 0 promote
ctl alpha fault r0 read-error >/dev/null || fail "fault injection refused"
ctl beta invalidate r0 >/dev/null || fail "invalidate on beta refused" # alpha must read it all
wait_for 20 "alpha's disk detached" state_is alpha disk Diskless
expect 9 monitor
log "PASS Primary without usable data: monitor 9"
ctl alpha fault r0 clear >/dev/null || fail "fault clear refused"
expect 0 stop # a restart attaches the disk again
expect 0 start
wait_for 60 "resync after the detach" settled

# --- 5. Consistent (the peer unknown): no promotion, no score; stop removes it -------------------
stop beta
apid=$(cat "$work/alpha.pid")
expect 0 stop
score_removed
expect 7 monitor
! kill -0 "$apid" 2>/dev/null || fail "the daemon (pid $apid) still runs after stop"
[[ ! -e $work/alpha.pid ]] || fail "stop left the pid file"
m=$(mark)
expect 0 start OCF_RESKEY_wfc_timeout=1
[[ $(field alpha disk) != UpToDate ]] || fail "alpha is UpToDate without its peer"
log "alpha restarted alone: disk $(field alpha disk)"
expect 1 promote
expect 0 monitor
no_score_since "$m" "$(field alpha disk) data"
start beta
wait_for 15 "alpha UpToDate with its peer" state_is alpha disk UpToDate
expect 0 monitor
score_is 10000
log "PASS Consistent: promote refused, no score; stop removes the score"

# --- 6. ocf-tester -------------------------------------------------------------------------------
rc=0
ip netns exec "$P-a" env PATH="$work/stubs:$PATH" TWINBLADE_TEST_FAULTS=1 \
    ocf-tester -n tb-r0 -o config="$cfg" -o resource=r0 -o node=alpha -o binary="$tb" \
    -o control="$work/alpha.sock" -o logfile="$work/alpha.log" -o pidfile="$work/alpha.pid" \
    "$agent" >"$work/ocf-tester.out" 2>&1 || rc=$?
sed 's/^/ocf-tester: /' "$work/ocf-tester.out" >&2
((rc == 0)) || fail "ocf-tester failed ($rc)"
grep -q 'passed all tests' "$work/ocf-tester.out" || fail "ocf-tester did not pass all tests"
expect 7 monitor
log "PASS ocf-tester"

# --- 7. daemon_unit: a service manager runs the daemon ----------------------------------------------
start alpha
wait_for 15 "alpha UpToDate with its peer" state_is alpha disk UpToDate
expect 7 monitor OCF_RESKEY_daemon_unit=twinblade.service
expect 0 start OCF_RESKEY_daemon_unit=twinblade.service
expect 0 promote OCF_RESKEY_daemon_unit=twinblade.service
expect 8 monitor OCF_RESKEY_daemon_unit=twinblade.service
expect 0 stop OCF_RESKEY_daemon_unit=twinblade.service
running alpha || fail "stop in daemon_unit mode ended the daemon"
state_is alpha role Secondary || fail "stop in daemon_unit mode did not demote"
expect 7 monitor OCF_RESKEY_daemon_unit=twinblade.service
expect 0 stop OCF_RESKEY_daemon_unit=twinblade.service
log "PASS daemon_unit: the daemon outlives stop; monitor 7 after it"

log "PASS all"
