"""The Pareto plot as data, built once from a sweep's rows and drawn by both renderers (``pareto_png`` with
matplotlib, ``pareto_html`` as inline SVG): what kind each point is, the order of the tables, the axis ranges and
ticks, the base point, the reference points, the tooltips and the number formats.

Input rows are plain dicts — ``trial_id``, ``val_mAP`` (the objective, ``MAP_KEY``), ``memory_mib``, ``status``
(``"ok"``, ``"failed"``/``"error"``, ``"stopped"`` (stopped early by the scheduler), or an unfinished state such as
``"running"``), ``pareto`` (bool), ``config``
(dict), plus any other metrics (``test_mAP``, ``val_mAP_drop``, ``test_mAP_drop``, ``compression_ratio``,
``run_id``…). The y axis is the objective, the validation mAP; the test mAP is shown beside it, never drawn. A row
is drawn as:

- ``front``: status ok, finite mAP and memory, ``pareto`` true — joined by the front's staircase;
- ``dominated``: status ok and finite, not on the front;
- ``failed``: status failed/error, or ok without a finite positive mAP and memory — a cross along the bottom;
- ``stopped``: status stopped — the early-stopping scheduler ended it after its early signal (never a front
  candidate) — along the bottom, at its early memory when it has one;
- ``pending``: any other status (a trial that has not finished) — along the bottom too.

The baselines (``baselines``: name -> mAP on the axis' split, names from ``trainables.contract.BASELINES``) are
horizontal lines: the zero-byte ones (random ranking, thumbnails, colour histogram: no model bytes at all) and the
off-the-shelf network. A front or dominated point whose mAP is below the best zero-byte baseline is *below the
baseline*: worth less than no bytes, and marked so in every view.

Pure Python: no matplotlib, no HTML.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainables.contract import (
    BASELINES,
    DROP_KEY,
    EARLY_MEMORY_KEY,
    MAP_KEY,
    MEMORY_KEY,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    ZERO_BYTE_BASELINES,
)

#: Point kinds, in the order the tables and legends list them.
KINDS: tuple[str, ...] = ("front", "dominated", "failed", "stopped", "pending")
KIND_LABELS: dict[str, str] = {
    "front": "Pareto front",
    "dominated": "dominated",
    "failed": "failed",
    "stopped": "stopped early",
    "pending": "unfinished",
}
#: One palette for both renderers.
COLORS: dict[str, str] = {
    "front": "#1f77b4",
    "dominated": "#8a8a8a",
    "failed": "#d62728",
    "stopped": "#bcbd22",
    "pending": "#7f7f7f",
    "reference": "#ff7f0e",
    "base": "gold",
    "below": "#d62728",  # the ring of a front point below the best zero-byte baseline
    "baseline": "#8a8a8a",
    "best_baseline": "#9467bd",
    "off_the_shelf": "#2ca02c",
}
X_LABEL = f"{MEMORY_KEY} (size of the compressed file, MiB, log scale)"
Y_LABEL = f"{MAP_KEY} (validation: the objective)"
TOP_LABEL = "times smaller than the base"
BASE_LABEL = "base (dense fp32)"
REFERENCE_LABEL = "poster (relative mAP drop from our base)"
BELOW_LABEL = "below the best zero-byte baseline"
#: How the views name each baseline (``trainables.contract.BASELINES``); an unknown name is shown as it is.
BASELINE_LABELS: dict[str, str] = {
    "random": "random ranking",
    "thumbnails": "16×16 thumbnails",
    "histogram": "colour histogram",
    "off_the_shelf": "off-the-shelf network",
}

#: The columns every row has, first in the CSV and left out of the tooltip's list of other metrics.
CORE_COLUMNS: tuple[str, ...] = ("trial_id", "status", "pareto", MAP_KEY, TEST_MAP_KEY, MEMORY_KEY)
_FAILED_STATUSES = ("failed", "error")
#: The kinds drawn in the band along the bottom, not at an mAP.
STUCK_KINDS: tuple[str, ...] = ("failed", "stopped", "pending")

# The range of the failed/unfinished band given to trials without a usable memory, as fractions of the x axis:
# one slot each from the left, wrapping after _SLOTS so a sweep of many failures stays inside the plot.
_SLOT_START, _SLOT_STEP, _SLOTS = 0.015, 0.015, 64


# --------------------------------------------------------------------------------------------------------------
# values and formats


def finite(value: Any) -> bool:
    """A real number that is not NaN or infinite (a bool is not a metric)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, digits: int = 4) -> str:
    """A metric for people: floats to ``digits`` significant digits, ints with thousands separators, None as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_config(value: Any) -> str:
    """A config value as a user would write it: 2.0 stays 2.0 (a float), long floats keep 6 digits."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else fmt(value, 6)
    if isinstance(value, float) and math.isfinite(value) and not any(c in text for c in ".e"):
        text += ".0"
    return text


def config_text(config: Mapping[str, Any]) -> str:
    """``name=value, …`` sorted by name."""
    return ", ".join(f"{k}={fmt_config(v)}" for k, v in sorted(config.items()))


def config_json(config: Mapping[str, Any] | None) -> str:
    """The config as JSON (sorted keys; values JSON cannot hold as their text)."""
    return json.dumps(config or {}, sort_keys=True, default=str)


def decimal_label(value: float) -> str:
    """A tick value in plain decimals with at most two significant digits: 0.05, 0.5, 1.5, 20, 500."""
    if value <= 0 or not math.isfinite(value):
        return fmt(value)
    decimals = max(0, 1 - math.floor(math.log10(value) + 1e-9))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# --------------------------------------------------------------------------------------------------------------
# rows


def point_kind(row: Mapping[str, Any]) -> str:
    """``front``, ``dominated``, ``failed``, ``stopped`` or ``pending`` (see the module docstring)."""
    status = str(row.get("status", "ok")).lower()
    if status == "ok":
        if finite(row.get(MAP_KEY)) and finite(row.get(MEMORY_KEY)) and row[MEMORY_KEY] > 0:
            return "front" if row.get("pareto") else "dominated"
        return "failed"
    if status == "stopped":
        return "stopped"
    return "failed" if status in _FAILED_STATUSES else "pending"


def ordered(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Front by memory, then dominated by memory, then failed, stopped and pending in the order given."""

    def key(item: tuple[int, Mapping[str, Any]]) -> tuple[int, float, int]:
        i, row = item
        kind = point_kind(row)
        memory = row[MEMORY_KEY] if kind in ("front", "dominated") else 0.0
        return (KINDS.index(kind), memory, i)

    return [row for _, row in sorted(enumerate(rows), key=key)]


def base_point(base: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The base model's ``val_mAP`` and ``memory_mib`` as floats (and its ``test_mAP`` when it has one), or None
    when it has no usable pair."""
    if not base or not finite(base.get(MAP_KEY)) or not finite(base.get(MEMORY_KEY)) or base[MEMORY_KEY] <= 0:
        return None
    point = {MAP_KEY: float(base[MAP_KEY]), MEMORY_KEY: float(base[MEMORY_KEY])}
    if finite(base.get(TEST_MAP_KEY)):
        point[TEST_MAP_KEY] = float(base[TEST_MAP_KEY])
    return point


def reference_points(
    reference: Sequence[Mapping[str, Any]] | None, base: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """Reference points with an absolute ``mAP`` (from ``mAP`` or base mAP × (1 − ``mAP_drop``)); points that
    cannot be placed (no base mAP for a relative drop) are left out."""
    out = []
    base_map = base.get(MAP_KEY) if base else None
    for p in reference or ():
        memory = p.get(MEMORY_KEY)
        if not finite(memory) or memory <= 0:
            continue
        if finite(p.get(MAP_KEY)):
            value = float(p[MAP_KEY])
        elif finite(p.get(DROP_KEY)) and finite(base_map):
            value = float(base_map) * (1.0 - float(p[DROP_KEY]))
        else:
            continue
        out.append({**p, MAP_KEY: value, MEMORY_KEY: float(memory)})
    return out


@dataclass(frozen=True)
class Baseline:
    """One horizontal line of the plot: a baseline's ``name`` (``trainables.contract.BASELINES``), how the views
    label it, its mAP on the axis' split, whether it needs no model bytes (``zero_byte``) and whether it is the
    best of those (``best``: the line a front point must clear)."""

    name: str
    label: str
    value: float
    zero_byte: bool
    best: bool

    @property
    def text(self) -> str:
        """The line's label on the plot: ``16×16 thumbnails 0.502 (best zero-byte)``."""
        return f"{self.label} {fmt(self.value, 3)}" + (" (best zero-byte)" if self.best else "")


def baseline_lines(baselines: Mapping[str, Any] | None) -> list[Baseline]:
    """The finite ``baselines`` (name -> mAP on the axis' split) as lines, in the contract's order (unknown names
    after, sorted), the best zero-byte one flagged; ties go to the first in that order."""
    values = {name: float(v) for name, v in (baselines or {}).items() if finite(v)}
    names = [n for n in BASELINES if n in values] + sorted(n for n in values if n not in BASELINES)
    zero_byte = [n for n in names if n in ZERO_BYTE_BASELINES]
    # The same rule as trainables.contract.best_zero_byte_baseline, over the baselines that have a value here.
    best = max(zero_byte, key=lambda n: values[n]) if zero_byte else None
    return [
        Baseline(n, BASELINE_LABELS.get(n, n), values[n], n in ZERO_BYTE_BASELINES, n == best) for n in names
    ]


def best_baseline(lines: Sequence[Baseline]) -> Baseline | None:
    """The best zero-byte line of ``baseline_lines``, or None without one."""
    return next((b for b in lines if b.best), None)


def below_baseline(row: Mapping[str, Any], best: Baseline | None) -> bool | None:
    """True when a finished row's mAP is below the best zero-byte baseline, False when it is not; None when that
    cannot be said (no baseline, or the row has no finite mAP)."""
    if best is None or not finite(row.get(MAP_KEY)) or point_kind(row) not in ("front", "dominated"):
        return None
    return float(row[MAP_KEY]) < best.value


def relative_drop(row: Mapping[str, Any], key: str, base: Mapping[str, float] | None) -> float | None:
    """The row's relative mAP drop on ``key``'s split (``MAP_KEY`` or ``TEST_MAP_KEY``): as the trial logged it,
    else from the base's mAP on the same split; None when neither is known."""
    logged = row.get(DROP_KEY if key == MAP_KEY else TEST_DROP_KEY)
    if finite(logged):
        return float(logged)
    if base and finite(base.get(key)) and base[key] and finite(row.get(key)):
        return 1.0 - float(row[key]) / float(base[key])
    return None


def times_smaller(memory: Any, base: Mapping[str, float] | None) -> float | None:
    """How many times smaller than the base ``memory`` is, or None without a base or a usable memory."""
    if not base or not finite(memory) or memory <= 0:
        return None
    return base[MEMORY_KEY] / memory


# --------------------------------------------------------------------------------------------------------------
# tooltips


def point_tooltip(
    row: Mapping[str, Any], base: Mapping[str, float] | None, best: Baseline | None = None
) -> str:
    """A trial's id, kind, val and test mAP, memory, other metrics and full config, one per line; with ``best``
    (the best zero-byte baseline), whether the trial is below it."""
    lines = [f"trial {row.get('trial_id', '?')}  ({point_kind(row)}, status {row.get('status', 'ok')})"]
    lines.append(f"{MAP_KEY}: {fmt(row.get(MAP_KEY))}   {TEST_MAP_KEY}: {fmt(row.get(TEST_MAP_KEY))}")
    if below_baseline(row, best):
        lines.append(f"{BELOW_LABEL} ({best.label}, {MAP_KEY} {fmt(best.value)})")
    memory = row.get(MEMORY_KEY)
    ratio = times_smaller(memory, base)
    suffix = f"  ({ratio:.1f}x smaller than base)" if ratio is not None else ""
    lines.append(f"{MEMORY_KEY}: {fmt(memory)}{suffix}")
    for key in sorted(row):
        if key in (*CORE_COLUMNS, "config") or row[key] is None or isinstance(row[key], Mapping | list):
            continue
        lines.append(f"{key}: {fmt(row[key])}")
    config = row.get("config") or {}
    if config:
        lines.append("config:")
        lines += [f"  {k}: {fmt_config(v)}" for k, v in sorted(config.items())]
    return "\n".join(lines)


def base_tooltip(base: Mapping[str, float]) -> str:
    """The base model's label and metrics (``base`` as ``base_point`` returns it)."""
    return (
        f"{BASE_LABEL}\n{MAP_KEY}: {fmt(base[MAP_KEY])}   {TEST_MAP_KEY}: {fmt(base.get(TEST_MAP_KEY))}\n"
        f"{MEMORY_KEY}: {fmt(base[MEMORY_KEY])}"
    )


def baseline_tooltip(line: Baseline) -> str:
    """A baseline line: what it is and its mAP on the axis' split."""
    kind = "zero-byte baseline (no model bytes)" if line.zero_byte else "baseline"
    best = (
        "; the best zero-byte baseline: a front point below it is worth less than no bytes"
        if line.best
        else ""
    )
    return f"{line.label}: {kind}{best}\n{MAP_KEY}: {fmt(line.value)}"


def reference_tooltip(point: Mapping[str, Any]) -> str:
    """A placed reference point (from ``reference_points``): its label, memory as printed and where its mAP
    comes from."""
    tip = f"{point.get('label', 'reference')}\nmemory: {fmt(point[MEMORY_KEY])} (as printed)\n"
    tip += f"{MAP_KEY}: {fmt(point[MAP_KEY])}"
    if finite(point.get(DROP_KEY)):
        tip += f" (base × (1 − {point[DROP_KEY]:.3f}))"
    return tip


# --------------------------------------------------------------------------------------------------------------
# axes


@dataclass(frozen=True)
class Tick:
    """A tick at ``value`` in the axis' data units (MiB on both memory axes, mAP on the y axis)."""

    value: float
    label: str


def x_range(values: Sequence[float]) -> tuple[float, float]:
    """log10 limits of the memory axis: the values with a margin of 8% (at least 0.15 decades) each side."""
    logs = [math.log10(v) for v in values if finite(v) and v > 0]
    if not logs:
        return -1.0, 1.0
    lo, hi = min(logs), max(logs)
    pad = max(0.08 * (hi - lo), 0.15)
    return lo - pad, hi + pad


def y_range(values: Sequence[float]) -> tuple[float, float]:
    """Limits of the mAP axis: the values with a margin of 8% each side."""
    vals = [v for v in values if finite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    span = hi - lo if hi > lo else max(abs(hi), 0.1)
    return lo - 0.08 * span, hi + 0.08 * span


# Multipliers per decade of a log axis, coarse to fine: the coarsest that gives enough ticks wins, so a wide axis
# shows decades, a typical one 1-2-5 steps and a narrow one (a single point) finer steps.
_LOG_STEPS: tuple[tuple[float, ...], ...] = (
    (1,),
    (1, 2, 5),
    (1, 2, 3, 5),
    (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9),
)


def _decade_ticks(lo_log: float, hi_log: float, mults: tuple[float, ...]) -> list[float]:
    # float("5e-1") rather than 5 * 10**-1: the exact decimal, so labels and equality behave.
    return [
        v
        for decade in range(math.floor(lo_log), math.ceil(hi_log) + 1)
        for m in mults
        if lo_log <= math.log10(v := float(f"{m}e{decade}")) <= hi_log
    ]


def log_steps(*ranges: tuple[float, float], min_ticks: int = 4) -> tuple[float, ...]:
    """The coarsest multipliers per decade that give every log10 range at least ``min_ticks`` ticks (the finest
    when none does): one choice for axes drawn together, so they look alike."""
    for mults in _LOG_STEPS:
        if all(len(_decade_ticks(lo, hi, mults)) >= min_ticks for lo, hi in ranges):
            return mults
    return _LOG_STEPS[-1]


def log_ticks(
    lo_log: float, hi_log: float, mults: tuple[float, ...] | None = None, max_ticks: int = 10
) -> list[float]:
    """Tick values between 10**lo_log and 10**hi_log at ``mults`` × each decade (by default ``log_steps``'
    choice), ascending; when that gives more than ``max_ticks`` (decades over a wide range), every k-th."""
    ticks = _decade_ticks(lo_log, hi_log, mults or log_steps((lo_log, hi_log)))
    if len(ticks) > max_ticks:
        ticks = ticks[:: math.ceil(len(ticks) / max_ticks)]
    return ticks


def linear_ticks(lo: float, hi: float, max_ticks: int = 8) -> list[Tick]:
    """Ticks between lo and hi at the finest step of 1, 2, 2.5 or 5 × 10^k that gives at most ``max_ticks``,
    labelled with the decimals the step needs."""
    if not hi > lo:
        return [Tick(lo, decimal_label(lo))]
    mag = 10.0 ** math.floor(math.log10((hi - lo) / max_ticks))
    # The steps from mag up; 20 × mag is at least twice (hi - lo) / max_ticks, so the loop always ends.
    for mult in (1, 2, 2.5, 5, 10, 20):
        step = mult * mag
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if last - first + 1 <= max_ticks:
            break
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if mult == 2.5 else 0))
    return [Tick(round(k * step, decimals + 2), f"{k * step:.{decimals}f}") for k in range(first, last + 1)]


# --------------------------------------------------------------------------------------------------------------
# the scene


@dataclass(frozen=True)
class StuckPoint:
    """A failed or unfinished trial, drawn in the band along the bottom at ``x_log`` (log10 MiB): its own memory
    when it has one on the axis, else a slot from the left of the band."""

    row: Mapping[str, Any]
    kind: str
    x_log: float


@dataclass(frozen=True)
class Scene:
    """Everything both renderers draw, in data units: log10 MiB across, mAP up."""

    rows: list[Mapping[str, Any]]
    kinds: list[str]  # point_kind of each row, in the rows' order
    front: list[Mapping[str, Any]]  # by memory: the staircase's order
    dominated: list[Mapping[str, Any]]
    stuck: list[StuckPoint]
    base: dict[str, float] | None
    references: list[dict[str, Any]]
    references_unplaced: bool  # reference points were given but none could be placed
    baselines: list[Baseline]  # drawn as horizontal lines: the ones inside the y range
    baselines_off_axis: list[Baseline]  # below the y range (named in a note, not drawn)
    best_baseline: Baseline | None  # the best zero-byte baseline (drawn whenever there is one)
    x_range: tuple[float, float]  # log10 MiB
    y_range: tuple[float, float]
    x_ticks: list[Tick]  # MiB
    y_ticks: list[Tick]
    ratio_ticks: list[Tick]  # "times smaller than the base", placed at the memory they stand for; [] w/o base

    def count(self, kind: str) -> int:
        return self.kinds.count(kind)

    def below(self, row: Mapping[str, Any]) -> bool:
        """Whether ``row`` (a front or dominated point) is below the best zero-byte baseline."""
        return bool(below_baseline(row, self.best_baseline))

    @property
    def front_below(self) -> list[Mapping[str, Any]]:
        """Front points below the best zero-byte baseline, by memory."""
        return [r for r in self.front if self.below(r)]

    def x_fraction(self, memory: float) -> float:
        """Where ``memory`` (MiB) lies across the x axis, 0 at the left edge and 1 at the right."""
        lo, hi = self.x_range
        return (math.log10(memory) - lo) / (hi - lo)

    def y_fraction(self, value: float) -> float:
        """Where an mAP lies up the y axis' data area, 0 at the bottom and 1 at the top."""
        lo, hi = self.y_range
        return (value - lo) / (hi - lo)


def build_scene(
    rows: Sequence[Mapping[str, Any]],
    base: Mapping[str, Any] | None = None,
    reference: Sequence[Mapping[str, Any]] | None = None,
    baselines: Mapping[str, float] | None = None,
) -> Scene:
    """The plot of ``rows`` against the ``base`` model, the ``reference`` points and the ``baselines`` (name ->
    mAP on the axis' split; see the module docstring)."""
    rows = list(rows)
    kinds = [point_kind(r) for r in rows]
    front = sorted((r for r, k in zip(rows, kinds) if k == "front"), key=lambda r: r[MEMORY_KEY])
    dominated = [r for r, k in zip(rows, kinds) if k == "dominated"]
    base_pt = base_point(base)
    refs = reference_points(reference, base)
    lines = baseline_lines(baselines)
    best = best_baseline(lines)

    xs = [r[MEMORY_KEY] for r in (*front, *dominated)] + [p[MEMORY_KEY] for p in refs]
    ys = [r[MAP_KEY] for r in (*front, *dominated)] + [p[MAP_KEY] for p in refs]
    if base_pt:
        xs.append(base_pt[MEMORY_KEY])
        ys.append(base_pt[MAP_KEY])
    # The best zero-byte line and the off-the-shelf network are always on the axis: they are what the front is
    # read against. A weaker zero-byte line (a random ranking, far below) would squash the front into a sliver:
    # it is drawn only when it falls inside the range anyway, else named in a note.
    ys += [b.value for b in lines if b.best or not b.zero_byte]
    x_lo, x_hi = x_range(xs)
    y_lo, y_hi = y_range(ys)
    drawn = [b for b in lines if b.best or not b.zero_byte or y_lo <= b.value <= y_hi]

    stuck = []
    slot = 0
    for row, kind in zip(rows, kinds):
        if kind not in STUCK_KINDS:
            continue
        # A stopped trial never wrote its file: its early memory (the file it would have shipped) places it.
        memory = row.get(MEMORY_KEY) if kind != "stopped" else row.get(EARLY_MEMORY_KEY, row.get(MEMORY_KEY))
        if finite(memory) and memory > 0 and x_lo <= math.log10(memory) <= x_hi:
            x_log = math.log10(memory)
        else:
            x_log = x_lo + (_SLOT_START + _SLOT_STEP * (slot % _SLOTS)) * (x_hi - x_lo)
            slot += 1
        stuck.append(StuckPoint(row, kind, x_log))

    # ratio = base / memory: the ratio axis is the memory axis mirrored around log10(base).
    log_base = math.log10(base_pt[MEMORY_KEY]) if base_pt else None
    ranges = [(x_lo, x_hi)] + ([(log_base - x_hi, log_base - x_lo)] if log_base is not None else [])
    mults = log_steps(*ranges)
    x_ticks = [Tick(v, decimal_label(v)) for v in log_ticks(x_lo, x_hi, mults)]
    ratio_ticks = []
    if log_base is not None:
        ratios = log_ticks(log_base - x_hi, log_base - x_lo, mults)
        ratio_ticks = sorted(
            (Tick(base_pt[MEMORY_KEY] / r, f"{decimal_label(r)}×") for r in ratios), key=lambda t: t.value
        )
    return Scene(
        rows=rows,
        kinds=kinds,
        front=front,
        dominated=dominated,
        stuck=stuck,
        base=base_pt,
        references=refs,
        references_unplaced=bool(reference) and not refs,
        baselines=drawn,
        baselines_off_axis=[b for b in lines if b not in drawn],
        best_baseline=best,
        x_range=(x_lo, x_hi),
        y_range=(y_lo, y_hi),
        x_ticks=x_ticks,
        y_ticks=linear_ticks(y_lo, y_hi),
        ratio_ticks=ratio_ticks,
    )
