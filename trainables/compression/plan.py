"""The compression plan: which layer groups are pruned and quantized how, and how long each stage trains.

A plan is plain data (``to_dict`` is JSON-able, ``from_dict`` reads it back) and is checked when built: every
``PlanError`` names the key, the bad value and what is allowed, so a wrong search-space entry fails before a trial
spends time. Layer groups are names (``conv``, ``netvlad``, ``whitening``, ``fc``...) mapped to module names by the
caller; ``validate(available_groups)`` checks the plan's groups against them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from trainables.contract import (
    DENSE_FLOAT_DTYPES,
    MAX_BITS,
    MAX_KMEANS_RATE,
    PRUNE_MODES,
    QUANT_MODES,
    SCALE_MODES,
)


class PlanError(ValueError):
    """A compression plan that cannot run; the message names the key, the value and what is allowed."""


def _fail(source: str, key: str, value: Any, allowed: str) -> PlanError:
    return PlanError(f"{source}: {key} = {value!r} is not allowed; {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_number(source: str, key: str, v: Any, *, minimum: float = 0.0) -> None:
    if not _is_number(v) or v != v or v in (float("inf"), float("-inf")):
        raise _fail(source, key, v, f"expected a finite number >= {minimum:g}")
    if v < minimum:
        raise _fail(source, key, v, f"it must be >= {minimum:g}")


def _check_int(source: str, key: str, v: Any, *, minimum: int = 0, maximum: int | None = None) -> None:
    span = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
    if not _is_int(v):
        raise _fail(source, key, v, f"expected an integer {span}")
    if v < minimum or (maximum is not None and v > maximum):
        raise _fail(source, key, v, f"it must be an integer {span}")


def _check_choice(source: str, key: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise _fail(source, key, v, f"choose one of {', '.join(repr(c) for c in choices)}")


def _check_keys(source: str, where: str, d: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise PlanError(
            f"{source}: unknown key(s) {', '.join(repr(f'{where}{k}') for k in unknown)}; "
            f"allowed keys{' in ' + where.rstrip('.') if where else ''}: {', '.join(allowed)}"
        )


@dataclass
class GroupPlan:
    """How one layer group is compressed.

    ``prune``: ``"abs"`` (drop |w| < threshold), ``"sigma"`` (drop |w| < threshold·std of the layer) or ``"none"``.
    ``quant``: ``"uniform"`` (2^bits linear levels), ``"kmeans"`` (2^bits trained shared values) or ``"none"``.
    ``scale``: ``"layer"`` (one codebook per layer) or ``"channel"`` (``kmeans`` only: the codebook is shared over
    each output channel divided by its own scale; `quantize.quantize_module`).
    ``kmeans_rate``: 0 (Lloyd) or > 0 (``kmeans`` only: entropy-constrained k-means, which trades squared error
    for index entropy at that rate; `kmeans1d.kmeans_1d`).
    """

    prune: str = "abs"
    threshold: float = 0.0
    quant: str = "kmeans"
    bits: int = 8
    scale: str = "layer"
    kmeans_rate: float = 0.0

    def __post_init__(self) -> None:
        self.check("GroupPlan")

    def check(self, source: str, prefix: str = "") -> None:
        """Raise ``PlanError`` (keys shown as ``prefix + name``) unless every field is allowed."""
        _check_choice(source, f"{prefix}prune", self.prune, PRUNE_MODES)
        _check_number(source, f"{prefix}threshold", self.threshold)
        _check_choice(source, f"{prefix}quant", self.quant, QUANT_MODES)
        _check_int(source, f"{prefix}bits", self.bits, minimum=1, maximum=MAX_BITS)
        _check_choice(source, f"{prefix}scale", self.scale, SCALE_MODES)
        if self.scale == "channel" and self.quant == "uniform":
            raise PlanError(
                f"{source}: {prefix}scale = 'channel' with {prefix}quant = 'uniform' is not supported; "
                "per-channel scales need quant 'kmeans' (or use scale 'layer' with 'uniform')"
            )
        _check_number(source, f"{prefix}kmeans_rate", self.kmeans_rate)
        if self.kmeans_rate > MAX_KMEANS_RATE:
            raise _fail(
                source, f"{prefix}kmeans_rate", self.kmeans_rate, f"it must be <= {MAX_KMEANS_RATE:g}"
            )
        if self.kmeans_rate > 0 and self.quant != "kmeans":
            raise PlanError(
                f"{source}: {prefix}kmeans_rate = {self.kmeans_rate!r} with {prefix}quant = {self.quant!r} is not "
                "supported; an entropy-constrained codebook needs quant 'kmeans' (or use kmeans_rate 0)"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan", prefix: str = "") -> GroupPlan:
        if not isinstance(d, Mapping):
            raise _fail(
                source,
                prefix.rstrip(".") or "group",
                d,
                "expected a mapping of prune/threshold/quant/bits/scale/kmeans_rate",
            )
        _check_keys(source, prefix, d, [f.name for f in fields(cls)])
        plan = cls.__new__(cls)
        for f in fields(cls):
            setattr(plan, f.name, d.get(f.name, f.default))
        plan.check(source, prefix)
        plan.threshold = float(plan.threshold)
        plan.kmeans_rate = float(plan.kmeans_rate)
        return plan

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prune": self.prune,
            "threshold": float(self.threshold),
            "quant": self.quant,
            "bits": int(self.bits),
        }
        # Only when set: a layer-scaled plan (and the artifact header that stores it) reads as before the key.
        if self.scale != SCALE_MODES[0]:
            out["scale"] = self.scale
        if self.kmeans_rate:
            out["kmeans_rate"] = float(self.kmeans_rate)
        return out


@dataclass
class CompressionPlan:
    """The whole schedule. ``groups``: group name → ``GroupPlan`` (groups not named are left alone).

    Stage steps (``l1_steps``, ``retrain_steps`` per prune round, ``quant_steps``) are passed to the user's train
    function; 0 skips the training. ``l1_lambda`` weighs λ·Σ|w| during the ``l1_steps``. ``prune_rounds`` prune →
    retrain rounds. ``kmeans_iters``: Lloyd iterations before the centroids are trained. ``allow_empty_layer``:
    accept a threshold that prunes a whole layer. ``keep_frozen``: leave layers that arrive frozen frozen (their
    weights, masks and codebooks are then compressed but never retrained); by default every compressed layer is
    retrained, as in Deep Compression. ``bias_dtype``: ``float16`` rounds the biases of the quantized groups' layers
    to float16 values after the quantize stage's training (`schedule.quantize_and_finetune`), which the file then
    stores in 2 bytes each (``float32``: left as they are). ``centroids_dtype``: the same for every module's
    ``centroids`` parameter (the NetVLAD cluster centres; `schedule.round_centroids`).
    """

    groups: dict[str, GroupPlan] = field(default_factory=dict)
    l1_lambda: float = 0.0
    l1_steps: int = 0
    prune_rounds: int = 1
    retrain_steps: int = 0
    quant_steps: int = 0
    kmeans_iters: int = 30
    allow_empty_layer: bool = False
    keep_frozen: bool = False
    bias_dtype: str = "float32"
    centroids_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.check("CompressionPlan")

    def check(self, source: str) -> None:
        """Raise ``PlanError`` unless every field is allowed (group names are checked by ``validate``)."""
        if not isinstance(self.groups, Mapping):
            raise _fail(source, "groups", self.groups, "expected a mapping of group name -> group plan")
        for name, g in self.groups.items():
            if not isinstance(name, str) or not name:
                raise _fail(source, "groups", name, "group names must be non-empty strings")
            if not isinstance(g, GroupPlan):
                raise _fail(source, f"groups.{name}", g, "expected a GroupPlan (or a mapping, via from_dict)")
            g.check(source, f"groups.{name}.")
        _check_number(source, "l1_lambda", self.l1_lambda)
        _check_int(source, "l1_steps", self.l1_steps)
        _check_int(source, "prune_rounds", self.prune_rounds, minimum=1)
        _check_int(source, "retrain_steps", self.retrain_steps)
        _check_int(source, "quant_steps", self.quant_steps)
        _check_int(source, "kmeans_iters", self.kmeans_iters)
        _check_choice(source, "bias_dtype", self.bias_dtype, DENSE_FLOAT_DTYPES)
        _check_choice(source, "centroids_dtype", self.centroids_dtype, DENSE_FLOAT_DTYPES)
        for flag in ("allow_empty_layer", "keep_frozen"):
            if not isinstance(getattr(self, flag), bool):
                raise _fail(source, flag, getattr(self, flag), "expected true or false")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan") -> CompressionPlan:
        """Build and check a plan from plain data (e.g. a trial config); ``source`` names it in errors."""
        if not isinstance(d, Mapping):
            raise PlanError(f"{source}: a compression plan must be a mapping, got {type(d).__name__}")
        _check_keys(source, "", d, [f.name for f in fields(cls)])
        groups_in = d.get("groups", {})
        if not isinstance(groups_in, Mapping):
            raise _fail(source, "groups", groups_in, "expected a mapping of group name -> group plan")
        groups = {
            name: GroupPlan.from_dict(g, source, prefix=f"groups.{name}.") for name, g in groups_in.items()
        }
        plan = cls.__new__(cls)
        for f in fields(cls):
            if f.name == "groups":
                plan.groups = groups
            else:
                setattr(plan, f.name, d.get(f.name, f.default))
        plan.check(source)
        plan.l1_lambda = float(plan.l1_lambda)
        return plan

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``CompressionPlan.from_dict(plan.to_dict()) == plan``."""
        return {
            "groups": {name: g.to_dict() for name, g in self.groups.items()},
            "l1_lambda": float(self.l1_lambda),
            "l1_steps": int(self.l1_steps),
            "prune_rounds": int(self.prune_rounds),
            "retrain_steps": int(self.retrain_steps),
            "quant_steps": int(self.quant_steps),
            "kmeans_iters": int(self.kmeans_iters),
            "allow_empty_layer": bool(self.allow_empty_layer),
            "keep_frozen": bool(self.keep_frozen),
            "bias_dtype": str(self.bias_dtype),
            "centroids_dtype": str(self.centroids_dtype),
        }

    def validate(self, available_groups: Iterable[str], source: str = "plan") -> CompressionPlan:
        """Check the fields and that every group of the plan is one of ``available_groups``; returns self."""
        self.check(source)
        available = list(available_groups)
        for name in self.groups:
            if name not in available:
                raise _fail(
                    source,
                    "groups",
                    name,
                    f"unknown layer group; available groups: {', '.join(available) or '(none)'}",
                )
        return self


def default_groups(model: nn.Module) -> dict[str, list[str]]:
    """Layer groups of ``model``: its own ``compression_groups()`` when it has one, else by type: ``conv`` (every
    convolution) and ``fc`` (every ``nn.Linear``); empty groups are left out."""
    own = getattr(model, "compression_groups", None)
    if callable(own):
        return {name: list(modules) for name, modules in own().items()}
    conv = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    fc = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {name: mods for name, mods in (("conv", conv), ("fc", fc)) if mods}


def group_layers(
    model: nn.Module, groups: Mapping[str, Iterable[str]], names: Iterable[str] | None = None
) -> list[tuple[str, str, nn.Module]]:
    """``(group, module name, module)`` for every layer of the groups in ``names`` (default: all groups). Raises
    ``PlanError`` for a group not in ``groups``, a module name the model lacks, a module without a ``weight``, or a
    module listed in two groups (it would be compressed twice)."""
    wanted = list(groups) if names is None else list(names)
    out: list[tuple[str, str, nn.Module]] = []
    seen: dict[str, str] = {}
    for group in wanted:
        if group not in groups:
            raise _fail("layer groups", "group", group, f"available groups: {', '.join(groups) or '(none)'}")
        for name in groups[group]:
            if name in seen:
                raise PlanError(
                    f"layer groups: module {name!r} is in both group {seen[name]!r} and {group!r}"
                )
            seen[name] = group
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise PlanError(
                    f"layer groups: group {group!r} names module {name!r}, which {type(model).__name__} does not have"
                ) from None
            if not (hasattr(module, "weight") or hasattr(module, "weight_orig")):
                raise PlanError(
                    f"layer groups: module {name!r} of group {group!r} has no 'weight' to compress"
                )
            out.append((group, name, module))
    return out
