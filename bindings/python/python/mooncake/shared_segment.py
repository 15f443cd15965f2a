"""Host memory allocated once and mapped by every rank of a group (one writer, many readers).

With MLA attention every rank of a tensor-parallel group holds the same KV cache, so offloading it to host memory
rank by rank spends ``tp_size`` times the memory it needs. ``create_shared_segment`` allocates the pages once, in
``owner_rank``, and maps them into every rank of the group; each rank then reads the blocks as zero-copy CPU tensors.

The ranks agree on a byte layout, not on addresses: each maps the span wherever its address space has room.
Blocks are laid out in the order of their sorted names, each entry starting on a 4 KiB boundary; entry ``i`` of
every block lives in "group" ``i``, and a group holds one entry of each block, so the segment is
``group size x (largest count)`` bytes:

    group size   = sum over blocks of round_up(entry bytes, 4096)
    offset(b, i) = (sum of the rounded entry sizes of the blocks sorted before b) + i * group size

    from mooncake.shared_segment import create_shared_segment

    seg = create_shared_segment(
        "kv_offload",
        blocks={
            "k": dict(count=num_layers, shape=k_shape, dtype=torch.bfloat16),
            "v": dict(count=num_layers, shape=v_shape, dtype=torch.bfloat16),
        },
        world_size=tp_size,
        rank_id=tp_rank,
        comm_group=cpu_group,   # a gloo process group, or a vLLM GroupCoordinator (its cpu_group is used)
    )
    k_caches = seg.tensors("k")  # num_layers CPU tensors over the shared pages

This build has the POSIX shared-memory backend only (``mooncake.engine.SharedSegment``): ``mmap=False`` (platform
VMM) and ``host_register=True`` (device registration of the pages) raise ``SharedSegmentError`` as they do in
upstream's builds without those backends. The owner removes the segment's name from /dev/shm as soon as every rank
has mapped it, so nothing is left behind even if a process is killed; the memory is freed when the last rank drops
its segment and the tensors made from it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .engine import SharedSegment as _EngineSegment

__all__ = [
    "SharedSegment",
    "SharedSegmentError",
    "create_shared_segment",
    "shared_segment_supported",
]

# Every block entry starts on a boundary of this many bytes.
_BLOCK_ALIGN = 4096


class SharedSegmentError(RuntimeError):
    """A shared segment could not be created, was declared differently by the ranks, or was misused."""


@dataclass(frozen=True)
class _BlockSpec:
    count: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def create_shared_segment(
    name: str,
    blocks: Mapping[str, Mapping[str, Any]],
    world_size: int,
    rank_id: int,
    owner_rank: int = 0,
    device_id: int | None = None,
    comm_group: Any = None,
    mmap: bool = True,
    host_register: bool = False,
    *,
    tp_group: Any = None,
) -> SharedSegment:
    """Creates the segment on every rank of the group and returns this rank's handle, ready to use.

    Collective: every rank of ``comm_group`` calls it with the same ``name``, ``blocks``, ``world_size`` and
    ``owner_rank`` (``rank_id`` is the caller's rank in the group). ``blocks`` maps a block name to
    ``dict(count=..., shape=..., dtype=...)``. When ranks disagree about the declaration, or any rank fails, every
    rank raises the same ``SharedSegmentError``, naming the ranks and what they reported.

    ``comm_group`` carries the small export records between ranks: a torch process group that can move CPU tensors
    (gloo), or an object with a ``cpu_group`` attribute such as vLLM's GroupCoordinator. It may be left out only
    when ``world_size`` is 1. ``tp_group`` is an older name for it; passing both (as different objects) is an error.
    ``device_id`` defaults to the current accelerator index (0 without one); the POSIX backend does not use it.
    ``mmap=False`` and ``host_register=True`` need accelerator backends this build does not have.
    """
    group = _pick_group(comm_group, tp_group)
    if host_register and not mmap:
        raise SharedSegmentError("host_register=True needs mmap=True")
    if not shared_segment_supported(mmap=mmap, host_register=host_register):
        if not mmap:
            raise SharedSegmentError("mmap=False needs a VMM shared-segment backend, which this build lacks")
        if host_register:
            raise SharedSegmentError("host_register=True needs device registration, which this build lacks")
        raise SharedSegmentError("this host offers no POSIX shared memory (/dev/shm) for shared segments")

    ordered = sorted(blocks)
    specs = {block: _block_spec(block, blocks[block]) for block in ordered}
    offsets, group_size, total = _layout(specs, ordered)
    # The layout goes into the declared name: a rank whose blocks differ then declares a different segment, which
    # the fingerprint check of complete() reports, without shipping the whole declaration around.
    declaration = ";".join(_describe_block(block, specs[block]) for block in ordered)
    device = _default_device() if device_id is None else device_id

    segment = None
    blob = b""
    problem = ""
    try:
        segment, blob = _EngineSegment.create(
            f"{name}|{declaration}", total, world_size, rank_id, owner_rank, device, mmap, host_register
        )
    except RuntimeError as e:
        problem = str(e)
    try:
        _agree("create", problem, world_size, rank_id, group)
    except BaseException:
        _discard(segment)
        raise
    if segment is None:
        raise SharedSegmentError("the engine returned no shared segment")

    problem = ""
    try:
        try:
            blobs = [blob] if world_size == 1 else _gather_blobs(blob, world_size, group)
            segment.complete(blobs)
        except (RuntimeError, SharedSegmentError) as e:
            problem = str(e)
        _agree("complete", problem, world_size, rank_id, group)
    except BaseException:
        _discard(segment)
        raise
    # Every rank has mapped the pages once _agree returns: the owner removes the name from /dev/shm now.
    release = getattr(segment, "release_name", None)
    if release is not None:
        release()
    return SharedSegment(segment, specs, offsets, group_size, device)


class SharedSegment:
    """This rank's view of a shared segment. Keep it (or a tensor from it) alive while the memory is in use."""

    def __init__(
        self,
        segment: Any,
        specs: dict[str, _BlockSpec],
        offsets: dict[str, int],
        stride: int,
        device_id: int,
    ) -> None:
        self._segment = segment
        self._specs = specs
        self._offsets = offsets
        self._stride = stride
        self._device_id = device_id
        device_base = int(segment.device_addr())
        self._device_base = device_base or None

    def tensors(self, block: str) -> list[torch.Tensor]:
        """The ``count`` entries of ``block`` as zero-copy CPU tensors of the declared shape and dtype, in index
        order. Every rank's tensors share the same pages; each tensor keeps this segment alive."""
        spec = self._specs.get(block)
        if spec is None:
            raise SharedSegmentError(f"this shared segment has no block {block!r} (blocks: {sorted(self._specs)})")
        if self._device_base is not None:
            raise SharedSegmentError("device-mapped shared segments need an accelerator backend this build lacks")
        first = self._offsets[block]
        return [self._host_tensor(first + i * self._stride, spec) for i in range(spec.count)]

    def _host_tensor(self, offset: int, spec: _BlockSpec) -> torch.Tensor:
        view_of = getattr(self._segment, "view", None)
        if view_of is not None:
            # A memoryview keeps the mapping alive for as long as the tensor lives.
            raw = view_of(offset, spec.nbytes)
        else:
            raw = (ctypes.c_int8 * spec.nbytes).from_address(int(self._segment.base_addr()) + offset)
        tensor = torch.frombuffer(raw, dtype=spec.dtype).view(spec.shape)
        tensor._mooncake_segment = self
        return tensor

    def base_addr(self) -> int:
        """Address of the segment's first byte in this process."""
        return self._segment.base_addr()

    def total_size(self) -> int:
        """Size of the segment in bytes (group size x largest count)."""
        return self._segment.size()


def shared_segment_supported(mmap: bool = True, host_register: bool = False) -> bool:
    """Whether this build and host can create shared segments with these options."""
    return _EngineSegment.supported(mmap, host_register)


def _pick_group(comm_group: Any, tp_group: Any) -> Any:
    if tp_group is None:
        return comm_group
    if comm_group is None or comm_group is tp_group:
        return tp_group
    raise SharedSegmentError("give comm_group only: tp_group is its old name, and the two differ here")


def _block_spec(block: str, spec: Mapping[str, Any]) -> _BlockSpec:
    try:
        count = int(spec["count"])
        shape = tuple(int(dim) for dim in spec["shape"])
        dtype = spec["dtype"]
    except (KeyError, TypeError) as e:
        raise SharedSegmentError(f"block {block!r} must give count, shape and dtype") from e
    if count <= 0:
        raise SharedSegmentError(f"block {block!r}: count must be positive, got {count}")
    if len(shape) == 0 or min(shape) <= 0:
        raise SharedSegmentError(f"block {block!r}: shape must be non-empty with positive sizes, got {shape}")
    nbytes = torch.empty(0, dtype=dtype).element_size()
    for dim in shape:
        nbytes *= dim
    return _BlockSpec(count, shape, dtype, nbytes)


def _describe_block(block: str, spec: _BlockSpec) -> str:
    dims = "x".join(map(str, spec.shape))
    return f"{block}:{spec.count}:{dims}:{spec.dtype}:{spec.nbytes}"


def _round_up(n: int) -> int:
    return -(-n // _BLOCK_ALIGN) * _BLOCK_ALIGN


def _layout(specs: dict[str, _BlockSpec], ordered: Sequence[str]) -> tuple[dict[str, int], int, int]:
    """(offset of each block's entry 0, bytes of one group, total bytes)."""
    offsets: dict[str, int] = {}
    position = 0
    for block in ordered:
        offsets[block] = position
        position += _round_up(specs[block].nbytes)
    if not offsets:
        raise SharedSegmentError("a shared segment needs at least one block")
    return offsets, position, position * max(spec.count for spec in specs.values())


def _default_device() -> int:
    """Index of this process's current accelerator, 0 when there is none."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        try:
            return int(accelerator.current_device_index())
        except (RuntimeError, AttributeError):
            pass
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return int(npu.current_device())
    return 0


def _discard(segment: Any) -> None:
    """Frees a segment that will not be handed out (its name and mapping go now, not when it is collected)."""
    close = getattr(segment, "close", None)
    if segment is not None and close is not None:
        close()


def _cpu_group(group: Any) -> Any:
    """The gloo group to use: a coordinator's ``cpu_group``, else the group itself."""
    inner = getattr(group, "cpu_group", None)
    return group if inner is None else inner


def _agree(phase: str, problem: str, world_size: int, rank_id: int, group: Any) -> None:
    """Collective: raises the same SharedSegmentError on every rank when any rank reported a problem."""
    if world_size == 1:
        if problem:
            raise SharedSegmentError(problem)
        return
    if group is None:
        raise SharedSegmentError("comm_group is needed when world_size is above 1")
    reports: list[Any] = [None] * world_size
    dist.all_gather_object(reports, (rank_id, problem) if problem else None, group=_cpu_group(group))
    failed = [report for report in reports if report is not None]
    if failed:
        details = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
        raise SharedSegmentError(f"shared segment {phase} failed on {len(failed)} rank(s): {details}")


def _gather_blobs(blob: bytes, world_size: int, group: Any) -> list[bytes]:
    mine = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=_cpu_group(group))
    return [t.numpy().tobytes() for t in gathered]
