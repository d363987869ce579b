"""Oxford/Paris mean average precision, identical to Oxford's ``compute_ap.cpp`` and cnnimageretrieval's.

AP is the area under the precision-recall curve by the trapezoid rule, as the Oxford buildings protocol defines it
(not scikit-learn's step sum). With ``r_j`` the 0-based rank of the (j+1)-th positive after junk images have been
removed from the ranking, and ``n`` positives::

    AP = sum_j (1/n) * (p0_j + p1_j) / 2,   p0_j = 1 if r_j == 0 else j / r_j,   p1_j = (j + 1) / (r_j + 1)

Conventions, the same as the reference implementations:

- ``ranks`` is an int array ``(n_ranked, n_queries)`` of database indices, best first (column ``q`` ranks the
  database for query ``q``). ``n_ranked`` may be smaller than the database (a top-k ranking): positives that are
  not in the list count as not retrieved -- they add nothing to the sum but still count in ``n``, which is what
  cnnimageretrieval's ``compute_map`` and ``compute_ap.cpp`` do with a truncated list.
- Junk images are dropped from the ranking before the positives' ranks are taken. An index listed both as
  positive and as junk is junk, as in ``compute_ap.cpp`` (it then can never be retrieved but still counts in ``n``).
  Duplicate indices in a ground-truth list count once (the C++ code uses sets).
- Queries without positives are skipped: their AP is NaN and the mean is over the others.

Everything is vectorized over queries: an Oxford-sized evaluation (5063 x 55) takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "average_precisions",
    "compute_ap",
    "mean_average_precision",
    "revisited_gnd",
    "revisited_map",
]

Protocol = Literal["easy", "medium", "hard"]

# protocol -> (keys whose union is "ok", keys whose union is "junk")
_PROTOCOL_PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def compute_ap(pos_ranks: np.ndarray, n_pos: int) -> float:
    """AP of one query from the sorted 0-based ranks of its retrieved positives (junk already removed).

    ``n_pos`` is the number of positives of the query, retrieved or not; ranks of positives that were not
    retrieved are simply absent from ``pos_ranks``.
    """
    r = np.asarray(pos_ranks, dtype=np.float64).ravel()
    if n_pos <= 0:
        raise ValueError(f"n_pos must be a positive count of positives, got {n_pos}")
    if r.size > n_pos:
        raise ValueError(f"got {r.size} positive ranks but n_pos={n_pos}; n_pos counts every positive")
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    if np.any(np.diff(r) <= 0) or np.any(r < j):
        raise ValueError(
            "pos_ranks must be distinct 0-based ranks sorted ascending (the j-th positive cannot rank above j), "
            f"got {np.asarray(pos_ranks).tolist()[:10]}"
        )
    return float(_trapezoids(j, r).sum() / n_pos)


def _trapezoids(j: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(p0 + p1) / 2 for positives number j (0-based) at ranks r; p0 = 1 at rank 0 (the curve starts at 1)."""
    p0 = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    p1 = (j + 1.0) / (r + 1.0)
    return 0.5 * (p0 + p1)


def _as_index_array(values: object, what: str) -> np.ndarray:
    arr = np.asarray(values if values is not None else [], dtype=np.float64).ravel()
    if arr.size and (np.any(arr < 0) or np.any(arr != np.floor(arr))):
        raise ValueError(f"{what} must hold non-negative integer database indices, got {arr[:10].tolist()}")
    return np.unique(arr.astype(np.int64))


def _check_ranks(ranks: np.ndarray, n_queries: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D (n_ranked, n_queries), got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    if ranks.shape[1] != n_queries:
        hint = (
            " (did you pass it transposed? expected (n_ranked, n_queries))"
            if ranks.shape[0] == n_queries
            else ""
        )
        raise ValueError(f"ranks has {ranks.shape[1]} columns but gnd has {n_queries} queries{hint}")
    if ranks.size and ranks.min() < 0:
        raise ValueError(
            f"ranks holds a negative index ({int(ranks.min())}); faiss pads with -1 when k exceeds the database"
        )
    if ranks.shape[0] > 1:
        s = np.sort(ranks, axis=0)
        dup = np.nonzero(np.any(s[1:] == s[:-1], axis=0))[0]
        if dup.size:
            raise ValueError(
                f"ranks lists a database index twice for query {int(dup[0])}; each column must be a ranking"
            )
    return ranks.astype(np.int64, copy=False)


def average_precisions(ranks: np.ndarray, gnd: Sequence[Mapping[str, object]]) -> np.ndarray:
    """Per-query AP, shape ``(n_queries,)``; NaN for queries without positives.

    ``gnd[q]["ok"]`` are the positives of query ``q`` and ``gnd[q]["junk"]`` (optional) the images to ignore.
    """
    n_q = len(gnd)
    ranks = _check_ranks(ranks, n_q)
    oks, junks = [], []
    for q, g in enumerate(gnd):
        if "ok" not in g:
            raise KeyError(f"gnd[{q}] has no 'ok' list (keys: {sorted(g)}); pass positives under 'ok'")
        oks.append(_as_index_array(g["ok"], f"gnd[{q}]['ok']"))
        junks.append(_as_index_array(g.get("junk"), f"gnd[{q}]['junk']"))

    n_pos = np.array([o.size for o in oks], dtype=np.int64)
    aps = np.full(n_q, np.nan)
    if ranks.shape[0] == 0 or n_q == 0:
        aps[n_pos > 0] = 0.0
        return aps

    # One label row per query over the whole database: +1 positive, -1 junk (junk wins, as in compute_ap.cpp).
    n_db = int(max([ranks.max()] + [a.max() for a in oks + junks if a.size])) + 1
    labels = np.zeros((n_q, n_db), dtype=np.int8)
    for q in range(n_q):
        labels[q, oks[q]] = 1
        labels[q, junks[q]] = -1
    ranked = labels[np.arange(n_q)[None, :], ranks].T  # (n_q, n_ranked): label of each ranked image

    is_pos = ranked == 1
    junk_before = np.cumsum(ranked == -1, axis=1)
    pos_seen = np.cumsum(is_pos, axis=1)
    q_idx, pos_at = np.nonzero(is_pos)  # row-major: grouped by query, ranks ascending within a query
    r = (pos_at - junk_before[q_idx, pos_at]).astype(np.float64)
    j = (pos_seen[q_idx, pos_at] - 1).astype(np.float64)
    contrib = _trapezoids(j, r) / n_pos[q_idx]
    sums = np.bincount(q_idx, weights=contrib, minlength=n_q)
    has_pos = n_pos > 0
    aps[has_pos] = sums[has_pos]
    return aps


def mean_average_precision(ranks: np.ndarray, gnd: Sequence[Mapping[str, object]]) -> float:
    """mAP over the queries that have positives; ``ValueError`` if none has any."""
    aps = average_precisions(ranks, gnd)
    if not np.any(~np.isnan(aps)):
        raise ValueError(
            f"none of the {len(gnd)} queries has a positive ('ok' lists are all empty); mAP is undefined"
        )
    return float(np.nanmean(aps))


def revisited_gnd(gnd: Sequence[Mapping[str, object]], protocol: Protocol) -> list[dict[str, np.ndarray]]:
    """Turn revisited ground truth (``easy``/``hard``/``junk`` per query) into ``ok``/``junk`` for one protocol.

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk. Hard: ok = hard, junk = junk + easy.
    (Radenovic et al. 2018; cnnimageretrieval's ``compute_map_and_print``.)
    """
    if protocol not in _PROTOCOL_PARTS:
        raise ValueError(f"unknown revisited protocol {protocol!r}; use one of {list(_PROTOCOL_PARTS)}")
    ok_keys, junk_keys = _PROTOCOL_PARTS[protocol]
    out = []
    for q, g in enumerate(gnd):
        missing = [k for k in ("easy", "hard", "junk") if k not in g]
        if missing:
            raise KeyError(
                f"gnd[{q}] lacks {missing}: revisited ground truth needs 'easy', 'hard' and 'junk'"
            )
        out.append({"ok": _concat(g, ok_keys), "junk": _concat(g, junk_keys)})
    return out


def _concat(g: Mapping[str, object], keys: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in keys])


def revisited_map(ranks: np.ndarray, gnd: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """mAP under the revisited Easy, Medium and Hard protocols: ``{"easy": .., "medium": .., "hard": ..}``."""
    return {p: mean_average_precision(ranks, revisited_gnd(gnd, p)) for p in ("easy", "medium", "hard")}
