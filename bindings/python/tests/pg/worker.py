"""One rank of a mooncake.pg test: ``python worker.py SCENARIO RANK WORLD PORT``. Exits 0 when every check
passed; prints what failed otherwise. Scenarios: ``ops`` (every collective against gloo), ``fault`` (a rank
SIGKILLs itself in the middle of a collective, the survivors go on, a restarted rank rejoins), ``rejoin``
(the restarted rank)."""

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from mooncake import pg

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32,
          torch.int64, torch.bool]
SIZES = [0, 1, 37, 5000, 70000]
OPS = [dist.ReduceOp.SUM, dist.ReduceOp.AVG, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX]
failures = []
checks = [0]


def check(cond, what):
    checks[0] += 1
    if not cond:
        failures.append(what)
        print(f"FAIL rank {dist.get_rank()}: {what}", flush=True)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def values(dtype, n, rank, salt, op=None):
    g = torch.Generator().manual_seed(1000 * salt + rank)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if op == dist.ReduceOp.PRODUCT:
        v = torch.randint(1, 3, (n,), generator=g)  # 1 or 2: products of 4 ranks stay exact
        return v.to(dtype)
    lo = 0 if dtype == torch.uint8 else -3
    return torch.randint(lo, 4, (n,), generator=g).to(dtype)


def reference_reduce(gloo, x, op):
    """gloo all_gather of every rank's input, reduced here (gloo lacks avg and some dtypes)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(gloo))]
    dist.all_gather(parts, x, group=gloo)
    if x.dtype == torch.bool:
        s = torch.stack(parts).to(torch.int64)
        r = s.amax(0) if op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX) else s.amin(0)
        return r.bool()
    acc_t = torch.float64 if x.is_floating_point() else torch.int64
    s = torch.stack(parts).to(acc_t)
    if op == dist.ReduceOp.SUM:
        r = s.sum(0)
    elif op == dist.ReduceOp.AVG:
        r = s.sum(0) / len(parts) if x.is_floating_point() else torch.div(s.sum(0), len(parts), rounding_mode="trunc")
    elif op == dist.ReduceOp.PRODUCT:
        r = s.prod(0)
    elif op == dist.ReduceOp.MIN:
        r = s.amin(0)
    else:
        r = s.amax(0)
    return r.to(x.dtype)


def gloo_or_reference(gloo, x, op):
    if op != dist.ReduceOp.AVG and x.dtype != torch.bool:
        y = x.clone()
        try:
            dist.all_reduce(y, op=op, group=gloo)
            return y
        except RuntimeError:
            pass
    return reference_reduce(gloo, x, op)


def run_ops(rank, world):
    gloo = dist.new_group(backend="gloo")
    salt = 0
    for dtype in DTYPES:
        for n in SIZES:
            for op in OPS:
                if dtype == torch.bool and op == dist.ReduceOp.AVG:
                    continue
                salt += 1
                x = values(dtype, n, rank, salt, op)
                ref = gloo_or_reference(gloo, x, op)
                y = x.clone()
                dist.all_reduce(y, op=op)
                check(same(y, ref), f"all_reduce {dtype} n={n} {op}")
            salt += 1
            x = values(dtype, n, rank, salt)
            root = 1 % world
            a, b = x.clone(), x.clone()
            dist.broadcast(a, root)
            dist.broadcast(b, root, group=gloo)
            check(same(a, b), f"broadcast {dtype} n={n}")
            outs = [torch.empty_like(x) for _ in range(world)]
            gouts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(outs, x)
            dist.all_gather(gouts, x, group=gloo)
            check(all(same(p, q) for p, q in zip(outs, gouts)), f"all_gather {dtype} n={n}")
            flat = torch.empty(world * n, dtype=dtype)
            dist.all_gather_into_tensor(flat, x)
            check(same(flat, torch.cat(gouts)), f"all_gather_into_tensor {dtype} n={n}")
            if dtype != torch.bool:
                big = values(dtype, world * n, rank, salt + 7)
                out = torch.empty(n, dtype=dtype)
                dist.reduce_scatter_tensor(out, big)
                full = gloo_or_reference(gloo, big, dist.ReduceOp.SUM)
                check(same(out, full[rank * n:(rank + 1) * n]), f"reduce_scatter_tensor {dtype} n={n}")
                y = x.clone()
                dist.reduce(y, root, op=dist.ReduceOp.MAX)
                if rank == root:
                    check(same(y, gloo_or_reference(gloo, x, dist.ReduceOp.MAX)), f"reduce {dtype} n={n}")
                else:
                    gloo_or_reference(gloo, x, dist.ReduceOp.MAX)
                    check(same(y, x), f"reduce leaves non-root {dtype} n={n}")
            glist = [torch.empty_like(x) for _ in range(world)] if rank == root else None
            dist.gather(x, glist, dst=root)
            if rank == root:
                check(all(same(p, q) for p, q in zip(glist, gouts)), f"gather {dtype} n={n}")
            slist = [values(dtype, n, r, salt + 11) for r in range(world)] if rank == root else None
            so, sg = torch.empty_like(x), torch.empty_like(x)
            dist.scatter(so, slist, src=root)
            dist.scatter(sg, slist, src=root, group=gloo)
            check(same(so, sg), f"scatter {dtype} n={n}")
        # Uneven all_to_all_single (zeros included) and list all_to_all.
        g = torch.Generator().manual_seed(77)
        splits = torch.randint(0, 4, (world, world), generator=g)
        splits[0, world - 1] = 0
        send = splits[rank].tolist()
        recv = splits[:, rank].tolist()
        inp = values(dtype, sum(send) * 3, rank, 500).reshape(sum(send), 3)
        out = torch.empty(sum(recv), 3, dtype=dtype)
        gout = torch.empty(sum(recv), 3, dtype=dtype)
        dist.all_to_all_single(out, inp, recv, send)
        dist.all_to_all_single(gout, inp, recv, send, group=gloo)
        check(same(out, gout), f"all_to_all_single uneven {dtype}")
        ins = list(inp.split(send))
        outs = [torch.empty(c, 3, dtype=dtype) for c in recv]
        dist.all_to_all(outs, ins)
        check(same(torch.cat(outs), gout), f"all_to_all list uneven {dtype}")
    # Larger than the chunks (many chunks, two-phase all_reduce), non-contiguous tensors.
    x = torch.arange(3 * 1000 * 70, dtype=torch.float32).reshape(3000, 70) * (rank + 1)
    xt = x.t()  # non-contiguous
    y = xt.clone(memory_format=torch.preserve_format)
    ref = y.contiguous().clone()
    dist.all_reduce(ref, group=gloo)
    dist.all_reduce(xt)
    check(not xt.is_contiguous() and torch.equal(xt, ref), "all_reduce non-contiguous large")
    base = torch.zeros(10, 8, dtype=torch.int32)
    view = base[:, 2]  # strided view: written back
    if rank == 0:
        view.copy_(torch.arange(10, dtype=torch.int32))
    dist.broadcast(view, 0)
    check(torch.equal(base[:, 2], torch.arange(10, dtype=torch.int32)) and int(base[:, 3].abs().sum()) == 0,
          "broadcast into a strided view")
    # async_op and futures.
    t = torch.ones(4)
    w = dist.all_reduce(t, async_op=True)
    check(w.wait() and torch.equal(t, torch.full((4,), float(world))), "async all_reduce")
    check(torch.equal(w.get_future().wait()[0], t), "future of all_reduce")
    dist.barrier()
    # send/recv ring and batch_isend_irecv with messages larger than two chunks.
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    msg = torch.arange(300000, dtype=torch.float32) + rank
    got = torch.empty_like(msg)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, msg, nxt), dist.P2POp(dist.irecv, got, prv)])
    for r in reqs:
        r.wait()
    check(torch.equal(got, torch.arange(300000, dtype=torch.float32) + prv), "batch_isend_irecv ring")
    small = torch.tensor([rank * 10], dtype=torch.int64)
    if rank % 2 == 0:
        dist.send(small, nxt, tag=5)
        r = torch.empty(1, dtype=torch.int64)
        dist.recv(r, prv, tag=5)
    else:
        r = torch.empty(1, dtype=torch.int64)
        dist.recv(r, prv, tag=5)
        dist.send(small, nxt, tag=5)
    check(int(r) == prv * 10, "send/recv ring")
    # Subgroups: ranks 0..1 and the rest.
    sub_ranks = [0, 1]
    sub = dist.new_group(sub_ranks, backend="mooncake-cpu")
    gsub = dist.new_group(sub_ranks, backend="gloo")
    if rank in sub_ranks:
        a = torch.tensor([rank + 1.0, 2.0])
        b = a.clone()
        dist.all_reduce(a, group=sub)
        dist.all_reduce(b, group=gsub)
        check(torch.equal(a, b), "subgroup all_reduce")
    # Module-level calls.
    active = pg.get_active_ranks()
    check(active.dtype == torch.int32 and active.tolist() == [1] * world, "get_active_ranks")
    check(pg.get_peer_state(dist.group.WORLD, list(range(world))) == [True] * world, "get_peer_state")
    check(pg.get_num_synced_ranks(dist.group.WORLD) == world, "get_num_synced_ranks")
    run_upstream_extras(rank, world, gloo, sub if rank in sub_ranks else None)
    # Bad input names the argument.
    try:
        dist.all_reduce(torch.ones(2, dtype=torch.float32).to(torch.float8_e4m3fn))
        check(False, "float8 all_reduce must fail")
    except (TypeError, RuntimeError, ValueError) as e:
        check("dtype" in str(e) or "float8" in str(e), f"float8 error names dtype: {e}")
    c = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64) * (rank + 1)
    dist.all_reduce(c)  # torch passes complex tensors as real views
    check(torch.equal(c, torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64) * sum(range(1, world + 1))),
          "complex all_reduce")
    try:
        dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BAND)
        check(False, "BAND must fail")
    except (ValueError, RuntimeError) as e:
        check("op" in str(e), f"BAND error names op: {e}")
    dist.barrier()


def run_upstream_extras(rank, world, gloo, sub):
    """get_failed_ranks_hint / get_local_success, extend_group_size_to, get_preferred_hca and the
    timeout setters."""
    w = dist.all_reduce(torch.ones(2), async_op=True)
    w.wait()
    hint = pg.get_failed_ranks_hint(w)
    check(pg.get_local_success(w), "get_local_success of a clean all_reduce")
    check(hint is not None and hint.dtype == torch.int32 and hint.tolist() == [0] * world, f"hint: {hint}")
    w = dist.barrier(async_op=True)
    check(pg.get_local_success(w) and pg.get_failed_ranks_hint(w).tolist() == [0] * world, "barrier work")
    if sub is not None:
        w = dist.all_reduce(torch.ones(1), group=sub, async_op=True)
        check(pg.get_failed_ranks_hint(w).tolist() == [0, 0], "hint over the subgroup's ranks")
    gw = dist.all_reduce(torch.ones(2), group=gloo, async_op=True)
    gw.wait()
    check(pg.get_failed_ranks_hint(gw) is None and not pg.get_local_success(gw), "a gloo work is not ours")
    try:
        pg.get_local_success("nope")
        check(False, "get_local_success of a str must fail")
    except TypeError:
        pass
    # A deferred isend/irecv has not run before its wait.
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    got = torch.empty(3)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((3,), float(rank)), nxt),
                                   dist.P2POp(dist.irecv, got, prv)])
    check(not pg.get_local_success(reqs[0]), "deferred isend is not yet a success")
    for r in reqs:
        r.wait()
    check(all(pg.get_local_success(r) for r in reqs) and torch.equal(got, torch.full((3,), float(prv))),
          "isend/irecv succeed after wait")
    # Fixed-size groups: the same size is a no-op, others raise.
    pg.extend_group_size_to(dist.group.WORLD, world)
    for size, exc in ((world - 1, RuntimeError), (world + 1, NotImplementedError)):
        try:
            pg.extend_group_size_to(dist.group.WORLD, size)
            check(False, f"extend_group_size_to({size}) must fail")
        except exc as e:
            check("size" in str(e), f"extend_group_size_to error names the size: {e}")
    # No RDMA device here: the topology's preferred lists are empty, and so is the answer.
    import json
    from mooncake.engine import TransferEngine
    matrix = json.loads(TransferEngine().get_local_topology())
    for loc in ("cpu:0", "cuda:0", "nowhere"):
        expected = matrix[loc][0][0] if loc in matrix and matrix[loc][0] else ""
        check(pg.get_preferred_hca(dist.group.WORLD, loc) == expected, f"get_preferred_hca({loc})")
    # Timeout setters map onto the group's timeout.
    b = dist.group.WORLD._get_backend(torch.device("cpu"))
    before = b._group.timeout
    pg.set_collective_timeout_us(45_000_000)
    check(abs(b._group.timeout - 45.0) < 1e-6, f"set_collective_timeout_us: {b._group.timeout}")
    pg.set_p2p_timeout_us(20_000_000)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(2), nxt),
                                   dist.P2POp(dist.irecv, torch.empty(2), prv)])
    for r in reqs:
        r.wait()
    check(abs(b._group.timeout - 45.0) < 1e-6, "the group's timeout is back after a p2p batch")
    for bad, exc in ((0, ValueError), (-5, ValueError), (1.5, TypeError)):
        for setter in (pg.set_collective_timeout_us, pg.set_p2p_timeout_us, pg.set_fault_reconciliation_window_us):
            try:
                setter(bad)
                check(False, f"{setter.__name__}({bad}) must fail")
            except exc:
                pass
    pg.set_fault_reconciliation_window_us(1000)
    pg.set_collective_timeout_us(int(before * 1e6))
    pg._p2p_timeout_s = None
    dist.barrier()


def run_fault(rank, world, victim):
    """`victim` SIGKILLs itself in a stream of all_reduces, between two of them (a kill in the middle of a
    two-phase all_reduce can leave the survivors disagreeing on who took part in its first phase: docs/ep.md,
    Collectives, failure semantics); the survivors finish, agree, go on; a restarted victim (started by the
    test) rejoins."""
    n = 1 << 20
    start = time.monotonic()
    errors = 0
    hinted = 0  # works whose get_failed_ranks_hint names the victim
    for i in range(40):
        if rank == victim and i == 10:
            os.kill(os.getpid(), signal.SIGKILL)
        t = torch.full((n,), float(rank + 1))
        try:
            w = dist.all_reduce(t, async_op=True)
            w.wait()
            hint = pg.get_failed_ranks_hint(w).tolist()
            ok = pg.get_local_success(w)
            check(hint in ([0] * world, [int(r == victim) for r in range(world)]), f"hint: {hint}")
            check(ok == (hint == [0] * world), f"get_local_success {ok} with hint {hint}")
            hinted += hint[victim]
        except pg.CollectiveError as e:
            errors += 1
            check(victim in e.ranks, f"CollectiveError names the victim: {e.ranks}")
    if rank == victim:
        time.sleep(5)  # the timer kills us
        return
    elapsed = time.monotonic() - start
    pg.sync_after_failure(dist.group.WORLD)
    dist.barrier()
    mask = pg.get_active_ranks().tolist()
    check(mask == [0 if r == victim else 1 for r in range(world)], f"victim masked: {mask}")
    t = torch.full((4096,), float(rank + 1))
    dist.all_reduce(t)
    survivors = sum(r + 1 for r in range(world) if r != victim)
    check(bool((t == survivors).all()), f"all_reduce over survivors: {t[:3]} vs {survivors}")
    big = torch.full((n,), float(rank + 1))
    dist.all_reduce(big, op=dist.ReduceOp.AVG)
    check(bool((big == survivors / (world - 1)).all()), "avg over survivors")
    outs = [torch.full((3,), -1.0) for _ in range(world)]
    dist.all_gather(outs, torch.full((3,), float(rank)))
    check(all(torch.equal(outs[r], torch.full((3,), float(r))) for r in range(world) if r != victim),
          "all_gather over survivors")
    print(f"rank {rank}: survivors resumed, {errors} call(s) raised, {hinted} hinted the victim, "
          f"loop took {elapsed:.2f}s", flush=True)
    # The test restarts the victim; wait until it is ready, then take it back.
    deadline = time.monotonic() + 60
    while not all(pg.get_peer_state(dist.group.WORLD, [victim])):
        if time.monotonic() > deadline:
            check(False, "restarted rank never became ready")
            return
        time.sleep(0.05)
    dist.barrier()  # every survivor takes it back at the same point
    pg.recover_ranks(dist.group.WORLD, [victim])
    after_rejoin(rank, world)


def after_rejoin(rank, world):
    t = torch.full((300000,), float(rank + 1))
    dist.all_reduce(t)
    total = sum(r + 1 for r in range(world))
    check(bool((t == total).all()), f"all_reduce after rejoin: {t[:2]} vs {total}")
    check(pg.get_active_ranks().tolist() == [1] * world, f"all active after rejoin: {pg.get_active_ranks()}")
    outs = [torch.empty(2) for _ in range(world)]
    dist.all_gather(outs, torch.full((2,), float(rank)))
    check(all(torch.equal(outs[r], torch.full((2,), float(r))) for r in range(world)), "all_gather after rejoin")
    dist.barrier()


def main():
    scenario, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    timeout = datetime.timedelta(seconds=float(os.environ.get("PG_TEST_TIMEOUT", "60")))
    store = dist.TCPStore("127.0.0.1", port, world, is_master=(rank == 0 and scenario != "rejoin"),
                          timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    chunk = int(os.environ.get("PG_TEST_CHUNK", str(64 << 10)))
    opts = pg.MooncakeBackendOptions(world, scenario == "rejoin", chunk_bytes=chunk)
    dist.init_process_group("mooncake-cpu", store=store, rank=rank, world_size=world, timeout=timeout,
                            pg_options=opts)
    if scenario == "ops":
        run_ops(rank, world)
    elif scenario == "fault":
        run_fault(rank, world, int(os.environ["PG_TEST_VICTIM"]))
    elif scenario == "rejoin":
        pg.join_group(dist.group.WORLD)
        after_rejoin(rank, world)
    print(f"rank {rank} done, {checks[0]} checks, {len(failures)} failure(s)", flush=True)
    sys.stdout.flush()
    os._exit(1 if failures else 0)


if __name__ == "__main__":
    main()
