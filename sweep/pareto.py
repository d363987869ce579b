"""Pareto front of a sweep: which trials no other trial beats on every objective.

Pure Python over plain rows (dicts), so the driver, the release command and the dashboards share one definition.
A row takes part when its ``status`` is ``"ok"`` (or has no ``status``) and every objective is a finite number;
the others are never on the front and get no rank. Ties: a row is dominated only by a row at least as good on
every objective and strictly better on one (`dominates`), so identical rows are all on the front together.
Objectives default to the trial contract's (``trainables.contract.OBJECTIVES``: the validation mAP up, file
size down); the test mAP is never an objective, so no front is decided on test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from trainables.contract import OBJECTIVES


def _vector(row: Mapping[str, Any], objectives: Mapping[str, str]) -> tuple[float, ...] | None:
    """The row's objectives as a tuple to *minimize*, or None when the row cannot take part."""
    if row.get("status", "ok") != "ok":
        return None
    out = []
    for key, direction in objectives.items():
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        out.append(-float(value) if direction == "max" else float(value))
    return tuple(out)


def _check_objectives(objectives: Mapping[str, str]) -> None:
    if not objectives:
        raise ValueError(f"objectives: give at least one, e.g. {dict(OBJECTIVES)!r}")
    for key, direction in objectives.items():
        if direction not in ("max", "min"):
            raise ValueError(f"objectives[{key!r}] = {direction!r}: use 'max' or 'min'")


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def dominates(a: Mapping[str, Any], b: Mapping[str, Any], objectives: Mapping[str, str] = OBJECTIVES) -> bool:
    """True when row ``a`` dominates row ``b``: both take part, ``a`` is at least as good on every objective and
    strictly better on one. The rule every front of this module is built on."""
    _check_objectives(objectives)
    va, vb = _vector(a, objectives), _vector(b, objectives)
    return va is not None and vb is not None and _dominates(va, vb)


def _front_2d(order: list[int], vectors: Sequence[tuple[float, ...] | None]) -> set[int]:
    """Front of two minimized objectives in one pass over ``order`` (indices sorted by (first, second)).

    A point is dominated by an earlier group (strictly smaller first objective) with a second objective ≤ its own,
    or by a point of its own group with a strictly smaller second; so it is on the front iff it has its group's
    smallest second objective and that is strictly below every earlier group's."""
    front: set[int] = set()
    best = math.inf
    n = len(order)
    start = 0
    while start < n:
        first = vectors[order[start]][0]
        end = start
        while end < n and vectors[order[end]][0] == first:
            end += 1
        group_min = vectors[order[start]][1]  # sorted: the group's first entry has its smallest second value
        if group_min < best:
            front.update(i for i in order[start:end] if vectors[i][1] == group_min)
            best = group_min
        start = end
    return front


def pareto_ranks(
    points: Sequence[Mapping[str, Any]], objectives: Mapping[str, str] = OBJECTIVES
) -> list[int | None]:
    """Non-dominated sorting: 0 for the front, 1 for the front once it is removed, …; ``None`` for rows that
    cannot take part (status not ok, an objective missing or not finite). Two objectives: a sort and a sweep per
    front; more: Deb et al.'s fast non-dominated sort (NSGA-II), O(M·N²)."""
    _check_objectives(objectives)
    vectors = [_vector(p, objectives) for p in points]
    valid = [i for i, v in enumerate(vectors) if v is not None]
    ranks: list[int | None] = [None] * len(points)
    if len(objectives) == 2:
        # Peel fronts off the sorted order: O(n log n + n·fronts) instead of O(n²).
        remaining = sorted(valid, key=lambda i: vectors[i])
        rank = 0
        while remaining:
            front = _front_2d(remaining, vectors)
            for i in front:
                ranks[i] = rank
            remaining = [i for i in remaining if i not in front]
            rank += 1
        return ranks
    dominated_by_count = {i: 0 for i in valid}
    dominates: dict[int, list[int]] = {i: [] for i in valid}
    for n, i in enumerate(valid):
        for j in valid[n + 1 :]:
            if _dominates(vectors[i], vectors[j]):
                dominates[i].append(j)
                dominated_by_count[j] += 1
            elif _dominates(vectors[j], vectors[i]):
                dominates[j].append(i)
                dominated_by_count[i] += 1
    current = [i for i in valid if dominated_by_count[i] == 0]
    rank = 0
    while current:
        following = []
        for i in current:
            ranks[i] = rank
            for j in dominates[i]:
                dominated_by_count[j] -= 1
                if dominated_by_count[j] == 0:
                    following.append(j)
        current = following
        rank += 1
    return ranks


def non_dominated_mask(
    points: Sequence[Mapping[str, Any]], objectives: Mapping[str, str] = OBJECTIVES
) -> list[bool]:
    """True for each row on the Pareto front (rank 0); rows that cannot take part are False."""
    _check_objectives(objectives)
    vectors = [_vector(p, objectives) for p in points]
    if len(objectives) == 2:
        front = _front_2d(
            sorted((i for i, v in enumerate(vectors) if v is not None), key=lambda i: vectors[i]), vectors
        )
        return [i in front for i in range(len(points))]
    valid = [v for v in vectors if v is not None]
    return [v is not None and not any(_dominates(w, v) for w in valid) for v in vectors]


def pareto_front(
    points: Sequence[Mapping[str, Any]],
    objectives: Mapping[str, str] = OBJECTIVES,
    sort_by: str | None = None,
) -> list[Mapping[str, Any]]:
    """The front's rows, sorted by ``sort_by`` (default: the last objective, i.e. memory, ascending)."""
    mask = non_dominated_mask(points, objectives)
    key = sort_by or list(objectives)[-1]
    return sorted((p for p, on in zip(points, mask) if on), key=lambda p: p[key])
