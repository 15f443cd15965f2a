"""Differential tests of the REST store service: each scenario of differential/service_scenarios.py runs under our
wheel and under upstream's (each starting its own master and its own `mooncake.mooncake_store_service`), and the
status codes and bodies they report must be the same, case by case.

Skipped unless MOONCAKE_UPSTREAM_PYTHON names upstream's python with aiohttp installed. Where ours differs on
purpose (docs/store-service.md lists each one), the case is in DELIBERATE with both results and the reason; where
the store underneath differs from upstream's (not the service), the case is in STORE_DIFFERENCES. Both sides are
asserted, so a change on either side is noticed.
"""

import json
import os
import subprocess
import sys

import pytest

from test_differential import UPSTREAM_PYTHON, assert_same, run

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "differential", "service_scenarios.py")
SCENARIOS = ["service_kv", "service_bad_requests", "service_segments", "service_cli"]


def _has_aiohttp(python: str) -> bool:
    return subprocess.run([python, "-c", "import aiohttp"], capture_output=True, timeout=60).returncode == 0


pytestmark = [
    pytest.mark.skipif(
        not (UPSTREAM_PYTHON and os.path.isfile(UPSTREAM_PYTHON) and os.access(UPSTREAM_PYTHON, os.X_OK)),
        reason="set MOONCAKE_UPSTREAM_PYTHON to upstream's python (tests/interop/setup_upstream_venv.sh) to compare",
    ),
    pytest.mark.skipif(
        not (UPSTREAM_PYTHON and os.path.isfile(UPSTREAM_PYTHON) and _has_aiohttp(UPSTREAM_PYTHON)),
        reason="upstream's venv has no aiohttp (pip install aiohttp there)",
    ),
]


def err(status: int, message: str, **extra) -> list:
    """A JSON error answer as service_scenarios.py reports it."""
    return [status, "json: " + json.dumps({"error": message, **extra}, sort_keys=True)]


def binding_error(method: str, params: str, returns: str, args: str) -> list:
    """Upstream's 500 for a field of the wrong type: the TypeError text of its pybind11 store binding."""
    return err(
        500,
        f"{method}(): incompatible function arguments. The following argument types are supported:\n"
        f"    1. (self: mooncake.store.MooncakeDistributedStore, {params}) -> {returns}\n\n"
        f"Invoked with: <mooncake.store.MooncakeDistributedStore object at 0x?>, {args}",
    )


MALFORMED = (
    "a body that is not JSON (or not UTF-8) is a client error: upstream answers 500 with Python's parse error, ours "
    "400 (upstream's own /api/unmount_local_disk already does)"
)
NOT_OBJECT = "a JSON body that is not an object: upstream fails on data.get with a 500, ours answers 400"
BAD_TYPE = "a field of the wrong type: upstream passes it on and answers 500 with the TypeError; ours checks it, 400"
TOO_LARGE = "a body over the 100 MiB limit: upstream answers 500 'Request Entity Too Large', ours 413"
NOT_FOUND = "removing a key that is not stored: upstream answers 500, ours 404 (as GET does)"
LEASED = "removing an object a reader holds a lease on: upstream answers 500, ours 409 and says to retry"
EMPTY_ID = "an empty segment id: upstream asks the store to unmount it and answers 500, ours answers 400"

_JSON_PARSE = "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
_IDS = "Invalid segment_ids: must be a non-empty string or a list of non-empty strings"
_PUT = (
    "key: str, value: Buffer, config: mooncake.store.ReplicateConfig = <mooncake.store.ReplicateConfig object at 0x?>"
)
_MOUNT = "path: str, size: int, offset: int = 0, protocol: str = 'tcp', location: str = ''"
_UNMOUNT = "segment_ids: list[str], grace_period_seconds: int = 0"
_SIZE_4096 = "Invalid size: must be an integer from 1 to 18446744073709551615, got '4096'"



# (scenario, case) -> (ours, upstream's, why ours differs)
DELIBERATE = {
    ("service_bad_requests", "put malformed JSON"): (err(400, "Malformed JSON body"), err(500, _JSON_PARSE), MALFORMED),
    ("service_bad_requests", "put empty body"): (
        err(400, "Malformed JSON body"),
        err(500, "Expecting value: line 1 column 1 (char 0)"),
        MALFORMED,
    ),
    ("service_bad_requests", "put latin-1 body"): (
        err(400, "Malformed JSON body"),
        err(500, "'utf-8' codec can't decode byte 0xe9 in position 23: invalid continuation byte"),
        MALFORMED,
    ),
    ("service_bad_requests", "put JSON list"): (
        err(400, "Request body must be a JSON object"),
        err(500, "'list' object has no attribute 'get'"),
        NOT_OBJECT,
    ),
    ("service_bad_requests", "put JSON string"): (
        err(400, "Request body must be a JSON object"),
        err(500, "'str' object has no attribute 'get'"),
        NOT_OBJECT,
    ),
    ("service_bad_requests", "put int key"): (
        err(400, "Invalid key: must be a string, got 5"),
        binding_error("put", _PUT, "int", "5, b'v'"),
        BAD_TYPE,
    ),
    ("service_bad_requests", "put list key"): (
        err(400, "Invalid key: must be a string, got ['k']"),
        binding_error("put", _PUT, "int", "['k'], b'v'"),
        BAD_TYPE,
    ),
    ("service_bad_requests", "put int value"): (
        err(400, "Invalid value: must be a string, got a JSON int"),
        err(500, "'int' object has no attribute 'encode'"),
        BAD_TYPE,
    ),
    ("service_bad_requests", "put object value"): (
        err(400, "Invalid value: must be a string, got a JSON dict"),
        err(500, "'dict' object has no attribute 'encode'"),
        BAD_TYPE,
    ),
    ("service_bad_requests", "put lone surrogate"): (
        err(400, "Invalid value: not encodable as UTF-8 (lone surrogate)"),
        err(500, "'utf-8' codec can't encode character '\\ud800' in position 0: surrogates not allowed"),
        BAD_TYPE,
    ),
    ("service_bad_requests", "put over 100 MiB"): (
        err(413, "Request body too large: the limit is 104857600 bytes"),
        err(500, "Request Entity Too Large"),
        TOO_LARGE,
    ),
    ("service_bad_requests", "remove missing key"): (
        err(404, "Key not found"),
        err(500, "Remove operation failed"),
        NOT_FOUND,
    ),
    ("service_bad_requests", "remove leased"): (
        err(409, "Object is leased by a recent read; retry once the lease expires"),
        err(500, "Remove operation failed"),
        LEASED,
    ),
    **{
        ("service_segments", f"{path} malformed JSON"): (err(400, "Malformed JSON body"), err(500, _JSON_PARSE),
                                                         MALFORMED)
        for path in ("/api/reconfigure", "/api/mount_shm", "/api/unmount_shm", "/api/mount", "/api/unmount")
    },
    **{
        ("service_segments", f"{path} JSON list"): (
            err(400, "Request body must be a JSON object"),
            err(500, "'list' object has no attribute 'get'"),
            NOT_OBJECT,
        )
        for path in ("/api/reconfigure", "/api/mount_shm", "/api/unmount_shm", "/api/mount", "/api/unmount")
    },
    ("service_segments", "reconfigure int mode"): (
        err(400, "Invalid mode. Use 'decode' or 'prefill'"),
        err(500, "'int' object has no attribute 'lower'"),
        BAD_TYPE,
    ),
    ("service_segments", "decode string size"): (
        err(400, _SIZE_4096),
        binding_error("mount_segment", _MOUNT, "dict", "'/nonexistent', '4096', 0, 'tcp', ''"),
        BAD_TYPE,
    ),
    ("service_segments", "mount_shm string size"): (
        err(400, _SIZE_4096),
        binding_error("mount_segment", _MOUNT, "dict", "'/dev/shm/seg', '4096', 0, 'tcp', ''"),
        BAD_TYPE,
    ),
    ("service_segments", "unmount_shm segment_ids 5"): (
        err(400, _IDS),
        err(500, "'int' object is not iterable"),
        BAD_TYPE,
    ),
    ("service_segments", "unmount segment_ids 5"): (
        err(400, _IDS),
        binding_error("unmount_and_free_segment", _UNMOUNT, "int", "5, 0"),
        BAD_TYPE,
    ),
    ("service_segments", "unmount_shm segment_ids [5]"): (
        err(400, _IDS),
        binding_error("unmount_segment", _UNMOUNT, "int", "[5], 0"),
        BAD_TYPE,
    ),
    ("service_segments", "unmount segment_ids [5]"): (
        err(400, _IDS),
        binding_error("unmount_and_free_segment", _UNMOUNT, "int", "[5], 0"),
        BAD_TYPE,
    ),
    ("service_segments", "unmount negative grace"): (
        err(400, "Invalid grace_period_seconds: must be an integer from 0 to 3600, got -1"),
        binding_error("unmount_and_free_segment", _UNMOUNT, "int", "['x'], -1"),
        BAD_TYPE,
    ),
    ("service_segments", "mount size 2**70"): (
        err(400, "Invalid size, must be at most 18446744073709551615"),
        binding_error(
            "allocate_and_mount_segment",
            "size: int, protocol: str = 'tcp', location: str = ''",
            "dict",
            "1180591620717411303424, 'tcp', ''",
        ),
        BAD_TYPE,
    ),
    ("service_segments", "unmount_shm segment_ids ''"): (
        err(400, _IDS),
        err(500, "Unmount failed for one or more segments", failed_segment_ids="1 ids"),
        EMPTY_ID,
    ),
    ("service_segments", "unmount segment_ids ''"): (
        err(400, _IDS),
        err(500, "Unmount and free failed, ret=-1"),
        EMPTY_ID,
    ),
}

# Differences that come from our MooncakeDistributedStore, not from the service; they are store bugs to fix there.
# (scenario, case) -> (ours, upstream's, what differs)
STORE_DIFFERENCES: dict = {}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_same_as_upstream(scenario):
    ours = run(sys.executable, scenario, script=SCRIPT)
    theirs = run(UPSTREAM_PYTHON, scenario, script=SCRIPT)
    assert_same(scenario, ours, theirs, {**DELIBERATE, **STORE_DIFFERENCES})


def test_service_differences_are_documented():
    doc = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "store-service.md")
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    for scenario, case in list(DELIBERATE) + list(STORE_DIFFERENCES):
        assert f"`{scenario}` / `{case}`" in text, f"docs/store-service.md does not list {scenario} / {case}"
