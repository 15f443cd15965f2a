"""``MooncakeConfig``: how a store client is set up, from a JSON file or ``MOONCAKE_*`` environment variables.

Field names, defaults, validation and environment variables are upstream's:

- ``protocol`` is stripped and lower-cased (``"RDMA"`` becomes ``"rdma"``); an empty or non-string protocol is a
  ValueError, and one this package does not know is passed through with a warning (the engine decides).
- ``local_hostname``, ``metadata_server`` and ``master_server_address`` must be non-empty strings; sizes must not
  be negative.
- Sizes in files and variables are ints or strings: a number (``"4096"``, ``"1e9"``, ``"1.5"``) with an optional
  unit ``b``, ``k``/``kb``, ``m``/``mb``, ``g``/``gb``, ``t``/``tb`` (binary units, case-insensitive); ours also
  reads ``kib``, ``mib``, ``gib`` and ``tib``, and a size string given to the constructor directly.
- Booleans in files and variables may be strings: ``true/1/yes/on/enable`` and ``false/0/no/off/disable``.

Environment (``load_from_env``): ``MOONCAKE_CONFIG_PATH`` names a JSON file; otherwise ``MOONCAKE_MASTER``
(required), ``MOONCAKE_LOCAL_HOSTNAME`` (``localhost``), ``MOONCAKE_TE_META_DATA_SERVER`` (``P2PHANDSHAKE``),
``MOONCAKE_GLOBAL_SEGMENT_SIZE`` (3355443200), ``MOONCAKE_LOCAL_BUFFER_SIZE`` (1073741824), ``MOONCAKE_PROTOCOL``
(``tcp``), ``MOONCAKE_DEVICE`` (empty), ``MOONCAKE_OFFLOAD_ENABLED`` (false), ``MOONCAKE_OFFLOAD_FILE_STORAGE_PATH``
(empty), ``MOONCAKE_TENANT_ID`` (``default``), ``MOONCAKE_ENABLE_CLIENT_HTTP_SERVER`` (false) and
``MOONCAKE_CLIENT_HTTP_PORT`` (9300).
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = ["MooncakeConfig", "DEFAULT_GLOBAL_SEGMENT_SIZE", "DEFAULT_LOCAL_BUFFER_SIZE", "parse_size", "logger"]

logger = logging.getLogger(__name__)

DEFAULT_GLOBAL_SEGMENT_SIZE = 3355443200  # 3.125 GiB
DEFAULT_LOCAL_BUFFER_SIZE = 1073741824  # 1 GiB

# Longest suffix first, so that "mb" is not read as "b".
_UNITS = [
    ("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("tib", 1 << 40),
    ("kb", 1 << 10), ("mb", 1 << 20), ("gb", 1 << 30), ("tb", 1 << 40),
    ("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40),
    ("b", 1),
]

# Protocols known to some Mooncake build (the engine is the authority: unknown ones only warn).
_KNOWN_PROTOCOLS = frozenset(
    "tcp rdma efa libfabric shm nvmeof nvlink musa nvlink_intra hip barex cxl ascend ub ubshmem maca "
    "sunrise_link rpc_only".split()
)
_REQUIRED = ("local_hostname", "metadata_server", "master_server_address")


def parse_size(value: Any) -> int:
    """Bytes from an int, a float or a size string (see the module doc); ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            raise ValueError("Invalid segment size: empty string")
        for suffix, unit in _UNITS:
            if text.endswith(suffix):
                number = text[: -len(suffix)].strip()
                if not number:
                    raise ValueError(f"Invalid segment size: missing number before '{suffix}'")
                return int(float(number) * unit)
        return int(float(text))
    return int(value)


def _parse_bool(value: Any) -> bool:
    """A boolean from a bool, a number, None (false) or one of the usual words; ValueError for other text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("", "false", "0", "no", "off", "disable"):
        return False
    if text in ("true", "1", "yes", "on", "enable"):
        return True
    raise ValueError(f"Invalid boolean value: {value!r}")


@dataclass
class MooncakeConfig:
    """Settings of a store client (upstream's field names and defaults)."""

    local_hostname: str
    metadata_server: str
    global_segment_size: int
    local_buffer_size: int
    protocol: str
    device_name: Optional[str]
    master_server_address: str
    enable_ssd_offload: bool = False
    ssd_offload_path: str = ""
    tenant_id: str = "default"
    enable_client_http_server: bool = False
    client_http_port: int = 9300

    def __post_init__(self) -> None:
        if not isinstance(self.protocol, str) or not self.protocol.strip():
            raise ValueError(
                f"Invalid protocol: {self.protocol!r}. Protocol must be a non-empty string, e.g. 'tcp' or 'rdma'."
            )
        self.protocol = self.protocol.strip().lower()
        if self.protocol not in _KNOWN_PROTOCOLS:
            logger.warning(
                "Unrecognised protocol %r; passing it to the engine unchanged. Known protocols: %s.",
                self.protocol,
                ", ".join(sorted(_KNOWN_PROTOCOLS)),
            )
        for name in ("global_segment_size", "local_buffer_size"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = parse_size(value)
                setattr(self, name, value)
            if value < 0:
                raise ValueError(f"Invalid {name}: {value}. Size must be non-negative.")
        for name in _REQUIRED:
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Config field {name!r} must be a non-empty string, got {value!r}.")

    @staticmethod
    def from_file(file_path: str) -> "MooncakeConfig":
        """Reads a JSON file with the field names above; ``local_hostname``, ``metadata_server`` and
        ``master_server_address`` are required."""
        with open(file_path, encoding="utf-8") as f:
            config: Dict[str, Any] = json.load(f)
        for name in _REQUIRED:
            if name not in config:
                raise ValueError(f"Missing required config field: {name}")
        offload_path = config.get("ssd_offload_path")
        tenant = config.get("tenant_id")
        return MooncakeConfig(
            local_hostname=config.get("local_hostname"),
            metadata_server=config.get("metadata_server"),
            global_segment_size=parse_size(config.get("global_segment_size", DEFAULT_GLOBAL_SEGMENT_SIZE)),
            local_buffer_size=parse_size(config.get("local_buffer_size", DEFAULT_LOCAL_BUFFER_SIZE)),
            protocol=config.get("protocol", "tcp"),
            device_name=config.get("device_name", ""),
            master_server_address=config.get("master_server_address"),
            enable_ssd_offload=_parse_bool(config.get("enable_ssd_offload", False)),
            ssd_offload_path="" if offload_path is None else str(offload_path),
            tenant_id="default" if tenant is None else str(tenant),
            enable_client_http_server=_parse_bool(config.get("enable_client_http_server", False)),
            client_http_port=int(config.get("client_http_port", 9300)),
        )

    @staticmethod
    def load_from_env() -> "MooncakeConfig":
        """From ``MOONCAKE_CONFIG_PATH``, else from the ``MOONCAKE_*`` variables (``MOONCAKE_MASTER`` required)."""
        path = os.getenv("MOONCAKE_CONFIG_PATH")
        if path is not None:
            return MooncakeConfig.from_file(path)
        master = os.getenv("MOONCAKE_MASTER")
        if not master:
            raise ValueError("Neither the environment variable 'MOONCAKE_CONFIG_PATH' nor 'MOONCAKE_MASTER' is set.")
        return MooncakeConfig(
            local_hostname=os.getenv("MOONCAKE_LOCAL_HOSTNAME", "localhost"),
            metadata_server=os.getenv("MOONCAKE_TE_META_DATA_SERVER", "P2PHANDSHAKE"),
            global_segment_size=parse_size(os.getenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", DEFAULT_GLOBAL_SEGMENT_SIZE)),
            local_buffer_size=parse_size(os.getenv("MOONCAKE_LOCAL_BUFFER_SIZE", DEFAULT_LOCAL_BUFFER_SIZE)),
            protocol=os.getenv("MOONCAKE_PROTOCOL", "tcp"),
            device_name=os.getenv("MOONCAKE_DEVICE", ""),
            master_server_address=master,
            enable_ssd_offload=_parse_bool(os.getenv("MOONCAKE_OFFLOAD_ENABLED", "false")),
            ssd_offload_path=os.getenv("MOONCAKE_OFFLOAD_FILE_STORAGE_PATH", ""),
            tenant_id=os.getenv("MOONCAKE_TENANT_ID", "default"),
            enable_client_http_server=_parse_bool(os.getenv("MOONCAKE_ENABLE_CLIENT_HTTP_SERVER", "false")),
            client_http_port=int(os.getenv("MOONCAKE_CLIENT_HTTP_PORT", 9300)),
        )

    def to_setup_dict(self) -> Dict[str, Any]:
        """The dict ``MooncakeDistributedStore.setup(config)`` takes."""
        return {
            "local_hostname": self.local_hostname,
            "metadata_server": self.metadata_server,
            "global_segment_size": self.global_segment_size,
            "local_buffer_size": self.local_buffer_size,
            "protocol": self.protocol,
            "rdma_devices": self.device_name or "",
            "master_server_addr": self.master_server_address,
        }
