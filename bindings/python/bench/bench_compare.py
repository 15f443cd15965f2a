#!/usr/bin/env python3
"""Python bindings benchmark, ours vs upstream's wheel, plus our Python overhead over our Rust benches.

    target/py-venv/bin/python bindings/python/bench/bench_compare.py --upstream-python target/upstream-venv/bin/python [--quick]

Runs bench_worker.py (next to this file) once with our python (this interpreter unless --ours-python) and once with
upstream's, one after the other, each with MC_FORCE_TCP=1 and MC_AUTO_PROTOCOLS="" (ours: tcp only, no same-host shm;
upstream ignores it), each starting its own mooncake_master and mooncake_client data node from its own venv's bin
directory on free ports (see bench_worker.py for the points). Full: 3 runs per side (--quick: 2, shorter points),
alternating ours/upstream, best value of each metric kept (the host may be busy with other work). Prints the
configuration and a table ours / upstream. Full run about 2.5 minutes, --quick about 45 s.

"GIL release under threads" (after the ratio table; --no-threads skips it): per side a separate worker run
(`bench_worker.py --parts threads`, own master, data node and target engine) measures 1, 2 and 4 Python threads
calling at once, one store client and one engine shared by the threads as users do, each thread on its own keys and
buffer offsets: store get 4 KiB (objects on the other node), store batch_get_into 32 x 4 KiB, engine
transfer_sync_write 4 KiB. Prints ops/s (keys/s for the batch), each side's scaling N threads / 1 thread and ours /
upstream per thread count. A binding holding the GIL during a call serializes the threads, so its scaling stays near
1.0 (ours releases it around every call). Full: 2 runs per side, alternating, 0.5 s per cell, best kept (about 35 s);
--quick: 1 run, 0.3 s (about 12 s). A worker that crashes or hangs (no line within cell time + 20 s; the worker
itself gives up on threads not back after cell time + 10 s) is stopped by PID and what is left of its process group
(its master, node, target engine) by the group's id; the cell is marked failed with the reason and a fresh worker
runs the remaining cells; a cell that failed is not retried in later runs. Upstream's failures here are reported,
not counted in the exit status; ours are.

"Python overhead" then runs our Rust benches for the same operations on the same host and prints Python p50 minus
Rust p50: `transfer_engine_bench` (target child + initiator, 4 KiB, batch 1, 1 thread, write; its batch latency p50)
and `mooncake_store_bench --mode client --placement remote --transport tcp --sizes 4KiB --ops get` (its p50). Binaries
come from $CARGO_TARGET_DIR (default <repo>/target)/release, transfer_engine_bench also from our venv's bin; build the
store bench with `cargo build --release -p mooncake-store-programs --bin mooncake_store_bench`. A missing binary
prints a note. Nothing here asserts on speed; every process started is stopped by PID (or process group).
"""
import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

from procs import free_port, stop, wait_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
WORKER = os.path.join(HERE, "bench_worker.py")

# (section, key in worker JSON, metric, label, higher_is_better, format)
ROWS = [
    ("engine", "transfer_sync_write_4KiB", "p50_us", "transfer_sync_write 4 KiB  p50 us", False, "{:.1f}"),
    ("engine", "transfer_sync_write_4KiB", "p99_us", "transfer_sync_write 4 KiB  p99 us", False, "{:.1f}"),
    ("engine", "transfer_sync_write_4KiB", "ops_s", "transfer_sync_write 4 KiB  ops/s", True, "{:.0f}"),
    ("engine", "transfer_sync_write_1MiB", "GB_s", "transfer_sync_write 1 MiB  GB/s", True, "{:.3f}"),
    ("engine", "batch_transfer_sync_write_32x4KiB", "ops_s", "batch_transfer_sync_write 32x4 KiB  ops/s", True,
     "{:.0f}"),
    ("store", "put_4KiB", "p50_us", "put 4 KiB  p50 us", False, "{:.1f}"),
    ("store", "get_4KiB", "p50_us", "get 4 KiB  p50 us", False, "{:.1f}"),
    ("store", "batch_get_into_32x4KiB", "ops_s", "batch_get_into 32x4 KiB  keys/s", True, "{:.0f}"),
    ("store", "get_into_1MiB", "GB_s", "get_into 1 MiB  GB/s", True, "{:.3f}"),
    ("store", "batch_put_from_32x64KiB", "GB_s", "batch_put_from 32x64 KiB  GB/s", True, "{:.3f}"),
    ("store", "batch_is_exist_128", "ops_s", "batch_is_exist 128 keys  keys/s", True, "{:.0f}"),
]


def bench_env():
    env = dict(os.environ)
    env["MC_FORCE_TCP"] = "1"
    env["MC_AUTO_PROTOCOLS"] = ""
    return env


def run_worker(name, python, args, log_dir):
    """Runs the worker with `python`; returns its JSON (or {"error": ...})."""
    argv = [python, WORKER, "--bin-dir", os.path.dirname(os.path.abspath(python)),
            "--duration", str(args.duration), "--min-calls", str(args.min_calls)]
    err_path = os.path.join(log_dir, f"worker-{name}.err")
    proc = None
    try:
        with open(err_path, "w") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    env=bench_env(), text=True)
            try:
                out, _ = proc.communicate(timeout=args.worker_timeout)
            except subprocess.TimeoutExpired:
                stop(proc)
                return {"error": f"timed out after {args.worker_timeout} s (stderr: {err_path})"}
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            return {"error": f"no JSON from worker (rc {proc.returncode}; stderr: {err_path})"}
        res = json.loads(lines[-1])
        res["stderr"] = err_path
        return res
    finally:
        stop(proc)


def best_of(results):
    """One result from several runs of a side: per metric the best value (lowest latency, highest rate); the
    configuration and errors of the first run (any run's error is kept)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    out = json.loads(json.dumps(ok[0]))
    out["runs"] = len(results)
    out["failed_runs"] = [r["error"] for r in results if "error" in r]
    for section in ("engine", "store"):
        for key, stats in (out.get(section) or {}).items():
            if not isinstance(stats, dict) or "p50_us" not in stats:
                continue
            for metric in stats:
                vals = [r[section][key][metric] for r in ok if key in (r.get(section) or {})]
                stats[metric] = min(vals) if metric.endswith("_us") else max(vals)
    return out


def get(res, section, key, metric):
    try:
        return float(res[section][key][metric])
    except (KeyError, TypeError, ValueError):
        return None


def print_config(args, ours, ups):
    print("# bench_compare.py: Python bindings, ours (mooncake-rs) vs upstream's wheel")
    print(f"# host: {os.cpu_count()} cpus; both sides run one after the other, one call at a time, one thread")
    print("# env for every process of both sides: MC_FORCE_TCP=1 MC_AUTO_PROTOCOLS='' (tcp only; no same-host shm)")
    print(f"# per point: >= {args.duration} s of timed calls and >= {args.min_calls} calls, after untimed warm-up "
          "calls; only calls are timed")
    print(f"# {args.rounds} worker run(s) per side, alternating ours/upstream; each metric: best over the runs "
          "(lowest latency, highest rate), since other work on this host adds noise")
    for name, r in (("ours", ours), ("upstream", ups)):
        print(f"# {name}: {r.get('package', '?')}=={r.get('version', '?')} python {r.get('python', '?')}")
        info = (r.get("store") or {}).get("info") or {}
        if info:
            print(f"#   store: own mooncake_master (pid {info.get('master_pid')}) and mooncake_client data node "
                  f"(pid {info.get('node_pid')}, segment {info.get('node_segment_size', 0) >> 20} MiB) from "
                  f"{os.path.dirname(r.get('python', ''))}; the bench client contributes "
                  f"global_segment_size={info.get('client_global_segment_size')}")
            print(f"#   probe object's replica at {info.get('probe_replica_endpoints')}, bench client is "
                  f"{info.get('client_hostname')} (objects live in the other process; reads/writes cross TCP)")
            if r["store"].get("room_wait_s"):
                print(f"#   waited {r['store']['room_wait_s']} s (untimed) for store space")
        print("#   engine: target engine in a child process (same python), initiator in the worker; P2PHANDSHAKE, "
              "tcp, 127.0.0.1; local and remote buffers registered")
        print(f"#   logs: {r.get('logs', '?')}, stderr: {r.get('stderr', '?')}")
        if "error" in r:
            print(f"#   ERROR: {r['error']}")
        for e in r.get("failed_runs") or []:
            print(f"#   a run failed (its values are left out): {e}")


def print_table(ours, ups):
    print()
    print("ratio = ours / upstream; 'better' says which side wins (latency rows: lower is better, others higher)")
    head = f"{'section':<7} {'metric':<42} {'ours':>12} {'upstream':>12} {'ratio':>7}  better"
    print(head)
    print("-" * len(head))
    for section, key, metric, label, higher, fmt in ROWS:
        a, b = get(ours, section, key, metric), get(ups, section, key, metric)
        fa = fmt.format(a) if a is not None else "n/a"
        fb = fmt.format(b) if b is not None else "n/a"
        if a is not None and b:
            ratio = a / b
            better = "ours" if (ratio > 1) == higher else "upstream"
            if abs(ratio - 1) < 0.05:
                better = "~same"
            rs = f"{ratio:.2f}"
        else:
            rs, better = "n/a", ""
        print(f"{section:<7} {label:<42} {fa:>12} {fb:>12} {rs:>7}  {better}")


# (op in the worker, label, items per call)
THREAD_OPS = [
    ("get_4KiB", "store get 4 KiB  ops/s", 1),
    ("batch_get_into_32x4KiB", "store batch_get_into 32x4 KiB  keys/s", 32),
    ("transfer_sync_write_4KiB", "engine transfer_sync_write 4 KiB  ops/s", 1),
]
THREAD_COUNTS = (1, 2, 4)


class LineReader:
    """Lines of a binary pipe with a timeout per line."""

    def __init__(self, stream):
        self.fd, self.buf = stream.fileno(), b""

    def next(self, timeout):
        """A line (str), "" at EOF, None after `timeout` s without a whole line."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace") + "\n"


def run_threads(name, python, args, log_dir, skip=()):
    """One threads run of a side: {"cells": {(op, n): worker's cell dict or {"error": ...}}, "info": ..., "stderr":
    [...]}. Crashes and hangs fail the current cell; a fresh worker then runs the cells still to do."""
    pending = [(op, n) for op, _, _ in THREAD_OPS for n in THREAD_COUNTS if (op, n) not in skip]
    cells = {(op, n): {"error": "skipped: failed in an earlier run"} for op, n in skip}
    out = {"cells": cells, "stderr": []}
    cell_timeout = args.thread_duration + 20
    attempt = 0
    while pending:
        err_path = os.path.join(log_dir, f"threads-{name}-{attempt}.err")
        out["stderr"].append(err_path)
        attempt += 1
        argv = [python, WORKER, "--bin-dir", os.path.dirname(os.path.abspath(python)), "--parts", "threads",
                "--duration", str(args.thread_duration), "--thread-cells", ",".join(f"{op}:{n}" for op, n in pending)]
        proc = None
        try:
            with open(err_path, "w") as err:
                # Own process group, so that what a crashed or killed worker leaves (its master, node, target
                # engine) is stopped by that group's id.
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                        env=bench_env(), start_new_session=True)
            reader = LineReader(proc.stdout)
            timeout, hung_reported, final = 90.0, False, None  # the first line comes after the setup
            out.pop("info", None)
            while pending:
                line = reader.next(timeout)
                if line is None:
                    stop(proc)
                    reason = f"hang: no result within {timeout:.0f} s; worker killed (stderr: {err_path})"
                    if "info" not in out:  # during the setup: no cell can run
                        final = {"error": f"setup {reason}"}
                        break
                    cells[pending.pop(0)] = {"error": reason}
                    break
                if line == "":
                    rc = proc.wait()
                    try:
                        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
                    except ValueError:
                        how = f"signal {-rc}"
                    if "info" not in out:
                        final = {"error": f"worker crashed ({how}) during the setup (stderr: {err_path})"}
                    elif not hung_reported:
                        cells[pending.pop(0)] = {"error": f"worker crashed ({how}) during this cell (stderr: "
                                                          f"{err_path})"}
                    break
                if not line.startswith("{"):
                    continue
                d = json.loads(line)
                if "setup" in d:
                    out["info"] = d.get("info")
                    timeout = cell_timeout
                elif "op" in d:
                    key = (d["op"], d["threads"])
                    cells[key] = d
                    if key in pending:
                        pending.remove(key)
                    hung_reported = "hang" in d.get("error", "")
                elif "python" in d:
                    final = d
                    break
            if final is not None:
                for key in pending:  # only when the worker gave up before its cells (setup error)
                    cells[key] = {"error": final.get("error", "no result from the worker")}
                pending = []
        finally:
            stop_group(proc)
    return out


def stop_group(proc):
    """stop(proc), then SIGTERM (SIGKILL 1 s later) to what is left of the process group it leads."""
    stop(proc)
    if proc is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(1.0)


def best_threads(runs):
    """Per cell the highest rate over the runs; a cell that no run measured keeps the first run's error."""
    best = {}
    for op, _, _ in THREAD_OPS:
        for n in THREAD_COUNTS:
            got = [r["cells"].get((op, n)) or {"error": "no result"} for r in runs]
            ok = [c for c in got if "ops_s" in c]
            if ok:
                best[(op, n)] = dict(max(ok, key=lambda c: c["ops_s"]), runs=[c.get("ops_s") for c in got])
            else:
                best[(op, n)] = next(c for c in got if "error" in c)
    return best


def print_threads(args, t_ours, t_ups, seconds):
    print()
    print("GIL release under threads: throughput with 1, 2 and 4 Python threads calling at once")
    print("# one store client and one engine per process shared by the threads (as users do), each thread on its own "
          "keys and buffer offsets;")
    print("# a binding that holds the GIL during a call serializes the threads, so its scaling (N threads / 1 thread) "
          "stays near 1.0x or below;")
    print("# ours releases the GIL around every call. store: 256 x 4 KiB objects per thread on the other node (tcp); "
          "engine: 4 KiB writes to the target engine child")
    print(f"# host: {os.cpu_count()} cpus, shared with the data node / target engine process and any other work, "
          "which caps the scaling")
    print(f"# per op: 0.4 s of untimed single-thread calls first; per cell: untimed warm-up calls per thread, then all "
          f"threads start together and call for {args.thread_duration} "
          f"s; rate = calls finished / wall time; {args.thread_rounds} separate worker run(s) per side, alternating, "
          "best kept")
    head = (f"{'metric':<40} {'thr':>3} {'ours':>10} {'scale':>6} {'upstream':>10} {'scale':>6} {'ratio':>6}  better")
    print(head)
    print("-" * len(head))
    notes = []

    def cell(res, op, n):
        c = res.get((op, n)) or {"error": "no result"}
        if "ops_s" in c:
            one = (res.get((op, 1)) or {}).get("ops_s")
            return c["ops_s"], f"{c['ops_s']:.0f}", f"{c['ops_s'] / one:.2f}x" if one else "n/a"
        notes.append(c["error"])
        return None, f"FAILED[{len(notes)}]", ""

    for op, label, _ in THREAD_OPS:
        for n in THREAD_COUNTS:
            a, fa, sa = cell(t_ours, op, n)
            b, fb, sb = cell(t_ups, op, n)
            if a is not None and b:
                ratio = a / b
                rs, better = f"{ratio:.2f}", ("~same" if abs(ratio - 1) < 0.05 else "ours" if ratio > 1 else "upstream")
            else:
                rs, better = "n/a", ""
            print(f"{label if n == THREAD_COUNTS[0] else '':<40} {n:>3} {fa:>10} {sa:>6} {fb:>10} {sb:>6} {rs:>6}  "
                  f"{better}")
    for i, note in enumerate(notes, 1):
        print(f"  [{i}] {note}")
    print(f"# threads section: {seconds:.0f} s")


def target_dir():
    t = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    return t if os.path.isabs(t) else os.path.join(REPO, t)


def read_line_matching(proc, pattern, timeout):
    """The first stdout line of `proc` matching `pattern` (re.search), within `timeout` s, or None."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        if not ready:
            if proc.poll() is not None:
                return None
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            m = re.search(pattern, line.decode(errors="replace"))
            if m:
                return m
    return None


def rust_engine_p50(args, log_dir):
    """(best p50 us over the rounds, description) of our transfer_engine_bench 4 KiB batch-1 1-thread write against
    a target child, or (None, note)."""
    candidates = [os.path.join(target_dir(), "release", "transfer_engine_bench"),
                  os.path.join(os.path.dirname(os.path.abspath(args.ours_python)), "transfer_engine_bench")]
    prog = next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)
    if prog is None:
        return None, f"transfer_engine_bench not found (looked at {', '.join(candidates)}); build it with " \
                     "`cargo build --release --bin transfer_engine_bench` or install our wheel"
    buffer = str(64 << 20)
    target = initiator = None
    try:
        with open(os.path.join(log_dir, "teb-target.err"), "w") as err:
            target = subprocess.Popen([prog, "--mode", "target", "--buffer_size", buffer], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=err, env=bench_env())
        m = read_line_matching(target, r"^segment (\S+)", 30)
        if not m:
            return None, f"{prog} --mode target printed no segment line (see {log_dir}/teb-target.err)"
        cmd = [prog, "--mode", "initiator", "--segment_id", m.group(1), "--operation", "write", "--block_size", "4096",
               "--batch_size", "1", "--threads", "1", "--duration", str(max(1.0, args.duration)),
               "--buffer_size", buffer, "--protocol", "tcp"]
        p50s = []
        for _ in range(args.rounds):
            initiator = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=bench_env(), text=True)
            try:
                out, _ = initiator.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                return None, f"{prog} initiator timed out"
            m = re.search(r"p50 ([\d.]+) us", out)
            if not m:
                return None, f"{prog} initiator printed no p50: {out.strip()[-300:]}"
            p50s.append(float(m.group(1)))
        desc = f"{os.path.relpath(prog, REPO)} {' '.join(cmd[1:3] + cmd[5:])}; p50 of each run: {p50s}"
        return min(p50s), desc
    finally:
        stop(initiator)
        stop(target)


def rust_store_p50(args, log_dir):
    """(best p50 us over the rounds, description) of mooncake_store_bench's remote tcp 4 KiB get, with a separate
    mooncake_master process like the Python side, or (None, note)."""
    prog = os.path.join(target_dir(), "release", "mooncake_store_bench")
    if not (os.path.isfile(prog) and os.access(prog, os.X_OK)):
        return None, f"{prog} not found; build it with " \
                     "`cargo build --release -p mooncake-store-programs --bin mooncake_store_bench`"
    master_prog = next((c for c in (os.path.join(target_dir(), "release", "mooncake_master"),
                                    os.path.join(os.path.dirname(os.path.abspath(args.ours_python)), "mooncake_master"))
                        if os.path.isfile(c) and os.access(c, os.X_OK)), None)
    master = proc = None
    try:
        cmd = [prog, "--mode", "client", "--placement", "remote", "--transport", "tcp", "--sizes", "4KiB", "--ops",
               "get", "--duration", str(max(1.0, args.duration)), "--segment_size", "1GiB"]
        if master_prog:
            rpc = free_port()
            with open(os.path.join(log_dir, "store-bench-master.log"), "w") as log:
                master = subprocess.Popen([master_prog, f"--rpc_port={rpc}", f"--metrics_port={free_port()}",
                                           "--rpc_address=127.0.0.1"], stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=bench_env())
            wait_port(rpc, master)
            cmd += ["--master_server_address", f"127.0.0.1:{rpc}"]
        p50s = []
        for n in range(args.rounds):
            with open(os.path.join(log_dir, f"store-bench-{n}.err"), "w") as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                        env=bench_env(), text=True)
                try:
                    out, _ = proc.communicate(timeout=90)
                except subprocess.TimeoutExpired:
                    return None, f"{prog} timed out"
            rows = [ln.split() for ln in out.splitlines()]
            # placement transport op size batch ops/s GB/s p50_us p99_us
            got = [float(f[7]) for f in rows if len(f) == 9 and f[0] == "remote" and f[2] == "get"]
            if not got:
                return None, f"{prog} printed no get row (rc {proc.returncode}; see {log_dir}/store-bench-{n}.err)"
            p50s.append(got[0])
        where = f"separate {os.path.relpath(master_prog, REPO)}" if master_prog else "master in the bench process"
        desc = f"{os.path.relpath(prog, REPO)} {' '.join(cmd[1:])} ({where}); p50 of each run: {p50s}"
        return min(p50s), desc
    finally:
        stop(proc)
        stop(master)


def print_overhead(args, ours, log_dir):
    print()
    print("Python overhead (ours): Python p50 - Rust bench p50, same op, same host, tcp only; each side's best p50 "
          f"over {args.rounds} run(s)")
    py_engine = get(ours, "engine", "transfer_sync_write_4KiB", "p50_us")
    py_get = get(ours, "store", "get_4KiB", "p50_us")
    for label, py, (rust, desc) in (
        ("engine write 4 KiB (batch 1)", py_engine, rust_engine_p50(args, log_dir)),
        ("store get 4 KiB (remote node)", py_get, rust_store_p50(args, log_dir)),
    ):
        if rust is None:
            print(f"  {label:<30} NOTE: {desc}")
            continue
        pys = f"{py:.1f}" if py is not None else "n/a"
        diff = f"{py - rust:+.1f}" if py is not None else "n/a"
        print(f"  {label:<30} python p50 {pys:>7} us   rust p50 {rust:>7.1f} us   overhead {diff:>7} us")
        print(f"  {'':<30} rust: {desc}")
    print("  (python: TransferEngine.transfer_sync_write / MooncakeDistributedStore.get of bench_worker.py; rust: "
          "batch_transfer_sync of 1 request / StoreClient::get, which returns the value as a Vec like Python's bytes;"
          " a negative overhead means host noise exceeds the binding's cost)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream-python", required=True, help="upstream venv's python (target/upstream-venv/bin/python)")
    ap.add_argument("--ours-python", default=sys.executable, help="our venv's python (default: this interpreter)")
    ap.add_argument("--quick", action="store_true", help="short points (whole run about 45 s)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of timed calls per point (1.0; quick 0.3)")
    ap.add_argument("--min-calls", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="worker runs per side, alternating, best value of each metric kept (3; quick 2)")
    ap.add_argument("--no-overhead", action="store_true", help="skip the Python overhead section")
    ap.add_argument("--no-threads", action="store_true", help="skip the GIL release under threads section")
    ap.add_argument("--thread-duration", type=float, default=None, help="seconds per threads cell (0.5; quick 0.3)")
    ap.add_argument("--thread-rounds", type=int, default=None, help="threads runs per side, best kept (2; quick 1)")
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 0.3 if args.quick else 1.0
    if args.min_calls is None:
        args.min_calls = 10 if args.quick else 20
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    args.worker_timeout = 60 if args.quick else 150
    if args.thread_duration is None:
        args.thread_duration = 0.3 if args.quick else 0.5
    if args.thread_rounds is None:
        args.thread_rounds = 1 if args.quick else 2
    for p in (args.upstream_python, args.ours_python):
        if not (os.path.isfile(p) and os.access(p, os.X_OK)):
            ap.error(f"{p} is not an executable python")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    log_dir = tempfile.mkdtemp(prefix="mc-bench-compare.")
    t0 = time.monotonic()
    runs = {"ours": [], "upstream": []}
    for n in range(args.rounds):
        # Alternate the sides so that a burst of load from elsewhere on the host hits both alike.
        for name, python in (("ours", args.ours_python), ("upstream", args.upstream_python)):
            runs[name].append(run_worker(f"{name}-{n}", python, args, log_dir))
    ours, ups = best_of(runs["ours"]), best_of(runs["upstream"])
    threads = {"ours": [], "upstream": []}
    t1 = time.monotonic()
    if not args.no_threads:
        for n in range(args.thread_rounds):
            for name, python in (("ours", args.ours_python), ("upstream", args.upstream_python)):
                failed = {k for r in threads[name] for k, c in r["cells"].items() if "error" in c}
                threads[name].append(run_threads(f"{name}-{n}", python, args, log_dir, failed))
    t_threads = time.monotonic() - t1
    print_config(args, ours, ups)
    print_table(ours, ups)
    if not args.no_threads:
        print_threads(args, best_threads(threads["ours"]), best_threads(threads["upstream"]), t_threads)
    if not args.no_overhead:
        print_overhead(args, ours, log_dir)
    print(f"\n# total {time.monotonic() - t0:.0f} s; logs in {log_dir}")
    ours_thread_failed = any("error" in c and not c["error"].startswith("skipped")
                             for r in threads["ours"] for c in r["cells"].values())
    return 1 if ours_thread_failed or any("error" in r for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
