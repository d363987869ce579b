"""A sweep's trials as Ray left them in storage: one plain row per trial, for the reconciler and the tests.

Ray Tune is the source of truth of a sweep (MLflow only mirrors it), so everything that needs "what happened"
after the fact — `sweep.tracking.sync_sweep`, ``--resume``/``--sync``, the fault tests — reads these rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray.tune import ExperimentAnalysis

from sweep.tracking import trial_number
from trainables.contract import EARLY_STOP_REASON_KEY, MAP_KEY, MEMORY_KEY, OBJECTIVES

#: Statuses of a trial that has ended: completed, failed, stopped early (sweep/early_stop.py). Any other status is
#: Tune's state of a trial that has not ended.
ENDED_STATUSES: tuple[str, ...] = ("ok", "failed", "stopped")

#: MLflow limits a tag value to 5000 characters; an error's traceback is cut to its end, which names the cause.
MAX_ERROR_CHARS = 4900


def node_label(result: Mapping[str, Any]) -> str:
    """IP plus a short node id: on one machine several Ray nodes share 127.0.0.1."""
    node_id = str(result.get("node_id", ""))[:12]
    return f"{result.get('node_ip', '')}/{node_id}" if node_id else str(result.get("node_ip", ""))


def error_text(trial: Any) -> str:
    """The last error of a Tune trial: Ray keeps its traceback as text in the trial's storage."""
    try:
        text = trial.get_error()
    except Exception:  # storage unreachable: say so rather than lose the failure
        text = None
    return str(text or "the trial failed; see its error.txt in Ray storage")[-MAX_ERROR_CHARS:]


def _trial_status(trial: Any) -> str:
    return {"TERMINATED": "ok", "ERROR": "failed"}.get(trial.status, trial.status.lower())


def _has_objectives(result: Mapping[str, Any]) -> bool:
    return all(isinstance(result.get(k), int | float) and math.isfinite(result[k]) for k in OBJECTIVES)


def collect_rows(experiment_dir: str) -> list[dict[str, Any]]:
    """One row per trial from Ray's experiment state.

    Keys: ``trial_id``, ``number`` (1, 2, … in the sweep, or None), ``name``, ``status`` (``ok``, ``failed``,
    ``stopped`` or Tune's state in lower case for a trial that has not ended; a trial that ended without finite
    objectives is ``failed``, unless the early-stopping scheduler stopped it: ``stopped``, never a point of the
    front), ``config``, ``result`` (its last report), the objectives (``mAP``, ``memory_mib``) lifted from it,
    ``node``, ``retries``, ``error`` (failed trials), ``stopped_reason`` (stopped trials), and ``checkpoint`` /
    ``checkpoint_fs`` (path and pyarrow filesystem of its newest checkpoint)."""
    analysis = ExperimentAnalysis(experiment_dir)
    rows = []
    for trial in analysis.trials:
        result = dict(trial.last_result or {})
        status = _trial_status(trial)
        stopped_reason = result.get(EARLY_STOP_REASON_KEY) if status == "ok" else None
        if stopped_reason:
            status = "stopped"
        elif status == "ok" and not _has_objectives(result):
            status = "failed"
        checkpoint = trial.checkpoint
        rows.append(
            {
                "trial_id": trial.trial_id,
                "number": trial_number(trial.experiment_tag),
                "name": str(trial),
                "status": status,
                "config": dict(trial.config),
                "result": result,
                MAP_KEY: result.get(MAP_KEY),
                MEMORY_KEY: result.get(MEMORY_KEY),
                "node": node_label(result),
                "retries": trial.run_metadata.num_failures,
                "error": error_text(trial) if status == "failed" else None,
                "stopped_reason": stopped_reason or None,
                "checkpoint": checkpoint.path if checkpoint is not None else None,
                "checkpoint_fs": checkpoint.filesystem if checkpoint is not None else None,
            }
        )
    return rows
