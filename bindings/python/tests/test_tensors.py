"""The store's tensor methods (mooncake/_tensors.py) against a running master: round trips of every dtype and shape
the layout allows, the stored bytes (upstream's 304-byte metadata block, checked field by field here, independently
of the module's own encoder), the into/from forms over registered buffers, TP and parallel layouts, safetensors
files, and what bad input gives. Skipped when torch is not importable (scripts/setup_torch_venv.sh links it in).
"""

import ctypes
import struct

import pytest

torch = pytest.importorskip("torch")

from mooncake.store import (  # noqa: E402
    MooncakeDistributedStore,
    ParallelAxis,
    ReadTarget,
    ReplicateConfig,
    TensorParallelism,
)

INVALID_PARAMS = -600
FILE_NOT_FOUND = -1100
HEADER = 304

# Upstream's dtype codes.
DTYPES = [
    (torch.float32, 0),
    (torch.float64, 1),
    (torch.int8, 2),
    (torch.uint8, 3),
    (torch.int16, 4),
    (torch.uint16, 5),
    (torch.int32, 6),
    (torch.uint32, 7),
    (torch.int64, 8),
    (torch.uint64, 9),
    (torch.bool, 10),
    (torch.float16, 11),
    (torch.bfloat16, 12),
    (torch.float8_e4m3fn, 13),
    (torch.float8_e5m2, 14),
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4), (1, 2, 1, 2, 1, 2, 1, 2)]


def sample(dtype, shape, seed=0):
    """A tensor of `dtype` and `shape` with varied bytes."""
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
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a, b) -> bool:
    return a is not None and a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and raw_bytes(a) == raw_bytes(b)


def header_fields(raw: bytes) -> dict:
    """The metadata block of `raw`, read with offsets written out here."""
    magic, version, header_size, dtype, ndim, layout, flags, data_offset, data_bytes = struct.unpack_from(
        "<IHHiiIIQQ", raw, 0
    )
    g = struct.unpack_from("<8q", raw, 40)
    loc = struct.unpack_from("<8q", raw, 104)
    axis_count, reserved = struct.unpack_from("<II", raw, 168)
    axes = [struct.unpack_from("<6iq", raw, 176 + 32 * i) for i in range(axis_count)]
    return dict(
        magic=raw[:4],
        version=version,
        header_size=header_size,
        dtype=dtype,
        ndim=ndim,
        layout=layout,
        flags=flags,
        data_offset=data_offset,
        data_bytes=data_bytes,
        global_shape=g,
        local_shape=loc,
        axis_count=axis_count,
        reserved=reserved,
        axes=axes,
        unused_axes=raw[176 + 32 * axis_count : HEADER],
    )


def shape8(shape):
    return tuple(shape) + (-1,) * (8 - len(shape))


def axis(kind, rank, size, split_dim=None, expert_id=None, stage_id=None):
    a = ParallelAxis()
    a.kind, a.rank, a.size = kind, rank, size
    a.split_dim, a.expert_id, a.stage_id = split_dim, expert_id, stage_id
    return a


def layout(*axes):
    p = TensorParallelism()
    p.axes = list(axes)
    return p


def target(mode, parallelism=None):
    t = ReadTarget()
    t.mode = mode
    t.parallelism = parallelism
    return t


class Writer:
    def __init__(self, rank, size, split_dim):
        self.rank, self.size, self.split_dim = rank, size, split_dim


@pytest.fixture
def buf(store):
    """A 4 MiB torch-owned buffer registered with `store`: (address, size)."""
    mem = torch.zeros(4 << 20, dtype=torch.uint8)
    assert store.register_buffer(mem.data_ptr(), mem.numel()) == 0
    yield mem.data_ptr(), mem.numel()
    store.unregister_buffer(mem.data_ptr())
    del mem


# ---- round trips and bytes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,code", DTYPES, ids=[str(d).removeprefix("torch.") for d, _ in DTYPES])
def test_every_dtype_and_shape_round_trips(store, dtype, code):
    for i, shape in enumerate(SHAPES):
        t = sample(dtype, shape, seed=i)
        key = f"{code}/{i}"
        assert store.put_tensor(key, t) == 0
        got = store.get_tensor(key)
        assert same(got, t), (dtype, shape, got)
        raw = store.get(key)
        f = header_fields(raw)
        assert f["magic"] == b"NOOM" and f["version"] == 1 and f["header_size"] == HEADER
        assert (f["dtype"], f["ndim"], f["layout"], f["flags"]) == (code, len(shape), 0, 0)
        assert (f["data_offset"], f["data_bytes"]) == (HEADER, len(raw) - HEADER)
        assert f["global_shape"] == shape8(shape) and f["local_shape"] == shape8(shape)
        assert (f["axis_count"], f["reserved"]) == (0, 0) and f["unused_axes"] == bytes(128)
        assert raw[HEADER:] == raw_bytes(t)


def test_non_contiguous_and_special_inputs(store):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    cases = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.ones(3, 1).expand(3, 4),
        "grad": torch.ones(2, 2, requires_grad=True) * 2,
        "offset": base.reshape(-1)[5:11],
    }
    for key, t in cases.items():
        assert store.put_tensor(key, t) == 0, key
        assert same(store.get_tensor(key), t.detach().contiguous()), key


def test_get_tensor_owns_its_memory(store):
    assert store.put_tensor("own", torch.arange(4, dtype=torch.int64)) == 0
    a = store.get_tensor("own")
    a += 10
    assert store.get_tensor("own").tolist() == [0, 1, 2, 3]
    assert a.tolist() == [10, 11, 12, 13]


def test_large_tensor_read_into_fresh_memory(master):
    from mooncake import _tensors

    store = MooncakeDistributedStore()
    assert store.setup("127.0.0.1", "P2PHANDSHAKE", 160 << 20, 16 << 20, "tcp", "", master.address) == 0
    try:
        t = sample(torch.int32, ((_tensors.LARGE_OBJECT // 4) + 1024,), seed=5)
        assert store.put_tensor("large", t) == 0
        got = store.get_tensor("large")
        assert same(got, t)
        got[0] += 1  # writable memory of its own
        assert same(store.get_tensor("large"), t)
        assert store.put_parts("large_text", b"x" * (_tensors.LARGE_OBJECT + 10)) == 0
        assert store.get_tensor("large_text") is None
    finally:
        store.close()


def test_upsert_pub_and_batches(store):
    t1, t2 = torch.ones(3), torch.arange(5, dtype=torch.int16)
    assert store.batch_put_tensor(["b1", "b2"], [t1, t2]) == [0, 0]
    got = store.batch_get_tensor(["b1", "missing", "b2"])
    assert same(got[0], t1) and got[1] is None and same(got[2], t2)
    assert store.upsert_tensor("b1", t2) == 0 and same(store.get_tensor("b1"), t2)
    assert store.batch_upsert_tensor(["b1", "b3"], [t1, t1]) == [0, 0]
    assert same(store.get_tensor("b1"), t1) and same(store.get_tensor("b3"), t1)
    cfg = ReplicateConfig()
    assert store.pub_tensor("p1", t1, cfg) == 0 and same(store.get_tensor("p1"), t1)
    assert store.upsert_pub_tensor("p1", t2, cfg) == 0 and same(store.get_tensor("p1"), t2)
    assert store.batch_pub_tensor(["p2"], [t1], cfg) == [0]
    assert store.batch_upsert_pub_tensor(["p2", "p3"], [t2, t2], cfg) == [0, 0]
    assert same(store.get_tensor("p2"), t2)
    bad = ReplicateConfig()
    bad.preferred_segments = ["a", "b"]
    assert store.pub_tensor("p4", t1, bad) == INVALID_PARAMS
    assert store.batch_pub_tensor(["p4", "p5"], [t1, t1], bad) == [INVALID_PARAMS] * 2
    assert store.is_exist("p4") == 0


# ---- bad input -----------------------------------------------------------------------------------------------


def test_refused_tensors(store):
    assert store.put_tensor("c", torch.zeros(2, dtype=torch.complex64)) == INVALID_PARAMS
    assert store.put_tensor("nine", torch.zeros([1] * 9)) == INVALID_PARAMS
    assert store.put_tensor("list", [1, 2]) == INVALID_PARAMS
    assert store.put_tensor("np", object()) == INVALID_PARAMS
    assert store.is_exist("c") == 0 and store.is_exist("nine") == 0
    with pytest.raises(TypeError):
        store.put_tensor(1, torch.ones(1))
    with pytest.raises(TypeError):
        store.batch_put_tensor(["a"], (torch.ones(1),))
    assert store.batch_put_tensor(["a", "b"], [torch.ones(1)]) == [INVALID_PARAMS] * 2
    assert store.batch_put_tensor([], []) == []
    assert store.batch_put_tensor(["x", "y"], [torch.ones(1), torch.zeros(1, dtype=torch.complex128)]) == [
        0,
        INVALID_PARAMS,
    ]


def _with(raw: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_objects_that_are_not_tensors_read_as_none(store):
    assert store.put_tensor("good", torch.arange(6, dtype=torch.float32).reshape(2, 3)) == 0
    good = store.get("good")
    bad = {
        "text": b"hello world" * 40,
        "short": good[:100],
        "truncated": good[:-4],
        "longer": good + b"\0" * 4,
        "newer_version": _with(good, 4, "<H", 2),
        "other_header_size": _with(good, 6, "<H", 320),
        "bad_magic": b"MOON" + good[4:],
        "dtype_15": _with(good, 8, "<i", 15),
        "dtype_negative": _with(good, 8, "<i", -1),
        "ndim_9": _with(good, 12, "<i", 9),
        "layout_2": _with(good, 16, "<I", 2),
        "data_bytes": _with(good, 32, "<Q", 20),
        "data_offset": _with(good, 24, "<Q", 300),
        "unused_dim_set": _with(good, 40 + 8 * 2, "<q", 1),
        "negative_dim": _with(_with(good, 40, "<q", -2), 104, "<q", -2),
        "shape_vs_bytes": _with(_with(good, 40, "<q", 3), 104, "<q", 3),
        "axis_count_5": _with(good, 168, "<I", 5),
        "bad_axis": _with(_with(good, 168, "<I", 1), 176 + 12, "<i", 0),
    }
    for key, value in bad.items():
        assert store.put(key, value) == 0, key
    for key in bad:
        assert store.get_tensor(key) is None, key
    assert store.batch_get_tensor(list(bad)) == [None] * len(bad)
    assert store.get_tensor("never-stored") is None


def test_cuda_reads_are_refused_like_upstreams_real_client(store):
    assert store.put_tensor("cu", torch.ones(2)) == 0
    assert store.get_tensor_into_cuda("cu", torch.zeros(2)) == INVALID_PARAMS
    assert store.batch_get_tensor_into_cuda(["cu", "cu"], [torch.zeros(2), torch.zeros(2)]) == [INVALID_PARAMS] * 2


# ---- into / from registered buffers ---------------------------------------------------------------------------


def test_get_tensor_into_and_put_tensor_from(store, buf):
    addr, size = buf
    t = sample(torch.bfloat16, (16, 8), seed=3)
    assert store.put_tensor("src", t) == 0
    got = store.get_tensor_into("src", addr, size)
    assert same(got, t) and got.data_ptr() == addr + HEADER
    assert ctypes.string_at(addr, HEADER + t.numel() * 2) == store.get("src")
    assert store.get_tensor_into("src", addr, HEADER + 10) is None
    assert store.get_tensor_into("missing", addr, size) is None
    n = HEADER + t.numel() * 2
    assert store.put_tensor_from("copy", addr, n) == 0 and same(store.get_tensor("copy"), t)
    assert store.upsert_tensor_from("copy", addr, n) == 0
    assert store.put_tensor_from("bad", addr, n - 1) == INVALID_PARAMS
    assert store.put_tensor_from("bad", addr, 100) == INVALID_PARAMS
    assert store.is_exist("bad") == 0


def test_batch_into_and_from(store, buf):
    addr, _ = buf
    a, b = torch.arange(10, dtype=torch.int32), sample(torch.float64, (3, 3), seed=1)
    assert store.batch_put_tensor(["a", "b"], [a, b]) == [0, 0]
    half = 1 << 20
    got = store.batch_get_tensor_into(["a", "b", "zz"], [addr, addr + half, addr + 2 * half], [half] * 3)
    assert same(got[0], a) and same(got[1], b) and got[2] is None
    assert store.batch_get_tensor_into(["a"], [addr, addr], [half]) == [INVALID_PARAMS]
    sizes = [HEADER + 40, HEADER + 72]
    assert store.batch_put_tensor_from(["a2", "b2"], [addr, addr + half], sizes) == [0, 0]
    assert same(store.get_tensor("a2"), a) and same(store.get_tensor("b2"), b)
    assert store.batch_upsert_tensor_from(["a2"], [addr + half], [sizes[1]]) == [0]
    assert same(store.get_tensor("a2"), b)
    # One invalid buffer fails the whole batch, as upstream's.
    assert store.batch_put_tensor_from(["a3", "b3"], [addr, addr + half], [sizes[0], 10]) == [INVALID_PARAMS] * 2
    assert store.batch_put_tensor_from(["a3", "b3"], [addr], sizes) == [INVALID_PARAMS] * 2
    assert store.is_exist("a3") == 0


def test_into_unregistered_memory(store):
    mem = torch.zeros(4096, dtype=torch.uint8)
    t = torch.arange(8, dtype=torch.float32)
    assert store.put_tensor("u", t) == 0
    got = store.get_tensor_into("u", mem.data_ptr(), mem.numel())
    assert same(got, t) and got.data_ptr() == mem.data_ptr() + HEADER
    assert store.put_tensor_from("u2", mem.data_ptr(), HEADER + 32) == 0
    assert same(store.get_tensor("u2"), t)


# ---- tensor parallelism --------------------------------------------------------------------------------------


def test_put_tensor_with_tp_splits_every_rank(store):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert store.put_tensor_with_tp("w", t, tp_rank=1, tp_size=3, split_dim=1) == 0
    assert store.is_exist("w") == 0
    shards = []
    for r in range(3):
        raw = store.get(f"w_tp_{r}")
        f = header_fields(raw)
        assert (f["layout"], f["axis_count"]) == (1, 1)
        assert f["global_shape"] == shape8((4, 6)) and f["local_shape"] == shape8((4, 2))
        assert f["axes"] == [(1, 0, r, 3, 1, 0, 2)]
        shard = store.get_tensor_with_tp("w", tp_rank=r, tp_size=3, split_dim=1)
        assert same(shard, t[:, 2 * r : 2 * r + 2])
        shards.append(shard)
    assert torch.equal(torch.cat(shards, 1), t)
    assert store.get_tensor_with_tp("w", 0, 1) is None  # tp_size 1 reads the key itself
    got = store.batch_get_tensor_with_tp(["w", "nope"], tp_rank=2, tp_size=3)
    assert same(got[0], t[:, 4:]) and got[1] is None


def test_tp_refusals_and_whole_tensor(store):
    assert store.put_tensor_with_tp("u", torch.arange(5.0), 0, 2, 0) == INVALID_PARAMS  # not uniform
    assert store.put_tensor_with_tp("u", torch.arange(4.0), 0, 2, 1) == INVALID_PARAMS  # split_dim out of range
    assert store.put_tensor_with_tp("u", torch.tensor(1.0), 0, 2, 0) == INVALID_PARAMS  # 0-d
    assert store.put_tensor_with_tp("u", torch.zeros(2, dtype=torch.complex64), 0, 2, 0) == INVALID_PARAMS
    assert store.is_exist("u_tp_0") == 0
    assert store.put_tensor_with_tp("whole", torch.ones(3), 0, 1) == 0
    assert same(store.get_tensor("whole"), torch.ones(3))
    assert store.pub_tensor_with_tp("pw", torch.ones(4, 2), ReplicateConfig(), 0, 2, 0) == 0
    assert same(store.get_tensor("pw_tp_1"), torch.ones(2, 2))
    assert store.batch_put_tensor_with_tp(["b1", "b2"], [torch.ones(2), torch.ones(3)], 0, 2) == [0, INVALID_PARAMS]
    assert store.batch_pub_tensor_with_tp(["b3"], [torch.ones(2)], ReplicateConfig(), 0, 2) == [0]
    assert store.batch_put_tensor_with_tp(["b4", "b5"], [torch.ones(2)], 0, 2) == [INVALID_PARAMS] * 2


def test_tp_into_and_from(store, buf):
    addr, _ = buf
    t = torch.arange(16, dtype=torch.int64).reshape(8, 2)
    assert store.put_tensor("full", t) == 0
    n = HEADER + t.numel() * 8
    got = store.get_tensor_into("full", addr, n)
    assert same(got, t)
    assert store.put_tensor_with_tp_from("tf", addr, n, 0, 4, 0) == 0
    for r in range(4):
        assert same(store.get_tensor(f"tf_tp_{r}"), t[2 * r : 2 * r + 2])
    assert header_fields(store.get("tf_tp_3"))["axes"] == [(1, 0, 3, 4, 0, 0, 2)]
    assert store.put_tensor_with_tp_from("tf2", addr, n, 0, 3, 0) == INVALID_PARAMS
    assert store.put_tensor_with_tp_from("tf3", addr, n, 0, 1, 0) == 0 and same(store.get_tensor("tf3"), t)
    assert store.batch_put_tensor_with_tp_from(["tf4"], [addr], [n], 0, 2, 1) == [0]
    assert same(store.get_tensor("tf4_tp_1"), t[:, 1:])
    half = 1 << 20
    shard = store.get_tensor_with_tp_into("tf", addr + half, half, tp_rank=2, tp_size=4)
    assert same(shard, t[4:6]) and shard.data_ptr() == addr + half + HEADER
    got = store.batch_get_tensor_with_tp_into(["tf", "tf"], [addr, addr + half], [half, half], 1, 4)
    assert same(got[0], t[2:4]) and same(got[1], t[2:4])
    assert store.batch_get_tensor_with_tp_into(["tf"], [addr, addr], [half], 1, 4) == [INVALID_PARAMS]


# ---- general parallel layouts --------------------------------------------------------------------------------


def test_request_types():
    a = ParallelAxis()
    assert (a.kind, a.rank, a.size, a.split_dim, a.expert_id, a.stage_id) == ("", 0, 1, None, None, None)
    with pytest.raises(TypeError):
        a.rank = "1"
    with pytest.raises(TypeError):
        a.kind = 3
    p = TensorParallelism()
    assert p.axes == []
    p.axes = [axis("tp", 0, 2, 0)]
    p.axes.append(axis("dp", 0, 2))  # a copy, as upstream's
    assert len(p.axes) == 1 and p.axes[0].kind == "tp"
    with pytest.raises(TypeError):
        p.axes = [1]
    r = ReadTarget()
    assert (r.mode, r.parallelism) == ("as_stored", None)
    r.mode = "FULL"
    assert r.mode == "full"
    with pytest.raises(RuntimeError):
        r.mode = "sideways"


def test_lone_tp_axis_writes_this_ranks_shard(store):
    full = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    for r in range(3):
        assert store.put_tensor_with_parallelism("a", full[2 * r : 2 * r + 2], layout(axis("tp", r, 3, 0))) == 0
    f = header_fields(store.get("a_tp_1"))
    assert f["global_shape"] == shape8((6, 2)) and f["local_shape"] == shape8((2, 2))
    assert f["axes"] == [(1, 0, 1, 3, 0, 0, 2)]
    manifest = store.get("a__parallelism_manifest")
    assert len(manifest) == 96
    assert struct.unpack_from("<IHHiiiii", manifest) == (0x574D414E, 1, 96, 0, 2, 0, 3, 0)
    assert struct.unpack_from("<8q", manifest, 32) == shape8((6, 2))
    assert same(store.get_tensor_with_parallelism("a", target("full", layout(axis("tp", 0, 3, 0)))), full)
    assert same(store.get_tensor_with_parallelism("a", target("shard", layout(axis("tp", 2, 3, 0)))), full[4:])
    assert store.get_tensor_with_parallelism("a", target("shard", layout(axis("tp", 2, 3, 1)))) is None
    assert store.get_tensor_with_parallelism("a") is None  # nothing under the key itself
    assert same(store.get_tensor_with_tp("a", 1, 3), full[2:4])


def test_multi_axis_layouts(store):
    full = torch.arange(16, dtype=torch.int32).reshape(4, 4)
    dp_tp = [layout(axis("tp", r, 2, 1), axis("dp", 1, 2)) for r in range(2)]
    for p in dp_tp:
        assert store.put_tensor_with_parallelism("m", full, p) == 0
    for r in range(2):
        key = f"m__dp_1of2__tp_{r}of2_sd1"
        f = header_fields(store.get(key))
        assert f["global_shape"] == shape8((4, 4)) and f["local_shape"] == shape8((4, 2))
        assert f["axes"] == [(1, 0, r, 2, 1, 0, 2), (0, 1, 1, 2, -1, 0, 0)]
    got = store.get_tensor_with_parallelism("m", target("full", layout(axis("dp", 1, 2), axis("tp", 0, 2, 1))))
    assert same(got, full)
    shard = store.get_tensor_with_parallelism("m", target("shard", dp_tp[1]))
    assert same(shard, full[:, 2:])
    # DP only: stored as given; EP and PP keep their ids.
    assert store.put_tensor_with_parallelism("d", full, layout(axis("dp", 0, 2))) == 0
    assert header_fields(store.get("d__dp_0of2"))["axes"] == [(0, 0, 0, 2, -1, 0, 0)]
    assert store.put_tensor_with_parallelism("e", full, layout(axis("pp", 1, 4, stage_id=2), axis("ep", 0, 1, expert_id=7))) == 0
    assert header_fields(store.get("e__ep_0of1_eid7__pp_1of4_sid2"))["axes"] == [
        (3, 0, 1, 4, -1, 2, 0),
        (2, 1, 0, 1, -1, 7, 0),
    ]
    ep = layout(axis("ep", 0, 1, expert_id=7), axis("pp", 1, 4, stage_id=2))
    assert same(store.get_tensor_with_parallelism("e", target("shard", ep)), full)
    assert store.get_tensor_with_parallelism("e", target("full", ep)) is None  # no TP axis to rebuild along
    assert store.put_tensor_with_parallelism("plain", full) == 0 and same(store.get_tensor("plain"), full)


def test_parallel_requests_refused(store):
    t = torch.ones(4, 2)
    bad = [
        layout(),
        layout(axis("xx", 0, 2, 0)),
        layout(axis("tp", 0, 2)),
        layout(axis("tp", 2, 2, 0)),
        layout(axis("tp", 0, 0, 0)),
        layout(axis("dp", 0, 2, 0)),
        layout(axis("ep", 0, 2)),
        layout(axis("pp", 0, 2)),
        layout(axis("tp", 0, 2, 0), axis("TP", 1, 2, 0)),
        layout(axis("tp", 0, 2, 5)),
        layout(axis("dp", 0, 2), axis("tp", 0, 3, 0)),  # 4 rows do not split in 3
    ]
    for i, p in enumerate(bad):
        assert store.put_tensor_with_parallelism(f"r{i}", t, p) == INVALID_PARAMS, i
    assert store.put_tensor_with_parallelism("r", t, layout(axis("tp", 0, 2, 0)), ReplicateConfig(), Writer(0, 2, 0)) == INVALID_PARAMS
    assert store.put_tensor_with_parallelism("r", t, None, ReplicateConfig(), Writer(2, 2, 0)) == INVALID_PARAMS
    assert store.put_tensor_with_parallelism("r", t, None, ReplicateConfig(), object()) == INVALID_PARAMS
    assert store.batch_put_tensor_with_parallelism(["x", "y"], [t, t], [layout(axis("dp", 0, 2))]) == [INVALID_PARAMS] * 2
    assert store.batch_put_tensor_with_parallelism(["x"], [t], [None], None, [Writer(0, 1, 0)]) == [INVALID_PARAMS]
    assert store.get_tensor_with_parallelism("r", target("shard")) is None
    assert store.batch_get_tensor_with_parallelism(["r"], [None, None]) == [None]
    assert store.batch_get_tensor_with_parallelism(["r"], (None,)) == [None]


def test_writer_partitions(store):
    full = torch.arange(24, dtype=torch.float16).reshape(2, 12)
    for r in range(3):
        assert store.put_tensor_with_parallelism("w", full, None, ReplicateConfig(), Writer(r, 3, 1)) == 0
    f = header_fields(store.get("w__writer_2of3_sd1"))
    assert f["local_shape"] == shape8((2, 4)) and f["axes"] == [(1, 0, 2, 3, 1, 0, 4)]
    assert struct.unpack_from("<IHHiiiii", store.get("w__writer_manifest")) == (0x574D414E, 1, 96, 11, 2, 1, 3, 0)
    assert same(store.get_tensor_with_parallelism("w", target("full")), full)
    assert same(store.get_tensor_with_parallelism("w", target("shard", layout(axis("tp", 1, 3, 1)))), full[:, 4:8])
    # Without a manifest a full read is a plain read of the key.
    assert store.put_tensor("solo", full) == 0
    assert same(store.get_tensor_with_parallelism("solo", target("full")), full)
    got = store.batch_upsert_tensor_with_parallelism(["w"], [full], None, None, [Writer(0, 3, 1)])
    assert got == [0]


def test_parallel_into_and_from(store, buf):
    addr, _ = buf
    half = 1 << 20
    full = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    assert store.put_tensor("f", full) == 0
    n = HEADER + 32
    assert same(store.get_tensor_into("f", addr, half), full)
    # From a buffer the object is the whole tensor: a TP request writes every shard.
    assert store.put_tensor_with_parallelism_from("g", addr, n, layout(axis("tp", 1, 2, 0))) == 0
    assert same(store.get_tensor("g_tp_0"), full[:2]) and same(store.get_tensor("g_tp_1"), full[2:])
    assert store.is_exist("g__parallelism_manifest") == 0
    assert store.upsert_tensor_with_parallelism_from("h", addr, n, layout(axis("dp", 0, 2))) == 0
    assert same(store.get_tensor("h__dp_0of2"), full)
    assert store.put_tensor_with_parallelism_from("k", addr, n, None, ReplicateConfig(), Writer(1, 2, 1)) == 0
    assert same(store.get_tensor("k__writer_1of2_sd1"), full[:, 1:])
    assert store.put_tensor_with_parallelism_from("bad", addr, n - 1, layout(axis("dp", 0, 2))) == INVALID_PARAMS
    assert store.batch_put_tensor_with_parallelism_from(["p1", "p2"], [addr, addr], [n, n]) == [0, 0]
    assert store.batch_upsert_tensor_with_parallelism_from(["p1"], [addr], [n], [layout(axis("dp", 1, 2))]) == [0]
    assert same(store.get_tensor("p1__dp_1of2"), full)
    # Reads into the buffer.
    t2 = target("full", layout(axis("tp", 0, 2, 0)))
    got = store.get_tensor_with_parallelism_into("g", addr + half, half, t2)
    assert same(got, full) and got.data_ptr() == addr + half + HEADER
    assert store.get_tensor_with_parallelism_into("g", addr + half, HEADER + 8, t2) is None
    shard = store.get_tensor_with_parallelism_into("g", addr + half, half, target("shard", layout(axis("tp", 1, 2, 0))))
    assert same(shard, full[2:])
    got = store.batch_get_tensor_with_parallelism_into(["g", "f"], [addr + half, addr + 2 * half], [half, half], [t2, None])
    assert same(got[0], full) and same(got[1], full)
    assert same(store.batch_get_tensor_with_parallelism_into(["f"], [addr + half], [half])[0], full)


# ---- safetensors ---------------------------------------------------------------------------------------------


def test_safetensors_round_trip(store, tmp_path):
    pytest.importorskip("safetensors")
    t = sample(torch.bfloat16, (3, 5), seed=9)
    assert store.put_tensor("st", t) == 0
    path = str(tmp_path / "one.safetensors")
    assert store.save_tensor_to_safetensor("st", path) == 0
    assert store.save_tensor_to_safetensor("nothing", str(tmp_path / "x.safetensors")) == FILE_NOT_FOUND
    assert store.save_tensor_to_safetensor("st", str(tmp_path / "no" / "dir.safetensors")) == INVALID_PARAMS
    loaded = store.load_tensor_from_safetensor("st2", path)  # "st2" is not in the file: its first entry is used
    assert same(loaded, t) and same(store.get_tensor("st2"), t)
    loaded = store.load_tensor_from_safetensor(file_name=path)  # the key defaults to the file name
    assert same(loaded, t) and same(store.get_tensor(path), t)
    assert store.load_tensor_from_safetensor("z", str(tmp_path / "missing.safetensors")) is None
    with pytest.raises(TypeError):
        store.load_tensor_from_safetensor("z")


# ---- the codec on its own ------------------------------------------------------------------------------------


def test_codec_matches_the_written_layout():
    from mooncake import _tensors

    assert _tensors.METADATA_SIZE == HEADER and _tensors.MANIFEST_SIZE == 96
    block = _tensors.encode_metadata(12, (4, 6), (4, 2), 16, 1, [(1, 2, 3, 1, None, None)])
    f = header_fields(block)
    assert (f["dtype"], f["ndim"], f["layout"], f["data_bytes"]) == (12, 2, 1, 16)
    assert f["axes"] == [(1, 0, 2, 3, 1, 0, 2)]
    meta = _tensors.decode_metadata(block + bytes(16), HEADER + 16)
    assert meta.dtype == torch.bfloat16 and meta.local_shape == (4, 2) and meta.global_shape == (4, 6)
    assert _tensors.decode_metadata(block, HEADER) is None  # data bytes missing
    assert _tensors.parallelism_key("k", [(1, 0, 2, 0, None, None)]) == "k_tp_0"
    assert _tensors.parallelism_key("k", [(3, 1, 2, None, None, 4), (1, 0, 2, 0, None, None)]) == "k__tp_0of2_sd0__pp_1of2_sid4"
    assert _tensors.tensor_from_bytes(b"\0" * 400) is None
    store = MooncakeDistributedStore()
    assert isinstance(store, _tensors._TensorMethods)
