"""GPU memory through the Python helpers: the CPU never reads or writes it.

Two halves. The CUDA tests (skipped without a GPU: ``torch.cuda.is_available()``) move CUDA tensors and CUDA
addresses through the store's tensor methods, the zero-copy calls (``put_from`` / ``get_into`` and their batch
forms with ``tensor.data_ptr()``), the RPC interface's tensor staging and two transfer engines. The CPU tests run
everywhere and check the routing that keeps device memory away from the CPU without a GPU: tensors on torch's
``meta`` device (no storage: a CPU read of one, or ``.numpy()``, fails loudly) take the staging path and fail
cleanly with upstream's codes, and an address the helpers are told is device memory never reaches ``memmove``,
``string_at`` or a ctypes view. Skipped when torch is not importable.
"""

import ctypes
import os
import threading

import pytest

torch = pytest.importorskip("torch")

from mooncake import _memory, _rpc, _tensors  # noqa: E402
from mooncake.engine import RpcInterface, TransferEngine  # noqa: E402
from mooncake.store import (  # noqa: E402
    EngramStore,
    EngramStoreConfig,
    ParallelAxis,
    ReadTarget,
    ReplicateConfig,
    TensorParallelism,
)

INVALID_PARAMS = -600
HEADER = 304

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False here)"
)


def sample(dtype, shape, seed=0):
    """A CPU tensor of `dtype` and `shape` with varied bytes."""
    n = 1
    for d in shape:
        n *= d
    g = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def raw_bytes(t) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a, b) -> bool:
    return a is not None and a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and raw_bytes(a) == raw_bytes(b)


def axis(kind, rank, size, split_dim=None):
    a = ParallelAxis()
    a.kind, a.rank, a.size, a.split_dim = kind, rank, size, split_dim
    return a


def layout(*axes):
    p = TensorParallelism()
    p.axes = list(axes)
    return p


def target(mode, parallelism=None):
    t = ReadTarget()
    t.mode, t.parallelism = mode, parallelism
    return t


class Writer:
    def __init__(self, rank, size, split_dim):
        self.rank, self.size, self.split_dim = rank, size, split_dim


@pytest.fixture
def cpu_touches(monkeypatch):
    """Every address the Python helpers hand to the CPU (memmove, string_at, ctypes views) and every tensor that
    reaches ``_bytes_of`` (which turns a tensor into a buffer for the native call), recorded while the test runs."""
    seen = {"addresses": [], "bytes_of": []}
    real_memmove, real_string_at = ctypes.memmove, ctypes.string_at
    real_at, real_bytes_of = _tensors._at, _tensors._bytes_of

    def note(*addrs):
        seen["addresses"].extend(a for a in addrs if isinstance(a, int))

    def memmove(dst, src, n):
        note(dst, src)
        return real_memmove(dst, src, n)

    def string_at(ptr, size=-1):
        note(ptr)
        return real_string_at(ptr, size)

    def at(addr, size):
        note(addr)
        return real_at(addr, size)

    def bytes_of(t):
        seen["bytes_of"].append(t.device.type)
        return real_bytes_of(t)

    monkeypatch.setattr(ctypes, "memmove", memmove)
    monkeypatch.setattr(ctypes, "string_at", string_at)
    monkeypatch.setattr(_tensors, "_at", at)
    monkeypatch.setattr(_tensors, "_bytes_of", bytes_of)
    return seen


@pytest.fixture
def staged(monkeypatch):
    """The devices of the tensors ``_memory.host_copy`` was asked to bring to the host."""
    devices = []
    real = _memory.host_copy

    def host_copy(t):
        devices.append(t.device.type)
        return real(t)

    monkeypatch.setattr(_memory, "host_copy", host_copy)
    return devices


# ---- CPU: staging is chosen by device type ---------------------------------------------------------------------


def test_host_copy_chooses_by_device():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert _memory.host_copy(t) is t  # a contiguous CPU tensor is used in place
    tt = _memory.host_copy(t.t())
    assert tt.is_contiguous() and tt.device.type == "cpu" and torch.equal(tt, t.t())
    m = torch.empty(3, 4, dtype=torch.bfloat16, device="meta")
    for view in (m, m.t(), m[:, ::2]):
        staging = _memory.host_staging(view)
        assert staging.device.type == "cpu" and staging.is_contiguous()
        assert staging.dtype == view.dtype and staging.shape == view.shape
        assert staging.is_pinned() == (view.device.type == "cuda" and torch.cuda.is_available())
        with pytest.raises(NotImplementedError):
            _memory.host_copy(view)  # no storage: fails loudly, never yields bytes
    with pytest.raises(TypeError):
        m.numpy()  # what a CPU-side conversion of a device tensor would hit


def test_meta_tensor_puts_fail_cleanly(store, cpu_touches, staged):
    m = torch.empty(4, 6, dtype=torch.float16, device="meta")
    cfg = ReplicateConfig()
    assert store.put_tensor("m", m) == INVALID_PARAMS
    assert store.pub_tensor("m", m.t(), cfg) == INVALID_PARAMS
    assert store.upsert_tensor("m", m) == INVALID_PARAMS
    assert store.upsert_pub_tensor("m", m, cfg) == INVALID_PARAMS
    assert store.batch_put_tensor(["m", "c"], [m, torch.ones(2)]) == [INVALID_PARAMS, 0]
    assert store.batch_pub_tensor(["m"], [m], cfg) == [INVALID_PARAMS]
    assert store.put_tensor_with_tp("m", m, tp_size=2, split_dim=1) == INVALID_PARAMS
    assert store.pub_tensor_with_tp("m", m, cfg, tp_size=2, split_dim=0) == INVALID_PARAMS
    assert store.batch_put_tensor_with_tp(["m"], [m], tp_size=2) == [INVALID_PARAMS]
    assert store.put_tensor_with_parallelism("m", m, layout(axis("tp", 0, 2, 1))) == INVALID_PARAMS
    assert store.put_tensor_with_parallelism("m", m, layout(axis("dp", 0, 2), axis("tp", 1, 2, 0))) == INVALID_PARAMS
    assert store.put_tensor_with_parallelism("m", m, writer_partition=Writer(0, 2, 0)) == INVALID_PARAMS
    for k in ("m", "m_tp_0", "m_tp_1", "m__writer_0of2_sd0", "m__writer_manifest", "m__parallelism_manifest"):
        assert store.is_exist(k) == 0, k
    assert same(store.get_tensor("c"), torch.ones(2))
    # Every meta tensor went to the staging copy (and stopped there); only host tensors became buffers.
    assert "meta" in staged and set(cpu_touches["bytes_of"]) == {"cpu"}
    assert cpu_touches["addresses"] == []


def test_meta_tensor_elsewhere(store):
    with pytest.raises(NotImplementedError):
        _rpc._tensor_parts(torch.empty(3, device="meta"))
    c = RpcInterface()
    assert c.initialize_client() is True
    assert c.send_tensor("127.0.0.1:1", torch.empty(3, device="meta")) == -1
    cfg = EngramStoreConfig()
    cfg.embedding_dim, cfg.table_vocab_sizes = 4, [8]
    with pytest.raises(RuntimeError, match="meta"):
        EngramStore(0, cfg, store).populate([torch.empty(8, 4, device="meta")])
    assert store.is_exist("engram:l0:h0") == 0


# ---- CPU: addresses ----------------------------------------------------------------------------------------------


def _libcuda_mapped() -> bool:
    with open("/proc/self/maps") as f:
        return "libcuda.so" in f.read()


def test_address_device_of_host_memory():
    loaded_before = _libcuda_mapped()
    buf = (ctypes.c_ubyte * 4096)()
    t = torch.zeros(1024)
    for a in (ctypes.addressof(buf), t.data_ptr(), 0):
        assert _memory.address_device(a) is None
    # Asking never loads the driver (nor initialises CUDA): without it no CUDA memory can exist.
    assert _libcuda_mapped() == loaded_before
    s = _memory.span(t.data_ptr(), 16, None)
    assert s.device.type == "cpu" and s.data_ptr() == t.data_ptr() and s.numel() == 16
    with pytest.raises(ValueError):
        _memory.span(t.data_ptr(), 16, "meta")


@pytest.fixture
def device_region(monkeypatch, store):
    """A 1 MiB host buffer registered with `store` that the helpers are told is device memory ("meta": it cannot be
    addressed from Python). Yields (address, size)."""
    mem = torch.zeros(1 << 20, dtype=torch.uint8)
    addr, size = mem.data_ptr(), mem.numel()
    real = _memory.address_device
    monkeypatch.setattr(_memory, "address_device", lambda a: "meta" if addr <= a < addr + size else real(a))
    assert store.register_buffer(addr, size) == 0
    yield addr, size
    store.unregister_buffer(addr)
    del mem


def _inside(addresses, addr, size):
    return [a for a in addresses if addr <= a < addr + size]


def test_device_addresses_never_reach_the_cpu(store, device_region, cpu_touches):
    addr, size = device_region
    t = sample(torch.float32, (8, 4), seed=1)
    assert store.put_tensor("t", t) == 0
    n = HEADER + t.numel() * 4
    # Reads: the native get_into fills the memory; Python must not read the metadata or view the bytes itself.
    assert store.get_tensor_into("t", addr, size) is None
    assert store.batch_get_tensor_into(["t", "t"], [addr, addr + (1 << 19)], [1 << 19] * 2) == [None, None]
    assert store.get_tensor_with_tp_into("t", addr, size) is None
    assert store.put_tensor_with_tp("w", t, tp_size=2, split_dim=0) == 0
    shard = target("shard", layout(axis("tp", 1, 2, 0)))
    assert same(store.get_tensor_with_parallelism("w", shard), t[4:])  # it is there ...
    assert store.get_tensor_with_parallelism_into("w", addr, size, shard) is None  # ... but not copied by the CPU
    full = target("full", layout(axis("tp", 0, 2, 0)))
    assert store.get_tensor_with_parallelism_into("w", addr, size, full) is None
    # Writes from device addresses: refused (the metadata cannot be read here), never read by the CPU.
    assert store.put_tensor_from("f", addr, n) == INVALID_PARAMS
    assert store.upsert_tensor_from("f", addr, n) == INVALID_PARAMS
    assert store.batch_put_tensor_from(["f"], [addr], [n]) == [INVALID_PARAMS]
    assert store.put_tensor_with_tp_from("f", addr, n, tp_size=2) == INVALID_PARAMS
    assert store.put_tensor_with_parallelism_from("f", addr, n, layout(axis("tp", 0, 2, 0))) == INVALID_PARAMS
    assert store.is_exist("f") == 0 and store.is_exist("f_tp_0") == 0
    assert _inside(cpu_touches["addresses"], addr, size) == []


def test_unregistered_device_addresses_never_reach_the_cpu(store, device_region, cpu_touches):
    addr, size = device_region
    assert store.unregister_buffer(addr) == 0  # the native calls now refuse it: the Python fallbacks run
    t = sample(torch.int64, (16,), seed=2)
    assert store.put_tensor("t", t) == 0
    assert store.get_tensor_into("t", addr, size) is None
    assert store.put_tensor_from("f", addr, HEADER + 128) == INVALID_PARAMS
    assert _inside(cpu_touches["addresses"], addr, size) == []
    assert store.register_buffer(addr, size) == 0  # for the fixture's teardown


def test_host_addresses_still_take_the_host_path(store, cpu_touches):
    """The same calls with real host memory: unregistered reads and writes still work (memmove, as upstream's TCP
    path), and a registered one returns a tensor over the caller's memory."""
    mem = torch.zeros(1 << 16, dtype=torch.uint8)
    t = sample(torch.bfloat16, (4, 8), seed=3)
    assert store.put_tensor("h", t) == 0
    got = store.get_tensor_into("h", mem.data_ptr(), mem.numel())
    assert same(got, t) and got.data_ptr() == mem.data_ptr() + HEADER
    assert _inside(cpu_touches["addresses"], mem.data_ptr(), mem.numel())  # the fallback's memmove
    assert store.put_tensor_from("h2", mem.data_ptr(), HEADER + 64) == 0 and same(store.get_tensor("h2"), t)


# ---- CUDA --------------------------------------------------------------------------------------------------------

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn]
CUDA_SHAPES = [(), (0,), (7,), (2, 3, 4), (64, 1024)]


def _no_cpu_touch_of_device_memory(touches):
    assert [a for a in touches["addresses"] if _memory.address_device(a) is not None] == []
    assert set(touches["bytes_of"]) <= {"cpu"}


@needs_cuda
def test_cuda_address_classification():
    dev = torch.zeros(1024, device="cuda")
    where = f"cuda:{dev.device.index}"
    assert _memory.address_device(dev.data_ptr()) == where
    assert _memory.address_device(dev.data_ptr() + 100) == where
    assert _memory.address_device(torch.zeros(16).data_ptr()) is None
    assert _memory.address_device(torch.zeros(16, pin_memory=True).data_ptr()) is None  # pinned host memory
    # A thread that never used CUDA has no current context: the primary context is asked.
    seen = []
    th = threading.Thread(target=lambda: seen.append(_memory.address_device(dev.data_ptr())))
    th.start()
    th.join()
    assert seen == [where]
    span = _memory.span(dev.data_ptr(), 64, where)
    assert span.device == dev.device and span.data_ptr() == dev.data_ptr() and span.dtype == torch.uint8
    staging = _memory.host_staging(dev)
    assert staging.is_pinned() and staging.device.type == "cpu"


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=[str(d).removeprefix("torch.") for d in CUDA_DTYPES])
def test_cuda_put_get_round_trip(store, dtype, cpu_touches, staged):
    for i, shape in enumerate(CUDA_SHAPES):
        host = sample(dtype, shape, seed=i)
        dev = host.cuda()
        assert store.put_tensor(f"t{i}", dev) == 0
        got = store.get_tensor(f"t{i}")
        assert got.device.type == "cpu" and same(got, host)
        assert store.get(f"t{i}")[HEADER:] == raw_bytes(host)
    assert "cuda" in staged
    _no_cpu_touch_of_device_memory(cpu_touches)


@needs_cuda
def test_cuda_non_contiguous_and_batches(store, cpu_touches):
    base = sample(torch.float32, (8, 6), seed=4).cuda()
    views = [base.t(), base[::2], base[:, 1:5], torch.ones(1, 6, device="cuda").expand(4, 6)]
    for i, v in enumerate(views):
        assert store.put_tensor(f"v{i}", v) == 0
        assert same(store.get_tensor(f"v{i}"), v.cpu())
    keys = [f"b{i}" for i in range(len(views))]
    assert store.batch_put_tensor(keys, views) == [0] * len(views)
    assert store.batch_pub_tensor([k + "p" for k in keys], views, ReplicateConfig()) == [0] * len(views)
    for got, v in zip(store.batch_get_tensor(keys), views):
        assert same(got, v.cpu())
    assert store.upsert_tensor("v0", base) == 0 and same(store.get_tensor("v0"), base.cpu())
    _no_cpu_touch_of_device_memory(cpu_touches)


@needs_cuda
def test_cuda_tp_and_parallel_writes(store, cpu_touches):
    host = sample(torch.bfloat16, (4, 8), seed=5)
    dev = host.cuda()
    assert store.put_tensor_with_tp("tp", dev, tp_size=2, split_dim=1) == 0
    for r, part in enumerate(host.chunk(2, dim=1)):
        assert same(store.get_tensor_with_tp("tp", r, 2), part)
    for r in range(2):
        assert store.put_tensor_with_parallelism("wp", dev, writer_partition=Writer(r, 2, 0)) == 0
    assert same(store.get_tensor_with_parallelism("wp", target("full")), host)
    shard = dev[:, :4]
    assert store.put_tensor_with_parallelism("lp", shard, layout(axis("tp", 0, 2, 1))) == 0
    assert same(store.get_tensor("lp_tp_0"), shard.cpu())
    _no_cpu_touch_of_device_memory(cpu_touches)


@needs_cuda
@pytest.mark.parametrize("registered", [True, False], ids=["registered", "unregistered"])
def test_cuda_get_tensor_into_device_memory(store, registered, cpu_touches):
    host = sample(torch.float16, (32, 16), seed=6)
    assert store.put_tensor("k", host) == 0
    n = HEADER + host.numel() * 2
    dst = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    if registered:
        assert store.register_buffer(dst.data_ptr(), dst.numel()) == 0
    try:
        got = store.get_tensor_into("k", dst.data_ptr(), dst.numel())
        torch.cuda.synchronize()
        assert got is not None and got.device == dst.device and got.data_ptr() == dst.data_ptr() + HEADER
        assert same(got, host)
        assert raw_bytes(dst[:n]) == store.get("k")
        half = 1 << 19
        both = store.batch_get_tensor_into(["k", "k"], [dst.data_ptr(), dst.data_ptr() + half], [half, half])
        torch.cuda.synchronize()
        assert all(same(g, host) and g.device == dst.device for g in both)
        # And back out of device memory, as a whole object and as TP shards.
        assert store.put_tensor_from("back", dst.data_ptr(), n) == 0
        assert same(store.get_tensor("back"), host)
        assert store.put_tensor_with_tp_from("back", dst.data_ptr(), n, tp_size=2, split_dim=0) == 0
        assert same(store.get_tensor("back_tp_1"), host[16:])
        full = store.get_tensor_with_parallelism_into("k", dst.data_ptr(), dst.numel())
        torch.cuda.synchronize()
        assert same(full, host) and full.device == dst.device
    finally:
        if registered:
            store.unregister_buffer(dst.data_ptr())
    _no_cpu_touch_of_device_memory(cpu_touches)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32])
def test_cuda_pointers_through_put_from_and_get_into(store, dtype):
    src = sample(dtype, (1 << 18,), seed=7).cuda()
    dst = torch.zeros_like(src)
    nbytes = src.numel() * src.element_size()
    torch.cuda.synchronize()
    assert store.register_buffer(src.data_ptr(), nbytes) == 0
    assert store.register_buffer(dst.data_ptr(), nbytes) == 0
    try:
        assert store.put_from("p", src.data_ptr(), nbytes) == 0
        assert store.get("p") == raw_bytes(src)
        assert store.get_into("p", dst.data_ptr(), nbytes) == nbytes
        torch.cuda.synchronize()
        assert torch.equal(dst, src)
        half = nbytes // 2
        assert store.batch_put_from(["b0", "b1"], [src.data_ptr(), src.data_ptr() + half], [half, half]) == [0, 0]
        dst.zero_()
        torch.cuda.synchronize()
        got = store.batch_get_into(["b1", "b0"], [dst.data_ptr(), dst.data_ptr() + half], [half, half])
        torch.cuda.synchronize()
        assert got == [half, half]
        flat_src, flat_dst = src.view(torch.uint8), dst.view(torch.uint8)
        assert torch.equal(flat_dst[:half], flat_src[half:]) and torch.equal(flat_dst[half:], flat_src[:half])
    finally:
        store.unregister_buffer(src.data_ptr())
        store.unregister_buffer(dst.data_ptr())


@needs_cuda
def test_cuda_engine_register_and_transfer():
    a, b = TransferEngine(), TransferEngine()
    assert a.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    assert b.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    src = sample(torch.uint8, (4 << 20,), seed=8).cuda()
    dst = torch.zeros_like(src)
    back = torch.zeros_like(src)
    n = src.numel()
    torch.cuda.synchronize()
    seg = f"127.0.0.1:{b.get_rpc_port()}"
    try:
        assert a.register_memory(src.data_ptr(), n, "*") == 0
        assert b.register_memory(dst.data_ptr(), n, "*") == 0
        assert a.transfer_sync_write(seg, src.data_ptr(), dst.data_ptr(), n) == 0
        torch.cuda.synchronize()
        assert torch.equal(dst, src)
        # An unregistered GPU destination on the initiator's side is moved through the device as well.
        assert a.transfer_sync_read(seg, back.data_ptr(), dst.data_ptr(), n) == 0
        torch.cuda.synchronize()
        assert torch.equal(back, src)
    finally:
        a.unregister_memory(src.data_ptr())
        b.unregister_memory(dst.data_ptr())
        a.shutdown()
        b.shutdown()


@needs_cuda
def test_cuda_rpc_and_engram_stage_once(store):
    dev = sample(torch.float32, (3, 5), seed=9).cuda().t()
    meta, payload, keep = _rpc._tensor_parts(dev)
    assert meta == {"dtype": "float32", "shape": [5, 3]}
    assert bytes(payload) == raw_bytes(dev) and keep.device.type == "cpu" and keep.is_pinned()
    cfg = EngramStoreConfig()
    cfg.embedding_dim, cfg.table_vocab_sizes = 4, [8]
    table = sample(torch.float32, (8, 4), seed=10)
    e = EngramStore(0, cfg, store)
    e.populate([table.cuda()])
    rows = e.lookup([[[3], [7]]])
    assert rows.shape == (1, 2, 1, 4)
    assert rows[0, 0, 0].tobytes() == raw_bytes(table[3]) and rows[0, 1, 0].tobytes() == raw_bytes(table[7])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([os.path.abspath(__file__), "-q"]))
