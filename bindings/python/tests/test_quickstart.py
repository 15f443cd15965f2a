"""Upstream's transfer-engine quick start as two programs (quickstart/transfer_receiver.py and
quickstart/transfer_sender.py), run with this venv's python: the receiver registers a 1 MiB buffer and hands
its session id and address to the sender over ZMQ; the sender makes ten `transfer_sync_write` calls; the
receiver checks the bytes. Both must exit 0 within 60 s; every process is stopped by PID afterwards.
"""

import os
import subprocess
import sys

import pytest

from conftest import free_port, stop

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart")
RECEIVER = os.path.join(HERE, "transfer_receiver.py")
SENDER = os.path.join(HERE, "transfer_sender.py")


def run_pair(receiver_args, sender_args, timeout=60):
    port = free_port()
    procs = []
    try:
        recv = subprocess.Popen(
            [sys.executable, RECEIVER, "--zmq-port", str(port), *receiver_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(recv)
        send = subprocess.Popen(
            [sys.executable, SENDER, "--zmq-port", str(port), *sender_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(send)
        s_out, s_err = send.communicate(timeout=timeout)
        r_out, r_err = recv.communicate(timeout=timeout)
        return (send.returncode, s_out, s_err), (recv.returncode, r_out, r_err)
    finally:
        for p in procs:
            stop(p, timeout=5)


@pytest.mark.parametrize("buffer,pattern", [("numpy", "ones"), ("numpy", "iota"), ("managed", "iota")])
def test_quickstart_sender_receiver(buffer, pattern):
    (s_rc, s_out, s_err), (r_rc, r_out, r_err) = run_pair(
        ["--check", pattern, "--buffer", buffer], ["--pattern", pattern]
    )
    assert s_rc == 0, f"sender exit {s_rc}\n{s_out}\n{s_err[-3000:]}"
    assert r_rc == 0, f"receiver exit {r_rc}\n{r_out}\n{r_err[-3000:]}"
    assert s_out.count("Transfer successful!") == 10, s_out
    assert "Transfer failed" not in s_out
    assert "Data verified" in r_out


def test_quickstart_receiver_detects_wrong_data():
    """The receiver's check is real: a sender writing another pattern makes it fail."""
    (s_rc, s_out, s_err), (r_rc, r_out, r_err) = run_pair(["--check", "iota"], ["--pattern", "ones"])
    assert s_rc == 0, f"sender exit {s_rc}\n{s_out}\n{s_err[-3000:]}"
    assert r_rc == 1, f"receiver exit {r_rc}\n{r_out}\n{r_err[-3000:]}"
    assert "data mismatch" in r_err
