"""The Ray Tune function trainable: one trial of a compression sweep (DESIGN §3).

Stages: load the shared base → ``sparsify`` (L1 fine-tune) → ``prune`` (+ masked retraining) → ``quantize``
(+ trained-centroid fine-tune, then the real artifact is written) → ``evaluate`` (the artifact is decoded into a
fresh model and that model is measured). Every stage ends with a ``tune.report`` carrying a checkpoint, so a retried
trial resumes at the stage it lost. The final report holds finite objectives only; a diverged trial raises, so Tune
marks it failed (with the reason) and Optuna is told FAIL instead of a point.

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
from pathlib import Path
from typing import Any

import faiss  # noqa: F401  (DESIGN §9: faiss before torch)
import pyarrow.fs as pafs
import ray
import torch
from ray import tune

from search_spaces.params import resolve_trial_config
from trainables.base import load_base
from trainables.compression.codec import load_compressed, save_compressed
from trainables.compression.plan import CompressionPlan
from trainables.compression.schedule import (
    apply_masks,
    dense_state_dict,
    export_masks,
    prune_and_retrain,
    quantize_and_finetune,
    sparsify,
)
from trainables.data.registry import load_dataset
from trainables.data.tuples import TripletMiner
from trainables.retrieval.evaluate import evaluate_dataset
from trainables.train import DivergedError, train_triplet

logger = logging.getLogger("vladsweep.trial")

STAGES = ("sparsify", "prune", "quantize", "evaluate")
ARTIFACT = "model.vlad.safetensors"
STATE = "trial_state.json"


class TrialDiverged(RuntimeError):
    """Training produced a non-finite loss: the trial is a failure, not a point on the front."""


def _trial_resources() -> tuple[float, float]:
    resources = tune.get_context().get_trial_resources()
    bundle = resources.required_resources if resources is not None else {}
    return float(bundle.get("CPU", 1)), float(bundle.get("GPU", 0))


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


def _load_state(checkpoint: tune.Checkpoint | None, work: Path) -> dict[str, Any]:
    if checkpoint is None:
        return {"stage": 0, "seconds": {}}
    with checkpoint.as_directory() as ckpt_dir:
        for item in Path(ckpt_dir).iterdir():
            shutil.copy2(item, work / item.name)
    return json.loads((work / STATE).read_text())


def _save_stage(
    work: Path, state: dict[str, Any], files: list[Path], metrics: dict[str, Any], device: torch.device
) -> None:
    """Report the end of a stage with a checkpoint holding exactly what the next stage needs."""
    with tempfile.TemporaryDirectory(prefix="vladsweep-ckpt-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / STATE).write_text(json.dumps(state, indent=2))
        metrics = {**metrics, **_placement(device)}
        for file in files:
            shutil.copy2(file, tmp_path / file.name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _placement(device: torch.device) -> dict[str, str]:
    """Where this trial runs: the node (IPs repeat when several nodes share a machine), the GPUs Ray gave it and
    the device torch used (``cpu`` despite GPUs means this worker's torch cannot see CUDA)."""
    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "device": device.type,
    }


def select_device(gpus: float) -> torch.device:
    """CUDA when the trial holds a GPU share and this worker's torch sees CUDA, else the CPU.

    Ray gives a trial with ``gpus < 1`` a share of one card that other trials use too (``--gpus-per-trial 0.5``
    puts two on it); Ray only counts shares, so cap this process's CUDA memory to its share, or one trial can take
    the memory the other needs.
    """
    device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and gpus < 1:
        torch.cuda.set_per_process_memory_fraction(gpus)
    return device


def _save_weights(model: torch.nn.Module, path: Path, masks: dict[str, torch.Tensor] | None = None) -> None:
    """The model's weights under their plain names, so a fresh model loads them (a pruned layer's state_dict holds
    ``weight_orig``/``weight_mask`` instead), and its prune masks beside them for ``apply_masks``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in dense_state_dict(model).items()}
    if masks:
        tensors.update({f"__mask__.{k}": m.to(torch.uint8).cpu().contiguous() for k, m in masks.items()})
    save_file(tensors, str(path))


def _load_weights(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    masks = {k[len("__mask__.") :]: v.bool() for k, v in tensors.items() if k.startswith("__mask__.")}
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("__mask__.")})
    return masks


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise TrialDiverged(f"{name} is {value}: the trial diverged")
    return float(value)


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """Ray Tune entry point. ``config`` is the sampled trial config; ``context`` holds the sweep's constants
    (``base_location``, ``data_root``, ``seed``) and comes through ``tune.with_parameters``."""
    cpus, gpus = _trial_resources()
    torch.set_num_threads(max(1, int(cpus)))
    device = select_device(gpus)
    settings = resolve_trial_config(config)
    plan = CompressionPlan.from_dict(settings["plan"], source="trial config")
    lr = settings["lr"]
    seed = int(context.get("seed", 0))

    base_dir = fetch_base(context["base_location"])
    model, meta = load_base(base_dir)
    base_cfg = meta["config"]
    model.to(device)
    groups = model.compression_groups()
    groups = {g: names for g, names in groups.items() if g in plan.groups}
    data_root = context.get("data_root")
    image_size = int(base_cfg["image_size"])

    work = Path(tempfile.mkdtemp(prefix="vladsweep-trial-"))
    try:
        state = _load_state(tune.get_checkpoint(), work)
        if state["stage"] >= len(STAGES) and "final" in state:
            # Restored from its last checkpoint: the trial had ended but the driver died before recording it.
            # Report the measured result again; measuring again would rewrite the checkpoint of a finished trial.
            tune.report({**state["final"], **_placement(device)})
            return
        torch.manual_seed(seed + state["stage"])
        miner = TripletMiner(
            load_dataset(meta["train_split"], data_root),
            image_size,
            num_negatives=base_cfg["num_negatives"],
            neg_pool_size=base_cfg["neg_pool_size"],
            num_positives=base_cfg["num_positives"],
            seed=seed,
        )

        def train_fn(m: torch.nn.Module, steps: int, extra_loss=None) -> list[float]:
            try:
                return train_triplet(
                    m,
                    miner,
                    steps,
                    lr,
                    extra_loss=extra_loss,
                    device=device,
                    progress=False,
                    batch_size=base_cfg["batch_size"],
                    margin=base_cfg["margin"],
                )
            except DivergedError as exc:
                raise TrialDiverged(
                    f"stage {STAGES[state['stage']]}: {exc} (lr={lr}, config={config})"
                ) from exc

        weights = work / "weights.safetensors"
        artifact = work / ARTIFACT
        if state["stage"] >= 1 and state["stage"] < 3:
            masks = _load_weights(model, weights)
            if masks:
                apply_masks(model, masks, groups)

        if state["stage"] == 0:
            t = time.monotonic()
            sparsify(model, plan, groups, train_fn)
            _save_weights(model, weights)
            state["stage"], state["seconds"]["sparsify"] = 1, time.monotonic() - t
            _save_stage(
                work,
                state,
                [weights],
                {"stage": "sparsify", "seconds_sparsify": state["seconds"]["sparsify"]},
                device,
            )

        if state["stage"] == 1:
            t = time.monotonic()
            prune_and_retrain(model, plan, groups, train_fn)
            _save_weights(model, weights, export_masks(model))
            state["stage"], state["seconds"]["prune"] = 2, time.monotonic() - t
            _save_stage(
                work,
                state,
                [weights],
                {"stage": "prune", "seconds_prune": state["seconds"]["prune"]},
                device,
            )

        if state["stage"] == 2:
            t = time.monotonic()
            quantize_and_finetune(model, plan, groups, train_fn)
            report = save_compressed(
                model,
                plan,
                artifact,
                meta={"architecture": {"name": "netvlad", "config": model.config_dict()}, "base": base_cfg},
            )
            (work / "layers.json").write_text(json.dumps(report.to_dict(), indent=2))
            (work / "layers.md").write_text(report.to_markdown())
            state["stage"], state["seconds"]["quantize"] = 3, time.monotonic() - t
            files = [artifact, work / "layers.json", work / "layers.md"]
            _save_stage(
                work,
                state,
                files,
                {"stage": "quantize", "seconds_quantize": state["seconds"]["quantize"]},
                device,
            )

        # Stage 3: decode the file that ships and measure exactly that model.
        t = time.monotonic()
        decoded = load_compressed(artifact).to(device)
        maps = {}
        for name in meta["test_splits"]:
            maps[name] = _finite(
                f"mAP on {name}",
                evaluate_dataset(decoded, load_dataset(name, data_root), image_size, device=device)["mAP"],
            )
        state["seconds"]["evaluate"] = time.monotonic() - t
        layers = json.loads((work / "layers.json").read_text())
        totals = layers["totals"]
        file_bytes = os.path.getsize(artifact)  # memory_mib is the file that ships, measured, never estimated
        mean_map = sum(maps.values()) / len(maps)
        base_map = float(meta["mAP"])
        metrics: dict[str, Any] = {
            "stage": "done",
            "mAP": mean_map,
            **{f"mAP_{name}": value for name, value in maps.items()},
            "mAP_drop": (base_map - mean_map) / base_map if base_map > 0 else 0.0,
            "memory_mib": file_bytes / 2**20,
            "compression_ratio": totals["dense_fp32_bytes"] / file_bytes,
            "sparsity": totals["sparsity"],
            "poster_style_mib": totals["poster_mib"],
            **{f"seconds_{k}": v for k, v in state["seconds"].items()},
            "seconds_trial": sum(state["seconds"].values()),
        }
        for key in ("mAP", "memory_mib", "compression_ratio"):
            _finite(key, metrics[key])
        state["stage"], state["final"] = len(STAGES), metrics
        _save_stage(work, state, [artifact, work / "layers.json", work / "layers.md"], metrics, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
