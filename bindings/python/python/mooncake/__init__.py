"""mooncake-rs: Mooncake's KVCache transfer engine and distributed store, implemented in Rust.

A drop-in for upstream's ``mooncake`` package: ``mooncake.engine`` (TransferEngine), ``mooncake.store``
(MooncakeDistributedStore), ``mooncake.mooncake_config`` (MooncakeConfig) and
``mooncake.http_metadata_server`` (KVBootstrapServer).
"""

from ._mooncake import __version__
from .buffer_pool import BufferPool, RegisteredBufferPool

__all__ = ["__version__", "BufferPool", "RegisteredBufferPool"]
