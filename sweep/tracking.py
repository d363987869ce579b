"""MLflow bookkeeping of a sweep: one parent run, one child run per trial, all logged from the driver.

This module owns the MLflow layout — the tag, metric and artifact names below, which `sweep.release` reads back —
and every write to it. It imports no Ray: the release command and the tests use it without paying for Ray Tune.

Two writers use it. `sweep.callbacks.TrialRunLogger` mirrors trials into child runs while they run (through
``log_trial_result`` and friends). ``sync_sweep`` is the reconciler: given the rows `sweep.results.collect_rows`
reads from Ray's storage, it makes MLflow agree with them (missing child runs, final metrics, status and ``pareto``
tags, the front's artifacts, the parent's ``pareto.{csv,png,html}``). It is idempotent, so it runs at the end of
every sweep, after a ``--resume`` and from ``python sweep/run.py --sync``; a child run is found by its ``trial_id``
tag, never duplicated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import pyarrow.fs as pafs
import requests
from mlflow.entities import Metric, RunTag

from dashboards.layer_html import write_layer_html
from dashboards.pareto_csv import write_pareto_csv
from dashboards.pareto_html import write_pareto_html
from sweep import hypervolume as hv
from sweep.pareto import non_dominated_mask
from trainables.contract import (
    ARTIFACT_FILE,
    BASELINES,
    DROP_KEY,
    LAYERS_HTML,
    LAYERS_JSON,
    MAP_KEY,
    MEMORY_KEY,
    RATIO_KEY,
    STAGE_KEY,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    baseline_metric,
)

logger = logging.getLogger("vladsweep.tracking")

# ------------------------------------------------------------------------------------------- the MLflow layout

#: Tags of the parent run: the sweep's Ray experiment folder (how a ``--resume`` finds its parent again) and the
#: role, ``sweep`` on the parent and ``trial`` on a child.
SWEEP_TAG = "vladsweep.sweep_dir"
ROLE_TAG = "vladsweep.role"
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
#: MLflow's own tag that nests a child run under its parent in the UI.
PARENT_TAG = "mlflow.parentRunId"
#: Tags of a child run.
TRIAL_ID_TAG = "trial_id"
STATUS_TAG = "status"  # FINISHED, FAILED, STOPPED, RUNNING, RETRYING (Tune's view; MLflow's own status lags)
PARETO_TAG = "pareto"  # "true" / "false"
NODE_TAG = "node"
RETRIES_TAG = "retries"
ERROR_TAG = "error"
STAGE_TAG = STAGE_KEY  # the stage of the trial's latest report
STATUS_FINISHED = "FINISHED"
#: A trial stopped early (sweep/early_stop.py): ``status`` tag STOPPED, the reason in ``stopped_reason``, never
#: ``pareto``; MLflow's own end state is KILLED (ended before its last stage), not FINISHED.
STATUS_STOPPED = "STOPPED"
STOPPED_REASON_TAG = "stopped_reason"
MLFLOW_STOPPED = "KILLED"
#: Where a front member's files (the shipped artifact and its per-layer report) are logged in its child run.
ARTIFACT_DIR = "model"
#: The parent's base model: the metrics every ``mAP_drop`` refers to and how often this sweep built it.
BASE_MAP_METRIC = "base_mAP"
#: The parent run's metric of the dense base's test mAP (its validation mAP, what drops refer to, is
#: ``BASE_MAP_METRIC``).
BASE_TEST_MAP_METRIC = f"base_{TEST_MAP_KEY}"
#: Pseudo-splits of the parent's baseline metrics: ``baseline_metric(name, VAL)`` is a baseline's mAP averaged over
#: the protocol's validation splits (what ``val_mAP`` averages), ``TEST`` likewise; per split they are logged too.
VAL, TEST = "val", "test"
BASE_MEMORY_METRIC = "base_memory_mib"
BASE_BUILDS_TAG = "base_builds"
#: The base model's cache key (`trainables.base.BaseConfig.key`): a tag of the parent, a param of every child.
BASE_KEY = "base_key"
#: The parent's views of the front; pareto.html is the one to open first (the parent's description links it).
PARETO_HTML = "pareto.html"
PARETO_FILES = ("pareto.csv", "pareto.png", PARETO_HTML)
#: The search's score on the parent run (`sweep.hypervolume`: validation mAP × log10 MiB against the base's size
#: and the best zero-byte baseline): the metric at step = trials done (completed + failed), one step per trial,
#: and its plot against the trials done.
HYPERVOLUME_METRIC = "hypervolume"
HYPERVOLUME_PNG = "hypervolume.png"

#: MLflow 3 records what an experiment is for in this experiment tag; "custom_model_development" is the UI's
#: "Model training" kind (runs table and charts), not its GenAI one (traces, token usage). MLflow 3.17's UI picks
#: its layout from the ``workflowType`` URL parameter first, so the links below carry it as well.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_MODEL_TRAINING = "custom_model_development"
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
#: MLflow's run description (shown at the top of a run's page), where the parent links its pareto.html.
NOTE_TAG = "mlflow.note.content"

#: MLflow limits a tag value to 5000 characters.
MAX_TAG_CHARS = 4900
#: Tune's bookkeeping keys of a result, which are no metric (``done`` is Tune's flag, not a stage).
_NOT_METRICS = frozenset(
    {"pid", "timestamp", "time_this_iter_s", "iterations_since_restore", "done", "trial_id"}
)


class TrackingError(RuntimeError):
    """The MLflow tracking URI cannot be used; the message names the URI and the reason."""


# ---------------------------------------------------------------------------------------------- the store


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute, so every process and a later ``--resume`` hit the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def limit_http_retries() -> None:
    """MLflow retries an unreachable server for minutes by default; a sweep should notice within seconds."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any trial starts, when ``uri`` cannot be written to."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise TrackingError(
                f"--mlflow-uri {uri}: the MLflow server does not answer ({exc.__class__.__name__}: {exc}). "
                "Start it (`mlflow server --host 127.0.0.1 --port 5000 …`), open the SSH tunnel to it, or pass "
                "another URI (default: sqlite:///mlflow.db in the working directory)."
            ) from exc
        return
    if scheme not in ("sqlite", "postgresql", "mysql", "mssql", "databricks"):
        raise TrackingError(
            f"--mlflow-uri {uri}: unsupported scheme {scheme!r}. Use sqlite:///path/mlflow.db, http://host:port "
            "or a database URI (MLflow 3 no longer accepts a plain folder as a store)."
        )
    if scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.exists():
            raise TrackingError(f"--mlflow-uri {uri}: the folder {path.parent} does not exist.")
    try:
        open_client(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"--mlflow-uri {uri}: cannot open the tracking store ({exc}).") from exc


def open_client(uri: str) -> mlflow.MlflowClient:
    """A client of the store at ``uri``, its model registry included (the release registers models there)."""
    return mlflow.MlflowClient(uri, uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created when missing, marked as a model-training experiment (so MLflow's
    UI opens it on the runs table, not on the GenAI overview)."""
    client = open_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_MODEL_TRAINING})
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND_MODEL_TRAINING:
        client.set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_MODEL_TRAINING
        )
    return experiment.experiment_id


def ui_links(ui_url: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Links into MLflow's UI at ``ui_url`` (e.g. ``http://127.0.0.1:5000``): ``runs`` (the experiment's runs
    table) and ``pareto`` (the parent run's pareto.html, rendered)."""
    base = ui_url.rstrip("/")
    return {
        "runs": f"{base}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW_QUERY}",
        "pareto": f"{base}/#/experiments/{experiment_id}/runs/{parent_run_id}/artifactPath/{PARETO_HTML}"
        f"?{UI_WORKFLOW_QUERY}",
    }


def trial_number(experiment_tag: str | None) -> int | None:
    """The trial's number in its sweep (1, 2, …): Tune's experiment tag starts with it (``3_bits=4,…``)."""
    head = str(experiment_tag or "").split("_", 1)[0]
    return int(head) if head.isdigit() else None


def trial_run_name(trial_id: str, result: Mapping[str, Any] | None = None, number: int | None = None) -> str:
    """A child run's name a human can read: the trial's number (`trial_number`; else its id), then its compression
    ratio and validation mAP once it has them (``t0003 12.1x mAP 0.812``)."""
    name = f"t{number:04d}" if number is not None else trial_id
    result = result or {}
    ratio, val_map = result.get(RATIO_KEY), result.get(MAP_KEY)
    if isinstance(ratio, int | float) and math.isfinite(ratio):
        name += f" {ratio:.3g}x"
    if isinstance(val_map, int | float) and math.isfinite(val_map):
        name += f" mAP {val_map:.3f}"
    return name


# ------------------------------------------------------------------------------------------- the parent run


def find_parent_run(uri: str, experiment_id: str, sweep_dir: str) -> str | None:
    """The parent run of the sweep whose Ray experiment folder is ``sweep_dir``, if one was logged."""
    runs = open_client(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}' and tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_parent_run(
    uri: str,
    experiment: str,
    sweep_name: str,
    sweep_dir: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> str:
    """The sweep's parent run: reused when the same sweep directory already has one (``--resume``)."""
    experiment_id = ensure_experiment(uri, experiment)
    run_id = find_parent_run(uri, experiment_id, sweep_dir)
    client = open_client(uri)
    if run_id is None:
        run = client.create_run(
            experiment_id,
            run_name=sweep_name,
            tags={SWEEP_TAG: sweep_dir, ROLE_TAG: ROLE_SWEEP, **tags},
        )
        run_id = run.info.run_id
        _log_params(client, run_id, params)
    else:
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    return run_id


def base_metrics(meta: Mapping[str, Any]) -> dict[str, float]:
    """The base model's metrics on the parent run, from its ``meta.json``: the validation mAP every drop refers
    to, its test mAP, the dense file's size, per split the off-the-shelf and fine-tuned mAPs, and the baselines
    (random, thumbnails, histogram, off-the-shelf) per split and averaged over the validation and the test splits.
    (The meta holds the mAPs and size under the trial report's names: `trainables.base.build_base`,
    `sweep.base_cache`.)"""
    metrics = {
        BASE_MAP_METRIC: float(meta[MAP_KEY]),
        BASE_TEST_MAP_METRIC: float(meta[TEST_MAP_KEY]),
        BASE_MEMORY_METRIC: float(meta[MEMORY_KEY]),
    }
    for name, maps in meta.get("maps", {}).items():
        for stage in ("off_the_shelf", "finetuned"):
            if stage in maps:
                metrics[f"{BASE_MAP_METRIC}_{name}_{stage}"] = float(maps[stage]["mAP"])
    baselines = meta.get("baselines", {})
    for split, values in baselines.items():
        metrics.update({baseline_metric(n, split): float(v) for n, v in values.items()})
    for role, splits in ((VAL, meta.get("val_splits", [])), (TEST, meta.get("test_splits", []))):
        if splits and all(s in baselines for s in splits):
            for n in BASELINES:
                metrics[baseline_metric(n, role)] = sum(float(baselines[s][n]) for s in splits) / len(splits)
    return metrics


def axis_baselines(meta: Mapping[str, Any]) -> dict[str, float] | None:
    """The baselines on the plots' mAP axis (validation): name -> mAP averaged over the validation splits."""
    values = base_metrics(meta) if meta.get("baselines") else {}
    found = {n: values[baseline_metric(n, VAL)] for n in BASELINES if baseline_metric(n, VAL) in values}
    return found or None


def record_base(
    uri: str, parent_run_id: str, meta: Mapping[str, Any], built: bool, build_seconds: float
) -> None:
    """Log the base model on the parent run: its metrics (``base_metrics``), the ``base_builds`` tag and, when
    this sweep built it, ``base_build_seconds``.

    ``base_builds`` counts how often this sweep built its base: 1, or 0 when another sweep in the same storage had
    built it already; a ``--resume`` adds nothing unless the cached base was deleted."""
    client = open_client(uri)
    for key, value in base_metrics(meta).items():
        client.log_metric(parent_run_id, key, value)
    builds = int(client.get_run(parent_run_id).data.tags.get(BASE_BUILDS_TAG, "0")) + int(built)
    client.set_tag(parent_run_id, BASE_BUILDS_TAG, str(builds))
    if built:
        client.log_metric(parent_run_id, "base_build_seconds", build_seconds)


def record_trial_phase(uri: str, parent_run_id: str, seconds: float) -> None:
    """Log how long the trials took, wall clock, on the parent run."""
    open_client(uri).log_metric(parent_run_id, "trial_phase_seconds", seconds)


# ------------------------------------------------------------------------------------------- the child runs


def _log_params(client: mlflow.MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params that are not there yet (MLflow params are immutable; re-logging a changed value errors)."""
    existing = client.get_run(run_id).data.params
    for key, value in flatten(params).items():
        text = str(value)[:6000]
        if key in existing:
            continue
        client.log_param(run_id, key, text)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``), as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a Tune result, without Tune's bookkeeping that is not a metric."""
    metrics = {}
    for key, value in result.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            metrics[key] = float(value)
    return metrics


def find_child_run(
    client: mlflow.MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str
) -> str | None:
    """The child run of trial ``trial_id`` under the parent, if one was logged."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.{TRIAL_ID_TAG} = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def ensure_child_run(
    client: mlflow.MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    config: Mapping[str, Any],
    run_name: str,
) -> str:
    """The child run of trial ``trial_id`` (created when missing), with the trial's config as params."""
    run_id = find_child_run(client, experiment_id, parent_run_id, trial_id)
    if run_id is None:
        run = client.create_run(
            experiment_id,
            run_name=run_name,
            tags={PARENT_TAG: parent_run_id, TRIAL_ID_TAG: trial_id, ROLE_TAG: ROLE_TRIAL},
        )
        run_id = run.info.run_id
    else:
        rename_run(client, run_id, run_name)
    _log_params(client, run_id, config)
    return run_id


def rename_run(client: mlflow.MlflowClient, run_id: str, name: str) -> None:
    """Give a run ``name`` unless it has it already."""
    if client.get_run(run_id).info.run_name != name:
        client.update_run(run_id, name=name)


def log_trial_result(client: mlflow.MlflowClient, run_id: str, result: Mapping[str, Any], node: str) -> None:
    """One report of a running trial: its numbers as metrics at its Tune iteration, its node and stage as tags."""
    step = int(result.get("training_iteration", 0))
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
    tags = [RunTag(NODE_TAG, node), RunTag(STAGE_TAG, str(result.get(STAGE_KEY, "")))]
    client.log_batch(run_id, metrics=metrics, tags=tags)


def mark_trial(client: mlflow.MlflowClient, run_id: str, status: str, retries: int | None = None) -> None:
    """Set a child run's ``status`` tag (``RUNNING``, ``RETRYING``) and, for a retry, its ``retries`` count."""
    if retries is not None:
        client.set_tag(run_id, RETRIES_TAG, str(retries))
    client.set_tag(run_id, STATUS_TAG, status)


def close_trial_run(client: mlflow.MlflowClient, run_id: str) -> None:
    """A trial that completed: tagged and terminated FINISHED."""
    client.set_tag(run_id, STATUS_TAG, STATUS_FINISHED)
    client.set_terminated(run_id, STATUS_FINISHED)


def record_stopped(client: mlflow.MlflowClient, run_id: str, reason: str) -> None:
    """A trial stopped early: tagged STOPPED with the reason, terminated KILLED (`STATUS_STOPPED`)."""
    client.set_tag(run_id, STATUS_TAG, STATUS_STOPPED)
    client.set_tag(run_id, STOPPED_REASON_TAG, reason[:MAX_TAG_CHARS])
    client.set_terminated(run_id, MLFLOW_STOPPED)


def record_failure(client: mlflow.MlflowClient, run_id: str, message: str) -> None:
    """A trial that failed: tagged FAILED with the end of its error, terminated FAILED."""
    client.set_tag(run_id, STATUS_TAG, "FAILED")
    client.set_tag(run_id, ERROR_TAG, message[-MAX_TAG_CHARS:])
    client.set_terminated(run_id, "FAILED")


# --------------------------------------------------------------------------------------------- reconciliation


def sync_sweep(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    rows: Sequence[dict[str, Any]],
    fixed_config: Mapping[str, Any],
    base: Mapping[str, float] | None = None,
    reference: list[dict] | None = None,
    finished: bool = True,
    baselines: Mapping[str, float] | None = None,
    hypervolume_reference: tuple[float, float] | None = None,
) -> list[dict[str, Any]]:
    """Make MLflow agree with ``rows`` (`sweep.results.collect_rows`); returns them with their ``pareto`` flag
    and ``run_id`` set. ``base`` and ``reference`` are extra points of the parent's plots, ``baselines``
    (`axis_baselines`) its horizontal lines; with ``hypervolume_reference`` (`sweep.hypervolume.reference_point`)
    the parent's ``hypervolume`` series is completed and plotted (`_log_hypervolume_views`)."""
    client = open_client(tracking_uri)
    rows = list(rows)
    for row, on_front in zip(rows, non_dominated_mask(rows)):
        row["pareto"] = bool(on_front)
    for row in rows:
        row["run_id"] = _sync_child_run(client, experiment_id, parent_run_id, row, fixed_config)
    _log_parent_views(client, parent_run_id, rows, base, reference, baselines)
    if hypervolume_reference is not None:
        _log_hypervolume_views(client, parent_run_id, rows, hypervolume_reference)
    client.set_tag(parent_run_id, NOTE_TAG, parent_note(experiment_id, parent_run_id, rows))
    client.set_tag(parent_run_id, "pareto_size", str(sum(row["pareto"] for row in rows)))
    client.set_tag(parent_run_id, "trials", str(len(rows)))
    client.set_tag(
        parent_run_id, "pareto_run_ids", ",".join(r["run_id"] for r in rows if r["pareto"])[:MAX_TAG_CHARS]
    )
    if finished:
        client.set_terminated(parent_run_id, STATUS_FINISHED)
    return rows


def parent_note(experiment_id: str, parent_run_id: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """The parent run's description (Markdown, shown at the top of its page): the link to pareto.html first."""
    link = (
        f"#/experiments/{experiment_id}/runs/{parent_run_id}/artifactPath/{PARETO_HTML}?{UI_WORKFLOW_QUERY}"
    )
    front = sum(bool(r.get("pareto")) for r in rows)
    return (
        f"**[Open the Pareto front ({PARETO_HTML})]({link})**: {front} front points of {len(rows)} trials, "
        f"{MEMORY_KEY} vs {MAP_KEY}; hover a point for its trial and config.\n\n"
        f"Child runs: one per trial, named `tNNNN <ratio>x mAP <{MAP_KEY}>`; filter the front with "
        "`tags.pareto = 'true'`."
    )


def _sync_child_run(
    client: mlflow.MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    row: Mapping[str, Any],
    fixed_config: Mapping[str, Any],
) -> str:
    """One trial's child run made to agree with its row: metrics that differ, tags, front files, end state."""
    run_id = ensure_child_run(
        client,
        experiment_id,
        parent_run_id,
        row["trial_id"],
        {**fixed_config, **row["config"]},
        trial_run_name(row["trial_id"], row["result"], row.get("number")),
    )
    have = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    step = int(row["result"].get("training_iteration", 0))
    metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(row["result"]).items() if have.get(k) != v]
    tags = [
        RunTag(TRIAL_ID_TAG, row["trial_id"]),
        RunTag(STATUS_TAG, row["status"].upper() if row["status"] != "ok" else STATUS_FINISHED),
        RunTag(PARETO_TAG, "true" if row["pareto"] else "false"),
        RunTag(NODE_TAG, str(row["node"])),
        RunTag(RETRIES_TAG, str(row["retries"])),
    ]
    if row["status"] == "failed" and row["error"]:
        tags.append(RunTag(ERROR_TAG, str(row["error"])[-MAX_TAG_CHARS:]))
    if row["status"] == "stopped":
        tags.append(RunTag(STOPPED_REASON_TAG, str(row.get("stopped_reason") or "")[:MAX_TAG_CHARS]))
    client.log_batch(run_id, metrics=metrics, tags=tags)
    if row["pareto"]:
        _log_front_member_artifacts(client, run_id, row)
    if row["status"] in ("ok", "failed", "stopped"):
        end = {"ok": STATUS_FINISHED, "failed": "FAILED", "stopped": MLFLOW_STOPPED}[row["status"]]
        client.set_terminated(run_id, end)
    return run_id


def _log_parent_views(
    client: mlflow.MlflowClient,
    parent_run_id: str,
    rows: Sequence[Mapping[str, Any]],
    base: Mapping[str, float] | None,
    reference: list[dict] | None,
    baselines: Mapping[str, float] | None = None,
) -> None:
    """The front as ``pareto.csv``, ``pareto.png`` and ``pareto.html`` on the parent run."""
    view_rows = [
        {k: row[k] for k in ("trial_id", MAP_KEY, MEMORY_KEY, "status", "pareto", "config", "run_id")}
        | {k: row["result"].get(k) for k in (TEST_MAP_KEY, DROP_KEY, TEST_DROP_KEY, RATIO_KEY)}
        for row in rows
    ]
    # Lazy: matplotlib is a second of start-up that the release command and a refused sweep never need.
    from dashboards.pareto_png import plot_pareto_png

    csv_name, png_name, html_name = PARETO_FILES
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_pareto_csv(view_rows, tmp_path / csv_name, baselines=baselines)
        plot_pareto_png(view_rows, tmp_path / png_name, base=base, reference=reference, baselines=baselines)
        write_pareto_html(
            view_rows, tmp_path / html_name, base=base, reference=reference, baselines=baselines
        )
        for name in PARETO_FILES:
            client.log_artifact(parent_run_id, str(tmp_path / name))


def log_hypervolume(client: mlflow.MlflowClient, run_id: str, curve: Sequence[tuple[int, float]]) -> None:
    """Log ``curve`` (``(trials_done, value)`` in step order) as the run's ``hypervolume`` history, idempotently:
    a step already logged is left as it is, except the curve's last one, which is logged again when its value
    changed (a failed trial that a ``--resume`` re-ran and completed), so the run's latest value is always the
    front's. The live logger passes one step, the reconciler the whole curve."""
    if not curve:
        return
    logged: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, HYPERVOLUME_METRIC), key=lambda m: m.timestamp):
        logged[m.step] = m.value  # the newest entry of a step is the one MLflow shows
    last_step, last_value = curve[-1]
    now = int(time.time() * 1000)
    metrics = [Metric(HYPERVOLUME_METRIC, float(v), now, int(s)) for s, v in curve if s not in logged]
    if last_step in logged and not math.isclose(logged[last_step], last_value, rel_tol=1e-9, abs_tol=1e-12):
        metrics.append(Metric(HYPERVOLUME_METRIC, float(last_value), now, int(last_step)))
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _log_hypervolume_views(
    client: mlflow.MlflowClient,
    parent_run_id: str,
    rows: Sequence[Mapping[str, Any]],
    reference: tuple[float, float],
) -> None:
    """The whole ``hypervolume`` curve recomputed from ``rows`` in the order their trials ended (so a resumed or
    ``--sync``'d sweep ends with a complete series; `log_hypervolume`) and ``hypervolume.png`` of it."""
    curve = hv.hypervolume_curve(hv.completion_order(rows), reference)
    log_hypervolume(client, parent_run_id, curve)
    # Lazy: matplotlib, as in _log_parent_views.
    from dashboards.hypervolume_png import plot_hypervolume_png

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_hypervolume_png(
            curve,
            Path(tmp) / HYPERVOLUME_PNG,
            reference=reference,
            y_label=f"{HYPERVOLUME_METRIC} ({hv.UNIT})",
        )
        client.log_artifact(parent_run_id, str(path))


def _log_front_member_artifacts(client: mlflow.MlflowClient, run_id: str, row: Mapping[str, Any]) -> None:
    """The shipped file, its per-layer report and an HTML view of it, from the trial's final checkpoint (once)."""
    if not row.get("checkpoint"):
        return
    if any(a.path == ARTIFACT_DIR for a in client.list_artifacts(run_id)):
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pafs.copy_files(row["checkpoint"], tmp, source_filesystem=row["checkpoint_fs"])
        names = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        if not (folder / ARTIFACT_FILE).is_file():
            logger.warning(
                "trial %s: no %s in its final checkpoint %s",
                row["trial_id"],
                ARTIFACT_FILE,
                row["checkpoint"],
            )
            return
        layers_json = folder / LAYERS_JSON
        if layers_json.exists():
            report = json.loads(layers_json.read_text())
            names.append(
                write_layer_html(
                    report["layers"],
                    folder / LAYERS_HTML,
                    title=f"trial {row['trial_id']} — per layer",
                    totals=report["totals"],
                )
            )
        for path in names:
            client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)
