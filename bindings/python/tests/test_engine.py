"""The `TransferEngine` surface of docs/python-api.md between engines on 127.0.0.1 (P2PHANDSHAKE, tcp).

Most tests use two engines in this process: `a` initiates, `b` owns the target memory and is addressed by its
segment name f"127.0.0.1:{b.get_rpc_port()}". Tests that need a peer which stops answering (Ctrl-C, GIL) run the
peer in a child process and SIGSTOP it; every child is resumed and stopped by PID in a `finally`.

Codes seen here: -1 invalid argument, -3 address not inside a registered buffer, -102 peer unreachable,
-200 segment not found, -202 not initialised, -301 timeout.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import free_port, stop
from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode, available_transports

PY = sys.executable
MiB = 1 << 20
NOT_INITIALIZED = -202


def new_engine() -> TransferEngine:
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    return e


def seg_of(e: TransferEngine) -> str:
    return f"127.0.0.1:{e.get_rpc_port()}"


def pattern(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def addr(arr: np.ndarray) -> int:
    return arr.ctypes.data


def wait_until(pred, timeout: float = 30.0, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


class Pair:
    """Initiator `a`, target `b` with a registered numpy buffer `remote` of `size` bytes."""

    def __init__(self, size: int = 4 * MiB):
        self.a = new_engine()
        self.b = new_engine()
        self.seg = seg_of(self.b)
        self.remote = np.zeros(size, dtype=np.uint8)
        self.raddr = addr(self.remote)
        assert self.b.register_memory(self.raddr, size) == 0

    def close(self):
        self.b.unregister_memory(self.raddr)
        self.a.shutdown()
        self.b.shutdown()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


# --- a peer engine in a child process (it can be SIGSTOPped) -------------------------------------------------

PEER_SCRIPT = textwrap.dedent(
    """
    import sys
    from mooncake.engine import TransferEngine
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    a = e.allocate_managed_buffer(int(sys.argv[1]))
    assert a
    print(f"127.0.0.1:{e.get_rpc_port()} {a}", flush=True)
    sys.stdin.read()
    """
)


class Peer:
    def __init__(self, size: int):
        self.proc = subprocess.Popen(
            [PY, "-c", PEER_SCRIPT, str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline().split()
        assert len(line) == 2, f"peer did not start (exit {self.proc.poll()})"
        self.seg, self.addr = line[0], int(line[1])

    def close(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stop(self.proc)


@pytest.fixture
def peer64():
    p = Peer(64 * MiB)
    yield p
    p.close()


# --- basics ---------------------------------------------------------------------------------------------------


def test_initialize_rpc_port_and_segment_name(engine):
    port = engine.get_rpc_port()
    assert isinstance(port, int) and 0 < port < 65536
    assert engine.get_local_segment_name() == f"127.0.0.1:{port}"


@pytest.mark.parametrize("metadata_type", ["p2p", ""])
def test_initialize_ext(metadata_type):
    b = TransferEngine()
    a = new_engine()
    try:
        assert b.initialize_ext("127.0.0.1", "P2PHANDSHAKE", "tcp", "", metadata_type) == 0
        remote = np.zeros(4096, dtype=np.uint8)
        assert b.register_memory(addr(remote), remote.nbytes) == 0
        src = pattern(4096, 1)
        assert a.transfer_sync_write(seg_of(b), addr(src), addr(remote), 4096) == 0
        assert np.array_equal(remote, src)
        b.unregister_memory(addr(remote))
    finally:
        a.shutdown()
        b.shutdown()


def test_transfer_opcode_enum():
    assert TransferEngine.TransferOpcode is TransferOpcode
    assert TransferOpcode.Read == 0 and TransferOpcode.Write == 1
    assert int(TransferOpcode.Read) == 0 and int(TransferOpcode.Write) == 1
    assert TransferOpcode.Read != TransferOpcode.Write
    assert TransferEngine.TransferOpcode.Write == TransferOpcode.Write


def test_transfer_notify_fields():
    n = TransferNotify("me", "hello")
    assert (n.name, n.msg) == ("me", "hello")
    n.msg = "bye"
    assert n.msg == "bye"
    assert (TransferNotify().name, TransferNotify().msg) == ("", "")


def test_available_transports():
    ts = available_transports()
    by_name = {t["name"]: t for t in ts}
    assert "tcp" in by_name
    assert by_name["tcp"]["available"] is True
    assert by_name["tcp"]["reason"] is None
    for t in ts:
        assert set(t) >= {"name", "available", "reason", "summary"}


def test_get_local_topology_is_json(engine):
    for topo in (engine.get_local_topology(), engine.get_local_topology("mlx5_0"), engine.get_local_topology(None)):
        doc = json.loads(topo)
        assert isinstance(doc, dict) and doc
        for k, v in doc.items():
            assert k.startswith("cpu:") and isinstance(v, list)


def test_send_probe(pair):
    assert pair.a.send_probe(pair.seg) == 0
    assert pair.a.send_probe(f"127.0.0.1:{free_port()}") < 0
    assert pair.a.send_probe("not-a-segment-name") < 0


# --- registration -----------------------------------------------------------------------------------------------


def test_register_unregister_single():
    a, b = new_engine(), new_engine()
    try:
        seg = seg_of(b)
        remote = np.zeros(64 * 1024, dtype=np.uint8)
        src = pattern(remote.nbytes, 2)
        assert b.register_memory(addr(remote), remote.nbytes, "*") == 0
        assert a.transfer_sync_write(seg, addr(src), addr(remote), remote.nbytes) == 0
        assert np.array_equal(remote, src)
        assert b.unregister_memory(addr(remote)) == 0
        assert b.unregister_memory(addr(remote)) < 0  # already gone
        # The peer republishes its segment: a write into the unregistered range now fails.
        assert wait_until(lambda: a.transfer_sync_write(seg, addr(src), addr(remote), 16) < 0, 30, 0.1)
    finally:
        a.shutdown()
        b.shutdown()


def test_batch_register_unregister():
    a, b = new_engine(), new_engine()
    try:
        seg = seg_of(b)
        remotes = [np.zeros(32 * 1024, dtype=np.uint8) for _ in range(3)]
        assert b.batch_register_memory([addr(r) for r in remotes], [r.nbytes for r in remotes]) == 0
        srcs = [pattern(r.nbytes, 10 + i) for i, r in enumerate(remotes)]
        assert (
            a.batch_transfer_sync_write(seg, [addr(s) for s in srcs], [addr(r) for r in remotes], [s.nbytes for s in srcs])
            == 0
        )
        for s, r in zip(srcs, remotes):
            assert np.array_equal(s, r)
        assert b.batch_unregister_memory([addr(r) for r in remotes]) == 0
        assert b.batch_unregister_memory([addr(r) for r in remotes]) < 0
        assert wait_until(lambda: a.transfer_sync_write(seg, addr(srcs[0]), addr(remotes[1]), 16) < 0, 30, 0.1)
    finally:
        a.shutdown()
        b.shutdown()


def test_managed_buffer_and_bytes_helpers():
    a, b = new_engine(), new_engine()
    try:
        seg = seg_of(b)
        n = 256 * 1024
        m = b.allocate_managed_buffer(n)
        assert isinstance(m, int) and m != 0
        assert a.get_first_buffer_address(seg) == m  # b's only buffer
        assert b.write_bytes_to_buffer(m, b"hello world", 11) == 0
        assert b.read_bytes_from_buffer(m, 11) == b"hello world"
        assert b.write_bytes_to_buffer(m + 100, b"abcdef", 3) == 0  # a prefix of the source
        assert b.read_bytes_from_buffer(m + 100, 4) == b"abc\x00"
        # A peer reads and writes it.
        got = np.zeros(11, dtype=np.uint8)
        assert a.transfer_sync_read(seg, addr(got), m, 11) == 0
        assert got.tobytes() == b"hello world"
        src = pattern(n, 3)
        assert a.transfer_sync_write(seg, addr(src), m, n) == 0
        assert b.read_bytes_from_buffer(m, n) == src.tobytes()
        # The initiator's own managed buffer works as a source and a destination too.
        la = a.allocate_managed_buffer(n)
        assert la
        assert a.write_bytes_to_buffer(la, src[::-1].tobytes(), n) == 0
        assert a.transfer_sync_write(seg, la, m, n) == 0
        assert b.read_bytes_from_buffer(m, n) == src[::-1].tobytes()
        assert a.free_managed_buffer(la, n) == 0
        assert b.free_managed_buffer(m, n) == 0
        assert b.free_managed_buffer(m, n) < 0  # double free is refused
    finally:
        a.shutdown()
        b.shutdown()


def test_get_first_buffer_address(pair):
    assert pair.a.get_first_buffer_address(pair.seg) == pair.raddr
    assert pair.a.get_first_buffer_address(f"127.0.0.1:{free_port()}") == 0


# --- sync transfers ---------------------------------------------------------------------------------------------


def test_transfer_sync_write_and_read(pair):
    n = 1 * MiB
    src = pattern(n, 4)
    assert pair.a.transfer_sync_write(pair.seg, addr(src), pair.raddr + 4096, n) == 0
    assert np.array_equal(pair.remote[4096 : 4096 + n], src)
    assert not pair.remote[:4096].any() and not pair.remote[4096 + n :].any()
    dst = np.zeros(n, dtype=np.uint8)
    assert pair.a.transfer_sync_read(pair.seg, addr(dst), pair.raddr + 4096, n) == 0
    assert np.array_equal(dst, src)


def test_transfer_sync_with_ctypes_buffers(pair):
    n = 100 * 1000
    src = ctypes.create_string_buffer(bytes(i % 251 for i in range(n)), n)
    assert pair.a.transfer_sync_write(pair.seg, ctypes.addressof(src), pair.raddr + 7, n) == 0
    assert pair.remote[7 : 7 + n].tobytes() == src.raw
    dst = ctypes.create_string_buffer(n)
    assert pair.a.transfer_sync_read(pair.seg, ctypes.addressof(dst), pair.raddr + 7, n) == 0
    assert dst.raw == src.raw


@pytest.mark.parametrize("write_op,read_op", [(TransferOpcode.Write, TransferOpcode.Read), (1, 0)])
def test_transfer_sync_opcodes(pair, write_op, read_op):
    n = 200 * 1024
    src = pattern(n, 5)
    assert pair.a.transfer_sync(pair.seg, addr(src), pair.raddr, n, write_op) == 0
    assert np.array_equal(pair.remote[:n], src)
    # Read == 0 pulls remote bytes into the local buffer (and leaves the remote alone).
    pair.remote[:n] = pattern(n, 6)
    dst = np.zeros(n, dtype=np.uint8)
    assert pair.a.transfer_sync(pair.seg, addr(dst), pair.raddr, n, read_op) == 0
    assert np.array_equal(dst, pattern(n, 6))
    assert np.array_equal(pair.remote[:n], pattern(n, 6))


def test_transfer_sync_notify(pair):
    src = pattern(4096, 7)
    rc = pair.a.transfer_sync(
        pair.seg, addr(src), pair.raddr, 4096, TransferOpcode.Write, TransferNotify("sender-a", "kv-ready:1")
    )
    assert rc == 0
    assert np.array_equal(pair.remote[:4096], src)
    got = []
    wait_until(lambda: got.extend(pair.b.get_notifies()) or any(n.msg == "kv-ready:1" for n in got), 30, 0.05)
    match = [n for n in got if n.msg == "kv-ready:1"]
    assert len(match) == 1 and match[0].name == "sender-a"
    assert isinstance(match[0], TransferNotify)


def test_oversized_notify_fails_cleanly(pair):
    """A notify message over the handshake frame limit (MC_HANDSHAKE_MAX_LENGTH, 1 MiB) gives a negative code;
    both engines keep working and the peer gets no partial notification."""
    src = pattern(4096, 23)
    rc = pair.a.transfer_sync(pair.seg, addr(src), pair.raddr, 4096, 1, TransferNotify("big", "x" * (1 << 20)))
    assert rc < 0
    assert pair.a.send_probe(pair.seg) == 0
    assert pair.a.transfer_sync(pair.seg, addr(src), pair.raddr, 4096, 1, TransferNotify("small", "ü" * 100)) == 0
    got = []
    wait_until(lambda: got.extend(pair.b.get_notifies()) or any(n.name == "small" for n in got), 30, 0.05)
    assert [(n.name, n.msg) for n in got] == [("small", "ü" * 100)]


def test_batch_transfer_sync_notify(pair):
    srcs = [pattern(8192, 20 + i) for i in range(4)]
    offs = [0, 100_000, 200_000, 300_000]
    rc = pair.a.batch_transfer_sync(
        pair.seg,
        [addr(s) for s in srcs],
        [pair.raddr + o for o in offs],
        [8192] * 4,
        1,
        notify=TransferNotify("batch", "done"),
    )
    assert rc == 0
    for s, o in zip(srcs, offs):
        assert np.array_equal(pair.remote[o : o + 8192], s)
    got = []
    wait_until(lambda: got.extend(pair.b.get_notifies()) or any(n.name == "batch" for n in got), 30, 0.05)
    assert [(n.name, n.msg) for n in got if n.name == "batch"] == [("batch", "done")]


def test_batch_transfer_sync_write_and_read(pair):
    k, size = 16, 64 * 1024
    src = pattern(k * size, 8)
    offs = [(i * 3 % k) * size + 1000 for i in range(k)]  # scattered remote offsets
    locals_ = [addr(src) + i * size for i in range(k)]
    assert pair.a.batch_transfer_sync_write(pair.seg, locals_, [pair.raddr + o for o in offs], [size] * k) == 0
    for i, o in enumerate(offs):
        assert np.array_equal(pair.remote[o : o + size], src[i * size : (i + 1) * size])
    dst = np.zeros(k * size, dtype=np.uint8)
    assert (
        pair.a.batch_transfer_sync_read(
            pair.seg, [addr(dst) + i * size for i in range(k)], [pair.raddr + o for o in offs], [size] * k
        )
        == 0
    )
    assert np.array_equal(dst, src)
    # Single-element batches and tuples work too.
    one = np.zeros(size, dtype=np.uint8)
    assert pair.a.batch_transfer_sync_read(pair.seg, (addr(one),), (pair.raddr + offs[0],), (size,)) == 0
    assert np.array_equal(one, src[:size])


@pytest.mark.parametrize("write_op,read_op", [(TransferOpcode.Write, TransferOpcode.Read), (1, 0)])
def test_batch_transfer_sync_opcodes(pair, write_op, read_op):
    k, size = 4, 32 * 1024
    src = pattern(k * size, 9)
    rems = [pair.raddr + i * 2 * size for i in range(k)]
    assert pair.a.batch_transfer_sync(pair.seg, [addr(src) + i * size for i in range(k)], rems, [size] * k, write_op) == 0
    dst = np.zeros(k * size, dtype=np.uint8)
    assert pair.a.batch_transfer_sync(pair.seg, [addr(dst) + i * size for i in range(k)], rems, [size] * k, read_op) == 0
    assert np.array_equal(dst, src)


def test_batch_transfer_async_and_status(pair):
    k, size = 8, 64 * 1024
    src = pattern(k * size, 11)
    rems = [pair.raddr + i * size for i in range(k)]
    bid = pair.a.batch_transfer_async_write(pair.seg, [addr(src) + i * size for i in range(k)], rems, [size] * k)
    assert isinstance(bid, int) and bid != 0
    assert pair.a.get_batch_transfer_status([bid]) == 0
    assert np.array_equal(pair.remote[: k * size], src)
    assert pair.a.get_batch_transfer_status([bid]) < 0  # freed by the first wait

    dst = np.zeros(k * size, dtype=np.uint8)
    bid = pair.a.batch_transfer_async_read(pair.seg, [addr(dst) + i * size for i in range(k)], rems, [size] * k)
    assert bid != 0
    assert pair.a.get_batch_transfer_status([bid]) == 0
    assert np.array_equal(dst, src)

    # batch_transfer_async with opcodes (enum and int); several ids waited at once.
    src2 = pattern(size, 12)
    dst2 = np.zeros(size, dtype=np.uint8)
    off = 2 * MiB
    w = pair.a.batch_transfer_async(pair.seg, [addr(src2)], [pair.raddr + off], [size], TransferOpcode.Write)
    assert w != 0
    assert pair.a.get_batch_transfer_status([w]) == 0
    ids = [
        pair.a.batch_transfer_async(pair.seg, [addr(dst2)], [pair.raddr + off], [size], 0),
        pair.a.batch_transfer_async(pair.seg, [addr(src2)], [pair.raddr + off + size], [size], 1),
    ]
    assert all(ids) and len(set(ids)) == 2
    assert pair.a.get_batch_transfer_status(ids) == 0
    assert np.array_equal(dst2, src2)
    assert np.array_equal(pair.remote[off + size : off + 2 * size], src2)


def test_transfer_submit_write_and_check_status(pair):
    n = 512 * 1024
    src = pattern(n, 13)
    bid = pair.a.transfer_submit_write(pair.seg, addr(src), pair.raddr + 64, n)
    assert bid != 0
    seen = []

    def done():
        s = pair.a.transfer_check_status(bid)
        seen.append(s)
        return s != 0

    wait_until(done, 30, 0.005)
    assert seen[-1] == 1, seen
    assert set(seen) <= {0, 1}
    assert np.array_equal(pair.remote[64 : 64 + n], src)
    assert pair.a.transfer_check_status(bid) == -1  # freed once reported done


# --- bad input ----------------------------------------------------------------------------------------------------


def test_everything_before_initialize():
    e = TransferEngine()
    buf = np.zeros(4096, dtype=np.uint8)
    p = addr(buf)
    seg = "127.0.0.1:1"
    assert e.get_rpc_port() == NOT_INITIALIZED
    assert e.register_memory(p, 4096) == NOT_INITIALIZED
    assert e.unregister_memory(p) == NOT_INITIALIZED
    assert e.batch_register_memory([p], [4096]) == NOT_INITIALIZED
    assert e.batch_unregister_memory([p]) == NOT_INITIALIZED
    assert e.allocate_managed_buffer(4096) == 0
    assert e.free_managed_buffer(p, 4096) == NOT_INITIALIZED
    assert e.transfer_sync_write(seg, p, p, 16) == NOT_INITIALIZED
    assert e.transfer_sync_read(seg, p, p, 16) == NOT_INITIALIZED
    assert e.transfer_sync(seg, p, p, 16, TransferOpcode.Write) == NOT_INITIALIZED
    assert e.transfer_sync(seg, p, p, 16, 0, TransferNotify("x", "y")) == NOT_INITIALIZED
    assert e.batch_transfer_sync_write(seg, [p, p], [p, p], [16, 16]) == NOT_INITIALIZED
    assert e.batch_transfer_sync_read(seg, [p], [p], [16]) == NOT_INITIALIZED
    assert e.batch_transfer_sync(seg, [p], [p], [16], 1) == NOT_INITIALIZED
    assert e.batch_transfer_async_write(seg, [p], [p], [16]) == 0
    assert e.batch_transfer_async_read(seg, [p], [p], [16]) == 0
    assert e.batch_transfer_async(seg, [p], [p], [16], 0) == 0
    assert e.get_batch_transfer_status([1]) == NOT_INITIALIZED
    assert e.transfer_submit_write(seg, p, p, 16) == 0
    assert e.transfer_check_status(1) < 0
    assert e.write_bytes_to_buffer(p, b"abc", 3) == NOT_INITIALIZED
    with pytest.raises(RuntimeError, match="initialize"):
        e.read_bytes_from_buffer(p, 3)
    with pytest.raises(RuntimeError, match="initialize"):
        e.get_local_segment_name()
    assert e.get_first_buffer_address(seg) == 0
    assert e.get_notifies() == []
    assert e.send_probe(seg) == NOT_INITIALIZED
    json.loads(e.get_local_topology())
    e.shutdown()  # harmless
    assert not buf.any()


def test_negative_length(pair):
    a, seg, r = pair.a, pair.seg, pair.raddr
    src = pattern(4096, 14)
    s = addr(src)
    assert a.transfer_sync_write(seg, s, r, -1) < 0
    assert a.transfer_sync_read(seg, s, r, -1) < 0
    assert a.transfer_sync(seg, s, r, -5, TransferOpcode.Write) < 0
    assert a.batch_transfer_sync_write(seg, [s, s], [r, r + 16], [16, -1]) < 0
    assert a.batch_transfer_sync_read(seg, [s], [r], [-1]) < 0
    assert a.batch_transfer_sync(seg, [s], [r], [-1], 1) < 0
    assert a.batch_transfer_async_write(seg, [s], [r], [-1]) == 0
    assert a.batch_transfer_async_read(seg, [s], [r], [-1]) == 0
    assert a.batch_transfer_async(seg, [s], [r], [-1], 0) == 0
    assert a.transfer_submit_write(seg, s, r, -1) == 0
    assert pair.b.register_memory(s, -1) < 0
    assert pair.b.allocate_managed_buffer(-1) == 0
    assert pair.b.write_bytes_to_buffer(r, b"abc", -1) < 0
    with pytest.raises(ValueError):
        pair.b.read_bytes_from_buffer(r, -1)
    assert not pair.remote.any()


def test_huge_length(pair):
    a, seg, r = pair.a, pair.seg, pair.raddr
    src = pattern(4096, 15)
    s = addr(src)
    huge = 2**62
    assert a.transfer_sync_write(seg, s, r, huge) < 0
    assert a.transfer_sync_read(seg, s, r, huge) < 0
    assert a.transfer_sync(seg, s, r, huge, 1) < 0
    assert a.batch_transfer_sync_write(seg, [s, s], [r, r + 16], [16, huge]) < 0
    assert a.batch_transfer_sync_read(seg, [s, s], [r, r + 16], [16, huge]) < 0
    assert a.batch_transfer_async_write(seg, [s], [r], [huge]) == 0
    assert a.transfer_submit_write(seg, s, r, huge) == 0
    for too_big in (2**64, 2**100):
        assert a.transfer_sync_write(seg, s, r, too_big) < 0
    assert pair.b.allocate_managed_buffer(huge) == 0
    assert pair.b.write_bytes_to_buffer(r, b"abc", huge) < 0
    with pytest.raises(ValueError):
        pair.b.read_bytes_from_buffer(r, huge)
    assert pair.b.register_memory(s, 2**64 - 1) < 0  # end overflows the address space
    # The engines are still fine.
    assert a.transfer_sync_write(seg, s, r, 4096) == 0
    assert np.array_equal(pair.remote[:4096], src)


def test_register_memory_huge_length_is_refused(engine):
    buf = np.zeros(4096, dtype=np.uint8)
    rc = engine.register_memory(addr(buf), 2**62)
    if rc == 0:
        engine.unregister_memory(addr(buf))
    assert rc < 0


def test_unregistered_remote_address(pair):
    a, seg = pair.a, pair.seg
    src = pattern(4096, 16)
    s = addr(src)
    bogus = 0x1000
    assert a.transfer_sync_write(seg, s, bogus, 16) < 0
    assert a.transfer_sync_read(seg, s, bogus, 16) < 0
    assert a.transfer_sync(seg, s, bogus, 16, 0) < 0
    # Straddles the end of the registered buffer.
    assert a.transfer_sync_write(seg, s, pair.raddr + pair.remote.nbytes - 8, 16) < 0
    assert a.batch_transfer_sync_write(seg, [s, s], [pair.raddr, bogus], [16, 16]) < 0
    assert a.batch_transfer_sync_read(seg, [s, s], [bogus, pair.raddr], [16, 16]) < 0
    bid = a.batch_transfer_async_write(seg, [s], [bogus], [16])
    assert bid == 0 or a.get_batch_transfer_status([bid]) < 0
    bid = a.transfer_submit_write(seg, s, bogus, 16)
    if bid != 0:
        assert wait_until(lambda: a.transfer_check_status(bid), 30) < 0
    assert not pair.remote[pair.remote.nbytes - 8 :].any()
    # The engine still works afterwards.
    assert a.transfer_sync_write(seg, s, pair.raddr, 4096) == 0
    assert np.array_equal(pair.remote[:4096], src)


def test_unknown_segment(pair):
    a = pair.a
    src = pattern(64, 17)
    s = addr(src)
    for seg in (f"127.0.0.1:{free_port()}", "no-such-segment"):
        assert a.transfer_sync_write(seg, s, 0x1000, 64) < 0
        assert a.transfer_sync_read(seg, s, 0x1000, 64) < 0
        assert a.transfer_sync(seg, s, 0x1000, 64, 1, TransferNotify("x", "y")) < 0
        assert a.batch_transfer_sync_write(seg, [s, s], [0x1000, 0x2000], [8, 8]) < 0
        assert a.batch_transfer_async_read(seg, [s], [0x1000], [64]) == 0
        assert a.transfer_submit_write(seg, s, 0x1000, 64) == 0
        assert a.get_first_buffer_address(seg) == 0
        assert a.send_probe(seg) < 0
    assert a.get_batch_transfer_status([987654321]) < 0
    assert a.transfer_check_status(987654321) < 0


def test_unknown_protocol_names_usable_transports():
    script = textwrap.dedent(
        """
        import sys
        from mooncake.engine import TransferEngine
        e = TransferEngine()
        rc = e.initialize("127.0.0.1", "P2PHANDSHAKE", "no_such_transport", "")
        print(rc)
        sys.exit(0 if rc < 0 else 1)
        """
    )
    env = dict(os.environ)
    env.pop("MC_FORCE_TCP", None)
    r = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert int(r.stdout.strip()) < 0
    assert "no_such_transport" in r.stderr
    assert "tcp" in r.stderr


def test_wrong_types(pair):
    a, seg, r = pair.a, pair.seg, pair.raddr
    src = pattern(64, 18)
    s = addr(src)
    with pytest.raises(TypeError):
        a.transfer_sync_write(seg, "0x1000", r, 64)
    with pytest.raises(TypeError):
        a.transfer_sync_write(seg, s, str(r), 64)
    with pytest.raises(TypeError):
        a.transfer_sync_write(seg, s, r, "64")
    with pytest.raises(TypeError):
        a.transfer_sync_write(seg, s, r, 64.0)
    with pytest.raises(TypeError):
        a.transfer_sync_read(12345, s, r, 64)
    with pytest.raises(TypeError):
        a.batch_transfer_sync_write(seg, [str(s)], [r], [64])
    with pytest.raises(TypeError):
        a.batch_transfer_sync_write(seg, [s], [str(r)], [64])
    with pytest.raises(TypeError):
        a.batch_transfer_sync_read(seg, [s], [r], ["64"])
    with pytest.raises(TypeError):
        a.batch_transfer_sync_write(seg, "abc", [r], [64])
    with pytest.raises(TypeError):
        a.batch_transfer_async_write(seg, [s], ["r"], [64])
    with pytest.raises(TypeError):
        a.batch_transfer_sync_write(seg, s, r, 64)
    with pytest.raises(TypeError):
        a.transfer_sync(seg, s, r, 64, "write")
    with pytest.raises(ValueError):
        a.transfer_sync(seg, s, r, 64, 2)
    with pytest.raises(TypeError):
        a.transfer_sync(seg, s, r, 64, 1, notify="not a notify")
    with pytest.raises(TypeError):
        a.get_batch_transfer_status(["1"])
    with pytest.raises(TypeError):
        pair.b.register_memory(str(s), 64)
    with pytest.raises(TypeError):
        pair.b.batch_register_memory(["a"], [64])
    with pytest.raises(TypeError):
        pair.b.batch_unregister_memory([None])
    with pytest.raises(TypeError):
        pair.b.write_bytes_to_buffer(r, "a str", 5)
    with pytest.raises(TypeError):
        pair.b.read_bytes_from_buffer(r, "5")
    with pytest.raises(TypeError):
        pair.b.allocate_managed_buffer("4096")
    with pytest.raises(TypeError):
        pair.b.free_managed_buffer("x", 1)
    with pytest.raises(TypeError):
        TransferEngine().initialize(1, "P2PHANDSHAKE", "tcp", "")
    assert not pair.remote.any()
    assert a.transfer_sync_write(seg, s, r, 64) == 0


def test_mismatched_batch_lists(pair):
    a, seg, r = pair.a, pair.seg, pair.raddr
    src = pattern(64, 19)
    s = addr(src)
    assert a.batch_transfer_sync_write(seg, [s, s], [r], [8]) < 0
    assert a.batch_transfer_sync_read(seg, [s], [r, r], [8]) < 0
    assert a.batch_transfer_sync(seg, [s], [r], [8, 8], 1) < 0
    assert a.batch_transfer_async_write(seg, [s, s], [r], [8, 8]) == 0
    assert a.batch_transfer_async_read(seg, [s], [r], [8, 8]) == 0
    assert a.batch_transfer_async(seg, [], [r], [8], 0) == 0
    assert pair.b.batch_register_memory([s], [8, 8]) < 0
    assert not pair.remote.any()


def test_empty_batches(pair):
    assert pair.a.batch_transfer_async_write(pair.seg, [], [], []) == 0
    rc = pair.a.batch_transfer_sync_write(pair.seg, [], [], [])
    assert isinstance(rc, int) and rc <= 0


def test_read_bytes_from_unregistered_address(engine):
    buf = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match="registered"):
        engine.read_bytes_from_buffer(addr(buf), 16)
    assert engine.write_bytes_to_buffer(addr(buf), b"x" * 16, 16) < 0
    assert not buf.any()
    m = engine.allocate_managed_buffer(4096)
    assert m
    with pytest.raises(ValueError):
        engine.read_bytes_from_buffer(m + 4000, 200)  # runs off the end
    assert engine.write_bytes_to_buffer(m, b"abc", 10) < 0  # longer than the source
    assert engine.free_managed_buffer(m, 4096) == 0
    with pytest.raises(ValueError):
        engine.read_bytes_from_buffer(m, 16)  # freed


def test_free_managed_buffer_unknown_address(engine):
    buf = np.zeros(64, dtype=np.uint8)
    assert engine.free_managed_buffer(addr(buf), 64) < 0
    assert engine.free_managed_buffer(0, 0) < 0
    # A registered but not managed buffer is not freed by it.
    assert engine.register_memory(addr(buf), 64) == 0
    assert engine.free_managed_buffer(addr(buf), 64) < 0
    assert engine.unregister_memory(addr(buf)) == 0


def test_unregister_unknown_address(engine):
    buf = np.zeros(64, dtype=np.uint8)
    assert engine.unregister_memory(addr(buf)) < 0
    assert engine.batch_unregister_memory([addr(buf)]) < 0


def test_double_initialize(pair):
    port = pair.b.get_rpc_port()
    assert pair.b.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") < 0
    assert pair.b.initialize_ext("127.0.0.1", "P2PHANDSHAKE", "tcp", "", "p2p") < 0
    assert pair.b.get_rpc_port() == port
    src = pattern(4096, 21)
    assert pair.a.transfer_sync_write(pair.seg, addr(src), pair.raddr, 4096) == 0
    assert np.array_equal(pair.remote[:4096], src)


def test_calls_after_shutdown_fail_cleanly(pair):
    src = pattern(64, 22)
    pair.a.shutdown()
    assert pair.a.transfer_sync_write(pair.seg, addr(src), pair.raddr, 64) < 0
    assert pair.a.batch_transfer_sync_write(pair.seg, [addr(src)] * 2, [pair.raddr, pair.raddr + 64], [8, 8]) < 0
    assert pair.a.batch_transfer_async_write(pair.seg, [addr(src)], [pair.raddr], [8]) == 0
    pair.a.shutdown()  # idempotent
    assert not pair.remote.any()


def test_write_from_invalid_local_address_does_not_crash():
    script = textwrap.dedent(
        """
        import numpy as np
        from mooncake.engine import TransferEngine
        a, b = TransferEngine(), TransferEngine()
        assert a.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        assert b.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        remote = np.zeros(4096, dtype=np.uint8)
        assert b.register_memory(remote.ctypes.data, 4096) == 0
        rc = a.transfer_sync_write(f"127.0.0.1:{b.get_rpc_port()}", 0x3039, remote.ctypes.data, 16)
        print("rc", rc, flush=True)
        """
    )
    r = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert int(r.stdout.split()[-1]) < 0


# --- threads and the GIL ------------------------------------------------------------------------------------------


def test_eight_threads_concurrent_sync_writes():
    threads_n, per_thread, size = 8, 200, 4096
    p = Pair(threads_n * per_thread * size)
    try:
        errors = []
        barrier = threading.Barrier(threads_n)

        def worker(t: int):
            src = np.empty(per_thread * size, dtype=np.uint8)
            for i in range(per_thread):
                src[i * size : (i + 1) * size] = (t * 31 + i) % 256
            barrier.wait()
            base = t * per_thread * size
            for i in range(per_thread):
                rc = p.a.transfer_sync_write(p.seg, addr(src) + i * size, p.raddr + base + i * size, size)
                if rc != 0:
                    errors.append((t, i, rc))

        ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(120)
        assert not any(th.is_alive() for th in ths), "a worker thread hangs"
        assert errors == []
        for t in range(threads_n):
            for i in range(per_thread):
                off = (t * per_thread + i) * size
                chunk = p.remote[off : off + size]
                assert (chunk == (t * 31 + i) % 256).all(), (t, i)
    finally:
        p.close()


def test_gil_released_during_long_batch_transfer(peer64):
    """The peer is SIGSTOPped, so the batch cannot finish until a shell (not Python) resumes it ~2 s later;
    meanwhile a Python thread must keep counting."""
    e = new_engine()
    resumer = None
    try:
        n = 64 * MiB
        src = np.full(n, 0x5A, dtype=np.uint8)
        assert e.transfer_sync_write(peer64.seg, addr(src), peer64.addr, 4096) == 0  # connect first
        k = 16
        chunk = n // k
        count = [0]
        stop_flag = threading.Event()

        def counter():
            while not stop_flag.is_set():
                count[0] += 1
                time.sleep(0.001)

        th = threading.Thread(target=counter)
        th.start()
        os.kill(peer64.proc.pid, signal.SIGSTOP)
        resumer = subprocess.Popen(["sh", "-c", f"sleep 2; kill -CONT {peer64.proc.pid}"])
        before = count[0]
        rc = e.batch_transfer_sync_write(
            peer64.seg, [addr(src) + i * chunk for i in range(k)], [peer64.addr + i * chunk for i in range(k)], [chunk] * k
        )
        during = count[0] - before
        stop_flag.set()
        th.join(30)
        assert rc == 0
        assert during >= 10, f"the counting thread ran only {during} times while the transfer blocked"
        back = np.zeros(n, dtype=np.uint8)
        assert e.transfer_sync_read(peer64.seg, addr(back), peer64.addr, n) == 0
        assert (back == 0x5A).all()
    finally:
        if resumer is not None:
            resumer.wait(30)
        os.kill(peer64.proc.pid, signal.SIGCONT)
        e.shutdown()


# --- Ctrl-C -------------------------------------------------------------------------------------------------------

CTRL_C_CLIENT = textwrap.dedent(
    """
    import faulthandler, os, signal, sys
    import numpy as np
    from mooncake.engine import TransferEngine
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if exiting takes too long
    # A process started in the background by a shell without job control (`cmd &` in a script, nohup) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: put it back, as a terminal would have.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    seg, raddr, peer_pid, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    n = 64 << 20
    buf = np.ones(n, dtype=np.uint8)
    assert e.transfer_sync_write(seg, buf.ctypes.data, raddr, 4096) == 0
    os.kill(peer_pid, signal.SIGSTOP)  # the peer stops reading: the batch cannot complete (30 s timeout)
    k = 16
    chunk = n // k
    locs = [buf.ctypes.data + i * chunk for i in range(k)]
    rems = [raddr + i * chunk for i in range(k)]
    if mode == "status":
        bid = e.batch_transfer_async_write(seg, locs, rems, [chunk] * k)
        assert bid
        print("blocking", flush=True)
        rc = e.get_batch_transfer_status([bid])
    else:
        print("blocking", flush=True)
        rc = e.batch_transfer_sync_write(seg, locs, rems, [chunk] * k)
    print("returned", rc, flush=True)
    """
)


def native_stacks(pid: int) -> str:
    """The state of process `pid` (running, sleeping, stopped) and every thread's native stack (gdb, when
    installed), for a failure message."""
    import shutil

    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            state = next((line.strip() for line in f if line.startswith("State:")), "State: ?")
    except OSError as e:
        state = f"State: unreadable ({e})"
    gdb = shutil.which("gdb")
    if not gdb:
        return f"{state}\n(gdb is not installed)"
    try:
        out = subprocess.run(
            [gdb, "-p", str(pid), "-batch", "-ex", "thread apply all bt"], capture_output=True, text=True, timeout=30
        )
        return f"{state}\n{out.stdout}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{state}\n(gdb failed: {e})"


@pytest.mark.parametrize("mode", ["status", "batch_sync"])
def test_ctrl_c_interrupts_batch_wait(peer64, mode):
    client = subprocess.Popen(
        [PY, "-c", CTRL_C_CLIENT, peer64.seg, str(peer64.addr), str(peer64.proc.pid), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = client.stdout.readline().strip()
        assert line == "blocking", (line, client.poll())
        time.sleep(1.0)
        assert client.poll() is None, "the batch did not block"
        client.send_signal(signal.SIGINT)
        try:
            out, err = client.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            native = native_stacks(client.pid)
            client.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            client.kill()
            out, err = client.communicate()
            pytest.fail(
                f"the process did not exit within 5 s of SIGINT\nstdout: {out!r}\nstderr and Python stacks:\n"
                f"{err[-6000:]}\nnative stacks:\n{native[-12000:]}"
            )
        assert client.returncode != 0
        assert "KeyboardInterrupt" in err, err[-2000:]
        assert "returned" not in out
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        os.kill(peer64.proc.pid, signal.SIGCONT)
