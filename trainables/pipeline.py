"""The Ray Tune function trainable: one trial of a compression sweep, as a loop over stage functions.

The stages (``trainables.contract.STAGES``, explained in docs/stages.md) are ``sparsify`` (L1 fine-tune) →
``prune`` (+ masked retraining) → ``quantize`` (+ trained-centroid fine-tune; the real artifact is written) →
``evaluate`` (the artifact is decoded into a fresh model and that model is measured). Each stage is a function
``(model, context) -> files to checkpoint``; after it, the trial reports with a checkpoint holding those files and
``trial_state.json``, so a retried trial resumes at the first stage not done. A non-finite loss or measurement
raises `DivergedError`, so Tune marks the trial failed (with the reason) and Optuna is told FAIL, not a point.

Checkpoint format (one folder per report):
- ``trial_state.json``: ``{"stage": <number of stages done>, "seconds": {stage: wall seconds}}`` and, once
  ``evaluate`` is done, ``"final"``: the final report (re-reported as is when a finished trial is restored).
- after ``sparsify`` / ``prune``: ``weights.safetensors``, the dense weights under their plain names and each
  pruned layer's mask as ``__mask__.<param name>`` (uint8).
- after ``quantize`` / ``evaluate``: ``model.vlad.safetensors`` (the file that ships), ``layers.json`` and
  ``layers.md`` (its per-layer size report).

This is the one module under ``trainables/`` that may import Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss  # noqa: F401  (before torch: both bring OpenMP; docs/traps.md#faiss-before-torch)
import pyarrow.fs as pafs
import ray
import torch
from ray import tune
from safetensors.torch import load_file, save_file

from trainables.base import load_base, retrain_fn, trial_miner
from trainables.compression.codec import load_compressed, save_compressed
from trainables.compression.plan import CompressionPlan
from trainables.compression.schedule import (
    TrainFn,
    apply_masks,
    dense_state_dict,
    export_masks,
    prune_and_retrain,
    quantize_and_finetune,
    sparsify,
)
from trainables.contract import (
    ARTIFACT_FILE,
    DROP_KEY,
    EARLY_MAP_KEY,
    EARLY_MEMORY_KEY,
    EARLY_STAGE,
    LAYERS_JSON,
    LAYERS_MD,
    MEMORY_KEY,
    OBJECTIVES,
    PLACEMENT_KEYS,
    POSTER_MIB_KEY,
    RATIO_KEY,
    RESULT_FILES,
    SPARSITY_KEY,
    STAGE_KEY,
    STAGES,
    STATE_FILE,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    VAL_MAP_KEY,
    WEIGHTS_FILE,
    WHITENING_DIM_KEY,
    map_key,
    resolve_trial_config,
    seconds_key,
)
from trainables.data.registry import load_dataset
from trainables.devices import loader_workers, select_device
from trainables.netvlad.model import NetVLADModel, build_netvlad
from trainables.retrieval.evaluate import evaluate_dataset
from trainables.train import DivergedError

logger = logging.getLogger("vladsweep.trial")

_MASK_PREFIX = "__mask__."


# ------------------------------------------------------------------------------------------------ the context


@dataclass
class TrialContext:
    """What every stage of one trial reads: the plan, the base's record, where to write, how to train."""

    plan: CompressionPlan
    groups: dict[str, list[str]]
    base_meta: dict[str, Any]
    data_root: str | None
    device: torch.device
    work: Path
    train_fn: TrainFn
    #: Set by the ``evaluate`` stage: the final report.
    final: dict[str, Any] = field(default_factory=dict)
    #: Parameters of the base that the trial's model no longer has (a truncated whitening, ``whitening_dim``):
    #: the compression ratio counts them, so it is always against the dense base the user has.
    removed_parameters: int = 0
    #: The sweep asks for the early-stopping signal (``context["early_signal"]``; docs/early-stopping.md).
    early_signal: bool = False
    #: Set by the ``prune`` stage when ``early_signal``: the signal, reported with that stage (`early_signal`).
    early: dict[str, Any] = field(default_factory=dict)
    #: Image-decoding processes of the trial's loaders (`trainables.devices.loader_workers` of its CPUs).
    loader_workers: int = 0

    @property
    def image_size(self) -> int:
        return int(self.base_meta["config"]["image_size"])

    @property
    def artifact(self) -> Path:
        return self.work / ARTIFACT_FILE

    @property
    def weights(self) -> Path:
        return self.work / WEIGHTS_FILE

    def result_files(self) -> list[Path]:
        return [self.work / name for name in RESULT_FILES]


# ------------------------------------------------------------------------------------------------- the stages


def save_weights(model: torch.nn.Module, path: Path, masks: dict[str, torch.Tensor] | None = None) -> Path:
    """The model's weights under their plain names, so a fresh model loads them (a pruned layer's state_dict holds
    ``weight_orig``/``weight_mask`` instead), and its prune masks beside them for ``apply_masks``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in dense_state_dict(model).items()}
    if masks:
        tensors.update({_MASK_PREFIX + k: m.to(torch.uint8).cpu().contiguous() for k, m in masks.items()})
    save_file(tensors, str(path))
    return path


def load_weights(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Load weights written by `save_weights` into a fresh model; returns the prune masks stored beside them."""
    tensors = load_file(str(path))
    masks = {k[len(_MASK_PREFIX) :]: v.bool() for k, v in tensors.items() if k.startswith(_MASK_PREFIX)}
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(_MASK_PREFIX)})
    return masks


def _restore_weights(model: torch.nn.Module, ctx: TrialContext) -> None:
    """Resume after ``sparsify`` or ``prune``: the stage's weights, with its prune masks re-applied."""
    masks = load_weights(model, ctx.weights)
    if masks:
        apply_masks(model, masks, ctx.groups)


def sparsify_stage(model: NetVLADModel, ctx: TrialContext) -> list[Path]:
    """L1-penalized fine-tune: pushes weights towards zero before the thresholds are applied."""
    sparsify(model, ctx.plan, ctx.groups, ctx.train_fn)
    return [save_weights(model, ctx.weights)]


def prune_stage(model: NetVLADModel, ctx: TrialContext) -> list[Path]:
    """Prune below each group's threshold and retrain with the masks held; measure the early-stopping signal
    into ``ctx.early`` when the sweep asks for it."""
    prune_and_retrain(model, ctx.plan, ctx.groups, ctx.train_fn)
    if ctx.early_signal:
        ctx.early = early_signal(model, ctx)
    return [save_weights(model, ctx.weights, export_masks(model))]


def early_signal(model: NetVLADModel, ctx: TrialContext) -> dict[str, float]:
    """The pruned model's projected file size and validation mAP (``EARLY_MEMORY_KEY``, ``EARLY_MAP_KEY``) and the
    seconds they took, for the sweep's early stopping (docs/early-stopping.md).

    The size is measured, never estimated: a copy of the model is quantized as the quantize stage does it, minus
    the fine-tune (its codebooks untrained), and written with the real codec to a file in the trial's work folder.
    The mAP is the pruned, not yet quantized model's on the validation splits only. The model is left as it was and
    the RNG state is restored, so a trial ends the same with the signal as without it."""
    started = time.monotonic()
    draft_path = ctx.work / f"early-{ARTIFACT_FILE}"
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # A copy the way a resumed trial rebuilds its model (a pruned module's computed weight cannot be deep-copied).
        draft = build_netvlad(model.config_dict()).to(ctx.device)
        draft.load_state_dict(dense_state_dict(model))
        apply_masks(draft, export_masks(model), ctx.groups)
        quantize_and_finetune(draft, replace(ctx.plan, quant_steps=0), ctx.groups, ctx.train_fn)
        save_compressed(draft, ctx.plan, draft_path, meta=_artifact_meta(draft, ctx))
        size = os.path.getsize(draft_path)
        draft_path.unlink()
        del draft
        splits = ctx.base_meta["val_splits"]
        maps = [split_map(model, ctx, split, "early mAP") for split in splits]
    return {
        EARLY_MEMORY_KEY: size / 2**20,
        EARLY_MAP_KEY: sum(maps) / len(maps),
        seconds_key("early_signal"): time.monotonic() - started,
    }


def _artifact_meta(model: NetVLADModel, ctx: TrialContext) -> dict[str, Any]:
    """The ``meta`` of the file a trial writes: how to rebuild the model, and the base it came from."""
    return {
        "architecture": {"name": "netvlad", "config": model.config_dict()},
        "base": ctx.base_meta["config"],
    }


def quantize_stage(model: NetVLADModel, ctx: TrialContext) -> list[Path]:
    """Quantize (uniform or trained k-means), fine-tune the centroids, and write the file that ships."""
    quantize_and_finetune(model, ctx.plan, ctx.groups, ctx.train_fn)
    report = save_compressed(model, ctx.plan, ctx.artifact, meta=_artifact_meta(model, ctx))
    (ctx.work / LAYERS_JSON).write_text(json.dumps(report.to_dict(), indent=2))
    (ctx.work / LAYERS_MD).write_text(report.to_markdown())
    return ctx.result_files()


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise DivergedError(f"{name} is {value}: the trial diverged")
    return float(value)


def split_map(model: NetVLADModel, ctx: TrialContext, split: str, what: str = "mAP") -> float:
    """``model``'s mAP on the dataset ``split``, at the trial's size, device and loader workers; `DivergedError`
    when it is not finite."""
    dataset = load_dataset(split, ctx.data_root)
    result = evaluate_dataset(
        model, dataset, ctx.image_size, device=ctx.device, num_workers=ctx.loader_workers
    )
    return _finite(f"{what} on {split}", result["mAP"])


def evaluate_stage(model: NetVLADModel, ctx: TrialContext) -> list[Path]:
    """Decode the file that ships into a fresh model and measure exactly that model on the validation splits
    (what the search sees) and the test splits (reported beside, never optimized); sets ``ctx.final``."""
    decoded = load_compressed(ctx.artifact).to(ctx.device)
    meta = ctx.base_meta
    splits = list(dict.fromkeys(meta["val_splits"] + meta["test_splits"]))
    maps = {split: split_map(decoded, ctx, split) for split in splits}
    totals = json.loads((ctx.work / LAYERS_JSON).read_text())["totals"]
    file_bytes = os.path.getsize(ctx.artifact)  # memory_mib is the file that ships, measured, never estimated

    def mean(names: list[str]) -> float:
        return sum(maps[n] for n in names) / len(names)

    def drop(value: float, base: float) -> float:
        return (base - value) / base if base > 0 else 0.0

    val_map, test_map = mean(meta["val_splits"]), mean(meta["test_splits"])
    ctx.final = {
        VAL_MAP_KEY: val_map,
        TEST_MAP_KEY: test_map,
        **{map_key(split): value for split, value in maps.items()},
        DROP_KEY: drop(val_map, float(meta[VAL_MAP_KEY])),
        TEST_DROP_KEY: drop(test_map, float(meta[TEST_MAP_KEY])),
        MEMORY_KEY: file_bytes / 2**20,
        RATIO_KEY: (totals["dense_fp32_bytes"] + 4 * ctx.removed_parameters) / file_bytes,
        SPARSITY_KEY: totals["sparsity"],
        POSTER_MIB_KEY: totals["poster_mib"],
    }
    if decoded.config.whitening_dim is not None:  # what the file that ships has, not what was asked for
        ctx.final[WHITENING_DIM_KEY] = decoded.config.whitening_dim
    for key in (*OBJECTIVES, TEST_MAP_KEY, RATIO_KEY):
        _finite(key, ctx.final[key])
    return ctx.result_files()


@dataclass(frozen=True)
class Stage:
    """One stage: ``run`` does the work and names the files to checkpoint; ``restore`` puts what the *next*
    stage needs from those files back into the model when a trial resumes after this stage."""

    name: str
    run: Callable[[NetVLADModel, TrialContext], list[Path]]
    restore: Callable[[NetVLADModel, TrialContext], None] | None


#: The stage functions, in the order of ``trainables.contract.STAGES``. After ``quantize`` the next stage reads
#: the artifact, not the model, so nothing is restored into the model.
STAGE_FUNCTIONS: tuple[Stage, ...] = (
    Stage("sparsify", sparsify_stage, _restore_weights),
    Stage("prune", prune_stage, _restore_weights),
    Stage("quantize", quantize_stage, None),
    Stage("evaluate", evaluate_stage, None),
)
assert tuple(s.name for s in STAGE_FUNCTIONS) == STAGES, "pipeline stages out of line with the contract"


# ------------------------------------------------------------------------------------ Ray: placement, checkpoints


def _trial_resources() -> tuple[float, float]:
    resources = tune.get_context().get_trial_resources()
    bundle = resources.required_resources if resources is not None else {}
    return float(bundle.get("CPU", 1)), float(bundle.get("GPU", 0))


def _placement(device: torch.device) -> dict[str, str]:
    """Where this trial runs: the node (IPs repeat when several nodes share a machine), the GPUs Ray gave it and
    the device torch used (``cpu`` despite GPUs means this worker's torch cannot see CUDA)."""
    context = ray.get_runtime_context()
    gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
    return dict(zip(PLACEMENT_KEYS, (context.get_node_id(), gpu_ids, device.type), strict=True))


def fetch_base(location: str) -> Path:
    """A local folder with the base model: the location itself, or a per-node cached copy of a URI."""
    if "://" not in location:
        return Path(location)
    cache = (
        Path(tempfile.gettempdir()) / "vladsweep-base-cache" / location.replace("://", "_").replace("/", "_")
    )
    if cache.exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache.parent))
    fs, path = pafs.FileSystem.from_uri(location)
    pafs.copy_files(path, str(tmp), source_filesystem=fs)
    try:
        tmp.rename(cache)
    except OSError:  # another trial on this node finished the copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _restore_checkpoint(work: Path) -> dict[str, Any]:
    """The trial's state, with the files of its last checkpoint copied into ``work`` (a fresh state if none)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return {"stage": 0, "seconds": {}}
    with checkpoint.as_directory() as ckpt_dir:
        for item in Path(ckpt_dir).iterdir():
            shutil.copy2(item, work / item.name)
    return json.loads((work / STATE_FILE).read_text())


def _report(state: dict[str, Any], files: list[Path], metrics: dict[str, Any], device: torch.device) -> None:
    """Report the end of a stage with a checkpoint holding exactly what the next stage needs."""
    with tempfile.TemporaryDirectory(prefix="vladsweep-ckpt-") as tmp:
        (Path(tmp) / STATE_FILE).write_text(json.dumps(state, indent=2))
        for file in files:
            shutil.copy2(file, Path(tmp) / file.name)
        tune.report({**metrics, **_placement(device)}, checkpoint=tune.Checkpoint.from_directory(tmp))


# ----------------------------------------------------------------------------------------------- the trial


def _open_trial(
    config: dict[str, Any], context: dict[str, Any], work: Path
) -> tuple[NetVLADModel, TrialContext]:
    """The base model on the trial's device, and the context its stages share.

    A ``whitening_dim`` in the config truncates the base's whitening here, before the distillation teacher is
    copied from the model (`retrain_fn`) and before any stage or restored checkpoint: the teacher, every stage and
    the artifact all have the d-dim output. The trial's mAP drops stay relative to the dense base as built (its
    ``meta``), the reference a user compares with.
    """
    cpus, gpus = _trial_resources()
    torch.set_num_threads(max(1, int(cpus)))
    device = select_device(gpus)
    workers = loader_workers(cpus)
    settings = resolve_trial_config(config)
    plan = CompressionPlan.from_dict(settings["plan"], source="trial config")
    model, meta = load_base(fetch_base(context["base_location"]))
    base_parameters = _parameter_count(model)
    if settings["params"]["whitening_dim"] is not None:
        model.truncate_whitening(settings["params"]["whitening_dim"])
    model.to(device)
    miner = trial_miner(meta, context.get("data_root"), seed=int(context.get("seed", 0)))
    train_fn = retrain_fn(model, meta, miner, settings["lr"], device=device, num_workers=workers)
    groups = {g: names for g, names in model.compression_groups().items() if g in plan.groups}
    ctx = TrialContext(plan, groups, meta, context.get("data_root"), device, work, train_fn)
    ctx.removed_parameters = base_parameters - _parameter_count(model)
    ctx.loader_workers = workers
    return model, ctx


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """Ray Tune entry point. ``config`` is the sampled trial config; ``context`` holds the sweep's constants
    (``base_location``, ``data_root``, ``seed``, optional ``early_signal``) and comes through
    ``tune.with_parameters``."""
    work = Path(tempfile.mkdtemp(prefix="vladsweep-trial-"))
    try:
        model, ctx = _open_trial(config, context, work)
        ctx.early_signal = bool(context.get("early_signal", False))
        state = _restore_checkpoint(work)
        done = int(state["stage"])
        if done >= len(STAGES) and "final" in state:
            # Restored from its last checkpoint: the trial had ended but the driver died before recording it.
            # Report the measured result again; measuring again would rewrite the checkpoint of a finished trial.
            tune.report({**state["final"], **_placement(ctx.device)})
            return
        if done > 0 and STAGE_FUNCTIONS[done - 1].restore is not None:
            STAGE_FUNCTIONS[done - 1].restore(model, ctx)
        torch.manual_seed(int(context.get("seed", 0)) + done)
        for index in range(done, len(STAGES)):
            stage = STAGE_FUNCTIONS[index]
            started = time.monotonic()
            try:
                files = stage.run(model, ctx)
            except DivergedError as exc:
                raise DivergedError(f"stage {stage.name}: {exc} (config={config})", exc.step) from exc
            state["stage"], state["seconds"][stage.name] = index + 1, time.monotonic() - started
            metrics = {STAGE_KEY: stage.name, seconds_key(stage.name): state["seconds"][stage.name]}
            if stage.name == EARLY_STAGE:
                metrics.update(ctx.early)
            if stage.name == STAGES[-1]:
                metrics = {
                    STAGE_KEY: stage.name,
                    **ctx.final,
                    **{seconds_key(k): v for k, v in state["seconds"].items()},
                    seconds_key("trial"): sum(state["seconds"].values()),
                }
                state["final"] = metrics
            _report(state, files, metrics, ctx.device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
