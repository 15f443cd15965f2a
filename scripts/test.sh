#!/usr/bin/env bash
# The whole test suite of mooncake-rs, as CI runs it:
#   formatting, clippy, every crate's tests, the conformance runner over every backend that
#   works on this machine, and the interop tests against the upstream Mooncake wheel.
# On a fresh Debian machine run it as root once: it installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's libfabric loads libinfinipath, whose crash handlers can hang a failing process; keep them off.
export IPATH_NO_BACKTRACE=1
# A one-shot run gains nothing from incremental state, which costs gigabytes of disk.
export CARGO_INCREMENTAL=0

# Each step's wall time is kept and printed at the end: where the time of a run goes.
suite_start=$(date +%s)
step_start=$suite_start
step_name=""
timings=()
step() {
    local now
    now=$(date +%s)
    [ -z "$step_name" ] || timings+=("$(printf '%5ds  %s' $((now - step_start)) "$step_name")")
    step_start=$now
    step_name="$*"
    printf '\n==> %s\n' "$*"
}

step "disk (a full run needs about 10 GiB under target/, PyTorch included; 20 GiB free to be safe)"
df -h . || true

step "system packages"
scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "the store crates see only mooncake-core (no backend crate); the store core is sans-IO; the client has no HTTP server"
for crate in mooncake-store-core mooncake-store-master mooncake-store; do
    if cargo tree -p "$crate" -e normal --prefix none | grep -E '^mooncake-(transport|device|metadata)'; then
        echo "$crate must not depend on a backend crate (docs/architecture.md)" >&2
        exit 1
    fi
done
if cargo tree -p mooncake-store-core -e normal --prefix none | grep -E '^(tokio|axum|hyper|mooncake-core) '; then
    echo "mooncake-store-core must stay sans-IO: no async runtime, HTTP server or transfer engine" >&2
    exit 1
fi
if cargo tree -p mooncake-store -e normal --prefix none | grep -E '^(axum|hyper|mooncake-store-master) '; then
    echo "the store client must not link the master service or an HTTP server" >&2
    exit 1
fi

step "cargo test --workspace"
cargo test --workspace

step "conformance runner (every registered backend whose probe passes)"
cargo run --release -q -p mooncake-conformance --bin mooncake-conformance

step "interop with upstream Mooncake (wheel in target/upstream-venv)"
tests/interop/setup_upstream_venv.sh target/upstream-venv
MOONCAKE_UPSTREAM_PYTHON="$PWD/target/upstream-venv/bin/python" \
    cargo test -p mooncake --test upstream_interop -- --ignored --test-threads=1

step "Python wheel: build, install into a fresh venv, pytest (with upstream's wheel for interop)"
scripts/build_wheel.sh
rm -rf target/py-test-venv
python3 -m venv target/py-test-venv
target/py-test-venv/bin/pip install -q target/wheels/mooncake_rs-*.whl pytest numpy pyzmq mypy aiohttp
# One torch (about 5 GiB, downloaded on the first run, kept in target/torch-venv) for both wheels' tensor tests.
scripts/setup_torch_venv.sh target/py-test-venv target/upstream-venv
MOONCAKE_UPSTREAM_PYTHON="$PWD/target/upstream-venv/bin/python" \
    target/py-test-venv/bin/python -m pytest -q -p no:cacheprovider bindings/python/tests

step "Python wheel with every backend (FEATURES=all, as the README documents): build, install, its tests"
FEATURES=all scripts/build_wheel.sh
target/py-test-venv/bin/pip install -q --force-reinstall --no-deps target/wheels/mooncake_rs-*.whl
MOONCAKE_WHEEL_FEATURES=all target/py-test-venv/bin/python -m pytest -q -p no:cacheprovider \
    bindings/python/tests/test_all_backends.py

du -sh target 2>/dev/null || true
step "all tests passed"
printf 'wall time per step:\n'
printf '%s\n' "${timings[@]}"
printf '%5ds  total\n' $(($(date +%s) - suite_start))
