"""The search's score: the hypervolume of a sweep's front against a fixed reference point, and its curve over trials.

The hypervolume is the area of the objective plane that the trials dominate and the reference point does not: a
front that gets more accurate, or smaller, or fuller, scores more, and one number compares two sweeps (or one
sweep's progress) on the same base. It is measured on the objectives the search sees (``OBJECTIVES``: the
validation mAP, up, and the file's ``memory_mib``, down), never on test.

- **Axes**: validation mAP (linear) × **log10 of memory in MiB**. Fronts span 10x to 100x of compression, and on a
  linear memory axis the first 2x (the dense base down to half its size) would outweigh everything after it; on
  the log axis every halving of the file is worth the same. The unit is "mAP × decades of MiB" (`UNIT`).
- **Reference point** (`reference_point`): the dense base's file size (``memory_mib`` of the base's meta) and the
  best zero-byte baseline on the validation splits (`trainables.contract.best_zero_byte_baseline`; 0 when the
  meta has no baselines). A point scores only if it beats both: smaller than shipping the base uncompressed, and
  more accurate than what no model bytes at all achieve.

The area itself is Optuna's (``optuna._hypervolume.compute_hypervolume``, which minimizes: mAP is negated).
Plain data in, floats out: no Ray, no MLflow (`sweep.tracking` logs it, `sweep.callbacks` while trials run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from trainables.contract import MAP_KEY, MEMORY_KEY, OBJECTIVES, best_zero_byte_baseline

#: What the hypervolume's number measures (labels of plots and tables).
UNIT = "mAP × decades of MiB"
AXES = f"{MAP_KEY} × log10({MEMORY_KEY})"
#: Tune's states of a trial that has not ended (`sweep.results.collect_rows` lower-cases them): such a row is not a
#: trial done. Every other status is (``ok`` completed; ``failed`` or any other end gives no point).
NOT_DONE = frozenset({"pending", "running", "paused"})
#: Tune's wall-clock time of a result (seconds, whole), which every report carries: the order trials ended in.
_RESULT_TIME = "timestamp"


def _is_number(value: Any) -> bool:
    """A finite int or float (a bool is neither here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def reference_point(base_meta: Mapping[str, Any], split: str = "val") -> tuple[float, float]:
    """``(memory_ref_mib, map_ref)``: the dense base's file size in MiB (the meta's ``memory_mib``) and the mAP of
    the best zero-byte baseline averaged over the base's ``{split}_splits`` (``val``: what the search sees; 0 when
    the meta has no baselines). Raises ValueError naming the meta key when the meta cannot give it."""
    memory = base_meta.get(MEMORY_KEY)
    if not _is_number(memory) or memory <= 0:
        raise ValueError(
            f"base meta.json: {MEMORY_KEY} = {memory!r}; the hypervolume's reference point needs the dense base's "
            "file size in MiB, a number > 0. sweep.base_cache writes it when the sweep builds the base; a base "
            "folder written by `python -m trainables.base` alone lacks it — let the sweep build the base, or add "
            f'"{MEMORY_KEY}": <size of model.safetensors in MiB> to its meta.json.'
        )
    baselines = base_meta.get("baselines") or {}
    if not baselines:
        return float(memory), 0.0
    splits_key = f"{split}_splits"
    splits = list(base_meta.get(splits_key) or [])
    missing = [s for s in splits if s not in baselines]
    if not splits or missing:
        raise ValueError(
            f"base meta.json: {splits_key} = {splits!r} but baselines are measured on {sorted(baselines)!r}; the "
            f"hypervolume's reference mAP is the best zero-byte baseline averaged over the {split} splits, so "
            f"every one of them needs its baselines (rebuild the base)."
        )
    try:
        _, value = best_zero_byte_baseline(baselines, splits)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"base meta.json: baselines on {splits!r} lack a zero-byte baseline or hold a non-number ({exc!r}); "
            "rebuild the base."
        ) from exc
    return float(memory), float(value)


def _vector(point: Mapping[str, Any]) -> tuple[float, ...] | None:
    """The point on the hypervolume's axes as a tuple to *minimize* (mAP negated, memory as log10), or None when
    it adds nothing: a status other than ``ok``, an objective missing or not finite, a memory ≤ 0."""
    if point.get("status", "ok") != "ok":
        return None
    out = []
    for key, direction in OBJECTIVES.items():
        value = point.get(key)
        if not _is_number(value):
            return None
        if key == MEMORY_KEY:
            if value <= 0:
                return None
            value = math.log10(value)
        out.append(-float(value) if direction == "max" else float(value))
    return tuple(out)


def _reference_vector(reference: tuple[float, float]) -> tuple[float, ...]:
    memory, value = reference
    vector = _vector({MEMORY_KEY: memory, MAP_KEY: value})
    if vector is None:
        raise ValueError(
            f"hypervolume reference {reference!r}: give (memory_mib > 0, mAP) as finite numbers (reference_point)"
        )
    return vector


def _area(vectors: Sequence[tuple[float, ...]], reference: tuple[float, ...]) -> float:
    if not vectors:
        return 0.0
    # Lazy: Optuna is half a second of import that the refused sweep start and the release command never need.
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(np.asarray(vectors, dtype=float), np.asarray(reference, dtype=float)))


def _beating(points: Iterable[Mapping[str, Any]], reference: tuple[float, ...]) -> list[tuple[float, ...]]:
    """The points' vectors strictly better than the reference on every axis (the others add no area)."""
    vectors = (_vector(p) for p in points)
    return [v for v in vectors if v is not None and all(a < r for a, r in zip(v, reference))]


def hypervolume(points: Iterable[Mapping[str, Any]], reference: tuple[float, float]) -> float:
    """The area that ``points`` (rows or plain mappings with ``val_mAP`` and ``memory_mib``; a ``status`` other
    than ``ok`` adds nothing) dominate above the reference, on validation mAP × log10(memory MiB) — `UNIT`.
    ``reference`` is ``(memory_ref_mib, map_ref)`` (`reference_point`); only points smaller and more accurate
    than it count, dominated ones add nothing. 0 when none beats it."""
    ref = _reference_vector(reference)
    return _area(_beating(points, ref), ref)


def hypervolume_curve(
    rows_in_completion_order: Iterable[Mapping[str, Any]], reference: tuple[float, float]
) -> list[tuple[int, float]]:
    """``(trials_done, hypervolume)`` after each trial that ended, in the order given (`completion_order`). A
    failed trial, or one without objectives, counts as a trial done and adds no point; a trial that has not ended
    (`NOT_DONE`) is skipped. Never decreases: a point only adds area."""
    ref = _reference_vector(reference)
    curve: list[tuple[int, float]] = []
    beating: list[tuple[float, ...]] = []
    value = 0.0
    for row in rows_in_completion_order:
        if row.get("status", "ok") in NOT_DONE:
            continue
        new = _beating([row], ref)
        if new:
            beating.extend(new)
            value = _area(beating, ref)
        curve.append((len(curve) + 1, value))
    return curve


def completion_order(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``rows`` (`sweep.results.collect_rows`) in the order their trials ended, as far as Ray's storage tells: by
    the time of each trial's last report (whole seconds; Ray keeps no end time), ties and trials that never
    reported keep their order (the trials' creation), the latter after the others."""

    def ended(row: Mapping[str, Any]) -> float:
        value = (row.get("result") or {}).get(_RESULT_TIME)
        return float(value) if _is_number(value) else math.inf

    return sorted(rows, key=ended)
