"""How close is ``--early-stop``'s signal to a trial's final values? (docs/early-stopping.md)

Runs whole trials in-process — the stage functions of ``trainables/pipeline.py`` on the base, no Ray — with the
early signal on, and prints per config the prune stage's ``early_val_mAP`` / ``early_memory_mib`` beside the final
``val_mAP`` / ``memory_mib``, and the signal's seconds. ``--check`` runs each config a second time without the
signal and says whether the final numbers are the same.

    python benchmarks/bench_early_signal.py [--base DIR] [--check] [--json out.json]

``--base``: a base folder (``python -m trainables.base --preset tiny-test --out DIR``); without it the
``tiny-test`` base is built into a temporary folder first (about a minute on two cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss  # noqa: F401  before torch: both bring OpenMP (docs/traps.md#faiss-before-torch)
import torch

from trainables.base import build_base, preset_config
from trainables.contract import EARLY_MAP_KEY, EARLY_MEMORY_KEY, MAP_KEY, MEMORY_KEY, seconds_key
from trainables.pipeline import STAGE_FUNCTIONS, _open_trial

SHORT = {"prune_mode": "sigma", "l1_lambda": 1e-6, "l1_steps": 1, "retrain_steps": 2, "quant_steps": 2}
SHORT |= {"kmeans_iters": 5}
#: smoke.yaml's fixed recipe.
RECIPE = {"prune_mode": "sigma", "lr": 3e-3, "l1_lambda": 2.0, "l1_steps": 10, "retrain_steps": 15}
RECIPE |= {"quant_steps": 15, "kmeans_iters": 30}
CONFIGS: list[dict[str, Any]] = [
    {**SHORT, "threshold": 0.3, "bits": 8},
    {**SHORT, "threshold": 1.4, "bits": 2},
    {**SHORT, "threshold": 0.8, "bits": 4},
    {**SHORT, "threshold": 0.8, "bits": 4, "quant_mode": "uniform"},
    {**SHORT, "threshold": 0.8, "bits": 4, "retrain_steps": 15, "quant_steps": 15},
    {**SHORT, "threshold": 0.8, "bits": 4, "lr": 3e-3, "l1_lambda": 0.0, "l1_steps": 0},
    {**SHORT, "threshold": 0.8, "bits": 4, "lr": 3e-3, "l1_lambda": 0.0, "l1_steps": 0, "quant_mode": "none"},
    {**SHORT, "threshold": 0.8, "bits": 4, "lr": 3.0, "l1_lambda": 0.0, "l1_steps": 0},
    {**RECIPE, "threshold": 0.3, "bits": 4},
    {**RECIPE, "threshold": 0.3, "bits": 6},
    {**RECIPE, "threshold": 0.8, "bits": 3},
]


def run(base: Path, config: dict[str, Any], early_signal: bool) -> dict[str, float]:
    """One trial's stages in order, as ``run_trial`` runs them on a fresh start (seed 0)."""
    with tempfile.TemporaryDirectory(prefix="bench-early-") as work:
        # Outside Ray, _open_trial's trial resources are None: one CPU, no GPU.
        model, ctx = _open_trial(config, {"base_location": str(base), "seed": 0}, Path(work))
        ctx.early_signal = early_signal
        torch.manual_seed(0)
        for stage in STAGE_FUNCTIONS:
            stage.run(model, ctx)
        return {**ctx.early, MAP_KEY: ctx.final[MAP_KEY], MEMORY_KEY: ctx.final[MEMORY_KEY]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=None)
    p.add_argument("--check", action="store_true", help="also run each config without the signal")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-early-base-") as tmp:
        base = args.base
        if base is None:
            base = Path(tmp) / "base"
            build_base(preset_config("tiny-test"), base, progress=False)
        rows = []
        for config in CONFIGS:
            t0 = time.monotonic()
            got = run(base, config, True)
            row = {"config": config, **got, "seconds": time.monotonic() - t0}
            if args.check:
                plain = run(base, config, False)
                row["same_without_signal"] = all(plain[k] == got[k] for k in (MAP_KEY, MEMORY_KEY))
            rows.append(row)
            print(
                f"{json.dumps({k: v for k, v in config.items() if k not in SHORT or SHORT[k] != v})}: "
                f"mAP {got[EARLY_MAP_KEY]:.4f} -> {got[MAP_KEY]:.4f} ({got[MAP_KEY] - got[EARLY_MAP_KEY]:+.4f}); "
                f"MiB {got[EARLY_MEMORY_KEY]:.5f} -> {got[MEMORY_KEY]:.5f} "
                f"({got[EARLY_MEMORY_KEY] / got[MEMORY_KEY] - 1:+.3%}); signal "
                f"{got[seconds_key('early_signal')]:.1f} s"
                + (f"; same without it: {row['same_without_signal']}" if args.check else ""),
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
