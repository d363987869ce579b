"""``layers.html``: the per-layer view of one compressed model — each layer's sparsity, bits and bytes as bars
(coloured by group, hover for the numbers) and a table with every field given.

Stable hooks for browser tests: ``svg#layer-plot`` (``rect.bar.sparsity|bits|bytes`` with ``data-layer``) and
``table#layer-table``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dashboards.html_page import attr, esc, page, title_element, tooltip_attrs
from dashboards.scene import finite, fmt

_GROUP_COLORS = {"conv": "#1f77b4", "netvlad": "#2ca02c", "whitening": "#d62728", "fc": "#9467bd"}

#: Field names of ``trainables.compression.report.LayerSize`` read as the view's own names.
_LAYER_ALIASES = {"parameters": "params", "payload_bytes": "bytes"}

# Columns of bars: the layer field and its heading.
_COLUMNS = (
    ("sparsity", "sparsity (pruned fraction)"),
    ("bits", "bits per index"),
    ("bytes", "bytes (share of file)"),
)
# Geometry in px: the names' column, each bar column, the gap between them, one layer's row.
_LABEL_W, _COL_W, _GAP, _ROW_H = 210, 190, 24, 20


def _layer_row(layer: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(layer)
    for alias, name in _LAYER_ALIASES.items():
        if name not in out and alias in out:
            out[name] = out.pop(alias)
    return out


def _short(value: str, n: int) -> str:
    """The last ``n`` characters of a long name (its most specific part)."""
    return value if len(value) <= n else "…" + value[-(n - 1) :]


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _total(layers: Sequence[Mapping[str, Any]], key: str) -> float:
    return sum(layer[key] for layer in layers if finite(layer.get(key)))


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
    body = "\n".join((_summary(layers, totals), _svg(layers), _table(layers)))
    path.write_text(page(title, None, body), encoding="utf-8")
    return path


def _svg(layers: list[dict[str, Any]]) -> str:
    total_bytes = _total(layers, "bytes")
    max_bytes = max((layer["bytes"] for layer in layers if finite(layer.get("bytes"))), default=0) or 1
    max_bits = max((layer["bits"] for layer in layers if finite(layer.get("bits"))), default=0) or 16
    width = _LABEL_W + len(_COLUMNS) * (_COL_W + _GAP) + 10
    height = 40 + _ROW_H * max(len(layers), 1) + 10
    out = [f'<svg id="layer-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for c, (_, heading) in enumerate(_COLUMNS):
        out.append(f'<text class="axis-label" x="{_LABEL_W + c * (_COL_W + _GAP)}" y="20">{heading}</text>')
    for i, layer in enumerate(layers):
        y = 34 + i * _ROW_H
        name = str(layer.get("name", f"layer {i}"))
        group = str(layer.get("group", ""))
        color = _GROUP_COLORS.get(group, "#7f7f7f")
        tip = "\n".join(f"{k}: {fmt(v)}" for k, v in layer.items())
        out.append(f'<text x="{_LABEL_W - 8}" y="{y + 12}" text-anchor="end">{esc(_short(name, 30))}</text>')
        fractions = {
            "sparsity": layer.get("sparsity") if finite(layer.get("sparsity")) else None,
            "bits": layer["bits"] / max_bits if finite(layer.get("bits")) else None,
            "bytes": layer["bytes"] / max_bytes if finite(layer.get("bytes")) else None,
        }
        texts = {
            "sparsity": f"{layer['sparsity']:.1%}" if fractions["sparsity"] is not None else "—",
            "bits": fmt(layer.get("bits")),
            "bytes": (
                f"{_fmt_bytes(layer['bytes'])} ({layer['bytes'] / total_bytes:.1%})"
                if fractions["bytes"] is not None and total_bytes
                else "—"
            ),
        }
        for c, (key, _) in enumerate(_COLUMNS):
            x0 = _LABEL_W + c * (_COL_W + _GAP)
            frac = fractions[key]
            # 70 px stay free right of the longest bar for its text.
            w = 0.0 if frac is None else max(min(frac, 1.0), 0.0) * (_COL_W - 70)
            out.append(
                f'<rect class="bar {key} group-{attr(group)}" x="{x0}" y="{y + 2}" width="{w:.1f}" '
                f'height="{_ROW_H - 6}" fill="{color}" data-layer="{attr(name)}" {tooltip_attrs(tip)}>'
                f"{title_element(tip)}</rect>"
                f'<text x="{x0 + w + 4:.1f}" y="{y + 12}">{esc(texts[key])}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def _table(layers: list[dict[str, Any]]) -> str:
    keys = ["name", "group", "params", "nonzeros", "sparsity", "bits", "bytes"]
    keys += sorted({k for layer in layers for k in layer} - set(keys))
    table = ['<table id="layer-table"><tr>' + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>"]
    for layer in layers:
        cells = []
        for k in keys:
            v = layer.get(k)
            cell = f"{v:.2%}" if k == "sparsity" and finite(v) else fmt(v, 6)
            cls = ' class="text"' if isinstance(v, str) or v is None else ""
            cells.append(f"<td{cls}>{esc(cell)}</td>")
        table.append(f'<tr data-layer="{attr(layer.get("name", ""))}">' + "".join(cells) + "</tr>")
    table.append("</table>")
    return "\n".join(table)


def _summary(layers: list[dict[str, Any]], totals: Mapping[str, Any] | None) -> str:
    total_bytes = _total(layers, "bytes")
    total_params = _total(layers, "params")
    total_nz = _total(layers, "nonzeros")
    sparsity = 1 - total_nz / total_params if total_params else None
    dense = 4 * total_params  # fp32
    legend = " ".join(
        f'<span class="swatch" style="background:{c}"></span>{esc(g)}'
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
        facts = ", ".join(f"{esc(k)} = {esc(fmt(v, 6))}" for k, v in totals.items())
        summary += f'<p id="totals" class="sub">File: {facts}</p>'
    return summary
