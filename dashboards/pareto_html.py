"""``pareto.html``: the scene of ``dashboards.scene`` as a self-contained page — an inline SVG plot with each
trial's metrics and config on hover, a table of the front and, folded, of every trial.

Stable hooks for browser tests: ``svg#pareto-plot``, ``circle.point.front|dominated|failed|stopped|pending``
(``data-trial-id``, ``data-config`` as JSON, ``data-tooltip``; ``.below-baseline`` on a point below the best
zero-byte baseline), ``#base-point``, ``.reference-point``, ``#front-line``, ``line.baseline`` (``data-baseline``,
``data-map``; ``.best`` on the best zero-byte one), ``table#front-table`` (rows ``tr.below-baseline`` likewise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dashboards.html_page import attr, esc, page, title_element, tooltip_attrs
from dashboards.scene import (
    BASE_LABEL,
    BELOW_LABEL,
    COLORS,
    KIND_LABELS,
    KINDS,
    REFERENCE_LABEL,
    TOP_LABEL,
    X_LABEL,
    Y_LABEL,
    Baseline,
    Scene,
    base_tooltip,
    baseline_tooltip,
    build_scene,
    config_json,
    config_text,
    finite,
    fmt,
    ordered,
    point_kind,
    point_tooltip,
    reference_tooltip,
    relative_drop,
    times_smaller,
)
from trainables.contract import MAP_KEY, MEMORY_KEY, RATIO_KEY, TEST_MAP_KEY

_STYLE = f"""
.point {{ cursor: pointer; }} .point:hover {{ stroke-width: 2.5; }}
.point.front {{ fill: {COLORS["front"]}; stroke: #0b2d4a; stroke-width: 1; }}
.point.dominated {{ fill: #fff; stroke: {COLORS["dominated"]}; stroke-width: 1.2; }}
.point.failed {{ fill: #fde0e0; stroke: {COLORS["failed"]}; stroke-width: 1.2; }}
.failed-x {{ stroke: {COLORS["failed"]}; stroke-width: 1.4; }}
.point.stopped {{ fill: #f7f7d9; stroke: {COLORS["stopped"]}; stroke-width: 1.2; }}
.point.pending {{ fill: #eee; stroke: {COLORS["pending"]}; stroke-dasharray: 2 1; }}
.front-line {{ fill: none; stroke: {COLORS["front"]}; stroke-opacity: .6; stroke-width: 1.6; }}
#base-point {{ fill: {COLORS["base"]}; stroke: #000; stroke-width: 1; }}
.reference-point {{ fill: {COLORS["reference"]}; fill-opacity: .8; stroke: #8a4500; }}
.point.front.below-baseline {{ fill-opacity: .45; stroke: {COLORS["below"]}; stroke-width: 2.2; }}
.band {{ fill: #fbf3f3; }}
.baseline {{ stroke: {COLORS["baseline"]}; stroke-width: 1.2; stroke-dasharray: 2 3; }}
.baseline.best {{ stroke: {COLORS["best_baseline"]}; stroke-width: 1.6; stroke-dasharray: 6 3; }}
.baseline.off-the-shelf {{ stroke: {COLORS["off_the_shelf"]}; stroke-dasharray: 8 3 2 3; }}
.baseline-hit {{ stroke: transparent; stroke-width: 8; }}
text.baseline-label {{ font-size: 10px; paint-order: stroke; stroke: #fff; stroke-width: 3px; }}
tr.below-baseline td {{ background: #fdf0f0; }} td.below {{ color: {COLORS["below"]}; font-weight: 600; }}
"""

# Legend symbols copy the point styles but not the "point" class that tests and the script look for.
_LEGEND_STYLE = {
    "front": f'fill="{COLORS["front"]}" stroke="#0b2d4a"',
    "dominated": f'fill="#fff" stroke="{COLORS["dominated"]}"',
    "failed": f'fill="#fde0e0" stroke="{COLORS["failed"]}"',
    "stopped": f'fill="#f7f7d9" stroke="{COLORS["stopped"]}"',
    "pending": f'fill="#eee" stroke="{COLORS["pending"]}"',
}

# Plot geometry in px: the SVG's size, the margins around the data and the failed/unfinished band's height.
_WIDTH, _HEIGHT = 880, 530
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 24, 46, 56
_BAND = 26


def write_pareto_html(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    base: Mapping[str, Any] | None = None,
    reference: Sequence[Mapping[str, Any]] | None = None,
    title: str = "vladsweep — Pareto front (memory vs mAP)",
    subtitle: str | None = None,
    baselines: Mapping[str, float] | None = None,
) -> Path:
    """A self-contained page: an inline SVG scatter of memory_mib (log) vs the objective (val_mAP) with the
    front's staircase, each point's metrics (test mAP beside val) and config on hover, the base and reference
    points, ``baselines`` (name -> mAP on the axis' split) as labelled horizontal lines, and tables of the front
    (val and test, which front points are below the best zero-byte baseline) and of all trials. No network access
    is needed (or allowed, by its Content-Security-Policy) to view it."""
    path = Path(path)
    scene = build_scene(rows, base, reference, baselines)
    counts = {k: scene.count(k) for k in KINDS}
    summary = (
        f'<p id="summary"><b>{len(scene.rows)}</b> trials: <b>{counts["front"]}</b> on the Pareto front, '
        f"{counts['dominated']} dominated, {counts['failed']} failed"
        + (f", {counts['stopped']} stopped early" if counts["stopped"] else "")
        + (f", {counts['pending']} unfinished" if counts["pending"] else "")
        + (
            f". Base: {MAP_KEY} {fmt(scene.base[MAP_KEY])} ({TEST_MAP_KEY} {fmt(scene.base.get(TEST_MAP_KEY))}), "
            f"{fmt(scene.base[MEMORY_KEY])} MiB."
            if scene.base
            else "."
        )
        + "</p>"
    )
    summary += _baseline_summary(scene)
    if scene.references_unplaced:
        summary += '<p class="sub">Reference points were given but cannot be placed without the base mAP.</p>'
    body = "\n".join((summary, _svg(scene), _front_table(scene), _all_table(scene.rows)))
    path.write_text(page(title, subtitle, body, _STYLE), encoding="utf-8")
    return path


def _svg(scene: Scene) -> str:
    pw, ph = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    data_h = ph - (_BAND if scene.stuck else 0)
    left, top = _LEFT, _TOP

    def sx(memory: float) -> float:
        return left + scene.x_fraction(memory) * pw

    def sy(value: float) -> float:
        return top + (1.0 - scene.y_fraction(value)) * data_h

    out: list[str] = [
        f'<svg id="pareto-plot" width="{_WIDTH}" height="{_HEIGHT}" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        f'role="img" aria-label="{MEMORY_KEY} versus {MAP_KEY} of every trial">'
    ]
    # Grid, ticks and axes.
    for t in scene.x_ticks:
        x = sx(t.value)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{esc(t.label)}</text>')
    for t in scene.y_ticks:
        y = sy(t.value)
        out.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(t.label)}</text>')
    if scene.ratio_ticks:
        out.append(
            f'<g id="ratio-axis"><line class="axis" x1="{left}" y1="{top}" x2="{left + pw}" y2="{top}"/>'
        )
        for t in scene.ratio_ticks:
            x = sx(t.value)
            out.append(
                f'<line class="axis" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top}"/>'
                f'<text x="{x:.1f}" y="{top - 7}" text-anchor="middle">{esc(t.label)}</text>'
            )
        out.append(
            f'<text class="axis-label" x="{left + pw / 2}" y="{top - 24}" text-anchor="middle">{TOP_LABEL}</text></g>'
        )
    if scene.stuck:
        out.append(
            f'<rect class="band" x="{left}" y="{top + data_h}" width="{pw}" height="{_BAND}"/>'
            f'<text x="{left + pw - 4}" y="{top + data_h + 10}" text-anchor="end" font-size="9">'
            "failed / unfinished</text>"
        )
    out.append(
        f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>'
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>'
        f'<text class="axis-label" x="{left + pw / 2}" y="{_HEIGHT - 14}" text-anchor="middle">{esc(X_LABEL)}</text>'
        f'<text class="axis-label" transform="translate(16 {top + data_h / 2}) rotate(-90)" '
        f'text-anchor="middle">{esc(Y_LABEL)}</text>'
    )
    for line in scene.baselines:
        out.append(_baseline(line, left, pw, sy(line.value)))
    # Front staircase: from each front point right to the next one's memory, then up to its mAP.
    front = scene.front
    if front:
        d = f"M{sx(front[0][MEMORY_KEY]):.1f},{sy(front[0][MAP_KEY]):.1f}"
        for r in front[1:]:
            d += f" H{sx(r[MEMORY_KEY]):.1f} V{sy(r[MAP_KEY]):.1f}"
        out.append(f'<path id="front-line" class="front-line" d="{d}"/>')
    for p in scene.references:
        x, y = sx(p[MEMORY_KEY]), sy(p[MAP_KEY])
        tip = reference_tooltip(p)
        out.append(
            f'<rect class="reference-point" x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" '
            f"{tooltip_attrs(tip)}>{title_element(tip)}</rect>"
        )
    # Dominated under the front, so front points stay on top.
    for r in scene.dominated:
        out.append(_circle(r, "dominated", sx(r[MEMORY_KEY]), sy(r[MAP_KEY]), 4.5, scene))
    for r in front:
        out.append(_circle(r, "front", sx(r[MEMORY_KEY]), sy(r[MAP_KEY]), 5.5, scene))
    y = top + data_h + _BAND / 2
    for p in scene.stuck:
        x = sx(10**p.x_log)
        out.append(_circle(p.row, p.kind, x, y, 4.5, scene))
        if p.kind == "failed":
            out.append(
                f'<path class="failed-x" d="M{x - 3:.1f},{y - 3:.1f} L{x + 3:.1f},{y + 3:.1f} '
                f'M{x - 3:.1f},{y + 3:.1f} L{x + 3:.1f},{y - 3:.1f}" pointer-events="none"/>'
            )
    if scene.base:
        x, y = sx(scene.base[MEMORY_KEY]), sy(scene.base[MAP_KEY])
        tip = base_tooltip(scene.base)
        out.append(
            f'<polygon id="base-point" class="base" points="{_star(x, y, 9)}" {tooltip_attrs(tip)}>'
            f"{title_element(tip)}</polygon>"
            f'<text x="{x - 11:.1f}" y="{y - 9:.1f}" text-anchor="end">base</text>'
        )
    if not scene.rows:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no trials yet</text>')
    # Bottom right: the dominated corner (big and worse), where a front never is.
    n_legend = (
        sum(1 for k in KINDS if scene.count(k))
        + bool(scene.base)
        + bool(scene.references)
        + bool(scene.front_below)
    )
    out.append(_legend(left + pw - 250, top + data_h - 16 * n_legend, scene))
    out.append("</svg>")
    return "".join(out)


def _circle(row: Mapping[str, Any], kind: str, x: float, y: float, r: float, scene: Scene) -> str:
    tip = point_tooltip(row, scene.base, scene.best_baseline)
    below = " below-baseline" if kind == "front" and scene.below(row) else ""
    return (
        f'<circle class="point {kind}{below}" cx="{x:.1f}" cy="{y:.1f}" r="{r}" '
        f'data-trial-id="{attr(row.get("trial_id", ""))}" data-config="{attr(config_json(row.get("config")))}" '
        f"{tooltip_attrs(tip)}>{title_element(tip)}</circle>"
    )


def _baseline(line: Baseline, left: float, width: float, y: float) -> str:
    """A baseline across the data area, labelled at its left end, with a wider transparent line to hover."""
    kind = " best" if line.best else "" if line.zero_byte else " off-the-shelf"
    tip = baseline_tooltip(line)
    x2 = left + width
    return (
        f'<g class="baseline-group"><line class="baseline{kind}" x1="{left}" y1="{y:.1f}" x2="{x2}" y2="{y:.1f}" '
        f'data-baseline="{attr(line.name)}" data-map="{line.value!r}"/>'
        f'<line class="baseline-hit" x1="{left}" y1="{y:.1f}" x2="{x2}" y2="{y:.1f}" {tooltip_attrs(tip)}>'
        f"{title_element(tip)}</line>"
        f'<text class="baseline-label" x="{left + 4}" y="{y - 3:.1f}" pointer-events="none">{esc(line.text)}</text></g>'
    )


def _baseline_summary(scene: Scene) -> str:
    """A line under the summary: the best zero-byte baseline and how many front points are below it."""
    best = scene.best_baseline
    if best is None:
        return ""
    n_below = len(scene.front_below)
    text = (
        f'<p id="baseline-summary">Best zero-byte baseline (no model bytes): <b>{esc(best.label)}</b>, '
        f"{MAP_KEY} {fmt(best.value)}; "
        + (
            f'<span class="below"><b>{n_below}</b> front point{"s" if n_below != 1 else ""} below it</span>.'
            if n_below
            else "every front point is above it."
        )
    )
    if scene.baselines_off_axis:
        text += " Off the axis: " + ", ".join(
            f"{esc(b.label)} {fmt(b.value)}" for b in scene.baselines_off_axis
        )
        text += "."
    return text + "</p>"


def _star(cx: float, cy: float, r: float) -> str:
    """A five-pointed star's polygon points around (cx, cy)."""
    pts = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        pts.append(f"{cx + radius * math.cos(angle):.1f},{cy + radius * math.sin(angle):.1f}")
    return " ".join(pts)


def _legend(x: float, y: float, scene: Scene) -> str:
    parts = ['<g id="legend" pointer-events="none">']
    row = 0
    for kind in KINDS:
        n = scene.count(kind)
        if not n:
            continue
        parts.append(
            f'<g transform="translate({x} {y + 16 * row})"><circle cx="5" cy="0" r="4.5" {_LEGEND_STYLE[kind]}/>'
            f'<text x="14" y="4">{KIND_LABELS[kind]} ({n})</text></g>'
        )
        row += 1
    if scene.base:
        parts.append(
            f'<g transform="translate({x} {y + 16 * row})"><polygon points="{_star(5, 0, 6)}" '
            f'fill="{COLORS["base"]}" stroke="#000"/><text x="14" y="4">{BASE_LABEL}</text></g>'
        )
        row += 1
    if scene.references:
        parts.append(
            f'<g transform="translate({x} {y + 16 * row})"><rect x="1" y="-4" width="8" height="8" '
            f'fill="{COLORS["reference"]}"/><text x="14" y="4">{REFERENCE_LABEL}</text></g>'
        )
        row += 1
    if scene.front_below:
        parts.append(
            f'<g transform="translate({x} {y + 16 * row})"><circle cx="5" cy="0" r="4.5" fill="{COLORS["front"]}" '
            f'fill-opacity=".45" stroke="{COLORS["below"]}" stroke-width="2.2"/>'
            f'<text x="14" y="4">front, {BELOW_LABEL} ({len(scene.front_below)})</text></g>'
        )
    parts.append("</g>")
    return "".join(parts)


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if finite(value) else "—"


def _front_table(scene: Scene) -> str:
    """The front, smallest first: size, val mAP (the objective) and test mAP with their drops from the base on
    the same split, and — with baselines — the margin over the best zero-byte baseline."""
    base, best = scene.base, scene.best_baseline
    columns = [
        "trial",
        MEMORY_KEY,
        "× smaller",
        MAP_KEY,
        TEST_MAP_KEY,
        "val drop",
        "test drop",
        *([f"vs {best.label} ({fmt(best.value, 3)})"] if best else []),
        "config",
    ]
    head = "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"
    lines = ["<h2>Pareto front</h2>", '<table id="front-table">', head]
    for r in scene.front:
        ratio = times_smaller(r[MEMORY_KEY], base) if base else r.get(RATIO_KEY)
        trial_id = r.get("trial_id", "")
        below = scene.below(r)
        cells = [
            f'<td class="text">{esc(trial_id)}</td>',
            f"<td>{fmt(r[MEMORY_KEY])}</td>",
            f"<td>{fmt(ratio, 3)}</td>",
            f"<td>{fmt(r[MAP_KEY])}</td>",
            f"<td>{fmt(r.get(TEST_MAP_KEY))}</td>",
            f"<td>{_pct(relative_drop(r, MAP_KEY, base))}</td>",
            f"<td>{_pct(relative_drop(r, TEST_MAP_KEY, base))}</td>",
        ]
        if best:
            margin = f"{r[MAP_KEY] - best.value:+.3f}"
            cells.append(f'<td class="below">below ({margin})</td>' if below else f"<td>{margin}</td>")
        cells.append(f'<td class="text">{esc(config_text(r.get("config") or {}))}</td>')
        row_class = ' class="below-baseline"' if below else ""
        lines.append(f'<tr data-trial-id="{attr(trial_id)}"{row_class}>{"".join(cells)}</tr>')
    if not scene.front:
        lines.append(f'<tr><td colspan="{len(columns)}" class="text">no completed trials yet</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _all_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        f"<details><summary>All {len(rows)} trials</summary>",
        f'<table id="trials-table"><tr><th>trial</th><th>status</th><th>point</th><th>{MEMORY_KEY}</th>'
        f"<th>{MAP_KEY}</th><th>{TEST_MAP_KEY}</th><th>config</th></tr>",
    ]
    for r in ordered(rows):
        lines.append(
            f'<tr><td class="text">{esc(r.get("trial_id", ""))}</td>'
            f'<td class="text">{esc(r.get("status", "ok"))}</td>'
            f'<td class="text">{point_kind(r)}</td><td>{fmt(r.get(MEMORY_KEY))}</td><td>{fmt(r.get(MAP_KEY))}</td>'
            f"<td>{fmt(r.get(TEST_MAP_KEY))}</td>"
            f'<td class="text">{esc(config_text(r.get("config") or {}))}</td></tr>'
        )
    lines.append("</table></details>")
    return "\n".join(lines)
