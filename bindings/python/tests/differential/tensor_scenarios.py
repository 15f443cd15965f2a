"""Tensor scenarios run under both wheels (ours and upstream's) by test_differential_tensors.py, which compares what
they report, case by case.

    python tensor_scenarios.py NAME      # prints one JSON object per line: {"case": ..., "result": ...}

A tensor is reported as ["tensor", dtype name, shape, hex of its bytes]; everything else as scenarios.py reports
it. Every store scenario starts this interpreter's own mooncake_master (scenarios.with_master). The two packages
cannot share a master, so reads across packages go through raw bytes: `tensor_export` writes the raw objects its
package stored to the JSON file named by MOONCAKE_TENSOR_XFER_OUT, and `tensor_import` stores the raw objects of the
file named by MOONCAKE_TENSOR_XFER_IN with plain `put` and reads them back with the tensor methods.
"""

import ctypes
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenarios import case, with_master  # noqa: E402

import torch  # noqa: E402

HEADER = 304


def describe(v):
    """A tensor (or a list of them) in a form JSON carries; other values unchanged."""
    if isinstance(v, torch.Tensor):
        t = v.detach().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return ["tensor", str(t.dtype).removeprefix("torch."), list(t.shape), data.hex()]
    if isinstance(v, list) and any(isinstance(x, torch.Tensor) for x in v):
        return [describe(x) for x in v]
    return v


def tcase(name, fn):
    """`case` for calls that may return tensors."""
    return case(name, lambda: describe(fn()))


def pattern(dtype, shape, seed=0):
    """The same bytes under either wheel's python (same torch): a byte ramp reinterpreted as `dtype`."""
    n = 1
    for d in shape:
        n *= d
    size = torch.empty(0, dtype=dtype).element_size()
    raw = (torch.arange(n * size, dtype=torch.int64) * 37 + seed * 11) % 251
    raw = raw.to(torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


DTYPES = [
    "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool",
    "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
]  # fmt: skip
SHAPES = {"scalar": (), "empty": (0,), "empty2d": (2, 0), "vector": (5,), "matrix": (2, 3), "8d": (1, 2, 1, 1, 2, 1, 1, 2)}


def tensors():
    """(key, tensor) for every dtype and shape, the set both wheels store and read."""
    out = []
    for i, name in enumerate(DTYPES):
        for label, shape in SHAPES.items():
            out.append((f"{name}/{label}", pattern(getattr(torch, name), shape, seed=i)))
    return out


def setup(m):
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    rc = s.setup("localhost", m.metadata, 256 << 20, 64 << 20, "tcp", "", m.address)
    assert rc == 0, f"setup: {rc}"
    return s


def axis(kind, rank, size, split_dim=None, expert_id=None, stage_id=None):
    from mooncake.store import ParallelAxis

    a = ParallelAxis()
    a.kind, a.rank, a.size = kind, rank, size
    if split_dim is not None:
        a.split_dim = split_dim
    if expert_id is not None:
        a.expert_id = expert_id
    if stage_id is not None:
        a.stage_id = stage_id
    return a


def layout(*axes):
    from mooncake.store import TensorParallelism

    p = TensorParallelism()
    p.axes = list(axes)
    return p


def target(mode, parallelism=None):
    from mooncake.store import ReadTarget

    t = ReadTarget()
    t.mode = mode
    if parallelism is not None:
        t.parallelism = parallelism
    return t


class Writer:
    def __init__(self, rank, size, split_dim):
        self.rank, self.size, self.split_dim = rank, size, split_dim


def patched(raw: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# ---- scenarios -------------------------------------------------------------------------------------------------


def tensor_bytes():
    """Every dtype and shape: put_tensor's code, the raw object `get` returns, and get_tensor's tensor."""

    def run(m):
        s = setup(m)
        for key, t in tensors():
            case(f"put {key}", lambda: s.put_tensor(key, t))
            case(f"raw {key}", lambda: s.get(key))
            tcase(f"get {key}", lambda: s.get_tensor(key))
        keys = [k for k, _ in tensors()][1:6] + ["missing"]  # no 0-d tensor: see ZERO_D_WHY
        tcase("batch_get", lambda: s.batch_get_tensor(keys))
        special = {
            "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
            "strided": torch.arange(20, dtype=torch.int16)[::3],
            "requires_grad": torch.ones(2, 2, requires_grad=True),
        }
        for key, t in special.items():
            case(f"put {key}", lambda: s.put_tensor(key, t))
            case(f"raw {key}", lambda: s.get(key))
        case("upsert", lambda: s.upsert_tensor("float32/vector", torch.zeros(2)))
        tcase("get after upsert", lambda: s.get_tensor("float32/vector"))
        case("batch_upsert", lambda: s.batch_upsert_tensor(["float32/vector", "u2"], [torch.ones(1), torch.ones(2)]))
        tcase("get after batch_upsert", lambda: s.batch_get_tensor(["float32/vector", "u2"]))
        from mooncake.store import ReplicateConfig

        case("pub", lambda: s.pub_tensor("pub", torch.ones(3), ReplicateConfig()))
        case("upsert_pub", lambda: s.upsert_pub_tensor("pub", torch.zeros(3), ReplicateConfig()))
        case("batch_pub", lambda: s.batch_pub_tensor(["pub2"], [torch.ones(1)], ReplicateConfig()))
        case("batch_upsert_pub", lambda: s.batch_upsert_pub_tensor(["pub2", "pub3"], [torch.ones(2)] * 2, ReplicateConfig()))
        tcase("get pubs", lambda: s.batch_get_tensor(["pub", "pub2", "pub3"]))
        s.close()

    with_master(run)


def tensor_bad_input():
    """What refused tensors, foreign bytes and malformed headers give."""
    from mooncake.store import ReplicateConfig

    def run(m):
        s = setup(m)
        case("complex64", lambda: s.put_tensor("c", torch.zeros(2, dtype=torch.complex64)))
        case("9 dims", lambda: s.put_tensor("n", torch.zeros([1] * 9)))
        case("list", lambda: s.put_tensor("l", [1, 2]))
        case("int key", lambda: s.put_tensor(1, torch.ones(1)))
        case("batch lengths", lambda: s.batch_put_tensor(["a", "b"], [torch.ones(1)]))
        case("batch empty", lambda: s.batch_put_tensor([], []))
        case("batch tuple", lambda: s.batch_put_tensor(["a"], (torch.ones(1),)))
        case("batch one bad", lambda: s.batch_put_tensor(["x", "y"], [torch.ones(1), torch.zeros(1, dtype=torch.complex128)]))
        bad_cfg = ReplicateConfig()
        bad_cfg.preferred_segments = ["a", "b"]
        case("pub bad config", lambda: s.pub_tensor("p", torch.ones(1), bad_cfg))
        case("put good", lambda: s.put_tensor("good", torch.arange(6, dtype=torch.float32).reshape(2, 3)))
        good = s.get("good")
        bad = {
            "text": b"hello world" * 40,
            "short": good[:100],
            "truncated": good[:-4],
            "longer": good + b"\0" * 4,
            "newer version": patched(good, 4, "<H", 2),
            "header size": patched(good, 6, "<H", 320),
            "magic": b"MOON" + good[4:],
            "dtype 15": patched(good, 8, "<i", 15),
            "ndim 9": patched(good, 12, "<i", 9),
            "layout 2": patched(good, 16, "<I", 2),
            "data bytes": patched(good, 32, "<Q", 20),
            "axis count 5": patched(good, 168, "<I", 5),
        }
        for key, value in bad.items():
            case(f"put raw {key}", lambda: s.put(key, value))
            tcase(f"get_tensor {key}", lambda: s.get_tensor(key))
        tcase("batch_get bad", lambda: s.batch_get_tensor(list(bad)))
        case("cuda", lambda: s.get_tensor_into_cuda("good", torch.zeros(6)))
        case("batch cuda", lambda: s.batch_get_tensor_into_cuda(["good", "good"], [torch.zeros(6)] * 2))
        s.close()

    with_master(run)


def tensor_parallel():
    """TP splits and parallel layouts: codes, which keys exist, the raw shards and manifests, and the reads."""

    def run(m):
        s = setup(m)
        x = pattern(torch.float32, (4, 6))

        def exists(base):
            names = [base, f"{base}_tp_0", f"{base}_tp_1", f"{base}_tp_2", f"{base}__parallelism_manifest",
                     f"{base}__writer_manifest", f"{base}__writer_0of2_sd0", f"{base}__writer_1of2_sd1",
                     f"{base}__dp_1of2", f"{base}__dp_1of2__tp_0of2_sd1", f"{base}__dp_1of2__tp_1of2_sd1",
                     f"{base}__ep_0of1_eid3__pp_1of2_sid4", f"{base}__tp_1of2_sd0__ep_0of2_eid5"]  # fmt: skip
            return [n for n in names if s.is_exist(n) == 1]

        case("tp put", lambda: s.put_tensor_with_tp("t", x, 1, 3, 1))
        case("tp keys", lambda: exists("t"))
        for r in range(3):
            case(f"tp raw {r}", lambda: s.get(f"t_tp_{r}"))
            tcase(f"tp get {r}", lambda: s.get_tensor_with_tp("t", r, 3, 1))
        tcase("tp batch get", lambda: s.batch_get_tensor_with_tp(["t", "none"], 2, 3))
        case("tp uneven", lambda: s.put_tensor_with_tp("u", x, 0, 4, 1))
        case("tp split out of range", lambda: s.put_tensor_with_tp("u", x, 0, 2, 2))
        case("tp size 1", lambda: s.put_tensor_with_tp("one", x, 0, 1, 0))
        case("tp size 1 keys", lambda: exists("one"))
        case("tp batch", lambda: s.batch_put_tensor_with_tp(["b1", "b2"], [x, torch.ones(3)], 0, 2, 0))
        from mooncake.store import ReplicateConfig

        case("pub tp", lambda: s.pub_tensor_with_tp("pt", x, ReplicateConfig(), 0, 2, 0))
        case("batch pub tp", lambda: s.batch_pub_tensor_with_tp(["pt2"], [x], ReplicateConfig(), 0, 2, 1))
        tcase("pub tp shard", lambda: s.get_tensor("pt2_tp_1"))

        for r in range(2):
            case(f"lone tp rank {r}", lambda: s.put_tensor_with_parallelism("a", x[2 * r : 2 * r + 2], layout(axis("tp", r, 2, 0))))
        case("lone tp keys", lambda: exists("a"))
        case("lone tp raw 1", lambda: s.get("a_tp_1"))
        case("lone tp manifest", lambda: s.get("a__parallelism_manifest"))
        tcase("lone tp full", lambda: s.get_tensor_with_parallelism("a", target("full", layout(axis("tp", 0, 2, 0)))))
        tcase("lone tp shard", lambda: s.get_tensor_with_parallelism("a", target("shard", layout(axis("tp", 1, 2, 0)))))
        tcase("lone tp as stored", lambda: s.get_tensor_with_parallelism("a"))
        for r in range(2):
            case(f"dp+tp rank {r}", lambda: s.put_tensor_with_parallelism("b", x, layout(axis("tp", r, 2, 1), axis("dp", 1, 2))))
        case("dp+tp keys", lambda: exists("b"))
        case("dp+tp raw", lambda: s.get("b__dp_1of2__tp_1of2_sd1"))
        case("dp+tp manifest", lambda: s.get("b__parallelism_manifest"))
        tcase("dp+tp full", lambda: s.get_tensor_with_parallelism("b", target("full", layout(axis("dp", 1, 2), axis("tp", 1, 2, 1)))))
        tcase("dp+tp shard", lambda: s.get_tensor_with_parallelism("b", target("shard", layout(axis("tp", 0, 2, 1), axis("dp", 1, 2)))))
        tcase("as stored with parallelism", lambda: s.get_tensor_with_parallelism("b", target("as_stored", layout(axis("dp", 1, 2)))))
        case("dp", lambda: s.put_tensor_with_parallelism("c", x, layout(axis("dp", 1, 2))))
        case("dp keys", lambda: exists("c"))
        case("dp raw", lambda: s.get("c__dp_1of2"))
        case("ep+pp", lambda: s.put_tensor_with_parallelism("d", x, layout(axis("pp", 1, 2, stage_id=4), axis("ep", 0, 1, expert_id=3))))
        case("ep+pp raw", lambda: s.get("d__ep_0of1_eid3__pp_1of2_sid4"))
        case("tp+ep", lambda: s.put_tensor_with_parallelism("e", x, layout(axis("ep", 0, 2, expert_id=5), axis("tp", 1, 2, 0))))
        case("tp+ep raw", lambda: s.get("e__tp_1of2_sd0__ep_0of2_eid5"))
        for r in range(2):
            case(f"writer {r}", lambda: s.put_tensor_with_parallelism("w", x, None, ReplicateConfig(), Writer(r, 2, 0)))
        case("writer keys", lambda: exists("w"))
        case("writer raw", lambda: s.get("w__writer_0of2_sd0"))
        case("writer manifest", lambda: s.get("w__writer_manifest"))
        tcase("writer full", lambda: s.get_tensor_with_parallelism("w", target("full")))
        tcase("writer shard", lambda: s.get_tensor_with_parallelism("w", target("shard", layout(axis("tp", 1, 2, 0)))))
        case("plain", lambda: s.put_tensor_with_parallelism("p", x))
        tcase("plain full", lambda: s.get_tensor_with_parallelism("p", target("full")))
        bad = {
            "no axes": layout(),
            "unknown kind": layout(axis("xx", 0, 2, 0)),
            "tp without split_dim": layout(axis("tp", 0, 2)),
            "rank out of range": layout(axis("tp", 2, 2, 0)),
            "dp with split_dim": layout(axis("dp", 0, 2, 0)),
            "ep without expert": layout(axis("ep", 0, 2)),
            "duplicate kinds": layout(axis("tp", 0, 2, 0), axis("tp", 1, 2, 0)),
            "split_dim out of range": layout(axis("tp", 0, 2, 5)),
        }
        for label, p in bad.items():
            case(f"refused: {label}", lambda: s.put_tensor_with_parallelism("r", x, p))
        case("refused: both requests", lambda: s.put_tensor_with_parallelism("r", x, layout(axis("dp", 0, 2)), ReplicateConfig(), Writer(0, 2, 0)))
        case("refused: bad writer", lambda: s.put_tensor_with_parallelism("r", x, None, ReplicateConfig(), Writer(2, 2, 0)))
        case("batch parallel", lambda: s.batch_put_tensor_with_parallelism(["g1", "g2"], [x, x], [layout(axis("dp", 0, 2)), layout(axis("dp", 1, 2))]))
        case("batch parallel lengths", lambda: s.batch_put_tensor_with_parallelism(["g3", "g4"], [x, x], [layout(axis("dp", 0, 2))]))
        case("batch upsert writers", lambda: s.batch_upsert_tensor_with_parallelism(["w"], [x], None, ReplicateConfig(), [Writer(1, 2, 0)]))
        tcase("batch get parallel", lambda: s.batch_get_tensor_with_parallelism(["g1", "a"], [target("shard", layout(axis("dp", 0, 2))), target("full", layout(axis("tp", 0, 2, 0)))]))
        tcase("batch get lengths", lambda: s.batch_get_tensor_with_parallelism(["g1"], [None, None]))
        case("read target bad mode", lambda: target("sideways"))
        s.close()

    with_master(run)


def tensor_into_from():
    """The forms over registered buffers, and what the buffer holds afterwards."""

    def run(m):
        s = setup(m)
        size = 1 << 20
        mem = (ctypes.c_ubyte * (4 * size))()
        base = ctypes.addressof(mem)
        case("register", lambda: s.register_buffer(base, 4 * size))
        x = pattern(torch.bfloat16, (8, 4))
        n = HEADER + x.numel() * 2
        case("put", lambda: s.put_tensor("x", x))
        tcase("get_tensor_into", lambda: s.get_tensor_into("x", base, size))
        case("buffer", lambda: ctypes.string_at(base, n))
        case("tensor aliases the buffer", lambda: s.get_tensor_into("x", base, size).data_ptr() - base)
        tcase("into too small", lambda: s.get_tensor_into("x", base, HEADER + 10))
        tcase("into missing", lambda: s.get_tensor_into("nope", base, size))
        case("put_tensor_from", lambda: s.put_tensor_from("y", base, n))
        case("raw y", lambda: s.get("y"))
        case("upsert_tensor_from", lambda: s.upsert_tensor_from("y", base, n))
        case("from bad size", lambda: s.put_tensor_from("z", base, n - 1))
        case("from too short", lambda: s.put_tensor_from("z", base, 100))
        case("batch_put_tensor_from", lambda: s.batch_put_tensor_from(["y1", "y2"], [base, base], [n, n]))
        case("batch_upsert_tensor_from", lambda: s.batch_upsert_tensor_from(["y1"], [base], [n]))
        case("batch from one bad", lambda: s.batch_put_tensor_from(["y3", "y4"], [base, base], [n, n - 1]))
        case("batch from lengths", lambda: s.batch_put_tensor_from(["y3", "y4"], [base], [n]))
        case("y3 exists", lambda: s.is_exist("y3"))
        tcase("batch_get_tensor_into", lambda: s.batch_get_tensor_into(["x", "nope"], [base + size, base + 2 * size], [size, size]))
        tcase("batch into lengths", lambda: s.batch_get_tensor_into(["x"], [base, base], [size]))
        case("tp from", lambda: s.put_tensor_with_tp_from("t", base, n, 0, 2, 1))
        case("tp from raw", lambda: s.get("t_tp_1"))
        case("tp from uneven", lambda: s.put_tensor_with_tp_from("t2", base, n, 0, 3, 1))
        case("batch tp from", lambda: s.batch_put_tensor_with_tp_from(["t3"], [base], [n], 0, 4, 0))
        tcase("tp into", lambda: s.get_tensor_with_tp_into("t", base + size, size, 1, 2))
        tcase("batch tp into", lambda: s.batch_get_tensor_with_tp_into(["t", "t3"], [base + size, base + 2 * size], [size, size], 0, 2))
        tcase("batch tp into lengths", lambda: s.batch_get_tensor_with_tp_into(["t"], [base, base], [size]))
        case("parallel from tp", lambda: s.put_tensor_with_parallelism_from("g", base, n, layout(axis("tp", 1, 2, 0))))
        case("parallel from tp keys", lambda: [k for k in ("g_tp_0", "g_tp_1", "g__parallelism_manifest") if s.is_exist(k) == 1])
        case("parallel from dp", lambda: s.upsert_tensor_with_parallelism_from("h", base, n, layout(axis("dp", 0, 2))))
        case("parallel from dp raw", lambda: s.get("h__dp_0of2"))
        from mooncake.store import ReplicateConfig

        case("parallel from writer", lambda: s.put_tensor_with_parallelism_from("k", base, n, None, ReplicateConfig(), Writer(1, 2, 1)))
        case("parallel from writer raw", lambda: s.get("k__writer_1of2_sd1"))
        case("batch parallel from", lambda: s.batch_put_tensor_with_parallelism_from(["p1", "p2"], [base, base], [n, n]))
        case("batch upsert parallel from", lambda: s.batch_upsert_tensor_with_parallelism_from(["p1"], [base], [n], [layout(axis("dp", 1, 2))]))
        full = target("full", layout(axis("tp", 0, 2, 0)))
        tcase("parallel into full", lambda: s.get_tensor_with_parallelism_into("g", base + size, size, full))
        case("buffer after full", lambda: ctypes.string_at(base + size, n))
        tcase("parallel into too small", lambda: s.get_tensor_with_parallelism_into("g", base + size, HEADER + 8, full))
        tcase("parallel into shard", lambda: s.get_tensor_with_parallelism_into("g", base + size, size, target("shard", layout(axis("tp", 1, 2, 0)))))
        tcase("batch parallel into", lambda: s.batch_get_tensor_with_parallelism_into(["g", "x"], [base + size, base + 2 * size], [size, size], [full, None]))
        case("unregister", lambda: s.unregister_buffer(base))
        s.close()

    with_master(run)


def tensor_safetensors():
    """save_tensor_to_safetensor / load_tensor_from_safetensor, in a temporary folder."""
    import tempfile

    def run(m):
        s = setup(m)
        with tempfile.TemporaryDirectory() as d:
            x = pattern(torch.float16, (3, 4))
            path = os.path.join(d, "one.safetensors")
            case("put", lambda: s.put_tensor("st", x))
            case("save", lambda: s.save_tensor_to_safetensor("st", path))
            case("save missing key", lambda: s.save_tensor_to_safetensor("none", os.path.join(d, "n.safetensors")))
            case("save into a missing folder", lambda: s.save_tensor_to_safetensor("st", os.path.join(d, "no", "x")))
            tcase("load other key", lambda: s.load_tensor_from_safetensor("st2", path))
            tcase("stored st2", lambda: s.get_tensor("st2"))
            tcase("load default key", lambda: s.load_tensor_from_safetensor(file_name=path))
            case("stored under the path", lambda: s.is_exist(path))
            tcase("load missing file", lambda: s.load_tensor_from_safetensor("z", os.path.join(d, "missing")))
            case("load without file_name", lambda: s.load_tensor_from_safetensor("z"))
        s.close()

    with_master(run)


def tensor_export():
    """Stores every test tensor with this package and writes the raw objects to $MOONCAKE_TENSOR_XFER_OUT."""

    def run(m):
        s = setup(m)
        out = {}
        for key, t in tensors():
            case(f"put {key}", lambda: s.put_tensor(key, t))
            out[key] = s.get(key).hex()
        case("tp put", lambda: s.put_tensor_with_tp("tp", pattern(torch.int32, (4, 2)), 0, 2, 0))
        for r in range(2):
            out[f"tp_tp_{r}"] = s.get(f"tp_tp_{r}").hex()
        with open(os.environ["MOONCAKE_TENSOR_XFER_OUT"], "w", encoding="utf-8") as f:
            json.dump(out, f)
        case("exported", lambda: len(out))
        s.close()

    with_master(run)


def tensor_import():
    """Stores the raw objects of $MOONCAKE_TENSOR_XFER_IN with `put` and reads them with the tensor methods."""

    def run(m):
        s = setup(m)
        with open(os.environ["MOONCAKE_TENSOR_XFER_IN"], encoding="utf-8") as f:
            objects = json.load(f)
        for key, raw in objects.items():
            case(f"put raw {key}", lambda: s.put(key, bytes.fromhex(raw)))
        for key, _ in tensors():
            tcase(f"get {key}", lambda: s.get_tensor(key))
        tcase("tp shards", lambda: [s.get_tensor_with_tp("tp", r, 2) for r in range(2)])
        s.close()

    with_master(run)


SCENARIOS = {
    f.__name__: f
    for f in (tensor_bytes, tensor_bad_input, tensor_parallel, tensor_into_from, tensor_safetensors, tensor_export,
              tensor_import)
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
