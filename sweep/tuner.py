"""Build the Ray Tune ``Tuner``: the trial function with its resources, the multi-objective Optuna searcher
(study in an RDB store so ``--resume`` continues it), failure retries, checkpoints and the MLflow callback.

Ray Tune / Optuna traps handled here (docs/traps.md): metric/mode go to the searcher only (setting them on
``TuneConfig`` too would make the study single-objective); resources are a dict with both ``cpu`` and ``gpu``;
``num_to_keep`` ≥ 2. The objectives are the trial contract's (``trainables.contract.OBJECTIVES``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import optuna
from ray import tune
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from search_spaces.schema import SearchSpace
from sweep.early_stop_scheduler import ParetoEarlyStopping
from trainables.contract import EARLY_STOP_REASON_KEY, OBJECTIVES
from trainables.pipeline import run_trial

logger = logging.getLogger("vladsweep.tuner")

STUDY_NAME = "vladsweep"


class SuggestFromSpace:
    """Optuna define-by-run space: suggests the searched parameters, returns the fixed ones as constants so they
    are part of every trial's config (and so of its MLflow params). A class, not a closure: Tune pickles it."""

    def __init__(
        self, distributions: Mapping[str, optuna.distributions.BaseDistribution], fixed: Mapping[str, Any]
    ):
        self.distributions = dict(distributions)
        self.fixed = dict(fixed)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        for name, dist in self.distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                trial.suggest_categorical(name, dist.choices)
            elif isinstance(dist, optuna.distributions.IntDistribution):
                trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
            elif isinstance(dist, optuna.distributions.FloatDistribution):
                trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
            else:  # pragma: no cover - schema only produces the three kinds above
                raise TypeError(f"unsupported distribution for {name}: {dist!r}")
        return dict(self.fixed)


class MultiObjectiveOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that keeps the study true to the sweep, also across a driver that died.

    - A failed trial is told as FAIL. Ray's version only checks ``val is None``; with several objectives a crashed
      trial yields ``[None, None]``, Optuna refuses it and the trial stays RUNNING in the study forever.
    - On restore, study trials that are RUNNING but belong to no restored Tune trial are told FAIL: the driver died
      after asking Optuna for them and before Tune saved its state, so nothing would ever finish them.
    - A trial stopped early (`sweep.early_stop_scheduler`: ``EARLY_STOP_REASON_KEY`` in its last result) is told PRUNED:
      neither a point of the study nor a failure.
    (A trial that ends a second time after a resume — the driver died between telling Optuna and saving Tune's
    state — is harmless: Ray logs Optuna's refusal of a second ``tell`` and the study keeps the first result.)
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get(EARLY_STOP_REASON_KEY) and not error:
            # No values and no error is Ray's own case for ``tell(trial, None, state=PRUNED)``.
            result = None
        elif result and isinstance(self.metric, list) and any(result.get(m) is None for m in self.metric):
            result = None
            error = True
        super().on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self._ot_study is None:
            return
        known = {ot_trial.number for ot_trial in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for number in {t.number for t in running} - known:
            logger.info(
                "Optuna trial %d was asked for by a driver that died before saving it: told FAIL", number
            )
            self._ot_study.tell(number, state=optuna.trial.TrialState.FAIL)


def make_searcher(space: SearchSpace, seed: int, storage_url: str, max_concurrent: int) -> ConcurrencyLimiter:
    """The multi-objective Optuna searcher over ``space``, its study in ``storage_url``, at most ``max_concurrent``
    trials asked for at once."""
    storage = optuna.storages.RDBStorage(storage_url)
    searcher = MultiObjectiveOptunaSearch(
        space=SuggestFromSpace(space.optuna_distributions(), space.fixed),
        metric=list(OBJECTIVES),
        mode=list(OBJECTIVES.values()),
        sampler=space.make_sampler(seed),
        study_name=STUDY_NAME,
        storage=storage,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def trial_resources(cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """Tune's resource dict of one trial, with both keys always (see the traps in the module doc)."""
    return {"cpu": cpus_per_trial, "gpu": gpus_per_trial}


def wrap_trainable(context: Mapping[str, Any], cpus_per_trial: float, gpus_per_trial: float):
    """The trial function with the sweep's fixed inputs (``context``) bound and its resources declared."""
    return tune.with_resources(
        tune.with_parameters(run_trial, context=dict(context)),
        trial_resources(cpus_per_trial, gpus_per_trial),
    )


def build_tuner(
    *,
    space: SearchSpace,
    context: Mapping[str, Any],
    storage_root: str,
    name: str,
    num_samples: int,
    max_concurrent: int,
    cpus_per_trial: float,
    gpus_per_trial: float,
    seed: int,
    optuna_url: str,
    callbacks: list,
    max_failures: int = 2,
    early_stop: ParetoEarlyStopping | None = None,
) -> Tuner:
    """A new sweep's ``Tuner``: ``num_samples`` trials of ``space``, ``max_concurrent`` at a time, each retried
    up to ``max_failures`` times from its newest checkpoint; with ``early_stop`` as its scheduler (the trials must
    then report the early signal: ``context["early_signal"]``), else Tune's FIFO."""
    return Tuner(
        wrap_trainable(context, cpus_per_trial, gpus_per_trial),
        tune_config=TuneConfig(
            search_alg=make_searcher(space, seed, optuna_url, max_concurrent),
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            scheduler=early_stop,
            # One worker process per slot for the whole sweep: a fresh actor per trial re-imports torch, faiss and
            # Ray (seconds of CPU each time on a small machine) between every two trials.
            reuse_actors=True,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_root,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            verbose=1,
        ),
    )


def restore_tuner(
    experiment_dir: str,
    context: Mapping[str, Any],
    cpus_per_trial: float,
    gpus_per_trial: float,
    early_stop: ParetoEarlyStopping | None = None,
) -> Tuner:
    """The ``Tuner`` of the sweep in ``experiment_dir`` (``--resume``): unfinished and errored trials go on.

    ``Tuner.restore`` takes no ``TuneConfig``: the sweep keeps the scheduler it was started with (pickled in its
    ``tuner.pkl``; `sweep.early_stop_scheduler` rebuilds its state from the restored trials). ``early_stop`` is what this
    command line asks for; when it disagrees with the restored sweep, a warning says so."""
    tuner = Tuner.restore(
        experiment_dir,
        trainable=wrap_trainable(context, cpus_per_trial, gpus_per_trial),
        resume_unfinished=True,
        resume_errored=True,
    )
    # Ray keeps the restored TuneConfig on a private attribute; only read, and only for the warning.
    tune_config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    if tune_config is not None:
        restored = isinstance(tune_config.scheduler, ParetoEarlyStopping)
        if restored != (early_stop is not None):
            logger.warning(
                "this sweep was started %s --early-stop and resumes so (Ray's Tuner.restore keeps the scheduler a "
                "sweep began with); resume with the flags it was started with",
                "with" if restored else "without",
            )
    return tuner
