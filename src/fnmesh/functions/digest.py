"""The bundle's digest: a SHA-256 tree that both cores can compute at once.

``tree_sha256(data)`` is SHA-256 over the concatenated SHA-256 digests of each
256 KiB chunk (the last one may be shorter; empty data has one empty chunk).
Chunks are independent, so the work spreads over a small thread pool (hashlib
releases the GIL for large buffers): on a 2-core edge box a bundle verifies in
about half the time of one sequential SHA-256 pass.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

CHUNK = 256 * 1024
ALGORITHM = "sha256-tree-256KiB"
_WORKERS = max(1, min(4, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="fnmesh-digest")
        atexit.register(_pool.shutdown, wait=False)
    return _pool


def _leaf(view: memoryview) -> bytes:
    return hashlib.sha256(view).digest()


def tree_sha256(data: bytes | memoryview) -> str:
    """The tree digest (hex)."""
    view = memoryview(data).cast("B")
    n = len(view)
    chunks = [view[i : i + CHUNK] for i in range(0, n, CHUNK)] or [view]
    if len(chunks) < 2 or _WORKERS == 1:
        leaves = _leaves(chunks)
    else:
        # One contiguous span per core; the calling thread hashes the first itself
        # (one thread hand-off fewer), the pool the rest.
        per = -(-len(chunks) // _WORKERS)
        spans = [chunks[i : i + per] for i in range(0, len(chunks), per)]
        rest = [_get_pool().submit(_leaves, s) for s in spans[1:]]
        leaves = _leaves(spans[0])
        for f in rest:
            leaves += f.result()
    return hashlib.sha256(b"".join(leaves)).hexdigest()


def _leaves(span: list[memoryview]) -> list[bytes]:
    return [_leaf(c) for c in span]
