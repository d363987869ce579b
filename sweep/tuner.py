"""Build the Ray Tune ``Tuner``: the trial function with its resources, the multi-objective Optuna searcher
(study in an RDB store so ``--resume`` continues it, kept in the sweep's storage: `sweep.storage.StudyLocation`),
failure retries, checkpoints and the MLflow callback.

Ray Tune / Optuna traps handled here (docs/traps.md): metric/mode go to the searcher only (setting them on
``TuneConfig`` too would make the study single-objective); resources are a dict with both ``cpu`` and ``gpu``;
``num_to_keep`` ≥ 2. The objectives are the trial contract's (``trainables.contract.OBJECTIVES``).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Mapping
from typing import Any

import optuna
from ray import tune
from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from search_spaces.schema import SearchSpace
from sweep.early_stop_scheduler import ParetoEarlyStopping
from sweep.storage import STUDY_NAME, StorageError, StudyLocation
from trainables.contract import EARLY_STOP_REASON_KEY, OBJECTIVES
from trainables.pipeline import run_trial

logger = logging.getLogger("vladsweep.tuner")

#: A copy of the study that could not be kept in the storage is tried again after this many seconds (an object
#: store that does not answer must not slow every trial's start and end).
KEEP_RETRY_AFTER_S = 60.0


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
    - The study's place is the driver's, not the pickle's: Tune pickles the searcher (``tuner.pkl``, its state
      file), and Ray's version pickles the open storage with the sqlite path of the driver that started the sweep.
      Here the pickle holds no storage and each study trial as its number; `attach` opens the study where this
      driver keeps it (a new head has another working directory, or none of the old one's files).
    - After each write of the study (a trial asked for, a trial told), the study's copy in the sweep's storage is
      brought up to date (`StudyLocation.keep`; a no-op but for a URI storage), so a ``--resume`` on a new head
      finds every trial that Tune's saved state knows (Tune saves the searcher after the ``ask``, never before).
    """

    #: Class defaults: a searcher pickled before these existed restores without them.
    _location: StudyLocation | None = None
    _keep_paused_until = 0.0

    def __init__(self, *args: Any, location: StudyLocation | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._location = location

    def attach(self, location: StudyLocation) -> None:
        """Open the study at ``location`` (created when missing) and map the known Tune trials onto it."""
        numbers = self._trial_numbers()
        self._location = location
        self._study_name = location.study_name
        self._storage = optuna.storages.RDBStorage(location.url)
        self._setup_study(self._mode)
        self._ot_trials = {}
        by_number = {t.number: t._trial_id for t in self._ot_study.get_trials(deepcopy=False)}
        for trial_id, number in numbers.items():
            if number in by_number:
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, by_number[number])
            else:  # only when the study's copy fell behind (an unreachable storage): Tune still has the result
                logger.warning(
                    "Tune trial %s is Optuna trial %d, which the study at %s does not have: its result will not "
                    "reach the study",
                    trial_id,
                    number,
                    location.kept_at or location.url,
                )

    def _trial_numbers(self) -> dict[str, int]:
        """Tune trial id -> Optuna trial number (a restored pickle holds the numbers, a live searcher the trials)."""
        return {
            trial_id: trial if isinstance(trial, int) else trial.number
            for trial_id, trial in self._ot_trials.items()
        }

    def keep_study(self, force: bool = False) -> None:
        """Bring the study's copy in the sweep's storage up to date; a failure warns and never stops the sweep
        (tried again after ``KEEP_RETRY_AFTER_S``, or at once when ``force``)."""
        if self._location is None or self._location.kept_at is None:
            return
        if not force and time.monotonic() < self._keep_paused_until:
            return
        try:
            self._location.keep()
        except StorageError as exc:
            self._keep_paused_until = time.monotonic() + KEEP_RETRY_AFTER_S
            logger.warning(
                "%s; trials go on, the local copy %s is complete (a --resume on this head continues it)",
                exc,
                self._location.local_path,
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_storage=None, _ot_study=None, _keep_paused_until=0.0)
        state["_ot_trials"] = self._trial_numbers()
        return state

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__getstate__(), out)

    def suggest(self, trial_id: str) -> dict | None:
        asked = trial_id not in self._ot_trials
        config = super().suggest(trial_id)
        if asked:
            self.keep_study()
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get(EARLY_STOP_REASON_KEY) and not error:
            # No values and no error is Ray's own case for ``tell(trial, None, state=PRUNED)``.
            result = None
        elif result and isinstance(self.metric, list) and any(result.get(m) is None for m in self.metric):
            result = None
            error = True
        if trial_id not in self._ot_trials:
            return  # warned in attach: the study lost this trial
        super().on_trial_complete(trial_id, result=result, error=error)
        self.keep_study()

    def restore(self, checkpoint_path: str) -> None:
        location = self._location  # this driver's, set by restore_tuner; the saved one is the old driver's
        super().restore(checkpoint_path)
        if location is not None:
            self.attach(location)
        if self._ot_study is None:
            return
        known = {ot_trial.number for ot_trial in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for number in {t.number for t in running} - known:
            logger.info(
                "Optuna trial %d was asked for by a driver that died before saving it: told FAIL", number
            )
            self._ot_study.tell(number, state=optuna.trial.TrialState.FAIL)


def make_searcher(
    space: SearchSpace, seed: int, storage_url: str | StudyLocation, max_concurrent: int
) -> ConcurrencyLimiter:
    """The multi-objective Optuna searcher over ``space``, its study at ``storage_url`` (a URL: study
    ``STUDY_NAME`` there, nothing kept elsewhere), at most ``max_concurrent`` trials asked for at once."""
    location = (
        storage_url if isinstance(storage_url, StudyLocation) else StudyLocation(storage_url, STUDY_NAME)
    )
    searcher = MultiObjectiveOptunaSearch(
        space=SuggestFromSpace(space.optuna_distributions(), space.fixed),
        metric=list(OBJECTIVES),
        mode=list(OBJECTIVES.values()),
        sampler=space.make_sampler(seed),
        study_name=location.study_name,
        storage=optuna.storages.RDBStorage(location.url),
        location=location,
    )
    searcher.keep_study()  # the study exists in the storage from the start: a resume never finds it missing
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def study_searcher(tuner: Tuner) -> MultiObjectiveOptunaSearch:
    """The Optuna searcher of a ``Tuner`` (built here or restored from its ``tuner.pkl``)."""
    # Ray keeps the TuneConfig on a private attribute: Tuner.restore takes none to hand a searcher in.
    search_alg = getattr(
        getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None), "search_alg", None
    )
    while search_alg is not None and not isinstance(search_alg, MultiObjectiveOptunaSearch):
        search_alg = getattr(search_alg, "searcher", None)
    if search_alg is None:
        raise RuntimeError(
            "cannot find the sweep's Optuna searcher in the restored Tuner (Ray's private Tuner layout changed?)"
        )
    return search_alg


class AtLeastSamples(SearchGenerator):
    """A restored search that runs at least ``at_least`` trials in all: ``--resume --num-samples N`` with N above
    the count the sweep was started with (Tune restores the count from its saved state)."""

    def __init__(self, searcher, at_least: int):
        super().__init__(searcher)
        self.at_least = at_least

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if self.at_least > self._total_samples:
            logger.info(
                "--num-samples %d: the sweep grows from %d trials", self.at_least, self._total_samples
            )
            self._total_samples = self.at_least


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
    study: StudyLocation,
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
            search_alg=make_searcher(space, seed, study, max_concurrent),
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
    *,
    study: StudyLocation,
    num_samples: int | None = None,
) -> Tuner:
    """The ``Tuner`` of the sweep in ``experiment_dir`` (``--resume``): unfinished and errored trials go on, the
    study at ``study`` (where this driver keeps it; the caller fetched a missing local copy first) goes on; with
    ``num_samples`` above the sweep's count, new trials are asked for up to it.

    ``Tuner.restore`` takes no ``TuneConfig``: the sweep keeps the scheduler it was started with (pickled in its
    ``tuner.pkl``; `sweep.early_stop_scheduler` rebuilds its state from the restored trials). ``early_stop`` is what this
    command line asks for; when it disagrees with the restored sweep, a warning says so."""
    tuner = Tuner.restore(
        experiment_dir,
        trainable=wrap_trainable(context, cpus_per_trial, gpus_per_trial),
        resume_unfinished=True,
        resume_errored=True,
    )
    study_searcher(tuner).attach(study)
    if num_samples is not None:
        tune_config = tuner._local_tuner._tune_config  # found by study_searcher just above
        tune_config.search_alg = AtLeastSamples(tune_config.search_alg, num_samples)
    # Ray keeps the restored TuneConfig on a private attribute; below only read, for the warning.
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
