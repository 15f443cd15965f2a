"""End-to-end store flows shaped like the big users (docs/python-api.md, "How the big users call it"):
upstream's store hello world, SGLang HiCache and LMCache, each across two processes.

Process B runs flows/flow_peer.py and is driven through its stdin/stdout, one command and one answer a
line, so there are no timing races; it is stopped by PID when the test ends.
"""

import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from conftest import Master, program, stop, wait_port

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "flows"))
import flow_peer  # noqa: E402
from flow_peer import CHUNK, CHUNKS, PAGE, PAGES, PARTIAL, MiB, chunk_keys, chunk_size, page_keys, pattern  # noqa: E402

PEER = os.path.join(os.path.dirname(__file__), "flows", "flow_peer.py")
ANSWER_TIMEOUT = 120  # generous "does not hang" bound on a loaded 2-core machine


class Peer:
    """flow_peer.py as a child process, with line-based request/answer."""

    def __init__(self, master_addr: str, mode: str):
        self.proc = subprocess.Popen(
            [sys.executable, PEER, master_addr, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        first = self.read()
        assert first.startswith("SETUP "), first
        self.hostname = first.split(" ", 1)[1]

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read(self) -> str:
        try:
            line = self.lines.get(timeout=ANSWER_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"peer gave no answer within {ANSWER_TIMEOUT}s") from None
        if line is None:
            raise AssertionError(f"peer exited with {self.proc.wait(10)} before answering")
        return line

    def ask(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        answer = self.read()
        assert answer.startswith("READY"), answer
        return answer

    def quit(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                pass
        stop(self.proc)


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# ---- upstream's store hello world ------------------------------------------------------------------


HELLO = textwrap.dedent(
    """
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup("localhost", "http://localhost:8080/metadata", 512*1024*1024, 128*1024*1024, "tcp", "", "localhost:50051")
    assert rc == 0, rc
    store.put("hello_key", b"Hello, Mooncake Store!")
    assert store.get("hello_key") == b"Hello, Mooncake Store!"
    store.close()
    print("HELLO OK")
    """
)


def test_store_hello_world_default_ports():
    for port in (50051, 8080, 9003):
        if port_busy(port):
            pytest.skip(f"port {port} (a default port of mooncake_master) is busy on this machine")
    master = subprocess.Popen(
        [program("mooncake_master"), "--enable_http_metadata_server=true"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        try:
            wait_port(50051, proc=master)
            wait_port(8080, proc=master)
        except RuntimeError:
            # It exited before listening: another process took a default port after the check above.
            pytest.skip("mooncake_master could not bind its default ports (taken meanwhile)")
        r = subprocess.run([sys.executable, "-c", HELLO], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "HELLO OK" in r.stdout
    finally:
        stop(master)


# ---- SGLang HiCache ---------------------------------------------------------------------------------


@pytest.fixture
def flow_master():
    m = Master()
    yield m
    m.stop()


def test_hicache_two_processes(flow_master):
    a = flow_peer.setup_store(flow_master.address)
    peer = None
    pool = np.zeros(PAGES * PAGE, dtype=np.uint8)  # A's own host pool, registered once
    try:
        assert a.register_buffer(pool.ctypes.data, pool.nbytes) == 0
        base = pool.ctypes.data
        keys, mkeys = page_keys(), page_keys("mpage")
        assert a.batch_is_exist(keys) == [0] * PAGES

        peer = Peer(flow_master.address, "hicache")
        assert peer.hostname != a.get_hostname()
        assert peer.ask("hicache") == f"READY {PAGES} {PAGES}"

        # A finds every page and reads them all with one batch_get_into.
        assert a.batch_is_exist(keys) == [1] * PAGES
        assert a.batch_is_exist(mkeys) == [1] * PAGES
        res = a.batch_get_into(keys, [base + i * PAGE for i in range(PAGES)], [PAGE] * PAGES)
        assert res == [PAGE] * PAGES
        for i in range(PAGES):
            assert np.array_equal(pool[i * PAGE : (i + 1) * PAGE], pattern(PAGE, i)), f"page {i}"

        # The multi-buffer pages, each read into two 512 KiB pieces (second half first in memory).
        pool[:] = 0
        half = PAGE // 2
        top = PAGES * half
        res = a.batch_get_into_multi_buffers(
            mkeys,
            [[base + top + i * half, base + i * half] for i in range(PAGES)],
            [[half, half] for _ in range(PAGES)],
        )
        assert res == [PAGE] * PAGES
        for i in range(PAGES):
            whole = pattern(PAGE, 1000 + i)
            assert np.array_equal(pool[top + i * half : top + (i + 1) * half], whole[:half]), f"mpage {i} first half"
            assert np.array_equal(pool[i * half : (i + 1) * half], whole[half:]), f"mpage {i} second half"

        # Single-buffer pages read back through the multi-buffer form, and the other way round.
        res = a.batch_get_into_multi_buffers(keys[:4], [[base + i * PAGE, base + i * PAGE + half] for i in range(4)], [[half, half]] * 4)
        assert res == [PAGE] * 4
        for i in range(4):
            assert np.array_equal(pool[i * PAGE : (i + 1) * PAGE], pattern(PAGE, i))
        res = a.batch_get_into(mkeys[:4], [base + i * PAGE for i in range(4)], [PAGE] * 4)
        assert res == [PAGE] * 4
        for i in range(4):
            assert np.array_equal(pool[i * PAGE : (i + 1) * PAGE], pattern(PAGE, 1000 + i))

        # Second round: everything exists, so B puts nothing.
        assert peer.ask("hicache") == "READY 0 0"
        res = a.batch_get_into(keys[-8:], [base + i * PAGE for i in range(8)], [PAGE] * 8)
        assert res == [PAGE] * 8
        for j, i in enumerate(range(PAGES - 8, PAGES)):
            assert np.array_equal(pool[j * PAGE : (j + 1) * PAGE], pattern(PAGE, i))

        # remove_all: objects read recently hold a lease and are skipped without force; together the
        # counts cover every object exactly once.
        first = a.remove_all()
        assert 0 <= first <= 2 * PAGES
        second = a.remove_all(force=True)
        assert first + second == 2 * PAGES
        assert a.batch_is_exist(keys + mkeys) == [0] * (2 * PAGES)
        assert a.remove_all(force=True) == 0

        # Puts after remove_all: B writes everything again.
        assert peer.ask("hicache") == f"READY {PAGES} {PAGES}"
        assert a.batch_is_exist(keys[:3]) == [1, 1, 1]
    finally:
        if peer is not None:
            peer.quit()
        a.unregister_buffer(pool.ctypes.data)
        a.close()


# ---- LMCache -----------------------------------------------------------------------------------


def test_lmcache_two_processes(flow_master):
    a = flow_peer.setup_store(flow_master.address)
    peer = None
    keys = chunk_keys()
    pool = np.zeros(len(keys) * CHUNK, dtype=np.uint8)
    try:
        assert a.register_buffer(pool.ctypes.data, pool.nbytes) == 0
        base = pool.ctypes.data
        assert a.is_exist(keys[0]) == 0

        peer = Peer(flow_master.address, "lmcache")
        assert peer.ask("lmcache") == f"READY {len(keys)}"

        for k in keys:
            assert a.is_exist(k) == 1
        assert a.is_exist("lmcache_chunk_missing") == 0
        assert a.get_size(keys[-1]) == PARTIAL

        # Every key into a full 16 MiB buffer: the per-key result is the actual byte count.
        res = a.batch_get_into(keys, [base + i * CHUNK for i in range(len(keys))], [CHUNK] * len(keys))
        assert res == [CHUNK] * CHUNKS + [PARTIAL]
        for i in range(len(keys)):
            n = chunk_size(i)
            assert np.array_equal(pool[i * CHUNK : i * CHUNK + n], pattern(n, 500 + i)), keys[i]

        # The partial chunk alone, into a 16 MiB buffer.
        pool[:] = 0
        assert a.get_into(keys[-1], base, CHUNK) == PARTIAL
        assert np.array_equal(pool[:PARTIAL], pattern(PARTIAL, 500 + CHUNKS))
        assert not pool[PARTIAL:CHUNK].any()

        # A full chunk into a buffer that is too small fails alone, the rest succeed.
        res = a.batch_get_into([keys[0], keys[-1], "lmcache_chunk_missing"], [base, base + CHUNK, base + 2 * CHUNK], [CHUNK - 1, CHUNK, CHUNK])
        assert res[0] < 0 and res[1] == PARTIAL and res[2] < 0
    finally:
        if peer is not None:
            peer.quit()
        a.unregister_buffer(pool.ctypes.data)
        a.close()
