"""Benchmark: where to cut the pretrained EfficientNet-Lite0 for NetVLAD, with no training at all.

For each cut point (the last of timm's ``blocks[i]`` kept), the ImageNet backbone (batch norm folded, as
`build_backbone("efficientnet_lite0", "imagenet")` builds it) feeds
- NetVLAD, K clusters k-means-initialized from local descriptors of the synthetic-train database images
  (unsupervised: no labels, no query), no whitening;
- GeM (p=3) pooling, the quick proxy with no parameters,
and both are scored on the embedded synthetic set's train and test splits at one image size.

The cut is chosen on **synthetic-train** mAP (the train split is not the test split; the embedded set has no
validation split yet); test mAP is reported beside it and not used for the choice.

    python benchmarks/bench_backbones.py                      # blocks[3], [4], [5]; K=32; 128 px; ~5 min on 2 cores
    python benchmarks/bench_backbones.py --cuts 4 --clusters 64

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import faiss  # noqa: F401, I001  (faiss before torch: docs/traps.md#faiss-before-torch)
import torch
import torch.nn.functional as F
from torch import nn

from trainables.data.registry import load_dataset
from trainables.netvlad import NetVLAD, NetVLADConfig, NetVLADModel, init_clusters
from trainables.netvlad.backbones import EFFICIENTNET_LITE0_BLOCK_DIMS, efficientnet_lite0_features
from trainables.retrieval.evaluate import evaluate_dataset

SPLITS = ("synthetic-train", "synthetic-test")


class GeM(nn.Module):
    """Generalized-mean pooling of a backbone's (clamped) feature map, L2-normalized."""

    def __init__(self, backbone: nn.Module, p: float = 3.0) -> None:
        super().__init__()
        self.backbone, self.p = backbone, p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone(images).clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return F.normalize(x, p=2, dim=1)


def netvlad_at_cut(last_block: int, clusters: int, image_size: int, seed: int) -> tuple[NetVLADModel, float]:
    """A NetVLAD model over the ImageNet backbone cut after ``blocks[last_block]``, k-means initialized."""
    torch.manual_seed(seed)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=clusters, whitening_dim=None))
    # The config names the architecture of a shipped backbone; here only the cut differs, so swap the parts.
    model.backbone = efficientnet_lite0_features("imagenet", last_block=last_block)
    model.pool = NetVLAD(clusters, EFFICIENTNET_LITE0_BLOCK_DIMS[last_block])
    model.eval()
    t0 = time.perf_counter()
    init_clusters(model, load_dataset("synthetic-train").image_paths(), seed=seed, image_size=image_size)
    return model, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", type=int, nargs="+", default=[3, 4, 5], help="last blocks[i] kept (0..6)")
    ap.add_argument("--clusters", type=int, default=32, help="NetVLAD K")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-gem", action="store_true", help="skip the GeM proxy")
    args = ap.parse_args()

    datasets = {s: load_dataset(s) for s in SPLITS}
    rows = []
    for cut in args.cuts:
        model, t_init = netvlad_at_cut(cut, args.clusters, args.image_size, args.seed)
        backbone_params = sum(p.numel() for p in model.backbone.parameters())
        pool_params = sum(p.numel() for p in model.pool.parameters())
        poolings: list[tuple[str, nn.Module, int, int, float]] = [
            (f"NetVLAD K={args.clusters}", model, args.clusters * model.pool.dim, pool_params, t_init)
        ]
        if not args.no_gem:
            poolings.append(("GeM p=3", GeM(model.backbone).eval(), model.pool.dim, 0, 0.0))
        for label, m, dim, extra, t_extra in poolings:
            t0 = time.perf_counter()
            maps = {s: evaluate_dataset(m, d, args.image_size)["mAP"] for s, d in datasets.items()}
            secs = time.perf_counter() - t0 + t_extra
            rows.append((cut, label, maps, backbone_params + extra, dim, secs))
            print(f"blocks[{cut}] {label}: {maps} ({secs:.0f} s)", flush=True)

    print()
    print(
        f"EfficientNet-Lite0 (ImageNet, BN folded), no training, {args.image_size} px, seed {args.seed}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print()
    print("| cut | channels | stride | pooling | train mAP | test mAP | params | dim | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    stride = {0: 2, 1: 4, 2: 8, 3: 16, 4: 16, 5: 32, 6: 32}
    for cut, label, maps, params, dim, secs in rows:
        print(
            f"| blocks[{cut}] | {EFFICIENTNET_LITE0_BLOCK_DIMS[cut]} | {stride[cut]} | {label} | "
            f"{maps['synthetic-train']:.4f} | {maps['synthetic-test']:.4f} | {params:,} | {dim:,} | {secs:.0f} |"
        )
    best = max((r for r in rows if r[1].startswith("NetVLAD")), key=lambda r: r[2]["synthetic-train"])
    print()
    print(
        f"Chosen on synthetic-train NetVLAD mAP: blocks[{best[0]}] (test mAP {best[2]['synthetic-test']:.4f})."
    )


if __name__ == "__main__":
    main()
