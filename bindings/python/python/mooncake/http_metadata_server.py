"""The transfer engine's HTTP metadata server (``GET/PUT/DELETE /metadata?key=...``), served from Rust.

``KVBootstrapServer(port, host).run()`` starts it in the background, as upstream; ``python -m
mooncake.http_metadata_server --port 8080`` runs it until SIGINT or SIGTERM.
"""

import argparse
import logging
import signal
import threading
from enum import Enum
from typing import Optional

from ._mooncake import HttpMetadataServer

__all__ = ["KVBootstrapServer", "KVPoll", "main"]


class KVPoll(Enum):
    """What ``KVBootstrapServer.poll()`` reports (upstream's values)."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class KVBootstrapServer:
    """An HTTP metadata server bound to ``host:port``.

    Keys are stripped of surrounding white space and a blank key is refused with 400, as upstream's server does.
    """

    def __init__(self, port: int = 8080, host: str = "0.0.0.0"):
        self.port = port
        self.host = host
        self.url: Optional[str] = None
        self.thread: Optional[threading.Thread] = None
        self._server = HttpMetadataServer(host, port)
        self._stopped = threading.Event()

    def run(self) -> threading.Thread:
        """Starts serving in the background and returns the server's thread, as upstream: it ends when
        ``close()`` is called. Raises OSError if the port is taken (upstream logs that from its thread
        instead and serves nothing). The URL is in ``self.url``."""
        if self.thread is not None and self.thread.is_alive():
            return self.thread
        self.url = self._server.start()
        self.port = self._server.port
        self._stopped.clear()
        self.thread = threading.Thread(target=self._stopped.wait, name="mooncake-http-metadata", daemon=True)
        self.thread.start()
        logging.info("HTTP metadata server serving at %s", self.url)
        return self.thread

    def close(self) -> None:
        """Stops serving (idempotent)."""
        self._server.stop()
        self._stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=2)

    def is_running(self) -> bool:
        """True while serving."""
        return self._server.is_running()

    def poll(self) -> KVPoll:
        """``KVPoll.Success`` while serving, ``KVPoll.Failed`` before ``run()`` and after ``close()``."""
        return KVPoll.Success if self.is_running() else KVPoll.Failed

    def __enter__(self) -> "KVBootstrapServer":
        self.run()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of upstream's server: ``--port``, ``--host``, ``--log-level``."""
    parser = argparse.ArgumentParser(description="Mooncake HTTP metadata server")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level (default info)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Serves until SIGINT or SIGTERM."""
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()))
    server = KVBootstrapServer(args.port, args.host)
    server.run()
    print(f"http_metadata_server {server.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
