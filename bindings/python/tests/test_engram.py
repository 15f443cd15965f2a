"""EngramStore on a real master: tables of several heads round-trip through populate and lookup, gathered
exactly as numpy indexing gathers them; bad input raises upstream's exception types."""

import numpy as np
import pytest

from mooncake.store import EngramStore, EngramStoreConfig


def config(dim, vocab):
    c = EngramStoreConfig()
    c.embedding_dim = dim
    c.table_vocab_sizes = vocab
    return c


def test_lookup_gathers_rows_of_every_head(store):
    vocab, dim = [1000, 37, 512], 64
    e = EngramStore(7, config(dim, vocab), store)
    rng = np.random.default_rng(1)
    tables = [rng.standard_normal((v, dim)).astype(np.float32) for v in vocab]
    e.populate(tables)
    assert e.get_store_keys() == ["engram:l7:h0", "engram:l7:h1", "engram:l7:h2"]
    assert store.get_size("engram:l7:h0") == 1000 * dim * 4
    ids = np.stack([rng.integers(0, v, size=(4, 16)) for v in vocab], axis=-1)
    out = e.lookup(ids)
    assert out.shape == (4, 16, 3, dim) and out.dtype == np.float32
    for h in range(3):
        assert np.array_equal(out[:, :, h, :], tables[h][ids[:, :, h]])
    # Uint ids and repeated rows.
    same = e.lookup(np.zeros((1, 2, 3), dtype=np.uint16))
    assert np.array_equal(same[0, 1], np.stack([t[0] for t in tables]))
    assert e.remove_from_store(force=True) == 3
    with pytest.raises(RuntimeError):
        e.lookup(ids)


def test_bad_input(store):
    e = EngramStore(0, config(2, [3]), store)
    with pytest.raises(RuntimeError):
        e.populate([np.zeros((4, 2))])
    with pytest.raises(TypeError):
        e.populate((np.zeros((3, 2)),))
    e.populate([np.ones((3, 2))])
    with pytest.raises(RuntimeError):
        e.populate([np.ones((3, 2))])
    with pytest.raises(RuntimeError):
        e.lookup(np.array([[[0.5]]]))
    with pytest.raises(RuntimeError):
        e.lookup(np.array([[[3]]]))
    with pytest.raises(TypeError):
        EngramStoreConfig().embedding_dim = "wide"
    with pytest.raises(RuntimeError):
        EngramStore(0, config(2, [3]), "not a store")
    orphan = EngramStore(1, config(2, [3]))
    with pytest.raises(RuntimeError):
        orphan.lookup(np.array([[[0]]]))
    with pytest.raises(RuntimeError, match="rc=-600"):
        orphan.remove_from_store()
    assert e.remove_from_store(True) == 1
