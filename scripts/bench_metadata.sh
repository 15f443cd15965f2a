#!/usr/bin/env bash
# Metadata service benchmark: put/get ops per second and p50/p99 latency through the same client
# code (transfer_engine_bench --mode metadata) against every backend, started here on free
# 127.0.0.1 ports and stopped afterwards:
#   our HTTP server (in memory, and with --persist), upstream's HTTP server (from the wheel in
#   target/upstream-venv, when present), etcd, redis.
# Usage: scripts/bench_metadata.sh [--threads N] [--duration S] [--value_size B]  (passed to the bench)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p mooncake-programs --features all --bin transfer_engine_bench
cargo build --release -q -p mooncake-metadata-http --bin mooncake_http_metadata_server
bench=target/release/transfer_engine_bench
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
start() { "$@" >"$work/log.$RANDOM" 2>&1 & pids+=($!); }

args=(--threads 4 --duration 3 "$@")
run() { echo; echo "### $1"; "$bench" --mode metadata --metadata_server "$2" "${args[@]}"; }

p=$(free_port); start target/release/mooncake_http_metadata_server --host 127.0.0.1 --port "$p"; wait_port "$p"
run "ours: mooncake_http_metadata_server (in memory)" "http://127.0.0.1:$p/metadata"

p=$(free_port); start target/release/mooncake_http_metadata_server --host 127.0.0.1 --port "$p" --persist "$work/meta.log"; wait_port "$p"
run "ours: mooncake_http_metadata_server --persist (fdatasync per write, group commit)" "http://127.0.0.1:$p/metadata"

if [ -x target/upstream-venv/bin/mooncake_http_metadata_server ]; then
    p=$(free_port); start target/upstream-venv/bin/mooncake_http_metadata_server --host 127.0.0.1 --port "$p"; wait_port "$p"
    run "upstream: mooncake_http_metadata_server (wheel, aiohttp)" "http://127.0.0.1:$p/metadata"
fi

if command -v etcd >/dev/null; then
    p=$(free_port); q=$(free_port)
    start etcd --name bench --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$p" \
        --advertise-client-urls "http://127.0.0.1:$p" --listen-peer-urls "http://127.0.0.1:$q" \
        --initial-advertise-peer-urls "http://127.0.0.1:$q" --initial-cluster "bench=http://127.0.0.1:$q"
    wait_port "$p"; sleep 1
    run "etcd $(etcd --version | head -1 | awk '{print $3}')" "etcd://127.0.0.1:$p"
fi

if command -v redis-server >/dev/null; then
    p=$(free_port); start redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no; wait_port "$p"
    run "redis $(redis-server --version | awk '{print $3}')" "redis://127.0.0.1:$p"
fi
