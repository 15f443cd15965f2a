"""The store on CXL (docs/cxl.md): ``mooncake_master --enable_cxl=true`` and clients with ``protocol="cxl"``
sharing one region, a sparse file standing in for a DAX device.

``cxl/store_on_cxl.py`` holds the store calls in upstream's CXL test shape; it runs in a child process because
the region is taken from the environment when the first engine starts.
"""

import os
import subprocess
import sys

import pytest

from conftest import Master, program

HERE = os.path.dirname(os.path.abspath(__file__))


def cxl_linked() -> bool:
    from mooncake.engine import available_transports

    return any(t["name"] == "cxl" for t in available_transports())


pytestmark = pytest.mark.skipif(not cxl_linked(), reason="this wheel was built without the cxl feature")


def run_child(master, tmp_path, *args, extra_env=None):
    env = dict(os.environ)
    env.update(
        MASTER_SERVER=master.address,
        MC_METADATA_SERVER=master.metadata_url,
        DEFAULT_KV_LEASE_TTL="500",
        TMPDIR=str(tmp_path),
        **(extra_env or {}),
    )
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "cxl", "store_on_cxl.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_store_calls_on_a_cxl_pool(tmp_path):
    master = Master(extra_args=["--enable_cxl=true", "--default_kv_lease_ttl=500"])
    try:
        done = run_child(master, tmp_path)
    finally:
        master.stop()
    assert done.returncode == 0, done.stderr[-6000:]
    assert "OK" in done.stderr
    assert not os.path.exists(tmp_path / "tmp_dax_sim"), "the test removes its region file"


def test_cxl_client_without_a_pool_or_a_region_fails_cleanly(tmp_path):
    code = (
        "import os, sys\n"
        "from mooncake.store import MooncakeDistributedStore\n"
        "s = MooncakeDistributedStore()\n"
        "rc = s.setup('localhost', os.environ['MC_METADATA_SERVER'], 64 << 20, 16 << 20, 'cxl', '', "
        "os.environ['MASTER_SERVER'])\n"
        "print(rc)\n"
    )
    plain = Master()
    try:
        # No MC_CXL_DEV_PATH: the protocol is unusable here, -600 (INVALID_PARAMS), nothing hangs.
        env = dict(os.environ, MASTER_SERVER=plain.address, MC_METADATA_SERVER=plain.metadata_url)
        env.pop("MC_CXL_DEV_PATH", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "-600", out.stderr[-3000:]
        # A region, but a master without --enable_cxl: refused with -600 as well.
        region = tmp_path / "region"
        with open(region, "wb") as f:
            f.truncate(64 << 20)
        env["MC_CXL_DEV_PATH"] = str(region)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "-600", out.stderr[-3000:]
    finally:
        plain.stop()
