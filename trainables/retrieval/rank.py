"""Nearest-neighbour ranking of a database for a set of queries (faiss, exact inner product on unit vectors).

The output of `rank_database` is laid out the way :mod:`trainables.retrieval.metrics` reads it: ``ranks[:, q]``
lists database indices for query ``q``, best first.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["gpu_available", "rank_database"]

# faiss GPU k-selection handles at most this many neighbours per query (GPU_MAX_SELECTION_K in faiss/gpu).
_GPU_MAX_K = 2048


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _prepare(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d) of descriptors, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); need at least one descriptor")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must hold floating-point descriptors, got dtype {arr.dtype}")
    # Always a fresh float32 copy: normalize_L2 works in place and the caller's array must stay untouched.
    arr = np.array(arr, dtype=np.float32, order="C", copy=True)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.nonzero(bad)[0]
        raise ValueError(
            f"{name} has non-finite values (NaN/inf) in {rows.size} row(s), first rows {rows[:5].tolist()}; "
            "the model produced broken descriptors"
        )
    # Unit length makes inner product = cosine similarity; all-zero rows stay zero (score 0 with everything).
    faiss.normalize_L2(arr)
    return arr


def rank_database(
    db: np.ndarray,
    queries: np.ndarray,
    top_k: int | None = None,
    use_gpu: bool | None = None,
) -> np.ndarray:
    """Rank ``db`` (n_db, d) for each of ``queries`` (n_q, d) by cosine similarity.

    Returns int64 ``(k, n_q)`` database indices, best first, with ``k = n_db`` by default or ``min(top_k, n_db)``.
    Descriptors are L2-normalized (a copy) before the exact inner-product search. ``use_gpu=None`` uses a faiss
    GPU index when one is available and ``k`` fits its k-selection limit (2048), else the CPU; ``True`` insists.
    """
    db32 = _prepare(db, "db")
    q32 = _prepare(queries, "queries")
    if db32.shape[1] != q32.shape[1]:
        raise ValueError(
            f"db descriptors have dimension {db32.shape[1]} but queries have {q32.shape[1]}; "
            "extract both with the same model"
        )
    n_db, d = db32.shape
    if top_k is not None and (not isinstance(top_k, int | np.integer) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (rank everything), got {top_k!r}")
    k = n_db if top_k is None else min(int(top_k), n_db)

    on_gpu = (gpu_available() and k <= _GPU_MAX_K) if use_gpu is None else bool(use_gpu)
    if on_gpu:
        if not gpu_available():
            raise RuntimeError("use_gpu=True but this faiss build has no GPU support or sees no GPU")
        if k > _GPU_MAX_K:
            raise ValueError(f"faiss GPU search returns at most {_GPU_MAX_K} neighbours, asked for {k}")
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, d)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(db32)
    _, idx = index.search(q32, k)
    return np.ascontiguousarray(idx.T, dtype=np.int64)
