#!/usr/bin/env python
"""vladsweep's command line: run a compression sweep of a NetVLAD model with Ray Tune + Optuna, logged to MLflow.

With no arguments it runs the embedded default — the synthetic landmark set, the small backbone and the ``smoke``
search space on a local Ray — in minutes on a CPU. On a cluster: ``ray submit cluster/gpu.yaml sweep/run.py -- …``
(Ray copies only this file, so it must run as a plain file and import the installed package, never relatively:
docs/traps.md#ray-submit-copies-one-file).

Order of work (``_run``): validate everything a user can get wrong (search space, base model, dataset, MLflow URI,
storage) before Ray starts; start Ray; build the base model once; open the MLflow parent run; run the trials;
reconcile MLflow with Ray's results; print the Pareto front.

Ctrl-C (``Interrupts``) stops the sweep at any step within seconds: the step's own KeyboardInterrupt (or Ray
Tune's graceful stop during the trials), then the local Ray is shut down and one line says what was kept and the
``--resume`` command that continues; a second Ctrl-C exits at once (exit status 130 either way).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Any

# Both variables are read when Ray is imported, so they are set before any import below can pull Ray in; a user's
# own value wins. Keep local Ray on loopback (docs/traps.md#ray-on-loopback). A trial reports after every stage
# but only the last report has the objectives; Tune's strict check would reject the others
# (docs/traps.md#strict-metric-checking).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

try:
    import sweep  # noqa: F401
except ImportError:  # run from a checkout that is not installed: `python sweep/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402,F401  before torch: both bring OpenMP (docs/traps.md#faiss-before-torch)
import pyarrow.fs as pafs  # noqa: E402
import ray  # noqa: E402

from dashboards.poster_reference import poster_reference  # noqa: E402
from search_spaces.schema import SearchSpace, SearchSpaceError, load_search_space  # noqa: E402
from sweep import preflight, tracking  # noqa: E402
from sweep import storage as sweep_storage  # noqa: E402
from sweep.base_cache import ensure_base  # noqa: E402
from sweep.early_stop import DEFAULT_MAP_MARGIN, DEFAULT_MIN_COMPLETED, EarlyStopRule  # noqa: E402
from sweep.hypervolume import UNIT as HYPERVOLUME_UNIT  # noqa: E402
from sweep.hypervolume import hypervolume, reference_point  # noqa: E402
from trainables.base import (  # noqa: E402
    BaseConfig,
    add_base_arguments,
    base_config_from_args,
    describe_base_config,
)
from trainables.contract import (  # noqa: E402
    DROP_KEY,
    GROUPS,
    MAP_KEY,
    MEMORY_KEY,
    RATIO_KEY,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    TRIAL_PARAMS,
    best_zero_byte_baseline,
)
from trainables.data.oxford import DatasetError  # noqa: E402
from trainables.data.registry import load_dataset  # noqa: E402

logger = logging.getLogger("vladsweep")

DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


#: Exit codes: 0 the sweep ran; 2 a value or input that cannot work, found before Ray starts (nothing was run);
#: 3 the trials ran and their results are in --storage, but MLflow went away mid-sweep (bring it back, then --sync).
EXIT_USAGE = 2
EXIT_TRACKING_BEHIND = 3
#: 4 the base build task or the trials waited for resources longer than --pending-timeout; what finished is kept
#: in --storage and --resume continues.
EXIT_PENDING = 4
#: Stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130

#: The sweep folder's mark that a sweep was started (written before the base build), so ``--resume`` also
#: continues a sweep stopped before Ray Tune wrote any state of it.
STARTED_FILE = ".vladsweep-started.json"


class UsageError(RuntimeError):
    """A command-line value that cannot work; the message says what would."""


class TrackingBehind(RuntimeError):
    """The trials ended and their results are in storage, but MLflow could not be updated; the message says how
    to catch up."""


def _package_space(name: str) -> Path:
    return Path(str(files("search_spaces") / name))


def build_parser() -> argparse.ArgumentParser:
    """The command line; the base-model flags come from `trainables.base.add_base_arguments`."""
    p = argparse.ArgumentParser(
        prog="sweep/run.py",
        description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 the sweep ran; 2 a bad value or input, refused before any trial started; "
        "3 the trials ran but MLflow could not be updated (bring it back, then run with --sync); "
        "4 the base build or the trials waited for resources longer than --pending-timeout (results so far kept; "
        "--resume continues); 130 Ctrl-C",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--search-space",
        default="smoke.yaml",
        help="YAML search space: a path, or the name of one shipped in search_spaces/ "
        "(smoke.yaml, pareto.yaml, paper_grid.yaml)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="trials to run (default: the space's num_samples); with --resume, a larger N grows the sweep to N",
    )
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    p.add_argument(
        "--cpus-per-trial", type=float, default=1, help="CPUs reserved per trial (sets torch threads)"
    )
    p.add_argument(
        "--gpus-per-trial", type=float, default=0, help="GPUs per trial; 0.5 puts two trials on a GPU"
    )
    p.add_argument(
        "--cpu-only",
        action="store_true",
        help="run a real-data (poster-*) sweep on a cluster's CPUs on purpose (otherwise refused with "
        "--gpus-per-trial 0)",
    )
    p.add_argument(
        "--storage",
        default=os.environ.get("VLADSWEEP_STORAGE", "./vladsweep_results"),
        help="where Ray keeps results, checkpoints and the base model: a local/NFS path or s3:// URI "
        "(shared by all nodes on a cluster; default: $VLADSWEEP_STORAGE, set on cluster nodes)",
    )
    p.add_argument(
        "--optuna-url",
        default=None,
        metavar="URL",
        help="keep the Optuna study in this RDB server (a SQLAlchemy URL: postgresql://…, mysql://…, "
        "sqlite:////abs/path.db; the study is named after --name) instead of <storage>/<name>/optuna.db",
    )
    p.add_argument("--name", default=None, help="sweep name (default: <space>-<dataset>-<backbone>)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name in --storage")
    p.add_argument(
        "--sync",
        action="store_true",
        help="only bring MLflow up to date with the results in --storage (after an MLflow outage)",
    )
    p.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in the working directory)",
    )
    p.add_argument("--experiment", default="vladsweep", help="MLflow experiment name")
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (default: auto on a cluster, else local)"
    )
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial")
    p.add_argument(
        "--search-seed",
        type=int,
        default=None,
        help="seed of the Optuna sampler (default: the search space's sampler.seed); --seed seeds data and "
        "training, and is part of the base model's key",
    )
    p.add_argument(
        "--early-stop",
        action="store_true",
        help="stop a trial after its prune stage when its projected (val mAP, file size) is dominated by the "
        "front of the trials finished so far (docs/early-stopping.md)",
    )
    p.add_argument(
        "--early-stop-min-completed",
        type=int,
        default=DEFAULT_MIN_COMPLETED,
        metavar="N",
        help="with --early-stop: trials that must have finished before any trial is stopped",
    )
    p.add_argument(
        "--early-stop-map-margin",
        type=float,
        default=DEFAULT_MAP_MARGIN,
        metavar="MAP",
        help="with --early-stop: absolute val mAP a trial's projection is credited with before it is compared",
    )
    p.add_argument(
        "--pending-timeout",
        type=float,
        default=preflight.DEFAULT_PENDING_TIMEOUT_S,
        metavar="SECONDS",
        help="stop the sweep (exit 4, results kept) when the base build waits this long for resources, or no "
        "trial runs while some wait this long; 0 waits forever",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # --lr would read as the trials' learning rate (a search-space parameter): the base's is --base-lr.
    add_base_arguments(p, steps_flag="--base-steps", lr_flag="--base-lr")
    return p


def resolve_space_path(value: str) -> Path:
    """``--search-space``: a path, or the name of a space shipped in ``search_spaces/``."""
    path = Path(value)
    if path.exists():
        return path
    shipped = _package_space(value if value.endswith(".yaml") else value + ".yaml")
    if shipped.exists():
        return shipped
    raise UsageError(
        f"--search-space {value}: no such file. Pass a path, or one of the shipped spaces: "
        "smoke.yaml, pareto.yaml, paper_grid.yaml"
    )


def resolve_base(args: argparse.Namespace) -> tuple[BaseConfig, str]:
    """The base model's config and preset name from the base flags (`trainables.base` holds every default)."""
    try:
        return base_config_from_args(args)
    except ValueError as exc:
        raise UsageError(f"base model: {exc}") from exc


def check_datasets(base_config: BaseConfig) -> None:
    """Open every dataset the sweep will read, so a missing file is reported before Ray starts."""
    for name in [base_config.train_split, *base_config.eval_splits]:
        load_dataset(name, base_config.data_root)


#: Set by the cluster files on every node, whose copy of the source has no .git: a hash of the synced files.
CODE_VERSION_ENV = "VLADSWEEP_CODE_VERSION"


def code_version() -> str:
    """The installed package's version plus ``$VLADSWEEP_CODE_VERSION`` when set, else the checkout's short git
    commit when there is one."""
    if os.environ.get(CODE_VERSION_ENV):
        return f"{_package_version()}+{os.environ[CODE_VERSION_ENV]}"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    pkg = _package_version()
    return f"{pkg}+{sha}" if sha else pkg


def _package_version() -> str:
    try:
        return version("vladsweep")
    except PackageNotFoundError:
        return "unknown"


def joins_cluster(address: str | None) -> bool:
    """Whether `init_ray` will join a running cluster rather than start a local Ray: an address, ``RAY_ADDRESS``,
    or the cluster `ray start` recorded on this machine (the head, under `ray submit`)."""
    return bool(address or os.environ.get("RAY_ADDRESS") or ray._private.utils.read_ray_address())


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` when given; otherwise ``ray.init()``'s own rule: RAY_ADDRESS, else the cluster that
    `ray start` recorded on this machine (the head under `ray submit`), else a new local Ray."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def tracking_outage(tracking_uri: str) -> str | None:
    """Why MLflow at ``tracking_uri`` cannot be reached now, or None when it answers."""
    try:
        tracking.check_tracking_uri(tracking_uri)
    except tracking.TrackingError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------- the steps of _run


@dataclass(frozen=True)
class Plan:
    """A sweep whose every input was checked: what ``validate`` hands the steps that follow."""

    args: argparse.Namespace
    space: SearchSpace
    space_path: Path
    num_samples: int
    base_config: BaseConfig
    name: str
    tracking_uri: str
    storage: sweep_storage.SweepStorage
    #: Where the Optuna study lives (`sweep_storage.StudyLocation`): fetched back already for a --resume.
    study: sweep_storage.StudyLocation


@dataclass(frozen=True)
class Base:
    """The sweep's base model, ready in storage."""

    location: str
    #: The base's ``meta.json``; its mAP and file size are under the trial report's names, so the base reads
    #: as a point of the front like any trial.
    meta: dict[str, Any]
    built: bool
    seconds: float

    def point(self) -> dict[str, Any] | None:
        """The base as a point of the front's plots (dense fp32), or None when its meta has no mAP."""
        if self.meta.get(MAP_KEY) is None:
            return None
        return {
            MAP_KEY: self.meta[MAP_KEY],
            TEST_MAP_KEY: self.meta.get(TEST_MAP_KEY),
            MEMORY_KEY: self.meta.get(MEMORY_KEY),
        }


@dataclass(frozen=True)
class ParentRun:
    """The sweep's MLflow parent run, and the config every child run carries besides the trial's own."""

    experiment_id: str
    run_id: str
    fixed_config: dict[str, Any]


def show_base(args: argparse.Namespace) -> int:
    """``--show``: print the resolved base config and start nothing."""
    config, preset = resolve_base(args)
    print(describe_base_config(config, preset))
    return 0


def validate(args: argparse.Namespace) -> Plan:
    """Everything a user can get wrong, before Ray starts; raises `UsageError` (or the input's own error) with
    what would work. Writes nothing but the storage's probe file, the sweep's lock (`preflight.SweepLock`,
    held to the end of the process) and, for a --resume, the study's local copy fetched from the storage, and
    only once everything else passed."""
    if args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {args.max_concurrent}: must be at least 1")
    early_stop_rule(args)
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial}: must be > 0 (a trial needs a CPU to run)")
    if args.gpus_per_trial < 0:
        raise UsageError(
            f"--gpus-per-trial {args.gpus_per_trial}: must be ≥ 0 (e.g. 1, or 0.5 to share a GPU)"
        )
    if args.pending_timeout < 0:
        raise UsageError(f"--pending-timeout {args.pending_timeout:g}: must be ≥ 0 seconds (0 waits forever)")
    if not args.sync:  # --sync starts no Ray
        on_cluster = joins_cluster(args.ray_address)
        preflight.check_local_resources(args.cpus_per_trial, args.gpus_per_trial, on_cluster)
        preflight.check_loader_workers()
    space_path = resolve_space_path(args.search_space)
    space = load_search_space(space_path)
    num_samples = args.num_samples if args.num_samples is not None else space.num_samples
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: must be at least 1")
    base_config, preset = resolve_base(args)
    if not args.sync:
        preflight.check_gpus_for_preset(
            preset, args.gpus_per_trial, args.cpu_only, joins_cluster(args.ray_address)
        )
    check_groups(space, space_path, base_config)
    check_whitening_dim(space, space_path, base_config)
    name = args.name or f"{space_path.stem}-{base_config.dataset}-{base_config.backbone}"
    tracking_uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    # Before the storage probe: a refused start leaves nothing behind in the storage (not even the sweep's folder).
    tracking.check_tracking_uri(tracking_uri)
    if args.optuna_url and not args.sync:  # --sync never opens the study
        sweep_storage.check_rdb_url(args.optuna_url)
    storage = sweep_storage.SweepStorage.create(args.storage, name)
    storage.check_writable()
    if storage.has_experiment() and not (args.resume or args.sync):
        raise UsageError(
            f"a sweep named {name!r} already exists in {storage.experiment_dir}. Pass --resume to continue it, "
            "--sync to re-log it to MLflow, or another --name / --storage to start a new one."
        )
    if (
        (args.resume or args.sync)
        and not storage.has_experiment()
        and not (args.resume and was_started(storage))
    ):
        raise UsageError(
            f"--{'resume' if args.resume else 'sync'}: no sweep named {name!r} in {args.storage} "
            f"(looked for {storage.experiment_dir}/experiment_state*.json). Check --name and --storage."
        )
    preflight.lock_sweep(storage)  # one sweep of a name at a time: one study, one MLflow parent
    check_datasets(base_config)
    if not args.sync:  # --sync reads the stored results only
        preflight.check_weights(base_config, storage)
        preflight.check_base_inputs(base_config)
    study = storage.study(args.optuna_url)
    if args.resume:
        check_study_place(storage, study)
        # A new head has no local copy of the study: bring it back from the storage.
        study.fetch_for_resume(has_trials=storage.has_experiment())
    elif not args.sync:
        study.set_aside_leftover()
    return Plan(args, space, space_path, num_samples, base_config, name, tracking_uri, storage, study)


def check_groups(space: Any, space_path: Path, base_config: Any) -> None:
    """Every value the space can give ``groups`` names layer groups the base has (a base without whitening has
    no ``whitening`` group), so no trial fails for it after the base is built."""
    available = [g for g in GROUPS if g != "whitening" or base_config.whitening_dim is not None]
    spec = space.params.get("groups")
    values = (
        list(spec.choices)
        if spec is not None
        else [space.fixed.get("groups", TRIAL_PARAMS["groups"].default)]
    )
    for value in values:
        named = [g.strip() for g in str(value).split(",")]
        missing = [g for g in named if g not in available]
        if missing:
            # The space's own groups without the missing ones: what it meant, on this base.
            fix = [g for g in named if g in available] or available
            raise UsageError(
                f"{space_path}: groups = {value!r} names {', '.join(missing)}, which the base "
                f"({base_config.backbone}, whitening_dim={base_config.whitening_dim}) does not have; its groups "
                f"are {', '.join(available)}. Set groups: {','.join(fix)} in the space (fixed or choices), "
                "or pick a base with whitening (--whitening-dim N)"
            )


def check_whitening_dim(space: Any, space_path: Path, base_config: Any) -> None:
    """Every ``whitening_dim`` the space can give (choices, the top of an int range, or a fixed value) fits the
    base's whitening: a trial keeps the first d PCA components, so d cannot exceed the base's ``whitening_dim``,
    and a base without whitening has none to keep."""
    spec = space.params.get("whitening_dim")
    if spec is None:
        values = [space.fixed.get("whitening_dim", TRIAL_PARAMS["whitening_dim"].default)]
    else:
        # An int range's largest value: its high, or the last step below it (Optuna never samples past that).
        step = int(spec.step or 1)
        top = None if spec.kind == "choices" else spec.low + (spec.high - spec.low) // step * step
        values = list(spec.choices) if spec.kind == "choices" else [top]
    have = base_config.whitening_dim
    for value in (v for v in values if v is not None):  # None: the base's own whitening, whatever it is
        if have is None:
            raise UsageError(
                f"{space_path}: whitening_dim = {value!r}, but the base ({base_config.backbone}, "
                "whitening_dim=None) has no whitening to truncate. Drop whitening_dim from the space, or pick a "
                "base with whitening (--whitening-dim N, N >= the space's largest whitening_dim)"
            )
        if value > have:
            raise UsageError(
                f"{space_path}: whitening_dim = {value!r} is larger than the base's whitening_dim = {have} "
                f"({base_config.backbone}); a trial can keep at most the base's {have} PCA components. Use "
                f"values <= {have} in the space, or build the base with --whitening-dim {value} or more"
            )


def search_seed(plan: Plan) -> int:
    """The sampler's seed: ``--search-seed``, else the search space file's ``sampler.seed``. Apart from ``--seed``,
    which is part of the base's key: a new search seed must not rebuild the base."""
    return plan.args.search_seed if plan.args.search_seed is not None else plan.space.sampler.seed


def early_stop_rule(args: argparse.Namespace) -> EarlyStopRule | None:
    """The ``--early-stop`` rule from the flags, or None without ``--early-stop``; `UsageError` for a bad value."""
    if not args.early_stop:
        return None
    try:
        return EarlyStopRule(
            map_margin=args.early_stop_map_margin, min_completed=args.early_stop_min_completed
        )
    except ValueError as exc:
        raise UsageError(
            f"--early-stop-map-margin {args.early_stop_map_margin} / --early-stop-min-completed "
            f"{args.early_stop_min_completed}: {exc}"
        ) from exc


def _started_path(storage: sweep_storage.SweepStorage) -> tuple[Any, str]:
    fs, path = sweep_storage.filesystem_for(storage.experiment_dir)
    return fs, f"{path}/{STARTED_FILE}"


def was_started(storage: sweep_storage.SweepStorage) -> bool:
    """True when a sweep of this name was started in this storage (it may have stopped before any trial)."""
    fs, path = _started_path(storage)
    return fs.get_file_info(path).type == pafs.FileType.File


def mark_started(plan: Plan) -> None:
    """Write the sweep folder's ``STARTED_FILE`` (once), so ``--resume`` works from the base build on; it also
    records where the Optuna study lives (`check_study_place`)."""
    if plan.args.sync or was_started(plan.storage):
        return
    fs, path = _started_path(plan.storage)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    record = {"name": plan.name, "started": time.time(), "study": plan.study.label}
    with fs.open_output_stream(path) as stream:
        stream.write((json.dumps(record) + "\n").encode())


def check_study_place(storage: sweep_storage.SweepStorage, study: sweep_storage.StudyLocation) -> None:
    """``--resume`` keeps the study where the sweep started it: the storage's sqlite file or the same
    ``--optuna-url`` (Tune's saved state does not say which; another place would start an empty study)."""
    if not was_started(storage):
        return
    fs, path = _started_path(storage)
    try:
        with fs.open_input_stream(path) as stream:
            recorded = json.loads(stream.read()).get("study")
    except (OSError, ValueError):
        return  # unreadable: nothing to compare with
    if recorded is None or recorded == study.label:  # None: a sweep started before the place was recorded
        return

    def place(label: str) -> str:
        return "in the storage (no --optuna-url)" if label == "storage" else f"at --optuna-url {label}"

    raise UsageError(
        f"--resume: the sweep {storage.name!r} keeps its Optuna study {place(recorded)}, not {place(study.label)}."
        " Resume it with the --optuna-url it was started with (a URL with its password), or none"
    )


def start_ray(plan: Plan) -> None:
    """Join or start Ray, except for ``--sync``, which only reads Ray's files (and finds the base cached)."""
    if not plan.args.sync:
        init_ray(plan.args.ray_address)
        # Now the nodes (and the autoscaler's node types) are known: a request none can hold is refused.
        preflight.check_cluster_resources(plan.args.cpus_per_trial, plan.args.gpus_per_trial)


def prepare_base(plan: Plan) -> Base:
    """The base model in the sweep's storage: found there, or built once as a Ray task with a trial's resources."""
    t0 = time.monotonic()
    location, meta, built = ensure_base(
        plan.base_config,
        plan.storage,
        cpus=preflight.base_task_cpus(plan.args.cpus_per_trial),
        gpus=plan.args.gpus_per_trial,
        pending_timeout_s=plan.args.pending_timeout,
    )
    seconds = time.monotonic() - t0
    logger.info("base model ready in %.1f s (%s)", seconds, "built" if built else "cached")
    return Base(location, meta, built, seconds)


def open_parent_run(plan: Plan, base: Base) -> ParentRun:
    """The sweep's MLflow parent run (the same one again on ``--resume``/``--sync``), with the sweep's params
    and the base model's metrics."""
    args = plan.args
    experiment_id = tracking.ensure_experiment(plan.tracking_uri, args.experiment)
    params = {
        "search_space": plan.space.to_dict(),
        "search_space_file": str(plan.space_path),
        "base": base.meta.get("config", {}),
        "seed": args.seed,
        "search_seed": search_seed(plan),
        "code_version": code_version(),
        "num_samples": plan.num_samples,
        "max_concurrent": args.max_concurrent,
        "cpus_per_trial": args.cpus_per_trial,
        "gpus_per_trial": args.gpus_per_trial,
        "early_stop": asdict(rule) if (rule := early_stop_rule(args)) else False,
    }
    base_key = plan.base_config.key()
    run_id = tracking.start_parent_run(
        plan.tracking_uri,
        args.experiment,
        plan.name,
        plan.storage.experiment_dir,
        params,
        tags={tracking.BASE_KEY: base_key, "base_built_now": str(base.built).lower()},
    )
    tracking.record_base(plan.tracking_uri, run_id, base.meta, base.built, base.seconds)
    return ParentRun(experiment_id, run_id, {tracking.BASE_KEY: base_key})


def run_trials(plan: Plan, base: Base, parent: ParentRun) -> float | None:
    """Run (or, with ``--resume``, continue) the trials; their wall seconds, or None for ``--sync``."""
    if plan.args.sync:
        return None
    # Lazy: Ray Tune and Optuna take seconds to import, which a refused start (exit 2), --show and --sync never
    # need.
    from sweep.callbacks import TrialRunLogger
    from sweep.early_stop_scheduler import ParetoEarlyStopping
    from sweep.tuner import build_tuner, restore_tuner, study_searcher

    args = plan.args
    rule = early_stop_rule(args)
    early_stop = ParetoEarlyStopping(rule) if rule else None
    context = {
        "base_location": base.location,
        "data_root": plan.base_config.data_root,
        "seed": args.seed,
        "early_signal": early_stop is not None,
    }
    if args.resume and plan.storage.has_experiment():
        tuner = restore_tuner(
            plan.storage.experiment_dir,
            context,
            args.cpus_per_trial,
            args.gpus_per_trial,
            early_stop,
            study=plan.study,
            num_samples=args.num_samples,
        )
    else:
        tuner = build_tuner(
            space=plan.space,
            context=context,
            storage_root=plan.storage.root,
            name=plan.name,
            num_samples=plan.num_samples,
            max_concurrent=args.max_concurrent,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            seed=search_seed(plan),
            study=plan.study,
            callbacks=[
                TrialRunLogger(
                    plan.tracking_uri,
                    parent.experiment_id,
                    parent.run_id,
                    parent.fixed_config,
                    hypervolume_reference=reference_point(base.meta),
                ),
                # Stateless: reports to preflight.watch_trials below (also when --resume brings it back).
                preflight.PendingTrialsCallback(),
            ],
            max_failures=args.max_failures,
            early_stop=early_stop,
        )
    t0 = time.monotonic()
    try:
        with INTERRUPTS.tune_owns_first_ctrl_c(), preflight.watch_trials(args.pending_timeout):
            tuner.fit()
    finally:  # also after Ctrl-C: the study's copy in a URI storage gets its last state
        study_searcher(tuner).keep_study(force=True)
    return time.monotonic() - t0


def reconcile(plan: Plan, base: Base, parent: ParentRun, trial_seconds: float | None) -> list[dict[str, Any]]:
    """Make MLflow agree with Ray's results (`sweep.tracking.sync_sweep`); the trials' rows with their
    ``pareto`` flag. Raises `TrackingBehind` when MLflow is unreachable: the results are safe in storage."""
    # Lazy: Ray Tune's ExperimentAnalysis, seconds of import that a refused start never needs.
    from sweep.results import collect_rows

    try:
        if trial_seconds is not None:
            tracking.record_trial_phase(plan.tracking_uri, parent.run_id, trial_seconds)
        return tracking.sync_sweep(
            plan.tracking_uri,
            parent.experiment_id,
            parent.run_id,
            collect_rows(plan.storage.experiment_dir),
            parent.fixed_config,
            base=base.point(),
            reference=poster_reference(plan.base_config.backbone, plan.base_config.test_splits[0]),
            baselines=tracking.axis_baselines(base.meta),
            hypervolume_reference=reference_point(base.meta),
        )
    except Exception as exc:
        outage = tracking_outage(plan.tracking_uri)
        if outage is None:
            raise
        # The trials are done and safe in Ray's storage; only the MLflow mirror is behind. Say how to catch up.
        raise TrackingBehind(
            f"the trials ended and their results are in {plan.storage.experiment_dir}, but MLflow could not be "
            f"updated: {outage}\n  When the server is back, log what is missing with:\n"
            f"  python sweep/run.py --sync --name {plan.name} --storage {plan.storage.root} "
            f"--mlflow-uri {plan.tracking_uri} --experiment {plan.args.experiment}"
        ) from exc


def _fmt_value(value: Any) -> str:
    """A config value for a table: floats with 4 significant digits, everything else as is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_config(config: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={_fmt_value(config[k])}" for k in keys if k in config)


def _num(value: Any, spec: str, width: int) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:>{width}{spec}}"
    return f"{'-':>{width}}"


def zero_byte_floor(base_meta: dict[str, Any]) -> tuple[str, float] | None:
    """``(name, val mAP)`` of the best baseline that needs no model bytes, from the base's meta; None when the
    meta has no baselines (a base built before they were measured)."""
    baselines = base_meta.get("baselines") or {}
    splits = [s for s in base_meta.get("val_splits") or [] if s in baselines]
    try:
        return best_zero_byte_baseline(baselines, splits) if splits else None
    except (KeyError, TypeError, ValueError):  # a baseline missing on a split: no floor to draw
        return None


def print_front(
    rows: list[dict],
    base_meta: dict,
    tracking_uri: str,
    parent: ParentRun,
    searched: list[str] | None = None,
    fixed: dict[str, Any] | None = None,
) -> None:
    """The front as a table (the base first; config as key=value of the searched keys, the fixed ones once
    above), and where to see it in MLflow."""
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r[MEMORY_KEY])
    ok = sum(r["status"] == "ok" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    stopped = sum(r["status"] == "stopped" for r in rows)
    early = f", {stopped} stopped early (--early-stop)" if stopped else ""
    print(
        f"\n{len(rows)} trials: {ok} completed, {failed} failed{early}. Pareto front ({len(front)} points):"
    )
    if searched is None:
        searched = sorted({k for r in front for k in r["config"]})
    if fixed:
        print("fixed: " + _fmt_config(fixed, sorted(fixed)))
    floor = zero_byte_floor(base_meta)
    hv_memory, hv_map = hv_reference = reference_point(base_meta)
    print(
        f"hypervolume (val, ref memory={hv_memory:.4g} MiB, mAP={hv_map:.4f}): "
        f"{hypervolume(rows, hv_reference):.4f} ({HYPERVOLUME_UNIT}; docs/hypervolume.md)"
    )
    header = (
        f"{'trial':<8}{'memory_mib':>11}{'ratio':>8}{'val mAP':>9}{'drop':>8}{'test mAP':>10}{'drop':>8}"
        "   "
        f"config ({', '.join(searched)})"
    )
    print(header)
    print("-" * len(header))
    base_map, base_mib = base_meta.get(MAP_KEY), base_meta.get(MEMORY_KEY)
    if base_map is not None and base_mib is not None:
        print(
            f"{'base':<8}{_num(base_mib, '.4g', 11)}{_num(1.0, '.1f', 8)}{_num(base_map, '.4f', 9)}"
            f"{'':>8}{_num(base_meta.get(TEST_MAP_KEY), '.4f', 10)}{'':>8}   dense fp32"
        )
    below = 0
    for r in front:
        res = r["result"]
        mark = ""
        if floor is not None and isinstance(r[MAP_KEY], int | float) and r[MAP_KEY] < floor[1]:
            mark, below = "!", below + 1
        name = tracking.trial_run_name(r["trial_id"], number=r.get("number"))
        print(
            f"{name:<8}{_num(r[MEMORY_KEY], '.4g', 11)}{_num(res.get(RATIO_KEY), '.1f', 8)}"
            f"{_num(r[MAP_KEY], '.4f', 9)}{_num(res.get(DROP_KEY), '.1%', 8)}"
            f"{_num(res.get(TEST_MAP_KEY), '.4f', 10)}{_num(res.get(TEST_DROP_KEY), '.1%', 8)}"
            f" {mark or ' '} {_fmt_config(r['config'], searched)}"
        )
    print(
        "(val mAP is the objective; test mAP is measured beside it and never seen by the search; drops are "
        "relative to the base)"
    )
    if floor is not None:
        name, value = floor
        print(
            f"zero-byte floor: {name} baseline, val mAP {value:.4f} (no model bytes)"
            + (f"; {below} front point(s) marked ! are below it" if below else "; every front point beats it")
        )
    print(f"\nMLflow: parent run {parent.run_id} in {tracking_uri}")
    if tracking_uri.startswith("sqlite:"):
        links = tracking.ui_links("http://127.0.0.1:5000", parent.experiment_id, parent.run_id)
        print(f"  open the UI:  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
        print(f"  the runs:     {links['runs']}")
        print(f"  the front:    {links['pareto']}")
        print(f"  (chart view: scatter {MEMORY_KEY} vs {MAP_KEY}; filter tags.pareto = 'true')")


def report(plan: Plan, rows: list[dict[str, Any]], base: Base, parent: ParentRun) -> int:
    """Print the front, and how to continue when some trials did not finish; the exit code (0)."""
    print_front(
        rows,
        base.meta,
        plan.tracking_uri,
        parent,
        searched=list(plan.space.params),
        fixed=dict(plan.space.fixed),
    )
    from sweep.results import ENDED_STATUSES  # loaded already by reconcile; lazy like it

    unfinished = [r for r in rows if r["status"] not in ENDED_STATUSES]
    if unfinished:
        print(
            f"\n{len(unfinished)} trials did not finish; continue with: --resume --name {plan.name} "
            f"--storage {plan.storage.root}"
        )
    return 0


class Interrupts:
    """Ctrl-C for the whole sweep: the first one stops the step that runs (a KeyboardInterrupt, or Ray Tune's own
    graceful stop while trials run, which saves the experiment for ``--resume``), a second one exits at once.

    ``phase`` is what the sweep is doing, for the one line that says what was kept."""

    def __init__(self) -> None:
        self.count = 0
        self.phase = "starting"
        self._tune_has_it = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        if self._tune_has_it:
            # Tune caught the first Ctrl-C and put this handler back: this is the second one.
            self.count = max(self.count, 1)
        self.count += 1
        if self.count == 1:
            print(
                f"\nCtrl-C: stopping the sweep ({self.phase}) … press Ctrl-C again to exit at once",
                file=sys.stderr,
                flush=True,
            )
            raise KeyboardInterrupt
        print("\nsecond Ctrl-C: exiting now", file=sys.stderr, flush=True)
        _kill_local_ray()
        os._exit(EXIT_INTERRUPTED)

    @contextmanager
    def tune_owns_first_ctrl_c(self) -> Iterator[None]:
        """Around ``tuner.fit()``: Tune installs its own SIGINT handler, which on the first Ctrl-C stops the trials,
        saves the experiment and puts the previous handler (this one) back; ``fit`` then returns normally. The
        handler being this one again afterwards is how the driver knows (ray/tune/tune.py ``_setup_signal_catching``)."""
        self.install()
        self._tune_has_it = True
        try:
            yield
        finally:
            self._tune_has_it = False
            interrupted = signal.getsignal(signal.SIGINT) == self.handle
            self.install()
        if interrupted and not os.environ.get("TUNE_DISABLE_SIGINT_HANDLER"):
            self.count = max(self.count, 1)
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()


def _kill_local_ray() -> None:
    """The local Ray this driver started, ended at once (SIGKILL): for the second Ctrl-C."""
    try:
        node = ray._private.worker._global_node
        if node is not None and node.head:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
    except Exception:  # nothing must stop the exit; Ray's processes also die with the driver (fate sharing)
        pass


def _stop_ray() -> None:
    """Shut down Ray: the local Ray this driver started ends, a joined cluster is only left."""
    if ray.is_initialized():
        with suppress(Exception):
            ray.shutdown()


def resume_command(argv: list[str]) -> str:
    """The exact command line that continues this sweep: the same one plus ``--resume``."""
    rest = [a for a in argv if a not in ("--resume", "--sync")]
    return shlex.join([sys.executable, sys.argv[0] or "sweep/run.py", *rest, "--resume"])


def kept_after_interrupt(phase: str, plan: Plan | None) -> str:
    """What a sweep stopped during ``phase`` keeps, in a few words."""
    if plan is None:
        return "nothing (no sweep had started; the synthetic set is cached only once complete)"
    where = plan.storage.experiment_dir
    if phase in ("starting Ray", "building the base model"):
        return "nothing but the cached synthetic set (no trial had started; a base model is stored only once complete)"
    if phase == "opening the MLflow run":
        return f"the base model in {plan.storage.root} (no trial had started)"
    rows_note = ""
    with suppress(Exception):
        from sweep.results import ENDED_STATUSES, collect_rows

        rows = collect_rows(where)
        done = sum(r["status"] in ENDED_STATUSES for r in rows)
        rows_note = f"{done} finished trial(s) of {len(rows)}, the others' stage checkpoints, "
    if phase == "running the trials":
        return f"{rows_note}the Optuna study and the base model, in {where}"
    return f"every trial's result in {where} (MLflow is partly updated; --resume completes it)"


def _run(args: argparse.Namespace, state: dict[str, Any]) -> int:
    if args.show:
        return show_base(args)
    INTERRUPTS.phase = "checking the inputs and building the synthetic set"
    plan = validate(args)
    state["plan"] = plan
    mark_started(plan)
    INTERRUPTS.phase = "starting Ray"
    start_ray(plan)
    INTERRUPTS.phase = "building the base model"
    base = prepare_base(plan)
    INTERRUPTS.phase = "opening the MLflow run"
    parent = open_parent_run(plan, base)
    INTERRUPTS.phase = "running the trials"
    trial_seconds = run_trials(plan, base, parent)
    INTERRUPTS.phase = "syncing MLflow"
    rows = reconcile(plan, base, parent, trial_seconds)
    INTERRUPTS.phase = "reporting"
    return report(plan, rows, base, parent)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (see ``EXIT_USAGE``, ``EXIT_TRACKING_BEHIND``, ``EXIT_PENDING``,
    ``EXIT_INTERRUPTED``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    tracking.limit_http_retries()
    INTERRUPTS.install()
    state: dict[str, Any] = {}
    try:
        return _run(args, state)
    except KeyboardInterrupt:
        phase, plan = INTERRUPTS.phase, state.get("plan")
        INTERRUPTS.count = max(INTERRUPTS.count, 1)  # from here on a Ctrl-C exits at once
        _stop_ray()
        kept = kept_after_interrupt(phase, plan)
        again = resume_command(argv) if plan is not None else shlex.join([sys.executable, sys.argv[0], *argv])
        print(
            f"interrupted while {phase}: kept {kept}. Continue with: {again}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    except (
        UsageError,
        SearchSpaceError,
        tracking.TrackingError,
        sweep_storage.StorageError,
        DatasetError,
        preflight.PreflightError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrackingBehind as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRACKING_BEHIND
    except preflight.PendingTimeout as exc:
        _stop_ray()
        kept = kept_after_interrupt(INTERRUPTS.phase, state.get("plan"))
        print(
            f"error: {exc}\nkept {kept}. Continue with: {resume_command(argv)}", file=sys.stderr, flush=True
        )
        return EXIT_PENDING
    finally:
        preflight.release_sweep_locks()


if __name__ == "__main__":
    sys.exit(main())
