#!/usr/bin/env bash
# Store client benchmark, ours vs upstream, back to back on this host:
#   scripts/bench_store.sh [FLAGS...]
# runs `mooncake_store_bench --mode client FLAGS` (ours), then
# `tests/interop/store_bench_upstream.py FLAGS` (upstream's wheel), prints both tables and a comparison of the rows
# both have (ours / upstream; upstream is TCP only, so ours' remote rows of both transports are compared with its
# remote tcp rows). FLAGS both understand: --placement --transport --sizes --batches --ops --duration --min_calls
# --read_keys --segment_size --max_batch_bytes --local_buffer_size (e.g. --sizes=4KiB,1MiB --duration=2).
# Environment: CARGO_TARGET_DIR (default target), UPSTREAM_VENV (default target/upstream-venv; created with
# tests/interop/setup_upstream_venv.sh when missing), SKIP_BUILD=1 to use the built binaries as they are.
# Each program stops the processes it starts (master, store node) by PID; this script stops the program it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
VENV="${UPSTREAM_VENV:-target/upstream-venv}"
LOG=$(mktemp -d /tmp/mc-bench-store.XXXXXX)

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    CARGO_TARGET_DIR="$TARGET" cargo build --release -q -p mooncake-store-programs
fi
if [ ! -x "$VENV/bin/python" ]; then
    bash tests/interop/setup_upstream_venv.sh "$VENV"
fi

RUNNING=""
stop() {
    if [ -n "$RUNNING" ]; then
        kill -TERM "$RUNNING" 2>/dev/null || true
        wait "$RUNNING" 2>/dev/null || true
        RUNNING=""
    fi
}
trap 'stop; exit 130' INT TERM
trap stop EXIT

run() { # OUTPUT_FILE COMMAND...
    local out="$1"
    shift
    "$@" >"$out" 2>"$out.err" &
    RUNNING=$!
    local rc=0
    wait "$RUNNING" || rc=$?
    RUNNING=""
    cat "$out"
    if [ "$rc" != 0 ]; then
        echo "# FAILED (rc=$rc); last lines of $out.err:"
        tail -5 "$out.err" | sed 's/^/#   /'
    fi
}

echo "## ours: $TARGET/release/mooncake_store_bench --mode client $*"
run "$LOG/ours.txt" "$TARGET/release/mooncake_store_bench" --mode client "$@"
echo
echo "## upstream: $VENV/bin/python tests/interop/store_bench_upstream.py $*"
run "$LOG/upstream.txt" "$VENV/bin/python" tests/interop/store_bench_upstream.py "$@"
echo
echo "## ours / upstream (ops/s and GB/s: > 1 is ours faster; p50: < 1 is ours faster). Logs: $LOG"
awk '
    FNR == 1 { file++ }
    /^#/ || $1 == "placement" || NF != 9 { next }
    file == 1 { up[$1 " " $3 " " $4 " " $5] = $6 " " $7 " " $8; next }
    {
        k = $1 " " $3 " " $4 " " $5
        if (!(k in up)) next
        split(up[k], u, " ")
        if (!header) {
            printf "%-9s %-9s %-15s %7s %5s %10s %10s %7s %8s %8s %7s %8s %8s %7s\n", "placement", "transport", "op", "size", "batch", \
                "ops/s", "upstream", "ratio", "GB/s", "upstream", "ratio", "p50_us", "upstream", "ratio"
            header = 1
        }
        printf "%-9s %-9s %-15s %7s %5s %10.0f %10.0f %7.2f %8.3f %8.3f %7.2f %8.1f %8.1f %7.2f\n", $1, $2, $3, $4, $5, \
            $6, u[1], (u[1] > 0 ? $6 / u[1] : 0), $7, u[2], (u[2] > 0 ? $7 / u[2] : 0), $8, u[3], (u[3] > 0 ? $8 / u[3] : 0)
    }
' "$LOG/upstream.txt" "$LOG/ours.txt"
