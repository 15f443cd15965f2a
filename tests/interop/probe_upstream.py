#!/usr/bin/env python3
"""Raw-socket probes of a Mooncake transfer engine's RPC (handshake) port and TCP data port.

Plain Python 3 (numpy only for `suite`, via upstream_peer.pattern). Works against upstream or
mooncake-rs -- anything speaking docs/wire-formats.md sections 3-4.

    probe_upstream.py rpc PORT [--type T] [--body JSON | --raw HEX] [--host H]
        send one RPC frame (u64 len = 1 + len(body), u8 type, body) and print what comes back
    probe_upstream.py data PORT --op OP --addr A --size N [--payload] [--host H]
        send one 24-byte data header (+N bytes 0xab when --payload) and print what comes back
    probe_upstream.py suite [--launch | --rpc-port P]
        run every experiment recorded in UPSTREAM_FACTS.md against a target whose buffer is filled
        with PATTERN(7) (upstream_peer.py convention); --launch starts `upstream_peer.py target` itself
        (needs the upstream venv python + MC_FORCE_TCP=1). Buffer address and data port are learned
        from the metadata handshake.
    probe_upstream.py fake-target [--version 1|2] [--size N] [--log FILE]
        a fake engine (rpc + data port, in-memory buffer) that logs every RPC frame and data header
        it receives, so you can see exactly what an initiator sends. Prints one JSON line like
        upstream_peer.py target ({"segment","addr","size",...}) and serves until stdin says quit or
        hits EOF (--forever: until killed). Data requests are answered like upstream does (v1/v2).

Each result line reads: <what we sent> -> <bytes back (hex / text)> <how it ended>, where the ending is
EOF (peer closed cleanly), RST (peer closed with unread data -> it did NOT drain our payload),
OPEN (connection still open after the wait).
"""
import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time

MAGIC = 0x4D435456


def rpc_frame(typ, body):
    b = body.encode() if isinstance(body, str) else body
    return struct.pack("<Q", 1 + len(b)) + bytes([typ]) + b


def data_hdr(size, addr, op, pad=b"\0" * 7):
    return struct.pack("<QQB7s", size & (2**64 - 1), addr & (2**64 - 1), op, pad)


def exchange(port, raw, host="127.0.0.1", wait=1.0, nodelay=True):
    """Send raw bytes, collect everything until close or `wait` seconds of silence."""
    s = socket.create_connection((host, port), timeout=wait)
    if nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data, end = b"", None
    try:
        s.sendall(raw)
    except OSError as e:
        end = f"SENDERR({e.strerror})"
    while end is None:
        try:
            c = s.recv(1 << 20)
            if not c:
                end = "EOF"
            else:
                data += c
        except socket.timeout:
            end = "OPEN"
        except ConnectionResetError:
            end = "RST"
    s.close()
    return data, end


def fmt_status(b):
    if len(b) < 8:
        return b.hex()
    w = struct.unpack("<Q", b[:8])[0]
    tag = "MCTV" if w >> 32 == MAGIC else f"magic?{w >> 32:#x}"
    rest = b[8:]
    return f"[{tag}|{w & 0xffffffff}]" + (f"+{len(rest)}B:{rest[:16].hex()}" if rest else "")


def fmt_rpc(b):
    if len(b) < 9:
        return b.hex()
    n = struct.unpack("<Q", b[:8])[0]
    return f"len={n} type={b[8]} body={b[9:]!r}"


def get_descriptor(rpc_port, host="127.0.0.1"):
    d, _ = exchange(rpc_port, rpc_frame(1, "{}"), host)
    return json.loads(d[9:])


# ----------------------------------------------------------------------------------------- suite
def suite(rpc_port, host="127.0.0.1"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from upstream_peer import pattern

    desc = get_descriptor(rpc_port, host)
    D = desc["tcp_data_port"]
    A = desc["buffers"][0]["addr"]
    L = desc["buffers"][0]["length"]
    P7 = pattern(7, 64).tobytes()
    print("descriptor:", json.dumps(desc))

    def show(label, r, f):
        print(f"  {label:58s} -> {f(r[0])} {r[1]}")

    print("RPC port", rpc_port)
    for typ, body in [(1, "{}"), (1, ""), (1, "garbage"), (1, "null"), (3, "{}"), (3, ""),
                      (2, '{"name":"x","notify_msg":"hi"}'), (2, "{}"), (0, "{}"), (4, "{}"),
                      (9, "{}")]:
        show(f"type {typ} body {body!r}", exchange(rpc_port, rpc_frame(typ, body), host), fmt_rpc)
    show("len 0", exchange(rpc_port, struct.pack("<Q", 0), host), fmt_rpc)
    show("len 0 + 3 more bytes", exchange(rpc_port, struct.pack("<Q", 0) + b"\x01{}", host), fmt_rpc)
    big = b"{}" + b" " * ((1 << 20) - 3)
    show("len 1 MiB (type 1, '{}' + spaces)", exchange(rpc_port, rpc_frame(1, big), host), fmt_rpc)
    show("len 1 MiB + 1 (type 1, '{}' + spaces)", exchange(rpc_port, rpc_frame(1, big + b" "), host), fmt_rpc)
    show("len 1 MiB + 1, header only", exchange(rpc_port, struct.pack("<Q", (1 << 20) + 1) + b"\x01", host), fmt_rpc)
    show("len 2^40", exchange(rpc_port, struct.pack("<Q", 1 << 40) + b"\x01{}", host), fmt_rpc)
    show("HTTP GET", exchange(rpc_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", host), fmt_rpc)

    print("DATA port", D, f"buffer [{A:#x}, +{L})")
    x = lambda raw, w=0.7: exchange(D, raw, host, wait=w)  # noqa: E731
    for name, op in [("read v2", 0x80), ("write v2", 0x81), ("read v1", 0), ("write v1", 1)]:
        for what, addr, size in [("unregistered addr", 4096, 64), ("straddles end", A + L - 32, 64),
                                 ("size 0", A, 0), ("addr+size wraps", A + 16, 2**64 - 8)]:
            pl = b"\xab" * size if (op & 1) and size < 1 << 20 else b""
            show(f"{name} {what}, with payload" if pl else f"{name} {what}", x(data_hdr(size, addr, op) + pl), fmt_status)
        if op & 1:
            show(f"{name} unregistered addr, header only (no payload)", x(data_hdr(64, 4096, op)), fmt_status)
    r = x(data_hdr(8, A, 0x80) + data_hdr(8, A + 8, 0x80) + data_hdr(8, A + 16, 0x80))
    show("pipelined 3x read v2 (8 B each)", r, lambda b: b.hex())
    print("     expected pattern(7)[0:24] interleaved:", P7[:24].hex())
    r = x(data_hdr(8, A + 256, 0x81) + b"\x33" * 8 + data_hdr(8, A + 256, 0x80)
          + data_hdr(8, A + 256, 0x81) + b"\x44" * 8 + data_hdr(8, A + 256, 0x80))
    show("pipelined w2(33..) r2 w2(44..) r2", r, lambda b: b.hex())
    r = x(data_hdr(8, A, 0) + data_hdr(8, A + 8, 0) + data_hdr(4, A + 300, 1) + b"\x55" * 4 + data_hdr(4, A + 300, 0))
    show("pipelined v1: r r w(55..) r", r, lambda b: b.hex())
    r = x(data_hdr(8, A, 0x80) + data_hdr(8, 8, 0x80) + data_hdr(8, A, 0x80))
    show("pipelined read v2: good, BAD, good", r, lambda b: b.hex())
    s = socket.create_connection((host, D), timeout=0.5)
    s.sendall(data_hdr(64, A + 512, 0x81))
    try:
        early = s.recv(8)
    except socket.timeout:
        early = b"(nothing within 0.5 s)"
    s.sendall(b"\x11" * 64)
    s.settimeout(1)
    late = s.recv(8)
    s.close()
    print(f"  {'write v2 valid: reply before payload? / after payload':58s} -> {early!r} / {fmt_status(late)}")
    for op in (2, 3, 0x7F, 0x82, 0x83, 0xFF):
        show(f"opcode {op:#x} (8 B at buffer start)", x(data_hdr(8, A, op)), lambda b: b.hex())
    show("read v2 with padding bytes 0xff", x(data_hdr(8, A, 0x80, b"\xff" * 7)), fmt_status)
    show("10 bytes of a header, then wait", x(data_hdr(8, A, 0x80)[:10]), lambda b: b.hex())
    # restore bytes we scribbled on so the target still holds PATTERN(7) where untouched
    exchange(D, data_hdr(64, A + 256, 0x81) + pattern(7, 1024).tobytes()[256:320], host)


# ----------------------------------------------------------------------------------- fake target
def fake_target(version, size, logf, forever=False, minimal=False):
    lock = threading.Lock()
    buf = bytearray(size)
    addr = 0x10000000  # fake absolute address
    t0 = time.time()

    def log(msg):
        with lock:
            logf.write(f"{time.time() - t0:9.4f} {msg}\n")
            logf.flush()

    def recvn(c, n):
        d = b""
        while len(d) < n:
            x = c.recv(n - len(d))
            if not x:
                return None
            d += x
        return d

    rpc = socket.socket()
    rpc.bind(("127.0.0.1", 0))
    rpc.listen(64)
    data = socket.socket()
    data.bind(("127.0.0.1", 0))
    data.listen(64)
    rport, dport = rpc.getsockname()[1], data.getsockname()[1]
    name = f"127.0.0.1:{rport}"
    desc = {"buffers": [{"addr": addr, "length": size, "name": name}], "name": name, "protocol": "tcp",
            "rdma_server_name": "", "tcp_data_host": "127.0.0.1", "tcp_data_port": dport,
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%S.000000")}

    if version:
        desc["tcp_proto_version"] = version
    if minimal:  # only the fields docs/wire-formats.md section 2 lists, buffer named cpu:0, reply without "\n"
        for k in ("rdma_server_name", "tcp_data_host"):
            desc.pop(k)
        desc["buffers"][0]["name"] = "cpu:0"

    def rpc_conn(c, peer):
        with c:
            h = recvn(c, 8)
            if h is None:
                log(f"rpc {peer}: closed before length")
                return
            n = struct.unpack("<Q", h)[0]
            body = recvn(c, n) if 0 < n <= 1 << 20 else None
            log(f"rpc {peer}: len={n} frame={body!r}")
            if not body:
                return
            typ = body[0]
            if typ == 1:
                rep = (json.dumps(desc, separators=(",", ":")) + ("" if minimal else "\n")).encode()
            elif typ == 2:
                rep = b'{"name":"","notify_msg":"success"}\n'
            elif typ == 3:
                rep = b'{"status":"success"}\n'
            else:
                return
            c.sendall(rpc_frame(typ, rep))

    def data_conn(c, peer):
        nreq = 0
        with c:
            while True:
                h = recvn(c, 24)
                if h is None:
                    log(f"data {peer}: closed after {nreq} requests")
                    return
                size, a, op = struct.unpack("<QQB", h[:17])
                nreq += 1
                log(f"data {peer}: #{nreq} op={op:#x} addr={a:#x} (+{a - addr}) size={size} pad={h[17:].hex()}")
                v2 = op & 0x80
                ok = addr <= a and size > 0 and a + size <= addr + size_total
                if op & 0x7F == 1:
                    pl = recvn(c, size) if ok else None
                    if ok and pl is not None:
                        buf[a - addr:a - addr + size] = pl
                    if ok and select.select([c], [], [], 0.002)[0]:
                        # the client sent more before seeing our status: it pipelines writes
                        log(f"data {peer}: #{nreq} next bytes already queued before status sent")
                    if v2:
                        c.sendall(struct.pack("<Q", (MAGIC << 32) | (0 if ok else 1)))
                    if not ok:
                        return
                else:
                    if v2:
                        c.sendall(struct.pack("<Q", (MAGIC << 32) | (0 if ok else 1)))
                    if not ok:
                        return
                    c.sendall(bytes(buf[a - addr:a - addr + size]))

    size_total = size

    def acceptor(ls, fn):
        while True:
            c, p = ls.accept()
            threading.Thread(target=fn, args=(c, p[1]), daemon=True).start()

    threading.Thread(target=acceptor, args=(rpc, rpc_conn), daemon=True).start()
    threading.Thread(target=acceptor, args=(data, data_conn), daemon=True).start()
    print(json.dumps({"segment": name, "addr": addr, "size": size, "rpc_port": rport,
                      "data_port": dport, "pid": os.getpid()}), flush=True)
    if forever:
        while True:
            time.sleep(3600)
    for line in sys.stdin:
        if line.strip() == "quit":
            break


def main():
    ap = argparse.ArgumentParser(description="raw probes of a Mooncake engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rpc")
    r.add_argument("port", type=int)
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--type", type=int, default=1)
    r.add_argument("--body", default="{}")
    r.add_argument("--raw", help="hex bytes to send instead of a frame")
    d = sub.add_parser("data")
    d.add_argument("port", type=int)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--op", type=lambda x: int(x, 0), required=True)
    d.add_argument("--addr", type=lambda x: int(x, 0), required=True)
    d.add_argument("--size", type=lambda x: int(x, 0), required=True)
    d.add_argument("--payload", action="store_true")
    s = sub.add_parser("suite")
    s.add_argument("--rpc-port", type=int)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--launch", action="store_true", help="start upstream_peer.py target (size 4096, seed 7)")
    f = sub.add_parser("fake-target")
    f.add_argument("--version", type=int, default=2, help="published tcp_proto_version; 0 = omit the field")
    f.add_argument("--size", type=lambda x: int(x, 0), default=1 << 20)
    f.add_argument("--log", default="-")
    f.add_argument("--minimal", action="store_true",
                   help="publish only the fields of docs/wire-formats.md section 2 (no tcp_data_host/rdma_server_name), no trailing newline")
    f.add_argument("--forever", action="store_true", help="ignore stdin, serve until killed")
    a = ap.parse_args()

    if a.cmd == "rpc":
        raw = bytes.fromhex(a.raw) if a.raw else rpc_frame(a.type, a.body)
        d_, end = exchange(a.port, raw, a.host)
        print(fmt_rpc(d_), end)
    elif a.cmd == "data":
        raw = data_hdr(a.size, a.addr, a.op) + (b"\xab" * a.size if a.payload else b"")
        d_, end = exchange(a.port, raw, a.host)
        print(fmt_status(d_) if a.op & 0x80 else d_.hex(), end)
    elif a.cmd == "suite":
        if a.launch:
            import subprocess
            peer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream_peer.py")
            t = subprocess.Popen([sys.executable, peer, "target", "--size", "4096", "--seed", "7"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env=dict(os.environ, MC_FORCE_TCP="1"))
            try:
                info = json.loads(t.stdout.readline())
                suite(info["rpc_port"], a.host)
                t.stdin.write("quit\n")
                t.stdin.flush()
                t.wait(timeout=10)
            finally:
                if t.poll() is None:
                    t.kill()
                    t.wait()
        else:
            suite(a.rpc_port, a.host)
    elif a.cmd == "fake-target":
        logf = sys.stderr if a.log == "-" else open(a.log, "a")
        fake_target(a.version, a.size, logf, a.forever, a.minimal)


if __name__ == "__main__":
    main()
