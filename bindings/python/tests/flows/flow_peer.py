"""Process B of the two-process flows in test_store_flows.py.

    python flow_peer.py MASTER_ADDR MODE

Sets up a store client (600 MiB segment) against MASTER_ADDR and registers a 1 GiB host pool once, prints
"SETUP <hostname>", then reads commands from stdin, one a line, and answers each with one line on stdout:

- ``hicache``: SGLang HiCache shape: batch_is_exist over the 128 page keys, batch_put_from of only the
  missing ones (1 MiB each from the pool), and the same with batch_put_from_multi_buffers for the 128
  "mpage" keys (two 512 KiB pieces each). Answers "READY <pages put> <mpages put>".
- ``lmcache``: LMCache shape: put_from of 4 chunks of 16 MiB and one partial chunk of 5 MiB.
  Answers "READY <number of chunks put>".
- ``quit``: closes the client and exits 0.

Any failure answers "ERROR <message>". `pattern` is shared with the test, which imports this module.
"""

import sys

import numpy as np

MiB = 1 << 20
PAGES = 128
PAGE = MiB
CHUNK = 16 * MiB
CHUNKS = 4
PARTIAL = 5 * MiB


def pattern(n: int, seed: int) -> np.ndarray:
    """n deterministic bytes that differ per seed."""
    return ((np.arange(n, dtype=np.uint64) * (2 * seed + 1) + seed * 7) % 251).astype(np.uint8)


def page_keys(prefix: str = "page"):
    return [f"hicache_{prefix}_{i}" for i in range(PAGES)]


def chunk_keys():
    return [f"lmcache_chunk_{i}" for i in range(CHUNKS)] + ["lmcache_partial"]


def chunk_size(i: int) -> int:
    return CHUNK if i < CHUNKS else PARTIAL


def setup_store(master_addr: str, segment=600 * MiB, local_buffer=64 * MiB):
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", segment, local_buffer, "tcp", "", master_addr)
    if rc != 0:
        raise RuntimeError(f"setup failed: {rc}")
    return store


def hicache(store, pool: np.ndarray) -> str:
    base = pool.ctypes.data
    # Single-buffer pages at [0, 128 MiB).
    keys = page_keys()
    exist = store.batch_is_exist(keys)
    missing = [i for i, e in enumerate(exist) if e != 1]
    if any(e not in (0, 1) for e in exist):
        return f"ERROR batch_is_exist {exist}"
    for i in missing:
        pool[i * PAGE : (i + 1) * PAGE] = pattern(PAGE, i)
    if missing:
        res = store.batch_put_from([keys[i] for i in missing], [base + i * PAGE for i in missing], [PAGE] * len(missing))
        if res != [0] * len(missing):
            return f"ERROR batch_put_from {res}"
    # Multi-buffer pages: first halves at [256 MiB, +64 MiB), second halves at [512 MiB, +64 MiB).
    mkeys = page_keys("mpage")
    mexist = store.batch_is_exist(mkeys)
    mmissing = [i for i, e in enumerate(mexist) if e != 1]
    half = PAGE // 2
    for i in mmissing:
        whole = pattern(PAGE, 1000 + i)
        pool[256 * MiB + i * half : 256 * MiB + (i + 1) * half] = whole[:half]
        pool[512 * MiB + i * half : 512 * MiB + (i + 1) * half] = whole[half:]
    if mmissing:
        res = store.batch_put_from_multi_buffers(
            [mkeys[i] for i in mmissing],
            [[base + 256 * MiB + i * half, base + 512 * MiB + i * half] for i in mmissing],
            [[half, half] for _ in mmissing],
        )
        if res != [0] * len(mmissing):
            return f"ERROR batch_put_from_multi_buffers {res}"
    return f"READY {len(missing)} {len(mmissing)}"


def lmcache(store, pool: np.ndarray) -> str:
    base = pool.ctypes.data
    put = 0
    for i, key in enumerate(chunk_keys()):
        n = chunk_size(i)
        off = i * CHUNK
        pool[off : off + n] = pattern(n, 500 + i)
        rc = store.put_from(key, base + off, n)
        if rc != 0:
            return f"ERROR put_from {key} {rc}"
        put += 1
    return f"READY {put}"


def main() -> int:
    master_addr, mode = sys.argv[1], sys.argv[2]
    store = setup_store(master_addr)
    pool = np.empty(1 << 30, dtype=np.uint8)
    rc = store.register_buffer(pool.ctypes.data, pool.nbytes)
    if rc != 0:
        print(f"ERROR register_buffer {rc}", flush=True)
        return 1
    print(f"SETUP {store.get_hostname()}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        try:
            if cmd == "hicache" and mode == "hicache":
                answer = hicache(store, pool)
            elif cmd == "lmcache" and mode == "lmcache":
                answer = lmcache(store, pool)
            else:
                answer = f"ERROR unknown command {cmd!r} in mode {mode}"
        except Exception as e:  # noqa: BLE001
            answer = f"ERROR {e!r}"
        print(answer, flush=True)
    store.unregister_buffer(pool.ctypes.data)
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
