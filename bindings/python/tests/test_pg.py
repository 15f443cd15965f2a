"""mooncake.pg, the torch.distributed backend `mooncake-cpu`: multi-process on 127.0.0.1.

Each test starts one process per rank (tests/pg/worker.py) around a TCPStore on a free port. `ops`: every
collective, for every dtype and several sizes (zero-length and uneven splits included), equals gloo's result
in the same processes (gloo groups alongside); subgroups, non-contiguous tensors, async works,
batch_isend_irecv, bad input. `fault`: a rank SIGKILLs itself in the middle of an all_reduce; the survivors
finish within the timeout plus a margin, agree on the mask, and their results are exact; a restarted rank
rejoins and the next collectives include it. Skipped when torch does not import.
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
    # The victim kills itself (SIGKILL) in the middle of an all_reduce.
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
    for rank in survivors:
        assert "survivors resumed" in outs[rank][1]
