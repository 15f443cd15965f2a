"""Differential tests of shared segments: each scenario of differential/shared_segment_scenarios.py runs under our
wheel and under upstream's, and what they report must be the same, case by case: layouts (offsets, sizes), the data
every rank reads after the owner (or a peer) wrote, which calls raise and what, which ranks a collective failure
names, what is left mapped or in /dev/shm.

Skipped unless MOONCAKE_UPSTREAM_PYTHON names upstream's python and torch imports under both interpreters
(scripts/setup_torch_venv.sh). Where ours differs on purpose the case is in DELIBERATE with both results and the
reason (docs/python-shared-segment.md lists them); both are asserted, so a change on either side is noticed.
"""

import os
import subprocess
import sys

import pytest

from test_differential import UPSTREAM_PYTHON, assert_same, run

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "differential", "shared_segment_scenarios.py")
DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "docs", "python-shared-segment.md")


def _has_torch(python: str) -> bool:
    if not (python and os.path.isfile(python) and os.access(python, os.X_OK)):
        return False
    return subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=120).returncode == 0


pytestmark = [
    pytest.mark.skipif(
        not (UPSTREAM_PYTHON and os.path.isfile(UPSTREAM_PYTHON)),
        reason="set MOONCAKE_UPSTREAM_PYTHON to upstream's python (tests/interop/setup_upstream_venv.sh) to compare",
    ),
    pytest.mark.skipif(not _has_torch(sys.executable), reason="torch is not importable here"),
    pytest.mark.skipif(not _has_torch(UPSTREAM_PYTHON), reason="torch is not importable by upstream's python"),
    pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this host"),
]

SCENARIOS = [
    "engine_api",
    "python_api",
    "python_api_alive",
    "ranks_share",
    "ranks_disagree",
    "ranks_owner_exits",
    "ranks_owner_killed",
]

# Ours removes the object's name from /dev/shm as soon as every rank has mapped it (create_shared_segment's last
# collective); upstream keeps the name while the owner's segment lives and removes it in the segment's destructor.
EARLY_UNLINK = (
    "ours removes the name from /dev/shm once every rank has mapped the segment, so it never lingers; upstream keeps "
    "it while the owner's segment lives"
)
# ... so an owner that dies without running destructors (SIGKILL, abort, OOM killer) leaves nothing behind.
KILLED_OWNER = (
    "upstream leaves the object in /dev/shm when the owner is killed (its name is removed only by the owner's "
    "destructor); ours had already removed it, and the memory goes with the last rank that maps it"
)

# tmpfs allocates pages lazily, so upstream creates a segment of any size below 2**46 bytes and its users die of
# SIGBUS once they touch more than /dev/shm can back; ours refuses, at creation, a segment larger than the space
# /dev/shm has left. (No host has 32 TiB of /dev/shm, so these cases are the same everywhere.)
SHM_SPACE = (
    "ours refuses a segment larger than the free space of /dev/shm when it is created; upstream creates it and "
    "its users are killed by SIGBUS when they touch a page /dev/shm cannot back"
)

# (scenario, case) -> (ours, upstream's, why ours differs)
DELIBERATE = {
    ("engine_api", "create size 2**46"): ({"exc": "RuntimeError"}, True, SHM_SPACE),
    ("engine_api", "create larger than /dev/shm"): ({"exc": "RuntimeError"}, 1 << 45, SHM_SPACE),
    ("python_api", "bad: larger than /dev/shm"): ({"exc": "SharedSegmentError"}, {"type": "SharedSegment"}, SHM_SPACE),
    ("python_api_alive", "names while alive"): (0, 1, EARLY_UNLINK),
    ("ranks_owner_exits", "rank 0: names while all ranks run"): (0, 1, EARLY_UNLINK),
    ("ranks_owner_exits", "rank 1: names while all ranks run"): (0, 1, EARLY_UNLINK),
    ("ranks_owner_killed", "rank 0: names while all ranks run"): (0, 1, EARLY_UNLINK),
    ("ranks_owner_killed", "rank 1: names while all ranks run"): (0, 1, EARLY_UNLINK),
    ("ranks_owner_killed", "rank 1: names after the owner left"): (0, 1, KILLED_OWNER),
    ("ranks_owner_killed", "leftovers in /dev/shm after every rank ended"): ([0, 0], [1, 0], KILLED_OWNER),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_as_upstream(scenario):
    ours = run(sys.executable, scenario, script=SCRIPT)
    assert_same(scenario, ours, run(UPSTREAM_PYTHON, scenario, script=SCRIPT), DELIBERATE)


def test_deliberate_differences_are_documented():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    for scenario, case in DELIBERATE:
        assert f"`{scenario}` / `{case}`" in text, f"docs/python-shared-segment.md does not list {scenario} / {case}"
