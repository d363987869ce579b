"""`benchmarks/bench_coders.py`: the signed integer levels handed to NNCodec (value rank, 0 = pruned) map back to
the layer's codebook indices and keep-mask exactly, on random layers and on a real artifact's layers through the
``.npz`` the NNCodec helper reads; without ``--nncodec-python`` the NNCodec column says "not run"; a helper that
cannot run fails loudly. None of this needs NNCodec's venv."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import REPO, load_benchmark
from tiny_artifacts import tiny_artifact

from trainables.compression.container import read_tensors
from trainables.compression.layouts import decode_tensor

BENCH = REPO / "benchmarks" / "bench_coders.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark(BENCH)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("coders") / "model.safetensors"
    tiny_artifact(path, bits=3, sparsity=0.6, image_size=None)
    return path


def _check_levels(bench, codebook, indices, mask):
    levels, order, negatives = bench.value_rank_levels(codebook, indices, mask)
    assert levels.dtype == np.int32 and levels.shape == indices.shape
    assert np.array_equal(levels != 0, mask), "0 must mean pruned, and only pruned"
    back, back_mask = bench.indices_from_levels(levels, order, negatives)
    assert np.array_equal(back_mask, mask)
    assert np.array_equal(np.where(mask, back, 0), np.where(mask, indices, 0))
    # Order preserved: a larger level is a larger value, over every pair of used levels.
    kept_levels, kept_values = levels[mask], codebook[indices[mask]]
    by_level = np.argsort(kept_levels, kind="stable")
    assert np.all(np.diff(kept_values[by_level]) >= 0)
    # No gaps: the used values are -negatives..-1 and 1..positives, the ones nearest zero at ±1.
    used = np.unique(kept_levels)
    positives = len(order) - negatives
    assert used.tolist() == [*range(-negatives, 0), *range(1, positives + 1)]
    if negatives:
        assert codebook[order[negatives - 1]] == kept_values[kept_values < 0].max()
    if positives:
        assert codebook[order[negatives]] == kept_values[kept_values >= 0].min()
    return levels


@pytest.mark.parametrize("seed", range(6))
def test_value_rank_levels_round_trip_random_layers(bench, seed):
    rng = np.random.default_rng(seed)
    bits = int(rng.integers(1, 9))
    k = 1 << bits
    # Unsorted codebooks, one-sided ones (seed 1: all positive, seed 2: all negative), and duplicate values.
    codebook = rng.normal(size=k).astype(np.float32)
    if seed == 1:
        codebook = np.abs(codebook) + 0.01
    if seed == 2:
        codebook = -np.abs(codebook) - 0.01
    if seed == 3 and k > 2:
        codebook[1] = codebook[0]
    shape = (int(rng.integers(1, 9)), int(rng.integers(1, 40)))
    # Some codebook entries unused (as a uniform grid's values inside the pruned band are).
    usable = rng.choice(k, size=max(1, k // 2), replace=False)
    indices = rng.choice(usable, size=shape).astype(np.int32)
    mask = rng.random(shape) < 0.6
    mask.flat[0] = True
    _check_levels(bench, codebook, indices, mask)


def test_all_pruned_layer_has_only_zero_levels(bench):
    codebook = np.array([-1.0, 1.0], np.float32)
    levels = _check_levels(bench, codebook, np.zeros((3, 4), np.int32), np.zeros((3, 4), bool))
    assert not levels.any()


def test_levels_of_a_real_artifact_round_trip_through_the_npz(bench, artifact, tmp_path):
    header, stored = read_tensors(artifact)
    quantized = {k: r for k, r in header["tensors"].items() if r["kind"] == "quantized"}
    assert quantized, "the tiny artifact should have quantized layers"
    tables = {}
    for key, rec in quantized.items():
        codebook, indices, mask, _scale = bench._levels(artifact, key, rec, stored)
        levels = _check_levels(bench, codebook.numpy(), indices.numpy(), mask.numpy())
        tables[key] = (levels, *bench.value_rank_levels(codebook.numpy(), indices.numpy(), mask.numpy())[1:])
    npz = tmp_path / "levels.npz"
    np.savez(npz, **{k: t[0] for k, t in tables.items()})
    prefix = "::"
    with np.load(npz) as f:
        assert list(f.files) == list(tables)
        for key, (_, order, negatives) in tables.items():
            back, back_mask = bench.indices_from_levels(f[key], order, negatives)
            payload = {
                n[len(key + prefix) :]: t.numpy() for n, t in stored.items() if n.startswith(key + prefix)
            }
            rec = {k: v for k, v in quantized[key].items() if k != "scale"}
            weight = decode_tensor(rec, payload).numpy()
            rebuilt = np.where(back_mask, payload["codebook"][back], 0).reshape(weight.shape)
            assert np.array_equal(rebuilt, weight), key


def test_without_nncodec_the_column_says_not_run(bench, artifact, capsys):
    assert bench.main([str(artifact), "--no-zstd"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| model.safetensors |")]
    assert rows and all("| not run |" in r for r in rows)
    assert any("**all quantized layers**" in r for r in rows)
    assert "whole file: " in out and "with NNCodec" not in out


def test_a_helper_that_cannot_run_nncodec_fails_loudly(bench, artifact, tmp_path):
    # This venv has no nncodec: the helper exits non-zero and the benchmark stops, naming the command.
    levels = {"w": np.array([[1, 0, -1]], np.int32)}
    npz = tmp_path / "levels.npz"
    np.savez(npz, **levels)
    with pytest.raises(SystemExit, match="nncodec_levels.py.*exited 1 before w was coded"):
        bench.run_nncodec(sys.executable, npz, ["w"], timeout_s=120)


def test_missing_nncodec_python_is_a_usage_error(bench, artifact, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main([str(artifact), "--nncodec-python", str(tmp_path / "nope" / "python")])
    assert e.value.code == 2
