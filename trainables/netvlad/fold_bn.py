"""Batch-norm folding: merge each BatchNorm2d into the convolution before it, as deployment does.

After `fold_batchnorm(module)` the network holds plain convolutions with a bias and no batch norm at all, so
(1) the compressed file stores convolutions only (depthwise and pointwise ones included) and (2) fine-tuning with
tiny batches can never update, or be skewed by, batch statistics. In eval mode the folded network computes the
same function as the original up to float rounding.

A BatchNorm is folded when it is the sibling registered right after a Conv2d (``conv, bn`` in the parent's
``_modules`` order). That is how torchvision and timm build their conv-bn pairs (e.g. timm's ``InvertedResidual``:
``conv_pw, bn1, conv_dw, bn2, aa, se, conv_pwl, bn3``); a BatchNorm anywhere else raises `FoldError`, so nothing
is silently left unfolded. timm's ``BatchNormAct2d`` (batch norm + dropout + activation in one module) is
replaced by its dropout/activation tail.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FoldError", "fold_batchnorm", "fold_conv_bn"]


class FoldError(ValueError):
    """A batch norm could not be folded (not right after a conv, or without running statistics)."""


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (its running statistics and affine) into ``conv`` in place; ``conv`` gains a bias if it had none.

    ``bn(conv(x)) == conv'(x)`` with ``w' = w · γ/√(σ²+ε)`` per output channel and
    ``b' = β + (b − μ) · γ/√(σ²+ε)``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise FoldError(f"{bn} has no running statistics to fold (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise FoldError(
            f"{bn} does not follow {conv}: {bn.num_features} features vs {conv.out_channels} channels"
        )
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    weight = conv.weight.float() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else shift + conv.bias.float() * scale
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))


def _bn_tail(bn: nn.BatchNorm2d) -> nn.Module:
    # timm's BatchNormAct2d applies bn -> drop -> act; after folding only drop -> act is left.
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    parts = [m for m in parts if not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm2d of ``module`` into the Conv2d before it, in place; returns how many were folded.

    Raises `FoldError` (leaving the module partly folded) for a BatchNorm that does not directly follow a conv.
    """
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            prev = children[i - 1][1] if i > 0 else None
            if not isinstance(prev, nn.Conv2d):
                raise FoldError(
                    f"batch norm {name!r} in {type(parent).__name__} does not directly follow a Conv2d; "
                    "cannot fold it"
                )
            fold_conv_bn(prev, child)
            setattr(parent, name, _bn_tail(child))
            folded += 1
    return folded
