"""``MooncakeConfig``: how a store client is set up, from a JSON file or ``MOONCAKE_*`` environment variables.

Environment (``load_from_env``): ``MOONCAKE_CONFIG_PATH`` names a JSON file; otherwise ``MOONCAKE_MASTER``
(required), ``MOONCAKE_LOCAL_HOSTNAME`` (default ``localhost``), ``MOONCAKE_TE_META_DATA_SERVER`` (default
``P2PHANDSHAKE``), ``MOONCAKE_GLOBAL_SEGMENT_SIZE`` (default 3355443200), ``MOONCAKE_LOCAL_BUFFER_SIZE``
(default 1073741824), ``MOONCAKE_PROTOCOL`` (default ``tcp``) and ``MOONCAKE_DEVICE`` (default empty).
Sizes may be ints or strings such as ``"512MB"`` or ``"4 GiB"`` (units are binary, as upstream).
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Union

__all__ = ["MooncakeConfig", "DEFAULT_GLOBAL_SEGMENT_SIZE", "DEFAULT_LOCAL_BUFFER_SIZE", "parse_size"]

DEFAULT_GLOBAL_SEGMENT_SIZE = 3355443200
DEFAULT_LOCAL_BUFFER_SIZE = 1073741824

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: Union[int, str]) -> int:
    """Bytes from an int or a string like ``"512MB"``; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"not a size: {value!r} (examples: 4096, '512MB', '4 GiB')")


@dataclass
class MooncakeConfig:
    """Settings of a store client (field names as upstream)."""

    local_hostname: str
    metadata_server: str
    global_segment_size: int
    local_buffer_size: int
    protocol: str
    device_name: str
    master_server_address: str

    def __post_init__(self) -> None:
        self.global_segment_size = parse_size(self.global_segment_size)
        self.local_buffer_size = parse_size(self.local_buffer_size)

    @staticmethod
    def from_file(file_path: str) -> "MooncakeConfig":
        """Reads a JSON file with the field names above; ``master_server_address`` and ``metadata_server``
        are required."""
        with open(file_path, encoding="utf-8") as f:
            config: Dict[str, Any] = json.load(f)
        missing = [k for k in ("master_server_address", "metadata_server") if not config.get(k)]
        if missing:
            raise ValueError(f"{file_path}: missing required field(s): {', '.join(missing)}")
        return MooncakeConfig(
            local_hostname=config.get("local_hostname", "localhost"),
            metadata_server=config["metadata_server"],
            global_segment_size=config.get("global_segment_size", DEFAULT_GLOBAL_SEGMENT_SIZE),
            local_buffer_size=config.get("local_buffer_size", DEFAULT_LOCAL_BUFFER_SIZE),
            protocol=config.get("protocol", "tcp"),
            device_name=config.get("device_name", ""),
            master_server_address=config["master_server_address"],
        )

    @staticmethod
    def load_from_env() -> "MooncakeConfig":
        """From ``MOONCAKE_CONFIG_PATH``, else from the ``MOONCAKE_*`` variables (``MOONCAKE_MASTER``
        required)."""
        path = os.getenv("MOONCAKE_CONFIG_PATH")
        if path:
            return MooncakeConfig.from_file(path)
        master = os.getenv("MOONCAKE_MASTER")
        if not master:
            raise ValueError("Neither MOONCAKE_CONFIG_PATH nor MOONCAKE_MASTER is set")
        return MooncakeConfig(
            local_hostname=os.getenv("MOONCAKE_LOCAL_HOSTNAME", "localhost"),
            metadata_server=os.getenv("MOONCAKE_TE_META_DATA_SERVER", "P2PHANDSHAKE"),
            global_segment_size=os.getenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", DEFAULT_GLOBAL_SEGMENT_SIZE),
            local_buffer_size=os.getenv("MOONCAKE_LOCAL_BUFFER_SIZE", DEFAULT_LOCAL_BUFFER_SIZE),
            protocol=os.getenv("MOONCAKE_PROTOCOL", "tcp"),
            device_name=os.getenv("MOONCAKE_DEVICE", ""),
            master_server_address=master,
        )

    def to_setup_dict(self) -> Dict[str, Any]:
        """The dict ``MooncakeDistributedStore.setup(config)`` takes."""
        return {
            "local_hostname": self.local_hostname,
            "metadata_server": self.metadata_server,
            "global_segment_size": self.global_segment_size,
            "local_buffer_size": self.local_buffer_size,
            "protocol": self.protocol,
            "rdma_devices": self.device_name,
            "master_server_addr": self.master_server_address,
        }
