"""Per-layer magnitude pruning with masks held by ``torch.nn.utils.prune``, and sparsity reports.

Two threshold modes per layer group: ``abs`` drops |w| < t (the poster), ``sigma`` drops |w| < s·std of the layer's
kept weights (Deep Compression). The mask lives in ``torch.nn.utils.prune`` (``weight_orig`` × ``weight_mask`` in a
forward pre-hook), so any optimizer -- momentum and weight decay included -- can retrain the layer while its
effective weight stays exactly 0 where pruned: the masked entries get a zero gradient, and ``weight_orig`` is zeroed
there too so decay and momentum have nothing to move. Pruning again (iterative rounds) intersects the new mask with
the old one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from trainables.compression.plan import CompressionPlan, PlanError, group_layers
from trainables.compression.quantize import effective_weight, prune_mask, quantized_view


def layer_threshold(
    weight: torch.Tensor, mode: str, threshold: float, mask: torch.Tensor | None = None
) -> float:
    """The absolute magnitude threshold of one layer: ``threshold`` for ``abs``; ``threshold``·std of the kept
    weights (all when ``mask`` is None) for ``sigma``; 0 for ``none``."""
    if mode == "abs":
        return float(threshold)
    if mode == "sigma":
        kept = weight.detach() if mask is None else weight.detach()[mask]
        return float(threshold) * (float(kept.double().std()) if kept.numel() > 1 else 0.0)
    if mode == "none":
        return 0.0
    raise ValueError(f"prune mode {mode!r} is not one of 'abs', 'sigma', 'none'")


def apply_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Hold ``mask`` (bool, True = kept) on ``module.weight`` through ``torch.nn.utils.prune``, replacing any earlier
    prune mask, and zero the underlying weight where it is pruned."""
    if quantized_view(module) is not None:
        raise ValueError(
            f"{type(module).__name__}.weight is already quantized; masks go on before quantization"
        )
    if prune_mask(module) is not None:
        torch_prune.remove(module, "weight")
    weight = module.weight
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    with torch.no_grad():
        weight.masked_fill_(~mask, 0.0)
    torch_prune.custom_from_mask(module, "weight", mask)


def prune_layers(
    model: nn.Module,
    plan: CompressionPlan,
    groups: Mapping[str, Iterable[str]],
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """One pruning round over the plan's groups (groups with ``prune="none"`` are skipped).

    ``thresholds`` (module name → absolute threshold) fixes the thresholds, e.g. those returned by the first round,
    so later rounds prune at the same threshold on the retrained weights; layers missing from it get theirs from the
    plan. Every layer is checked before any is changed: a threshold that would prune a whole layer raises
    ``PlanError`` (naming the layer and its max |w|) unless ``plan.allow_empty_layer``. Returns the absolute
    thresholds used, by module name."""
    thresholds = dict(thresholds or {})
    todo: list[tuple[str, nn.Module, torch.Tensor, float]] = []
    for group, name, module in group_layers(model, groups, plan.groups):
        gp = plan.groups[group]
        if gp.prune == "none":
            continue
        w = effective_weight(module).detach()
        old = prune_mask(module)
        t = thresholds.get(name)
        if t is None:
            t = layer_threshold(w, gp.prune, gp.threshold, old)
        keep = w.abs() >= t
        if old is not None:
            keep &= old
        if not plan.allow_empty_layer and w.numel() > 0 and not bool(keep.any()):
            max_abs = float(w.abs().max())
            how = f"{gp.threshold}·std = {t:.6g}" if gp.prune == "sigma" else f"{t:.6g}"
            raise PlanError(
                f"groups.{group}.threshold = {gp.threshold!r} ({gp.prune}) would prune every weight of layer "
                f"{name!r}: threshold {how} >= its max |w| = {max_abs:.6g}; use a smaller threshold or set "
                "allow_empty_layer: true"
            )
        todo.append((name, module, keep, t))
    for _, module, keep, _ in todo:
        apply_mask(module, keep)
    return {name: t for name, _, _, t in todo}


def sparsity_report(model: nn.Module, groups: Mapping[str, Iterable[str]]) -> dict[str, Any]:
    """Per-layer and total parameters / nonzeros / sparsity of the effective weights of the groups' layers:
    ``{"layers": [{"group", "layer", "params", "nonzeros", "sparsity"}], "params", "nonzeros", "sparsity"}``."""
    rows = []
    with torch.no_grad():
        for group, name, module in group_layers(model, groups):
            w = effective_weight(module)
            params, nonzeros = w.numel(), int(torch.count_nonzero(w))
            rows.append(
                {
                    "group": group,
                    "layer": name,
                    "params": params,
                    "nonzeros": nonzeros,
                    "sparsity": 1.0 - nonzeros / params if params else 0.0,
                }
            )
    params = sum(r["params"] for r in rows)
    nonzeros = sum(r["nonzeros"] for r in rows)
    return {
        "layers": rows,
        "params": params,
        "nonzeros": nonzeros,
        "sparsity": 1.0 - nonzeros / params if params else 0.0,
    }
