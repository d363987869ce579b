"""Seconds of a training step and of a forward pass with the conv backbone in the plain layout against channels_last.

`trainables.devices.fast_convolutions` puts each model's conv backbone in channels_last for the base fine-tune, a
trial's training and every extraction, on the CPU as on CUDA. This measures what that buys, per backbone, on this
machine: one batch of random images (the size and batch a step of that model's training uses on the CPU), the
step = forward + backward of the descriptors' sum (the optimizer step is the same in both layouts and left out),
the forward under ``torch.no_grad``. Random weights (throughput only; no download); every layer trains. The two
layouts alternate within each repetition (``--reps``, after a warm-up of each), so load on a shared machine
falls on both; the table has the medians and their ratio. The descriptors of both layouts are checked close.

    .venv/bin/python benchmarks/bench_layout.py                 # 4 backbones, 5 reps, 1 thread (~2 min)
    .venv/bin/python benchmarks/bench_layout.py --backbones efficientnet_lite0 --reps 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import faiss  # noqa: F401  before torch: both bring OpenMP (docs/traps.md#faiss-before-torch)
import torch

from trainables.devices import device_batch, fast_convolutions
from trainables.netvlad.model import NetVLADConfig, NetVLADModel

#: backbone -> (images per batch, side, NetVLAD clusters): a CPU training step of each (the embedded preset's
#: 4 tuples x 7 images at 128 px for the small ones; fewer, larger images for the poster backbones).
CASES: dict[str, tuple[int, int, int]] = {
    "tiny": (28, 128, 16),
    "efficientnet_lite0": (28, 128, 32),
    "alexnet": (8, 224, 64),
    "vgg16": (4, 128, 64),
}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(backbone: str, reps: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of a step and a forward in each layout, and the largest descriptor difference."""
    n, side, clusters = CASES[backbone]
    torch.manual_seed(seed)
    model = NetVLADModel(NetVLADConfig(backbone, clusters, None, None))
    images = torch.randn(n, 3, side, side)
    cpu = torch.device("cpu")

    plain, fast = images, device_batch(images, cpu)  # device_batch gives the channels_last images

    def step(batch: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        model(batch).sum().backward()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(batch)

    def channels_last(fn: Callable[[], object]) -> float:
        with fast_convolutions(model, device=cpu):
            return _seconds(fn)

    times: dict[str, list[float]] = {k: [] for k in ("plain_step", "cl_step", "plain_fwd", "cl_fwd")}
    for rep in range(reps + 1):  # rep 0 warms both up
        sample = {
            "plain_step": _seconds(lambda: step(plain)),
            "cl_step": channels_last(lambda: step(fast)),
            "plain_fwd": _seconds(lambda: forward(plain)),
            "cl_fwd": channels_last(lambda: forward(fast)),
        }
        if rep:
            for key, value in sample.items():
                times[key].append(value)
    model.eval()
    reference = forward(plain)
    with fast_convolutions(model, device=cpu):
        difference = (forward(fast) - reference).abs().max()
    out = {key: statistics.median(values) for key, values in times.items()}
    out["max_abs_diff"] = float(difference)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a trial's 1 CPU: 1)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: must be at least 1")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be at least 1")
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.reps} reps (medians)"
    )
    print(
        "| backbone | batch | step plain s | step channels_last s | ratio | forward plain s "
        "| forward channels_last s | ratio | max abs diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for backbone in args.backbones:
        r = measure(backbone, args.reps)
        rows[backbone] = r
        n, side, _ = CASES[backbone]
        print(
            f"| {backbone} | {n} x {side}² | {r['plain_step']:.3f} | {r['cl_step']:.3f} | "
            f"{r['cl_step'] / r['plain_step']:.2f} | {r['plain_fwd']:.3f} | {r['cl_fwd']:.3f} | "
            f"{r['cl_fwd'] / r['plain_fwd']:.2f} | {r['max_abs_diff']:.1e} |",
            flush=True,
        )
        if r["max_abs_diff"] > 1e-3:
            print(f"  ! {backbone}: the two layouts' descriptors differ by {r['max_abs_diff']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
