"""L1 sparsification before pruning: λ·Σ|w| over the compressed layers' weights, as a penalty with its proximal step.

A plain subgradient of λ·Σ|w| only makes weights oscillate around zero (no step lands exactly on it), and under
Adam the step does not even scale with λ. The proximal (soft-threshold) step after each optimizer step,
w ← sign(w)·max(|w| − η·λ, 0) with η the step size of that tensor, moves weights *to* zero and keeps them there
unless the loss pulls them back: those are the weights the pruning threshold then removes.

`l1_penalty` returns an `L1Penalty`: calling it gives λ·Σ|w| with autograd (a train function that knows nothing of
proximal steps adds it to the loss: plain L1 by subgradient); a train function that sees its ``proximal`` method
(`trainables.train.train_triplet` does) leaves it out of the gradient and calls ``proximal`` after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from trainables.compression.plan import group_layers
from trainables.compression.quantize import effective_weight, is_pruned, is_quantized


def _stored_weight(module: nn.Module) -> torch.Tensor:
    """The parameter that holds ``module``'s weight values (``weight_orig`` under a prune mask)."""
    return module.weight_orig if is_pruned(module) else module.weight


class L1Penalty:
    """``lam · Σ|w|`` over the weights of the given layers; see the module docstring for the two ways to use it."""

    def __init__(self, modules: list[nn.Module], lam: float) -> None:
        if lam < 0:
            raise ValueError(f"l1 lambda = {lam!r}: must be >= 0")
        self.lam = float(lam)
        self.modules = modules
        self.trainable = [m for m in modules if effective_weight(m).requires_grad]
        # Frozen weights add a constant: summed once here instead of at every step.
        with torch.no_grad():
            self.frozen = sum(
                float(effective_weight(m).abs().sum(dtype=torch.float64))
                for m in modules
                if m not in self.trainable
            )

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=_device(self.modules))
        for m in self.trainable:
            total = total + effective_weight(m).abs().sum()
        return self.lam * (total + self.frozen)

    def parameters(self) -> list[torch.Tensor]:
        """The tensors ``proximal`` shrinks (quantized layers have a codebook, not weights: they are left out)."""
        return [_stored_weight(m) for m in self.trainable if not is_quantized(m)]

    @torch.no_grad()
    def proximal(self, step_size: Callable[[torch.Tensor], float]) -> None:
        """Soft-threshold every weight by ``step_size(tensor)·λ``: the proximal step of λ·Σ|w| after a gradient step
        of size ``step_size(tensor)`` on that tensor. Zeros stay zero; pruned entries (zero) stay zero."""
        for p in self.parameters():
            shrink = step_size(p) * self.lam
            if shrink > 0:
                p.copy_(p.sign() * (p.abs() - shrink).clamp_(min=0))


def l1_penalty(model: nn.Module, groups: Mapping[str, Iterable[str]], lam: float) -> L1Penalty:
    """An `L1Penalty` of ``lam · Σ|w|`` over the effective weights of every layer in ``groups``, for
    ``train_fn(..., extra_loss=...)``."""
    if lam < 0:
        raise ValueError(f"l1 lambda = {lam!r}: must be >= 0")
    return L1Penalty([m for _, _, m in group_layers(model, groups)], lam)


def _device(modules: list[nn.Module]) -> torch.device:
    for m in modules:
        return effective_weight(m).device
    return torch.device("cpu")
