#!/usr/bin/env bash
# Runs every cargo-fuzz target under src/fuzz for a short time (default 30 s each).
# Usage: initiator-tests/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
if ! cargo +nightly fuzz --help >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
failed=0
for target in $(cargo +nightly fuzz list --fuzz-dir src/fuzz); do
    echo "fuzz.sh: $target for ${seconds}s"
    if ! cargo +nightly fuzz run --fuzz-dir src/fuzz "$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 >"/tmp/fuzz-$target.log" 2>&1; then
        echo "fuzz.sh: $target FAILED"; tail -40 "/tmp/fuzz-$target.log"; failed=1
    else
        grep -E "^Done|#[0-9]+.*DONE" "/tmp/fuzz-$target.log" | tail -1 || true
    fi
done
exit "$failed"
