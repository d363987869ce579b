"""Pareto-aware early stopping, the rule: when a trial's partial result after its ``prune`` stage cannot reach the
front of the trials that have finished (docs/early-stopping.md).

MO-ASHA in spirit, with one rung: with ``--early-stop`` every trial reports, at the end of
``trainables.contract.EARLY_STAGE``, a projection of its two objectives (``EARLY_OBJECTIVES``: the projected size
of the file it would ship and the pruned model's validation mAP). `EarlyStopRule.reason` stops it when a point of
the completed trials' Pareto front (`sweep.pareto`: non-dominated sorting, never a weighted sum) dominates the
projection even after the projection is credited with the margins — ``map_margin`` absolute mAP added,
``memory_margin`` of the size taken off — and only once ``min_completed`` trials have finished.

Pure and Ray-free, so the command line reads the defaults and checks the values before Ray starts; the Ray Tune
scheduler that applies it is `sweep.early_stop_scheduler.ParetoEarlyStopping`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sweep.pareto import dominates, non_dominated_mask
from trainables.contract import EARLY_OBJECTIVES, EARLY_STAGE, MAP_KEY, MEMORY_KEY, OBJECTIVES, STAGE_KEY

# The margins are per objective and read the objectives by name: fail at import, not mid-sweep, if the contract's
# objectives change.
assert OBJECTIVES == {MAP_KEY: "max", MEMORY_KEY: "min"}, "early stopping's margins assume (mAP max, MiB min)"
assert set(EARLY_OBJECTIVES) == set(OBJECTIVES), "every objective needs its early projection"

#: Absolute validation mAP a projection is credited with. The quantize stage's fine-tune keeps training: on the
#: tiny trials measured the final mAP ended from 0.118 below to 0.041 above the pruned model's, the highest with
#: the shipped recipe (lr 3e-3, 15 + 15 steps; docs/early-stopping.md); 0.05 is just above that.
DEFAULT_MAP_MARGIN = 0.05
#: Fraction of the projected size taken off: with k-means the projection is the final size exactly (the indices
#: stay fixed while the codebook trains); with uniform quantization it was within 0.01%.
DEFAULT_MEMORY_MARGIN = 0.01
#: Trials that must have finished before anything is stopped: a front of one or two points says little.
DEFAULT_MIN_COMPLETED = 3


@dataclass(frozen=True)
class FrontPoint:
    """A completed trial's final objectives, under the trial's readable name (``t0003``)."""

    name: str
    values: Mapping[str, float]


def _finite_values(result: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, float] | None:
    """``{objective: value}`` read from ``result`` under ``keys[objective]``; None unless all are finite numbers."""
    out = {}
    for objective, key in keys.items():
        value = result.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        out[objective] = float(value)
    return out


def early_point(result: Mapping[str, Any]) -> dict[str, float] | None:
    """A report's early projection as objectives (``{val_mAP, memory_mib}``), or None when it is not the
    ``EARLY_STAGE`` report or carries no signal (a sweep without ``early_signal``)."""
    if result.get(STAGE_KEY) != EARLY_STAGE:
        return None
    return _finite_values(result, EARLY_OBJECTIVES)


def final_point(result: Mapping[str, Any]) -> dict[str, float] | None:
    """A completed trial's objectives, or None when its last result has no finite objectives."""
    return _finite_values(result, {k: k for k in OBJECTIVES})


@dataclass(frozen=True)
class EarlyStopRule:
    """When a trial stops after ``EARLY_STAGE``; the values are checked when the rule is made (``ValueError``
    naming the value and what is allowed)."""

    map_margin: float = DEFAULT_MAP_MARGIN
    memory_margin: float = DEFAULT_MEMORY_MARGIN
    min_completed: int = DEFAULT_MIN_COMPLETED

    def __post_init__(self) -> None:
        if isinstance(self.map_margin, bool) or not (
            isinstance(self.map_margin, int | float)
            and math.isfinite(self.map_margin)
            and self.map_margin >= 0
        ):
            raise ValueError(
                f"map margin {self.map_margin!r}: use an absolute mAP >= 0, e.g. {DEFAULT_MAP_MARGIN}"
            )
        if isinstance(self.memory_margin, bool) or not (
            isinstance(self.memory_margin, int | float) and 0 <= self.memory_margin < 1
        ):
            raise ValueError(
                f"memory margin {self.memory_margin!r}: use a fraction in [0, 1), e.g. {DEFAULT_MEMORY_MARGIN}"
            )
        if (
            isinstance(self.min_completed, bool)
            or not isinstance(self.min_completed, int)
            or self.min_completed < 1
        ):
            raise ValueError(f"min completed {self.min_completed!r}: use an integer >= 1")

    def reason(self, point: Mapping[str, float], completed: Sequence[FrontPoint]) -> str | None:
        """Why a trial whose early projection is ``point`` should stop, or None when it goes on.

        It stops when at least ``min_completed`` trials have completed and a point of their front dominates
        (`sweep.pareto.dominates`) the credited projection: mAP + ``map_margin``, size × (1 − ``memory_margin``).
        Of several such front points the reason names the smallest file."""
        if len(completed) < self.min_completed:
            return None
        credited = {
            MAP_KEY: point[MAP_KEY] + self.map_margin,
            MEMORY_KEY: point[MEMORY_KEY] * (1.0 - self.memory_margin),
        }
        rows = [dict(c.values) for c in completed]
        front = [c for c, on in zip(completed, non_dominated_mask(rows)) if on]
        beaters = sorted(
            (f for f in front if dominates(f.values, credited)), key=lambda f: f.values[MEMORY_KEY]
        )
        if not beaters:
            return None
        best = beaters[0].values
        return (
            f"dominated after {EARLY_STAGE} by {beaters[0].name} ({MAP_KEY} {best[MAP_KEY]:.4f} >= "
            f"{point[MAP_KEY]:.4f} + margin {self.map_margin:g}; {MEMORY_KEY} {best[MEMORY_KEY]:.4g} <= "
            f"{point[MEMORY_KEY]:.4g} projected - {self.memory_margin:.0%})"
        )
