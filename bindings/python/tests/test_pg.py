"""mooncake.pg, the torch.distributed backend `mooncake-cpu`: multi-process on 127.0.0.1.

Each test starts one process per rank (tests/pg/worker.py) around a TCPStore on a free port. `ops`: every
collective, for every dtype and several sizes (zero-length and uneven splits included), equals gloo's result
in the same processes (gloo groups alongside); subgroups, non-contiguous tensors, async works,
batch_isend_irecv, bad input, and upstream's extra calls (get_failed_ranks_hint / get_local_success,
extend_group_size_to, get_preferred_hca, the set_*_us setters). `fault`: a rank SIGKILLs itself in the middle
of an all_reduce; the survivors finish within the timeout plus a margin, agree on the mask, their results are
exact and the work of the call that lost the victim names it; a restarted rank rejoins and the next
collectives include it. Skipped when torch does not import.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed in this venv (scripts/setup_torch_venv.sh)")
pytest.importorskip("torch.distributed", reason="torch.distributed is not available")

from conftest import free_port  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pg", "worker.py")


def start(scenario, rank, world, port, env):
    return subprocess.Popen([sys.executable, WORKER, scenario, str(rank), str(world), str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout):
    deadline = time.monotonic() + timeout
    outs = {}
    for rank, p in procs.items():
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            out += "\n<timed out: killed>"
        outs[rank] = (p.returncode, out)
    return outs


def env_of(**extra):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    env.setdefault("MC_LOG_LEVEL", "error")
    return env


@pytest.mark.parametrize("world", [2, 4])
def test_every_collective_equals_gloo(world):
    port = free_port()
    env = env_of()
    procs = {r: start("ops", r, world, port, env) for r in range(world)}
    outs = finish(procs, 240)
    for rank, (rc, out) in outs.items():
        assert rc == 0, f"rank {rank} exited {rc}:\n{out[-4000:]}"
        assert " 0 failure(s)" in out and ", 0 checks" not in out, out[-2000:]


def test_killed_rank_is_masked_and_a_restarted_rank_rejoins():
    world, victim = 4, 3
    port = free_port()
    env = env_of(PG_TEST_TIMEOUT=3, PG_TEST_VICTIM=victim)
    procs = {r: start("fault", r, world, port, env) for r in range(world)}
    # The victim kills itself (SIGKILL) between two all_reduces of a stream.
    rc = procs[victim].wait(timeout=120)
    assert rc == -signal.SIGKILL, f"victim exited {rc}: {procs[victim].stdout.read()[-3000:]}"
    procs[victim].stdout.read()
    t0 = time.monotonic()
    replacement = start("rejoin", victim, world, port, env)
    survivors = {r: p for r, p in procs.items() if r != victim}
    outs = finish(survivors, 120)
    outs[victim] = finish({victim: replacement}, max(5.0, 120 - (time.monotonic() - t0)))[victim]
    for rank, (rc, out) in outs.items():
        assert rc == 0, f"rank {rank} exited {rc}:\n{out[-4000:]}"
    # The call that lost the victim says so on at least one survivor: in its work (get_failed_ranks_hint /
    # get_local_success), or by raising CollectiveError (a large all_reduce that lost it between phases).
    # The others may have learnt it from the store before their call.
    def noticed(out):
        line = out.split("survivors resumed, ")[1].split(", loop took")[0]  # "E call(s) raised, H hinted ..."
        return int(line.split(" call(s) raised, ")[0]) + int(line.split(", ")[1].split(" hinted")[0]) > 0

    assert any(noticed(outs[r][1]) for r in survivors), [outs[r][1][-600:] for r in survivors]
    for rank in survivors:
        assert "survivors resumed" in outs[rank][1]
        took = float(outs[rank][1].split("loop took ")[1].split("s")[0])
        assert took < 2 * 3 + 15, f"survivors took {took:.1f}s with a 3 s timeout"
        print(outs[rank][1].strip().splitlines()[-2])


def test_native_group_checks_every_argument():
    from mooncake import pg

    g = pg.Group(0, 1, chunk_bytes=65536, timeout=5.0)
    g.connect([g.local_info()])
    t = torch.arange(8, dtype=torch.float32)
    g.all_reduce(t.data_ptr(), 32, "float32", "sum")
    assert torch.equal(t, torch.arange(8, dtype=torch.float32))
    with pytest.raises(TypeError, match="dtype"):
        g.all_reduce(t.data_ptr(), 32, "complex64", "sum")
    with pytest.raises(ValueError, match="op"):
        g.all_reduce(t.data_ptr(), 32, "float32", "xor")
    with pytest.raises(ValueError, match="tensor"):
        g.all_reduce(0, 32, "float32", "sum")
    with pytest.raises(ValueError, match="data"):
        g.all_reduce(t.data_ptr(), 30, "float32", "sum")  # not whole elements
    with pytest.raises(ValueError, match="root"):
        g.broadcast(t.data_ptr(), 32, 3)
    with pytest.raises(ValueError, match="send_counts"):
        g.all_to_all(t.data_ptr(), 32, [-1], t.data_ptr(), 32, [32])
    with pytest.raises(ValueError, match="recvs"):
        g.send_recv([], [(0, 0, t.data_ptr(), 32), (0, 1, t.data_ptr() + 16, 16)])
    with pytest.raises(ValueError, match="timeout"):
        pg.Group(0, 1, timeout=0.0)
    with pytest.raises(ValueError, match="rank"):
        pg.Group(2, 2)
    with pytest.raises(TypeError, match="members"):
        g.connect(["nope"])
    with pytest.raises(ValueError, match="max_group_size"):
        pg.MooncakeBackendOptions(0)
    with pytest.raises(ValueError, match="auto_sync_on_failure"):
        pg.MooncakeBackendOptions(2, False, False, True)
    assert issubclass(pg.CollectiveError, RuntimeError)
    assert g.active_ranks() == [True]
    # In-place all_gather: the input is a view of the output (copied before the call).
    out = torch.zeros(4)
    out[:2] = torch.tensor([1.0, 2.0])
    g2 = pg.Group(0, 1, chunk_bytes=65536, timeout=5.0, engine=g.get_engine())
    g2.connect([g2.local_info()])
    g2.all_gather(out.data_ptr(), 8, out.data_ptr(), 8)
    assert out[:2].tolist() == [1.0, 2.0]
    g.shutdown()


def test_p2p_timeout_applies_to_send_recv_batches_only():
    """set_p2p_timeout_us: each send/recv batch runs with it, and the group's timeout is restored after."""
    from mooncake import pg

    class FakeGroup:
        timeout = 7.0
        seen = []

        def set_timeout(self, s):
            self.timeout = s

        def active_ranks(self):
            return [True, True]

        def send(self, ptr, nbytes, dst, tag):
            self.seen.append(("send", self.timeout))

    class FakeHost:
        ptr, nbytes = 0, 0

        def done(self):
            pass

    class Fake:
        _joining = False
        _group = FakeGroup()

        def _check(self, before):
            pass

    fake = Fake()
    try:
        pg.set_p2p_timeout_us(250_000)
        pg.MooncakeBackend._flush_batch(fake, [("send", FakeHost(), 1, 0)])
        assert FakeGroup.seen == [("send", 0.25)] and fake._group.timeout == 7.0
        with pytest.raises(ValueError, match="us"):
            pg.set_p2p_timeout_us(0)
        with pytest.raises(TypeError, match="us"):
            pg.set_collective_timeout_us(2.5)
    finally:
        pg._p2p_timeout_s = None
