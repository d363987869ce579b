"""Benchmark: memory of one training step of a quantized layer the size of the VGG16 whitening (4096 x 32768 = 134M
weights), the current parametrizations against copies of the ones before `_CodebookGather` (kept below).

Per variant, in a fresh subprocess (one torch thread), so peaks do not mix: build the quantized ``nn.Linear``
(5-bit; half of the weights pruned), then run one forward + backward of a batch of ``--batch`` input vectors, then
two evaluation forwards under ``no_grad``. The peak RSS of the step (VmHWM, reset through /proc/self/clear_refs
right before it) and of the whole process (``resource.getrusage``), the RSS before the step and the seconds are
printed as one markdown row per variant.

Variants: ``kmeans-old`` / ``kmeans-new`` (trained codebook; the codebook is 1-D k-means of a 1M sample of the
random weights, the indices are random: memory and time do not depend on which cluster a weight is in) and
``uniform-old`` / ``uniform-new`` (straight-through latent weights, random normal).

    .venv/bin/python benchmarks/bench_quantized_whitening.py                       # full size, ~1-2 min
    .venv/bin/python benchmarks/bench_quantized_whitening.py --rows 1024 --cols 8192  # quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.utils.parametrize as parametrize  # noqa: E402
from torch import nn  # noqa: E402

from trainables.compression.kmeans1d import kmeans_1d  # noqa: E402
from trainables.compression.quantize import KMeansWeight, UniformWeight  # noqa: E402

VARIANTS = ("kmeans-old", "kmeans-new", "uniform-old", "uniform-new")
GIB = 1 << 30


# ------------------------------------------------------------------ the code before the change, as it was


class OldKMeansWeight(KMeansWeight):
    """The k-means forward before: plain indexing (int32 indices), autograd's index backward."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.indices = self.indices.to(torch.int32)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return codebook[self.indices] * self.mask.to(torch.float32)


def _old_uniform_indices(weight: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    lo = codebook[0]
    step = (codebook[-1] - lo) / (codebook.numel() - 1) if codebook.numel() > 1 else torch.ones_like(lo)
    if step == 0:
        return torch.zeros(weight.shape, dtype=torch.int64, device=weight.device)
    return torch.round((weight - lo) / step).clamp_(0, codebook.numel() - 1).to(torch.int64)


class _OldStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return codebook[_old_uniform_indices(weight, codebook)] * mask.to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None, None


class OldUniformWeight(UniformWeight):
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return _OldStraightThrough.apply(latent, self.codebook, self.mask)


# ------------------------------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _layer(variant: str, rows: int, cols: int, bits: int) -> nn.Linear:
    g = torch.Generator().manual_seed(0)
    k = 2**bits
    mask = torch.empty(rows, cols, dtype=torch.uint8).random_(0, 2, generator=g).bool()
    layer = nn.Linear(1, 1)
    layer.in_features, layer.out_features = cols, rows
    layer.bias = nn.Parameter(torch.zeros(rows))
    if variant.startswith("kmeans"):
        sample = torch.randn(1 << 20, generator=g).mul_(0.01)
        codebook = torch.from_numpy(kmeans_1d(sample.numpy(), k, iters=30).centroids).float()
        indices = torch.randint(0, k, (rows, cols), dtype=torch.int32, generator=g)
        layer.weight = nn.Parameter(
            torch.empty(rows, cols)
        )  # never touched: right_inverse hands the codebook
        cls = OldKMeansWeight if variant == "kmeans-old" else KMeansWeight
        param: nn.Module = cls(indices, mask, bits, codebook)
        del indices
    else:
        layer.weight = nn.Parameter(torch.randn(rows, cols, generator=g).mul_(0.01))
        w = layer.weight.detach()
        codebook = torch.linspace(float(w.min()), float(w.max()), k)
        param = (OldUniformWeight if variant == "uniform-old" else UniformWeight)(codebook, mask, bits)
    parametrize.register_parametrization(layer, "weight", param, unsafe=True)
    return layer


def child(variant: str, rows: int, cols: int, bits: int, batch: int) -> str:
    torch.set_num_threads(1)
    layer = _layer(variant, rows, cols, bits)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1))
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the step's own peak
    t0 = time.perf_counter()
    layer(x).pow(2).sum().backward()
    step_s = time.perf_counter() - t0
    step_peak = _status_kib("VmHWM")
    trained = layer.parametrizations.weight.original.grad
    assert trained is not None and bool(trained.abs().sum() > 0)
    layer.parametrizations.weight.original.grad = None
    with torch.no_grad():
        t0 = time.perf_counter()
        layer(x)
        eval1_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        layer(x)
        eval2_s = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        f"| {variant} | {before / (1 << 20):.2f} | {step_peak / (1 << 20):.2f} | "
        f"{(step_peak - before) / (1 << 20):.2f} | {maxrss / (1 << 20):.2f} | {step_s:.2f} | "
        f"{eval1_s:.2f} / {eval2_s:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=32768)
    ap.add_argument("--bits", type=int, default=5)
    ap.add_argument("--batch", type=int, default=28)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child(args.child, args.rows, args.cols, args.bits, args.batch))
        return
    print(
        f"{args.rows} x {args.cols} = {args.rows * args.cols / 1e6:.0f}M weights, {args.bits} bits, 50% pruned, "
        f"batch {args.batch}, 1 thread; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}\n"
    )
    print(
        "| variant | RSS before step, GiB | step peak RSS, GiB | step peak - before, GiB | ru_maxrss, GiB "
        "| fwd+bwd s | no_grad fwd 1st / 2nd s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for variant in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--rows",
            str(args.rows),
            "--cols",
            str(args.cols),
            "--bits",
            str(args.bits),
            "--batch",
            str(args.batch),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"| {variant} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]} |")
            continue
        print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
