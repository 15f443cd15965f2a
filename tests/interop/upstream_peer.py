#!/usr/bin/env python3
"""Interop peer driven by UPSTREAM Mooncake's Python engine (mooncake.engine.TransferEngine).

Run with the venv made by setup_upstream_venv.sh and MC_FORCE_TCP=1:

    MC_FORCE_TCP=1 target/upstream-venv/bin/python tests/interop/upstream_peer.py target --size 1048576 --seed 7
    MC_FORCE_TCP=1 target/upstream-venv/bin/python tests/interop/upstream_peer.py initiator \
        --segment 127.0.0.1:PORT --remote-addr ADDR --size 1048576 --seed 9 --expect-seed 7

Only protocol output goes to stdout (one JSON line, then replies to control commands); native library
output that would go to fd 1 is redirected to stderr.

PATTERN(seed) -- the byte stream both sides reproduce
-----------------------------------------------------
    K1 = 0x9E3779B97F4A7C15, K2 = 0xBF58476D1CE4E5B9           (all arithmetic mod 2**64)
    word(k)  = (k * K1) XOR (seed * K2)                         k = 0, 1, 2, ...
    byte(j)  = (word(j // 8) >> (8 * (j % 8))) & 0xff           i.e. the words laid out little-endian
A region of length L holds bytes byte(0) .. byte(L-1) (truncated if L is not a multiple of 8).
Rust:  (0..).flat_map(|k: u64| (k.wrapping_mul(K1) ^ seed.wrapping_mul(K2)).to_le_bytes())
`seed` is an unsigned 64-bit integer.

The pattern is ALWAYS indexed from the start of the region being filled/checked: `check OFF LEN S`
compares buf[OFF + j] with byte_S(j) for j in [0, LEN). The target's buffer is filled with
PATTERN(seed) from its start (offset 0), so a region [OFF, OFF+LEN) of a fresh target matches
PATTERN(seed) only when OFF == 0; an initiator with --remote-offset OFF writes its local PATTERN(S)
(indexed from 0) to remote [OFF, OFF+LEN), so afterwards `check OFF LEN S` answers `ok`.

MODE target
-----------
    target [--host 127.0.0.1] --size N [--seed S] [--metadata P2PHANDSHAKE] [--protocol tcp]
initialize(host, metadata, protocol, ""), register an N-byte buffer filled with PATTERN(S) (zeros
without --seed), print ONE line
    {"segment": "127.0.0.1:PORT", "addr": <int>, "size": N, "rpc_port": PORT, "pid": <int>}
and serve. Control commands on stdin, one per line, one reply line each on stdout:
    check OFF LEN SEED   -> "ok" | "mismatch at X" (X = absolute offset in the buffer of the first bad byte)
    dump OFF LEN         -> lowercase hex of buf[OFF:OFF+LEN] ("" for LEN 0)
    fill OFF LEN SEED    -> write PATTERN(SEED) into buf[OFF:OFF+LEN], reply "ok"
    zero OFF LEN         -> reply "ok"
    ping                 -> "pong"
    quit (or EOF)        -> "bye", exit 0
Bad command / range -> "error <text>".

MODE initiator
--------------
    initiator --segment HOST:PORT --remote-addr A --size N [--remote-offset O]
              [--expect-seed E] [--seed S] [--chunk C] [--metadata ..] [--protocol tcp] [--host ..]
Steps, in this order, on the remote region R = [A+O, A+O+N):
  1. with --expect-seed E: read R into a zeroed local buffer, verify == PATTERN(E)   ("read_expect")
  2. with --seed S: fill local with PATTERN(S), write local -> R                     ("write")
     then zero local, read R back, verify == PATTERN(S)                              ("readback")
Transfers are issued in chunks of C bytes (default: whole size in one call).
Prints one JSON line {"ok": bool, "steps": [{"step", "ok", "bytes", "seconds", "MBps", "rc"?,
"mismatch_at"?}], "segment", "remote_addr", "size"} and exits 0 only if every step passed
(1 on verification/transfer failure, 2 on setup failure).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

K1 = np.uint64(0x9E3779B97F4A7C15)
K2 = 0xBF58476D1CE4E5B9


def pattern(seed, length):
    """PATTERN(seed)[0:length] as a numpy uint8 array (see module docstring)."""
    words = (length + 7) // 8
    mix = np.uint64((int(seed) * K2) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        w = np.arange(words, dtype=np.uint64) * K1
    w ^= mix
    return w.astype("<u8").view(np.uint8)[:length]


def first_mismatch(actual, expected):
    """Index of the first differing byte, or None."""
    if actual.shape == expected.shape and np.array_equal(actual, expected):
        return None
    diff = np.nonzero(actual != expected)[0]
    return int(diff[0]) if len(diff) else min(len(actual), len(expected))


_OUT = None


def out(line):
    _OUT.write(line + "\n")
    _OUT.flush()


def redirect_native_stdout():
    """Keep our protocol stream on the real stdout; send anything native code prints to fd 1 to stderr."""
    global _OUT
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _OUT = os.fdopen(saved, "w", buffering=1)
    sys.stdout = sys.stderr


def make_engine(args):
    from mooncake.engine import TransferEngine

    eng = TransferEngine()
    rc = eng.initialize(args.host, args.metadata, args.protocol, args.device)
    if rc != 0:
        raise RuntimeError(f"initialize({args.host!r}, {args.metadata!r}, {args.protocol!r}) = {rc}")
    if args.metadata == "P2PHANDSHAKE":
        host = args.host if ":" not in args.host else f"[{args.host}]"
        name = f"{host}:{eng.get_rpc_port()}"
    else:
        name = args.host
    return eng, name


def register(eng, size):
    buf = np.zeros(max(size, 1), dtype=np.uint8)
    addr = buf.ctypes.data
    rc = eng.register_memory(addr, buf.nbytes, "cpu:0")
    if rc != 0:
        raise RuntimeError(f"register_memory = {rc}")
    return buf, addr


def run_target(args):
    eng, name = make_engine(args)
    buf, addr = register(eng, args.size)
    if args.seed is not None:
        buf[: args.size] = pattern(args.seed, args.size)
    out(json.dumps({"segment": name, "addr": addr, "size": args.size,
                    "rpc_port": eng.get_rpc_port(), "pid": os.getpid()}))

    def rng(off, ln):
        off, ln = int(off, 0), int(ln, 0)
        if off < 0 or ln < 0 or off + ln > args.size:
            raise ValueError(f"range [{off}, {off + ln}) outside buffer of {args.size}")
        return off, ln

    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        try:
            if cmd == "quit":
                break
            elif cmd == "ping":
                out("pong")
            elif cmd == "check" and len(parts) == 4:
                off, ln = rng(parts[1], parts[2])
                bad = first_mismatch(buf[off:off + ln], pattern(int(parts[3], 0), ln))
                out("ok" if bad is None else f"mismatch at {off + bad}")
            elif cmd == "dump" and len(parts) == 3:
                off, ln = rng(parts[1], parts[2])
                out(buf[off:off + ln].tobytes().hex())
            elif cmd == "fill" and len(parts) == 4:
                off, ln = rng(parts[1], parts[2])
                buf[off:off + ln] = pattern(int(parts[3], 0), ln)
                out("ok")
            elif cmd == "zero" and len(parts) == 3:
                off, ln = rng(parts[1], parts[2])
                buf[off:off + ln] = 0
                out("ok")
            else:
                out(f"error unknown command {line.strip()!r}")
        except Exception as e:  # keep serving
            out(f"error {e}")
    out("bye")
    eng.unregister_memory(addr)
    os._exit(0)  # skip slow/noisy native teardown


def run_initiator(args):
    try:
        eng, _ = make_engine(args)
        buf, addr = register(eng, args.size)
    except Exception as e:
        out(json.dumps({"ok": False, "error": str(e)}))
        return 2
    remote = args.remote_addr + args.remote_offset
    chunk = args.chunk or args.size
    local = buf[: args.size]
    steps = []

    def xfer(fn):
        t0 = time.perf_counter()
        off = 0
        while off < args.size:
            n = min(chunk, args.size - off)
            rc = fn(args.segment, addr + off, remote + off, n)
            if rc != 0:
                return rc, time.perf_counter() - t0
            off += n
        return 0, time.perf_counter() - t0

    def record(step, rc, secs, bad=None):
        s = {"step": step, "ok": rc == 0 and bad is None, "bytes": args.size,
             "seconds": round(secs, 6), "MBps": round(args.size / secs / 1e6, 1) if secs > 0 else None}
        if rc != 0:
            s["rc"] = rc
        if bad is not None:
            s["mismatch_at"] = bad
        steps.append(s)
        return s["ok"]

    ok = True
    if args.expect_seed is not None:
        local[:] = 0
        rc, secs = xfer(eng.transfer_sync_read)
        bad = first_mismatch(local, pattern(args.expect_seed, args.size)) if rc == 0 else None
        ok &= record("read_expect", rc, secs, bad)
    if ok and args.seed is not None:
        pat = pattern(args.seed, args.size)
        local[:] = pat
        rc, secs = xfer(eng.transfer_sync_write)
        ok &= record("write", rc, secs)
        if ok:
            local[:] = 0
            rc, secs = xfer(eng.transfer_sync_read)
            bad = first_mismatch(local, pat) if rc == 0 else None
            ok &= record("readback", rc, secs, bad)
    if not steps:
        ok = False
    out(json.dumps({"ok": bool(ok), "segment": args.segment, "remote_addr": args.remote_addr,
                    "remote_offset": args.remote_offset, "size": args.size, "steps": steps}))
    eng.unregister_memory(addr)
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for m in ("target", "initiator"):
        s = sub.add_parser(m)
        s.add_argument("--host", default="127.0.0.1", help="local host name/IP given to initialize()")
        s.add_argument("--metadata", default="P2PHANDSHAKE")
        s.add_argument("--protocol", default="tcp")
        s.add_argument("--device", default="", help="4th initialize() argument (device list)")
        s.add_argument("--size", type=lambda x: int(x, 0), required=True)
        s.add_argument("--seed", type=lambda x: int(x, 0), default=None)
    t = sub.choices["initiator"]
    t.add_argument("--segment", required=True, help="remote segment name, e.g. 127.0.0.1:15123")
    t.add_argument("--remote-addr", type=lambda x: int(x, 0), required=True)
    t.add_argument("--remote-offset", type=lambda x: int(x, 0), default=0)
    t.add_argument("--expect-seed", type=lambda x: int(x, 0), default=None)
    t.add_argument("--chunk", type=lambda x: int(x, 0), default=0)
    args = p.parse_args()
    redirect_native_stdout()
    if args.mode == "target":
        run_target(args)
    else:
        rc = run_initiator(args)
        os._exit(rc)


if __name__ == "__main__":
    main()
