"""Loaders, image preprocessing, dataset registry and the triplet miner, on tiny hand-made dataset folders."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageListDataset,
    ImageReadError,
    load_image,
)
from trainables.data.oxford import DatasetError, load_original, load_revisited, read_gnd_file
from trainables.data.registry import DATASETS, load_dataset
from trainables.data.tuples import TripletMiner, split_tuple

# ------------------------------------------------------------------------------------------------ helpers


def write_jpg(path: Path, color=(128, 128, 128), size=(40, 30), seed: int = 0) -> None:
    """A small JPEG: a flat colour plus a little noise (so descriptors of same-colour images differ)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, np.float32) + rng.normal(0, 4, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95)


# A tiny Oxford: 2 landmarks x 2 queries, a junk view, distractors. Colours make look-alikes deliberate:
# 'tower_000005' is junk for tower but coloured like tower, so a miner that ignored junk would pick it.
TINY_IMAGES = {
    "tower_000001": (200, 40, 40),
    "tower_000002": (205, 45, 40),
    "tower_000003": (195, 40, 50),
    "tower_000004": (190, 50, 45),
    "tower_000005": (200, 42, 42),  # junk for tower
    "bridge_000001": (40, 40, 200),
    "bridge_000002": (45, 40, 205),
    "bridge_000003": (40, 50, 195),
    "other_000001": (40, 200, 40),
    "other_000002": (60, 180, 60),
    "other_000003": (120, 120, 120),
    "other_000004": (180, 60, 60),  # distractor that looks like a tower
}


def make_oxford(root: Path, prefix: str = "oxc1_") -> Path:
    for i, (name, color) in enumerate(TINY_IMAGES.items()):
        write_jpg(root / "jpg" / f"{name}.jpg", color, seed=i)
    gt = root / "gt"
    gt.mkdir(parents=True)
    spec = {
        "tower_1": ("tower_000001", ["tower_000001", "tower_000002"], ["tower_000003", "tower_000004"]),
        "tower_2": ("tower_000002", ["tower_000001", "tower_000002", "tower_000003"], ["tower_000004"]),
        "bridge_1": ("bridge_000001", ["bridge_000001", "bridge_000002"], ["bridge_000003"]),
        "bridge_2": ("bridge_000003", ["bridge_000003"], ["bridge_000001", "bridge_000002"]),
    }
    for q, (image, good, ok) in spec.items():
        (gt / f"{q}_query.txt").write_text(f"{prefix}{image} 2.5 3.0 30.5 25.0\n")
        (gt / f"{q}_good.txt").write_text("\n".join(good) + "\n")
        (gt / f"{q}_ok.txt").write_text("\n".join(ok) + "\n")
        (gt / f"{q}_junk.txt").write_text("tower_000005\n" if q.startswith("tower") else "")
    return root


def make_revisited(root: Path, name: str, as_arrays: bool = True) -> Path:
    for i, (img, color) in enumerate(TINY_IMAGES.items()):
        write_jpg(root / "jpg" / f"{img}.jpg", color, seed=i)
    imlist = [n for n in TINY_IMAGES if n != "bridge_000003"]  # queries are not in the revisited db
    arr = np.array if as_arrays else list
    cfg = {
        "imlist": imlist,
        "qimlist": ["tower_000001", "bridge_000003"],
        "gnd": [
            {"bbx": arr([1.0, 2.0, 30.0, 20.0]), "easy": arr([0, 1]), "hard": arr([2]), "junk": arr([4])},
            {"bbx": arr([0.0, 0.0, 39.0, 29.0]), "easy": arr([5]), "hard": arr([6]), "junk": arr([])},
        ],
    }
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(cfg, protocol=4))
    return root


# ------------------------------------------------------------------------------------------------- images


def test_load_image_resizes_normalizes_and_crops(tmp_path):
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :50] = (255, 0, 0)
    img[:, 50:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png", 64)
    assert t.dtype == torch.float32 and t.shape == (3, 32, 64)
    # Right half (blue) only, after crop: every pixel is ImageNet-normalized blue.
    right = load_image(tmp_path / "a.png", 20, bbox=(55, 5, 95, 45))
    assert right.shape == (3, 20, 20)
    expected = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(right.mean((1, 2)), expected, atol=1e-4)
    assert load_image(tmp_path / "a.png", 24, square=True).shape == (3, 24, 24)
    # Upscaling also reaches max_size on the longest side (portrait crop).
    assert load_image(tmp_path / "a.png", 90, bbox=(0, 0, 10, 45)).shape == (3, 90, 20)


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    write_jpg(tmp_path / "ok.jpg")
    bad.write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])  # truncated JPEG
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        load_image(bad, 32)
    with pytest.raises(ImageReadError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg", 32)
    with pytest.raises(ValueError, match="outside image"):
        load_image(tmp_path / "ok.jpg", 32, bbox=(100, 100, 120, 120))


def test_image_list_dataset_skips_and_reports_unreadable(tmp_path, caplog):
    paths = [tmp_path / f"{i}.jpg" for i in range(3)]
    for p in paths:
        write_jpg(p)
    paths[1].write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING, logger="trainables.data.images"):
        ds = ImageListDataset(paths, 16, bbxs=[None, None, (0, 0, 10, 10)], skip_unreadable=True)
    assert len(ds) == 2 and ds.indices == [0, 2] and ds.skipped == [paths[1]]
    assert "skipped 1 unreadable image(s) of 3" in caplog.text and "1.jpg" in caplog.text
    assert ds[1].shape == (3, 16, 16)  # the box of image 2 goes with it
    strict = ImageListDataset(paths, 16)
    with pytest.raises(ImageReadError, match="1.jpg"):
        strict[1]


# -------------------------------------------------------------------------------------- original layout


def test_load_original_reads_gt_and_boxes(tmp_path):
    ds = load_original(make_oxford(tmp_path / "ox"), "oxford5k")
    assert ds.layout == "original" and ds.images == sorted(TINY_IMAGES)
    assert ds.query_names == ["bridge_1", "bridge_2", "tower_1", "tower_2"]
    assert ds.queries == ["bridge_000001", "bridge_000003", "tower_000001", "tower_000002"]  # oxc1_ stripped
    assert ds.bbxs[0] == (2.5, 3.0, 30.5, 25.0)
    idx = {n: i for i, n in enumerate(ds.images)}
    t1 = ds.gnd[2]
    assert t1["ok"] == sorted(idx[f"tower_00000{k}"] for k in (1, 2, 3, 4))  # good ∪ ok
    assert t1["junk"] == [idx["tower_000005"]] and ds.gnd[0]["junk"] == []
    assert ds.image_path(idx["tower_000001"]) == tmp_path / "ox" / "jpg" / "tower_000001.jpg"
    assert ds.query_path(3) == tmp_path / "ox" / "jpg" / "tower_000002.jpg"
    lm = ds.landmarks()
    assert set(lm) == {"tower", "bridge"}
    assert lm["bridge"] == sorted(idx[f"bridge_00000{k}"] for k in (1, 2, 3))


def test_load_original_paris_style_without_prefix(tmp_path):
    ds = load_original(make_oxford(tmp_path / "pa", prefix=""), "paris6k")
    assert ds.queries[0] == "bridge_000001"


def test_missing_files_are_all_listed(tmp_path):
    root = make_oxford(tmp_path / "oxford5k")
    (root / "gt" / "tower_1_ok.txt").unlink()
    (root / "gt" / "bridge_2_junk.txt").unlink()
    with pytest.raises(DatasetError) as err:
        load_original(root, "oxford5k")
    msg = str(err.value)
    assert "tower_1_ok.txt" in msg and "bridge_2_junk.txt" in msg
    assert len(err.value.missing) == 2
    assert f"python -m trainables.data.download oxford5k --dest {tmp_path}" in msg

    root2 = make_oxford(tmp_path / "x")
    for n in ("tower_000003", "bridge_000002"):
        (root2 / "jpg" / f"{n}.jpg").unlink()
    with pytest.raises(DatasetError) as err:
        load_original(root2, "oxford5k")
    assert {p.name for p in err.value.missing} == {"tower_000003.jpg", "bridge_000002.jpg"}


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_original(tmp_path / "paris6k", "paris6k")
    assert {p.name for p in err.value.missing} == {"jpg", "gt"}
    assert "python -m trainables.data.download paris6k" in str(err.value)


def test_query_box_outside_image_names_the_query(tmp_path):
    root = make_oxford(tmp_path / "ox")
    (root / "gt" / "bridge_2_query.txt").write_text("oxc1_bridge_000003 500 500 600 600\n")
    with pytest.raises(DatasetError, match="query 'bridge_2'.*outside"):
        load_original(root, "oxford5k")


def test_malformed_query_line(tmp_path):
    root = make_oxford(tmp_path / "ox")
    (root / "gt" / "tower_2_query.txt").write_text("oxc1_tower_000002 1 2 three 4\n")
    with pytest.raises(DatasetError, match="tower_2_query.txt"):
        load_original(root, "oxford5k")


# ------------------------------------------------------------------------------------- revisited layout


@pytest.mark.parametrize("as_arrays", [True, False])
def test_load_revisited(tmp_path, as_arrays):
    ds = load_revisited(make_revisited(tmp_path / "roxford5k", "roxford5k", as_arrays), "roxford5k")
    assert (
        ds.layout == "revisited" and len(ds.images) == 11 and ds.queries == ["tower_000001", "bridge_000003"]
    )
    assert ds.gnd[0] == {"ok": [0, 1, 2], "junk": [4], "easy": [0, 1], "hard": [2]}
    assert ds.bbxs[1] == (0.0, 0.0, 39.0, 29.0)
    assert ds.query_path(1).name == "bridge_000003.jpg"
    assert set(ds.landmarks()) == {"tower", "bridge"}


def test_revisited_missing_files(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_revisited(tmp_path / "rparis6k", "rparis6k")
    assert {p.name for p in err.value.missing} == {"jpg", "gnd_rparis6k.pkl"}
    root = make_revisited(tmp_path / "roxford5k", "roxford5k")
    (root / "jpg" / "other_000002.jpg").unlink()
    (root / "jpg" / "bridge_000003.jpg").unlink()  # a query image
    with pytest.raises(DatasetError) as err:
        load_revisited(root, "roxford5k")
    assert {p.name for p in err.value.missing} == {"other_000002.jpg", "bridge_000003.jpg"}


class _Evil:
    """Pickles to a call of os.makedirs: loading it with plain pickle would create the folder."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_gnd_reader_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil(str(target))]}))
    with pytest.raises(DatasetError, match="refusing to load global"):
        read_gnd_file(path)
    assert not target.exists()


# -------------------------------------------------------------------------------------------- registry


def test_registry(tmp_path):
    assert {
        "synthetic-train",
        "synthetic-val",
        "synthetic-test",
        "oxford5k",
        "paris6k",
        "roxford5k",
        "rparis6k",
        "synthetic-large-train",
        "synthetic-large-val",
        "synthetic-large-test",
    } == set(DATASETS)
    with pytest.raises(ValueError, match="known datasets: synthetic-train, synthetic-val, synthetic-test"):
        load_dataset("holidays")
    with pytest.raises(ValueError, match="needs data_root"):
        load_dataset("oxford5k")
    make_oxford(tmp_path / "oxford5k")
    make_revisited(tmp_path / "rparis6k", "rparis6k")
    assert load_dataset("oxford5k", tmp_path).name == "oxford5k"
    assert load_dataset("rparis6k", tmp_path).layout == "revisited"
    with pytest.raises(DatasetError, match="paris6k"):
        load_dataset("paris6k", tmp_path)


# --------------------------------------------------------------------------------------------- tuples


def _mean_colour_describe(calls: list[int]):
    def describe(paths, bbxs):
        calls.append(len(paths))
        out = np.stack(
            [np.asarray(Image.open(p).convert("RGB"), np.float32).mean((0, 1)) / 255 for p in paths]
        )
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    return describe


def test_miner_shapes_and_never_picks_positives_or_junk(tmp_path):
    ds = load_original(make_oxford(tmp_path / "ox"), "oxford5k")
    miner = TripletMiner(ds, image_size=24, num_negatives=3, neg_pool_size=12, seed=1, num_positives=2)
    forbidden = {lm: set() for lm in ds.landmarks()}
    for q in range(len(ds.queries)):
        forbidden[ds.query_landmark(q)] |= set(ds.gnd[q]["ok"]) | set(ds.gnd[q]["junk"])

    def check(rounds):
        for _ in range(rounds):
            for a, pos, neg in miner.sample_indices(4):
                anchor = miner.anchors[a]
                assert set(pos) <= set(ds.landmarks()[anchor.landmark]) and anchor.db_index not in pos
                assert not set(neg) & forbidden[anchor.landmark], (anchor, neg)
                assert len(set(neg)) == 3

    check(5)  # random negatives before the first refresh
    calls: list[int] = []
    miner.refresh(_mean_colour_describe(calls))
    assert calls == [len(miner.epoch), 12]  # anchors, then the pool
    check(5)

    batch = miner.sample(3)
    assert len(batch) == 3 and all(t.shape == (1 + 2 + 3, 3, 24, 24) for t in batch)
    a, p, n = split_tuple(batch[0], miner.num_positives)
    assert a.shape[0] == 1 and p.shape[0] == 2 and n.shape[0] == 3


def test_miner_hard_negatives_are_the_closest_valid_ones(tmp_path):
    ds = load_original(make_oxford(tmp_path / "ox"), "oxford5k")
    miner = TripletMiner(ds, image_size=16, num_negatives=1, neg_pool_size=len(ds.images), seed=0)
    miner.refresh(_mean_colour_describe([]))
    idx = {n: i for i, n in enumerate(ds.images)}
    for a, neg in miner.hard_negatives.items():
        if miner.anchors[a].landmark == "tower":
            # The red distractor, not the red junk view of the tower itself.
            assert neg.tolist() == [idx["other_000004"]]


def test_miner_is_deterministic(tmp_path):
    ds = load_original(make_oxford(tmp_path / "ox"), "oxford5k")
    runs = []
    for _ in range(2):
        m = TripletMiner(ds, image_size=16, num_negatives=2, neg_pool_size=6, seed=7)
        first = m.sample_indices(6)
        m.refresh(_mean_colour_describe([]))
        runs.append((first, m.sample_indices(6)))
    assert runs[0] == runs[1]
    other = TripletMiner(ds, image_size=16, num_negatives=2, neg_pool_size=6, seed=8).sample_indices(6)
    assert other != runs[0][0]


def test_miner_rejects_impossible_settings(tmp_path):
    ds = load_original(make_oxford(tmp_path / "ox"), "oxford5k")
    with pytest.raises(ValueError, match="fewer than num_negatives=50"):
        TripletMiner(ds, image_size=16, num_negatives=50)
    with pytest.raises(ValueError, match="at least one positive"):
        TripletMiner(ds, image_size=16, num_negatives=0)
