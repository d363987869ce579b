"""Search strategies compared on one base: the poster's grid, random, multivariate TPE, NSGA-II and TPE with
Pareto-aware early stopping, at the same trial budget, scored by the front's hypervolume.

Each (strategy, seed) is a real ``python sweep/run.py`` sweep (Ray Tune + Optuna + MLflow) in one shared storage,
so the base model is built once (or copied in with ``--base``) and every sweep finds it. After the sweeps, for
each one, in the order the trials ended:

- validation hypervolume after each trial (``sweep.hypervolume``: the reference point and the axes are the ones
  the sweep itself logs to MLflow), against trials done and against trial-seconds (Σ Tune ``time_total_s`` of
  the trials ended so far, stopped ones included);
- the test hypervolume of the same front: the points selected on validation, scored with their test mAP against
  the reference on the test splits (never used to select anything).

It prints a Markdown table (mean ± spread over seeds), writes the raw curves as JSON and the hypervolume-vs-seconds
curves in one PNG. The grid is one run: its sampler visits every point of the grid once whatever the seed, so the
same budget gives the same front.

    python benchmarks/bench_strategies.py --workdir DIR --base BASE_DIR --cache SYNTH_CACHE \
        [--trials 8] [--seeds 0 1 2] [--strategies grid random tpe nsga2 tpe-es] [--analyse-only]

``--whitening-base BASE_DIR`` adds the whitening_dim experiment: TPE on a base with PCA whitening, with and without
``whitening_dim`` searched, and the most compressed front point within a 2% relative test drop of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the repository's packages first

import yaml  # noqa: E402

from trainables.contract import (  # noqa: E402
    MEMORY_KEY,
    OBJECTIVES,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    VAL_MAP_KEY,
)

#: The searched part every strategy shares (the embedded default's knobs), and the grid over the same ranges.
RANGES = {"threshold_conv": {"float": [0.0, 0.4]}, "bits": {"int": [3, 8]}}
GRID = {"threshold_conv": {"choices": [0.0, 0.1, 0.2, 0.3]}, "bits": {"choices": [4, 6]}}
#: A cheaper recipe than smoke.yaml's (fewer steps per stage), so a strategy comparison fits on two cores; the
#: same for every strategy.
FIXED = {
    "groups": "conv,netvlad",
    "prune_mode": "sigma",
    "threshold": 0.3,
    "quant_mode": "kmeans",
    "l1_lambda": 2.0,
    "l1_steps": 5,
    "prune_rounds": 1,
    "retrain_steps": 8,
    "quant_steps": 8,
    "kmeans_iters": 30,
    "lr": 3.0e-3,
}
STRATEGIES = ("grid", "random", "tpe", "nsga2", "tpe-es")


def space_for(strategy: str, trials: int, seed: int) -> dict[str, Any]:
    sampler: dict[str, Any] = {"type": strategy.removesuffix("-es"), "seed": seed}
    if sampler["type"] == "tpe":
        sampler["n_startup_trials"] = max(2, trials // 3)
    if sampler["type"] == "nsga2":
        sampler["population_size"] = max(2, trials // 3)
    return {
        "description": f"bench_strategies: {strategy}, seed {seed}",
        "sampler": sampler,
        "num_samples": trials,
        "params": GRID if strategy == "grid" else RANGES,
        "fixed": FIXED,
    }


def whitening_space(trials: int, seed: int, with_dim: bool) -> dict[str, Any]:
    params = {
        "threshold_conv": {"float": [0.0, 0.4]},
        "bits": {"int": [3, 8]},
        "bits_whitening": {"int": [2, 8]},
    }
    if with_dim:
        params["whitening_dim"] = {"choices": [32, 64, 128, 192, 256]}
    return {
        "description": f"bench_strategies: whitening_dim {'searched' if with_dim else 'fixed'}",
        "sampler": {"type": "tpe", "seed": seed, "n_startup_trials": max(2, trials // 3)},
        "num_samples": trials,
        "params": params,
        "fixed": {**FIXED, "groups": "conv,netvlad,whitening"},
    }


def seed_base(storage: Path, base: Path | None) -> None:
    """Copy a built base into the shared storage under its config key, so no sweep rebuilds it."""
    if base is None:
        return
    meta = json.loads((base / "meta.json").read_text())
    target = storage / "_base" / meta["key"]
    if not target.exists():
        shutil.copytree(base, target)
    if (
        MEMORY_KEY not in meta
    ):  # a base built before the sweep recorded its file size (sweep/base_cache.py rule)
        meta[MEMORY_KEY] = (target / "model.safetensors").stat().st_size / 2**20
        (target / "meta.json").write_text(json.dumps(meta, indent=2))


def run_sweep(workdir: Path, name: str, space: dict[str, Any], cache: Path | None, extra: list[str]) -> float:
    """One sweep through the real command line; its wall seconds (0 when it had already run)."""
    storage = workdir / "storage"
    done = workdir / "logs" / f"{name}.done"
    if done.exists():
        return 0.0
    shutil.rmtree(storage / name, ignore_errors=True)  # an interrupted run of this sweep starts over
    space_file = workdir / "spaces" / f"{name}.yaml"
    space_file.parent.mkdir(parents=True, exist_ok=True)
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    env = {**os.environ}
    if cache is not None:
        env["VLADSWEEP_CACHE"] = str(cache)
    cmd = [
        sys.executable,
        str(REPO / "sweep" / "run.py"),
        "--search-space",
        str(space_file),
        "--name",
        name,
        "--storage",
        str(storage),
        "--mlflow-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--experiment",
        "bench-strategies",
        *extra,
    ]
    start = time.monotonic()
    log = workdir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        subprocess.run(cmd, cwd=workdir, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    done.write_text(f"{wall:.1f}\n")
    return wall


def trial_rows(experiment_dir: Path) -> list[dict[str, Any]]:
    """The sweep's trials in the order they ended, with their trial-seconds and (when finished) objectives."""
    from sweep.results import collect_rows

    rows = []
    for row in collect_rows(str(experiment_dir)):
        result = row["result"]
        rows.append(
            {
                "trial_id": row["trial_id"],
                "status": row["status"],
                "ended": float(result.get("timestamp", 0.0)),
                "seconds": float(result.get("time_total_s", 0.0)),
                VAL_MAP_KEY: result.get(VAL_MAP_KEY),
                TEST_MAP_KEY: result.get(TEST_MAP_KEY),
                MEMORY_KEY: result.get(MEMORY_KEY),
                TEST_DROP_KEY: result.get(TEST_DROP_KEY),
                "stage": result.get("stage"),
            }
        )
    return sorted(rows, key=lambda r: r["ended"])


def score(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Hypervolume curves (validation, by trials and by trial-seconds) and the test hypervolume of the final
    validation front."""
    from sweep.hypervolume import hypervolume, reference_point
    from sweep.pareto import non_dominated_mask

    val_ref = reference_point(meta)
    test_ref = reference_point(meta, split="test")
    curve, seconds, done = [], 0.0, []
    for row in rows:
        seconds += row["seconds"]
        done.append(row)
        points = [r for r in done if r["status"] == "ok"]
        curve.append((len(done), seconds, hypervolume(points, val_ref)))
    finished = [r for r in rows if r["status"] == "ok"]
    mask = non_dominated_mask(finished, OBJECTIVES) if finished else []
    front = [r for r, keep in zip(finished, mask, strict=True) if keep]
    test_points = [{**r, VAL_MAP_KEY: r[TEST_MAP_KEY]} for r in front]
    return {
        "curve": curve,
        "val_hv": curve[-1][2] if curve else 0.0,
        "test_hv": hypervolume(test_points, test_ref),
        "trials": len(rows),
        "completed": len(finished),
        "stopped": sum(1 for r in rows if r["status"] == "stopped"),
        "trial_seconds": seconds,
        "front": front,
    }


def spread(values: list[float], digits: int = 4) -> str:
    """Mean ± half the range (the spread over seeds), or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def seconds_to_reach(curve: list[tuple[int, float, float]], target: float) -> float | None:
    return next((s for _, s, hv in curve if hv >= target - 1e-12), None)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| strategy | runs | val hypervolume | test hypervolume (same fronts) | trials (stopped) | trial-seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for strategy, runs in results.items():
        lines.append(
            f"| {strategy} | {len(runs)} | {spread([r['val_hv'] for r in runs])} | "
            f"{spread([r['test_hv'] for r in runs])} | "
            f"{statistics.mean(r['trials'] for r in runs):.1f} ({statistics.mean(r['stopped'] for r in runs):.1f}) | "
            f"{spread([r['trial_seconds'] for r in runs], digits=0)} |"
        )
    if "tpe" in results and "tpe-es" in results:
        lines.append("")
        lines.append("| seed | TPE final val hv | TPE trial-seconds | TPE+ES seconds to reach it | ratio |")
        lines.append("|---:|---:|---:|---:|---:|")
        for tpe, es in zip(results["tpe"], results["tpe-es"], strict=False):
            reach = seconds_to_reach(es["curve"], tpe["val_hv"])
            ratio = f"{reach / tpe['trial_seconds']:.2f}" if reach is not None else "not reached"
            reach_text = f"{reach:.0f}" if reach is not None else "-"
            lines.append(
                f"| {tpe['seed']} | {tpe['val_hv']:.4f} | {tpe['trial_seconds']:.0f} | {reach_text} | {ratio} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for strategy, runs in results.items():
        for i, run in enumerate(runs):
            xs = [0.0] + [s for _, s, _ in run["curve"]]
            ys = [0.0] + [hv for _, _, hv in run["curve"]]
            ax.step(
                xs, ys, where="post", color=colors[strategy], alpha=0.8, label=strategy if i == 0 else None
            )
    ax.set_xlabel("trial-seconds spent (Σ time_total_s of the trials ended)")
    ax.set_ylabel("validation hypervolume")
    ax.set_title("Search strategies on the embedded base")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def most_compressed_within(front: list[dict[str, Any]], drop: float) -> dict[str, Any] | None:
    fits = [r for r in front if r[TEST_DROP_KEY] is not None and r[TEST_DROP_KEY] <= drop]
    return min(fits, key=lambda r: r[MEMORY_KEY]) if fits else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir", type=Path, required=True, help="shared storage, MLflow db, logs; reruns skip done"
    )
    p.add_argument("--base", type=Path, default=None, help="a built base folder to copy in (skips the build)")
    p.add_argument("--whitening-base", type=Path, default=None, help="a built base with PCA whitening")
    p.add_argument("--cache", type=Path, default=None, help="synthetic-set cache (VLADSWEEP_CACHE)")
    p.add_argument("--trials", type=int, default=8, help="trials per sweep (the grid has 8 points)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--analyse-only", action="store_true", help="only score the sweeps already in --workdir")
    args = p.parse_args()

    workdir = args.workdir.resolve()
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    seed_base(storage, args.base)
    seed_base(storage, args.whitening_base)
    common = ["--max-concurrent", str(args.max_concurrent)]
    # Seed-major, so an interrupted benchmark has every strategy at the seeds it got through.
    runs: list[tuple[str, str, int, list[str]]] = []
    for i, seed in enumerate(args.seeds):
        for strategy in args.strategies:
            if strategy == "grid" and i > 0:
                continue
            extra = ["--early-stop"] if strategy.endswith("-es") else []
            runs.append((f"{strategy}-s{seed}", strategy, seed, extra))
    walls: dict[str, float] = {}

    def run_whitening_experiment() -> None:
        dim = str(json.loads((args.whitening_base / "meta.json").read_text())["config"]["whitening_dim"])
        for with_dim in (False, True):
            name = f"whitening-{'searched' if with_dim else 'fixed'}"
            print(f"[bench_strategies] {name} …", flush=True)
            walls[name] = run_sweep(
                workdir,
                name,
                whitening_space(args.trials, args.seeds[0], with_dim),
                args.cache,
                common + ["--whitening-dim", dim],
            )

    if not args.analyse_only:
        for name, strategy, seed, extra in runs:
            if args.whitening_base is not None and seed != args.seeds[0] and "whitening-fixed" not in walls:
                run_whitening_experiment()  # after the first seed's round, before the other seeds
            print(f"[bench_strategies] {name} …", flush=True)
            walls[name] = run_sweep(
                workdir, name, space_for(strategy, args.trials, seed), args.cache, common + extra
            )
        if args.whitening_base is not None and "whitening-fixed" not in walls:
            run_whitening_experiment()

    base_meta = {
        json.loads(m.read_text())["config"]["whitening_dim"]: json.loads(m.read_text())
        for m in (storage / "_base").glob("*/meta.json")
    }
    plain = base_meta.get(None) or next(iter(base_meta.values()))
    results: dict[str, list[dict[str, Any]]] = {}
    for name, strategy, seed, _ in runs:
        if not (workdir / "logs" / f"{name}.done").exists():
            continue
        scored = score(trial_rows(storage / name), plain)
        scored.update(seed=seed, wall=walls.get(name))
        results.setdefault(strategy, []).append(scored)
    out: dict[str, Any] = {"strategies": results}
    print(table(results))
    if args.whitening_base is not None:
        wkey = json.loads((args.whitening_base / "meta.json").read_text())["key"]
        wmeta = json.loads((storage / "_base" / wkey / "meta.json").read_text())
        lines = [
            "",
            "| whitening_dim | completed | most compressed front point within 2% test drop |",
            "|---|---:|---|",
        ]
        for label in ("fixed", "searched"):
            path = storage / f"whitening-{label}"
            if not (workdir / "logs" / f"whitening-{label}.done").exists():
                continue
            scored = score(trial_rows(path), wmeta)
            out[f"whitening-{label}"] = scored
            best = most_compressed_within(scored["front"], 0.02)
            base_mib = float(wmeta["memory_mib"])
            text = (
                f"{best[MEMORY_KEY]:.3f} MiB ({base_mib / best[MEMORY_KEY]:.1f}x), test drop {best[TEST_DROP_KEY]:.2%}"
                if best
                else "none"
            )
            lines.append(f"| {label} | {scored['completed']} | {text} |")
        print("\n".join(lines))
    (workdir / "bench_strategies.json").write_text(json.dumps(out, indent=2, default=str))
    if results:
        plot(results, workdir / "hypervolume_vs_seconds.png")
        print(
            f"\ncurves: {workdir / 'bench_strategies.json'}; plot: {workdir / 'hypervolume_vs_seconds.png'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
