"""Near-duplicate images: cosine similarity of global embeddings above a threshold, exact.

Every pair is compared (no approximate index), block against block: a (B, D) @ (D, B)
product at a time, so memory is O(B² + B·D) whatever the number of rows, and the
rows themselves can live in a memory-mapped file. Pairs are then grouped into
connected components (union-find); each component keeps one representative, the
earliest image by the caller's order, and the others are its near-duplicates.

Definition (what ``brute_force_pairs`` computes and the blocked search must equal):
rows i < j form a pair when cos(eᵢ, eⱼ) = eᵢ·eⱼ / (‖eᵢ‖‖eⱼ‖) >= threshold, with the
similarity computed in float32. Zero rows (no direction) pair with nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BLOCK = 4096


def normalise_rows(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: (m, D) -> (m, D) float32; zero rows stay zero."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def brute_force_pairs(rows: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """The definition, all at once (tests and small inputs): {(i, j) : i < j, cos >= threshold}."""
    unit = normalise_rows(rows)
    sims = unit @ unit.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


def similar_pairs(unit: np.ndarray, threshold: float, queries: Sequence[int] | None = None,
                  block: int = DEFAULT_BLOCK, progress: Callable[[int], None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact blocked search over unit rows ``unit`` (N, D) (an array or a memmap).

    ``queries``: sorted row indices to search for (default: all). Every pair (i, j), i < j,
    with cos >= threshold and at least one of i, j a query is returned once, as arrays
    (i, j, similarity float32). ``progress`` is called with the number of query rows done.
    """
    n = unit.shape[0]
    query_index = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    is_query = np.zeros(n, dtype=bool)
    is_query[query_index] = True
    found_i, found_j, found_s = [], [], []
    for q_start in range(0, len(query_index), block):
        q_rows = query_index[q_start:q_start + block]
        q = np.asarray(unit[q_rows], dtype=np.float32)
        for r_start in range(0, n, block):
            r_stop = min(r_start + block, n)
            if queries is None and r_stop <= q_rows[0]:
                continue  # all-against-all: the lower triangle was seen from the other side
            sims = q @ np.asarray(unit[r_start:r_stop], dtype=np.float32).T
            qi, rj = np.nonzero(sims >= threshold)
            if len(qi) == 0:
                continue
            i, j = q_rows[qi], rj + r_start
            # Keep i < j; a pair of two queries is kept only from its smaller end.
            keep = (i < j) | ((i > j) & ~is_query[j])
            a, b = np.minimum(i, j)[keep], np.maximum(i, j)[keep]
            found_i.append(a)
            found_j.append(b)
            found_s.append(sims[qi[keep], rj[keep]])
        if progress is not None:
            progress(len(q_rows))
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s).astype(np.float32)


@dataclass(frozen=True)
class DuplicateGroups:
    """``representative[k]``: the row that row k is a near-duplicate of (k itself when it is kept).

    ``similarity[k]``: row k's highest cosine to any other member of its group (nan if alone).
    """

    representative: np.ndarray  # (N,) int64
    similarity: np.ndarray  # (N,) float32


def group_pairs(count: int, i: np.ndarray, j: np.ndarray, similarity: np.ndarray,
                order: np.ndarray | None = None) -> DuplicateGroups:
    """Connected components of the pair graph over ``count`` rows.

    ``order``: (N,) sort keys; a component's representative is its member with the
    smallest key (default: the smallest row index).
    """
    parent = np.arange(count)

    def find(node: int) -> int:
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:
            parent[node], node = root, parent[node]
        return root

    keys = np.arange(count) if order is None else np.asarray(order)
    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            # The root is always the member with the smallest key: it is the representative.
            if keys[rb] < keys[ra] or (keys[rb] == keys[ra] and rb < ra):
                ra, rb = rb, ra
            parent[rb] = ra
    representative = np.array([find(k) for k in range(count)], dtype=np.int64)
    best = np.full(count, np.nan, dtype=np.float32)
    for a, b, s in zip(i.tolist(), j.tolist(), similarity.tolist()):
        for node in (a, b):
            if np.isnan(best[node]) or s > best[node]:
                best[node] = s
    return DuplicateGroups(representative, best)
