"""L1 sparsification: λ·Σ|w| over the compressed layers' weights, added to the training loss before pruning."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from trainables.compression.plan import group_layers
from trainables.compression.quantize import effective_weight


def l1_penalty(
    model: nn.Module, groups: Mapping[str, Iterable[str]], lam: float
) -> Callable[[], torch.Tensor]:
    """A closure returning ``lam · Σ|w|`` over the effective weights of every layer in ``groups`` (a scalar tensor
    with autograd), for ``train_fn(..., extra_loss=...)``.

    Frozen weights (``requires_grad=False``) add a constant: it is summed once here instead of at every step."""
    if lam < 0:
        raise ValueError(f"l1 lambda = {lam!r}: must be >= 0")
    modules = [m for _, _, m in group_layers(model, groups)]
    trainable = [m for m in modules if effective_weight(m).requires_grad]
    with torch.no_grad():
        frozen = sum(
            float(effective_weight(m).abs().sum(dtype=torch.float64)) for m in modules if m not in trainable
        )

    def penalty() -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=_device(modules))
        for m in trainable:
            total = total + effective_weight(m).abs().sum()
        return lam * (total + frozen)

    return penalty


def _device(modules: list[nn.Module]) -> torch.device:
    for m in modules:
        return effective_weight(m).device
    return torch.device("cpu")
