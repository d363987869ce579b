"""``whitening_dim`` as a trial parameter: the truncated whitening is the base's first d PCA outputs and a valid
model after decoding; a real sweep with d = half the base's ships a file with d whitening rows that is smaller
than the same trial without it; spaces whose d the base cannot give are refused before Ray starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_PRESET, run_sweep_cli
from sweep_harness import trial_dirs

from search_spaces.schema import load_search_space
from sweep.run import UsageError, build_parser, check_whitening_dim, validate
from trainables.base import preset_config
from trainables.compression.codec import load_compressed, save_compressed
from trainables.compression.prune import apply_mask
from trainables.contract import (
    ARTIFACT_FILE,
    MEMORY_KEY,
    RATIO_KEY,
    STATE_FILE,
    TRIAL_PARAMS,
    WHITENING_DIM_KEY,
)
from trainables.data.images import load_image
from trainables.data.registry import load_dataset
from trainables.netvlad.model import NetVLADConfig, NetVLADModel, fit_whitening, init_clusters
from trainables.netvlad.whitening import learn_whitening

IMAGE_SIZE = 64
BASE_DIM, HALF = 32, 16


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """40 real images of the synthetic training split (the embedded set, built once per user cache)."""
    paths = load_dataset("synthetic-train").image_paths()[:40]
    return torch.stack([load_image(p, IMAGE_SIZE, square=True) for p in paths])


@pytest.fixture(scope="module")
def whitened(images) -> tuple[NetVLADModel, np.ndarray]:
    """A tiny NetVLAD (K=4 over the tiny CNN, 512-d VLAD) with 32-d PCA whitening learned on the 40 images, as the
    base build learns it (k-means init, then whitening from the model's own VLAD vectors)."""
    torch.manual_seed(0)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=None))
    init_clusters(model, list(images), n_images=40, per_image=20, seed=0)
    model.eval()
    with torch.no_grad():
        vlad = model.vlad(images).numpy()
    fit_whitening(model, vlad, BASE_DIM)
    return model, vlad


def _truncated(model: NetVLADModel, dim: int) -> NetVLADModel:
    copy = NetVLADModel(model.config)
    copy.load_state_dict(model.state_dict())
    copy.pool.alpha = model.pool.alpha
    copy.truncate_whitening(dim)
    return copy.eval()


def test_truncation_is_the_first_d_outputs_and_the_d_dim_pca_whitening(whitened, images):
    base, vlad = whitened
    small = _truncated(base, HALF)
    assert tuple(small.whiten.weight.shape) == (HALF, base.config.vlad_dim)
    assert small.config.whitening_dim == HALF and small.config_dict()["whitening_dim"] == HALF
    assert small.out_dim == HALF and base.config.whitening_dim == BASE_DIM, "the base is left as it was"
    with torch.no_grad():
        v = base.vlad(images[:8])
        full = base.whiten(v)  # before L2
        torch.testing.assert_close(small.whiten(v), full[:, :HALF], rtol=0, atol=1e-5)
        torch.testing.assert_close(small(images[:8]), F.normalize(full[:, :HALF], dim=1), rtol=0, atol=1e-5)
        assert not torch.allclose(small(images[:8]), F.normalize(full, dim=1)[:, :HALF], atol=1e-3)
    # The same as learning HALF-d whitening from the same vectors: PCA components come by variance.
    direct = learn_whitening(vlad, HALF)
    torch.testing.assert_close(small.whiten.weight.detach(), direct.weight.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small.whiten.bias.detach(), direct.bias.detach(), rtol=1e-5, atol=1e-4)


def test_truncated_model_is_a_valid_model_after_decode(whitened, images, tmp_path):
    small = _truncated(whitened[0], HALF)
    path = tmp_path / ARTIFACT_FILE
    save_compressed(
        small, None, path, meta={"architecture": {"name": "netvlad", "config": small.config_dict()}}
    )
    decoded = load_compressed(path).eval()
    assert decoded.config.whitening_dim == HALF
    assert tuple(decoded.whiten.weight.shape) == (HALF, small.config.vlad_dim)
    with torch.no_grad():
        torch.testing.assert_close(decoded(images[:4]), small(images[:4]), rtol=0, atol=1e-6)


def test_truncation_refuses_what_the_base_cannot_give(whitened):
    base = whitened[0]
    with pytest.raises(ValueError, match=r"whitening_dim=33 .*has 32 outputs; use an integer in 1\.\.32"):
        _truncated(base, BASE_DIM + 1)
    with pytest.raises(ValueError, match=r"1\.\.32"):
        _truncated(base, 0)
    plain = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=None))
    with pytest.raises(ValueError, match="whitening_dim=8: this model has no whitening"):
        plain.truncate_whitening(8)
    pruned = _truncated(base, BASE_DIM)  # d = the base's: a no-op
    assert pruned.config.whitening_dim == BASE_DIM
    apply_mask(pruned.whiten, pruned.whiten.weight.abs() > 0)
    with pytest.raises(ValueError, match="before pruning or quantizing"):
        pruned.truncate_whitening(HALF)


# ----------------------------------------------------------------------------------------- before Ray starts


def _space(tmp_path: Path, whitening_dim: str, groups: str = "conv,netvlad,whitening") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        "sampler: {type: random, seed: 0}\n"
        f"params:\n  bits: {{int: [2, 8]}}\n{whitening_dim}"
        f"fixed:\n  prune_mode: sigma\n  groups: {groups}\n"
    )
    return path


def _validate(tmp_path: Path, space: Path, *base_flags: str) -> None:
    args = build_parser().parse_args(
        [
            "--search-space",
            str(space),
            "--storage",
            str(tmp_path / "runs"),
            "--preset",
            TEST_PRESET,
            *base_flags,
        ]
    )
    validate(args)


def test_schema_reads_whitening_dim_as_an_optional_int_param(tmp_path):
    spec = TRIAL_PARAMS["whitening_dim"]
    assert spec.type is int and spec.default is None and spec.check(None) is None
    space = load_search_space(_space(tmp_path, "  whitening_dim: {choices: [null, 64, 128]}\n"))
    assert space.params["whitening_dim"].choices == (None, 64, 128)
    space = load_search_space(_space(tmp_path, "  whitening_dim: {int: [16, 256], log: true}\n"))
    assert (space.params["whitening_dim"].low, space.params["whitening_dim"].high) == (16, 256)
    for bad in ("{float: [16.0, 256.0]}", "{int: [0, 256]}"):
        with pytest.raises(ValueError, match="whitening_dim"):
            load_search_space(_space(tmp_path, f"  whitening_dim: {bad}\n"))


@pytest.mark.parametrize(
    ("entry", "value"),
    [
        ("  whitening_dim: {choices: [null, 128, 512]}\n", 512),
        ("  whitening_dim: {int: [64, 300]}\n", 300),
        ("  whitening_dim: {int: [56, 400], step: 100}\n", 356),  # the last value the step reaches
    ],
)
def test_a_whitening_dim_above_the_bases_is_refused_naming_file_value_and_base(tmp_path, entry, value):
    space = _space(tmp_path, entry)
    with pytest.raises(UsageError) as info:
        _validate(tmp_path, space)  # tiny-test: whitening_dim 256
    message = str(info.value)
    assert str(space) in message and f"whitening_dim = {value}" in message
    assert "the base's whitening_dim = 256" in message and "--whitening-dim" in message
    assert not (tmp_path / "runs").exists(), "refused before anything was written"


def test_a_fixed_whitening_dim_on_a_base_without_whitening_is_refused(tmp_path):
    space = tmp_path / "fixed.yaml"
    space.write_text("params:\n  bits: {int: [2, 8]}\nfixed:\n  groups: conv,netvlad\n  whitening_dim: 64\n")
    with pytest.raises(UsageError) as info:
        _validate(tmp_path, space, "--whitening-dim", "0")
    message = str(info.value)
    assert str(space) in message and "whitening_dim = 64" in message and "whitening_dim=None" in message
    assert "has no whitening" in message


def test_values_the_base_can_give_pass_the_check(tmp_path):
    base = preset_config(TEST_PRESET)
    for entry in (
        "  whitening_dim: {choices: [null, 128, 256]}\n",
        "  whitening_dim: {int: [64, 256]}\n",
        "  whitening_dim: {int: [56, 300], step: 100}\n",  # reaches 256 at most
        "",
    ):
        path = _space(tmp_path, entry)
        check_whitening_dim(load_search_space(path), path, base)
    no_whitening = preset_config(TEST_PRESET, {"whitening_dim": None})
    path = _space(tmp_path, "", "conv,netvlad")
    check_whitening_dim(load_search_space(path), path, no_whitening)


def test_the_cli_exits_2_before_ray_starts(tmp_path):
    space = _space(tmp_path, "  whitening_dim: {choices: [128, 4096]}\n")
    proc = run_sweep_cli(
        ["--search-space", str(space), "--preset", TEST_PRESET, "--storage", str(tmp_path / "runs")],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{space}: whitening_dim = 4096 is larger than the base's whitening_dim = 256" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"], "nothing was written"


# ------------------------------------------------------------------------------------------- a real sweep

GRID = """\
description: the same trial with the base's whitening and with half of it
sampler: {type: grid, seed: 0}
params:
  whitening_dim: {choices: [null, 128]}
fixed:
  prune_mode: sigma
  threshold: 0.5
  bits: 4
  quant_mode: kmeans
  l1_lambda: 1.0e-6
  l1_steps: 1
  retrain_steps: 2
  quant_steps: 2
  kmeans_iters: 5
"""


@pytest.mark.slow
def test_a_trial_with_half_the_whitening_ships_d_rows_in_a_smaller_file(sweep_storage, tmp_path):
    """A real sweep (Ray, an Optuna grid, MLflow) on the tiny-test base (256-d whitening): the trial with
    whitening_dim 128 ships a file whose whitening layer has 128 rows, smaller than the same trial without it, and
    both report the effective whitening_dim to MLflow."""
    space = tmp_path / "grid.yaml"
    space.write_text(GRID)
    uri, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "whitening-dim"
    args = ["--search-space", str(space), "--storage", str(sweep_storage), "--name", name]
    args += ["--experiment", "vladsweep-whitening", "--mlflow-uri", uri, "--preset", TEST_PRESET]
    proc = run_sweep_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    shipped = {}
    for trial_dir in trial_dirs(sweep_storage / name).values():
        last = max(trial_dir.glob("checkpoint_*"), key=lambda p: p.name)
        final = json.loads((last / STATE_FILE).read_text())["final"]
        config = json.loads((trial_dir / "params.json").read_text())
        shipped[config.get("whitening_dim")] = (last / ARTIFACT_FILE, final)
    assert set(shipped) == {None, 128}, shipped

    for asked, rows in ((None, 256), (128, 128)):
        artifact, final = shipped[asked]
        decoded = load_compressed(artifact)
        assert decoded.config.whitening_dim == rows == final[WHITENING_DIM_KEY]
        assert tuple(decoded.whiten.weight.shape) == (rows, decoded.config.vlad_dim)
        assert final[MEMORY_KEY] == pytest.approx(os.path.getsize(artifact) / 2**20, rel=0, abs=1e-12)
    assert shipped[128][1][MEMORY_KEY] < shipped[None][1][MEMORY_KEY]
    # The ratio is against the dense base the user has (256 whitening rows), not the truncated model: its
    # dense fp32 bytes are the same in both trials.
    dense = {
        asked: final[RATIO_KEY] * os.path.getsize(artifact) for asked, (artifact, final) in shipped.items()
    }
    assert dense[128] == pytest.approx(dense[None], rel=1e-9)

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("vladsweep-whitening")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`vladsweep.role` = 'trial'")
    assert sorted(r.data.metrics[WHITENING_DIM_KEY] for r in trials) == [128.0, 256.0]
