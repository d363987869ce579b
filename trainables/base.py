"""The shared base model of a sweep (DESIGN §3 stage 1): NetVLAD k-means init, triplet fine-tune, PCA whitening.

`build_base(config, out_dir)` writes ``out_dir/model.safetensors`` and ``out_dir/meta.json`` (config, its key,
mAP per test set for random ranking / off-the-shelf / fine-tuned, seconds per stage); `load_base(out_dir)` reads
them back. The fine-tuned mAP in the meta is the reference every trial's ``mAP_drop`` is measured against.
A sweep caches one base per `BaseConfig.key()` (sweep/base_cache.py).

Protocols: ``synthetic`` trains on ``synthetic-train`` and tests on ``synthetic-test`` (disjoint places);
real data is cross-dataset as in the poster: train on ``paris6k`` -> test on ``oxford5k``, and the reverse.

CLI::

    python -m trainables.base --dataset synthetic --backbone tiny --out DIR [--data-root ...] [--steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss  # DESIGN §9: faiss before torch (both bring OpenMP)
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainables.netvlad.model import NetVLADConfig, NetVLADModel, build_netvlad, fit_whitening, init_clusters
from trainables.train import train_triplet

log = logging.getLogger(__name__)

#: Bump when the build procedure changes so cached bases keyed by `BaseConfig.key()` are rebuilt.
BASE_FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"

#: dataset -> (train split, test splits). Real data is cross-dataset (poster: Paris -> Oxford and vice versa).
PROTOCOLS: dict[str, tuple[str, list[str]]] = {
    "synthetic": ("synthetic-train", ["synthetic-test"]),
    "paris6k": ("paris6k", ["oxford5k"]),
    "oxford5k": ("oxford5k", ["paris6k"]),
    "rparis6k": ("rparis6k", ["roxford5k"]),
    "roxford5k": ("roxford5k", ["rparis6k"]),
}


@dataclass
class BaseConfig:
    """Everything that determines a base model. Defaults: the embedded CPU demo (tiny backbone, minutes)."""

    dataset: str = "synthetic"
    #: Real datasets: the folder holding <name>/; synthetic: the cache folder (None = default cache).
    #: Not part of `key()`: it says where the data is, not what it is.
    data_root: str | None = None
    backbone: str = "tiny"
    weights: str | None = None
    #: K=32 over D=128: fine-tuning helped on every seed tried (K=16 did not); the 256 x 4096 whitening is then
    #: ~80% of the parameters, as in the paper models. 256 <= 332, the rank the 333 synthetic train images allow.
    num_clusters: int = 32
    whitening_dim: int | None = 256
    #: Longest image side for evaluation and k-means; training tuples are image_size x image_size squares.
    image_size: int = 128
    #: Tuned on the synthetic set (benchmarks/RESULTS.md): Adam at 1e-3 or 3e-4 first wrecks the random tiny
    #: features (test mAP 48 -> 26 / 33 after 50 steps); 1e-4 climbs steadily, 300 steps fit the CPU budget.
    steps: int = 300
    lr: float = 1e-4
    margin: float = 0.1
    batch_size: int = 4
    num_negatives: int = 5
    num_positives: int = 1
    neg_pool_size: int = 200
    #: Re-mine hard negatives every this many steps (None: once per pass over the training anchors).
    refresh_every: int | None = None
    kmeans_images: int = 500
    kmeans_per_image: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in PROTOCOLS:
            raise ValueError(f"dataset={self.dataset!r} is not one of {', '.join(PROTOCOLS)}")
        # Validates backbone / num_clusters / whitening_dim with the model's own rules.
        NetVLADConfig(self.backbone, self.num_clusters, self.whitening_dim, self.weights)
        for name in ("image_size", "batch_size", "num_negatives", "num_positives", "kmeans_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or not self.lr > 0:
            raise ValueError(f"need steps >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}")

    @property
    def train_split(self) -> str:
        return PROTOCOLS[self.dataset][0]

    @property
    def test_splits(self) -> list[str]:
        return list(PROTOCOLS[self.dataset][1])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown base config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def key(self) -> str:
        """Stable 16-hex hash of everything that changes the model (not ``data_root``)."""
        d = self.to_dict()
        d.pop("data_root")
        d["format_version"] = BASE_FORMAT_VERSION
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _random_ranking_map(dataset: Any, seed: int, repeats: int = 5) -> float:
    """mAP of a random ranking (the floor any model must beat), averaged over ``repeats`` permutations."""
    from trainables.retrieval.evaluate import random_ranking_map

    return float(np.mean([random_ranking_map(dataset, seed=seed + i) for i in range(repeats)]))


def _evaluate(
    model: NetVLADModel, datasets: dict[str, Any], image_size: int, device: torch.device, progress: bool
) -> dict[str, dict[str, float]]:
    from trainables.retrieval.evaluate import evaluate_dataset

    model.eval()
    return {
        name: {k: float(v) for k, v in evaluate_dataset(model, ds, image_size, device, progress).items()}
        for name, ds in datasets.items()
    }


def _write_atomically(out_dir: Path, write: Any, overwrite: bool) -> Path:
    """Run ``write(tmp_dir)`` then rename tmp_dir to out_dir, so a crash never leaves a half-written base."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        write(tmp)
        old = None
        if out_dir.exists() and overwrite:
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            if (out_dir / META_FILE).is_file():
                # Another process finished the same base first: keep theirs (same config key, same result).
                log.info("base %s was written concurrently; keeping the existing one", out_dir)
                shutil.rmtree(tmp, ignore_errors=True)
                return out_dir
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def build_base(
    config: BaseConfig,
    out_dir: str | os.PathLike,
    device: torch.device | str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build the base model of ``config`` and write it to ``out_dir`` (atomically); returns ``out_dir``.

    Steps: seed; build model (no whitening yet); k-means-init NetVLAD from train images; evaluate off-the-shelf;
    triplet fine-tune; learn whitening on the train split; evaluate; write model + meta.
    """
    from trainables.data.registry import load_dataset
    from trainables.data.tuples import TripletMiner
    from trainables.retrieval.extract import extract_descriptors

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; pass overwrite=True or pick another --out"
        )
    device = torch.device(device) if device is not None else torch.device("cpu")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    train = load_dataset(config.train_split, config.data_root)
    tests = {name: load_dataset(name, config.data_root) for name in config.test_splits}
    seconds["data"] = time.perf_counter() - t0
    log.info("train: %s; test: %s", config.train_split, ", ".join(tests))

    t = time.perf_counter()
    model = NetVLADModel(NetVLADConfig(config.backbone, config.num_clusters, None, config.weights)).to(device)
    kmeans = init_clusters(
        model,
        train.image_paths(),
        n_images=config.kmeans_images,
        per_image=config.kmeans_per_image,
        seed=config.seed,
        image_size=config.image_size,
        progress=progress,
    )
    seconds["kmeans_init"] = time.perf_counter() - t

    t = time.perf_counter()
    maps: dict[str, dict[str, Any]] = {
        name: {"random": _random_ranking_map(ds, config.seed)} for name, ds in tests.items()
    }
    for name, res in _evaluate(model, tests, config.image_size, device, progress).items():
        maps[name]["off_the_shelf"] = res
    seconds["eval_off_the_shelf"] = time.perf_counter() - t

    t = time.perf_counter()
    miner = TripletMiner(
        train,
        config.image_size,
        num_negatives=config.num_negatives,
        neg_pool_size=config.neg_pool_size,
        seed=config.seed,
        num_positives=config.num_positives,
    )
    losses = train_triplet(
        model,
        miner,
        config.steps,
        config.lr,
        device=device,
        progress=progress,
        refresh_every=config.refresh_every,
        batch_size=config.batch_size,
        margin=config.margin,
    )
    seconds["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    for name, res in _evaluate(model, tests, config.image_size, device, progress).items():
        maps[name]["finetuned_no_whitening"] = res
    seconds["eval_no_whitening"] = time.perf_counter() - t

    if config.whitening_dim is not None:
        t = time.perf_counter()
        model.eval()
        vlad = extract_descriptors(
            model,
            train.image_paths(),
            config.image_size,
            device=device,
            progress=progress,
            skip_unreadable=True,
            desc="whitening: train VLADs",
        )
        vlad = vlad[np.isfinite(vlad).all(axis=1)]  # unreadable images come back as NaN rows
        fit_whitening(model, vlad, config.whitening_dim)
        seconds["whitening"] = time.perf_counter() - t
        t = time.perf_counter()
        for name, res in _evaluate(model, tests, config.image_size, device, progress).items():
            maps[name]["finetuned"] = res
        seconds["eval_finetuned"] = time.perf_counter() - t
    else:
        for name in maps:
            maps[name]["finetuned"] = maps[name]["finetuned_no_whitening"]
    seconds["total"] = time.perf_counter() - t0

    reference = float(np.mean([m["finetuned"]["mAP"] for m in maps.values()]))
    meta = {
        "format_version": BASE_FORMAT_VERSION,
        "config": config.to_dict(),
        "key": config.key(),
        "model": model.config_dict(),
        "train_split": config.train_split,
        "test_splits": config.test_splits,
        "mAP": reference,
        "maps": maps,
        "seconds": seconds,
        "seed": config.seed,
        "kmeans": kmeans,
        "alpha": model.pool.alpha,
        "loss": {
            "first": losses[0] if losses else None,
            "last_10_mean": float(np.mean(losses[-10:])) if losses else None,
            "steps": len(losses),
        },
        "torch": torch.__version__,
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / MODEL_FILE), metadata={"model": json.dumps(model.config_dict())})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return _write_atomically(out_dir, write, overwrite)


def load_base(
    out_dir: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[NetVLADModel, dict[str, Any]]:
    """Load a base written by `build_base`: ``(model in eval mode, meta dict)``."""
    out_dir = Path(out_dir)
    meta_path, model_path = out_dir / META_FILE, out_dir / MODEL_FILE
    missing = [str(p) for p in (meta_path, model_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"not a base model folder: missing {', '.join(missing)} (build one with python -m trainables.base)"
        )
    meta = json.loads(meta_path.read_text())
    model = build_netvlad(meta["model"])
    model.load_state_dict(load_file(str(model_path), device="cpu"))
    model.pool.alpha = meta.get("alpha")
    return model.to(device).eval(), meta


def map_table(meta: dict[str, Any]) -> str:
    """The meta's mAP numbers as a markdown table."""
    cols = ["random", "off_the_shelf", "finetuned_no_whitening", "finetuned"]
    lines = ["| test set | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in meta["maps"].items():
        cells = [m[c] if c == "random" else m[c]["mAP"] for c in cols]
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = BaseConfig()
    p = argparse.ArgumentParser(prog="python -m trainables.base", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=defaults.dataset, choices=sorted(PROTOCOLS))
    p.add_argument("--out", required=True, help="output folder (must not exist, or use --overwrite)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default=defaults.backbone, choices=["tiny", "alexnet", "vgg16"])
    p.add_argument("--weights", default=None, help="'imagenet' (torchvision cache only) or a state-dict path")
    p.add_argument("--num-clusters", type=int, default=defaults.num_clusters)
    p.add_argument("--whitening-dim", type=int, default=defaults.whitening_dim, help="0 = no whitening")
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch/faiss CPU threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    try:
        config = BaseConfig(
            dataset=args.dataset,
            data_root=args.data_root,
            backbone=args.backbone,
            weights=args.weights,
            num_clusters=args.num_clusters,
            whitening_dim=args.whitening_dim or None,
            image_size=args.image_size,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
        )
        out = build_base(
            config, args.out, device=args.device, progress=not args.quiet, overwrite=args.overwrite
        )
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((out / META_FILE).read_text())
    print(f"base model {meta['key']} written to {out}")
    print(map_table(meta))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in meta["seconds"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
