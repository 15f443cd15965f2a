"""Scenarios run under both wheels (ours and upstream's) by test_differential.py, which compares what they report.

    python scenarios.py NAME      # prints one JSON object per line: {"case": ..., "result": ...}

Only the public API both packages share is used. A result is what a call returned (ints, bools, str, None, lists,
bytes as {"bytes": hex}) or the type name of what it raised ({"exc": "TypeError"}). Store scenarios start their own
`mooncake_master` (the one installed next to this interpreter) with its HTTP metadata server, on free 127.0.0.1
ports, and stop it by PID. Native code that prints to fd 1 is sent to stderr, so stdout carries only results.
"""

import ctypes
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# Process helpers that run under either wheel's python (bindings/python/bench/procs.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from procs import free_port, wait_port  # noqa: E402

_fd = os.dup(1)
os.dup2(2, 1)
_out = os.fdopen(_fd, "w", buffering=1)
sys.stdout = sys.stderr


def normalize(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(v).hex()}
    if isinstance(v, (list, tuple)):
        return [normalize(x) for x in v]
    if isinstance(v, dict):
        return {str(k): normalize(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return {"type": type(v).__name__}


def case(name: str, fn) -> object:
    """Runs `fn`, reports its result (or the type of what it raised) under `name`, returns the value."""
    try:
        value = fn()
        result = normalize(value)
    except Exception as e:  # noqa: BLE001 - the exception type is the result
        value = None
        result = {"exc": type(e).__name__}
    _out.write(json.dumps({"case": name, "result": result}) + "\n")
    return value


class Master:
    """This interpreter's mooncake_master with its HTTP metadata server."""

    def __init__(self, *extra_flags: str):
        bindir = os.path.dirname(sys.executable)
        self.rpc, self.http, self.admin = free_port(), free_port(), free_port()
        self.proc = subprocess.Popen(
            [
                os.path.join(bindir, "mooncake_master"),
                f"--rpc_port={self.rpc}",
                "--enable_http_metadata_server=true",
                f"--http_metadata_server_port={self.http}",
                f"--metrics_port={self.admin}",
                *extra_flags,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.rpc, self.proc)
        wait_port(self.http, self.proc)
        self.metadata = f"http://127.0.0.1:{self.http}/metadata"
        self.address = f"127.0.0.1:{self.rpc}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def with_master(fn, *extra_flags: str):
    master = Master(*extra_flags)
    try:
        fn(master)
    finally:
        master.stop()


# ---- scenarios -------------------------------------------------------------------------------------------------


def replicate_config_fields():
    """Every ReplicateConfig field: defaults, and what each kind of value does when assigned."""
    from mooncake.store import ReplicateConfig

    fields = ["replica_num", "soft_pin_ttl_ms", "with_hard_pin", "preferred_segments", "preferred_segment",
              "prefer_alloc_in_same_node", "group_ids"]
    for f in fields:
        case(f"default {f}", lambda f=f: getattr(ReplicateConfig(), f))
    values = [-1, 0, 3, 2**64, 2**63, True, 2.0, "2", None, ["a"], ("a", "b"), "ab"]
    for f in fields:
        for v in values:
            def assign(f=f, v=v):
                r = ReplicateConfig()
                setattr(r, f, v)
                return getattr(r, f)

            case(f"{f} = {v!r}", assign)


def store_same_hostname():
    """Two stores set up with the same host name and no port: each gets a segment of its own and both work."""
    from mooncake.store import MooncakeDistributedStore

    def run(m):
        a, b = MooncakeDistributedStore(), MooncakeDistributedStore()
        case("a.setup", lambda: a.setup("localhost", m.metadata, 64 << 20, 16 << 20, "tcp", "", m.address))
        case("b.setup", lambda: b.setup("localhost", m.metadata, 64 << 20, 16 << 20, "tcp", "", m.address))
        case("names differ", lambda: a.get_hostname() != b.get_hostname())
        case("a name is host:port", lambda: a.get_hostname().startswith("localhost:"))
        case("a.put", lambda: a.put("k1", b"hello"))
        case("b.get", lambda: b.get("k1"))
        case("b.put", lambda: b.put("k2", b"x" * 1000))
        case("a.get size", lambda: len(a.get("k2")))
        case("a.close", lambda: a.close())
        case("b.close", lambda: b.close())

    with_master(run)


def store_setup_dict_bad_values():
    """setup(config dict) with values it cannot use returns a code instead of raising."""
    from mooncake.store import MooncakeDistributedStore

    def run(m):
        base = {
            "local_hostname": "localhost",
            "metadata_server": m.metadata,
            "global_segment_size": "64MB",
            "local_buffer_size": "16MB",
            "protocol": "tcp",
            "master_server_address": m.address,
        }
        for label, key, value in [("50%", "global_segment_size", "50%"), ("-1", "global_segment_size", -1)]:
            s = MooncakeDistributedStore()
            cfg = dict(base, **{key: value})
            case(f"setup {key}={label}", lambda: s.setup(cfg))

    with_master(run)


def store_ctypes_values():
    """Values given as ctypes arrays (buffer protocol, format 'c')."""
    from mooncake.store import MooncakeDistributedStore

    def run(m):
        s = MooncakeDistributedStore()
        case("setup", lambda: s.setup("localhost", m.metadata, 64 << 20, 16 << 20, "tcp", "", m.address))
        arr = (ctypes.c_char * 5)(*b"abcde")
        case("put ctypes", lambda: s.put("c1", arr))
        case("get c1", lambda: s.get("c1"))
        case("put_parts ctypes", lambda: s.put_parts("c2", arr, b"xyz"))
        case("get c2", lambda: s.get("c2"))
        words = (ctypes.c_uint32 * 2)(1, 2)
        case("put uint32 array", lambda: s.put("c3", words))
        case("get c3", lambda: s.get("c3"))
        case("close", lambda: s.close())

    with_master(run)


def store_without_local_buffer():
    """A client set up with local_buffer_size=0: calls that need the local buffer fail with a code."""
    from mooncake.store import MooncakeDistributedStore

    def run(m):
        holder = MooncakeDistributedStore()
        case("holder.setup", lambda: holder.setup("localhost", m.metadata, 64 << 20, 16 << 20, "tcp", "", m.address))
        case("holder.put", lambda: holder.put("held", b"held bytes"))
        s = MooncakeDistributedStore()
        case("setup", lambda: s.setup("localhost", m.metadata, 64 << 20, 0, "tcp", "", m.address))
        case("put", lambda: s.put("k", b"hello"))
        case("is_exist k", lambda: s.is_exist("k"))
        case("put_parts", lambda: s.put_parts("k2", b"a", b"b"))
        case("put_batch", lambda: s.put_batch(["k3", "k4"], [b"x", b"y"]))
        case("get held", lambda: s.get("held"))
        case("get_batch", lambda: s.get_batch(["held", "missing"]))
        case("get_buffer held", lambda: s.get_buffer("held") is None)
        case("get_size held", lambda: s.get_size("held"))
        buf = ctypes.create_string_buffer(b"zero-copy!", 64)
        addr = ctypes.addressof(buf)
        case("register_buffer", lambda: s.register_buffer(addr, 64))
        case("put_from", lambda: s.put_from("zc", addr, 10))
        case("get_into held", lambda: s.get_into("held", addr, 64))
        case("buffer after get_into", lambda: buf.raw[:10])
        case("holder.get zc", lambda: holder.get("zc"))
        case("unregister_buffer", lambda: s.unregister_buffer(addr))
        case("close", lambda: s.close())
        case("holder.close", lambda: holder.close())

    with_master(run)


def store_async():
    """MooncakeDistributedStoreAsync: async_<method> twins of the store's methods, awaited on asyncio."""
    import asyncio

    from mooncake.async_store import MooncakeDistributedStoreAsync

    def run(m):
        s = MooncakeDistributedStoreAsync()
        case("not-async attribute", lambda: s.no_such_thing)
        case("async_ of nothing", lambda: s.async_no_such_thing)
        case("async_setup", lambda: asyncio.run(
            s.async_setup("localhost", m.metadata, 64 << 20, 16 << 20, "tcp", "", m.address)))

        async def work():
            puts = await asyncio.gather(*[s.async_put(f"a{i}", bytes([i]) * 100) for i in range(8)])
            got = await asyncio.gather(*[s.async_get(f"a{i}") for i in range(8)])
            exist = await s.async_batch_is_exist(["a0", "nope"])
            removed = await s.async_remove("a0")
            after = await s.async_is_exist("a0")
            return [puts, [len(g) for g in got], exist, removed, after]

        case("async calls", lambda: asyncio.run(work()))
        case("sync get still there", lambda: s.get("a1"))
        case("same coroutine function twice", lambda: s.async_get is s.async_get)
        case("close", lambda: s.close())

    with_master(run)


def store_buffer_pool():
    """BufferPool and its leases: capacity from the store's local buffer, exhaustion, release, close."""
    import gc

    from mooncake.store import BufferPool, MooncakeDistributedStore

    MiB = 1 << 20

    def run(m):
        s = MooncakeDistributedStore()
        case("pool of None", lambda: BufferPool(None))
        case("pool of a str", lambda: BufferPool("x"))
        case("pool of a store not set up", lambda: BufferPool(s))
        case("setup", lambda: s.setup("localhost", m.metadata, 64 * MiB, 4 * MiB, "tcp", "", m.address))
        case("alignment 0", lambda: BufferPool(s, alignment=0))
        case("alignment 3", lambda: BufferPool(s, alignment=3))
        case("max_bytes -1", lambda: BufferPool(s, max_bytes=-1))
        p = BufferPool(s)
        case("default pool holds 2x local buffer", lambda: p.acquire(8 * MiB).size)
        case("default pool: one page more", lambda: p.acquire(8 * MiB + 4096))
        small = BufferPool(s, max_bytes=1)
        case("max_bytes below local buffer", lambda: small.acquire(4 * MiB).size)
        case("max_bytes below local buffer: one page more", lambda: small.acquire(4 * MiB + 4096))
        case("acquire -1", lambda: p.acquire(-1))
        case("acquire 0", lambda: p.acquire(0).size)
        lease = p.acquire(65536)
        case("lease size", lambda: lease.size)
        case("lease buffer", lambda: [type(lease.buffer).__name__, len(lease.buffer), lease.buffer.readonly])

        def write_and_put():
            lease.buffer[:5] = b"hello"
            return s.put_from("pooled", lease.ptr, 5)

        case("put_from a lease", write_and_put)
        case("get", lambda: s.get("pooled"))
        case("get_into a lease", lambda: s.get_into("pooled", lease.ptr + 4096, 5))
        case("bytes read into the lease", lambda: bytes(lease.buffer[4096:4101]))
        case("close with a lease out", lambda: p.close())
        case("release", lambda: lease.release())
        case("release again", lambda: lease.release())
        case("ptr after release", lambda: lease.ptr)
        case("buffer after release", lambda: lease.buffer)
        case("size after release", lambda: lease.size)

        def in_with():
            with p.acquire(4096) as inner:
                size = inner.size
            try:
                inner.ptr
                after = "open"
            except RuntimeError:
                after = "closed"
            return [size, after]

        case("with block", in_with)
        q = BufferPool(s, max_bytes=8 * MiB)
        held = q.acquire(6 * MiB)
        case("exhausted, no wait", lambda: q.acquire(4 * MiB, block=False))
        case("exhausted, wait 0.2 s", lambda: q.acquire(4 * MiB, timeout=0.2))
        case("release frees room", lambda: [held.release(), q.acquire(4 * MiB, block=False).size][1])

        def dropped_lease_frees_room():
            q.acquire(6 * MiB)  # not kept: collected at once
            gc.collect()
            return q.acquire(6 * MiB, block=False).size

        case("a dropped lease frees room", dropped_lease_frees_room)
        case("buffer()", lambda: q.buffer(5000).size)
        case("prewarm", lambda: q.prewarm(65536, 4))
        case("close", lambda: q.close())
        case("close again", lambda: q.close())
        case("s.close", lambda: s.close())

    with_master(run)


def kv_bootstrap_keys():
    """The Python HTTP metadata server: keys are stripped; blank keys are refused; poll() reports the state."""
    from mooncake.http_metadata_server import KVBootstrapServer

    port = free_port()
    server = KVBootstrapServer(port, "127.0.0.1")
    case("poll before run", lambda: server.poll().name)
    server.run()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/metadata"

    def http(method, query, body=None):
        req = urllib.request.Request(base + query, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return [r.status, r.read().decode()]
        except urllib.error.HTTPError as e:
            return [e.code, None]

    try:
        case("poll while serving", lambda: server.poll().name)
        case("put ' k '", lambda: http("PUT", "?key=%20k%20", b"v1")[0])
        case("get 'k'", lambda: http("GET", "?key=k"))
        case("get '\\tk\\n'", lambda: http("GET", "?key=%09k%0A"))
        case("put blank", lambda: http("PUT", "?key=%20%20", b"v")[0])
        case("get blank", lambda: http("GET", "?key=")[0])
        case("get no key", lambda: http("GET", "")[0])
        case("delete ' k'", lambda: http("DELETE", "?key=%20k")[0])
        case("get 'k' after delete", lambda: http("GET", "?key=k")[0])
    finally:
        server.close()


def mooncake_config():
    """MooncakeConfig from files and environment variables: sizes, booleans, protocols, required fields."""
    import tempfile

    from mooncake.mooncake_config import MooncakeConfig

    fields = ["local_hostname", "metadata_server", "global_segment_size", "local_buffer_size", "protocol",
              "device_name", "master_server_address", "enable_ssd_offload", "ssd_offload_path", "tenant_id",
              "enable_client_http_server", "client_http_port"]
    minimal = {"local_hostname": "h1", "metadata_server": "P2PHANDSHAKE", "master_server_address": "10.0.0.1:50051"}

    def from_file(doc):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(doc, f)
        try:
            cfg = MooncakeConfig.from_file(f.name)
            return [getattr(cfg, k) for k in fields]
        finally:
            os.unlink(f.name)

    case("minimal file", lambda: from_file(minimal))
    for key in ("local_hostname", "metadata_server", "master_server_address"):
        case(f"file without {key}", lambda key=key: from_file({k: v for k, v in minimal.items() if k != key}))
        case(f"file with blank {key}", lambda key=key: from_file(dict(minimal, **{key: "  "})))
    for size in ["1.5g", "1e6", "512MB", "512 mb", "4096", "2t", "7b", "", "lots", "mb", -1, 0, 1.5e9, None]:
        case(f"global_segment_size {size!r}", lambda size=size: from_file(dict(minimal, global_segment_size=size)))
    for proto in ["tcp", " RDMA ", "Efa", "", "  ", "warp", 5]:
        case(f"protocol {proto!r}", lambda proto=proto: from_file(dict(minimal, protocol=proto)))
    for flag in [True, False, "on", "OFF", "yes", "0", "enable", "", "maybe", 2, None]:
        case(f"enable_ssd_offload {flag!r}", lambda flag=flag: from_file(dict(minimal, enable_ssd_offload=flag)))
    case("tenant_id 7", lambda: from_file(dict(minimal, tenant_id=7)))
    case("client_http_port '9400'", lambda: from_file(dict(minimal, client_http_port="9400")))
    case("client_http_port 'x'", lambda: from_file(dict(minimal, client_http_port="x")))

    saved = {k: v for k, v in os.environ.items() if k.startswith("MOONCAKE_")}
    try:
        for k in saved:
            del os.environ[k]
        case("env without master", lambda: MooncakeConfig.load_from_env())
        os.environ["MOONCAKE_MASTER"] = "127.0.0.1:50051"
        case("env master only", lambda: [getattr(MooncakeConfig.load_from_env(), k) for k in fields])
        os.environ.update({
            "MOONCAKE_PROTOCOL": "RDMA", "MOONCAKE_GLOBAL_SEGMENT_SIZE": "2gb", "MOONCAKE_OFFLOAD_ENABLED": "true",
            "MOONCAKE_TENANT_ID": "t1", "MOONCAKE_CLIENT_HTTP_PORT": "9500",
        })
        case("env full", lambda: [getattr(MooncakeConfig.load_from_env(), k) for k in fields])
        os.environ["MOONCAKE_LOCAL_BUFFER_SIZE"] = "-5"
        case("env negative size", lambda: MooncakeConfig.load_from_env())
    finally:
        for k in [k for k in os.environ if k.startswith("MOONCAKE_")]:
            del os.environ[k]
        os.environ.update(saved)


def store_sessions():
    """Put sessions (reserve, ranged writes, end, revoke) and get sessions (ranged reads), with their errors."""
    from mooncake.store import MooncakeDistributedStore

    def body(m):
        s = MooncakeDistributedStore()
        case("setup", lambda: s.setup("127.0.0.1", m.metadata, 64 << 20, 16 << 20, "tcp", "", m.address))
        src = ctypes.create_string_buffer(b"0123456789ABCDEFGHIJ", 32)
        dst = ctypes.create_string_buffer(32)
        a, d = ctypes.addressof(src), ctypes.addressof(dst)
        case("register src", lambda: s.register_buffer(a, 32))
        case("register dst", lambda: s.register_buffer(d, 32))
        case("put start", lambda: s.batch_put_session_start(["a", "b"], [10, 20]))
        case("exist while open", lambda: s.is_exist("a"))
        case("get while open", lambda: s.get("a"))
        case("start again", lambda: s.batch_put_session_start(["a"], [10]))
        case("ranges", lambda: s.batch_put_from_multi_buffer_ranges(
            ["a", "b"], [[a, a + 5], [a]], [[5, 5], [20]], [[0, 5], [0]]))
        case("ranges past end", lambda: s.batch_put_from_multi_buffer_ranges(["a"], [[a]], [[5]], [[8]]))
        case("ranges unregistered", lambda: s.batch_put_from_multi_buffer_ranges(["a"], [[12345678]], [[5]], [[0]]))
        case("end", lambda: s.batch_put_session_end(["a", "b"]))
        case("get a", lambda: s.get("a"))
        case("get b", lambda: s.get("b"))
        case("ranges without session", lambda: s.batch_put_from_multi_buffer_ranges(["c"], [[a]], [[5]], [[0]]))
        case("end without session", lambda: s.batch_put_session_end(["zz"]))
        case("revoke without session", lambda: s.batch_put_session_revoke(["zz"]))
        case("start existing", lambda: s.batch_put_session_start(["a"], [10]))
        case("start c", lambda: s.batch_put_session_start(["c"], [10]))
        case("revoke c", lambda: s.batch_put_session_revoke(["c"]))
        case("exist c", lambda: s.is_exist("c"))
        case("start mismatched", lambda: s.batch_put_session_start(["d"], [10, 2]))
        case("start size 0", lambda: s.batch_put_session_start(["d"], [0]))
        case("start bad key type", lambda: s.batch_put_session_start([1], [10]))
        case("get ranges without session", lambda: s.batch_get_into_multi_buffer_ranges(["a"], [[d]], [[4]], [[2]]))
        case("get start", lambda: s.batch_get_session_start(["a", "b", "missing"]))
        case("get ranges bad shape", lambda: s.batch_get_into_multi_buffer_ranges(
            ["a", "b"], [[d, d + 10]], [[4], [3]], [[2], [1]]))
        case("get ranges", lambda: s.batch_get_into_multi_buffer_ranges(
            ["a", "b"], [[d], [d + 10]], [[4], [3]], [[2], [1]]))
        case("read back", lambda: dst.raw[:16])
        case("get ranges past end", lambda: s.batch_get_into_multi_buffer_ranges(["a"], [[d]], [[4]], [[8]]))
        case("get ranges missing", lambda: s.batch_get_into_multi_buffer_ranges(["missing"], [[d]], [[4]], [[0]]))
        case("get end", lambda: s.batch_get_session_end(["a", "b", "missing"]))
        case("get end again", lambda: s.batch_get_session_end(["a"]))
        case("get ranges after end", lambda: s.batch_get_into_multi_buffer_ranges(["a"], [[d]], [[4]], [[0]]))
        case("close", lambda: s.close())
        case("put start after close", lambda: s.batch_put_session_start(["x"], [4]))

    with_master(body)


def store_replica_clear():
    """batch_replica_clear: leased objects are kept, whole objects or one segment's replica go."""
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    def body(m):
        a, b = MooncakeDistributedStore(), MooncakeDistributedStore()
        pa, pb = free_port(), free_port()
        case("setup a", lambda: a.setup(f"127.0.0.1:{pa}", m.metadata, 16 << 20, 4 << 20, "tcp", "", m.address))
        case("setup b", lambda: b.setup(f"127.0.0.1:{pb}", m.metadata, 16 << 20, 4 << 20, "tcp", "", m.address))
        two = ReplicateConfig()
        two.replica_num = 2
        case("put two", lambda: a.put("two", b"twice", two))
        case("put fresh", lambda: a.put("fresh", b"once"))
        case("put read", lambda: a.put("read", b"read me"))
        case("get read", lambda: a.get("read"))
        case("clear whole", lambda: a.batch_replica_clear(["fresh", "read", "missing"], ""))
        case("exist fresh", lambda: a.is_exist("fresh"))
        case("exist read", lambda: a.is_exist("read"))
        case("clear unknown segment", lambda: a.batch_replica_clear(["two"], "nosuch:1"))
        case("clear one segment", lambda: a.batch_replica_clear(["two"], f"127.0.0.1:{pb}"))
        case("replicas left", lambda: len(a.get_replica_desc("two")))
        case("get two", lambda: b.get("two"))
        case("clear leased", lambda: a.batch_replica_clear(["two"]))
        time.sleep(1.5)  # the leases (1 s here) run out
        case("clear default segment", lambda: a.batch_replica_clear(["two", "read"]))
        case("exist two", lambda: a.is_exist("two"))
        case("clear bad keys", lambda: a.batch_replica_clear("two", ""))
        case("close", lambda: (a.close(), b.close()))

    with_master(body, "--default_kv_lease_ttl=1000")


def store_misc_writes():
    """put_from_with_metadata, ReplicateConfig.data_type, alloc_from_mem_pool of a real client."""
    from mooncake.store import MooncakeDistributedStore, ObjectDataType, ReplicateConfig

    def body(m):
        s = MooncakeDistributedStore()
        case("setup", lambda: s.setup("127.0.0.1", m.metadata, 16 << 20, 4 << 20, "tcp", "", m.address))
        buf = ctypes.create_string_buffer(b"0123456789ABCDEFGHIJ", 32)
        a = ctypes.addressof(buf)
        case("register", lambda: s.register_buffer(a, 32))
        case("with metadata", lambda: s.put_from_with_metadata("m", a, a + 10, 5, 3))
        case("get m", lambda: s.get("m"))
        case("with metadata again", lambda: s.put_from_with_metadata("m", a, a + 10, 5, 3))
        cfg = ReplicateConfig()
        case("data_type default", lambda: str(cfg.data_type))
        cfg.data_type = ObjectDataType.TENSOR
        case("data_type set", lambda: str(cfg.data_type))
        case("data_type bad", lambda: setattr(cfg, "data_type", 3))
        case("with metadata and config", lambda: s.put_from_with_metadata("m2", a, a + 10, 5, 3, cfg))
        case("get m2", lambda: s.get("m2"))
        case("alloc from pool", lambda: s.alloc_from_mem_pool(100))
        case("alloc from pool negative", lambda: s.alloc_from_mem_pool(-1))
        case("close", lambda: s.close())

    with_master(body)


def store_tasks():
    """Replica copy and move tasks: queued, run by the client holding the object, queried until they end."""
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig, TaskStatus

    def body(m):
        a, b = MooncakeDistributedStore(), MooncakeDistributedStore()
        pa, pb = free_port(), free_port()
        seg_a, seg_b = f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"
        case("setup a", lambda: a.setup(seg_a, m.metadata, 16 << 20, 4 << 20, "tcp", "", m.address))
        case("setup b", lambda: b.setup(seg_b, m.metadata, 16 << 20, 4 << 20, "tcp", "", m.address))
        on_a = ReplicateConfig()
        on_a.preferred_segment = seg_a
        case("put", lambda: a.put("k", b"hello world", on_a))

        def where(key):
            names = {seg_a: "a", seg_b: "b"}
            return sorted(names.get(r.get_memory_descriptor().buffer_descriptor.transport_endpoint, "?")
                          for r in a.get_replica_desc(key))

        def wait(task_id):
            for _ in range(100):
                info, rc = a.query_task(task_id)
                if info is None or info.status in (TaskStatus.SUCCESS, TaskStatus.FAILED):
                    break
                time.sleep(0.1)
            if info is None:
                return [rc]
            return [rc, str(info.status), str(info.type), info.message, info.last_updated_at_ms_epoch >= info.created_at_ms_epoch,
                    isinstance(info.assigned_client, tuple), info.id == task_id]

        copy = a.create_copy_task("k", [seg_b])
        case("copy", lambda: [isinstance(copy[0], tuple) and copy[0] != (0, 0), copy[1]])
        case("copy ends", lambda: wait(copy[0]))
        case("replicas after copy", lambda: where("k"))
        case("get from b", lambda: b.get("k"))
        again = a.create_copy_task("k", [seg_b])
        case("copy again", lambda: [again[0] != (0, 0), again[1]])
        case("copy again ends", lambda: wait(again[0]))
        case("replicas after copy again", lambda: where("k"))
        move = a.create_move_task("k", seg_a, seg_b)
        case("move", lambda: [move[0] != (0, 0), move[1]])
        case("move ends", lambda: wait(move[0]))
        case("replicas after move", lambda: where("k"))
        case("get after move", lambda: a.get("k"))
        case("copy missing key", lambda: a.create_copy_task("nokey", [seg_b]))
        case("copy unknown target", lambda: a.create_copy_task("k", ["nosuch:1"]))
        case("copy no targets", lambda: a.create_copy_task("k", []))
        case("move same segment", lambda: a.create_move_task("k", seg_b, seg_b))
        case("move from a segment without it", lambda: a.create_move_task("k", seg_a, seg_b))
        case("move missing key", lambda: a.create_move_task("nokey", seg_a, seg_b))
        case("query unknown", lambda: a.query_task((1, 2)))
        case("query bad type", lambda: a.query_task("x"))
        case("copy bad targets type", lambda: a.create_copy_task("k", seg_b))
        case("close", lambda: (a.close(), b.close()))

    with_master(body)


def store_segments():
    """Segments mounted after setup: a file region, allocated memory; unmounting them, and the errors."""
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    def body(m):
        s = MooncakeDistributedStore()
        case("setup", lambda: s.setup("127.0.0.1", m.metadata, 16 << 20, 4 << 20, "tcp", "", m.address))
        path = f"/dev/shm/mc-diff-seg-{os.getpid()}"
        with open(path, "wb") as f:
            f.write(b"\0" * (4 << 20))
        try:
            def shape(d):
                return {k: (len(v) if k == "segment_ids" else v) for k, v in sorted(d.items())}

            first = s.mount_segment(path, 1 << 20)
            case("mount file", lambda: shape(first))
            second = s.mount_segment(path, 1 << 20, 1 << 20)
            case("mount file at offset", lambda: shape(second))
            case("ids differ", lambda: first["segment_ids"] != second["segment_ids"])
            case("mount past the end", lambda: shape(s.mount_segment(path, 8 << 20)))
            case("mount missing file", lambda: shape(s.mount_segment(path + "-missing", 1 << 20)))
            case("mount negative size", lambda: s.mount_segment(path, -1))
            case("unmount file", lambda: s.unmount_segment(first["segment_ids"]))
            case("unmount file again", lambda: s.unmount_segment(first["segment_ids"]))
            case("unmount file with grace", lambda: s.unmount_segment(second["segment_ids"], 1))
            alloc = s.allocate_and_mount_segment(1 << 20)
            case("allocate", lambda: shape(alloc))
            case("put after allocate", lambda: s.put("seg-k", b"v" * 1000))
            case("get after allocate", lambda: len(s.get("seg-k")))
            case("unmount allocated without free", lambda: s.unmount_segment(alloc["segment_ids"]))
            case("unmount allocated with free", lambda: s.unmount_and_free_segment(alloc["segment_ids"]))
            case("unmount unknown", lambda: s.unmount_segment(["abc"]))
            case("unmount and free unknown", lambda: s.unmount_and_free_segment(["abc"]))
            case("allocate 0", lambda: shape(s.allocate_and_mount_segment(0)))
            case("allocate huge", lambda: shape(s.allocate_and_mount_segment(1 << 50)))
            case("unmount bad ids type", lambda: s.unmount_segment("abc"))
            case("get after unmounts", lambda: len(s.get("seg-k")) in (0, 1000))
            case("close", lambda: s.close())
        finally:
            os.unlink(path)

    with_master(body)


def store_dummy():
    """Dummy clients: setup_dummy against this wheel's mooncake_client (the real client), its shared pool."""
    from mooncake.store import MooncakeDistributedStore

    def body(m):
        port = free_port()
        bindir = os.path.dirname(sys.executable)
        node = subprocess.Popen(
            [os.path.join(bindir, "mooncake_client"), "--host=127.0.0.1", f"--port={port}",
             f"--master_server_address={m.address}", f"--metadata_server={m.metadata}",
             "--global_segment_size=64MB", "--local_buffer_size=16MB", "--protocol=tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, node)
            d = MooncakeDistributedStore()
            case("setup_dummy unreachable", lambda: MooncakeDistributedStore().setup_dummy(16 << 20, 8 << 20,
                                                                                         f"127.0.0.1:{free_port()}") != 0)
            case("setup_dummy", lambda: d.setup_dummy(32 << 20, 16 << 20, f"127.0.0.1:{port}"))
            case("put", lambda: d.put("dk", b"dummy value"))
            case("get", lambda: d.get("dk"))
            case("get missing", lambda: d.get("missing"))
            case("is_exist", lambda: d.is_exist("dk"))
            case("get_size", lambda: d.get_size("dk"))
            buf = d.alloc_from_mem_pool(1 << 20)
            case("alloc nonzero", lambda: buf != 0)
            case("register pool buffer", lambda: d.register_buffer(buf, 1 << 20))
            case("get_into", lambda: d.get_into("dk", buf, 1 << 20))
            case("read back", lambda: ctypes.string_at(buf, 11))
            ctypes.memmove(buf, b"zero copy!", 10)
            case("put_from", lambda: d.put_from("zc", buf, 10))
            case("get zc", lambda: d.get("zc"))
            case("batch_get_into", lambda: d.batch_get_into(["dk", "zc", "missing"], [buf, buf + 4096, buf + 8192],
                                                            [4096, 4096, 4096]))
            case("put_batch", lambda: d.put_batch(["b1", "b2"], [b"x", b"yy"]))
            case("get_batch", lambda: d.get_batch(["b1", "b2", "missing"]))
            case("remove", lambda: d.remove("b1"))
            case("exist after remove", lambda: d.is_exist("b1"))
            case("health", lambda: d.health_check())
            case("unregister pool buffer", lambda: d.unregister_buffer(buf))
            case("close", lambda: d.close())
        finally:
            node.kill()
            node.wait()

    with_master(body)


def engine_and_numa_helpers():
    """warmup_efa_segment before and after initialize, bind_to_numa_node with good and bad nodes."""
    from mooncake.engine import TransferEngine
    from mooncake.store import bind_to_numa_node

    e = TransferEngine()
    case("warmup before initialize", lambda: e.warmup_efa_segment("127.0.0.1:1"))
    case("initialize", lambda: e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", ""))
    case("warmup unreachable", lambda: e.warmup_efa_segment(f"127.0.0.1:{free_port()}"))
    case("warmup empty", lambda: e.warmup_efa_segment(""))
    case("warmup bad type", lambda: e.warmup_efa_segment(5))
    case("bind node 0", lambda: bind_to_numa_node(0))
    case("bind missing node", lambda: bind_to_numa_node(99))
    case("bind negative node", lambda: bind_to_numa_node(-1))
    case("bind bad type", lambda: bind_to_numa_node("0"))


def store_shared_engine():
    """setup(engine=te): the store shares an initialized TransferEngine; te keeps transferring after close."""
    from mooncake.engine import TransferEngine
    from mooncake.store import MooncakeDistributedStore

    def body(m):
        from mooncake.engine import InnerTransferEngine

        te, peer = TransferEngine(), TransferEngine()
        case("get_engine before initialize", lambda: te.get_engine())
        case("InnerTransferEngine()", lambda: InnerTransferEngine())
        case("te.initialize", lambda: te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", ""))
        case("get_engine is one object", lambda: te.get_engine() is te.get_engine())
        case("get_engine type", lambda: type(te.get_engine()).__name__)
        case("peer.initialize", lambda: peer.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", ""))
        s, other = MooncakeDistributedStore(), MooncakeDistributedStore()
        def setup(engine):
            return s.setup("127.0.0.1", "P2PHANDSHAKE", 32 << 20, 16 << 20, "tcp", "", m.address, engine)

        case("setup with a str engine", lambda: setup("not an engine"))
        case("setup with the TransferEngine itself", lambda: setup(te))
        case("setup", lambda: setup(te.get_engine()))
        case("other.setup", lambda: other.setup("127.0.0.1", "P2PHANDSHAKE", 32 << 20, 16 << 20, "tcp", "",
                                                m.address))
        case("hostname is host:port", lambda: s.get_hostname().startswith("127.0.0.1:"))
        case("put", lambda: s.put("shared", b"abc" * 1000))
        case("other.get", lambda: other.get("shared"))
        case("other.put", lambda: other.put("other", b"xyz" * 10))
        case("get", lambda: s.get("other"))
        src, dst = ctypes.create_string_buffer(b"direct" * 100), ctypes.create_string_buffer(600)
        case("te.register", lambda: te.register_memory(ctypes.addressof(src), 600))
        case("peer.register", lambda: peer.register_memory(ctypes.addressof(dst), 600))
        write = lambda n: te.transfer_sync_write(f"127.0.0.1:{peer.get_rpc_port()}", ctypes.addressof(src),  # noqa: E731
                                                 ctypes.addressof(dst), n)
        case("direct write", lambda: write(300))
        case("close", lambda: s.close())
        case("direct write after close", lambda: write(600))
        case("bytes", lambda: dst.raw)
        case("other.close", lambda: other.close())

    with_master(body)


def store_engram():
    """EngramStore: per-layer embedding tables (one per head) in the store, populated and looked up by row."""
    import numpy as np
    from mooncake.store import EngramStore, EngramStoreConfig, MooncakeDistributedStore

    def arr(a):
        return {"shape": list(a.shape), "dtype": str(a.dtype), "values": a.ravel().tolist()}

    def body(m):
        s = MooncakeDistributedStore()
        case("setup", lambda: s.setup("127.0.0.1", m.metadata, 64 << 20, 16 << 20, "tcp", "", m.address))
        c = EngramStoreConfig()
        case("config defaults", lambda: [c.embedding_dim, list(c.table_vocab_sizes)])
        c.embedding_dim = 4
        c.table_vocab_sizes = [5, 3]
        case("config negative dim", lambda: setattr(EngramStoreConfig(), "embedding_dim", -1))
        e = EngramStore(2, c, s)
        case("shape", lambda: [e.get_embedding_dim(), e.get_num_heads(), list(e.get_table_vocab_sizes())])
        case("keys", lambda: e.get_store_keys())
        t0 = np.arange(20, dtype=np.float32).reshape(5, 4)
        t1 = 100 + np.arange(12, dtype=np.float32).reshape(3, 4)
        case("populate", lambda: e.populate([t0, t1]))
        case("raw table", lambda: s.get("engram:l2:h1"))
        case("lookup", lambda: arr(e.lookup(np.array([[[0, 2], [4, 1]]], dtype=np.int64))))
        case("lookup int32", lambda: arr(e.lookup(np.array([[[0, 1]]], dtype=np.int32))))
        case("lookup list", lambda: arr(e.lookup([[[1, 1]]])))
        case("lookup row out of range", lambda: e.lookup(np.array([[[5, 0]]])))
        case("lookup negative row", lambda: e.lookup(np.array([[[-1, 0]]])))
        case("lookup wrong heads", lambda: e.lookup(np.array([[[0]]])))
        case("lookup wrong rank", lambda: e.lookup(np.array([0, 1])))
        case("lookup empty", lambda: e.lookup(np.zeros((0, 3, 2), dtype=np.int64)))
        case("populate again", lambda: e.populate([t0, t1]))
        case("populate one table", lambda: e.populate([t0]))
        case("populate wrong shape", lambda: e.populate([t0, t0]))
        case("populate not a list", lambda: e.populate("x"))
        case("remove while leased", lambda: e.remove_from_store())
        case("remove forced", lambda: e.remove_from_store(True))
        case("remove again", lambda: e.remove_from_store(True))
        case("lookup after remove", lambda: e.lookup(np.array([[[0, 0]]])))
        case("populate float64", lambda: e.populate([t0.astype(np.float64), t1]))
        case("populate after remove", lambda: e.populate([t0, t1]))
        case("lookup after populate", lambda: arr(e.lookup(np.array([[[3, 2]]]))))
        case("close", lambda: s.close())

    with_master(body)


SCENARIOS = {
    f.__name__: f
    for f in (replicate_config_fields, store_same_hostname, store_setup_dict_bad_values, store_ctypes_values,
              kv_bootstrap_keys, mooncake_config, store_without_local_buffer, store_async, store_buffer_pool,
              store_sessions, store_replica_clear, store_misc_writes, store_tasks,
              store_segments, store_dummy, engine_and_numa_helpers,
              store_engram, store_shared_engine)
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
