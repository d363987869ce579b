"""Does the retraining recipe recover mAP? The embedded base at three operating points, three ways.

The recipe (trainables/train.py): Adam with steps relative to each tensor's RMS, the dense base as a teacher
(``teacher=``: its descriptors of the training images are the targets, beside the triplet loss), L1 as a proximal
step. The trial gets the teacher from trainables/pipeline.py.

For each operating point (trial parameters over the fixed values of ``search_spaces/smoke.yaml``: the recipe that
ships) the base is compressed three times at the same per-layer sparsity and bits, so the three files have the
same size:

- ``recipe``: the shipped schedule: L1 (proximal) sparsify → prune → retrain → k-means → trained centroids;
- ``no L1``: the same steps with λ = 0, each layer pruned at the threshold that drops as many weights as the
  recipe's prune mask does;
- ``no retraining``: no training step at all (post-training pruning + k-means), same per-layer sparsity.

Each file is written with the codec, decoded into a fresh model and measured on the validation and the test split;
drops are relative to the dense base on the same split. The operating points are chosen on validation.

    python benchmarks/bench_recipe.py --base DIR [--space smoke.yaml] [--scale layer|channel] [--threads 1]
        [--json out.json]

``--base``: a base folder (``python -m trainables.base --preset embedded --out DIR``); without it the embedded base
is built into a temporary folder first. ``--scale``: the trial parameter ``scale`` of every group (one codebook per
layer, or per-output-channel scales; default: the space's value).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss  # before torch: both bring OpenMP (docs/traps.md#faiss-before-torch)
import torch
import yaml

from search_spaces.schema import load_search_space
from trainables.base import MODEL_FILE, build_base, load_base, preset_config, retrain_fn, trial_miner
from trainables.compression.codec import load_compressed, save_compressed
from trainables.compression.plan import CompressionPlan, group_layers
from trainables.compression.prune import prune_layers
from trainables.compression.quantize import effective_weight, prune_mask
from trainables.compression.schedule import quantize_and_finetune, sparsify
from trainables.contract import SCALE_MODES, resolve_trial_config
from trainables.data.registry import load_dataset
from trainables.retrieval.evaluate import evaluate_dataset

#: The operating points, as trial parameters over the space's fixed values (named "conv bits / depthwise bits"):
#: about 8x, 10x, 12x and 20x smaller on the embedded base with smoke.yaml's channel-scaled recipe
#: (benchmarks/RESULTS.md). Three are pruned, so that "no L1" at equal sparsity means something; 3/4 is not,
#: as the sweep's best points are not.
ARMS: tuple[str, ...] = ("recipe", "no L1", "no retraining")
#: smoke.yaml searches l1_lambda; the points fix it at 2, the value the recipe shipped with before (and that
#: RESULTS.md measured): a ``--point`` without it gets the contract's default, 0.
RECIPE_L1_LAMBDA = 2.0
POINTS: dict[str, dict[str, Any]] = {
    "4/4 bits": {"bits_conv": 4, "bits_depthwise": 4, "threshold_conv": 0.1, "l1_lambda": RECIPE_L1_LAMBDA},
    "3/4 bits": {"bits_conv": 3, "bits_depthwise": 4, "threshold_conv": 0.0, "l1_lambda": RECIPE_L1_LAMBDA},
    "2/4 bits": {"bits_conv": 2, "bits_depthwise": 4, "threshold_conv": 0.1, "l1_lambda": RECIPE_L1_LAMBDA},
    "1/3 bits": {"bits_conv": 1, "bits_depthwise": 3, "threshold_conv": 0.2, "l1_lambda": RECIPE_L1_LAMBDA},
    # Entropy-constrained k-means of the conv group at 32 centroids (smoke.yaml's axis since it shipped): about
    # 10x and 12x smaller, with smoke.yaml's fixed values (no conv mask, float16 NetVLAD centres).
    "rate 0.004": {"kmeans_rate_conv": 0.004, "bits_depthwise": 4, "l1_lambda": RECIPE_L1_LAMBDA},
    "rate 0.01": {"kmeans_rate_conv": 0.01, "bits_depthwise": 4, "l1_lambda": RECIPE_L1_LAMBDA},
}


def _pruned_counts(model: torch.nn.Module, groups: dict[str, list[str]]) -> dict[str, int]:
    """Entries each layer's prune mask drops (0 for a layer with no mask). Not the exact zeros: at a threshold of 0
    the recipe keeps the weights L1 set to 0, and retraining moves them again."""
    out = {}
    for _, name, module in group_layers(model, groups):
        mask = prune_mask(module)
        out[name] = 0 if mask is None else int((~mask).sum())
    return out


def _matching_thresholds(model: torch.nn.Module, target: dict[str, int]) -> dict[str, float]:
    """Per-layer absolute thresholds that prune each layer of ``model`` as many entries as ``target`` (a
    `_pruned_counts`) says: the k-th smallest |w| (ties may prune a few more)."""
    out = {}
    for name, k in target.items():
        w = effective_weight(model.get_submodule(name)).detach().abs().reshape(-1)
        out[name] = float(w.kthvalue(k).values) * (1 + 1e-7) if k > 0 else 0.0
    return out


def _measure(model, plan, meta, work: Path, splits: dict[str, Any], device) -> dict[str, Any]:
    path = work / "model.vlad.safetensors"
    report = save_compressed(
        model, plan, path, meta={"architecture": {"name": "netvlad", "config": model.config_dict()}}
    )
    decoded = load_compressed(path).to(device)
    size = int(meta["config"]["image_size"])
    maps = {name: evaluate_dataset(decoded, ds, size, device=device)["mAP"] for name, ds in splits.items()}
    val = sum(maps[s] for s in meta["val_splits"]) / len(meta["val_splits"])
    test = sum(maps[s] for s in meta["test_splits"]) / len(meta["test_splits"])
    return {
        "file_bytes": report.totals["file_bytes"],
        "sparsity": report.totals["sparsity"],
        "val_mAP": val,
        "test_mAP": test,
        "val_drop": (meta["val_mAP"] - val) / meta["val_mAP"],
        "test_drop": (meta["test_mAP"] - test) / meta["test_mAP"],
    }


def run_point(
    base_dir: Path,
    fixed: dict[str, Any],
    point: dict[str, Any],
    splits,
    miner,
    device,
    work: Path,
    arms: tuple[str, ...] = ARMS,
    distill: bool = True,
):
    settings = resolve_trial_config({**fixed, **point})
    plan = CompressionPlan.from_dict(settings["plan"])
    base, meta = load_base(base_dir, device)
    train_fn = retrain_fn(base, meta, miner, settings["lr"], device=device, distill=distill)
    groups = {g: n for g, n in base.compression_groups().items() if g in plan.groups}
    results: dict[str, Any] = {}
    target: dict[str, Any] = {}
    for arm in arms:
        arm_plan = plan
        if arm != "recipe":
            no_train = {"l1_steps": 0, "retrain_steps": 0, "quant_steps": 0} if arm == "no retraining" else {}
            arm_plan = CompressionPlan.from_dict({**settings["plan"], "l1_lambda": 0.0, **no_train})
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        t = time.perf_counter()
        sparsify(model, arm_plan, groups, train_fn)
        # The prune stage (schedule.prune_and_retrain), with the other arms pruned to the recipe's per-layer
        # sparsity of each round instead of at the plan's thresholds.
        for r in range(arm_plan.prune_rounds):
            if arm == "recipe":
                prune_layers(model, arm_plan, groups)
                target[r] = _pruned_counts(model, groups)
            else:
                prune_layers(model, arm_plan, groups, _matching_thresholds(model, target[r]))
            if arm_plan.retrain_steps:
                train_fn(model, arm_plan.retrain_steps, None)
        quantize_and_finetune(model, arm_plan, groups, train_fn)
        seconds = time.perf_counter() - t
        results[arm] = {**_measure(model, arm_plan, meta, work, splits, device), "train_seconds": seconds}
    return results


def _value(text: str) -> Any:
    """A --set value: a number if it reads as one (YAML 1.1 reads 3e-3 as a string), else YAML."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, default=None, help="base folder (default: build the embedded base)")
    p.add_argument("--space", default="smoke.yaml", help="search space whose fixed values are the recipe")
    p.add_argument("--points", nargs="*", default=list(POINTS), choices=list(POINTS))
    p.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="NAME:K=V,K=V",
        help="a further operating point, e.g. 'c3:bits=3,threshold_conv=0' (trial parameters, YAML values)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-distill", action="store_true", help="retrain on the triplet loss alone")
    p.add_argument(
        "--arms",
        nargs="+",
        default=list(ARMS),
        choices=list(ARMS),
        help="'recipe' runs first: the others match it",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="override fixed values (YAML values), for tuning",
    )
    p.add_argument(
        "--scale",
        choices=SCALE_MODES,
        default=None,
        help="codebook scale of every group (trial parameter 'scale'; default: the space's)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        base_dir = args.base
        if base_dir is None:
            base_dir = build_base(preset_config("embedded"), Path(tmp) / "base", progress=False)
        _, meta = load_base(base_dir)
        cfg = meta["config"]
        splits = {
            s: load_dataset(s, cfg["data_root"])
            for s in dict.fromkeys(meta["val_splits"] + meta["test_splits"])
        }
        fixed = dict(load_search_space(args.space).fixed)
        fixed.update({k: _value(v) for k, v in (item.split("=", 1) for item in args.set)})
        if args.scale is not None:
            fixed["scale"] = args.scale
        base_bytes = (Path(base_dir) / MODEL_FILE).stat().st_size
        points = {name: POINTS[name] for name in args.points}
        for item in args.point:
            name, _, params = item.partition(":")
            points[name] = {k: _value(v) for k, v in (kv.split("=", 1) for kv in params.split(","))}
        rows = {}
        for name in points:
            miner = trial_miner(meta, cfg["data_root"], seed=0)
            rows[name] = run_point(
                Path(base_dir),
                fixed,
                points[name],
                splits,
                miner,
                device,
                Path(tmp),
                tuple(args.arms),
                not args.no_distill,
            )
            print(name, json.dumps(rows[name]), flush=True)
    print(
        f"\nbase: val mAP {meta['val_mAP']:.4f}, test mAP {meta['test_mAP']:.4f}, {base_bytes / 2**20:.3f} MiB"
    )
    print(f"recipe (fixed values of {args.space}): " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + "\n")
    print("| point | params | × smaller | sparsity | arm | val mAP | val drop | test mAP | test drop |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for name, arms in rows.items():
        for arm in [a for a in ("no retraining", "no L1", "recipe") if a in arms]:
            r = arms[arm]
            params = ", ".join(f"{k}={v}" for k, v in points[name].items())
            print(
                f"| {name} | {params} | {base_bytes / r['file_bytes']:.1f} | {r['sparsity']:.1%} | {arm} | "
                f"{r['val_mAP']:.4f} | {r['val_drop']:.2%} | {r['test_mAP']:.4f} | {r['test_drop']:.2%} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"base_bytes": base_bytes, "meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
