"""The distributed KV store client: ``MooncakeDistributedStore`` and its value types.

Same names, signatures and return codes as upstream's ``mooncake.store``: 0 or a negative code, one int per
key for batch calls, ``b""`` for a missing ``get``. The tensor methods need PyTorch and store CPU copies of
tensors in this package's own layout (a small header with dtype and shape, then the bytes), so tensors put
by upstream's wheel are not readable with ``get_tensor`` here and the other way round.
"""

import ctypes
import struct
from typing import Any, List, Optional, Sequence

# Upstream's store module carries the pool classes too.
from .buffer_pool import BufferLease, BufferPool, RegisteredBufferLease, RegisteredBufferPool
from ._mooncake import (
    BufferHandle,
    Descriptor,
    MemoryDescriptor,
    MooncakeDistributedStore as _NativeStore,
    MooncakeHostMemAllocator,
    ObjectDataType,
    ReplicaDescriptor,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
)

__all__ = [
    "BufferHandle",
    "BufferLease",
    "BufferPool",
    "RegisteredBufferLease",
    "RegisteredBufferPool",
    "Descriptor",
    "MemoryDescriptor",
    "MooncakeDistributedStore",
    "MooncakeHostMemAllocator",
    "ObjectDataType",
    "ReplicaDescriptor",
    "ReplicaStatus",
    "ReplicateConfig",
    "SoftPinAction",
]

# Upstream exports enum members at module level. PROCESSING and FAILED are left out: in upstream's module they
# are TaskStatus members (copy and move tasks), which this package does not have yet.
UNDEFINED = ReplicaStatus.UNDEFINED
INITIALIZED = ReplicaStatus.INITIALIZED
COMPLETE = ReplicaStatus.COMPLETE
REMOVED = ReplicaStatus.REMOVED
UNKNOWN = ObjectDataType.UNKNOWN
KVCACHE = ObjectDataType.KVCACHE
TENSOR = ObjectDataType.TENSOR
WEIGHT = ObjectDataType.WEIGHT
SAMPLE = ObjectDataType.SAMPLE
ACTIVATION = ObjectDataType.ACTIVATION
GRADIENT = ObjectDataType.GRADIENT
OPTIMIZER_STATE = ObjectDataType.OPTIMIZER_STATE
METADATA = ObjectDataType.METADATA
GENERAL = ObjectDataType.GENERAL

_MAGIC = b"MCT1"
_HEAD = struct.Struct("<4sHH")


def _torch():
    try:
        import torch  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise ImportError(
            "the tensor methods of MooncakeDistributedStore need PyTorch (pip install torch); "
            "the bytes and zero-copy methods work without it"
        ) from e
    return torch


def _tensor_parts(tensor: Any) -> List[Any]:
    """Header and payload (a view of the tensor's bytes) of a tensor, copied to contiguous CPU memory."""
    torch = _torch()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    dtype = str(t.dtype).removeprefix("torch.").encode()
    header = _HEAD.pack(_MAGIC, len(dtype), t.dim()) + dtype + struct.pack(f"<{t.dim()}q", *t.shape)
    nbytes = t.numel() * t.element_size()
    payload = (ctypes.c_char * nbytes).from_address(t.data_ptr()) if nbytes else b""
    # Keep `t` alive with the payload view.
    return [header, payload, t]


def _tensor_from(data: bytes) -> Any:
    """The tensor a `_tensor_parts` value describes, or None when `data` is not one."""
    torch = _torch()
    if len(data) < _HEAD.size:
        return None
    magic, dlen, ndim = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        return None
    at = _HEAD.size
    dtype = getattr(torch, data[at : at + dlen].decode(), None)
    at += dlen
    shape = struct.unpack_from(f"<{ndim}q", data, at)
    at += 8 * ndim
    if dtype is None:
        return None
    flat = torch.frombuffer(bytearray(data[at:]), dtype=torch.uint8) if len(data) > at else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _tp_key(key: str, rank: int) -> str:
    return f"{key}_tp_{rank}"


class MooncakeDistributedStore(_NativeStore):
    """A store client. Create it, then ``setup(...)``; ``close()`` when done."""

    # ---- tensors (PyTorch) -------------------------------------------------------------------

    def put_tensor(self, key: str, tensor: Any) -> int:
        """Stores a tensor (a CPU copy of it). 0 or a negative code."""
        header, payload, _keep = _tensor_parts(tensor)
        return self.put_parts(key, header, payload)

    def pub_tensor(self, key: str, tensor: Any, config: Optional[ReplicateConfig] = None) -> int:
        """``put_tensor`` with a ReplicateConfig."""
        header, payload, _keep = _tensor_parts(tensor)
        return self.put_parts(key, header, payload, config=config)

    def upsert_tensor(self, key: str, tensor: Any) -> int:
        """Stores or replaces a tensor."""
        header, payload, _keep = _tensor_parts(tensor)
        return self.upsert_parts(key, header, payload)

    def get_tensor(self, key: str) -> Any:
        """The tensor stored under ``key`` (on the CPU), or None when missing or not a tensor."""
        _torch()
        data = self.get(key)
        return _tensor_from(data) if data else None

    def batch_put_tensor(self, keys: Sequence[str], tensors_list: Sequence[Any]) -> List[int]:
        """``put_tensor`` per key."""
        if len(keys) != len(tensors_list):
            raise ValueError("keys and tensors_list must have the same length")
        return [self.put_tensor(k, t) for k, t in zip(keys, tensors_list)]

    def batch_pub_tensor(
        self, keys: Sequence[str], tensors_list: Sequence[Any], config: Optional[ReplicateConfig] = None
    ) -> List[int]:
        """``pub_tensor`` per key."""
        if len(keys) != len(tensors_list):
            raise ValueError("keys and tensors_list must have the same length")
        return [self.pub_tensor(k, t, config) for k, t in zip(keys, tensors_list)]

    def batch_get_tensor(self, keys: Sequence[str]) -> List[Any]:
        """``get_tensor`` per key (None for misses)."""
        _torch()
        return [_tensor_from(d) if d else None for d in self.get_batch(list(keys))]

    def put_tensor_with_tp(self, key: str, tensor: Any, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0) -> int:
        """Splits the tensor into ``tp_size`` shards along ``split_dim`` and stores shard ``r`` under
        ``f"{key}_tp_{r}"`` (all shards; ``tp_rank`` is accepted for upstream's signature). With
        ``tp_size == 1`` the whole tensor goes under ``key``. 0 or the first failure's code."""
        if tp_size <= 1:
            return self.put_tensor(key, tensor)
        torch = _torch()
        shards = torch.chunk(tensor, tp_size, dim=split_dim)
        if len(shards) != tp_size:
            return -600
        for r, shard in enumerate(shards):
            rc = self.put_tensor(_tp_key(key, r), shard)
            if rc != 0:
                return rc
        return 0

    def get_tensor_with_tp(self, key: str, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0) -> Any:
        """Shard ``tp_rank`` of a tensor stored with ``put_tensor_with_tp`` (the whole tensor when
        ``tp_size == 1``), or None."""
        if tp_size <= 1:
            return self.get_tensor(key)
        return self.get_tensor(_tp_key(key, tp_rank))

    def batch_put_tensor_with_tp(
        self, base_keys: Sequence[str], tensors_list: Sequence[Any], tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0
    ) -> List[int]:
        """``put_tensor_with_tp`` per key."""
        return [self.put_tensor_with_tp(k, t, tp_rank, tp_size, split_dim) for k, t in zip(base_keys, tensors_list)]

    def batch_get_tensor_with_tp(self, base_keys: Sequence[str], tp_rank: int = 0, tp_size: int = 1) -> List[Any]:
        """``get_tensor_with_tp`` per key."""
        return [self.get_tensor_with_tp(k, tp_rank, tp_size) for k in base_keys]
