"""``BufferPool``: leases of registered host memory for a store's zero-copy calls.

``pool = BufferPool(store)`` hands out ``BufferLease``s: ``lease.ptr`` and ``lease.size`` go straight to
``put_from`` / ``get_into`` (the memory is registered with the store), ``lease.buffer`` is a writable memoryview of
the same bytes, and ``lease.release()`` (or leaving its ``with`` block, or dropping the last reference) returns the
space. Upstream's semantics, measured against its wheel:

- The pool holds at most ``max_bytes`` in leases, never less than the store's ``local_buffer_size``; with
  ``max_bytes=0`` it holds twice that. A request larger than that raises ``RuntimeError``.
- When the leases out leave no room, ``acquire`` waits until one is released (``block_on_exhaustion``, default
  true) for up to ``timeout`` (default ``default_timeout``; None waits for ever), or raises ``RuntimeError`` at once
  with ``block=False``.
- ``close()`` refuses (``RuntimeError``) while leases are out; afterwards the pool's memory is unregistered and
  freed.

Memory comes in regions of ``alignment`` bytes (default 8 MiB; a larger request gets a region of its own, rounded
up), mapped and registered with the store when first needed, at most ``max_regions`` of them.
"""

import ctypes
import mmap
import threading
import time
from typing import Any, List, Optional, Tuple

from ._mooncake import MooncakeDistributedStore as _NativeStore

__all__ = ["BufferPool", "RegisteredBufferPool", "BufferLease", "RegisteredBufferLease"]

# Leases start on this boundary inside a region.
_GRANULE = 4096


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Region:
    """One mapped, registered range and its free list of (offset, length) holes, sorted by offset."""

    def __init__(self, store: Any, size: int):
        self.map = mmap.mmap(-1, size)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(self._anchor)
        self.size = size
        self.free = [(0, size)]
        self.used = 0
        rc = store.register_buffer(self.addr, size)
        if rc != 0:
            self.unmap()
            raise RuntimeError(f"cannot register {size} bytes of pool memory with the store (code {rc})")

    def take(self, length: int) -> Optional[int]:
        """The address of `length` free bytes (first fit), or None."""
        for i, (off, hole) in enumerate(self.free):
            if hole >= length:
                if hole == length:
                    del self.free[i]
                else:
                    self.free[i] = (off + length, hole - length)
                self.used += length
                return self.addr + off
        return None

    def give(self, addr: int, length: int) -> None:
        """Returns `[addr, addr+length)` to the free list, merging it with its neighbours."""
        off = addr - self.addr
        self.used -= length
        holes = self.free
        i = 0
        while i < len(holes) and holes[i][0] < off:
            i += 1
        holes.insert(i, (off, length))
        if i + 1 < len(holes) and holes[i][0] + holes[i][1] == holes[i + 1][0]:
            holes[i] = (holes[i][0], holes[i][1] + holes[i + 1][1])
            del holes[i + 1]
        if i > 0 and holes[i - 1][0] + holes[i - 1][1] == holes[i][0]:
            holes[i - 1] = (holes[i - 1][0], holes[i - 1][1] + holes[i][1])
            del holes[i]

    def unmap(self) -> None:
        del self._anchor
        self.map.close()


class BufferLease:
    """Registered bytes lent by a ``BufferPool``, until ``release()``."""

    __slots__ = ("_pool", "_ptr", "_size", "_reserved", "_region", "__weakref__")

    def __init__(self, pool: "BufferPool", region: _Region, ptr: int, size: int, reserved: int):
        self._pool: Optional[BufferPool] = pool
        self._region = region
        self._ptr = ptr
        self._size = size
        self._reserved = reserved

    @property
    def size(self) -> int:
        """Bytes asked for (still readable after release)."""
        return self._size

    @property
    def ptr(self) -> int:
        """Address of the first byte; RuntimeError once released."""
        if self._pool is None:
            raise RuntimeError("buffer lease is closed")
        return self._ptr

    @property
    def buffer(self) -> memoryview:
        """A writable memoryview of the leased bytes; BufferError once released."""
        if self._pool is None:
            raise BufferError("Error getting buffer")
        if self._size == 0:
            return memoryview(bytearray())
        return memoryview((ctypes.c_char * self._size).from_address(self._ptr)).cast("B")

    def release(self) -> None:
        """Gives the bytes back to the pool (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._give_back(self._region, self._ptr, self._reserved)

    def __enter__(self) -> "BufferLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        # Dropped without release(): the collector may run this while the pool's lock is held (even by this
        # thread, in the middle of an allocation), so hand the bytes back through the pool's drop list.
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._dropped(self._region, self._ptr, self._reserved)


class BufferPool:
    """Leases of memory registered with ``store`` (a set-up ``MooncakeDistributedStore``)."""

    def __init__(
        self,
        store: Any,
        max_bytes: int = 0,
        min_size_class: int = 65536,
        max_size_class: Optional[int] = None,
        alignment: int = 8388608,
        block_on_exhaustion: bool = True,
        default_timeout: Optional[float] = None,
        max_regions: Optional[int] = None,
        prewarm_size: Optional[int] = None,
        prewarm_count: int = 0,
    ):
        for name, value in (("max_bytes", max_bytes), ("min_size_class", min_size_class), ("alignment", alignment)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TypeError(f"__init__(): {name} must be a non-negative int, got {value!r}")
        if store is not None and not isinstance(store, _NativeStore):
            raise RuntimeError(
                "BufferPool store parameter must be a PyClient or store wrapper that implements "
                "_get_pyclient_capsule()"
            )
        if store is None or store.get_hostname() == "":
            raise RuntimeError("MooncakeDistributedStore is not initialized")
        if min_size_class <= 0 or alignment <= 0:
            raise RuntimeError("min_size_class and alignment must be positive")
        if alignment & (alignment - 1) or alignment < ctypes.sizeof(ctypes.c_void_p):
            raise RuntimeError("alignment must be a power of two and at least sizeof(void*)")
        local = store._local_buffer_size()
        self.capacity = max(max_bytes, local) if max_bytes > 0 else 2 * local
        self._store = store
        self._min_size_class = min_size_class
        self._max_size_class = max_size_class
        self._alignment = alignment
        self._block = bool(block_on_exhaustion)
        self._default_timeout = default_timeout
        self._max_regions = max_regions
        self._regions: List[_Region] = []
        self._reserved = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Leases collected while the lock was taken: returned by the next holder of the lock.
        self._pending: List[Tuple[_Region, int, int]] = []
        self._closed = False
        if prewarm_size is not None and prewarm_count > 0:
            self.prewarm(prewarm_size, prewarm_count)

    def acquire(self, size: int, block: Optional[bool] = None, timeout: Optional[float] = None) -> BufferLease:
        """A lease of ``size`` bytes; waits for room as the pool says (see the module doc)."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TypeError(f"acquire(): size must be a non-negative int, got {size!r}")
        reserved = _round_up(max(size, 1), _GRANULE)
        if reserved > self.capacity:
            raise RuntimeError("requested buffer size exceeds pool capacity")
        wait = self._block if block is None else bool(block)
        limit = self._default_timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + float(limit)
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("buffer pool is closed")
                self._return_pending()
                lease = self._try_take(size, reserved)
                if lease is not None:
                    return lease
                if not wait:
                    raise RuntimeError("buffer pool is exhausted")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RuntimeError("timed out waiting for buffer")
                self._cond.wait(left)

    def buffer(self, size: int, block: Optional[bool] = None, timeout: Optional[float] = None) -> BufferLease:
        """Same as ``acquire``."""
        return self.acquire(size, block, timeout)

    def prewarm(self, size: int, count: int) -> None:
        """Maps and registers the memory for ``count`` leases of ``size`` bytes now, not on first use."""
        leases = [self.acquire(size, block=False) for _ in range(count)]
        for lease in leases:
            lease.release()

    def close(self) -> None:
        """Unregisters and frees the pool's memory; RuntimeError while leases are out."""
        with self._cond:
            if self._closed:
                return
            self._return_pending()
            if self._reserved > 0:
                raise RuntimeError("cannot close buffer pool with active leases")
            self._closed = True
            regions, self._regions = self._regions, []
            self._cond.notify_all()
        for region in regions:
            self._store.unregister_buffer(region.addr)
            region.unmap()

    def _try_take(self, size: int, reserved: int) -> Optional[BufferLease]:
        """A lease when there is room (called with the lock held)."""
        if self._reserved + reserved > self.capacity:
            return None
        for region in self._regions:
            addr = region.take(reserved)
            if addr is not None:
                return self._lend(region, addr, size, reserved)
        if self._max_regions is not None and len(self._regions) >= self._max_regions:
            return None
        region = _Region(self._store, _round_up(reserved, self._alignment))
        self._regions.append(region)
        addr = region.take(reserved)
        assert addr is not None  # a fresh region holds the request
        return self._lend(region, addr, size, reserved)

    def _lend(self, region: _Region, addr: int, size: int, reserved: int) -> BufferLease:
        self._reserved += reserved
        return BufferLease(self, region, addr, size, reserved)

    def _give_back(self, region: _Region, addr: int, reserved: int) -> None:
        with self._cond:
            self._return_pending()
            region.give(addr, reserved)
            self._reserved -= reserved
            self._cond.notify_all()

    def _dropped(self, region: _Region, addr: int, reserved: int) -> None:
        """A lease was collected: give it back now if the lock is free, else leave it to the lock's holder."""
        self._pending.append((region, addr, reserved))  # atomic; read only under the lock
        if self._lock.acquire(blocking=False):
            try:
                self._return_pending()
            finally:
                self._lock.release()

    def _return_pending(self) -> None:
        """Gives back collected leases (called with the lock held)."""
        if not self._pending:
            return
        while self._pending:
            region, addr, reserved = self._pending.pop()
            region.give(addr, reserved)
            self._reserved -= reserved
        self._cond.notify_all()


# Upstream's names for the same classes.
RegisteredBufferPool = BufferPool
RegisteredBufferLease = BufferLease
