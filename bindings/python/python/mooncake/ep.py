"""mooncake.ep: the native expert-parallel buffer that ``mooncake.mooncake_ep_buffer.Buffer`` builds on.

Same module name and entry points as upstream's ``mooncake.ep``: ``Buffer`` (one rank's registered EP buffer)
and ``get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)``. Upstream's
native buffer drives GPU-initiated RDMA (its methods exchange queue pairs and IPC handles); ours runs the
same dispatch/combine protocol on the CPU over the transfer engine (tcp, shm, rdma, ...), so its methods are
different: ``get_local_info()`` / ``connect(infos)`` / ``update_ep_member(infos)`` exchange
``(segment, addr, len, seq)`` tuples, and ``dispatch`` / ``combine`` take tensors as descriptor tuples
``(data_ptr, shape, strides, dtype, device)`` (torch is not needed to import this module). Use the torch-level
``mooncake.mooncake_ep_buffer.Buffer`` unless you are writing another front end. docs/ep.md has the details.
"""

from ._mooncake import ep as _native

Buffer = _native.Buffer
PendingCall = _native.PendingCall
get_ep_buffer_size_hint = _native.get_ep_buffer_size_hint


class EventHandle:
    """Upstream's ``EventHandle``: something to wait on. Ours waits for a background EP call (nothing to wait
    for when there is none): there are no CUDA streams on the CPU path."""

    def __init__(self, pending=None, after=None):
        self._pending = pending
        self._after = after

    def current_stream_wait(self, stream_ptr=None):
        """Waits for the call (and raises its error, once)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()
        after, self._after = self._after, None
        if after is not None:
            after()

    def synchronize(self):
        self.current_stream_wait()


__all__ = ["Buffer", "EventHandle", "PendingCall", "get_ep_buffer_size_hint"]
