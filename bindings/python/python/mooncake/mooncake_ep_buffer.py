"""mooncake.mooncake_ep_buffer: upstream's expert-parallel ``Buffer`` (DeepEP-style low-latency dispatch and
combine with an ``active_ranks`` mask that survives a rank failing), on mooncake-rs's EP buffer.

Same names, signatures, defaults and return tuples as upstream's module. Upstream runs the buffer only on CUDA
with GPU-initiated RDMA (or NVLink) and otherwise falls back to torch.distributed all-gathers; this one runs the
dispatch/combine protocol of ``mooncake-ep`` over the transfer engine, so CPU tensors work on any machine:

    num_bytes = Buffer.get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
    buffer = Buffer(group, num_bytes)          # group: any torch.distributed group (gloo works)
    recv_x, recv_count, handle, event, hook = buffer.dispatch(x, topk_idx, active_ranks,
                                                              num_max_dispatch_tokens_per_rank, num_experts,
                                                              timeout_us, use_fp8=False)
    combined, event, hook = buffer.combine(expert_out, topk_idx, topk_weights, active_ranks, timeout_us, handle)

The group is used only to exchange each rank's buffer address at construction and in ``update_ep_member()``;
dispatch and combine do not touch it, so they keep working when a rank dies: a rank not heard from within
``timeout_us`` (or whose connection fails) is set to 0 in ``active_ranks`` and skipped from then on.

What differs from upstream (docs/python-api.md has the full list):
- each ``Buffer`` starts a transfer engine of its own (P2P handshake, ``protocol`` argument, else
  ``MC_EP_PROTOCOL``, else ``MOONCAKE_PROTOCOL``, else tcp; ``MC_FORCE_TCP=1`` forces tcp); same-host peers are
  reached over shm unless ``disable_p2p=True``. ``local_hostname`` (else ``MOONCAKE_LOCAL_HOSTNAME``, else the
  address that routes to ``MASTER_ADDR``, else 127.0.0.1) is what peers connect to; ``engine=`` reuses an
  initialized ``mooncake.engine.TransferEngine``;
- CUDA tensors are staged through host memory (the call is then synchronous); without the CUDA device linked
  they raise upstream's "not built" error;
- ``num_ep_buffer_bytes=0`` sizes the buffer at the first dispatch (a collective over ``group``, which every
  rank makes anyway); ``active_ranks=None`` or of the wrong length uses a mask the Buffer keeps (upstream: all
  ones) so that a lost rank stays masked;
- zero-copy combine (``get_next_combine_buffer`` then ``combine(..., zero_copy=True)``) works (upstream's
  current wheel raises NotImplementedError);
- bad arguments raise ``TypeError`` (dtype) or ``ValueError`` naming the argument instead of ``AssertionError``.
"""

import ctypes
import os
import socket
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import ep as _ep

__all__ = ["Buffer", "EventOverlap"]


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip()
    return value not in ("", "0") and value.lower() != "false"


def _default_hostname() -> str:
    """The address peers reach this rank's engine on."""
    host = os.environ.get("MOONCAKE_LOCAL_HOSTNAME", "").strip()
    if host:
        return host
    master = os.environ.get("MASTER_ADDR", "127.0.0.1").strip()
    if master in ("", "127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _desc(t: Any, name: str) -> tuple:
    """A tensor as the native buffer takes it: (data_ptr, shape, strides, dtype, device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."), str(t.device))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        else:
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: {value} is below {minimum}")
    return value


def _noop() -> None:
    return None


class EventOverlap:
    """
    Upstream's event wrapper. ``current_stream_wait()`` waits for the call it came from (a background call when
    ``async_finish`` or ``return_recv_hook`` was asked for; otherwise the call is already complete).

    Attributes:
        event: the event captured (a ``mooncake.ep.EventHandle``).
        extra_tensors: tensors kept alive until the event is dropped, as upstream.
    """

    def __init__(self, event: Optional["_ep.EventHandle"] = None, extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        assert self.event is not None
        self.event.current_stream_wait()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


class Buffer:
    """One rank's expert-parallel buffer; see the module documentation."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_ep_buffer_bytes: int = 0,
        disable_p2p: bool = False,
        *,
        protocol: Optional[str] = None,
        local_hostname: Optional[str] = None,
        engine: Any = None,
    ):
        self.rank = group.rank()
        self.group_size = group.size()
        self.group = group
        self.backend = group
        self.num_ep_buffer_bytes = _check_int("num_ep_buffer_bytes", num_ep_buffer_bytes, 0)
        self.disable_p2p = bool(disable_p2p)
        if _env_flag("MC_FORCE_TCP"):
            protocol = "tcp"
        self.protocol = protocol or os.environ.get("MC_EP_PROTOCOL") or os.environ.get("MOONCAKE_PROTOCOL") or "tcp"
        self.local_hostname = local_hostname or _default_hostname()
        if engine is not None and hasattr(engine, "get_engine"):
            engine = engine.get_engine()
        self._engine = engine
        # Upstream's flag; this buffer never uses the all-gather fallback.
        self._use_fallback = False
        # The mask used when the caller passes none (or one of the wrong length): a lost rank stays masked.
        self._active_ranks = torch.ones((self.group_size,), dtype=torch.int32)
        self._pending: Optional[Any] = None
        self.runtime: Optional[Any] = None
        if self.num_ep_buffer_bytes > 0:
            self._create(self.num_ep_buffer_bytes)

    # ----- set-up -----

    def _create(self, num_bytes: int) -> None:
        self.runtime = _ep.Buffer(
            self.rank,
            self.group_size,
            num_bytes,
            engine=self._engine,
            protocol=self.protocol,
            local_hostname=self.local_hostname,
            same_host_transports=not self.disable_p2p,
        )
        self.num_ep_buffer_bytes = num_bytes
        self.connect()

    def connect(self, is_update: bool = False) -> None:
        """Exchanges every rank's buffer address over the group (all_gather_object) and connects to them."""
        infos: List[Any] = [None] * self.group_size
        dist.all_gather_object(infos, self.runtime.get_local_info(), group=self.group)
        if is_update:
            self.runtime.update_ep_member(infos)
        else:
            self.runtime.connect(infos)

    def update_ep_member(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Upstream's recovery call: after a rank was replaced (it created a new ``Buffer``), every other rank
        calls this; all ranks exchange addresses again and the mask the Buffer keeps is reset to all active.
        ``group`` (ours) replaces the process group, e.g. by a new one that includes the replacement process."""
        self._finish_pending()
        if group is not None:
            if group.size() != self.group_size or group.rank() != self.rank:
                raise ValueError(
                    f"group: rank {group.rank()} of {group.size()}, this buffer is rank {self.rank} of {self.group_size}"
                )
            self.group = self.backend = group
        if self.runtime is None:
            return
        self.connect(True)
        self._active_ranks.fill_(1)

    def shutdown(self) -> None:
        """Stops this buffer's engine (ours; upstream frees its buffer when the object goes)."""
        self._finish_pending()
        if self.runtime is not None:
            self.runtime.shutdown()

    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        return _ep.get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ----- helpers -----

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def _mask(self, active_ranks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the CPU int32 mask the call updates, the caller's tensor to copy it back into or None)."""
        if active_ranks is None:
            return self._active_ranks, None
        if not isinstance(active_ranks, torch.Tensor):
            raise TypeError(f"active_ranks: expected a torch.Tensor or None, got {type(active_ranks).__name__}")
        if active_ranks.dtype != torch.int32:
            raise TypeError(f"active_ranks: dtype {active_ranks.dtype}, expected torch.int32")
        if active_ranks.dim() != 1 or not active_ranks.is_contiguous():
            raise ValueError(f"active_ranks: expected a contiguous 1-D tensor, got shape {tuple(active_ranks.shape)}")
        if active_ranks.numel() != self.group_size:
            # Upstream ignores a mask of the wrong length (its own test passes one per token).
            return self._active_ranks, None
        if active_ranks.device.type != "cpu":
            return active_ranks.cpu(), active_ranks
        return active_ranks, None

    @staticmethod
    def _staging(*tensors: Optional[torch.Tensor]) -> Optional[torch.device]:
        """The device of the first non-CPU tensor (None when all are on the CPU); raises when it cannot be staged."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                from .engine import SUPPORT_CUDA

                if t.device.type != "cuda" or not SUPPORT_CUDA:
                    raise RuntimeError(
                        f"Mooncake EP was not built with support for {t.device.type} tensors: pass CPU tensors, or "
                        "build the wheel with the cuda feature (the default)."
                    )
                return t.device
        return None

    # ----- dispatch / combine -----

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        active_ranks: Optional[torch.Tensor],
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        timeout_us: int,
        use_fp8: Optional[bool] = None,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, Tuple, EventOverlap, Callable]:
        """Sends every token of ``x`` ``[num_tokens, hidden]`` (bfloat16) to the ranks owning its ``topk_idx``
        experts (int64, -1 = masked) and returns what this rank's experts received:
        ``(packed_recv_x or (codes, scales) with use_fp8, packed_recv_count, handle, event, hook)`` with
        upstream's shapes. ``use_fp8=None`` means FP8, as upstream. ``timeout_us < 0`` waits without a limit."""
        self._finish_pending()
        if use_fp8 is None:
            use_fp8 = True
        use_fp8 = bool(use_fp8)
        n = _check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        num_experts = _check_int("num_experts", num_experts, 1)
        timeout_us = _check_int("timeout_us", timeout_us, -(1 << 62))
        device = self._staging(x, topk_idx)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"x: expected [num_tokens, hidden], got shape {tuple(x.shape)}")
        hidden = x.size(1)
        mask, mask_back = self._mask(active_ranks)
        if device is not None:
            x, topk_idx = x.cpu(), topk_idx.cpu()
        if self.runtime is None:
            self._create(Buffer.get_ep_buffer_size_hint(n, hidden, self.group_size, num_experts))

        r = self.group_size
        nl = num_experts // r
        rows = r * n
        background = device is None and (async_finish or return_recv_hook)
        recv_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
        # A synchronous call returns the rows the native buffer unpacked, without a copy; a background one
        # fills tensors allocated here (they must exist before the call completes).
        packed_recv_x = torch.empty((nl, rows, hidden), dtype=recv_dtype) if background else None
        # Upstream's scales are [L, hidden / 128, rows] transposed to [L, rows, hidden / 128].
        packed_recv_x_scales = (
            torch.empty((nl, hidden // 128, rows), dtype=torch.float32).transpose(1, 2) if use_fp8 else None
        )
        packed_recv_count = torch.empty((nl,), dtype=torch.int32)
        packed_recv_src_info = torch.empty((nl, rows), dtype=torch.int32)
        packed_recv_layout_range = torch.empty((nl, r), dtype=torch.int64)
        tensors = (x, topk_idx, mask, packed_recv_x, packed_recv_x_scales, packed_recv_count, packed_recv_src_info,
                   packed_recv_layout_range)
        pending, storage = self.runtime.dispatch(
            _desc(x, "x"),
            _desc(topk_idx, "topk_idx"),
            _desc(mask, "active_ranks"),
            n,
            num_experts,
            timeout_us,
            use_fp8,
            None if packed_recv_x is None else _desc(packed_recv_x, "packed_recv_x"),
            None if packed_recv_x_scales is None else _desc(packed_recv_x_scales, "packed_recv_x_scales"),
            _desc(packed_recv_count, "packed_recv_count"),
            _desc(packed_recv_src_info, "packed_recv_src_info"),
            _desc(packed_recv_layout_range, "packed_recv_layout_range"),
            background=background,
            keep=[t for t in tensors if t is not None],
        )
        if storage is not None:
            # The tensor owns the native storage (torch.frombuffer keeps the object); it goes back to the
            # buffer's pool when the last view of it is gone.
            packed_recv_x = torch.frombuffer(storage, dtype=torch.uint8).view(recv_dtype).view(nl, rows, hidden)
        self._pending = pending
        if mask_back is not None:
            mask_back.copy_(mask)
        if device is not None:
            packed_recv_x = packed_recv_x.to(device)
            packed_recv_x_scales = None if packed_recv_x_scales is None else packed_recv_x_scales.to(device)
            packed_recv_count = packed_recv_count.to(device)
            packed_recv_src_info = packed_recv_src_info.to(device)
            packed_recv_layout_range = packed_recv_layout_range.to(device)
        event = _ep.EventHandle(pending)
        hook = self._hook(pending) if return_recv_hook else _noop
        handle = (packed_recv_src_info, packed_recv_layout_range, n, hidden, num_experts)
        recorded = (x, topk_idx, packed_recv_x, packed_recv_x_scales, packed_recv_count, packed_recv_src_info,
                    packed_recv_layout_range)
        return (
            (packed_recv_x, packed_recv_x_scales) if use_fp8 else packed_recv_x,
            packed_recv_count,
            handle,
            EventOverlap(event, recorded if async_finish or return_recv_hook else None),
            hook,
        )

    def _hook(self, pending: Any) -> Callable:
        def hook() -> None:
            if self._pending is pending:
                self._pending = None
            if pending is not None:
                pending.wait()

        return hook

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        active_ranks: Optional[torch.Tensor],
        timeout_us: int,
        handle: tuple,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, EventOverlap, Callable]:
        """Sends the expert outputs ``x`` ``[L, R*N, hidden]`` (bfloat16, the dispatch's layout) back to their
        tokens' ranks and returns ``(combined [num_tokens, hidden], event, hook)``: each token's rows weighted
        by ``topk_weights`` (float32) and summed in f32. With ``zero_copy`` the rows are taken from
        ``get_next_combine_buffer(handle)`` and ``x`` is ignored."""
        self._finish_pending()
        if self.runtime is None:
            raise RuntimeError("combine() before any dispatch(): the buffer is sized by the first dispatch")
        try:
            src_info, layout_range, n, hidden, num_experts = handle
        except (TypeError, ValueError):
            raise TypeError("handle: expected the handle tuple dispatch() returned") from None
        timeout_us = _check_int("timeout_us", timeout_us, -(1 << 62))
        device = self._staging(None if zero_copy else x, topk_idx, topk_weights, out)
        if not isinstance(topk_idx, torch.Tensor):
            raise TypeError(f"topk_idx: expected a torch.Tensor, got {type(topk_idx).__name__}")
        mask, mask_back = self._mask(active_ranks)
        if device is not None:
            x = None if zero_copy else x.cpu()
            topk_idx, topk_weights = topk_idx.cpu(), topk_weights.cpu()
            src_info, layout_range = src_info.cpu(), layout_range.cpu()
        if not isinstance(src_info, torch.Tensor) or not isinstance(layout_range, torch.Tensor):
            raise TypeError("handle: expected the handle tuple dispatch() returned")
        out_dev = out
        if out is None or device is not None:
            out = torch.empty((topk_idx.size(0) if topk_idx.dim() >= 1 else 0, hidden), dtype=torch.bfloat16)
        background = device is None and (async_finish or return_recv_hook)
        tensors = (x, topk_idx, topk_weights, src_info, layout_range, mask, out)
        pending = self.runtime.combine(
            None if zero_copy else _desc(x, "x"),
            _desc(topk_idx, "topk_idx"),
            _desc(topk_weights, "topk_weights"),
            _desc(src_info, "handle"),
            _desc(layout_range, "handle"),
            _desc(mask, "active_ranks"),
            _check_int("handle", n, 1),
            _check_int("handle", hidden, 1),
            _check_int("handle", num_experts, 1),
            timeout_us,
            bool(zero_copy),
            _desc(out, "out"),
            background=background,
            keep=[t for t in tensors if t is not None],
        )
        self._pending = pending
        if mask_back is not None:
            mask_back.copy_(mask)
        if device is not None:
            if out_dev is not None:
                out_dev.copy_(out)
                out = out_dev
            else:
                out = out.to(device)
        event = _ep.EventHandle(pending)
        hook = self._hook(pending) if return_recv_hook else _noop
        recorded = (x, topk_idx, topk_weights, src_info, layout_range, out)
        return out, EventOverlap(event, recorded if async_finish or return_recv_hook else None), hook

    def get_next_combine_buffer(self, handle: object) -> torch.Tensor:
        """The zero-copy combine input ``[L, R*N, hidden]`` bfloat16, a CPU tensor over the registered buffer:
        write the expert outputs into it after ``dispatch`` and call ``combine(..., zero_copy=True)``."""
        self._finish_pending()
        if self.runtime is None:
            raise RuntimeError("get_next_combine_buffer() before any dispatch()")
        try:
            _, _, n, hidden, num_experts = handle
        except (TypeError, ValueError):
            raise TypeError("handle: expected the handle tuple dispatch() returned") from None
        addr, nbytes = self.runtime.get_next_combine_buffer(int(n), int(hidden), int(num_experts))
        shape = (num_experts // self.group_size, self.group_size * n, hidden)
        if nbytes == 0:
            return torch.empty(shape, dtype=torch.bfloat16)
        raw = (ctypes.c_char * nbytes).from_address(addr)
        tensor = torch.frombuffer(raw, dtype=torch.bfloat16).view(shape)
        # The memory belongs to the native buffer: keep it alive as long as the view.
        tensor._mooncake_ep_owner = self.runtime
        return tensor

    # ----- upstream's helpers -----

    @staticmethod
    def _fp8_cast(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-128 block E4M3 cast as upstream's fallback: (codes [m, n], scales [m, n / 128])."""
        if x.dim() != 2 or x.size(1) % 128 != 0:
            raise ValueError(f"x: expected [m, n] with n a multiple of 128, got {tuple(x.shape)}")
        m, n = x.shape
        blocks = x.view(m, -1, 128)
        amax = blocks.abs().float().amax(dim=2).view(m, -1).clamp(1e-4)
        codes = (blocks * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(m, n)
        return codes, (amax / 448.0).view(m, -1)
