"""Images/s of `extract_descriptors` with its images decoded in line (0 workers) against DataLoader workers.

Writes ``--images`` deterministic 1024x768 JPEGs (numpy: a smooth random field with fine noise, so they compress
and decode like photos) into a temporary folder, then describes them with

- the ``tiny`` backbone at the tiny presets' size (128): the cheapest forward there is, so reading a
  0.8-megapixel JPEG (decoded in full, then resized) is a large part of the cost;
- the ``embedded`` preset's backbone (EfficientNet-Lite0 cut after blocks[4], random weights: throughput only) at
  its size (128), on the first ``--embedded-images``;
- with ``--real-size``: ``tiny`` at the poster presets' size (1024, the image is not resized). On a CPU its
  forward there costs ~10x the decode (so workers cannot show much); on a GPU node it is the case that matters.

Each (model, workers) runs ``--reps`` times after one warm-up pass; the table has the median images/s and its
ratio to 0 workers in the same run. Workers: 0, the rule's N (`trainables.devices.loader_workers` of this
machine's CPUs: cores - 1) and 2 (oversubscribed where N < 2). Torch runs ``--threads`` threads (default: every
core, as a trial given them all does: `trainables.pipeline` sets its torch threads to its CPUs). Every run's
descriptors are checked equal to the 0-worker ones on the CPU (workers change the speed, never the result).

    .venv/bin/python benchmarks/bench_loader.py                      # 200 images, 3 reps (~3 min on 2 cores)
    .venv/bin/python benchmarks/bench_loader.py --images 60 --reps 1 # a quick look
    .venv/bin/python benchmarks/bench_loader.py --device cuda --real-size   # on a GPU node
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import faiss  # noqa: F401  before torch: both bring OpenMP (docs/traps.md#faiss-before-torch)
import numpy as np
import torch
from PIL import Image

from trainables.base import PRESETS, BaseConfig
from trainables.devices import loader_workers
from trainables.netvlad.model import NetVLADConfig, NetVLADModel
from trainables.retrieval.extract import extract_descriptors

#: The side the poster presets describe at (the "real-data" test size).
REAL_SIZE = int(PRESETS["poster-vgg16"]["image_size"])
WIDTH, HEIGHT = 1024, 768


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` 1024x768 JPEGs, the same for the same seed."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
            (WIDTH, HEIGHT), Image.Resampling.BICUBIC
        )
        arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (HEIGHT, WIDTH, 3), dtype=np.int16)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def models(args: argparse.Namespace) -> list[tuple[str, NetVLADModel, int, int]]:
    """(label, model, image size, images): tiny and the embedded preset's backbone at their presets' sizes,
    with ``--real-size`` also tiny at the poster presets' size."""
    embedded = PRESETS["embedded"]
    torch.manual_seed(0)
    tiny = NetVLADModel(NetVLADConfig("tiny", 16, None))
    lite = NetVLADModel(NetVLADConfig(embedded["backbone"], embedded["num_clusters"], None))
    tiny_size = BaseConfig().image_size
    out = [(f"tiny @ {tiny_size}", tiny, tiny_size, args.images)]
    if args.real_size:
        out.append((f"tiny @ {REAL_SIZE}", tiny, REAL_SIZE, args.images))
    label = f"embedded ({embedded['backbone']}) @ {embedded['image_size']}"
    out.append((label, lite, int(embedded["image_size"]), min(args.images, args.embedded_images)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--embedded-images", type=int, default=48, help="images for the embedded backbone's runs")
    p.add_argument("--real-size", action="store_true", help=f"also tiny at {REAL_SIZE} (slow on a CPU)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cores = os.cpu_count() or 1
    rule = loader_workers(cores)
    workers = sorted({0, rule, 2})
    print(
        f"machine: {platform.machine()} {cores} cores, load avg {os.getloadavg()[0]:.1f}; torch {torch.__version__}"
        f" with {args.threads} thread(s); loader_workers({cores}) = {rule}; {args.images} JPEGs of "
        f"{WIDTH}x{HEIGHT}, batch {args.batch_size}, device {args.device}, {args.reps} rep(s) after a warm-up, "
        "median"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        t = time.perf_counter()
        paths = write_jpegs(Path(tmp), args.images)
        kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"wrote {len(paths)} JPEGs (mean {kb:.0f} KB) in {time.perf_counter() - t:.1f} s")
        for label, model, size, n_images in models(args):
            reference = None
            rates: dict[int, float] = {}
            for n in workers:
                run = dict(batch_size=args.batch_size, device=args.device, progress=False, num_workers=n)
                extract_descriptors(model, paths[: 2 * args.batch_size], size, **run)  # warm-up
                seconds = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    desc = extract_descriptors(model, paths[:n_images], size, **run)
                    seconds.append(time.perf_counter() - t)
                    if reference is None:
                        reference = desc
                    elif args.device == "cpu" and not np.array_equal(desc, reference):  # cuDNN autotunes
                        raise SystemExit(f"{label}: descriptors with {n} workers differ from 0 workers")
                rates[n] = n_images / statistics.median(seconds)
                rows.append((label, n_images, n, rates[n], rates[n] / rates[0], min(seconds), max(seconds)))
                print(f"  {label}: {n} workers {rates[n]:.1f} img/s", flush=True)
    print()
    print("| model @ image size | images | workers | images/s (median) | vs 0 workers | run s (min-max) |")
    print("|---|---|---|---|---|---|")
    for label, n_images, n, rate, ratio, lo, hi in rows:
        note = " (rule: cores - 1)" if n == rule else " (oversubscribed)" if n + 1 > cores else ""
        print(f"| {label} | {n_images} | {n}{note} | {rate:.1f} | {ratio:.2f}x | {lo:.2f}-{hi:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
