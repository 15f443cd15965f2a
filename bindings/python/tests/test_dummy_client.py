"""Dummy clients against a real mooncake_client process: several application processes share one real
client's memory through their shared pools; a dummy whose real client is gone gets a typed error within a
bounded time and attaches again when it returns."""

import ctypes
import os
import subprocess
import sys
import textwrap
import time

import pytest

from mooncake.store import MooncakeDistributedStore
from procs import free_port, wait_port

BIN = os.path.dirname(sys.executable)
RPC_FAIL, RPC_TIMEOUT = -900, -901


def start_node(master, port):
    proc = subprocess.Popen(
        [os.path.join(BIN, "mooncake_client"), "--host=127.0.0.1", f"--port={port}",
         f"--master_server_address={master.address}", f"--metadata_server={master.metadata}",
         "--global_segment_size=64MB", "--protocol=tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def master():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "differential"))
    from scenarios import Master  # noqa: PLC0415

    m = Master()
    yield m
    m.stop()


def test_two_processes_share_one_real_client(master):
    port = free_port()
    node = start_node(master, port)
    try:
        d = MooncakeDistributedStore()
        assert d.setup_dummy(16 << 20, 8 << 20, f"127.0.0.1:{port}") == 0
        assert d.put("shared", b"from the test process") == 0
        other = textwrap.dedent(f"""
            from mooncake.store import MooncakeDistributedStore
            d = MooncakeDistributedStore()
            assert d.setup_dummy(8 << 20, 4 << 20, "127.0.0.1:{port}") == 0
            assert d.get("shared") == b"from the test process"
            assert d.put("back", b"from the other process") == 0
            d.close()
        """)
        subprocess.run([sys.executable, "-c", other], check=True, timeout=120)
        assert d.get("back") == b"from the other process"
        # Zero copy into a pool buffer, and a buffer outside the pool refused.
        buf = d.alloc_from_mem_pool(1 << 20)
        assert buf != 0 and d.register_buffer(buf, 1 << 20) == 0
        assert d.get_into("back", buf, 1 << 20) == 22
        assert ctypes.string_at(buf, 22) == b"from the other process"
        outside = ctypes.create_string_buffer(64)
        assert d.register_buffer(ctypes.addressof(outside), 64) == -600
        assert d.get_into("back", ctypes.addressof(outside), 64) == -600
        # A value larger than the staging part is refused with a code, not an exception.
        assert d.put("big", b"x" * (9 << 20)) == -600
        assert d.alloc_from_mem_pool(1 << 40) == 0
        assert d.close() == 0
    finally:
        stop(node)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"mooncake-dummy-{os.getpid()}-")]


def test_real_client_gone_gives_a_typed_error_then_reattaches(master):
    port = free_port()
    node = start_node(master, port)
    d = MooncakeDistributedStore()
    try:
        assert d.setup_dummy(4 << 20, 4 << 20, f"127.0.0.1:{port}") == 0
        assert d.put("k", b"v") == 0
        stop(node)
        assert d.put("k2", b"v2") in (RPC_FAIL, RPC_TIMEOUT)
        assert d.get("k") == b""
        assert d.health_check() == 2
        # The real client comes back on the same port; its segment is new, the objects on the old one are gone.
        node = start_node(master, port)
        deadline = time.monotonic() + 60
        while d.put("k3", b"v3") != 0:
            assert time.monotonic() < deadline, "the dummy did not attach again"
            time.sleep(0.2)
        assert d.get("k3") == b"v3"
        assert d.health_check() == 0
    finally:
        d.close()
        stop(node)


def test_setup_dummy_errors():
    d = MooncakeDistributedStore()
    assert d.setup_dummy(4 << 20, 4 << 20, f"127.0.0.1:{free_port()}") == RPC_FAIL
    assert d.setup_dummy(0, 0, "127.0.0.1:1") == -600
    with pytest.raises(TypeError):
        d.setup_dummy("lots", 0, "127.0.0.1:1")
    assert d.alloc_from_mem_pool(4096) == 0
