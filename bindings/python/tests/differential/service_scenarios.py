"""Scenarios for the REST store service, run under both wheels by test_differential_service.py.

    python service_scenarios.py NAME      # prints one JSON object per line: {"case": ..., "result": ...}

Each scenario starts this interpreter's `mooncake_master` (with a 10-minute lease, so that an object read once
stays leased for the whole scenario under either master) and this interpreter's service module
(`python -m mooncake.mooncake_store_service`) on free 127.0.0.1 ports, sends the same requests with urllib, and
reports [status, body] per case, the body as one string (see decode(); segment ids, which are random, are
replaced by their count). Everything it starts is stopped by PID.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenarios import Master, case  # noqa: E402  (also sends stray stdout to stderr)
from procs import free_port, stop, wait_port  # noqa: E402  (put on sys.path by scenarios)

MiB = 1 << 20


class LeasedMaster(Master):
    """scenarios.Master with a 10-minute KV lease (upstream's default is 5 s, ours 10 s): whether a remove finds
    the object leased must not depend on how fast the scenario runs."""

    def __init__(self):  # noqa: D107 - same fields as Master
        bindir = os.path.dirname(sys.executable)
        self.rpc, self.http, self.admin = free_port(), free_port(), free_port()
        self.proc = subprocess.Popen(
            [
                os.path.join(bindir, "mooncake_master"),
                f"--rpc_port={self.rpc}",
                "--enable_http_metadata_server=true",
                f"--http_metadata_server_port={self.http}",
                f"--metrics_port={self.admin}",
                "--default_kv_lease_ttl=600000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.rpc, self.proc)
        wait_port(self.http, self.proc)
        self.metadata = f"http://127.0.0.1:{self.http}/metadata"
        self.address = f"127.0.0.1:{self.rpc}"


def write_config(master, **fields) -> str:
    """A MooncakeConfig JSON file for a store on 127.0.0.1 against `master`; the caller deletes it."""
    doc = {
        "local_hostname": "127.0.0.1",
        "metadata_server": master.metadata,
        "master_server_address": master.address,
        "global_segment_size": 64 * MiB,
        "local_buffer_size": 32 * MiB,
        "protocol": "tcp",
    }
    doc.update(fields)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(doc, f)
    return f.name


def service_command(*args) -> list:
    return [sys.executable, "-m", "mooncake.mooncake_store_service", *args]


class Service:
    """The service module of this interpreter's wheel, serving on a free port (its log goes to stderr)."""

    def __init__(self, master, *args, config_fields=None):
        self.port = free_port()
        self.config = write_config(master, **(config_fields or {}))
        self.proc = subprocess.Popen(
            service_command("--config", self.config, "--port", str(self.port), "--max-wait-time", "60", *args),
            stdout=sys.stderr,
            stderr=sys.stderr,
        )
        try:
            wait_port(self.port, self.proc, timeout=90)
        except Exception:
            self.stop()
            raise

    def stop(self) -> int:
        stop(self.proc)
        os.unlink(self.config)
        return self.proc.returncode

    def call(self, method: str, path: str, body=None, data: bytes = None, headers=None):
        """[status, body] of one request; `body` is sent as JSON, `data` as raw bytes."""
        if body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return [r.status, decode(r.headers.get_content_type(), r.read())]
        except urllib.error.HTTPError as e:
            return [e.code, decode(e.headers.get_content_type(), e.read())]


def decode(content_type: str, raw: bytes) -> str:
    """A response body as one string: "json: ..." (keys sorted), "bytes: <hex>" or "text: ...". Object addresses
    in error texts (upstream's binding errors quote them) read 0x?."""
    if content_type == "application/json":
        doc = json.loads(raw)
        for k in ("segment_ids", "failed_segment_ids"):
            if isinstance(doc, dict) and isinstance(doc.get(k), list):
                doc[k] = f"{len(doc[k])} ids"
        return "json: " + re.sub(r"0x[0-9a-f]{6,}", "0x?", json.dumps(doc, sort_keys=True))
    if content_type == "application/octet-stream":
        return "bytes: " + raw.hex()
    return "text: " + raw.decode("utf-8", "replace")


def with_service(fn, *args, **kwargs):
    master = LeasedMaster()
    try:
        service = Service(master, *args, **kwargs)
        try:
            fn(service)
        finally:
            service.stop()
    finally:
        master.stop()


# ---- scenarios -------------------------------------------------------------------------------------------------


def service_kv():
    """put / get / exist / remove / remove_all with well-formed requests, and the routes' HTTP methods."""

    def run(s):
        case("exist k1 before put", lambda: s.call("GET", "/api/exist/k1"))
        case("get k1 before put", lambda: s.call("GET", "/api/get/k1"))
        case("put k1", lambda: s.call("PUT", "/api/put", {"key": "k1", "value": "hello"}))
        case("get k1", lambda: s.call("GET", "/api/get/k1"))
        case("exist k1", lambda: s.call("GET", "/api/exist/k1"))
        case("put k1 again", lambda: s.call("PUT", "/api/put", {"key": "k1", "value": "other"}))
        case("get k1 after second put", lambda: s.call("GET", "/api/get/k1"))
        case("put unicode", lambda: s.call("PUT", "/api/put", {"key": "uni", "value": "h\u00e9llo \u2713"}))
        case("get unicode", lambda: s.call("GET", "/api/get/uni"))
        case("put key with space", lambda: s.call("PUT", "/api/put", {"key": "a b", "value": "sp"}))
        case("get key with space", lambda: s.call("GET", "/api/get/a%20b"))
        case("put 1 MiB", lambda: s.call("PUT", "/api/put", {"key": "big", "value": "x" * MiB}))
        case("get 1 MiB", lambda: s.call("GET", "/api/get/big")[1] == "bytes: " + (b"x" * MiB).hex())
        case("put with extra field", lambda: s.call("PUT", "/api/put", {"key": "k2", "value": "v", "ttl": 5}))
        case("put k3", lambda: s.call("PUT", "/api/put", {"key": "k3", "value": "three"}))
        case("put k4", lambda: s.call("PUT", "/api/put", {"key": "k4", "value": "four"}))
        case("remove k3 (never read)", lambda: s.call("DELETE", "/api/remove/k3"))
        case("exist k3 after remove", lambda: s.call("GET", "/api/exist/k3"))
        case("get k3 after remove", lambda: s.call("GET", "/api/get/k3"))
        case("remove_all (k4 and k2 are not leased)", lambda: s.call("DELETE", "/api/remove_all"))
        case("exist k4 after remove_all", lambda: s.call("GET", "/api/exist/k4"))
        case("get k1 after remove_all (leased, kept)", lambda: s.call("GET", "/api/get/k1"))
        case("remove_all again", lambda: s.call("DELETE", "/api/remove_all"))
        case("GET /api/put", lambda: s.call("GET", "/api/put"))
        case("POST /api/put", lambda: s.call("POST", "/api/put", {"key": "k", "value": "v"}))
        case("PUT /api/get/k1", lambda: s.call("PUT", "/api/get/k1", {}))
        case("GET /api/remove/k1", lambda: s.call("GET", "/api/remove/k1"))
        case("GET /api/mount", lambda: s.call("GET", "/api/mount"))
        case("unknown route", lambda: s.call("GET", "/api/nothing"))
        case("get without key", lambda: s.call("GET", "/api/get/"))
        case("get key with slash", lambda: s.call("GET", "/api/get/a/b"))
        case("still serving", lambda: s.call("GET", "/api/exist/k1"))

    with_service(run)


def service_bad_requests():
    """Malformed and unreasonable requests to the key routes: each is answered and the service keeps serving."""

    def run(s):
        put = lambda **kw: s.call("PUT", "/api/put", **kw)  # noqa: E731
        case("put without key", lambda: put(body={"value": "v"}))
        case("put without value", lambda: put(body={"key": "k"}))
        case("put empty key", lambda: put(body={"key": "", "value": "v"}))
        case("put null value", lambda: put(body={"key": "k", "value": None}))
        case("put empty object", lambda: put(body={}))
        case("put malformed JSON", lambda: put(data=b"{not json"))
        case("put empty body", lambda: put(data=b""))
        case("put JSON list", lambda: put(body=["k", "v"]))
        case("put JSON string", lambda: put(body="kv"))
        case("put int key", lambda: put(body={"key": 5, "value": "v"}))
        case("put list key", lambda: put(body={"key": ["k"], "value": "v"}))
        case("put int value", lambda: put(body={"key": "k", "value": 5}))
        case("put object value", lambda: put(body={"key": "k", "value": {"a": 1}}))
        case("put lone surrogate", lambda: put(data=b'{"key": "k", "value": "\\ud800"}'))
        case("put latin-1 body", lambda: put(data='{"key": "k", "value": "\xe9"}'.encode("latin-1")))
        case("put over 100 MiB", lambda: put(data=b'{"key": "k", "value": "' + b"x" * (100 * MiB) + b'"}'))
        case("remove missing key", lambda: s.call("DELETE", "/api/remove/missing"))
        case("put leased", lambda: put(body={"key": "leased", "value": "v"}))
        case("get leased", lambda: s.call("GET", "/api/get/leased"))
        case("remove leased", lambda: s.call("DELETE", "/api/remove/leased"))
        case("exist after bad requests", lambda: s.call("GET", "/api/exist/leased"))
        case("put after bad requests", lambda: put(body={"key": "ok", "value": "fine"}))
        case("get after bad requests", lambda: s.call("GET", "/api/get/ok"))

    with_service(run)


def service_segments():
    """The segment routes: validation, prefill/decode switching, mounts."""

    def run(s):
        post = lambda path, **kw: s.call("POST", path, **kw)  # noqa: E731
        for path in ("/api/reconfigure", "/api/mount_shm", "/api/unmount_shm", "/api/mount", "/api/unmount",
                     "/api/unmount_local_disk"):
            case(f"{path} malformed JSON", lambda path=path: post(path, data=b"{"))
            case(f"{path} JSON list", lambda path=path: post(path, body=[1]))
        case("reconfigure prefill", lambda: post("/api/reconfigure", body={"mode": "prefill"}))
        case("reconfigure PREFILL", lambda: post("/api/reconfigure", body={"mode": "PREFILL"}))
        case("reconfigure without mode", lambda: post("/api/reconfigure", body={}))
        case("reconfigure bogus mode", lambda: post("/api/reconfigure", body={"mode": "bogus"}))
        case("reconfigure int mode", lambda: post("/api/reconfigure", body={"mode": 5}))
        case("decode without path", lambda: post("/api/reconfigure", body={"mode": "decode", "size": 4096}))
        case("decode without size", lambda: post("/api/reconfigure", body={"mode": "decode", "path": "/x"}))
        case("decode string size",
             lambda: post("/api/reconfigure", body={"mode": "decode", "path": "/nonexistent", "size": "4096"}))
        case("decode missing file",
             lambda: post("/api/reconfigure", body={"mode": "decode", "path": "/nonexistent/f", "size": 4096}))
        case("mount_shm without name", lambda: post("/api/mount_shm", body={"size": 4096}))
        case("mount_shm without size", lambda: post("/api/mount_shm", body={"name": "seg"}))
        for name in ("a/b", "..", ".", "/", "", 7):
            case(f"mount_shm name {name!r}", lambda name=name: post("/api/mount_shm", body={"name": name,
                                                                                             "size": 4096}))
        case("mount_shm string size", lambda: post("/api/mount_shm", body={"name": "seg", "size": "4096"}))
        case("mount_shm missing object",
             lambda: post("/api/mount_shm", body={"name": "mooncake-no-such-object", "size": 4096}))
        for ids in (None, [], "", 5, [5]):
            body = {} if ids is None else {"segment_ids": ids}
            case(f"unmount_shm segment_ids {ids!r}", lambda body=body: post("/api/unmount_shm", body=body))
            case(f"unmount segment_ids {ids!r}", lambda body=body: post("/api/unmount", body=body))
        case("unmount_shm unknown id", lambda: post("/api/unmount_shm", body={"segment_ids": ["no-such-id"]}))
        case("unmount unknown id", lambda: post("/api/unmount", body={"segment_ids": "no-such-id"}))
        case("unmount negative grace",
             lambda: post("/api/unmount", body={"segment_ids": ["x"], "grace_period_seconds": -1}))
        for label, size in (("0", 0), ("-1", -1), ("'4096'", "4096"), ("true", True), ("1.5", 1.5), ("absent", None),
                            ("2**70", 2**70)):
            body = {} if size is None else {"size": size}
            case(f"mount size {label}", lambda body=body: post("/api/mount", body=body))
        case("mount 16 MiB", lambda: post("/api/mount", body={"size": 16 * MiB}))
        for grace in (-1, "5", 3601, 1.5, True):
            case(f"unmount_local_disk grace {grace!r}",
                 lambda grace=grace: post("/api/unmount_local_disk", body={"grace_period_seconds": grace}))
        case("unmount_local_disk", lambda: post("/api/unmount_local_disk", body={}))
        case("reconfigure prefill at the end", lambda: post("/api/reconfigure", body={"mode": "prefill"}))
        case("still serving", lambda: s.call("GET", "/api/exist/k"))

    with_service(run)


def service_cli():
    """Command-line handling: -D overrides, exit codes of failed starts, and SIGTERM."""

    def exit_code(*args, env=None, timeout=120):
        e = dict(os.environ)
        e.update(env or {})
        p = subprocess.run(service_command(*args), stdout=sys.stderr, stderr=sys.stderr, env=e, timeout=timeout)
        return p.returncode

    master = LeasedMaster()
    try:
        case("missing config file", lambda: exit_code("--config", "/nonexistent/mooncake.json", "--port",
                                                      str(free_port())))
        no_env = {k: "" for k in os.environ if k.startswith("MOONCAKE_")}
        case("no config, no MOONCAKE_MASTER", lambda: exit_code("--port", str(free_port()), env=no_env))
        case("unknown flag", lambda: exit_code("--no-such-flag"))
        case("--port not a number", lambda: exit_code("--port", "http"))

        def overridden():
            # The file names a master that does not exist; -D puts the real one in.
            s = Service(master, f"-Dmaster_server_address={master.address}", "-Dno_such_field=1", "-Dnoequals",
                        config_fields={"master_server_address": "127.0.0.1:1"})
            try:
                return [s.call("PUT", "/api/put", {"key": "d", "value": "v"}), s.call("GET", "/api/get/d")]
            finally:
                s.stop()

        case("-D master_server_address", overridden)

        def from_env():
            port = free_port()
            env = dict(os.environ, MOONCAKE_MASTER=master.address, MOONCAKE_LOCAL_HOSTNAME="127.0.0.1",
                       MOONCAKE_TE_META_DATA_SERVER=master.metadata, MOONCAKE_GLOBAL_SEGMENT_SIZE="64mb",
                       MOONCAKE_LOCAL_BUFFER_SIZE="32mb", MOONCAKE_PROTOCOL="tcp")
            env.pop("MOONCAKE_CONFIG_PATH", None)
            p = subprocess.Popen(service_command("--port", str(port)), stdout=sys.stderr, stderr=sys.stderr,
                                 env=env)
            try:
                wait_port(port, p, timeout=90)
                p.send_signal(signal.SIGTERM)
                return p.wait(60)
            finally:
                stop(p)

        case("config from environment, then SIGTERM", from_env)
    finally:
        master.stop()


SCENARIOS = {f.__name__: f for f in (service_kv, service_bad_requests, service_segments, service_cli)}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
