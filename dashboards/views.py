"""Pareto views of a sweep, logged on the parent MLflow run: ``pareto.csv``, ``pareto.png`` and a self-contained
``pareto.html``; and a per-layer view (``layers.html``) of one compressed model.

Input rows are plain dicts — ``trial_id``, ``mAP``, ``memory_mib``, ``status`` (``"ok"``, ``"failed"``/``"error"``,
or an unfinished state such as ``"running"``), ``pareto`` (bool), ``config`` (dict), plus any other metrics
(``mAP_drop``, ``compression_ratio``, ``run_id``…). A row is drawn as:

- ``front``: status ok, finite mAP and memory, ``pareto`` true — joined by the front's staircase;
- ``dominated``: status ok and finite, not on the front;
- ``failed``: status failed/error, or ok without a finite positive mAP and memory — a cross along the bottom;
- ``pending``: any other status (a trial that has not finished) — along the bottom too.

The HTML has no external resource of any kind (inline SVG, CSS and a small script; a Content-Security-Policy
forbids fetching anything), so it renders offline and inside MLflow's sandboxed artifact viewer. Stable hooks for
browser tests: ``svg#pareto-plot``, ``circle.point.front|dominated|failed|pending`` (``data-trial-id``,
``data-config`` as JSON, ``data-tooltip``), ``#base-point``, ``.reference-point``, ``#front-line``,
``table#front-table``; the layer view has ``svg#layer-plot`` and ``table#layer-table``.

This package is a leaf: it imports neither ``trainables`` nor ``sweep``.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The poster (Saha, Varma, Jawahar, ACPR 2017), Table "RESULTS": threshold, bits, % pruned, mAP drop on Oxford
# and on Paris (fine-tuned on the other set), memory in MB as printed. The base rows are the dense models.
POSTER_TABLE: dict[str, dict[str, Any]] = {
    "alexnet": {
        "label": "AlexNet + NetVLAD + whitening",
        "base_mb": 248.6,
        "rows": [
            (0.001, 8, 25.77, 0.0, 0.0, 41.4),
            (0.005, 8, 48.44, 0.0, 0.0, 32.4),
            (0.01, 8, 69.92, 2.1, 1.8, 20.0),
            (0.05, 8, 85.77, 14.2, 13.3, 10.3),
            (0.005, 5, 52.39, 2.9, 3.4, 19.5),
            (0.01, 5, 74.95, 7.3, 6.7, 10.6),
        ],
    },
    "vgg16": {
        "label": "VGG16 + NetVLAD + whitening",
        "base_mb": 529.5,
        "rows": [
            (0.001, 8, 25.52, 0.0, 0.0, 89.6),
            (0.005, 8, 51.77, 0.0, 0.0, 65.1),
            (0.01, 8, 68.23, 2.0, 2.1, 40.5),
            (0.05, 8, 84.68, 11.8, 14.1, 21.7),
            (0.005, 5, 55.77, 2.2, 3.6, 42.1),
            (0.01, 5, 75.66, 6.8, 5.6, 21.2),
        ],
    },
}

_CORE_COLUMNS = ("trial_id", "status", "pareto", "mAP", "memory_mib")
_FAILED_STATUSES = ("failed", "error")
_GROUP_COLORS = {"conv": "#1f77b4", "netvlad": "#2ca02c", "whitening": "#d62728", "fc": "#9467bd"}
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


# --------------------------------------------------------------------------------------------------------------
# rows


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def point_kind(row: Mapping[str, Any]) -> str:
    """``front``, ``dominated``, ``failed`` or ``pending`` (see the module docstring)."""
    status = str(row.get("status", "ok")).lower()
    if status == "ok":
        if _finite(row.get("mAP")) and _finite(row.get("memory_mib")) and row["memory_mib"] > 0:
            return "front" if row.get("pareto") else "dominated"
        return "failed"
    return "failed" if status in _FAILED_STATUSES else "pending"


def _ordered(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Front by memory, then dominated by memory, then failed and pending in the order given."""
    rank = {"front": 0, "dominated": 1, "failed": 2, "pending": 3}

    def key(item: tuple[int, Mapping[str, Any]]) -> tuple:
        i, row = item
        kind = point_kind(row)
        memory = row["memory_mib"] if kind in ("front", "dominated") else 0.0
        return (rank[kind], memory, i)

    return [row for _, row in sorted(enumerate(rows), key=key)]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def write_pareto_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One line per trial: ``trial_id, status, pareto, mAP, memory_mib``, then every other metric the rows carry
    (sorted), then ``config.<name>`` for every config key (sorted). Front first (by memory), then dominated, then
    failed and unfinished trials."""
    path = Path(path)
    extra = sorted({k for r in rows for k in r if k not in _CORE_COLUMNS and k != "config"})
    config_keys = sorted({k for r in rows for k in (r.get("config") or {})})
    header = [*_CORE_COLUMNS, *extra, *(f"config.{k}" for k in config_keys)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in _ordered(rows):
            config = row.get("config") or {}
            line = [_cell(row.get(k)) for k in _CORE_COLUMNS]
            line[2] = _cell(bool(row.get("pareto", False)))
            line += [_cell(row.get(k)) for k in extra]
            line += [_cell(config.get(k)) for k in config_keys]
            writer.writerow(line)
    return path


# --------------------------------------------------------------------------------------------------------------
# reference points


def poster_reference(backbone: str, dataset: str) -> list[dict[str, Any]] | None:
    """The poster's points for ``backbone`` (``alexnet``/``vgg16``) on ``dataset``'s test set (a name containing
    ``oxford`` or ``paris``), or None when the poster has nothing comparable (e.g. the synthetic set or the tiny
    backbone). Each point: ``label``, ``memory_mib`` (the poster's MB as printed), ``mAP_drop`` (a relative
    fraction; the poster gives drops only, so the views place them at base mAP × (1 − drop)), ``threshold``,
    ``bits``, ``pruned``."""
    table = POSTER_TABLE.get(backbone.lower())
    name = dataset.lower()
    column = 3 if "oxford" in name else 4 if "paris" in name else None
    if table is None or column is None:
        return None
    points = [
        {
            "label": f"poster {backbone.lower()} base",
            "memory_mib": table["base_mb"],
            "mAP_drop": 0.0,
            "threshold": 0.0,
            "bits": 32,
            "pruned": 0.0,
        }
    ]
    for row in table["rows"]:
        threshold, bits, pruned = row[0], row[1], row[2]
        points.append(
            {
                "label": f"poster {backbone.lower()} t={threshold:g} {bits}-bit",
                "memory_mib": row[5],
                "mAP_drop": row[column] / 100.0,
                "threshold": threshold,
                "bits": bits,
                "pruned": pruned / 100.0,
            }
        )
    return points


def _reference_points(
    reference: Sequence[Mapping[str, Any]] | None, base: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """Reference points with an absolute ``mAP`` (from ``mAP`` or base mAP × (1 − ``mAP_drop``)); points that
    cannot be placed (no base mAP for a relative drop) are left out."""
    out = []
    base_map = base.get("mAP") if base else None
    for p in reference or ():
        memory = p.get("memory_mib")
        if not _finite(memory) or memory <= 0:
            continue
        if _finite(p.get("mAP")):
            value = float(p["mAP"])
        elif _finite(p.get("mAP_drop")) and _finite(base_map):
            value = float(base_map) * (1.0 - float(p["mAP_drop"]))
        else:
            continue
        out.append({**p, "mAP": value, "memory_mib": float(memory)})
    return out


def _base_point(base: Mapping[str, Any] | None) -> dict[str, float] | None:
    if (
        not base
        or not _finite(base.get("mAP"))
        or not _finite(base.get("memory_mib"))
        or base["memory_mib"] <= 0
    ):
        return None
    return {"mAP": float(base["mAP"]), "memory_mib": float(base["memory_mib"])}


# --------------------------------------------------------------------------------------------------------------
# scales shared by the PNG and the HTML


def _x_range(values: Sequence[float]) -> tuple[float, float]:
    """log10 limits of the memory axis."""
    logs = [math.log10(v) for v in values if _finite(v) and v > 0]
    if not logs:
        return -1.0, 1.0
    lo, hi = min(logs), max(logs)
    pad = max(0.08 * (hi - lo), 0.15)
    return lo - pad, hi + pad


def _y_range(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    span = hi - lo if hi > lo else max(abs(hi), 0.1)
    return lo - 0.08 * span, hi + 0.08 * span


def _nice_step(span: float, target: int = 6) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _y_ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + 1e-12:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _x_ticks(lo_log: float, hi_log: float) -> list[float]:
    """Decades, plus 2× and 5× when the axis spans few decades."""
    mults = (1, 2, 5) if hi_log - lo_log < 3 else (1,)
    ticks = []
    for decade in range(math.floor(lo_log), math.ceil(hi_log) + 1):
        for m in mults:
            v = m * 10.0**decade
            if lo_log <= math.log10(v) <= hi_log:
                ticks.append(v)
    return ticks


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _fmt_config(value: Any) -> str:
    """A config value as a user would write it: 2.0 stays 2.0 (a float), long floats keep 6 digits."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else _fmt(value, 6)
    if isinstance(value, float) and math.isfinite(value) and not any(c in text for c in ".e"):
        text += ".0"
    return text


def _tooltip(row: Mapping[str, Any], base: Mapping[str, float] | None) -> str:
    lines = [f"trial {row.get('trial_id', '?')}  ({point_kind(row)}, status {row.get('status', 'ok')})"]
    lines.append(f"mAP: {_fmt(row.get('mAP'))}")
    memory = row.get("memory_mib")
    ratio = ""
    if base and _finite(memory) and memory > 0:
        ratio = f"  ({base['memory_mib'] / memory:.1f}x smaller than base)"
    lines.append(f"memory_mib: {_fmt(memory)}{ratio}")
    for key in sorted(row):
        if key in (*_CORE_COLUMNS, "config") or row[key] is None or isinstance(row[key], Mapping | list):
            continue
        lines.append(f"{key}: {_fmt(row[key])}")
    config = row.get("config") or {}
    if config:
        lines.append("config:")
        lines += [f"  {k}: {_fmt_config(v)}" for k, v in sorted(config.items())]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# PNG


def plot_pareto_png(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    base: Mapping[str, Any] | None = None,
    reference: Sequence[Mapping[str, Any]] | None = None,
    title: str = "Pareto front: memory vs mAP",
) -> Path:
    """memory_mib (log x) against mAP: the front joined and highlighted, dominated points hollow, failed and
    unfinished trials as crosses along the bottom, the base model as a star, reference points as squares."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    path = Path(path)
    groups: dict[str, list[Mapping[str, Any]]] = {"front": [], "dominated": [], "failed": [], "pending": []}
    for row in rows:
        groups[point_kind(row)].append(row)
    base_pt = _base_point(base)
    refs = _reference_points(reference, base)
    plotted = groups["front"] + groups["dominated"]
    xs = [r["memory_mib"] for r in plotted] + [p["memory_mib"] for p in refs]
    ys = [r["mAP"] for r in plotted] + [p["mAP"] for p in refs]
    if base_pt:
        xs.append(base_pt["memory_mib"])
        ys.append(base_pt["mAP"])
    x_lo, x_hi = _x_range(xs)
    y_lo, y_hi = _y_range(ys)
    bottom_band = 0.1 * (y_hi - y_lo) if groups["failed"] or groups["pending"] else 0.0

    # A Figure without pyplot: no global state, safe in the driver's threads.
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_xlim(10**x_lo, 10**x_hi)
    ax.set_ylim(y_lo - bottom_band, y_hi)
    ax.grid(True, which="both", alpha=0.25)
    ax.set_xlabel("memory_mib (size of the compressed file, MiB, log scale)")
    ax.set_ylabel("mAP")
    ax.set_title(title)

    if groups["dominated"]:
        ax.scatter(
            [r["memory_mib"] for r in groups["dominated"]],
            [r["mAP"] for r in groups["dominated"]],
            s=30,
            facecolors="none",
            edgecolors="#8a8a8a",
            label=f"dominated ({len(groups['dominated'])})",
            zorder=2,
        )
    front = sorted(groups["front"], key=lambda r: r["memory_mib"])
    if front:
        ax.step(
            [r["memory_mib"] for r in front],
            [r["mAP"] for r in front],
            where="post",
            color="#1f77b4",
            alpha=0.6,
            lw=1.5,
            zorder=3,
        )
        ax.scatter(
            [r["memory_mib"] for r in front],
            [r["mAP"] for r in front],
            s=55,
            color="#1f77b4",
            edgecolors="black",
            linewidths=0.6,
            label=f"Pareto front ({len(front)})",
            zorder=4,
        )
    # Failed / unfinished: at their memory when they have one, else spread along the left of the bottom band.
    strip = blended_transform_factory(ax.transData, ax.transAxes)
    slot = 0  # next free place along the left of the band, shared by failed and unfinished trials
    for kind, marker, color in (("failed", "x", "#d62728"), ("pending", "+", "#7f7f7f")):
        rows_k = groups[kind]
        if not rows_k:
            continue
        y_axes = 0.5 * bottom_band / (y_hi - y_lo + bottom_band)
        xs_k = []
        for r in rows_k:
            m = r.get("memory_mib")
            if _finite(m) and m > 0:
                xs_k.append(m)
            else:
                xs_k.append(10 ** (x_lo + (0.02 + 0.02 * slot) * (x_hi - x_lo)))
                slot += 1
        ax.scatter(
            xs_k,
            [y_axes] * len(xs_k),
            transform=strip,
            marker=marker,
            color=color,
            s=40,
            label=f"{kind} ({len(rows_k)})",
            zorder=4,
        )
    if refs:
        ax.scatter(
            [p["memory_mib"] for p in refs],
            [p["mAP"] for p in refs],
            marker="s",
            s=28,
            color="#ff7f0e",
            alpha=0.8,
            label="poster (relative drop from our base)",
            zorder=3,
        )
    if base_pt:
        ax.scatter(
            [base_pt["memory_mib"]],
            [base_pt["mAP"]],
            marker="*",
            s=220,
            color="gold",
            edgecolors="black",
            label="base (dense fp32)",
            zorder=5,
        )
        ax.annotate(
            "base",
            (base_pt["memory_mib"], base_pt["mAP"]),
            textcoords="offset points",
            xytext=(-8, 8),
            ha="right",
        )
        ratio = base_pt["memory_mib"]
        top = ax.secondary_xaxis("top", functions=(lambda m: ratio / _safe(m), lambda r: ratio / _safe(r)))
        top.set_xlabel("times smaller than the base")
    if not rows:
        ax.text(0.5, 0.5, "no trials yet", transform=ax.transAxes, ha="center", va="center", color="#666")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _safe(values):
    """Avoid dividing by zero in the secondary axis' conversion (matplotlib passes arrays)."""
    import numpy as np

    return np.maximum(np.asarray(values, dtype=float), 1e-12)


# --------------------------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .2em 0; } p.sub { color: #555; margin: 0 0 .8em 0; }
#summary { margin: .4em 0 .8em 0; } #summary b { font-weight: 600; }
svg text { font-size: 11px; fill: #333; } svg .axis-label { font-size: 12px; }
.grid { stroke: #e5e5e5; } .axis { stroke: #444; }
.point { cursor: pointer; } .point:hover { stroke-width: 2.5; }
.point.front { fill: #1f77b4; stroke: #0b2d4a; stroke-width: 1; }
.point.dominated { fill: #fff; stroke: #8a8a8a; stroke-width: 1.2; }
.point.failed { fill: #fde0e0; stroke: #d62728; stroke-width: 1.2; } .failed-x { stroke: #d62728; stroke-width: 1.4; }
.point.pending { fill: #eee; stroke: #7f7f7f; stroke-dasharray: 2 1; }
.front-line { fill: none; stroke: #1f77b4; stroke-opacity: .6; stroke-width: 1.6; }
#base-point { fill: gold; stroke: #000; stroke-width: 1; }
.reference-point { fill: #ff7f0e; fill-opacity: .8; stroke: #8a4500; }
.band { fill: #fbf3f3; }
#tooltip { position: absolute; background: #fffff2; border: 1px solid #999; padding: 6px 8px; font: 12px monospace;
  white-space: pre; pointer-events: none; box-shadow: 0 2px 6px rgba(0,0,0,.2); max-width: 60em; z-index: 10; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; } th { background: #f4f4f4; text-align: left; }
td.text { text-align: left; font-family: monospace; font-size: 12px; }
tr:hover td { background: #f6faff; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: middle; }
"""

# Shows a point's data-tooltip on hover. textContent only: no data is ever parsed as HTML.
_SCRIPT = """
(function () {
  var tip = document.getElementById("tooltip");
  document.querySelectorAll("[data-tooltip] > title").forEach(function (t) { t.remove(); });
  function place(e) { tip.style.left = (e.pageX + 14) + "px"; tip.style.top = (e.pageY + 14) + "px"; }
  document.querySelectorAll("svg").forEach(function (svg) {
    svg.addEventListener("mousemove", function (e) {
      var el = e.target.closest ? e.target.closest("[data-tooltip]") : null;
      if (!el) { tip.hidden = true; return; }
      tip.textContent = el.getAttribute("data-tooltip");
      tip.hidden = false;
      place(e);
    });
    svg.addEventListener("mouseleave", function () { tip.hidden = true; });
  });
})();
"""


def _attr(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, subtitle: str | None, body: str) -> str:
    sub = f'<p class="sub">{html.escape(subtitle)}</p>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{sub}\n{body}\n"
        '<div id="tooltip" hidden></div>\n'
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def _star(cx: float, cy: float, r: float) -> str:
    pts = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        pts.append(f"{cx + radius * math.cos(angle):.1f},{cy + radius * math.sin(angle):.1f}")
    return " ".join(pts)


def write_pareto_html(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    base: Mapping[str, Any] | None = None,
    reference: Sequence[Mapping[str, Any]] | None = None,
    title: str = "vladsweep — Pareto front (memory vs mAP)",
    subtitle: str | None = None,
) -> Path:
    """A self-contained page: an inline SVG scatter of memory_mib (log) vs mAP with the front's staircase, each
    point's metrics and config on hover, the base and reference points, and tables of the front and of all
    trials. No network access is needed (or allowed, by its Content-Security-Policy) to view it."""
    path = Path(path)
    width, height = 880, 520
    left, right, top, bottom = 70, 24, 36, 56
    band = 26  # strip at the bottom of the plot for failed / unfinished trials
    pw, ph = width - left - right, height - top - bottom

    kinds = [point_kind(r) for r in rows]
    plotted = [r for r, k in zip(rows, kinds) if k in ("front", "dominated")]
    stuck = [(r, k) for r, k in zip(rows, kinds) if k in ("failed", "pending")]
    base_pt = _base_point(base)
    refs = _reference_points(reference, base)
    xs = [r["memory_mib"] for r in plotted] + [p["memory_mib"] for p in refs]
    ys = [r["mAP"] for r in plotted] + [p["mAP"] for p in refs]
    if base_pt:
        xs.append(base_pt["memory_mib"])
        ys.append(base_pt["mAP"])
    x_lo, x_hi = _x_range(xs)
    y_lo, y_hi = _y_range(ys)
    data_h = ph - (band if stuck else 0)

    def sx(memory: float) -> float:
        return left + (math.log10(memory) - x_lo) / (x_hi - x_lo) * pw

    def sy(value: float) -> float:
        return top + (y_hi - value) / (y_hi - y_lo) * data_h

    out: list[str] = [
        f'<svg id="pareto-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img" aria-label="memory_mib versus mAP of every trial">'
    ]
    # Grid, ticks and axes.
    for v in _x_ticks(x_lo, x_hi):
        x = sx(v)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt(v, 3)}</text>')
    for v in _y_ticks(y_lo, y_hi):
        y = sy(v)
        out.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v, 3)}</text>')
    if stuck:
        out.append(
            f'<rect class="band" x="{left}" y="{top + data_h}" width="{pw}" height="{band}"/>'
            f'<text x="{left + pw - 4}" y="{top + data_h + 10}" text-anchor="end" font-size="9">'
            "failed / unfinished</text>"
        )
    out.append(
        f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>'
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>'
        f'<text class="axis-label" x="{left + pw / 2}" y="{height - 14}" text-anchor="middle">'
        "memory_mib (size of the compressed file, MiB, log scale)</text>"
        f'<text class="axis-label" transform="translate(16 {top + data_h / 2}) rotate(-90)" '
        'text-anchor="middle">mAP</text>'
    )
    # Front staircase: from each front point right to the next one's memory, then up to its mAP.
    front = sorted((r for r, k in zip(rows, kinds) if k == "front"), key=lambda r: r["memory_mib"])
    if front:
        d = f"M{sx(front[0]['memory_mib']):.1f},{sy(front[0]['mAP']):.1f}"
        for r in front[1:]:
            d += f" H{sx(r['memory_mib']):.1f} V{sy(r['mAP']):.1f}"
        out.append(f'<path id="front-line" class="front-line" d="{d}"/>')
    for p in refs:
        x, y = sx(p["memory_mib"]), sy(p["mAP"])
        tip = f"{p.get('label', 'reference')}\nmemory: {_fmt(p['memory_mib'])} (as printed)\n"
        tip += f"mAP: {_fmt(p['mAP'])}" + (
            f" (base × (1 − {p['mAP_drop']:.3f}))" if _finite(p.get("mAP_drop")) else ""
        )
        out.append(
            f'<rect class="reference-point" x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" '
            f'data-tooltip="{_attr(tip)}"><title>{html.escape(tip)}</title></rect>'
        )
    # Dominated under the front, so front points stay on top.
    for kind in ("dominated", "front"):
        for r in (r for r, k in zip(rows, kinds) if k == kind):
            out.append(
                _circle(r, kind, sx(r["memory_mib"]), sy(r["mAP"]), 5.5 if kind == "front" else 4.5, base_pt)
            )
    for i, (r, kind) in enumerate(stuck):
        m = r.get("memory_mib")
        x = (
            sx(m)
            if _finite(m) and m > 0 and x_lo <= math.log10(m) <= x_hi
            else left + 10 + 12 * (i % (pw // 12))
        )
        y = top + data_h + band / 2
        out.append(_circle(r, kind, x, y, 4.5, base_pt))
        if kind == "failed":
            out.append(
                f'<path class="failed-x" d="M{x - 3:.1f},{y - 3:.1f} L{x + 3:.1f},{y + 3:.1f} '
                f'M{x - 3:.1f},{y + 3:.1f} L{x + 3:.1f},{y - 3:.1f}" pointer-events="none"/>'
            )
    if base_pt:
        x, y = sx(base_pt["memory_mib"]), sy(base_pt["mAP"])
        tip = (
            f"base model (dense fp32)\nmAP: {_fmt(base_pt['mAP'])}\nmemory_mib: {_fmt(base_pt['memory_mib'])}"
        )
        out.append(
            f'<polygon id="base-point" class="base" points="{_star(x, y, 9)}" data-tooltip="{_attr(tip)}">'
            f"<title>{html.escape(tip)}</title></polygon>"
            f'<text x="{x - 11:.1f}" y="{y - 9:.1f}" text-anchor="end">base</text>'
        )
    if not rows:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no trials yet</text>')
    # Bottom right: the dominated corner (big and worse), where a front never is.
    n_legend = len(set(kinds)) + bool(base_pt) + bool(refs)
    out.append(_legend(left + pw - 250, top + data_h - 16 * n_legend, kinds, bool(base_pt), bool(refs)))
    out.append("</svg>")

    counts = {k: kinds.count(k) for k in ("front", "dominated", "failed", "pending")}
    summary = (
        f'<p id="summary"><b>{len(rows)}</b> trials: <b>{counts["front"]}</b> on the Pareto front, '
        f"{counts['dominated']} dominated, {counts['failed']} failed"
        + (f", {counts['pending']} unfinished" if counts["pending"] else "")
        + (f". Base: mAP {_fmt(base_pt['mAP'])}, {_fmt(base_pt['memory_mib'])} MiB." if base_pt else ".")
        + "</p>"
    )
    if reference and not refs:
        summary += '<p class="sub">Reference points were given but cannot be placed without the base mAP.</p>'
    body = summary + "\n" + "".join(out) + "\n" + _front_table(front, base_pt) + _all_table(rows, kinds)
    path.write_text(_page(title, subtitle, body), encoding="utf-8")
    return path


def _circle(
    row: Mapping[str, Any], kind: str, x: float, y: float, r: float, base: Mapping[str, float] | None
) -> str:
    tip = _tooltip(row, base)
    config = json.dumps(row.get("config") or {}, sort_keys=True, default=str)
    return (
        f'<circle class="point {kind}" cx="{x:.1f}" cy="{y:.1f}" r="{r}" '
        f'data-trial-id="{_attr(row.get("trial_id", ""))}" data-config="{_attr(config)}" '
        f'data-tooltip="{_attr(tip)}"><title>{html.escape(tip)}</title></circle>'
    )


def _legend(x: float, y: float, kinds: list[str], has_base: bool, has_refs: bool) -> str:
    # Legend symbols copy the point styles but not the "point" class that tests and the script look for.
    labels = {"front": "Pareto front", "dominated": "dominated", "failed": "failed", "pending": "unfinished"}
    parts = ['<g id="legend" pointer-events="none">']
    row = 0
    for kind, label in labels.items():
        if kind not in kinds:
            continue
        parts.append(
            f'<g transform="translate({x} {y + 16 * row})">{_legend_shape(kind)}'
            f'<text x="14" y="4">{label} ({kinds.count(kind)})</text></g>'
        )
        row += 1
    if has_base:
        parts.append(
            f'<g transform="translate({x} {y + 16 * row})"><polygon points="{_star(5, 0, 6)}" '
            'fill="gold" stroke="#000"/><text x="14" y="4">base (dense fp32)</text></g>'
        )
        row += 1
    if has_refs:
        parts.append(
            f'<g transform="translate({x} {y + 16 * row})"><rect x="1" y="-4" width="8" height="8" '
            'fill="#ff7f0e"/><text x="14" y="4">poster (relative mAP drop from our base)</text></g>'
        )
    parts.append("</g>")
    return "".join(parts)


def _legend_shape(kind: str) -> str:
    style = {
        "front": 'fill="#1f77b4" stroke="#0b2d4a"',
        "dominated": 'fill="#fff" stroke="#8a8a8a"',
        "failed": 'fill="#fde0e0" stroke="#d62728"',
        "pending": 'fill="#eee" stroke="#7f7f7f"',
    }[kind]
    return f'<circle cx="5" cy="0" r="4.5" {style}/>'


def _config_text(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt_config(v)}" for k, v in sorted(config.items()))


def _front_table(front: list[Mapping[str, Any]], base: Mapping[str, float] | None) -> str:
    head = "<tr><th>trial</th><th>memory_mib</th><th>× smaller</th><th>mAP</th><th>mAP drop</th><th>config</th></tr>"
    lines = ["<h2>Pareto front</h2>", '<table id="front-table">', head]
    for r in front:
        ratio = base["memory_mib"] / r["memory_mib"] if base else r.get("compression_ratio")
        drop = r.get("mAP_drop")
        if drop is None and base and base["mAP"]:
            drop = 1.0 - r["mAP"] / base["mAP"]
        lines.append(
            f'<tr data-trial-id="{_attr(r.get("trial_id", ""))}"><td class="text">{html.escape(str(r.get("trial_id", "")))}</td>'
            f"<td>{_fmt(r['memory_mib'])}</td><td>{_fmt(ratio, 3)}</td><td>{_fmt(r['mAP'])}</td>"
            f"<td>{'—' if not _finite(drop) else f'{drop:.1%}'}</td>"
            f'<td class="text">{html.escape(_config_text(r.get("config") or {}))}</td></tr>'
        )
    if not front:
        lines.append('<tr><td colspan="6" class="text">no completed trials yet</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _all_table(rows: Sequence[Mapping[str, Any]], kinds: list[str]) -> str:
    lines = [
        f"<details><summary>All {len(rows)} trials</summary>",
        '<table id="trials-table"><tr><th>trial</th><th>status</th><th>point</th><th>memory_mib</th><th>mAP</th>'
        "<th>config</th></tr>",
    ]
    for r in _ordered(rows):
        lines.append(
            f'<tr><td class="text">{html.escape(str(r.get("trial_id", "")))}</td>'
            f'<td class="text">{html.escape(str(r.get("status", "ok")))}</td>'
            f'<td class="text">{point_kind(r)}</td><td>{_fmt(r.get("memory_mib"))}</td><td>{_fmt(r.get("mAP"))}</td>'
            f'<td class="text">{html.escape(_config_text(r.get("config") or {}))}</td></tr>'
        )
    lines.append("</table></details>")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# per-layer view


#: Field names of ``trainables.compression.report.LayerSize`` read as the view's own names.
_LAYER_ALIASES = {"parameters": "params", "payload_bytes": "bytes"}


def _layer_row(layer: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(layer)
    for alias, name in _LAYER_ALIASES.items():
        if name not in out and alias in out:
            out[name] = out.pop(alias)
    return out


def write_layer_html(
    layers: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "Compressed model — per layer",
    totals: Mapping[str, Any] | None = None,
) -> Path:
    """Per-layer view of one compressed model: for each layer its sparsity, bits and bytes as bars (coloured by
    group, hover for the numbers) and a table with every field given. Layers are dicts such as ``{name, group,
    params, nonzeros, sparsity, bits, bytes}``; a ``SizeReport.to_dict()["layers"]`` row works as is
    (``parameters`` and ``payload_bytes`` are read as ``params`` and ``bytes``). Missing fields show as "—".
    ``totals`` (e.g. ``SizeReport.to_dict()["totals"]``) adds the file's own figures to the summary."""
    path = Path(path)
    layers = [_layer_row(layer) for layer in layers]
    total_bytes = sum(layer["bytes"] for layer in layers if _finite(layer.get("bytes")))
    total_params = sum(layer["params"] for layer in layers if _finite(layer.get("params")))
    total_nz = sum(layer["nonzeros"] for layer in layers if _finite(layer.get("nonzeros")))
    max_bytes = max((layer["bytes"] for layer in layers if _finite(layer.get("bytes"))), default=0) or 1
    max_bits = max((layer["bits"] for layer in layers if _finite(layer.get("bits"))), default=0) or 16

    label_w, col_w, gap, row_h = 210, 190, 24, 20
    cols = (
        ("sparsity", "sparsity (pruned fraction)"),
        ("bits", "bits per index"),
        ("bytes", "bytes (share of file)"),
    )
    width = label_w + len(cols) * (col_w + gap) + 10
    height = 40 + row_h * max(len(layers), 1) + 10
    out = [f'<svg id="layer-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for c, (_, heading) in enumerate(cols):
        x0 = label_w + c * (col_w + gap)
        out.append(f'<text class="axis-label" x="{x0}" y="20">{heading}</text>')
    for i, layer in enumerate(layers):
        y = 34 + i * row_h
        name = str(layer.get("name", f"layer {i}"))
        group = str(layer.get("group", ""))
        color = _GROUP_COLORS.get(group, "#7f7f7f")
        tip = "\n".join(f"{k}: {_fmt(v)}" for k, v in layer.items())
        out.append(
            f'<text x="{label_w - 8}" y="{y + 12}" text-anchor="end">{html.escape(_short(name, 30))}</text>'
        )
        fractions = {
            "sparsity": layer.get("sparsity") if _finite(layer.get("sparsity")) else None,
            "bits": layer["bits"] / max_bits if _finite(layer.get("bits")) else None,
            "bytes": layer["bytes"] / max_bytes if _finite(layer.get("bytes")) else None,
        }
        texts = {
            "sparsity": f"{layer['sparsity']:.1%}" if fractions["sparsity"] is not None else "—",
            "bits": _fmt(layer.get("bits")),
            "bytes": (
                f"{_fmt_bytes(layer['bytes'])} ({layer['bytes'] / total_bytes:.1%})"
                if fractions["bytes"] is not None and total_bytes
                else "—"
            ),
        }
        for c, (key, _) in enumerate(cols):
            x0 = label_w + c * (col_w + gap)
            frac = fractions[key]
            w = 0.0 if frac is None else max(min(frac, 1.0), 0.0) * (col_w - 70)
            out.append(
                f'<rect class="bar {key} group-{_attr(group)}" x="{x0}" y="{y + 2}" width="{w:.1f}" height="{row_h - 6}" '
                f'fill="{color}" data-layer="{_attr(name)}" data-tooltip="{_attr(tip)}"><title>{html.escape(tip)}</title></rect>'
                f'<text x="{x0 + w + 4:.1f}" y="{y + 12}">{html.escape(texts[key])}</text>'
            )
    out.append("</svg>")

    keys = ["name", "group", "params", "nonzeros", "sparsity", "bits", "bytes"]
    keys += sorted({k for layer in layers for k in layer} - set(keys))
    table = ['<table id="layer-table"><tr>' + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"]
    for layer in layers:
        cells = []
        for k in keys:
            v = layer.get(k)
            text = f"{v:.2%}" if k == "sparsity" and _finite(v) else _fmt(v, 6)
            cls = ' class="text"' if isinstance(v, str) or v is None else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        table.append(f'<tr data-layer="{_attr(layer.get("name", ""))}">' + "".join(cells) + "</tr>")
    table.append("</table>")
    sparsity = 1 - total_nz / total_params if total_params else None
    dense = 4 * total_params
    legend = " ".join(
        f'<span class="swatch" style="background:{c}"></span>{html.escape(g)}'
        for g, c in _GROUP_COLORS.items()
        if any(layer.get("group") == g for layer in layers)
    )
    summary = (
        f'<p id="summary">{len(layers)} layers, {total_params:,} parameters, {total_nz:,} nonzeros'
        + (f" ({sparsity:.1%} pruned)" if sparsity is not None else "")
        + f"; {_fmt_bytes(total_bytes)} in the listed layers"
        + (
            f" vs {_fmt_bytes(dense)} dense fp32 ({dense / total_bytes:.1f}x)"
            if total_bytes and dense
            else ""
        )
        + f". {legend}</p>"
    )
    if totals:
        facts = ", ".join(f"{html.escape(str(k))} = {html.escape(_fmt(v, 6))}" for k, v in totals.items())
        summary += f'<p id="totals" class="sub">File: {facts}</p>'
    path.write_text(
        _page(title, None, summary + "\n" + "".join(out) + "\n" + "\n".join(table)), encoding="utf-8"
    )
    return path


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1) :]


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
