"""faiss ranking, batched descriptor extraction and end-to-end mAP evaluation on tiny hand-built datasets."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from trainables.data.images import ImageReadError, load_image
from trainables.data.oxford import RetrievalDataset, load_original
from trainables.retrieval.evaluate import evaluate_dataset, random_ranking_map
from trainables.retrieval.extract import _shape_batches, extract_descriptors
from trainables.retrieval.rank import gpu_available, rank_database

# --- helpers ------------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """conv -> ReLU -> global average pool -> L2: a real (if small) global-descriptor network."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, dim, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(dim)  # eval mode must be used (batch statistics would mix images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)), dim=1)


def smooth_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A 'landmark': smooth colour gradients plus a few rectangles."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    arr = np.stack([np.sin(xx * rng.uniform(2, 8) + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
    arr = arr + np.stack([np.cos(yy * rng.uniform(2, 8)) for _ in range(3)], axis=-1)
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 255
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, size=3)
    return Image.fromarray(arr.astype(np.uint8))


def noise_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Nine images: six 64x48 landscapes and three 48x64 portraits, interleaved."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(9):
        w, h = (48, 64) if i % 3 == 1 else (64, 48)
        (smooth_image if i % 2 else noise_image)(rng, w, h).save(d / f"im{i}.jpg", quality=95)
    return d


def image_paths(d: Path) -> list[Path]:
    return sorted(d.glob("im*.jpg"))


# --- search -------------------------------------------------------------------------------------------------


def test_rank_database_matches_sorted_cosine_similarity():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((200, 32)) * rng.uniform(0.5, 3, size=(200, 1))  # unnormalized, float64
    q = rng.standard_normal((7, 32))
    db_before = db.copy()
    ranks = rank_database(db, q)
    assert ranks.shape == (200, 7) and ranks.dtype == np.int64
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (db / np.linalg.norm(db, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(ranks, np.argsort(-cos, axis=1).T)
    np.testing.assert_array_equal(db, db_before)  # the caller's array is not normalized in place
    top = rank_database(db, q, top_k=5)
    np.testing.assert_array_equal(top, ranks[:5])
    assert rank_database(db, q, top_k=10_000).shape == (200, 7)  # k is capped at the database size


def test_rank_database_rejects_bad_inputs():
    db = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="dimension 4 but queries have 5"):
        rank_database(db, np.ones((2, 5), np.float32))
    bad = db.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"db has non-finite values .* first rows \[3\]"):
        rank_database(bad, db[:2])
    with pytest.raises(ValueError, match="queries must be a 2-D array"):
        rank_database(db, db[0])
    with pytest.raises(ValueError, match="floating-point"):
        rank_database(db, np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="db is empty"):
        rank_database(db[:0], db[:2])
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        rank_database(db, db[:2], top_k=0)


@pytest.mark.skipif(gpu_available(), reason="checks the error raised when faiss sees no GPU")
def test_use_gpu_without_gpu_is_a_clear_error():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(RuntimeError, match="use_gpu=True but this faiss build has no GPU"):
        rank_database(x, x, use_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="faiss build without GPU support (faiss-cpu)")
def test_gpu_ranking_equals_cpu_ranking():
    rng = np.random.default_rng(1)
    db, q = rng.standard_normal((3000, 64)), rng.standard_normal((20, 64))
    np.testing.assert_array_equal(
        rank_database(db, q, top_k=100, use_gpu=True), rank_database(db, q, top_k=100, use_gpu=False)
    )


# --- extraction ---------------------------------------------------------------------------------------------


def test_batched_extraction_equals_one_at_a_time(image_dir):
    model = TinyNet()
    paths = image_paths(image_dir)
    batched = extract_descriptors(model, paths, 64, batch_size=4, device="cpu", progress=False)
    single = extract_descriptors(model, paths, 64, batch_size=1, device="cpu", progress=False)
    assert batched.shape == (9, 16) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # and each row is the model's output on that very image (no mix-up of rows across shape buckets)
    with torch.no_grad():
        model.eval()
        direct = torch.cat([model(load_image(p, 64)[None]) for p in paths]).numpy()
    np.testing.assert_allclose(batched, direct, atol=1e-5)
    assert len({tuple(np.round(r, 4)) for r in batched}) == 9  # distinct images, distinct descriptors


@pytest.mark.gpu
def test_cuda_extraction_matches_cpu(image_dir):
    paths = image_paths(image_dir)
    cpu = extract_descriptors(TinyNet(), paths, 64, batch_size=4, device="cpu", progress=False)
    gpu = extract_descriptors(TinyNet(), paths, 64, batch_size=4, device=None, progress=False)  # auto: cuda
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_query_box_crops_before_describing(image_dir, tmp_path):
    model = TinyNet()
    src = image_dir / "im0.jpg"
    box = (10, 5, 50, 40)
    Image.open(src).crop(box).save(tmp_path / "crop.png")  # lossless: same pixels as the crop
    cropped = extract_descriptors(model, [src], 64, bbxs=[box], device="cpu", progress=False)
    reference = extract_descriptors(model, [tmp_path / "crop.png"], 64, device="cpu", progress=False)
    whole = extract_descriptors(model, [src], 64, device="cpu", progress=False)
    np.testing.assert_allclose(cropped, reference, atol=1e-5)
    assert not np.allclose(cropped, whole, atol=1e-3)


def test_multiscale_is_mean_of_scales_then_l2(image_dir):
    model = TinyNet().eval()
    path = image_dir / "im3.jpg"
    ms = extract_descriptors(model, [path], 64, scales=(1.0, 0.5), device="cpu", progress=False)
    x = load_image(path, 64)[None]
    with torch.no_grad():
        half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        expected = F.normalize((model(x) + model(half)) / 2, dim=1).numpy()
    np.testing.assert_allclose(ms, expected, atol=1e-6)
    single = extract_descriptors(model, [path], 64, device="cpu", progress=False)
    assert not np.allclose(ms, single, atol=1e-4)


def test_model_mode_is_restored_and_eval_used(image_dir):
    model = TinyNet().train()
    paths = image_paths(image_dir)[:4]
    a = extract_descriptors(model, paths, 64, batch_size=4, device="cpu", progress=False)
    assert model.training  # restored
    b = extract_descriptors(model, paths[:1], 64, batch_size=1, device="cpu", progress=False)
    # BatchNorm in train mode would normalize with the batch's statistics: row 0 would differ between the two
    np.testing.assert_allclose(a[:1], b, atol=1e-5)


def test_unreadable_images_raise_or_become_nan_rows(image_dir, tmp_path, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = [image_dir / "im0.jpg", broken, image_dir / "im2.jpg"]
    with pytest.raises(ImageReadError, match="broken.jpg"):
        extract_descriptors(TinyNet(), paths, 64, device="cpu", progress=False)
    with caplog.at_level(logging.WARNING):
        out = extract_descriptors(TinyNet(), paths, 64, device="cpu", progress=False, skip_unreadable=True)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    assert "broken.jpg" in caplog.text


def test_extraction_argument_errors(image_dir):
    paths = image_paths(image_dir)[:2]
    with pytest.raises(ValueError, match="got 1 boxes for 2 images"):
        extract_descriptors(TinyNet(), paths, 64, bbxs=[None], device="cpu", progress=False)
    with pytest.raises(ValueError, match="paths is empty"):
        extract_descriptors(TinyNet(), [], 64, device="cpu", progress=False)
    with pytest.raises(ValueError, match="scales must be"):
        extract_descriptors(TinyNet(), paths, 64, scales=(), device="cpu", progress=False)


def test_shape_batches_emit_every_item_once_with_bounded_waiting():
    rng = np.random.default_rng(0)
    shapes = [(3, int(rng.integers(1, 6)), int(rng.integers(1, 6))) for _ in range(60)]
    items = [(i, torch.full(s, float(i))) for i, s in enumerate(shapes)]
    items.insert(7, (60, None))  # an unreadable image passes through alone
    seen = []
    for idx, batch in _shape_batches(iter(items), batch_size=3, max_waiting=5):
        if batch is None:
            assert idx == [60]
        else:
            assert batch.shape[0] == len(idx) <= 3
            assert [int(batch[k].flatten()[0]) for k in range(len(idx))] == idx  # rows line up with indices
        seen.extend(idx)
    assert sorted(seen) == list(range(61))


# --- evaluation ---------------------------------------------------------------------------------------------


def write_original_dataset(root: Path, corrupt: bool = False) -> None:
    """Two landmarks with exact copies as positives, noise distractors, one query per landmark.

    Only positives are copies of a query, so a ranking whose indices are off by one scores below 1 whatever
    order faiss gives the tied copies.

    Oxford-style files: gt/<q>_query.txt = 'oxc1_<image> x1 y1 x2 y2'; good/ok/junk lists of image names.
    """
    rng = np.random.default_rng(5)
    jpg, gt = root / "jpg", root / "gt"
    jpg.mkdir(parents=True)
    gt.mkdir()
    for name in ("tower", "bridge"):
        smooth_image(rng, 64, 48).save(jpg / f"{name}_1.jpg", quality=95)
        for k in (2, 3):
            shutil.copy(jpg / f"{name}_1.jpg", jpg / f"{name}_{k}.jpg")
    for k in range(8):
        noise_image(rng, 64, 48).save(jpg / f"noise_{k}.jpg", quality=95)
    if corrupt:  # sorts first, so every readable image's index differs from its position among the readable
        (jpg / "aaa_corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    for name in ("tower", "bridge"):
        (gt / f"{name}_1_query.txt").write_text(f"oxc1_{name}_1 0 0 64 48\n")
        (gt / f"{name}_1_good.txt").write_text(f"{name}_1\n{name}_2\n")
        (gt / f"{name}_1_ok.txt").write_text(f"{name}_3\n")
        (gt / f"{name}_1_junk.txt").write_text("noise_0\n")


@pytest.mark.parametrize("corrupt", [False, True])
def test_evaluate_dataset_identical_positives_give_map_one(tmp_path, corrupt):
    write_original_dataset(tmp_path / "tiny", corrupt=corrupt)
    ds = load_original(tmp_path / "tiny", "tiny")
    assert len(ds.images) == 14 + corrupt and len(ds.queries) == 2
    out = evaluate_dataset(TinyNet(), ds, image_size=64, device="cpu", batch_size=4)
    assert out == {"mAP": pytest.approx(1.0, abs=1e-9)}
    # The chance baseline is far below: 3 positives among 14 images, 2 queries.
    assert random_ranking_map(ds, seed=0) < 0.8


def test_evaluate_dataset_wrong_ground_truth_scores_low(tmp_path):
    """Same images, but the ground truth names the noise images as positives: the model cannot find them."""
    write_original_dataset(tmp_path / "tiny")
    gt = tmp_path / "tiny" / "gt"
    for name in ("tower", "bridge"):
        (gt / f"{name}_1_good.txt").write_text("noise_5\n")
        (gt / f"{name}_1_ok.txt").write_text("noise_6\n")
    ds = load_original(tmp_path / "tiny", "tiny")
    # the 3 copies of the query (incl. itself) come first; at best the positives rank 3 and 4 after junk
    # (noise_0) removal: AP <= (1/2)[(0 + 1/4)/2 + (1/3 + 2/5)/2] = 0.245833...
    assert evaluate_dataset(TinyNet(), ds, image_size=64, device="cpu")["mAP"] <= 0.2459


def test_evaluate_dataset_revisited_layout_reports_three_protocols(tmp_path):
    write_original_dataset(tmp_path / "tiny")
    base = load_original(tmp_path / "tiny", "tiny")
    idx = {n: i for i, n in enumerate(base.images)}
    gnd = [
        {
            "easy": [idx[f"{n}_1"], idx[f"{n}_2"]],
            "hard": [idx[f"{n}_3"]],
            "junk": [idx["noise_0"]],
            "ok": [idx[f"{n}_1"], idx[f"{n}_2"], idx[f"{n}_3"]],
        }
        for n in (q.removesuffix("_1") for q in base.queries)  # queries come sorted by name
    ]
    ds = RetrievalDataset("rtiny", base.root, base.images, base.queries, base.bbxs, gnd, "revisited")
    out = evaluate_dataset(TinyNet(), ds, image_size=64, device="cpu")
    assert set(out) == {"mAP", "mAP_easy", "mAP_medium", "mAP_hard"}
    assert out["mAP"] == out["mAP_medium"]
    assert all(v == pytest.approx(1.0) for v in out.values()), out


def test_random_ranking_map_matches_its_expectation():
    # One positive per query among 100 images: a random ranking puts it at rank r (uniform on 0..99), where
    # AP = 1 at r = 0 and (p0 + p1)/2 = (0/r + 1/(r+1))/2 otherwise; the expectation is the mean over r:
    # (1 + (H_100 - 1)/2) / 100 = 0.03094...
    n_db, n_q = 100, 2000
    expected = (1 + sum(0.5 / (r + 1) for r in range(1, n_db))) / n_db
    ds = RetrievalDataset(
        "chance",
        Path("/nonexistent"),
        [f"im{i}" for i in range(n_db)],
        [f"im{q % n_db}" for q in range(n_q)],
        [(0, 0, 1, 1)] * n_q,
        [{"ok": [q % n_db], "junk": []} for q in range(n_q)],
        "original",
    )
    m = random_ranking_map(ds, seed=0)
    assert m == pytest.approx(expected, abs=0.01)
    assert random_ranking_map(ds, seed=0) == m and random_ranking_map(ds, seed=1) != m
