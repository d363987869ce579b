"""``pareto.csv``: one line per trial of a sweep, in the order of the views' tables (``dashboards.scene``)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dashboards.scene import CORE_COLUMNS, baseline_lines, below_baseline, best_baseline, ordered

#: The column that says whether a finished trial is below the best zero-byte baseline (only with baselines).
BELOW_COLUMN = "below_zero_byte_baseline"


def _cell(value: Any) -> str:
    """A value as text that reads back: floats by repr (``nan`` as such), containers as JSON, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def write_pareto_csv(
    rows: Sequence[Mapping[str, Any]], path: str | Path, baselines: Mapping[str, float] | None = None
) -> Path:
    """One line per trial: ``trial_id, status, pareto, val_mAP, test_mAP, memory_mib``; with ``baselines`` (name
    -> mAP on the val split, as the plots take them) ``below_zero_byte_baseline`` (true/false, empty for a trial
    without a finite mAP); then every other metric the rows carry (sorted), then ``config.<name>`` for every config
    key (sorted). Front first (by memory), then dominated, then failed and unfinished trials."""
    path = Path(path)
    best = best_baseline(baseline_lines(baselines))
    marked = (BELOW_COLUMN,) if best else ()
    extra = sorted({k for r in rows for k in r if k not in (*CORE_COLUMNS, *marked) and k != "config"})
    config_keys = sorted({k for r in rows for k in (r.get("config") or {})})
    header = [*CORE_COLUMNS, *marked, *extra, *(f"config.{k}" for k in config_keys)]
    pareto_column = CORE_COLUMNS.index("pareto")
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in ordered(rows):
            config = row.get("config") or {}
            line = [_cell(row.get(k)) for k in CORE_COLUMNS]
            line[pareto_column] = _cell(bool(row.get("pareto", False)))
            if best:
                line.append(_cell(below_baseline(row, best)))
            line += [_cell(row.get(k)) for k in extra]
            line += [_cell(config.get(k)) for k in config_keys]
            writer.writerow(line)
    return path
