#!/usr/bin/env python3
"""Upstream Mooncake Store client benchmark, the counterpart of `mooncake_store_bench --mode client`.

Run with the venv made by setup_upstream_venv.sh (MC_FORCE_TCP=1 is set here if absent):

    target/upstream-venv/bin/python tests/interop/store_bench_upstream.py [--placement both] [--sizes ...]

It starts upstream's `mooncake_master` (from the venv's bin/) on free ports and, for the remote placement, upstream's
`mooncake_client` as the store node holding the data (`--host=127.0.0.1`, P2PHANDSHAKE metadata, tcp); the driver is a
`MooncakeDistributedStore` in this process with global segment 0, so every object lives in the node. For the local
placement the node is stopped and the driver contributes the segment itself (no other node). Both children are
stopped by PID on exit, also on error and on SIGINT/SIGTERM.

Same points, method and table as ours (see store/programs/src/bin/mooncake_store_bench/client.rs): every op of
--ops for every size of --sizes (batch ops for every --batches), >= --duration s and >= --min_calls calls per point
after one warm-up call, only the calls timed; writes use a ring of fresh keys over half the segment with an untimed
remove_all(force) when full; reads populate max(batch, min(1024, 256 MiB / size)) keys (or --read_keys; whole
batches) first and read them round robin; remove_all(force) after every point. A write refused for lack of room
(-200) makes the point remove_all, wait 0.1 s and repeat the call (untimed). Sources and destinations lie in one
registered buffer (source half, destination half, each as large as the biggest call). ops/s counts keys; GB/s =
1e9 B/s over the time in calls; p50/p99 per call in microseconds. Upstream runs TCP only (MC_FORCE_TCP), so its
transport is tcp.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("MC_FORCE_TCP", "1")

import numpy as np  # noqa: E402
from mooncake.store import MooncakeDistributedStore  # noqa: E402

OPS = ["put", "get", "put_from", "get_into", "batch_put_from", "batch_get_into"]
MIB = 1 << 20
POPULATE_BYTES = 256 * MIB
POPULATE_KEYS = 1024
NO_ROOM = -200  # NO_AVAILABLE_HANDLE
ROOM_WAIT = 30.0


def parse_size(text):
    t = text.strip().lower().replace(" ", "")
    for suffix, mult in (("gib", 1 << 30), ("mib", MIB), ("kib", 1 << 10), ("gb", 1 << 30), ("mb", MIB),
                         ("kb", 1 << 10), ("g", 1 << 30), ("m", MIB), ("k", 1 << 10), ("b", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def size_label(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {timeout} s")


def wait_log(path, text, proc, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode}; see {path}")
        with open(path, errors="replace") as f:
            if text in f.read():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} did not appear in {path} within {timeout} s")


class Children:
    """Processes this script started; stopped by PID (SIGTERM, then SIGKILL after 5 s)."""

    def __init__(self):
        self.procs = []

    def start(self, argv, log_prefix):
        out = open(log_prefix + ".out", "w")
        err = open(log_prefix + ".err", "w")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.procs.append(proc)
        return proc

    def stop(self, proc):
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc)


class NoRoom(Exception):
    pass


class Bench:
    def __init__(self, args, store, buf_ptr, half):
        self.args = args
        self.store = store
        self.base = buf_ptr
        self.half = half

    def src(self, slot, size):
        return self.base + slot * size

    def dst(self, slot, size):
        return self.base + self.half + slot * size

    def remove_all(self):
        r = self.store.remove_all(True)
        if r < 0:
            raise RuntimeError(f"remove_all: {r}")

    def wait_for_room(self, waited):
        if waited[0] >= ROOM_WAIT:
            raise RuntimeError(f"no room in the segment for {ROOM_WAIT} s")
        self.remove_all()
        time.sleep(0.1)
        waited[0] += 0.1

    @staticmethod
    def check(what, results):
        bad = [r for r in results if r < 0]
        if not bad:
            return
        if NO_ROOM in bad:
            raise NoRoom()
        raise RuntimeError(f"{what}: {len(bad)} of {len(results)} keys failed, first with {bad[0]}")

    def populate(self, keys, size, waited):
        per_call = max(1, self.half // size)
        done = 0
        while done < len(keys):
            chunk = keys[done:done + per_call]
            ptrs = [self.src(j, size) for j in range(len(chunk))]
            try:
                self.check("populate", self.store.batch_put_from(chunk, ptrs, [size] * len(chunk)))
                done += len(chunk)
            except NoRoom:
                self.wait_for_room(waited)
                done = 0

    def point(self, n, op, size, batch):
        store = self.store
        self.remove_all()
        prefix = f"bench-{n}"
        value = bytes([0x3C]) * size if op == "put" else b""
        srcs = [self.src(j, size) for j in range(batch)]
        dsts = [self.dst(j, size) for j in range(batch)]
        lens = [size] * batch
        writes = op in ("put", "put_from", "batch_put_from")
        if writes:
            ring = min(max(self.args.segment_size // 2 // size, batch), 1 << 20) // batch * batch
        else:
            keys = self.args.read_keys or min(max(POPULATE_BYTES // size, 1), POPULATE_KEYS)
            keys = max(keys, batch)
            ring = -(-keys // batch) * batch
        waited = [0.0]
        if not writes:
            self.populate([f"{prefix}-{i}" for i in range(ring)], size, waited)
        nxt = 0
        samples = []
        busy = 0
        calls = 0
        duration_ns = int(self.args.duration * 1e9)
        perf = time.perf_counter_ns
        while calls <= self.args.min_calls or busy < duration_ns:
            if nxt + batch > ring:
                if writes:
                    self.remove_all()
                nxt = 0
            keys = [f"{prefix}-{i}" for i in range(nxt, nxt + batch)]
            key = keys[0]
            try:
                if op == "put":
                    t = perf()
                    r = store.put(key, value)
                    spent = perf() - t
                    self.check("put", [r])
                elif op == "get":
                    t = perf()
                    v = store.get(key)
                    spent = perf() - t
                    if len(v) != size:
                        raise RuntimeError(f"get returned {len(v)} bytes")
                elif op == "put_from":
                    t = perf()
                    r = store.put_from(key, srcs[0], size)
                    spent = perf() - t
                    self.check("put_from", [r])
                elif op == "get_into":
                    t = perf()
                    r = store.get_into(key, dsts[0], size)
                    spent = perf() - t
                    if r != size:
                        raise RuntimeError(f"get_into returned {r}")
                elif op == "batch_put_from":
                    t = perf()
                    r = store.batch_put_from(keys, srcs, lens)
                    spent = perf() - t
                    self.check("batch_put_from", r)
                else:
                    t = perf()
                    r = store.batch_get_into(keys, dsts, lens)
                    spent = perf() - t
                    if any(x != size for x in r):
                        raise RuntimeError(f"batch_get_into returned {[x for x in r if x != size][:3]}")
            except NoRoom:
                self.wait_for_room(waited)
                nxt = 0
                continue
            nxt += batch
            if calls > 0:
                busy += spent
                samples.append(spent / 1e3)
            calls += 1
        self.remove_all()
        samples.sort()
        keys_done = len(samples) * batch
        secs = busy / 1e9

        def pct(p):
            return samples[round((len(samples) - 1) * p)]

        return keys_done / secs, keys_done * size / secs / 1e9, pct(0.5), pct(0.99), waited[0]


def plan(args):
    points, skipped = [], []
    for op in args.ops:
        for size in args.sizes:
            for batch in (args.batches if op.startswith("batch_") else [1]):
                b = size * batch
                if op.startswith("batch_") and b > args.max_batch_bytes:
                    skipped.append(f"{op} {size_label(size)}x{batch} (> --max_batch_bytes)")
                elif b > args.segment_size // 2:
                    skipped.append(f"{op} {size_label(size)}x{batch} (> half of --segment_size)")
                else:
                    points.append((op, size, batch))
    return points, skipped


HEADER = "{:<9} {:<9} {:<15} {:>7} {:>5} {:>12} {:>8} {:>10} {:>10}".format(
    "placement", "transport", "op", "size", "batch", "ops/s", "GB/s", "p50_us", "p99_us")


def run_setup(args, store, placement, transport, points, buf_ptr, half, header):
    r = store.register_buffer(buf_ptr, 2 * half)
    if r != 0:
        raise RuntimeError(f"register_buffer: {r}")
    bench = Bench(args, store, buf_ptr, half)
    try:
        bench.remove_all()
        for n, (op, size, batch) in enumerate(points):
            if not header[0]:
                print(HEADER, flush=True)
                header[0] = True
            try:
                ops, gbs, p50, p99, waited = bench.point(n, op, size, batch)
            except Exception as e:
                raise RuntimeError(f"{placement}/{transport} {op} {size_label(size)}x{batch}: {e}") from e
            print(f"{placement:<9} {transport:<9} {op:<15} {size_label(size):>7} {batch:>5} {ops:>12.0f} {gbs:>8.3f} "
                  f"{p50:>10.1f} {p99:>10.1f}", flush=True)
            if waited > 0:
                print(f"#   (waited {waited:.1f} s, untimed, for space of removed but leased objects)", flush=True)
    finally:
        try:
            store.remove_all(True)
        except Exception:
            pass
        store.unregister_buffer(buf_ptr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--placement", default="both", choices=["remote", "local", "both"])
    ap.add_argument("--transport", default="tcp",
                    help="accepted for symmetry with ours; upstream runs tcp only (MC_FORCE_TCP)")
    ap.add_argument("--sizes", default="4KiB,64KiB,1MiB,8MiB,32MiB")
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--duration", type=float, default=1.0, help="seconds of calls per point at least")
    ap.add_argument("--min_calls", type=int, default=3)
    ap.add_argument("--read_keys", type=int, default=0,
                    help="keys a read point populates and cycles through (0: max(batch, min(1024, 256 MiB / size)))")
    ap.add_argument("--segment_size", default="2GiB")
    ap.add_argument("--max_batch_bytes", default="1GiB")
    ap.add_argument("--local_buffer_size", default="128MiB")
    ap.add_argument("--metadata_server", default="P2PHANDSHAKE")
    ap.add_argument("--bin_dir", default=os.path.dirname(sys.executable),
                    help="where upstream's mooncake_master and mooncake_client are (default: this python's bin/)")
    args = ap.parse_args()
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in args.ops:
        if o not in OPS:
            ap.error(f"unknown op {o!r}")
    args.segment_size = parse_size(args.segment_size)
    args.max_batch_bytes = parse_size(args.max_batch_bytes)
    args.local_buffer_size = parse_size(args.local_buffer_size)
    points, skipped = plan(args)
    if not points:
        ap.error("no point to measure")
    half = max(size * batch for _, size, batch in points)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    children = Children()
    logs = tempfile.mkdtemp(prefix="mc-store-bench-upstream.")
    try:
        import importlib.metadata as md
        try:
            version = md.version("mooncake-transfer-engine-non-cuda")
        except md.PackageNotFoundError:
            version = "?"

        def start_master(name):
            # A fresh master per placement: upstream's mooncake_client does not unmount its segment on SIGTERM,
            # so the master would keep placing objects on the stopped node until its client TTL runs out.
            rpc_port = free_port()
            argv = [os.path.join(args.bin_dir, "mooncake_master"), f"--rpc_port={rpc_port}",
                    f"--metrics_port={free_port()}", "--rpc_address=127.0.0.1"]
            proc = children.start(argv, os.path.join(logs, name))
            wait_port(rpc_port, proc)
            return proc, f"127.0.0.1:{rpc_port}"

        master, master_addr = start_master("master")
        print("# store_bench_upstream.py (upstream mooncake-transfer-engine-non-cuda==" + version + ", MC_FORCE_TCP="
              + os.environ.get("MC_FORCE_TCP", "") + ")")
        print(f"# master {master_addr} (upstream mooncake_master pid {master.pid}, separate process, a fresh one per "
              f"placement; logs in {logs})")
        cycle = (f"max(batch, {args.read_keys}) keys" if args.read_keys
                 else "max(batch, min(1024, 256 MiB / size)) keys")
        print(f"# per point: >= {args.duration:.2f} s of calls and >= {args.min_calls} calls after 1 warm-up call, "
              f"one thread, one call at a time; reads cycle over {cycle}")
        print(f"# segment {size_label(args.segment_size)} (data node or, for local, this process), registered buffer "
              f"2 x {size_label(half)}, staging (local_buffer_size) {size_label(args.local_buffer_size)}")
        print(f"# host: {os.cpu_count()} cpus; ops/s counts keys (keys/s for batch_*); GB/s = 1e9 bytes/s over time in "
              "calls; p50/p99 per call")
        for s in skipped:
            print(f"# skipped: {s}")
        sys.stdout.flush()

        buf = np.full(2 * half, 0x5A, dtype=np.uint8)
        buf_ptr = buf.ctypes.data
        header = [False]
        if args.placement in ("remote", "both"):
            node_argv = [os.path.join(args.bin_dir, "mooncake_client"), "--host=127.0.0.1", f"--port={free_port()}",
                         f"--metadata_server={args.metadata_server}", f"--master_server_address={master_addr}",
                         f"--global_segment_size={args.segment_size}", "--protocol=tcp"]
            node_log = os.path.join(logs, "node")
            node = children.start(node_argv, node_log)
            wait_log(node_log + ".err", "Starting real client service", node)
            print(f"# data node: upstream mooncake_client pid {node.pid} ({size_label(args.segment_size)}, "
                  f"{args.metadata_server}); this client contributes 0 bytes", flush=True)
            store = MooncakeDistributedStore()
            r = store.setup("127.0.0.1", args.metadata_server, 0, args.local_buffer_size, "tcp", "", master_addr)
            if r != 0:
                raise RuntimeError(f"setup: {r}")
            try:
                run_setup(args, store, "remote", "tcp", points, buf_ptr, half, header)
            finally:
                store.close()
            children.stop(node)
        if args.placement in ("local", "both"):
            if args.placement == "both":
                children.stop(master)
                master, master_addr = start_master("master-local")
            store = MooncakeDistributedStore()
            r = store.setup("127.0.0.1", args.metadata_server, args.segment_size, args.local_buffer_size, "tcp", "",
                            master_addr)
            if r != 0:
                raise RuntimeError(f"setup: {r}")
            print(f"# local: segment {store.get_hostname()} in this process, no other node", flush=True)
            try:
                run_setup(args, store, "local", "-", points, buf_ptr, half, header)
            finally:
                store.close()
        del buf
    except KeyboardInterrupt:
        print("store_bench_upstream: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"store_bench_upstream: {e}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
