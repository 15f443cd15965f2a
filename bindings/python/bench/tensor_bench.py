#!/usr/bin/env python3
"""Tensor benchmark, ours vs upstream's wheel: put_tensor / get_tensor and the forms over a registered buffer
(get_tensor_into, put_tensor_from) for 1 MiB and 32 MiB CPU float32 tensors.

    target/tensor-venv/bin/python bindings/python/bench/tensor_bench.py --upstream-python target/upstream-venv/bin/python

Both pythons need torch (scripts/setup_torch_venv.sh VENV links one torch into each venv). This script runs itself
as a worker (--worker) under our python (this interpreter unless --ours-python) and under upstream's, alternating,
--runs times each (best value of each metric kept: the host may be busy). Each worker starts its own mooncake_master
from its venv's bin directory on free 127.0.0.1 ports (stopped by PID when it ends), sets up one store client (1 GiB
segment, 256 MiB local buffer, tcp; MC_FORCE_TCP=1, and MC_AUTO_PROTOCOLS="" for ours) and times each call in a loop
for --duration seconds (at least --min-calls calls). Objects live in the client's own segment, as in a single-node
cache. Prints the configuration and a table of GB/s (tensor bytes moved per second) with ours / upstream. Nothing
here asserts on speed.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from procs import free_port, stop, wait_port  # noqa: E402

SIZES = [("1MiB", 1 << 20), ("32MiB", 32 << 20)]
OPS = ["put_tensor", "get_tensor", "get_tensor_into", "put_tensor_from"]
HEADER = 304


def worker(args) -> dict:
    """Runs every point with this interpreter's mooncake package; returns {op/size: GB/s}."""
    import torch
    from mooncake.store import MooncakeDistributedStore

    bindir = os.path.dirname(os.path.abspath(sys.executable))
    rpc, http, metrics = free_port(), free_port(), free_port()
    master = subprocess.Popen(
        [
            os.path.join(bindir, "mooncake_master"),
            f"--rpc_port={rpc}",
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_port={http}",
            f"--metrics_port={metrics}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results = {}
    try:
        wait_port(rpc, master)
        wait_port(http, master)
        store = MooncakeDistributedStore()
        rc = store.setup("localhost", f"http://127.0.0.1:{http}/metadata", 1 << 30, 256 << 20, "tcp", "",
                         f"127.0.0.1:{rpc}")  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"setup returned {rc}")
        for label, nbytes in SIZES:
            tensor = torch.randn(nbytes // 4)
            buf = torch.empty(nbytes + HEADER + 4096, dtype=torch.uint8)
            addr = buf.data_ptr()
            if store.register_buffer(addr, buf.numel()) != 0:
                raise RuntimeError("register_buffer failed")
            # Enough distinct keys that puts never hit an existing one, within the segment.
            slots = max(4, min(args.min_calls * 4, (512 << 20) // nbytes))

            def timed(op, call, keys):
                """GB/s of `call` over `keys` in order: writes get one fresh key per call (so at most len(keys)
                calls), reads cycle over theirs. One untimed call first (for writes, on a key of its own)."""
                check(op, call(keys[0] + "-warm" if op.startswith("put") else keys[0], 0))
                calls, start = 0, time.perf_counter()
                while True:
                    check(op, call(keys[calls % len(keys)], calls))
                    calls += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= args.duration and calls >= args.min_calls:
                        break
                    if op.startswith("put") and calls >= len(keys):
                        break
                return calls * nbytes / elapsed / 1e9

            def check(op, rc):
                if rc is None or (isinstance(rc, int) and rc != 0):
                    raise RuntimeError(f"{op} {label}: {rc!r}")

            def fresh(prefix):
                # Keys read recently stay leased and survive remove_all: every point gets keys of its own.
                store.remove_all()
                return [f"{prefix}{label}/{i}" for i in range(slots)]

            keys = fresh("p")
            results[f"put_tensor/{label}"] = timed("put_tensor", lambda k, i: store.put_tensor(k, tensor), keys)
            store.remove_all()
            g = f"g{label}"
            rc = store.put_tensor(g, tensor)
            if rc != 0:
                raise RuntimeError(f"put_tensor g {label}: {rc}")
            keys = [g]
            results[f"get_tensor/{label}"] = timed("get_tensor", lambda k, i: store.get_tensor(k), keys)
            into = lambda k, i: store.get_tensor_into(k, addr, buf.numel())  # noqa: E731
            results[f"get_tensor_into/{label}"] = timed("get_tensor_into", into, keys)
            got = store.get_tensor_into(g, addr, buf.numel())
            if got is None or not torch.equal(got, tensor):
                raise RuntimeError("get_tensor_into returned the wrong tensor")
            keys = fresh("f")
            frm = lambda k, i: store.put_tensor_from(k, addr, nbytes + HEADER)  # noqa: E731
            results[f"put_tensor_from/{label}"] = timed("put_tensor_from", frm, keys)
            store.remove_all()
            store.unregister_buffer(addr)
        store.close()
    finally:
        stop(master)
    return results


def run_side(python: str, name: str, args) -> dict:
    env = dict(os.environ, MC_FORCE_TCP="1")
    if name == "ours":
        env["MC_AUTO_PROTOCOLS"] = ""
    argv = [python, os.path.abspath(__file__), "--worker", "--duration", str(args.duration),
            "--min-calls", str(args.min_calls)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, env=env, timeout=600)
    lines = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": f"exit {out.returncode}: {out.stderr.decode()[-1500:]}"}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream-python", default=os.environ.get("MOONCAKE_UPSTREAM_PYTHON", ""))
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--runs", type=int, default=3, help="runs per side, alternating; best kept")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per point")
    ap.add_argument("--min-calls", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        # Native code may print to fd 1: keep stdout for the one JSON line.
        fd = os.dup(1)
        os.dup2(2, 1)
        result = worker(args)
        os.write(fd, (json.dumps(result) + "\n").encode())
        return 0

    if not args.upstream_python:
        ap.error("--upstream-python (or MOONCAKE_UPSTREAM_PYTHON) is required")
    best = {"ours": {}, "upstream": {}}
    errors = {}
    for _ in range(args.runs):
        for name, python in (("ours", args.ours_python), ("upstream", args.upstream_python)):
            r = run_side(python, name, args)
            if "error" in r:
                errors[name] = r["error"]
                continue
            for k, v in r.items():
                best[name][k] = max(v, best[name].get(k, 0.0))

    print("tensor bench: ours vs upstream's wheel, same host, one after the other")
    print(f"  ours:     {args.ours_python}")
    print(f"  upstream: {args.upstream_python}")
    print(f"  {args.runs} runs per side (best kept), {args.duration} s per point, at least {args.min_calls} calls;")
    print("  one client, 1 GiB segment, 256 MiB local buffer, tcp, objects in the client's own segment;")
    print(f"  CPU float32 tensors; {os.cpu_count()} CPUs")
    for name, err in errors.items():
        print(f"  {name} failed in a run: {err.strip().splitlines()[-1] if err.strip() else err}")
    print(f"\n{'point':<28}{'ours GB/s':>12}{'upstream GB/s':>16}{'ours/upstream':>16}")
    for op in OPS:
        for label, _ in SIZES:
            key = f"{op}/{label}"
            o, u = best["ours"].get(key), best["upstream"].get(key)
            ratio = f"{o / u:.2f}x" if o and u else "-"
            fmt = lambda v: f"{v:.3f}" if v else "-"  # noqa: E731
            print(f"{key:<28}{fmt(o):>12}{fmt(u):>16}{ratio:>16}")
    return 1 if "ours" in errors else 0


if __name__ == "__main__":
    sys.exit(main())
