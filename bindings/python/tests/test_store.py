"""The store surface of docs/python-api.md: `mooncake.store`, `mooncake.mooncake_config` and
`mooncake.http_metadata_server`, against a real `mooncake_master` on free ports.

Error codes (store/core/src/types.rs): -10 BUFFER_OVERFLOW, -600 INVALID_PARAMS, -704 OBJECT_NOT_FOUND,
-705 OBJECT_ALREADY_EXISTS, -900 RPC_FAIL, -901 RPC_TIMEOUT, -1010 UNAVAILABLE_IN_CURRENT_STATUS,
-1012 NOT_SUPPORTED.
"""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import Master, free_port, stop, wait_port
from mooncake.store import (
    BufferHandle,
    MooncakeDistributedStore,
    MooncakeHostMemAllocator,
    ReplicaDescriptor,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
)

MiB = 1 << 20
UNAVAILABLE = -1010
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
NOT_SUPPORTED = -1012


def pattern(n: int, seed: int) -> np.ndarray:
    """n deterministic bytes that differ per seed."""
    return ((np.arange(n, dtype=np.uint64) * (2 * seed + 1) + seed) % 251).astype(np.uint8)


def setup_dict(master, **extra):
    d = {
        "local_hostname": "127.0.0.1",
        "metadata_server": "P2PHANDSHAKE",
        "global_segment_size": "64MB",
        "local_buffer_size": "16MB",
        "protocol": "tcp",
        "rdma_devices": "",
        "master_server_addr": master.address,
    }
    d.update(extra)
    return d


@pytest.fixture
def pool(store):
    """A 4 MiB numpy array registered with `store` (unregistered after the test)."""
    arr = np.zeros(4 * MiB, dtype=np.uint8)
    assert store.register_buffer(arr.ctypes.data, arr.nbytes) == 0
    yield arr
    store.unregister_buffer(arr.ctypes.data)


# ---- setup / lifecycle -----------------------------------------------------------------------


def test_setup_positional_with_size_strings(master):
    s = MooncakeDistributedStore()
    try:
        assert s.setup("127.0.0.1", "P2PHANDSHAKE", "64MB", "16MB", "tcp", "", master.address) == 0
        assert s.health_check() == 0
        assert s.put("k", b"v") == 0
        assert s.get("k") == b"v"
    finally:
        assert s.close() == 0


def test_setup_dict_and_hostname(master):
    s = MooncakeDistributedStore()
    assert s.get_hostname() == ""
    try:
        assert s.setup(setup_dict(master)) == 0
        host = s.get_hostname()
        assert host.startswith("127.0.0.1:"), host
        # A host name without a port gets one from upstream's store range.
        assert 12300 <= int(host.rsplit(":", 1)[1]) <= 14300, host
        assert s.health_check() == 0
        # A second setup on a set-up client is refused.
        assert s.setup(setup_dict(master)) < 0
        assert s.put("k", bytearray(b"dict")) == 0
        assert s.get("k") == b"dict"
    finally:
        s.close()


def test_setup_dict_int_sizes(master):
    s = MooncakeDistributedStore()
    try:
        assert s.setup(setup_dict(master, global_segment_size=32 * MiB, local_buffer_size=16 * MiB)) == 0
        assert s.put("k", b"x" * 1000) == 0
        assert s.get_size("k") == 1000
    finally:
        s.close()


def test_health_check_and_close():
    m = Master()
    s = MooncakeDistributedStore()
    try:
        assert s.health_check() == 1
        assert s.setup(setup_dict(m)) == 0
        assert s.health_check() == 0
        assert s.close() == 0
        assert s.health_check() == 1
        assert s.get_hostname() == ""
        assert s.close() == 0  # idempotent
    finally:
        s.close()
        m.stop()


def test_health_check_master_stopped():
    m = Master()
    s = MooncakeDistributedStore()
    try:
        assert s.setup(setup_dict(m)) == 0
        assert s.health_check() == 0
        m.stop()
        deadline = time.monotonic() + 30
        hc = s.health_check()
        while hc != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            hc = s.health_check()
        assert hc == 2
    finally:
        m.stop()
        t = threading.Thread(target=s.close, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "close() hangs when the master is gone"


def test_setup_absent_master_fails_fast():
    s = MooncakeDistributedStore()
    d = {
        "local_hostname": "127.0.0.1",
        "metadata_server": "P2PHANDSHAKE",
        "global_segment_size": "16MB",
        "local_buffer_size": "16MB",
        "protocol": "tcp",
        "master_server_addr": f"127.0.0.1:{free_port()}",
        "setup_timeout_ms": 2000,
    }
    t0 = time.monotonic()
    rc = s.setup(d)
    elapsed = time.monotonic() - t0
    assert rc < 0 and rc in (-900, -901), rc
    assert elapsed < 20, elapsed  # generous "does not hang" bound for a 2 s setup timeout
    assert s.health_check() == 1
    assert s.put("k", b"v") == UNAVAILABLE
    s.close()


def test_setup_unknown_protocol(master):
    s = MooncakeDistributedStore()
    assert s.setup("127.0.0.1", "P2PHANDSHAKE", 16 * MiB, 16 * MiB, "no-such-protocol", "", master.address) < 0
    assert s.health_check() == 1
    s.close()


def test_setup_dummy_against_something_else_than_a_real_client(master):
    # The master's RPC port speaks another service: the handshake says so and setup_dummy fails with -900.
    s = MooncakeDistributedStore()
    assert s.setup_dummy(16 * MiB, 16 * MiB, master.address) == -900
    assert s.health_check() == 1


def test_setup_bad_argument_types(master):
    s = MooncakeDistributedStore()
    with pytest.raises((TypeError, ValueError)):
        s.setup("127.0.0.1", "P2PHANDSHAKE", "lots", 16 * MiB, "tcp", "", master.address)
    with pytest.raises(TypeError):
        s.setup("127.0.0.1", "P2PHANDSHAKE", 1.5, 16 * MiB, "tcp", "", master.address)
    assert s.health_check() == 1


# ---- calls before setup / after close ----------------------------------------------------------


def _assert_unavailable(s):
    arr = np.zeros(4096, dtype=np.uint8)
    p = arr.ctypes.data
    assert s.put("k", b"v") == UNAVAILABLE
    assert s.put_parts("k", b"a", b"b") == UNAVAILABLE
    assert s.upsert("k", b"v") == UNAVAILABLE
    assert s.upsert_parts("k", b"a") == UNAVAILABLE
    assert s.put_batch(["a", "b"], [b"1", b"2"]) == UNAVAILABLE
    assert s.upsert_batch(["a", "b"], [b"1", b"2"]) == UNAVAILABLE
    assert s.get("k") == b""
    assert s.get_batch(["a", "b"]) == [b"", b""]
    assert s.get_buffer("k") is None
    assert s.batch_get_buffer(["a", "b"]) == [None, None]
    assert s.register_buffer(p, arr.nbytes) == UNAVAILABLE
    assert s.unregister_buffer(p) == UNAVAILABLE
    assert s.put_from("k", p, 16) == UNAVAILABLE
    assert s.upsert_from("k", p, 16) == UNAVAILABLE
    assert s.get_into("k", p, 16) == UNAVAILABLE
    assert s.batch_put_from(["a", "b"], [p, p + 16], [16, 16]) == [UNAVAILABLE] * 2
    assert s.batch_upsert_from(["a", "b"], [p, p + 16], [16, 16]) == [UNAVAILABLE] * 2
    assert s.batch_get_into(["a", "b"], [p, p + 16], [16, 16]) == [UNAVAILABLE] * 2
    assert s.batch_put_from_multi_buffers(["a", "b"], [[p], [p + 16]], [[16], [16]]) == [UNAVAILABLE] * 2
    assert s.batch_get_into_multi_buffers(["a", "b"], [[p], [p + 16]], [[16], [16]]) == [UNAVAILABLE] * 2
    assert s.get_into_ranges([p], [["a"]], [[[0]]], [[[0]]], [[[4]]]) == [[[UNAVAILABLE]]]
    assert s.is_exist("k") == UNAVAILABLE
    assert s.batch_is_exist(["a", "b", "c"]) == [UNAVAILABLE] * 3
    assert s.get_size("k") == UNAVAILABLE
    assert s.get_replica_desc("k") == []
    assert s.batch_get_replica_desc(["a"]) == {}
    assert s.remove("k") == UNAVAILABLE
    assert s.remove_by_regex(".*") == UNAVAILABLE
    assert s.remove_all() == UNAVAILABLE
    assert s.batch_remove(["a", "b"]) == [UNAVAILABLE] * 2


def test_calls_before_setup():
    s = MooncakeDistributedStore()
    _assert_unavailable(s)
    assert s.health_check() == 1


def test_calls_after_close(master):
    s = MooncakeDistributedStore()
    assert s.setup(setup_dict(master)) == 0
    assert s.put("k", b"v") == 0
    s.close()
    _assert_unavailable(s)


# ---- bytes API ------------------------------------------------------------------------------------


def test_put_get_value_types(store):
    arr = pattern(10000, 3)
    values = {
        "bytes": b"hello bytes",
        "bytearray": bytearray(b"hello bytearray"),
        "memoryview": memoryview(b"xxhello memoryview")[2:],
        "numpy": arr,
        "numpy2d": np.arange(12, dtype=np.float32).reshape(3, 4),
        "empty": b"",
    }
    for k, v in values.items():
        rc = store.put(k, v)
        if k == "empty":
            assert rc in (0, INVALID_PARAMS), rc  # upstream refuses empty values
            continue
        assert rc == 0, (k, rc)
    assert store.get("bytes") == b"hello bytes"
    assert store.get("bytearray") == b"hello bytearray"
    assert store.get("memoryview") == b"hello memoryview"
    assert store.get("numpy") == arr.tobytes()
    assert store.get("numpy2d") == np.arange(12, dtype=np.float32).tobytes()
    assert store.get_size("numpy") == 10000
    assert store.get_size("numpy2d") == 48


def test_get_missing_and_errors(store):
    assert store.get("missing") == b""
    assert store.is_exist("missing") == 0
    assert store.get_size("missing") == OBJECT_NOT_FOUND
    assert store.get_buffer("missing") is None
    assert store.get_replica_desc("missing") == []
    assert store.remove("missing") == OBJECT_NOT_FOUND
    assert store.put("dup", b"one") == 0
    # As upstream: putting an existing key is not an error; the stored value stays (upsert replaces it).
    assert store.put("dup", b"two") == 0
    assert store.get("dup") == b"one"
    assert store.is_exist("dup") == 1


def test_type_errors(store):
    with pytest.raises(TypeError):
        store.put(5, b"v")
    with pytest.raises(TypeError):
        store.put(b"bytes-key", b"v")
    with pytest.raises(TypeError):
        store.get(None)
    with pytest.raises(TypeError):
        store.put("k", 5)
    with pytest.raises(TypeError):
        store.put("k", "a str is not bytes")
    with pytest.raises(TypeError):
        store.upsert("k", 1.5)
    with pytest.raises(TypeError):
        store.put_batch(["a", 1], [b"x", b"y"])
    with pytest.raises(TypeError):
        store.put_batch(["a"], [7])
    with pytest.raises(TypeError):
        store.batch_is_exist([1, 2])
    with pytest.raises(TypeError):
        store.get_batch(["a", None])
    with pytest.raises(TypeError):
        store.batch_remove([b"a"])
    with pytest.raises(TypeError):
        store.is_exist(3)
    with pytest.raises(TypeError):
        store.put_from("k", "not an address", 4)
    with pytest.raises(TypeError):
        store.get_into("k", 0, "4")
    # Nothing was stored by the refused calls.
    assert store.is_exist("k") == 0
    assert store.is_exist("a") == 0


def test_non_contiguous_value_refused(store):
    arr = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises((BufferError, TypeError, ValueError)):
        store.put("k", arr)
    assert store.is_exist("k") == 0


def test_put_parts(store):
    parts = [b"ab", bytearray(b"cd"), memoryview(b"ef"), np.frombuffer(b"gh", dtype=np.uint8)]
    assert store.put_parts("p", *parts) == 0
    assert store.get("p") == b"abcdefgh"
    assert store.put_parts("p", b"x") == 0
    assert store.get("p") == b"abcdefgh"
    cfg = ReplicateConfig()
    assert store.put_parts("p2", b"1", b"2", config=cfg) == 0
    assert store.get("p2") == b"12"


def test_put_batch_get_batch(store):
    keys = [f"b{i}" for i in range(20)]
    values = [pattern(1000 + i, i).tobytes() for i in range(20)]
    assert store.put_batch(keys, values) == 0
    assert store.get_batch(keys) == values
    assert store.get_batch(keys[:2] + ["nope"]) == values[:2] + [b""]
    assert store.batch_is_exist(keys + ["nope"]) == [1] * 20 + [0]
    # Length mismatch is a negative code, not an exception.
    assert store.put_batch(["x", "y"], [b"1"]) < 0
    # Putting existing keys again succeeds and keeps the stored values.
    assert store.put_batch(keys[:2], [b"a", b"b"]) == 0
    assert store.get_batch(keys[:2]) == values[:2]


def test_upsert_family(store):
    assert store.upsert("u", b"first") == 0
    assert store.get("u") == b"first"
    assert store.upsert("u", b"second, longer value") == 0
    assert store.get("u") == b"second, longer value"
    assert store.get_size("u") == len(b"second, longer value")
    assert store.upsert_batch(["u", "u2"], [b"3", bytearray(b"4")]) == 0
    assert store.get_batch(["u", "u2"]) == [b"3", b"4"]
    assert store.upsert_parts("u", b"p", b"q", b"r") == 0
    assert store.get("u") == b"pqr"
    assert store.upsert_parts("u3", b"new") == 0
    assert store.get("u3") == b"new"


def test_get_buffer(store):
    data = pattern(5000, 7).tobytes()
    assert store.put("k", data) == 0
    h = store.get_buffer("k")
    assert isinstance(h, BufferHandle)
    assert h.size() == 5000 and h.len() == 5000 and len(h) == 5000
    assert h.ptr() != 0
    mv = memoryview(h)
    assert mv.readonly and mv.nbytes == 5000
    assert bytes(mv) == data
    assert np.frombuffer(h, dtype=np.uint8).tobytes() == data
    del h  # the view keeps the memory alive
    assert bytes(mv) == data
    assert store.put("k2", b"second") == 0
    hs = store.batch_get_buffer(["k", "missing", "k2"])
    assert hs[1] is None
    assert bytes(memoryview(hs[0])) == data
    assert bytes(memoryview(hs[2])) == b"second"
    assert hs[2].size() == 6


# ---- zero-copy ------------------------------------------------------------------------------------


def test_register_unregister(store):
    arr = np.zeros(MiB, dtype=np.uint8)
    assert store.register_buffer(arr.ctypes.data, arr.nbytes) == 0
    assert store.unregister_buffer(arr.ctypes.data) == 0
    assert store.unregister_buffer(arr.ctypes.data) < 0  # not registered any more
    # The array object itself as buffer_ptr (size taken from it).
    assert store.register_buffer(arr) == 0
    assert store.unregister_buffer(arr) == 0
    assert store.register_buffer(arr.ctypes.data, -1) < 0
    with pytest.raises(TypeError):
        store.register_buffer(arr.ctypes.data)  # an int address needs a size


def test_put_from_get_into_ints(store, pool):
    src = pattern(100000, 11)
    pool[:100000] = src
    base = pool.ctypes.data
    assert store.put_from("z", base, 100000) == 0
    assert store.get_size("z") == 100000
    assert store.get("z") == src.tobytes()
    dst = base + MiB
    assert store.get_into("z", dst, 200000) == 100000
    assert np.array_equal(pool[MiB : MiB + 100000], src)
    # Too small a buffer: negative, nothing read.
    assert store.get_into("z", dst, 99999) < 0
    assert store.get_into("missing", dst, 1000) == OBJECT_NOT_FOUND
    assert store.put_from("z", base, 10) == 0
    assert store.get_size("z") == 100000
    # Negative sizes.
    assert store.put_from("neg", base, -1) < 0
    assert store.get_into("z", dst, -5) < 0
    assert store.is_exist("neg") == 0


def test_put_from_get_into_array_objects(store):
    src = pattern(65536, 5)
    dst = np.zeros(65536, dtype=np.uint8)
    assert store.register_buffer(src) == 0
    assert store.register_buffer(dst) == 0
    try:
        assert store.put_from("arr", src, src.nbytes) == 0
        assert store.get_into("arr", dst, dst.nbytes) == 65536
        assert np.array_equal(src, dst)
        # Read-only destination buffers are refused before anything is written.
        ro = np.zeros(65536, dtype=np.uint8)
        ro.flags.writeable = False
        with pytest.raises((BufferError, TypeError, ValueError)):
            store.get_into("arr", ro, ro.nbytes)
    finally:
        store.unregister_buffer(src)
        store.unregister_buffer(dst)


def test_unregistered_buffer(store):
    arr = pattern(4096, 2)
    assert store.put_from("k", arr.ctypes.data, 4096) == INVALID_PARAMS
    assert store.is_exist("k") == 0
    assert store.put("k", arr) == 0
    out = np.zeros(4096, dtype=np.uint8)
    assert store.get_into("k", out.ctypes.data, 4096) == INVALID_PARAMS
    assert store.batch_get_into(["k"], [out.ctypes.data], [4096]) == [INVALID_PARAMS]
    assert store.batch_put_from(["k2"], [arr.ctypes.data], [4096]) == [INVALID_PARAMS]
    assert not out.any()
    # Partly outside a registered buffer is refused too.
    small = np.zeros(1024, dtype=np.uint8)
    assert store.register_buffer(small) == 0
    try:
        assert store.get_into("k", small.ctypes.data, 4096) < 0
        assert store.put_from("k3", small.ctypes.data, 4096) < 0
    finally:
        store.unregister_buffer(small)


def test_batch_put_from_get_into(store, pool):
    n, size = 16, 64 * 1024
    base = pool.ctypes.data
    keys = [f"bp{i}" for i in range(n)]
    for i in range(n):
        pool[i * size : (i + 1) * size] = pattern(size, i)
    assert store.batch_put_from(keys, [base + i * size for i in range(n)], [size] * n) == [0] * n
    # Read back into the second MiB region, in reverse order, with bigger buffers.
    out = 2 * MiB
    res = store.batch_get_into(keys[::-1], [base + out + i * 2 * size for i in range(n)], [2 * size] * n)
    assert res == [size] * n
    for j, i in enumerate(range(n - 1, -1, -1)):
        assert np.array_equal(pool[out + j * 2 * size : out + j * 2 * size + size], pattern(size, i)), i
    # Per-key results: a missing key and a too-small buffer fail alone.
    res = store.batch_get_into([keys[0], "missing", keys[1]], [base + out, base + out + size, base + out + 2 * size], [size, size, size - 1])
    assert res[0] == size and res[1] == OBJECT_NOT_FOUND and res[2] < 0
    # Existing keys are kept (0, as upstream), new ones stored.
    res = store.batch_put_from([keys[0], "fresh"], [base, base], [size, size])
    assert res == [0, 0]
    # Mismatched lengths: per-key negative codes, no exception.
    res = store.batch_put_from(["x", "y"], [base], [size, size])
    assert len(res) == 2 and all(r < 0 for r in res)
    res = store.batch_get_into(["x", "y"], [base, base], [size])
    assert len(res) == 2 and all(r < 0 for r in res)
    # Negative size for one key.
    res = store.batch_put_from(["n1", "n2"], [base, base], [size, -1])
    assert res[0] == 0 and res[1] < 0


def test_batch_with_array_objects(store):
    a = pattern(8192, 1)
    b = pattern(8192, 2)
    outa = np.zeros_like(a)
    outb = np.zeros_like(b)
    for x in (a, b, outa, outb):
        assert store.register_buffer(x) == 0
    try:
        assert store.batch_put_from(["a", "b"], [a, b], [a.nbytes, b.nbytes]) == [0, 0]
        assert store.batch_get_into(["a", "b"], [outa, outb], [8192, 8192]) == [8192, 8192]
        assert np.array_equal(a, outa) and np.array_equal(b, outb)
    finally:
        for x in (a, b, outa, outb):
            store.unregister_buffer(x)


def test_multi_buffers(store, pool):
    base = pool.ctypes.data
    half = 128 * 1024
    n = 8
    keys = [f"mb{i}" for i in range(n)]
    ptrs, sizes = [], []
    for i in range(n):
        whole = pattern(2 * half, 100 + i)
        # Two pieces far apart in the pool.
        pool[i * half : (i + 1) * half] = whole[:half]
        pool[2 * MiB + i * half : 2 * MiB + (i + 1) * half] = whole[half:]
        ptrs.append([base + i * half, base + 2 * MiB + i * half])
        sizes.append([half, half])
    assert store.batch_put_from_multi_buffers(keys, ptrs, sizes) == [0] * n
    for i in range(n):
        assert store.get(keys[i]) == pattern(2 * half, 100 + i).tobytes()
    pool[:] = 0
    # Read back into two pieces each, the second piece first in memory.
    out_ptrs = [[base + 2 * MiB + i * half, base + i * half] for i in range(n)]
    assert store.batch_get_into_multi_buffers(keys, out_ptrs, sizes) == [2 * half] * n
    for i in range(n):
        whole = pattern(2 * half, 100 + i)
        assert np.array_equal(pool[2 * MiB + i * half : 2 * MiB + (i + 1) * half], whole[:half])
        assert np.array_equal(pool[i * half : (i + 1) * half], whole[half:])
    # Missing key and an undersized buffer list fail per key.
    res = store.batch_get_into_multi_buffers([keys[0], "missing", keys[1]], [[base], [base], [base]], [[2 * half], [10], [half]])
    assert res[0] == 2 * half and res[1] == OBJECT_NOT_FOUND and res[2] < 0


def test_upsert_from(store, pool):
    base = pool.ctypes.data
    pool[:1000] = pattern(1000, 1)
    assert store.upsert_from("uf", base, 1000) == 0
    pool[:3000] = pattern(3000, 2)
    assert store.upsert_from("uf", base, 3000) == 0
    assert store.get("uf") == pattern(3000, 2).tobytes()
    pool[MiB : MiB + 500] = pattern(500, 3)
    assert store.batch_upsert_from(["uf", "uf2"], [base + MiB, base], [500, 3000]) == [0, 0]
    assert store.get("uf") == pattern(500, 3).tobytes()
    assert store.get("uf2") == pattern(3000, 2).tobytes()


def test_get_into_ranges(store, pool):
    base = pool.ctypes.data
    a = pattern(1000, 1).tobytes()
    b = pattern(2000, 2).tobytes()
    assert store.put("ra", a) == 0
    assert store.put("rb", b) == 0
    res = store.get_into_ranges(
        [base, base + MiB],
        [["ra"], ["rb", "missing"]],
        [[[0, 100]], [[0, 500], [0]]],
        [[[10, 990]], [[1000, 0], [0]]],
        [[[50, 10]], [[20, 30], [4]]],
    )
    assert res[0] == [[50, 10]]
    assert res[1][0] == [20, 30]
    assert res[1][1][0] == OBJECT_NOT_FOUND
    assert bytes(pool[0:50]) == a[10:60]
    assert bytes(pool[100:110]) == a[990:1000]
    assert bytes(pool[MiB : MiB + 20]) == b[1000:1020]
    assert bytes(pool[MiB + 500 : MiB + 530]) == b[0:30]
    # A range past the end of the object is refused.
    res = store.get_into_ranges([base], [["ra"]], [[[0]]], [[[990]]], [[[11]]])
    assert res[0][0][0] < 0
    with pytest.raises(ValueError):
        store.get_into_ranges([base], [["ra"]], [[[0, 1]]], [[[0]]], [[[1]]])


# ---- queries and replicas -------------------------------------------------------------------------


def test_is_exist_and_sizes(store):
    assert store.put("e1", b"x" * 10) == 0
    assert store.put("e2", b"y" * 20) == 0
    assert store.is_exist("e1") == 1
    assert store.batch_is_exist(["e1", "nope", "e2"]) == [1, 0, 1]
    assert store.batch_is_exist([]) == []
    assert store.get_size("e2") == 20


def test_replica_desc(store):
    assert store.put("r", b"z" * 321) == 0
    reps = store.get_replica_desc("r")
    assert len(reps) == 1
    r = reps[0]
    assert isinstance(r, ReplicaDescriptor)
    assert r.status == ReplicaStatus.COMPLETE
    assert r.is_memory_replica()
    assert not r.is_disk_replica()
    md = r.get_memory_descriptor()
    assert md.buffer_descriptor.size == 321
    assert md.buffer_descriptor.buffer_address != 0
    assert md.buffer_descriptor.transport_endpoint == store.get_hostname()
    assert r.segment_name == store.get_hostname()
    assert store.put("r2", b"q" * 7) == 0
    d = store.batch_get_replica_desc(["r", "missing", "r2"])
    assert set(d) == {"r", "r2"}
    assert d["r2"][0].status == ReplicaStatus.COMPLETE
    assert d["r2"][0].get_memory_descriptor().buffer_descriptor.size == 7


def test_replicate_config_fields(store):
    cfg = ReplicateConfig()
    assert cfg.replica_num == 1
    assert cfg.with_hard_pin is False
    assert cfg.preferred_segments == []
    assert cfg.soft_pin_action == SoftPinAction.PRESERVE
    assert cfg.with_soft_pin is False
    cfg.with_soft_pin = True
    assert cfg.soft_pin_action == SoftPinAction.ENABLE and cfg.with_soft_pin
    cfg.soft_pin_action = SoftPinAction.DISABLE
    assert cfg.with_soft_pin is False
    cfg.with_hard_pin = True
    cfg.replica_num = 1
    cfg.preferred_segments = [store.get_hostname()]
    assert cfg.preferred_segments == [store.get_hostname()]
    assert "ReplicateConfig" in repr(cfg)
    assert store.put("hp", b"pinned", cfg) == 0
    assert store.get("hp") == b"pinned"
    assert store.get_replica_desc("hp")[0].segment_name == store.get_hostname()
    cfg2 = ReplicateConfig()
    cfg2.soft_pin_action = SoftPinAction.ENABLE
    cfg2.preferred_segment = store.get_hostname()
    assert store.put("sp", b"soft", config=cfg2) == 0
    assert store.put_batch(["c1", "c2"], [b"1", b"2"], cfg2) == 0
    assert store.upsert("c1", b"11", cfg) == 0
    assert store.get_batch(["sp", "c1", "c2"]) == [b"soft", b"11", b"2"]


# ---- removal --------------------------------------------------------------------------------------


def test_remove_family(store):
    for i in range(5):
        assert store.put(f"rm_a{i}", b"a") == 0
        assert store.put(f"rm_b{i}", b"b") == 0
    assert store.put("other", b"o") == 0
    # Freshly written objects carry no lease, so these need no force.
    assert store.remove("rm_a0") == 0
    assert store.is_exist("rm_a0") == 0
    assert store.remove("rm_a0") == OBJECT_NOT_FOUND
    assert store.remove_by_regex("^rm_a") == 4
    assert store.remove_by_regex("^rm_a") == 0
    assert store.batch_remove(["rm_b0", "missing", "rm_b1"]) == [0, OBJECT_NOT_FOUND, 0]
    # Reads grant a lease; force removes regardless.
    assert store.get("rm_b2") == b"b"
    assert store.remove("rm_b2", force=True) == 0
    assert store.remove_by_regex("^rm_b", force=True) == 2
    assert store.remove_all(force=True) == 1
    assert store.remove_all() == 0
    assert store.batch_is_exist(["other", "rm_b3"]) == [0, 0]


def test_remove_all_counts(store):
    keys = [f"k{i}" for i in range(30)]
    assert store.put_batch(keys, [b"v"] * 30) == 0
    assert store.remove_all(force=True) == 30
    assert store.batch_is_exist(keys) == [0] * 30
    assert store.remove_all() == 0


# ---- allocator ------------------------------------------------------------------------------------


def test_host_mem_allocator(store):
    alloc = MooncakeHostMemAllocator()
    p = alloc.alloc(2 * MiB)
    assert p != 0
    assert p % 4096 == 0
    assert store.register_buffer(p, 2 * MiB) == 0
    data = pattern(MiB, 9).tobytes()
    assert store.put("al", data) == 0
    assert store.get_into("al", p, 2 * MiB) == MiB
    import ctypes

    assert ctypes.string_at(p, MiB) == data
    assert store.put_from("al2", p + 100, 1000) == 0
    assert store.get("al2") == data[100:1100]
    assert store.unregister_buffer(p) == 0
    assert alloc.free(p) == 0
    assert alloc.free(p) == -1
    assert alloc.free(12345) == -1
    assert alloc.alloc(0) == 0


# ---- tensors without torch ------------------------------------------------------------------------


def test_tensor_methods_need_torch(store):
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch is installed")
    for call in (
        lambda: store.put_tensor("t", object()),
        lambda: store.get_tensor("t"),
        lambda: store.batch_put_tensor(["t"], [object()]),
        lambda: store.batch_get_tensor(["t"]),
        lambda: store.put_tensor_with_tp("t", object(), 0, 2),
    ):
        with pytest.raises(ImportError, match="(?i)torch"):
            call()


# ---- threads --------------------------------------------------------------------------------------


def test_threads_put_get(store):
    errors = []
    barrier = threading.Barrier(8)

    def work(t):
        try:
            barrier.wait(30)
            for i in range(100):
                key = f"t{t}_{i}"
                val = pattern(256 + i, t * 1000 + i).tobytes()
                rc = store.put(key, val)
                if rc != 0:
                    errors.append((key, "put", rc))
                    continue
                got = store.get(key)
                if got != val:
                    errors.append((key, "get", len(got)))
        except Exception as e:  # noqa: BLE001
            errors.append((t, "exc", repr(e)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
        assert not th.is_alive(), "a thread hangs"
    assert errors == []
    keys = [f"t{t}_{i}" for t in range(8) for i in range(100)]
    assert store.batch_is_exist(keys) == [1] * 800


# ---- MooncakeConfig -------------------------------------------------------------------------------


def test_config_from_file(tmp_path, master):
    from mooncake.mooncake_config import MooncakeConfig

    path = tmp_path / "mooncake.json"
    path.write_text(
        json.dumps(
            {
                "local_hostname": "127.0.0.1",
                "metadata_server": "P2PHANDSHAKE",
                "global_segment_size": "64MB",
                "local_buffer_size": "512MB",
                "protocol": "tcp",
                "device_name": "",
                "master_server_address": master.address,
            }
        )
    )
    cfg = MooncakeConfig.from_file(str(path))
    assert cfg.local_hostname == "127.0.0.1"
    assert cfg.metadata_server == "P2PHANDSHAKE"
    assert cfg.global_segment_size == 64 * MiB
    assert cfg.local_buffer_size == 512 * MiB
    assert cfg.protocol == "tcp"
    assert cfg.device_name == ""
    assert cfg.master_server_address == master.address
    d = cfg.to_setup_dict()
    assert d["master_server_addr"] == master.address
    d["local_buffer_size"] = 16 * MiB
    s = MooncakeDistributedStore()
    try:
        assert s.setup(d) == 0
        assert s.put("cfg", b"ok") == 0
        assert s.get("cfg") == b"ok"
    finally:
        s.close()


def test_config_from_file_defaults_and_missing(tmp_path):
    from mooncake.mooncake_config import MooncakeConfig

    p = tmp_path / "min.json"
    minimal = {"local_hostname": "h1", "metadata_server": "P2PHANDSHAKE", "master_server_address": "10.0.0.1:50051"}
    p.write_text(json.dumps(minimal))
    cfg = MooncakeConfig.from_file(str(p))
    assert cfg.local_hostname == "h1"
    assert cfg.protocol == "tcp"
    assert (cfg.enable_ssd_offload, cfg.ssd_offload_path, cfg.tenant_id) == (False, "", "default")
    assert (cfg.enable_client_http_server, cfg.client_http_port) == (False, 9300)
    assert cfg.global_segment_size > 0 and cfg.local_buffer_size > 0
    # Upstream requires all three.
    for missing in ("local_hostname", "master_server_address", "metadata_server"):
        d = dict(minimal)
        del d[missing]
        p.write_text(json.dumps(d))
        with pytest.raises(ValueError):
            MooncakeConfig.from_file(str(p))
    for bad in ({"global_segment_size": "lots"}, {"protocol": ""}, {"local_buffer_size": -1}, {"metadata_server": " "},
                {"enable_ssd_offload": "maybe"}):
        p.write_text(json.dumps(dict(minimal, **bad)))
        with pytest.raises(ValueError):
            MooncakeConfig.from_file(str(p))
    # Upstream's grammar: floats and exponents, units with or without "b"; the protocol is lower-cased; bools as words.
    p.write_text(json.dumps(dict(minimal, global_segment_size="1.5g", local_buffer_size="1e6", protocol=" RDMA ",
                                 enable_ssd_offload="on", tenant_id=7)))
    cfg = MooncakeConfig.from_file(str(p))
    assert (cfg.global_segment_size, cfg.local_buffer_size) == (3 << 29, 1_000_000)
    assert (cfg.protocol, cfg.enable_ssd_offload, cfg.tenant_id) == ("rdma", True, "7")


def test_config_load_from_env(monkeypatch, tmp_path):
    from mooncake.mooncake_config import MooncakeConfig

    for var in (
        "MOONCAKE_CONFIG_PATH",
        "MOONCAKE_MASTER",
        "MOONCAKE_PROTOCOL",
        "MOONCAKE_DEVICE",
        "MOONCAKE_TE_META_DATA_SERVER",
        "MOONCAKE_LOCAL_HOSTNAME",
        "MOONCAKE_GLOBAL_SEGMENT_SIZE",
        "MOONCAKE_LOCAL_BUFFER_SIZE",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError):
        MooncakeConfig.load_from_env()
    monkeypatch.setenv("MOONCAKE_MASTER", "127.0.0.1:50051")
    cfg = MooncakeConfig.load_from_env()
    assert cfg.master_server_address == "127.0.0.1:50051"
    assert cfg.protocol == "tcp"
    assert cfg.metadata_server == "P2PHANDSHAKE"
    assert cfg.local_hostname == "localhost"
    assert cfg.device_name == ""
    monkeypatch.setenv("MOONCAKE_PROTOCOL", "rdma")
    monkeypatch.setenv("MOONCAKE_DEVICE", "mlx5_0")
    monkeypatch.setenv("MOONCAKE_TE_META_DATA_SERVER", "http://10.0.0.1:8080/metadata")
    monkeypatch.setenv("MOONCAKE_LOCAL_HOSTNAME", "10.0.0.2")
    monkeypatch.setenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", "512MB")
    monkeypatch.setenv("MOONCAKE_LOCAL_BUFFER_SIZE", "1GB")
    cfg = MooncakeConfig.load_from_env()
    assert cfg.protocol == "rdma"
    assert cfg.device_name == "mlx5_0"
    assert cfg.metadata_server == "http://10.0.0.1:8080/metadata"
    assert cfg.local_hostname == "10.0.0.2"
    assert cfg.global_segment_size == 512 * MiB
    assert cfg.local_buffer_size == 1 << 30
    # MOONCAKE_CONFIG_PATH wins over the variables.
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"local_hostname": "h", "metadata_server": "P2PHANDSHAKE", "master_server_address": "1.2.3.4:5",
                             "global_segment_size": 4096}))
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(p))
    cfg = MooncakeConfig.load_from_env()
    assert cfg.master_server_address == "1.2.3.4:5"
    assert cfg.global_segment_size == 4096


# ---- HTTP metadata server -------------------------------------------------------------------------


def _http(method, url, data=None):
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_kv_bootstrap_server_with_engines():
    from mooncake.engine import TransferEngine
    from mooncake.http_metadata_server import KVBootstrapServer

    port = free_port()
    server = KVBootstrapServer(port, "127.0.0.1")
    ea, eb = TransferEngine(), TransferEngine()
    try:
        server.run()
        assert server.is_running()
        wait_port(port)
        url = f"http://127.0.0.1:{port}/metadata"
        status, _ = _http("GET", url + "?key=nothing_here")
        assert status == 404
        name_a = f"127.0.0.1:{free_port()}"
        name_b = f"127.0.0.1:{free_port()}"
        assert ea.initialize(name_a, url, "tcp", "") == 0
        assert eb.initialize(name_b, url, "tcp", "") == 0
        src = pattern(MiB, 42)
        assert ea.register_memory(src.ctypes.data, src.nbytes) == 0
        assert eb.get_first_buffer_address(name_a) == src.ctypes.data
        dst = np.zeros(MiB, dtype=np.uint8)
        assert eb.register_memory(dst.ctypes.data, dst.nbytes) == 0
        assert eb.transfer_sync_read(name_a, dst.ctypes.data, src.ctypes.data, MiB) == 0
        assert np.array_equal(src, dst)
        # And a write back the other way.
        dst[:] = pattern(MiB, 43)
        assert eb.transfer_sync_write(name_a, dst.ctypes.data, src.ctypes.data, 4096) == 0
        assert np.array_equal(src[:4096], pattern(4096 * 1, 43)[:4096])
    finally:
        ea.shutdown()
        eb.shutdown()
        server.close()
    assert not server.is_running()
    server.close()  # idempotent


def test_http_metadata_server_module_subprocess():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mooncake.http_metadata_server", "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(port, timeout=30, proc=proc)
        url = f"http://127.0.0.1:{port}/metadata"
        status, _ = _http("GET", url + "?key=x")
        assert status == 404
        status, _ = _http("PUT", url + "?key=x", b'{"a": 1}')
        assert status == 200
        status, body = _http("GET", url + "?key=x")
        assert status == 200 and body == b'{"a": 1}'
        status, _ = _http("DELETE", url + "?key=x")
        assert status == 200
        status, _ = _http("GET", url + "?key=x")
        assert status == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop(proc)


# ---- edge cases -----------------------------------------------------------------------------------


def test_value_larger_than_local_buffer(store):
    # The fixture's local buffer is 16 MiB; a 20 MiB value still goes through put/get/get_buffer.
    big = pattern(20 * MiB, 77)
    assert store.put("big", big) == 0
    assert store.get_size("big") == 20 * MiB
    assert store.get("big") == big.tobytes()
    h = store.get_buffer("big")
    assert h.size() == 20 * MiB
    assert np.array_equal(np.frombuffer(h, dtype=np.uint8), big)


def test_segment_full_returns_codes(store):
    # A value bigger than every segment, then 80 MiB into a 64 MiB segment: codes (0 or negative), never raises.
    assert store.put("huge", np.zeros(70 * MiB, dtype=np.uint8)) < 0
    assert store.is_exist("huge") == 0
    chunk = np.zeros(MiB, dtype=np.uint8)
    rcs = [store.put(f"fill{i}", chunk) for i in range(80)]
    assert rcs[0] == 0
    assert all(rc <= 0 for rc in rcs)
    # Whether some of these fail depends on how fast the master's eviction keeps up.
    # The master may evict older objects to make room; whatever is still there reads back whole.
    keys = [f"fill{i}" for i, rc in enumerate(rcs) if rc == 0]
    exist = store.batch_is_exist(keys)
    assert all(e in (0, 1) for e in exist)
    for k, e in zip(keys, exist):
        if e == 1:
            got = store.get(k)
            assert got in (b"", chunk.tobytes())  # b"" only if evicted in between


def test_odd_keys_and_patterns(store):
    assert store.put("", b"x") < 0
    assert store.get("") == b""
    assert store.is_exist("") <= 0
    assert store.put("ключ/🙂 with spaces", b"u") == 0
    assert store.get("ключ/🙂 with spaces") == b"u"
    long_key = "k" * 4096
    assert store.put(long_key, b"l") == 0
    assert store.get(long_key) == b"l"
    assert store.remove_by_regex("([") < 0  # an invalid regular expression is a code, not an exception
    assert store.batch_put_from([], [], []) == []
    assert store.batch_get_into([], [], []) == []


def test_close_while_other_threads_call(master):
    s = MooncakeDistributedStore()
    assert s.setup(setup_dict(master)) == 0
    results, errors = [], []
    stop_flag = threading.Event()
    started = threading.Barrier(5)

    def work(t):
        try:
            started.wait(30)
            i = 0
            while not stop_flag.is_set():
                key = f"cl{t}_{i}"
                results.append(s.put(key, b"abc"))
                got = s.get(key)
                if got not in (b"", b"abc"):
                    errors.append((key, got))
                results.extend(s.batch_is_exist([key]))
                i += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    started.wait(30)
    while len(results) < 40:
        time.sleep(0.01)
    assert s.close() == 0
    n = len(results)
    deadline = time.monotonic() + 30
    while len(results) < n + 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop_flag.set()
    for th in threads:
        th.join(60)
        assert not th.is_alive(), "a call hangs after close()"
    assert errors == []
    assert set(results) <= {0, 1, UNAVAILABLE}, set(results)
    assert results[-1] == UNAVAILABLE


def test_buffer_objects_bound_the_size_they_are_given_with(store):
    """A buffer object passed as an address caps the size: no call reads or writes past its end."""
    pool = np.zeros(1 << 20, dtype=np.uint8)
    assert store.register_buffer(pool) == 0
    try:
        assert store.put("cap-k", b"z" * 1000) == 0
        assert store.get_into("cap-k", pool[:10], 1000) == -600
        assert not pool[10:1000].any()
        assert store.put_from("cap-k2", pool[:10], 5000) == -600
        assert store.is_exist("cap-k2") == 0
        assert store.batch_get_into(["cap-k", "cap-k"], [pool[:10], pool[:1000]], [1000, 1000]) == [-600, 1000]
        assert store.batch_put_from(["cap-k3"], [pool[:10]], [11]) == [-600]
        assert store.register_buffer(np.zeros(16, dtype=np.uint8), 4096) == -600
    finally:
        store.unregister_buffer(pool)


# ---- asyncio (mooncake.async_store) ------------------------------------------------------------------


def test_async_store_keeps_the_event_loop_running(master):
    import asyncio

    from mooncake.async_store import MooncakeDistributedStoreAsync

    s = MooncakeDistributedStoreAsync()
    absent = {
        "local_hostname": "127.0.0.1",
        "metadata_server": "P2PHANDSHAKE",
        "global_segment_size": 0,
        "local_buffer_size": "1MB",
        "protocol": "tcp",
        "master_server_addr": f"127.0.0.1:{free_port()}",
        "setup_timeout_ms": 1500,
    }

    async def setup_against_nothing():
        # setup waits for a master that is not there; the loop must keep running meanwhile.
        task = asyncio.ensure_future(s.async_setup(absent))
        ticks = 0
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.01)
        return task.result(), ticks

    rc, ticks = asyncio.run(setup_against_nothing())
    assert rc < 0
    assert ticks >= 10, f"the event loop ran only {ticks} times while setup waited"

    async def use_it():
        assert await s.async_setup("127.0.0.1", "P2PHANDSHAKE", 32 * MiB, 16 * MiB, "tcp", "", master.address) == 0
        codes = await asyncio.gather(*[s.async_put(f"async-{i}", bytes([i]) * 1000) for i in range(16)])
        values = await asyncio.gather(*[s.async_get(f"async-{i}") for i in range(16)])
        return codes, values

    try:
        codes, values = asyncio.run(use_it())
        assert codes == [0] * 16
        assert values == [bytes([i]) * 1000 for i in range(16)]
        assert s.get("async-3") == bytes([3]) * 1000  # the sync methods are still there
        with pytest.raises(AttributeError):
            s.async_not_a_method
        with pytest.raises(AttributeError):
            s.not_a_method
    finally:
        s.close()


# ---- BufferPool (mooncake.buffer_pool) ---------------------------------------------------------------


def test_buffer_pool_waiter_wakes_when_a_lease_is_released(master):
    from mooncake.buffer_pool import BufferPool

    s = MooncakeDistributedStore()
    assert s.setup("127.0.0.1", "P2PHANDSHAKE", 32 * MiB, 4 * MiB, "tcp", "", master.address) == 0
    try:
        pool = BufferPool(s, max_bytes=8 * MiB)
        held = pool.acquire(6 * MiB)
        released = threading.Event()

        def release_later():
            time.sleep(0.2)
            released.set()
            held.release()

        t = threading.Thread(target=release_later)
        t.start()
        lease = pool.acquire(4 * MiB, timeout=30)  # waits for the release, not for the timeout
        assert released.is_set()
        t.join()
        # The lease is registered memory: zero-copy calls take it as is.
        lease.buffer[:4] = b"pool"
        assert s.put_from("from-pool", lease.ptr, 4) == 0
        assert s.get("from-pool") == b"pool"
        lease.release()
        # Many small leases and releases in any order leave the whole capacity free again.
        leases = [pool.acquire(256 * 1024) for _ in range(32)]
        for lease in leases[::2] + leases[1::2]:
            lease.release()
        assert pool.acquire(8 * MiB, block=False).size == 8 * MiB
        pool.close()
    finally:
        s.close()
