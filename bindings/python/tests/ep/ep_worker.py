"""One rank of the EP tests (bindings/python/tests/test_ep.py starts one process per rank).

    python ep_worker.py RANK WORLD STORE_PORT SCENARIO REPORT_PATH

Every rank joins a gloo group on 127.0.0.1, runs the scenario's sequence of calls (all ranks make the same
calls), checks each result against a reference computed here from the inputs of every rank, gathered with plain
torch.distributed (gloo all_gather), and writes the names of the checks that passed (and timings) to
REPORT_PATH as JSON. Any failed check raises: the process exits non-zero with the traceback on stderr.

Scenarios:
- ``basic``: tcp only (same-host shortcuts off); BF16 and FP8, copied and zero-copy combines, async_finish and
  return_recv_hook, a lazily sized buffer, every bad-input case, and upstream's mock recovery
  (rank 1 makes a new Buffer, the others call update_ep_member).
- ``kill`` (4 ranks): one buffer over tcp and one over shm, BF16 and FP8 on both, then the last rank SIGKILLs
  itself between calls and the survivors' next calls must finish within timeout_us + 1 s, mask it, and be
  exact over the survivors; then rank 2 SIGSTOPs itself (alive, silent: only the timeout finds it) and the
  remaining two ranks' calls must do the same.
"""

import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from mooncake.mooncake_ep_buffer import Buffer

HIDDEN = 256
N_MAX = 12
TOPK = 4
# In the kill scenario: the last rank is SIGKILLed, then this one stops (SIGSTOP).
STOPPED = 2

REPORT = {"checks": [], "timings": {}}


def passed(name):
    REPORT["checks"].append(name)


# ----- inputs -----


def make_inputs(rank, it, num_experts, seed=1234):
    """Random tokens (a random count from 0 to N_MAX; the first iterations use N_MAX), top-k experts with about
    a fifth masked (-1) and a few duplicated, and weights."""
    g = torch.Generator().manual_seed(seed + 1000 * it + rank)
    num_tokens = N_MAX if it < 2 else int(torch.randint(0, N_MAX + 1, (1,), generator=g))
    x = (torch.randn((num_tokens, HIDDEN), generator=g) * 2).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:TOPK] for _ in range(num_tokens)]) if num_tokens else (
        torch.empty((0, TOPK), dtype=torch.int64)
    )
    idx = idx.to(torch.int64)
    masked = torch.rand((num_tokens, TOPK), generator=g) < 0.2
    idx[masked] = -1
    dup = torch.rand((num_tokens,), generator=g) < 0.1
    for t in torch.nonzero(dup).view(-1).tolist():
        idx[t, 1] = idx[t, 0]
    w = torch.rand((num_tokens, TOPK), generator=g, dtype=torch.float32)
    return x.contiguous(), idx.contiguous(), w.contiguous()


def gather(x, idx, w, world):
    """Every rank's inputs, with torch.distributed (gloo) all_gather, padded to N_MAX tokens."""
    n = torch.tensor([x.size(0)], dtype=torch.int64)
    ns = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(ns, n)
    pad = N_MAX - x.size(0)
    xp = torch.cat([x, torch.zeros((pad, HIDDEN), dtype=x.dtype)]).view(torch.int32)  # gloo has no 16-bit types
    ip = torch.cat([idx, torch.full((pad, TOPK), -1, dtype=torch.int64)])
    wp = torch.cat([w, torch.zeros((pad, TOPK), dtype=torch.float32)])
    xs = [torch.empty_like(xp) for _ in range(world)]
    is_ = [torch.empty_like(ip) for _ in range(world)]
    ws = [torch.empty_like(wp) for _ in range(world)]
    dist.all_gather(xs, xp)
    dist.all_gather(is_, ip)
    dist.all_gather(ws, wp)
    return [
        (xs[r].view(torch.bfloat16)[: int(ns[r])], is_[r][: int(ns[r])], ws[r][: int(ns[r])]) for r in range(world)
    ]


# ----- reference -----


def fp8_cast(x):
    """The per-128 block E4M3 cast of upstream's kernels (codes, scales): code = e4m3(x * (448 / amax)).

    `448 / amax` is an f32 division here; upstream's Python fallback writes `448.0 / amax`, which torch computes
    as `amax.reciprocal() * 448` and which can round differently (one code apart at rounding ties)."""
    m, n = x.shape
    blocks = x.view(m, -1, 128)
    amax = blocks.abs().float().amax(dim=2).view(m, -1).clamp(1e-4)
    mul = torch.full_like(amax, 448.0) / amax
    codes = (blocks.float() * mul.unsqueeze(2)).to(torch.float8_e4m3fn).view(m, n)
    return codes, (amax / 448.0).view(m, -1)


def expert_output(rows, expert):
    """What expert `expert` computes from its (BF16) input rows: a per-expert scaling, rounded to BF16."""
    return (rows.float() * (1.0 + expert / 16.0)).to(torch.bfloat16)


def check_dispatch(rank, world, num_experts, everyone, alive, fp8, recv_x, count, handle, tag):
    """The dispatch outputs equal the layout computed from every rank's inputs (sources in `alive` only)."""
    src_info, layout_range, n, hidden, experts = handle
    assert (n, hidden, experts) == (N_MAX, HIDDEN, num_experts), (n, hidden, experts)
    nl = num_experts // world
    codes, scales = recv_x if fp8 else (recv_x, None)
    assert codes.shape == (nl, world * N_MAX, HIDDEN), codes.shape
    assert codes.dtype == (torch.float8_e4m3fn if fp8 else torch.bfloat16)
    if fp8:
        assert scales.shape == (nl, world * N_MAX, HIDDEN // 128), scales.shape
    assert count.dtype == torch.int32 and src_info.dtype == torch.int32 and layout_range.dtype == torch.int64
    for le in range(nl):
        e = rank * nl + le
        begin = 0
        want_rows, want_src = [], []
        for s in range(world):
            x, idx, _ = everyone[s]
            toks = [] if s not in alive else (idx == e).any(dim=1).nonzero().view(-1).tolist()
            want = (begin << 32) | len(toks) if toks else 0
            assert int(layout_range[le, s]) == want, f"{tag}: layout_range[{le}, {s}] = {int(layout_range[le, s])}, want {want}"
            begin += len(toks)
            want_src += toks
            want_rows += [x[t] for t in toks]
        c = int(count[le])
        assert c == len(want_src), f"{tag}: count[{le}] = {c}, want {len(want_src)}"
        assert src_info[le, :c].tolist() == want_src, f"{tag}: src_info[{le}]"
        assert (src_info[le, c:] == -1).all(), f"{tag}: src_info[{le}] past the count"
        if c == 0:
            continue
        rows = torch.stack(want_rows)
        if fp8:
            want_codes, want_scales = fp8_cast(rows)
            assert torch.equal(codes[le, :c].view(torch.uint8), want_codes.view(torch.uint8)), f"{tag}: fp8 codes {le}"
            assert torch.equal(scales[le, :c], want_scales), f"{tag}: fp8 scales {le}"
        else:
            assert torch.equal(codes[le, :c].view(torch.int16), rows.view(torch.int16)), f"{tag}: rows {le}"


def expert_outputs(rank, world, num_experts, fp8, recv_x, count):
    """The `[L, R*N, hidden]` BF16 expert outputs of this rank (rows past the counts are zero)."""
    nl = num_experts // world
    if fp8:
        codes, scales = recv_x
        rows = codes.float().view(nl, -1, HIDDEN // 128, 128) * scales.unsqueeze(3)
        rows = rows.view(nl, -1, HIDDEN).to(torch.bfloat16)
    else:
        rows = recv_x
    y = torch.zeros((nl, world * N_MAX, HIDDEN), dtype=torch.bfloat16)
    for le in range(nl):
        c = int(count[le])
        y[le, :c] = expert_output(rows[le, :c], rank * nl + le)
    return y


def ref_combine(rank, world, num_experts, mine, alive, fp8):
    """Each token's expert outputs weighted and summed in f32 in top-k order, rounded once to BF16."""
    x, idx, w = mine
    nl = num_experts // world
    rows = x
    if fp8:
        codes, scales = fp8_cast(x) if x.size(0) else (x, None)
        if x.size(0):
            rows = (codes.float().view(x.size(0), -1, 128) * scales.unsqueeze(2)).view(x.size(0), -1).to(torch.bfloat16)
    acc = torch.zeros((x.size(0), HIDDEN), dtype=torch.float32)
    for t in range(x.size(0)):
        for j in range(TOPK):
            e = int(idx[t, j])
            if e < 0 or (e // nl) not in alive:
                continue
            acc[t] = acc[t] + w[t, j] * expert_output(rows[t : t + 1], e)[0].float()
    return acc.to(torch.bfloat16)


def iteration(buf, rank, world, num_experts, it, alive, active, fp8, zero_copy=False, mode="sync", everyone=None,
              timeout_us=-1, tag=""):
    """One dispatch + combine, both checked against the reference. Returns (dispatch s, combine s)."""
    mine = make_inputs(rank, it, num_experts)
    if everyone is None:
        everyone = gather(*mine, world)
    x, idx, w = mine
    t0 = time.monotonic()
    recv_x, count, handle, event, hook = buf.dispatch(
        x, idx, active, N_MAX, num_experts, timeout_us, use_fp8=fp8,
        async_finish=(mode == "async"), return_recv_hook=(mode == "hook"),
    )
    if mode == "hook":
        hook()
    elif mode == "async":
        event.current_stream_wait()
    t1 = time.monotonic()
    check_dispatch(rank, world, num_experts, everyone, alive, fp8, recv_x, count, handle, f"{tag} dispatch it={it}")
    y = expert_outputs(rank, world, num_experts, fp8, recv_x, count)
    if zero_copy:
        buf.get_next_combine_buffer(handle)[:, :, :] = y
    out = torch.empty((x.size(0), HIDDEN), dtype=torch.bfloat16) if it % 2 else None
    t2 = time.monotonic()
    combined, event, hook = buf.combine(
        y, idx, w, active, timeout_us, handle, zero_copy=zero_copy,
        async_finish=(mode == "async"), return_recv_hook=(mode == "hook"), out=out,
    )
    if mode == "hook":
        hook()
    elif mode == "async":
        event.current_stream_wait()
    t3 = time.monotonic()
    if out is not None:
        assert combined is out
    want = ref_combine(rank, world, num_experts, mine, alive, fp8)
    assert combined.shape == want.shape, (combined.shape, want.shape)
    assert torch.equal(combined.view(torch.int16), want.view(torch.int16)), (
        f"{tag} combine it={it}: {(combined.float() - want.float()).abs().max()}"
    )
    return t1 - t0, t3 - t2


# ----- bad input -----


def expect_error(kind, arg, fn):
    try:
        fn()
    except kind as e:
        assert arg in str(e), f"{kind.__name__} does not name {arg!r}: {e}"
        return str(e)
    raise AssertionError(f"no {kind.__name__} naming {arg!r}")


def bad_inputs(buf, rank, world, num_experts, active):
    """Each bad call raises naming the argument, writes nothing (mask, outputs, sequence) and leaves the group
    in step (the caller runs a checked iteration afterwards)."""
    x, idx, w = make_inputs(rank, 0, num_experts)
    seq = buf.runtime.sequence()
    mask = active.clone()

    def call(x=x, idx=idx, n=N_MAX, experts=num_experts, fp8=False):
        return buf.dispatch(x, idx, active, n, experts, -1, use_fp8=fp8)

    # hidden not a multiple of 128 with FP8
    expect_error(ValueError, "x", lambda: call(x=torch.zeros((4, 200), dtype=torch.bfloat16), idx=idx[:4], fp8=True))
    # more tokens than the buffer was sized for
    big = torch.zeros((N_MAX + 1, HIDDEN), dtype=torch.bfloat16)
    big_idx = torch.zeros((N_MAX + 1, TOPK), dtype=torch.int64)
    expect_error(ValueError, "x", lambda: call(x=big, idx=big_idx, n=N_MAX))
    # experts not divisible by ranks
    expect_error(ValueError, "num_experts", lambda: call(experts=num_experts + 1))
    # expert indices out of range (both ways)
    bad = idx.clone()
    bad[0, 0] = num_experts
    expect_error(ValueError, "topk_idx", lambda: call(idx=bad))
    bad[0, 0] = -2
    expect_error(ValueError, "topk_idx", lambda: call(idx=bad))
    # wrong dtypes
    expect_error(TypeError, "x", lambda: call(x=x.float()))
    expect_error(TypeError, "topk_idx", lambda: call(idx=idx.to(torch.int32)))
    expect_error(TypeError, "active_ranks", lambda: buf.dispatch(x, idx, active.to(torch.int64), N_MAX, num_experts, -1))
    # non-contiguous tokens
    wide = torch.zeros((x.size(0), HIDDEN * 2), dtype=torch.bfloat16)[:, :HIDDEN]
    expect_error(ValueError, "x", lambda: call(x=wide))
    # topk_idx rows that do not match x
    expect_error(ValueError, "topk_idx", lambda: call(idx=idx[:-1]))
    assert buf.runtime.sequence() == seq, "a bad dispatch moved the sequence number"
    assert torch.equal(active, mask), "a bad dispatch wrote the mask"
    passed("bad_dispatch")

    # combine: a good dispatch first (checked by the caller's reference elsewhere), then bad combines.
    recv_x, count, handle, _, _ = buf.dispatch(x, idx, active, N_MAX, num_experts, -1, use_fp8=False)
    y = expert_outputs(rank, world, num_experts, False, recv_x, count)
    seq = buf.runtime.sequence()
    out = torch.full((x.size(0), HIDDEN), 7.0, dtype=torch.bfloat16)
    expect_error(TypeError, "topk_weights", lambda: buf.combine(y, idx, w.double(), active, -1, handle, out=out))
    expect_error(TypeError, "x", lambda: buf.combine(y.float(), idx, w, active, -1, handle, out=out))
    expect_error(ValueError, "x", lambda: buf.combine(y[:, :-1], idx, w, active, -1, handle, out=out))
    expect_error(ValueError, "topk_weights", lambda: buf.combine(y, idx, w[:, :-1], active, -1, handle, out=out))
    expect_error(ValueError, "out", lambda: buf.combine(y, idx, w, active, -1, handle, out=out[:, :-1]))
    bad = idx.clone()
    bad[0, 0] = num_experts
    expect_error(ValueError, "topk_idx", lambda: buf.combine(y, bad, w, active, -1, handle, out=out))
    broken = (handle[0], handle[1], handle[2], handle[3], num_experts + 1)
    expect_error(ValueError, "handle", lambda: buf.combine(y, idx, w, active, -1, broken, out=out))
    assert buf.runtime.sequence() == seq, "a bad combine moved the sequence number"
    assert (out == 7.0).all(), "a bad combine wrote its output"
    combined, _, _ = buf.combine(y, idx, w, active, -1, handle)
    assert torch.equal(combined.view(torch.int16), ref_combine(rank, world, num_experts, (x, idx, w),
                       set(range(world)), False).view(torch.int16))
    passed("bad_combine")


# ----- scenarios -----


def scenario_basic(rank, world):
    experts = 4 * world
    active = torch.ones((world,), dtype=torch.int32)
    alive = set(range(world))
    hint = Buffer.get_ep_buffer_size_hint(N_MAX, HIDDEN, world, experts)
    buf = Buffer(dist.group.WORLD, hint, disable_p2p=True, protocol="tcp")
    assert buf.runtime.protocols() == ["tcp"], buf.runtime.protocols()
    plan = [  # (fp8, zero_copy, mode)
        (False, False, "sync"), (True, False, "sync"), (False, True, "sync"), (True, True, "sync"),
        (False, False, "async"), (True, False, "hook"), (False, True, "hook"), (True, False, "sync"),
    ]
    for it, (fp8, zero_copy, mode) in enumerate(plan):
        iteration(buf, rank, world, experts, it, alive, active, fp8, zero_copy, mode, tag="tcp")
        passed(f"iter:{'fp8' if fp8 else 'bf16'}:{'zero_copy' if zero_copy else 'copy'}:{mode}")
    assert active.tolist() == [1] * world

    # A synchronous dispatch's rows are native storage reused once its tensor is gone: rows still referenced
    # (here the first call's, and a view of them) are never handed to a later call.
    x, idx, _ = make_inputs(rank, 30, experts)
    first = buf.dispatch(x, idx, active, N_MAX, experts, -1, use_fp8=False)[0]
    view, saved = first[0], first.clone()
    del first
    for it in (31, 32):
        iteration(buf, rank, world, experts, it, alive, active, False, tag="kept rows")
    assert torch.equal(view.view(torch.int16), saved[0].view(torch.int16)), "a kept result was overwritten"
    passed("kept_outputs_not_reused")

    bad_inputs(buf, rank, world, experts, active)
    iteration(buf, rank, world, experts, 20, alive, active, True, tag="after bad input")
    passed("in_step_after_bad_input")

    # A buffer smaller than the hint: the call names num_ep_buffer_bytes and writes nothing.
    small = Buffer(dist.group.WORLD, hint // 2, disable_p2p=True, protocol="tcp")
    x, idx, _ = make_inputs(rank, 0, experts)
    expect_error(ValueError, "num_ep_buffer_bytes", lambda: small.dispatch(x, idx, active, N_MAX, experts, -1))
    assert small.runtime.sequence() == 0 and active.tolist() == [1] * world
    small.shutdown()
    passed("buffer_smaller_than_hint")

    # num_ep_buffer_bytes=0 (upstream's default): sized by the first dispatch; active_ranks=None.
    lazy = Buffer(dist.group.WORLD, disable_p2p=True, protocol="tcp")
    assert lazy.runtime is None
    iteration(lazy, rank, world, experts, 21, alive, None, False, tag="lazy")
    assert lazy.num_ep_buffer_bytes == hint, (lazy.num_ep_buffer_bytes, hint)
    lazy.shutdown()
    passed("lazy_buffer")

    # Upstream's mock recovery: rank 1 replaces its buffer, the others call update_ep_member.
    if rank == 1:
        buf.shutdown()
        buf = Buffer(dist.group.WORLD, hint, disable_p2p=True, protocol="tcp")
    else:
        buf.update_ep_member()
    for it in (22, 23):
        iteration(buf, rank, world, experts, it, alive, active, it % 2 == 1, tag="after update_ep_member")
    passed("update_ep_member")
    dist.barrier()
    buf.shutdown()


def scenario_kill(rank, world):
    experts = 2 * world
    victim = world - 1
    alive = set(range(world))
    hint = Buffer.get_ep_buffer_size_hint(N_MAX, HIDDEN, world, experts)
    bufs = {
        "tcp": Buffer(dist.group.WORLD, hint, disable_p2p=True, protocol="tcp"),
        "shm": Buffer(dist.group.WORLD, hint, protocol="shm"),
    }
    assert bufs["tcp"].runtime.protocols() == ["tcp"] and bufs["shm"].runtime.protocols()[0] == "shm"
    masks = {p: torch.ones((world,), dtype=torch.int32) for p in bufs}
    it = 0
    for fp8 in (False, True):
        for p, buf in bufs.items():
            iteration(buf, rank, world, experts, it, alive, masks[p], fp8, zero_copy=(p == "shm"), tag=p)
            it += 1
    passed("tcp_and_shm")

    # The inputs of the calls after the kill (and after the stop below), gathered while everyone is alive.
    after = {
        p: [gather(*make_inputs(rank, it, experts), world) for it in (100 + i, 110 + i, 120 + i)]
        for i, p in enumerate(bufs)
    }
    dist.barrier()
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    survivors = alive - {victim}
    timeout_us = 2_000_000
    for i, p in enumerate(bufs):
        started = time.monotonic()
        iteration(bufs[p], rank, world, experts, 100 + i, survivors, masks[p], i == 1, everyone=after[p][0],
                  timeout_us=timeout_us, tag=f"{p} after kill")
        elapsed = time.monotonic() - started
        REPORT["timings"][f"{p}_after_kill_s"] = elapsed
        assert elapsed < timeout_us / 1e6 + 1.0, f"{p}: survivors took {elapsed:.2f} s"
        want = [0 if r == victim else 1 for r in range(world)]
        assert masks[p].tolist() == want, (p, masks[p].tolist())
        # Masked from then on: the next call does not wait for the dead rank again.
        started = time.monotonic()
        iteration(bufs[p], rank, world, experts, 110 + i, survivors, masks[p], i == 0, everyone=after[p][1],
                  timeout_us=timeout_us, tag=f"{p} second call after kill")
        REPORT["timings"][f"{p}_second_call_s"] = time.monotonic() - started
        passed(f"killed_rank_masked:{p}")

    # A rank that is alive but stops answering (SIGSTOP: its engine freezes, its sockets stay open): only the
    # timeout finds it. The test harness kills it at the end.
    if rank == STOPPED:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(3)  # never reached: the harness SIGKILLs a stopped rank
    survivors = survivors - {STOPPED}
    timeout_us = 1_500_000
    for i, p in enumerate(bufs):
        started = time.monotonic()
        iteration(bufs[p], rank, world, experts, 120 + i, survivors, masks[p], i == 1, everyone=after[p][2],
                  timeout_us=timeout_us, tag=f"{p} after stop")
        elapsed = time.monotonic() - started
        REPORT["timings"][f"{p}_after_stop_s"] = elapsed
        assert elapsed < timeout_us / 1e6 + 1.0, f"{p}: survivors took {elapsed:.2f} s"
        want = [0 if r in (victim, STOPPED) else 1 for r in range(world)]
        assert masks[p].tolist() == want, (p, masks[p].tolist())
        passed(f"stopped_rank_masked:{p}")


def main():
    rank, world, port, scenario, report = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    started = time.monotonic()
    {"basic": scenario_basic, "kill": scenario_kill}[scenario](rank, world)
    REPORT["timings"]["scenario_s"] = time.monotonic() - started
    with open(report, "w") as f:
        json.dump(REPORT, f)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: after a kill the gloo group has a dead member.
    os._exit(0)


if __name__ == "__main__":
    main()
