"""Training at its own image size (`BaseConfig.train_image_size`), frozen layers under no_grad, CUDA autocast."""

import argparse
import copy
import json

import faiss  # noqa: F401  (faiss before torch)
import pytest
import torch

import trainables.base as base_module
from trainables.base import (
    META_FILE,
    BaseConfig,
    add_base_arguments,
    base_config_from_args,
    build_base,
    preset_config,
    trial_miner,
)
from trainables.data.synthetic import ensure_synthetic
from trainables.data.tuples import TripletMiner
from trainables.netvlad import NetVLADConfig, NetVLADModel
from trainables.train import triplet_loss


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-cache")
    ensure_synthetic(root)
    return root


def test_an_unset_train_size_keeps_the_key_a_set_one_changes_it():
    assert BaseConfig().train_size == BaseConfig().image_size == 128
    # None is left out of the key (the pinned preset keys are in test_cluster_path.py): same as the field missing.
    d = BaseConfig().to_dict()
    assert d["train_image_size"] is None
    assert BaseConfig(train_image_size=64).key() != BaseConfig().key()
    assert BaseConfig(train_image_size=64).train_size == 64
    with pytest.raises(ValueError, match="train_image_size must be >= 1 or None"):
        BaseConfig(train_image_size=0)


def test_vgg16_preset_trains_at_362_and_evaluates_at_1024_alexnet_trains_at_full_size():
    vgg = preset_config("poster-vgg16")
    assert (vgg.image_size, vgg.train_size) == (1024, 362)
    alex = preset_config("poster-alexnet")
    assert (alex.image_size, alex.train_image_size, alex.train_size) == (1024, None, 1024)


def test_train_image_size_flag_overrides_the_preset():
    p = argparse.ArgumentParser()
    add_base_arguments(p)
    config, _ = base_config_from_args(p.parse_args(["--preset", "tiny", "--train-image-size", "48"]))
    assert (config.image_size, config.train_size) == (128, 48)
    config, _ = base_config_from_args(p.parse_args(["--preset", "tiny"]))
    assert config == BaseConfig()


def test_trial_miner_reads_the_base_train_size_and_old_metas_fall_back_to_image_size(cache):
    cfg = BaseConfig(data_root=str(cache), image_size=64, train_image_size=40).to_dict()
    meta = {"config": cfg, "train_split": "synthetic-train"}
    assert trial_miner(meta, str(cache), seed=0).sample(1)[0].shape[-2:] == (40, 40)
    old = {k: v for k, v in cfg.items() if k != "train_image_size"}  # a base recorded before the field
    assert trial_miner({**meta, "config": old}, str(cache), seed=0).image_size == 64


def test_build_base_trains_on_train_size_squares_and_evaluates_at_image_size(cache, tmp_path, monkeypatch):
    sampled: list[tuple[int, ...]] = []

    class RecordingMiner(TripletMiner):  # the real miner; it only records the tuples' shapes
        def sample(self, batch_size):
            tuples = super().sample(batch_size)
            sampled.extend(tuple(t.shape[-2:]) for t in tuples)
            return tuples

    monkeypatch.setattr(base_module, "TripletMiner", RecordingMiner)
    config = BaseConfig(
        data_root=str(cache),
        num_clusters=4,
        whitening_dim=None,
        image_size=48,
        train_image_size=32,
        steps=2,
        batch_size=2,
        num_negatives=2,
        neg_pool_size=20,
        kmeans_images=10,
        kmeans_per_image=10,
    )
    out = build_base(config, tmp_path / "b", progress=False)
    assert sampled and set(sampled) == {(32, 32)}
    meta = json.loads((out / META_FILE).read_text())
    assert meta["config"]["train_image_size"] == 32 and meta["config"]["image_size"] == 48
    assert trial_miner(meta, str(cache), seed=0).image_size == 32


def _frozen_prefix_model() -> NetVLADModel:
    torch.manual_seed(0)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=8))
    convs = [i for i, m in enumerate(model.backbone) if isinstance(m, torch.nn.Conv2d)]
    for layer in model.backbone[: convs[2]]:  # freeze the first two convs (and what lies between)
        layer.requires_grad_(False)
    return model


def _loss(desc: torch.Tensor) -> torch.Tensor:
    return triplet_loss(desc[0], desc[1:2], desc[2:], margin=0.5) + desc.pow(3).sum()


def test_frozen_prefix_runs_without_grad_and_trainable_gradients_are_unchanged():
    model = _frozen_prefix_model()
    start = model.frozen_prefix()
    assert 0 < start < len(model.backbone)
    reference = copy.deepcopy(model)
    images = torch.rand(5, 3, 32, 32)

    # Even an input that requires grad (which would make autograd record the frozen layers) leaves the frozen
    # prefix's output without a graph: nothing of it is kept for the backward.
    outputs = {}
    model.backbone[start - 1].register_forward_hook(lambda m, i, o: outputs.setdefault("prefix", o))
    model.train()
    x = images.clone().requires_grad_(True)
    _loss(model(x)).backward()
    assert outputs["prefix"].grad_fn is None and not outputs["prefix"].requires_grad
    assert x.grad is None

    # The same numbers as the plain sequential forward (the model before the change) for every trainable tensor.
    reference.train()
    v = reference.pool(reference.backbone(images))
    _loss(torch.nn.functional.normalize(reference.whiten(v), p=2, dim=1)).backward()
    trained = dict(model.named_parameters())
    checked = 0
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert trained[name].grad is not None and torch.equal(trained[name].grad, p.grad), name
            checked += 1
        else:
            assert trained[name].grad is None, name
    assert checked > 0


def test_eval_mode_and_no_frozen_layer_run_the_whole_backbone():
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=None))
    assert model.frozen_prefix() == 0  # tiny trains every layer
    model.requires_grad_(False)
    assert model.frozen_prefix() == len(model.backbone)
    model.eval()
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.features(images), model.backbone(images))  # CPU: float32, no autocast


@pytest.mark.gpu
def test_cuda_backbone_runs_in_bfloat16_and_descriptors_stay_float32_and_close():
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=8)).eval()
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        cpu = model(images)
        seen = {}
        gpu_model = copy.deepcopy(model).cuda()
        gpu_model.backbone[0].register_forward_hook(lambda m, i, o: seen.setdefault("dtype", o.dtype))
        gpu = gpu_model(images.cuda())
    assert seen["dtype"] == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    assert gpu.dtype == torch.float32
    # L2-normalized descriptors: bf16 convolutions move them by well under the distance between two images.
    assert torch.allclose(gpu.cpu(), cpu, atol=5e-2)
    # Training under autocast: the loss and every trainable gradient are finite float32.
    gpu_model.train()
    _loss(gpu_model(images.cuda())).backward()
    grads = [p.grad for p in gpu_model.parameters() if p.requires_grad]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
