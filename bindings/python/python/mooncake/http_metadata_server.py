"""The transfer engine's HTTP metadata server (``GET/PUT/DELETE /metadata?key=...``), served from Rust.

``KVBootstrapServer(port, host).run()`` starts it in the background, as upstream; ``python -m
mooncake.http_metadata_server --port 8080`` runs it until SIGINT or SIGTERM.
"""

import argparse
import logging
import signal
import threading

from ._mooncake import HttpMetadataServer

__all__ = ["KVBootstrapServer", "main"]


class KVBootstrapServer:
    """An HTTP metadata server bound to ``host:port``."""

    def __init__(self, port: int = 8080, host: str = "0.0.0.0"):
        self.port = port
        self.host = host
        self._server = HttpMetadataServer(host, port)

    def run(self) -> str:
        """Starts serving in the background; returns the metadata URL. Raises OSError if the port is taken."""
        url = self._server.start()
        self.port = self._server.port
        logging.info("HTTP metadata server serving at %s", url)
        return url

    def close(self) -> None:
        """Stops serving (idempotent)."""
        self._server.stop()

    def is_running(self) -> bool:
        """True while serving."""
        return self._server.is_running()

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
    url = server.run()
    print(f"http_metadata_server {url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
