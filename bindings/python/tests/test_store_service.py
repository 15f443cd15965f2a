"""The REST store service (mooncake.mooncake_store_service): every route driven over HTTP against a real master,
malformed requests answered 4xx with a message while the service keeps serving, the command line, and the segment
routes' prefill/decode logic against a stand-in store (this build's store cannot mount extra segments yet).

The service runs as `python -m mooncake.mooncake_store_service` on a free 127.0.0.1 port and is stopped by PID.
Needs aiohttp in this venv.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request

import pytest

from conftest import Master, free_port, stop, wait_port

MiB = 1 << 20
SEGMENT_METHODS = ("mount_segment", "unmount_segment", "allocate_and_mount_segment", "unmount_and_free_segment")


def write_config(master, **fields) -> str:
    doc = {
        "local_hostname": "127.0.0.1",
        "metadata_server": "P2PHANDSHAKE",
        "master_server_address": master.address,
        "global_segment_size": 64 * MiB,
        "local_buffer_size": 32 * MiB,
        "protocol": "tcp",
    }
    doc.update(fields)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(doc, f)
    return f.name


def command(*args) -> list:
    return [sys.executable, "-m", "mooncake.mooncake_store_service", *args]


class Service:
    """The service as a child process on 127.0.0.1 (its log is kept for failure messages)."""

    def __init__(self, master, *args, **config_fields):
        self.port = free_port()
        self.config = write_config(master, **config_fields)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            command("--config", self.config, "--port", str(self.port), "--host", "127.0.0.1", *args),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_port(self.port, timeout=60, proc=self.proc)
        except Exception:
            self.stop()
            raise AssertionError(f"the service did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self):
        stop(self.proc)
        os.unlink(self.config)

    def call(self, method: str, path: str, body=None, data: bytes = None, headers=None):
        """(status, content type, body: parsed JSON, bytes or text)."""
        if body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, ctype, raw = r.status, r.headers.get_content_type(), r.read()
        except urllib.error.HTTPError as e:
            status, ctype, raw = e.code, e.headers.get_content_type(), e.read()
        if ctype == "application/json":
            return status, ctype, json.loads(raw)
        if ctype == "application/octet-stream":
            return status, ctype, raw
        return status, ctype, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def leased_master():
    """A master whose KV lease lasts 10 minutes: an object read once stays leased for the whole module."""
    m = Master(extra_args=["--default_kv_lease_ttl=600000"])
    yield m
    m.stop()


@pytest.fixture(scope="module")
def service(leased_master):
    s = Service(leased_master)
    yield s
    s.stop()


def assert_client_error(answer, status=None):
    code, ctype, body = answer
    assert 400 <= code < 500 if status is None else code == status, answer
    assert ctype == "application/json" and isinstance(body.get("error"), str) and body["error"], answer


def assert_serving(service):
    assert service.call("GET", "/api/exist/never-stored") == (200, "application/json", {"exists": False})
    assert service.proc.poll() is None


# ---- key routes ----------------------------------------------------------------------------------------------


def test_put_get_exist(service):
    assert service.call("GET", "/api/exist/t1") == (200, "application/json", {"exists": False})
    assert service.call("GET", "/api/get/t1") == (404, "application/json", {"error": "Key not found"})
    assert service.call("PUT", "/api/put", {"key": "t1", "value": "h\u00e9llo"}) == (
        200, "application/json", {"status": "success"})
    assert service.call("GET", "/api/get/t1") == (200, "application/octet-stream", "h\u00e9llo".encode())
    assert service.call("GET", "/api/exist/t1") == (200, "application/json", {"exists": True})
    # Percent-encoded keys are decoded.
    assert service.call("PUT", "/api/put", {"key": "a b", "value": "x"})[0] == 200
    assert service.call("GET", "/api/get/a%20b")[2] == b"x"
    # Unknown fields of a well-formed body are ignored, as upstream does.
    assert service.call("PUT", "/api/put", {"key": "t2", "value": "v", "ttl": 3})[0] == 200
    big = "z" * (4 * MiB)
    assert service.call("PUT", "/api/put", {"key": "t-big", "value": big})[0] == 200
    assert service.call("GET", "/api/get/t-big")[2] == big.encode()


def test_remove_and_remove_all(service):
    for k in ("r1", "r2", "r3"):
        assert service.call("PUT", "/api/put", {"key": k, "value": k})[0] == 200
    assert service.call("DELETE", "/api/remove/r1") == (200, "application/json", {"status": "success"})
    assert service.call("GET", "/api/get/r1")[0] == 404
    assert_client_error(service.call("DELETE", "/api/remove/r1"), 404)
    # r2 is read, so leased (10 minutes): remove says so; remove_all skips it.
    assert service.call("GET", "/api/get/r2")[2] == b"r2"
    code, _, body = service.call("DELETE", "/api/remove/r2")
    assert code == 409 and "lease" in body["error"], body
    code, _, body = service.call("DELETE", "/api/remove_all")
    assert code == 200 and body["status"].startswith("success removed ") and body["status"].endswith(" keys")
    assert service.call("GET", "/api/exist/r3")[2] == {"exists": False}
    assert service.call("GET", "/api/get/r2")[2] == b"r2"
    assert service.call("DELETE", "/api/remove_all")[2] == {"status": "success removed 0 keys"}


BAD_PUTS = [
    ("missing key", {"body": {"value": "v"}}),
    ("missing value", {"body": {"key": "k"}}),
    ("empty key", {"body": {"key": "", "value": "v"}}),
    ("null value", {"body": {"key": "k", "value": None}}),
    ("malformed JSON", {"data": b"{nope"}),
    ("empty body", {"data": b""}),
    ("JSON list", {"body": ["k", "v"]}),
    ("JSON number", {"body": 7}),
    ("int key", {"body": {"key": 5, "value": "v"}}),
    ("object key", {"body": {"key": {"k": 1}, "value": "v"}}),
    ("int value", {"body": {"key": "k", "value": 5}}),
    ("list value", {"body": {"key": "k", "value": ["v"]}}),
    ("lone surrogate", {"data": b'{"key": "k", "value": "\\udc00"}'}),
    ("not UTF-8", {"data": b'{"key": "k", "value": "\xff"}'}),
    ("unknown charset",
     {"data": b'{"key": "k", "value": "v"}', "headers": {"Content-Type": "application/json; charset=nope"}}),
]


@pytest.mark.parametrize("name,request_", BAD_PUTS, ids=[n for n, _ in BAD_PUTS])
def test_bad_put_is_a_client_error(service, name, request_):
    assert_client_error(service.call("PUT", "/api/put", **request_), 400)
    assert_serving(service)


def test_body_over_limit_is_413(service):
    answer = service.call("PUT", "/api/put", data=b'{"key": "k", "value": "' + b"x" * (100 * MiB) + b'"}')
    assert_client_error(answer, 413)
    assert "limit" in answer[2]["error"]
    assert_serving(service)


def test_wrong_method_and_unknown_route(service):
    assert service.call("GET", "/api/put")[0] == 405
    assert service.call("POST", "/api/remove/k")[0] == 405
    assert service.call("GET", "/api/nothing")[0] == 404
    assert service.call("GET", "/api/get/a/b")[0] == 404
    assert_serving(service)


# ---- segment routes: validation over HTTP ------------------------------------------------------------------

BAD_SEGMENT_REQUESTS = [
    ("/api/reconfigure", {"data": b"{"}),
    ("/api/reconfigure", {"body": [1]}),
    ("/api/reconfigure", {"body": {}}),
    ("/api/reconfigure", {"body": {"mode": "sideways"}}),
    ("/api/reconfigure", {"body": {"mode": 3}}),
    ("/api/reconfigure", {"body": {"mode": "decode", "size": 4096}}),
    ("/api/reconfigure", {"body": {"mode": "decode", "path": "/x"}}),
    ("/api/reconfigure", {"body": {"mode": "decode", "path": 5, "size": 4096}}),
    ("/api/reconfigure", {"body": {"mode": "decode", "path": "/x", "size": "4096"}}),
    ("/api/reconfigure", {"body": {"mode": "decode", "path": "/x", "size": 0}}),
    ("/api/reconfigure", {"body": {"mode": "decode", "path": "/x", "size": 4096, "offset": -1}}),
    ("/api/reconfigure", {"body": {"mode": "decode", "path": "/x", "size": 4096, "protocol": 1}}),
    ("/api/reconfigure", {"body": {"mode": "decode", "path": "/x", "size": 2**64}}),
    ("/api/mount_shm", {"data": b"[]"}),
    ("/api/mount_shm", {"body": {"size": 4096}}),
    ("/api/mount_shm", {"body": {"name": "../etc", "size": 4096}}),
    ("/api/mount_shm", {"body": {"name": "..", "size": 4096}}),
    ("/api/mount_shm", {"body": {"name": "seg"}}),
    ("/api/mount_shm", {"body": {"name": "seg", "size": -5}}),
    ("/api/mount_shm", {"body": {"name": "seg", "size": 4096, "location": 9}}),
    ("/api/unmount_shm", {"body": {}}),
    ("/api/unmount_shm", {"body": {"segment_ids": 5}}),
    ("/api/unmount_shm", {"body": {"segment_ids": ["a", 5]}}),
    ("/api/unmount_shm", {"body": {"segment_ids": ["a"], "grace_period_seconds": "1"}}),
    ("/api/mount", {"body": {"size": 0}}),
    ("/api/mount", {"body": {"size": True}}),
    ("/api/mount", {"body": {"size": 2**70}}),
    ("/api/mount", {"body": {"size": 4096, "protocol": ["tcp"]}}),
    ("/api/unmount", {"body": {"segment_ids": []}}),
    ("/api/unmount", {"body": {"segment_ids": [""]}}),
    ("/api/unmount", {"body": {"segment_ids": ["a"], "grace_period_seconds": 3601}}),
    ("/api/unmount_local_disk", {"data": b"nope"}),
    ("/api/unmount_local_disk", {"body": {"grace_period_seconds": -1}}),
    ("/api/unmount_local_disk", {"body": {"grace_period_seconds": 2.5}}),
]


@pytest.mark.parametrize("path,request_", BAD_SEGMENT_REQUESTS,
                         ids=[f"{p} {r.get('body', r.get('data'))!r}" for p, r in BAD_SEGMENT_REQUESTS])
def test_bad_segment_request_is_a_client_error(service, path, request_):
    assert_client_error(service.call("POST", path, **request_), 400)
    assert_serving(service)


def test_segment_routes_with_this_build_store(service):
    """Well-formed segment requests reach the store: 501 naming the method where this build's store lacks it."""
    from mooncake.store import MooncakeDistributedStore

    requests = [
        ("/api/reconfigure", {"mode": "decode", "path": "/nonexistent/file", "size": 4096}, "mount_segment"),
        ("/api/mount_shm", {"name": "mooncake-test-none", "size": 4096}, "mount_segment"),
        ("/api/unmount_shm", {"segment_ids": "no-such-id"}, "unmount_segment"),
        ("/api/mount", {"size": 16 * MiB}, "allocate_and_mount_segment"),
        ("/api/unmount", {"segment_ids": ["no-such-id"]}, "unmount_and_free_segment"),
    ]
    for path, body, method in requests:
        code, _, answer = service.call("POST", path, body)
        if hasattr(MooncakeDistributedStore, method):
            assert code != 501, (path, answer)
        else:
            assert code == 501 and method in answer["error"], (path, answer)
    # With no decode segments mounted, switching to prefill needs no store call.
    assert service.call("POST", "/api/reconfigure", {"mode": "Prefill"})[2] == {"status": "success",
                                                                                 "mode": "prefill"}
    code, _, answer = service.call("POST", "/api/unmount_local_disk", {"grace_period_seconds": 0})
    assert code == 200 and answer == {"status": "success"}
    assert_serving(service)


# ---- segment logic against a stand-in store ------------------------------------------------------------------


class FakeStore:
    """Records segment calls; `fail` names calls (or segment ids) that should fail."""

    def __init__(self):
        self.calls, self.fail, self.mounted, self.next = [], set(), set(), 0

    def _mint(self):
        self.next += 1
        sid = f"seg-{self.next}"
        self.mounted.add(sid)
        return sid

    def mount_segment(self, path, size, offset=0, protocol="tcp", location=""):
        self.calls.append(("mount_segment", path, size, offset, protocol, location))
        if "mount_segment" in self.fail:
            return {"ret": -1, "segment_ids": []}
        return {"ret": 0, "segment_ids": [self._mint()]}

    def allocate_and_mount_segment(self, size, protocol="tcp", location=""):
        self.calls.append(("allocate_and_mount_segment", size, protocol, location))
        return {"ret": 0, "segment_ids": [self._mint(), self._mint()], "allocated_size": size}

    def unmount_segment(self, segment_ids, grace_period_seconds=0):
        self.calls.append(("unmount_segment", list(segment_ids), grace_period_seconds))
        if any(s in self.fail or s not in self.mounted for s in segment_ids):
            return -1
        self.mounted.difference_update(segment_ids)
        return 0

    def unmount_and_free_segment(self, segment_ids, grace_period_seconds=0):
        self.calls.append(("unmount_and_free_segment", list(segment_ids), grace_period_seconds))
        return self.unmount_segment(segment_ids, grace_period_seconds)

    def unmount_local_disk_segment(self, grace_period_seconds=0):
        self.calls.append(("unmount_local_disk_segment", grace_period_seconds))
        return -5 if "unmount_local_disk_segment" in self.fail else 0

    def close(self):
        return 0


@pytest.fixture
def fake_service(leased_master):
    """MooncakeStoreService with a FakeStore, serving on 127.0.0.1 from an event loop in a thread."""
    from mooncake.mooncake_store_service import MooncakeStoreService

    path = write_config(leased_master)
    try:
        svc = MooncakeStoreService(path, {"protocol": "TCP"})
    finally:
        os.unlink(path)
    svc.store = FakeStore()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()
    asyncio.run_coroutine_threadsafe(svc.start_http_service(port, "127.0.0.1"), loop).result(30)

    class Client:
        store = svc.store
        service = svc

        def post(self, path, body):
            data = json.dumps(body).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

    yield Client()
    asyncio.run_coroutine_threadsafe(svc.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_decode_prefill_switching(fake_service):
    c = fake_service
    decode = {"mode": "decode", "path": "/dev/shm/kv", "size": 4096, "offset": 512, "location": "cpu:0"}
    assert c.post("/api/reconfigure", decode) == (200, {"status": "success", "mode": "decode",
                                                        "segment_ids": ["seg-1"]})
    assert c.store.calls[-1] == ("mount_segment", "/dev/shm/kv", 4096, 512, "tcp", "cpu:0")
    assert c.service.last_mount_info["path"] == "/dev/shm/kv"
    # A second decode mounts first, then retires the previous segment.
    assert c.post("/api/reconfigure", decode)[1]["segment_ids"] == ["seg-2"]
    assert c.store.calls[-1] == ("unmount_segment", ["seg-1"], 0)
    # A failed remount keeps the serving segments.
    c.store.fail.add("mount_segment")
    code, body = c.post("/api/reconfigure", decode)
    assert code == 500 and body["mode"] == "decode" and "keeping previous" in body["error"]
    assert c.service.mounted_segment_ids == ["seg-2"]
    c.store.fail.discard("mount_segment")
    # Prefill unmounts them all.
    assert c.post("/api/reconfigure", {"mode": "prefill"}) == (200, {"status": "success", "mode": "prefill"})
    assert c.store.calls[-1] == ("unmount_segment", ["seg-2"], 0)
    assert c.service.mounted_segment_ids == [] and c.service.last_mount_info == {}
    # With nothing mounted, a failed decode rolls back to prefill.
    c.store.fail.add("mount_segment")
    code, body = c.post("/api/reconfigure", decode)
    assert code == 500 and body["mode"] == "prefill" and "rolled back" in body["error"]


def test_failed_retirement_stays_tracked(fake_service):
    c = fake_service
    decode = {"mode": "decode", "path": "/dev/shm/kv", "size": 4096}
    assert c.post("/api/reconfigure", decode)[0] == 200
    c.store.fail.add("seg-1")
    # The new segment is mounted; the old one could not be unmounted and stays tracked for a later retry.
    assert c.post("/api/reconfigure", decode)[1]["segment_ids"] == ["seg-2", "seg-1"]
    code, body = c.post("/api/reconfigure", {"mode": "prefill"})
    assert code == 500 and body["error"].startswith("Unmount failed, ret=")
    assert c.service.current_mode == "decode"


def test_mount_shm_and_unmount_shm(fake_service):
    c = fake_service
    assert c.post("/api/mount_shm", {"name": "/kv0", "size": 8192}) == (200, {"status": "success",
                                                                             "segment_ids": ["seg-1"]})
    assert c.store.calls[-1] == ("mount_segment", "/dev/shm/kv0", 8192, 0, "tcp", "")
    assert c.post("/api/mount_shm", {"name": "kv1", "size": 8192})[1]["segment_ids"] == ["seg-2"]
    code, body = c.post("/api/unmount_shm", {"segment_ids": ["seg-1", "nope", "seg-2"], "grace_period_seconds": 2})
    assert code == 500 and body["failed_segment_ids"] == ["nope"]
    assert ("unmount_segment", ["seg-2"], 2) in c.store.calls
    assert c.post("/api/unmount_shm", {"segment_ids": "seg-1"})[0] == 500  # already gone


def test_mount_unmount_and_local_disk(fake_service):
    c = fake_service
    code, body = c.post("/api/mount", {"size": 1 << 20, "protocol": "tcp"})
    assert code == 200 and body == {"status": "success", "segment_ids": ["seg-1", "seg-2"], "allocated_size": 1 << 20}
    assert c.post("/api/unmount", {"segment_ids": ["seg-1", "seg-2"], "grace_period_seconds": 1}) == (
        200, {"status": "success"})
    assert c.store.calls[-2] == ("unmount_and_free_segment", ["seg-1", "seg-2"], 1)
    assert c.post("/api/unmount", {"segment_ids": "seg-1"}) == (500, {"error": "Unmount and free failed, ret=-1"})
    assert c.post("/api/unmount_local_disk", {"grace_period_seconds": 0}) == (200, {"status": "success"})
    c.store.fail.add("unmount_local_disk_segment")
    assert c.post("/api/unmount_local_disk", {}) == (500, {"error": "Unmount local disk failed, ret=-5"})


# ---- command line ----------------------------------------------------------------------------------------------


def run_cli(*args, env=None, timeout=120):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(command(*args), capture_output=True, timeout=timeout, env=e)


def test_cli_define_overrides_and_sigterm(leased_master):
    # The file names a master that is not there; -D puts the real one in and converts sizes from their text.
    s = Service(leased_master, f"-Dmaster_server_address={leased_master.address}", "-Dglobal_segment_size=32mb",
                "-Dunknown_field=1", master_server_address="127.0.0.1:1")
    try:
        assert s.call("PUT", "/api/put", {"key": "cli", "value": "v"})[0] == 200
        assert s.call("GET", "/api/get/cli")[2] == b"v"
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.proc.wait(60) == 0
        out = s.output()
        assert "unknown_field" in out and "Mooncake service stopped" in out, out
    finally:
        s.stop()


def test_cli_failures_exit_1_with_a_message(leased_master, tmp_path):
    good = tmp_path / "good.json"
    os.replace(write_config(leased_master), good)
    bad_value = run_cli("--config", str(good), "--port", str(free_port()), "-Dglobal_segment_size=lots")
    assert bad_value.returncode == 1 and b"global_segment_size" in bad_value.stderr, bad_value.stderr[-2000:]
    missing = run_cli("--config", str(tmp_path / "none.json"), "--port", str(free_port()))
    assert missing.returncode == 1 and b"none.json" in missing.stderr, missing.stderr[-2000:]
    no_env = run_cli("--port", str(free_port()), env={k: "" for k in os.environ if k.startswith("MOONCAKE_")})
    assert no_env.returncode == 1 and b"MOONCAKE_MASTER" in no_env.stderr, no_env.stderr[-2000:]
    nowhere = tmp_path / "nowhere.json"
    os.replace(write_config(leased_master, master_server_address="127.0.0.1:1"), nowhere)
    unreachable = run_cli("--config", str(nowhere), "--port", str(free_port()), "--max-wait-time", "0.5")
    assert unreachable.returncode == 1 and b"could not be set up" in unreachable.stderr, unreachable.stderr[-2000:]


def test_cli_port_in_use(leased_master, service, tmp_path):
    config = tmp_path / "c.json"
    os.replace(write_config(leased_master), config)
    taken = run_cli("--config", str(config), "--port", str(service.port), "--host", "127.0.0.1")
    assert taken.returncode == 1 and b"cannot serve HTTP" in taken.stderr, taken.stderr[-2000:]
    assert_serving(service)


def test_import_without_aiohttp_says_how_to_install():
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "try:\n    import mooncake.mooncake_store_service\n"
        "except ImportError as e:\n    print(e)\nelse:\n    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert b"pip install aiohttp" in out.stdout, out.stdout + out.stderr


def test_public_signatures_match_upstream():
    """The parameters upstream's callers use (the surface parity test checks the rest against upstream's wheel)."""
    import inspect

    from mooncake import mooncake_store_service as m

    assert list(inspect.signature(m.MooncakeStoreService).parameters) == ["config_path", "cli_config"]
    start = inspect.signature(m.MooncakeStoreService.start_store_service).parameters
    assert start["max_wait_time"].default == 60 and start["shutdown_event"].default is None
    assert inspect.signature(m.MooncakeStoreService.start_http_service).parameters["port"].default == 8080
    assert inspect.iscoroutinefunction(m.main) and not inspect.iscoroutinefunction(m.sync_main)
    sys_argv = sys.argv
    try:
        sys.argv = ["mc_store_rest_server"]
        args = m.parse_arguments()
    finally:
        sys.argv = sys_argv
    assert (args.config, args.define, args.port, args.max_wait_time) == (None, [], 8080, 60)
