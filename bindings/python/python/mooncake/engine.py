"""The transfer engine: register memory, then read and write peers' memory by segment name.

Same names, signatures and return codes as upstream's ``mooncake.engine`` (0 or a negative code; batch ids,
0 on failure). ``available_transports()`` tells which transports this build links and whether each works here.
"""

from ._mooncake import TransferEngine, TransferNotify, TransferOpcode, available_transports

__all__ = ["TransferEngine", "TransferNotify", "TransferOpcode", "available_transports"]
