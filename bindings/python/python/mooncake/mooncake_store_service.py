"""A store client behind a small REST API: ``mooncake.mooncake_store_service`` and the ``mc_store_rest_server``
console script (also ``python -m mooncake.mooncake_store_service``).

The process sets up one ``MooncakeDistributedStore`` from a ``MooncakeConfig`` (a JSON file given with
``--config``, else the ``MOONCAKE_*`` environment variables, then ``-Dfield=value`` overrides), retrying for up to
``--max-wait-time`` seconds while the master is not reachable, and then serves on ``--port`` (8080):

- ``PUT /api/put`` with ``{"key": str, "value": str}`` stores the value's UTF-8 bytes;
- ``GET /api/get/{key}`` answers the bytes (``application/octet-stream``), ``GET /api/exist/{key}`` answers
  ``{"exists": bool}``, ``DELETE /api/remove/{key}`` and ``DELETE /api/remove_all`` remove objects;
- ``POST /api/mount``, ``/api/unmount``, ``/api/mount_shm``, ``/api/unmount_shm``, ``/api/reconfigure`` and
  ``/api/unmount_local_disk`` mount and unmount extra segments (prefill/decode switching).

Routes, JSON bodies, status codes, flags and defaults are upstream's. Where upstream answers a client's mistake
with a 500 (malformed JSON, a body that is not an object, a field of the wrong type, a size out of range, removing
a key that does not exist or is leased, a body over the 100 MiB limit), this module answers 4xx with a message
saying what is wrong; the service keeps serving either way. Store calls run on worker threads, so one slow call
does not hold up the other requests. Segment routes whose store method this build lacks answer 501.
docs/store-service.md has the details.

aiohttp is needed: ``pip install aiohttp`` (or ``pip install 'mooncake-rs[service]'``).
"""

import argparse
import asyncio
import functools
import json
import logging
import signal
import sys
import time

try:
    from aiohttp import web
except ImportError as _e:  # pragma: no cover - exercised only without aiohttp
    raise ImportError(
        "mooncake.mooncake_store_service needs aiohttp, which is not installed: "
        "pip install aiohttp (or pip install 'mooncake-rs[service]')"
    ) from _e

from mooncake.mooncake_config import MooncakeConfig
from mooncake.mooncake_config import _parse_bool
from mooncake.mooncake_config import parse_size as _parse_size
from mooncake.store import MooncakeDistributedStore

__all__ = ["MooncakeConfig", "MooncakeDistributedStore", "MooncakeStoreService", "main", "parse_arguments", "sync_main"]

log = logging.getLogger(__name__)

# Largest request body (aiohttp's client_max_size), as upstream: 100 MiB.
_MAX_BODY = 100 * 1024 * 1024
# Longest grace period a caller may ask an unmount to wait, in seconds.
_MAX_GRACE_SECONDS = 3600
# Sizes and offsets are unsigned 64-bit in the store.
_MAX_U64 = (1 << 64) - 1
# Store return codes this module maps to a client error.
_OBJECT_NOT_FOUND = -704
_OBJECT_HAS_LEASE = -706

# MooncakeConfig fields a -D override converts from its string form.
_SIZE_FIELDS = ("global_segment_size", "local_buffer_size")
_BOOL_FIELDS = ("enable_ssd_offload", "enable_client_http_server")
_INT_FIELDS = ("client_http_port",)
# Setup keys the store takes besides MooncakeConfig.to_setup_dict(), with their defaults: passed only when set.
_EXTRA_SETUP = {
    "enable_ssd_offload": False,
    "ssd_offload_path": "",
    "tenant_id": "default",
    "enable_client_http_server": False,
    "client_http_port": 9300,
}


class _ClientError(Exception):
    """A request the service answers with `status` (4xx, or 501 for a store call this build lacks) and
    ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _reply(status: int, payload: dict) -> "web.Response":
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json")


def _error(status: int, message: str, **extra) -> "web.Response":
    return _reply(status, {"error": message, **extra})


async def _body(request) -> dict:
    """The request's JSON body, which must be an object; _ClientError (400 or 413) otherwise."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _ClientError(413, f"Request body too large: the limit is {_MAX_BODY} bytes") from None
    try:
        data = json.loads(raw.decode(request.charset or "utf-8"))
    except (UnicodeDecodeError, LookupError, ValueError) as e:
        log.info("Refusing a request body that is not JSON: %s", e)
        raise _ClientError(400, "Malformed JSON body") from None
    if not isinstance(data, dict):
        raise _ClientError(400, "Request body must be a JSON object")
    return data


def _int_field(data: dict, name: str, default, low: int, high: int):
    """Field `name` as an int in [low, high] (JSON true/false are not ints), or `default` when absent."""
    value = data.get(name, default)
    if type(value) is not int or not low <= value <= high:
        raise _ClientError(400, f"Invalid {name}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _str_field(data: dict, name: str, default: str) -> str:
    value = data.get(name, default)
    if not isinstance(value, str):
        raise _ClientError(400, f"Invalid {name}: must be a string, got {value!r}")
    return value


def _segment_ids(data: dict) -> list:
    """``segment_ids`` as a non-empty list of strings (one string is a list of one)."""
    ids = data.get("segment_ids", [])
    if isinstance(ids, str):
        ids = [ids]
    if not ids:
        raise _ClientError(400, "Missing segment_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise _ClientError(400, "Invalid segment_ids: must be a non-empty string or a list of non-empty strings")
    return ids


def _grace(data: dict) -> int:
    return _int_field(data, "grace_period_seconds", 0, 0, _MAX_GRACE_SECONDS)


def _shm_path(name) -> str:
    """``/dev/shm/<name>`` for a shared-memory object name (a leading ``/`` is allowed), or None if invalid."""
    if not isinstance(name, str):
        return None
    base = name[1:] if name.startswith("/") else name
    if not base or "/" in base or base in (".", ".."):
        return None
    return "/dev/shm/" + base


def _timed(label: str, handler):
    """Wraps a route handler: logs how long it took."""

    async def run(request):
        started = time.perf_counter()
        try:
            return await handler(request)
        finally:
            log.info("%s operation completed in %.2f ms", label, (time.perf_counter() - started) * 1000)

    return run


def _route_errors(label: str):
    """Decorator for the handlers: a _ClientError becomes its answer; anything else unexpected is logged and
    answered 500 with its text (the service keeps serving)."""

    def wrap(handler):
        @functools.wraps(handler)
        async def run(self, request):
            try:
                return await handler(self, request)
            except _ClientError as e:
                return _error(e.status, e.message)
            except Exception as e:  # noqa: BLE001 - the caller gets the reason
                log.exception("%s error", label)
                return _error(500, str(e))

        return run

    return wrap


class MooncakeStoreService:
    """One store client and the REST API in front of it.

    ``config_path`` is a MooncakeConfig JSON file (None: the ``MOONCAKE_*`` environment variables); ``cli_config``
    maps MooncakeConfig field names to override values (strings from ``-D`` are converted to the field's type;
    unknown names are ignored with a warning). A config that cannot be loaded raises.
    """

    def __init__(self, config_path: str = None, cli_config: dict = None):
        self.store = None
        self.config = None
        self._setup_logging()
        # Prefill/decode state for /api/reconfigure, and the segments mounted through it or /api/mount_shm.
        self.current_mode = "prefill"
        self.mounted_segment_ids = []
        self.last_mount_info = {}
        self._state_lock = asyncio.Lock()
        self._runner = None
        try:
            self.config = MooncakeConfig.from_file(config_path) if config_path else MooncakeConfig.load_from_env()
            for key, value in (cli_config or {}).items():
                self._override(key, value)
        except Exception as e:
            log.error("Configuration load failed: %s", e)
            raise
        log.info("Mooncake configuration loaded")

    def _setup_logging(self):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")

    def _override(self, key: str, value) -> None:
        if not hasattr(self.config, key):
            log.warning("Ignoring unknown config field %r (from -D)", key)
            return
        if isinstance(value, str):
            try:
                if key in _SIZE_FIELDS:
                    value = _parse_size(value)
                elif key in _BOOL_FIELDS:
                    value = _parse_bool(value)
                elif key in _INT_FIELDS:
                    value = int(value)
                elif key == "protocol":
                    value = value.strip().lower()
            except ValueError as e:
                raise ValueError(f"Invalid value for {key}: {value!r} ({e})") from None
        setattr(self.config, key, value)

    def _setup_config(self) -> dict:
        """The dict given to ``MooncakeDistributedStore.setup``."""
        setup = self.config.to_setup_dict()
        for key, default in _EXTRA_SETUP.items():
            value = getattr(self.config, key)
            if value != default:
                setup[key] = value
        return setup

    async def start_store_service(self, max_wait_time: float = 60, shutdown_event=None):
        """Sets up the store, retrying once a second for up to `max_wait_time` seconds.

        True once it is up; False when time ran out or `shutdown_event` (an asyncio.Event) was set meanwhile.
        """
        started = time.perf_counter()
        attempt = 0
        await asyncio.sleep(0)  # let a signal that arrived just before startup be seen
        while True:
            if shutdown_event is not None and shutdown_event.is_set():
                log.info("Store startup cancelled by shutdown request")
                return False
            elapsed = time.perf_counter() - started
            if elapsed >= max_wait_time:
                log.error("Store startup failed: gave up after %d attempts in %.1f s", attempt, max_wait_time)
                return False
            attempt += 1
            log.info("Attempting to start store service (attempt %d, %.1f s of %s s)", attempt, elapsed, max_wait_time)
            store = MooncakeDistributedStore()
            try:
                rc = await asyncio.to_thread(store.setup, self._setup_config())
                failure = None if rc == 0 else f"setup returned {rc}"
            except Exception as e:  # noqa: BLE001 - a config the store rejects is retried like upstream
                failure = str(e)
            if failure is None:
                self.store = store
                if shutdown_event is not None and shutdown_event.is_set():
                    log.info("Store startup cancelled by shutdown request")
                    await self.stop()
                    return False
                log.info("Store service started successfully on %s", self.config.local_hostname)
                return True
            remaining = max_wait_time - (time.perf_counter() - started)
            pause = max(0.0, min(1.0, remaining))
            log.warning("Store startup failed (attempt %d): %s; retrying in %.1f s", attempt, failure, pause)
            if pause <= 0:
                continue
            if shutdown_event is None:
                await asyncio.sleep(pause)
                continue
            try:
                await asyncio.wait_for(shutdown_event.wait(), timeout=pause)
            except asyncio.TimeoutError:
                continue
            log.info("Store startup cancelled by shutdown request")
            return False

    def _app(self) -> "web.Application":
        app = web.Application(client_max_size=_MAX_BODY)
        routes = [
            (web.post, "/api/reconfigure", "RECONFIGURE", self.handle_reconfigure),
            (web.post, "/api/mount_shm", "MOUNT_SHM", self.handle_mount_shm),
            (web.post, "/api/unmount_shm", "UNMOUNT_SHM", self.handle_unmount_shm),
            (web.post, "/api/mount", "MOUNT", self.handle_mount),
            (web.post, "/api/unmount", "UNMOUNT", self.handle_unmount),
            (web.post, "/api/unmount_local_disk", "UNMOUNT_LOCAL_DISK", self.handle_unmount_local_disk),
            (web.put, "/api/put", "PUT", self.handle_put),
            (web.get, "/api/get/{key}", "GET", self.handle_get),
            (web.get, "/api/exist/{key}", "EXIST", self.handle_exist),
            (web.delete, "/api/remove/{key}", "REMOVE", self.handle_remove),
            (web.delete, "/api/remove_all", "REMOVE_ALL", self.handle_remove_all),
        ]
        app.add_routes([method(path, _timed(label, handler)) for method, path, label, handler in routes])
        return app

    async def start_http_service(self, port: int = 8080, host: str = "0.0.0.0"):
        """Serves the REST API on `host`:`port` (upstream always uses 0.0.0.0). True once listening; OSError
        when the address cannot be bound."""
        runner = web.AppRunner(self._app())
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("REST API started on %s:%s", host, port)
        return True

    async def _call(self, method: str, *args):
        """Runs store method `method` on a worker thread; 501 when this build's store does not have it."""
        fn = getattr(self.store, method, None)
        if fn is None:
            raise _ClientError(501, f"Not supported by this build: MooncakeDistributedStore.{method} is not available")
        return await asyncio.to_thread(fn, *args)

    # ---- routes ---------------------------------------------------------------------------------------------

    @_route_errors("RECONFIGURE")
    async def handle_reconfigure(self, request):
        """``{"mode": "decode", "path", "size", "offset"=0, "protocol", "location"=""}`` mounts the file at `path`
        as the decode segment (replacing the previous ones once the new mount works);
        ``{"mode": "prefill"}`` unmounts the decode segments."""
        data = await _body(request)
        mode = data.get("mode", "")
        if not isinstance(mode, str):
            raise _ClientError(400, "Invalid mode. Use 'decode' or 'prefill'")
        mode = mode.lower()
        if mode == "decode":
            path, size = data.get("path"), data.get("size")
            if not path or size is None:
                return _error(400, "Missing path or size for decode mode")
            if not isinstance(path, str):
                raise _ClientError(400, f"Invalid path: must be a string, got {path!r}")
            size = _int_field(data, "size", None, 1, _MAX_U64)
            offset = _int_field(data, "offset", 0, 0, _MAX_U64)
            protocol = _str_field(data, "protocol", self.config.protocol)
            location = _str_field(data, "location", "")
            return await self._decode(path, size, offset, protocol, location)
        if mode == "prefill":
            async with self._state_lock:
                if self.mounted_segment_ids:
                    rc = await self._call("unmount_segment", list(self.mounted_segment_ids))
                    if rc != 0:
                        return _error(500, f"Unmount failed, ret={rc}")
                    self.mounted_segment_ids.clear()
                self.current_mode = "prefill"
                self.last_mount_info.clear()
            return _reply(200, {"status": "success", "mode": self.current_mode})
        return _error(400, "Invalid mode. Use 'decode' or 'prefill'")

    async def _decode(self, path, size, offset, protocol, location):
        async with self._state_lock:
            previous = list(self.mounted_segment_ids)
            result = await self._call("mount_segment", path, size, offset, protocol, location)
            if result["ret"] != 0:
                if previous:
                    # The old decode segments still serve: keep them rather than dropping all capacity.
                    log.warning("Reconfigure decode: mounting %s failed (%s); keeping the previous segments",
                                path, result["ret"])
                    return _error(500, f"Mount failed, ret={result['ret']}; keeping previous decode segments",
                                  mode=self.current_mode)
                self.current_mode = "prefill"
                self.mounted_segment_ids.clear()
                self.last_mount_info.clear()
                return _error(500, f"Mount failed, ret={result['ret']}; rolled back to prefill",
                              mode=self.current_mode)
            # The new segment is live: retire the old ones one at a time, keeping those that fail for a retry.
            stuck = []
            for sid in previous:
                if await self._call("unmount_segment", [sid]) != 0:
                    stuck.append(sid)
            if stuck:
                log.warning("Reconfigure decode: could not unmount previous segments %s; still tracked", stuck)
            self.mounted_segment_ids = list(result["segment_ids"]) + stuck
            self.current_mode = "decode"
            self.last_mount_info = {"path": path, "offset": offset, "size": size, "protocol": protocol,
                                    "location": location}
            return _reply(200, {"status": "success", "mode": self.current_mode,
                                "segment_ids": self.mounted_segment_ids})

    @_route_errors("MOUNT_SHM")
    async def handle_mount_shm(self, request):
        """``{"name", "size", "offset"=0, "protocol", "location"=""}``: mounts the shared-memory object
        ``/dev/shm/<name>`` as a segment; answers its ``segment_ids``."""
        data = await _body(request)
        path = _shm_path(data.get("name"))
        if not path or data.get("size") is None:
            return _error(400, "Missing or invalid name or size")
        size = _int_field(data, "size", None, 1, _MAX_U64)
        offset = _int_field(data, "offset", 0, 0, _MAX_U64)
        protocol = _str_field(data, "protocol", self.config.protocol)
        location = _str_field(data, "location", "")
        result = await self._call("mount_segment", path, size, offset, protocol, location)
        if result["ret"] != 0:
            return _error(500, f"Mount failed, ret={result['ret']}")
        return _reply(200, {"status": "success", "segment_ids": list(result["segment_ids"])})

    @_route_errors("UNMOUNT_SHM")
    async def handle_unmount_shm(self, request):
        """``{"segment_ids": [...] or "id", "grace_period_seconds"=0}``: unmounts each segment; answers 500 with
        ``failed_segment_ids`` when some could not be."""
        data = await _body(request)
        ids = _segment_ids(data)
        grace = _grace(data)
        failed = []
        async with self._state_lock:
            for sid in ids:
                if await self._call("unmount_segment", [sid], grace) != 0:
                    failed.append(sid)
                elif sid in self.mounted_segment_ids:
                    self.mounted_segment_ids.remove(sid)
            if not self.mounted_segment_ids:
                self.current_mode = "prefill"
        if failed:
            return _error(500, "Unmount failed for one or more segments", failed_segment_ids=failed)
        return _reply(200, {"status": "success"})

    @_route_errors("MOUNT")
    async def handle_mount(self, request):
        """``{"size", "protocol", "location"=""}``: allocates `size` bytes and mounts them as segments; answers
        ``segment_ids`` and ``allocated_size``."""
        data = await _body(request)
        size = data.get("size")
        if type(size) is not int or size <= 0:
            return _error(400, "Invalid size, must be a positive integer")
        if size > _MAX_U64:
            return _error(400, f"Invalid size, must be at most {_MAX_U64}")
        protocol = _str_field(data, "protocol", self.config.protocol)
        location = _str_field(data, "location", "")
        result = await self._call("allocate_and_mount_segment", size, protocol, location)
        if result["ret"] != 0:
            return _error(500, f"Allocate and mount failed, ret={result['ret']}")
        return _reply(200, {"status": "success", "segment_ids": list(result["segment_ids"]),
                            "allocated_size": result["allocated_size"]})

    @_route_errors("UNMOUNT")
    async def handle_unmount(self, request):
        """``{"segment_ids": [...] or "id", "grace_period_seconds"=0}``: unmounts and frees segments made by
        /api/mount."""
        data = await _body(request)
        ids = _segment_ids(data)
        grace = _grace(data)
        rc = await self._call("unmount_and_free_segment", ids, grace)
        if rc != 0:
            return _error(500, f"Unmount and free failed, ret={rc}")
        return _reply(200, {"status": "success"})

    @_route_errors("UNMOUNT_LOCAL_DISK")
    async def handle_unmount_local_disk(self, request):
        """``{"grace_period_seconds"=0}`` (at most 3600): deregisters this store's SSD offload tier so readers
        miss cleanly, then waits the grace period for reads in flight. Meant for a preStop hook."""
        data = await _body(request)
        grace = data.get("grace_period_seconds", 0)
        if type(grace) is not int or not 0 <= grace <= _MAX_GRACE_SECONDS:
            return _error(400, "Invalid grace_period_seconds, must be a non-negative integer no greater than "
                               f"{_MAX_GRACE_SECONDS}")
        if not hasattr(self.store, "unmount_local_disk_segment"):
            # This build's store has no local-disk (SSD offload) tier, so there is nothing to deregister or drain.
            log.info("UNMOUNT_LOCAL_DISK: this build has no local disk tier; nothing to unmount")
            return _reply(200, {"status": "success"})
        rc = await self._call("unmount_local_disk_segment", grace)
        if rc != 0:
            return _error(500, f"Unmount local disk failed, ret={rc}")
        return _reply(200, {"status": "success"})

    @_route_errors("PUT")
    async def handle_put(self, request):
        """``{"key": str, "value": str}``: stores the value's UTF-8 bytes under `key`."""
        data = await _body(request)
        key, value = data.get("key"), data.get("value")
        if not key or value is None:
            return _error(400, "Missing key or value")
        if not isinstance(key, str):
            raise _ClientError(400, f"Invalid key: must be a string, got {key!r}")
        if not isinstance(value, str):
            raise _ClientError(400, f"Invalid value: must be a string, got a JSON {type(value).__name__}")
        try:
            raw = value.encode()
        except UnicodeEncodeError:
            raise _ClientError(400, "Invalid value: not encodable as UTF-8 (lone surrogate)") from None
        if await self._call("put", key, raw) != 0:
            return _error(500, "PUT operation failed")
        return _reply(200, {"status": "success"})

    @_route_errors("GET")
    async def handle_get(self, request):
        """The object's bytes, or 404 when `key` is not stored."""
        key = request.match_info["key"]
        exists = await self._call("is_exist", key)
        if exists == 0:
            return _error(404, "Key not found")
        if exists < 0:
            return _error(500, "Exist check failed")
        value = await self._call("get", key)
        if value is None:
            return _error(500, "GET operation failed")
        if value == b"":
            # get() answers b"" both for an empty object and for one removed meanwhile: ask again.
            exists = await self._call("is_exist", key)
            if exists == 0:
                return _error(404, "Key not found")
            if exists < 0:
                return _error(500, "Exist check failed")
        return web.Response(status=200, body=value, content_type="application/octet-stream")

    @_route_errors("EXIST")
    async def handle_exist(self, request):
        """``{"exists": bool}``."""
        exists = await self._call("is_exist", request.match_info["key"])
        if exists < 0:
            return _error(500, "Exist check failed")
        return _reply(200, {"exists": exists > 0})

    @_route_errors("REMOVE")
    async def handle_remove(self, request):
        """Removes the object: 404 when it is not stored, 409 while it is leased (a reader holds it)."""
        rc = await self._call("remove", request.match_info["key"])
        if rc == _OBJECT_NOT_FOUND:
            return _error(404, "Key not found")
        if rc == _OBJECT_HAS_LEASE:
            return _error(409, "Object is leased by a recent read; retry once the lease expires")
        if rc != 0:
            return _error(500, "Remove operation failed")
        return _reply(200, {"status": "success"})

    @_route_errors("REMOVE_ALL")
    async def handle_remove_all(self, request):
        """Removes every object not leased; answers how many."""
        count = await self._call("remove_all")
        if count < 0:
            return _error(500, "RemoveAll operation failed")
        return _reply(200, {"status": f"success removed {count} keys"})

    async def stop(self):
        """Stops serving HTTP and closes the store (safe to call more than once)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        store, self.store = self.store, None
        if store is not None:
            rc = await asyncio.to_thread(store.close)
            if rc != 0:
                log.warning("Mooncake service close returned %s", rc)
            else:
                log.info("Mooncake service stopped")


def parse_arguments():
    """The command line: ``--config``, ``-D``/``--define key=value`` (repeatable), ``--port`` (8080),
    ``--max-wait-time`` (60 s) and ``--host`` (0.0.0.0; not in upstream)."""
    parser = argparse.ArgumentParser(description="Mooncake store client with a REST API")
    parser.add_argument("--config", type=str, required=False,
                        help="MooncakeConfig JSON file (default: the MOONCAKE_* environment variables)")
    parser.add_argument("-D", "--define", action="append", default=[],
                        help="override a config field, e.g. -Dlocal_hostname=node1 (repeatable)")
    parser.add_argument("--port", type=int, default=8080, required=False, help="HTTP API port (default: 8080)")
    parser.add_argument("--max-wait-time", type=float, default=60, required=False,
                        help="how long to keep retrying store setup, in seconds (default: 60)")
    parser.add_argument("--host", type=str, default="0.0.0.0", required=False,
                        help="address the HTTP API listens on (default: 0.0.0.0, all interfaces)")
    return parser.parse_args()


def _shutdown_on_signals(loop, event) -> None:
    """SIGINT and SIGTERM set `event` (and are unblocked, in case the parent blocked them)."""

    def requested(signum):
        log.info("Received signal %s, shutting down", signum)
        event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, requested, sig)
        except (NotImplementedError, RuntimeError):
            signal.signal(sig, lambda signum, _frame: loop.call_soon_threadsafe(requested, signum))
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


class _StartupError(RuntimeError):
    """The service could not start (reported without a traceback by sync_main)."""


async def main():
    """Runs the service from the command line until SIGINT or SIGTERM."""
    args = parse_arguments()
    overrides = {}
    for item in args.define:
        key, eq, value = item.partition("=")
        if eq:
            overrides[key] = value
        else:
            log.warning("Ignoring -D %r: expected key=value", item)
    service = MooncakeStoreService(args.config, overrides)
    stop_requested = asyncio.Event()
    _shutdown_on_signals(asyncio.get_running_loop(), stop_requested)
    try:
        if not await service.start_store_service(max_wait_time=args.max_wait_time, shutdown_event=stop_requested):
            if stop_requested.is_set():
                return
            raise _StartupError(f"the store could not be set up within {args.max_wait_time} s (see the log above)")
        try:
            await service.start_http_service(args.port, args.host)
        except OSError as e:
            raise _StartupError(f"cannot serve HTTP on {args.host}:{args.port}: {e}") from None
        log.info("Mooncake Store Service is running")
        await stop_requested.wait()
    finally:
        await service.stop()


def sync_main():
    """Entry point of ``mc_store_rest_server``: runs :func:`main`; a failed start exits with status 1."""
    try:
        return asyncio.run(main())
    except (_StartupError, ValueError, OSError) as e:
        log.error("mc_store_rest_server: %s", e)
        sys.exit(1)
    except KeyboardInterrupt:
        return None


if __name__ == "__main__":
    sync_main()
