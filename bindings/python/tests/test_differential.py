"""Differential tests: each scenario of differential/scenarios.py runs under our wheel and under upstream's, and what
they report must be the same, case by case (return codes, values, bytes, exception types).

Skipped unless MOONCAKE_UPSTREAM_PYTHON names upstream's python (CI: target/upstream-venv/bin/python). Where ours
differs on purpose, because upstream's behaviour harms users, the case is in DELIBERATE with both results and the
reason (docs/python-differences.md lists them too); both are asserted, so a change on either side is noticed.
"""

import json
import os
import subprocess
import sys

import pytest

UPSTREAM_PYTHON = os.environ.get("MOONCAKE_UPSTREAM_PYTHON", "")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "differential", "scenarios.py")

pytestmark = pytest.mark.skipif(
    not (UPSTREAM_PYTHON and os.path.isfile(UPSTREAM_PYTHON) and os.access(UPSTREAM_PYTHON, os.X_OK)),
    reason="set MOONCAKE_UPSTREAM_PYTHON to upstream's python (tests/interop/setup_upstream_venv.sh) to compare",
)

SCENARIOS = [
    "replicate_config_fields",
    "store_same_hostname",
    "store_setup_dict_bad_values",
    "store_ctypes_values",
    "kv_bootstrap_keys",
    "mooncake_config",
    "store_without_local_buffer",
    "store_async",
    "store_buffer_pool",
    "store_sessions",
    "store_replica_clear",
    "store_misc_writes",
    "store_tasks",
    "store_segments",
    "store_dummy",
    "engine_and_numa_helpers",
    "store_engram",
    "store_shared_engine",
]

# (scenario, case) -> (ours, upstream's, why ours differs)
DELIBERATE = {
    ("store_ctypes_values", "get c3"): (
        {"bytes": "0100000002000000"},
        {"bytes": "0100"},
        "upstream stores len(value) items' worth of bytes (2 of a 2 x uint32 array's 8), silently truncating the "
        "object; ours stores every byte of the buffer",
    ),
    ("store_sessions", "ranges unregistered"): (
        [-600],
        [-800],
        "an address outside every registered buffer is refused as a bad argument before any transfer",
    ),
}


def run(python: str, scenario: str, script: str = SCRIPT) -> dict:
    """Runs one scenario of `script` (a file in differential/) under `python`; its results by case name."""
    env = dict(os.environ)
    if python == UPSTREAM_PYTHON:
        env["MC_FORCE_TCP"] = "1"
    out = subprocess.run([python, script, scenario], capture_output=True, timeout=300, env=env)
    assert out.returncode == 0, f"{scenario} under {python}: exit {out.returncode}\n{out.stderr.decode()[-3000:]}"
    results = {}
    for line in out.stdout.decode().splitlines():
        row = json.loads(line)
        results[row["case"]] = row["result"]
    assert results, f"{scenario} under {python} reported nothing\n{out.stderr.decode()[-3000:]}"
    return results


def assert_same(scenario: str, ours: dict, theirs: dict, deliberate: dict) -> None:
    """Both wheels ran the same cases with the same results, except the `deliberate` ones ((scenario, case) ->
    (ours, upstream's, why)), where each side must give exactly its listed result."""
    assert list(ours) == list(theirs), "the scenario ran different cases under the two wheels"
    differ = []
    for name, upstream_result in theirs.items():
        expected = deliberate.get((scenario, name))
        if expected is not None:
            want_ours, want_upstream, _why = expected
            assert ours[name] == want_ours, f"{name}: ours {ours[name]!r}, the documented difference says {want_ours!r}"
            assert upstream_result == want_upstream, f"{name}: upstream now gives {upstream_result!r}"
        elif ours[name] != upstream_result:
            differ.append(f"  {name}: ours {ours[name]!r}, upstream {upstream_result!r}")
    assert not differ, f"{scenario}: {len(differ)} of {len(theirs)} cases differ:\n" + "\n".join(differ)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_as_upstream(scenario):
    assert_same(scenario, run(sys.executable, scenario), run(UPSTREAM_PYTHON, scenario), DELIBERATE)


def test_deliberate_differences_are_documented():
    doc = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "python-differences.md")
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    for scenario, case in DELIBERATE:
        assert f"`{scenario}` / `{case}`" in text, f"docs/python-differences.md does not list {scenario} / {case}"
