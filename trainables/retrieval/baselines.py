"""Model-free retrieval baselines: how well raw thumbnails or colour histograms rank a dataset.

They check that a benchmark is not trivially solved (the embedded synthetic set's mAP must sit well below 1 for
them, yet well above chance) and give a floor any trained model should beat.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from trainables.data.images import BBox
from trainables.data.oxford import RetrievalDataset
from trainables.retrieval.metrics import mean_average_precision

__all__ = ["baseline_descriptors", "baseline_map"]


def baseline_descriptors(
    paths: Sequence[str | os.PathLike], bbxs: Sequence[BBox | None] | None = None, kind: str = "pixels"
) -> np.ndarray:
    """Model-free descriptors to check the set is not trivially solved: `pixels` (16x16 RGB thumbnail,
    zero-mean, L2) or `histogram` (8x8x8 joint RGB histogram, square-rooted, L2). Queries are cropped to bbxs."""
    if kind not in ("pixels", "histogram"):
        raise ValueError(f"kind must be 'pixels' or 'histogram', got {kind!r}")
    out = []
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB")
            box = bbxs[i] if bbxs is not None else None
            if box is not None:
                im = im.crop(tuple(round(v) for v in box))
            if kind == "pixels":
                v = np.asarray(im.resize((16, 16), Image.Resampling.BILINEAR), np.float32).ravel()
                v = v - v.mean()
            else:
                q = np.asarray(im, np.uint8) // 32
                v = np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512)
                v = np.sqrt(v.astype(np.float32) / max(1, v.sum()))
        out.append(v / max(float(np.linalg.norm(v)), 1e-12))
    return np.stack(out)


def baseline_map(dataset: RetrievalDataset, kind: str = "pixels") -> float:
    """mAP (Oxford protocol) of `baseline_descriptors` on a RetrievalDataset; should sit clearly below 1."""
    db = baseline_descriptors(dataset.image_paths(), None, kind)
    q = baseline_descriptors(dataset.query_paths(), dataset.bbxs, kind)
    ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")
    return float(mean_average_precision(ranks, dataset.gnd))
