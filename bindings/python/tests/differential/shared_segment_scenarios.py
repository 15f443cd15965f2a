"""Shared-segment scenarios run under both wheels (ours and upstream's) by test_differential_shared_segment.py,
which compares what they report, case by case.

    python shared_segment_scenarios.py NAME      # prints one JSON object per line: {"case": ..., "result": ...}

Results are reported as scenarios.py reports them (values, or {"exc": type name}). Scenarios whose name starts with
"ranks_" start their ranks as child processes of this script (``--rank R --world W --port P NAME``), joined in a
gloo process group on 127.0.0.1; each child reports its cases to this process, which re-reports them as
"rank R: case". The scenario then checks, from outside, what the ranks left in /dev/shm: both packages put the
creating process's PID in the names of their shared-memory objects ("_PID_"), which is how leftovers are found.
Leftovers of a rank this scenario killed are removed afterwards (only names carrying that rank's PID).

Blob bytes differ between the packages by design (they are opaque records), so blobs are only compared by what
they make ``complete`` do: accept them, or raise.
"""

import ctypes
import gc
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenarios import case  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from procs import free_port  # noqa: E402

SHM = "/dev/shm"


def shm_names_of(pid: int) -> list:
    """Names in /dev/shm made by process `pid` (both packages name them <prefix>_<pid>_<random>)."""
    token = f"_{pid}_"
    try:
        return sorted(n for n in os.listdir(SHM) if token in n)
    except FileNotFoundError:
        return []


def mapped_of(pid: int) -> int:
    """How many mappings of this process show a /dev/shm object made by process `pid`."""
    token = f"_{pid}_"
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if "/dev/shm/" in line and token in line)


def digest(t) -> str:
    """A short digest of a tensor's bytes."""
    return hashlib.sha256(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()[:16]


def fill(t, seed: int):
    """Writes a deterministic byte pattern into tensor `t` (in place)."""
    import torch

    raw = t.view(-1).view(torch.uint8)
    pattern = (torch.arange(raw.numel(), dtype=torch.int64) * 31 + seed * 7) % 251
    if t.dtype == torch.bool:
        pattern = pattern % 2
    raw.copy_(pattern.to(torch.uint8))


def failure(fn):
    """Runs `fn` expecting a SharedSegmentError: [type name, phase, sorted failing ranks] from its message."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported
        text = str(e)
        phase = re.search(r"\b(create|complete) failed", text)
        ranks = sorted({int(r) for r in re.findall(r"\brank (\d+): ", text)})
        return [type(e).__name__, phase.group(1) if phase else None, ranks]
    return "no error"


# ---- one process ---------------------------------------------------------------------------------------------


def engine_api():
    """mooncake.engine.SharedSegment on its own, every rank of a group in this one process."""
    from mooncake.engine import SharedSegment as S

    case("supported()", lambda: S.supported())
    case("supported(mmap=False)", lambda: S.supported(False))
    case("supported(host_register=True)", lambda: S.supported(True, True))
    case("supported(False, True)", lambda: S.supported(mmap=False, host_register=True))
    case("construct", lambda: S())
    for label, args in [
        ("size 0", ("a", 0, 1, 0)),
        ("size 2**46", ("a", 1 << 46, 1, 0)),
        ("size 2**46+1", ("a", (1 << 46) + 1, 1, 0)),
        ("world 0", ("a", 10, 0, 0)),
        ("rank = world", ("a", 10, 2, 2)),
        ("owner = world", ("a", 10, 2, 0, 2)),
        ("negative size", ("a", -1, 1, 0)),
        ("negative rank", ("a", 10, 1, -1)),
        ("negative owner", ("a", 10, 2, 0, -1)),
        ("negative device", ("a", 10, 1, 0, 0, -1)),
        ("device 2**40", ("a", 10, 1, 0, 0, 1 << 40)),
        ("world 2**33", ("a", 10, 1 << 33, 0)),
        ("float size", ("a", 10.0, 1, 0)),
        ("name None", (None, 10, 1, 0)),
        ("empty name", ("", 10, 1, 0)),
        ("mmap=False", ("a", 10, 1, 0, 0, 0, False)),
        ("host_register", ("a", 10, 1, 0, 0, 0, True, True)),
        ("size 0 and mmap=False", ("a", 0, 1, 0, 0, 0, False)),
        ("bad rank and host_register", ("a", 10, 1, 3, 0, 0, True, True)),
    ]:
        case(f"create {label}", lambda args=args: isinstance(S.create(*args)[1], bytes))
    case("create larger than /dev/shm", lambda: S.create("a", 1 << 45, 1, 0)[0].size())
    case("create keywords", lambda: S.create(name="a", size=10, world_size=1, rank_id=0, owner_rank=0, device_id=3,
                                             mmap=True, host_register=False)[0].size())  # fmt: skip

    seg, blob = S.create("one", 10000, 1, 0)
    base = seg.base_addr()
    case("one: blob type", lambda: type(blob).__name__)
    case("one: ready before complete", lambda: seg.ready())
    case("one: size", lambda: seg.size())
    case("one: base page aligned", lambda: base != 0 and base % 4096 == 0)
    case("one: device_addr", lambda: seg.device_addr())
    case("one: complete None", lambda: seg.complete(None))
    case("one: complete two blobs", lambda: seg.complete([blob, blob]))
    case("one: complete", lambda: seg.complete([blob]))
    case("one: ready", lambda: seg.ready())
    case("one: base unchanged", lambda: seg.base_addr() == base)
    case("one: zero filled", lambda: ctypes.string_at(base, 10000) == bytes(10000))
    ctypes.memmove(base + 9990, b"0123456789", 10)
    case("one: read back", lambda: ctypes.string_at(base + 9990, 10))
    case("one: complete again", lambda: seg.complete([blob]))
    case("one: complete tuple on a fresh one", lambda: (lambda s, b: s.complete((b,)))(*S.create("t", 5, 1, 0)))
    case("one: complete bytearray", lambda: (lambda s, b: s.complete([bytearray(b)]))(*S.create("t", 5, 1, 0)))
    del seg

    # Three ranks in this process: the owner is rank 1.
    def trio(name="trio", size=5000, world=3, owner=1):
        return [S.create(name, size, world, r, owner) for r in range(world)]

    made = trio()
    segs, blobs = [m[0] for m in made], [m[1] for m in made]
    case("trio: blob lengths equal", lambda: len({len(b) for b in blobs}) == 1)
    case("trio: owner base before complete", lambda: segs[1].base_addr() != 0)
    case("trio: ready before", lambda: [s.ready() for s in segs])
    case("trio: too few blobs", lambda: segs[0].complete(blobs[:2]))
    case("trio: too many blobs", lambda: segs[0].complete(blobs + blobs[:1]))
    case("trio: truncated blob", lambda: segs[0].complete([blobs[0], blobs[1][:-1], blobs[2]]))
    case("trio: zero blob", lambda: segs[0].complete([blobs[0], bytes(len(blobs[1])), blobs[2]]))
    case("trio: str blob", lambda: segs[0].complete([blobs[0], "x" * len(blobs[1]), blobs[2]]))
    case("trio: ranks swapped", lambda: segs[0].complete([blobs[2], blobs[1], blobs[0]]))
    case("trio: owner blob twice", lambda: segs[0].complete([blobs[1], blobs[1], blobs[2]]))
    for label, kwargs in [("name", {"name": "other"}), ("size", {"size": 5001}), ("owner", {"owner": 2})]:
        other = trio(**kwargs)
        case(f"trio: peer sees another {label}", lambda o=other: segs[0].complete([blobs[0], o[1][1], blobs[2]]))
        case(f"trio: owner sees another {label}", lambda o=other: segs[1].complete([o[0][1], blobs[1], blobs[2]]))
        del other
    other = trio(world=4)
    case("trio: another world size", lambda: segs[2].complete([blobs[0], blobs[1], other[2][1]]))
    del other
    case("trio: still not ready", lambda: [s.ready() for s in segs])
    case("trio: complete owner", lambda: segs[1].complete(blobs))
    case("trio: complete peer 0", lambda: segs[0].complete(blobs))
    case("trio: complete peer 2", lambda: segs[2].complete(blobs))
    case("trio: ready after", lambda: [s.ready() for s in segs])
    case("trio: sizes", lambda: [s.size() for s in segs])
    case("trio: bases distinct", lambda: len({s.base_addr() for s in segs}) == 3)
    ctypes.memmove(segs[1].base_addr(), b"from owner", 10)
    ctypes.memmove(segs[2].base_addr() + 4990, b"from peer2", 10)
    case("trio: peer 0 sees owner", lambda: ctypes.string_at(segs[0].base_addr(), 10))
    case("trio: owner sees peer 2", lambda: ctypes.string_at(segs[1].base_addr() + 4990, 10))
    case("trio: peer 0 sees peer 2", lambda: ctypes.string_at(segs[0].base_addr() + 4990, 10))
    peer_base = segs[0].base_addr()
    del segs[1], made
    gc.collect()
    case("trio: peer keeps pages after owner dropped", lambda: ctypes.string_at(peer_base, 10))
    del segs
    gc.collect()

    late = trio(name="late", world=2, owner=0)
    late_blobs = [late[0][1], late[1][1]]
    del late[0]
    gc.collect()
    case("late: owner dropped before peer completes", lambda: late[0][0].complete(late_blobs))
    del late
    gc.collect()
    case("leftovers in /dev/shm", lambda: shm_names_of(os.getpid()))
    case("mappings left", lambda: mapped_of(os.getpid()))


def python_api():
    """mooncake.shared_segment with world_size 1: layouts, tensors, errors."""
    import torch

    from mooncake.shared_segment import (
        SharedSegment,
        SharedSegmentError,
        create_shared_segment,
        shared_segment_supported,
    )

    case("error is a RuntimeError", lambda: issubclass(SharedSegmentError, RuntimeError))
    case("supported()", lambda: shared_segment_supported())
    case("supported(mmap=False)", lambda: shared_segment_supported(mmap=False))
    case("supported(host_register=True)", lambda: shared_segment_supported(host_register=True))

    layouts = {
        "one small": {"k": dict(count=1, shape=(3,), dtype=torch.float32)},
        "two blocks": {
            "v": dict(count=3, shape=(4, 5), dtype=torch.bfloat16),
            "k": dict(count=3, shape=[4, 5], dtype=torch.bfloat16),
        },
        "uneven counts": {
            "a": dict(count=2, shape=(1024,), dtype=torch.float32),
            "b": dict(count=5, shape=(1025,), dtype=torch.float32),
            "c": dict(count=1, shape=(7, 3, 2), dtype=torch.int8),
        },
        "dtypes": {
            "f16": dict(count=2, shape=(10,), dtype=torch.float16),
            "i64": dict(count=2, shape=(3, 3), dtype=torch.int64),
            "u8": dict(count=2, shape=(4097,), dtype=torch.uint8),
            "bool": dict(count=2, shape=(5,), dtype=torch.bool),
            "f64": dict(count=2, shape=(2, 2, 2), dtype=torch.float64),
            "fp8": dict(count=2, shape=(16,), dtype=torch.float8_e4m3fn),
            "c64": dict(count=1, shape=(2,), dtype=torch.complex64),
        },
        "exactly a page": {"p": dict(count=4, shape=(1024,), dtype=torch.int32)},
        "count from str": {"s": dict(count="2", shape=("3",), dtype=torch.int16)},
    }
    for label, blocks in layouts.items():

        make = _make(label, lambda blocks=blocks: create_shared_segment(f"layout {label}", blocks, 1, 0))
        case(f"{label}: create", lambda: type(make()).__name__)
        seg = made.pop(label, None)
        if seg is None:
            continue
        case(f"{label}: total_size", lambda: seg.total_size())
        case(f"{label}: base page aligned", lambda: seg.base_addr() % 4096 == 0)
        seed = 0
        for block in sorted(blocks):
            ts = seg.tensors(block)
            base = seg.base_addr()
            case(f"{label}: {block} offsets", lambda: [t.data_ptr() - base for t in ts])
            case(f"{label}: {block} form",
                 lambda: [[str(t.dtype), list(t.shape), list(t.stride()), t.is_contiguous(), t.device.type]
                          for t in ts])  # fmt: skip
            case(f"{label}: {block} zero", lambda: all(not t.view(-1).view(torch.uint8).any() for t in ts))
            for i in range(len(ts)):
                fill(ts[i], seed + i)
            seed += len(ts)
            case(f"{label}: {block} digests", lambda: [digest(t) for t in ts])
            again = seg.tensors(block)
            case(f"{label}: {block} again shares memory",
                 lambda: [a.data_ptr() == t.data_ptr() and torch.equal(a.view(torch.uint8), t.view(torch.uint8))
                          for a, t in zip(again, ts)])  # fmt: skip
            case(f"{label}: {block} keeps its segment", lambda: ts[0]._mooncake_segment is seg)
        first = sorted(blocks)[0]
        nbytes = seg.tensors(first)[0].numel() * seg.tensors(first)[0].element_size()
        case(f"{label}: bytes at base", lambda: digest(torch.frombuffer(
            (ctypes.c_uint8 * nbytes).from_address(seg.base_addr()), dtype=torch.uint8)))  # fmt: skip
        del seg, ts, again

    a = create_shared_segment("order", {"x": dict(count=2, shape=(9,), dtype=torch.int32),
                                        "y": dict(count=3, shape=(99,), dtype=torch.int8)}, 1, 0)  # fmt: skip
    b = create_shared_segment("order", {"y": dict(count=3, shape=(99,), dtype=torch.int8),
                                        "x": dict(count=2, shape=(9,), dtype=torch.int32)}, 1, 0)  # fmt: skip
    case("dict order: same layout",
         lambda: [[t.data_ptr() - s.base_addr() for n in "xy" for t in s.tensors(n)] for s in (a, b)])  # fmt: skip
    case("dict order: separate memory", lambda: a.base_addr() != b.base_addr())
    del a, b

    f32 = torch.float32
    good = {"k": dict(count=2, shape=(4,), dtype=f32)}
    bad = {
        "no blocks": ({}, {}),
        "no count": ({"k": dict(shape=(4,), dtype=f32)}, {}),
        "no shape": ({"k": dict(count=1, dtype=f32)}, {}),
        "no dtype": ({"k": dict(count=1, shape=(4,))}, {}),
        "count 0": ({"k": dict(count=0, shape=(4,), dtype=f32)}, {}),
        "count -1": ({"k": dict(count=-1, shape=(4,), dtype=f32)}, {}),
        "count None": ({"k": dict(count=None, shape=(4,), dtype=f32)}, {}),
        "count abc": ({"k": dict(count="abc", shape=(4,), dtype=f32)}, {}),
        "empty shape": ({"k": dict(count=1, shape=(), dtype=f32)}, {}),
        "zero dim": ({"k": dict(count=1, shape=(4, 0), dtype=f32)}, {}),
        "negative dim": ({"k": dict(count=1, shape=(-4,), dtype=f32)}, {}),
        "int shape": ({"k": dict(count=1, shape=4, dtype=f32)}, {}),
        "str dtype": ({"k": dict(count=1, shape=(4,), dtype="float32")}, {}),
        "spec is a list": ({"k": [1, (4,), f32]}, {}),
        "blocks is a list": (["k"], {}),
        "huge": ({"k": dict(count=1 << 20, shape=(1 << 30,), dtype=torch.float64)}, {}),
        "larger than /dev/shm": ({"k": dict(count=1 << 15, shape=(1 << 30,), dtype=torch.uint8)}, {}),
        "mmap=False": (good, {"mmap": False}),
        "host_register": (good, {"host_register": True}),
        "host_register without mmap": (good, {"mmap": False, "host_register": True}),
        "rank 1 of 1": (good, {"rank_id": 1}),
        "owner 1 of 1": (good, {"owner_rank": 1}),
        "world 0": (good, {"world_size": 0, "rank_id": 0}),
        "world 2 without group": (good, {"world_size": 2}),
        "tp_group and comm_group differ": (good, {"comm_group": object(), "tp_group": object()}),
    }
    for label, (blocks, extra) in bad.items():
        kwargs = {"world_size": 1, "rank_id": 0, **extra}
        case(f"bad: {label}", lambda blocks=blocks, kwargs=kwargs: create_shared_segment("bad", blocks, **kwargs))
    same = object()
    case("tp_group same as comm_group",
         lambda: create_shared_segment("tp", good, 1, 0, comm_group=same, tp_group=same).total_size())  # fmt: skip
    case("tp_group alone", lambda: create_shared_segment("tp", good, 1, 0, tp_group=same).total_size())
    case("device_id given", lambda: create_shared_segment("dev", good, 1, 0, device_id=3).total_size())
    case("name None", lambda: create_shared_segment(None, good, 1, 0).total_size())
    case("positional", lambda: create_shared_segment("pos", good, 1, 0, 0, 0, None, True, False).total_size())
    seg = create_shared_segment("unknown", good, 1, 0)
    case("unknown block", lambda: seg.tensors("v"))
    case("wrap by hand", lambda: type(SharedSegment(seg._segment, seg._specs, seg._offsets, seg._stride, 0)).__name__)
    alive = seg.tensors("k")
    del seg
    gc.collect()
    fill(alive[1], 5)
    case("tensor outlives its handle", lambda: digest(alive[1]))
    del alive
    gc.collect()
    case("leftovers in /dev/shm", lambda: shm_names_of(os.getpid()))
    case("mappings left", lambda: mapped_of(os.getpid()))


def python_api_alive():
    """What /dev/shm holds while a segment is alive, and after it is dropped."""
    import torch

    from mooncake.shared_segment import create_shared_segment

    seg = create_shared_segment("alive", {"k": dict(count=1, shape=(4,), dtype=torch.float32)}, 1, 0)
    case("names while alive", lambda: len(shm_names_of(os.getpid())))
    case("mapped while alive", lambda: mapped_of(os.getpid()))
    del seg
    gc.collect()
    case("names after drop", lambda: len(shm_names_of(os.getpid())))
    case("mapped after drop", lambda: mapped_of(os.getpid()))


# ---- several ranks -------------------------------------------------------------------------------------------


def _blocks(torch, count=3, shape=(8, 16), dtype=None):
    dtype = dtype or torch.bfloat16
    return {
        "k": dict(count=count, shape=shape, dtype=dtype),
        "v": dict(count=count, shape=shape, dtype=dtype),
        "meta": dict(count=1, shape=(3,), dtype=torch.int64),
    }


def _share(torch, dist, rank, label, make, owner):
    """Creates a segment with `make()`; the owner writes every tensor, then every rank reports what it reads."""
    case(f"{label}: create", lambda: type(make()).__name__)
    seg = made.get(label)
    if seg is None:
        return None
    case(f"{label}: total_size", lambda: seg.total_size())
    names = sorted(seg._specs)
    case(f"{label}: offsets", lambda: {n: [t.data_ptr() - seg.base_addr() for t in seg.tensors(n)] for n in names})
    if rank == owner:
        for i, n in enumerate(names):
            for j, t in enumerate(seg.tensors(n)):
                fill(t, 10 * i + j)
    dist.barrier()
    case(f"{label}: what this rank reads", lambda: {n: [digest(t) for t in seg.tensors(n)] for n in names})
    dist.barrier()
    # A peer writes back; every rank sees it.
    if rank == (owner + 1) % dist.get_world_size():
        seg.tensors(names[0])[0].fill_(1)
    dist.barrier()
    case(f"{label}: after a peer wrote", lambda: digest(seg.tensors(names[0])[0]))
    dist.barrier()
    return seg


# Segments made through _make, by label.
made: dict = {}


def _make(label, fn):
    """`fn`, remembering what it returns under `label` (so that `case` can report the call and the test keep it)."""

    def make():
        made[label] = fn()
        return made[label]

    return make


def ranks_share(rank, world):
    """Segments shared by two ranks: owner 0 and owner 1, group given several ways; the owner writes, all read."""
    import torch
    import torch.distributed as dist

    from mooncake.shared_segment import create_shared_segment

    group = dist.group.WORLD

    class Coordinator:
        """Stands for vLLM's GroupCoordinator: the gloo group is its cpu_group."""

        cpu_group = group

    plans = [
        ("owner 0", lambda: create_shared_segment("share", _blocks(torch), world, rank, comm_group=group)),
        ("owner 1", lambda: create_shared_segment("share", _blocks(torch), world, rank, owner_rank=1,
                                                  comm_group=group)),  # fmt: skip
        ("coordinator", lambda: create_shared_segment("coord", _blocks(torch, 2, (4100,), torch.uint8), world, rank,
                                                      comm_group=Coordinator())),  # fmt: skip
        ("tp_group", lambda: create_shared_segment("tp", _blocks(torch, 1, (5,), torch.float32), world, rank,
                                                   tp_group=group)),  # fmt: skip
        ("device ids differ", lambda: create_shared_segment("dev", _blocks(torch, 1), world, rank, device_id=rank,
                                                            comm_group=group)),  # fmt: skip
        ("dict order differs", lambda: create_shared_segment(
            "order", dict(reversed(list(_blocks(torch).items()))) if rank else _blocks(torch), world, rank,
            comm_group=group)),  # fmt: skip
    ]
    kept = []
    for label, fn in plans:
        owner = 1 if label == "owner 1" else 0
        kept.append(_share(torch, dist, rank, label, _make(label, fn), owner))
    dist.barrier()
    kept.clear()
    made.clear()
    gc.collect()
    dist.barrier()


def ranks_disagree(rank, world):
    """Ranks that declare different segments, or fail on one rank only: every rank raises SharedSegmentError."""
    import torch
    import torch.distributed as dist

    from mooncake.shared_segment import create_shared_segment

    group = dist.group.WORLD
    base = _blocks(torch)
    cases = {
        "name": dict(name="other"),
        "count": dict(blocks=_blocks(torch, count=4)),
        "shape": dict(blocks=_blocks(torch, shape=(8, 17))),
        "dtype": dict(blocks=_blocks(torch, dtype=torch.float16)),
        "dtype same size": dict(blocks=_blocks(torch, dtype=torch.int16)),
        "extra block": dict(blocks={**base, "z": dict(count=1, shape=(1,), dtype=torch.int8)}),
        "owner rank": dict(owner_rank=1),
        "rank out of range": dict(rank_id=5),
        "owner out of range": dict(owner_rank=7),
        "segment too big": dict(blocks={"k": dict(count=1 << 20, shape=(1 << 30,), dtype=torch.float64)}),
    }
    for label, change in cases.items():
        args = dict(name="agree", blocks=base, world_size=world, rank_id=rank, owner_rank=0, comm_group=group)
        if rank == 1:
            args.update(change)
        case(f"{label}: error", lambda args=args: failure(lambda: create_shared_segment(**args)))
        dist.barrier()
    gc.collect()
    case("still works afterwards",
         lambda: create_shared_segment("after", base, world, rank, comm_group=group).total_size())  # fmt: skip
    dist.barrier()


def ranks_owner_exits(rank, world):
    """The owner writes and exits normally (keeping its segment to the end); the peer still reads the data."""
    _owner_leaves(rank, world, kill=False)


def ranks_owner_killed(rank, world):
    """The owner writes and is killed with SIGKILL; the peer still reads the data."""
    _owner_leaves(rank, world, kill=True)


_KEEP = []


def _owner_leaves(rank, world, kill):
    import torch
    import torch.distributed as dist

    from mooncake.shared_segment import create_shared_segment

    seg = create_shared_segment("leave", _blocks(torch), world, rank, comm_group=dist.group.WORLD)
    _KEEP.append(seg)
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    if rank == 0:
        for i, t in enumerate(seg.tensors("k")):
            fill(t, i)
    dist.barrier()
    case("names while all ranks run", lambda: len(shm_names_of(pids[0])))
    dist.barrier()
    if rank == 0:
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.destroy_process_group()
        sys.exit(0)  # a normal exit (atexit handlers run), the segment still referenced by _KEEP
    # The peer: waits for the owner to be gone, then reads.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and alive(pids[0]):
        time.sleep(0.05)
    case("owner gone", lambda: not alive(pids[0]))
    case("peer reads after the owner left", lambda: [digest(t) for t in seg.tensors("k")])
    case("names after the owner left", lambda: len(shm_names_of(pids[0])))
    sys.stdout.flush()
    os._exit(0)  # the owner is gone: skip the process group's teardown


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def run_ranks(name: str, world: int = 2):
    """Runs rank scenario `name` in `world` child processes and re-reports their cases; then checks /dev/shm."""
    port = free_port()
    children = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--rank", str(r), "--world", str(world), "--port", str(port),
             name],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        for r in range(world)
    ]
    outputs = []
    for child in children:
        try:
            out, _ = child.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for c in children:
                c.kill()
            raise
        outputs.append(out.decode())
    for r, (child, out) in enumerate(zip(children, outputs)):
        for line in out.splitlines():
            row = json.loads(line)
            case(f"rank {r}: {row['case']}", lambda row=row: row["result"])
        expected = -signal.SIGKILL if (name == "ranks_owner_killed" and r == 0) else 0
        case(f"rank {r}: exit status as expected", lambda c=child, e=expected: c.returncode == e)
    leftovers = {child.pid: shm_names_of(child.pid) for child in children}
    case("leftovers in /dev/shm after every rank ended", lambda: [len(v) for v in leftovers.values()])
    for pid, names in leftovers.items():
        for n in names:  # only what the ranks of this run left
            try:
                os.unlink(os.path.join(SHM, n))
            except FileNotFoundError:
                pass


def rank_main(argv):
    import datetime

    import torch.distributed as dist

    rank = int(argv[argv.index("--rank") + 1])
    world = int(argv[argv.index("--world") + 1])
    port = int(argv[argv.index("--port") + 1])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    RANK_SCENARIOS[argv[-1]](rank, world)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: torch's gloo threads sometimes abort it ("terminate called without an active
    # exception"), under either package; what the scenarios compare is already reported.
    sys.stdout.flush()
    os._exit(0)


RANK_SCENARIOS = {
    "ranks_share": ranks_share,
    "ranks_disagree": ranks_disagree,
    "ranks_owner_exits": ranks_owner_exits,
    "ranks_owner_killed": ranks_owner_killed,
}

SCENARIOS = {
    "engine_api": engine_api,
    "python_api": python_api,
    "python_api_alive": python_api_alive,
    **{name: (lambda name=name: run_ranks(name)) for name in RANK_SCENARIOS},
}

if __name__ == "__main__":
    if "--rank" in sys.argv:
        rank_main(sys.argv)
    else:
        SCENARIOS[sys.argv[1]]()
