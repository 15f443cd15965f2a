"""The tensor methods of ``MooncakeDistributedStore``, in upstream Mooncake's byte layout.

A tensor object in the store is a 304-byte metadata block followed by the tensor's bytes (C order, the host's byte
order). The block (all fields little-endian, no padding):

    offset  size  field
         0     4  magic 0x4D4F4F4E ("NOOM" on disk)
         4     2  version (1)
         6     2  header size (304)
         8     4  dtype code (see DTYPE_NAMES)
        12     4  ndim (0..8)
        16     4  layout kind: 0 full tensor, 1 shard of a larger tensor
        20     4  reserved flags (0)
        24     8  data offset (304)
        32     8  data bytes (object size - data offset)
        40    64  global shape: 8 x int64, -1 past ndim
       104    64  local shape (the stored part's shape): 8 x int64, -1 past ndim
       168     4  axis count (0..4)
       172     4  reserved (0)
       176   128  4 axes of 32 bytes: kind, axis index, shard rank, shard count, split dim (-1: none),
                  reserved0 (EP expert id / PP stage id), then int64 reserved1 (the local extent along split dim)

Sharded writes also keep a 96-byte manifest object (magic 0x574D414E, version 1, header size 96, dtype, ndim,
split dim, shard count, reserved, 8 x int64 global shape) under ``<key>__parallelism_manifest`` or
``<key>__writer_manifest``. The methods need PyTorch; everything else in the store works without it.

Tensors on a GPU (or any device other than the CPU) are never read or written by the CPU here: a write copies the
tensor (or each shard) once into pinned host memory (``_memory.host_copy``), and the methods that take an int address
ask where it lives (``_memory.address_device``): for CUDA memory the native ``get_into`` / ``put_from`` move the
object through the device, the metadata block comes over in one 304-byte copy, the returned tensor is a CUDA tensor
over that memory, and the fallbacks for unregistered memory copy through torch (host-to-device, device-to-host)
instead of ``memmove``.
"""

import ctypes
import logging
import mmap
import struct
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from . import _memory

_log = logging.getLogger("mooncake.store")

# Upstream's error codes, as returned by the tensor methods.
INVALID_PARAMS = -600
FILE_NOT_FOUND = -1100
OBJECT_ALREADY_EXISTS = -705

MAGIC = 0x4D4F4F4E
VERSION = 1
MAX_DIMS = 8
MAX_AXES = 4
LAYOUT_FULL = 0
LAYOUT_SHARD = 1
_META = struct.Struct("<IHHiiIIQQ8q8qII" + "6iq" * MAX_AXES)
METADATA_SIZE = _META.size  # 304
_AXIS_FIELDS = 7

MANIFEST_MAGIC = 0x574D414E
_MANIFEST = struct.Struct("<IHHiiiii4x8q")  # 4 bytes of padding before the int64 shape, as in C
MANIFEST_SIZE = _MANIFEST.size  # 96

# Dtype codes of the layout: the index in this tuple. torch dtypes not listed are refused.
DTYPE_NAMES = (
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
)

# Parallel axis kinds: the code stored in a layout axis, and the canonical order of axes in shard key names.
AXIS_KINDS = {"dp": 0, "tp": 1, "ep": 2, "pp": 3}
_AXIS_NAMES = {v: k for k, v in AXIS_KINDS.items()}
_KIND_RESERVED = 4

_READ_MODES = ("as_stored", "shard", "full")

# Objects this large are read by get_tensor into fresh huge-page memory with get_into (one copy, few page faults)
# rather than through get_buffer. Below it, get_buffer's heap memory is reused from call to call and is faster.
LARGE_OBJECT = 32 << 20


def _torch():
    try:
        import torch  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise ImportError(
            "the tensor methods of MooncakeDistributedStore need PyTorch (pip install torch); "
            "the bytes and zero-copy methods work without it"
        ) from e
    return torch


_DTYPES: Optional[Tuple[list, dict]] = None


def _dtype_tables():
    """(dtype by code, code by dtype) for the installed torch."""
    global _DTYPES
    if _DTYPES is None:
        torch = _torch()
        by_code = [getattr(torch, n, None) for n in DTYPE_NAMES]
        _DTYPES = (by_code, {d: i for i, d in enumerate(by_code) if d is not None})
    return _DTYPES


# ---- the request types ---------------------------------------------------------------------------------------


def _optional_int(value, name):
    if value is None:
        return None
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    return int(value)


def _int(value, name):
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _checked(name, check, doc):
    """A property over the slot ``_<name>`` whose setter passes each value through ``check(value, name)``."""
    slot = "_" + name
    return property(lambda self: getattr(self, slot), lambda self, value: setattr(self, slot, check(value, name)), doc=doc)


class ParallelAxis:
    """One axis of a tensor's parallel layout: ``kind`` ("tp", "dp", "ep" or "pp", any case), this writer's
    ``rank`` of ``size``, and ``split_dim`` (TP only), ``expert_id`` (EP) or ``stage_id`` (PP)."""

    __slots__ = ("_kind", "_rank", "_size", "_split_dim", "_expert_id", "_stage_id")

    def __init__(self) -> None:
        self._kind = ""
        self._rank = 0
        self._size = 1
        self._split_dim: Optional[int] = None
        self._expert_id: Optional[int] = None
        self._stage_id: Optional[int] = None

    @property
    def kind(self) -> str:
        return self._kind

    @kind.setter
    def kind(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"kind must be a str, got {type(value).__name__}")
        self._kind = value

    rank = _checked("rank", _int, "This writer's rank on the axis.")
    size = _checked("size", _int, "Ranks on the axis.")
    split_dim = _checked("split_dim", _optional_int, "Dimension a TP axis splits (None otherwise).")
    expert_id = _checked("expert_id", _optional_int, "Expert of an EP axis (None otherwise).")
    stage_id = _checked("stage_id", _optional_int, "Stage of a PP axis (None otherwise).")

    def _copy(self) -> "ParallelAxis":
        other = ParallelAxis()
        for slot in ParallelAxis.__slots__:
            setattr(other, slot, getattr(self, slot))
        return other

    def __repr__(self) -> str:
        return (
            f"ParallelAxis(kind={self._kind!r}, rank={self._rank}, size={self._size}, split_dim={self._split_dim}, "
            f"expert_id={self._expert_id}, stage_id={self._stage_id})"
        )


class TensorParallelism:
    """A tensor's parallel layout: a list of ``ParallelAxis`` (at most one per kind, at most 4). Like upstream's,
    ``axes`` holds copies: assign a whole list to change it."""

    __slots__ = ("_axes",)

    def __init__(self) -> None:
        self._axes: List[ParallelAxis] = []

    @property
    def axes(self) -> List[ParallelAxis]:
        return [a._copy() for a in self._axes]

    @axes.setter
    def axes(self, value: Sequence[ParallelAxis]) -> None:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError("axes must be a list of ParallelAxis")
        items = list(value)
        for a in items:
            if not isinstance(a, ParallelAxis):
                raise TypeError(f"axes must hold ParallelAxis objects, got {type(a).__name__}")
        self._axes = [a._copy() for a in items]

    def __repr__(self) -> str:
        return f"TensorParallelism(axes={self._axes!r})"


class ReadTarget:
    """What a parallelism-aware read returns: ``mode`` "as_stored" (the object under the key), "shard" (the shard
    that ``parallelism`` names) or "full" (the whole tensor, rebuilt from its TP shards)."""

    __slots__ = ("_mode", "_parallelism")

    def __init__(self) -> None:
        self._mode = "as_stored"
        self._parallelism: Optional[TensorParallelism] = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"mode must be a str, got {type(value).__name__}")
        if value.lower() not in _READ_MODES:
            raise RuntimeError("Unsupported ReadTarget mode")
        self._mode = value.lower()

    @property
    def parallelism(self) -> Optional[TensorParallelism]:
        return self._parallelism

    @parallelism.setter
    def parallelism(self, value: Optional[TensorParallelism]) -> None:
        if value is not None and not isinstance(value, TensorParallelism):
            raise TypeError(f"parallelism must be a TensorParallelism or None, got {type(value).__name__}")
        self._parallelism = value

    def __repr__(self) -> str:
        return f"ReadTarget(mode={self._mode!r}, parallelism={self._parallelism!r})"


# Parsed forms: an axis is (kind code, rank, size, split_dim, expert_id, stage_id), Nones where absent.
_Axis = Tuple[int, int, int, Optional[int], Optional[int], Optional[int]]


def _parse_axes(obj) -> Optional[List[_Axis]]:
    """The axes of a TensorParallelism-like object (anything with ``axes``), or None when malformed."""
    if not hasattr(obj, "axes"):
        _log.warning("TensorParallelism must provide axes")
        return None
    axes = []
    for a in obj.axes:
        if not all(hasattr(a, f) for f in ("kind", "rank", "size")):
            _log.warning("ParallelAxis must provide kind, rank, and size")
            return None
        kind = AXIS_KINDS.get(str(a.kind).lower())
        if kind is None:
            _log.warning("unsupported parallel axis kind: %s", a.kind)
            return None
        split_dim, expert_id, stage_id = (getattr(a, f, None) for f in ("split_dim", "expert_id", "stage_id"))
        axes.append(
            (
                kind,
                int(a.rank),
                int(a.size),
                None if split_dim is None else int(split_dim),
                None if expert_id is None else int(expert_id),
                None if stage_id is None else int(stage_id),
            )
        )
    return axes


def _validate_axes(axes: Optional[List[_Axis]], context: str) -> Optional[List[_Axis]]:
    """`axes` when they make a valid request (upstream's rules), else None."""
    if axes is None:
        _log.warning("%s: parallelism is required", context)
        return None
    if not axes:
        _log.warning("%s: parallelism axes cannot be empty", context)
        return None
    if len(axes) > MAX_AXES:
        _log.warning("%s: axis count exceeds max supported axes", context)
        return None
    seen = set()
    for kind, rank, size, split_dim, expert_id, stage_id in axes:
        name = _AXIS_NAMES[kind]
        if size <= 0 or rank < 0 or rank >= size:
            _log.warning("%s: invalid rank/size for axis %s", context, name)
            return None
        if kind in seen:
            _log.warning("%s: duplicate axis kinds are not supported", context)
            return None
        seen.add(kind)
        if name == "tp" and split_dim is None:
            _log.warning("%s: TP axis requires split_dim", context)
            return None
        if name in ("dp", "ep", "pp") and split_dim is not None:
            _log.warning("%s: %s axis must not provide split_dim", context, name.upper())
            return None
        if name == "ep" and expert_id is None:
            _log.warning("%s: EP axis requires expert_id", context)
            return None
        if name == "pp" and stage_id is None:
            _log.warning("%s: PP axis requires stage_id", context)
            return None
    return axes


def _tp_index(axes: Sequence[_Axis]) -> Optional[int]:
    for i, a in enumerate(axes):
        if a[0] == AXIS_KINDS["tp"]:
            return i
    return None


def _canonical(axes: Sequence[_Axis]) -> List[_Axis]:
    return sorted(axes, key=lambda a: a[0])


def _axis_suffix(axis: _Axis) -> str:
    kind, rank, size, split_dim, expert_id, stage_id = axis
    s = f"{_AXIS_NAMES[kind]}_{rank}of{size}"
    if split_dim is not None:
        s += f"_sd{split_dim}"
    if expert_id is not None:
        s += f"_eid{expert_id}"
    if stage_id is not None:
        s += f"_sid{stage_id}"
    return s


def tp_key(key: str, rank: int) -> str:
    """Where tensor-parallel shard `rank` of `key` is stored."""
    return f"{key}_tp_{rank}"


def parallelism_key(key: str, axes: Sequence[_Axis]) -> str:
    """Where the shard that `axes` names is stored: ``<key>_tp_<rank>`` for a lone TP axis, else the key with one
    ``__<kind>_<rank>of<size>[_sd<d>][_eid<e>][_sid<s>]`` suffix per axis, in the order dp, tp, ep, pp."""
    if len(axes) == 1 and axes[0][0] == AXIS_KINDS["tp"]:
        return tp_key(key, axes[0][1])
    return key + "".join("__" + _axis_suffix(a) for a in _canonical(axes))


def writer_key(key: str, rank: int, size: int, split_dim: int) -> str:
    """Where writer partition `rank` of `size` (split along `split_dim`) of `key` is stored."""
    return f"{key}__writer_{rank}of{size}_sd{split_dim}"


def _with_tp_rank(axes: Sequence[_Axis], rank: int) -> List[_Axis]:
    return [(a[0], rank, *a[2:]) if a[0] == AXIS_KINDS["tp"] else a for a in axes]


# ---- metadata ------------------------------------------------------------------------------------------------


class Metadata:
    """A decoded metadata block."""

    __slots__ = ("dtype", "layout_kind", "data_offset", "data_bytes", "global_shape", "local_shape", "axes")

    def __init__(self, dtype, layout_kind, data_offset, data_bytes, global_shape, local_shape, axes):
        self.dtype = dtype
        self.layout_kind = layout_kind
        self.data_offset = data_offset
        self.data_bytes = data_bytes
        self.global_shape = global_shape
        self.local_shape = local_shape
        self.axes = axes  # raw stored axes: (kind, index, rank, count, split_dim, reserved0, reserved1)

    def parallelism(self) -> Optional[List[_Axis]]:
        """The stored axes as request axes (canonical order), or None for a full tensor."""
        if self.layout_kind != LAYOUT_SHARD:
            return None
        out = []
        for kind, _index, rank, count, split_dim, reserved0, _reserved1 in self.axes:
            name = _AXIS_NAMES.get(kind)
            out.append(
                (
                    kind,
                    rank,
                    count,
                    split_dim if split_dim >= 0 else None,
                    reserved0 if name == "ep" else None,
                    reserved0 if name == "pp" else None,
                )
            )
        return _canonical(out)

    def tp_axis(self):
        for a in self.axes:
            if a[0] == AXIS_KINDS["tp"]:
                return a
        return None


def _shape8(shape) -> List[int]:
    return list(shape) + [-1] * (MAX_DIMS - len(shape))


def encode_metadata(
    dtype_code: int,
    global_shape: Sequence[int],
    local_shape: Sequence[int],
    data_bytes: int,
    layout_kind: int = LAYOUT_FULL,
    axes: Sequence[_Axis] = (),
) -> bytes:
    """The 304-byte block for a tensor of `dtype_code` whose stored part has `local_shape` and `data_bytes` bytes.
    `axes` (request axes, in the caller's order) describe a shard; the TP axis records the local extent."""
    fields = [MAGIC, VERSION, METADATA_SIZE, dtype_code, len(global_shape), layout_kind, 0, METADATA_SIZE, data_bytes]
    fields += _shape8(global_shape) + _shape8(local_shape) + [len(axes), 0]
    for i, (kind, rank, size, split_dim, expert_id, stage_id) in enumerate(axes):
        reserved0 = expert_id if _AXIS_NAMES[kind] == "ep" and expert_id is not None else 0
        if _AXIS_NAMES[kind] == "pp" and stage_id is not None:
            reserved0 = stage_id
        extent = local_shape[split_dim] if split_dim is not None else 0
        fields += [kind, i, rank, size, -1 if split_dim is None else split_dim, reserved0, extent]
    fields += [0] * (_AXIS_FIELDS * (MAX_AXES - len(axes)))
    return _META.pack(*fields)


def decode_metadata(block, total_len: int) -> Optional[Metadata]:
    """The metadata at the start of `block` (a buffer of at least 304 bytes) for an object of `total_len` bytes, or
    None when it is not a valid tensor object of this layout version."""
    if total_len < METADATA_SIZE or len(block) < METADATA_SIZE:
        return None
    f = _META.unpack_from(block)
    magic, version, header_size, dtype, ndim, layout_kind, _flags, data_offset, data_bytes = f[:9]
    if magic != MAGIC or version != VERSION or header_size != METADATA_SIZE:
        return None
    if not 0 <= dtype < len(DTYPE_NAMES) or not 0 <= ndim <= MAX_DIMS or layout_kind > LAYOUT_SHARD:
        return None
    axis_count = f[25]
    if axis_count > MAX_AXES:
        return None
    if data_offset < METADATA_SIZE or data_offset > total_len or data_bytes != total_len - data_offset:
        return None
    global8, local8 = f[9:17], f[17:25]
    if any(d < 0 for d in global8[:ndim]) or any(d < 0 for d in local8[:ndim]):
        return None
    if any(d != -1 for d in global8[ndim:]) or any(d != -1 for d in local8[ndim:]):
        return None
    axes = []
    for i in range(axis_count):
        a = f[27 + _AXIS_FIELDS * i : 27 + _AXIS_FIELDS * (i + 1)]
        kind, _index, rank, count, split_dim = a[:5]
        if not 0 <= kind <= _KIND_RESERVED or count <= 0 or not 0 <= rank < count or not -1 <= split_dim < ndim:
            return None
        axes.append(a)
    local = tuple(local8[:ndim])
    numel = 1
    for d in local:
        numel *= d
    by_code, _ = _dtype_tables()
    dt = by_code[dtype]
    if dt is None or numel * dt.itemsize != data_bytes:
        return None
    return Metadata(dt, layout_kind, data_offset, data_bytes, tuple(global8[:ndim]), local, axes)


def encode_manifest(dtype_code: int, global_shape: Sequence[int], split_dim: int, shard_count: int) -> bytes:
    """The 96-byte manifest of a tensor written in `shard_count` shards along `split_dim`."""
    return _MANIFEST.pack(
        MANIFEST_MAGIC, 1, MANIFEST_SIZE, dtype_code, len(global_shape), split_dim, shard_count, 0, *_shape8(global_shape)
    )


def decode_manifest(data) -> Optional[Tuple[int, Tuple[int, ...], int, int]]:
    """(dtype code, global shape, split_dim, shard_count) of a manifest, or None when it is not a valid one."""
    if data is None or len(data) < MANIFEST_SIZE:
        return None
    f = _MANIFEST.unpack_from(data)
    magic, version, size, dtype, ndim, split_dim, count = f[:7]
    if magic != MANIFEST_MAGIC or version != 1 or size != MANIFEST_SIZE or not 0 <= ndim <= MAX_DIMS:
        return None
    if count <= 0 or not 0 <= split_dim < ndim:
        return None
    shape = tuple(f[8 : 8 + ndim])
    if any(d <= 0 for d in shape):
        return None
    return dtype, shape, split_dim, count


# ---- tensors <-> bytes ---------------------------------------------------------------------------------------


class _Parts:
    """A tensor ready to write: its metadata block and a buffer over its bytes (kept alive by `owner`)."""

    __slots__ = ("header", "payload", "owner", "dtype_code", "shape")

    def __init__(self, header, payload, owner, dtype_code, shape):
        self.header = header
        self.payload = payload
        self.owner = owner
        self.dtype_code = dtype_code
        self.shape = shape


def _tensor(tensor):
    """`tensor` detached, wherever it lives (nothing is copied or read), or None when it is not a tensor."""
    torch = _torch()
    if not isinstance(tensor, torch.Tensor):
        return None
    return tensor.detach()


def _on_host(t, context: str):
    """`t`'s elements as a contiguous CPU tensor (`_memory.host_copy`: no copy for one already, one device-to-host
    copy into pinned memory for a CUDA tensor), or None (logged) when they cannot be read (a `meta` tensor, a device
    error)."""
    try:
        return _memory.host_copy(t)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        _log.warning("%s: cannot copy the %s tensor to the host: %s", context, t.device, e)
        return None


def _bytes_of(t):
    """A buffer over the bytes of contiguous CPU tensor `t` (no copy). Only host memory gets here: every other tensor
    is copied to the host first (`_on_host`)."""
    if t.device.type != "cpu":
        raise ValueError(f"_bytes_of needs a CPU tensor, got one on {t.device}")
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(_torch().uint8).numpy()


def _dtype_code(t, context: str) -> Optional[int]:
    code = _dtype_tables()[1].get(t.dtype)
    if code is None:
        _log.warning("%s: unsupported tensor dtype %s", context, t.dtype)
    return code


def _full_parts(tensor, context: str) -> Optional[_Parts]:
    """A whole tensor in the layout, or None (logged) when it cannot be stored."""
    t = _tensor(tensor)
    if t is None:
        _log.warning("%s: input is not a PyTorch tensor", context)
        return None
    code = _dtype_code(t, context)
    if code is None:
        return None
    if t.dim() > MAX_DIMS:
        _log.warning("%s: tensor has more than %d dimensions: %d", context, MAX_DIMS, t.dim())
        return None
    t = _on_host(t, context)
    if t is None:
        return None
    shape = tuple(t.shape)
    nbytes = t.numel() * t.element_size()
    return _Parts(encode_metadata(code, shape, shape, nbytes), _bytes_of(t), t, code, shape)


def _shard_parts(shard, code: int, global_shape, axes: Sequence[_Axis], context: str) -> Optional[_Parts]:
    """`shard` (any device) as a shard of a tensor of `global_shape`, with `axes` in its metadata; None (logged) when
    its elements cannot be copied to the host."""
    shard = _on_host(shard, context)
    if shard is None:
        return None
    shape = tuple(shard.shape)
    nbytes = shard.numel() * shard.element_size()
    header = encode_metadata(code, global_shape, shape, nbytes, LAYOUT_SHARD, axes)
    return _Parts(header, _bytes_of(shard), shard, code, shape)


def _uniform(shape, split_dim: int, count: int, context: str) -> bool:
    if not 0 <= split_dim < len(shape) or count <= 0:
        _log.warning("%s: invalid shard parameters", context)
        return False
    if shape[split_dim] % count != 0:
        _log.warning("%s: only uniform sharding is supported", context)
        return False
    return True


def _tensor_view(buf, offset: int, meta: Metadata, writable: bool = False):
    """The tensor `meta` describes, over `buf`'s bytes from `offset` (no copy). `buf` must have the buffer
    protocol (`writable` says it is a writable one); the tensor keeps it alive."""
    torch = _torch()
    if meta.data_bytes == 0:
        return torch.empty(meta.local_shape, dtype=meta.dtype)
    if writable:
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=meta.data_bytes, offset=offset)
    else:
        with warnings.catch_warnings():
            # A read-only source (a BufferHandle) is owned by the tensor alone, so writes through it are safe.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buf, dtype=torch.uint8, count=meta.data_bytes, offset=offset)
    return flat.view(meta.dtype).reshape(meta.local_shape)


def tensor_from_bytes(data) -> Any:
    """The tensor a stored object holds (sharing `data`'s memory), or None when `data` is not a tensor object."""
    if data is None:
        return None
    mv = memoryview(data).cast("B")
    meta = decode_metadata(mv, len(mv))
    if meta is None:
        return None
    return _tensor_view(data, meta.data_offset, meta)


def _at(addr: int, size: int):
    """A writable ctypes buffer over `size` bytes at address `addr`: host memory only (callers ask
    `_memory.address_device` first; GPU memory goes through `_memory.span`)."""
    return (ctypes.c_ubyte * size).from_address(addr)


def _addr(ptr) -> int:
    if not isinstance(ptr, int):
        raise TypeError(f"buffer_ptr must be an int address, got {type(ptr).__name__}")
    return ptr


def _size(size) -> int:
    if not isinstance(size, int):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    return size


# What a device copy or a view of device memory raises (torch's device errors are RuntimeErrors; a device this module
# cannot address gives ValueError). Caught only on the device paths: host paths behave as before.
_DEVICE_ERRORS = (RuntimeError, ValueError, NotImplementedError)


def _meta_at(addr: int, size: int, device: Optional[str] = None) -> Optional[Metadata]:
    """The metadata of a tensor object laid out at `addr` (`size` bytes), or None. `device` is where `addr` lives
    (`_memory.address_device`): None reads the block in place, a GPU's block comes over in one 304-byte copy."""
    if addr == 0 or size < METADATA_SIZE:
        return None
    if device is None:
        return decode_metadata(_at(addr, METADATA_SIZE), size)
    try:
        header = _memory.span(addr, METADATA_SIZE, device).cpu().numpy()
    except _DEVICE_ERRORS as e:
        _log.warning("cannot read the tensor metadata at %#x on %s: %s", addr, device, e)
        return None
    return decode_metadata(header, size)


def _object_at(addr: int, size: int, meta: Metadata, device: Optional[str]):
    """The tensor `meta` describes inside the object at `[addr, +size)`, over that memory (no copy): a CPU tensor for
    host memory, a tensor on `device` for GPU memory (None, logged, when that memory cannot be wrapped)."""
    if device is None:
        return _tensor_view(_at(addr, size), meta.data_offset, meta, True)
    torch = _torch()
    try:
        if meta.data_bytes == 0:
            return torch.empty(meta.local_shape, dtype=meta.dtype, device=device)
        data = _memory.span(addr + meta.data_offset, meta.data_bytes, device)
        return data.view(meta.dtype).reshape(meta.local_shape)
    except _DEVICE_ERRORS as e:
        _log.warning("cannot view the tensor at %#x on %s: %s", addr, device, e)
        return None


def _host_bytes(piece):
    """A uint8 CPU tensor over host buffer `piece` (a CPU tensor, a BufferHandle, bytes...), without a copy."""
    torch = _torch()
    if isinstance(piece, torch.Tensor):
        if piece.device.type != "cpu" or not piece.is_contiguous():
            raise ValueError("_host_bytes needs a contiguous CPU tensor")
        return piece.reshape(-1).view(torch.uint8)
    if len(memoryview(piece)) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # Read-only sources (BufferHandle, bytes) are only read from.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(piece, dtype=torch.uint8)


def _copy_in(addr: int, device: Optional[str], *pieces) -> int:
    """Writes host buffers `pieces` one after another from `addr`: a memmove into host memory, a host-to-device copy
    into GPU memory (the CPU never writes there). The bytes written."""
    at = addr
    for piece in pieces:
        src = _host_bytes(piece)
        n = src.numel()
        if n:
            if device is None:
                ctypes.memmove(at, src.data_ptr(), n)
            else:
                _memory.span(at, n, device).copy_(src)
        at += n
    return at - addr


def _staged_from(addr: int, size: int, device: str):
    """The `size` bytes at GPU address `addr`, copied once into (pinned) host memory: a uint8 CPU tensor."""
    return _memory.host_copy(_memory.span(addr, size, device))


def _keys(keys, name: str = "keys") -> List[str]:
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
        raise TypeError(f"{name} must be a list of str")
    out = list(keys)
    for k in out:
        if not isinstance(k, str):
            raise TypeError(f"{name} must be a list of str, got an item of type {type(k).__name__}")
    return out


def _key(key) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    return key


def _tensor_list(tensors) -> list:
    if not isinstance(tensors, list):
        raise TypeError(f"tensors_list must be a list, got {type(tensors).__name__}")
    return tensors


def _ints(values, name: str) -> List[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of int")
    out = list(values)
    for v in out:
        if not isinstance(v, int):
            raise TypeError(f"{name} must be a list of int, got an item of type {type(v).__name__}")
    return out


def _config_error(config) -> int:
    """INVALID_PARAMS for a ReplicateConfig upstream refuses (preferred segments not one per replica), else 0."""
    if config is None:
        return 0
    segments = getattr(config, "preferred_segments", None) or []
    if segments and len(segments) != getattr(config, "replica_num", 1):
        _log.warning("preferred segments size (%d) must match replica_num", len(segments))
        return INVALID_PARAMS
    return 0


class _WriterPartition:
    __slots__ = ("rank", "size", "split_dim")

    def __init__(self, rank, size, split_dim):
        self.rank, self.size, self.split_dim = rank, size, split_dim


def _parse_writer(obj, context: str) -> Optional[_WriterPartition]:
    if not all(hasattr(obj, f) for f in ("rank", "size", "split_dim")):
        _log.warning("%s: writer_partition must provide rank, size, and split_dim", context)
        return None
    w = _WriterPartition(int(obj.rank), int(obj.size), int(obj.split_dim))
    if w.size <= 0 or not 0 <= w.rank < w.size or w.split_dim < 0:
        _log.warning("%s: invalid writer partition", context)
        return None
    return w


# ---- the mixin -----------------------------------------------------------------------------------------------


class _TensorMethods:
    """Tensor methods of ``MooncakeDistributedStore`` (mixed into the native class). Return conventions are
    upstream's: 0 or a negative code for writes (one per key for batch calls), the tensor or None for reads."""

    if TYPE_CHECKING:
        # The native store's methods these use (the class this is mixed into provides them).
        def put(self, key: str, value: Any, config: Any = None) -> int: ...
        def upsert(self, key: str, value: Any, config: Any = None) -> int: ...
        def put_parts(self, key: str, *parts: Any, config: Any = None) -> int: ...
        def upsert_parts(self, key: str, *parts: Any, config: Any = None) -> int: ...
        def put_from(self, key: str, buffer_ptr: int, size: int, config: Any = None) -> int: ...
        def upsert_from(self, key: str, buffer_ptr: int, size: int, config: Any = None) -> int: ...
        def get_buffer(self, key: str) -> Any: ...
        def batch_get_buffer(self, keys: Sequence[str]) -> List[Any]: ...
        def get_into(self, key: str, buffer_ptr: int, size: int) -> int: ...
        def get_size(self, key: str) -> int: ...
        def register_buffer(self, buffer_ptr: int, size: Optional[int] = None) -> int: ...
        def unregister_buffer(self, buffer_ptr: int) -> int: ...

    # -- storing ---------------------------------------------------------------------------------------------

    def _write(self, key: str, parts: Optional[_Parts], config, upsert: bool) -> int:
        if parts is None:
            return INVALID_PARAMS
        write = self.upsert_parts if upsert else self.put_parts
        if config is None:
            return write(key, parts.header, parts.payload)
        return write(key, parts.header, parts.payload, config=config)

    def _write_manifest(self, key: str, manifest: bytes, config, upsert: bool) -> int:
        """Writes a layout manifest. Every rank writes the same one; finding it already stored is success."""
        write = self.upsert if upsert else self.put
        rc = write(key, manifest) if config is None else write(key, manifest, config)
        return 0 if rc == OBJECT_ALREADY_EXISTS else rc

    def _single(self, key, tensor, config, upsert: bool, context: str) -> int:
        key = _key(key)
        rc = _config_error(config)
        if rc:
            return rc
        return self._write(key, _full_parts(tensor, context), config, upsert)

    def put_tensor(self, key: str, tensor: Any) -> int:
        """Stores a tensor. A contiguous CPU tensor is written from its own memory; a CUDA (or other device) tensor is
        copied once to pinned host memory first (the CPU never reads device memory). 0 or a negative code
        (INVALID_PARAMS also when the elements cannot be read, as for a ``meta`` tensor)."""
        return self._single(key, tensor, None, False, "put_tensor")

    def pub_tensor(self, key: str, tensor: Any, config: Optional[Any] = None) -> int:
        """``put_tensor`` with a ReplicateConfig."""
        return self._single(key, tensor, config, False, "pub_tensor")

    def upsert_tensor(self, key: str, tensor: Any) -> int:
        """Stores a tensor, replacing an existing object."""
        return self._single(key, tensor, None, True, "upsert_tensor")

    def upsert_pub_tensor(self, key: str, tensor: Any, config: Optional[Any] = None) -> int:
        """``upsert_tensor`` with a ReplicateConfig."""
        return self._single(key, tensor, config, True, "upsert_pub_tensor")

    def _batch(self, keys, tensors_list, config, upsert: bool, context: str) -> List[int]:
        keys = _keys(keys)
        tensors_list = _tensor_list(tensors_list)
        if len(keys) != len(tensors_list) or not keys:
            if keys:
                _log.warning("%s: keys and tensors size mismatch", context)
            return [INVALID_PARAMS] * len(keys)
        rc = _config_error(config)
        if rc:
            return [rc] * len(keys)
        return [self._write(k, _full_parts(t, context), config, upsert) for k, t in zip(keys, tensors_list)]

    def batch_put_tensor(self, keys: Sequence[str], tensors_list: List[Any]) -> List[int]:
        """``put_tensor`` per key; one code per key (all INVALID_PARAMS when the lists differ in length)."""
        return self._batch(keys, tensors_list, None, False, "batch_put_tensor")

    def batch_pub_tensor(self, keys: Sequence[str], tensors_list: List[Any], config: Optional[Any] = None) -> List[int]:
        """``pub_tensor`` per key."""
        return self._batch(keys, tensors_list, config, False, "batch_pub_tensor")

    def batch_upsert_tensor(self, keys: Sequence[str], tensors_list: List[Any]) -> List[int]:
        """``upsert_tensor`` per key."""
        return self._batch(keys, tensors_list, None, True, "batch_upsert_tensor")

    def batch_upsert_pub_tensor(
        self, keys: Sequence[str], tensors_list: List[Any], config: Optional[Any] = None
    ) -> List[int]:
        """``upsert_pub_tensor`` per key."""
        return self._batch(keys, tensors_list, config, True, "batch_upsert_pub_tensor")

    # -- reading ---------------------------------------------------------------------------------------------

    def _load(self, key: str) -> Tuple[Any, Optional[Metadata]]:
        """(the object's buffer, its metadata); (None, None) when missing, (buffer, None) when not a tensor."""
        _torch()
        handle = self.get_buffer(key)
        if handle is None:
            return None, None
        mv = memoryview(handle)
        return handle, decode_metadata(mv, len(mv))

    def _load_large(self, key: str):
        """For an object of at least LARGE_OBJECT bytes: (buffer, metadata) read straight into fresh memory backed by
        transparent huge pages (registered for the one read); None when the object is smaller, missing, or the
        read fails (the caller then uses `_load`)."""
        n = self.get_size(key)
        if n < LARGE_OBJECT:
            return None
        try:
            mem = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError):
            return None
        if hasattr(mem, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mem.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        view = (ctypes.c_ubyte * n).from_buffer(mem)
        addr = ctypes.addressof(view)
        if self.register_buffer(addr, n) != 0:
            return None
        try:
            got = self.get_into(key, addr, n)
        finally:
            self.unregister_buffer(addr)
        if got != n:
            return None
        return view, decode_metadata(view, n)

    def get_tensor(self, key: str) -> Any:
        """The tensor stored under ``key`` (a CPU tensor that owns its memory), or None when it is missing or is not
        a tensor object of this layout."""
        key = _key(key)
        _torch()
        large = self._load_large(key)
        handle, meta = large if large is not None else self._load(key)
        if meta is None:
            return None
        return _tensor_view(handle, meta.data_offset, meta, writable=large is not None)

    def batch_get_tensor(self, keys: Sequence[str]) -> List[Any]:
        """``get_tensor`` per key (None for misses and non-tensors)."""
        keys = _keys(keys)
        _torch()
        out = []
        for handle in self.batch_get_buffer(keys):
            out.append(None if handle is None else tensor_from_bytes(handle))
        return out

    def _read_into(self, key: str, addr: int, size: int, device: Optional[str] = None):
        """Reads object `key` into `[addr, addr+size)` (GPU memory when `device` names one); its length, or None."""
        n = self.get_into(key, addr, size)  # the native call moves GPU memory through its device
        if n == INVALID_PARAMS and addr != 0 and size > 0:
            # The native call refuses memory that was never registered; upstream's TCP path copies into it anyway.
            # Here the object comes to host memory and is copied over (host-to-device for GPU memory).
            handle = self.get_buffer(key)
            if handle is None or len(handle) > size:
                return None
            return _copy_in(addr, device, handle)
        return n if n >= 0 else None

    def get_tensor_into(self, key: str, buffer_ptr: int, size: int) -> Any:
        """Reads the tensor object under ``key`` into ``[buffer_ptr, +size)`` (a registered buffer) and returns a
        tensor over that memory (its data start 304 bytes in), or None. A CUDA address gives a CUDA tensor: the
        object is moved by the device, the CPU never touches it."""
        key, addr, size = _key(key), _addr(buffer_ptr), _size(size)
        _torch()
        device = _memory.address_device(addr)
        try:
            n = self._read_into(key, addr, size, device)
            if n is None:
                return None
            meta = _meta_at(addr, n, device)
            if meta is None:
                return None
            return _object_at(addr, n, meta, device)
        except _DEVICE_ERRORS as e:
            if device is None:
                raise
            _log.warning("get_tensor_into: reading %s into %s memory failed: %s", key, device, e)
            return None

    def batch_get_tensor_into(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int]) -> List[Any]:
        """``get_tensor_into`` per key (INVALID_PARAMS per key when the three lists differ in length)."""
        keys, ptrs, lens = _keys(keys), _ints(buffer_ptrs, "buffer_ptrs"), _ints(sizes, "sizes")
        if len(ptrs) != len(keys) or len(lens) != len(keys):
            return [INVALID_PARAMS] * len(keys)
        return [self.get_tensor_into(k, p, s) for k, p, s in zip(keys, ptrs, lens)]

    # -- from registered buffers -----------------------------------------------------------------------------

    def _write_from(self, key, addr, size, config, upsert: bool, context: str) -> int:
        key, addr, size = _key(key), _addr(addr), _size(size)
        device = _memory.address_device(addr)
        if _meta_at(addr, size, device) is None:
            _log.warning("%s: invalid tensor object metadata", context)
            return INVALID_PARAMS
        rc = _config_error(config)
        if rc:
            return rc
        write = self.upsert_from if upsert else self.put_from
        rc = write(key, addr, size) if config is None else write(key, addr, size, config)
        if rc == INVALID_PARAMS:
            # Not a registered buffer: write from the memory directly, as upstream's TCP path does (GPU memory is
            # first copied once to the host).
            parts = self.upsert_parts if upsert else self.put_parts
            if device is None:
                view = _at(addr, size)
            else:
                try:
                    view = _staged_from(addr, size, device).numpy()
                except _DEVICE_ERRORS as e:
                    _log.warning("%s: cannot copy %s memory to the host: %s", context, device, e)
                    return INVALID_PARAMS
            rc = parts(key, view) if config is None else parts(key, view, config=config)
        return rc

    def put_tensor_from(self, key: str, buffer_ptr: int, size: int) -> int:
        """Stores the tensor object laid out at ``[buffer_ptr, +size)`` (metadata then data, as ``get_tensor_into``
        leaves it). INVALID_PARAMS when the bytes are not a valid tensor object."""
        return self._write_from(key, buffer_ptr, size, None, False, "put_tensor_from")

    def upsert_tensor_from(self, key: str, buffer_ptr: int, size: int) -> int:
        """``put_tensor_from``, replacing an existing object."""
        return self._write_from(key, buffer_ptr, size, None, True, "upsert_tensor_from")

    def _batch_from(self, keys, buffer_ptrs, sizes, upsert: bool, context: str) -> List[int]:
        keys, ptrs, lens = _keys(keys), _ints(buffer_ptrs, "buffer_ptrs"), _ints(sizes, "sizes")
        if not keys:
            return []
        if len(ptrs) != len(keys) or len(lens) != len(keys) or any(
            _meta_at(p, s, _memory.address_device(p)) is None for p, s in zip(ptrs, lens)
        ):
            _log.warning("%s: mismatched lists or an invalid tensor object buffer", context)
            return [INVALID_PARAMS] * len(keys)
        return [self._write_from(k, p, s, None, upsert, context) for k, p, s in zip(keys, ptrs, lens)]

    def batch_put_tensor_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int]) -> List[int]:
        """``put_tensor_from`` per key (all INVALID_PARAMS when any buffer is invalid or the lists differ)."""
        return self._batch_from(keys, buffer_ptrs, sizes, False, "batch_put_tensor_from")

    def batch_upsert_tensor_from(
        self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int]
    ) -> List[int]:
        """``upsert_tensor_from`` per key."""
        return self._batch_from(keys, buffer_ptrs, sizes, True, "batch_upsert_tensor_from")

    # -- tensor parallelism ----------------------------------------------------------------------------------

    def _tp_write(self, key, tensor, config, tp_size, split_dim, upsert, context, axes=()) -> int:
        """Splits `tensor` into `tp_size` equal shards along `split_dim` and writes every one (``<key>_tp_<r>``, or
        the parallelism key of `axes` with the TP rank set). 0 or the first failure's code."""
        t = _tensor(tensor)
        if t is None:
            _log.warning("%s: input is not a PyTorch tensor", context)
            return INVALID_PARAMS
        code = _dtype_code(t, context)
        if code is None or t.dim() > MAX_DIMS or not _uniform(t.shape, split_dim, tp_size, context):
            return INVALID_PARAMS
        step = t.shape[split_dim] // tp_size
        global_shape = tuple(t.shape)
        for rank in range(tp_size):
            # A view of the shard, on the tensor's device: `_shard_parts` copies it to the host once.
            shard = t.narrow(split_dim, rank * step, step)
            if axes:
                shard_axes = _with_tp_rank(axes, rank)
                shard_key = parallelism_key(key, shard_axes)
            else:
                shard_axes = [(AXIS_KINDS["tp"], rank, tp_size, split_dim, None, None)]
                shard_key = tp_key(key, rank)
            rc = self._write(shard_key, _shard_parts(shard, code, global_shape, shard_axes, context), config, upsert)
            if rc != 0:
                return rc
        return 0

    def put_tensor_with_tp(self, key: str, tensor: Any, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0) -> int:
        """Splits the tensor into ``tp_size`` equal shards along ``split_dim`` and stores shard ``r`` under
        ``<key>_tp_<r>``, every rank (``tp_rank`` is not used, as upstream). ``tp_size <= 1`` stores the whole
        tensor under ``key``. INVALID_PARAMS when the dimension does not split evenly."""
        key = _key(key)
        if tp_size <= 1:
            return self.put_tensor(key, tensor)
        return self._tp_write(key, tensor, None, tp_size, split_dim, False, "put_tensor_with_tp")

    def pub_tensor_with_tp(
        self,
        key: str,
        tensor: Any,
        config: Optional[Any] = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> int:
        """``put_tensor_with_tp`` with a ReplicateConfig."""
        key = _key(key)
        rc = _config_error(config)
        if rc:
            return rc
        if tp_size <= 1:
            return self._write(key, _full_parts(tensor, "pub_tensor_with_tp"), config, False)
        return self._tp_write(key, tensor, config, tp_size, split_dim, False, "pub_tensor_with_tp")

    def _batch_tp(self, base_keys, tensors_list, config, tp_size, split_dim, context) -> List[int]:
        keys = _keys(base_keys, "base_keys")
        tensors_list = _tensor_list(tensors_list)
        if len(keys) != len(tensors_list) or not keys:
            return [INVALID_PARAMS] * len(keys)
        rc = _config_error(config)
        if rc:
            return [rc] * len(keys)
        if tp_size <= 1:
            return [self._write(k, _full_parts(t, context), config, False) for k, t in zip(keys, tensors_list)]
        return [self._tp_write(k, t, config, tp_size, split_dim, False, context) for k, t in zip(keys, tensors_list)]

    def batch_put_tensor_with_tp(
        self,
        base_keys: Sequence[str],
        tensors_list: List[Any],
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> List[int]:
        """``put_tensor_with_tp`` per key."""
        return self._batch_tp(base_keys, tensors_list, None, tp_size, split_dim, "batch_put_tensor_with_tp")

    def batch_pub_tensor_with_tp(
        self,
        base_keys: Sequence[str],
        tensors_list: List[Any],
        config: Optional[Any] = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> List[int]:
        """``pub_tensor_with_tp`` per key."""
        return self._batch_tp(base_keys, tensors_list, config, tp_size, split_dim, "batch_pub_tensor_with_tp")

    def get_tensor_with_tp(self, key: str, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0) -> Any:
        """Shard ``tp_rank`` (``<key>_tp_<tp_rank>``) of a tensor stored with ``put_tensor_with_tp``, or the tensor
        under ``key`` when ``tp_size <= 1``; None when missing."""
        key = _key(key)
        return self.get_tensor(key if tp_size <= 1 else tp_key(key, tp_rank))

    def batch_get_tensor_with_tp(self, base_keys: Sequence[str], tp_rank: int = 0, tp_size: int = 1) -> List[Any]:
        """``get_tensor_with_tp`` per key."""
        keys = _keys(base_keys, "base_keys")
        return self.batch_get_tensor(keys if tp_size <= 1 else [tp_key(k, tp_rank) for k in keys])

    def get_tensor_with_tp_into(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> Any:
        """``get_tensor_with_tp`` into a registered buffer (see ``get_tensor_into``)."""
        key = _key(key)
        return self.get_tensor_into(key if tp_size <= 1 else tp_key(key, tp_rank), buffer_ptr, size)

    def batch_get_tensor_with_tp_into(
        self,
        base_keys: Sequence[str],
        buffer_ptrs: Sequence[int],
        sizes: Sequence[int],
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> List[Any]:
        """``get_tensor_with_tp_into`` per key (INVALID_PARAMS per key when the three lists differ in length)."""
        keys, ptrs, lens = _keys(base_keys, "base_keys"), _ints(buffer_ptrs, "buffer_ptrs"), _ints(sizes, "sizes")
        if len(ptrs) != len(keys) or len(lens) != len(keys):
            return [INVALID_PARAMS] * len(keys)
        return [self.get_tensor_with_tp_into(k, p, s, tp_rank, tp_size) for k, p, s in zip(keys, ptrs, lens)]

    def _tp_write_from(self, key, addr, size, tp_size, split_dim, config, upsert, context, axes=()) -> int:
        """`_tp_write` for a tensor object laid out in memory: each shard is written from ranges of it."""
        key, addr, size = _key(key), _addr(addr), _size(size)
        device = _memory.address_device(addr)
        meta = _meta_at(addr, size, device)
        if meta is None:
            _log.warning("%s: invalid tensor object metadata", context)
            return INVALID_PARAMS
        if meta.layout_kind != LAYOUT_FULL or not _uniform(meta.global_shape, split_dim, tp_size, context):
            return INVALID_PARAMS
        tensor = _object_at(addr, size, meta, device)  # on the GPU for GPU memory: each shard is staged once
        if tensor is None:
            return INVALID_PARAMS
        return self._tp_write(key, tensor, config, tp_size, split_dim, upsert, context, axes)

    def put_tensor_with_tp_from(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> int:
        """Splits the whole tensor object at ``[buffer_ptr, +size)`` into ``tp_size`` shards and stores each under
        ``<key>_tp_<r>`` (``put_tensor_from`` when ``tp_size <= 1``)."""
        if tp_size <= 1:
            return self.put_tensor_from(key, buffer_ptr, size)
        return self._tp_write_from(key, buffer_ptr, size, tp_size, split_dim, None, False, "put_tensor_with_tp_from")

    def batch_put_tensor_with_tp_from(
        self,
        base_keys: Sequence[str],
        buffer_ptrs: Sequence[int],
        sizes: Sequence[int],
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> List[int]:
        """``put_tensor_with_tp_from`` per key."""
        keys, ptrs, lens = _keys(base_keys, "base_keys"), _ints(buffer_ptrs, "buffer_ptrs"), _ints(sizes, "sizes")
        if len(ptrs) != len(keys) or len(lens) != len(keys):
            return [INVALID_PARAMS] * len(keys)
        return [self.put_tensor_with_tp_from(k, p, s, tp_rank, tp_size, split_dim) for k, p, s in zip(keys, ptrs, lens)]

    # -- general parallel layouts ----------------------------------------------------------------------------

    def _parallel_write(self, key, tensor, parallelism, config, writer_partition, upsert, context) -> int:
        """One tensor written as `parallelism` or `writer_partition` asks (see ``put_tensor_with_parallelism``)."""
        key = _key(key)
        rc = _config_error(config)
        if rc:
            return rc
        if writer_partition is not None:
            if parallelism is not None:
                _log.warning("%s: writer_partition cannot be combined with parallelism", context)
                return INVALID_PARAMS
            w = _parse_writer(writer_partition, context)
            if w is None:
                return INVALID_PARAMS
            return self._writer_write(key, tensor, w, config, upsert, context)
        if parallelism is None:
            return self._write(key, _full_parts(tensor, context), config, upsert)
        axes = _validate_axes(_parse_axes(parallelism), context)
        if axes is None:
            return INVALID_PARAMS
        t = _tensor(tensor)
        if t is None:
            _log.warning("%s: input is not a PyTorch tensor", context)
            return INVALID_PARAMS
        code = _dtype_code(t, context)
        if code is None or t.dim() > MAX_DIMS:
            return INVALID_PARAMS
        local = tuple(t.shape)
        tp = _tp_index(axes)
        if tp is None:
            # DP, EP, PP only: the tensor is stored as given, its metadata naming the axes.
            return self._write(parallelism_key(key, axes), _shard_parts(t, code, local, axes, context), config, upsert)
        _kind, rank, size, tp_split, _e, _s = axes[tp]
        split_dim = tp_split if tp_split is not None else -1  # validated: a TP axis has one
        if not 0 <= split_dim < len(local):
            _log.warning("%s: invalid parallelism split_dim", context)
            return INVALID_PARAMS
        if len(axes) == 1:
            # A lone TP axis: the tensor is this rank's shard of a tensor `size` times as long along split_dim.
            global_shape = tuple(d * size if i == split_dim else d for i, d in enumerate(local))
            shard = t
        else:
            # TP with other axes: the tensor is the whole tensor (of this DP/EP/PP part); this rank's slice is kept.
            if not _uniform(local, split_dim, size, context):
                return INVALID_PARAMS
            global_shape = local
            step = local[split_dim] // size
            shard = t.narrow(split_dim, rank * step, step)
        parts = _shard_parts(shard, code, global_shape, axes, context)
        rc = self._write(parallelism_key(key, axes), parts, config, upsert)
        if rc != 0:
            return rc
        manifest = encode_manifest(code, global_shape, split_dim, size)
        return self._write_manifest(f"{key}__parallelism_manifest", manifest, config, upsert)

    def _writer_write(self, key, tensor, w: _WriterPartition, config, upsert, context) -> int:
        """Writer partition `w` of a whole tensor: its slice under the writer key, then the writer manifest."""
        t = _tensor(tensor)
        if t is None:
            _log.warning("%s: input is not a PyTorch tensor", context)
            return INVALID_PARAMS
        code = _dtype_code(t, context)
        if code is None or t.dim() > MAX_DIMS or not _uniform(t.shape, w.split_dim, w.size, context):
            return INVALID_PARAMS
        step = t.shape[w.split_dim] // w.size
        shard = t.narrow(w.split_dim, w.rank * step, step)
        axes = [(AXIS_KINDS["tp"], w.rank, w.size, w.split_dim, None, None)]
        parts = _shard_parts(shard, code, tuple(t.shape), axes, context)
        rc = self._write(writer_key(key, w.rank, w.size, w.split_dim), parts, config, upsert)
        if rc != 0:
            return rc
        manifest = encode_manifest(code, tuple(t.shape), w.split_dim, w.size)
        return self._write_manifest(f"{key}__writer_manifest", manifest, config, upsert)

    def put_tensor_with_parallelism(
        self,
        key: str,
        tensor: Any,
        parallelism: Optional[TensorParallelism] = None,
        config: Optional[Any] = None,
        writer_partition: Optional[Any] = None,
    ) -> int:
        """Stores a tensor as part of a parallel layout.

        With neither request: ``put_tensor``. With ``parallelism`` holding a TP axis: ``tensor`` is this rank's
        shard; it goes under ``<key>_tp_<rank>`` (a lone TP axis) or the parallelism key, with the global shape
        (shard extent x TP size along ``split_dim``) in its metadata, and ``<key>__parallelism_manifest`` records the
        layout. With DP/EP/PP axes only: the tensor goes under the parallelism key as it is. With
        ``writer_partition`` (an object with ``rank``, ``size`` and ``split_dim``): ``tensor`` is the whole tensor;
        this writer's equal slice goes under ``<key>__writer_<rank>of<size>_sd<split_dim>`` and
        ``<key>__writer_manifest`` records the layout. 0 or a negative code (INVALID_PARAMS for a bad request)."""
        return self._parallel_write(key, tensor, parallelism, config, writer_partition, False, "put_tensor_with_parallelism")

    def upsert_tensor_with_parallelism(
        self,
        key: str,
        tensor: Any,
        parallelism: Optional[TensorParallelism] = None,
        config: Optional[Any] = None,
        writer_partition: Optional[Any] = None,
    ) -> int:
        """``put_tensor_with_parallelism``, replacing existing objects."""
        return self._parallel_write(
            key, tensor, parallelism, config, writer_partition, True, "upsert_tensor_with_parallelism"
        )

    def _batch_parallel(self, keys, values, parallelisms, config, writer_partitions, one, context) -> List[int]:
        n = len(keys)
        if parallelisms is not None and writer_partitions is not None:
            _log.warning("%s: writer_partitions cannot be combined with parallelisms", context)
            return [INVALID_PARAMS] * n
        if len(values) != n:
            _log.warning("%s: values and keys must have the same length", context)
            return [INVALID_PARAMS] * n
        requests = parallelisms if parallelisms is not None else writer_partitions
        if requests is None:
            return [one(i, None, None) for i in range(n)]
        if not isinstance(requests, list) or len(requests) != n:
            _log.warning("%s: keys and requests must have the same length (lists)", context)
            return [INVALID_PARAMS] * n
        if parallelisms is not None:
            return [one(i, requests[i], None) for i in range(n)]
        return [one(i, None, requests[i]) for i in range(n)]

    def batch_put_tensor_with_parallelism(
        self,
        keys: Sequence[str],
        tensors_list: List[Any],
        parallelisms: Optional[List[Optional[TensorParallelism]]] = None,
        config: Optional[Any] = None,
        writer_partitions: Optional[List[Any]] = None,
    ) -> List[int]:
        """``put_tensor_with_parallelism`` per key (``parallelisms`` or ``writer_partitions``: one per key)."""
        keys, tensors_list = _keys(keys), _tensor_list(tensors_list)
        return self._batch_parallel(
            keys,
            tensors_list,
            parallelisms,
            config,
            writer_partitions,
            lambda i, p, w: self.put_tensor_with_parallelism(keys[i], tensors_list[i], p, config, w),
            "batch_put_tensor_with_parallelism",
        )

    def batch_upsert_tensor_with_parallelism(
        self,
        keys: Sequence[str],
        tensors_list: List[Any],
        parallelisms: Optional[List[Optional[TensorParallelism]]] = None,
        config: Optional[Any] = None,
        writer_partitions: Optional[List[Any]] = None,
    ) -> List[int]:
        """``upsert_tensor_with_parallelism`` per key."""
        keys, tensors_list = _keys(keys), _tensor_list(tensors_list)
        return self._batch_parallel(
            keys,
            tensors_list,
            parallelisms,
            config,
            writer_partitions,
            lambda i, p, w: self.upsert_tensor_with_parallelism(keys[i], tensors_list[i], p, config, w),
            "batch_upsert_tensor_with_parallelism",
        )

    def _parallel_write_from(self, key, addr, size, parallelism, config, writer_partition, upsert, context) -> int:
        key, addr, size = _key(key), _addr(addr), _size(size)
        if parallelism is None and writer_partition is None:
            return self._write_from(key, addr, size, config, upsert, context)
        device = _memory.address_device(addr)
        meta = _meta_at(addr, size, device)
        if meta is None:
            _log.warning("%s: invalid tensor object metadata", context)
            return INVALID_PARAMS
        tensor = _object_at(addr, size, meta, device)
        if tensor is None:
            return INVALID_PARAMS
        if parallelism is not None and writer_partition is None:
            axes = _validate_axes(_parse_axes(parallelism), context)
            if axes is None:
                return INVALID_PARAMS
            tp = _tp_index(axes)
            if tp is not None:
                # From a buffer, the object is the whole tensor: every TP shard is written (no manifest).
                rc = _config_error(config)
                if rc:
                    return rc
                split_dim = axes[tp][3]
                layout = () if len(axes) == 1 else axes
                return self._tp_write(key, tensor, config, axes[tp][2], split_dim, upsert, context, layout)
        return self._parallel_write(key, tensor, parallelism, config, writer_partition, upsert, context)

    def put_tensor_with_parallelism_from(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        parallelism: Optional[TensorParallelism] = None,
        config: Optional[Any] = None,
        writer_partition: Optional[Any] = None,
    ) -> int:
        """``put_tensor_with_parallelism`` for the tensor object at ``[buffer_ptr, +size)``."""
        return self._parallel_write_from(
            key, buffer_ptr, size, parallelism, config, writer_partition, False, "put_tensor_with_parallelism_from"
        )

    def upsert_tensor_with_parallelism_from(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        parallelism: Optional[TensorParallelism] = None,
        config: Optional[Any] = None,
        writer_partition: Optional[Any] = None,
    ) -> int:
        """``upsert_tensor_with_parallelism`` for the tensor object at ``[buffer_ptr, +size)``."""
        return self._parallel_write_from(
            key, buffer_ptr, size, parallelism, config, writer_partition, True, "upsert_tensor_with_parallelism_from"
        )

    def _batch_parallel_from(self, keys, ptrs, sizes, parallelisms, config, writer_partitions, upsert, context):
        keys, ptrs, lens = _keys(keys), _ints(ptrs, "buffer_ptrs"), _ints(sizes, "sizes")
        if len(lens) != len(keys):
            return [INVALID_PARAMS] * len(keys)
        return self._batch_parallel(
            keys,
            ptrs,
            parallelisms,
            config,
            writer_partitions,
            lambda i, p, w: self._parallel_write_from(keys[i], ptrs[i], lens[i], p, config, w, upsert, context),
            context,
        )

    def batch_put_tensor_with_parallelism_from(
        self,
        keys: Sequence[str],
        buffer_ptrs: Sequence[int],
        sizes: Sequence[int],
        parallelisms: Optional[List[Optional[TensorParallelism]]] = None,
        config: Optional[Any] = None,
        writer_partitions: Optional[List[Any]] = None,
    ) -> List[int]:
        """``put_tensor_with_parallelism_from`` per key."""
        return self._batch_parallel_from(
            keys, buffer_ptrs, sizes, parallelisms, config, writer_partitions, False,
            "batch_put_tensor_with_parallelism_from",
        )  # fmt: skip

    def batch_upsert_tensor_with_parallelism_from(
        self,
        keys: Sequence[str],
        buffer_ptrs: Sequence[int],
        sizes: Sequence[int],
        parallelisms: Optional[List[Optional[TensorParallelism]]] = None,
        config: Optional[Any] = None,
        writer_partitions: Optional[List[Any]] = None,
    ) -> List[int]:
        """``upsert_tensor_with_parallelism_from`` per key."""
        return self._batch_parallel_from(
            keys, buffer_ptrs, sizes, parallelisms, config, writer_partitions, True,
            "batch_upsert_tensor_with_parallelism_from",
        )  # fmt: skip

    # -- parallel reads --------------------------------------------------------------------------------------

    def _resolve_shard(self, key: str, axes: List[_Axis]):
        """(handle, metadata) of the shard `axes` names: its parallelism key, or for a lone TP axis the matching
        writer partition; None when neither holds a matching shard."""
        want = _canonical(axes)
        handle, meta = self._load(parallelism_key(key, axes))
        if meta is not None and meta.parallelism() == want:
            return handle, meta
        if len(axes) == 1 and axes[0][0] == AXIS_KINDS["tp"]:
            _k, rank, size, split_dim, _e, _s = axes[0]
            handle, meta = self._load(writer_key(key, rank, size, split_dim or 0))
            if meta is not None and meta.parallelism() == want:
                return handle, meta
        return None

    def _assemble(self, sources, global_shape, split_dim: int):
        """The whole tensor from shard tensors `sources` (in rank order) along `split_dim`, or None."""
        torch = _torch()
        if not sources or not 0 <= split_dim < len(global_shape):
            return None
        for s in sources:
            if s.dim() != len(global_shape) or any(
                d != g for i, (d, g) in enumerate(zip(s.shape, global_shape)) if i != split_dim
            ):
                return None
        if sum(s.shape[split_dim] for s in sources) != global_shape[split_dim]:
            return None
        return torch.cat(sources, dim=split_dim)

    def _full_from_tp(self, key: str, axes: List[_Axis]):
        """The whole tensor rebuilt from every TP rank's shard of the layout `axes` names, or None."""
        tp = _tp_index(axes)
        if tp is None:
            _log.warning("full reconstruction requires a TP axis")
            return None
        want = axes[tp]
        sources, global_shape, split_dim = [], None, None
        for rank in range(want[2]):
            shard_axes = _with_tp_rank(axes, rank)
            handle, meta = self._load(parallelism_key(key, shard_axes))
            stored = meta.tp_axis() if meta is not None else None
            if meta is None or meta.layout_kind != LAYOUT_SHARD or stored is None:
                _log.warning("no shard matched requested layout for TP rank %d", rank)
                return None
            got = meta.parallelism()
            if stored[2] != rank or stored[3] != want[2] or got is None or len(got) != len(axes):
                return None
            # Every axis but the TP rank must match the request.
            if _canonical(_with_tp_rank(axes, 0)) != _canonical(_with_tp_rank(got, 0)):
                return None
            if global_shape is None:
                global_shape, split_dim = meta.global_shape, stored[4]
            sources.append(_tensor_view(handle, meta.data_offset, meta))
        if split_dim is None or (want[3] is not None and want[3] != split_dim):
            _log.warning("split_dim mismatch")
            return None
        return self._assemble(sources, global_shape, split_dim)

    def _full_from_writers(self, key: str):
        """The whole tensor rebuilt from writer partitions (per ``<key>__writer_manifest``), or None."""
        manifest = decode_manifest(self.get_buffer(f"{key}__writer_manifest"))
        if manifest is None:
            return None
        _dtype, global_shape, split_dim, count = manifest
        sources = []
        for rank in range(count):
            handle, meta = self._load(writer_key(key, rank, count, split_dim))
            got = meta.parallelism() if meta is not None else None
            if meta is None or got is None or len(got) != 1 or got[0][:4] != (AXIS_KINDS["tp"], rank, count, split_dim):
                return None
            sources.append(_tensor_view(handle, meta.data_offset, meta))
        return self._assemble(sources, global_shape, split_dim)

    def _read_target(self, key: str, target):
        """The tensor a ReadTarget asks for (see ``get_tensor_with_parallelism``)."""
        if target is None:
            return self.get_tensor(key)
        if not hasattr(target, "mode") or not hasattr(target, "parallelism"):
            _log.warning("ReadTarget must provide mode and parallelism")
            return None
        mode = str(target.mode).lower()
        if mode not in _READ_MODES:
            _log.warning("unsupported ReadTarget mode: %s", target.mode)
            return None
        parallelism = target.parallelism
        if mode == "as_stored" and parallelism is None:
            return self.get_tensor(key)
        if mode == "full" and parallelism is None:
            full = self._full_from_writers(key)
            return full if full is not None else self.get_tensor(key)
        axes = _validate_axes(_parse_axes(parallelism), f"ReadTarget(mode={mode})")
        if axes is None:
            return None
        if mode == "shard":
            found = self._resolve_shard(key, axes)
            if found is None:
                _log.warning("parallelism metadata mismatch for key %s", key)
                return None
            handle, meta = found
            return _tensor_view(handle, meta.data_offset, meta)
        if mode == "full":
            return self._full_from_tp(key, axes)
        _log.warning("unsupported ReadTarget mode")
        return None

    def get_tensor_with_parallelism(self, key: str, target: Optional[ReadTarget] = None) -> Any:
        """Reads a tensor of a parallel layout. ``target`` None (or mode "as_stored" without parallelism): the
        tensor under ``key``. Mode "shard": the shard its parallelism names (also found among writer partitions
        for a lone TP axis). Mode "full": the whole tensor, concatenated from every TP rank's shard (with a
        parallelism) or from the writer partitions its manifest lists (without; the tensor under ``key`` when
        there is no manifest). None when missing or mismatched."""
        return self._read_target(_key(key), target)

    def batch_get_tensor_with_parallelism(
        self, keys: Sequence[str], targets: Optional[List[Optional[ReadTarget]]] = None
    ) -> List[Any]:
        """``get_tensor_with_parallelism`` per key (None per key when ``targets`` is not a list of the same
        length)."""
        keys = _keys(keys)
        if targets is None:
            return self.batch_get_tensor(keys)
        if not isinstance(targets, list) or len(targets) != len(keys):
            _log.warning("keys and targets must have the same length")
            return [None] * len(keys)
        return [self._read_target(k, t) for k, t in zip(keys, targets)]

    def _target_into(self, key: str, addr: int, size: int, target):
        if target is None or (str(getattr(target, "mode", "")).lower() == "as_stored" and target.parallelism is None):
            return self.get_tensor_into(key, addr, size)
        mode = str(getattr(target, "mode", "")).lower()
        if mode == "shard":
            axes = _validate_axes(_parse_axes(target.parallelism), "ReadTarget(mode=shard)") if hasattr(
                target, "parallelism"
            ) and target.parallelism is not None else None
            if axes is None:
                return None
            found = self._resolve_shard(key, axes)
            if found is None:
                return None
            handle, meta = found
            n = len(handle)
            if n > size or addr == 0:
                return None
            device = _memory.address_device(addr)
            try:
                _copy_in(addr, device, handle)
                return _object_at(addr, n, meta, device)
            except _DEVICE_ERRORS as e:
                if device is None:
                    raise
                _log.warning("get_tensor_with_parallelism_into: copy into %s memory failed: %s", device, e)
                return None
        full = self._read_target(key, target)
        if full is None:
            return None
        parts = _full_parts(full, "get_tensor_with_parallelism_into")
        n = METADATA_SIZE + len(memoryview(parts.payload).cast("B")) if parts is not None else 0
        if parts is None or n > size or addr == 0:
            _log.warning("buffer too small for reconstructed tensor")
            return None
        device = _memory.address_device(addr)
        try:
            _copy_in(addr, device, parts.header, parts.owner)
            meta = _meta_at(addr, n, device)
            return None if meta is None else _object_at(addr, n, meta, device)
        except _DEVICE_ERRORS as e:
            if device is None:
                raise
            _log.warning("get_tensor_with_parallelism_into: copy into %s memory failed: %s", device, e)
            return None

    def get_tensor_with_parallelism_into(
        self, key: str, buffer_ptr: int, size: int, target: Optional[ReadTarget] = None
    ) -> Any:
        """``get_tensor_with_parallelism`` into a registered buffer: the object (a full reconstruction as one full
        tensor object) is laid out at ``buffer_ptr`` and the tensor returned is over that memory; None on failure."""
        return self._target_into(_key(key), _addr(buffer_ptr), _size(size), target)

    def batch_get_tensor_with_parallelism_into(
        self,
        keys: Sequence[str],
        buffer_ptrs: Sequence[int],
        sizes: Sequence[int],
        targets: Optional[List[Optional[ReadTarget]]] = None,
    ) -> List[Any]:
        """``get_tensor_with_parallelism_into`` per key."""
        keys, ptrs, lens = _keys(keys), _ints(buffer_ptrs, "buffer_ptrs"), _ints(sizes, "sizes")
        if targets is None:
            return self.batch_get_tensor_into(keys, ptrs, lens)
        if not isinstance(targets, list) or not len(targets) == len(ptrs) == len(lens) == len(keys):
            return [None] * len(keys)
        return [self._target_into(k, p, s, t) for k, p, s, t in zip(keys, ptrs, lens, targets)]

    # -- CUDA ------------------------------------------------------------------------------------------------

    def get_tensor_into_cuda(self, key: str, tensor: Any) -> int:
        """Upstream reads into a CUDA tensor through CUDA IPC, only from a dummy client; this package has no CUDA
        IPC path, so it returns INVALID_PARAMS, as upstream does for a client set up with ``setup``."""
        _key(key)
        _log.warning("get_tensor_into_cuda: CUDA IPC tensor read requires a dummy client")
        return INVALID_PARAMS

    def batch_get_tensor_into_cuda(self, keys: Sequence[str], tensors_list: List[Any]) -> List[int]:
        """``get_tensor_into_cuda`` per key: INVALID_PARAMS each (see there)."""
        keys = _keys(keys)
        _tensor_list(tensors_list)
        _log.warning("batch_get_tensor_into_cuda: CUDA IPC tensor read requires a dummy client")
        return [INVALID_PARAMS] * len(keys)

    # -- safetensors -----------------------------------------------------------------------------------------

    def save_tensor_to_safetensor(self, key: str, file_name: Optional[str] = None) -> int:
        """Writes the tensor under ``key`` to a safetensors file (named ``file_name``, or ``key``), holding one
        entry named ``key``. 0, FILE_NOT_FOUND (-1100) when there is no tensor, INVALID_PARAMS when the file cannot
        be written (or the safetensors package is missing)."""
        key = _key(key)
        tensor = self.get_tensor(key)
        if tensor is None:
            _log.warning("failed to fetch tensor for key: %s", key)
            return FILE_NOT_FOUND
        try:
            from safetensors.torch import save_file  # noqa: PLC0415 (optional dependency)

            save_file({key: tensor.contiguous()}, key if file_name is None else str(file_name))
        except Exception as e:  # noqa: BLE001 - reported as a code, as upstream does
            _log.warning("failed to save tensor to safetensor file: %s", e)
            return INVALID_PARAMS
        return 0

    def load_tensor_from_safetensor(self, key: Optional[str] = None, file_name: Optional[str] = None) -> Any:
        """Reads a safetensors file and stores one of its tensors with ``put_tensor`` under ``key`` (default: the
        file name): the entry named ``key``, else the first entry. Returns that tensor, or None when the file
        cannot be read, is empty, or the store refuses it. ``file_name`` is required."""
        if file_name is None:
            raise TypeError("load_tensor_from_safetensor() missing required argument: 'file_name'")
        if not isinstance(file_name, str):
            raise TypeError(f"file_name must be a str, got {type(file_name).__name__}")
        try:
            from safetensors.torch import load_file  # noqa: PLC0415 (optional dependency)

            loaded: Dict[str, Any] = load_file(file_name)
        except Exception as e:  # noqa: BLE001 - reported as None, as upstream does
            _log.warning("failed to load tensor from safetensor file: %s", e)
            return None
        if not loaded:
            _log.warning("no tensors found in safetensor file: %s", file_name)
            return None
        store_key = file_name if key is None else str(key)
        entry = store_key if key is not None and store_key in loaded else next(iter(loaded))
        tensor = loaded[entry]
        rc = self.put_tensor(store_key, tensor)
        if rc != 0:
            _log.warning("failed to store tensor for key %s, rc=%d", store_key, rc)
            return None
        return tensor

