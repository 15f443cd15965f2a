"""Where memory lives, for the Python helpers that must never let the CPU read or write GPU memory.

The native calls (``put_from``, ``get_into``, the batch forms, ``register_buffer``, the engine's transfers) take GPU
addresses as they are and move that memory through its device. The Python helpers around them (the tensor methods
in ``_tensors``, the RPC interface's ``send_tensor``, ``EngramStore.populate``) also turn tensors and addresses into
bytes themselves, so they ask here first:

- ``host_copy(t)``: a contiguous CPU tensor with ``t``'s elements; a CPU tensor as it is (copied only when not
  contiguous), any other tensor with one device-to-host copy into a fresh tensor (pinned when CUDA is available,
  so the copy is one DMA). A tensor without storage (``meta``) raises, never yields bytes.
- ``address_device(addr)``: ``"cuda:N"`` when ``addr`` is CUDA device memory, None for memory the CPU may touch
  (pageable, pinned or managed host memory, as the native ``cuda`` device classifies it).
- ``span(addr, n, device)``: a ``uint8`` tensor over ``n`` bytes at ``addr``, a CPU tensor for host memory and a
  CUDA tensor (no copy, through ``__cuda_array_interface__``) for device memory, so that copies in and out are
  torch copies that the device carries out.

CUDA is asked (``cuPointerGetAttributes``) only when the process has loaded the driver already: without
``libcuda.so.1`` in the process no CUDA memory can exist, and this module never loads the driver or initialises
CUDA itself. Other GPU runtimes (HIP, MUSA) are not asked: their addresses count as host memory here.
"""

import ctypes
import os
import threading
from typing import Any, Optional

__all__ = ["address_device", "host_copy", "host_staging", "span"]

_LIBCUDA = "libcuda.so.1"

# CUpointer_attribute values.
_ATTR_MEMORY_TYPE = 2
_ATTR_IS_MANAGED = 8
_ATTR_DEVICE_ORDINAL = 9
# CUmemorytype.
_MEMORYTYPE_DEVICE = 2
# CUresult values.
_SUCCESS = 0
_NOT_INITIALIZED = 3
_DEINITIALIZED = 4
_INVALID_CONTEXT = 201

_lock = threading.Lock()
_driver: Any = None  # the loaded libcuda once found; looked for again on every call until then


def _loaded_driver():
    """libcuda when this process has loaded it (RTLD_NOLOAD: never loads it), else None."""
    global _driver
    if _driver is not None:
        return _driver
    try:
        lib = ctypes.CDLL(_LIBCUDA, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None
    lib.cuPointerGetAttributes.restype = ctypes.c_int
    lib.cuPointerGetAttributes.argtypes = [
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_ulonglong,
    ]
    with _lock:
        _driver = lib
    return lib


def _pointer_attributes(lib, addr: int):
    """(CUresult, memory type, managed, ordinal) of `addr` in the calling thread's current context."""
    slots = (ctypes.c_uint64 * 3)()
    attrs = (ctypes.c_int * 3)(_ATTR_MEMORY_TYPE, _ATTR_IS_MANAGED, _ATTR_DEVICE_ORDINAL)
    data = (ctypes.c_void_p * 3)(*(ctypes.addressof(slots) + 8 * i for i in range(3)))
    rc = lib.cuPointerGetAttributes(3, attrs, data, ctypes.c_ulonglong(addr))
    return rc, int(slots[0]) & 0xFFFFFFFF, bool(slots[1] & 0xFF), int(slots[2]) & 0xFFFFFFFF


def _symbol(lib, *names):
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    return None


def _in_primary_contexts(lib, addr: int):
    """`_pointer_attributes` asked in each GPU's primary context that is already active (a thread without a current
    context, such as an executor thread, gets INVALID_CONTEXT otherwise). None when no active context knows it."""
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != _SUCCESS:
        return None
    push = _symbol(lib, "cuCtxPushCurrent_v2", "cuCtxPushCurrent")
    pop = _symbol(lib, "cuCtxPopCurrent_v2", "cuCtxPopCurrent")
    release = _symbol(lib, "cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease")
    if push is None or pop is None or release is None:
        return None
    for ordinal in range(count.value):
        dev, flags, active = ctypes.c_int(0), ctypes.c_uint(0), ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), ordinal) != _SUCCESS:
            continue
        if lib.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) != _SUCCESS or not active:
            continue  # an unused GPU: no memory of it exists, and retaining would create its context
        ctx = ctypes.c_void_p()
        if lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != _SUCCESS:
            continue
        try:
            if push(ctx) != _SUCCESS:
                continue
            try:
                found = _pointer_attributes(lib, addr)
            finally:
                pop(ctypes.byref(ctypes.c_void_p()))
        finally:
            release(dev)
        if found[0] == _SUCCESS and found[1] == _MEMORYTYPE_DEVICE:
            return found
    return None


def address_device(addr: int) -> Optional[str]:
    """``"cuda:N"`` when ``addr`` is CUDA device memory (not managed), else None: host memory, or an address no GPU
    runtime loaded in this process knows. Never touches the memory."""
    if not addr:
        return None
    lib = _loaded_driver()
    if lib is None:
        return None
    found = _pointer_attributes(lib, addr)
    if found[0] in (_NOT_INITIALIZED, _DEINITIALIZED):
        return None  # CUDA never initialised (or shut down): it holds no memory
    if found[0] == _INVALID_CONTEXT:
        found = _in_primary_contexts(lib, addr)
        if found is None:
            return None
    rc, memory_type, managed, ordinal = found
    if rc != _SUCCESS or memory_type != _MEMORYTYPE_DEVICE or managed:
        return None
    return f"cuda:{ordinal}"


def _torch():
    import torch  # noqa: PLC0415 (optional dependency; the callers have checked it is there)

    return torch


class _CudaSpan:
    """``n`` bytes of CUDA memory at ``addr``, described by ``__cuda_array_interface__`` (version 3) so that torch
    wraps them without a copy."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, addr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (addr, False), "version": 3}


def span(addr: int, n: int, device: Optional[str]):
    """A ``uint8`` tensor over ``[addr, addr+n)``: a CPU tensor for host memory (``device`` None), a CUDA tensor for
    ``"cuda:N"`` memory; no copy either way. The caller keeps the memory alive. ValueError for other devices."""
    torch = _torch()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=device or "cpu")
    if device is None:
        return torch.frombuffer((ctypes.c_ubyte * n).from_address(addr), dtype=torch.uint8)
    if device.startswith("cuda"):
        return torch.as_tensor(_CudaSpan(addr, n), device=device)
    raise ValueError(f"cannot address memory of device {device!r} from Python")


def host_staging(t):
    """An empty contiguous CPU tensor of ``t``'s shape and dtype to receive ``t``'s elements: pinned when ``t`` is a
    CUDA tensor and CUDA is available (the copy is then one DMA and the caching host allocator reuses it)."""
    torch = _torch()
    pin = t.device.type == "cuda" and torch.cuda.is_available()
    return torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu", pin_memory=pin)


def host_copy(t):
    """``t``'s elements in a contiguous CPU tensor: ``t`` itself when it is one, a host copy of a non-contiguous CPU
    tensor, else one device-to-host copy into ``host_staging(t)`` (a synchronous copy: the bytes are there when it
    returns). A tensor without storage raises (NotImplementedError for ``meta``)."""
    if t.device.type == "cpu":
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return t if t.is_contiguous() else t.contiguous()
    staging = host_staging(t)
    staging.copy_(t)
    return staging
