"""Exact 1-D k-means (Lloyd) over millions of weights, on a sorted copy with prefix sums.

In one dimension every Lloyd cluster is an interval between the midpoints of neighbouring centroids. After one sort,
an iteration needs only ``k`` binary searches on the sorted array (cluster sizes) and ``k`` prefix-sum lookups
(cluster sums): O(k log n) instead of O(n k). The result is the same Lloyd iteration as argmin-over-all-points (same
init, same ties: a point on a midpoint goes to the lower centroid, like ``argmin``) -- no subsampling, unlike faiss
(docs/traps.md#faiss-kmeans-subsampling). The 134M-weight VGG16 whitening at 8 bits takes seconds; see ``benchmarks/bench_kmeans.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Block size of the float64 prefix sums: big enough that the block table is small, small enough that the partial
# block summed per lookup is cheap.
_BLOCK = 256
# Chunk used when assigning the unsorted values, so no n-sized int64 temporary is made.
_CHUNK = 1 << 22


@dataclass
class KMeans1DResult:
    """``centroids`` (k, float64, ascending); ``indices`` (n, int32, nearest centroid of each value, in input order;
    None when not requested); ``iterations`` = update steps run; ``converged`` = the assignment stopped changing;
    ``mse`` = mean squared error of the final assignment."""

    centroids: np.ndarray
    indices: np.ndarray | None
    iterations: int
    converged: bool
    mse: float


def linear_init(values: np.ndarray, k: int) -> np.ndarray:
    """``k`` evenly spaced centroids over [min, max] of ``values`` (float64); all zeros when ``values`` is empty."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = np.asarray(values)
    if values.size == 0:
        return np.zeros(k, dtype=np.float64)
    return np.linspace(float(values.min()), float(values.max()), k, dtype=np.float64)


def float32_at_or_below(points: np.ndarray) -> np.ndarray:
    """The largest float32 at or below each float64 point: for every float32 ``x``, ``x <= result[j]`` exactly when
    ``x <= points[j]``. (Rounding the point to float32 could move a value across it; rounding down cannot.)"""
    down = np.asarray(points, dtype=np.float64).astype(np.float32)
    above = down.astype(np.float64) > points
    down[above] = np.nextafter(down[above], np.float32(-np.inf))
    return down


def midpoint_boundaries(centroids: np.ndarray) -> np.ndarray:
    """Float32 decision boundaries ``b`` such that, for every float32 ``x``, ``x <= b[j]`` exactly when ``x`` is at
    most the float64 midpoint of centroids ``j`` and ``j + 1``."""
    return float32_at_or_below((centroids[:-1] + centroids[1:]) / 2.0)


def entropy_constrained_regions(
    centroids: np.ndarray, code_bits: np.ndarray, weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """Where each centroid wins ``argmin_j (x - c_j)^2 + weight * code_bits[j]`` (ties to the lower index, like
    ``argmin``): ``(members, bounds)``, the winning centroids in ascending order and float32 boundaries between
    consecutive ones (``x <= bounds[i]`` goes to ``members[i]``). A centroid with ``code_bits`` inf never wins.

    Each cost is, up to the ``x^2`` every centroid shares, a line in ``x`` (slope ``-2 c_j``); the winners are the
    lower envelope of those lines, found in one pass over the ascending centroids (the convex-hull trick)."""
    c = np.asarray(centroids, dtype=np.float64)
    slope = -2.0 * c
    code_bits = np.asarray(code_bits, dtype=np.float64)
    finite = np.isfinite(code_bits)
    offset = c * c + np.where(finite, weight * np.where(finite, code_bits, 0.0), np.inf)
    hull: list[int] = []
    for j in np.flatnonzero(np.isfinite(offset)):
        if hull and c[hull[-1]] == c[j]:
            if offset[j] >= offset[hull[-1]]:
                continue  # same line, not cheaper: the lower index keeps it
            hull.pop()
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b wins nowhere if j overtakes a no later than b does.
            if (offset[j] - offset[a]) * (slope[a] - slope[b]) <= (offset[b] - offset[a]) * (
                slope[a] - slope[j]
            ):
                hull.pop()
            else:
                break
        hull.append(int(j))
    members = np.array(hull, dtype=np.int64)
    a, b = members[:-1], members[1:]
    crossings = (offset[b] - offset[a]) / (slope[a] - slope[b])
    return members, float32_at_or_below(crossings)


def assign_1d(values: np.ndarray, centroids: np.ndarray, *, lookup_table: bool | None = None) -> np.ndarray:
    """Index of the nearest of the ascending ``centroids`` for every float32 value (int32; a value midway between
    two centroids goes to the lower one; among equal centroids, to the last).

    That index is the number of midpoint boundaries strictly below the value. Large inputs go through a lookup
    table over a fine grid of [min, max] (``lookup_table=None``: from 1M values): a grid cell with no boundary near
    it gives the index directly; only values in cells next to a boundary take a binary search. Same result as the
    binary search for every value, a few times faster."""
    x = np.ascontiguousarray(values, dtype=np.float32).ravel()
    bounds = midpoint_boundaries(np.asarray(centroids, dtype=np.float64))
    out = np.empty(x.size, dtype=np.int32)
    if x.size == 0:
        return out
    use_table = x.size >= _LUT_MIN if lookup_table is None else lookup_table
    table = _CellTable(float(x.min()), float(x.max()), bounds) if use_table and bounds.size else None
    for start in range(0, x.size, _CHUNK):
        chunk = x[start : start + _CHUNK]
        if table is None:
            # side="left" counts boundaries strictly below x: x on a boundary stays with the lower centroid.
            out[start : start + _CHUNK] = np.searchsorted(bounds, chunk, side="left")
        else:
            out[start : start + _CHUNK] = table.assign(chunk)
    return out


_LUT_MIN = 1 << 20


class _CellTable:
    """Answers "how many boundaries are below x" for most x with one table lookup.

    The grid splits [lo, hi] into ``cells`` equal cells. The float32 arithmetic that puts x in a cell may be off by
    a little, so each cell stands for the range of itself and one neighbour on each side; where the count of
    boundaries below is the same at both ends of that range it is the answer for every x there (the count is
    monotone), else the cell is marked -1 and its values take a binary search."""

    def __init__(self, lo: float, hi: float, bounds: np.ndarray) -> None:
        self.bounds = bounds
        self.cells = 1 << 18 if bounds.size < (1 << 15) else 1 << 20
        self.lo = np.float32(lo)
        width = (hi - lo) / self.cells
        self.scale = np.float32(1.0 / width) if width > 0 else np.float32(0.0)
        edges = lo + width * np.arange(-1, self.cells + 2, dtype=np.float64)
        edges[0], edges[-1] = -np.inf, np.inf  # values clipped into the first / last cell
        below = np.searchsorted(bounds.astype(np.float64), edges, side="left")
        left, right = below[: self.cells], below[3 : self.cells + 3]
        dtype = np.int16 if bounds.size < (1 << 15) else np.int32
        self.table = np.where(left == right, left, -1).astype(dtype)

    def assign(self, x: np.ndarray) -> np.ndarray:
        pos = (x - self.lo) * self.scale
        np.clip(pos, 0, self.cells - 1, out=pos)
        idx = self.table[pos.astype(np.int32)].astype(np.int32)
        unsure = np.flatnonzero(idx < 0)
        if unsure.size:
            idx[unsure] = np.searchsorted(self.bounds, x[unsure], side="left")
        return idx


class _PrefixSums:
    """Float64 prefix sums of a sorted float32 array, stored per block (n / 256 values, not n); a batch of lookups
    adds the block total to the sum of the partial block, gathered in one vectorized step."""

    def __init__(self, s: np.ndarray) -> None:
        self.s = s
        full = s.size // _BLOCK
        block_sums = s[: full * _BLOCK].reshape(full, _BLOCK).sum(axis=1, dtype=np.float64)
        self.cum = np.concatenate([[0.0], np.cumsum(block_sums)])
        self._offsets = np.arange(_BLOCK)

    def __call__(self, ends: np.ndarray) -> np.ndarray:
        """Sums of ``s[:i]`` for every ``i`` in ``ends``."""
        ends = np.asarray(ends, dtype=np.int64)
        block = ends // _BLOCK
        start = block * _BLOCK
        pos = start[:, None] + self._offsets[None, :]
        inside = pos < ends[:, None]
        part = np.where(inside, self.s[np.minimum(pos, self.s.size - 1)], 0.0).sum(axis=1, dtype=np.float64)
        return self.cum[block] + part


def kmeans_1d(
    values: np.ndarray,
    k: int | None = None,
    *,
    init: np.ndarray | None = None,
    iters: int = 30,
    return_indices: bool = True,
    rate: float = 0.0,
) -> KMeans1DResult:
    """Lloyd's k-means on all of ``values`` (flattened, as float32) from ``init`` (default: ``linear_init`` with
    ``k`` centroids). Runs at most ``iters`` update steps and stops early once the assignment no longer changes. An
    empty cluster keeps its centroid (as in the usual Lloyd). Centroids stay ascending: each is the mean of an
    interval between the previous midpoints.

    ``rate > 0``: then entropy-constrained k-means (Chou, Lookabaugh & Gray 1989), at most ``iters`` more steps
    from Lloyd's result. Each value goes to the centroid that minimizes ``(x - c_j)^2 + rate * m^2 * (-log2
    p_j)``, ``m`` being the largest ``|value|`` and ``p_j`` the share of values in cluster ``j`` at the previous
    step, so the objective is ``mse / m^2 + rate * H`` with ``H`` the order-0 entropy of the indices in bits:
    ``rate`` is how much squared error, in units of the largest squared value, one bit per value is worth. (The
    largest value, not the variance, is the unit because a channel-scaled layer's values are each channel over
    its max |w|: m = 1 in every such layer, so one rate means the same trade in all of them.) Since the file
    entropy-codes the indices, a lower ``H`` is a smaller file; clusters that stop paying for their bits empty out
    and stay empty (their centroid is then set to the nearest live one below, else above, so the codebook stays
    ascending). ``indices`` are that assignment, not the nearest centroid."""
    x = np.ascontiguousarray(values, dtype=np.float32).ravel()
    if init is None:
        if k is None:
            raise ValueError("kmeans_1d needs k or init")
        init = linear_init(x, k)
    c = np.array(init, dtype=np.float64).ravel()
    if k is not None and c.size != k:
        raise ValueError(f"init has {c.size} centroids but k={k}")
    if c.size == 0 or np.any(np.diff(c) < 0):
        raise ValueError("init must be a non-empty ascending array of centroids")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if not (np.isfinite(rate) and rate >= 0):
        raise ValueError(f"rate must be a finite number >= 0, got {rate}")
    if x.size == 0:
        empty = np.zeros(0, dtype=np.int32) if return_indices else None
        return KMeans1DResult(c, empty, 0, True, 0.0)

    s = np.sort(x)
    prefix = _PrefixSums(s)

    def lloyd_split(cent: np.ndarray, _previous: np.ndarray | None) -> np.ndarray:
        # Cluster j holds s[ends[j]:ends[j+1]]: the values <= boundary j (side="right" keeps ties low).
        inner = np.searchsorted(s, midpoint_boundaries(cent), side="right")
        return np.concatenate([[0], inner, [s.size]])

    def update(cent: np.ndarray, ends: np.ndarray) -> np.ndarray:
        sums = np.diff(prefix(ends))
        counts = np.diff(ends)
        nonempty = counts > 0
        cent = cent.copy()
        cent[nonempty] = sums[nonempty] / counts[nonempty]
        return cent

    c, ends, iterations, converged = _iterate(c, lloyd_split, update, iters)
    assign = None
    if rate > 0 and iters > 0:
        weight = rate * max(float(s[0]) ** 2, float(s[-1]) ** 2)
        # The regions of the last split: the assignment of the ``ends`` the loop returns.
        last: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def ec_split(cent: np.ndarray, cluster_ends: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore"):
                code_bits = -np.log2(np.diff(cluster_ends) / s.size)
            members, bounds = last["regions"] = entropy_constrained_regions(cent, code_bits, weight)
            member_ends = np.concatenate([np.searchsorted(s, bounds, side="right"), [s.size]])
            # A cluster that wins nowhere ends where the member before it does.
            new_ends = np.zeros(cent.size + 1, dtype=np.int64)
            new_ends[members + 1] = member_ends
            return np.maximum.accumulate(new_ends)

        c, ends, ec_iterations, converged = _iterate(c, ec_split, update, iters, start=ends)
        iterations += ec_iterations
        c = _fill_empty(c, np.diff(ends))
        members, bounds = last["regions"]

        def assign(chunk: np.ndarray) -> np.ndarray:
            return members[np.searchsorted(bounds, chunk, side="left")].astype(np.int32)

    sq = 0.0
    for j in range(c.size):
        seg = s[ends[j] : ends[j + 1]]
        if seg.size:
            d = seg.astype(np.float64) - c[j]
            sq += float(np.dot(d, d))
    mse = sq / s.size
    indices = None
    if return_indices:
        indices = assign_1d(x, c) if assign is None else _assign_chunked(x, assign)
    return KMeans1DResult(c, indices, iterations, converged, mse)


def _iterate(c, split, update, iters: int, start: np.ndarray | None = None):
    """Alternate ``update`` (centroids from the clusters) and ``split`` (clusters from the centroids and the
    previous clusters) at most ``iters`` times, stopping once the clusters no longer change: ``(centroids, ends,
    steps, converged)``."""
    ends = split(c, None) if start is None else start
    iterations, converged = 0, False
    while iterations < iters:
        c = update(c, ends)
        iterations += 1
        new_ends = split(c, ends)
        if np.array_equal(new_ends, ends):
            return c, ends, iterations, True
        ends = new_ends
    return c, ends, iterations, converged


def _fill_empty(c: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each empty cluster's centroid set to the nearest non-empty one below it (else above): ascending again."""
    live = np.flatnonzero(counts > 0)
    if live.size == 0 or live.size == c.size:
        return c
    pick = live[np.clip(np.searchsorted(live, np.arange(c.size), side="right") - 1, 0, None)]
    return c[pick]


def _assign_chunked(x: np.ndarray, assign) -> np.ndarray:
    out = np.empty(x.size, dtype=np.int32)
    for start in range(0, x.size, _CHUNK):
        out[start : start + _CHUNK] = assign(x[start : start + _CHUNK])
    return out


def quantization_mse(values: np.ndarray, codebook: np.ndarray, indices: np.ndarray) -> float:
    """Mean of ``(values - codebook[indices])**2`` in float64, in chunks (no n-sized float64 temporary)."""
    x = np.ascontiguousarray(values, dtype=np.float32).ravel()
    idx = np.asarray(indices).ravel()
    cb = np.asarray(codebook, dtype=np.float64)
    if x.size == 0:
        return 0.0
    sq = 0.0
    for start in range(0, x.size, _CHUNK):
        d = x[start : start + _CHUNK].astype(np.float64) - cb[idx[start : start + _CHUNK]]
        sq += float(np.dot(d, d))
    return sq / x.size
