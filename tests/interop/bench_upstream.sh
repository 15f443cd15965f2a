#!/usr/bin/env bash
# Run upstream's transfer_engine_bench (target + initiator) on 127.0.0.1, TCP, P2PHANDSHAKE, write.
#   tests/interop/bench_upstream.sh [VENV_DIR] [DURATION]      (defaults: target/upstream-venv, 5)
# Prints one line per configuration: block batch threads throughput-line.
# 64 MiB blocks use batch 16 instead of 128: the bench needs block*batch*threads <= buffer_size on
# both sides, and 64 MiB*128*2 = 16 GiB per process does not fit this 23 GiB box.
set -euo pipefail
VENV="${1:-target/upstream-venv}"
DUR="${2:-5}"
BIN="$VENV/bin/transfer_engine_bench"          # Python wrapper; it runs .../mooncake/transfer_engine_bench as a child
BUF=$((2 << 30))
export MC_FORCE_TCP=1
LOG=$(mktemp -d /tmp/mc-bench.XXXXXX)

"$BIN" --mode=target --metadata_server=P2PHANDSHAKE --local_server_name=127.0.0.1 --protocol=tcp \
       --buffer_size=$BUF >"$LOG/target.out" 2>"$LOG/target.err" &
WRAP=$!
cleanup() {
    for p in $(ps --ppid "$WRAP" -o pid= 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    kill "$WRAP" 2>/dev/null || true
    wait "$WRAP" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 50); do
    SEG=$(sed -n 's/.*P2P handshake, listening on \([^ ]*\)$/\1/p' "$LOG/target.err" | head -1)
    [ -n "$SEG" ] && break
    sleep 0.2
done
[ -n "$SEG" ] || { echo "target did not start"; cat "$LOG/target.err"; exit 1; }
echo "# target segment $SEG (logs in $LOG)"

for BLOCK in 4096 1048576 67108864; do
    for BATCH in 128 1; do
        B=$BATCH
        [ "$BLOCK" = 67108864 ] && [ "$BATCH" = 128 ] && B=16
        for T in 1 2; do
            "$BIN" --mode=initiator --metadata_server=P2PHANDSHAKE --local_server_name=127.0.0.1 \
                --segment_id="$SEG" --protocol=tcp --operation=write --block_size=$BLOCK --batch_size=$B \
                --threads=$T --duration="$DUR" --buffer_size=$BUF --report_unit=MB \
                >"$LOG/i.out" 2>"$LOG/i.err" || echo "  (initiator rc=$?)"
            echo "block=$BLOCK batch=$B threads=$T :: $(grep -o 'Test completed.*' "$LOG/i.err" || tail -2 "$LOG/i.err")"
        done
    done
done
