"""EP dispatch + combine latency: mooncake.mooncake_ep_buffer.Buffer against upstream's torch.distributed
fallback algorithm (all-gather based, over gloo), in the same run on the same ranks.

    python ep_bench.py [--ranks 4] [--tokens 128] [--hidden 7168] [--experts 64] [--topk 8]
                       [--protocol tcp|shm] [--iters 10] [--warmup 2]

Starts one process per rank on 127.0.0.1 (a gloo group), each with the same random routing (top-k of the
experts, distinct per token) and BF16 tokens. Per iteration every rank runs, between barriers:
- ours: ``dispatch`` (BF16) then ``combine`` of the received rows (the expert computation is the identity);
- the fallback: upstream's ``_fallback_dispatch`` / ``_fallback_combine`` algorithm (all_gather of the token
  counts, all_gather_into_tensor of the tokens and top-k indices, per local expert the selection and the
  zero-padded ``[L, R*N, hidden]`` output; for combine all_gather of indices and weights, the weighted rows
  scattered into ``[R, T, hidden]`` and one all_reduce), written here against gloo.
An iteration's latency is the slowest rank's. Prints the configuration, per-phase medians, and the ratio of the
median dispatch + combine latencies (fallback / ours; the issue's target is >= 3 at 4 ranks).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import free_port  # noqa: E402


# ----- upstream's fallback algorithm, over torch.distributed -----


def fallback_dispatch(x, topk_idx, rank, world, n_max, num_experts):
    num_tokens, hidden = x.shape
    k = topk_idx.size(1)
    nl = num_experts // world
    import torch
    import torch.distributed as dist

    counts = [torch.empty(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([num_tokens], dtype=torch.int64))
    per_rank = [int(c.item()) for c in counts]
    t_max = max(per_rank)
    if num_tokens < t_max:
        x = torch.cat([x, torch.zeros((t_max - num_tokens, hidden), dtype=x.dtype)])
        topk_idx = torch.cat([topk_idx, torch.full((t_max - num_tokens, k), -1, dtype=topk_idx.dtype)])
    rows = world * n_max
    # gloo gathers into the concatenation [world * t_max, ...]; upstream's NCCL call takes [world, t_max, ...].
    all_x = torch.empty((world * t_max, hidden), dtype=x.dtype)
    dist.all_gather_into_tensor(all_x, x)
    all_x = all_x.view(world, t_max, hidden)
    all_idx = torch.empty((world * t_max, k), dtype=topk_idx.dtype)
    dist.all_gather_into_tensor(all_idx, topk_idx)
    all_idx = all_idx.view(world, t_max, k)
    recv, count = [], torch.zeros((nl,), dtype=torch.int32)
    src_info = torch.full((nl, rows), -1, dtype=torch.int32)
    layout = torch.zeros((nl, world), dtype=torch.int64)
    for le in range(nl):
        e = rank * nl + le
        srcs, toks, begin = [], [], 0
        for s in range(world):
            pos = (all_idx[s, : per_rank[s]] == e).any(dim=1).nonzero(as_tuple=False).view(-1)
            c = pos.numel()
            layout[le, s] = (begin << 32) | c if c else 0
            if c:
                srcs.append(torch.full_like(pos, s))
                toks.append(pos)
                begin += c
        src = torch.cat(srcs) if srcs else torch.empty(0, dtype=torch.int64)
        tok = torch.cat(toks) if toks else torch.empty(0, dtype=torch.int64)
        valid = min(src.numel(), rows)
        count[le] = valid
        got = all_x[src[:valid], tok[:valid]]
        if valid:
            src_info[le, :valid] = tok[:valid].to(torch.int32)
        recv.append(torch.cat([got, torch.zeros((rows - valid, hidden), dtype=x.dtype)]))
    return torch.stack(recv), count, (src_info, layout, n_max, hidden, num_experts), per_rank


def fallback_combine(y, topk_idx, topk_weights, handle, rank, world, per_rank):
    import torch
    import torch.distributed as dist

    src_info, layout, n_max, hidden, num_experts = handle
    num_tokens, k = topk_idx.shape
    nl = num_experts // world
    counts = [torch.empty(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([num_tokens], dtype=torch.int64))
    per_rank = [int(c.item()) for c in counts]
    t_max = max(per_rank)
    if num_tokens < t_max:
        topk_idx = torch.cat([topk_idx, torch.full((t_max - num_tokens, k), -1, dtype=topk_idx.dtype)])
        topk_weights = torch.cat([topk_weights, torch.zeros((t_max - num_tokens, k), dtype=topk_weights.dtype)])
    all_idx = torch.empty((world * t_max, k), dtype=topk_idx.dtype)
    dist.all_gather_into_tensor(all_idx, topk_idx)
    all_idx = all_idx.view(world, t_max, k)
    all_w = torch.empty((world * t_max, k), dtype=topk_weights.dtype)
    dist.all_gather_into_tensor(all_w, topk_weights)
    all_w = all_w.view(world, t_max, k)
    send = torch.zeros((world, t_max, hidden), dtype=torch.bfloat16)
    for le in range(nl):
        e = rank * nl + le
        for s in range(world):
            entry = int(layout[le, s])
            begin, c = (entry >> 32) & 0xFFFFFFFF, entry & 0xFFFFFFFF
            if c == 0:
                continue
            toks = src_info[le, begin : begin + c].to(torch.long)
            rows = y[le, begin : begin + c]
            ok = toks < per_rank[s]
            toks, rows = toks[ok], rows[ok]
            w = (all_w[s, toks] * (all_idx[s, toks] == e)).sum(dim=1).view(-1, 1)
            send[s, toks] += rows * w
    dist.all_reduce(send)
    return send[rank, :num_tokens]


# ----- one rank -----


def rank_main(a):
    import torch
    import torch.distributed as dist

    from mooncake.mooncake_ep_buffer import Buffer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.ranks)
    g = torch.Generator().manual_seed(7 + a.rank)
    x = torch.randn((a.tokens, a.hidden), generator=g).to(torch.bfloat16)
    scores = torch.rand((a.tokens, a.experts), generator=g)
    topk_idx = torch.topk(scores, a.topk, dim=-1).indices.to(torch.int64).contiguous()
    topk_w = torch.rand((a.tokens, a.topk), generator=g, dtype=torch.float32)
    hint = Buffer.get_ep_buffer_size_hint(a.tokens, a.hidden, a.ranks, a.experts)
    buf = Buffer(dist.group.WORLD, hint, protocol=a.protocol, disable_p2p=(a.protocol == "tcp"))
    active = torch.ones((a.ranks,), dtype=torch.int32)

    def ours():
        t0 = time.perf_counter()
        recv, _, handle, _, _ = buf.dispatch(x, topk_idx, active, a.tokens, a.experts, -1, use_fp8=False)
        t1 = time.perf_counter()
        out, _, _ = buf.combine(recv, topk_idx, topk_w, active, -1, handle)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    def theirs():
        t0 = time.perf_counter()
        recv, _, handle, per_rank = fallback_dispatch(x, topk_idx, a.rank, a.ranks, a.tokens, a.experts)
        t1 = time.perf_counter()
        out = fallback_combine(recv, topk_idx, topk_w, handle, a.rank, a.ranks, per_rank)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    times = {"ours": [], "fallback": []}
    for i in range(a.warmup + a.iters):
        for name, f in (("ours", ours), ("fallback", theirs)):
            if a.only and name != a.only:
                continue
            dist.barrier()
            d, c, out = f()
            if i >= a.warmup:
                times[name].append((d, c))
    # Both compute the same combine (up to BF16 rounding: the fallback accumulates per expert in BF16).
    err = 0.0
    if not a.only:
        ref = theirs()[2].float()
        mine = ours()[2].float()
        err = ((ref - mine).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
    everyone = [None] * a.ranks
    dist.all_gather_object(everyone, {"times": times, "err": err})
    if a.rank == 0:
        print(json.dumps(everyone))
    dist.barrier()
    buf.shutdown()


def summarize(a, ranks):
    def per_iter(name, part):
        # The slowest rank's time, per iteration.
        cols = zip(*[[t[0] + t[1] if part == "total" else t[part] for t in r["times"][name]] for r in ranks])
        return [max(c) for c in cols]

    print(
        f"ep_bench: ranks={a.ranks} tokens={a.tokens} hidden={a.hidden} dtype=bf16 experts={a.experts} topk={a.topk} "
        f"protocol={a.protocol} iters={a.iters} (+{a.warmup} warm-up) host=127.0.0.1 cpus={os.cpu_count()}"
    )
    print(f"{'':10} {'dispatch ms':>12} {'combine ms':>12} {'total ms':>12} {'total p90 ms':>13}")
    medians = {}
    for name in ("ours", "fallback"):
        if a.only and name != a.only:
            continue
        d, c, t = (per_iter(name, p) for p in (0, 1, "total"))
        medians[name] = statistics.median(t)
        p90 = sorted(t)[min(len(t) - 1, int(0.9 * len(t)))]
        print(
            f"{name:10} {statistics.median(d) * 1e3:12.2f} {statistics.median(c) * 1e3:12.2f} "
            f"{medians[name] * 1e3:12.2f} {p90 * 1e3:13.2f}"
        )
    if a.only:
        return
    print(f"max relative difference of the combined outputs: {max(r['err'] for r in ranks):.2e}")
    print(f"ratio (fallback / ours, median dispatch + combine): {medians['fallback'] / medians['ours']:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--protocol", default="tcp")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", choices=["ours", "fallback"], help="run one side only (for profiling; no ratio)")
    p.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank >= 0:
        rank_main(a)
        return
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, os.path.abspath(__file__)] + [
        f"--{k}={getattr(a, k)}" for k in ("ranks", "tokens", "hidden", "experts", "topk", "protocol", "iters", "warmup")
    ] + ([f"--only={a.only}"] if a.only else [])
    procs = [
        subprocess.Popen(base + [f"--rank={r}", f"--port={port}"], stdout=subprocess.PIPE if r == 0 else None, env=env)
        for r in range(a.ranks)
    ]
    out, _ = procs[0].communicate()
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"ep_bench: ranks exited with {codes}")
    summarize(a, json.loads(out.decode().strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
