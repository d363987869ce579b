"""How long the end-of-sweep Pareto work takes as a sweep grows: the non-dominated sort and the three views
(``pareto.csv``, ``pareto.png``, ``pareto.html``) that ``sweep.tracking`` builds after every sweep.

Synthetic trials with a realistic trade-off (memory falls with threshold and bits, mAP falls with them), 5% failed.
Prints a markdown table; the figures go to benchmarks/RESULTS.md.

    python benchmarks/bench_pareto_views.py --sizes 64 512 4096
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import dashboards  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboards.pareto_csv import write_pareto_csv
from dashboards.pareto_html import write_pareto_html
from dashboards.pareto_png import plot_pareto_png
from dashboards.poster_reference import poster_reference
from sweep.pareto import non_dominated_mask, pareto_ranks


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t, b = rng.uniform(0.05, 2.0), rng.randint(2, 8)
        config = {
            "prune_mode": "sigma",
            "threshold": t,
            "bits": b,
            "quant_mode": rng.choice(["uniform", "kmeans"]),
        }
        if rng.random() < 0.05:
            rows.append(
                {
                    "trial_id": f"t{i:05d}",
                    "status": "failed",
                    "mAP": None,
                    "memory_mib": None,
                    "config": config,
                }
            )
            continue
        memory = 40.0 * (1 - 0.45 * t) * b / 32 + 0.05
        m = 0.8 - 0.08 * t * t - 0.03 * (8 - b) + rng.gauss(0, 0.015)
        rows.append(
            {"trial_id": f"t{i:05d}", "status": "ok", "mAP": m, "memory_mib": memory, "config": config}
        )
    return rows


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 4096], help="numbers of trials")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    args = parser.parse_args()

    base = {"mAP": 0.82, "memory_mib": 40.0}
    ref = poster_reference("alexnet", "oxford5k")
    print("| trials | front | non_dominated_mask s | pareto_ranks s | csv s | png s | html s | html KiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for n in args.sizes:
            rows = make_rows(n)
            mask = non_dominated_mask(rows)
            for row, on in zip(rows, mask):
                row["pareto"] = on
            t_mask = timed(lambda rows=rows: non_dominated_mask(rows), args.repeats)
            t_ranks = timed(lambda rows=rows: pareto_ranks(rows), args.repeats)
            t_csv = timed(lambda rows=rows: write_pareto_csv(rows, out / "p.csv"), args.repeats)
            t_png = timed(
                lambda rows=rows: plot_pareto_png(rows, out / "p.png", base=base, reference=ref), args.repeats
            )
            t_html = timed(
                lambda rows=rows: write_pareto_html(rows, out / "p.html", base=base, reference=ref),
                args.repeats,
            )
            kib = (out / "p.html").stat().st_size / 1024
            print(
                f"| {n} | {sum(mask)} | {t_mask:.4f} | {t_ranks:.4f} | {t_csv:.3f} | {t_png:.3f} | {t_html:.3f} "
                f"| {kib:.0f} |"
            )


if __name__ == "__main__":
    main()
