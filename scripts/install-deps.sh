#!/usr/bin/env bash
# Installs the system packages the build and tests need (Debian). Idempotent; needs root for apt.
set -euo pipefail
need=()
# libibverbs1: the upstream wheel used by the interop tests links it even for TCP.
ldconfig -p | grep -q 'libibverbs\.so\.1' || need+=(libibverbs1)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# Metadata services the tests start on free 127.0.0.1 ports (testkit), and protoc with the
# well-known types for building etcd-client.
command -v etcd >/dev/null || need+=(etcd-server)
command -v redis-server >/dev/null || need+=(redis-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/timestamp.proto ] || need+=(libprotobuf-dev)
# Transports: cmake + libclang build the verbs bindings (libibverbs itself is loaded at run time).
command -v cmake >/dev/null || need+=(cmake)
pkg-config --exists libfabric 2>/dev/null || need+=(libfabric-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
# bindgen loads libclang itself (libclang.so from libclang-dev); libclang-cpp.so, which LLVM's
# packages bring, is another library and does not do.
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
# fio: transfer_engine_bench compares the nvmeof transport with it on the same file.
command -v fio >/dev/null || need+=(fio)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing system packages: ${need[*]} (run as root or: sudo apt-get install ${need[*]})" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" || true
done
echo "system packages ok"
