"""``hypervolume.png``: a sweep's score against the trials done, drawn with matplotlib, for the parent run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dashboards.scene import COLORS, fmt


def plot_hypervolume_png(
    curve: Sequence[tuple[int, float]],
    path: str | Path,
    reference: tuple[float, float] | None = None,
    y_label: str = "hypervolume",
    title: str = "Hypervolume of the front (validation) vs trials done",
) -> Path:
    """``curve`` (``(trials_done, hypervolume)``, steps in order) as a staircase with a dot per trial and the
    final value labelled; ``reference`` (``(memory_mib, mAP)``, the point the area is measured from) in a note
    under the title."""
    path = Path(path)
    # A Figure without pyplot: no global state, safe in the driver's threads.
    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel("trials done (completed + failed)")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.25)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if reference is not None:
        memory, value = reference
        ax.text(
            0.01,
            0.99,
            f"reference: memory {fmt(memory, 4)} MiB (the dense base), mAP {fmt(value, 3)} "
            "(best zero-byte baseline)",
            transform=ax.transAxes,
            fontsize=7.5,
            color="#555",
            va="top",
        )
    if curve:
        steps = [s for s, _ in curve]
        values = [v for _, v in curve]
        ax.step(steps, values, where="post", color=COLORS["front"], lw=1.6, zorder=3)
        ax.scatter(steps, values, s=18, color=COLORS["front"], edgecolors="black", linewidths=0.4, zorder=4)
        ax.annotate(
            fmt(values[-1], 4),
            (steps[-1], values[-1]),
            textcoords="offset points",
            xytext=(-4, 6),
            ha="right",
            fontsize=8,
        )
        ax.set_xlim(0, max(steps) + 0.5)
        top = max(values)
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    else:
        ax.text(
            0.5, 0.5, "no trials done yet", transform=ax.transAxes, ha="center", va="center", color="#666"
        )
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
