"""MLflow bookkeeping for a sweep: one parent run, one child run per Ray Tune trial, all logged from the driver.

Two writers share the job. ``TrialRunLogger`` is a Tune callback that mirrors trials into child runs while they
run; it never lets an MLflow outage stop the sweep. ``sync_sweep`` is the reconciler: it reads the Ray results from
storage and makes MLflow agree with them (missing child runs, final metrics, status and ``pareto`` tags, the front's
artifacts, the parent's ``pareto.{csv,png,html}``). It is idempotent, so it runs at the end of every sweep, after a
``--resume`` and from ``python -m sweep.run --sync``; a child run is found by its ``trial_id`` tag, never duplicated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.tune import Callback

logger = logging.getLogger("vladsweep.tracking")

SWEEP_TAG = "vladsweep.sweep_dir"
ROLE_TAG = "vladsweep.role"
RETRY_AFTER_S = 60.0


class TrackingError(RuntimeError):
    """The MLflow tracking URI cannot be used; the message names the URI and the reason."""


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
    import mlflow

    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

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
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"--mlflow-uri {uri}: cannot open the tracking store ({exc}).") from exc


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def ensure_experiment(uri: str, name: str) -> str:
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name)


def find_parent_run(uri: str, experiment_id: str, sweep_dir: str) -> str | None:
    runs = _client(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}' and tags.`{ROLE_TAG}` = 'sweep'",
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
    client = _client(uri)
    if run_id is None:
        run = client.create_run(
            experiment_id,
            run_name=sweep_name,
            tags={SWEEP_TAG: sweep_dir, ROLE_TAG: "sweep", **tags},
        )
        run_id = run.info.run_id
        _log_params(client, run_id, params)
    else:
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    return run_id


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params that are not there yet (MLflow params are immutable; re-logging a changed value errors)."""
    existing = client.get_run(run_id).data.params
    for key, value in flatten(params).items():
        text = str(value)[:6000]
        if key in existing:
            continue
        client.log_param(run_id, key, text)


def _node_label(result: Mapping[str, Any]) -> str:
    """IP plus a short node id: on one machine several Ray nodes share 127.0.0.1."""
    node_id = str(result.get("node_id", ""))[:12]
    return f"{result.get('node_ip', '')}/{node_id}" if node_id else str(result.get("node_ip", ""))


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
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
    skip = {"pid", "timestamp", "time_this_iter_s", "iterations_since_restore", "done", "trial_id"}
    metrics = {}
    for key, value in result.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            metrics[key] = float(value)
    return metrics


def find_child_run(client, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.trial_id = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def ensure_child_run(
    client, experiment_id: str, parent_run_id: str, trial_id: str, config: Mapping[str, Any], run_name: str
) -> str:
    run_id = find_child_run(client, experiment_id, parent_run_id, trial_id)
    if run_id is None:
        run = client.create_run(
            experiment_id,
            run_name=run_name,
            tags={"mlflow.parentRunId": parent_run_id, "trial_id": trial_id, ROLE_TAG: "trial"},
        )
        run_id = run.info.run_id
    _log_params(client, run_id, config)
    return run_id


class TrialRunLogger(Callback):
    """Mirror Tune trials into MLflow child runs while the sweep runs; an MLflow outage only pauses the mirror."""

    def __init__(
        self, tracking_uri: str, experiment_id: str, parent_run_id: str, fixed_config: Mapping[str, Any]
    ):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.fixed_config = dict(fixed_config)
        self._client = None
        self._runs: dict[str, str] = {}
        self._paused_until = 0.0

    def __getstate__(self) -> dict:
        # Tune pickles callbacks into its experiment state; an MLflow client must not travel with it.
        state = self.__dict__.copy()
        state["_client"] = None
        state["_runs"] = {}
        return state

    def _call(self, what: str, fn, *args, **kwargs):
        if time.monotonic() < self._paused_until:
            return None
        try:
            if self._client is None:
                self._client = _client(self.tracking_uri)
            return fn(*args, **kwargs)
        except Exception as exc:
            self._paused_until = time.monotonic() + RETRY_AFTER_S
            logger.warning(
                "MLflow at %s failed while %s (%s); trials go on and results stay in Ray storage — the end of the "
                "sweep, `--resume` or `--sync` logs what is missing.",
                self.tracking_uri,
                what,
                exc,
            )
            return None

    def _run_for(self, trial) -> str | None:
        if trial.trial_id not in self._runs:
            run_id = self._call(
                "creating a child run",
                lambda: ensure_child_run(
                    self._client,
                    self.experiment_id,
                    self.parent_run_id,
                    trial.trial_id,
                    {**self.fixed_config, **trial.config},
                    str(trial),
                ),
            )
            if run_id is None:
                return None
            self._runs[trial.trial_id] = run_id
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if run_id:
            self._call("tagging a trial", lambda: self._client.set_tag(run_id, "status", "RUNNING"))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        if not run_id:
            return
        step = int(result.get("training_iteration", 0))

        def log() -> None:
            from mlflow.entities import Metric, RunTag

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
            tags = [
                RunTag("node", _node_label(result)),
                RunTag("stage", str(result.get("stage", ""))),
            ]
            self._client.log_batch(run_id, metrics=metrics, tags=tags)

        self._call("logging metrics", log)

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if run_id:
            self._call(
                "recording a retry",
                lambda: (
                    self._client.set_tag(run_id, "retries", str(trial.run_metadata.num_failures)),
                    self._client.set_tag(run_id, "status", "RETRYING"),
                ),
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if run_id:
            self._call("recording a failure", lambda: _record_failure(self._client, run_id, trial))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if run_id:
            self._call(
                "closing a child run",
                lambda: (
                    self._client.set_tag(run_id, "status", "FINISHED"),
                    self._client.set_terminated(run_id, "FINISHED"),
                ),
            )


def _record_failure(client, run_id: str, trial) -> None:
    message = _error_text(trial)
    client.set_tag(run_id, "status", "FAILED")
    client.set_tag(run_id, "error", message[-4900:])
    client.set_terminated(run_id, "FAILED")


# --------------------------------------------------------------------------------------------- reconciliation


def _error_text(trial) -> str:
    """The last error of a trial: Ray keeps its traceback as text in the trial's storage."""
    try:
        text = trial.get_error()
    except Exception:  # storage unreachable: say so rather than lose the failure
        text = None
    return str(text or "the trial failed; see its error.txt in Ray storage")[-4900:]


def _trial_status(trial) -> str:
    return {"TERMINATED": "ok", "ERROR": "failed"}.get(trial.status, trial.status.lower())


def collect_rows(experiment_dir: str) -> list[dict[str, Any]]:
    """One row per trial from Ray's experiment state: config, last result, status, node and checkpoint path."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_dir)
    rows = []
    for trial in analysis.trials:
        result = dict(trial.last_result or {})
        status = _trial_status(trial)
        if status == "ok" and not all(
            isinstance(result.get(k), int | float) and math.isfinite(result[k]) for k in ("mAP", "memory_mib")
        ):
            status = "failed"
        checkpoint = trial.checkpoint
        rows.append(
            {
                "trial_id": trial.trial_id,
                "name": str(trial),
                "status": status,
                "config": dict(trial.config),
                "result": result,
                "mAP": result.get("mAP"),
                "memory_mib": result.get("memory_mib"),
                "node": _node_label(result),
                "retries": trial.run_metadata.num_failures,
                "error": _error_text(trial) if status == "failed" else None,
                "checkpoint": checkpoint.path if checkpoint is not None else None,
                "checkpoint_fs": checkpoint.filesystem if checkpoint is not None else None,
            }
        )
    return rows


def sync_sweep(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    experiment_dir: str,
    fixed_config: Mapping[str, Any],
    base: Mapping[str, float] | None = None,
    reference: list[dict] | None = None,
    finished: bool = True,
) -> list[dict[str, Any]]:
    """Make MLflow agree with Ray's results; returns the rows with their ``pareto`` flag."""
    from dashboards.views import plot_pareto_png, write_pareto_csv, write_pareto_html
    from sweep.pareto import non_dominated_mask

    client = _client(tracking_uri)
    rows = collect_rows(experiment_dir)
    front = non_dominated_mask(rows)
    for row, on_front in zip(rows, front):
        row["pareto"] = bool(on_front)

    for row in rows:
        run_id = ensure_child_run(
            client,
            experiment_id,
            parent_run_id,
            row["trial_id"],
            {**fixed_config, **row["config"]},
            row["name"],
        )
        row["run_id"] = run_id
        have = client.get_run(run_id).data.metrics
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        step = int(row["result"].get("training_iteration", 0))
        metrics = [
            Metric(k, v, now, step) for k, v in numeric_metrics(row["result"]).items() if have.get(k) != v
        ]
        tags = [
            RunTag("trial_id", row["trial_id"]),
            RunTag("status", row["status"].upper() if row["status"] != "ok" else "FINISHED"),
            RunTag("pareto", "true" if row["pareto"] else "false"),
            RunTag("node", str(row["node"])),
            RunTag("retries", str(row["retries"])),
        ]
        if row["status"] == "failed" and row["error"]:
            tags.append(RunTag("error", str(row["error"])[-4900:]))
        client.log_batch(run_id, metrics=metrics, tags=tags)
        if row["pareto"]:
            _log_front_member_artifacts(client, run_id, row)
        if row["status"] in ("ok", "failed"):
            client.set_terminated(run_id, "FINISHED" if row["status"] == "ok" else "FAILED")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        view_rows = [
            {k: row[k] for k in ("trial_id", "mAP", "memory_mib", "status", "pareto", "config", "run_id")}
            | {
                "mAP_drop": row["result"].get("mAP_drop"),
                "compression_ratio": row["result"].get("compression_ratio"),
            }
            for row in rows
        ]
        write_pareto_csv(view_rows, tmp_path / "pareto.csv")
        plot_pareto_png(view_rows, tmp_path / "pareto.png", base=base, reference=reference)
        write_pareto_html(view_rows, tmp_path / "pareto.html", base=base, reference=reference)
        for name in ("pareto.csv", "pareto.png", "pareto.html"):
            client.log_artifact(parent_run_id, str(tmp_path / name))
    n_front = sum(row["pareto"] for row in rows)
    client.set_tag(parent_run_id, "pareto_size", str(n_front))
    client.set_tag(parent_run_id, "trials", str(len(rows)))
    client.set_tag(parent_run_id, "pareto_run_ids", ",".join(r["run_id"] for r in rows if r["pareto"])[:4900])
    if finished:
        client.set_terminated(parent_run_id, "FINISHED")
    return rows


def _log_front_member_artifacts(client, run_id: str, row: Mapping[str, Any]) -> None:
    """The shipped file and its per-layer table, from the trial's final checkpoint (once)."""
    if not row.get("checkpoint"):
        return
    if any(a.path == "model" for a in client.list_artifacts(run_id)):
        return
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(row["checkpoint"], tmp, source_filesystem=row["checkpoint_fs"])
        names = [p for p in Path(tmp).iterdir() if p.is_file() and not p.name.startswith(".")]
        artifact = [p for p in names if p.suffix == ".safetensors"]
        if not artifact:
            logger.warning(
                "trial %s: no artifact in its final checkpoint %s", row["trial_id"], row["checkpoint"]
            )
            return
        layers_json = Path(tmp) / "layers.json"
        if layers_json.exists():
            from dashboards.views import write_layer_html

            report = json.loads(layers_json.read_text())
            names.append(
                write_layer_html(
                    report["layers"],
                    Path(tmp) / "layers.html",
                    title=f"trial {row['trial_id']} — per layer",
                    totals=report["totals"],
                )
            )
        for path in names:
            client.log_artifact(run_id, str(path), artifact_path="model")


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
