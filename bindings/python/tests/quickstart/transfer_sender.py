"""Transfer engine quick start, sending side (after upstream's transfer-engine Python example).

Asks the receiver for its session id and buffer address over ZMQ (REQ socket), fills a 1 MiB buffer with a
pattern and writes it to the receiver with ten `transfer_sync_write` calls, one per chunk, then tells the
receiver it is done.

    python transfer_sender.py --zmq-port 5555 --pattern iota
"""

import argparse
import sys

import numpy as np
import zmq

from mooncake.engine import TransferEngine

BUFFER_SIZE = 1024 * 1024
TRANSFERS = 10


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zmq-port", type=int, default=5555)
    parser.add_argument("--pattern", choices=["ones", "iota"], default="ones")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=50.0, help="seconds to wait for the receiver")
    args = parser.parse_args()

    context = zmq.Context()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"tcp://127.0.0.1:{args.zmq_port}")

    print("Waiting for server buffer information...", flush=True)
    socket.send_json({"hello": True})
    try:
        buffer_info = socket.recv_json()
    except zmq.Again:
        print("timed out waiting for the receiver", file=sys.stderr)
        return 1
    server_session_id = buffer_info["session_id"]
    server_ptr = buffer_info["ptr"]
    server_len = buffer_info["len"]
    print(f"Received server info - Session ID: {server_session_id}", flush=True)
    print(f"Server buffer address: {server_ptr}, length: {server_len}", flush=True)

    HOSTNAME = args.host
    METADATA_SERVER = "P2PHANDSHAKE"
    PROTOCOL = "tcp"
    DEVICE_NAME = ""

    client_engine = TransferEngine()
    ret = client_engine.initialize(HOSTNAME, METADATA_SERVER, PROTOCOL, DEVICE_NAME)
    if ret != 0:
        print(f"initialize failed: {ret}", file=sys.stderr)
        return 1
    session_id = f"{HOSTNAME}:{client_engine.get_rpc_port()}"

    if args.pattern == "ones":
        client_buffer = np.ones(BUFFER_SIZE, dtype=np.uint8)
    else:
        client_buffer = (np.arange(BUFFER_SIZE) % 251).astype(np.uint8)
    client_ptr = client_buffer.ctypes.data
    client_len = client_buffer.nbytes
    if client_engine.register_memory(client_ptr, client_len) != 0:
        print("Mooncake memory registration failed.", file=sys.stderr)
        return 1
    print(f"Client initialized with session ID: {session_id}", flush=True)

    length = min(client_len, server_len)
    chunk = -(-length // TRANSFERS)  # ten chunks cover the buffer
    results = []
    print("Transferring data to server...", flush=True)
    for i in range(TRANSFERS):
        off = i * chunk
        n = min(chunk, length - off)
        ret = client_engine.transfer_sync_write(server_session_id, client_ptr + off, server_ptr + off, n)
        results.append(ret)
        print("Transfer successful!" if ret == 0 else f"Transfer failed! ({ret})", flush=True)

    failed = [r for r in results if r != 0]
    socket.send_json({"done": True, "results": results, "failed": len(failed)})
    try:
        socket.recv_json()
    except zmq.Again:
        print("timed out waiting for the receiver's acknowledgement", file=sys.stderr)
        return 1

    client_engine.unregister_memory(client_ptr)
    socket.close()
    context.term()
    return 0 if not failed and len(results) == TRANSFERS else 1


if __name__ == "__main__":
    sys.exit(main())
