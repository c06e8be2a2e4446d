#!/usr/bin/env bash
# Run every test: the one command for developers and CI (.ci/run calls exactly this).
#
# Usage: initiator-tests/all.sh [--target twinblade|vblade]
#
#   --target   AoE target the initiator tests run against (default twinblade; vblade is the
#              reference implementation, useful to tell a test bug from a target bug)
#
# Steps run in order and all of them run even after a failure (each result is useful on its
# own); a summary with timings comes last. Exit status is non-zero if any step failed.
# Needs root (namespaces, bridge, taps) and the packages .ci/run installs.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=twinblade
while (($#)); do
    case $1 in
    --target) target=${2:?--target needs a value}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "all.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
cd "$repo"

declare -a names=() results=() times=()
failed=0

# step NAME COMMAND...: run one step, record its result and wall time.
step() {
    local name=$1 t0 t1 rc
    shift
    printf '\n===== %s: %s\n' "$name" "$*"
    t0=$(date +%s.%N)
    set +e
    # Each step's output is kept too: a failed step's tail is repeated after the summary, so a
    # log cut to its last lines still says why.
    "$@" 2>&1 | tee "$step_logs/${#names[@]}.log"
    rc=${PIPESTATUS[0]}
    set -e
    t1=$(date +%s.%N)
    names+=("$name")
    times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')")
    if ((rc == 0)); then
        results+=(PASS)
    else
        results+=("FAIL ($rc)")
        failed=1
    fi
    printf '===== %s: %s\n' "$name" "${results[-1]}"
}

t_all=$(date +%s.%N)
step_logs=$(mktemp -d /tmp/twinblade-all.XXXXXX)

# --- Rust: build and the unit/integration tests of the whole workspace. ------------------------------
step "cargo build" cargo build --release --workspace
step "cargo test" cargo test --release --workspace

# --- Fuzzing: a short cargo-fuzz run of every parser (nightly toolchain). ---------------------------
step "fuzz" initiator-tests/fuzz.sh "${TWINBLADE_FUZZ_SECONDS:-30}"

# --- NBD: real clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio's nbd engine) on loopback. -------
step "nbd clients" initiator-tests/nbd-clients.sh --target "$target"

# --- Two real nodes (`twinblade run`) in namespaces: sync, failover, kill -9, split brain. --------
step "replicated pair" initiator-tests/replication.sh
step "resync and verify" initiator-tests/resync.sh
# Power cuts (volatile write cache under both nodes): durability=power keeps every acknowledged
# write; durability=node provably loses some, so the check bites.
step "power cut" initiator-tests/power-cut.sh
# The model test: seeded random writes, link cuts, slow and failing disks; the device and both
# disks must equal a model image. The seed is printed (rerun with --seed N).
step "chaos model" initiator-tests/chaos.sh ${TWINBLADE_CHAOS_SEED:+--seed "$TWINBLADE_CHAOS_SEED"}
# Failover without split brain (issue 13): two networks (client + replication), a client that
# writes versioned blocks over every answering MAC, a probe counting two-answer moments; link
# cut, power loss, freeze, heartbeat path cuts, a rogue responder and a soak on a busy machine.
step "failover" initiator-tests/failover.sh --soak-seconds "${TWINBLADE_SOAK_SECONDS:-600}"
# Third votes in namespaces: the client network split in two halves with the replication link
# cut, two clients writing, with a witness (exactly one serves) and without (the split brain
# README warns of); the witness restarted mid-failover, unreachable from one node, shared by two
# pairs; on-no-quorum's EIO for NBD after its bound.
step "network split" initiator-tests/split.sh
# Ping targets: the primary's client network cut, the replication link up: a planned switchover
# to the node that reaches more, nothing lost, no failback when the network returns.
step "ping targets" initiator-tests/ping.sh
# Placement: two resources active/active (alpha serves e9.1, beta e9.2), a power loss, the
# auto-failback of the returning node, `twinblade switchover` both ways; two clients writing.
step "placement" initiator-tests/placement.sh
# The Pacemaker resource agent on a real pair (no cluster): ocf-tester, monitor 0/7/8, promote
# refused unless UpToDate, promotion scores only for UpToDate data (a stub crm_attribute).
step "ocf agent" initiator-tests/ocf.sh
# The same agent under a real two-node Pacemaker + Corosync cluster in namespaces: one Primary,
# then a power loss of its node and the promotion of the survivor, decided by Pacemaker.
step "ocf cluster" initiator-tests/ocf-cluster.sh

# --- Real Linux aoe driver in a VM, at both MTUs. ------------------------------------------------
step "vm build" initiator-tests/vm/build.sh
step "linux-aoe mtu 1500 ($target)" initiator-tests/linux-aoe.sh --mtu 1500 --target "$target"
step "linux-aoe mtu 9000 ($target)" initiator-tests/linux-aoe.sh --mtu 9000 --target "$target"
# The same driver test against the appliance: e0.3 from the replicated pair; the host checks that
# both nodes' disks hold what the guest wrote.
step "linux-aoe mtu 9000 (pair)" initiator-tests/linux-aoe.sh --mtu 9000 --target pair
# The driver through the pair's failovers (issue 14): power loss of the primary during dd and on a
# mounted ext4, switchover and back, kill -9, NBD on the floating IP, one floating-IP holder.
step "linux failover (pair)" initiator-tests/linux-failover.sh

# --- Summary. ------------------------------------------------------------------------------------
total=$(awk -v a="$t_all" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
printf '\n===== summary (target %s)\n' "$target"
for i in "${!names[@]}"; do
    printf '  %-32s %-10s %8ss\n' "${names[$i]}" "${results[$i]}" "${times[$i]}"
done
printf '  %-32s %-10s %8ss\n' total "$( ((failed)) && echo FAIL || echo PASS)" "$total"
for i in "${!names[@]}"; do
    [[ ${results[$i]} == PASS ]] && continue
    printf '\n===== the end of what %s printed\n' "${names[$i]}"
    tail -n 40 "$step_logs/$i.log"
done
passed=0
for r in "${results[@]}"; do [[ $r == PASS ]] && passed=$((passed + 1)); done
echo "all.sh: $passed passed, $((${#results[@]} - passed)) failed"
exit "$failed"
