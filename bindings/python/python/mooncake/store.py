"""The distributed KV store client: ``MooncakeDistributedStore`` and its value types.

Same names, signatures and return codes as upstream's ``mooncake.store``: 0 or a negative code, one int per
key for batch calls, ``b""`` for a missing ``get``. The tensor methods (in ``_tensors``) need PyTorch and store
tensors in upstream's byte layout (a 304-byte metadata block, then the bytes), so either package reads the other's.
"""

from ._engram import EngramStore, EngramStoreConfig
from ._tensors import ParallelAxis, ReadTarget, TensorParallelism, _TensorMethods

# Upstream's store module carries the pool classes too.
from .buffer_pool import BufferLease, BufferPool, RegisteredBufferLease, RegisteredBufferPool
from ._mooncake import (
    BufferHandle,
    Descriptor,
    MemoryDescriptor,
    MooncakeDistributedStore as _NativeStore,
    MooncakeHostMemAllocator,
    ObjectDataType,
    QueryTaskResponse,
    ReplicaDescriptor,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
    TaskStatus,
    TaskType,
    bind_to_numa_node,
)

__all__ = [
    "BufferHandle",
    "BufferLease",
    "BufferPool",
    "RegisteredBufferLease",
    "RegisteredBufferPool",
    "Descriptor",
    "EngramStore",
    "EngramStoreConfig",
    "MemoryDescriptor",
    "MooncakeDistributedStore",
    "MooncakeHostMemAllocator",
    "ObjectDataType",
    "QueryTaskResponse",
    "ParallelAxis",
    "ReadTarget",
    "ReplicaDescriptor",
    "ReplicaStatus",
    "ReplicateConfig",
    "SoftPinAction",
    "TaskStatus",
    "TaskType",
    "TensorParallelism",
    "bind_to_numa_node",
]

# Upstream exports enum members at module level.
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
PENDING = TaskStatus.PENDING
PROCESSING = TaskStatus.PROCESSING
SUCCESS = TaskStatus.SUCCESS
FAILED = TaskStatus.FAILED
REPLICA_COPY = TaskType.REPLICA_COPY
REPLICA_MOVE = TaskType.REPLICA_MOVE


class MooncakeDistributedStore(_TensorMethods, _NativeStore):
    """A store client. Create it, then ``setup(...)``; ``close()`` when done."""
