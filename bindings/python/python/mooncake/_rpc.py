"""The engine's RPC interface (``mooncake.engine.RpcInterface``, alias ``CoroRPCInterface``): send bytes and tensors to
a peer's callback over TCP.

Pure Python (sockets and threads; asyncio only for the ``*_async`` forms; torch imported only when a tensor is sent
or described). The calls, defaults, return codes and callback arguments are those of upstream's wheel; the wire
format is this package's own (upstream speaks yalantinglibs' coro_rpc), so both peers must run this package. A peer
that speaks anything else is refused: ours closes connections whose first bytes are not our magic, and a send to an
upstream server fails with -1. docs/python-rpc.md describes the behaviour and where it differs from upstream's.

How a message moves: the client opens (or reuses, from a per-target pool) a TCP connection and writes one frame::

    magic "MCRQ" | version u8 | kind u8 (1 data, 2 tensor) | reserved u16 | meta length u32 | payload length u64
    meta (tensors: UTF-8 JSON {"dtype": "float32", "shape": [2, 3]}) | payload

all integers little-endian. The server reads it on the connection's own thread, runs the matching Python callback,
and only then answers ``"MCRA" | version u8 | status u8 | reserved u16`` (status 0: handed to the callback or
dropped because none is set; 1: the server was stopping). So ``send_data`` returning 0 means the peer's callback has
returned, as with upstream.
"""

import asyncio
import atexit
import collections
import ctypes
import ipaddress
import json
import logging
import operator
import os
import select
import socket
import struct
import sys
import threading
import weakref

from . import _memory

__all__ = [
    "RpcInterface",
    "CoroRPCInterface",
    "ReceivedData",
    "ReceivedTensor",
    "create_rpc_client",
    "create_rpc_server",
]

log = logging.getLogger("mooncake.rpc")

_REQUEST = struct.Struct("<4sBBHIQ")
_REPLY = struct.Struct("<4sBBH")
_REQUEST_MAGIC = b"MCRQ"
_REPLY_MAGIC = b"MCRA"
_VERSION = 1
_KIND_DATA = 1
_KIND_TENSOR = 2
_STATUS_OK = 0
_STATUS_STOPPING = 1
_MAX_META = 1 << 20
_MAX_PAYLOAD = 1 << 40
_DEFAULT_TIMEOUT = 30
_DEFAULT_POOL = 100
_CHUNK = 16 << 20
_TENSOR_ATTRS = ("data_ptr", "numel", "element_size", "shape", "dtype")


# --------------------------------------------------------------------------------------------------------------------
# Arguments


def _count(value, what: str) -> int:
    """A non-negative integer argument (upstream's are C++ size_t: anything else is a TypeError)."""
    if isinstance(value, float):
        raise TypeError(f"{what} must be a non-negative int, not float")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a non-negative int, not {type(value).__name__}") from None
    if n < 0:
        raise TypeError(f"{what} must be a non-negative int, got {n}")
    return n


def _text(value, what: str) -> str:
    """A string argument; bytes are taken as UTF-8 (as upstream's std::string parameters take them)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise TypeError(f"{what} must be a str (these bytes are not UTF-8)") from None
    raise TypeError(f"{what} must be a str, not {type(value).__name__}")


def _callable(value, what: str):
    if not callable(value):
        raise TypeError(f"{what}: the callback must be callable, not {type(value).__name__}")
    return value


def _payload(data) -> bytes:
    if not isinstance(data, bytes):
        raise TypeError(f"Object of type '{type(data).__name__}' is not an instance of 'bytes'")
    return data


def _split_address(address: str, *, server: bool):
    """(host, port) of "host:port", "[v6]:port" or, for a server, a bare host (any free port); ValueError says why not.
    A client needs a port from 1 to 65535; a server may ask for port 0 (any free port)."""
    if not address:
        raise ValueError("the address is empty")
    host, port_text = address, None
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError(f"{address!r}: unclosed '['")
        host, rest = address[1:end], address[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{address!r}: expected ':port' after ']'")
            port_text = rest[1:]
    elif address.count(":") == 1:
        host, port_text = address.split(":")
    elif address.count(":") > 1:
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"{address!r}: write an IPv6 address with a port as [address]:port") from None
    if port_text is None:
        if not server:
            raise ValueError(f"{address!r} has no port (expected host:port)")
        port = 0
    else:
        if not port_text.isdigit():
            raise ValueError(f"{address!r}: the port {port_text!r} is not a number")
        port = int(port_text)
        if port > 65535 or (port == 0 and not server):
            raise ValueError(f"{address!r}: the port must be from {0 if server else 1} to 65535")
    if not host and not server:
        raise ValueError(f"{address!r} has no host")
    return host, port


# --------------------------------------------------------------------------------------------------------------------
# What callbacks receive


class ReceivedData:
    """Bytes received from a peer, with where they came from. (Upstream's data callback is given a dict
    ``{"source": str, "data": bytes}``, and so is ours; this type is what upstream exports under the name.)"""

    __module__ = "mooncake.engine"
    __slots__ = ("_source", "_data")

    def __init__(self, *args, **kwargs):
        raise TypeError("mooncake.engine.ReceivedData: No constructor defined!")

    @property
    def source_address(self) -> str:
        """The sending peer as "host:port"."""
        return self._source

    @property
    def data_size(self) -> int:
        """The number of bytes received."""
        return len(self._data)

    def get_bytes(self) -> bytes:
        """The bytes received."""
        return self._data

    def get_memory_view(self) -> memoryview:
        """A read-only view of the bytes received."""
        return memoryview(self._data)

    def __repr__(self):
        return f"<ReceivedData {len(self._data)} bytes from {self._source or '?'}>"


class ReceivedTensor:
    """A tensor received from a peer: its dtype name (``"float32"``, ``"bfloat16"``, ... as ``str(torch.dtype)``
    without ``"torch."``), shape and elements in C order (host byte order)."""

    __module__ = "mooncake.engine"
    __slots__ = ("_source", "_data", "_shape", "_dtype")

    def __init__(self, *args, **kwargs):
        raise TypeError("mooncake.engine.ReceivedTensor: No constructor defined!")

    @property
    def source_address(self) -> str:
        """The sending peer as "host:port"."""
        return self._source

    @property
    def shape(self) -> list:
        """The tensor's shape, a list of ints ([] for a 0-d tensor)."""
        return list(self._shape)

    @property
    def dtype(self) -> str:
        """The element type's name, e.g. "float32"."""
        return self._dtype

    @property
    def total_bytes(self) -> int:
        """The size of the elements in bytes."""
        return len(self._data)

    def get_data_size(self) -> int:
        """The size of the elements in bytes (the same as total_bytes)."""
        return len(self._data)

    def get_data_as_bytes(self) -> bytes:
        """The elements' bytes, in C order."""
        return self._data

    def get_memory_view(self) -> memoryview:
        """A read-only view of the elements' bytes."""
        return memoryview(self._data)

    def __repr__(self):
        where = self._source or "?"
        return f"<ReceivedTensor {self._dtype} {list(self._shape)} ({len(self._data)} bytes) from {where}>"


def _received_tensor(source: str, data: bytes, shape, dtype: str) -> ReceivedTensor:
    t = object.__new__(ReceivedTensor)
    t._source, t._data, t._shape, t._dtype = source, data, tuple(shape), dtype
    return t


# --------------------------------------------------------------------------------------------------------------------
# Tensors on the sending side


def _dtype_name(dtype) -> str:
    name = str(dtype)
    return name[len("torch.") :] if name.startswith("torch.") else name


def _tensor_parts(tensor):
    """(meta dict, payload buffer, object to keep alive while sending) of a tensor; AttributeError when `tensor` lacks
    what a tensor has (upstream checks data_ptr, numel, element_size, shape and dtype, and so does this)."""
    for attr in _TENSOR_ATTRS:
        if not hasattr(tensor, attr):
            kind = type(tensor).__name__
            raise AttributeError(f"'{kind}' object has no attribute '{attr}' (expected a torch.Tensor)")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tensor, torch.Tensor):
        # A contiguous CPU tensor as it is; a CUDA (or other device) tensor copied once to pinned host memory, never
        # read by the CPU where it lives. A tensor without storage (meta) raises NotImplementedError.
        t = _memory.host_copy(tensor.detach())
        meta = {"dtype": _dtype_name(t.dtype), "shape": [int(d) for d in t.shape]}
        size = t.numel() * t.element_size()
        if size == 0:
            return meta, b"", t
        # A view of the host tensor's memory (kept alive by returning `t`): no copy for a contiguous CPU tensor.
        return meta, memoryview((ctypes.c_ubyte * size).from_address(t.data_ptr())).cast("B"), t
    # Another object with a tensor's attributes: its elements are read from data_ptr as host memory, as upstream does,
    # unless data_ptr is CUDA memory: then they come over in one device-to-host copy.
    shape = [int(operator.index(d)) for d in tensor.shape]
    size = int(tensor.numel()) * int(tensor.element_size())
    ptr = int(tensor.data_ptr())
    if size and not ptr:
        raise ValueError("the tensor's data_ptr() is 0")
    device = _memory.address_device(ptr) if size else None
    if device is not None:
        if torch is None:
            raise ValueError(f"the tensor's data_ptr() is {device} memory, which needs torch to copy")
        staged = _memory.host_copy(_memory.span(ptr, size, device))
        return {"dtype": _dtype_name(tensor.dtype), "shape": shape}, staged.numpy(), (tensor, staged)
    data = ctypes.string_at(ptr, size) if size else b""
    return {"dtype": _dtype_name(tensor.dtype), "shape": shape}, data, tensor


# --------------------------------------------------------------------------------------------------------------------
# Sockets


def _recv_exact_into(sock, view) -> bool:
    """Fills `view` from `sock`; False when the peer closed the connection first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(len(view) - got, _CHUNK))
        if n == 0:
            return False
        got += n
    return True


def _recv_exact(sock, n: int):
    buf = bytearray(n)
    return buf if _recv_exact_into(sock, memoryview(buf)) else None


def _send_buffer(sock, payload):
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else memoryview(payload)
    for start in range(0, len(view), _CHUNK):
        sock.sendall(view[start : start + _CHUNK])


class _Client:
    """Connections to peers, pooled per target (at most `pool_size` idle ones each)."""

    def __init__(self, pool_size: int, timeout: float):
        self.pool_size = pool_size
        self.timeout = timeout
        self._idle = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def _alive(sock) -> bool:
        """False when an idle pooled connection was closed by the peer (or has unexpected bytes waiting)."""
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def _connect(self, target):
        with self._lock:
            idle = self._idle.get(target)
            while idle:
                sock = idle.pop()
                if self._alive(sock):
                    return sock
                sock.close()
        host, port = target
        sock = socket.create_connection((host, port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _release(self, target, sock):
        with self._lock:
            idle = self._idle[target]
            if not self._closed and len(idle) < self.pool_size:
                idle.append(sock)
                return
        sock.close()

    def send(self, address: str, kind: int, meta: bytes, payload) -> int:
        """Sends one frame to `address` and waits for the answer: 0 when the peer took it, -1 otherwise (logged)."""
        try:
            target = _split_address(address, server=False)
        except ValueError as e:
            log.warning("mooncake rpc: cannot send to %r: %s", address, e)
            return -1
        size = len(memoryview(payload).cast("B")) if not isinstance(payload, bytes) else len(payload)
        sock = None
        try:
            sock = self._connect(target)
            sock.settimeout(self.timeout)
            sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, _VERSION, kind, 0, len(meta), size) + meta)
            if size:
                _send_buffer(sock, payload)
            reply = _recv_exact(sock, _REPLY.size)
            if reply is None:
                raise ConnectionError("the peer closed the connection before answering")
            magic, version, status, _ = _REPLY.unpack(reply)
            if magic != _REPLY_MAGIC:
                raise ConnectionError("the peer does not speak this package's RPC protocol")
            self._release(target, sock)
            sock = None
            if status != _STATUS_OK:
                log.warning("mooncake rpc: %s refused the message (its server is stopping)", address)
                return -1
            return 0
        except socket.timeout:
            log.warning("mooncake rpc: send to %s timed out after %ss", address, self.timeout)
            return -1
        except (OSError, UnicodeError, ValueError) as e:  # refused, reset, unresolvable or unencodable host, ...
            log.warning("mooncake rpc: send to %s failed: %s", address, e)
            return -1
        finally:
            if sock is not None:
                sock.close()

    def close(self):
        with self._lock:
            self._closed = True
            socks = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for s in socks:
            s.close()


class _Callbacks:
    """The Python callbacks of one interface, shared with its server threads (which must not keep the interface
    itself alive)."""

    __slots__ = ("data", "tensor")

    def __init__(self):
        self.data = None
        self.tensor = None


class _Server:
    """A listening socket, its accept thread and one thread per connection. Callbacks run on the connection
    threads, at most `workers` at a time."""

    def __init__(self, address: str, workers: int, timeout: float, callbacks: _Callbacks):
        self.address = address
        self.timeout = timeout
        self.callbacks = callbacks
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._conns = set()
        self._busy = {}  # connection -> its thread, while its message is handled (callback, then the answer)
        self._drained = threading.Condition(self._lock)
        self._listener = None
        self._accept_thread = None

    def start(self) -> bool:
        try:
            host, port = _split_address(self.address, server=True)
        except ValueError as e:
            log.warning("mooncake rpc: cannot listen on %r: %s", self.address, e)
            return False
        try:
            infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except (OSError, UnicodeError, ValueError) as e:
            log.warning("mooncake rpc: cannot listen on %r: %s", self.address, e)
            return False
        family, _, _, _, sockaddr = infos[0]
        try:
            listener = socket.create_server(sockaddr, family=family, backlog=128)
        except OSError as e:
            log.warning("mooncake rpc: cannot listen on %r: %s", self.address, e)
            return False
        self._listener = listener
        name = f"mooncake-rpc-accept-{listener.getsockname()[1]}"
        self._accept_thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self._accept_thread.start()
        return True

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener is not None else 0

    def _accept_loop(self):
        listener = self._listener
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                break
            with self._lock:
                if self._stopping:
                    conn.close()
                    break
                self._conns.add(conn)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            source = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
            threading.Thread(
                target=self._serve, args=(conn, source), name=f"mooncake-rpc-conn-{source}", daemon=True
            ).start()

    def _serve(self, conn, source: str):
        try:
            while self._serve_one(conn, source):
                pass
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _serve_one(self, conn, source: str) -> bool:
        """Reads one frame, hands it to its callback and answers; False when the connection is done."""
        conn.settimeout(None)  # an idle pooled connection waits for its next frame as long as it likes
        head = _recv_exact(conn, _REQUEST.size)
        if head is None:
            return False
        magic, version, kind, _, meta_len, size = _REQUEST.unpack(head)
        if magic != _REQUEST_MAGIC or version != _VERSION or kind not in (_KIND_DATA, _KIND_TENSOR):
            log.warning("mooncake rpc: dropped a connection from %s that does not speak this protocol", source)
            return False
        if meta_len > _MAX_META or size > _MAX_PAYLOAD:
            log.warning("mooncake rpc: dropped a connection from %s: frame too large", source)
            return False
        conn.settimeout(self.timeout)  # the rest of a frame must arrive in bounded time
        meta = _recv_exact(conn, meta_len) if meta_len else b""
        if meta is None:
            return False
        buf = bytearray(size)
        if size and not _recv_exact_into(conn, memoryview(buf)):
            return False
        data = bytes(buf)
        del buf
        with self._lock:
            if self._stopping:
                status = _STATUS_STOPPING
            else:
                # A whole message is here: stop() leaves this connection open until its answer is sent.
                status = _STATUS_OK
                self._busy[conn] = threading.current_thread()
        try:
            if status == _STATUS_OK:
                with self._slots:
                    self._dispatch(kind, bytes(meta), data, source)
            conn.sendall(_REPLY.pack(_REPLY_MAGIC, _VERSION, status, 0))
        finally:
            with self._lock:
                self._busy.pop(conn, None)
                go_on = not self._stopping
                self._drained.notify_all()
        return go_on and status == _STATUS_OK

    def _dispatch(self, kind: int, meta: bytes, data: bytes, source: str):
        callbacks = self.callbacks
        try:
            if kind == _KIND_TENSOR:
                on_tensor = callbacks.tensor
                if on_tensor is not None:
                    info = json.loads(meta.decode("utf-8"))
                    on_tensor(_received_tensor(source, data, info["shape"], info["dtype"]))
                    return
                # No tensor callback: the tensor's bytes go to the data callback, which is where upstream's
                # send_tensor delivers them.
            on_data = callbacks.data
            if on_data is not None:
                on_data({"source": source, "data": data})
        except Exception:  # noqa: BLE001 - a callback's error is logged; the server goes on
            log.exception("mooncake rpc: the receive callback raised (message from %s)", source)
        except SystemExit:
            log.error("mooncake rpc: the receive callback raised SystemExit; ignored (message from %s)", source)

    def stop(self):
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            conns = [c for c in self._conns if c not in self._busy]  # busy ones close after their answer
        listener = self._listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        t = self._accept_thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        # Let the messages being handled finish and be answered, for at most `timeout` seconds (a stop called from
        # a callback does not wait for that callback).
        me = threading.current_thread()
        with self._lock:
            self._drained.wait_for(lambda: all(th is me for th in self._busy.values()), self.timeout)
        self._stopped.set()

    def wait(self):
        while not self._stopped.wait(0.5):
            pass


_LIVE_SERVERS = weakref.WeakSet()


@atexit.register
def _stop_all_servers():
    for server in list(_LIVE_SERVERS):
        server.stop()


def _finalize(server_box, client_box):
    """Stops what an interface left running when it is garbage collected."""
    server = server_box[0]
    if server is not None:
        server.stop()
    client = client_box[0]
    if client is not None:
        client.close()


# --------------------------------------------------------------------------------------------------------------------
# The interface


class RpcInterface:
    """Point-to-point messages between processes: a server runs callbacks for the bytes and tensors that clients send
    to its address. One object can be both. Same calls and results as upstream's ``mooncake.engine.RpcInterface``
    (see docs/python-rpc.md); peers must both run this package."""

    __module__ = "mooncake.engine"

    def __init__(self):
        self._lock = threading.RLock()
        self._callbacks = _Callbacks()
        self._config = None  # (listen_address, thread_count, timeout_seconds, pool_size) once initialized
        self._server_box = [None]
        self._client_box = [None]
        weakref.finalize(self, _finalize, self._server_box, self._client_box)

    # -- setup ---------------------------------------------------------------------------------------------------

    def initialize(self, listen_address="", thread_count=0, timeout_seconds=30, pool_size=100) -> bool:
        """Sets the interface up: `listen_address` ("host:port"; "" for a client only) is where start_server will
        listen, `thread_count` how many callbacks may run at once (0: one per CPU), `timeout_seconds` the bound on
        connecting, on each send's wait for the peer's answer and on a half-received message (0: 30), `pool_size`
        how many idle connections to keep per peer (0: 100). Returns True. Calling it again stops a running server
        and drops pooled connections; the callbacks stay."""
        listen_address = _text(listen_address, "listen_address")
        thread_count = _count(thread_count, "thread_count")
        timeout_seconds = _count(timeout_seconds, "timeout_seconds")
        pool_size = _count(pool_size, "pool_size")
        with self._lock:
            self._shutdown()
            self._config = (
                listen_address,
                thread_count or (os.cpu_count() or 1),
                timeout_seconds or _DEFAULT_TIMEOUT,
                pool_size or _DEFAULT_POOL,
            )
            self._client_box[0] = _Client(self._config[3], self._config[2])
        return True

    def initialize_client(self, pool_size=100, timeout_seconds=30) -> bool:
        """initialize("", 0, timeout_seconds, pool_size): an interface that only sends."""
        return self.initialize("", 0, timeout_seconds, pool_size)

    def initialize_server(self, listen_address, thread_count=8, timeout_seconds=30) -> bool:
        """initialize(listen_address, thread_count, timeout_seconds, 4)."""
        return self.initialize(listen_address, thread_count, timeout_seconds, 4)

    # -- server --------------------------------------------------------------------------------------------------

    def _new_server(self):
        """A started server, or None (logged) when this interface cannot listen."""
        if self._config is None:
            log.warning("mooncake rpc: start_server before initialize")
            return None
        if self._server_box[0] is not None:
            log.warning("mooncake rpc: the server on %r is already running", self._config[0])
            return None
        address, workers, timeout, _ = self._config
        if not address:
            log.warning("mooncake rpc: this interface was initialized without a listen address")
            return None
        server = _Server(address, workers, timeout, self._callbacks)
        if not server.start():
            return None
        self._server_box[0] = server
        _LIVE_SERVERS.add(server)
        return server

    def start_server_async(self) -> bool:
        """Starts listening and returns: True once the address accepts connections, False when it cannot (not
        initialized, no listen address, already running, bad or busy address; the reason is logged)."""
        with self._lock:
            return self._new_server() is not None

    def start_server(self) -> bool:
        """Starts listening and blocks until stop_server() is called (from another thread or a callback); then
        returns True. Returns False at once when the server cannot start (as start_server_async)."""
        with self._lock:
            server = self._new_server()
        if server is None:
            return False
        server.wait()
        return True

    def stop_server(self) -> None:
        """Stops listening, closes the server's idle connections and waits (at most timeout_seconds) for callbacks
        already running to return and their senders to be answered; messages arriving from now on are refused
        (their senders get -1). Called from a callback, it does not wait for that one. The server can be started
        again. Does nothing when none runs."""
        with self._lock:
            server, self._server_box[0] = self._server_box[0], None
        if server is not None:
            server.stop()

    def _shutdown(self):
        self.stop_server()
        client, self._client_box[0] = self._client_box[0], None
        if client is not None:
            client.close()

    # -- callbacks -----------------------------------------------------------------------------------------------

    def set_data_receive_callback(self, arg0) -> None:
        """Runs `arg0({"source": "host:port", "data": bytes})` for each send_data a peer makes to this server (and
        for send_tensor when no tensor callback is set). It runs on a server thread; the sender's call returns once
        it has returned. What it raises is logged and does not reach the sender."""
        self._callbacks.data = _callable(arg0, "set_data_receive_callback")

    def set_tensor_receive_callback(self, arg0) -> None:
        """Runs `arg0(ReceivedTensor)` for each send_tensor a peer makes to this server, on a server thread."""
        self._callbacks.tensor = _callable(arg0, "set_tensor_receive_callback")

    # -- sending -------------------------------------------------------------------------------------------------

    def _client(self):
        return self._client_box[0]

    def send_data(self, target_address, data) -> int:
        """Sends `data` (bytes) to the server at `target_address` ("host:port") and waits until its data callback
        has run: 0, or -1 when the peer cannot be reached, does not answer within timeout_seconds, or this interface
        is not initialized (the reason is logged)."""
        target_address = _text(target_address, "target_address")
        data = _payload(data)
        client = self._client()
        if client is None:
            log.warning("mooncake rpc: send_data before initialize")
            return -1
        return client.send(target_address, _KIND_DATA, b"", data)

    def send_tensor(self, target_address, tensor) -> int:
        """Sends a tensor (dtype, shape and elements; CUDA tensors are copied to the host first) to the server at
        `target_address` and waits until its callback has run: 0, or -1 as send_data (and for an object that is not
        a tensor)."""
        target_address = _text(target_address, "target_address")
        client = self._client()
        if client is None:
            log.warning("mooncake rpc: send_tensor before initialize")
            return -1
        try:
            meta, payload, keep = _tensor_parts(tensor)
        except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError) as e:
            log.warning("mooncake rpc: send_tensor: not a tensor (or its elements cannot be read): %s", e)
            return -1
        rc = client.send(target_address, _KIND_TENSOR, json.dumps(meta).encode("utf-8"), payload)
        del keep
        return rc

    @staticmethod
    def _future(loop):
        if loop is None:
            loop = asyncio.get_running_loop()
        if not hasattr(loop, "call_soon_threadsafe") or not hasattr(loop, "create_future"):
            raise TypeError(f"loop must be an asyncio event loop, not {type(loop).__name__}")
        return loop, loop.create_future()

    @staticmethod
    def _run_async(loop, future, send, failure: str):
        def settle(rc):
            if future.done():
                return
            if rc == 0:
                future.set_result(rc)
            else:
                future.set_exception(RuntimeError(failure))

        def work():
            try:
                rc = send()
            except Exception:  # noqa: BLE001 - reported through the future
                log.exception("mooncake rpc: %s", failure)
                rc = -1
            try:
                loop.call_soon_threadsafe(settle, rc)
            except RuntimeError:  # the loop was closed meanwhile: nobody is waiting
                pass

        threading.Thread(target=work, name="mooncake-rpc-send", daemon=True).start()

    def send_data_async(self, target_address, data, loop):
        """send_data without blocking: returns an asyncio.Future of `loop` (None: the running loop) that resolves to
        0, or fails with RuntimeError when the send fails (or this interface is not initialized)."""
        target_address = _text(target_address, "target_address")
        data = _payload(data)
        loop, future = self._future(loop)
        client = self._client()
        if client is None:
            future.set_exception(RuntimeError("Communicator not initialized"))
            return future
        self._run_async(loop, future, lambda: client.send(target_address, _KIND_DATA, b"", data), "Send data failed")
        return future

    def send_tensor_async(self, target_address, tensor, loop):
        """send_tensor without blocking: an asyncio.Future of `loop` resolving to 0, or failing with RuntimeError.
        An object without a tensor's attributes raises AttributeError at once (as upstream's does)."""
        target_address = _text(target_address, "target_address")
        loop, future = self._future(loop)
        client = self._client()
        if client is None:
            future.set_exception(RuntimeError("Communicator not initialized"))
            return future
        meta, payload, keep = _tensor_parts(tensor)
        body = json.dumps(meta).encode("utf-8")

        def send():
            _ = keep  # holds the tensor until its bytes are on the wire
            return client.send(target_address, _KIND_TENSOR, body, payload)

        self._run_async(loop, future, send, "Send tensor failed")
        return future

    def __repr__(self):
        server = self._server_box[0]
        state = f"serving on port {server.port}" if server is not None else "not serving"
        configured = "not initialized" if self._config is None else f"listen_address={self._config[0]!r}"
        return f"<mooncake.engine.RpcInterface {configured}, {state}>"


CoroRPCInterface = RpcInterface


def _rank_args(local_rank, world_size):
    _count(local_rank, "local_rank")
    _count(world_size, "world_size")


def create_rpc_client(local_rank=0, world_size=1) -> RpcInterface:
    """An RpcInterface initialized as a client (pool of 10 connections per peer, 30 s timeout). The rank arguments
    are accepted and unused, as upstream's are."""
    _rank_args(local_rank, world_size)
    rpc = RpcInterface()
    rpc.initialize("", 0, 30, 10)
    return rpc


def create_rpc_server(local_rank=0, world_size=1) -> RpcInterface:
    """An RpcInterface initialized to listen on 0.0.0.0:8080 (call start_server_async to listen), as upstream's. The
    rank arguments are accepted and unused."""
    _rank_args(local_rank, world_size)
    rpc = RpcInterface()
    rpc.initialize("0.0.0.0:8080", 0, 30, 10)
    return rpc
