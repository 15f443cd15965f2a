"""Differential tests of the engine's RPC interface: each scenario of differential/rpc_scenarios.py runs under our
wheel and under upstream's, and what they report must be the same, case by case. Each run talks only to its own
package (the wire formats differ on purpose).

Skipped unless MOONCAKE_UPSTREAM_PYTHON names upstream's python; the tensor scenario also needs torch under both
interpreters (scripts/setup_torch_venv.sh). Where ours differs on purpose the case is in DELIBERATE with both results
and the reason (docs/python-rpc.md lists them); both are asserted, so a change on either side is noticed.
"""

import os
import subprocess
import sys

import pytest

from test_differential import UPSTREAM_PYTHON, assert_same, run

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "differential", "rpc_scenarios.py")

pytestmark = pytest.mark.skipif(
    not (UPSTREAM_PYTHON and os.path.isfile(UPSTREAM_PYTHON) and os.access(UPSTREAM_PYTHON, os.X_OK)),
    reason="set MOONCAKE_UPSTREAM_PYTHON to upstream's python (tests/interop/setup_upstream_venv.sh) to compare",
)


def _has_torch(python: str) -> bool:
    if not (python and os.path.isfile(python)):
        return False
    return subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=120).returncode == 0


# (scenario, case) -> (ours, upstream's, why ours differs)
DELIBERATE = {
    ("rpc_server_lifecycle", "start after stop"): (
        True,
        False,
        "upstream's server cannot be started again once stopped; ours can (stop_server, then start_server_async)",
    ),
    ("rpc_send_data", "source is empty"): (
        False,
        True,
        "upstream's callbacks always get an empty source; ours give the sending peer as host:port",
    ),
    ("rpc_send_data", "header-like bytes went to"): (
        ["data"],
        ["tensor"],
        "upstream guesses from the first bytes of a message whether it is a tensor, so send_data of bytes that "
        "happen to look like its tensor header reach the tensor callback; ours always deliver send_data to the data "
        "callback",
    ),
    ("rpc_send_data", "received small after large"): (
        ["data", "74696e79"],
        ["data", [5000, "97521996ae43d53334dbcec2f94f4dbe02b81d51a118edbd734d49995531687b"]],
        "upstream's pooled client resends the previous message's attachment when a message of 1 KiB or less "
        "follows a larger one on the same connection; ours delivers the bytes that were sent",
    ),
    ("rpc_send_data", "received by a callback set before initialize"): (
        [["data", "6561726c79"]],
        [],
        "upstream forgets a data callback set before initialize; ours keeps callbacks whenever they are set",
    ),
    ("rpc_tensors", "data callback got transposed"): (
        [["data", "052ae30d4f74325799be7ca1"]],
        [["data", "052a4f7499bee30d32577ca1"]],
        "upstream sends a non-contiguous tensor's storage as it lies in memory; ours sends the elements in the "
        "tensor's logical (C) order",
    ),
    ("rpc_tensors", "tensor with both callbacks went to"): (
        ["tensor"],
        ["data"],
        "upstream's send_tensor sends the bare elements, which reach the data callback without dtype or shape; ours "
        "carry both and reach the tensor callback (the data callback still gets the bytes when no tensor callback "
        "is set, as upstream)",
    ),
    ("rpc_tensors", "send_tensor_async"): (
        0,
        {"exc": "RuntimeError"},
        "upstream's send_tensor_async raises a GIL error (pybind11 inc_ref without the GIL) on an initialized "
        "interface; ours returns a future that resolves to 0",
    ),
    ("rpc_async", "send_data_async"): (
        ["Future", 0],
        {"exc": "RuntimeError"},
        "upstream's send_data_async raises a GIL error on an initialized interface; ours returns a future of the loop "
        "that resolves to 0",
    ),
    ("rpc_async", "received async"): (
        [["data", "6173796e63"]],
        [],
        "follows from the previous case: upstream's async send never happens",
    ),
}

SCENARIOS = ["rpc_basics", "rpc_server_lifecycle", "rpc_send_data", "rpc_tensors", "rpc_async"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rpc_same_as_upstream(scenario):
    if scenario == "rpc_tensors" and not (_has_torch(sys.executable) and _has_torch(UPSTREAM_PYTHON)):
        pytest.skip("torch is not importable under both interpreters (scripts/setup_torch_venv.sh)")
    ours = run(sys.executable, scenario, script=SCRIPT)
    assert_same(scenario, ours, run(UPSTREAM_PYTHON, scenario, script=SCRIPT), DELIBERATE)


def test_deliberate_entries_name_real_cases():
    """Every DELIBERATE entry names a scenario that is run and gives a reason."""
    for (scenario, name), (_, _, why) in DELIBERATE.items():
        assert scenario in SCENARIOS, (scenario, name)
        assert why.strip(), (scenario, name)
