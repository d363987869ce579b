"""Benchmark: k-means quantization of one VGG16-whitening-size tensor (32768×4096 = 134M weights) at 8 bits.

For a dense and a 50%-pruned Laplacian-like matrix (rows scaled like a PCA-whitening matrix), it measures:
- ours: ``kmeans_1d`` (exact Lloyd on a sorted copy) and the whole ``quantize_module`` on an ``nn.Linear``;
- uniform 8-bit quantization over the same [min, max] (MSE only);
- the reference: textbook Lloyd on all points, unsorted (assignment by binary search on the midpoints, means by
  ``bincount``), same linear init, same number of iterations, at full size;
- a brute-force argmin Lloyd on a random subsample (``--brute-fraction``), against ours on the same subsample;
- faiss k-means with its defaults (it subsamples to 256 points per centroid:
  docs/traps.md#faiss-kmeans-subsampling).

    python benchmarks/bench_kmeans.py              # full size, ~10 min on 2 cores (the reference dominates)
    python benchmarks/bench_kmeans.py --n 4000000  # quick look

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import faiss  # noqa: I001  (faiss before torch: docs/traps.md#faiss-before-torch)
import numpy as np
import torch
from torch import nn

from trainables.compression.kmeans1d import assign_1d, kmeans_1d, linear_init, quantization_mse
from trainables.compression.quantize import quantize_module


def whitening_like(n: int, cols: int, seed: int) -> np.ndarray:
    """Laplacian entries, each row scaled by a factor log-uniform over two decades (the diag(λ^-½) of whitening)."""
    rng = np.random.default_rng(seed)
    rows = n // cols
    scale = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), rows)).astype(np.float32)
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, (1 << 22) // cols)
    for r in range(0, rows, step):
        out[r : r + step] = rng.laplace(0.0, 1.0, (min(step, rows - r), cols)).astype(np.float32)
        out[r : r + step] *= scale[r : r + step, None]
    return out


def uniform_mse(x: np.ndarray, bits: int) -> float:
    lo, hi = float(x.min()), float(x.max())
    levels = np.linspace(lo, hi, 2**bits, dtype=np.float32)
    step = (hi - lo) / (2**bits - 1)
    sq, chunk = 0.0, 1 << 22
    for s in range(0, x.size, chunk):
        v = x[s : s + chunk]
        idx = np.clip(np.rint((v - lo) / step), 0, 2**bits - 1).astype(np.int64)
        d = v.astype(np.float64) - levels[idx]
        sq += float(np.dot(d, d))
    return sq / x.size


def reference_lloyd_all_points(x: np.ndarray, init: np.ndarray, iters: int) -> tuple[np.ndarray, float]:
    """Lloyd over every point, unsorted: per iteration assign all n points to their nearest centroid (binary
    search on the float32-rounded midpoints) and recompute the means with bincount. Returns centroids and MSE."""
    xt = torch.from_numpy(x)
    c = init.astype(np.float64).copy()

    def assign(c: np.ndarray) -> np.ndarray:
        mid = torch.from_numpy(((c[:-1] + c[1:]) / 2).astype(np.float32))
        return torch.bucketize(xt, mid, out_int32=True).numpy()

    for _ in range(iters):
        idx = assign(c)
        counts = np.bincount(idx, minlength=c.size)
        sums = np.bincount(idx, weights=x, minlength=c.size)
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
    return c, quantization_mse(x, c, assign(c))


def brute_lloyd(x: np.ndarray, init: np.ndarray, iters: int) -> tuple[np.ndarray, float]:
    """Textbook Lloyd: argmin over all centroids for every point (float64), in chunks."""
    xt = torch.from_numpy(x.astype(np.float64))
    c = torch.from_numpy(init.astype(np.float64))

    def assign(c: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [(xt[s : s + 65536, None] - c[None]).abs().argmin(1) for s in range(0, xt.numel(), 65536)]
        )

    for _ in range(iters):
        idx = assign(c)
        counts = torch.bincount(idx, minlength=c.numel())
        sums = torch.zeros_like(c).index_add_(0, idx, xt)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    idx = assign(c)
    return c.numpy(), float(((xt - c[idx]) ** 2).mean())


def timing_only(w: np.ndarray, args: argparse.Namespace) -> None:
    """Best-of-``repeat`` seconds of ``kmeans_1d`` and of ``quantize_module`` (kmeans) on the dense and pruned tensor."""
    print("\n| case | kmeans_1d s (best) | quantize_module s (best) | runs |")
    print("|---|---|---|---|")
    for pruned in (0.0, 0.5):
        if pruned:
            w[np.abs(w) < float(np.quantile(np.abs(w.ravel()[::97]), pruned))] = 0.0
        x = w[w != 0] if pruned else w.ravel()
        t_k, t_m = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            kmeans_1d(x, 2**args.bits, iters=args.iters)
            t_k.append(time.perf_counter() - t0)
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(w))
            t0 = time.perf_counter()
            quantize_module(layer, "kmeans", args.bits, kmeans_iters=args.iters)
            t_m.append(time.perf_counter() - t0)
            del layer
        case = f"{'dense' if not pruned else '50% pruned'} ({x.size / 1e6:.1f}M nonzeros)"
        print(f"| {case} | {min(t_k):.1f} | {min(t_m):.1f} | {args.repeat} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768 * 4096, help="weights (default: the VGG16 whitening)")
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--brute-fraction", type=float, default=1 / 256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-reference", action="store_true", help="skip the full-size unsorted Lloyd")
    ap.add_argument("--timing-only", action="store_true", help="only time ours (best of --repeat runs)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    k = 2**args.bits

    w = whitening_like(args.n, args.cols, args.seed)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
        f"{torch.get_num_threads()} torch thread(s); tensor {w.shape}, {w.size:,} weights"
    )
    if args.timing_only:
        timing_only(w, args)
        return
    rows = []
    for pruned in (0.0, 0.5):
        if pruned:
            t = float(np.quantile(np.abs(w.ravel()[::97]), pruned))  # a strided sample is plenty for a median
            w[np.abs(w) < t] = 0.0
        x = w[w != 0] if pruned else w.ravel()
        init = linear_init(x, k)
        t0 = time.perf_counter()
        ours = kmeans_1d(x, init=init, iters=args.iters)
        t_ours = time.perf_counter() - t0

        t0 = time.perf_counter()
        conv = kmeans_1d(x, init=init, iters=100_000, return_indices=False)
        t_conv = time.perf_counter() - t0

        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
        t0 = time.perf_counter()
        qm = quantize_module(layer, "kmeans", args.bits, kmeans_iters=args.iters)
        t_module = time.perf_counter() - t0
        del layer

        u_mse = uniform_mse(x, args.bits)
        if args.skip_reference:
            ref_mse, t_ref = float("nan"), float("nan")
        else:
            t0 = time.perf_counter()
            _, ref_mse = reference_lloyd_all_points(x, init, ours.iterations)
            t_ref = time.perf_counter() - t0

        rng = np.random.default_rng(args.seed + 1)
        sub = x[rng.choice(x.size, max(k * 4, int(x.size * args.brute_fraction)), replace=False)]
        sub_init = linear_init(sub, k)
        t0 = time.perf_counter()
        brute_c, brute_mse = brute_lloyd(sub, sub_init, args.iters)
        t_brute = time.perf_counter() - t0
        ours_sub = kmeans_1d(sub, init=sub_init, iters=args.iters)

        t0 = time.perf_counter()
        km = faiss.Kmeans(1, k, niter=args.iters, seed=args.seed)
        km.train(x.reshape(-1, 1))
        t_faiss = time.perf_counter() - t0
        fc = np.sort(km.centroids.ravel().astype(np.float64))
        faiss_mse = quantization_mse(
            x, fc, assign_1d(x, fc)
        )  # = nearest-centroid search, without 34G distances

        rows.append(
            dict(
                case=f"{'dense' if not pruned else '50% pruned'} ({x.size / 1e6:.1f}M nonzeros)",
                t_ours=t_ours,
                t_module=t_module,
                iters=ours.iterations,
                mse=ours.mse,
                module_mse=qm["mse"],
                u_mse=u_mse,
                ref_mse=ref_mse,
                t_ref=t_ref,
                sub=sub.size,
                brute_dc=float(np.abs(brute_c - ours_sub.centroids).max()),
                brute_mse=brute_mse,
                ours_sub_mse=ours_sub.mse,
                t_brute=t_brute,
                faiss_mse=faiss_mse,
                t_faiss=t_faiss,
                conv_mse=conv.mse,
                conv_iters=conv.iterations,
                t_conv=t_conv,
            )
        )

    print(
        f"\n### {args.bits}-bit k-means of a {w.shape[0]}×{w.shape[1]} tensor ({args.n / 1e6:.0f}M weights)\n"
    )
    print(
        "| case | kmeans_1d s | quantize_module s | iters | MSE ours | MSE ref Lloyd (all pts) | ref s | MSE uniform | MSE faiss (default) | faiss s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['t_ours']:.1f} | {r['t_module']:.1f} | {r['iters']} | {r['mse']:.4e} "
            f"| {r['ref_mse']:.4e} | {r['t_ref']:.0f} | {r['u_mse']:.4e} "
            f"| {r['faiss_mse']:.4e} | {r['t_faiss']:.1f} |"
        )
    print("\nOurs run until the assignment stops changing (Lloyd converged), same init:\n")
    print("| case | iterations | s | MSE | MSE / MSE at 30 iterations |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['conv_iters']} | {r['t_conv']:.1f} | {r['conv_mse']:.4e} "
            f"| {r['conv_mse'] / r['mse']:.2f} |"
        )
    print(
        "\nBrute-force argmin Lloyd (float64, every point vs every centroid) on a random subsample, same init:\n"
    )
    print("| case | subsample | max abs centroid diff vs ours | MSE brute | MSE ours | brute s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['sub']:,} | {r['brute_dc']:.2e} | {r['brute_mse']:.6e} | {r['ours_sub_mse']:.6e} "
            f"| {r['t_brute']:.1f} |"
        )


if __name__ == "__main__":
    main()
