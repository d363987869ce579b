"""The embedded synthetic landmark set: determinism, shape, disjoint splits, Oxford layout, cache safety."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from trainables.data.oxford import load_original
from trainables.data.registry import SYNTHETIC_VARIANTS, load_dataset
from trainables.data.synthetic import (
    QUERIES_PER_PLACE,
    REGIONS,
    VERSION,
    SyntheticSpec,
    build_split,
    ensure_synthetic,
    synthetic_root,
    tree_digest,
)
from trainables.retrieval.baselines import baseline_map


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One full build (seed 0) shared by the tests of this file."""
    base = tmp_path_factory.mktemp("cache")
    ensure_synthetic(base, seed=0)
    return base


def test_same_seed_same_bytes_other_seed_differs(cache, tmp_path):
    built = synthetic_root(cache, 0) / "test"
    build_split(tmp_path / "again", "test", seed=0)
    build_split(tmp_path / "other", "test", seed=1)
    assert tree_digest(tmp_path / "again") == tree_digest(built)
    assert tree_digest(tmp_path / "other") != tree_digest(built)
    # Same places and query names, other views.
    assert sorted(p.name for p in (built / "gt").iterdir()) == sorted(
        p.name for p in (tmp_path / "other" / "gt").iterdir()
    )
    assert (built / "gt" / "moon_1_good.txt").read_text() != (
        tmp_path / "other" / "gt" / "moon_1_good.txt"
    ).read_text()


def test_layout_counts_and_manifest(cache):
    root = synthetic_root(cache, 0)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["digest"] == tree_digest(root)
    for split in ("train", "val", "test"):
        ds = load_original(root / split, f"synthetic-{split}")
        assert len(ds.landmarks()) == 11 and len(ds.queries) == 55
        assert 200 <= len(ds.images) <= 500
        positives = set().union(*map(set, ds.landmarks().values()))
        assert len(ds.images) - len(positives) >= 100  # distractors (and junk) beyond the landmarks
        s = manifest["splits"][split]
        assert s["images"] == len(ds.images) and s["queries"] == 55
        assert all(v > 0 for v in s["labels"].values())  # good, ok and junk all occur
        for q in range(len(ds.queries)):
            g = ds.gnd[q]
            assert ds.images.index(ds.queries[q]) in g["ok"]  # queries stay in the database, as positives
            assert not set(g["ok"]) & set(g["junk"])
            with Image.open(ds.query_path(q)) as im:
                w, h = im.size
            x1, y1, x2, y2 = ds.bbxs[q]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert (x2 - x1) * (y2 - y1) > 0.2 * w * h
        for i in range(0, len(ds.images), 37):
            with Image.open(ds.image_path(i)) as im:
                assert im.format == "JPEG" and 200 <= max(im.size) <= 256


def test_splits_have_disjoint_places_and_photos(cache):
    train = load_dataset("synthetic-train", data_root=cache)
    test = load_dataset("synthetic-test", data_root=cache)
    assert not set(train.landmarks()) & set(test.landmarks())
    assert not {r.source for r in REGIONS["train"]} & {r.source for r in REGIONS["test"]}
    assert not set(train.images) & set(test.images)


def test_validation_holds_new_views_of_the_training_places_and_none_of_test(cache):
    """Selection reads validation: its places are train's (the bundled photos allow no third set), its images are
    its own, and nothing of it is in the test split."""
    import hashlib

    train, val, test = (load_dataset(f"synthetic-{s}", data_root=cache) for s in ("train", "val", "test"))
    assert set(val.landmarks()) == set(train.landmarks())
    assert not set(val.landmarks()) & set(test.landmarks())

    def digests(ds):
        return {hashlib.sha256(ds.image_path(i).read_bytes()).hexdigest() for i in range(len(ds.images))}

    assert not digests(val) & digests(train) and not digests(val) & digests(test)


def test_not_trivial_for_raw_pixels(cache):
    """Model-free baselines must stay well below 1 (the set has to leave room for compression to show),
    yet well above chance (the ground truth has to follow the pictures)."""
    ds = load_dataset("synthetic-test", data_root=cache)
    pixels, hist = baseline_map(ds, "pixels"), baseline_map(ds, "histogram")
    assert 0.25 < pixels < 0.75
    assert 0.25 < hist < 0.75


def test_cached_set_is_reused(cache):
    root = synthetic_root(cache, 0)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic(cache, seed=0) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp


def test_env_var_sets_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLADSWEEP_CACHE", str(tmp_path / "envcache"))
    assert synthetic_root(None, 5) == tmp_path / "envcache" / f"synthetic-v{VERSION}-s5"


def test_concurrent_builders_and_stale_folder(tmp_path):
    """Three processes asking for a new set at once: one set, complete, no temporary folders left.
    A half-written folder (no manifest, as after a crash of an older version) is replaced."""
    stale = synthetic_root(tmp_path, 3)
    (stale / "train").mkdir(parents=True)
    code = (
        "import sys; from pathlib import Path; from trainables.data.synthetic import ensure_synthetic; "
        "print(ensure_synthetic(Path(sys.argv[1]), seed=3))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert set(outs) == {str(stale)}
    manifest = json.loads((stale / "manifest.json").read_text())
    assert manifest["digest"] == tree_digest(stale) and manifest["seed"] == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != stale.name and not p.name.endswith(".lock")]
    assert leftovers == []


# ------------------------------------------------------------------------------ variants (SyntheticSpec)


def _digests(folder: Path) -> set[str]:
    import hashlib

    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "jpg").iterdir()}


def test_default_spec_is_the_embedded_set(cache, tmp_path):
    """The embedded set's cache folder and bytes do not depend on SyntheticSpec: the tests above pin its
    difficulty, and every cached copy stays valid."""
    assert SyntheticSpec().tag() == "" and SyntheticSpec().is_default
    assert synthetic_root(cache, 0, SyntheticSpec()) == synthetic_root(cache, 0)
    build_split(tmp_path / "val", "val", seed=0, spec=SyntheticSpec())
    assert tree_digest(tmp_path / "val") == tree_digest(synthetic_root(cache, 0) / "val")


def test_a_larger_training_split_keeps_every_embedded_view(cache, tmp_path):
    """More views per place and per distractor: the embedded set's views reappear byte for byte (a view's pixels
    depend on its seed keys only), the ground truth reads as Oxford's, and the folder is the spec's own."""
    spec = SyntheticSpec(train_place_views=12, train_distractor_views=30)
    summary = build_split(tmp_path / "train", "train", seed=0, spec=spec)
    assert summary["images"] == 11 * (5 + 12) + 7 * 30
    ds = load_original(tmp_path / "train", "synthetic-train")
    assert len(ds.images) == summary["images"] and len(ds.queries) == 55
    assert _digests(synthetic_root(cache, 0) / "train") < _digests(tmp_path / "train")
    assert synthetic_root(cache, 0, spec).name == f"synthetic-v{VERSION}-s0-tp12-td30-px200-256"
    embedded = json.loads((synthetic_root(cache, 0) / "manifest.json").read_text())["splits"]["train"]
    assert summary["labels"]["good"] > embedded["labels"]["good"]


def test_image_size_is_a_parameter(tmp_path):
    build_split(tmp_path / "test", "test", seed=0, spec=SyntheticSpec(min_side=96, max_side=128))
    sides = set()
    for path in (tmp_path / "test" / "jpg").iterdir():
        with Image.open(path) as im:
            sides.add(max(im.size))
    assert min(sides) >= 96 and max(sides) <= 128 and len(sides) > 1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"min_side": 300, "max_side": 200}, "min_side=300, max_side=200"),
        ({"min_side": 16}, "32 <= min_side"),
        ({"train_distractor_views": 0}, "train_distractor_views must be an integer >= 1, got 0"),
    ],
)
def test_bad_spec_is_refused_with_the_field_named(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        SyntheticSpec(**kwargs)


def test_registry_large_variant_is_big_enough_for_pca_4096():
    """synthetic-large's training split holds more than the 4,097 images PCA-4096 needs (counted from its spec;
    the slow test below builds it)."""
    spec = SyntheticSpec(**SYNTHETIC_VARIANTS["synthetic-large"])
    places = sum(r.landmark for r in REGIONS["train"])
    distractors = len(REGIONS["train"]) - places
    n = places * (QUERIES_PER_PLACE + spec.views("train", True)) + distractors * spec.views("train", False)
    assert n >= 4200
    assert spec.views("val", False) == SyntheticSpec().views("val", False)  # validation and test stay small


@pytest.mark.slow
def test_synthetic_large_loads_with_its_val_and_test_equal_to_the_embedded_ones(cache, tmp_path):
    train = load_dataset("synthetic-large-train", data_root=tmp_path)
    assert len(train.images) >= 4200 and len(train.queries) == 55
    spec = SyntheticSpec(**SYNTHETIC_VARIANTS["synthetic-large"])
    for split in ("val", "test"):
        assert tree_digest(synthetic_root(tmp_path, 0, spec) / split) == tree_digest(
            synthetic_root(cache, 0) / split
        )
