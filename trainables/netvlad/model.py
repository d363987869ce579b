"""NetVLAD model assembly: backbone -> NetVLAD -> optional PCA whitening -> L2, plus its init helpers.

`NetVLADModel` is a plain ``nn.Module`` with three parts: ``backbone`` (conv5 features), ``pool`` (NetVLAD) and
``whiten`` (``nn.Linear`` or ``None``). `build_netvlad(config_dict)` rebuilds the architecture only (it never
loads weights or touches the network) so the compression codec can recreate a model from an artifact header.
`init_clusters` and `fit_whitening` are the two data-driven steps of building a base model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from trainables.data.images import ImageReadError, load_image
from trainables.devices import autocast, model_device
from trainables.netvlad.backbones import BACKBONE_DIMS, BACKBONES, build_backbone
from trainables.netvlad.layers import NetVLAD
from trainables.netvlad.whitening import learn_whitening

log = logging.getLogger(__name__)


@dataclass
class NetVLADConfig:
    """Architecture (+ where the backbone's starting weights come from) of a NetVLAD model."""

    backbone: str
    num_clusters: int
    #: None: no whitening (the VLAD vector itself is the descriptor).
    whitening_dim: int | None
    #: None (random), "imagenet" (torchvision cache only) or a state-dict path; not part of the architecture.
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is not one of {', '.join(BACKBONES)}")
        if not isinstance(self.num_clusters, int) or self.num_clusters < 1:
            raise ValueError(f"num_clusters must be a positive integer, got {self.num_clusters!r}")
        if self.whitening_dim is not None and (
            not isinstance(self.whitening_dim, int) or not 1 <= self.whitening_dim <= self.vlad_dim
        ):
            raise ValueError(
                f"whitening_dim must be None or an integer in 1..vlad_dim={self.vlad_dim} "
                f"(num_clusters x backbone dim), got {self.whitening_dim!r}"
            )

    @property
    def local_dim(self) -> int:
        return BACKBONE_DIMS[self.backbone]

    @property
    def vlad_dim(self) -> int:
        return self.num_clusters * self.local_dim

    @property
    def out_dim(self) -> int:
        return self.whitening_dim if self.whitening_dim is not None else self.vlad_dim


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One filter per input channel (``groups == in_channels > 1``), as in MobileNet-style separable convs."""
    return conv.groups > 1 and conv.groups == conv.in_channels


class NetVLADModel(nn.Module):
    """backbone -> NetVLAD -> [whitening Linear -> L2]; ``forward(images (B,3,H,W)) -> (B, out_dim)``, L2-normalized."""

    def __init__(self, config: NetVLADConfig) -> None:
        super().__init__()
        self.config = dataclasses.replace(config)
        self.backbone, dim = build_backbone(config.backbone, config.weights)
        self.pool = NetVLAD(config.num_clusters, dim)
        self.whiten: nn.Linear | None = (
            nn.Linear(config.vlad_dim, config.whitening_dim) if config.whitening_dim is not None else None
        )

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def frozen_prefix(self) -> int:
        """How many leading backbone modules have no trainable parameter (conv1-4 of AlexNet/VGG16 in the base)."""
        for i, layer in enumerate(self.backbone):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.backbone)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's conv5 output, float32 (B, D, h, w).

        Training runs the frozen prefix (`frozen_prefix`) under ``torch.no_grad()``: nothing there needs a
        gradient, so none of its activations are kept for the backward, whatever the input. On CUDA the backbone
        (the FLOPs and the activation memory) runs under `trainables.devices.autocast`; NetVLAD, the whitening
        and the loss stay float32."""
        with autocast(images.device):
            start = self.frozen_prefix() if self.training and torch.is_grad_enabled() else 0
            if start:
                with torch.no_grad():
                    x = self.backbone[:start](images)
                x = self.backbone[start:](x)
            else:
                x = self.backbone(images)
        return x.float()

    def local_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized conv5 descriptors, (B, H*W, D): what NetVLAD pools and k-means clusters."""
        x = self.features(images)
        return F.normalize(x, p=2, dim=1).flatten(2).transpose(1, 2)

    def vlad(self, images: torch.Tensor) -> torch.Tensor:
        """The NetVLAD vector before whitening, (B, K*D), L2-normalized."""
        return self.pool(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.vlad(images)
        if self.whiten is not None:
            v = F.normalize(self.whiten(v), p=2, dim=1)
        return v

    def compression_groups(self) -> dict[str, list[str]]:
        """Qualified module names per compression group: the backbone's convs (``depthwise``: those with one filter
        per input channel, an empty group for backbones without them; ``conv``: the others), the NetVLAD conv, the
        whitening.

        Depthwise convs are their own group because they are few weights with other needs: on the embedded base
        (EfficientNet-Lite0, folded batch norm) they are 10% of the weights, so they can keep 4-6 bits at little
        cost while the pointwise convs go to 3 (benchmarks/RESULTS.md, "Depthwise group")."""
        # named_modules, not named_children: EfficientNet's convs sit inside blocks (depthwise + pointwise).
        convs = [(f"backbone.{n}", m) for n, m in self.backbone.named_modules() if isinstance(m, nn.Conv2d)]
        groups = {
            "conv": [n for n, m in convs if not is_depthwise(m)],
            "depthwise": [n for n, m in convs if is_depthwise(m)],
            "netvlad": ["pool.conv"],
        }
        if self.whiten is not None:
            groups["whitening"] = ["whiten"]
        return groups

    def truncate_whitening(self, dim: int) -> None:
        """Keep the first ``dim`` outputs of the PCA whitening: a ``dim``-d whitening, with no rebuild.

        PCA components are ordered by variance (`trainables.netvlad.whitening.learn_pca_whitening`), so the first
        ``dim`` rows of the whitening Linear (weight and bias) are exactly the ``dim``-d PCA whitening the same
        training vectors give. The descriptor is then L2-normalized over those ``dim`` outputs. ``config`` (and so
        ``config_dict()``) says the new ``whitening_dim``, so a model rebuilt from it has the truncated shape.
        Call it on a dense model (before pruning or quantization); ``ValueError`` names what is wrong.
        """
        if self.whiten is None:
            raise ValueError(
                f"whitening_dim={dim!r}: this model has no whitening (its whitening_dim is None), so there is "
                "nothing to truncate; leave whitening_dim unset, or use a base built with whitening "
                "(--whitening-dim N)"
            )
        have = self.whiten.out_features
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= have:
            raise ValueError(
                f"whitening_dim={dim!r} is not possible: the model's whitening has {have} outputs; "
                f"use an integer in 1..{have} (or leave it unset to keep all {have})"
            )
        # A pruned layer holds weight_orig (torch.nn.utils.prune), a quantized one parametrizations.
        if hasattr(self.whiten, "weight_orig") or hasattr(self.whiten, "parametrizations"):
            raise ValueError(
                "truncate_whitening needs the dense whitening Linear; call it before pruning or quantizing"
            )
        if dim == have:
            return
        old = self.whiten
        new = nn.Linear(old.in_features, dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight[:dim])
            new.bias.copy_(old.bias[:dim])
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
        new.train(old.training)
        self.whiten = new
        self.config.whitening_dim = dim

    def config_dict(self) -> dict[str, Any]:
        """JSON-able architecture record; ``build_netvlad(model.config_dict())`` rebuilds this architecture."""
        return {
            "arch": "netvlad",
            "backbone": self.config.backbone,
            "num_clusters": self.config.num_clusters,
            "whitening_dim": self.config.whitening_dim,
        }


_CONFIG_KEYS = {"arch", "backbone", "num_clusters", "whitening_dim", "weights"}


def build_netvlad(config: dict[str, Any]) -> NetVLADModel:
    """Rebuild a `NetVLADModel` architecture from `NetVLADModel.config_dict` (random weights, nothing loaded).

    A ``"weights"`` entry is ignored on purpose: the caller (the codec) restores every tensor itself.
    """
    if not isinstance(config, dict):
        raise TypeError(
            f"build_netvlad needs a dict from NetVLADModel.config_dict(), got {type(config).__name__}"
        )
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown NetVLAD config keys {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}")
    if config.get("arch", "netvlad") != "netvlad":
        raise ValueError(f"config arch={config['arch']!r} is not 'netvlad'")
    missing = [k for k in ("backbone", "num_clusters", "whitening_dim") if k not in config]
    if missing:
        raise ValueError(
            f"NetVLAD config lacks {', '.join(map(repr, missing))} (from NetVLADModel.config_dict())"
        )
    cfg = NetVLADConfig(
        backbone=config["backbone"],
        num_clusters=config["num_clusters"],
        whitening_dim=config["whitening_dim"],
        weights=None,
    )
    return NetVLADModel(cfg)


def parameter_summary(model: nn.Module) -> tuple[list[dict[str, Any]], int]:
    """Per-parameter rows ``{"name", "shape", "params"}`` and the total parameter count (works on meta tensors)."""
    rows = [{"name": n, "shape": list(p.shape), "params": p.numel()} for n, p in model.named_parameters()]
    return rows, sum(r["params"] for r in rows)


ImageSource = str | os.PathLike | torch.Tensor


@torch.no_grad()
def init_clusters(
    model: NetVLADModel,
    images: Sequence[ImageSource] | Iterable[ImageSource],
    n_images: int = 500,
    per_image: int = 100,
    seed: int = 0,
    image_size: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """k-means-initialize ``model.pool`` from local descriptors of up to ``n_images`` images, ``per_image`` each.

    ``images``: image paths (loaded with ``trainables.data.images.load_image(path, image_size)``) or tensors (3, H, W)
    already normalized; unreadable files are skipped with a warning. A sequence longer than ``n_images`` is subsampled with ``seed``; the descriptors of each
    image are subsampled the same way. Returns the layer's init record (alpha, n_descriptors, objective).
    """
    rng = np.random.default_rng(seed)
    if isinstance(images, Sequence) and len(images) > n_images:
        idx = sorted(rng.choice(len(images), size=n_images, replace=False).tolist())
        images = [images[i] for i in idx]
    was_training = model.training
    model.eval()
    device = model_device(model)
    chunks: list[np.ndarray] = []
    it: Iterable[ImageSource] = images
    if progress:
        it = tqdm(images, desc="k-means descriptors", unit="img", leave=False)
    for i, img in enumerate(it):
        if i >= n_images:
            break
        if isinstance(img, str | os.PathLike | Path):
            if image_size is None:
                raise ValueError("init_clusters needs image_size to load images from paths")
            try:
                img = load_image(img, image_size)
            except ImageReadError as exc:  # Paris6k ships a few corrupt JPEGs: one image less is harmless
                log.warning("k-means init skips %s", exc)
                continue
        d = model.local_descriptors(img.unsqueeze(0).to(device))[0].float().cpu().numpy()
        if d.shape[0] > per_image:
            d = d[rng.choice(d.shape[0], size=per_image, replace=False)]
        chunks.append(d)
    model.train(was_training)
    if not chunks:
        raise ValueError("init_clusters got no images")
    descs = np.concatenate(chunks)
    info = model.pool.init_from_descriptors(descs, seed=seed)
    log.info(
        "NetVLAD k-means init: %d descriptors from %d images, alpha=%.2f",
        len(descs),
        len(chunks),
        info["alpha"],
    )
    return info


def fit_whitening(model: NetVLADModel, vlad_vectors: np.ndarray, out_dim: int | None = None) -> nn.Linear:
    """Learn PCA whitening from pre-whitening VLAD vectors (n, K*D) (see `NetVLADModel.vlad`) and install it.

    ``out_dim`` defaults to ``model.config.whitening_dim``; the model's config is updated to match, so
    ``config_dict()`` keeps describing the architecture.
    """
    out_dim = out_dim if out_dim is not None else model.config.whitening_dim
    if out_dim is None:
        raise ValueError("fit_whitening needs out_dim (the model's whitening_dim is None)")
    vlad_vectors = np.asarray(vlad_vectors)
    if vlad_vectors.ndim != 2 or vlad_vectors.shape[1] != model.config.vlad_dim:
        raise ValueError(
            f"VLAD vectors must have shape (n, {model.config.vlad_dim}) (the output of model.vlad), "
            f"got {vlad_vectors.shape}"
        )
    device = model_device(model)
    lin = learn_whitening(vlad_vectors, out_dim, device=device).to(device)
    model.whiten = lin
    model.config.whitening_dim = out_dim
    return lin
