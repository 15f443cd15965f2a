"""Console scripts: each runs the Rust program of the same name shipped inside the wheel."""

import os
import stat
import sys

_BIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin")


def program_path(name: str) -> str:
    """Path of the bundled program ``name``; exits with a message when this install has none."""
    path = os.path.join(_BIN_DIR, name)
    if not os.path.isfile(path):
        sys.stderr.write(
            f"{name}: this mooncake install has no bundled {name} program ({path} is missing); "
            "build the wheel with scripts/build_wheel.sh, which compiles the programs into it\n"
        )
        raise SystemExit(127)
    if not os.access(path, os.X_OK):
        mode = os.stat(path).st_mode
        os.chmod(path, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _run(name: str) -> None:
    path = program_path(name)
    # Replace this process so signals and the exit status reach the program directly.
    os.execv(path, [path] + sys.argv[1:])


def mooncake_master() -> None:
    """The store master (``--rpc_port 50051``, ``--enable_http_metadata_server``, ...)."""
    _run("mooncake_master")


def mooncake_client() -> None:
    """A standalone store node contributing ``--global_segment_size`` bytes."""
    _run("mooncake_client")


def transfer_engine_bench() -> None:
    """The transfer engine benchmark (target / initiator / sweep modes)."""
    _run("transfer_engine_bench")


def mooncake_http_metadata_server() -> None:
    """The HTTP metadata server (``--host``, ``--port``)."""
    _run("mooncake_http_metadata_server")
