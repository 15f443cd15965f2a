"""The package's type stubs: mypy accepts correct calls and rejects wrong ones."""

import os
import subprocess
import sys
import textwrap

import pytest

mypy = pytest.importorskip("mypy", reason="mypy is not installed in this venv (scripts/test.sh installs it)")

GOOD = """
from mooncake.engine import TransferEngine, TransferOpcode, available_transports
from mooncake.store import MooncakeDistributedStore, ReplicateConfig

e = TransferEngine()
rc: int = e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
port: int = e.get_rpc_port()
rc = e.transfer_sync("127.0.0.1:1", 1, 2, 3, TransferOpcode.Write)
names = [t["name"] for t in available_transports()]
s = MooncakeDistributedStore()
cfg = ReplicateConfig()
cfg.replica_num = 2
rc = s.put("k", b"v", cfg)
data: bytes = s.get("k")
counts: list[int] = s.batch_get_into(["k"], [1], [4096])
"""

BAD = """
from mooncake.store import MooncakeDistributedStore

s = MooncakeDistributedStore()
s.put(1, b"v")
n: str = s.get_size("k")
"""


def run_mypy(tmp_path, source: str) -> subprocess.CompletedProcess:
    path = tmp_path / "user_code.py"
    path.write_text(textwrap.dedent(source))
    env = dict(os.environ, MYPYPATH="")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--python-version", "3.11", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def test_correct_calls_type_check(tmp_path):
    r = run_mypy(tmp_path, GOOD)
    assert r.returncode == 0, r.stdout + r.stderr


def test_wrong_calls_are_reported(tmp_path):
    r = run_mypy(tmp_path, BAD)
    assert r.returncode != 0
    assert 'Argument 1 to "put"' in r.stdout
    assert "Incompatible types in assignment" in r.stdout
