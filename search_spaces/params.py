"""The trial's parameters: one table (``TRIAL_PARAMS``) of names, types, domains, defaults and help.

Everything that reads or writes a trial config agrees through this table: the search-space schema checks YAML
files against it, ``resolve_trial_config`` fills defaults and expands per-group overrides into the dict that
``trainables.compression.plan.CompressionPlan.from_dict`` takes, and the trial (``trainables/pipeline.py``) reads
its config only through ``resolve_trial_config``. This module imports nothing from ``trainables`` (leaf package);
the plan keys it writes are kept in line with ``plan.py`` by a test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: Layer groups a NetVLAD model exposes (``NetVLADModel.compression_groups()``), in canonical order.
GROUPS: tuple[str, ...] = ("conv", "netvlad", "whitening")
PRUNE_MODES: tuple[str, ...] = ("abs", "sigma", "none")
QUANT_MODES: tuple[str, ...] = ("uniform", "kmeans", "none")
MAX_BITS = 16


class TrialConfigError(ValueError):
    """A trial parameter with a value it cannot take; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str, source: str = "trial config"):
        self.key, self.value, self.allowed, self.source = key, value, allowed, source
        super().__init__(f"{source}: {key} = {value!r} is not allowed; {allowed}")


def _check_groups(value: str) -> str | None:
    """``groups`` is a comma-separated, non-empty subset of ``GROUPS``; returns an error text or None."""
    names = [p.strip() for p in value.split(",")]
    if not value.strip() or any(not n for n in names):
        return "a comma-separated, non-empty list of layer groups"
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        return f"unknown group {', '.join(map(repr, unknown))}"
    if len(set(names)) != len(names):
        return "each group at most once"
    return None


def _canonical_groups(value: str) -> str:
    wanted = {p.strip() for p in value.split(",")}
    return ",".join(g for g in GROUPS if g in wanted)


@dataclass(frozen=True)
class ParamSpec:
    """One trial parameter.

    ``type``: ``float``, ``int``, ``str`` or ``bool``. Numeric domain: ``low``/``high`` inclusive (``None`` =
    unbounded), ``low_open`` makes ``low`` exclusive (``lr > 0``). ``choices``: the allowed values of a ``str``
    parameter. ``default`` ``None`` on a per-group override means "inherit the global parameter".
    """

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[Any, ...] | None = None
    check_str: Callable[[str], str | None] | None = None
    inherits: str | None = None  # per-group override of this global parameter

    def domain(self) -> str:
        """What values are allowed, in words (used in every error message)."""
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return f"a comma-separated subset of {', '.join(GROUPS)}" if self.name == "groups" else "a string"
        kind = "an integer" if self.type is int else "a number"
        lo = None if self.low is None else (f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        if self.low is not None and self.high is not None and not self.low_open:
            return f"{kind} in {self.low:g}..{self.high:g}"
        parts = [p for p in (lo, None if self.high is None else f"<= {self.high:g}") if p]
        return f"{kind} {' and '.join(parts)}" if parts else kind

    def check(self, value: Any, source: str = "trial config", key: str | None = None) -> Any:
        """Return ``value`` coerced to the parameter's type, or raise ``TrialConfigError``."""
        key = key or self.name
        if value is None and self.inherits is not None:
            return None
        fail = TrialConfigError(key, value, f"expected {self.domain()}", source)
        if self.type is bool:
            if not isinstance(value, bool):
                raise fail
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise fail
            if self.choices is not None and value not in self.choices:
                raise fail
            if self.check_str is not None:
                problem = self.check_str(value)
                if problem:
                    raise TrialConfigError(key, value, f"expected {self.domain()} ({problem})", source)
                return _canonical_groups(value) if self.name == "groups" else value
            return value
        # Numbers: bool is an int in Python but never a sensible threshold or bit count.
        if isinstance(value, bool) or not _is_number(value):
            raise fail
        if self.type is int:
            if not float(value).is_integer():
                raise fail
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise fail
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise fail
        if self.high is not None and value > self.high:
            raise fail
        return value


def _is_number(value: Any) -> bool:
    # numpy scalars (as a searcher may hand out) are numbers too, without importing numpy here.
    try:
        return isinstance(value, int | float) or (hasattr(value, "dtype") and float(value) == float(value))
    except (TypeError, ValueError):
        return False


def _params() -> dict[str, ParamSpec]:
    specs = [
        ParamSpec(
            "prune_mode",
            str,
            "abs",
            "How pruning thresholds are read: 'abs' drops |w| < threshold (the poster), 'sigma' drops "
            "|w| < threshold·std(layer) (Deep Compression), 'none' keeps every weight.",
            choices=PRUNE_MODES,
        ),
        ParamSpec(
            "threshold",
            float,
            0.005,
            "Pruning threshold: absolute in 'abs' mode, the multiple s of the layer's std in 'sigma' mode.",
            low=0.0,
        ),
        *[
            ParamSpec(
                f"threshold_{g}",
                float,
                None,
                f"Pruning threshold for the {g} group (default: threshold).",
                low=0.0,
                inherits="threshold",
            )
            for g in GROUPS
        ],
        ParamSpec(
            "quant_mode",
            str,
            "kmeans",
            "Quantization: 'uniform' (2^bits linear levels), 'kmeans' (2^bits trained shared values, the "
            "poster's trained quantization) or 'none' (fp32 nonzeros).",
            choices=QUANT_MODES,
        ),
        ParamSpec("bits", int, 8, "Bits per weight index (codebook of 2^bits values).", low=1, high=MAX_BITS),
        *[
            ParamSpec(
                f"bits_{g}",
                int,
                None,
                f"Bits for the {g} group (default: bits).",
                low=1,
                high=MAX_BITS,
                inherits="bits",
            )
            for g in GROUPS
        ],
        ParamSpec(
            "l1_lambda", float, 0.0, "Weight λ of the L1 penalty λ·Σ|w| during the sparsify stage.", low=0.0
        ),
        ParamSpec("l1_steps", int, 50, "Training steps of the L1 sparsify stage (0 skips it).", low=0),
        ParamSpec("prune_rounds", int, 1, "Prune → retrain rounds.", low=1),
        ParamSpec("retrain_steps", int, 50, "Training steps with the mask held, per prune round.", low=0),
        ParamSpec(
            "quant_steps", int, 50, "Training steps of the quantized model (trained centroids).", low=0
        ),
        ParamSpec(
            "kmeans_iters", int, 30, "Lloyd iterations of the k-means codebook before training.", low=0
        ),
        ParamSpec("lr", float, 1e-4, "Learning rate of every fine-tuning stage.", low=0.0, low_open=True),
        ParamSpec(
            "groups",
            str,
            ",".join(GROUPS),
            "Layer groups that are compressed (comma-separated subset of conv, netvlad, whitening); the "
            "others stay dense fp32.",
            check_str=_check_groups,
        ),
        ParamSpec(
            "allow_empty_layer",
            bool,
            False,
            "Accept a threshold that prunes a whole layer (otherwise that trial fails with the reason).",
        ),
    ]
    return {s.name: s for s in specs}


#: Every parameter a trial reads, by name.
TRIAL_PARAMS: dict[str, ParamSpec] = _params()

#: Keys of the plan dict (``CompressionPlan.from_dict``) besides ``groups``, filled straight from the params.
PLAN_KEYS: tuple[str, ...] = (
    "l1_lambda",
    "l1_steps",
    "prune_rounds",
    "retrain_steps",
    "quant_steps",
    "kmeans_iters",
    "allow_empty_layer",
)


def trial_defaults() -> dict[str, Any]:
    """Every trial parameter at its default (per-group overrides as ``None`` = inherit)."""
    return {name: spec.default for name, spec in TRIAL_PARAMS.items()}


def resolve_params(
    config: Mapping[str, Any], source: str = "trial config", allow_extra: bool = True
) -> dict[str, Any]:
    """Every trial parameter, from ``config`` or its default, checked and coerced; per-group overrides that are
    unset take the global value. Keys that are not trial parameters are ignored (a Ray trial config also carries
    e.g. ``base_key``) unless ``allow_extra`` is False."""
    if not isinstance(config, Mapping):
        raise TrialConfigError("config", config, "expected a mapping of parameter name -> value", source)
    if not allow_extra:
        unknown = sorted(set(config) - set(TRIAL_PARAMS))
        if unknown:
            raise TrialConfigError(
                unknown[0], config[unknown[0]], f"unknown parameter; known: {', '.join(TRIAL_PARAMS)}", source
            )
    out: dict[str, Any] = {}
    for name, spec in TRIAL_PARAMS.items():
        out[name] = spec.check(config.get(name, spec.default), source)
    for name, spec in TRIAL_PARAMS.items():
        if spec.inherits is not None and out[name] is None:
            out[name] = out[spec.inherits]
    return out


def resolve_trial_config(
    config: Mapping[str, Any], source: str = "trial config", allow_extra: bool = True
) -> dict[str, Any]:
    """Turn a (partial) trial config into what the trial runs.

    Returns ``{"plan": ..., "lr": float, "params": {...}}``: ``plan`` is exactly the dict form
    ``CompressionPlan.from_dict`` takes (``groups`` → ``{"prune", "threshold", "quant", "bits"}`` for each
    compressed group, plus ``l1_lambda``, ``l1_steps``, ``prune_rounds``, ``retrain_steps``, ``quant_steps``,
    ``kmeans_iters``, ``allow_empty_layer``); ``lr`` sits beside it because the plan does not take it;
    ``params`` is every trial parameter after defaults (flat, for logging). Raises ``TrialConfigError``.
    """
    p = resolve_params(config, source, allow_extra)
    groups = {
        g: {
            "prune": p["prune_mode"],
            "threshold": p[f"threshold_{g}"],
            "quant": p["quant_mode"],
            "bits": p[f"bits_{g}"],
        }
        for g in p["groups"].split(",")
    }
    plan = {"groups": groups, **{k: p[k] for k in PLAN_KEYS}}
    return {"plan": plan, "lr": p["lr"], "params": p}


def describe_params() -> str:
    """A plain-text table of every parameter (name, type, default, domain, help) for ``--help`` and docs."""
    lines = []
    for spec in TRIAL_PARAMS.values():
        default = f"= {spec.inherits}" if spec.inherits else repr(spec.default)
        lines.append(f"{spec.name} ({spec.type.__name__}, default {default}; {spec.domain()}): {spec.help}")
    return "\n".join(lines)
