"""Process helpers shared by bench_compare.py and bench_worker.py (both run from this folder, under either
wheel's python): free ports, waiting for a listener, and stopping children by PID."""

import os
import random
import signal
import socket
import subprocess
import time


# Ports free_port() has handed out in this process.
_HANDED_OUT: set = set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a server about to be started.

    Chosen below the kernel's ephemeral range (20000 up to ip_local_port_range's start), not where bind(0)
    picks: an outgoing connection of any process may take an ephemeral port as its local port before the
    server binds it. Checked bindable, and never handed out twice by this process.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            end = min(32768, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        end = 32768
    if end <= 20100:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(1000):
        port = random.randrange(20000, end)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 in 20000..{end}")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Waits until something accepts on 127.0.0.1:port; fails early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def stop(proc, timeout: float = 10.0) -> None:
    """SIGTERM by PID, SIGKILL after `timeout`; `None` or an exited process is left alone."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
