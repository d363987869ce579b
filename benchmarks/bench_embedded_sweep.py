"""The embedded default end to end: wall time, trials, the front, and orchestration overhead.

Runs ``python sweep/run.py`` (no arguments but a fresh working folder and a cold synthetic-set cache) unless
``--mlflow-uri`` points at a finished sweep to analyse, then prints a markdown table:

- wall seconds of the whole command, trials completed, front size (on validation mAP), the most compressed front
  point's ratio, the base's val / test mAP against the best zero-byte baseline (read from the storage's
  ``_base/*/meta.json``), and the front points that meet the targets: >= 8x smaller at <= 1% and >= 12x smaller at
  <= 2% relative test-mAP drop;
- base build seconds (``base_build_seconds`` on the parent run) and how many times the base was built;
- orchestration efficiency = Σ trial seconds ÷ (wall seconds of the trial phase × concurrency), with the trial
  seconds taken two ways: Tune's ``time_total_s`` (everything inside the trainable) and the stages alone.

    python benchmarks/bench_embedded_sweep.py [--workdir DIR] [--mlflow-uri sqlite:///DIR/mlflow.db]

A base already in ``DIR/vladsweep_results/_base/<key>/`` is reused (the sweep builds one per config key), which is
how a search space is tuned without rebuilding the base; the targets are measured with a fresh DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the repository's packages first

from trainables.contract import (  # noqa: E402
    DROP_KEY,
    MEMORY_KEY,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    VAL_MAP_KEY,
    best_zero_byte_baseline,
)


def run_default(workdir: Path, cache: Path | None = None) -> float:
    env = {**os.environ, "VLADSWEEP_CACHE": str(cache or workdir / "cache")}
    start = time.monotonic()
    subprocess.run([sys.executable, str(REPO / "sweep" / "run.py")], cwd=workdir, env=env, check=True)
    return time.monotonic() - start


def base_meta(workdir: Path | None) -> dict | None:
    """The base's ``meta.json`` from the sweep's storage (val/test mAP, baselines), if the storage is here."""
    if workdir is None:
        return None
    metas = sorted((workdir / "vladsweep_results" / "_base").glob("*/meta.json"))
    return json.loads(metas[-1].read_text()) if metas else None


def analyse(uri: str, experiment: str, wall: float | None, meta: dict | None = None) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    parent = next(r for r in runs if r.data.tags.get("vladsweep.role") == "sweep")
    children = [r for r in runs if r.data.tags.get("vladsweep.role") == "trial"]
    ok = [c for c in children if c.data.tags.get("status") == "FINISHED"]
    front = [c for c in ok if c.data.tags.get("pareto") == "true"]
    base_mib = parent.data.metrics["base_memory_mib"]
    concurrency = float(parent.data.params["max_concurrent"])
    phase = parent.data.metrics["trial_phase_seconds"]
    tune_seconds = sum(c.data.metrics["time_total_s"] for c in ok)
    stage_seconds = sum(c.data.metrics["seconds_trial"] for c in ok)
    smallest = min(front, key=lambda c: c.data.metrics[MEMORY_KEY])
    base_line = f"val {parent.data.metrics['base_mAP']:.4f}, {base_mib:.3f} MiB"
    zero = ""
    if meta is not None:
        base_line = f"val {meta[VAL_MAP_KEY]:.4f}, test {meta[TEST_MAP_KEY]:.4f}, {base_mib:.3f} MiB"
        name, value = best_zero_byte_baseline(meta["baselines"], meta["test_splits"])
        zero = f"{name} {value:.4f} (test); base is {meta[TEST_MAP_KEY] - value:+.4f} above it"

    def best_within(ratio: float, drop: float) -> str:
        """The most compressed front point at least ``ratio`` x smaller within a relative test-mAP ``drop``."""
        fits = [
            c
            for c in front
            if base_mib / c.data.metrics[MEMORY_KEY] >= ratio and c.data.metrics[TEST_DROP_KEY] <= drop
        ]
        if not fits:
            return "none"
        c = min(fits, key=lambda c: c.data.metrics[MEMORY_KEY])
        m = c.data.metrics
        return f"{base_mib / m[MEMORY_KEY]:.1f}x, test drop {m[TEST_DROP_KEY]:.2%} (val {m[DROP_KEY]:.2%})"

    rows = [
        ("wall seconds, whole command", f"{wall:.0f}" if wall is not None else "(not timed here)"),
        ("trials completed / run", f"{len(ok)} / {len(children)}"),
        ("front points (on val mAP)", str(len(front))),
        ("base: mAP, MiB (dense fp32)", base_line),
        ("best zero-byte baseline", zero or "(base meta not found)"),
        ("front point >= 8x smaller at <= 1% test drop", best_within(8, 0.01)),
        ("front point >= 12x smaller at <= 2% test drop", best_within(12, 0.02)),
        (
            "most compressed front point: MiB, × smaller, val / test mAP",
            f"{smallest.data.metrics[MEMORY_KEY]:.3f}, {base_mib / smallest.data.metrics[MEMORY_KEY]:.1f}x, "
            f"{smallest.data.metrics[VAL_MAP_KEY]:.4f} / {smallest.data.metrics[TEST_MAP_KEY]:.4f}",
        ),
        (
            "base build seconds (built once: tag base_builds)",
            f"{parent.data.metrics.get('base_build_seconds', float('nan')):.0f} ({parent.data.tags.get('base_builds')})",
        ),
        ("trial phase wall seconds × concurrency", f"{phase:.0f} × {concurrency:.0f}"),
        (
            "Σ trial seconds (Tune time_total_s) → efficiency",
            f"{tune_seconds:.0f} → {tune_seconds / (phase * concurrency):.2f}",
        ),
        (
            "Σ stage seconds (inside the trial) → efficiency",
            f"{stage_seconds:.0f} → {stage_seconds / (phase * concurrency):.2f}",
        ),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines.append("")
    lines.append("| trial | memory_mib | × smaller | val mAP | val drop | test mAP | test drop | front |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for c in sorted(ok, key=lambda c: c.data.metrics[MEMORY_KEY]):
        m = c.data.metrics
        lines.append(
            f"| {c.data.tags['trial_id']} | {m[MEMORY_KEY]:.3f} | {base_mib / m[MEMORY_KEY]:.1f} | "
            f"{m[VAL_MAP_KEY]:.4f} | {m[DROP_KEY]:.2%} | {m[TEST_MAP_KEY]:.4f} | {m[TEST_DROP_KEY]:.2%} | "
            f"{'yes' if c.data.tags['pareto'] == 'true' else ''} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="where to run (default: a new temp folder)")
    p.add_argument("--mlflow-uri", default=None, help="analyse this finished sweep instead of running one")
    p.add_argument("--experiment", default="vladsweep")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="synthetic-set cache (default: a cold one in the workdir; a warm one only for tuning runs)",
    )
    args = p.parse_args()
    wall = None
    uri = args.mlflow_uri
    workdir = args.workdir
    if uri is None:
        workdir = workdir or Path(tempfile.mkdtemp(prefix="vladsweep-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        wall = run_default(workdir, args.cache)
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
    print(analyse(uri, args.experiment, wall, base_meta(workdir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
