"""Engram tables in the store: ``EngramStore`` and ``EngramStoreConfig`` (upstream's names and behaviour).

One model layer owns one embedding table per head: head ``h`` of layer ``l`` is a ``vocab_sizes[h] x
embedding_dim`` float32 matrix stored, row-major and without a header, under the key ``engram:l{l}:h{h}`` (the
same key and bytes as upstream's wheel, so either package reads tables the other wrote). ``populate`` writes every
head's table once; ``lookup`` gathers rows by id with one ranged read per row straight into the result array, so a
lookup moves only the rows it returns.
"""

import sys
from typing import Any, List, Optional

from . import _memory
from ._tensors import _checked, _int

__all__ = ["EngramStore", "EngramStoreConfig"]

OBJECT_NOT_FOUND = -704


def _np():
    import numpy  # noqa: PLC0415 (numpy is needed only by these classes)

    return numpy


def _host_array(buf: Any) -> Any:
    """`buf`, with a torch tensor on a GPU (or any other device) copied once to host memory first: numpy reads only
    CPU memory, and a device tensor's elements must reach it through the device, not a CPU read."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buf, torch.Tensor) and buf.device.type != "cpu":
        try:
            return _memory.host_copy(buf.detach())
        except (RuntimeError, NotImplementedError) as e:
            raise RuntimeError(f"embedding buffer on {buf.device} cannot be copied to the host: {e}") from e
    return buf


def _int_list(value: Any, name: str) -> List[int]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of ints, got {type(value).__name__}")
    return [_int(v, name) for v in value]


class EngramStoreConfig:
    """Shape of one layer's tables: ``embedding_dim`` (64) and one vocabulary size per head (``[1024]``)."""

    __slots__ = ("_embedding_dim", "_table_vocab_sizes")

    def __init__(self) -> None:
        self._embedding_dim = 64
        self._table_vocab_sizes = [1024]

    embedding_dim = _checked("embedding_dim", _int, "Width of every row, in float32 values.")
    table_vocab_sizes = _checked(
        "table_vocab_sizes", _int_list, "Rows of each head's table (the number of heads is its length)."
    )


class EngramStore:
    """One layer's Engram tables, kept in a ``MooncakeDistributedStore`` (``store``; without one, every data call
    raises ``RuntimeError``)."""

    def __init__(self, layer_id: int, config: EngramStoreConfig, store: Optional[Any] = None) -> None:
        _int(layer_id, "layer_id")
        if not isinstance(config, EngramStoreConfig):
            raise TypeError(f"config: expected an EngramStoreConfig, got {type(config).__name__}")
        from .store import MooncakeDistributedStore  # noqa: PLC0415 (store imports this module)

        if store is not None and not isinstance(store, MooncakeDistributedStore):
            raise RuntimeError("EngramStore store parameter must be a MooncakeDistributedStore (or None)")
        self._layer = layer_id
        self._dim = config.embedding_dim
        self._vocab = list(config.table_vocab_sizes)
        self._store = store

    def get_embedding_dim(self) -> int:
        """Width of every row."""
        return self._dim

    def get_num_heads(self) -> int:
        """Number of tables (heads)."""
        return len(self._vocab)

    def get_table_vocab_sizes(self) -> List[int]:
        """Rows of each head's table."""
        return list(self._vocab)

    def get_store_keys(self) -> List[str]:
        """The store key of each head's table."""
        return [f"engram:l{self._layer}:h{h}" for h in range(len(self._vocab))]

    def populate(self, embedding_buffers: list) -> None:
        """Stores each head's table (arrays of shape ``[vocab_sizes[h], embedding_dim]``, converted to float32; a torch
        tensor on a GPU is copied to host memory once first). ``RuntimeError`` for a wrong count or shape, a tensor
        whose elements cannot be read, no store, or tables that are stored already."""
        if not isinstance(embedding_buffers, list):
            raise TypeError(f"populate(): embedding_buffers must be a list, got {type(embedding_buffers).__name__}")
        np = _np()
        if len(embedding_buffers) != len(self._vocab):
            raise RuntimeError("embedding_buffers size must match num_heads")
        tables = []
        for h, buf in enumerate(embedding_buffers):
            table = np.ascontiguousarray(np.asarray(_host_array(buf)), dtype=np.float32)
            if table.shape != (self._vocab[h], self._dim):
                raise RuntimeError("embedding buffer shape does not match get_table_vocab_sizes()/get_embedding_dim()")
            tables.append(table)
        store = self._store
        keys = self.get_store_keys()
        # put keeps an existing value and reports success; a layer's tables are written once, so refuse instead.
        if store is None or any(rc != 0 for rc in store.batch_is_exist(keys)):
            raise RuntimeError("populate failed")
        for key, table in zip(keys, tables):
            if store.put(key, memoryview(table).cast("B")) != 0:
                raise RuntimeError("populate failed")

    def lookup(self, row_ids: Any) -> Any:
        """Rows by id: ``row_ids`` of shape ``[B, L, H]`` (any integer dtype, or nested lists) gives a float32
        array ``[B, L, H, D]`` where ``[b, l, h]`` is row ``row_ids[b, l, h]`` of head ``h``'s table.
        ``RuntimeError`` for a wrong shape, a row outside its table, an empty request, missing tables or no
        store."""
        np = _np()
        ids = np.asarray(row_ids)
        if ids.ndim != 3:
            raise RuntimeError("row_ids array must have shape [B, L, H]")
        if ids.shape[2] != len(self._vocab):
            raise RuntimeError("row_ids last dimension must match num_heads")
        if ids.size == 0 or ids.dtype.kind not in "iu" or self._store is None:
            raise RuntimeError("EngramStore lookup failed")
        ids = ids.astype(np.int64)
        vocab = np.asarray(self._vocab, dtype=np.int64)
        if (ids < 0).any() or (ids >= vocab).any():
            raise RuntimeError("EngramStore lookup failed")
        b, l, heads = ids.shape
        out = np.empty((b, l, heads, self._dim), dtype=np.float32)
        row_bytes = self._dim * 4
        base = out.ctypes.data
        keys = self.get_store_keys()
        ptrs, sizes, offsets = [], [], []
        flat = ids.reshape(-1, heads)
        for h in range(heads):
            # Element [i, h] of the flattened [B*L, H, D] result starts at ((i * H) + h) * D floats.
            ptrs.append([base + (i * heads + h) * row_bytes for i in range(flat.shape[0])])
            sizes.append([row_bytes] * flat.shape[0])
            offsets.append([int(r) * row_bytes for r in flat[:, h]])
        store = self._store
        if store.register_buffer(base, out.nbytes) != 0:
            raise RuntimeError("EngramStore lookup failed")
        try:
            started = store.batch_get_session_start(keys)
            try:
                if len(started) != len(keys) or any(rc != 0 for rc in started):
                    raise RuntimeError("EngramStore lookup failed")
                got = store.batch_get_into_multi_buffer_ranges(keys, ptrs, sizes, offsets)
                if any(n != row_bytes * flat.shape[0] for n in got):
                    raise RuntimeError("EngramStore lookup failed")
            finally:
                store.batch_get_session_end(keys)
        finally:
            store.unregister_buffer(base)
        return out

    def remove_from_store(self, force: bool = False) -> int:
        """Removes this layer's tables; the number removed (missing ones are skipped). ``RuntimeError`` (with the
        code) when one cannot be removed, e.g. -706 while a reader holds a lease and ``force`` is False."""
        if self._store is None:
            raise RuntimeError("remove_from_store failed, rc=-600")
        removed = 0
        for key in self.get_store_keys():
            rc = self._store.remove(key, force)
            if rc == 0:
                removed += 1
            elif rc != OBJECT_NOT_FOUND:
                raise RuntimeError(f"remove_from_store failed, rc={rc}")
        return removed

