"""mooncake.shared_segment and mooncake.engine.SharedSegment (mooncake/_shared_memory.py): process-shared host
memory, one writer and many readers.

World size 1 in this process; several ranks as child processes joined in a gloo process group on 127.0.0.1 (the
worker below). Skipped without torch or without /dev/shm. Every test checks that it leaves nothing in /dev/shm.
"""

import ctypes
import gc
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch", reason="mooncake.shared_segment needs torch")

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this host")

from mooncake import _shared_memory  # noqa: E402
from mooncake.engine import SharedSegment as EngineSegment  # noqa: E402
from mooncake.shared_segment import (  # noqa: E402
    SharedSegment,
    SharedSegmentError,
    create_shared_segment,
    shared_segment_supported,
)


def names_of(pid: int) -> list:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"mcrs_ss_{pid}_"))


@pytest.fixture(autouse=True)
def no_leftovers():
    before = set(names_of(os.getpid()))
    yield
    gc.collect()
    assert set(names_of(os.getpid())) == before, "the test left shared-memory objects in /dev/shm"


def blocks(count=2, shape=(4, 8), dtype=torch.float32, **extra):
    return {"k": dict(count=count, shape=shape, dtype=dtype), "v": dict(count=count, shape=shape, dtype=dtype), **extra}


# ---- the engine-level class ----------------------------------------------------------------------------------


def test_supported():
    assert EngineSegment.supported() is True
    assert EngineSegment.supported(mmap=False) is False
    assert EngineSegment.supported(True, True) is False
    assert shared_segment_supported() is True
    assert shared_segment_supported(mmap=False, host_register=False) is False


def test_engine_single_rank_roundtrip():
    seg, blob = EngineSegment.create("solo", 10000, 1, 0)
    assert isinstance(blob, bytes) and len(blob) == _shared_memory.BLOB_SIZE
    assert not seg.ready()
    base = seg.base_addr()
    assert base and base % 4096 == 0 and seg.size() == 10000 and seg.device_addr() == 0
    # The owner's object exists until every rank has completed; release_name removes it.
    assert len(names_of(os.getpid())) == 1
    seg.complete([blob])
    assert seg.ready() and seg.base_addr() == base
    ctypes.memmove(base + 9995, b"hello", 5)
    assert ctypes.string_at(base + 9995, 5) == b"hello"
    assert bytes(seg.view(9995, 5)) == b"hello"
    with pytest.raises(RuntimeError, match="already"):
        seg.complete([blob])
    seg.release_name()
    assert names_of(os.getpid()) == []
    seg.release_name()  # twice is fine
    seg.close()
    assert not seg.ready() and seg.base_addr() == 0
    with pytest.raises(RuntimeError):
        seg.view()
    seg.close()  # twice is fine


def test_engine_blob_layout():
    seg, blob = EngineSegment.create("layout", 5000, 4, 2, 1)
    magic, version, backend, rank, world, owner, size, mapped = struct.unpack_from("<8sHHIIIQQ", blob)
    assert (magic, version, backend, rank, world, owner, size, mapped) == (b"MCRS.SHM", 1, 1, 2, 4, 1, 5000, 8192)
    assert struct.unpack_from("<H", blob, 56) == (0,)  # only the owner's blob names the object
    owner, owner_blob = EngineSegment.create("layout", 5000, 4, 1, 1)
    (name_len,) = struct.unpack_from("<H", owner_blob, 56)
    name = owner_blob[58 : 58 + name_len].decode()
    assert name.startswith(f"/mcrs_ss_{os.getpid()}_") and name[1:] in names_of(os.getpid())
    assert blob[40:56] == owner_blob[40:56]  # same declaration, same fingerprint
    other, other_blob = EngineSegment.create("layout", 5001, 4, 1, 1)
    assert other_blob[40:56] != owner_blob[40:56]
    del seg, owner, other


@pytest.mark.parametrize(
    "args, exc",
    [
        (("a", 0, 1, 0), RuntimeError),
        (("a", (1 << 46) + 1, 1, 0), RuntimeError),
        (("a", 10, 0, 0), RuntimeError),
        (("a", 10, 2, 2), RuntimeError),
        (("a", 10, 2, 0, 2), RuntimeError),
        (("a", -1, 1, 0), TypeError),
        (("a", 10, 1, -1), TypeError),
        (("a", 10.5, 1, 0), TypeError),
        (("a", 10, 1 << 32, 0), TypeError),
        (("a", 10, 1, 0, 0, 1 << 31), TypeError),
        ((None, 10, 1, 0), TypeError),
        (("a", 10, 1, 0, 0, 0, False), RuntimeError),
        (("a", 10, 1, 0, 0, 0, True, True), RuntimeError),
        (("a", 10, 1, 0, 0, 0, "yes"), TypeError),
    ],
)
def test_engine_create_rejects(args, exc):
    with pytest.raises(exc):
        EngineSegment.create(*args)


def test_engine_refuses_more_than_dev_shm_has():
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    with pytest.raises(RuntimeError, match="bytes free"):
        EngineSegment.create("big", min(free + (1 << 30), 1 << 46), 1, 0)
    # A peer does not allocate: it is refused only for the size bound.
    peer, _ = EngineSegment.create("big", min(free + (1 << 30), 1 << 46), 2, 1)
    assert peer.size() == min(free + (1 << 30), 1 << 46)
    with pytest.raises(SharedSegmentError, match="bytes free"):
        create_shared_segment("big", {"k": dict(count=1 << 15, shape=(1 << 30,), dtype=torch.uint8)}, 1, 0)


def test_engine_cannot_be_constructed():
    with pytest.raises(TypeError):
        EngineSegment()


def _edit(blob: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_engine_complete_checks_each_blob_in_order():
    made = [EngineSegment.create("chk", 3000, 3, r, 0) for r in range(3)]
    segs, blobs = [m[0] for m in made], [m[1] for m in made]
    peer = segs[2]
    bad = {
        "count": (blobs[:2], "expected 3 blobs"),
        "length": ([blobs[0], blobs[1][:-1], blobs[2]], "has 127 bytes"),
        "magic": ([blobs[0], b"X" + blobs[1][1:], blobs[2]], "not a shared-segment blob"),
        "version": ([_edit(blobs[0], 8, "<H", 9), blobs[1], blobs[2]], "format 9"),
        "rank": ([blobs[0], blobs[0], blobs[2]], "written by rank 0"),
        "backend": ([blobs[0], _edit(blobs[1], 10, "<H", 2), blobs[2]], "another shared-segment backend"),
        "fingerprint": ([blobs[0], blobs[1], _edit(blobs[2], 40, "<B", blobs[2][40] ^ 1)], "different shared segment"),
        "mapped size": ([_edit(blobs[0], 32, "<Q", 4096 * 7), blobs[1], blobs[2]], "maps 28672 bytes"),
        # The first bad blob in rank order is reported, whatever is wrong with later ones.
        "first wins": ([_edit(blobs[0], 8, "<H", 9), b"short", blobs[2]], "format 9"),
    }
    for label, (given, message) in bad.items():
        with pytest.raises(RuntimeError, match=message):
            peer.complete(given)
        assert not peer.ready(), label
    with pytest.raises(TypeError):
        peer.complete(None)
    with pytest.raises(TypeError):
        peer.complete(b"".join(blobs))
    # A failed complete changes nothing: the right blobs still work, as a tuple or bytearrays too.
    peer.complete(tuple(bytearray(b) for b in blobs))
    segs[0].complete(blobs)
    segs[1].complete(blobs)
    assert [s.ready() for s in segs] == [True, True, True]
    assert len({s.base_addr() for s in segs}) == 3
    ctypes.memmove(segs[0].base_addr() + 2990, b"0123456789", 10)
    assert ctypes.string_at(segs[2].base_addr() + 2990, 10) == b"0123456789"
    del segs, made, peer


def test_engine_peer_refuses_foreign_names():
    owner, owner_blob = EngineSegment.create("foreign", 100, 2, 0)
    peer, peer_blob = EngineSegment.create("foreign", 100, 2, 1)
    (name_len,) = struct.unpack_from("<H", owner_blob, 56)
    forged = bytearray(owner_blob)
    forged[58 : 58 + name_len] = b"/../../etc/passwd".ljust(name_len, b"\0")[:name_len]
    with pytest.raises(RuntimeError, match="names no shared-memory object"):
        peer.complete([bytes(forged), peer_blob])
    owner.close()  # the name is gone: a peer can no longer attach
    with pytest.raises(RuntimeError, match="cannot open"):
        peer.complete([owner_blob, peer_blob])


def test_engine_peer_before_complete_has_no_address():
    peer, _ = EngineSegment.create("early", 100, 2, 1)
    assert peer.base_addr() == 0 and not peer.ready()


def test_engine_close_keeps_pages_exported_views_use():
    seg, blob = EngineSegment.create("views", 4096, 1, 0)
    seg.complete([blob])
    view = seg.view(0, 8)
    view[:] = b"abcdefgh"
    seg.close()
    assert names_of(os.getpid()) == []
    assert bytes(view) == b"abcdefgh"  # still mapped: the view holds the mapping
    view.release()
    other, _ = EngineSegment.create("views", 4096, 1, 0)
    with pytest.raises(ValueError):
        other.view(4000, 200)
    other.close()


def test_engine_names_go_when_collected():
    seg, _ = EngineSegment.create("gc", 4096, 2, 0)
    assert len(names_of(os.getpid())) == 1
    del seg
    gc.collect()
    assert names_of(os.getpid()) == []


def test_forked_child_does_not_remove_the_parents_name():
    seg, _ = EngineSegment.create("fork", 4096, 2, 0)
    pid = os.fork()
    if pid == 0:  # the child: its exit and its collection of the copy must leave the parent's object alone
        try:
            seg.close()
            _shared_memory._unlink_all_at_exit()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert len(names_of(os.getpid())) == 1
    seg.close()


def test_unlinked_at_interpreter_exit(tmp_path):
    code = textwrap.dedent(
        """
        import os
        from mooncake.engine import SharedSegment
        keep = SharedSegment.create("exit", 4096, 2, 0)  # never completed, never closed
        print(os.getpid(), flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert names_of(int(out.stdout.split()[0])) == []


# ---- mooncake.shared_segment, one rank -----------------------------------------------------------------------


def test_layout_several_blocks_and_dtypes():
    spec = {
        "v": dict(count=3, shape=(5, 7), dtype=torch.bfloat16),
        "k": dict(count=3, shape=[5, 7], dtype=torch.bfloat16),
        "big": dict(count=2, shape=(3000,), dtype=torch.float32),  # 12000 bytes: three pages
        "flags": dict(count=4, shape=(3,), dtype=torch.bool),
        "ids": dict(count=1, shape=(2, 2), dtype=torch.int64),
        "fp8": dict(count=2, shape=(16,), dtype=torch.float8_e5m2),
    }
    seg = create_shared_segment("layout", spec, 1, 0)
    # Sorted names: big (3 pages), flags, fp8, ids, k, v (1 page each): an 8-page group, 4 groups (largest count).
    assert seg.total_size() == 8 * 4096 * 4
    firsts = {"big": 0, "flags": 3, "fp8": 4, "ids": 5, "k": 6, "v": 7}
    base = seg.base_addr()
    for name, first in firsts.items():
        ts = seg.tensors(name)
        assert len(ts) == spec[name]["count"]
        for i, t in enumerate(ts):
            assert t.data_ptr() - base == first * 4096 + i * 8 * 4096
            assert t.dtype == spec[name]["dtype"] and list(t.shape) == list(spec[name]["shape"])
            assert t.device.type == "cpu" and t.is_contiguous()
            assert not t.view(torch.uint8).any()  # fresh pages are zero
    k0 = seg.tensors("k")[0]
    k0.copy_(torch.arange(35, dtype=torch.bfloat16).view(5, 7))
    raw = (ctypes.c_uint8 * k0.numel() * 2).from_address(base + 6 * 4096)
    assert torch.equal(torch.frombuffer(raw, dtype=torch.bfloat16).view(5, 7), k0)
    assert torch.equal(seg.tensors("k")[0], k0)  # a second call sees the same memory


def test_dict_order_does_not_change_the_layout():
    a = create_shared_segment("order", {"x": dict(count=2, shape=(9,), dtype=torch.int32),
                                        "y": dict(count=3, shape=(99,), dtype=torch.int8)}, 1, 0)  # fmt: skip
    b = create_shared_segment("order", {"y": dict(count=3, shape=(99,), dtype=torch.int8),
                                        "x": dict(count=2, shape=(9,), dtype=torch.int32)}, 1, 0)  # fmt: skip

    def offsets(s):
        return [t.data_ptr() - s.base_addr() for n in "xy" for t in s.tensors(n)]

    assert offsets(a) == offsets(b) == [0, 8192, 4096, 12288, 20480]


def test_tensors_keep_the_memory_alive():
    seg = create_shared_segment("alive", blocks(), 1, 0)
    ts = seg.tensors("v")
    assert ts[1]._mooncake_segment is seg
    del seg
    gc.collect()
    ts[1].fill_(2.5)
    assert float(ts[1].sum()) == 2.5 * 32


def test_no_name_left_while_alive_and_nothing_mapped_after():
    seg = create_shared_segment("gone", blocks(), 1, 0)
    assert names_of(os.getpid()) == []  # removed as soon as the (single) rank completed
    with open("/proc/self/maps") as f:
        assert sum(f"mcrs_ss_{os.getpid()}_" in line for line in f) == 1
    del seg
    gc.collect()
    with open("/proc/self/maps") as f:
        assert sum(f"mcrs_ss_{os.getpid()}_" in line for line in f) == 0


f32 = torch.float32


@pytest.mark.parametrize(
    "spec, kwargs, exc",
    [
        ({}, {}, SharedSegmentError),
        ({"k": dict(shape=(4,), dtype=f32)}, {}, SharedSegmentError),
        ({"k": dict(count=1, dtype=f32)}, {}, SharedSegmentError),
        ({"k": dict(count=1, shape=(4,))}, {}, SharedSegmentError),
        ({"k": dict(count=0, shape=(4,), dtype=f32)}, {}, SharedSegmentError),
        ({"k": dict(count=1, shape=(), dtype=f32)}, {}, SharedSegmentError),
        ({"k": dict(count=1, shape=(4, 0), dtype=f32)}, {}, SharedSegmentError),
        ({"k": dict(count=1, shape=4, dtype=f32)}, {}, SharedSegmentError),
        ({"k": dict(count="many", shape=(4,), dtype=f32)}, {}, ValueError),
        ({"k": dict(count=1, shape=(4,), dtype="float32")}, {}, TypeError),
        ({"k": dict(count=1 << 20, shape=(1 << 30,), dtype=torch.float64)}, {}, SharedSegmentError),
        (blocks(), {"mmap": False}, SharedSegmentError),
        (blocks(), {"host_register": True}, SharedSegmentError),
        (blocks(), {"mmap": False, "host_register": True}, SharedSegmentError),
        (blocks(), {"rank_id": 1}, SharedSegmentError),
        (blocks(), {"owner_rank": 1}, SharedSegmentError),
        (blocks(), {"world_size": 2}, SharedSegmentError),
        (blocks(), {"world_size": 0}, SharedSegmentError),
        (blocks(), {"comm_group": object(), "tp_group": object()}, SharedSegmentError),
    ],
)
def test_bad_arguments(spec, kwargs, exc):
    with pytest.raises(exc):
        create_shared_segment("bad", spec, **{"world_size": 1, "rank_id": 0, **kwargs})


def test_unknown_block_and_group_aliases():
    group = object()
    seg = create_shared_segment("alias", blocks(), 1, 0, comm_group=group, tp_group=group)
    with pytest.raises(SharedSegmentError, match="no block 'q'"):
        seg.tensors("q")
    assert isinstance(seg, SharedSegment)
    assert create_shared_segment("alias", blocks(), 1, 0, tp_group=group).total_size() == seg.total_size()


# ---- several ranks ---------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import datetime, json, os, signal, sys, time
    import torch
    import torch.distributed as dist
    from mooncake.shared_segment import SharedSegmentError, create_shared_segment

    rank, world, port, what = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank,
                            timeout=datetime.timedelta(seconds=120))
    out = {}
    blocks = {"k": dict(count=3, shape=(6, 10), dtype=torch.bfloat16),
              "v": dict(count=3, shape=(6, 10), dtype=torch.bfloat16),
              "pos": dict(count=1, shape=(5,), dtype=torch.int64)}

    def expected(name, i):
        n = 1
        for d in blocks[name]["shape"]:
            n *= d
        return (torch.arange(n) * (i + 1) + len(name)).to(blocks[name]["dtype"]).view(blocks[name]["shape"])

    def names(pid):
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"mcrs_ss_{pid}_")]

    if what in ("share", "killed"):
        owner = world - 1
        seg = create_shared_segment("kv", blocks, world, rank, owner_rank=owner, comm_group=dist.group.WORLD)
        pids = [None] * world
        dist.all_gather_object(pids, os.getpid())
        out["names while alive"] = len(names(pids[owner]))
        if rank == owner:
            for name in blocks:
                for i, t in enumerate(seg.tensors(name)):
                    t.copy_(expected(name, i))
        dist.barrier()
        out["reads what the owner wrote"] = all(
            torch.equal(t, expected(name, i)) for name in blocks for i, t in enumerate(seg.tensors(name)))
        out["offsets"] = {n: [t.data_ptr() - seg.base_addr() for t in seg.tensors(n)] for n in sorted(blocks)}
        out["total"] = seg.total_size()
        if what == "share":
            dist.barrier()
            if rank == 0:
                seg.tensors("pos")[0].copy_(torch.tensor([5, 4, 3, 2, 1]))
            dist.barrier()
            out["reads what rank 0 wrote"] = seg.tensors("pos")[0].tolist()
            dist.barrier()
        else:
            dist.barrier()
            if rank == owner:
                os.kill(os.getpid(), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with open(f"/proc/{pids[owner]}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                            break
                except FileNotFoundError:
                    break
                time.sleep(0.05)
            out["reads after the owner died"] = all(
                torch.equal(t, expected(name, i)) for name in blocks for i, t in enumerate(seg.tensors(name)))
            print(json.dumps(out), flush=True)
            os._exit(0)
    elif what == "disagree":
        for label, change in [("shape", {"blocks": {**blocks, "k": dict(count=3, shape=(6, 11),
                                                                        dtype=torch.bfloat16)}}),
                              ("owner", {"owner_rank": 1}), ("name", {"name": "other"}),
                              ("bad rank", {"rank_id": 9})]:
            args = dict(name="kv", blocks=blocks, world_size=world, rank_id=rank, comm_group=dist.group.WORLD)
            if rank == 1:
                args.update(change)
            try:
                create_shared_segment(**args)
                out[label] = "no error"
            except SharedSegmentError as e:
                out[label] = str(e)
            dist.barrier()
    print(json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: torch's gloo threads sometimes abort it ("terminate called without an active
    # exception"), which has nothing to do with what is tested here.
    os._exit(0)
    """
)


def run_ranks(tmp_path, what: str, world: int) -> list:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(world), str(port), what],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for r in range(world)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            results.append((p.pid, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    leftovers = [n for pid, *_ in results for n in names_of(pid)]
    for n in leftovers:
        os.unlink("/dev/shm/" + n)
    assert leftovers == [], "ranks left shared-memory objects behind"
    return results


def test_ranks_share_one_copy(tmp_path):
    results = run_ranks(tmp_path, "share", 3)
    outs = []
    for pid, rc, out, err in results:
        assert rc == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for rank, out in enumerate(outs):
        assert out["names while alive"] == 0, rank
        assert out["reads what the owner wrote"] is True, rank
        assert out["reads what rank 0 wrote"] == [5, 4, 3, 2, 1], rank
        assert out["offsets"] == {"k": [0, 12288, 24576], "pos": [4096], "v": [8192, 20480, 32768]}
        assert out["total"] == 3 * 12288


def test_ranks_that_disagree_all_fail(tmp_path):
    results = run_ranks(tmp_path, "disagree", 2)
    outs = []
    for pid, rc, out, err in results:
        assert rc == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for out in outs:
        for label in ("shape", "owner", "name"):
            assert "complete failed" in out[label] and "rank 0: " in out[label] and "rank 1: " in out[label], label
        assert "create failed" in out["bad rank"] and "rank 9: " in out["bad rank"]
    assert outs[0] == outs[1]  # every rank raises the same error


def test_peer_keeps_the_data_when_the_owner_is_killed(tmp_path):
    results = run_ranks(tmp_path, "killed", 2)
    (_, owner_rc, _, _), (_, peer_rc, peer_out, peer_err) = results[1], results[0]
    assert owner_rc == -signal.SIGKILL
    assert peer_rc == 0, peer_err[-3000:]
    out = json.loads(peer_out.strip().splitlines()[-1])
    assert out["names while alive"] == 0
    assert out["reads what the owner wrote"] is True and out["reads after the owner died"] is True
