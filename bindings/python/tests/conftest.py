"""Shared fixtures: free ports, the bundled programs, and a running mooncake_master.

Every server a test starts listens on 127.0.0.1 on a free port (except the quick-start tests, which use the
seed programs' fixed ports) and is stopped by PID when the test ends.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

BIN_DIR = os.path.dirname(sys.executable)


# free_port() is shared with the benches (bindings/python/bench/procs.py), which run under either wheel's python.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from procs import free_port  # noqa: E402


def program(name: str) -> str:
    """The console script `name` of the installed wheel (next to this venv's python)."""
    path = os.path.join(BIN_DIR, name)
    assert os.path.exists(path), f"{path} missing: install the wheel into this venv"
    return path


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen = None) -> None:
    """Waits until something accepts on 127.0.0.1:port (fails early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Master:
    """A mooncake_master child process with its RPC, admin and (optionally) HTTP metadata ports."""

    def __init__(self, http_metadata: bool = True, extra_args=(), rpc_port=None, http_port=None):
        self.rpc_port = rpc_port or free_port()
        self.admin_port = free_port()
        self.http_port = http_port or free_port()
        args = [
            program("mooncake_master"),
            f"--rpc_port={self.rpc_port}",
            "--rpc_address=127.0.0.1",
            f"--metrics_port={self.admin_port}",
        ]
        if http_metadata:
            args += [
                "--enable_http_metadata_server=true",
                "--http_metadata_server_host=127.0.0.1",
                f"--http_metadata_server_port={self.http_port}",
            ]
        args += list(extra_args)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.rpc_port, proc=self.proc)
        if http_metadata:
            wait_port(self.http_port, proc=self.proc)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metadata"

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture
def master():
    """A fresh master with its HTTP metadata server, stopped after the test."""
    m = Master()
    yield m
    m.stop()


@pytest.fixture
def store(master):
    """A store client set up against `master` (64 MiB segment, 16 MiB staging), closed after the test."""
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    rc = s.setup("127.0.0.1", "P2PHANDSHAKE", 64 << 20, 16 << 20, "tcp", "", master.address)
    assert rc == 0, rc
    yield s
    s.close()


@pytest.fixture
def engine():
    """An initialized P2P/tcp TransferEngine on 127.0.0.1."""
    from mooncake.engine import TransferEngine

    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    yield e
    e.shutdown()
