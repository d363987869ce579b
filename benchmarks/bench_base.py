"""Benchmark of the embedded default's first stage: build the synthetic set, then build the base model.

Measures, on an empty cache folder: the time to write the synthetic landmark set (`ensure_synthetic`) and the
time to build a base preset (``--preset``, default ``embedded``: k-means init, off-the-shelf evaluation, triplet
fine-tune, whitening if the preset has it, evaluation), and the mAP on every validation and test split of the
zero-byte baselines (random ranking, thumbnails, colour histogram), the off-the-shelf model, the fine-tuned model
before whitening and the base.
Wall and CPU seconds are both printed: on a shared machine the wall time mostly measures the neighbours.

    python benchmarks/bench_base.py [--preset embedded] [--threads 2] [--steps N] [--lr LR] [--image-size S] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss  # faiss before torch, both bring OpenMP: docs/traps.md#faiss-before-torch
import numpy as np
import torch

from trainables.base import META_FILE, PRESETS, build_base, preset_config
from trainables.data.synthetic import ensure_synthetic


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--threads", type=int, default=1, help="torch + faiss threads (1 is fastest on a shared 2-core VM)"
    )
    p.add_argument(
        "--preset", default="embedded", choices=list(PRESETS), help="base preset (default: embedded)"
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--num-clusters", type=int, default=None)
    p.add_argument("--whitening-dim", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="base seeds (the set is built once)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "lr": args.lr,
            "image_size": args.image_size,
            "num_clusters": args.num_clusters,
            "whitening_dim": args.whitening_dim,
        }.items()
        if v is not None
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-base-") as tmp:
        cache = Path(tmp) / "cache"
        w0, c0 = time.perf_counter(), _cpu_seconds()
        ensure_synthetic(cache)
        set_wall, set_cpu = time.perf_counter() - w0, _cpu_seconds() - c0
        for seed in args.seeds:
            config = preset_config(args.preset, {**overrides, "data_root": str(cache), "seed": seed})
            w0, c0 = time.perf_counter(), _cpu_seconds()
            out = build_base(config, Path(tmp) / f"base-{seed}", progress=False)
            base_wall, base_cpu = time.perf_counter() - w0, _cpu_seconds() - c0
            meta = json.loads((out / META_FILE).read_text())
            results.append({"seed": seed, "wall": base_wall, "cpu": base_cpu, "meta": meta})

    cfg = results[0]["meta"]["config"]
    print(f"## bench_base ({platform.machine()}, {args.threads} threads, torch {torch.__version__})\n")
    print(
        "config: " + ", ".join(f"{k}={cfg[k]}" for k in sorted(cfg) if k not in ("data_root", "seed")) + "\n"
    )
    print("| step | wall s | CPU s |")
    print("|---|---|---|")
    print(f"| build synthetic set (empty cache) | {set_wall:.1f} | {set_cpu:.1f} |")
    for r in results:
        s = r["meta"]["seconds"]
        print(f"| build base, seed {r['seed']} (total) | {r['wall']:.1f} | {r['cpu']:.1f} |")
        print(f"| &nbsp; of which fine-tune ({cfg['steps']} steps) | {s['finetune']:.1f} | |")
        print(f"| &nbsp; of which k-means + 3 evaluations + whitening | {s['total'] - s['finetune']:.1f} | |")
    print(f"| **set + base (seed {results[0]['seed']})** | **{set_wall + results[0]['wall']:.1f}** | |")
    print()
    print(
        "| seed | split | random | thumbnails | histogram | off-the-shelf | fine-tuned, no whitening | base |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        for split in r["meta"]["val_splits"] + r["meta"]["test_splits"]:
            m, b = r["meta"]["maps"][split], r["meta"]["baselines"][split]
            row = [
                m["random"],
                b["thumbnails"],
                b["histogram"],
                m["off_the_shelf"]["mAP"],
                m["finetuned_no_whitening"]["mAP"],
                m["finetuned"]["mAP"],
            ]
            rows.append(row)
            print(f"| {r['seed']} | {split} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    if len(rows) > 1:
        mean = np.mean(rows, axis=0)
        print("| mean | all | " + " | ".join(f"{100 * v:.1f}" for v in mean) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({"set_wall": set_wall, "set_cpu": set_cpu, "bases": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
