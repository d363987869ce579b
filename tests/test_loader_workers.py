"""DataLoader workers: the workers rule, and that loading in worker processes changes no result.

Real tiny NetVLAD models, real JPEGs on disk, the tiny hand-made Oxford of test_data.py; a worker is a real
process.
"""

import logging

import faiss  # noqa: F401  (faiss before torch)
import numpy as np
import pytest
import torch
from PIL import Image
from test_data import make_oxford

from trainables.data.images import ImageReadError
from trainables.data.oxford import load_original
from trainables.data.tuples import SquareLoader, TripletMiner
from trainables.devices import LOADER_WORKERS_ENV, device_batch, fast_convolutions, loader_workers
from trainables.netvlad import NetVLADConfig, NetVLADModel, init_clusters
from trainables.retrieval.extract import extract_descriptors
from trainables.train import train_triplet


@pytest.fixture
def train_split(tmp_path):
    return load_original(make_oxford(tmp_path / "oxford5k"), "oxford5k")


def tiny_model(seed: int = 0) -> NetVLADModel:
    torch.manual_seed(seed)
    return NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=None))


def write_images(folder, n: int = 11) -> list:
    """JPEGs of three shapes (so extraction batches by shape and runs a bucket early), noise content."""
    rng = np.random.default_rng(0)
    shapes = [(48, 64), (64, 48), (40, 40)]
    paths = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        path = folder / f"{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------- the rule


def test_loader_workers_keeps_one_cpu_for_the_main_process_and_the_env_overrides(monkeypatch):
    monkeypatch.delenv(LOADER_WORKERS_ENV, raising=False)
    assert loader_workers(1) == 0  # a 1-CPU trial loads in line, as it always did
    assert loader_workers(4) == 3
    assert loader_workers(0.5) == 0 and loader_workers(2.5) == 1  # fractional shares round down
    monkeypatch.setenv(LOADER_WORKERS_ENV, "5")
    assert loader_workers(1) == 5 and loader_workers(4) == 5
    monkeypatch.setenv(LOADER_WORKERS_ENV, "0")
    assert loader_workers(16) == 0
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv(LOADER_WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=f"{LOADER_WORKERS_ENV}='{bad}'.*non-negative integer"):
            loader_workers(4)


def test_cpu_gets_channels_last_but_not_the_cuda_settings():
    # channels_last is the layout oneDNN's CPU convolutions are fastest in (benchmarks/bench_layout.py), so the
    # CPU gets it too; cuDNN autotuning stays a CUDA-only setting.
    model = tiny_model()
    benchmark = torch.backends.cudnn.benchmark
    cpu = torch.device("cpu")
    with fast_convolutions(model, device=cpu):
        conv = model.backbone[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        assert torch.backends.cudnn.benchmark == benchmark
    assert all(p.is_contiguous() for p in model.parameters())
    batch = torch.randn(2, 3, 8, 8)
    moved = device_batch(batch, cpu)
    assert moved.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved, batch)
    vectors = torch.randn(2, 8)
    assert device_batch(vectors, cpu) is vectors


def test_channels_last_backbone_keeps_the_model_working_and_is_undone_on_exit():
    # The CUDA branch's layout change, run on CPU tensors (it asks only for the device *type*): the model runs
    # (NetVLAD views a channels_last map), also through a sliced backbone[start:] (training with a frozen
    # prefix), gives the same descriptors, and the weights go back to the plain layout on exit.
    model = tiny_model().eval()
    model.backbone[:2].requires_grad_(False)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        plain = model(x)
    benchmark = torch.backends.cudnn.benchmark
    with fast_convolutions(model, None, model, device=torch.device("cuda")):
        conv = model.backbone[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        assert torch.backends.cudnn.benchmark
        with torch.no_grad():
            fast = model(x.contiguous(memory_format=torch.channels_last))
        model.train()
        model(x).sum().backward()  # frozen prefix: backbone[:start] then backbone[start:]
        model.eval()
    assert torch.backends.cudnn.benchmark == benchmark
    assert all(p.is_contiguous() for p in model.parameters())
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ extraction


def test_descriptors_with_a_worker_equal_those_loaded_in_line(tmp_path):
    paths = write_images(tmp_path)
    boxes = [None if i % 2 else (2.0, 3.0, 30.0, 35.0) for i in range(len(paths))]
    model = tiny_model()
    kwargs = dict(image_size=56, bbxs=boxes, batch_size=3, device="cpu", progress=False)
    inline = extract_descriptors(model, paths, num_workers=0, **kwargs)
    workers = extract_descriptors(model, paths, num_workers=1, **kwargs)
    two = extract_descriptors(model, paths, num_workers=2, **kwargs)
    assert inline.shape == (len(paths), 128 * 4) and np.isfinite(inline).all()
    assert np.array_equal(inline, workers) and np.array_equal(inline, two)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        extract_descriptors(model, paths, num_workers=-1, **kwargs)


def test_an_unreadable_image_is_skipped_or_named_with_workers(tmp_path, caplog):
    paths = write_images(tmp_path, n=6)
    paths[2].write_bytes(paths[2].read_bytes()[:150])  # a truncated JPEG
    model = tiny_model()
    kwargs = dict(image_size=48, batch_size=2, device="cpu", progress=False)
    with caplog.at_level(logging.WARNING, logger="trainables.retrieval.extract"):
        skipped = extract_descriptors(model, paths, skip_unreadable=True, num_workers=1, **kwargs)
    assert np.isnan(skipped[2]).all() and np.isfinite(np.delete(skipped, 2, axis=0)).all()
    assert "skipped 1 unreadable image(s) of 6" in caplog.text and "02.jpg" in caplog.text
    inline = extract_descriptors(model, paths, skip_unreadable=True, num_workers=0, **kwargs)
    assert np.array_equal(np.isnan(inline), np.isnan(skipped))
    assert np.array_equal(np.nan_to_num(inline), np.nan_to_num(skipped))
    # Not skipped: the same error type, naming the file, as when loading in line (not DataLoader's RuntimeError).
    with pytest.raises(ImageReadError, match="02.jpg"):
        extract_descriptors(model, paths, num_workers=1, **kwargs)


# -------------------------------------------------------------------------------------------------- training


def _trained(train_split, num_workers: int, steps: int = 5, refresh_every: int | None = 2):
    torch.manual_seed(0)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=None))
    init_clusters(model, train_split.image_paths(), n_images=8, per_image=20, seed=0, image_size=32)
    miner = TripletMiner(train_split, 32, num_negatives=2, neg_pool_size=8, seed=3, anchors_per_epoch=6)
    if num_workers:  # the prefetch path draws with sample_specs and loads in the workers, never in line
        miner.sample = lambda batch_size: pytest.fail("a tuple was loaded in line despite the workers")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_triplet(
        model,
        miner,
        steps,
        1e-3,
        device="cpu",
        progress=False,
        batch_size=2,
        refresh_every=refresh_every,
        num_workers=num_workers,
    )
    assert not torch.equal(initial["pool.centroids"], model.state_dict()["pool.centroids"])  # it trained
    return losses, model.state_dict(), miner


def test_training_with_prefetch_gives_the_same_losses_and_weights(train_split):
    # Re-mining at steps 0, 2 and 4: three stretches whose tuples are drawn ahead, between model-dependent mining.
    inline_losses, inline_state, inline_miner = _trained(train_split, num_workers=0)
    losses, state, miner = _trained(train_split, num_workers=1)
    assert len(losses) == 5 and np.isfinite(losses).all() and miner.refreshes == inline_miner.refreshes == 3
    assert losses == inline_losses
    assert all(torch.equal(state[k], inline_state[k]) for k in inline_state)
    # The miner's random stream is where it would be: the next tuples drawn are the same.
    assert miner.sample_specs(3) == inline_miner.sample_specs(3)


def test_an_unreadable_training_image_is_named_with_workers(train_split, tmp_path):
    images = [(train_split.image_path(i), None) for i in range(3)]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    loader = SquareLoader(32, num_workers=1)
    good = list(loader.load([images[:2], images[2:]]))
    assert [t.shape for t in good] == [(2, 3, 32, 32), (1, 3, 32, 32)]
    assert torch.equal(torch.cat(good), torch.cat(list(SquareLoader(32).load([images]))))
    with pytest.raises(ImageReadError, match="broken.jpg"):
        list(loader.load([images[:1], [images[1], (bad, None)]]))
    loader.close()
    # In training: the re-mining describes the pool (and the tuples load) in the workers; the error names the file.
    broken = train_split.image_path(train_split.images.index("other_000002"))
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(ImageReadError, match="other_000002.jpg"):
        _trained(train_split, num_workers=1, steps=2)
