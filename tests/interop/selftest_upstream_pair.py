#!/usr/bin/env python3
"""upstream <-> upstream sanity run of upstream_peer.py (target + initiator on 127.0.0.1).

    MC_FORCE_TCP=1 target/upstream-venv/bin/python tests/interop/selftest_upstream_pair.py [SIZE ...]

Default sizes: 4096 1048576 67108864. For each size: start a target (seed 7), run an initiator
(--expect-seed 7 --seed 9), then ask the target `check 0 SIZE 9` over stdin, then `quit`.
Exits 0 only if every size passed. The same driving logic is what a Rust test does with one side
replaced by mooncake-rs.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "upstream_peer.py")


def one(size):
    env = dict(os.environ, MC_FORCE_TCP="1")
    t = subprocess.Popen([sys.executable, PEER, "target", "--size", str(size), "--seed", "7"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=env)
    try:
        info = json.loads(t.stdout.readline())
        r = subprocess.run([sys.executable, PEER, "initiator", "--segment", info["segment"],
                            "--remote-addr", str(info["addr"]), "--size", str(size),
                            "--expect-seed", "7", "--seed", "9"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                           timeout=120)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        t.stdin.write(f"check 0 {size} 9\n")
        t.stdin.flush()
        chk = t.stdout.readline().strip()
        t.stdin.write("quit\n")
        t.stdin.flush()
        bye = t.stdout.readline().strip()
        t.wait(timeout=10)
        ok = r.returncode == 0 and res["ok"] and chk == "ok" and bye == "bye" and t.returncode == 0
        print(json.dumps({"size": size, "ok": ok, "initiator_rc": r.returncode, "target_check": chk,
                          "steps": [(s["step"], s["ok"], s["MBps"]) for s in res["steps"]]}))
        return ok
    finally:
        if t.poll() is None:
            t.kill()
            t.wait()


def main():
    sizes = [int(a, 0) for a in sys.argv[1:]] or [4096, 1 << 20, 64 << 20]
    ok = all([one(s) for s in sizes])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
