"""The poster's models at their real size, end to end: AlexNet / VGG16 + NetVLAD (K=64) + PCA-4096 whitening.

What it shows is size and mechanics, not accuracy: the backbones start from random weights (nothing downloads),
the data is the synthetic set's large variant (``synthetic-large``: 4,225 training images, since PCA-4096 needs
more than 4,096), the images are reduced (default 112 px instead of the presets' 1024) and every stage trains a
few steps. What is real: the preset's base build (`trainables.base.build_base`: k-means init, triplet fine-tune,
PCA-4096 whitening of 67M / 134M weights, evaluations) and one trial through every stage with the trial's own
code (`trainables.pipeline` `_open_trial` and `STAGE_FUNCTIONS`, called directly, no Ray session): proximal L1,
prune + retrain, k-means + trained centroids, encode, decode, evaluate.

Each model's base build and its trial run in fresh subprocesses, so their memory peaks do not mix. Per stage:
wall and CPU seconds, peak RSS (VmHWM, reset before each stage through /proc/self/clear_refs), forward passes
by kind (with gradients / without) and image size, and the bytes of the files the stage checkpoints. Written as
JSON and Markdown, with the cost model of a real sweep derived from the measured figures (FLOPs and activation
memory from the graph, at the presets' sizes; the GPU throughput and prices are stated assumptions).

    .venv/bin/python benchmarks/bench_real_size.py --workdir /tmp/rs               # AlexNet, then VGG16
    .venv/bin/python benchmarks/bench_real_size.py --workdir /tmp/rs --models vgg16 --image-size 96
    .venv/bin/python benchmarks/bench_real_size.py --cost-model [--from-json /tmp/rs/real_size.json]
    .venv/bin/python benchmarks/bench_real_size.py --gpu-throughput --json OUT.json   # on a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import faiss  # before torch: both bring OpenMP (docs/traps.md#faiss-before-torch)
import torch
from PIL import Image
from torch import nn

from search_spaces.schema import load_search_space
from trainables.base import PRESETS, build_base, preset_config
from trainables.contract import ARTIFACT_FILE, resolve_trial_config
from trainables.data.images import load_image
from trainables.data.registry import load_dataset
from trainables.data.synthetic import ensure_synthetic
from trainables.data.tuples import TripletMiner
from trainables.netvlad.backbones import build_backbone, finetuned_layer_names
from trainables.netvlad.model import NetVLADConfig, NetVLADModel, build_netvlad
from trainables.retrieval.extract import extract_descriptors

MIB, GIB = 1 << 20, 1 << 30
MODELS = ("alexnet", "vgg16")
DATASET = "synthetic-large"
#: The trial every run measures: the kind of point search_spaces/pareto.yaml samples (sigma pruning, trained
#: k-means, proximal L1, two prune rounds, every group compressed), with few steps (``--stage-steps``).
TRIAL = {
    "groups": "conv,netvlad,whitening",
    "prune_mode": "sigma",
    "threshold": 0.5,
    "quant_mode": "kmeans",
    "bits": 8,
    "bits_whitening": 5,
    "l1_lambda": 1.0,
    "prune_rounds": 2,
    "lr": 3e-3,
    "kmeans_iters": 30,
}

# ----------------------------------------------------------------------------------------- cost-model inputs
# Assumptions, each stated in the output: until benchmarks/gpu_check.sh measures them on a GPU, they are not data.
#: Effective throughput of one A10G (cluster/gpu.yaml's g5 nodes) on these convolutions: about half of its
#: 31.2 TFLOP/s fp32 peak (cuDNN uses TF32 tensor cores for fp32 convs by default), and about a third of the
#: 125 TFLOP/s fp16 tensor peak under autocast.
A10G_TFLOPS = {"fp32": 15.0, "fp16": 40.0}
#: A10G memory as the driver reports it (23,028 MiB), minus the CUDA context, with 10% kept free for the
#: allocator's fragmentation.
A10G_USABLE_BYTES = int((23028 * MIB - 600 * MIB) * 0.9)
#: On-demand prices, us-east-1, USD per hour (assumed: check the AWS price list); spot is about a third.
PRICES = {
    "g5.xlarge (1 A10G)": (1.006, 1),
    "g5.12xlarge (4 A10G)": (5.672, 4),
    "m5.xlarge (head)": (0.192, 0),
}
#: The real datasets of the presets' protocol (paris6k -> val Paris6k, test Oxford5k): database images with
#: the corrupt Paris files left out, 55 queries each; anchors = queries + good/ok images of the landmarks
#: (assumed ~1,500 for Paris6k: the ground truth is not on this machine).
REAL = {"paris6k_db": 6392, "oxford5k_db": 5063, "queries": 55, "paris6k_anchors": 1500, "aspect": 0.75}
#: Square training sizes the fit table tries.
FIT_SIZES = (1024, 896, 768, 640, 512, 384)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ memory


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak RSS in bytes since the last `reset_peak` (``ru_maxrss`` where /proc is missing)."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


# --------------------------------------------------------------------------------------------- counting


class Counts:
    """Forward passes of every NetVLAD model (student, teacher, decoded) by (gradients on, H, W), re-minings, and
    the seconds of the calls `time_calls` names: instrumentation of the real methods (the originals run
    unchanged), so a stage's FLOPs follow exactly and its CPU-bound parts are measured, not inferred."""

    def __init__(self) -> None:
        self.forwards: Counter[tuple[bool, int, int]] = Counter()
        self.refreshes = 0
        self.parts: dict[str, dict[str, float]] = {}
        forward, refresh = NetVLADModel.forward, TripletMiner.refresh
        counts = self

        def counted_forward(model: NetVLADModel, images: torch.Tensor) -> torch.Tensor:
            h, w = images.shape[-2:]
            counts.forwards[(torch.is_grad_enabled(), int(h), int(w))] += int(images.shape[0])
            return forward(model, images)

        def counted_refresh(miner: TripletMiner, describe: Any) -> None:
            counts.refreshes += 1
            return refresh(miner, describe)

        NetVLADModel.forward = counted_forward  # type: ignore[method-assign]
        TripletMiner.refresh = counted_refresh  # type: ignore[method-assign]

    def time_calls(self, owner: Any, name: str) -> None:
        """Accumulate wall and CPU seconds of every call of ``owner.name`` (a module's global, as its callers
        look it up) under ``name``."""
        original = getattr(owner, name)
        counts = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                row = counts.parts.setdefault(name, {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0})
                row["calls"] += 1
                row["wall_s"] += time.perf_counter() - t
                row["cpu_s"] += time.process_time() - c

        setattr(owner, name, timed)

    def take(self) -> dict[str, Any]:
        """What was counted since the last call, and reset."""
        rows = [{"grad": g, "h": h, "w": w, "images": n} for (g, h, w), n in sorted(self.forwards.items())]
        out = {"forwards": rows, "refreshes": self.refreshes, "parts": dict(self.parts)}
        self.forwards.clear()
        self.refreshes = 0
        self.parts = {}
        return out


def _threads(n: int) -> None:
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _measure(fn: Any) -> tuple[Any, dict[str, Any]]:
    """Run ``fn()``; its result and wall / CPU seconds and the peak RSS while it ran."""
    reset_peak()
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, {
        "wall_s": time.perf_counter() - t,
        "cpu_s": time.process_time() - c,
        "peak_rss_bytes": peak_rss(),
        "rss_after_bytes": current_rss(),
    }


# ---------------------------------------------------------------------------------------------- workers


def base_config(model: str, args: argparse.Namespace) -> Any:
    """The poster preset of ``model`` on the large synthetic set at the reduced size and step count."""
    return preset_config(
        f"poster-{model}",
        {
            "dataset": DATASET,
            "data_root": str(args.cache),
            "weights": str(random_weights(model, args.workdir)),
            "image_size": args.image_size,
            "steps": args.base_steps,
            "kmeans_images": args.kmeans_images,
        },
    )


def random_weights(backbone: str, workdir: Path) -> Path:
    """A state-dict file of the backbone at its random init (seed 0), written once: the preset refuses random
    AlexNet/VGG16 weights (its frozen layers would stay noise), but a file of them is weights like any other,
    and here the point is size and mechanics, not mAP. Nothing is downloaded."""
    path = workdir / backbone / "random_backbone.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        seq, _ = build_backbone(backbone)
        torch.save(seq.state_dict(), path)
    return path


def trial_config(args: argparse.Namespace) -> dict[str, Any]:
    """`TRIAL` with ``--stage-steps`` steps per stage and the ``--set KEY=VALUE`` overrides (JSON values)."""
    steps = args.stage_steps
    config = {**TRIAL, "l1_steps": steps, "retrain_steps": steps, "quant_steps": steps}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    resolve_trial_config(config, source="--set", allow_extra=False)  # a bad key or value fails here, named
    return config


def worker_base(args: argparse.Namespace) -> dict[str, Any]:
    config = base_config(args.model, args)
    out = args.workdir / args.model / "base"
    counts = Counts()
    _, m = _measure(lambda: build_base(config, out, device=args.device, progress=False, overwrite=True))
    meta = json.loads((out / "meta.json").read_text())
    return {
        "config": config.to_dict(),
        "base_seconds": meta["seconds"],
        **m,
        "counts": counts.take(),
        "model_bytes": (out / "model.safetensors").stat().st_size,
        "val_mAP": meta["val_mAP"],
        "test_mAP": meta["test_mAP"],
        "loss": meta["loss"],
    }


def worker_trial(args: argparse.Namespace) -> dict[str, Any]:
    from trainables import pipeline  # imports Ray (not started): only the trial worker needs it
    from trainables.compression import schedule

    config = trial_config(args)
    work = args.workdir / args.model / args.trial_name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    context = {
        "base_location": str(args.workdir / args.model / "base"),
        "data_root": str(args.cache),
        "seed": 0,
    }
    counts = Counts()
    # The CPU-bound work of quantize (k-means, encode) and evaluate (decode), whatever the image size.
    counts.time_calls(schedule, "quantize_module")
    counts.time_calls(pipeline, "save_compressed")
    counts.time_calls(pipeline, "load_compressed")
    with warnings.catch_warnings():
        # Outside a Tune session the trial's resources read as 1 CPU, no GPU (Tune warns and returns None).
        warnings.simplefilter("ignore", UserWarning)
        (model, ctx), opened = _measure(lambda: pipeline._open_trial(config, context, work))
    _threads(args.threads)
    stages = [{"stage": "open", **opened, **counts.take(), "files": {}, "checkpoint_bytes": 0}]
    torch.manual_seed(0)
    done: dict[str, float] = {}
    for index, stage in enumerate(pipeline.STAGE_FUNCTIONS):
        files, m = _measure(lambda stage=stage: stage.run(model, ctx))
        done[stage.name] = m["wall_s"]
        state = json.dumps({"stage": index + 1, "seconds": done}, indent=2)  # what _report writes beside them
        sizes = {f.name: f.stat().st_size for f in files}
        stages.append(
            {
                "stage": stage.name,
                **m,
                **counts.take(),
                "files": sizes,
                "checkpoint_bytes": sum(sizes.values()) + len(state),
            }
        )
    return {
        "config": config,
        "stages": stages,
        "peak_rss_bytes": max(s["peak_rss_bytes"] for s in stages),
        # Linux resets this together with VmHWM (clear_refs): the peak since the last reset, not the process's.
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "artifact_bytes": (work / ARTIFACT_FILE).stat().st_size,
        "final": ctx.final,
    }


# ----------------------------------------------------------------------------------------- graph profile


def _meta_model(backbone: str, dtype: torch.dtype = torch.float32) -> NetVLADModel:
    """The poster preset's architecture of ``backbone`` on the meta device (shapes only, nothing allocated)."""
    preset = PRESETS[f"poster-{backbone}"]
    config = {
        "backbone": backbone,
        "num_clusters": preset["num_clusters"],
        "whitening_dim": preset["whitening_dim"],
    }
    with torch.device("meta"):
        model = build_netvlad(config)
    return model.to(dtype)


def graph_profile(backbone: str, h: int, w: int) -> dict[str, Any]:
    """FLOPs of one forward at (h, w) and the largest activation, from shapes alone (meta tensors, no compute):
    2·MACs of every conv and linear, plus NetVLAD's aggregation (2·K·D per location)."""
    model = _meta_model(backbone)
    flops = {"conv": 0, "netvlad": 0, "whitening": 0}
    largest = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel())
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            key = "netvlad" if module is model.pool.conv else "conv"
            flops[key] += 2 * out.numel() * k
        elif isinstance(module, nn.Linear):
            flops["whitening"] += 2 * module.in_features * module.out_features * out.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        feats = model.backbone(torch.empty(1, 3, h, w, device="meta"))
        model.whiten(model.pool(feats))
    for handle in handles:
        handle.remove()
    locations = feats.shape[-2] * feats.shape[-1]
    flops["netvlad"] += 2 * model.pool.num_clusters * model.pool.dim * locations
    groups = model.compression_groups()
    params = {g: sum(model.get_submodule(n).weight.numel() for n in names) for g, names in groups.items()}
    return {
        "flops": flops,
        "flops_total": sum(flops.values()),
        "largest_activation": largest,
        "feature_map": [int(feats.shape[-2]), int(feats.shape[-1])],
        "params": sum(p.numel() for p in model.parameters()),
        "weights_by_group": params,
    }


def saved_activation_bytes(backbone: str, h: int, w: int, trainable: str, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for the backward of one image at (h, w) when ``trainable`` parameters train:
    ``all`` (a trial compressing every group), ``base`` (the base fine-tune: the backbone's FINETUNED_LAYERS,
    NetVLAD, whitening) or ``head`` (a trial without the conv group). Frozen layers before the first trainable
    one keep nothing. Counted with saved-tensor hooks on meta tensors; weights are left out, views counted once."""
    model = _meta_model(backbone, dtype)
    finetuned = {f"backbone.{n}." for n in finetuned_layer_names(backbone, model.backbone)}
    for name, p in model.named_parameters():
        if trainable == "all":
            on = True
        elif trainable == "base":
            on = not name.startswith("backbone.") or any(name.startswith(f) for f in finetuned)
        else:
            on = not name.startswith("backbone.")
        p.requires_grad_(on)
    params = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            kept[id(base)] = base
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.empty(1, 3, h, w, device="meta", dtype=dtype))
    return sum(t.numel() * t.element_size() for t in kept.values())


def training_fit(backbone: str, usable: int, mode: str = "trial") -> list[dict[str, Any]]:
    """How many training images (and tuples of the preset: 1 + positives + negatives) fit in ``usable`` GPU
    bytes, per square training size and dtype (computed from the graph, not measured).

    ``mode="trial"``: every group trains (pareto.yaml). Per image: the saved activations, plus the teacher's
    no-grad forward on the same batch while they are held (two of the largest activation). Fixed: the model, the
    teacher copy, gradients and Adam's two moments of every weight, and a prune mask and its masked weight
    (``torch.nn.utils.prune``, float32): 28 bytes per parameter. ``mode="base"``: the base fine-tune (no
    whitening yet, no teacher, only FINETUNED_LAYERS and NetVLAD train): per image the saved activations plus the
    forward's two largest activations in flight; fixed: the weights, and 12 bytes per trainable parameter."""
    preset = preset_config(f"poster-{backbone}")
    per_tuple = 1 + preset.num_positives + preset.num_negatives
    prof = graph_profile(backbone, 224, 224)
    if mode == "trial":
        fixed = 28 * prof["params"]
    else:
        model = _meta_model(backbone)
        tuned = {f"backbone.{n}." for n in finetuned_layer_names(backbone, model.backbone)}
        trainable = sum(
            p.numel()
            for n, p in model.named_parameters()
            if n.startswith("pool.") or any(n.startswith(t) for t in tuned)
        )
        fixed = 4 * (prof["params"] - prof["weights_by_group"]["whitening"]) + 12 * trainable
    rows = []
    for size in FIT_SIZES:
        largest = graph_profile(backbone, size, size)["largest_activation"]
        for dtype, nbytes in (("fp32", 4), ("fp16", 2)):
            saved = saved_activation_bytes(
                backbone, size, size, "all" if mode == "trial" else "base", DTYPES[dtype]
            )
            per_image = saved + 2 * largest * nbytes
            images = max(0, (usable - fixed) // per_image)
            rows.append(
                {
                    "size": size,
                    "dtype": dtype,
                    "saved_mib_per_image": saved / MIB,
                    "per_image_mib": per_image / MIB,
                    "fixed_gib": fixed / GIB,
                    "images": int(images),
                    "tuples": int(images // per_tuple),
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------- cost model


def load_time_ms(size: int = 1024, repeats: int = 20) -> float:
    """CPU milliseconds `load_image` takes for a 1024x768 JPEG (the size of the real sets' images) on this CPU,
    one thread: CPU time, not wall time, since the machine is shared (the median of ``repeats``)."""
    src = ensure_synthetic() / "test" / "jpg"
    first = sorted(src.iterdir())[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jpg"
        with Image.open(first) as im:
            im.convert("RGB").resize((1024, 768), Image.BILINEAR).save(path, quality=90)
        load_image(path, size)
        times = []
        for _ in range(repeats):
            t = time.process_time()
            load_image(path, size)
            times.append(time.process_time() - t)
        return float(sorted(times)[len(times) // 2]) * 1000


def _row(
    gpu_flops: float, loads: int, cpu_s: float, tput: float, load_ms: float, **extra: Any
) -> dict[str, Any]:
    row = {**extra, "gpu_s": gpu_flops / tput, "load_s": loads * load_ms / 1000, "cpu_s": cpu_s}
    row["total_s"] = row["gpu_s"] + row["load_s"] + row["cpu_s"]
    return row


def trial_gpu_seconds(
    backbone: str,
    space: str,
    train_size: int,
    batch: int,
    dtype: str,
    cpu_parts: dict[str, float],
    load_ms: float,
) -> dict[str, Any]:
    """Seconds of one trial per stage on one A10G, at the preset's eval size (longest side 1024, 4:3) and
    ``train_size``² training tuples, ``batch`` per step: the FLOPs of the passes the stage makes (as the run
    counted them: a training step is the student's forward and backward, ~3 forwards, and the teacher's forward,
    on every image of the batch; a re-mining describes the anchors and the negative pool) / the assumed A10G
    throughput (``gpu_s``); the image loading the loop does serially on the CPU (``load_s``); and the CPU-bound
    parts measured in the run (k-means + encode in quantize, decode + ranking in evaluate: ``cpu_parts``)."""
    preset = preset_config(f"poster-{backbone}")
    fixed = resolve_trial_config(load_search_space(space).fixed)["plan"]
    images_per_step = batch * (1 + preset.num_positives + preset.num_negatives)
    f_train = graph_profile(backbone, train_size, train_size)["flops_total"]
    eval_h = round(preset.image_size * REAL["aspect"])
    f_eval = graph_profile(backbone, eval_h, preset.image_size)["flops_total"]
    tput = A10G_TFLOPS[dtype] * 1e12
    refresh_every = math.ceil(REAL["paris6k_anchors"] / batch)
    refresh_images = REAL["paris6k_anchors"] + preset.neg_pool_size
    steps = {
        "sparsify": fixed["l1_steps"],
        "prune": fixed["prune_rounds"] * fixed["retrain_steps"],
        "quantize": fixed["quant_steps"],
    }
    out: dict[str, Any] = {}
    done = 0
    for stage, n in steps.items():
        # Re-mining counts steps across the trial (make_train_fn): at step 0, then every refresh_every steps.
        refreshes = len([s for s in range(done, done + n) if s % refresh_every == 0])
        done += n
        flops = n * images_per_step * 4 * f_train + refreshes * refresh_images * f_train
        loads = n * images_per_step + refreshes * refresh_images
        out[stage] = _row(
            flops, loads, cpu_parts.get(stage, 0.0), tput, load_ms, steps=n, refreshes=refreshes
        )
    eval_images = REAL["paris6k_db"] + REAL["oxford5k_db"] + 2 * REAL["queries"]
    out["evaluate"] = _row(eval_images * f_eval, eval_images, cpu_parts.get("evaluate", 0.0), tput, load_ms)
    return {
        "stages": out,
        "total_s": sum(r["total_s"] for r in out.values()),
        "train_size": train_size,
        "batch": batch,
        "dtype": dtype,
        "eval_size": [eval_h, preset.image_size],
    }


def base_gpu_seconds(
    backbone: str, train_size: int, batch: int, dtype: str, load_ms: float
) -> dict[str, Any]:
    """Seconds of the preset's base build on one A10G (once per sweep), as `trial_gpu_seconds` counts them:
    k-means init (``kmeans_images``), three evaluations of validation + test, the fine-tune (``steps``: forward
    + a backward through conv5 onwards only, ~1.2 forwards, with its re-minings) and the whitening's extraction
    of the training split. The PCA itself (CPU, float64, 6,392 x 32,768) is left out."""
    preset = preset_config(f"poster-{backbone}")
    tput = A10G_TFLOPS[dtype] * 1e12
    f_train = graph_profile(backbone, train_size, train_size)["flops_total"]
    f_eval = graph_profile(backbone, round(preset.image_size * REAL["aspect"]), preset.image_size)[
        "flops_total"
    ]
    evals = 3 * (REAL["paris6k_db"] + REAL["oxford5k_db"] + 2 * REAL["queries"])
    refreshes = math.ceil(preset.steps / math.ceil(REAL["paris6k_anchors"] / batch))
    refresh_images = refreshes * (REAL["paris6k_anchors"] + preset.neg_pool_size)
    images = preset.steps * batch * (1 + preset.num_positives + preset.num_negatives)
    eval_like = preset.kmeans_images + evals + REAL["paris6k_db"]
    flops = eval_like * f_eval + (images * 1.2 + refresh_images) * f_train
    return _row(
        flops,
        eval_like + images + refresh_images,
        0.0,
        tput,
        load_ms,
        steps=preset.steps,
        refreshes=refreshes,
    )


def cpu_bound_parts(run: dict[str, Any] | None, backbone: str) -> dict[str, float]:
    """CPU seconds of the stages' image-size-independent work in a run, as measured around the calls: k-means
    (`quantize_module`) + encode (`save_compressed`) in quantize, decode (`load_compressed`) in evaluate. A run
    without those figures: the stage's CPU time minus its passes at the run's FLOP rate. Empty without a run."""
    if not run or backbone not in run.get("models", {}):
        return {}
    stages = {s["stage"]: s for s in run["models"][backbone]["trial"]["stages"]}
    if all("parts" in stages[name] for name in ("quantize", "evaluate")):
        return {
            name: sum(p["cpu_s"] for p in stages[name]["parts"].values()) for name in ("quantize", "evaluate")
        }
    rate = run["models"][backbone]["cpu_gflops"] * 1e9
    return {
        name: max(0.0, stages[name]["cpu_s"] - _stage_flops(backbone, stages[name]) / rate)
        for name in ("quantize", "evaluate")
    }


def _stage_flops(backbone: str, stage: dict[str, Any]) -> float:
    """FLOPs of the forward passes a stage counted: a forward with gradients costs 3 forwards (with backward)."""
    total = 0.0
    cache: dict[tuple[int, int], int] = {}
    for row in stage["forwards"]:
        key = (row["h"], row["w"])
        if key not in cache:
            cache[key] = graph_profile(backbone, *key)["flops_total"]
        total += row["images"] * cache[key] * (3 if row["grad"] else 1)
    return total


# ----------------------------------------------------------------------------------------------- GPU mode


def gpu_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the VGG16 preset's extraction (`extract_descriptors`: loading, resizing, batching, forward)
    against the backbone's raw forward on random tensors of the same size, on CUDA (the CPU if there is none)."""
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    preset = PRESETS["poster-vgg16"]
    size = preset["image_size"]
    h = round(size * REAL["aspect"])
    model = NetVLADModel(NetVLADConfig("vgg16", preset["num_clusters"], preset["whitening_dim"]))
    model = model.to(device).eval()
    n = args.throughput_images
    batch = min(16, n)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    out: dict[str, Any] = {"device": str(device), "image": [h, size], "images": n, "batch": batch}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    x = torch.randn(batch, 3, h, size, device=device)
    reps = max(1, n // batch)

    def rate(fn: Any, autocast: bool = False) -> float:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
            fn(x)
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                fn(x)
            sync()
        return reps * batch / (time.perf_counter() - t)

    out["backbone_raw_images_per_s"] = rate(model.backbone)
    out["model_raw_images_per_s"] = rate(model)
    if device.type == "cuda":
        out["model_raw_fp16_autocast_images_per_s"] = rate(model, autocast=True)
    src = sorted((ensure_synthetic() / "test" / "jpg").iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            path = Path(tmp) / f"{i:04d}.jpg"
            with Image.open(src[i % len(src)]) as im:
                im.convert("RGB").resize((size, h), Image.BILINEAR).save(path, quality=90)
            paths.append(path)
        extract_descriptors(model, paths[:batch], size, device=device, progress=False)
        for workers in (0, 4):
            sync()
            t = time.perf_counter()
            extract_descriptors(model, paths, size, device=device, progress=False, num_workers=workers)
            sync()
            out[f"extract_images_per_s_workers{workers}"] = n / (time.perf_counter() - t)
    flops = graph_profile("vgg16", h, size)["flops_total"]
    out["model_tflops_effective"] = out["model_raw_images_per_s"] * flops / 1e12
    if "model_raw_fp16_autocast_images_per_s" in out:
        out["model_tflops_effective_fp16"] = out["model_raw_fp16_autocast_images_per_s"] * flops / 1e12
    return out


# ------------------------------------------------------------------------------------------- orchestration


def _worker_json(role: str, model: str, args: argparse.Namespace) -> Path:
    return args.workdir / model / f"{role if role == 'base' else args.trial_name}.json"


def _run_worker(role: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    out = _worker_json(role, model, args)
    if role == "base" and args.reuse_base and out.is_file():
        print(f"{model}: reusing the base of {out}", flush=True)
        return json.loads(out.read_text())
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--model", model]
    cmd += ["--workdir", str(args.workdir), "--cache", str(args.cache), "--threads", str(args.threads)]
    cmd += ["--image-size", str(args.image_size), "--base-steps", str(args.base_steps)]
    cmd += ["--kmeans-images", str(args.kmeans_images), "--stage-steps", str(args.stage_steps)]
    cmd += ["--device", args.device, "--trial-name", args.trial_name]
    cmd += [f"--set={item}" for item in args.set]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"[{time.strftime('%H:%M:%S')}] {model}: {role} ...", flush=True)
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(out.read_text())
    wall = result["wall_s"] if role == "base" else sum(s["wall_s"] for s in result["stages"])
    print(f"[{time.strftime('%H:%M:%S')}] {model}: {role} done in {wall:.0f} s", flush=True)
    return result


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": cpu or platform.processor(),
        "nproc": os.cpu_count(),
        "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    sizes = {s: len(load_dataset(f"{DATASET}-{s}", args.cache).images) for s in ("train", "val", "test")}
    result: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "note": "random init (no pretrained weights): sizes and mechanics are real, mAP is not meaningful",
        "dataset": {"name": DATASET, "images": sizes, "prepare_s": time.perf_counter() - t},
        "models": {},
    }
    for model in args.models:
        base = _run_worker("base", model, args)
        trial = _run_worker("trial", model, args)
        flops = sum(_stage_flops(model, s) for s in trial["stages"] if s["stage"] != "quantize")
        secs = sum(s["cpu_s"] for s in trial["stages"] if s["stage"] in ("sparsify", "prune"))
        train_flops = sum(
            _stage_flops(model, s) for s in trial["stages"] if s["stage"] in ("sparsify", "prune")
        )
        result["models"][model] = {
            "profile": graph_profile(model, args.image_size, args.image_size),
            "base": base,
            "trial": trial,
            # The CPU's effective rate on the training stages (their time is almost all forward/backward).
            "cpu_gflops": train_flops / secs / 1e9 if secs else float("nan"),
            "flops_all_stages": flops,
        }
        (args.workdir / "real_size.partial.json").write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------------- tables


def _run_tables(run: dict[str, Any]) -> list[str]:
    m = run["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['nproc']} CPUs, {m['mem_gib']:.0f} GiB, torch {m['torch']}, "
        f"{run['args']['threads']} thread(s); load average at the end {m['load_avg'][0]:.1f}; {m['date']}.",
        f"Data: `{run['dataset']['name']}` ({run['dataset']['images']}). {run['note']}.",
        "",
    ]
    for model, r in run["models"].items():
        b, tr = r["base"], r["trial"]
        secs = ", ".join(f"{k} {v:.0f}" for k, v in b["base_seconds"].items() if k != "total")
        lines += [
            f"**{model}** (preset poster-{model} at {b['config']['image_size']} px, "
            f"{r['profile']['params']:,} parameters, whitening {r['profile']['weights_by_group']['whitening']:,}): "
            f"base {b['wall_s']:.0f} s wall / {b['cpu_s']:.0f} s CPU, peak RSS {b['peak_rss_bytes'] / GIB:.2f} GiB, "
            f"dense file {b['model_bytes'] / MIB:.1f} MiB (wall s: {secs}).",
            "",
            "| stage | wall s | CPU s | peak RSS GiB | RSS after GiB | images fwd+bwd / fwd only | re-minings | "
            "timed calls, CPU s | checkpoint MiB | files (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        for s in tr["stages"]:
            g = sum(f["images"] for f in s["forwards"] if f["grad"])
            ng = sum(f["images"] for f in s["forwards"] if not f["grad"])
            files = ", ".join(f"{k} {v / MIB:.1f}" for k, v in s["files"].items())
            parts = ", ".join(f"{k} {v['cpu_s']:.1f}" for k, v in s.get("parts", {}).items())
            lines.append(
                f"| {s['stage']} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['peak_rss_bytes'] / GIB:.2f} | "
                f"{s['rss_after_bytes'] / GIB:.2f} | {g} / {ng} | {s['refreshes']} | {parts} | "
                f"{s['checkpoint_bytes'] / MIB:.1f} | {files} |"
            )
        f = tr["final"]
        lines += [
            f"| **trial** | **{sum(s['wall_s'] for s in tr['stages']):.1f}** | "
            f"{sum(s['cpu_s'] for s in tr['stages']):.1f} | **{tr['peak_rss_bytes'] / GIB:.2f}** | | | | | | "
            f"artifact {tr['artifact_bytes'] / MIB:.2f} |",
            "",
            f"Trial {json.dumps(tr['config'])}: artifact {tr['artifact_bytes'] / MIB:.2f} MiB, "
            f"{f.get('compression_ratio', float('nan')):.1f}x smaller than dense fp32, sparsity "
            f"{f.get('sparsity', float('nan')):.3f}, val / test mAP {f.get('val_mAP', float('nan')):.3f} / "
            f"{f.get('test_mAP', float('nan')):.3f} (random init: not a quality figure). CPU rate on the training "
            f"stages: {r['cpu_gflops']:.0f} GFLOP/s.",
            "",
        ]
    return lines


def markdown(run: dict[str, Any] | None, cost: dict[str, Any]) -> str:
    """The run's per-stage tables (when there is a run) and the cost model's tables."""
    lines = _run_tables(run) if run else []
    lines += [
        "Graph (meta tensors; one image; saved = what autograd keeps for the backward):",
        "",
        "| model | parameters | whitening | GFLOP 1024x768 | GFLOP 1024² | largest activation MiB (fp32, 1024²) | "
        "saved MiB/img fp32 / fp16 at 1024²: all groups train | base fine-tune | no conv group |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for model, c in cost["models"].items():
        s = c["saved_1024"]
        lines.append(
            f"| {model} | {c['params']:,} | {c['whitening']:,} | {c['gflop_eval']:.0f} | {c['gflop_train']:.0f} | "
            f"{c['largest_mib']:.0f} | {s['all']['fp32']:.0f} / {s['all']['fp16']:.0f} | "
            f"{s['base']['fp32']:.0f} / {s['base']['fp16']:.0f} | {s['head']['fp32']:.1f} / {s['head']['fp16']:.1f} |"
        )
    lines += [
        "",
        f"Training fit on a 24 GB A10G (computed from the graph, not measured): {A10G_USABLE_BYTES / GIB:.1f} GiB "
        "usable; tuples per batch (tuple = 1 query + 1 positive + 5 negatives, square images) that fit a whole "
        "GPU / half of it (`--gpus-per-trial 0.5`). Trial = every group trains (pareto.yaml), with the teacher; "
        "base = the base fine-tune (conv5 onwards).",
        "",
        "| model | what | dtype | fixed GiB | " + " | ".join(f"{s}²" for s in FIT_SIZES) + " |",
        "|---|---|---|---:|" + "---:|" * len(FIT_SIZES),
    ]
    for model, c in cost["models"].items():
        for what in ("trial", "base"):
            for dtype in ("fp32", "fp16"):
                full, half = c["fit"][what]["full"][dtype], c["fit"][what]["half"][dtype]
                cells = [f"{full[s]} / {half[s]}" for s in FIT_SIZES]
                fixed = c["fit"][what]["fixed_gib"]
                lines.append(f"| {model} | {what} | {dtype} | {fixed:.1f} | " + " | ".join(cells) + " |")
    a = cost["assumptions"]
    lines += [
        "",
        f"Seconds per trial on one A10G ({cost['space']}: steps per stage from its `fixed`), fp32, at the "
        f"training size and batch chosen from the fit table, evaluation at 1024 px (4:3) on Paris6k + Oxford5k "
        f"({a['real']['paris6k_db']:,} + {a['real']['oxford5k_db']:,} images + queries; "
        f"~{a['real']['paris6k_anchors']:,} anchors assumed). Cell: total (GPU compute at "
        f"{a['a10g_tflops']['fp32']} TFLOP/s assumed / image loading at {cost['load_ms']:.1f} CPU ms per "
        "1024x768 JPEG, serial as the loop does it, measured here / CPU-bound parts measured in the run).",
        "",
        "| model | train size, batch | base (once) | sparsify | prune | quantize | evaluate | trial | "
        f"{cost['num_samples']} trials, GPU-h |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, c in cost["models"].items():
        g = c["gpu"]

        def cell(r: dict[str, Any]) -> str:
            return f"{r['total_s']:.0f} ({r['gpu_s']:.0f} / {r['load_s']:.0f} / {r['cpu_s']:.0f})"

        stages = " | ".join(cell(g["stages"][s]) for s in ("sparsify", "prune", "quantize", "evaluate"))
        lines.append(
            f"| {model} | {g['train_size']}², {g['batch']} | {cell(c['base_build'])} | {stages} | "
            f"{g['total_s']:.0f} | {c['sweep_gpu_h']:.1f} |"
        )
    lines += [
        "",
        f"The sweep ({cost['num_samples']} trials, `--max-concurrent` = the GPUs of cluster/gpu.yaml's max_workers) "
        "on its node types at on-demand prices (assumed, us-east-1; spot is about a third), head node included:",
        "",
        "| model | worker node | $/h | nodes x GPUs | wall h | GPU-node $ | head $ | total $ |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, c in cost["models"].items():
        for r in c["sweep"]:
            lines.append(
                f"| {model} | {r['node']} | {r['price']:.3f} | {r['nodes']} x {r['gpus_per_node']} | "
                f"{r['wall_h']:.1f} | {r['node_usd']:.0f} | {r['head_usd']:.0f} | {r['usd']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def _tuples_by_dtype(rows: list[dict[str, Any]]) -> dict[str, dict[int, int]]:
    return {dt: {r["size"]: r["tuples"] for r in rows if r["dtype"] == dt} for dt in DTYPES}


def _choose(tuples: dict[int, int], batch: int) -> tuple[int, int]:
    """(size, batch): the largest training size where ``batch`` tuples fit, else the largest where one does."""
    for size in FIT_SIZES:
        if tuples[size] >= batch:
            return size, batch
    return next(((s, tuples[s]) for s in FIT_SIZES if tuples[s] >= 1), (FIT_SIZES[-1], 1))


def cost_model(run: dict[str, Any] | None, space: str = "pareto") -> dict[str, Any]:
    """Everything of the cost model: graph figures, the 24 GB fit, GPU-seconds per trial and the sweep's price."""
    sp = load_search_space(space)
    load_ms = load_time_ms()
    head_price = PRICES["m5.xlarge (head)"][0]
    out: dict[str, Any] = {
        "space": f"search_spaces/{space}.yaml",
        "num_samples": sp.num_samples,
        "load_ms": load_ms,
        "assumptions": {
            "a10g_tflops": A10G_TFLOPS,
            "a10g_usable_bytes": A10G_USABLE_BYTES,
            "prices": PRICES,
            "real": REAL,
        },
        "models": {},
    }
    for model in MODELS:
        prof_eval = graph_profile(model, round(1024 * REAL["aspect"]), 1024)
        prof_train = graph_profile(model, 1024, 1024)
        saved = {
            mode: {dt: saved_activation_bytes(model, 1024, 1024, mode, DTYPES[dt]) / MIB for dt in DTYPES}
            for mode in ("all", "base", "head")
        }
        fit: dict[str, Any] = {}
        for what in ("trial", "base"):
            full = training_fit(model, A10G_USABLE_BYTES, what)
            half = training_fit(model, A10G_USABLE_BYTES // 2, what)
            fit[what] = {
                "full": _tuples_by_dtype(full),
                "half": _tuples_by_dtype(half),
                "fixed_gib": full[0]["fixed_gib"],
                "rows": full,
            }
        batch = preset_config(f"poster-{model}").batch_size

        size, b = _choose(fit["trial"]["full"]["fp32"], batch)
        gpu = trial_gpu_seconds(model, space, size, b, "fp32", cpu_bound_parts(run, model), load_ms)
        base_size, base_b = _choose(fit["base"]["full"]["fp32"], batch)
        base_build = base_gpu_seconds(model, base_size, base_b, "fp32", load_ms)
        sweep_gpu_s = sp.num_samples * gpu["total_s"] + base_build["total_s"]
        sweep = []
        for node, (price, gpus) in PRICES.items():
            if not gpus:
                continue
            nodes = 8 if gpus == 1 else 2  # cluster/gpu.yaml: max_workers of ray.worker.gpu1 / gpu4
            concurrent = min(sp.num_samples, nodes * gpus)
            wall_h = (base_build["total_s"] + math.ceil(sp.num_samples / concurrent) * gpu["total_s"]) / 3600
            node_usd = wall_h * price * nodes
            sweep.append(
                {
                    "node": node,
                    "price": price,
                    "nodes": nodes,
                    "gpus_per_node": gpus,
                    "wall_h": wall_h,
                    "node_usd": node_usd,
                    "head_usd": wall_h * head_price,
                    "usd": node_usd + wall_h * head_price,
                }
            )
        out["models"][model] = {
            "params": prof_train["params"],
            "whitening": prof_train["weights_by_group"]["whitening"],
            "gflop_eval": prof_eval["flops_total"] / 1e9,
            "gflop_train": prof_train["flops_total"] / 1e9,
            "largest_mib": prof_train["largest_activation"] * 4 / MIB,
            "saved_1024": saved,
            "fit": fit,
            "gpu": gpu,
            "base_build": base_build,
            "sweep_gpu_h": sweep_gpu_s / 3600,
            "sweep": sweep,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=None, help="bases, trial folders and results (run mode)")
    p.add_argument("--cache", type=Path, default=None, help="synthetic set cache (default: WORKDIR/cache)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--image-size", type=int, default=112, help="base and trial image size (presets: 1024)")
    p.add_argument("--base-steps", type=int, default=3, help="triplet steps of the base fine-tune")
    p.add_argument("--kmeans-images", type=int, default=500, help="images of the NetVLAD k-means init")
    p.add_argument(
        "--stage-steps", type=int, default=2, help="training steps of each trial stage (per round)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a parameter of the measured trial (repeatable); the trial: {json.dumps(TRIAL)}",
    )
    p.add_argument(
        "--trial-name", default="trial", help="name of the trial's folder and JSON under WORKDIR/MODEL"
    )
    p.add_argument("--reuse-base", action="store_true", help="keep a base an earlier run built in WORKDIR")
    p.add_argument("--threads", type=int, default=1, help="torch / faiss threads of each worker")
    p.add_argument("--device", default="cpu", help="torch device of the run; auto: CUDA if there is one")
    p.add_argument("--json", type=Path, default=None, help="results JSON (default: WORKDIR/real_size.json)")
    p.add_argument("--md", type=Path, default=None, help="results Markdown (default: WORKDIR/real_size.md)")
    p.add_argument("--cost-model", action="store_true", help="only the cost model (graph, fit, GPU-seconds)")
    p.add_argument("--from-json", type=Path, default=None, help="a run's JSON for the cost model's CPU parts")
    p.add_argument("--gpu-throughput", action="store_true", help="VGG16 extraction vs raw forward images/s")
    p.add_argument("--throughput-images", type=int, default=64, help="images per throughput measurement")
    p.add_argument("--worker", choices=("base", "trial"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _threads(args.threads)

    if args.gpu_throughput:
        if args.device == "cpu":
            args.device = "auto"
        result = gpu_throughput(args)
        text = json.dumps(result, indent=1)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        return 0
    if args.cost_model:
        run = json.loads(args.from_json.read_text()) if args.from_json else None
        cost = cost_model(run)
        text = markdown(run, cost)
        print(text)
        if args.json:
            args.json.write_text(json.dumps(cost, indent=1, default=str) + "\n")
        if args.md:
            args.md.write_text(text)
        return 0
    if args.workdir is None:
        p.error("--workdir is required to run the models (or pass --cost-model / --gpu-throughput)")
    args.workdir = args.workdir.resolve()
    args.cache = (args.cache or args.workdir / "cache").resolve()
    if args.worker:
        worker = worker_base if args.worker == "base" else worker_trial
        result = worker(args)
        _worker_json(args.worker, args.model, args).write_text(json.dumps(result, indent=1, default=str))
        return 0
    run = run_all(args)
    cost = cost_model(run)
    run["cost_model"] = cost
    text = markdown(run, cost)
    (args.json or args.workdir / "real_size.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
    (args.md or args.workdir / "real_size.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
