"""The compression schedule as stage functions: sparsify (L1) → prune and retrain → quantize and fine-tune.

Each stage can run alone, so a trial can checkpoint between them (``export_masks`` / ``apply_masks`` and
``dense_state_dict`` turn a pruned, not yet quantized model into plain tensors and back). Training is the caller's:
``train_fn(model, steps, extra_loss) -> list[float]`` (losses) runs ``steps`` optimizer steps on the model, adding
``extra_loss()`` to each step's loss when it is given; it is never called with ``steps == 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from trainables.compression.l1 import l1_penalty
from trainables.compression.plan import CompressionPlan, PlanError, group_layers
from trainables.compression.prune import apply_mask, prune_layers, sparsity_report
from trainables.compression.quantize import (
    effective_weight,
    is_pruned,
    is_quantized,
    prune_mask,
    quantize_module,
)

TrainFn = Callable[[nn.Module, int, Callable[[], torch.Tensor] | None], list[float]]


def _plan_groups(
    model: nn.Module, plan: CompressionPlan, groups: Mapping[str, Iterable[str]]
) -> dict[str, list[str]]:
    """The plan's groups, checked; every layer in them is made trainable, since a layer that is compressed must
    be retrained (a backbone may arrive with its early convs frozen for the base fine-tune)."""
    plan.validate(groups)
    mine = {name: list(groups[name]) for name in plan.groups}
    if not plan.keep_frozen:
        for _, _, module in group_layers(model, mine):
            module.requires_grad_(True)
    return mine


def _train(
    train_fn: TrainFn, model: nn.Module, steps: int, extra: Callable[[], torch.Tensor] | None
) -> list[float]:
    return [float(x) for x in train_fn(model, steps, extra)] if steps > 0 else []


def sparsify(
    model: nn.Module, plan: CompressionPlan, groups: Mapping[str, Iterable[str]], train_fn: TrainFn
) -> dict[str, Any]:
    """Stage 2: ``plan.l1_steps`` of training with ``plan.l1_lambda``·Σ|w| over the plan's layers added to the loss
    (with λ = 0 the steps still run, without the term, so trials that differ only in λ train equally long)."""
    mine = _plan_groups(model, plan, groups)
    extra = l1_penalty(model, mine, plan.l1_lambda) if plan.l1_lambda > 0 else None
    losses = _train(train_fn, model, plan.l1_steps, extra)
    return {"losses": losses, "sparsity": sparsity_report(model, mine)}


def prune_and_retrain(
    model: nn.Module, plan: CompressionPlan, groups: Mapping[str, Iterable[str]], train_fn: TrainFn
) -> dict[str, Any]:
    """Stage 3: ``plan.prune_rounds`` × (prune at each layer's threshold, retrain ``plan.retrain_steps`` with the
    masks held). Later rounds reuse the first round's absolute thresholds (``sigma`` is resolved once) on the
    retrained weights, and the masks accumulate."""
    mine = _plan_groups(model, plan, groups)
    thresholds: dict[str, float] = {}
    rounds = []
    for _ in range(plan.prune_rounds):
        thresholds.update(prune_layers(model, plan, mine, thresholds))
        after_prune = sparsity_report(model, mine)["sparsity"]
        losses = _train(train_fn, model, plan.retrain_steps, None)
        rounds.append({"sparsity": after_prune, "losses": losses})
    return {"thresholds": thresholds, "rounds": rounds, "sparsity": sparsity_report(model, mine)}


def quantize_and_finetune(
    model: nn.Module, plan: CompressionPlan, groups: Mapping[str, Iterable[str]], train_fn: TrainFn
) -> dict[str, Any]:
    """Stage 4: quantize every layer of the groups with ``quant != "none"`` at the group's bits (a layer's prune
    mask is kept), then fine-tune ``plan.quant_steps`` (trained centroids / straight-through latent weights)."""
    mine = _plan_groups(model, plan, groups)
    layers = []
    for group, name, module in group_layers(model, mine):
        gp = plan.groups[group]
        if gp.quant == "none":
            continue
        row = quantize_module(
            module,
            gp.quant,
            gp.bits,
            kmeans_iters=plan.kmeans_iters,
            scale=gp.scale,
            kmeans_rate=gp.kmeans_rate,
        )
        layers.append({"group": group, "layer": name, **row})
    losses = _train(train_fn, model, plan.quant_steps, None)
    rounded = round_biases(model, plan, mine) if plan.bias_dtype == "float16" else []
    centroids = round_centroids(model) if plan.centroids_dtype == "float16" else []
    return {
        "layers": layers,
        "losses": losses,
        "sparsity": sparsity_report(model, mine),
        "float16_biases": rounded,
        "float16_centroids": centroids,
    }


_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def round_biases(model: nn.Module, plan: CompressionPlan, groups: Mapping[str, Iterable[str]]) -> list[str]:
    """Round the biases of every quantized group's layers to float16 values (kept as float32 tensors: the model
    computes as before, and `codec.save_compressed` stores a float32 tensor whose values are all float16 in 2
    bytes each, decoding it exactly). Returns the layers whose bias was rounded."""
    rounded = []
    with torch.no_grad():
        for group, name, module in group_layers(model, groups):
            if plan.groups[group].quant != "none" and _round_to_float16(getattr(module, "bias", None)):
                rounded.append(name)
    return rounded


def round_centroids(model: nn.Module) -> list[str]:
    """Round every module's float ``centroids`` parameter (the NetVLAD layer's cluster centres, which ship dense)
    to float16 values, as `round_biases` does for biases; returns the modules rounded."""
    with torch.no_grad():
        return [
            name
            for name, module in model.named_modules()
            if _round_to_float16(getattr(module, "centroids", None))
        ]


def _round_to_float16(value: object) -> bool:
    """Round ``value`` in place to float16 values when it is a float tensor whose every value fits in float16 (a
    larger one would become inf: left as it is); whether it was rounded. Call under ``torch.no_grad()``."""
    if (
        not isinstance(value, torch.Tensor)
        or not value.is_floating_point()
        or bool((value.abs() > _FLOAT16_MAX).any())
    ):
        return False
    value.copy_(value.to(torch.float16).to(value.dtype))
    return True


def compress_model(
    model: nn.Module, plan: CompressionPlan, groups: Mapping[str, Iterable[str]], train_fn: TrainFn
) -> dict[str, Any]:
    """All stages in order on ``model`` (in place): ``{"sparsify": ..., "prune": ..., "quantize": ...}``, each the
    report of its stage function."""
    plan.validate(groups)  # before any stage changes the model
    return {
        "sparsify": sparsify(model, plan, groups, train_fn),
        "prune": prune_and_retrain(model, plan, groups, train_fn),
        "quantize": quantize_and_finetune(model, plan, groups, train_fn),
    }


def export_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prune masks of a pruned, not yet quantized model, by module name (bool, True = kept), e.g. for a
    safetensors checkpoint beside ``dense_state_dict(model)``."""
    return {name: mask.cpu() for name, m in model.named_modules() if (mask := prune_mask(m)) is not None}


def apply_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], groups: Mapping[str, Iterable[str]]
) -> None:
    """Put ``export_masks`` output back on a model holding the (dense) pruned weights; every name must be a layer of
    ``groups``. Pruned entries of the weights are set to 0."""
    known = {name for _, name, _ in group_layers(model, groups)}
    for name, mask in masks.items():
        if name not in known:
            raise PlanError(
                f"mask for module {name!r}, which is in no layer group; layers in the groups: {', '.join(sorted(known))}"
            )
        apply_mask(model.get_submodule(name), mask.bool())


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every pruned or quantized weight replaced by its effective dense weight under the
    plain key ``<module>.weight`` (no ``weight_orig`` / ``weight_mask`` / ``parametrizations`` keys), so it loads
    into an uncompressed model of the same architecture."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not (is_pruned(module) or is_quantized(module)):
            continue
        prefix = f"{name}." if name else ""
        for key in list(state):
            if key in (f"{prefix}weight_orig", f"{prefix}weight_mask") or key.startswith(
                f"{prefix}parametrizations.weight."
            ):
                del state[key]
        with torch.no_grad():
            state[f"{prefix}weight"] = effective_weight(module).detach().clone()
    return state
