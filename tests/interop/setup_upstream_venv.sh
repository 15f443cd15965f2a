#!/usr/bin/env bash
# Create (idempotently) a Python venv holding the UPSTREAM Mooncake transfer engine wheel,
# for interop tests against mooncake-rs.
#
#   tests/interop/setup_upstream_venv.sh [VENV_DIR]      (default: target/upstream-venv)
#
# Prints the installed wheel version on its last line: "mooncake-transfer-engine-non-cuda==X.Y.Z".
# Run the peer with:  MC_FORCE_TCP=1 VENV_DIR/bin/python tests/interop/upstream_peer.py ...
set -euo pipefail

VENV="${1:-target/upstream-venv}"
PKG="mooncake-transfer-engine-non-cuda"
# Exact version this interop suite was written and measured against (override with UPSTREAM_VERSION=...).
VERSION="${UPSTREAM_VERSION:-0.3.13.post1}"

# 1. libibverbs1: every upstream module/program links it, even for TCP.
if ! ldconfig -p | grep -q 'libibverbs\.so\.1'; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y --no-install-recommends libibverbs1; then
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends libibverbs1
    fi
fi

# 2. venv
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi

# 3. wheel (pinned)
have="$("$VENV/bin/python" -m pip show "$PKG" 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [ "$have" != "$VERSION" ]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$PKG==$VERSION"
fi

# numpy: used by upstream_peer.py to build test patterns quickly (any 1.x/2.x works).
if ! "$VENV/bin/python" -c 'import numpy' 2>/dev/null; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q numpy
fi

# 4. smoke check: the engine module loads
MC_FORCE_TCP=1 "$VENV/bin/python" -c 'from mooncake.engine import TransferEngine' >/dev/null

echo "$PKG==$("$VENV/bin/python" -m pip show "$PKG" | sed -n 's/^Version: //p')"
