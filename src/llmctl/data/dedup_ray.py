"""Near-duplicate pairs as a Ray task graph: `ray_near_pairs(engine)` gives the function
`data.dedup.plan_dedup` takes as `pairs=`, with the same result as `dd.near_pairs` in one
process (`tests/test_ray_engine.py`). Used by `llmctl dedup` when the engine is Ray.
"""

from __future__ import annotations

import numpy as np

from llmctl.data import dedup as dd
from llmctl.data.engine import RayEngine

# Documents per band-key task, and shuffle partitions per cluster CPU (the output does not
# depend on either; they trade task overhead against balance).
BAND_BLOCK_DOCS = 65_536
PARTITIONS_PER_CPU = 2


def _band_entries(
    sig: np.ndarray, nodes: np.ndarray, bands: int, rows: int, parts: int
) -> list[np.ndarray] | np.ndarray:
    out = dd.band_entries(sig, nodes, bands, rows, parts)
    return out if parts > 1 else out[0]  # a task with num_returns=1 returns one value


def _bucket_pairs(
    sig: np.ndarray, threshold: float, verify: bool, *entries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return dd.verify_packed(sig, dd.bucket_pairs(np.concatenate(entries)), threshold, verify)


def ray_near_pairs(engine: RayEngine) -> dd.NearPairs:
    """`dd.near_pairs` as a Ray task graph, same result (see `dd.band_entries`).

    Map: band keys of blocks of documents, each split into P partitions by key. Shuffle: Ray
    moves partition p of every block to reduce task p. Reduce: pairs per bucket and their
    verification against the signatures (one copy per node in the object store). The driver
    only gathers the verified and rejected pairs, 8 bytes each, and runs union-find on them.
    """

    def find(
        sig: np.ndarray, nodes: np.ndarray, bands: int, rows: int, threshold: float, verify: bool
    ) -> tuple[np.ndarray, np.ndarray, int]:
        parts = max(1, PARTITIONS_PER_CPU * engine.workers)
        sig_ref = engine.put(sig)
        mapper = engine.remote(_band_entries, num_returns=parts)
        blocks = [
            mapper.remote(sig_ref, nodes[s : s + BAND_BLOCK_DOCS], bands, rows, parts)
            for s in range(0, len(nodes), BAND_BLOCK_DOCS)
        ]
        if not blocks:
            return np.empty(0, np.int64), np.empty(0, np.int64), 0
        blocks = [b if parts > 1 else [b] for b in blocks]
        reducer = engine.remote(_bucket_pairs)
        results = engine.get(
            [
                reducer.remote(sig_ref, threshold, verify, *(b[p] for b in blocks))
                for p in range(parts)
            ]
        )
        ok = np.unique(np.concatenate([np.zeros(0, np.uint64), *(r[0] for r in results)]))
        bad = np.unique(np.concatenate([np.zeros(0, np.uint64), *(r[1] for r in results)]))
        i, j = dd.unpack_pairs(ok)
        return i, j, len(ok) + len(bad)

    return find
