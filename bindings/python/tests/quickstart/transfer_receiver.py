"""Transfer engine quick start, receiving side (after upstream's transfer-engine Python example).

Registers a 1 MiB buffer, hands its session id and address to the sender over ZMQ (REP socket), waits until the
sender says it is done, then checks the bytes that landed in the buffer.

    python transfer_receiver.py --zmq-port 5555 --check iota [--buffer numpy|managed]
"""

import argparse
import sys

import numpy as np
import zmq

from mooncake.engine import TransferEngine

BUFFER_SIZE = 1024 * 1024


def expected(kind: str) -> np.ndarray:
    if kind == "ones":
        return np.ones(BUFFER_SIZE, dtype=np.uint8)
    if kind == "iota":
        return (np.arange(BUFFER_SIZE) % 251).astype(np.uint8)
    raise ValueError(f"unknown check {kind!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zmq-port", type=int, default=5555)
    parser.add_argument("--check", choices=["ones", "iota", "none"], default="ones")
    parser.add_argument("--buffer", choices=["numpy", "managed"], default="numpy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=50.0, help="seconds to wait for the sender")
    args = parser.parse_args()

    HOSTNAME = args.host
    METADATA_SERVER = "P2PHANDSHAKE"
    PROTOCOL = "tcp"
    DEVICE_NAME = ""

    context = zmq.Context()
    socket = context.socket(zmq.REP)
    socket.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(f"tcp://127.0.0.1:{args.zmq_port}")

    server_engine = TransferEngine()
    ret = server_engine.initialize(HOSTNAME, METADATA_SERVER, PROTOCOL, DEVICE_NAME)
    if ret != 0:
        print(f"initialize failed: {ret}", file=sys.stderr)
        return 1
    session_id = f"{HOSTNAME}:{server_engine.get_rpc_port()}"

    server_buffer = None
    if args.buffer == "managed":
        server_ptr = server_engine.allocate_managed_buffer(BUFFER_SIZE)
        if server_ptr == 0:
            print("allocate_managed_buffer failed", file=sys.stderr)
            return 1
    else:
        server_buffer = np.zeros(BUFFER_SIZE, dtype=np.uint8)
        server_ptr = server_buffer.ctypes.data
        if server_engine.register_memory(server_ptr, BUFFER_SIZE) != 0:
            print("Mooncake memory registration failed.", file=sys.stderr)
            return 1
    print(f"Server initialized with session ID: {session_id}", flush=True)

    try:
        hello = socket.recv_json()  # the sender asks for the buffer
        assert hello.get("hello"), hello
        socket.send_json({"session_id": session_id, "ptr": server_ptr, "len": BUFFER_SIZE})
        print("Buffer information sent to client", flush=True)
        done = socket.recv_json()  # the sender reports it is done
        socket.send_json({"ok": True})
    except zmq.Again:
        print("timed out waiting for the sender", file=sys.stderr)
        return 1
    print(f"Sender finished: {done}", flush=True)
    if done.get("failed"):
        print(f"the sender reported failures: {done}", file=sys.stderr)
        return 1

    if args.buffer == "managed":
        got = np.frombuffer(server_engine.read_bytes_from_buffer(server_ptr, BUFFER_SIZE), dtype=np.uint8)
    else:
        got = server_buffer
    if args.check != "none":
        want = expected(args.check)
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            print(f"data mismatch at byte {bad}: got {got[bad]}, want {want[bad]}", file=sys.stderr)
            return 1
        print("Data verified", flush=True)

    if args.buffer == "managed":
        server_engine.free_managed_buffer(server_ptr, BUFFER_SIZE)
    else:
        server_engine.unregister_memory(server_ptr)
    socket.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
