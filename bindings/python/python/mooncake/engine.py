"""The transfer engine: register memory, then read and write peers' memory by segment name.

Same names, signatures and return codes as upstream's ``mooncake.engine`` (0 or a negative code; batch ids,
0 on failure). ``available_transports()`` tells which transports this build links and whether each works here.

``RpcInterface`` (alias ``CoroRPCInterface``) sends bytes and tensors to a peer's Python callback, with upstream's
calls; it is pure Python (``mooncake/_rpc.py``, docs/python-rpc.md) and speaks only to peers running this package.

``SUPPORT_*`` say, as upstream's do, whether this build carries a backend: ``SUPPORT_EFA`` is true when the ``efa``
transport is linked (``FEATURES=all``); the GPU ones (CUDA, HIP, MUSA, NVLink) are false until those backends exist.
"""

from ._mooncake import InnerTransferEngine, TransferEngine, TransferNotify, TransferOpcode, available_transports
from ._rpc import CoroRPCInterface, ReceivedData, ReceivedTensor, RpcInterface, create_rpc_client, create_rpc_server
from ._shared_memory import SharedSegment

__all__ = [
    "TransferEngine",
    "InnerTransferEngine",
    "TransferNotify",
    "TransferOpcode",
    "available_transports",
    "SharedSegment",
    "Read",
    "Write",
    "SUPPORT_CUDA",
    "SUPPORT_EFA",
    "SUPPORT_HIP",
    "SUPPORT_INTRA_NVLINK",
    "SUPPORT_MNNVL",
    "SUPPORT_MUSA",
    "RpcInterface",
    "CoroRPCInterface",
    "ReceivedData",
    "ReceivedTensor",
    "create_rpc_client",
    "create_rpc_server",
]

# Upstream exports the opcode's members at module level.
Read = TransferOpcode.Read
Write = TransferOpcode.Write

_LINKED = frozenset(t["name"] for t in available_transports())
SUPPORT_EFA = "efa" in _LINKED
SUPPORT_CUDA = False
SUPPORT_HIP = False
SUPPORT_MUSA = False
SUPPORT_INTRA_NVLINK = False
SUPPORT_MNNVL = False
