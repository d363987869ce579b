"""Embedded synthetic landmark set: cold build time, sizes per split, and model-free baseline mAP.

    .venv/bin/python benchmarks/bench_synthetic.py [--seed 0] [--repeats 3]

Builds the set from scratch in a temporary cache folder (cold cache) `--repeats` times, then reports the
median build time, a warm `load_dataset` time, each split's size, and the mAP of two baselines that use no
model (16x16 raw pixels; an 8x8x8 colour histogram) so a reader can see the set is not trivially solved.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from trainables.data.registry import load_dataset
from trainables.data.synthetic import ensure_synthetic, synthetic_root
from trainables.retrieval.baselines import baseline_map


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    builds, cpu = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cache = Path(tmp) / f"run{r}"
            t0, c0 = time.perf_counter(), time.process_time()
            ensure_synthetic(cache, seed=args.seed)
            builds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        root = synthetic_root(Path(tmp) / "run0", args.seed)
        t0 = time.perf_counter()
        splits = {
            s: load_dataset(f"synthetic-{s}", data_root=Path(tmp) / "run0", seed=args.seed)
            for s in ("train", "test")
        }
        load_s = time.perf_counter() - t0

        print(
            f"machine: {platform.machine()} {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}; seed {args.seed}"
        )
        print(f"cold build (both splits): median {statistics.median(builds):.2f} s over {len(builds)} "
              f"(min {min(builds):.2f}, max {max(builds):.2f}); CPU time median {statistics.median(cpu):.2f} s; warm load_dataset x2: {load_s * 1000:.0f} ms\n")  # fmt: skip
        print("| split | db images | queries | landmarks | distractor images | positives (good+ok) | junk | MB on disk "
              "| mAP raw pixels | mAP colour hist |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, ds in splits.items():
            lm = ds.landmarks()
            pos = set().union(*map(set, lm.values()))
            junk = set().union(*(set(g["junk"]) for g in ds.gnd))
            distractors = len(ds.images) - len(pos | junk)
            mb = _du(root / name) / 2**20
            px, hist = baseline_map(ds, "pixels"), baseline_map(ds, "histogram")
            print(f"| {name} | {len(ds.images)} | {len(ds.queries)} | {len(lm)} | {distractors} | {len(pos)} | "
                  f"{len(junk)} | {mb:.1f} | {px:.3f} | {hist:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
