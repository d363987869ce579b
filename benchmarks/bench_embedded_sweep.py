"""The embedded default end to end: wall time, trials, the front, and orchestration overhead.

Runs ``python sweep/run.py`` (no arguments but a fresh working folder and a cold synthetic-set cache) unless
``--mlflow-uri`` points at a finished sweep to analyse, then prints a markdown table:

- wall seconds of the whole command, trials completed, front size, the most compressed front point's ratio;
- base build seconds (``base_build_seconds`` on the parent run) and how many times the base was built;
- orchestration efficiency = Σ trial seconds ÷ (wall seconds of the trial phase × concurrency), with the trial
  seconds taken two ways: Tune's ``time_total_s`` (everything inside the trainable) and the stages alone.

    python benchmarks/bench_embedded_sweep.py [--workdir DIR] [--mlflow-uri sqlite:///DIR/mlflow.db]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_default(workdir: Path) -> float:
    env = {**os.environ, "VLADSWEEP_CACHE": str(workdir / "cache")}
    start = time.monotonic()
    subprocess.run([sys.executable, str(REPO / "sweep" / "run.py")], cwd=workdir, env=env, check=True)
    return time.monotonic() - start


def analyse(uri: str, experiment: str, wall: float | None) -> str:
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
    smallest = min(front, key=lambda c: c.data.metrics["memory_mib"])
    rows = [
        ("wall seconds, whole command", f"{wall:.0f}" if wall is not None else "(not timed here)"),
        ("trials completed / run", f"{len(ok)} / {len(children)}"),
        ("front points", str(len(front))),
        ("base: mAP, MiB (dense fp32)", f"{parent.data.metrics['base_mAP']:.4f}, {base_mib:.3f}"),
        (
            "most compressed front point: MiB, × smaller, mAP",
            f"{smallest.data.metrics['memory_mib']:.3f}, {base_mib / smallest.data.metrics['memory_mib']:.1f}x, "
            f"{smallest.data.metrics['mAP']:.4f}",
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
    lines.append("| trial | memory_mib | × smaller | mAP | mAP drop | front |")
    lines.append("|---|---:|---:|---:|---:|---|")
    for c in sorted(ok, key=lambda c: c.data.metrics["memory_mib"]):
        m = c.data.metrics
        lines.append(
            f"| {c.data.tags['trial_id']} | {m['memory_mib']:.3f} | {base_mib / m['memory_mib']:.1f} | "
            f"{m['mAP']:.4f} | {m['mAP_drop']:.1%} | {'yes' if c.data.tags['pareto'] == 'true' else ''} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="where to run (default: a new temp folder)")
    p.add_argument("--mlflow-uri", default=None, help="analyse this finished sweep instead of running one")
    p.add_argument("--experiment", default="vladsweep")
    args = p.parse_args()
    wall = None
    uri = args.mlflow_uri
    if uri is None:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vladsweep-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        wall = run_default(workdir)
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
    print(analyse(uri, args.experiment, wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
