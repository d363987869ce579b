"""Serving a released model: how long the serving CLI's index takes cold, warm (cached) and after one new file.

Builds a compressed artifact of the CPU demo's architecture (tiny backbone, K=16, whitening to 256, 4-bit k-means,
half the weights pruned; random weights, so only the timings mean anything), copies the synthetic test split's
database images into a temporary folder and times `trainables.serving.index.open_index` and one query there.

    python benchmarks/bench_serving.py [--image-size 128] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import torch

from trainables.compression.codec import load_compressed, save_compressed
from trainables.compression.prune import apply_mask
from trainables.compression.quantize import quantize_module
from trainables.contract import ARTIFACT_FILE
from trainables.data.synthetic import ensure_synthetic
from trainables.fileio import file_sha256
from trainables.netvlad.model import build_netvlad
from trainables.serving.index import describe_query, open_index


def demo_artifact(path: Path, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_netvlad({"backbone": "tiny", "num_clusters": 16, "whitening_dim": 256})
    for names in model.compression_groups().values():
        for name in names:
            module = model.get_submodule(name)
            w = module.weight.detach()
            apply_mask(module, w.abs() > w.abs().median())
            quantize_module(module, "kmeans", 4, kmeans_iters=5)
    meta = {
        "architecture": {"name": "netvlad", "config": model.config_dict()},
        "base": {"image_size": image_size},
    }
    save_compressed(model, None, path, meta=meta)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--repeats", type=int, default=3, help="median of this many runs per row (cold: fresh folders)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    src = ensure_synthetic() / "test" / "jpg"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifact = tmp / ARTIFACT_FILE
        demo_artifact(artifact, args.image_size)
        model = load_compressed(artifact)
        key = file_sha256(artifact)
        images = sorted(src.glob("*.jpg"))

        def fresh_db() -> Path:
            db = Path(tempfile.mkdtemp(dir=tmp))
            for f in images:
                shutil.copy2(f, db / f.name)
            return db

        dbs = [fresh_db() for _ in range(args.repeats)]
        cold, _ = timed(lambda: open_index(model, dbs.pop(), args.image_size, key), args.repeats)
        db = fresh_db()
        open_index(model, db, args.image_size, key)
        warm, index = timed(lambda: open_index(model, db, args.image_size, key), args.repeats)

        def add_one() -> object:
            shutil.copy2(images[0], db / f"new-{time.perf_counter_ns()}.jpg")
            return open_index(model, db, args.image_size, key)

        incremental, _ = timed(add_one, args.repeats)
        query, _ = timed(
            lambda: index.search(describe_query(model, images[0], args.image_size), 10), args.repeats
        )
        print(
            f"{len(images)} database images, image_size {args.image_size}, {args.threads} thread(s), "
            f"artifact {artifact.stat().st_size / 2**20:.3f} MiB, descriptor dim {index.index.d}; median of "
            f"{args.repeats}\n"
        )
        print("| step | seconds |\n|---|---:|")
        print(f"| index, cold (describe every image, write cache) | {cold:.2f} |")
        print(f"| index, warm (cache current: stat files, read cache) | {warm:.3f} |")
        print(f"| index, one new file (describe 1, reuse the rest) | {incremental:.3f} |")
        print(f"| one query (describe + top-10 search) | {query:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
