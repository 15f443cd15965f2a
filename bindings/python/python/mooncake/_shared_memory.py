"""Host memory that several processes map at once: the engine-level ``SharedSegment``.

One rank (the owner) creates a POSIX shared-memory object (a file under ``/dev/shm``), sizes it and maps it; every
other rank of the group maps the same object once it learns the object's name. The exchange happens in two phases,
so that the caller can move the small "export blobs" with whatever collective it has:

    seg, blob = SharedSegment.create(name, size, world_size, rank_id, owner_rank)
    blobs = all_gather(blob)            # one per rank, indexed by rank
    seg.complete(blobs)                 # peers map the owner's pages; every rank checks the others' declarations

A blob is a fixed-size record (``BLOB_SIZE`` bytes, the same on every rank, so it can be all-gathered as a tensor):

    offset  size  field
    0       8     magic b"MCRS.SHM"
    8       2     format version (little endian, currently 1)
    10      2     backend (1: POSIX shared memory mapped with mmap)
    12      4     rank id of the rank that wrote the blob
    16      4     world size
    20      4     owner rank
    24      8     requested size in bytes
    32      8     mapped size in bytes (the requested size rounded up to whole pages)
    40      16    fingerprint: BLAKE2b-128 of the declaration (name, size, world size, owner rank, backend)
    56      2     length of the object's name (0 in every blob but the owner's)
    58      70    the object's name, zero padded

``complete`` checks, blob by blob in rank order: length, magic, version, rank id, backend, fingerprint, mapped size.
The first problem found is raised (``RuntimeError``) and ``complete`` may be called again with corrected blobs.

The owner refuses a segment larger than the space /dev/shm has left (tmpfs would accept it and fail later, with
SIGBUS, when a page it cannot back is touched). The owner removes the object's name when the segment is closed or garbage collected, and at interpreter exit; the
pages themselves stay until the last rank unmaps them. ``release_name()`` removes the name earlier, once every rank
has mapped the pages (``mooncake.shared_segment`` does that right after its last collective), so that even an owner
killed by a signal leaves nothing behind in ``/dev/shm``.

Only the POSIX path exists: the accelerator paths of upstream's package (``mmap=False`` VMM segments and
``host_register=True`` device registration) raise ``RuntimeError`` like upstream's builds without those backends.
``device_addr()`` is therefore always 0.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import mmap as _mmap
import os
import re
import secrets
import struct
import threading
import weakref
from collections.abc import Sequence
from typing import Any

__all__ = ["SharedSegment", "BLOB_SIZE", "MAX_SIZE"]

SHM_DIR = "/dev/shm"
MAX_SIZE = 1 << 46
BLOB_SIZE = 128
_MAGIC = b"MCRS.SHM"
_VERSION = 1
_BACKEND_POSIX = 1
_HEADER = struct.Struct("<8sHHIIIQQ16sH")
_NAME_ROOM = BLOB_SIZE - _HEADER.size
_NAME_PATTERN = re.compile(r"/mcrs_ss_[0-9]+_[0-9a-f]{16}")
_U32 = (1 << 32) - 1
_I32 = (-(1 << 31), (1 << 31) - 1)

# Names this process created and has not removed yet, removed at exit (name -> creating pid).
_OWNED_NAMES: dict[str, int] = {}
_OWNED_LOCK = threading.Lock()


def _unlink_name(name: str) -> None:
    """Removes `name` from /dev/shm once, and only in the process that created it (not in forked children)."""
    with _OWNED_LOCK:
        creator = _OWNED_NAMES.get(name)
        if creator is None or creator != os.getpid():
            return
        del _OWNED_NAMES[name]
    try:
        os.unlink(SHM_DIR + name)
    except FileNotFoundError:
        pass


@atexit.register
def _unlink_all_at_exit() -> None:
    # Only the names: the mappings stay until the process ends, since tensors may still point into them.
    for name in list(_OWNED_NAMES):
        _unlink_name(name)


def _release(state: dict) -> None:
    """Finalizer of a segment: removes the owner's name and drops the mapping."""
    name = state.pop("name", None)
    if name:
        _unlink_name(name)
    mapping = state.pop("mapping", None)
    if mapping is not None:
        try:
            mapping.close()
        except BufferError:
            # Views (tensors, memoryviews) still export it: the pages go when the last of them does.
            pass


def _page_align(size: int) -> int:
    page = _mmap.PAGESIZE
    return (size + page - 1) // page * page


def _fingerprint(name: str, size: int, world_size: int, owner_rank: int, backend: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in (name.encode("utf-8", "surrogatepass"), str(size).encode(), str(world_size).encode(),
                 str(owner_rank).encode(), str(backend).encode()):  # fmt: skip
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _unsigned(value: Any, what: str, limit: int) -> int:
    """An integer argument as a native unsigned parameter would take it: TypeError when it is not one."""
    if not isinstance(value, int) or value < 0 or value > limit:
        raise TypeError(f"SharedSegment.create(): {what} must be an integer in [0, {limit}], got {value!r}")
    return int(value)


def _flag(value: Any, what: str) -> bool:
    if value is None or isinstance(value, (bool, int)):
        return bool(value)
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    raise TypeError(f"SharedSegment.create(): {what} must be a bool, got {type(value).__name__}")


def _as_blob(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"SharedSegment.complete(): each blob must be bytes, got {type(value).__name__}")


def _map_fd(fd: int, length: int) -> tuple[_mmap.mmap, int]:
    mapping = _mmap.mmap(fd, length, flags=_mmap.MAP_SHARED, prot=_mmap.PROT_READ | _mmap.PROT_WRITE)
    probe = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(probe)
    del probe  # releases its export, so the mapping can be closed later
    return mapping, address


class SharedSegment:
    """One rank's handle on a span of host memory shared by the ranks of a group.

    Made by ``SharedSegment.create``; usable once ``complete`` has succeeded. ``base_addr()`` is the address of
    the span in this process (the owner's address is valid from ``create`` on), ``size()`` its length in bytes.
    Addresses differ between ranks; the bytes are the same.
    """

    __slots__ = ("_lock", "_state", "_finalizer", "_rank", "_world", "_owner", "_size", "_mapped",
                 "_fingerprint", "_ready", "_address", "__weakref__")  # fmt: skip

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("SharedSegment cannot be constructed directly: use SharedSegment.create(...)")

    @classmethod
    def _new(cls, rank: int, world: int, owner: int, size: int, fingerprint: bytes) -> SharedSegment:
        self = object.__new__(cls)
        self._lock = threading.Lock()
        self._state: dict = {}
        self._finalizer = weakref.finalize(self, _release, self._state)
        self._finalizer.atexit = False  # at exit only the name goes (_unlink_all_at_exit), never the pages
        self._rank, self._world, self._owner = rank, world, owner
        self._size, self._mapped = size, _page_align(size)
        self._fingerprint = fingerprint
        self._ready = False
        self._address = 0
        return self

    @staticmethod
    def supported(mmap: bool = True, host_register: bool = False) -> bool:
        """Whether this build can share memory across processes this way (only ``mmap=True`` without
        ``host_register``, on a host with a writable /dev/shm)."""
        if not mmap or host_register:
            return False
        return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)

    @staticmethod
    def create(
        name: str,
        size: int,
        world_size: int,
        rank_id: int,
        owner_rank: int = 0,
        device_id: int = 0,
        mmap: bool = True,
        host_register: bool = False,
    ) -> tuple[SharedSegment, bytes]:
        """Phase one: returns ``(segment, blob)``. The owner creates and maps the memory here; the others map it in
        ``complete``. Every rank must pass the same name, size, world size and owner rank."""
        if not isinstance(name, str):
            raise TypeError(f"SharedSegment.create(): name must be a str, got {type(name).__name__}")
        size = _unsigned(size, "size", (1 << 64) - 1)
        world_size = _unsigned(world_size, "world_size", _U32)
        rank_id = _unsigned(rank_id, "rank_id", _U32)
        owner_rank = _unsigned(owner_rank, "owner_rank", _U32)
        if not isinstance(device_id, int) or not _I32[0] <= device_id <= _I32[1]:
            raise TypeError(f"SharedSegment.create(): device_id must be a 32-bit integer, got {device_id!r}")
        use_mmap = _flag(mmap, "mmap")
        register = _flag(host_register, "host_register")

        if size == 0 or size > MAX_SIZE:
            raise RuntimeError(f"invalid argument: a shared segment holds 1 to {MAX_SIZE} bytes, not {size}")
        if world_size == 0:
            raise RuntimeError("invalid argument: a shared segment needs a world_size of at least 1")
        if rank_id >= world_size or owner_rank >= world_size:
            raise RuntimeError(
                f"invalid argument: rank_id ({rank_id}) and owner_rank ({owner_rank}) must both be below "
                f"world_size ({world_size})"
            )
        if not use_mmap:
            raise RuntimeError("not implemented: this build has no VMM (mmap=False) shared-segment backend")
        if register:
            raise RuntimeError("not implemented: this build cannot register shared-segment pages with a device")
        if not SharedSegment.supported():
            raise RuntimeError(f"not implemented: {SHM_DIR} is missing or not writable on this host")

        fingerprint = _fingerprint(name, size, world_size, owner_rank, _BACKEND_POSIX)
        seg = SharedSegment._new(rank_id, world_size, owner_rank, size, fingerprint)
        shm_name = ""
        if rank_id == owner_rank:
            shm_name = seg._create_object()
        blob = _HEADER.pack(
            _MAGIC, _VERSION, _BACKEND_POSIX, rank_id, world_size, owner_rank, size, seg._mapped, fingerprint,
            len(shm_name),
        ) + shm_name.encode("ascii").ljust(_NAME_ROOM, b"\0")  # fmt: skip
        return seg, blob

    def _create_object(self) -> str:
        """Owner: creates, sizes and maps a fresh object; returns its name."""
        # tmpfs hands out pages lazily: a segment larger than what /dev/shm has left would be created fine and kill
        # its users with SIGBUS later, when they touch a page it cannot back. Refuse it now instead.
        try:
            stat = os.statvfs(SHM_DIR)
            free = stat.f_bavail * stat.f_frsize
        except OSError:
            free = None
        if free is not None and self._mapped > free:
            raise RuntimeError(
                f"memory: {SHM_DIR} has {free} bytes free, a shared segment of {self._mapped} bytes does not fit "
                "(a bigger /dev/shm, e.g. docker --shm-size, makes room)"
            )
        for _ in range(16):
            name = f"/mcrs_ss_{os.getpid()}_{secrets.token_hex(8)}"
            try:
                fd = os.open(SHM_DIR + name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as e:
                raise RuntimeError(f"memory: cannot create {SHM_DIR}{name}: {e.strerror}") from None
            break
        else:
            raise RuntimeError("memory: no free shared-memory name found")
        with _OWNED_LOCK:
            _OWNED_NAMES[name] = os.getpid()
        self._state["name"] = name
        try:
            os.ftruncate(fd, self._mapped)
            mapping, address = _map_fd(fd, self._mapped)
        except OSError as e:
            _release(self._state)
            raise RuntimeError(f"memory: cannot size or map {self._mapped} bytes of shared memory: {e}") from None
        finally:
            os.close(fd)
        self._state["mapping"] = mapping
        self._address = address
        return name

    def complete(self, blobs: Sequence[bytes]) -> None:
        """Phase two: ``blobs`` holds every rank's blob, indexed by rank. Checks that every rank declared the same
        segment; a peer then maps the owner's memory. Raises ``RuntimeError`` on the first problem found (nothing
        changes then, and it may be called again)."""
        if isinstance(blobs, (str, bytes, bytearray, memoryview)) or not isinstance(blobs, Sequence):
            raise TypeError(f"SharedSegment.complete(): blobs must be a list of bytes, got {type(blobs).__name__}")
        raw = [_as_blob(b) for b in blobs]
        with self._lock:
            if self._ready:
                raise RuntimeError("invalid argument: complete() was already called on this shared segment")
            if "closed" in self._state:
                raise RuntimeError("invalid argument: this shared segment is closed")
            if len(raw) != self._world:
                raise RuntimeError(
                    f"invalid argument: expected {self._world} blobs (one per rank), got {len(raw)}"
                )
            owner_name = ""
            for rank, blob in enumerate(raw):
                name = self._check_blob(rank, blob)
                if rank == self._owner:
                    owner_name = name
            if self._rank != self._owner:
                self._attach(owner_name)
            self._ready = True

    def _check_blob(self, rank: int, blob: bytes) -> str:
        if len(blob) != BLOB_SIZE:
            raise RuntimeError(f"invalid argument: the blob of rank {rank} has {len(blob)} bytes, not {BLOB_SIZE}")
        magic, version, backend, blob_rank, _world, _owner, _size, mapped, fingerprint, name_len = (
            _HEADER.unpack_from(blob)
        )
        if magic != _MAGIC:
            raise RuntimeError(f"invalid argument: the blob of rank {rank} is not a shared-segment blob")
        if version != _VERSION:
            raise RuntimeError(
                f"invalid argument: the blob of rank {rank} has format {version}, this build reads {_VERSION} "
                "(ranks run different builds?)"
            )
        if blob_rank != rank:
            raise RuntimeError(f"invalid argument: the blob at index {rank} was written by rank {blob_rank}")
        if backend != _BACKEND_POSIX:
            raise RuntimeError(f"invalid argument: rank {rank} uses another shared-segment backend ({backend})")
        if fingerprint != self._fingerprint:
            raise RuntimeError(
                f"invalid argument: rank {rank} declared a different shared segment (name, size, world size or "
                "owner rank differ)"
            )
        if mapped != self._mapped:
            raise RuntimeError(f"invalid argument: rank {rank} maps {mapped} bytes, this rank {self._mapped}")
        if name_len > _NAME_ROOM:
            raise RuntimeError(f"invalid argument: the blob of rank {rank} is corrupt")
        return blob[_HEADER.size : _HEADER.size + name_len].decode("ascii", "replace")

    def _attach(self, name: str) -> None:
        """Peer: maps the owner's object."""
        if not _NAME_PATTERN.fullmatch(name):
            raise RuntimeError(f"memory: the owner's blob names no shared-memory object ({name!r})")
        try:
            fd = os.open(SHM_DIR + name, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise RuntimeError(f"memory: cannot open {SHM_DIR}{name}: {e.strerror}") from None
        try:
            if os.fstat(fd).st_size < self._mapped:
                raise RuntimeError(f"memory: {SHM_DIR}{name} is smaller than the declared segment")
            mapping, address = _map_fd(fd, self._mapped)
        except OSError as e:
            raise RuntimeError(f"memory: cannot map {SHM_DIR}{name}: {e}") from None
        finally:
            os.close(fd)
        self._state["mapping"] = mapping
        self._address = address

    def ready(self) -> bool:
        """True once ``complete`` has succeeded (and until ``close``)."""
        return self._ready

    def base_addr(self) -> int:
        """Address of the span in this process: the owner's from ``create`` on, a peer's once ``complete`` has
        succeeded (0 before, and 0 after ``close``)."""
        return self._address

    def device_addr(self) -> int:
        """Device address of the span: always 0 here (no accelerator registration in this build)."""
        return 0

    def size(self) -> int:
        """Size in bytes, as declared to ``create``."""
        return self._size

    def release_name(self) -> None:
        """Owner: removes the object's name from /dev/shm. Call it once every rank has completed: ranks that have
        mapped the memory keep it, none can map it any more. No-op on peers and when already removed."""
        name = self._state.pop("name", None)
        if name:
            _unlink_name(name)

    def close(self) -> None:
        """Removes the owner's name and unmaps the memory (the pages stay while tensors or memoryviews made from
        ``view`` still use them). Addresses taken from ``base_addr`` are invalid afterwards."""
        with self._lock:
            self._ready = False
            self._address = 0
            self._state["closed"] = True
            _release(self._state)

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable memoryview of ``length`` bytes at ``offset`` (default: to the end of the declared size). It
        keeps the mapping alive after ``close`` until it is released."""
        mapping = self._state.get("mapping")
        if mapping is None:
            raise RuntimeError("invalid argument: this shared segment is not mapped in this process")
        if length is None:
            length = self._size - offset
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"[{offset}, {offset + length}) lies outside the segment's {self._size} bytes")
        return memoryview(mapping)[offset : offset + length]

    def __repr__(self) -> str:
        role = "owner" if self._rank == self._owner else "peer"
        return (
            f"<SharedSegment {role} rank {self._rank}/{self._world}, {self._size} bytes at {self._address:#x}, "
            f"ready={self._ready}>"
        )
