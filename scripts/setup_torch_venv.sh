#!/usr/bin/env bash
# One shared PyTorch for every Python venv of this repository's tests.
#
#   scripts/setup_torch_venv.sh            create target/torch-venv (torch, numpy, safetensors) unless they import
#   scripts/setup_torch_venv.sh VENV...    the same, then make each VENV import torch from it: writes
#                                          VENV/lib/pythonX.Y/site-packages/mooncake_torch_venv.pth
#
# torch from PyPI is the CUDA build (about 5 GiB with its nvidia wheels; it runs on machines without a GPU),
# so it is installed once and shared through a .pth file instead of once per venv (safetensors comes along for the
# store's save_tensor_to_safetensor / load_tensor_from_safetensor). Every VENV must have the
# same Python minor version as the torch venv. Override the location with TORCH_VENV=...
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VENV="${TORCH_VENV:-target/torch-venv}"

if ! "$TORCH_VENV/bin/python" -c 'import torch, numpy, safetensors' >/dev/null 2>&1; then
    if [ ! -x "$TORCH_VENV/bin/python" ]; then
        python3 -m venv "$TORCH_VENV"
    fi
    "$TORCH_VENV/bin/python" -m pip install --disable-pip-version-check -q torch numpy safetensors
    "$TORCH_VENV/bin/python" -c 'import torch, numpy, safetensors' # fails loudly when the install did not work
fi

site_of() {
    "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}
version_of() {
    "$1/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

torch_site="$(cd "$(site_of "$TORCH_VENV")" && pwd)"
torch_version="$(version_of "$TORCH_VENV")"

for venv in "$@"; do
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup_torch_venv.sh: $venv is not a venv (no bin/python)" >&2
        exit 1
    fi
    if [ "$(version_of "$venv")" != "$torch_version" ]; then
        echo "setup_torch_venv.sh: $venv has Python $(version_of "$venv"), the torch venv $torch_version" >&2
        exit 1
    fi
    # A .pth line naming a directory appends it to sys.path, after the venv's own packages.
    echo "$torch_site" >"$(site_of "$venv")/mooncake_torch_venv.pth"
    "$venv/bin/python" -c 'import torch' # checks the link works
done

echo "torch $("$TORCH_VENV/bin/python" -c 'import torch; print(torch.__version__)') in $TORCH_VENV"
