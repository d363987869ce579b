"""The shared base model of a sweep (docs/stages.md#the-base-model): NetVLAD k-means init, triplet fine-tune, PCA whitening.

`build_base(config, out_dir)` writes ``out_dir/model.safetensors`` and ``out_dir/meta.json`` (config, its key,
mAP per test set for random ranking / off-the-shelf / fine-tuned, seconds per stage); `load_base(out_dir)` reads
them back. The fine-tuned mAP in the meta is the reference every trial's ``mAP_drop`` is measured against.
A sweep caches one base per `BaseConfig.key()` (sweep/base_cache.py).

Protocols: ``synthetic`` trains on ``synthetic-train`` and tests on ``synthetic-test`` (disjoint places);
real data is cross-dataset as in the poster: train on ``paris6k`` -> test on ``oxford5k``, and the reverse.

Presets (`PRESETS`) name the base models a user builds; flags override single fields. CLI::

    python -m trainables.base --preset embedded --out DIR
    python -m trainables.base --preset poster-vgg16 --data-root D --show      # print the config, build nothing
    python -m trainables.base --dataset paris6k --data-root D --backbone alexnet --out DIR   # = poster-alexnet
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss  # before torch: both bring OpenMP (docs/traps.md#faiss-before-torch)
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainables.contract import MEMORY_KEY, TEST_MAP_KEY, VAL_MAP_KEY
from trainables.data.registry import load_dataset
from trainables.data.tuples import TripletMiner
from trainables.devices import process_loader_workers
from trainables.fileio import atomic_directory
from trainables.netvlad.backbones import BACKBONES, FINETUNED_LAYERS
from trainables.netvlad.model import NetVLADConfig, NetVLADModel, build_netvlad, fit_whitening, init_clusters
from trainables.progress import counting_calls
from trainables.progress import progress as progress_bar
from trainables.retrieval.baselines import baseline_map
from trainables.retrieval.evaluate import evaluate_dataset, random_ranking_map
from trainables.retrieval.extract import extract_descriptors
from trainables.train import make_train_fn, train_triplet

log = logging.getLogger(__name__)

#: Bump when the build procedure changes so cached bases keyed by `BaseConfig.key()` are rebuilt.
BASE_FORMAT_VERSION = 2
#: ``--data-root``'s default: the cluster files export it on every node (the laptop that runs `ray submit` would
#: expand a ``~`` in the flag to its own home).
DATA_ROOT_ENV = "VLADSWEEP_DATA_ROOT"
#: The ``weights`` value that asks for a random init in so many words (stored as None, so the key is the same).
RANDOM_WEIGHTS = "random"
#: How often a trial re-mines hard negatives (`retrain_fn`): 0 = once, with the dense base, on its first step. A
#: re-mining describes every training anchor and the negative pool (a pass over paris6k on VGG16),
#: and negatives mined with the base stay hard for its compressed copies.
TRIAL_REFRESH_EVERY = 0
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"

#: dataset -> (train split, validation splits, test splits). Selection (the search, the front, release) reads
#: validation only; test is reported beside it. Real data is cross-dataset as in the poster: fine-tune on Paris,
#: validate on the Paris benchmark (its own queries), test on Oxford, and the reverse. Synthetic: validation holds
#: new views of the training places (the bundled photos do not allow a third set of places), test holds other
#: places.
PROTOCOLS: dict[str, tuple[str, list[str], list[str]]] = {
    "synthetic": ("synthetic-train", ["synthetic-val"], ["synthetic-test"]),
    # The same set with 4,225 training images (trainables.data.registry.SYNTHETIC_VARIANTS): enough for PCA-4096.
    "synthetic-large": ("synthetic-large-train", ["synthetic-large-val"], ["synthetic-large-test"]),
    "paris6k": ("paris6k", ["paris6k"], ["oxford5k"]),
    "oxford5k": ("oxford5k", ["oxford5k"], ["paris6k"]),
    "rparis6k": ("rparis6k", ["rparis6k"], ["roxford5k"]),
    "roxford5k": ("roxford5k", ["roxford5k"], ["rparis6k"]),
}


@dataclass
class BaseConfig:
    """Everything that determines a base model. The field defaults are the ``tiny`` preset (synthetic data, the
    small CNN); the other presets in ``PRESETS`` change some of them."""

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
    #: Longest image side for evaluation, extraction and k-means.
    image_size: int = 128
    #: Side of the square training tuples (base fine-tune, hard-negative mining, a trial's retraining); None =
    #: ``image_size``. A step holds (1 + P + N) x batch_size images in memory at once, so training can need a
    #: smaller size than evaluation (benchmarks/RESULTS.md, "Training fit"). None is left out of `key()`.
    train_image_size: int | None = None
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
        if self.weights == RANDOM_WEIGHTS:
            self.weights = None
        self._check_weights()
        # Validates backbone / num_clusters / whitening_dim with the model's own rules.
        NetVLADConfig(self.backbone, self.num_clusters, self.whitening_dim, self.weights)
        for name in ("image_size", "batch_size", "num_negatives", "num_positives", "kmeans_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_image_size is not None and self.train_image_size < 1:
            raise ValueError(
                f"train_image_size must be >= 1 or None (= image_size), got {self.train_image_size}"
            )
        if self.steps < 0 or not self.lr > 0:
            raise ValueError(f"need steps >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}")

    def _check_weights(self) -> None:
        # AlexNet/VGG16 fine-tune conv5 only (FINETUNED_LAYERS): from a random init the frozen layers stay random
        # for the whole sweep, and every mAP it measures is that of noise features. No opt-in: a base without
        # pretrained weights is only meaningful for a backbone that trains every layer.
        tuned = FINETUNED_LAYERS.get(self.backbone)
        if self.weights is None and tuned is not None:
            raise ValueError(
                f"backbone {self.backbone} with random weights: only its layers {', '.join(tuned)} (conv5) are "
                "fine-tuned, the others are frozen and would stay random. Pass --weights imagenet (torchvision's "
                "file in the torch hub cache, never downloaded) or --weights PATH (a state-dict file); without "
                f"pretrained weights use a backbone that trains every layer (--backbone tiny or efficientnet_lite0 "
                f"with --weights {RANDOM_WEIGHTS})"
            )
        # tiny is the one backbone without ImageNet weights (it exists only for CPU demos and tests).
        if self.weights == "imagenet" and self.backbone == "tiny":
            raise ValueError(f"backbone tiny has no ImageNet weights: pass --weights {RANDOM_WEIGHTS}")

    @property
    def train_size(self) -> int:
        """Side of the square training images (`train_image_size`, else `image_size`)."""
        return train_image_size(self.to_dict())

    @property
    def train_split(self) -> str:
        return PROTOCOLS[self.dataset][0]

    @property
    def val_splits(self) -> list[str]:
        return list(PROTOCOLS[self.dataset][1])

    @property
    def test_splits(self) -> list[str]:
        return list(PROTOCOLS[self.dataset][2])

    @property
    def eval_splits(self) -> list[str]:
        """Every split the base is measured on: validation then test, each once."""
        return list(dict.fromkeys(self.val_splits + self.test_splits))

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
        if d["train_image_size"] is None:  # the default: keys of configs from before the field stay the same
            d.pop("train_image_size")
        d["format_version"] = BASE_FORMAT_VERSION
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Named base models, hloc style: each preset is the `BaseConfig` fields it sets over the dataclass defaults
#: (the ``tiny`` model). A command line picks one with ``--preset NAME`` and overrides single fields with their
#: flags; ``--preset NAME --show`` prints the result. The one table of base-model defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default of `python sweep/run.py`: synthetic landmarks, ImageNet EfficientNet-Lite0 cut after
    # blocks[4] (benchmarks/bench_backbones.py), batch norm folded into the convolutions. No whitening: PCA
    # whitening learned on the 333 training images lowered the fine-tuned model's test mAP at every dimension
    # tried (82.1 without; 72.7 / 75.8 / 78.3 / 77.2 at 32 / 64 / 128 / 256 dims; benchmarks/RESULTS.md).
    "embedded": {
        "backbone": "efficientnet_lite0",
        "weights": "imagenet",
        "num_clusters": 32,
        "whitening_dim": None,
        "image_size": 128,
        "steps": 300,
    },
    # The small CNN from random weights: the whole pipeline in seconds, for development and the tests.
    "tiny": {},
    # The tests' base: the tiny CNN with a short fine-tune, so a test sweep builds it in seconds.
    "tiny-test": {"steps": 10},
    # The poster's models: K=64 clusters over conv5, PCA-4096 whitening, evaluated at full size (GPU jobs).
    # ImageNet weights: conv1-4 stay frozen (trainables/netvlad/backbones.py FINETUNED_LAYERS).
    # AlexNet trains at 1024 too: the fit table (benchmarks/RESULTS.md, "Training fit on a 24 GB A10G") has its
    # trial (every layer retrains) at 23 / 10 tuples of 1024² in fp32 on a whole / half A10G, above the batch of 4.
    "poster-alexnet": {
        "dataset": "paris6k",
        "backbone": "alexnet",
        "weights": "imagenet",
        "num_clusters": 64,
        "whitening_dim": 4096,
        "image_size": 1024,
    },
    "poster-vgg16": {
        "dataset": "paris6k",
        "backbone": "vgg16",
        "weights": "imagenet",
        "num_clusters": 64,
        "whitening_dim": 4096,
        "image_size": 1024,
        # cirtorch's VGG16 training size. At 1024² a VGG16 trial fits 1 tuple on a whole A10G (fp32); at 384² it
        # fits 8 whole / 3 on half a GPU (the fit table): batch 4 at 362² needs --gpus-per-trial 1.
        "train_image_size": 362,
    },
}


def default_preset(dataset: str | None, backbone: str | None) -> str:
    """The preset a command line uses when it names none: the embedded model for synthetic data, the poster's
    model of the backbone (AlexNet unless VGG16 is asked for) for real data."""
    if dataset is None or dataset == "synthetic":
        return "embedded"
    return "poster-vgg16" if backbone == "vgg16" else "poster-alexnet"


def preset_config(name: str, overrides: Mapping[str, Any] | None = None) -> BaseConfig:
    """`BaseConfig` of preset ``name`` with the fields in ``overrides`` replaced (None is a value there: e.g.
    ``whitening_dim=None`` = no whitening); ``ValueError`` names a bad preset, field or value."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not one of {', '.join(PRESETS)}")
    return BaseConfig.from_dict({**PRESETS[name], **(overrides or {})})


def describe_base_config(config: BaseConfig, preset: str | None = None) -> str:
    """The config as ``field = value`` lines (what ``--show`` prints), with its cache key and protocol."""
    lines = [f"# base model{f' (preset {preset})' if preset else ''}, key {config.key()}"]
    lines += [f"{k} = {v!r}" for k, v in config.to_dict().items()]
    lines.append(
        f"# trains on {config.train_split}, validates on {', '.join(config.val_splits)}, "
        f"tests on {', '.join(config.test_splits)}"
    )
    return "\n".join(lines)


def add_base_arguments(
    parser: argparse.ArgumentParser, *, steps_flag: str = "--steps", lr_flag: str = "--lr"
) -> None:
    """The base-model flags every command line shares (``python -m trainables.base`` and ``sweep/run.py``):
    ``--preset``/``--show`` and one flag per field a user changes. Choices come from the library's tables;
    defaults are the preset's (a flag left out keeps the preset's value), so no command line holds its own."""
    g = parser.add_argument_group("base model (a preset, and flags that override its fields)")
    g.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="base preset (default: embedded for "
        "synthetic data, poster-alexnet / poster-vgg16 for real data)",
    )
    g.add_argument("--show", action="store_true", help="print the resolved base config and exit")
    g.add_argument(
        "--dataset",
        default=None,
        choices=list(PROTOCOLS),
        help="training set of the base (cross protocol: Paris trains -> Oxford tests, and the reverse)",
    )
    g.add_argument(
        "--data-root",
        default=None,
        help=f"folder holding the datasets (not needed for synthetic; default: ${DATA_ROOT_ENV}, set on cluster "
        "nodes)",
    )
    g.add_argument("--backbone", default=None, choices=list(BACKBONES), help="backbone CNN")
    g.add_argument(
        "--weights",
        default=None,
        help="backbone weights: 'imagenet' (torchvision cache, never downloads), a state-dict path or "
        f"'{RANDOM_WEIGHTS}' (only for backbones that train every layer: tiny, efficientnet_lite0)",
    )
    g.add_argument("--num-clusters", type=int, default=None, help="NetVLAD clusters K")
    g.add_argument("--whitening-dim", type=int, default=None, help="PCA whitening dimension (0 = none)")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="longest image side for evaluation (and training, by default)",
    )
    g.add_argument(
        "--train-image-size",
        type=int,
        default=None,
        help="side of the square training images (fine-tune, mining, trial retraining; default: --image-size)",
    )
    g.add_argument(
        steps_flag, dest="steps", type=int, default=None, help="triplet fine-tune steps of the base"
    )
    g.add_argument(lr_flag, dest="lr", type=float, default=None, help="learning rate of the base fine-tune")
    g.add_argument(
        "--seed", type=int, default=0, help="seed for data and training (a sweep's sampler: --search-seed)"
    )


def base_config_from_args(args: argparse.Namespace) -> tuple[BaseConfig, str]:
    """``(config, preset name)`` from the flags of `add_base_arguments`: the preset, with every flag that was
    given overriding its field. ``ValueError`` says what is wrong."""
    preset = args.preset or default_preset(args.dataset, args.backbone)
    flags = (
        "dataset",
        "data_root",
        "backbone",
        "weights",
        "num_clusters",
        "image_size",
        "train_image_size",
        "steps",
        "lr",
        "seed",
    )
    overrides: dict[str, Any] = {f: getattr(args, f) for f in flags if getattr(args, f) is not None}
    if args.whitening_dim is not None:
        overrides["whitening_dim"] = args.whitening_dim or None  # 0 = no whitening
    config = preset_config(preset, overrides)
    if not config.dataset.startswith("synthetic") and not config.data_root and os.environ.get(DATA_ROOT_ENV):
        config = dataclasses.replace(config, data_root=os.environ[DATA_ROOT_ENV])
    if config.data_root:  # a quoted '~/data' means the home of the machine the sweep runs on
        config = dataclasses.replace(config, data_root=os.path.expanduser(config.data_root))
    if not config.dataset.startswith("synthetic") and not config.data_root:
        raise ValueError(
            f"--dataset {config.dataset} needs --data-root (the folder that holds {config.dataset}/)"
        )
    return config, preset


def _random_ranking_map(dataset: Any, seed: int, repeats: int = 5) -> float:
    """mAP of a random ranking (the floor any model must beat), averaged over ``repeats`` permutations."""
    return float(np.mean([random_ranking_map(dataset, seed=seed + i) for i in range(repeats)]))


def _evaluate(
    model: NetVLADModel,
    datasets: dict[str, Any],
    image_size: int,
    device: torch.device,
    progress: bool,
    workers: int = 0,
) -> dict[str, dict[str, float]]:
    model.eval()
    return {
        name: {
            k: float(v)
            for k, v in evaluate_dataset(model, ds, image_size, device, progress, num_workers=workers).items()
        }
        for name, ds in datasets.items()
    }


def build_base(
    config: BaseConfig,
    out_dir: str | os.PathLike,
    device: torch.device | str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    loader_workers: int | None = None,
) -> Path:
    """Build the base model of ``config`` and write it to ``out_dir`` (atomically); returns ``out_dir``.

    Steps: seed; build model (no whitening yet); k-means-init NetVLAD from train images; evaluate off-the-shelf;
    triplet fine-tune; learn whitening on the train split; evaluate; write model + meta.
    ``loader_workers``: image-decoding processes of the evaluations, the fine-tune and the whitening (None: the
    process's number, `trainables.devices.process_loader_workers`); the base is the same for any.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; pass overwrite=True or pick another --out"
        )
    device = torch.device(device) if device is not None else torch.device("cpu")
    workers = process_loader_workers() if loader_workers is None else loader_workers
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    train = load_dataset(config.train_split, config.data_root)
    tests = {name: load_dataset(name, config.data_root) for name in config.eval_splits}
    seconds["data"] = time.perf_counter() - t0
    log.info(
        "train: %s; validation: %s; test: %s",
        config.train_split,
        ", ".join(config.val_splits),
        ", ".join(config.test_splits),
    )

    t = time.perf_counter()
    model = NetVLADModel(NetVLADConfig(config.backbone, config.num_clusters, None, config.weights)).to(device)
    # One tick per image k-means reads (init_clusters calls local_descriptors once per image).
    n_kmeans = min(config.kmeans_images, len(train.image_paths()))
    with (
        progress_bar("base: k-means init", total=n_kmeans, unit="img", enabled=progress) as bar,
        counting_calls(model, "local_descriptors", bar),
    ):
        kmeans = init_clusters(
            model,
            train.image_paths(),
            n_images=config.kmeans_images,
            per_image=config.kmeans_per_image,
            seed=config.seed,
            image_size=config.image_size,
            progress=False,
        )
    seconds["kmeans_init"] = time.perf_counter() - t

    t = time.perf_counter()
    maps: dict[str, dict[str, Any]] = {
        name: {"random": _random_ranking_map(ds, config.seed)} for name, ds in tests.items()
    }
    for name, res in _evaluate(model, tests, config.image_size, device, progress, workers).items():
        maps[name]["off_the_shelf"] = res
    seconds["eval_off_the_shelf"] = time.perf_counter() - t

    t = time.perf_counter()
    miner = TripletMiner(
        train,
        config.train_size,
        num_negatives=config.num_negatives,
        neg_pool_size=config.neg_pool_size,
        seed=config.seed,
        num_positives=config.num_positives,
    )
    # One tick per step, a line per hard-negative refresh.
    every = config.refresh_every or max(1, -(-len(miner) // config.batch_size))
    refreshes = -(-config.steps // every)
    with (
        progress_bar("base: fine-tune", total=config.steps, unit="step", enabled=progress) as bar,
        counting_calls(
            miner, "refresh", bar, note=lambda n, s: f"hard-negative refresh {n}/{refreshes} took {s:.1f}s"
        ),
    ):
        losses = train_triplet(
            model,
            miner,
            config.steps,
            config.lr,
            device=device,
            progress=False,
            refresh_every=config.refresh_every,
            batch_size=config.batch_size,
            margin=config.margin,
            num_workers=workers,
            on_step=lambda step, loss: bar.update(1),
        )
    seconds["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    for name, res in _evaluate(model, tests, config.image_size, device, progress, workers).items():
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
            num_workers=workers,
        )
        vlad = vlad[np.isfinite(vlad).all(axis=1)]  # unreadable images come back as NaN rows
        fit_whitening(model, vlad, config.whitening_dim)
        seconds["whitening"] = time.perf_counter() - t
        t = time.perf_counter()
        for name, res in _evaluate(model, tests, config.image_size, device, progress, workers).items():
            maps[name]["finetuned"] = res
        seconds["eval_finetuned"] = time.perf_counter() - t
    else:
        for name in maps:
            maps[name]["finetuned"] = maps[name]["finetuned_no_whitening"]

    t = time.perf_counter()
    baselines = {
        name: {
            "random": maps[name]["random"],
            "thumbnails": baseline_map(ds, "pixels"),
            "histogram": baseline_map(ds, "histogram"),
            "off_the_shelf": maps[name]["off_the_shelf"]["mAP"],
        }
        for name, ds in tests.items()
    }
    seconds["baselines"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    def mean_finetuned(splits: list[str]) -> float:
        return float(np.mean([maps[name]["finetuned"]["mAP"] for name in splits]))

    meta = {
        "format_version": BASE_FORMAT_VERSION,
        "config": config.to_dict(),
        "key": config.key(),
        "model": model.config_dict(),
        "train_split": config.train_split,
        "val_splits": config.val_splits,
        "test_splits": config.test_splits,
        # The dense base's mAP under the trial report's names: every trial's drops are measured against these.
        VAL_MAP_KEY: mean_finetuned(config.val_splits),
        TEST_MAP_KEY: mean_finetuned(config.test_splits),
        "maps": maps,
        "baselines": baselines,
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
        # The dense fp32 file is the base point of the front: what shipping it uncompressed would cost.
        meta[MEMORY_KEY] = (tmp / MODEL_FILE).stat().st_size / 2**20
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return atomic_directory(
        out_dir, write, is_complete=lambda path: (path / META_FILE).is_file(), replace=overwrite
    )


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


def retrain_fn(
    base: NetVLADModel,
    meta: Mapping[str, Any],
    miner: TripletMiner,
    lr: float,
    *,
    device: torch.device,
    distill: bool = True,
    refresh_every: int | None = TRIAL_REFRESH_EVERY,
    num_workers: int = 0,
) -> Callable[..., list[float]]:
    """The ``train_fn`` that retrains compressed copies of ``base`` (every stage of a trial, and the recipe
    benchmark): the base's triplet settings, and the dense base itself (copied now, before any stage changes the
    model) as the teacher the copies are pulled towards. Hard negatives are mined once per ``train_fn`` (one per
    trial), on its first step (`TRIAL_REFRESH_EVERY`); ``refresh_every=N`` re-mines every N steps of the trial,
    None once per pass over the anchors (what the base fine-tune does). ``num_workers``: processes that load the
    training tuples ahead (`trainables.devices.loader_workers`)."""
    cfg = meta["config"]
    return make_train_fn(
        miner,
        lr,
        device=device,
        progress=False,
        batch_size=cfg["batch_size"],
        margin=cfg["margin"],
        teacher=copy.deepcopy(base) if distill else None,
        refresh_every=refresh_every,
        num_workers=num_workers,
    )


def train_image_size(config: Mapping[str, Any]) -> int:
    """The training square side of a base config dict (`BaseConfig.to_dict`, a base meta's ``config``): its
    ``train_image_size``, else its ``image_size`` (also for bases recorded before the field existed)."""
    return int(config.get("train_image_size") or config["image_size"])


def trial_miner(meta: Mapping[str, Any], data_root: str | None, seed: int) -> TripletMiner:
    """The hard-negative miner of the base's training split with the base's tuple settings (and training size)."""
    cfg = meta["config"]
    return TripletMiner(
        load_dataset(meta["train_split"], data_root),
        train_image_size(cfg),
        num_negatives=cfg["num_negatives"],
        neg_pool_size=cfg["neg_pool_size"],
        num_positives=cfg["num_positives"],
        seed=seed,
    )


def map_table(meta: dict[str, Any]) -> str:
    """The meta's mAP numbers (x100) as a markdown table: the zero-byte baselines, then the network before and
    after fine-tuning, one row per split with its role (validation / test)."""
    cols = ["random", "thumbnails", "histogram", "off_the_shelf", "finetuned_no_whitening", "finetuned"]
    lines = ["| split | role | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, m in meta["maps"].items():
        role = "/".join(
            r for r, splits in (("val", meta["val_splits"]), ("test", meta["test_splits"])) if name in splits
        )
        b = meta["baselines"][name]
        cells = [b["random"], b["thumbnails"], b["histogram"]]
        cells += [m[c]["mAP"] for c in ("off_the_shelf", "finetuned_no_whitening", "finetuned")]
        lines.append(f"| {name} | {role} | " + " | ".join(f"{100 * v:.2f}" for v in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainables.base", description=__doc__.split("\n")[0])
    add_base_arguments(p)
    p.add_argument("--out", default=None, help="output folder (must not exist, or use --overwrite)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch/faiss CPU threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        config, preset = base_config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.show:
        print(describe_base_config(config, preset))
        return 0
    if not args.out:
        print(
            "error: --out DIR is required to build a base (or pass --show to print its config)",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    try:
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
