"""The embedded synthetic landmark set: determinism, shape, disjoint splits, Oxford layout, cache safety."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from trainables.data.oxford import load_original
from trainables.data.registry import load_dataset
from trainables.data.synthetic import (
    REGIONS,
    VERSION,
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
