"""The transfer engine: register memory, then read and write peers' memory by segment name.

Same names, signatures and return codes as upstream's ``mooncake.engine`` (0 or a negative code; batch ids,
0 on failure). ``available_transports()`` tells which transports this build links and whether each works here.

``RpcInterface`` (alias ``CoroRPCInterface``) sends bytes and tensors to a peer's Python callback, with upstream's
calls; it is pure Python (``mooncake/_rpc.py``, docs/python-rpc.md) and speaks only to peers running this package.

``SUPPORT_*`` say, as upstream's do, whether this build carries a backend (not whether it works on this machine:
``available_transports()`` says that): ``SUPPORT_EFA`` when the ``efa`` transport is linked (``FEATURES=all``),
``SUPPORT_CUDA`` and ``SUPPORT_INTRA_NVLINK`` when the ``cuda`` device and the ``nvlink`` transport are (the default
wheel), ``SUPPORT_HIP`` and ``SUPPORT_MUSA`` with the ``rocm`` and ``musa`` features. ``SUPPORT_MNNVL`` (multi-node
NVLink) is false: fabric handles across hosts are not offered yet.
"""

from ._mooncake import InnerTransferEngine, TransferEngine, TransferNotify, TransferOpcode, _memory_devices, available_transports
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
_DEVICES = frozenset(d["name"] for d in _memory_devices())
SUPPORT_EFA = "efa" in _LINKED
SUPPORT_CUDA = "cuda" in _DEVICES
SUPPORT_HIP = "rocm" in _DEVICES and "hip" in _LINKED
SUPPORT_MUSA = "musa" in _DEVICES and "musa" in _LINKED
SUPPORT_INTRA_NVLINK = SUPPORT_CUDA and "nvlink" in _LINKED
SUPPORT_MNNVL = False
