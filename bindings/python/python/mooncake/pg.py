"""mooncake.pg: the torch.distributed backends ``mooncake-cpu`` and ``mooncake`` over the transfer engine.

Importing this module registers both backends with ``torch.distributed.Backend.register_backend`` (as
upstream's ``mooncake.pg`` does): ``mooncake-cpu`` for CPU tensors and ``mooncake`` for CUDA tensors. Ours
moves data between host buffers (tcp, shm, rdma, ... through the engine); CUDA tensors are staged through
host memory by this module (copied to the CPU, moved, copied back). That path has not been run on a GPU.

    import torch.distributed as dist
    from mooncake import pg  # registers the backends

    dist.init_process_group("mooncake-cpu", rank=rank, world_size=world_size)
    dist.all_reduce(t)

Every collective of torch.distributed is supported (all_reduce with sum/avg/min/max/product, broadcast,
all_gather, all_gather_into_tensor, reduce_scatter(_tensor), all_to_all(_single) with uneven splits,
reduce, gather, scatter, barrier, send/recv, batch_isend_irecv, new_group). Calls run to completion before
they return (``async_op=True`` returns a completed ``Work``), except ``isend``/``irecv``, which run
together at the first ``wait()`` (or the next collective), so that a batch of them cannot deadlock.

Elastic membership as upstream: a rank that fails (its writes fail, or it is silent for the group's
timeout, ``init_process_group(timeout=...)``) is masked and the survivors' calls complete over the others
(``MOONCAKE_PG_AUTO_DEACTIVATE_ON_FAILURE=0`` raises ``CollectiveError`` instead, naming the ranks).
``get_active_ranks``, ``get_peer_state``, ``deactivate_ranks``, ``activate_ranks`` / ``recover_ranks``,
``join_group`` and ``sync_after_failure`` manage the membership (``get_failed_ranks_hint`` /
``get_local_success`` tell what one call lost; ``set_collective_timeout_us`` / ``set_p2p_timeout_us`` set
the timeouts; ``extend_group_size_to`` only accepts the group's size); a restarted rank comes back with
``MooncakeBackendOptions(..., is_extension=True)`` and ``join_group``. docs/python-api.md (``mooncake.pg``)
describes the differences from upstream (no coordinator: every surviving rank calls ``recover_ranks``).
"""

from __future__ import annotations

import datetime
import enum
import json
import os
import socket
import threading
import time
import weakref
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as _C10dBackend

from ._mooncake import pg as _native

CollectiveError = _native.CollectiveError
Group = _native.Group

_DEFAULT_CHUNK_BYTES = 4 << 20

_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.PRODUCT: "product",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
}

# Process-wide settings (upstream keeps them in the process-wide context too).
_host_ip: Optional[str] = None
_device_filter: List[str] = []
_engine = None  # an InnerTransferEngine shared by every group of this process
_backends: dict = {}  # group name -> MooncakeBackend
_live_backends: "weakref.WeakSet" = weakref.WeakSet()  # every backend of this process (timeout setters)
_collective_timeout_s: Optional[float] = None  # set_collective_timeout_us
_p2p_timeout_s: Optional[float] = None  # set_p2p_timeout_us
_fault_reconciliation_window_us: Optional[int] = None  # recorded (no coordinator)
_asking = threading.local()  # get_failed_ranks_hint: finds our work behind torch's wrapper


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


class SyncAfterFailureStatus(enum.IntEnum):
    """What ``sync_after_failure`` did."""

    Reconciled = 0
    NoPending = 1
    Rejected = 2


class ProposalStatus(enum.IntEnum):
    """What ``activate_ranks`` / ``deactivate_ranks`` did."""

    Rejected = 0
    Applied = 1
    AppliedWithDroppedRanks = 2


ViewUpdateStatus = ProposalStatus


class SyncAfterFailureResponse:
    def __init__(self, status: SyncAfterFailureStatus, reject_reason: str = ""):
        self.status = status
        self.reject_reason = reject_reason

    def __repr__(self):
        return f"SyncAfterFailureResponse(status={self.status.name}, reject_reason={self.reject_reason!r})"


class ProposeViewUpdateResponse:
    def __init__(self, status: ProposalStatus, new_epoch: int, dropped_ranks=(), reject_reason: str = ""):
        self.status = status
        self.new_epoch = new_epoch
        self.dropped_ranks = list(dropped_ranks)
        self.reject_reason = reject_reason

    def __repr__(self):
        return f"ProposeViewUpdateResponse(status={self.status.name}, new_epoch={self.new_epoch})"


class MooncakeBackendOptions(_C10dBackend.Options):
    """Upstream's ``MooncakeBackendOptions``, passed as ``pg_options``. Overloads as upstream:

    ``MooncakeBackendOptions(max_group_size, is_extension=False, auto_deactivate_on_failure=True,
    auto_sync_on_failure=True)`` or ``MooncakeBackendOptions(active_ranks, is_extension=False,
    max_group_size=None)``: ``active_ranks`` is an int32 tensor this backend keeps equal to its active-rank
    mask after every call. ``max_group_size`` must equal the group size (ours does not grow a group; a
    replaced rank rejoins in its old slot). ``timeout`` (a ``timedelta``) overrides the group's timeout
    for peer failure detection; ``chunk_bytes`` the size of one transfer chunk (default 4 MiB, or
    ``MOONCAKE_PG_CHUNK_BYTES``)."""

    def __init__(self, *args, is_extension=None, max_group_size=None, auto_deactivate_on_failure=None,
                 auto_sync_on_failure=None, active_ranks=None, timeout=None, chunk_bytes=None):
        super().__init__("mooncake")
        args = list(args)
        if args and isinstance(args[0], torch.Tensor):
            active_ranks = args.pop(0)
            positional = ["is_extension", "max_group_size"]
        elif args:
            max_group_size = args.pop(0)
            positional = ["is_extension", "auto_deactivate_on_failure", "auto_sync_on_failure"]
        else:
            positional = []
        if len(args) > len(positional):
            raise TypeError(f"MooncakeBackendOptions: too many arguments ({len(args)} after the first)")
        given = dict(zip(positional, args))
        is_extension = given.get("is_extension", is_extension)
        max_group_size = given.get("max_group_size", max_group_size)
        auto_deactivate_on_failure = given.get("auto_deactivate_on_failure", auto_deactivate_on_failure)
        auto_sync_on_failure = given.get("auto_sync_on_failure", auto_sync_on_failure)
        if active_ranks is not None:
            if not isinstance(active_ranks, torch.Tensor) or active_ranks.dtype != torch.int32:
                raise TypeError("active_ranks: expected an int32 tensor")
            if not active_ranks.is_contiguous() or active_ranks.dim() != 1:
                raise ValueError("active_ranks: expected a contiguous 1-D tensor")
        if max_group_size is not None and (not isinstance(max_group_size, int) or max_group_size < 1):
            raise ValueError(f"max_group_size: {max_group_size!r} (a positive int)")
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise TypeError("timeout: expected a datetime.timedelta")
        self.active_ranks = active_ranks
        self.is_extension = bool(is_extension) if is_extension is not None else False
        self.max_group_size = max_group_size
        self.auto_deactivate_on_failure = (
            _env_flag("MOONCAKE_PG_AUTO_DEACTIVATE_ON_FAILURE", True)
            if auto_deactivate_on_failure is None else bool(auto_deactivate_on_failure))
        self.auto_sync_on_failure = (
            _env_flag("MOONCAKE_PG_AUTO_SYNC_ON_FAILURE", True)
            if auto_sync_on_failure is None else bool(auto_sync_on_failure))
        if self.auto_sync_on_failure and not self.auto_deactivate_on_failure:
            raise ValueError("auto_sync_on_failure requires auto_deactivate_on_failure (as upstream)")
        self.failure_timeout = timeout
        self.chunk_bytes = chunk_bytes


class _Work(dist.Work):
    """A finished call (or a batch of isend/irecv that runs at the first wait)."""

    def __init__(self, result=None, run: Optional[Callable[[], None]] = None, size: int = 0, failed=()):
        super().__init__()
        self._result = result if result is not None else []
        self._run = run
        self._error = None
        self._size = size
        self._failed = list(failed)  # ranks lost during this call (get_failed_ranks_hint)

    def _finish(self):
        run, self._run = self._run, None
        if run is not None:
            try:
                run()
            except BaseException as e:  # kept for exception(); raised by wait()
                self._error = e
        if self._error is not None:
            raise self._error

    def wait(self, timeout=None):
        if getattr(_asking, "active", False):
            # get_failed_ranks_hint / get_local_success looking for this object behind torch's wrapper.
            _asking.work = self
            return True
        self._finish()
        return True

    def is_completed(self):
        return self._run is None

    def is_success(self):
        return self._run is None and self._error is None

    def exception(self):
        return self._error

    def result(self):
        self._finish()
        return self._result

    def get_future(self):
        fut = torch.futures.Future()
        try:
            self._finish()
            fut.set_result(self._result)
        except BaseException as e:
            fut.set_exception(e)
        return fut


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class _Host:
    """A tensor as host memory the native group can use: the tensor itself when it is a contiguous CPU
    tensor, else a contiguous CPU copy (written back by ``done()`` for outputs)."""

    __slots__ = ("orig", "t", "write_back")

    def __init__(self, t: torch.Tensor, arg: str, output: bool, keep_content: bool = True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}: expected a tensor, got {type(t).__name__}")
        if t.is_sparse:
            raise TypeError(f"{arg}: sparse tensors are not supported")
        self.orig = t
        if t.device.type == "cpu" and t.is_contiguous():
            self.t, self.write_back = t, False
        else:
            if keep_content or not output:
                self.t = t.detach().to("cpu", copy=True).contiguous()
            else:
                self.t = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            self.write_back = output

    @property
    def ptr(self) -> int:
        return self.t.data_ptr() if self.t.numel() else 0

    @property
    def nbytes(self) -> int:
        return _nbytes(self.t)

    def done(self):
        if self.write_back:
            with torch.no_grad():
                self.orig.copy_(self.t)


def _flat_bytes(tensors, arg: str) -> torch.Tensor:
    """The bytes of `tensors` one after the other, as one uint8 CPU tensor."""
    parts = [_Host(t, arg, output=False).t.reshape(-1).view(torch.uint8) for t in tensors]
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def _unflatten_into(flat: torch.Tensor, tensors):
    off = 0
    for t in tensors:
        n = _nbytes(t)
        part = flat[off:off + n].view(t.dtype).reshape(t.shape)
        with torch.no_grad():
            t.copy_(part)
        off += n


def _op_name(reduce_op) -> str:
    op = getattr(reduce_op, "op", reduce_op)
    name = _OPS.get(op)
    if name is None:
        raise ValueError(f"op: {reduce_op} is not supported (sum, avg, product, min, max)")
    return name


def _single(tensors, arg: str) -> torch.Tensor:
    if len(tensors) != 1:
        raise ValueError(f"{arg}: expected one tensor per call, got {len(tensors)}")
    return tensors[0]


def _local_host_ip() -> str:
    if _host_ip:
        return _host_ip
    master = os.environ.get("MASTER_ADDR", "")
    if not master or master in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class MooncakeBackend(_C10dBackend):
    """One rank's ``mooncake-cpu`` / ``mooncake`` backend of one process group (a native ``Group``)."""

    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta,
                 options: Optional[MooncakeBackendOptions], is_cpu: bool, group_name: str = ""):
        super().__init__(rank, size)
        global _engine
        options = options if isinstance(options, MooncakeBackendOptions) else MooncakeBackendOptions()
        if options.max_group_size is not None and options.max_group_size != size:
            raise ValueError(f"max_group_size: {options.max_group_size} for a group of {size} ranks "
                             "(growing a group is not supported; replaced ranks rejoin their slot)")
        if options.active_ranks is not None and options.active_ranks.numel() != size:
            raise ValueError(f"active_ranks: {options.active_ranks.numel()} entries for {size} ranks")
        self._store = store
        self._rank = rank
        self._size = size
        self._is_cpu = is_cpu
        self._options = options
        self._name = "mooncake-cpu" if is_cpu else "mooncake"
        self._pending: List[tuple] = []  # deferred isend/irecv: (kind, host, peer, tag)
        self._pending_works: List[_Work] = []  # their works, told what the batch lost
        self._op_failed: set = set()  # ranks lost during the call in progress
        self._epoch = 0
        self._last_failure_check = time.monotonic()
        self._failures_seen = 0
        if options.failure_timeout:
            seconds = options.failure_timeout.total_seconds()
        elif _collective_timeout_s is not None:
            seconds = _collective_timeout_s
        else:
            seconds = timeout.total_seconds() if timeout else 30.0
        chunk = options.chunk_bytes or int(os.environ.get("MOONCAKE_PG_CHUNK_BYTES", _DEFAULT_CHUNK_BYTES))
        protocol = os.environ.get("MOONCAKE_PROTOCOL", "tcp") or "tcp"
        self._group = Group(rank, size, chunk_bytes=chunk, timeout=seconds, engine=_engine,
                            protocol=protocol, local_hostname=_local_host_ip())
        if _engine is None:
            _engine = self._group.get_engine()
        self._known_gen = [0] * size
        self._members: List[tuple] = [None] * size
        self._joining = options.is_extension
        wait = datetime.timedelta(seconds=max(seconds, 60.0))
        if options.is_extension:
            # A replacement: the others are connected already; connect to them, then tell them.
            for s in range(size):
                if s != rank:
                    self._members[s] = self._latest_member(s, wait)
            self._gen = self._store.add(f"mooncake/gen/{rank}", 1)
            self._members[rank] = self._group.local_info()
            self._known_gen[rank] = self._gen
            self._group.connect(self._members)
            self._store.set(f"mooncake/info/{rank}/{self._gen}", json.dumps(self._members[rank]))
        else:
            self._gen = self._store.add(f"mooncake/gen/{rank}", 1)
            self._store.set(f"mooncake/info/{rank}/{self._gen}", json.dumps(self._group.local_info()))
            for s in range(size):
                self._members[s] = self._latest_member(s, wait) if s != rank else self._group.local_info()
            self._known_gen[rank] = self._gen
            self._group.connect(self._members)
        self._mirror()
        if group_name:
            _backends[group_name] = self
        _live_backends.add(self)

    # ----- membership helpers -----
    def _latest_member(self, s: int, wait: datetime.timedelta):
        self._store.wait([f"mooncake/info/{s}/1"], wait)
        gen = self._store.add(f"mooncake/gen/{s}", 0)
        key = f"mooncake/info/{s}/{gen}"
        self._store.wait([key], wait)
        self._known_gen[s] = gen
        return tuple(json.loads(self._store.get(key)))

    def _published_gen(self, s: int) -> int:
        return self._store.add(f"mooncake/gen/{s}", 0)

    def _mirror(self):
        t = self._options.active_ranks
        if t is not None:
            mask = torch.tensor([1 if a else 0 for a in self._group.active_ranks()], dtype=torch.int32)
            with torch.no_grad():
                t.copy_(mask.to(t.device))

    def _check(self, before):
        """After a call: mirror the mask, and react to ranks lost in it."""
        after = self._group.active_ranks()
        if after != before:
            self._mirror()
            lost = [r for r, (a, b) in enumerate(zip(before, after)) if a and not b]
            self._op_failed.update(lost)
            if lost:
                self._epoch += 1
                if self._options.auto_sync_on_failure:
                    self._publish_failures()
                if not self._options.auto_deactivate_on_failure:
                    err = CollectiveError(f"ranks {lost} failed during the call (masked; see activate_ranks)")
                    err.ranks = lost
                    raise err

    def _publish_failures(self):
        inactive = [[r, self._known_gen[r]] for r, a in enumerate(self._group.active_ranks()) if not a]
        try:
            self._store.set(f"mooncake/failed/{self._rank}", json.dumps(inactive))
            self._failures_seen = self._store.add("mooncake/failures", 1)
        except Exception:  # the store may be gone with its host; the mask stays local
            pass

    def _apply_published_failures(self) -> bool:
        """Deactivates every rank another rank published as failed; whether something changed."""
        changed = False
        for s in range(self._size):
            if s == self._rank or not self._group.peer_state(s):
                continue
            key = f"mooncake/failed/{s}"
            if not self._store.check([key]):
                continue
            for r, gen in json.loads(self._store.get(key)):
                # A failure of an older generation of `r` (it has been replaced since) does not count.
                if r != self._rank and self._group.peer_state(r) and self._known_gen[r] == gen:
                    self._group.deactivate(r)
                    changed = True
        if changed:
            self._epoch += 1
            self._mirror()
        return changed

    def _before(self):
        if self._joining:
            raise RuntimeError("this rank joins as an extension: call mooncake.pg.join_group(group) first")
        if self._options.auto_sync_on_failure and time.monotonic() - self._last_failure_check > 1.0:
            self._last_failure_check = time.monotonic()
            try:
                seen = self._store.add("mooncake/failures", 0)
                if seen != self._failures_seen:
                    self._failures_seen = seen
                    self._apply_published_failures()
            except Exception:
                pass
        if self._pending:
            self._flush()
        return self._group.active_ranks()

    def _run(self, call, *args, outputs=()):
        try:
            before = self._before()
            call(*args)
            for h in outputs:
                h.done()
            self._check(before)
        except BaseException:
            self._op_failed = set()  # no work is returned for this call
            raise

    def _work(self, result=None) -> _Work:
        """The finished work of the call in progress, with the ranks it lost."""
        failed, self._op_failed = sorted(self._op_failed), set()
        return _Work(result, size=self._size, failed=failed)

    # ----- torch.distributed backend interface -----
    # isend/irecv run as one batch at the first wait (see _defer), so torch need not coalesce them. (A
    # plain attribute: torch's C++ property would look for a Python override and recurse.)
    supports_coalescing = False
    supports_splitting = False

    def getBackendName(self):
        return self._name

    def rank(self):
        return self._rank

    def size(self):
        return self._size

    def allreduce(self, tensors, opts=None):
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        for t in tensors:
            h = _Host(t, "tensor", output=True)
            self._run(self._group.all_reduce, h.ptr, h.nbytes, _dtype_name(h.t), op, outputs=[h])
        return self._work(list(tensors))

    def broadcast(self, tensors, opts):
        for t in tensors:
            h = _Host(t, "tensor", output=True)
            self._run(self._group.broadcast, h.ptr, h.nbytes, opts.rootRank, outputs=[h])
        return self._work(list(tensors))

    def allgather(self, output_lists, inputs, opts=None):
        inp = _Host(_single(inputs, "input_tensor"), "input_tensor", output=False)
        outs = _single(output_lists, "output_tensors")
        if len(outs) != self._size:
            raise ValueError(f"tensor_list: {len(outs)} tensors for {self._size} ranks")
        counts = [_nbytes(o) for o in outs]
        flat = torch.empty(sum(counts), dtype=torch.uint8)
        self._run(self._group.all_gather_v, inp.ptr, inp.nbytes, flat.data_ptr() if flat.numel() else 0,
                  flat.numel(), counts)
        _unflatten_into(flat, outs)
        return self._work(output_lists)

    def _allgather_base(self, output, input, opts=None):
        o = _Host(output, "output_tensor", output=True, keep_content=False)
        i = _Host(input, "input_tensor", output=False)
        self._run(self._group.all_gather, i.ptr, i.nbytes, o.ptr, o.nbytes, outputs=[o])
        return self._work([output])

    all_gather_single = _allgather_base

    def _reduce_scatter_base(self, output, input, opts=None):
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        o = _Host(output, "output", output=True, keep_content=False)
        i = _Host(input, "input", output=False)
        if o.t.dtype != i.t.dtype:
            raise TypeError(f"output: dtype {o.t.dtype} differs from input's {i.t.dtype}")
        self._run(self._group.reduce_scatter, i.ptr, i.nbytes, o.ptr, o.nbytes, _dtype_name(i.t), op, outputs=[o])
        return self._work([output])

    reduce_scatter_single = _reduce_scatter_base

    def reduce_scatter(self, outputs, input_lists, opts=None):
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        out = _single(outputs, "output")
        ins = _single(input_lists, "input_list")
        if len(ins) != self._size:
            raise ValueError(f"input_list: {len(ins)} tensors for {self._size} ranks")
        flat = _flat_bytes(ins, "input_list")
        o = _Host(out, "output", output=True, keep_content=False)
        self._run(self._group.reduce_scatter, flat.data_ptr() if flat.numel() else 0, flat.numel(), o.ptr,
                  o.nbytes, _dtype_name(o.t), op, outputs=[o])
        return self._work([out])

    def alltoall(self, outputs, inputs, opts=None):
        if len(outputs) != self._size or len(inputs) != self._size:
            raise ValueError(f"output_tensor_list / input_tensor_list: {len(outputs)} / {len(inputs)} tensors "
                             f"for {self._size} ranks")
        flat_in = _flat_bytes(inputs, "input_tensor_list")
        send = [_nbytes(t) for t in inputs]
        recv = [_nbytes(t) for t in outputs]
        flat_out = torch.empty(sum(recv), dtype=torch.uint8)
        self._run(self._group.all_to_all, flat_in.data_ptr() if flat_in.numel() else 0, flat_in.numel(), send,
                  flat_out.data_ptr() if flat_out.numel() else 0, flat_out.numel(), recv)
        _unflatten_into(flat_out, outputs)
        return self._work(list(outputs))

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        o = _Host(output, "output", output=True, keep_content=False)
        i = _Host(input, "input", output=False)
        send = self._split_bytes(i.t, input_split_sizes, "input_split_sizes")
        recv = self._split_bytes(o.t, output_split_sizes, "output_split_sizes")
        self._run(self._group.all_to_all, i.ptr, i.nbytes, send, o.ptr, o.nbytes, recv, outputs=[o])
        return self._work([output])

    all_to_all_single = alltoall_base

    def _split_bytes(self, t: torch.Tensor, splits, arg: str) -> List[int]:
        rows = t.shape[0] if t.dim() > 0 else 1
        row_bytes = (_nbytes(t) // rows) if rows else (
            t.element_size() * int(torch.Size(t.shape[1:]).numel()) if t.dim() > 0 else 0)
        splits = list(splits) if splits is not None else []
        if not splits:
            if rows % self._size:
                raise ValueError(f"{arg}: {rows} rows do not split evenly over {self._size} ranks")
            return [rows // self._size * row_bytes] * self._size
        if len(splits) != self._size:
            raise ValueError(f"{arg}: {len(splits)} entries for {self._size} ranks")
        if any(s < 0 for s in splits) or sum(splits) != rows:
            raise ValueError(f"{arg}: {splits} do not add up to the tensor's {rows} rows")
        return [s * row_bytes for s in splits]

    def reduce(self, tensors, opts):
        op = _op_name(opts.reduceOp)
        for t in tensors:
            h = _Host(t, "tensor", output=True)
            self._run(self._group.reduce, h.ptr, h.nbytes, _dtype_name(h.t), op, opts.rootRank, outputs=[h])
        return self._work(list(tensors))

    def gather(self, output_lists, inputs, opts):
        inp = _Host(_single(inputs, "tensor"), "tensor", output=False)
        root = opts.rootRank
        outs = output_lists[0] if output_lists else []
        if self._rank == root and len(outs) != self._size:
            raise ValueError(f"gather_list: {len(outs)} tensors for {self._size} ranks")
        flat = torch.empty(inp.nbytes * self._size if self._rank == root else 0, dtype=torch.uint8)
        self._run(self._group.gather, inp.ptr, inp.nbytes, flat.data_ptr() if flat.numel() else 0, flat.numel(),
                  root)
        if self._rank == root:
            _unflatten_into(flat, outs)
        return self._work(output_lists)

    def scatter(self, outputs, input_lists, opts):
        out = _single(outputs, "tensor")
        root = opts.rootRank
        ins = input_lists[0] if input_lists else []
        if self._rank == root and len(ins) != self._size:
            raise ValueError(f"scatter_list: {len(ins)} tensors for {self._size} ranks")
        flat = _flat_bytes(ins, "scatter_list") if self._rank == root else torch.empty(0, dtype=torch.uint8)
        o = _Host(out, "tensor", output=True, keep_content=False)
        self._run(self._group.scatter, flat.data_ptr() if flat.numel() else 0, flat.numel(), o.ptr, o.nbytes, root,
                  outputs=[o])
        return self._work([out])

    def barrier(self, opts=None):
        self._run(self._group.barrier)
        return self._work()

    # Point-to-point: deferred, then run as one batch (batch_isend_irecv does not deadlock).
    def _defer(self, kind, tensors, peer, tag):
        t = _single(tensors, "tensor")
        if tag < 0 or tag >= 1 << 32:
            raise ValueError(f"tag: {tag} (0 .. 2**32-1)")
        if not 0 <= peer < self._size or peer == self._rank:
            raise ValueError(f"{'dst' if kind == 'send' else 'src'}: rank {peer} of {self._size} "
                             f"(this rank is {self._rank})")
        h = _Host(t, "tensor", output=(kind == "recv"))
        self._pending.append((kind, h, peer, tag))
        w = _Work([t], run=self._flush, size=self._size)
        self._pending_works.append(w)
        return w

    def send(self, tensors, dst, tag=0):
        return self._defer("send", tensors, dst, tag)

    def recv(self, tensors, src, tag=0):
        return self._defer("recv", tensors, src, tag)

    def _flush(self):
        pending, self._pending = self._pending, []
        works, self._pending_works = self._pending_works, []
        if not pending:
            return
        # What this batch loses belongs to its works, not to the call that flushed it.
        outer, self._op_failed = self._op_failed, set()
        error = None
        try:
            self._flush_batch(pending)
        except BaseException as e:
            error = e
            raise
        finally:
            failed, self._op_failed = sorted(self._op_failed), outer
            for w in works:
                w._failed = failed
                if error is not None and w._run is not None:
                    w._run, w._error = None, error

    def _flush_batch(self, pending):
        if self._joining:
            raise RuntimeError("this rank joins as an extension: call mooncake.pg.join_group(group) first")
        sends = [(p, tag, h.ptr, h.nbytes) for k, h, p, tag in pending if k == "send"]
        recvs = [(p, tag, h.ptr, h.nbytes) for k, h, p, tag in pending if k == "recv"]
        before = self._group.active_ranks()
        p2p_timeout = _p2p_timeout_s
        saved_timeout = self._group.timeout
        if p2p_timeout is not None:
            self._group.set_timeout(p2p_timeout)
        try:
            if len(pending) == 1 and sends:
                self._group.send(*sends[0][2:], sends[0][0], sends[0][1])
            elif len(pending) == 1:
                self._group.recv(*recvs[0][2:], recvs[0][0], recvs[0][1])
            else:
                self._group.send_recv(sends, recvs)
        finally:
            if p2p_timeout is not None:
                self._group.set_timeout(saved_timeout)
        for k, h, _, _ in pending:
            h.done()
        self._check(before)

    def shutdown(self):
        self._pending = []
        self._pending_works = []

    def abort(self):
        self._pending = []
        self._pending_works = []


def _create(dist_opts, options, is_cpu: bool):
    return MooncakeBackend(dist_opts.store, dist_opts.group_rank, dist_opts.group_size, dist_opts.timeout,
                           options, is_cpu, getattr(dist_opts, "group_id", "") or "")


def _create_cpu(dist_opts, options):
    return _create(dist_opts, options, True)


def _create_cuda(dist_opts, options):
    return _create(dist_opts, options, False)


def _register():
    plugins = getattr(dist.Backend, "_plugins", {})
    if "MOONCAKE-CPU" not in plugins:
        dist.Backend.register_backend("mooncake-cpu", _create_cpu, extended_api=True, devices=["cpu"])
    if "MOONCAKE" not in plugins:
        dist.Backend.register_backend("mooncake", _create_cuda, extended_api=True, devices=["cuda"])


_register()


# ----- module-level calls (upstream's names) -----
def _resolve(backend) -> MooncakeBackend:
    if backend is None:
        backend = dist.group.WORLD
    if isinstance(backend, MooncakeBackend):
        return backend
    if isinstance(backend, dist.ProcessGroup):
        for device in ("cpu", "cuda"):
            try:
                b = backend._get_backend(torch.device(device))
            except Exception:
                continue
            if isinstance(b, MooncakeBackend):
                return b
        found = _backends.get(getattr(backend, "group_name", None))
        if found is not None:
            return found
    raise TypeError(f"backend: expected a mooncake process group or its backend, got {type(backend).__name__}")


def set_host_ip(host_ip: str) -> None:
    """The address this process's engine listens on (call before ``init_process_group``)."""
    global _host_ip
    if not isinstance(host_ip, str) or not host_ip.strip():
        raise ValueError(f"host_ip: {host_ip!r} (an address)")
    _host_ip = host_ip.strip()


def set_device_filter(filters: List[str]) -> None:
    """Restricts the RDMA devices used (recorded; tcp and shm use no device)."""
    global _device_filter
    if isinstance(filters, str) or not all(isinstance(f, str) for f in filters):
        raise TypeError("filters: expected a list of device names")
    _device_filter = list(filters)


def set_transfer_engine(engine) -> None:
    """Makes every later group use ``engine`` (a ``mooncake.engine.TransferEngine`` or its ``get_engine()``);
    ``None`` goes back to an engine of the backend's own."""
    global _engine
    if engine is None:
        _engine = None
        return
    inner = engine.get_engine() if hasattr(engine, "get_engine") else engine
    if type(inner).__name__ != "InnerTransferEngine":
        raise TypeError(f"engine: expected a TransferEngine, got {type(engine).__name__}")
    _engine = inner


def get_active_ranks(backend=None) -> torch.Tensor:
    """The active-rank mask as an int32 tensor (the ``MooncakeBackendOptions(active_ranks)`` tensor when
    one was given)."""
    b = _resolve(backend)
    if b._options.active_ranks is not None:
        return b._options.active_ranks
    return torch.tensor([1 if a else 0 for a in b._group.active_ranks()], dtype=torch.int32)


def get_num_synced_ranks(backend=None) -> int:
    """Ranks that published their buffer in this group (active or ready to be activated)."""
    b = _resolve(backend)
    return sum(1 for s in range(b._size) if s == b._rank or b._published_gen(s) > 0)


def get_peer_state(backend, ranks: List[int]) -> List[bool]:
    """For each rank: active, or restarted and ready to be activated. Local (reads the store); no
    collective."""
    b = _resolve(backend)
    out = []
    for r in ranks:
        if not 0 <= r < b._size:
            raise ValueError(f"ranks: rank {r} of {b._size}")
        out.append(bool(b._group.peer_state(r)) or b._published_gen(r) > b._known_gen[r])
    return out


def deactivate_ranks(backend, ranks: List[int]) -> ProposeViewUpdateResponse:
    """Masks ``ranks`` on this rank: later calls neither write to nor wait for them."""
    b = _resolve(backend)
    for r in ranks:
        if not 0 <= r < b._size or r == b._rank:
            raise ValueError(f"ranks: cannot deactivate rank {r} (group of {b._size}, this rank {b._rank})")
    for r in ranks:
        b._group.deactivate(r)
    b._epoch += 1
    b._mirror()
    return ProposeViewUpdateResponse(ProposalStatus.Applied, b._epoch)


def activate_ranks(backend, ranks: List[int]) -> ProposeViewUpdateResponse:
    """Takes ``ranks`` back. A restarted rank (a new process that called ``join_group``) is connected
    again; a live rank that was masked restarts its streams (it calls this too, with the same ranks).
    Every active rank calls it at the same point (between collectives)."""
    b = _resolve(backend)
    for r in ranks:
        if not 0 <= r < b._size:
            raise ValueError(f"ranks: rank {r} of {b._size}")
    wait = datetime.timedelta(seconds=max(b._group.timeout, 60.0))
    replaced = []
    for r in ranks:
        if r == b._rank:
            b._group.activate(r)
            continue
        gen = b._published_gen(r)
        if gen > b._known_gen[r]:
            key = f"mooncake/info/{r}/{gen}"
            b._store.wait([key], wait)
            b._members[r] = tuple(json.loads(b._store.get(key)))
            b._known_gen[r] = gen
            replaced.append(r)
        else:
            b._group.activate(r)
    if replaced:
        b._group.update_member(b._members)
    mask = b._group.active_ranks()
    for r in replaced:
        b._store.set(f"mooncake/mask/{r}/{b._known_gen[r]}", json.dumps(mask))
        b._store.add(f"mooncake/joined/{r}/{b._known_gen[r]}", 1)
    b._epoch += 1
    b._mirror()
    return ProposeViewUpdateResponse(ProposalStatus.Applied, b._epoch)


recover_ranks = activate_ranks


def join_group(backend=None) -> None:
    """On a rank created with ``MooncakeBackendOptions(..., is_extension=True)``: blocks until every active
    rank has taken it back (``activate_ranks``), then collectives include it. Nothing on other ranks."""
    b = _resolve(backend)
    if not b._joining:
        return
    mask_key = f"mooncake/mask/{b._rank}/{b._gen}"
    while True:
        try:
            b._store.wait([mask_key], datetime.timedelta(seconds=60))
            break
        except Exception:
            continue
    mask = json.loads(b._store.get(mask_key))
    for s, active in enumerate(mask):
        if not active and s != b._rank:
            b._group.deactivate(s)
    expected = sum(1 for s, a in enumerate(mask) if a and s != b._rank)
    while b._store.add(f"mooncake/joined/{b._rank}/{b._gen}", 0) < expected:
        time.sleep(0.01)
    b._joining = False
    b._mirror()


def sync_after_failure(backend=None) -> SyncAfterFailureResponse:
    """Publishes the ranks this rank saw fail and masks those the others published (through the group's
    store). Called after each failure when ``auto_sync_on_failure`` is on."""
    b = _resolve(backend)
    b._publish_failures()
    changed = b._apply_published_failures()
    return SyncAfterFailureResponse(SyncAfterFailureStatus.Reconciled if changed else SyncAfterFailureStatus.NoPending)


def get_current_epoch(backend=None) -> int:
    """Membership changes seen by this rank."""
    return _resolve(backend)._epoch


def _own_work(work) -> Optional[_Work]:
    """Our ``_Work`` behind ``work`` (torch hands callers a wrapper that forwards only ``wait`` and
    ``get_future``: ``wait`` answers who it is while ``_asking.active`` is set), or None."""
    if isinstance(work, _Work):
        return work
    if not isinstance(work, dist.Work):
        raise TypeError(f"work: expected a torch.distributed Work, got {type(work).__name__}")
    _asking.work = None
    _asking.active = True
    try:
        work.wait(datetime.timedelta(milliseconds=1))  # a work of another backend: at most 1 ms
    except Exception:
        pass
    finally:
        _asking.active = False
    found, _asking.work = _asking.work, None
    return found


def get_failed_ranks_hint(work) -> Optional[torch.Tensor]:
    """An int32 tensor, one entry per rank of the work's group: 1 for the ranks this rank lost (masked)
    during the call, 0 elsewhere (all 0 before a deferred isend/irecv has run). ``None`` for a work of
    another backend (upstream returns an undefined tensor there)."""
    w = _own_work(work)
    if w is None:
        return None
    hint = torch.zeros(w._size, dtype=torch.int32)
    for r in w._failed:
        hint[r] = 1
    return hint


def get_local_success(work) -> bool:
    """True iff the call has run and every peer this rank reached in it succeeded (no rank lost, no
    error). False for a deferred isend/irecv that has not run yet, and for a work of another backend."""
    w = _own_work(work)
    return w is not None and w._run is None and w._error is None and not w._failed


def extend_group_size_to(backend, size: int) -> None:
    """Upstream grows a group to ``size`` ranks. Ours has fixed-size groups: the same size is a no-op
    (as upstream), a smaller one raises ``RuntimeError`` (as upstream), a larger one raises
    ``NotImplementedError`` (a ``RuntimeError``): create the group at its final size and bring ranks in
    with ``MooncakeBackendOptions(..., is_extension=True)`` / ``join_group``."""
    b = _resolve(backend)
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size: expected an int, got {type(size).__name__}")
    if size == b._size:
        return
    if size < 0:
        raise RuntimeError(f"extend_group_size_to: size {size} out of range")
    if size < b._size:
        raise RuntimeError(f"extend_group_size_to: new size {size} < current size {b._size}")
    raise NotImplementedError(
        f"extend_group_size_to: cannot grow this group from {b._size} to {size} ranks (mooncake-rs groups "
        "have a fixed size; create it at its final size and add ranks with is_extension=True + join_group)")


def get_preferred_hca(backend, location: str) -> str:
    """The first RDMA device of ``location``'s preferred list in this host's topology (``"cpu:0"``,
    ``"cuda:0"``, ...: ``TransferEngine.get_local_topology``). ``""`` when there is none: no RDMA device,
    no GPU, or an unknown location (upstream indexes an empty list there)."""
    _resolve(backend)
    if not isinstance(location, str):
        raise TypeError(f"location: expected a str, got {type(location).__name__}")
    from .engine import TransferEngine

    try:
        matrix = json.loads(TransferEngine().get_local_topology())
    except Exception:
        return ""
    entry = matrix.get(location)
    if not entry or not entry[0]:
        return ""
    return str(entry[0][0])


def _microseconds(arg: str, us) -> int:
    if isinstance(us, bool) or not isinstance(us, int):
        raise TypeError(f"{arg}: expected an int (microseconds), got {type(us).__name__}")
    if us <= 0:
        raise ValueError(f"{arg}: {us} microseconds (a positive number)")
    return us


def set_collective_timeout_us(us: int) -> None:
    """The peer-failure timeout of collectives, in microseconds: applied to every group of this process
    now (``Group.set_timeout``) and to those created later (a ``MooncakeBackendOptions(timeout=...)`` still
    wins for its group)."""
    global _collective_timeout_s
    _collective_timeout_s = _microseconds("us", us) / 1e6
    for b in set(_live_backends) | set(_backends.values()):
        b._group.set_timeout(_collective_timeout_s)


def set_p2p_timeout_us(us: int) -> None:
    """The timeout of send/recv (isend/irecv, batch_isend_irecv), in microseconds, for every group of this
    process: each batch runs with it instead of the group's timeout."""
    global _p2p_timeout_s
    _p2p_timeout_s = _microseconds("us", us) / 1e6


def set_fault_reconciliation_window_us(us: int) -> None:
    """Upstream's coordinator waits this long to gather failure reports. Ours has no coordinator (each
    rank publishes and reads failures through the store at once): validated and recorded only."""
    global _fault_reconciliation_window_us
    _fault_reconciliation_window_us = _microseconds("us", us)


__all__ = [
    "CollectiveError",
    "Group",
    "MooncakeBackend",
    "MooncakeBackendOptions",
    "ProposalStatus",
    "ProposeViewUpdateResponse",
    "SyncAfterFailureResponse",
    "SyncAfterFailureStatus",
    "ViewUpdateStatus",
    "activate_ranks",
    "deactivate_ranks",
    "extend_group_size_to",
    "get_active_ranks",
    "get_current_epoch",
    "get_failed_ranks_hint",
    "get_local_success",
    "get_num_synced_ranks",
    "get_peer_state",
    "get_preferred_hca",
    "join_group",
    "recover_ranks",
    "set_collective_timeout_us",
    "set_device_filter",
    "set_fault_reconciliation_window_us",
    "set_host_ip",
    "set_p2p_timeout_us",
    "set_transfer_engine",
    "sync_after_failure",
]
