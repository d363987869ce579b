"""Tests of the triplet loss, the training loop and the base-model build on the embedded synthetic set."""

import copy
import json
import pickle
import shutil

import faiss  # noqa: F401  (faiss before torch)
import numpy as np
import pytest
import torch

from trainables.base import META_FILE, MODEL_FILE, BaseConfig, build_base, load_base, main
from trainables.data.registry import load_dataset
from trainables.data.synthetic import ensure_synthetic
from trainables.data.tuples import TripletMiner, describe_paths_with
from trainables.fileio import atomic_directory
from trainables.netvlad import NetVLADConfig, NetVLADModel, init_clusters
from trainables.retrieval.evaluate import evaluate_dataset
from trainables.train import DivergedError, make_train_fn, train_triplet, triplet_loss

SMALL = dict(
    num_clusters=4,
    whitening_dim=16,
    image_size=64,
    steps=4,
    batch_size=2,
    num_negatives=2,
    neg_pool_size=40,
    kmeans_images=20,
    kmeans_per_image=20,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-cache")
    ensure_synthetic(root)
    return root


@pytest.fixture(scope="module")
def train_split(cache):
    return load_dataset("synthetic-train", cache)


def small_model(train_split, seed=0):
    torch.manual_seed(seed)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=None))
    init_clusters(model, train_split.image_paths(), n_images=10, per_image=20, seed=seed, image_size=64)
    return model


def test_triplet_loss_matches_definition():
    q = torch.tensor([0.0, 0.0])
    pos = torch.tensor([[1.0, 0.0], [0.3, 0.0]])  # closest: d² = 0.09
    neg = torch.tensor([[0.0, 0.2], [2.0, 0.0], [0.0, 0.4]])  # d² = 0.04, 4.0, 0.16
    # max(0, 0.09 + 0.1 - 0.04) + max(0, 0.19 - 4) + max(0, 0.19 - 0.16) = 0.15 + 0 + 0.03
    assert triplet_loss(q, pos, neg, margin=0.1).item() == pytest.approx(0.18)
    assert triplet_loss(q, pos[1:], neg[1:2], margin=0.1).item() == 0.0
    with pytest.raises(ValueError, match="pos \\(P, d\\)"):
        triplet_loss(q, pos[0], neg)


def test_triplet_loss_gradient_pulls_positive_pushes_negative():
    q = torch.zeros(2)
    pos = torch.tensor([[0.5, 0.0]], requires_grad=True)
    neg = torch.tensor([[0.0, 0.5]], requires_grad=True)
    triplet_loss(q, pos, neg).backward()
    assert pos.grad[0, 0] > 0  # descending the gradient moves the positive toward q
    assert neg.grad[0, 1] < 0  # and the negative away from it


def test_training_is_deterministic_adds_extra_loss_and_trains_only_trainable(train_split):
    runs = []
    for extra in (None, lambda: torch.tensor(5.0)):
        model = small_model(train_split)
        model.backbone.requires_grad_(False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        miner = TripletMiner(train_split, 64, num_negatives=2, neg_pool_size=30, seed=1, anchors_per_epoch=12)
        losses = train_triplet(model, miner, 3, 1e-3, extra_loss=extra, progress=False, batch_size=2)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
        assert not torch.equal(before["pool.centroids"], after["pool.centroids"])
        assert miner.refreshes == 1
        runs.append(losses)
    assert len(runs[0]) == 3 and all(np.isfinite(runs[0]))
    np.testing.assert_allclose(np.array(runs[1]) - 5.0, runs[0], rtol=1e-6, atol=1e-6)


def test_train_fn_is_callable_positionally(train_split):
    model = small_model(train_split)
    miner = TripletMiner(train_split, 64, num_negatives=2, neg_pool_size=30, seed=1, anchors_per_epoch=12)
    train_fn = make_train_fn(miner, 1e-3, progress=False, batch_size=1, refresh_every=1)
    assert len(train_fn(model, 2, None)) == 2
    assert miner.refreshes == 2


def test_nan_producing_lr_raises_diverged_error(train_split):
    model = small_model(train_split)
    miner = TripletMiner(train_split, 64, num_negatives=2, neg_pool_size=30, seed=1, anchors_per_epoch=12)
    # Adam moves each weight by ~lr on the first step: 1e30 overflows the activations to inf, the loss to NaN.
    with pytest.raises(DivergedError, match="diverged at step 1") as err:
        train_triplet(model, miner, 5, 1e30, progress=False, batch_size=1)
    assert err.value.step == 1
    again = pickle.loads(pickle.dumps(err.value))  # Ray ships exceptions by pickle
    assert isinstance(again, DivergedError) and again.step == 1 and str(again) == str(err.value)


def test_build_base_writes_loads_and_is_deterministic(cache, tmp_path, capsys):
    config = BaseConfig(
        data_root=str(cache), seed=3, num_clusters=4, whitening_dim=16, image_size=64, steps=4
    )
    args = [
        "--preset",
        "tiny",
        "--data-root",
        str(cache),
        "--out",
        str(tmp_path / "a"),
        "--quiet",
        "--steps",
        "4",
    ]
    args += ["--seed", "3"]
    args += ["--num-clusters", "4", "--whitening-dim", "16", "--image-size", "64"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| synthetic-test |" in printed and config.key() in printed

    out = build_base(config, tmp_path / "b", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, META_FILE])
    meta = json.loads((out / META_FILE).read_text())
    assert meta["key"] == config.key() and meta["config"]["seed"] == 3
    maps = meta["maps"]["synthetic-test"]
    values = [maps["random"]] + [
        maps[s]["mAP"] for s in ("off_the_shelf", "finetuned_no_whitening", "finetuned")
    ]
    assert all(np.isfinite(values)) and all(0 <= v <= 1 for v in values)
    assert meta["test_mAP"] == maps["finetuned"]["mAP"]
    assert meta["val_mAP"] == meta["maps"]["synthetic-val"]["finetuned"]["mAP"]
    # The baselines every front is read against, per split: zero-byte ones and the network before fine-tuning.
    for split in ("synthetic-val", "synthetic-test"):
        b = meta["baselines"][split]
        assert set(b) == {"random", "thumbnails", "histogram", "off_the_shelf"}
        assert (
            b["random"] < b["thumbnails"] < 1
            and b["off_the_shelf"] == meta["maps"][split]["off_the_shelf"]["mAP"]
        )
    assert set(meta["seconds"]) >= {"kmeans_init", "finetune", "whitening", "total"}
    # The base point of the front: the dense file's size, recorded by the build itself (a base built here and
    # copied into a sweep's storage needs nothing else); an older meta without it gets it from the file.
    assert meta["memory_mib"] == (out / MODEL_FILE).stat().st_size / 2**20
    from sweep.base_cache import read_meta

    older = tmp_path / "older"
    shutil.copytree(out, older)
    (older / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "memory_mib"}))
    assert read_meta(str(older))["memory_mib"] == meta["memory_mib"]

    # Same seed, same config (once through the CLI, once through the API) -> identical mAPs and weights.
    meta_cli = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta_cli["maps"] == meta["maps"]
    model, meta_loaded = load_base(out)
    model_cli, _ = load_base(tmp_path / "a")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model_cli.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert meta_loaded == meta and model.config.whitening_dim == 16

    # The loaded model reproduces the descriptors the build measured: its mAP is the recorded one.
    test = load_dataset("synthetic-test", cache)
    assert evaluate_dataset(model, test, 64, "cpu")["mAP"] == pytest.approx(
        maps["finetuned"]["mAP"], abs=1e-9
    )

    with pytest.raises(FileExistsError, match="not empty"):
        build_base(config, out, progress=False)


def test_base_config_key_and_validation(tmp_path):
    a = BaseConfig(**SMALL)
    assert a.key() == BaseConfig(**SMALL).key()
    assert a.key() == BaseConfig(data_root=str(tmp_path), **SMALL).key()  # where the data is, not what it is
    assert a.key() != BaseConfig(**(SMALL | {"steps": 5})).key()
    assert BaseConfig.from_dict(a.to_dict()) == a
    assert (a.train_split, a.test_splits) == ("synthetic-train", ["synthetic-test"])
    assert BaseConfig(dataset="paris6k").test_splits == ["oxford5k"]
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        BaseConfig(dataset="imagenet")
    with pytest.raises(ValueError, match="unknown base config keys"):
        BaseConfig.from_dict({"stepz": 3})


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
    def crash(tmp):
        (tmp / MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_directory(tmp_path / "base", crash, is_complete=lambda p: (p / META_FILE).is_file())
    assert list(tmp_path.iterdir()) == []


def test_load_base_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_base(tmp_path)


def test_presets_are_the_one_table_of_base_defaults(capsys):
    """A preset is its fields over the dataclass defaults; flags override single fields; the sweep's default for
    real data is the poster's model, the same base `python -m trainables.base` builds with the same flags."""
    from trainables.base import PRESETS, default_preset, preset_config

    assert preset_config("tiny") == BaseConfig()
    assert preset_config("embedded").backbone == "efficientnet_lite0"
    poster = preset_config("poster-alexnet", {"data_root": "/data"})
    assert (poster.backbone, poster.num_clusters, poster.whitening_dim, poster.image_size) == (
        "alexnet",
        64,
        4096,
        1024,
    )
    assert preset_config("poster-vgg16").backbone == "vgg16"
    assert default_preset("paris6k", "vgg16") == "poster-vgg16" and default_preset(None, None) == "embedded"
    assert preset_config("embedded", {"whitening_dim": None}).whitening_dim is None
    with pytest.raises(ValueError, match="preset 'nope' is not one of embedded"):
        preset_config("nope")
    assert set(PRESETS) >= {"embedded", "tiny", "tiny-test", "poster-alexnet", "poster-vgg16"}

    assert main(["--dataset", "paris6k", "--data-root", "/data", "--backbone", "alexnet", "--show"]) == 0
    shown = capsys.readouterr().out
    assert f"key {poster.key()}" in shown and "num_clusters = 64" in shown
    assert main(["--preset", "embedded", "--image-size", "96", "--whitening-dim", "0", "--show"]) == 0
    shown = capsys.readouterr().out
    assert "image_size = 96" in shown and "whitening_dim = None" in shown
    assert main(["--dataset", "paris6k", "--show"]) == 2
    assert "needs --data-root" in capsys.readouterr().err


def _probe_loss(model, tuples, n_pos: int, teacher=None) -> float:
    """Mean triplet loss of fixed tuples (fixed negatives): a training loss that does not move with re-mining.
    With ``teacher``, plus the distillation term the retraining adds (``train_triplet``'s, at weight 1): the loss
    the compression stages train."""
    model.eval()
    with torch.no_grad():
        total = 0.0
        for t in tuples:
            d = model(t)
            total += float(triplet_loss(d[0], d[1 : 1 + n_pos], d[1 + n_pos :]))
            if teacher is not None:
                total += float(((d - teacher(t)) ** 2).sum(dim=1).mean())
    return total / len(tuples)


def test_quantize_stage_moves_centroids_and_lowers_the_loss_under_the_shipped_settings(train_split):
    """The embedded default's quantize stage (smoke.yaml's lr, quant_steps and channel scales, `make_train_fn`'s
    recipe) trains: every codebook moves by a visible fraction of its spacing (measured with layer scales: 1.7-5% of
    it in 15 steps, 3-12x the old bound) and the loss it trains (triplet + distillation from the dense base) falls.
    The triplet term alone need not: on this small random-init model at 3 bits it rose by 0.7% in 30 steps while
    the sum fell."""
    from search_spaces.schema import load_search_space
    from trainables.compression.plan import CompressionPlan
    from trainables.compression.quantize import quantized_view
    from trainables.compression.schedule import quantize_and_finetune
    from trainables.contract import resolve_trial_config

    space = load_search_space("smoke.yaml")
    fixed = dict(space.fixed)
    # The middle of the searched entropy-constrained rate: its indices are fixed like Lloyd's, its codebook trains.
    rate = space.params["kmeans_rate_conv"]
    settings = resolve_trial_config(
        {**fixed, "bits": 3, "prune_mode": "none", "kmeans_rate_conv": (rate.low + rate.high) / 2}
    )
    plan = CompressionPlan.from_dict(settings["plan"])
    model = small_model(train_split)
    groups = {g: n for g, n in model.compression_groups().items() if g in plan.groups}
    miner = TripletMiner(train_split, 64, num_negatives=2, neg_pool_size=30, seed=1, anchors_per_epoch=24)
    probe = TripletMiner(train_split, 64, num_negatives=2, neg_pool_size=60, seed=2, anchors_per_epoch=24)
    # As the trial builds it (trainables/pipeline.py): the dense base is the teacher.
    teacher = copy.deepcopy(model).eval()
    train_fn = make_train_fn(miner, settings["lr"], progress=False, batch_size=2, teacher=teacher)

    quantize_and_finetune(
        model, CompressionPlan.from_dict({**settings["plan"], "quant_steps": 0}), groups, train_fn
    )
    model.eval()
    with torch.no_grad():
        probe.refresh(describe_paths_with(model, 64))
    tuples = probe.sample(12)
    before_loss = _probe_loss(model, tuples, probe.num_positives, teacher)
    names = [name for names in groups.values() for name in names]
    before = {n: quantized_view(model.get_submodule(n)).codebook.clone() for n in names}

    train_fn(model, plan.quant_steps, None)

    after_loss = _probe_loss(model, tuples, probe.num_positives, teacher)
    for n in names:
        now = quantized_view(model.get_submodule(n)).codebook
        spacing = float((before[n][1:] - before[n][:-1]).abs().mean())
        moved = float((now - before[n]).abs().max())
        # The old absolute Adam steps at 1e-5 could move a centroid by quant_steps x 1e-5 at most.
        assert moved > 0.01 * spacing and moved > 2 * plan.quant_steps * 1e-5, (
            f"centroids of {n} hardly moved"
        )
    assert after_loss < before_loss


def test_l1_proximal_step_zeroes_weights_that_the_threshold_then_prunes(train_split):
    """Under the real loop, L1 is a proximal step: weights land exactly on 0 (a subgradient never does), and more of
    them fall below a pruning threshold than without L1 after the same steps."""
    from trainables.compression.l1 import l1_penalty

    counts = []
    for lam in (0.0, 20.0):
        model = small_model(train_split)
        miner = TripletMiner(train_split, 64, num_negatives=2, neg_pool_size=30, seed=1, anchors_per_epoch=12)
        conv = {"conv": model.compression_groups()["conv"]}
        extra = l1_penalty(model, conv, lam) if lam else None
        train_triplet(model, miner, 4, 1e-2, extra_loss=extra, progress=False, batch_size=2, relative_lr=True)
        weights = torch.cat([model.get_submodule(n).weight.detach().reshape(-1) for n in conv["conv"]])
        counts.append((int((weights == 0).sum()), int((weights.abs() < 0.05 * weights.std()).sum())))
    (zeros_plain, below_plain), (zeros_l1, below_l1) = counts
    assert zeros_plain == 0 and zeros_l1 > 0
    assert below_l1 > below_plain


def test_train_fn_counts_steps_across_calls_for_re_mining(train_split):
    model = small_model(train_split)
    miner = TripletMiner(train_split, 64, num_negatives=2, neg_pool_size=30, seed=1, anchors_per_epoch=12)
    train_fn = make_train_fn(miner, 1e-3, progress=False, batch_size=1, refresh_every=3)
    for steps in (2, 2, 2):
        train_fn(model, steps, None)
    assert miner.refreshes == 2  # steps 0 and 3 of the six, not at the start of each call
