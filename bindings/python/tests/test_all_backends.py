"""The wheel built with every backend (`FEATURES=all scripts/build_wheel.sh`): each backend is linked and works.

These tests run when MOONCAKE_WHEEL_FEATURES=all says the installed wheel is that build (scripts/test.sh builds it
after the default wheel's tests and runs this file against it); against the default wheel they are skipped.
They move bytes over libfabric (whose library maturin bundles into the wheel) and find peers through etcd and
Redis servers started here on free 127.0.0.1 ports.
"""

import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from conftest import free_port, program, stop, wait_port
from mooncake.engine import TransferEngine, available_transports

pytestmark = pytest.mark.skipif(
    os.environ.get("MOONCAKE_WHEEL_FEATURES") != "all",
    reason="needs the wheel built with FEATURES=all (set MOONCAKE_WHEEL_FEATURES=all when it is installed)",
)

EVERY_TRANSPORT = {"tcp", "shm", "rdma", "libfabric", "efa"}


def transfer_between_two_engines(metadata: str, protocol: str) -> None:
    """Two engines of this process: b registers a buffer, a writes a pattern into it and reads it back."""
    a, b = TransferEngine(), TransferEngine()
    try:
        # With a metadata service each engine needs a name of its own (host:port); P2P names come from the port.
        named = metadata != "P2PHANDSHAKE"
        assert a.initialize(f"127.0.0.1:{free_port()}" if named else "127.0.0.1", metadata, protocol, "") == 0
        assert b.initialize(f"127.0.0.1:{free_port()}" if named else "127.0.0.1", metadata, protocol, "") == 0
        n = 256 * 1024
        remote = np.zeros(n, dtype=np.uint8)
        src = np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8)
        back = np.zeros(n, dtype=np.uint8)
        assert b.register_memory(remote.ctypes.data, n, "cpu:0") == 0
        # Protocols that need the local side registered (libfabric) get it; it is harmless for the others.
        assert a.register_memory(src.ctypes.data, n, "cpu:0") == 0
        assert a.register_memory(back.ctypes.data, n, "cpu:0") == 0
        seg = b.get_local_segment_name()
        assert a.transfer_sync_write(seg, src.ctypes.data, remote.ctypes.data, n) == 0
        assert np.array_equal(remote, src)
        assert a.transfer_sync_read(seg, back.ctypes.data, remote.ctypes.data, n) == 0
        assert np.array_equal(back, src)
    finally:
        a.shutdown()
        b.shutdown()


def test_every_transport_is_linked():
    linked = {t["name"]: t for t in available_transports()}
    assert EVERY_TRANSPORT <= set(linked), f"linked: {sorted(linked)}"
    # libfabric's tcp provider works on any Linux host; rdma and efa need their hardware and say why not.
    assert linked["libfabric"]["available"] is True, linked["libfabric"]["reason"]
    for name in ("rdma", "efa"):
        if not linked[name]["available"]:
            assert linked[name]["reason"], f"{name} is unavailable without a reason"


def test_libfabric_moves_bytes():
    transfer_between_two_engines("P2PHANDSHAKE", "libfabric")


def serve_and_transfer(args, port: int, metadata: str) -> None:
    """Starts a metadata server (`args`, listening on `port`), moves bytes with it as the metadata, stops it."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A server that just opened its port may still be starting (a fresh etcd elects itself leader first), which
    # takes longer than the 3 s default metadata timeout on a loaded machine.
    saved = os.environ.get("MC_METADATA_TIMEOUT_MS")
    os.environ["MC_METADATA_TIMEOUT_MS"] = "20000"
    try:
        wait_port(port, proc=proc)
        transfer_between_two_engines(metadata, "tcp")
    finally:
        if saved is None:
            os.environ.pop("MC_METADATA_TIMEOUT_MS", None)
        else:
            os.environ["MC_METADATA_TIMEOUT_MS"] = saved
        stop(proc)


def test_etcd_metadata():
    etcd = shutil.which("etcd")
    assert etcd, "etcd is not installed (scripts/install-deps.sh installs etcd-server)"
    client, peer = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data:
        args = [
            etcd,
            "--data-dir", data,
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        ]
        serve_and_transfer(args, client, f"etcd://127.0.0.1:{client}")


def test_redis_metadata():
    redis = shutil.which("redis-server")
    assert redis, "redis-server is not installed (scripts/install-deps.sh installs it)"
    port = free_port()
    args = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    serve_and_transfer(args, port, f"redis://127.0.0.1:{port}")


def test_bundled_programs_start():
    # The programs behind the console scripts were built with every backend too; each answers --help.
    for name in ("mooncake_master", "mooncake_client", "transfer_engine_bench", "mooncake_http_metadata_server"):
        out = subprocess.run([program(name), "--help"], capture_output=True, timeout=30)
        assert out.returncode == 0, f"{name} --help: {out.returncode} {out.stderr[-500:]!r}"
