#!/usr/bin/env python3
"""One side of bench_compare.py: measures the `mooncake` package of the python running it (ours or upstream's wheel).

    PYTHON bench_worker.py --bin-dir DIR [--duration S]        -> one JSON object on stdout
    PYTHON bench_worker.py --bin-dir DIR --parts threads [--thread-cells OP:N,...]   -> a JSON line per cell, then one
    PYTHON bench_worker.py --role engine-target --size N       (child: "@@ READY <session> <addr>", serves until EOF)

Main role, in this order:
  engine  A target engine child (same python, P2PHANDSHAKE, tcp, 127.0.0.1) registers 64 MiB; this process's engine
          (64 MiB local buffer, registered) runs transfer_sync_write 4 KiB, transfer_sync_write 1 MiB and
          batch_transfer_sync_write 32 x 4 KiB against it, one call at a time.
  store   DIR/mooncake_master (127.0.0.1, free ports) and DIR/mooncake_client (1 GiB segment, tcp, P2PHANDSHAKE) as the
          data node; this process's MooncakeDistributedStore contributes global_segment_size=0, so every object
          lives in the node and every read/write crosses processes over TCP. Points: put 4 KiB, get 4 KiB,
          batch_get_into 32 x 4 KiB, get_into 1 MiB, batch_put_from 32 x 64 KiB, batch_is_exist 128 keys.
  threads (--parts threads, run alone by bench_compare.py) The same store and engine setups, one store client and one
          engine shared by all threads; for each OP:N of --thread-cells, N Python threads call at once, each on its
          own keys (256 x 4 KiB objects per thread, on the node) and its own buffer offsets (1 MiB apart for the
          engine, 128 KiB for batch_get_into): get 4 KiB, batch_get_into 32 x 4 KiB, transfer_sync_write 4 KiB.
          Each op first runs 0.4 s single-threaded, untimed; in each cell every thread does untimed warm-up calls,
          then all start together and call for --duration s of wall time; rate = calls finished / wall time. One
          JSON line per cell as it finishes (the parent keeps them if a later cell crashes or hangs); a cell whose
          threads are not back --duration + 10 s after start is reported as a hang and the process exits 3 after
          stopping its children.
Each point: warm-up calls, then at least --duration seconds and --min-calls calls; only the calls are timed.
Reads cycle over populated keys; writes use fresh keys with an untimed remove_all(force) when the ring is used up
(and an untimed wait when the store answers -200, no room, for space still leased).
The environment (MC_FORCE_TCP, MC_AUTO_PROTOCOLS, ...) is inherited by every child. All children are stopped by PID.
"""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from procs import free_port, stop, wait_port

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
NO_ROOM = -200


def package_info():
    import importlib.metadata as md

    for dist in ("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine", "mooncake-rs", "mooncake"):
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    import mooncake

    return "mooncake", getattr(mooncake, "__version__", "?")


class Stats:
    def __init__(self, samples_ns, items_per_call, bytes_per_call):
        s = sorted(samples_ns)
        busy = sum(s) / 1e9
        self.d = {
            "calls": len(s),
            "p50_us": s[round((len(s) - 1) * 0.5)] / 1e3,
            "p99_us": s[round((len(s) - 1) * 0.99)] / 1e3,
            "ops_s": len(s) * items_per_call / busy,
            "GB_s": len(s) * bytes_per_call / busy / 1e9,
        }


def measure(call, duration, min_calls, warmup, items_per_call, bytes_per_call, before=None):
    """Times `call()` (returning normally = success); `before()` runs untimed before every call."""
    perf = time.perf_counter_ns
    for _ in range(warmup):
        if before:
            before()
        call()
    samples = []
    busy = 0
    limit = int(duration * 1e9)
    while len(samples) < min_calls or busy < limit:
        if before:
            before()
        t = perf()
        call()
        dt = perf() - t
        samples.append(dt)
        busy += dt
    return Stats(samples, items_per_call, bytes_per_call).d


# ----------------------------------------------------------------------------------------------------- engine
def engine_target(size):
    from mooncake.engine import TransferEngine

    out = protocol_stdout()
    eng = TransferEngine()
    rc = eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        out.write(f"@@ FAIL initialize {rc}\n")
        return 2
    buf = np.zeros(size, dtype=np.uint8)
    rc = eng.register_memory(buf.ctypes.data, size)
    if rc != 0:
        out.write(f"@@ FAIL register_memory {rc}\n")
        return 2
    out.write(f"@@ READY 127.0.0.1:{eng.get_rpc_port()} {buf.ctypes.data}\n")
    out.flush()
    sys.stdin.read()  # serve until the parent closes stdin
    eng.unregister_memory(buf.ctypes.data)
    return 0


@contextlib.contextmanager
def engine_pair(children, size=64 * MIB):
    """A target engine child (registered `size` bytes) and this process's engine (local buffer of `size` bytes,
    registered); yields (engine, target session, local address, remote address)."""
    from mooncake.engine import TransferEngine

    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", "engine-target", "--size", str(size)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=children.log("engine-target"),
                             text=True)
    children.procs.append(child)
    deadline = time.monotonic() + 60
    session = raddr = None
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"engine target exited ({child.poll()}); see {children.dir}")
        if line.startswith("@@ READY"):
            _, _, session, raddr = line.split()
            raddr = int(raddr)
            break
        if line.startswith("@@ FAIL"):
            raise RuntimeError(f"engine target: {line.strip()}")
    if session is None:
        raise RuntimeError("engine target not ready within 60 s")
    eng = TransferEngine()
    rc = eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"initialize: {rc}")
    local = np.full(size, 0x5A, dtype=np.uint8)
    ptr = local.ctypes.data
    if eng.register_memory(ptr, size) != 0:
        raise RuntimeError("register_memory failed")
    yield eng, session, ptr, raddr
    eng.unregister_memory(ptr)
    if hasattr(eng, "shutdown"):
        eng.shutdown()
    child.stdin.close()
    stop(child)


def bench_engine(args, children):
    with engine_pair(children) as (eng, session, ptr, raddr):
        return engine_points(args, eng, session, ptr, raddr)


def engine_points(args, eng, session, ptr, raddr):
    res = {}

    def ok(what, rc):
        if rc != 0:
            raise RuntimeError(f"{what}: {rc}")

    d, m = args.duration, args.min_calls
    res["transfer_sync_write_4KiB"] = measure(
        lambda: ok("transfer_sync_write", eng.transfer_sync_write(session, ptr, raddr, 4 * KIB)),
        d, m, 200, 1, 4 * KIB)
    res["transfer_sync_write_1MiB"] = measure(
        lambda: ok("transfer_sync_write", eng.transfer_sync_write(session, ptr, raddr, MIB)), d, m, 10, 1, MIB)
    srcs = [ptr + i * 4 * KIB for i in range(32)]
    dsts = [raddr + i * 4 * KIB for i in range(32)]
    lens = [4 * KIB] * 32
    res["batch_transfer_sync_write_32x4KiB"] = measure(
        lambda: ok("batch_transfer_sync_write", eng.batch_transfer_sync_write(session, srcs, dsts, lens)),
        d, m, 20, 32, 32 * 4 * KIB)
    return res


# ------------------------------------------------------------------------------------------------------ store
class StoreBench:
    def __init__(self, store, ptr, half, segment_size):
        self.s = store
        self.src = ptr
        self.dst = ptr + half
        self.segment_size = segment_size
        self.room_waits = 0.0

    def remove_all(self):
        r = self.s.remove_all(True)
        if r < 0:
            raise RuntimeError(f"remove_all: {r}")

    def no_room(self):
        if self.room_waits > 30:
            raise RuntimeError("no room in the store for 30 s")
        self.remove_all()
        time.sleep(0.1)
        self.room_waits += 0.1

    def populate(self, prefix, n, size):
        per = max(1, min(n, (16 * MIB) // size))
        i = 0
        while i < n:
            keys = [f"{prefix}-{j}" for j in range(i, min(n, i + per))]
            r = self.s.batch_put_from(keys, [self.src + (k % 32) * size if size <= 64 * KIB else self.src
                                             for k in range(len(keys))], [size] * len(keys))
            if NO_ROOM in r:
                self.no_room()
                i = 0
                continue
            bad = [x for x in r if x != 0]
            if bad:
                raise RuntimeError(f"populate {prefix}: {len(bad)} failed, first {bad[0]}")
            i += len(keys)
        return [f"{prefix}-{j}" for j in range(n)]

    def writes(self, name, size, batch, op, args, warmup):
        """A write point over a ring of fresh keys (half the segment), remove_all(force) untimed when it is used up."""
        ring = max(batch, min(self.segment_size // 2 // size, 1 << 20) // batch * batch)
        st = {"next": 0, "gen": 0}
        pending = {}

        def before():
            if st["next"] + batch > ring:
                self.remove_all()
                st["next"] = 0
                st["gen"] += 1
            pending["keys"] = [f"{name}-{st['gen']}-{i}" for i in range(st["next"], st["next"] + batch)]
            st["next"] += batch

        def call():
            while True:
                r = op(pending["keys"])
                if NO_ROOM in r:
                    # Not expected with a half-segment ring; a retry counts in the timing, so it is reported.
                    self.no_room()
                    continue
                bad = [x for x in r if x != 0]
                if bad:
                    raise RuntimeError(f"{name}: {len(bad)} of {len(r)} failed, first {bad[0]}")
                return

        self.remove_all()
        out = measure(call, args.duration, args.min_calls, warmup, batch, batch * size, before)
        self.remove_all()
        return out

    def run(self, args):
        s, res = self.s, {}
        d, m = args.duration, args.min_calls
        # 4 KiB reads over 1024 populated keys.
        keys4k = self.populate("r4k", 1024, 4 * KIB)
        cur = {"i": 0}

        def rr(n):
            i = cur["i"]
            cur["i"] = (i + n) % len(keys4k) if (i + 2 * n) <= len(keys4k) else 0
            return keys4k[i:i + n]

        def get1():
            v = s.get(rr(1)[0])
            if len(v) != 4 * KIB:
                raise RuntimeError(f"get returned {len(v)} bytes")

        res["get_4KiB"] = measure(get1, d, m, 100, 1, 4 * KIB)
        dsts32 = [self.dst + i * 4 * KIB for i in range(32)]
        lens32 = [4 * KIB] * 32

        def bgi():
            r = s.batch_get_into(rr(32), dsts32, lens32)
            if any(x != 4 * KIB for x in r):
                raise RuntimeError(f"batch_get_into: {[x for x in r if x != 4 * KIB][:3]}")

        res["batch_get_into_32x4KiB"] = measure(bgi, d, m, 10, 32, 32 * 4 * KIB)

        def bie():
            r = s.batch_is_exist(rr(128))
            if any(x != 1 for x in r):
                raise RuntimeError(f"batch_is_exist: {[x for x in r if x != 1][:3]}")

        res["batch_is_exist_128"] = measure(bie, d, m, 10, 128, 0)
        self.remove_all()
        # 1 MiB reads over 128 populated keys.
        keys1m = self.populate("r1m", 128, MIB)
        cur1 = {"i": 0}

        def gi():
            k = keys1m[cur1["i"]]
            cur1["i"] = (cur1["i"] + 1) % len(keys1m)
            r = s.get_into(k, self.dst, MIB)
            if r != MIB:
                raise RuntimeError(f"get_into returned {r}")

        res["get_into_1MiB"] = measure(gi, d, m, 5, 1, MIB)
        self.remove_all()
        value = bytes([0x3C]) * (4 * KIB)
        res["put_4KiB"] = self.writes("w4k", 4 * KIB, 1, lambda ks: [s.put(ks[0], value)], args, 100)
        srcs = [self.src + i * 64 * KIB for i in range(32)]
        lens = [64 * KIB] * 32
        res["batch_put_from_32x64KiB"] = self.writes(
            "w64k", 64 * KIB, 32, lambda ks: s.batch_put_from(ks, srcs, lens), args, 5)
        res["room_wait_s"] = round(self.room_waits, 1)
        return res


@contextlib.contextmanager
def store_pair(args, children):
    """DIR/mooncake_master and a DIR/mooncake_client data node, and this process's MooncakeDistributedStore with
    global_segment_size=0 and a registered 8 MiB buffer; yields (store, buffer address, half, node segment, info)."""
    from mooncake.store import MooncakeDistributedStore

    rpc, metrics = free_port(), free_port()
    master = children.start("master", [os.path.join(args.bin_dir, "mooncake_master"), f"--rpc_port={rpc}",
                                       f"--metrics_port={metrics}", "--rpc_address=127.0.0.1"])
    wait_port(rpc, master)
    master_addr = f"127.0.0.1:{rpc}"
    seg = args.segment_size
    node = children.start("node", [os.path.join(args.bin_dir, "mooncake_client"), "--host=127.0.0.1",
                                   f"--port={free_port()}", "--metadata_server=P2PHANDSHAKE",
                                   f"--master_server_address={master_addr}", f"--global_segment_size={seg}",
                                   "--protocol=tcp"])
    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", 0, 64 * MIB, "tcp", "", master_addr)
    if rc != 0:
        raise RuntimeError(f"setup(global_segment_size=0): {rc}")
    info = {"master_pid": master.pid, "node_pid": node.pid, "client_global_segment_size": 0,
            "node_segment_size": seg}
    try:
        # The node is ready when a put succeeds: this client has no segment, so the object can only go there.
        deadline = time.monotonic() + 60
        while True:
            if node.poll() is not None:
                raise RuntimeError(f"store node exited with {node.returncode}; see {children.dir}")
            r = store.put("probe", b"x" * 64)
            if r == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no put succeeded within 60 s (last {r}); see {children.dir}")
            time.sleep(0.1)
        info["probe_replica_endpoints"] = replica_endpoints(store, "probe")
        try:
            info["client_hostname"] = store.get_hostname()
        except Exception as e:  # noqa: BLE001 - informational only
            info["client_hostname"] = f"get_hostname raised {type(e).__name__}: {e}"
        store.remove("probe")
        half = 4 * MIB
        buf = np.full(2 * half, 0x5A, dtype=np.uint8)
        ptr = buf.ctypes.data
        r = store.register_buffer(ptr, 2 * half)
        if r != 0:
            raise RuntimeError(f"register_buffer: {r}")
        try:
            yield store, ptr, half, seg, info
        finally:
            try:
                store.remove_all(True)
            except Exception:  # noqa: BLE001
                pass
            store.unregister_buffer(ptr)
    finally:
        store.close()


def bench_store(args, children):
    with store_pair(args, children) as (store, ptr, half, seg, info):
        res = StoreBench(store, ptr, half, seg).run(args)
    res["info"] = info
    return res


def replica_endpoints(store, key):
    """Where the replicas of `key` live (the node's endpoint), informational."""
    try:
        desc = store.get_replica_desc(key)
    except Exception as e:  # noqa: BLE001
        return f"get_replica_desc raised {type(e).__name__}: {e}"
    out = []
    for r in desc:
        try:
            out.append(str(r.get_memory_descriptor().buffer_descriptor.transport_endpoint))
        except Exception:  # noqa: BLE001 - ours exposes .endpoint
            out.append(str(getattr(r, "endpoint", r)))
    return out


# ---------------------------------------------------------------------------------------------------- threads
THREAD_OPS = ("get_4KiB", "batch_get_into_32x4KiB", "transfer_sync_write_4KiB")
THREAD_KEYS = 256  # 4 KiB objects per thread, held by the data node
THREAD_SLOT = MIB  # each thread's own slice of the registered buffers
THREAD_WARM_S = 0.4  # untimed single-thread calls of an op before its first cell


def measure_threads(calls, duration, warmup, items_per_call, join_timeout):
    """Runs calls[t]() in len(calls) threads at once for `duration` s of wall time after a common start (each thread
    does `warmup` untimed calls first); rate = all calls finished / (last thread's finish - start). Returns a dict,
    or raises RuntimeError naming the first failure; a thread not back within `join_timeout` s is a hang."""
    n = len(calls)
    counts, ends, errors = [0] * n, [0.0] * n, []
    clock = {}
    perf = time.perf_counter

    def start():  # runs once, in the last thread to arrive, before any is released
        clock["t0"] = perf()
        clock["deadline"] = clock["t0"] + duration

    barrier = threading.Barrier(n, action=start)

    def body(t):
        call = calls[t]
        try:
            for _ in range(warmup):
                call()
            barrier.wait()
            deadline, k = clock["deadline"], 0
            while perf() < deadline:
                call()
                k += 1
            counts[t], ends[t] = k, perf()
        except threading.BrokenBarrierError:
            pass
        except Exception as e:  # noqa: BLE001 - reported for the cell
            errors.append(f"thread {t}: {type(e).__name__}: {e}")
            barrier.abort()

    threads = [threading.Thread(target=body, args=(t,), daemon=True, name=f"bench-{t}") for t in range(n)]
    for th in threads:
        th.start()
    give_up = time.monotonic() + join_timeout
    for th in threads:
        th.join(max(0.0, give_up - time.monotonic()))
    stuck = [th.name for th in threads if th.is_alive()]
    if stuck:
        raise Hung(f"{len(stuck)} of {n} threads not back {join_timeout:.0f} s after start (hang)")
    if errors:
        raise RuntimeError(errors[0])
    wall = max(ends) - clock["t0"]
    total = sum(counts)
    return {"threads": n, "calls": total, "wall_s": wall, "ops_s": total * items_per_call / wall,
            "per_thread_calls": counts}


class Hung(RuntimeError):
    pass


def thread_calls(op, n, ctx):
    """One callable per thread for `op`, each on its own keys / buffer offsets, sharing the process's client."""
    if op == "transfer_sync_write_4KiB":
        eng, session, ptr, raddr = ctx["engine"]

        def one(t):
            src, dst = ptr + t * THREAD_SLOT, raddr + t * THREAD_SLOT

            def call():
                rc = eng.transfer_sync_write(session, src, dst, 4 * KIB)
                if rc != 0:
                    raise RuntimeError(f"transfer_sync_write: {rc}")
            return call
        return [one(t) for t in range(n)], 1, 20
    store, keys, dst0 = ctx["store"], ctx["keys"], ctx["dst"]
    if op == "get_4KiB":
        def one(t):
            mine, cur = keys[t], [0]

            def call():
                i = cur[0]
                cur[0] = (i + 1) % len(mine)
                v = store.get(mine[i])
                if len(v) != 4 * KIB:
                    raise RuntimeError(f"get returned {len(v)} bytes")
            return call
        return [one(t) for t in range(n)], 1, 20
    if op == "batch_get_into_32x4KiB":
        def one(t):
            mine, cur = keys[t], [0]
            dsts = [dst0 + t * 32 * 4 * KIB + i * 4 * KIB for i in range(32)]
            lens = [4 * KIB] * 32

            def call():
                i = cur[0]
                cur[0] = (i + 32) % len(mine)
                r = store.batch_get_into(mine[i:i + 32], dsts, lens)
                if any(x != 4 * KIB for x in r):
                    raise RuntimeError(f"batch_get_into: {[x for x in r if x != 4 * KIB][:3]}")
            return call
        return [one(t) for t in range(n)], 32, 10
    raise ValueError(f"unknown op {op}")


def bench_threads(args, children, out):
    """--parts threads: one JSON line per cell of --thread-cells (OP:N,...), as each finishes, so that the parent keeps
    the cells done before a crash or hang; first a {"setup": ...} line."""
    cells = [(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in args.thread_cells.split(",") if c]
    for op, _ in cells:
        if op not in THREAD_OPS:
            raise ValueError(f"unknown op {op}")
    most = max(n for _, n in cells)
    join_timeout = args.duration + 10
    with contextlib.ExitStack() as stack:
        ctx = {}
        if any(op != "transfer_sync_write_4KiB" for op, _ in cells):
            store, ptr, half, _seg, info = stack.enter_context(store_pair(args, children))
            sb = StoreBench(store, ptr, half, args.segment_size)
            ctx.update(store=store, dst=ptr + half, info=info,
                       keys=[sb.populate(f"t{t}", THREAD_KEYS, 4 * KIB) for t in range(most)])
        if any(op == "transfer_sync_write_4KiB" for op, _ in cells):
            ctx["engine"] = stack.enter_context(engine_pair(children, max(most, 1) * THREAD_SLOT))
        out.write(json.dumps({"setup": "ok", "info": ctx.get("info")}) + "\n")
        out.flush()
        warmed = set()
        for op, n in cells:
            line = {"op": op, "threads": n}
            try:
                if op not in warmed:
                    # Some paths run slower for their first fraction of a second (seen: ~4x for batch_get_into), so
                    # each op first runs single-threaded, untimed, for THREAD_WARM_S; the 1-thread cell is then a
                    # steady-state baseline.
                    warm_calls, _, _ = thread_calls(op, 1, ctx)
                    measure_threads(warm_calls, THREAD_WARM_S, 0, 1, join_timeout)
                    warmed.add(op)
                calls, items, warmup = thread_calls(op, n, ctx)
                line.update(measure_threads(calls, args.duration, warmup, items, join_timeout))
            except Hung as e:
                line["error"] = str(e)
                out.write(json.dumps(line) + "\n")
                out.flush()
                # Threads stuck in native code cannot be stopped; the children are, then this process ends.
                children.stop_all()
                os._exit(3)
            except Exception as e:  # noqa: BLE001 - reported for the cell; the next cell still runs
                line["error"] = f"{type(e).__name__}: {e}"
            out.write(json.dumps(line) + "\n")
            out.flush()


# ------------------------------------------------------------------------------------------------------- main
class Children:
    def __init__(self):
        self.procs = []
        self.dir = tempfile.mkdtemp(prefix="mc-bench-worker.")

    def log(self, name):
        return open(os.path.join(self.dir, name + ".log"), "w")

    def start(self, name, argv):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log(name), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self):
        for p in reversed(self.procs):
            if p.stdin:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            stop(p)


def protocol_stdout():
    """Keeps the real stdout for our own lines; native code printing to fd 1 goes to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(fd, "w", buffering=1)
    sys.stdout = sys.stderr
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="main", choices=["main", "engine-target"])
    ap.add_argument("--size", type=int, default=64 * MIB)
    ap.add_argument("--bin-dir", default=os.path.dirname(sys.executable),
                    help="where this side's mooncake_master and mooncake_client are")
    ap.add_argument("--duration", type=float, default=1.5, help="seconds of timed calls per point at least")
    ap.add_argument("--min-calls", type=int, default=20)
    ap.add_argument("--segment-size", type=int, default=GIB, help="bytes of the data node's segment")
    ap.add_argument("--parts", default="engine,store",
                    help="comma list of engine, store, threads (threads: one JSON line per cell, then the result)")
    ap.add_argument("--thread-cells", default=",".join(f"{op}:{n}" for op in THREAD_OPS for n in (1, 2, 4)),
                    help="OP:THREADS,... for --parts threads (ops: " + ", ".join(THREAD_OPS) + ")")
    args = ap.parse_args()
    if args.role == "engine-target":
        return engine_target(args.size)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    out = protocol_stdout()
    dist, version = package_info()
    result = {"python": sys.executable, "package": dist, "version": version,
              "env": {k: os.environ.get(k) for k in ("MC_FORCE_TCP", "MC_AUTO_PROTOCOLS")},
              "duration": args.duration}
    children = Children()
    result["logs"] = children.dir
    try:
        parts = args.parts.split(",")
        if "engine" in parts:
            result["engine"] = bench_engine(args, children)
        if "store" in parts:
            result["store"] = bench_store(args, children)
        if "threads" in parts:
            bench_threads(args, children, out)
    except Exception as e:  # noqa: BLE001 - reported in the JSON, exit 1
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        children.stop_all()
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
