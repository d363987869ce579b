"""The poster's rows, side by side: AlexNet/VGG16 + NetVLAD (K=64) + PCA-4096 pruned and quantized at the ACPR 2017
poster's settings, written as real artifacts and measured on disk.

No data and no downloads: weights are generated with realistic distributions (see `realistic_netvlad`). Every layer
(backbone convs, the NetVLAD 1x1 conv, the whitening) is pruned to the poster's percentage by magnitude, then
quantized with ``kmeans`` (Lloyd over all kept weights, no training: there is no data) and with ``uniform`` at the
poster's bits, and written with ``save_compressed``. The table gives the poster's MB, our file, the zero-order
entropy of what was stored (order-0: a reference point, not a bound), the poster-style figure (nonzeros x bits /
8), our ratio against dense fp32, and the quantization error of both modes at equal bits (whitening weights MSE
and relative error of the whitening output on random inputs).

    .venv/bin/python benchmarks/bench_poster.py                 # both models, all rows, both modes
    .venv/bin/python benchmarks/bench_poster.py --models alexnet --rows 0 --modes kmeans   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch: both bring OpenMP; see docs/traps.md)
import torch

from trainables.compression.codec import save_compressed
from trainables.compression.prune import apply_mask
from trainables.compression.quantize import effective_weight, quantize_module
from trainables.netvlad.model import NetVLADModel, build_netvlad

MIB = 1 << 20

#: The poster's table (seed/poster-compressing-dnn-for-places-acpr2017.txt): (bits, threshold, pruned %, MB).
POSTER_ROWS = {
    "alexnet": {
        "dense_mb": 248.6,
        "rows": [
            (8, 0.001, 25.77, 41.4),
            (8, 0.005, 48.44, 32.4),
            (8, 0.01, 69.92, 20.0),
            (8, 0.05, 85.77, 10.3),
            (5, 0.005, 52.39, 19.5),
            (5, 0.01, 74.95, 10.6),
        ],
    },
    "vgg16": {
        "dense_mb": 529.5,
        "rows": [
            (8, 0.001, 25.52, 89.6),
            (8, 0.005, 51.77, 65.1),
            (8, 0.01, 68.23, 40.5),
            (8, 0.05, 84.68, 21.7),
            (5, 0.005, 55.77, 42.1),
            (5, 0.01, 75.66, 21.2),
        ],
    },
}


def realistic_netvlad(backbone: str, seed: int = 0, whitening_dim: int = 4096) -> NetVLADModel:
    """A NetVLAD model (K=64, PCA-``whitening_dim``) whose weights look like trained ones, generated in seconds.

    - Backbone convs: Laplacian, He scale (std = sqrt(2 / fan_in)), a log-normal scale per output channel (trained
      filters differ in norm); biases small and mostly positive.
    - NetVLAD: centroids = L2-normalized non-negative vectors (cluster centres of ReLU descriptors), conv weight =
      alpha * centroid with alpha = 50 (the alpha rule gives tens).
    - Whitening ``diag(lambda)^-1/2 E^T``: unit eigenvector rows (Gaussian entries) scaled by lambda_i^-1/2 with a
      power-law spectrum lambda_i ~ (i+1)^-0.8, i.e. a heavy-tailed scale mixture, as PCA-whitening of VLAD is.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = build_netvlad({"backbone": backbone, "num_clusters": 64, "whitening_dim": whitening_dim})
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                std = math.sqrt(2.0 / fan_in)
                sign = torch.randint(0, 2, m.weight.shape, generator=g).mul_(2).sub_(1)
                lap = torch.empty(m.weight.shape).exponential_(generator=g).mul_(sign)  # unit-scale Laplace
                chan = torch.exp(0.3 * torch.randn(m.weight.shape[0], generator=g)).view(-1, 1, 1, 1)
                m.weight.copy_(lap * (std / math.sqrt(2.0)) * chan)
                m.bias.copy_(0.05 + 0.05 * torch.randn(m.bias.shape, generator=g))
        k, d = model.pool.centroids.shape
        cent = torch.nn.functional.normalize(torch.randn(k, d, generator=g).clamp_(min=0) + 0.01, dim=1)
        model.pool.centroids.copy_(cent)
        model.pool.conv.weight.copy_(50.0 * cent.view(k, d, 1, 1))
        w = model.whiten.weight
        lam = torch.arange(1, w.shape[0] + 1, dtype=torch.float64).pow(-0.8)
        row_scale = (lam / lam[0]).rsqrt().to(torch.float32) / math.sqrt(w.shape[1])
        for sl in range(0, w.shape[0], 512):  # in blocks: no second 537 MB temporary
            rows = slice(sl, sl + 512)
            w[rows] = torch.randn(w[rows].shape, generator=g) * row_scale[rows, None] * 0.05
        model.whiten.bias.copy_(0.01 * torch.randn(model.whiten.bias.shape, generator=g))
    return model.eval()


def magnitude_threshold(w: torch.Tensor, fraction: float, sample: int = 1 << 22, seed: int = 0) -> float:
    """|w| quantile at ``fraction`` from a sample of ``sample`` entries (exact for smaller tensors)."""
    flat = w.detach().reshape(-1).abs()
    if flat.numel() > sample:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(0, flat.numel(), (sample,), generator=g)]
    return float(torch.quantile(flat.float(), fraction)) if fraction > 0 else -1.0


def compress(model: NetVLADModel, pruned_pct: float, bits: int, mode: str, kmeans_iters: int = 30) -> dict:
    """Prune every compressed layer to ``pruned_pct`` % by magnitude, then quantize it (``mode``, ``bits``).
    Returns whitening/conv quantization errors against the pruned, unquantized weights."""
    groups = model.compression_groups()
    x = torch.randn(model.whiten.in_features, 16, generator=torch.Generator().manual_seed(1))
    x = torch.nn.functional.normalize(x, dim=0)
    out = {"mse": {}, "rel_out_err": None, "kmeans_s": 0.0}
    for group, names in groups.items():
        for name in names:
            module = model.get_submodule(name)
            w = module.weight.detach()
            apply_mask(module, w.abs() > magnitude_threshold(w, pruned_pct / 100))
            ref_out = effective_weight(module).detach() @ x if name == "whiten" else None
            t0 = time.perf_counter()
            row = quantize_module(module, mode, bits, kmeans_iters=kmeans_iters)
            out["kmeans_s"] += time.perf_counter() - t0
            out["mse"].setdefault(group, []).append((row["mse"], row["kept"]))
            if ref_out is not None:
                with torch.no_grad():
                    q_out = module.weight @ x
                out["rel_out_err"] = float((q_out - ref_out).norm() / ref_out.norm())
    # Mean squared error over each group's kept weights.
    out["mse"] = {g: sum(m * n for m, n in v) / max(1, sum(n for _, n in v)) for g, v in out["mse"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="alexnet,vgg16")
    p.add_argument("--rows", default="all", help="comma-separated row numbers of the poster table, or 'all'")
    p.add_argument("--modes", default="kmeans,uniform")
    p.add_argument(
        "--bits", type=int, default=None, help="override the poster's bits (e.g. uniform at b+1 bits)"
    )
    p.add_argument(
        "--kmeans-iters", type=int, default=30, help="Lloyd iterations (quantize_module's default: 30)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", default=None, help="keep the artifacts in this folder (default: a temp folder, deleted)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out_dir = Path(args.out or tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)

    lines = [
        "| model | bits | pruned % (poster / ours) | mode | poster MB | file MiB | order-0 MiB | file / order-0 | "
        "poster-style MiB | ratio vs dense (poster's) | whitening MSE | whitening rel. out err | conv MSE | quantize s | "
        "encode s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    started = time.perf_counter()
    worst = 0.0
    for backbone in args.models.split(","):
        spec = POSTER_ROWS[backbone]
        t0 = time.perf_counter()
        base = realistic_netvlad(backbone)
        dense = {k: v.clone() for k, v in base.state_dict().items()}
        config = base.config_dict()
        del base
        print(f"# {backbone}: generated in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows = range(len(spec["rows"])) if args.rows == "all" else [int(r) for r in args.rows.split(",")]
        for r in rows:
            bits, _threshold, pct, poster_mb = spec["rows"][r]
            bits = args.bits or bits
            for mode in modes:
                with torch.device("meta"):
                    model = build_netvlad(config)
                model.load_state_dict({k: v.clone() for k, v in dense.items()}, assign=True)
                model.eval()
                err = compress(model, pct, bits, mode, args.kmeans_iters)
                path = out_dir / f"{backbone}-{bits}b-{pct}-{mode}.safetensors"
                t0 = time.perf_counter()
                rep = save_compressed(
                    model,
                    None,
                    path,
                    {
                        "architecture": {"name": "netvlad", "config": config},
                        "bench": "poster",
                        "pruned_pct": pct,
                    },
                )
                enc_s = time.perf_counter() - t0
                t = rep.totals
                ratio_order0 = t["file_bytes"] / t["order0_bytes"]
                worst = max(worst, ratio_order0)
                lines.append(
                    f"| {backbone} | {bits} | {pct:.2f} / {100 * t['sparsity']:.2f} | {mode} | {poster_mb} | "
                    f"{t['memory_mib']:.2f} | {t['order0_bytes'] / MIB:.2f} | {ratio_order0:.3f} | "
                    f"{t['poster_mib']:.2f} | {t['compression_ratio']:.1f}x ({spec['dense_mb'] / poster_mb:.1f}x) | {err['mse']['whitening']:.3e} | "
                    f"{err['rel_out_err']:.4f} | {err['mse']['conv']:.3e} | {err['kmeans_s']:.1f} | {enc_s:.1f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
                if args.out is None:
                    path.unlink()
                del model
                gc.collect()
        print(
            f"# {backbone}: dense fp32 {t['dense_fp32_bytes'] / MIB:.1f} MiB "
            f"({t['parameters']:,} parameters); poster's base model {spec['dense_mb']} MB",
            file=sys.stderr,
        )
        del dense
        gc.collect()
    print("\n".join(lines))
    print(f"\nworst file / order-0: {worst:.3f}; total {time.perf_counter() - started:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
