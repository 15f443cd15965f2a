"""The store calls of the normal test suite on a CXL pool, in the shape of upstream's CXL store test.

Run as a child process by ``test_store_cxl.py`` (which starts ``mooncake_master --enable_cxl=true``): like
upstream's test, each class points ``MC_CXL_DEV_PATH`` at an 8 GiB sparse file ``tmp_dax_sim`` in the temp
directory before its first client starts, and clients use ``protocol="cxl"``. The process environment is the
reason for the child: the region is chosen when the first engine starts.

Environment: ``MASTER_SERVER`` (host:port), ``MC_METADATA_SERVER``, ``DEFAULT_KV_LEASE_TTL`` (ms, as the
master's ``--default_kv_lease_ttl``).
"""

import ctypes
import os
import tempfile
import threading
import time
import unittest

from mooncake.store import MooncakeDistributedStore, ReplicateConfig

REGION = os.path.join(tempfile.gettempdir(), "tmp_dax_sim")
REGION_SIZE = 8 << 30
# Waited before a remove of something just read: the lease plus a margin (a remove at the very end of the lease
# may still find it held, -706).
LEASE_S = int(os.getenv("DEFAULT_KV_LEASE_TTL", "5000")) / 1000 + 0.3


def setup_client(store, local_buffer_size=512 << 20):
    rc = store.setup(
        "localhost",
        os.getenv("MC_METADATA_SERVER", "http://127.0.0.1:8080/metadata"),
        3200 << 20,
        local_buffer_size,
        "cxl",
        "",
        os.getenv("MASTER_SERVER", "127.0.0.1:50051"),
    )
    if rc:
        raise RuntimeError(f"setup failed with {rc}")


class RegionFile:
    """The sparse file standing in for a DAX device, created before the class's clients and removed after."""

    fd = -1

    @classmethod
    def open_region(cls):
        os.environ["MC_CXL_DEV_PATH"] = REGION
        os.environ["MC_CXL_DEV_SIZE"] = str(REGION_SIZE)
        cls.fd = os.open(REGION, os.O_RDWR | os.O_CREAT, 0o666)
        os.ftruncate(cls.fd, REGION_SIZE)

    @classmethod
    def close_region(cls):
        if cls.fd >= 0:
            os.close(cls.fd)
            cls.fd = -1
        if os.path.exists(REGION):
            os.unlink(REGION)


class ZeroLocalBuffer(RegionFile, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.open_region()

    @classmethod
    def tearDownClass(cls):
        cls.close_region()

    def test_put_fails_without_a_local_buffer(self):
        store = MooncakeDistributedStore()
        setup_client(store, local_buffer_size=0)
        self.assertNotEqual(store.put("zero_buffer_key", b"value"), 0)
        self.assertEqual(store.is_exist("zero_buffer_key"), 0)
        store.close()


class SingleStore(RegionFile, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.open_region()
        cls.store = MooncakeDistributedStore()
        setup_client(cls.store)

    @classmethod
    def tearDownClass(cls):
        cls.store.close()
        cls.close_region()

    def test_close_and_setup_again(self):
        self.assertEqual(self.store.put("teardown_key", b"Hello, World!"), 0)
        self.assertEqual(self.store.remove("teardown_key"), 0)
        self.assertEqual(self.store.close(), 0)
        setup_client(self.store)
        self.assertEqual(self.store.get("teardown_key"), b"")
        self.assertEqual(self.store.put("teardown_key", b"Hello, World!"), 0)
        self.assertEqual(self.store.get("teardown_key"), b"Hello, World!")

    def test_hostname_gets_a_port(self):
        host, port = self.store.get_hostname().split(":")
        self.assertEqual(host, "localhost")
        self.assertTrue(12300 <= int(port) <= 14300, port)

    def test_put_get_exist_remove(self):
        data = b"Hello, World!"
        self.assertEqual(self.store.put("basic_key", data), 0)
        self.assertEqual(self.store.get_size("basic_key"), len(data))
        self.assertEqual(self.store.get("basic_key"), data)
        self.assertEqual(self.store.put("basic_key", data), 0)
        time.sleep(LEASE_S)
        self.assertEqual(self.store.remove("basic_key"), 0)

    def test_batch_is_exist(self):
        keys = [f"batch_exist_key_{i}" for i in range(20)]
        for key in keys[:10]:
            self.assertEqual(self.store.put(key, b"Hello, Batch World!"), 0)
        self.assertEqual(self.store.batch_is_exist(keys), [1] * 10 + [0] * 10)
        self.assertEqual(self.store.batch_is_exist([]), [])
        self.assertEqual(self.store.batch_is_exist(["not_there"]), [0])
        time.sleep(LEASE_S)
        for key in keys[:10]:
            self.assertEqual(self.store.remove(key), 0)

    def test_put_from_and_get_into(self):
        data = b"Hello, Zero-Copy World! " * 1000
        buf = (ctypes.c_ubyte * (len(data) + 1024))()
        ptr = ctypes.addressof(buf)
        # Ours reads zero-copy buffers only once registered (upstream reads any address; docs/python-differences.md).
        self.assertEqual(self.store.register_buffer(ptr, len(buf)), 0)
        ctypes.memmove(buf, data, len(data))
        self.assertEqual(self.store.put_from("zero_copy_key", ptr, len(data)), 0)
        self.assertEqual(self.store.get("zero_copy_key"), data)
        ctypes.memset(buf, 0, len(buf))
        self.assertEqual(self.store.get_into("zero_copy_key", ptr, len(buf)), len(data))
        self.assertEqual(bytes(buf[: len(data)]), data)
        small = (ctypes.c_ubyte * (len(data) // 2))()
        self.assertLess(self.store.get_into("zero_copy_key", ctypes.addressof(small), len(small)), 0)
        self.assertEqual(self.store.unregister_buffer(ptr), 0)
        time.sleep(LEASE_S)
        self.assertEqual(self.store.remove("zero_copy_key"), 0)

    def test_batch_put_from_and_batch_get_into(self):
        values = [b"Batch Put Data %d! " % i * (100 * (i + 1)) for i in range(3)]
        keys = [f"batch_zero_copy_{i}" for i in range(3)]
        spacing = 1 << 20
        big = (ctypes.c_ubyte * (spacing * 3))()
        base = ctypes.addressof(big)
        self.assertEqual(self.store.register_buffer(base, len(big)), 0)
        ptrs = [base + i * spacing for i in range(3)]
        for p, v in zip(ptrs, values):
            ctypes.memmove(ctypes.c_void_p(p), v, len(v))
        self.assertEqual(self.store.batch_put_from(keys, ptrs, [len(v) for v in values]), [0, 0, 0])
        for k, v in zip(keys, values):
            self.assertEqual(self.store.get(k), v)
        ctypes.memset(big, 0, len(big))
        got = self.store.batch_get_into(keys, ptrs, [spacing] * 3)
        self.assertEqual(got, [len(v) for v in values])
        for p, v in zip(ptrs, values):
            self.assertEqual(ctypes.string_at(p, len(v)), v)
        self.assertTrue(all(r < 0 for r in self.store.batch_put_from(keys[:2], ptrs, [1, 1, 1])))
        self.assertTrue(all(r < 0 for r in self.store.batch_get_into(keys[:2], ptrs, [1, 1, 1])))
        self.assertEqual(self.store.batch_put_from([], [], []), [])
        self.assertEqual(self.store.batch_get_into([], [], []), [])
        self.assertEqual(self.store.unregister_buffer(base), 0)
        time.sleep(LEASE_S)
        for k in keys:
            self.assertEqual(self.store.remove(k), 0)

    def test_concurrent_puts_and_gets(self):
        errors = []
        barrier = threading.Barrier(4)

        def worker(t):
            try:
                value = os.urandom(1 << 20)
                keys = [f"stress_{t}_{i}" for i in range(25)]
                barrier.wait()
                for k in keys:
                    self.assertEqual(self.store.put(k, value), 0)
                for k in keys:
                    self.assertEqual(self.store.get(k), value)
                time.sleep(LEASE_S)
                for k in keys:
                    self.assertEqual(self.store.remove(k), 0)
            except Exception as e:  # noqa: BLE001 - reported below with the thread
                errors.append(f"thread {t}: {e!r}")

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])

    def test_replicate_config(self):
        config = ReplicateConfig()
        self.assertEqual((config.replica_num, config.with_soft_pin, config.preferred_segment), (1, False, ""))
        config.replica_num = 3
        self.assertIn("3", str(config))
        # More replicas than one are asked for: the CXL pool keeps one (the bytes are shared memory).
        self.assertEqual(self.store.put("three_replicas", b"x" * 100, config), 0)
        self.assertEqual(len(self.store.get_replica_desc("three_replicas")), 1)
        time.sleep(LEASE_S)
        self.assertEqual(self.store.remove("three_replicas"), 0)

    def test_batch_get_buffer(self):
        values = [b"Batch Buffer Data 1! " * 100, b"Batch Buffer Data 2! " * 200]
        keys = ["batch_buffer_1", "batch_buffer_2"]
        for k, v in zip(keys, values):
            self.assertEqual(self.store.put(k, v), 0)
        for buf, v in zip(self.store.batch_get_buffer(keys), values):
            self.assertEqual((buf.size(), bytes(buf)), (len(v), v))
        mixed = self.store.batch_get_buffer([keys[0], "not_there"])
        self.assertEqual(bytes(mixed[0]), values[0])
        self.assertIsNone(mixed[1])
        self.assertEqual(self.store.batch_get_buffer([]), [])
        time.sleep(LEASE_S)
        for k in keys:
            self.assertEqual(self.store.remove(k), 0)

    def test_a_second_client_reads_what_the_first_wrote(self):
        other = MooncakeDistributedStore()
        setup_client(other)
        try:
            value = os.urandom(3 << 20)
            self.assertEqual(self.store.put("shared_key", value), 0)
            self.assertEqual(other.get("shared_key"), value)
            self.assertEqual(other.put("from_other", value[:1000]), 0)
            self.assertEqual(self.store.get("from_other"), value[:1000])
        finally:
            other.close()
        # The writer closed: what it wrote stays readable (the pool outlives each client's view).
        self.assertEqual(self.store.get("from_other"), value[:1000])
        time.sleep(LEASE_S)
        self.assertEqual(self.store.remove("shared_key"), 0)
        self.assertEqual(self.store.remove("from_other"), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2, failfast=True)
