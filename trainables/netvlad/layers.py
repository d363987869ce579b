"""The NetVLAD pooling layer (v1, as in the original MATLAB code and Nanne/pytorch-NetVlad) and its k-means init.

Forward: L2-normalize each local descriptor over channels; soft-assign it to K clusters with a 1x1 conv (no bias)
and a softmax over K; sum the assignment-weighted residuals to each centroid; intra-normalize per cluster;
flatten; L2-normalize. Init (`NetVLAD.init_from_descriptors`): faiss k-means over *all* given descriptors and the
alpha rule alpha = -log(0.01) / mean(top1 - top2 of descriptor . normalized centroid).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def netvlad_pool(
    x: torch.Tensor, assign: Callable[[torch.Tensor], torch.Tensor], centroids: torch.Tensor
) -> torch.Tensor:
    """NetVLAD v1 of a feature map ``x`` (B, D, H, W) -> (B, K*D), L2-normalized. ``assign`` maps the normalized
    map to soft-assignment logits (B, K, H, W): the layer passes its 1x1 conv *module*, not its weight, so the
    pruning / quantization hooks on that module apply."""
    b, d = x.shape[:2]
    x = F.normalize(x, p=2, dim=1)
    k = centroids.shape[0]
    soft = F.softmax(assign(x).view(b, k, -1), dim=1)  # (B, K, N)
    xf = x.view(b, d, -1)  # (B, D, N)
    # sum_n a_k(x_n) (x_n - c_k) = (A X^T)_k - (sum_n a_k(x_n)) c_k: one matmul instead of a K-loop.
    vlad = torch.bmm(soft, xf.transpose(1, 2)) - soft.sum(dim=2, keepdim=True) * centroids.unsqueeze(0)
    vlad = F.normalize(vlad, p=2, dim=2)  # intra-normalization
    return F.normalize(vlad.reshape(b, -1), p=2, dim=1)


class NetVLAD(nn.Module):
    """NetVLAD v1 layer with ``conv`` (1x1, no bias: the soft-assignment) and ``centroids`` (K, D)."""

    def __init__(self, num_clusters: int, dim: int) -> None:
        super().__init__()
        if num_clusters < 1 or dim < 1:
            raise ValueError(f"NetVLAD needs num_clusters >= 1 and dim >= 1, got {num_clusters} and {dim}")
        self.num_clusters = num_clusters
        self.dim = dim
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))
        #: Sharpness of the soft assignment, set by init_from_descriptors (kept for the record, not a parameter).
        self.alpha: float | None = None

    @property
    def out_dim(self) -> int:
        return self.num_clusters * self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return netvlad_pool(x, self.conv, self.centroids)

    @torch.no_grad()
    def init_from_descriptors(self, descs: np.ndarray, seed: int = 0, niter: int = 100) -> dict[str, float]:
        """Initialize from local descriptors (n, D): k-means on all of them (L2-normalized) and the alpha rule.

        Returns ``{"alpha", "n_descriptors", "kmeans_objective"}`` for logging.
        """
        descs = np.ascontiguousarray(np.asarray(descs, dtype=np.float32))
        if descs.ndim != 2 or descs.shape[1] != self.dim:
            raise ValueError(f"descriptors must have shape (n, {self.dim}), got {descs.shape}")
        n = descs.shape[0]
        if n < self.num_clusters:
            raise ValueError(
                f"k-means needs at least num_clusters={self.num_clusters} descriptors, got {n}; "
                f"use more images or more descriptors per image"
            )
        if not np.isfinite(descs).all():
            raise ValueError("descriptors contain NaN or inf; the backbone output is broken")
        descs = descs / np.maximum(np.linalg.norm(descs, axis=1, keepdims=True), 1e-12)
        # faiss silently subsamples to 256 points per centroid by default (docs/traps.md#faiss-kmeans-subsampling): use every point.
        km = faiss.Kmeans(
            self.dim,
            self.num_clusters,
            niter=niter,
            seed=seed,
            max_points_per_centroid=math.ceil(n / self.num_clusters) + 1,
            verbose=False,
        )
        km.train(descs)
        centroids = km.centroids.astype(np.float32)
        alpha = alpha_rule(centroids, descs)
        normed = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        dev, dtype = self.conv.weight.device, self.conv.weight.dtype
        self.centroids.copy_(torch.from_numpy(centroids).to(dev, dtype))
        self.conv.weight.copy_(torch.from_numpy(alpha * normed).to(dev, dtype)[:, :, None, None])
        self.alpha = alpha
        return {"alpha": alpha, "n_descriptors": float(n), "kmeans_objective": float(km.obj[-1])}


def alpha_rule(centroids: np.ndarray, descs: np.ndarray) -> float:
    """alpha = -log(0.01) / mean over descriptors of (top1 - top2) of descriptor . normalized centroid.

    With this alpha the best cluster gets ~100x the weight of the runner-up for an average descriptor.
    """
    if centroids.shape[0] < 2:
        # One cluster: the softmax is constant, any alpha gives the same output.
        return 1.0
    normed = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    dots = descs @ normed.T  # (n, K)
    top2 = -np.partition(-dots, 1, axis=1)[:, :2]
    gap = float(np.mean(top2[:, 0] - top2[:, 1]))
    if not gap > 0:
        raise ValueError("every descriptor is equally close to its two best centroids; cannot set alpha")
    return float(-np.log(0.01) / gap)
