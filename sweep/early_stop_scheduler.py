"""The Ray Tune scheduler of ``--early-stop``: stops a trial after its ``prune`` stage when `sweep.early_stop`'s
rule says its projection cannot reach the completed trials' front; everything else is `FIFOScheduler`'s, so the
scheduling itself is untouched.

How a stop travels: the scheduler answers ``STOP`` to the trial's ``EARLY_STAGE`` report, then, in
``on_trial_complete`` — which Tune calls before it tells the searcher and the callbacks, on the trial's last
result (ray/tune/execution/tune_controller.py ``stop_trial``) — writes the reason into that result
(``EARLY_STOP_REASON_KEY``). From there the Optuna searcher tells the study PRUNED (`sweep.tuner`), MLflow tags the
run STOPPED with the reason (`sweep.callbacks`, `sweep.tracking`), `sweep.results.collect_rows` reads the row as
``stopped``, and Tune saves it with the trial's state.

State across a driver that died: Tune saves a searcher's and the callbacks' state, but never calls a scheduler's
``save``/``restore`` (``TuneController.resume``); the scheduler comes back as pickled into ``tuner.pkl`` when the
sweep began, empty. It rebuilds its state from the trials: Tune calls ``on_trial_add`` for every restored trial,
and an ended trial's saved last result says whether it completed (a front point) or was stopped (its reason).
``save``/``restore`` are implemented as well, as plain JSON (the rule, the front points, the stop reasons) so a
saved state loads without running code, for callers that use them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from sweep.early_stop import EarlyStopRule, FrontPoint, early_point, final_point
from sweep.tracking import trial_number, trial_run_name
from trainables.contract import EARLY_STAGE, EARLY_STOP_REASON_KEY

logger = logging.getLogger("vladsweep.early_stop")


def _name(trial: Trial) -> str:
    return trial_run_name(trial.trial_id, number=trial_number(trial.experiment_tag))


class ParetoEarlyStopping(FIFOScheduler):
    """Stop a trial after ``EARLY_STAGE`` when ``rule`` (`sweep.early_stop.EarlyStopRule`) finds its projection
    dominated by the completed trials' front; the module doc says how the decision travels and survives a restore."""

    # One decision per early report, taken before the trial goes on: Tune must not buffer several results of a
    # trial into one step (as for HyperBand).
    _supports_buffered_results = False

    def __init__(self, rule: EarlyStopRule | None = None):
        super().__init__()
        self.rule = rule or EarlyStopRule()
        #: trial_id -> final point, for every trial that completed with finite objectives.
        self.completed: dict[str, FrontPoint] = {}
        #: trial_id -> why it was stopped.
        self.stopped: dict[str, str] = {}

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        # A restored sweep: an ended trial's saved last result tells what it was (see the module doc).
        if trial.status != Trial.TERMINATED:
            return
        result = trial.last_result or {}
        reason = result.get(EARLY_STOP_REASON_KEY)
        if reason:
            self.stopped[trial.trial_id] = str(reason)
        else:
            self._record_completed(trial, result)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        point = early_point(result)
        if point is None or trial.trial_id in self.stopped:
            return TrialScheduler.CONTINUE
        reason = self.rule.reason(point, list(self.completed.values()))
        if reason is None:
            return TrialScheduler.CONTINUE
        self.stopped[trial.trial_id] = reason
        logger.info("trial %s stopped early: %s", _name(trial), reason)
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        reason = self.stopped.get(trial.trial_id)
        if reason is None:
            self._record_completed(trial, result)
            return
        # A new dict through update_last_result, not an in-place edit: Tune caches the JSON of a trial's run
        # metadata and renews it only when the attribute is set.
        trial.update_last_result({**trial.last_result, EARLY_STOP_REASON_KEY: reason})

    def debug_string(self) -> str:
        return (
            f"Pareto early stopping after {EARLY_STAGE}: {len(self.completed)} completed, {len(self.stopped)} "
            f"stopped ({self.rule})"
        )

    def save(self, checkpoint_path: str) -> None:
        state = {
            "rule": asdict(self.rule),
            "completed": {
                tid: {"name": p.name, "values": dict(p.values)} for tid, p in self.completed.items()
            },
            "stopped": self.stopped,
        }
        with open(checkpoint_path, "w") as f:
            json.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self.rule = EarlyStopRule(**state["rule"])
        self.completed = {tid: FrontPoint(p["name"], p["values"]) for tid, p in state["completed"].items()}
        self.stopped = dict(state["stopped"])

    def _record_completed(self, trial: Trial, result: Mapping[str, Any]) -> None:
        point = final_point(result)
        if point is not None:
            self.completed[trial.trial_id] = FrontPoint(_name(trial), point)
