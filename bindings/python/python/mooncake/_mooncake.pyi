"""Type stubs of the native extension (re-exported by mooncake.engine and mooncake.store)."""

from typing import List, Optional, TypedDict

from .engine import TransferEngine as TransferEngine
from .engine import TransferNotify as TransferNotify
from .engine import TransferOpcode as TransferOpcode
from .engine import available_transports as available_transports
from .store import BufferHandle as BufferHandle
from .store import Descriptor as Descriptor
from .store import MemoryDescriptor as MemoryDescriptor
from .store import MooncakeDistributedStore as MooncakeDistributedStore
from .store import MooncakeHostMemAllocator as MooncakeHostMemAllocator
from .store import ReplicaDescriptor as ReplicaDescriptor
from .store import ObjectDataType as ObjectDataType
from .store import ReplicaStatus as ReplicaStatus
from .store import ReplicateConfig as ReplicateConfig
from .store import SoftPinAction as SoftPinAction

__version__: str

class _MemoryDeviceInfo(TypedDict):
    name: str
    available: bool
    reason: Optional[str]

def _memory_devices() -> List[_MemoryDeviceInfo]: ...

class HttpMetadataServer:
    def __init__(self, host: str = "0.0.0.0", port: int = 8080) -> None: ...
    def start(self) -> str: ...
    def stop(self) -> None: ...
    def is_running(self) -> bool: ...
    @property
    def port(self) -> int: ...
