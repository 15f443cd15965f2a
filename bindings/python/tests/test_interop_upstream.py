"""Wire interop of our `mooncake.engine.TransferEngine` with upstream's wheel (mooncake-transfer-engine-non-cuda 0.3.x).

Skipped unless `MOONCAKE_UPSTREAM_PYTHON` names upstream's python (CI: target/upstream-venv/bin/python, made by
tests/interop/setup_upstream_venv.sh). Every peer is a child process running PEER (below) with P2PHANDSHAKE metadata,
tcp, host 127.0.0.1; upstream's children get MC_FORCE_TCP=1. Coordination is one line per step: a child's protocol
lines on stdout start with "@@ " (anything else, e.g. native logging, is ignored), commands go to its stdin. Every
wait is bounded (60 s) and every child is stopped by PID in a finally block.

(a) upstream is the target, our engine (this process) the initiator: read its pattern, write a new one, upstream checks.
(b) our engine is the target (child on this venv's python), upstream's the initiator: it reads our pattern, writes
    its own and reads it back; our target checks its buffer.
"""

import os
import queue
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

UPSTREAM_PYTHON = os.environ.get("MOONCAKE_UPSTREAM_PYTHON", "")

pytestmark = pytest.mark.skipif(
    not (UPSTREAM_PYTHON and os.path.isfile(UPSTREAM_PYTHON) and os.access(UPSTREAM_PYTHON, os.X_OK)),
    reason="set MOONCAKE_UPSTREAM_PYTHON to upstream's python (made by tests/interop/setup_upstream_venv.sh "
    "target/upstream-venv; CI uses target/upstream-venv/bin/python) to run the upstream interop tests",
)

TIMEOUT = 60.0
HOST = "127.0.0.1"

# The peer program, for both interpreters (only the public upstream-compatible API is used).
#   target SIZE SEED       -> "@@ READY <session> <addr>"; stdin: "check SEED" -> "@@ OK" | "@@ BAD <first index>";
#                             "quit" -> "@@ BYE"
#   initiator SESSION ADDR SIZE EXPECT_SEED WRITE_SEED CHUNK
#                          -> reads [ADDR, +SIZE) (in CHUNK-byte requests of one batch call when CHUNK < SIZE),
#                             checks PATTERN(EXPECT_SEED), writes PATTERN(WRITE_SEED), reads it back;
#                             one "@@ STEP <name> <rc> <OK|BAD idx>" per step, then "@@ DONE OK" | "@@ DONE FAIL"
PEER = r'''
import os, sys
import numpy as np

_fd = os.dup(1)
os.dup2(2, 1)  # whatever native code prints to fd 1 goes to stderr
_out = os.fdopen(_fd, "w", buffering=1)
sys.stdout = sys.stderr


def say(*words):
    _out.write("@@ " + " ".join(str(w) for w in words) + "\n")
    _out.flush()


def pattern(seed, n):
    k = np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(seed * 7919)
    return (k >> np.uint64(5)).astype(np.uint8)


def first_bad(buf, seed):
    diff = np.nonzero(buf != pattern(seed, len(buf)))[0]
    return None if len(diff) == 0 else int(diff[0])


from mooncake.engine import TransferEngine

eng = TransferEngine()
rc = eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
if rc != 0:
    say("FAIL initialize", rc)
    sys.exit(2)
mode = sys.argv[1]
if mode == "target":
    size, seed = int(sys.argv[2]), int(sys.argv[3])
    buf = pattern(seed, size).copy()
    addr = buf.ctypes.data
    rc = eng.register_memory(addr, size)
    if rc != 0:
        say("FAIL register_memory", rc)
        sys.exit(2)
    say("READY", "127.0.0.1:%d" % eng.get_rpc_port(), addr)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "check":
            bad = first_bad(buf, int(cmd[1]))
            say("OK") if bad is None else say("BAD", bad)
        elif cmd[0] == "quit":
            break
    eng.unregister_memory(addr)
    say("BYE")
else:
    session, raddr, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    expect, seed, chunk = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    local = np.zeros(size, dtype=np.uint8)
    ptr = local.ctypes.data
    eng.register_memory(ptr, size)
    offs = list(range(0, size, chunk))
    lens = [min(chunk, size - o) for o in offs]

    def xfer(write):
        if len(offs) == 1:
            f = eng.transfer_sync_write if write else eng.transfer_sync_read
            return f(session, ptr, raddr, size)
        f = eng.batch_transfer_sync_write if write else eng.batch_transfer_sync_read
        return f(session, [ptr + o for o in offs], [raddr + o for o in offs], lens)

    ok = True

    def step(name, rc, check_seed):
        global ok
        bad = first_bad(local, check_seed) if (rc == 0 and check_seed is not None) else None
        good = rc == 0 and bad is None
        ok = ok and good
        say("STEP", name, rc, "OK" if good else "BAD %s" % bad)

    step("read_expect", xfer(False), expect)
    local[:] = pattern(seed, size)
    step("write", xfer(True), None)
    local[:] = 0
    step("readback", xfer(False), seed)
    eng.unregister_memory(ptr)
    say("DONE", "OK" if ok else "FAIL")
'''


def pattern(seed: int, n: int) -> np.ndarray:
    """Same as PEER's pattern()."""
    k = np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(seed * 7919)
    return (k >> np.uint64(5)).astype(np.uint8)


def first_bad(buf: np.ndarray, seed: int):
    diff = np.nonzero(buf != pattern(seed, len(buf)))[0]
    return None if len(diff) == 0 else int(diff[0])


class Peer:
    """A PEER child; `expect()` returns its next protocol line (without "@@ ") within TIMEOUT seconds."""

    def __init__(self, python: str, args, upstream: bool):
        env = dict(os.environ)
        if upstream:
            env["MC_FORCE_TCP"] = "1"
        self.name = "upstream" if upstream else "ours"
        self.err = tempfile.NamedTemporaryFile(prefix=f"mc-interop-{self.name}-", suffix=".err", delete=False)
        self.proc = subprocess.Popen(
            [python, "-c", PEER] + [str(a) for a in args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            env=env,
            text=True,
            bufsize=1,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self.lines.put(line[3:].strip())
        self.lines.put(None)

    def stderr_tail(self) -> str:
        try:
            with open(self.err.name, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def expect(self, timeout: float = TIMEOUT) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name} peer said nothing for {timeout} s; stderr:\n{self.stderr_tail()}")
        if line is None:
            self.proc.wait(5)
            raise AssertionError(
                f"{self.name} peer exited ({self.proc.returncode}) early; stderr:\n{self.stderr_tail()}"
            )
        return line

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ready(self):
        """(session, addr) from a target's READY line."""
        words = self.expect().split()
        assert words[0] == "READY", f"{self.name} target: {' '.join(words)}\n{self.stderr_tail()}"
        return words[1], int(words[2])

    def stop(self) -> None:
        """Stops the child by PID (SIGTERM, SIGKILL after 10 s) and removes its stderr file."""
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            self.err.close()
            os.unlink(self.err.name)


@pytest.fixture
def our_engine():
    from mooncake.engine import TransferEngine

    e = TransferEngine()
    assert e.initialize(HOST, "P2PHANDSHAKE", "tcp", "") == 0
    yield e
    e.shutdown()


SIZES = [4096, (3 << 20) + 5]


@pytest.mark.parametrize("size", SIZES, ids=["4KiB", "3MiB+5"])
def test_ours_initiates_to_upstream_target(our_engine, size):
    """(a) upstream registers PATTERN(11); we read it, write PATTERN(12); upstream checks its buffer."""
    peer = Peer(UPSTREAM_PYTHON, ["target", size, 11], upstream=True)
    try:
        session, raddr = peer.ready()
        assert session.startswith(f"{HOST}:")
        local = np.zeros(size, dtype=np.uint8)
        ptr = local.ctypes.data
        assert our_engine.register_memory(ptr, size) == 0
        try:
            assert our_engine.transfer_sync_read(session, ptr, raddr, size) == 0
            assert first_bad(local, 11) is None, f"read from upstream differs at {first_bad(local, 11)}"
            local[:] = pattern(12, size)
            assert our_engine.transfer_sync_write(session, ptr, raddr, size) == 0
            peer.send("check 12")
            assert peer.expect() == "OK"
            # The same through one batch call of 4 requests (the vLLM / SGLang P/D path).
            offs = [0, size // 4, size // 2, 3 * size // 4]
            lens = [b - a for a, b in zip(offs, offs[1:] + [size])]
            local[:] = pattern(13, size)
            rc = our_engine.batch_transfer_sync_write(session, [ptr + o for o in offs], [raddr + o for o in offs], lens)
            assert rc == 0
            peer.send("check 13")
            assert peer.expect() == "OK"
            local[:] = 0
            rc = our_engine.batch_transfer_sync_read(session, [ptr + o for o in offs], [raddr + o for o in offs], lens)
            assert rc == 0
            assert first_bad(local, 13) is None
        finally:
            assert our_engine.unregister_memory(ptr) == 0
        peer.send("quit")
        assert peer.expect() == "BYE"
    finally:
        peer.stop()


@pytest.mark.parametrize("size,chunk", [(4096, 4096), ((3 << 20) + 5, 1 << 20)], ids=["4KiB", "3MiB+5-batched"])
def test_upstream_initiates_to_our_target(size, chunk):
    """(b) our target (child) registers PATTERN(21); upstream reads it, writes PATTERN(22), reads back; we check."""
    ours = Peer(sys.executable, ["target", size, 21], upstream=False)
    upstream = None
    try:
        session, addr = ours.ready()
        upstream = Peer(UPSTREAM_PYTHON, ["initiator", session, addr, size, 21, 22, chunk], upstream=True)
        steps = []
        while True:
            line = upstream.expect()
            if line.startswith("DONE"):
                break
            steps.append(line)
        assert line == "DONE OK", f"upstream initiator: {steps}\n{upstream.stderr_tail()}"
        assert [s.split()[1] for s in steps] == ["read_expect", "write", "readback"], steps
        ours.send("check 22")
        assert ours.expect() == "OK"
        ours.send("quit")
        assert ours.expect() == "BYE"
    finally:
        if upstream is not None:
            upstream.stop()
        ours.stop()
