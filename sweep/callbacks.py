"""The Ray Tune callback that mirrors trials into MLflow child runs while a sweep runs.

The mirror is best effort: an MLflow outage pauses it (for ``RETRY_AFTER_S``) and never stops the sweep, since Ray's
storage keeps every result and `sweep.tracking.sync_sweep` logs what is missing at the end, on ``--resume`` or on
``--sync``. What is written and under which names is `sweep.tracking`'s business; this module only hooks it to
Tune's events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ray.tune import Callback

from sweep import tracking
from sweep.hypervolume import hypervolume
from sweep.results import error_text, node_label
from trainables.contract import EARLY_STOP_REASON_KEY, MAP_KEY

logger = logging.getLogger("vladsweep.tracking")

#: A paused mirror (MLflow unreachable) tries again after this many seconds.
RETRY_AFTER_S = 60.0


class TrialRunLogger(Callback):
    """Mirror Tune trials into MLflow child runs while the sweep runs; an MLflow outage only pauses the mirror."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        fixed_config: Mapping[str, Any],
        hypervolume_reference: tuple[float, float] | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.fixed_config = dict(fixed_config)
        #: `sweep.hypervolume.reference_point` of the base; None logs no ``hypervolume``.
        self.hypervolume_reference = hypervolume_reference
        self._client = None
        self._runs: dict[str, str] = {}
        self._paused_until = 0.0

    def __getstate__(self) -> dict:
        # Tune pickles callbacks into its experiment state; an MLflow client must not travel with it.
        state = self.__dict__.copy()
        state["_client"] = None
        state["_runs"] = {}
        return state

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` unless the mirror is paused; an error pauses it (with a warning) instead of reaching Tune."""
        if time.monotonic() < self._paused_until:
            return None
        try:
            if self._client is None:
                self._client = tracking.open_client(self.tracking_uri)
            return fn()
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
                lambda: tracking.ensure_child_run(
                    self._client,
                    self.experiment_id,
                    self.parent_run_id,
                    trial.trial_id,
                    {**self.fixed_config, **trial.config},
                    tracking.trial_run_name(
                        trial.trial_id, number=tracking.trial_number(trial.experiment_tag)
                    ),
                ),
            )
            if run_id is None:
                return None
            self._runs[trial.trial_id] = run_id
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if run_id:
            self._call("tagging a trial", lambda: tracking.mark_trial(self._client, run_id, "RUNNING"))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        if run_id:
            self._call(
                "logging metrics",
                lambda: tracking.log_trial_result(self._client, run_id, result, node_label(result)),
            )
            if MAP_KEY in result:  # the final report: the run's name gets the trial's ratio and mAP
                self._call(
                    "naming a child run",
                    lambda: tracking.rename_run(
                        self._client,
                        run_id,
                        tracking.trial_run_name(
                            trial.trial_id, result, tracking.trial_number(trial.experiment_tag)
                        ),
                    ),
                )

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if run_id:
            self._call(
                "recording a retry",
                lambda: tracking.mark_trial(
                    self._client, run_id, "RETRYING", retries=trial.run_metadata.num_failures
                ),
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if run_id:
            self._call(
                "recording a failure",
                lambda: tracking.record_failure(self._client, run_id, error_text(trial)),
            )
        self._log_hypervolume(trials, trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        # Set by the early-stopping scheduler before Tune calls this (sweep/early_stop_scheduler.py).
        reason = (trial.last_result or {}).get(EARLY_STOP_REASON_KEY)
        if run_id and reason:
            self._call(
                "recording an early stop", lambda: tracking.record_stopped(self._client, run_id, reason)
            )
        elif run_id:
            self._call("closing a child run", lambda: tracking.close_trial_run(self._client, run_id))
        self._log_hypervolume(trials, trial)

    def _log_hypervolume(self, trials, trial) -> None:
        """The front's ``hypervolume`` on the parent run once ``trial`` ended, at step = trials done (completed +
        failed). Counted from Tune's list of trials, so a ``--resume`` goes on from the trials it restored."""
        reference = getattr(self, "hypervolume_reference", None)  # a sweep pickled before it had one: None
        if reference is None:
            return
        # Tune calls on_trial_complete before it marks the trial TERMINATED, on_trial_error after ERROR.
        done = [t for t in trials if t is trial or t.status in ("TERMINATED", "ERROR")]
        points = [{**t.last_result, "status": "failed" if t.status == "ERROR" else "ok"} for t in done]
        self._call(
            "logging the hypervolume",
            lambda: tracking.log_hypervolume(
                self._client,
                self.parent_run_id,
                [(len(done), hypervolume(points, reference))],
            ),
        )
