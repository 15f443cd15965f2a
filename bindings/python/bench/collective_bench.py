"""all_reduce / all_gather / all_to_all bandwidth of mooncake.pg's `mooncake-cpu` against gloo, on the same
ranks in the same run.

    python bindings/python/bench/collective_bench.py [--ranks 2,4] [--sizes-mib 1,4,16,64] [--iters 5]

One process per rank on 127.0.0.1 around a TCPStore; each rank holds a `mooncake-cpu` default group and a
gloo group over the same ranks. Per (ranks, op, size): a warm-up call, then `iters` timed calls, each
started after a gloo barrier; the time of a call is the slowest rank's, the row reports the median.
GB/s = bytes of the collective's tensor (the all_reduce buffer, the all_gather output, the all_to_all
input) / that time. ratio = mooncake GB/s / gloo GB/s. Environment: MOONCAKE_PROTOCOL (default tcp; shm is
used next to it between ranks on one host), MOONCAKE_PG_CHUNK_BYTES (default 4 MiB).
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

OPS = ["all_reduce", "all_gather", "all_to_all"]


def worker(rank, world, port, sizes, iters):
    import torch
    import torch.distributed as dist

    from mooncake import pg  # noqa: F401  (registers mooncake-cpu)

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=(rank == 0), timeout=datetime.timedelta(seconds=120),
                          wait_for_workers=False)
    dist.init_process_group("mooncake-cpu", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    gloo = dist.new_group(backend="gloo")
    rows = []
    for op in OPS:
        for mib in sizes:
            nbytes = mib << 20
            n = nbytes // 4
            per = n // world
            x = torch.full((n,), float(rank + 1))
            out_gather = torch.empty(n)
            gather_in = torch.full((per,), float(rank))
            a2a_out = torch.empty(per * world)
            a2a_in = torch.full((per * world,), float(rank))

            def call(group):
                if op == "all_reduce":
                    dist.all_reduce(x, group=group)
                elif op == "all_gather":
                    dist.all_gather_into_tensor(out_gather, gather_in, group=group)
                else:
                    dist.all_to_all_single(a2a_out, a2a_in, group=group)

            result = {}
            for name, group in (("gloo", gloo), ("mooncake", None)):
                times = []
                for i in range(iters + 1):
                    dist.barrier(group=gloo)
                    t0 = time.perf_counter()
                    call(group)
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=gloo)
                    if i:
                        times.append(float(dt))
                result[name] = statistics.median(times)
            rows.append((op, mib, result["mooncake"], result["gloo"]))
    if rank == 0:
        for op, mib, ours, theirs in rows:
            gb = (mib << 20) / 1e9
            print(f"ROW {world} {op} {mib} {gb / ours:.3f} {ours * 1e3:.3f} {gb / theirs:.3f} {theirs * 1e3:.3f}",
                  flush=True)
    dist.barrier(group=gloo)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--sizes-mib", default="1,4,16,64")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--worker", nargs=3, type=int, metavar=("RANK", "WORLD", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    if args.worker:
        worker(*args.worker, sizes, args.iters)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from procs import free_port

    import torch

    print("collective_bench: mooncake-cpu (mooncake.pg) vs gloo, same ranks, same run")
    print(f"  ranks={args.ranks} sizes_mib={args.sizes_mib} iters={args.iters} (median of slowest rank; 1 warm-up)")
    print(f"  torch={torch.__version__} protocol={os.environ.get('MOONCAKE_PROTOCOL', 'tcp')} (+shm on one host) "
          f"chunk_bytes={os.environ.get('MOONCAKE_PG_CHUNK_BYTES', 4 << 20)} cpus={os.cpu_count()} host=127.0.0.1")
    print(f"{'ranks':>5} {'op':>10} {'MiB':>4} | {'mooncake GB/s':>13} {'(ms)':>9} | {'gloo GB/s':>9} {'(ms)':>9} | ratio")
    for world in [int(r) for r in args.ranks.split(",")]:
        port = free_port()
        env = dict(os.environ)
        env.setdefault("MC_LOG_LEVEL", "error")
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--sizes-mib", args.sizes_mib,
                                   "--iters", str(args.iters), "--worker", str(r), str(world), str(port)],
                                  stdout=subprocess.PIPE, text=True, env=env) for r in range(world)]
        out, _ = procs[0].communicate()
        for p in procs[1:]:
            p.wait()
        for line in out.splitlines():
            if not line.startswith("ROW "):
                continue
            _, w, op, mib, ours, ours_ms, theirs, theirs_ms = line.split()
            ratio = float(ours) / float(theirs)
            print(f"{w:>5} {op:>10} {mib:>4} | {ours:>13} {ours_ms:>9} | {theirs:>9} {theirs_ms:>9} | {ratio:.2f}x",
                  flush=True)
        if any(p.returncode for p in procs):
            print(f"  ranks={world}: a rank failed (exit codes {[p.returncode for p in procs]})")


if __name__ == "__main__":
    main()
