"""The trial contract: what a trial takes, the stages it runs, the files it leaves and the keys it reports.

Every layer that writes or reads a trial agrees through this module: the trial (``trainables/pipeline.py``)
writes it; the search-space schema, the sweep driver, MLflow tracking, release, serving, the dashboards and the
tests read it. It holds data and plain checks only (no torch, no Ray, no MLflow), so any of them can import it.

The parameter table (``TRIAL_PARAMS``) is the one list of trial parameters: ``resolve_trial_config`` fills
defaults and expands per-group overrides into the dict ``trainables.compression.plan.CompressionPlan.from_dict``
takes; the plan checks its values against the domains defined here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# ----------------------------------------------------------------------------------------------- value domains

#: Layer groups a NetVLAD model exposes (``NetVLADModel.compression_groups()``), in canonical order.
GROUPS: tuple[str, ...] = ("conv", "depthwise", "netvlad", "whitening")
#: How a pruning threshold is read (``trainables.compression.plan.GroupPlan.prune``).
PRUNE_MODES: tuple[str, ...] = ("abs", "sigma", "none")
#: How a group's weights are quantized (``GroupPlan.quant``).
QUANT_MODES: tuple[str, ...] = ("uniform", "kmeans", "none")
#: How a quantized layer's codebook is scaled (``GroupPlan.scale``): ``layer`` (one codebook for the raw weights)
#: or ``channel`` (k-means only: one shared codebook over each output channel divided by its own scale, a float16 value).
SCALE_MODES: tuple[str, ...] = ("layer", "channel")
#: The dtypes a float tensor that ships unquantized may be rounded to (``CompressionPlan.bias_dtype`` for the
#: biases of a quantized group's layers, ``centroids_dtype`` for the NetVLAD cluster centres): ``float16`` rounds
#: it once training is done, so the file stores it in half the bytes and decodes it exactly.
DENSE_FLOAT_DTYPES: tuple[str, ...] = ("float32", "float16")
#: Most bits per weight index (a codebook of 2^16 values).
MAX_BITS = 16
#: Largest entropy-constrained k-means rate (squared error per bit of index entropy, in units of the largest
#: squared weight): at 1 a bit is worth the whole range, so every weight lands on one centroid.
MAX_KMEANS_RATE = 1.0

# ------------------------------------------------------------------------------------------------- the stages

#: The trial's stages in the order they run; each ends with a report carrying a checkpoint, and the report's
#: ``stage`` key is the name of the stage that just ended (the last one, ``evaluate``, carries the objectives).
STAGES: tuple[str, ...] = ("sparsify", "prune", "quantize", "evaluate")
FINAL_STAGE: str = STAGES[-1]

# --------------------------------------------------------------------------------------- the files a trial leaves

#: The compressed model: the file that ships, whose size is ``memory_mib``.
ARTIFACT_FILE = "model.vlad.safetensors"
#: Per-layer size report of the artifact (``SizeReport.to_dict()``), and its Markdown and HTML views.
LAYERS_JSON = "layers.json"
LAYERS_MD = "layers.md"
LAYERS_HTML = "layers.html"
#: Checkpoint contents between stages: the trial's progress and the weights (+ prune masks) of the last stage.
STATE_FILE = "trial_state.json"
WEIGHTS_FILE = "weights.safetensors"
#: The files of the final checkpoint, all of which a front member's MLflow run carries.
RESULT_FILES: tuple[str, ...] = (ARTIFACT_FILE, LAYERS_JSON, LAYERS_MD)

# ------------------------------------------------------------------------------------------ what a trial reports

#: Every protocol has validation and test splits. What the search optimizes is measured on the validation
#: splits only; the test splits are measured beside it, for the user, and never seen by the search.
VAL_MAP_KEY = "val_mAP"
TEST_MAP_KEY = "test_mAP"
#: The objectives the search optimizes and the front is drawn on: name -> "max" | "min".
OBJECTIVES: dict[str, str] = {VAL_MAP_KEY: "max", "memory_mib": "min"}
#: The mAP of the objectives (mean over the validation splits, of the model decoded from the file that ships).
MAP_KEY = VAL_MAP_KEY
MEMORY_KEY = "memory_mib"
#: Further keys of the final report: relative mAP drops against the dense base on the same splits, dense fp32
#: bytes / file bytes, the fraction of zero weights in the compressed groups, the poster's way of counting size,
#: and per-stage seconds.
DROP_KEY = "val_mAP_drop"
TEST_DROP_KEY = "test_mAP_drop"
RATIO_KEY = "compression_ratio"
SPARSITY_KEY = "sparsity"
POSTER_MIB_KEY = "poster_style_mib"
STAGE_KEY = "stage"
#: The whitening dimension of the file that ships (the trial's ``whitening_dim``, or the base's when unset);
#: absent when the base has no whitening.
WHITENING_DIM_KEY = "whitening_dim"
#: Where a report was made: the Ray node, the GPUs Ray gave the trial, the device torch used.
PLACEMENT_KEYS: tuple[str, ...] = ("node_id", "gpu_ids", "device")
#: The early-stopping signal (docs/early-stopping.md): only when the sweep asks for it
#: (``context["early_signal"]``), the report of ``EARLY_STAGE`` also carries ``early_memory_mib``, the
#: *projected* size of the file that would ship — a copy of the pruned model quantized with the trial's codebooks
#: before their fine-tune, written with the real codec and measured; a projection, not a bound, since the
#: fine-tune may still move it — and ``early_val_mAP``, the pruned, not yet quantized model's mAP on the
#: validation splits (never test).
EARLY_STAGE: str = "prune"
EARLY_MEMORY_KEY = "early_memory_mib"
EARLY_MAP_KEY = "early_val_mAP"
#: Each objective's early projection.
EARLY_OBJECTIVES: dict[str, str] = {VAL_MAP_KEY: EARLY_MAP_KEY, MEMORY_KEY: EARLY_MEMORY_KEY}
#: Why a trial was stopped early: written into its last result by the sweep's scheduler
#: (`sweep/early_stop_scheduler.py`), never by the trial; a result carrying it is no point and no failure.
EARLY_STOP_REASON_KEY = "early_stop_reason"

#: Baselines every front is read against, as mAP per split (the base's meta ``baselines``): the ones that need
#: no model bytes at all (a random ranking, 16x16 thumbnails, a colour histogram), and the network before any
#: fine-tuning.
ZERO_BYTE_BASELINES: tuple[str, ...] = ("random", "thumbnails", "histogram")
BASELINES: tuple[str, ...] = (*ZERO_BYTE_BASELINES, "off_the_shelf")


def best_zero_byte_baseline(
    baselines: Mapping[str, Mapping[str, float]], splits: list[str] | tuple[str, ...]
) -> tuple[str, float]:
    """``(name, mAP)`` of the best zero-byte baseline, its mAP averaged over ``splits``; ``baselines`` is the base
    meta's ``{split: {baseline: mAP}}``. A compressed model below it is worth nothing: no bytes do better."""
    scores = {
        name: sum(float(baselines[split][name]) for split in splits) / len(splits)
        for name in ZERO_BYTE_BASELINES
    }
    best = max(scores, key=lambda name: scores[name])
    return best, scores[best]


def baseline_metric(name: str, split: str) -> str:
    """The parent run's metric name of one baseline on one split."""
    return f"baseline_{name}_{split}"


def seconds_key(stage: str) -> str:
    """The report key of a stage's wall seconds (``seconds_trial`` for the sum)."""
    return f"seconds_{stage}"


def map_key(split: str) -> str:
    """The report key of the mAP on one split, ``mAP_<split>`` (``val_mAP`` / ``test_mAP`` are the means over a
    protocol's validation / test splits; a per-split key names no role, so a test split never reads as ``val_``)."""
    return f"mAP_{split}"


# --------------------------------------------------------------------------------------- the trial's parameters


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
    parameter. ``default`` ``None`` on a per-group override means "inherit the global parameter"; on an
    ``optional`` parameter, None is a value of its own ("keep the base's").
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
    optional: bool = False  # None is allowed (and is the default): the trial keeps what the base has

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
            text = f"{kind} in {self.low:g}..{self.high:g}"
        else:
            parts = [p for p in (lo, None if self.high is None else f"<= {self.high:g}") if p]
            text = f"{kind} {' and '.join(parts)}" if parts else kind
        return f"{text}, or null (the base's)" if self.optional else text

    def check(self, value: Any, source: str = "trial config", key: str | None = None) -> Any:
        """Return ``value`` coerced to the parameter's type, or raise ``TrialConfigError``."""
        key = key or self.name
        if value is None and (self.inherits is not None or self.optional):
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
            "scale",
            str,
            "layer",
            "Codebook scale of a k-means layer: 'layer' (one codebook for the raw weights) or 'channel' (the "
            "shared codebook fit to each output channel over its own scale, a float16 value stored in the file).",
            choices=SCALE_MODES,
        ),
        *[
            ParamSpec(
                f"scale_{g}",
                str,
                None,
                f"Codebook scale for the {g} group (default: scale).",
                choices=SCALE_MODES,
                inherits="scale",
            )
            for g in GROUPS
        ],
        ParamSpec(
            "kmeans_rate",
            float,
            0.0,
            "Entropy-constrained k-means: 0 is Lloyd (nearest centroid); r > 0 assigns each weight to the centroid "
            "minimizing squared error + r·m²·(bits of its index), m the largest |value| fit (1 with channel "
            "scales), so the entropy-coded indices shrink and the file is smaller at the same bits. kmeans only.",
            low=0.0,
            high=MAX_KMEANS_RATE,
        ),
        *[
            ParamSpec(
                f"kmeans_rate_{g}",
                float,
                None,
                f"Entropy-constrained k-means rate for the {g} group (default: kmeans_rate).",
                low=0.0,
                high=MAX_KMEANS_RATE,
                inherits="kmeans_rate",
            )
            for g in GROUPS
        ],
        ParamSpec(
            "bias_dtype",
            str,
            "float32",
            "The biases of the quantized groups' layers in the file: 'float32', or 'float16' (rounded after the "
            "quantize stage's training, stored in 2 bytes and decoded exactly; the mAP is the rounded model's).",
            choices=DENSE_FLOAT_DTYPES,
        ),
        ParamSpec(
            "centroids_dtype",
            str,
            "float32",
            "The NetVLAD cluster centres in the file: 'float32', or 'float16' (rounded after the quantize stage's "
            "training, stored in 2 bytes and decoded exactly; the mAP is the rounded model's).",
            choices=DENSE_FLOAT_DTYPES,
        ),
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
        ParamSpec(
            "lr",
            float,
            1e-4,
            "Step size of every retraining stage, as a fraction of each tensor's RMS (Adam with relative "
            "steps: trainables/train.py RETRAIN_RECIPE).",
            low=0.0,
            low_open=True,
        ),
        ParamSpec(
            "groups",
            str,
            ",".join(GROUPS),
            f"Layer groups that are compressed (comma-separated subset of {', '.join(GROUPS)}; depthwise is "
            "empty on backbones without depthwise convs); the others stay dense fp32.",
            check_str=_check_groups,
        ),
        ParamSpec(
            "allow_empty_layer",
            bool,
            False,
            "Accept a threshold that prunes a whole layer (otherwise that trial fails with the reason).",
        ),
        ParamSpec(
            "whitening_dim",
            int,
            None,
            "Keep the first d PCA components of the base's whitening (null: all of them); the base must have "
            "whitening of at least d. mAP drops stay relative to the dense base.",
            low=1,
            optional=True,
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
    "bias_dtype",
    "centroids_dtype",
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
    if out["quant_mode"] == "uniform":
        # Uniform levels are neither channel-scaled nor entropy-constrained (GroupPlan refuses both too):
        # refused here, before a trial.
        for g in out["groups"].split(","):
            if out[f"scale_{g}"] == "channel":
                key = f"scale_{g}" if config.get(f"scale_{g}") is not None else "scale"
                raise TrialConfigError(
                    key, "channel", "'channel' needs quant_mode 'kmeans' (with 'uniform' use 'layer')", source
                )
            if out[f"kmeans_rate_{g}"] > 0:
                key = f"kmeans_rate_{g}" if config.get(f"kmeans_rate_{g}") is not None else "kmeans_rate"
                raise TrialConfigError(
                    key,
                    out[f"kmeans_rate_{g}"],
                    "a rate > 0 needs quant_mode 'kmeans' (with 'uniform' use 0)",
                    source,
                )
    return out


def resolve_trial_config(
    config: Mapping[str, Any], source: str = "trial config", allow_extra: bool = True
) -> dict[str, Any]:
    """Turn a (partial) trial config into what the trial runs.

    Returns ``{"plan": ..., "lr": float, "params": {...}}``: ``plan`` is exactly the dict form
    ``CompressionPlan.from_dict`` takes (``groups`` → ``{"prune", "threshold", "quant", "bits"}``, plus ``"scale"``
    when it is not ``"layer"`` and ``"kmeans_rate"`` when it is not 0, for each compressed group, plus ``l1_lambda``, ``l1_steps``, ``prune_rounds``,
    ``retrain_steps``, ``quant_steps``, ``kmeans_iters``, ``allow_empty_layer``, ``bias_dtype``, ``centroids_dtype``); ``lr`` sits beside it because
    the plan does not take it; ``params`` is every trial parameter after defaults (flat, for logging). Raises
    ``TrialConfigError``.
    """
    p = resolve_params(config, source, allow_extra)
    groups = {
        g: {
            "prune": p["prune_mode"],
            "threshold": p[f"threshold_{g}"],
            "quant": p["quant_mode"],
            "bits": p[f"bits_{g}"],
            # Only when set: a layer-scaled plan is the same dict (and artifact header) as before the key existed.
            **({"scale": p[f"scale_{g}"]} if p[f"scale_{g}"] != SCALE_MODES[0] else {}),
            **({"kmeans_rate": p[f"kmeans_rate_{g}"]} if p[f"kmeans_rate_{g}"] else {}),
        }
        for g in p["groups"].split(",")
    }
    # A trial retrains every layer it compresses (no frozen-but-compressed layers): keep_frozen is never set.
    plan = {"groups": groups, **{k: p[k] for k in PLAN_KEYS}, "keep_frozen": False}
    return {"plan": plan, "lr": p["lr"], "params": p}


def describe_params() -> str:
    """A plain-text table of every parameter (name, type, default, domain, help) for ``--help`` and docs."""
    lines = []
    for spec in TRIAL_PARAMS.values():
        default = f"= {spec.inherits}" if spec.inherits else repr(spec.default)
        lines.append(f"{spec.name} ({spec.type.__name__}, default {default}; {spec.domain()}): {spec.help}")
    return "\n".join(lines)
