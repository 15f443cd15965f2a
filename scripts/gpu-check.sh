#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, runs what the CPU-only test suite cannot (docs/gpu.md).
#
#   scripts/gpu-check.sh            # build here, then run here (a machine with cargo and a GPU)
#   scripts/gpu-check.sh build      # only build, into target/gpu-check (carry that folder to the GPU machine)
#   scripts/gpu-check.sh run        # only run what target/gpu-check holds (needs python3 with torch and pytest)
#
# Run steps, each bounded (about 5 minutes in all on an H100):
#   1. the conformance runner with the cuda device and the nvlink and tcp transports (GPU memory pairs);
#   2. the Python GPU tests (bindings/python/tests/test_gpu_tensors.py) against the built wheel;
#   3. a bench sweep: tcp host->host, tcp GPU->GPU, nvlink GPU->GPU (with the device's own copy as the limit),
#      and 4 KiB nvlink latency;
# then one table with the issue's targets. Exit status 1 when a step fails (a missed speed target is reported,
# not failed: these machines are shared).
set -uo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check
what="${1:-all}"
case "$what" in build | run | all) ;; *) echo "usage: $0 [build|run|all]" >&2; exit 2 ;; esac

build() {
    set -e
    mkdir -p "$out/bin" "$out/wheel"
    cargo build --release -q -p mooncake-programs --features cuda --bin transfer_engine_bench
    cargo build --release -q -p mooncake-conformance --no-default-features --features gpu --bin mooncake-conformance
    cp target/release/transfer_engine_bench target/release/mooncake-conformance "$out/bin/"
    # Debug info would triple the size; the folder is meant to be carried to a GPU machine.
    strip --strip-debug "$out"/bin/* 2>/dev/null || true
    rm -f target/wheels/mooncake_rs-*.whl
    scripts/build_wheel.sh >/dev/null
    rm -f "$out"/wheel/*.whl
    cp target/wheels/mooncake_rs-*.whl "$out/wheel/"
    set +e
    echo "gpu-check: built into $out ($(du -sh "$out" | cut -f1))"
}

run() {
    local failed=0 log="$out/log"
    mkdir -p "$log"
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu-check: no NVIDIA GPU here (nvidia-smi -L fails); nothing to check" >&2
        return 1
    fi
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

    echo "== 1. conformance: cuda device, nvlink and tcp transports with GPU memory"
    if ! timeout 240 "$out/bin/mooncake-conformance" --backend cuda --backend nvlink --backend tcp \
        --kind transport --kind device --timeout 60 -q >"$log/conformance.txt" 2>&1; then
        failed=1
    fi
    tail -n 25 "$log/conformance.txt"

    echo "== 2. Python GPU tests against the wheel"
    local site=/tmp/gpu-check-site
    rm -rf "$site"
    python3 -m pip install -q --no-index --no-deps --target "$site" "$out"/wheel/mooncake_rs-*.whl
    if ! PYTHONPATH="$site" timeout 180 python3 -m pytest -q -p no:cacheprovider \
        bindings/python/tests/test_gpu_tensors.py >"$log/python.txt" 2>&1; then
        failed=1
    fi
    tail -n 15 "$log/python.txt"

    echo "== 3. bench sweep"
    local bench="$out/bin/transfer_engine_bench" common=(--mode sweep --threads 1 --duration 1 --batches 1,16
        --buffer_size 268435456)
    timeout 60 "$bench" "${common[@]}" --protocol tcp --memory host --blocks 1048576,16777216 \
        >"$log/tcp_host.txt" 2>&1 || failed=1
    timeout 60 "$bench" "${common[@]}" --protocol tcp --memory cuda --blocks 1048576,16777216 \
        >"$log/tcp_cuda.txt" 2>&1 || failed=1
    timeout 60 "$bench" "${common[@]}" --protocol nvlink --memory cuda --blocks 1048576,16777216,67108864 \
        >"$log/nvlink.txt" 2>&1 || failed=1
    timeout 30 "$bench" --mode sweep --threads 1 --duration 2 --batches 1 --buffer_size 16777216 \
        --protocol nvlink --memory cuda --blocks 4096 >"$log/nvlink_4k.txt" 2>&1 || failed=1
    cat "$log"/tcp_host.txt "$log"/tcp_cuda.txt "$log"/nvlink.txt "$log"/nvlink_4k.txt | grep -v '^#' | head -40

    echo "== summary"
    python3 - "$log" <<'EOF'
import re, sys, pathlib
log = pathlib.Path(sys.argv[1])
def rows(name):
    out = {}
    p = log / name
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        f = line.split()
        if len(f) >= 6 and f[0].isdigit() and f[1].isdigit() and not line.lstrip().startswith("#"):
            try:
                out[(int(f[0]), int(f[1]))] = (float(f[2]), float(f[4]), f[6:])
            except ValueError:
                pass
    return out
host, gpu, nv, nv4k = rows("tcp_host.txt"), rows("tcp_cuda.txt"), rows("nvlink.txt"), rows("nvlink_4k.txt")
print(f"{'path':<34}{'block':>10}{'batch':>6}{'GB/s':>9}{'vs':>9}  target")
for key in sorted(gpu):
    g, h = gpu[key][0], host.get(key, (0,))[0]
    r = g / h if h else float("nan")
    print(f"{'tcp GPU->GPU / tcp host->host':<34}{key[0]:>10}{key[1]:>6}{g:>9.2f}{r:>9.2f}  >= 0.80 {'ok' if r >= 0.8 else 'MISSED'}")
for key in sorted(nv):
    g, extra = nv[key][0], nv[key][2]
    m = re.search(r"\(([\d.]+)\)", " ".join(extra))
    r = float(m.group(1)) if m else float("nan")
    print(f"{'nvlink GPU->GPU / device copy':<34}{key[0]:>10}{key[1]:>6}{g:>9.2f}{r:>9.2f}  >= 0.80 {'ok' if r >= 0.8 else 'MISSED'}")
for key in sorted(nv4k):
    p50 = nv4k[key][1]
    print(f"{'nvlink 4 KiB batch p50 (us)':<34}{key[0]:>10}{key[1]:>6}{'':>9}{p50:>9.1f}  < 20 us {'ok' if p50 < 20 else 'MISSED'}")
if not (gpu or nv or nv4k):
    print("no bench results: see", log)
EOF
    [ "$failed" = 0 ] && echo "gpu-check: all steps passed" || echo "gpu-check: a step FAILED (logs in $log)"
    return "$failed"
}

case "$what" in
    build) build ;;
    run) run ;;
    all) build && run ;;
esac
