#!/usr/bin/env bash
# Builds the `mooncake` Python wheel (bindings/python) with the Rust programs behind its console scripts
# (mooncake_master, mooncake_client, transfer_engine_bench, mooncake_http_metadata_server) inside it.
#
#   scripts/build_wheel.sh                          # wheel into target/wheels/
#   scripts/build_wheel.sh --install .venv          # ... then install it into that venv (created if missing)
#   FEATURES=all scripts/build_wheel.sh             # every backend (rdma, libfabric, etcd, redis too)
#
# Needs Python 3.11+ with venv; maturin comes from PyPI into target/wheel-tools.
set -euo pipefail
cd "$(dirname "$0")/.."

install_into=""
while [ $# -gt 0 ]; do
    case "$1" in
        --install) install_into="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "build_wheel.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
features="${FEATURES:-default}"
python="${PYTHON:-python3}"
tools=target/wheel-tools
if [ ! -x "$tools/bin/maturin" ]; then
    "$python" -m venv "$tools"
    "$tools/bin/pip" install -q 'maturin>=1.16,<2'
fi
# A build with libfabric links the host's libfabric (the extension and the bundled programs alike), as
# the fabric's own stack must be the one installed with its drivers (EFA's, say). Such a wheel gets the
# plain `linux` tag: maturin neither copies libfabric and its provider libraries into it (that would
# need patchelf, and load a second, older libfabric beside the host's) nor claims manylinux.
tag_args=()
case ",$features," in
    *,all,* | *,libfabric,* | *,efa,*) tag_args=(--compatibility linux) ;;
esac

programs="mooncake_master mooncake_client transfer_engine_bench mooncake_http_metadata_server"
cargo build --release --features "mooncake/$features" \
    -p mooncake-store-programs --bin mooncake_master --bin mooncake_client \
    -p mooncake-programs --bin transfer_engine_bench \
    -p mooncake-metadata-http --bin mooncake_http_metadata_server
bin_dir=bindings/python/python/mooncake/bin
rm -rf "$bin_dir"
mkdir -p "$bin_dir"
for p in $programs; do
    cp "target/release/$p" "$bin_dir/$p"
    strip --strip-debug "$bin_dir/$p" 2>/dev/null || true
done

rm -f target/wheels/mooncake_rs-*.whl
"$tools/bin/maturin" build --release --features "mooncake/$features" "${tag_args[@]}" \
    -m bindings/python/Cargo.toml -o target/wheels
wheel=$(ls target/wheels/mooncake_rs-*.whl)
echo "built $wheel"

if [ -n "$install_into" ]; then
    [ -x "$install_into/bin/python" ] || "$python" -m venv "$install_into"
    "$install_into/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
    echo "installed into $install_into ($install_into/bin/python -c 'import mooncake.store')"
fi
