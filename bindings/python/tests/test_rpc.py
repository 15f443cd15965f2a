"""mooncake.engine's RPC interface (RpcInterface / CoroRPCInterface, mooncake/_rpc.py): bytes and tensors to a peer's
callback, in one process and between two, the async forms, errors, and stopping and restarting servers.

Every server listens on a free 127.0.0.1 port. No test asserts on timing: where a test waits, a bounded deadline only
turns a hang into a failure. Tensor tests are skipped when torch is not importable.
"""

import asyncio
import gc
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from procs import free_port  # noqa: E402

from mooncake import engine  # noqa: E402
from mooncake.engine import (  # noqa: E402
    CoroRPCInterface,
    ReceivedData,
    ReceivedTensor,
    RpcInterface,
    create_rpc_client,
    create_rpc_server,
)

try:
    import torch
except ImportError:  # pragma: no cover - depends on the venv
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not importable here (scripts/setup_torch_venv.sh)")


def address() -> str:
    return f"127.0.0.1:{free_port()}"


class Inbox:
    """Collects what a server's callbacks are given, with the thread each ran on."""

    def __init__(self):
        self.lock = threading.Lock()
        self.data = []
        self.tensors = []
        self.threads = []

    def on_data(self, msg):
        with self.lock:
            self.threads.append(threading.current_thread())
            self.data.append(msg)

    def on_tensor(self, t):
        with self.lock:
            self.threads.append(threading.current_thread())
            self.tensors.append(t)


@pytest.fixture
def served():
    """(server interface, its address, its inbox): data and tensor callbacks set, started, stopped afterwards."""
    inbox = Inbox()
    s = RpcInterface()
    a = address()
    assert s.initialize(a, 4, 10, 4) is True
    s.set_data_receive_callback(inbox.on_data)
    s.set_tensor_receive_callback(inbox.on_tensor)
    assert s.start_server_async() is True
    yield s, a, inbox
    s.stop_server()


@pytest.fixture
def client():
    c = RpcInterface()
    assert c.initialize_client() is True
    return c


# --------------------------------------------------------------------------------------------------------------------
# Names and construction


def test_exported_names():
    for name in ["RpcInterface", "CoroRPCInterface", "ReceivedData", "ReceivedTensor", "create_rpc_client",
                 "create_rpc_server"]:  # fmt: skip
        assert name in engine.__all__
        assert getattr(engine, name) is not None
    assert CoroRPCInterface is RpcInterface
    assert RpcInterface.__module__ == "mooncake.engine"


def test_received_types_are_not_constructible():
    with pytest.raises(TypeError):
        ReceivedData()
    with pytest.raises(TypeError):
        ReceivedTensor()


def test_factories():
    c = create_rpc_client()
    assert isinstance(c, RpcInterface)
    assert isinstance(create_rpc_client(local_rank=3, world_size=8), RpcInterface)
    s = create_rpc_server(0, 1)  # initialized for 0.0.0.0:8080, not started
    assert isinstance(s, RpcInterface)
    for bad in [("a",), (-1,), (0, 1.5)]:
        with pytest.raises(TypeError):
            create_rpc_server(*bad)
        with pytest.raises(TypeError):
            create_rpc_client(*bad)


def test_argument_types():
    r = RpcInterface()
    with pytest.raises(TypeError):
        r.initialize(5)
    with pytest.raises(TypeError):
        r.initialize("127.0.0.1:1", -1)
    with pytest.raises(TypeError):
        r.initialize("127.0.0.1:1", 1, 2.5)
    with pytest.raises(TypeError):
        r.initialize_client(-1)
    with pytest.raises(TypeError):
        r.initialize_server()
    with pytest.raises(TypeError):
        r.set_data_receive_callback(None)
    with pytest.raises(TypeError):
        r.set_tensor_receive_callback(5)
    assert r.initialize(listen_address="", thread_count=1, timeout_seconds=3, pool_size=2) is True
    assert r.initialize_client(pool_size=0, timeout_seconds=0) is True  # 0 means the default
    assert r.initialize(b"127.0.0.1:0") is True  # bytes are taken as UTF-8, as upstream's std::string
    for data in ["text", bytearray(b"x"), memoryview(b"x"), 1, None]:
        with pytest.raises(TypeError):
            r.send_data("127.0.0.1:1", data)
    with pytest.raises(TypeError):
        r.send_data(1, b"x")
    with pytest.raises(TypeError):
        r.send_tensor(None, b"x")


# --------------------------------------------------------------------------------------------------------------------
# Bytes in one process


@pytest.mark.parametrize("size", [0, 1, 1024, 1025, 1 << 20, 64 << 20])
def test_send_data_sizes(served, client, size):
    _, a, inbox = served
    data = os.urandom(size) if size <= (1 << 20) else (bytes(range(256)) * (size // 256))
    assert client.send_data(a, data) == 0
    # send_data returns after the callback has returned: nothing to wait for.
    assert len(inbox.data) == 1
    msg = inbox.data[0]
    assert set(msg) == {"source", "data"}
    assert type(msg["data"]) is bytes
    assert hashlib.sha256(msg["data"]).digest() == hashlib.sha256(data).digest()
    host, port = msg["source"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0


def test_messages_arrive_in_order_and_reuse_connections(served, client):
    _, a, inbox = served
    for i in range(50):
        assert client.send_data(a, f"m{i}".encode() * (i * 10 + 1)) == 0
    assert [m["data"] for m in inbox.data] == [f"m{i}".encode() * (i * 10 + 1) for i in range(50)]
    # One client, one pooled connection: every message came from the same source.
    assert len({m["source"] for m in inbox.data}) == 1


def test_callback_runs_on_a_server_thread(served, client):
    _, a, inbox = served
    assert client.send_data(a, b"x") == 0
    assert inbox.threads[0] is not threading.main_thread()
    assert inbox.threads[0].daemon


def test_send_returns_after_the_callback(client):
    s = RpcInterface()
    a = address()
    s.initialize(a, 2, 10, 4)
    done = []

    def slow(msg):
        time.sleep(0.2)
        done.append(msg["data"])

    s.set_data_receive_callback(slow)
    assert s.start_server_async()
    try:
        assert client.send_data(a, b"slow") == 0
        assert done == [b"slow"]
    finally:
        s.stop_server()


def test_raising_callback_is_logged_and_the_server_goes_on(served, client, caplog):
    s, a, inbox = served
    calls = []

    def failing(msg):
        calls.append(msg["data"])
        raise ValueError("callback failure")

    s.set_data_receive_callback(failing)
    with caplog.at_level(logging.ERROR, logger="mooncake.rpc"):
        assert client.send_data(a, b"boom") == 0  # delivered; the callback's error stays on the server
    assert calls == [b"boom"]
    assert any("callback failure" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    s.set_data_receive_callback(inbox.on_data)
    assert client.send_data(a, b"after") == 0
    assert [m["data"] for m in inbox.data] == [b"after"]


def test_no_callback_drops_the_message(client):
    s = RpcInterface()
    a = address()
    s.initialize(a)
    assert s.start_server_async()
    try:
        assert client.send_data(a, b"nobody listens") == 0
    finally:
        s.stop_server()


def test_callbacks_set_before_initialize_are_kept(client):
    inbox = Inbox()
    s = RpcInterface()
    s.set_data_receive_callback(inbox.on_data)
    a = address()
    s.initialize(a)
    assert s.start_server_async()
    try:
        assert client.send_data(a, b"kept") == 0
        assert [m["data"] for m in inbox.data] == [b"kept"]
    finally:
        s.stop_server()


def test_thread_count_one_runs_callbacks_one_at_a_time():
    s = RpcInterface()
    a = address()
    s.initialize(a, 1, 10, 4)
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def cb(msg):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1

    s.set_data_receive_callback(cb)
    assert s.start_server_async()
    results = []

    def sender():
        c = RpcInterface()
        c.initialize_client()
        results.extend(c.send_data(a, b"x") for _ in range(5))

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    s.stop_server()
    assert results == [0] * 20
    assert state["most"] == 1


def test_concurrent_senders_share_one_client(served, client):
    _, a, inbox = served
    results = []
    lock = threading.Lock()

    def sender(k):
        for i in range(10):
            rc = client.send_data(a, f"{k}:{i}".encode())
            with lock:
                results.append(rc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [0] * 60
    assert sorted(m["data"] for m in inbox.data) == sorted(f"{k}:{i}".encode() for k in range(6) for i in range(10))


# --------------------------------------------------------------------------------------------------------------------
# Errors


def test_uninitialized_interface():
    r = RpcInterface()
    assert r.send_data("127.0.0.1:1", b"x") == -1
    assert r.send_tensor("127.0.0.1:1", b"x") == -1
    assert r.start_server() is False
    assert r.start_server_async() is False
    assert r.stop_server() is None


@pytest.mark.parametrize(
    "target", ["garbage", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:abc", "", ":80", "[::1"]
)
def test_send_to_bad_addresses_fails_with_minus_one(client, target, caplog):
    with caplog.at_level(logging.WARNING, logger="mooncake.rpc"):
        assert client.send_data(target, b"x") == -1
    assert caplog.records, "the reason is logged"


def test_send_to_a_closed_port(client):
    assert client.send_data(address(), b"x") == -1


def test_send_times_out_on_a_stuck_callback():
    release = threading.Event()
    s = RpcInterface()
    a = address()
    s.initialize(a, 2, 10, 4)
    s.set_data_receive_callback(lambda msg: release.wait(30))
    assert s.start_server_async()
    c = RpcInterface()
    c.initialize_client(4, 1)  # a 1 s bound on the wait for the peer's answer
    try:
        assert c.send_data(a, b"stuck") == -1
    finally:
        release.set()
        s.stop_server()


def test_a_peer_that_does_not_speak_the_protocol(client):
    """A listener that answers garbage (or closes) makes send fail, not hang."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        assert client.send_data(f"127.0.0.1:{port}", b"x") == -1
        t.join(10)


def test_garbage_to_our_server_is_dropped(served, client):
    import socket

    _, a, inbox = served
    host, port = a.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
        s.settimeout(5)
        try:
            assert s.recv(16) == b""  # closed by the server
        except ConnectionResetError:  # closed with our unread bytes still queued
            pass
    assert client.send_data(a, b"still fine") == 0
    assert [m["data"] for m in inbox.data] == [b"still fine"]


# --------------------------------------------------------------------------------------------------------------------
# Server lifecycle


@pytest.mark.parametrize("listen", ["garbage", "127.0.0.1:99999", "256.1.1.1:80", "127.0.0.1:abc", "[::1"])
def test_start_on_bad_address_returns_false(listen):
    s = RpcInterface()
    assert s.initialize(listen) is True  # as upstream, the address is checked when the server starts
    assert s.start_server_async() is False
    assert s.start_server() is False


def test_start_twice_busy_port_and_client_only():
    s = RpcInterface()
    a = address()
    s.initialize(a)
    assert s.start_server_async() is True
    try:
        assert s.start_server_async() is False
        assert s.start_server() is False
        other = RpcInterface()
        other.initialize(a)
        assert other.start_server_async() is False
    finally:
        s.stop_server()
    c = RpcInterface()
    c.initialize_client()
    assert c.start_server_async() is False


def test_stop_and_restart(client):
    inbox = Inbox()
    s = RpcInterface()
    a = address()
    s.initialize(a)
    s.set_data_receive_callback(inbox.on_data)
    assert s.start_server_async()
    assert client.send_data(a, b"one") == 0
    s.stop_server()
    s.stop_server()  # idempotent
    assert client.send_data(a, b"lost") == -1  # the pooled connection was closed; nothing listens
    assert s.start_server_async() is True
    try:
        assert client.send_data(a, b"two") == 0
    finally:
        s.stop_server()
    assert [m["data"] for m in inbox.data] == [b"one", b"two"]


def test_initialize_again_stops_the_server(client):
    s = RpcInterface()
    a, b = address(), address()
    inbox = Inbox()
    s.set_data_receive_callback(inbox.on_data)
    s.initialize(a)
    assert s.start_server_async()
    s.initialize(b)
    assert client.send_data(a, b"x") == -1
    assert s.start_server_async()
    try:
        assert client.send_data(b, b"y") == 0
    finally:
        s.stop_server()
    assert [m["data"] for m in inbox.data] == [b"y"]


def test_start_server_blocks_until_stopped(client):
    inbox = Inbox()
    s = RpcInterface()
    a = address()
    s.initialize(a)
    s.set_data_receive_callback(inbox.on_data)
    returned = []
    t = threading.Thread(target=lambda: returned.append(s.start_server()), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while client.send_data(a, b"hello") != 0:
        assert time.monotonic() < deadline, "the blocking server never listened"
        time.sleep(0.05)
    assert returned == []  # still serving
    s.stop_server()
    t.join(30)
    assert not t.is_alive()
    assert returned == [True]


def test_stop_server_from_inside_a_callback(client):
    s = RpcInterface()
    a = address()
    s.initialize(a)
    s.set_data_receive_callback(lambda msg: s.stop_server())
    assert s.start_server_async()
    assert client.send_data(a, b"stop") == 0  # the message being handled is still answered
    assert client.send_data(a, b"after") == -1
    assert s.start_server_async() is True
    s.stop_server()


def test_stop_waits_for_the_message_being_handled():
    """stop_server() called while a callback runs: it returns after that callback, whose sender gets 0; later
    senders get -1."""
    entered, release = threading.Event(), threading.Event()
    finished = []
    s = RpcInterface()
    a = address()
    s.initialize(a)

    def cb(msg):
        entered.set()
        release.wait(30)
        finished.append(msg["data"])

    s.set_data_receive_callback(cb)
    assert s.start_server_async()
    results = []
    c = RpcInterface()
    c.initialize_client()
    t = threading.Thread(target=lambda: results.append(c.send_data(a, b"in flight")))
    t.start()
    assert entered.wait(30)
    threading.Timer(0.2, release.set).start()
    s.stop_server()
    assert finished == [b"in flight"]
    t.join(30)
    assert results == [0]
    assert c.send_data(a, b"late") == -1


def test_stop_does_not_wait_past_the_timeout_for_a_stuck_callback():
    release = threading.Event()
    s = RpcInterface()
    a = address()
    s.initialize(a, 2, 1, 4)  # 1 s timeout
    entered = threading.Event()
    s.set_data_receive_callback(lambda msg: (entered.set(), release.wait(60)))
    assert s.start_server_async()
    c = RpcInterface()
    c.initialize_client(4, 30)
    t = threading.Thread(target=lambda: c.send_data(a, b"stuck"), daemon=True)
    t.start()
    assert entered.wait(30)
    done = threading.Event()
    threading.Thread(target=lambda: (s.stop_server(), done.set()), daemon=True).start()
    try:
        assert done.wait(30), "stop_server hung on a stuck callback"
    finally:
        release.set()
        t.join(30)


def test_garbage_collected_interface_frees_its_port(client):
    a = address()
    s = RpcInterface()
    s.initialize(a)
    assert s.start_server_async()
    del s
    gc.collect()
    again = RpcInterface()
    again.initialize(a)
    assert again.start_server_async() is True
    again.stop_server()


# --------------------------------------------------------------------------------------------------------------------
# Async forms


def test_send_data_async(served, client):
    _, a, inbox = served

    async def main():
        loop = asyncio.get_running_loop()
        f = client.send_data_async(a, b"async", loop)
        assert isinstance(f, asyncio.Future)
        assert f.get_loop() is loop
        assert await asyncio.wait_for(f, 30) == 0
        assert await asyncio.wait_for(client.send_data_async(a, b"no loop given", None), 30) == 0
        results = await asyncio.wait_for(
            asyncio.gather(*(client.send_data_async(a, f"g{i}".encode(), loop) for i in range(20))), 60
        )
        assert results == [0] * 20
        with pytest.raises(RuntimeError, match="Send data failed"):
            await asyncio.wait_for(client.send_data_async(address(), b"x", loop), 30)
        with pytest.raises(TypeError):
            client.send_data_async(a, "text", loop)

    asyncio.run(main())
    got = [m["data"] for m in inbox.data]
    assert got[:2] == [b"async", b"no loop given"]
    assert sorted(got[2:]) == sorted(f"g{i}".encode() for i in range(20))


def test_async_before_initialize():
    async def main():
        loop = asyncio.get_running_loop()
        r = RpcInterface()
        for f in (r.send_data_async("127.0.0.1:1", b"x", loop), r.send_tensor_async("127.0.0.1:1", object(), loop)):
            assert isinstance(f, asyncio.Future)
            with pytest.raises(RuntimeError, match="Communicator not initialized"):
                await f

    asyncio.run(main())


def test_async_future_of_another_thread_loop(served, client):
    """The future belongs to the loop passed in, even when that loop runs on another thread."""
    _, a, inbox = served
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:

        async def send():
            return await client.send_data_async(a, b"other loop", loop)

        assert asyncio.run_coroutine_threadsafe(send(), loop).result(30) == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()
    assert [m["data"] for m in inbox.data] == [b"other loop"]


# --------------------------------------------------------------------------------------------------------------------
# Tensors


def rebuild(t: ReceivedTensor):
    """The torch tensor a ReceivedTensor describes."""
    dtype = getattr(torch, t.dtype)
    data = t.get_data_as_bytes()
    if not data:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(t.shape)


def raw(t) -> bytes:
    t = t.contiguous()
    return bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def pattern(dtype, shape, seed=0):
    n = 1
    for d in shape:
        n *= d
    size = torch.empty(0, dtype=dtype).element_size()
    b = ((torch.arange(n * size, dtype=torch.int64) * 37 + seed) % 251).to(torch.uint8)
    if dtype == torch.bool:
        b = b % 2
    return b.view(dtype).reshape(shape)


TENSOR_DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
                 "complex64", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]  # fmt: skip


@needs_torch
@pytest.mark.parametrize("dtype_name", TENSOR_DTYPES)
def test_send_tensor_dtypes(served, client, dtype_name):
    dtype = getattr(torch, dtype_name, None)
    if dtype is None:
        pytest.skip(f"this torch has no {dtype_name}")
    _, a, inbox = served
    shapes = [(2, 3), (7,), (), (0,), (2, 0, 3), (1, 2, 1, 3, 1, 2)]
    sent = [pattern(dtype, shape, seed=i) for i, shape in enumerate(shapes)]
    for t in sent:
        assert client.send_tensor(a, t) == 0
    assert inbox.data == []
    assert len(inbox.tensors) == len(sent)
    for t, got in zip(sent, inbox.tensors):
        assert isinstance(got, ReceivedTensor)
        assert got.dtype == dtype_name
        assert got.shape == list(t.shape)
        assert got.total_bytes == got.get_data_size() == t.numel() * t.element_size()
        assert got.get_data_as_bytes() == raw(t)
        view = got.get_memory_view()
        assert view.readonly and bytes(view) == raw(t)
        assert got.source_address.startswith("127.0.0.1:")
        back = rebuild(got)
        assert back.dtype == t.dtype and back.shape == t.shape and raw(back) == raw(t)


@needs_torch
def test_send_tensor_layouts(served, client):
    _, a, inbox = served
    base = pattern(torch.int32, (4, 6))
    cases = [
        base.t(),  # non-contiguous: sent in logical order
        base[:, 1::2],  # strided
        base[2:],  # storage offset
        torch.ones(3, requires_grad=True) * 2,  # needs grad
        (torch.arange(4, dtype=torch.float32) + 1j).conj(),  # a lazily conjugated view
        pattern(torch.float32, (4096, 4096)),  # 64 MiB
    ]
    for t in cases:
        assert client.send_tensor(a, t) == 0
    for t, got in zip(cases, inbox.tensors):
        expect = t.detach().resolve_conj().contiguous()
        assert got.shape == list(expect.shape)
        assert got.get_data_as_bytes() == raw(expect)


@needs_torch
def test_tensor_goes_to_data_callback_without_tensor_callback(client):
    inbox = Inbox()
    s = RpcInterface()
    a = address()
    s.initialize(a)
    s.set_data_receive_callback(inbox.on_data)
    assert s.start_server_async()
    try:
        t = pattern(torch.float16, (3, 5))
        assert client.send_tensor(a, t) == 0
        assert [m["data"] for m in inbox.data] == [raw(t)]  # the bare elements, as upstream delivers them
    finally:
        s.stop_server()


@needs_torch
def test_send_tensor_rejects_non_tensors(served, client):
    _, a, inbox = served
    for obj in [b"abc", [1, 2], None, 5, torch.float32]:
        assert client.send_tensor(a, obj) == -1
    assert inbox.data == [] and inbox.tensors == []
    assert client.send_tensor(address(), torch.ones(2)) == -1  # nothing listens


@needs_torch
def test_send_tensor_async(served, client):
    _, a, inbox = served

    async def main():
        loop = asyncio.get_running_loop()
        t = pattern(torch.bfloat16, (8, 8))
        f = client.send_tensor_async(a, t, loop)
        assert isinstance(f, asyncio.Future)
        assert await asyncio.wait_for(f, 30) == 0
        with pytest.raises(AttributeError):
            client.send_tensor_async(a, b"not a tensor", loop)
        with pytest.raises(RuntimeError, match="Send tensor failed"):
            await asyncio.wait_for(client.send_tensor_async(address(), t, loop), 30)
        return t

    t = asyncio.run(main())
    assert len(inbox.tensors) == 1
    assert inbox.tensors[0].dtype == "bfloat16" and inbox.tensors[0].get_data_as_bytes() == raw(t)


# --------------------------------------------------------------------------------------------------------------------
# Two processes

PEER = textwrap.dedent(
    """
    import hashlib, json, sys, threading
    from mooncake.engine import RpcInterface
    mode, where = sys.argv[1], sys.argv[2]
    if mode == "server":
        done = threading.Event()
        seen = []
        s = RpcInterface()
        s.initialize(where, 2, 10, 4)
        def on_data(msg):
            if msg["data"] == b"quit":
                done.set()
            else:
                seen.append(["data", len(msg["data"]), hashlib.sha256(msg["data"]).hexdigest()])
        def on_tensor(t):
            seen.append(["tensor", t.dtype, t.shape, hashlib.sha256(t.get_data_as_bytes()).hexdigest()])
        s.set_data_receive_callback(on_data)
        s.set_tensor_receive_callback(on_tensor)
        assert s.start_server_async()
        print("ready", flush=True)
        assert done.wait(120)
        s.stop_server()
        print(json.dumps(seen), flush=True)
    else:
        import torch
        c = RpcInterface()
        c.initialize_client()
        rcs = [c.send_data(where, b"from the child" * 1000), c.send_tensor(where, torch.arange(12.0).reshape(3, 4))]
        print(json.dumps(rcs), flush=True)
    """
)


def _peer(*args):
    return subprocess.Popen(
        [sys.executable, "-c", PEER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@needs_torch
def test_two_processes_child_serves(client):
    a = address()
    child = _peer("server", a)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        big = os.urandom(1 << 20) * 64  # 64 MiB
        t = pattern(torch.int64, (3, 4, 5))
        assert client.send_data(a, big) == 0
        assert client.send_tensor(a, t) == 0
        assert client.send_data(a, b"quit") == 0
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == [
        ["data", len(big), hashlib.sha256(big).hexdigest()],
        ["tensor", "int64", [3, 4, 5], hashlib.sha256(raw(t)).hexdigest()],
    ]


@needs_torch
def test_two_processes_child_sends(served):
    _, a, inbox = served
    child = _peer("client", a)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == [0, 0]
    assert [m["data"] for m in inbox.data] == [b"from the child" * 1000]
    (t,) = inbox.tensors
    assert t.dtype == "float32" and t.shape == [3, 4]
    assert raw(rebuild(t)) == raw(torch.arange(12.0).reshape(3, 4))
    assert t.source_address.startswith("127.0.0.1:")


def test_interpreter_exits_with_a_running_server_and_pooled_connections():
    """No stop_server, a blocking server thread, pooled connections: the interpreter still exits (daemon threads,
    servers stopped at exit)."""
    code = textwrap.dedent(
        f"""
        import threading
        from mooncake.engine import RpcInterface
        addr = "{address()}"
        s = RpcInterface(); s.initialize(addr); assert s.start_server_async()
        b = RpcInterface(); b.initialize("{address()}")
        threading.Thread(target=b.start_server, daemon=True).start()
        got = []
        s.set_data_receive_callback(lambda m: got.append(m["data"]))
        c = RpcInterface(); c.initialize_client()
        assert c.send_data(addr, b"bye") == 0 and got == [b"bye"]
        print("done", flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
