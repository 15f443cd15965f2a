"""Type stubs of mooncake.store (the distributed KV store client)."""

from enum import IntEnum
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from typing_extensions import Buffer

from ._tensors import ParallelAxis as ParallelAxis
from ._tensors import ReadTarget as ReadTarget
from ._tensors import TensorParallelism as TensorParallelism
from ._tensors import _TensorMethods
from .buffer_pool import BufferLease as BufferLease
from .buffer_pool import BufferPool as BufferPool
from .buffer_pool import RegisteredBufferLease as RegisteredBufferLease
from .buffer_pool import RegisteredBufferPool as RegisteredBufferPool

Address = Union[int, Buffer]

class ReplicaStatus(IntEnum):
    UNDEFINED = 0
    INITIALIZED = 1
    PROCESSING = 2
    COMPLETE = 3
    REMOVED = 4
    FAILED = 5

class SoftPinAction(IntEnum):
    PRESERVE = 0
    ENABLE = 1
    DISABLE = 2

class ObjectDataType(IntEnum):
    UNKNOWN = 0
    KVCACHE = 1
    TENSOR = 2
    WEIGHT = 3
    SAMPLE = 4
    ACTIVATION = 5
    GRADIENT = 6
    OPTIMIZER_STATE = 7
    METADATA = 8
    GENERAL = 9

class TaskType(IntEnum):
    REPLICA_COPY = 0
    REPLICA_MOVE = 1

class TaskStatus(IntEnum):
    PENDING = 0
    PROCESSING = 1
    FAILED = 2
    SUCCESS = 3

class QueryTaskResponse:
    id: Tuple[int, int]
    type: TaskType
    status: TaskStatus
    created_at_ms_epoch: int
    last_updated_at_ms_epoch: int
    message: str
    assigned_client: Tuple[int, int]
    def __init__(self) -> None: ...

def bind_to_numa_node(node: int) -> None: ...

class EngramStoreConfig:
    embedding_dim: int
    table_vocab_sizes: List[int]
    def __init__(self) -> None: ...

class EngramStore:
    def __init__(self, layer_id: int, config: EngramStoreConfig, store: Optional[Any] = None) -> None: ...
    def get_embedding_dim(self) -> int: ...
    def get_num_heads(self) -> int: ...
    def get_table_vocab_sizes(self) -> List[int]: ...
    def get_store_keys(self) -> List[str]: ...
    def populate(self, embedding_buffers: List[Any]) -> None: ...
    def lookup(self, row_ids: Any) -> Any: ...
    def remove_from_store(self, force: bool = False) -> int: ...

PENDING: TaskStatus
PROCESSING: TaskStatus
SUCCESS: TaskStatus
FAILED: TaskStatus
REPLICA_COPY: TaskType
REPLICA_MOVE: TaskType
UNDEFINED: ReplicaStatus
INITIALIZED: ReplicaStatus
COMPLETE: ReplicaStatus
REMOVED: ReplicaStatus
UNKNOWN: ObjectDataType
KVCACHE: ObjectDataType
TENSOR: ObjectDataType
WEIGHT: ObjectDataType
SAMPLE: ObjectDataType
ACTIVATION: ObjectDataType
GRADIENT: ObjectDataType
OPTIMIZER_STATE: ObjectDataType
METADATA: ObjectDataType
GENERAL: ObjectDataType

class ReplicateConfig:
    replica_num: int
    soft_pin_action: SoftPinAction
    with_soft_pin: bool
    soft_pin_ttl_ms: Optional[int]
    with_hard_pin: bool
    preferred_segments: List[str]
    preferred_segment: str
    prefer_alloc_in_same_node: bool
    group_ids: Optional[List[str]]
    data_type: ObjectDataType
    def __init__(self) -> None: ...

class Descriptor:
    transport_endpoint: str
    buffer_address: int
    size: int

class MemoryDescriptor:
    buffer_descriptor: Descriptor

class ReplicaDescriptor:
    status: ReplicaStatus
    segment_name: str
    buffer: Descriptor
    def is_memory_replica(self) -> bool: ...
    def is_disk_replica(self) -> bool: ...
    def is_local_disk_replica(self) -> bool: ...
    def get_memory_descriptor(self) -> MemoryDescriptor: ...

class BufferHandle(Buffer):
    def ptr(self) -> int: ...
    def size(self) -> int: ...
    def len(self) -> int: ...
    def __len__(self) -> int: ...

class MooncakeHostMemAllocator:
    def __init__(self) -> None: ...
    def alloc(self, size: int) -> int: ...
    def free(self, ptr: int) -> int: ...

class MooncakeDistributedStore(_TensorMethods):
    def __init__(self) -> None: ...
    def setup(
        self,
        local_hostname: Union[str, Dict[str, Any]],
        metadata_server: Optional[str] = None,
        global_segment_size: Optional[Union[int, str]] = None,
        local_buffer_size: Optional[Union[int, str]] = None,
        protocol: str = "tcp",
        rdma_devices: str = "",
        master_server_addr: str = "127.0.0.1:50051",
        engine: Any = None,
        **kwargs: Any,
    ) -> int: ...
    def setup_dummy(self, mem_pool_size: int, local_buffer_size: int, server_address: str) -> int: ...
    def close(self) -> int: ...
    def health_check(self) -> int: ...
    def get_hostname(self) -> str: ...
    def put(self, key: str, value: Buffer, config: Optional[ReplicateConfig] = None) -> int: ...
    def put_parts(self, key: str, *parts: Buffer, config: Optional[ReplicateConfig] = None) -> int: ...
    def put_batch(
        self, keys: Sequence[str], values: Sequence[Buffer], config: Optional[ReplicateConfig] = None
    ) -> int: ...
    def upsert(self, key: str, value: Buffer, config: Optional[ReplicateConfig] = None) -> int: ...
    def upsert_parts(self, key: str, *parts: Buffer, config: Optional[ReplicateConfig] = None) -> int: ...
    def upsert_batch(
        self, keys: Sequence[str], values: Sequence[Buffer], config: Optional[ReplicateConfig] = None
    ) -> int: ...
    def get(self, key: str) -> bytes: ...
    def get_batch(self, keys: Sequence[str]) -> List[bytes]: ...
    def get_buffer(self, key: str) -> Optional[BufferHandle]: ...
    def batch_get_buffer(self, keys: Sequence[str]) -> List[Optional[BufferHandle]]: ...
    def register_buffer(self, buffer_ptr: Address, size: Optional[int] = None) -> int: ...
    def unregister_buffer(self, buffer_ptr: Address) -> int: ...
    def put_from(self, key: str, buffer_ptr: Address, size: int, config: Optional[ReplicateConfig] = None) -> int: ...
    def upsert_from(
        self, key: str, buffer_ptr: Address, size: int, config: Optional[ReplicateConfig] = None
    ) -> int: ...
    def get_into(self, key: str, buffer_ptr: Address, size: int) -> int: ...
    def batch_put_from(
        self,
        keys: Sequence[str],
        buffer_ptrs: Sequence[Address],
        sizes: Sequence[int],
        config: Optional[ReplicateConfig] = None,
    ) -> List[int]: ...
    def batch_upsert_from(
        self,
        keys: Sequence[str],
        buffer_ptrs: Sequence[Address],
        sizes: Sequence[int],
        config: Optional[ReplicateConfig] = None,
    ) -> List[int]: ...
    def batch_get_into(self, keys: Sequence[str], buffer_ptrs: Sequence[Address], sizes: Sequence[int]) -> List[int]: ...
    def batch_put_from_multi_buffers(
        self,
        keys: Sequence[str],
        all_buffer_ptrs: Sequence[Sequence[int]],
        all_sizes: Sequence[Sequence[int]],
        config: Optional[ReplicateConfig] = None,
    ) -> List[int]: ...
    def batch_get_into_multi_buffers(
        self,
        keys: Sequence[str],
        all_buffer_ptrs: Sequence[Sequence[int]],
        all_sizes: Sequence[Sequence[int]],
        prefer_alloc_in_same_node: bool = False,
    ) -> List[int]: ...
    def get_into_ranges(
        self,
        buffer_ptrs: Sequence[int],
        all_keys: Sequence[Sequence[str]],
        all_dst_offsets: Sequence[Sequence[Sequence[int]]],
        all_src_offsets: Sequence[Sequence[Sequence[int]]],
        all_sizes: Sequence[Sequence[Sequence[int]]],
    ) -> List[List[List[int]]]: ...
    def is_exist(self, key: str) -> int: ...
    def batch_is_exist(self, keys: Sequence[str]) -> List[int]: ...
    def get_size(self, key: str) -> int: ...
    def batch_get_size(self, keys: Sequence[str]) -> List[int]: ...
    def get_replica_desc(self, key: str) -> List[ReplicaDescriptor]: ...
    def batch_get_replica_desc(self, keys: Sequence[str]) -> Dict[str, List[ReplicaDescriptor]]: ...
    def remove(self, key: str, force: bool = False) -> int: ...
    def remove_by_regex(self, regex_pattern: str, force: bool = False) -> int: ...
    def remove_all(self, force: bool = False) -> int: ...
    def batch_remove(self, keys: Sequence[str], force: bool = False) -> List[int]: ...
    def batch_replica_clear(self, keys: Sequence[str], segment_name: str = "") -> List[str]: ...
    # Segments mounted after setup.
    def mount_segment(
        self, path: str, size: int, offset: int = 0, protocol: str = "tcp", location: str = ""
    ) -> Dict[str, Any]: ...
    def allocate_and_mount_segment(self, size: int, protocol: str = "tcp", location: str = "") -> Dict[str, Any]: ...
    def unmount_segment(self, segment_ids: Sequence[str], grace_period_seconds: int = 0) -> int: ...
    def unmount_and_free_segment(self, segment_ids: Sequence[str], grace_period_seconds: int = 0) -> int: ...
    # Copy and move tasks.
    def create_copy_task(self, key: str, targets: Sequence[str]) -> Tuple[Tuple[int, int], int]: ...
    def create_move_task(self, key: str, source: str, target: str) -> Tuple[Tuple[int, int], int]: ...
    def query_task(self, task_id: Tuple[int, int]) -> Tuple[Optional[QueryTaskResponse], int]: ...
    # Put and get sessions.
    def batch_put_session_start(
        self, keys: Sequence[str], sizes: Sequence[int], config: Optional[ReplicateConfig] = None
    ) -> List[int]: ...
    def batch_put_session_end(self, keys: Sequence[str]) -> List[int]: ...
    def batch_put_session_revoke(self, keys: Sequence[str]) -> List[int]: ...
    def batch_get_session_start(self, keys: Sequence[str]) -> List[int]: ...
    def batch_get_session_end(self, keys: Sequence[str]) -> int: ...
    def batch_put_from_multi_buffer_ranges(
        self,
        keys: Sequence[str],
        all_buffer_ptrs: Sequence[Sequence[int]],
        all_sizes: Sequence[Sequence[int]],
        all_dst_offsets: Sequence[Sequence[int]],
    ) -> List[int]: ...
    def batch_get_into_multi_buffer_ranges(
        self,
        keys: Sequence[str],
        all_buffer_ptrs: Sequence[Sequence[int]],
        all_sizes: Sequence[Sequence[int]],
        all_src_offsets: Sequence[Sequence[int]],
    ) -> List[int]: ...
    def put_from_with_metadata(
        self,
        key: str,
        buffer_ptr: Address,
        metadata_buffer_ptr: Address,
        size: int,
        metadata_size: int,
        config: Optional[ReplicateConfig] = None,
    ) -> int: ...
    def init_all(self, arg0: str, arg1: str, arg2: int) -> int: ...
    def alloc_from_mem_pool(self, arg0: int) -> int: ...
