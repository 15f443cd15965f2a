"""RPC scenarios run under both wheels (ours and upstream's) by test_differential_rpc.py, which compares what they
report, case by case.

    python rpc_scenarios.py NAME      # prints one JSON object per line: {"case": ..., "result": ...}

Each scenario uses one wheel only (the two wire formats differ: peers are always the same package). Servers listen on
free 127.0.0.1 ports. Every message is sent from a fresh client unless a case says otherwise, because upstream's
pooled clients resend a previous message's attachment (the case "small after large, same client" shows it). Payloads
are reported as hex, or as length and SHA-256 when large. Upstream's send_data_async and send_tensor_async fail when
the interface is initialized (a GIL error), and its start_server blocks the whole interpreter: neither is run here
beyond what returns (test_rpc.py covers ours).
"""

import asyncio
import hashlib
import os
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenarios import case, free_port  # noqa: E402

from mooncake import engine  # noqa: E402


def addr() -> str:
    return f"127.0.0.1:{free_port()}"


def digest(data: bytes):
    return [len(data), hashlib.sha256(data).hexdigest()]


class Inbox:
    """What a server's callbacks were given: ("data", source, bytes) and ("tensor", source, dtype, bytes) entries."""

    def __init__(self):
        self.items = []
        self.threads = []

    def on_data(self, msg):
        self.threads.append(threading.current_thread() is threading.main_thread())
        self.items.append(("data", msg["source"], msg["data"]))

    def on_tensor(self, t):
        self.threads.append(threading.current_thread() is threading.main_thread())
        self.items.append(("tensor", t.source_address, t.dtype, t.get_data_as_bytes()))

    def take(self):
        items, self.items = self.items, []
        return items


def server(*, data=True, tensor=False, inbox=None, address=None, threads=2):
    """A started interface listening on a free port, with callbacks into `inbox`."""
    inbox = inbox if inbox is not None else Inbox()
    address = address or addr()
    s = engine.RpcInterface()
    assert s.initialize(address, threads, 5, 4)
    if data:
        s.set_data_receive_callback(inbox.on_data)
    if tensor:
        s.set_tensor_receive_callback(inbox.on_tensor)
    assert s.start_server_async()
    return s, address, inbox


def client():
    c = engine.RpcInterface()
    assert c.initialize_client()
    return c


def payloads(items):
    """The kinds and payloads of received entries (sources left out), in a form JSON carries."""
    out = []
    for item in items:
        data = item[-1]
        body = data.hex() if len(data) <= 64 else digest(data)
        out.append([item[0], body] if item[0] == "data" else [item[0], item[2], body])
    return out


def rpc_basics():
    case("CoroRPCInterface is RpcInterface", lambda: engine.CoroRPCInterface is engine.RpcInterface)
    case("construct ReceivedData", lambda: engine.ReceivedData())
    case("construct ReceivedTensor", lambda: engine.ReceivedTensor())
    r = engine.RpcInterface()
    case("send_data before initialize", lambda: r.send_data("127.0.0.1:1", b"x"))
    case("send_tensor before initialize", lambda: r.send_tensor("127.0.0.1:1", b"x"))
    case("start_server before initialize", lambda: r.start_server())
    case("start_server_async before initialize", lambda: r.start_server_async())
    case("stop_server before initialize", lambda: r.stop_server())
    case("callback not callable", lambda: r.set_data_receive_callback(5))
    case("callback None", lambda: r.set_data_receive_callback(None))
    case("tensor callback not callable", lambda: r.set_tensor_receive_callback("f"))
    case("callback lambda", lambda: r.set_data_receive_callback(lambda m: None))
    case("initialize int address", lambda: engine.RpcInterface().initialize(5))
    case("initialize negative threads", lambda: engine.RpcInterface().initialize("127.0.0.1:1", -1))
    case("initialize float timeout", lambda: engine.RpcInterface().initialize("127.0.0.1:1", 1, 2.5))
    case("initialize keywords", lambda: engine.RpcInterface().initialize(
        listen_address="", thread_count=1, timeout_seconds=3, pool_size=2))
    case("initialize no args", lambda: engine.RpcInterface().initialize())
    case("initialize garbage address", lambda: engine.RpcInterface().initialize("garbage"))
    case("initialize_client", lambda: engine.RpcInterface().initialize_client())
    case("initialize_client pool 0", lambda: engine.RpcInterface().initialize_client(0))
    case("initialize_client negative", lambda: engine.RpcInterface().initialize_client(-1))
    case("initialize_client keywords", lambda: engine.RpcInterface().initialize_client(pool_size=3, timeout_seconds=4))
    case("initialize_server no address", lambda: engine.RpcInterface().initialize_server())
    case("initialize_server", lambda: engine.RpcInterface().initialize_server(addr()))
    case("create_rpc_client", lambda: type(engine.create_rpc_client()).__name__)
    case("create_rpc_client keywords", lambda: type(engine.create_rpc_client(local_rank=1, world_size=2)).__name__)
    case("create_rpc_server", lambda: type(engine.create_rpc_server(0, 1)).__name__)
    case("create_rpc_server bad rank", lambda: engine.create_rpc_server("a"))
    case("create_rpc_client negative rank", lambda: engine.create_rpc_client(-1))
    c = client()
    case("send_data str", lambda: c.send_data("127.0.0.1:1", "text"))
    case("send_data bytearray", lambda: c.send_data("127.0.0.1:1", bytearray(b"x")))
    case("send_data memoryview", lambda: c.send_data("127.0.0.1:1", memoryview(b"x")))
    case("send_data int", lambda: c.send_data("127.0.0.1:1", 1))
    case("send_data None", lambda: c.send_data("127.0.0.1:1", None))
    case("send_data int address", lambda: c.send_data(1, b"x"))


def rpc_server_lifecycle():
    for label, address in [
        ("garbage", "garbage"),
        ("port too large", "127.0.0.1:99999"),
        ("bad host", "256.1.1.1:80"),
        ("empty", ""),
        ("port not a number", "127.0.0.1:abc"),
        ("no port", "127.0.0.1"),
        ("port 0", "127.0.0.1:0"),
        ("host left out", ":0"),
    ]:
        s = engine.RpcInterface()
        case(f"initialize {label}", lambda: s.initialize(address, 1, 5, 4))
        case(f"start {label}", lambda: s.start_server_async())
        case(f"stop {label}", lambda: s.stop_server())
    a = addr()
    s = engine.RpcInterface()
    case("initialize", lambda: s.initialize(a, 1, 5, 4))
    case("start", lambda: s.start_server_async())
    case("start again", lambda: s.start_server_async())
    case("start_server while running", lambda: s.start_server())
    other = engine.RpcInterface()
    case("initialize same port", lambda: other.initialize(a, 1, 5, 4))
    case("start same port", lambda: other.start_server_async())
    case("send while running", lambda: client().send_data(a, b"x"))
    case("stop", lambda: s.stop_server())
    case("stop again", lambda: s.stop_server())
    case("start after stop", lambda: s.start_server_async())
    s.stop_server()
    c = engine.RpcInterface()
    case("client-only start", lambda: (c.initialize_client(), c.start_server_async()))


def rpc_send_data():
    s, a, inbox = server()
    for label, data in [
        ("hello", b"hello"),
        ("empty", b""),
        ("1024 bytes", bytes(range(256)) * 4),
        ("1025 bytes", bytes(range(256)) * 4 + b"!"),
        ("1 MiB", bytes(range(251)) * 4177 + b"tail"),
        ("64 MiB", bytes(range(256)) * (256 << 10)),
        ("binary zeros", bytes(100)),
    ]:
        case(f"send {label}", lambda: client().send_data(a, data))
        case(f"received {label}", lambda: payloads(inbox.take()))
    case("send keywords", lambda: client().send_data(target_address=a, data=b"kw"))
    case("received keywords", lambda: payloads(inbox.take()))
    case("callback off the main thread", lambda: inbox.threads and not any(inbox.threads))
    client().send_data(a, b"src")
    case("source is empty", lambda: inbox.take()[0][1] == "")

    # send_data returns once the callback has returned.
    slow_inbox = Inbox()

    def slow(msg):
        time.sleep(0.3)
        slow_inbox.on_data(msg)

    s.set_data_receive_callback(slow)
    case("send to a slow callback", lambda: client().send_data(a, b"slow"))
    case("delivered before send returned", lambda: payloads(slow_inbox.take()))

    def failing(msg):
        inbox.on_data(msg)
        raise ValueError("callback failure")

    s.set_data_receive_callback(failing)
    case("send to a raising callback", lambda: client().send_data(a, b"boom"))
    s.set_data_receive_callback(inbox.on_data)
    case("send after the raise", lambda: client().send_data(a, b"after"))
    case("received around the raise", lambda: payloads(inbox.take()))

    # Bytes laid out like upstream's tensor header (dtype 2 = float32, 2 dims) with both callbacks set.
    s.set_tensor_receive_callback(inbox.on_tensor)
    header = struct.pack("<ii8q", 2, 2, 2, 3, 0, 0, 0, 0, 0, 0) + bytes(range(24))
    case("send header-like bytes", lambda: client().send_data(a, header))
    case("header-like bytes went to", lambda: [i[0] for i in inbox.take()])

    # A small message after a large one from the same client.
    c = client()
    case("large, same client", lambda: c.send_data(a, b"L" * 5000))
    case("small after large, same client", lambda: c.send_data(a, b"tiny"))
    case("received small after large", lambda: payloads(inbox.take())[-1])
    s.stop_server()

    early = Inbox()
    e = engine.RpcInterface()
    e.set_data_receive_callback(early.on_data)
    ea = addr()
    e.initialize(ea, 1, 5, 4)
    e.start_server_async()
    case("send to a callback set before initialize", lambda: client().send_data(ea, b"early"))
    case("received by a callback set before initialize", lambda: payloads(early.take()))
    e.stop_server()

    quiet, qa, _ = server(data=False)
    case("send to a server without callbacks", lambda: client().send_data(qa, b"nobody"))
    quiet.stop_server()
    case("send to a closed port", lambda: client().send_data(addr(), b"x"))
    case("send to an address without port", lambda: client().send_data("127.0.0.1", b"x"))


def rpc_tensors():
    import torch

    def pattern(dtype, shape):
        n = 1
        for d in shape:
            n *= d
        size = torch.empty(0, dtype=dtype).element_size()
        raw = ((torch.arange(n * size, dtype=torch.int64) * 37 + 5) % 251).to(torch.uint8)
        if dtype == torch.bool:
            raw = raw % 2
        return raw.view(dtype).reshape(shape)

    # Only a data callback: the tensor's bytes reach it in both packages.
    s, a, inbox = server()
    for name in ["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]:
        for label, shape in [("matrix", (2, 3)), ("vector", (5,)), ("4d", (1, 2, 2, 3))]:
            t = pattern(getattr(torch, name), shape)
            case(f"send {name} {label}", lambda: client().send_tensor(a, t))
            case(f"data callback got {name} {label}", lambda: payloads(inbox.take()))
    big = pattern(torch.float32, (4096, 4096))
    case("send 64 MiB tensor", lambda: client().send_tensor(a, big))
    case("data callback got 64 MiB tensor", lambda: payloads(inbox.take()))
    case("send keywords", lambda: client().send_tensor(target_address=a, tensor=pattern(torch.int32, (3,))))
    case("data callback got keywords", lambda: payloads(inbox.take()))
    transposed = pattern(torch.int16, (2, 3)).t()
    case("send transposed", lambda: client().send_tensor(a, transposed))
    case("data callback got transposed", lambda: payloads(inbox.take()))
    for label, obj in [("bytes", b"abc"), ("list", [1, 2]), ("None", None), ("int", 5)]:
        case(f"send_tensor {label}", lambda: client().send_tensor(a, obj))
    case("nothing received for non-tensors", lambda: payloads(inbox.take()))
    case("send_tensor to a closed port", lambda: client().send_tensor(addr(), pattern(torch.float32, (2,))))

    # Both callbacks set: where does a sent tensor go?
    s.set_tensor_receive_callback(inbox.on_tensor)
    case("send with both callbacks", lambda: client().send_tensor(a, pattern(torch.float32, (2, 3))))
    case("tensor with both callbacks went to", lambda: [i[0] for i in inbox.take()])

    async def tensor_async_not_a_tensor():
        return client().send_tensor_async(a, b"xx", asyncio.get_running_loop())

    case("send_tensor_async not a tensor", lambda: asyncio.run(tensor_async_not_a_tensor()))

    async def tensor_async():
        f = client().send_tensor_async(a, pattern(torch.float32, (4,)), asyncio.get_running_loop())
        return await asyncio.wait_for(f, 30)

    case("send_tensor_async", lambda: asyncio.run(tensor_async()))
    s.stop_server()


def rpc_async():
    s, a, inbox = server()

    async def uninitialized(kind):
        r = engine.RpcInterface()
        loop = asyncio.get_running_loop()
        f = r.send_data_async(a, b"x", loop) if kind == "data" else r.send_tensor_async(a, object(), loop)
        name = type(f).__name__
        try:
            await asyncio.wait_for(f, 10)
            return [name, "resolved"]
        except Exception as e:  # noqa: BLE001 - the type is the result
            return [name, type(e).__name__, str(e)]

    case("send_data_async before initialize", lambda: asyncio.run(uninitialized("data")))
    case("send_tensor_async before initialize", lambda: asyncio.run(uninitialized("tensor")))

    async def data_async(data):
        f = client().send_data_async(a, data, asyncio.get_running_loop())
        return [type(f).__name__, await asyncio.wait_for(f, 30)]

    case("send_data_async", lambda: asyncio.run(data_async(b"async")))
    case("send_data_async str", lambda: asyncio.run(data_async("text")))
    case("received async", lambda: payloads(inbox.take()))
    s.stop_server()


SCENARIOS = {f.__name__: f for f in (rpc_basics, rpc_server_lifecycle, rpc_send_data, rpc_tensors, rpc_async)}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
    sys.stdout.flush()
    os._exit(0)  # upstream's servers and client pools are not torn down at exit: do not wait for their threads
