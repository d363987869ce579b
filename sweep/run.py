#!/usr/bin/env python
"""vladsweep's command line: run a compression sweep of a NetVLAD model with Ray Tune + Optuna, logged to MLflow.

With no arguments it runs the embedded default — the synthetic landmark set, the small backbone and the ``smoke``
search space on a local Ray — in minutes on a CPU. On a cluster: ``ray submit cluster/gpu.yaml sweep/run.py -- …``
(Ray copies only this file, so it must run as a plain file and import the installed package, never relatively).

Order of work: validate everything a user can get wrong (search space, dataset, MLflow URI, storage) before Ray
starts; build the base model once; run the trials; reconcile MLflow with Ray's results; print the Pareto front.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

# DESIGN §9: keep local Ray on loopback unless the user set it otherwise. Must happen before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# A trial reports after every stage (each report carries the stage's checkpoint) but only the last report has the
# objectives; Tune's strict check would reject the intermediate ones. Optuna sees only the last report anyway.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

try:
    import sweep  # noqa: F401
except ImportError:  # run from a checkout that is not installed: `python sweep/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402,F401  (DESIGN §9: faiss before torch)

from search_spaces.schema import SearchSpaceError, load_search_space  # noqa: E402
from sweep import storage as sweep_storage  # noqa: E402
from sweep import tracking  # noqa: E402

logger = logging.getLogger("vladsweep")

DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


#: Exit codes: 0 the sweep ran; 2 a value or input that cannot work, found before Ray starts (nothing was run);
#: 3 the trials ran and their results are in --storage, but MLflow went away mid-sweep (bring it back, then --sync).
EXIT_USAGE = 2
EXIT_TRACKING_BEHIND = 3


class UsageError(RuntimeError):
    """A command-line value that cannot work; the message says what would."""


def _package_space(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("search_spaces") / name))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweep/run.py",
        description=__doc__.split("\n\n")[0],
        epilog="exit status: 0 the sweep ran; 2 a bad value or input, refused before any trial started; "
        "3 the trials ran but MLflow could not be updated (bring it back, then run with --sync)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--search-space",
        default="smoke.yaml",
        help="YAML search space: a path, or the name of one shipped in search_spaces/ "
        "(smoke.yaml, pareto.yaml, paper_grid.yaml)",
    )
    p.add_argument(
        "--num-samples", type=int, default=None, help="trials to run (default: the space's num_samples)"
    )
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    p.add_argument(
        "--cpus-per-trial", type=float, default=1, help="CPUs reserved per trial (sets torch threads)"
    )
    p.add_argument(
        "--gpus-per-trial", type=float, default=0, help="GPUs per trial; 0.5 puts two trials on a GPU"
    )
    p.add_argument(
        "--storage",
        default=os.environ.get("VLADSWEEP_STORAGE", "./vladsweep_results"),
        help="where Ray keeps results, checkpoints and the base model: a local/NFS path or s3:// URI "
        "(shared by all nodes on a cluster; default: $VLADSWEEP_STORAGE, set on cluster nodes)",
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
        "--dataset",
        default="synthetic",
        choices=["synthetic", "paris6k", "oxford5k", "rparis6k", "roxford5k"],
        help="training set of the base (cross protocol: Paris trains → Oxford tests, and the reverse)",
    )
    p.add_argument("--data-root", default=None, help="folder holding the datasets (not needed for synthetic)")
    p.add_argument(
        "--backbone",
        default=None,
        choices=["tiny", "alexnet", "vgg16"],
        help="backbone (default: tiny for synthetic, alexnet otherwise)",
    )
    p.add_argument(
        "--weights", default=None, help="backbone weights: 'imagenet' (torchvision cache) or a file path"
    )
    p.add_argument("--base-steps", type=int, default=None, help="triplet fine-tune steps of the base model")
    p.add_argument("--seed", type=int, default=0, help="seed for the sampler, data and training")
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (default: auto on a cluster, else local)"
    )
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def resolve_space_path(value: str) -> Path:
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


def base_config_from_args(args: argparse.Namespace):
    """The base model's config: the embedded CPU default for synthetic data, the poster's model for real data."""
    from trainables.base import BaseConfig

    backbone = args.backbone or ("tiny" if args.dataset == "synthetic" else "alexnet")
    values: dict = {
        "dataset": args.dataset,
        "data_root": args.data_root,
        "backbone": backbone,
        "seed": args.seed,
    }
    if args.dataset != "synthetic":
        if not args.data_root:
            raise UsageError(
                f"--dataset {args.dataset} needs --data-root (the folder that holds {args.dataset}/)"
            )
        # The poster's model: K=64 clusters, PCA-4096 whitening, full-size images (a GPU job).
        values.update(num_clusters=64, whitening_dim=4096, image_size=1024)
    if args.weights is not None:
        values["weights"] = args.weights
    if args.base_steps is not None:
        values["steps"] = args.base_steps
    try:
        return BaseConfig(**values)
    except ValueError as exc:
        raise UsageError(f"base model: {exc}") from exc


def check_datasets(base_config) -> None:
    """Open every dataset the sweep will read, so a missing file is reported before Ray starts."""
    from trainables.data.registry import load_dataset

    for name in [base_config.train_split, *base_config.test_splits]:
        load_dataset(name, base_config.data_root)


def code_version() -> str:
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
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("vladsweep")
    except PackageNotFoundError:
        pkg = "unknown"
    return f"{pkg}+{sha}" if sha else pkg


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` when given; otherwise ``ray.init()``'s own rule: RAY_ADDRESS, else the cluster that
    `ray start` recorded on this machine (the head under `ray submit`), else a new local Ray."""
    import ray

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


def print_front(rows: list[dict], base_meta: dict, tracking_uri: str, parent_run_id: str) -> None:
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["memory_mib"])
    ok = sum(r["status"] == "ok" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"\n{len(rows)} trials: {ok} completed, {failed} failed. Pareto front ({len(front)} points):")
    header = f"{'trial':<14}{'memory_mib':>11}{'ratio':>8}{'mAP':>8}{'drop':>8}  config"
    print(header)
    print("-" * len(header))
    base_map = base_meta.get("mAP")
    base_mib = base_meta.get("memory_mib")
    if base_map is not None and base_mib is not None:
        print(f"{'(base)':<14}{base_mib:>11.3f}{1.0:>8.1f}{base_map:>8.4f}{0.0:>8.1%}  dense fp32")
    for r in front:
        res = r["result"]
        searched = {k: v for k, v in r["config"].items() if not k.endswith("_steps")}
        print(
            f"{r['trial_id']:<14}{r['memory_mib']:>11.3f}{res.get('compression_ratio', float('nan')):>8.1f}"
            f"{r['mAP']:>8.4f}{res.get('mAP_drop', float('nan')):>8.1%}  {searched}"
        )
    print(f"\nMLflow: parent run {parent_run_id} in {tracking_uri}")
    if tracking_uri.startswith("sqlite:"):
        print(f"  open the UI:  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
        print(
            "  then browse http://127.0.0.1:5000 (chart view: memory_mib vs mAP; filter tags.pareto = 'true')"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    tracking.limit_http_retries()
    try:
        return _run(args)
    except (
        UsageError,
        SearchSpaceError,
        tracking.TrackingError,
        sweep_storage.StorageError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from trainables.data.oxford import DatasetError

        if isinstance(exc, DatasetError):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _run(args: argparse.Namespace) -> int:
    # 1. Everything a user can get wrong, before Ray starts.
    if args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {args.max_concurrent}: must be at least 1")
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial}: must be > 0 (a trial needs a CPU to run)")
    if args.gpus_per_trial < 0:
        raise UsageError(
            f"--gpus-per-trial {args.gpus_per_trial}: must be ≥ 0 (e.g. 1, or 0.5 to share a GPU)"
        )
    space_path = resolve_space_path(args.search_space)
    space = load_search_space(space_path)
    num_samples = args.num_samples if args.num_samples is not None else space.num_samples
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: must be at least 1")
    base_config = base_config_from_args(args)
    name = args.name or f"{space_path.stem}-{args.dataset}-{base_config.backbone}"
    tracking_uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    # Before the storage probe: a refused start leaves nothing behind in the storage (not even the sweep's folder).
    tracking.check_tracking_uri(tracking_uri)
    sweep = sweep_storage.SweepStorage.create(args.storage, name)
    sweep.check_writable()
    if sweep.has_experiment() and not (args.resume or args.sync):
        raise UsageError(
            f"a sweep named {name!r} already exists in {sweep.experiment_dir}. Pass --resume to continue it, "
            "--sync to re-log it to MLflow, or another --name / --storage to start a new one."
        )
    if (args.resume or args.sync) and not sweep.has_experiment():
        raise UsageError(
            f"--{'resume' if args.resume else 'sync'}: no sweep named {name!r} in {args.storage} "
            f"(looked for {sweep.experiment_dir}/experiment_state*.json). Check --name and --storage."
        )
    check_datasets(base_config)

    # 2. Ray, the base model, the parent run. `--sync` only reads Ray's files: it needs no Ray (the base is cached).
    if not args.sync:
        init_ray(args.ray_address)
    from sweep.base_cache import base_summary, ensure_base

    t0 = time.monotonic()
    base_location, base_meta, built = ensure_base(
        base_config, sweep, cpus=max(args.cpus_per_trial, 1), gpus=args.gpus_per_trial
    )
    base_seconds = time.monotonic() - t0
    logger.info("base model ready in %.1f s (%s)", base_seconds, "built" if built else "cached")
    experiment_id = tracking.ensure_experiment(tracking_uri, args.experiment)
    parent_params = {
        "search_space": space.to_dict(),
        "search_space_file": str(space_path),
        "base": base_meta.get("config", {}),
        "seed": args.seed,
        "code_version": code_version(),
        "num_samples": num_samples,
        "max_concurrent": args.max_concurrent,
        "cpus_per_trial": args.cpus_per_trial,
        "gpus_per_trial": args.gpus_per_trial,
    }
    parent_run_id = tracking.start_parent_run(
        tracking_uri,
        args.experiment,
        name,
        sweep.experiment_dir,
        parent_params,
        tags={"base_key": base_config.key(), "base_built_now": str(built).lower()},
    )
    client = tracking._client(tracking_uri)
    for key, value in base_summary(base_meta).items():
        client.log_metric(parent_run_id, key, value)
    # How often this sweep built its base: 1, or 0 when another sweep in the same storage had built it already;
    # a --resume adds nothing unless the cached base was deleted.
    builds = int(client.get_run(parent_run_id).data.tags.get("base_builds", "0")) + int(built)
    client.set_tag(parent_run_id, "base_builds", str(builds))
    if built:
        client.log_metric(parent_run_id, "base_build_seconds", base_seconds)
    fixed_config = {"base_key": base_config.key()}
    base_point = {"mAP": base_meta.get("mAP"), "memory_mib": base_meta.get("memory_mib")}

    # 3. The trials.
    if not args.sync:
        from sweep.tuner import build_tuner, restore_tuner

        context = {"base_location": base_location, "data_root": base_config.data_root, "seed": args.seed}
        if args.resume:
            tuner = restore_tuner(sweep.experiment_dir, context, args.cpus_per_trial, args.gpus_per_trial)
        else:
            tuner = build_tuner(
                space=space,
                context=context,
                storage_root=sweep.root,
                name=name,
                num_samples=num_samples,
                max_concurrent=args.max_concurrent,
                cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial,
                seed=args.seed,
                optuna_url=sweep.optuna_url,
                callbacks=[tracking.TrialRunLogger(tracking_uri, experiment_id, parent_run_id, fixed_config)],
                max_failures=args.max_failures,
            )
        t_trials = time.monotonic()
        tuner.fit()
        trial_seconds = time.monotonic() - t_trials

    # 4. MLflow agrees with Ray; the front.
    from dashboards.views import poster_reference

    try:
        if not args.sync:
            client.log_metric(parent_run_id, "trial_phase_seconds", trial_seconds)
        rows = tracking.sync_sweep(
            tracking_uri,
            experiment_id,
            parent_run_id,
            sweep.experiment_dir,
            fixed_config,
            base=base_point if base_point["mAP"] is not None else None,
            reference=poster_reference(base_config.backbone, base_config.test_splits[0]),
        )
    except Exception:
        outage = tracking_outage(tracking_uri)
        if outage is None:
            raise
        # The trials are done and safe in Ray's storage; only the MLflow mirror is behind. Say how to catch up.
        print(
            f"error: the trials ended and their results are in {sweep.experiment_dir}, but MLflow could not be "
            f"updated: {outage}\n  When the server is back, log what is missing with:\n"
            f"  python sweep/run.py --sync --name {name} --storage {sweep.root} --mlflow-uri {tracking_uri} "
            f"--experiment {args.experiment}",
            file=sys.stderr,
        )
        return EXIT_TRACKING_BEHIND
    print_front(rows, base_meta, tracking_uri, parent_run_id)
    unfinished = [r for r in rows if r["status"] not in ("ok", "failed")]
    if unfinished:
        print(
            f"\n{len(unfinished)} trials did not finish; continue with: --resume --name {name} --storage {sweep.root}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
