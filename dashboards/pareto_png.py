"""``pareto.png``: the scene of ``dashboards.scene`` drawn with matplotlib, for reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, NullLocator
from matplotlib.transforms import blended_transform_factory

from dashboards.scene import (
    BASE_LABEL,
    BELOW_LABEL,
    COLORS,
    KIND_LABELS,
    REFERENCE_LABEL,
    TOP_LABEL,
    X_LABEL,
    Y_LABEL,
    Baseline,
    build_scene,
    fmt,
)
from trainables.contract import MAP_KEY, MEMORY_KEY

# Height of the failed/unfinished band under the data, as a fraction of the mAP range.
_BAND = 0.1


def plot_pareto_png(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    base: Mapping[str, Any] | None = None,
    reference: Sequence[Mapping[str, Any]] | None = None,
    title: str = "Pareto front: memory vs mAP",
    baselines: Mapping[str, float] | None = None,
) -> Path:
    """memory_mib (log x) against the objective (val_mAP): the front joined and highlighted, dominated points
    hollow, failed and unfinished trials as crosses along the bottom, the base model as a star, reference points as
    squares, ``baselines`` (name -> mAP on the axis' split) as labelled horizontal lines, and front points below
    the best zero-byte baseline as red-edged triangles; with a base, the top axis reads "times smaller than the
    base"."""
    path = Path(path)
    scene = build_scene(rows, base, reference, baselines)
    x_lo, x_hi = scene.x_range
    y_lo, y_hi = scene.y_range
    band = _BAND * (y_hi - y_lo) if scene.stuck else 0.0

    # A Figure without pyplot: no global state, safe in the driver's threads.
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_xlim(10**x_lo, 10**x_hi)
    ax.set_ylim(y_lo - band, y_hi)
    # The scene's ticks, not matplotlib's: its log axis labels minor ticks as "3x10^-1", which overlap.
    ax.set_xticks([t.value for t in scene.x_ticks], [t.label for t in scene.x_ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks([t.value for t in scene.y_ticks], [t.label for t in scene.y_ticks])
    ax.grid(True, which="major", alpha=0.25)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(title)

    if scene.dominated:
        ax.scatter(
            [r[MEMORY_KEY] for r in scene.dominated],
            [r[MAP_KEY] for r in scene.dominated],
            s=30,
            facecolors="none",
            edgecolors=COLORS["dominated"],
            label=f"{KIND_LABELS['dominated']} ({len(scene.dominated)})",
            zorder=2,
        )
    for line in scene.baselines:
        _draw_baseline(ax, line)
    if scene.baselines_off_axis:
        note = "off the axis: " + ", ".join(f"{b.label} {fmt(b.value, 3)}" for b in scene.baselines_off_axis)
        ax.text(0.01, 0.99, note, transform=ax.transAxes, fontsize=7, color=COLORS["baseline"], va="top")
    if scene.front:
        xs = [r[MEMORY_KEY] for r in scene.front]
        ys = [r[MAP_KEY] for r in scene.front]
        ax.step(xs, ys, where="post", color=COLORS["front"], alpha=0.6, lw=1.5, zorder=3)
        above = [r for r in scene.front if not scene.below(r)]
        below = scene.front_below
        if above:
            ax.scatter(
                [r[MEMORY_KEY] for r in above],
                [r[MAP_KEY] for r in above],
                s=55,
                color=COLORS["front"],
                edgecolors="black",
                linewidths=0.6,
                label=f"{KIND_LABELS['front']} ({len(above)})",
                zorder=4,
            )
        if below:
            ax.scatter(
                [r[MEMORY_KEY] for r in below],
                [r[MAP_KEY] for r in below],
                marker="v",
                s=70,
                color=COLORS["front"],
                edgecolors=COLORS["below"],
                linewidths=1.6,
                label=f"{KIND_LABELS['front']}, {BELOW_LABEL} ({len(below)})",
                zorder=4,
            )
    # The band's y is in axes coordinates: its middle, whatever the mAP range.
    strip = blended_transform_factory(ax.transData, ax.transAxes)
    band_y = 0.5 * band / (y_hi - y_lo + band)
    for kind, marker in (("failed", "x"), ("stopped", "1"), ("pending", "+")):
        points = [p for p in scene.stuck if p.kind == kind]
        if points:
            ax.scatter(
                [10**p.x_log for p in points],
                [band_y] * len(points),
                transform=strip,
                marker=marker,
                color=COLORS[kind],
                s=40,
                label=f"{KIND_LABELS[kind]} ({len(points)})",
                zorder=4,
            )
    if scene.references:
        ax.scatter(
            [p[MEMORY_KEY] for p in scene.references],
            [p[MAP_KEY] for p in scene.references],
            marker="s",
            s=28,
            color=COLORS["reference"],
            alpha=0.8,
            label=REFERENCE_LABEL,
            zorder=3,
        )
    if scene.base:
        at = (scene.base[MEMORY_KEY], scene.base[MAP_KEY])
        ax.scatter(
            [at[0]],
            [at[1]],
            marker="*",
            s=220,
            color=COLORS["base"],
            edgecolors="black",
            label=BASE_LABEL,
            zorder=5,
        )
        ax.annotate("base", at, textcoords="offset points", xytext=(-8, 8), ha="right")
        # Same coordinates as the memory axis, labelled with the ratio each tick stands for.
        top = ax.secondary_xaxis("top")
        top.set_xticks([t.value for t in scene.ratio_ticks], [t.label for t in scene.ratio_ticks])
        top.xaxis.set_minor_locator(NullLocator())
        top.set_xlabel(TOP_LABEL)
    if not scene.rows:
        ax.text(0.5, 0.5, "no trials yet", transform=ax.transAxes, ha="center", va="center", color="#666")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _draw_baseline(ax: Any, line: Baseline) -> None:
    """A baseline as a horizontal line across the plot, labelled at its left end (the empty corner of a front:
    small and accurate is where no baseline ever is)."""
    if line.best:
        color, style, width = COLORS["best_baseline"], "--", 1.4
    elif line.zero_byte:
        color, style, width = COLORS["baseline"], ":", 1.1
    else:
        color, style, width = COLORS["off_the_shelf"], "-.", 1.2
    ax.axhline(line.value, color=color, linestyle=style, linewidth=width, zorder=1)
    ax.annotate(
        line.text,
        (0.01, line.value),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(0, 2),
        fontsize=7.5,
        color=color,
        va="bottom",
        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.7},
        zorder=2,
    )
