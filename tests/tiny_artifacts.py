"""Real compressed artifacts of a tiny NetVLAD model for release and serving tests (seconds, no training).

A model is the ``tiny`` backbone + NetVLAD (K=4) + whitening to 32-d with random weights, pruned by magnitude and
k-means quantized by `trainables.compression`, written with `save_compressed` and a ``meta["base"]`` record as the
sweep writes it. More bits / less pruning makes a larger file, so a test can lay out a front by memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import torch

from trainables.compression.codec import save_compressed
from trainables.compression.plan import CompressionPlan, GroupPlan
from trainables.compression.prune import apply_mask
from trainables.compression.quantize import quantize_module
from trainables.netvlad.model import build_netvlad

#: Small images keep an evaluation of the synthetic test split to about a second on one CPU thread.
IMAGE_SIZE = 64


def tiny_artifact(
    path: Path, bits: int = 4, sparsity: float = 0.5, image_size: int | None = IMAGE_SIZE, seed: int = 0
) -> dict:
    """Write the artifact to ``path``; returns its size report totals (``memory_mib``, ``dense_fp32_bytes``…).

    ``image_size=None`` leaves ``base`` out of the meta (an artifact that does not say its image size)."""
    torch.manual_seed(seed)
    model = build_netvlad({"backbone": "tiny", "num_clusters": 4, "whitening_dim": 32})
    groups = model.compression_groups()
    for names in groups.values():
        for name in names:
            module = model.get_submodule(name)
            w = module.weight.detach()
            if sparsity > 0:
                cut = w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
                apply_mask(module, w.abs() > cut)
            quantize_module(module, "kmeans", bits, kmeans_iters=5)
    plan = CompressionPlan(
        groups={g: GroupPlan(prune="abs", threshold=0.0, quant="kmeans", bits=bits) for g in groups}
    )
    meta = {"architecture": {"name": "netvlad", "config": model.config_dict()}}
    if image_size is not None:
        meta["base"] = {"image_size": image_size, "backbone": "tiny", "dataset": "synthetic"}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_compressed(model, plan, path, meta=meta).to_dict()["totals"]


def copy_images(src_dir: Path, dest: Path, names: list[str]) -> list[Path]:
    """Copy ``names`` from ``src_dir`` into ``dest``, spread over nested folders (the CLI searches recursively)."""
    out = []
    for i, name in enumerate(names):
        sub = dest / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        out.append(Path(shutil.copy2(src_dir / name, sub / name)))
    return out
