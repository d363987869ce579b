"""The GPU cluster path: what would break or idle the first time a user runs VGG16 on cluster/gpu.yaml.

A GPU trial whose torch sees no CUDA is refused, not run on the CPU; the poster presets start from ImageNet weights
and a random base with frozen layers is refused; ``--data-root`` defaults to ``$VLADSWEEP_DATA_ROOT`` (which the
cluster files export); a poster sweep on a cluster with ``--gpus-per-trial 0`` is refused unless ``--cpu-only``;
a trial mines hard negatives once over all its ``train_fn`` calls (a real tiny model on the synthetic set); the
commands the cluster file and docs/cluster.md show resolve to the base they promise. Nothing here needs a GPU or a
cloud: the AWS side is only read (its YAML and docs), never called.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess

import faiss  # noqa: F401  (faiss before torch)
import pytest
import torch
import yaml
from conftest import REPO, TEST_PRESET, run_sweep_cli

from sweep.preflight import PreflightError, check_gpus_for_preset
from sweep.run import CODE_VERSION_ENV, UsageError, build_parser, code_version, joins_cluster, resolve_base
from trainables.base import (
    DATA_ROOT_ENV,
    BaseConfig,
    preset_config,
    retrain_fn,
    trial_miner,
)
from trainables.devices import ALLOW_CPU_ENV, NoCudaError, select_device
from trainables.netvlad.model import NetVLADConfig, NetVLADModel

# ------------------------------------------------------------------------------------ 1. no silent CPU fallback


def test_no_gpu_share_runs_on_the_cpu():
    assert select_device(0) == torch.device("cpu")


def test_a_gpu_share_without_cuda_is_refused_with_the_reason(monkeypatch):
    monkeypatch.delenv(ALLOW_CPU_ENV, raising=False)
    if torch.cuda.is_available():  # a GPU machine: the share maps to CUDA
        assert select_device(1).type == "cuda"
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what Ray sets for a trial holding GPU 0
    with pytest.raises(NoCudaError) as err:
        select_device(1)
    message = str(err.value)
    for fact in (
        "granted this process 1 GPU",
        "CUDA_VISIBLE_DEVICES = '0'",
        "torch.cuda.is_available() = False",
    ):
        assert fact in message, message
    assert f"torch {torch.__version__}" in message
    assert "--gpus-per-trial 0" in message and ALLOW_CPU_ENV in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback only exists where CUDA is missing")
def test_declared_gpus_may_fall_back_only_when_asked(monkeypatch):
    monkeypatch.setenv(ALLOW_CPU_ENV, "1")
    assert select_device(0.5) == torch.device("cpu")


# --------------------------------------------------------------------------- 2. ImageNet weights, nothing random


def test_poster_presets_start_from_imagenet_weights():
    for name in ("poster-alexnet", "poster-vgg16"):
        assert preset_config(name).weights == "imagenet", name


def test_a_random_base_with_frozen_layers_is_refused_naming_the_flags():
    for backbone in ("alexnet", "vgg16"):
        with pytest.raises(ValueError, match="--weights imagenet") as err:
            BaseConfig(backbone=backbone)
        assert "frozen" in str(err.value) and "--backbone tiny" in str(err.value)
        with pytest.raises(ValueError, match="frozen"):
            preset_config(f"poster-{backbone}", {"weights": "random"})


def test_random_weights_in_so_many_words_are_the_random_init_of_backbones_that_train_every_layer():
    assert BaseConfig(weights="random") == BaseConfig()  # the same key: a cached base stays valid
    assert preset_config("embedded", {"weights": "random"}).weights is None
    with pytest.raises(ValueError, match="tiny has no ImageNet weights: pass --weights random"):
        BaseConfig(weights="imagenet")


def test_the_embedded_and_test_presets_keep_their_cache_keys():
    # Cached bases are found by key: changing these rebuilds every user's embedded base (and the tests' one).
    assert preset_config("embedded").key() == "8c33f986a18c09c1"
    assert preset_config(TEST_PRESET).key() == "f1e4cf3981e75bec"


def _submit_args(text: str) -> list[list[str]]:
    """The sweep arguments (after ``--``) of every ``ray submit … sweep/run.py -- …`` command in ``text``."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    commands = []
    for line in joined.splitlines():
        line = line.lstrip("# ")
        if line.startswith("ray submit") and " -- " in line:
            commands.append(shlex.split(line.split(" -- ", 1)[1].split("#")[0]))
    return commands


def test_the_cluster_commands_build_the_base_they_promise(monkeypatch):
    """The `ray submit` commands in gpu.yaml and docs/cluster.md: an ImageNet VGG16 (or AlexNet) base, the data
    from the nodes' $VLADSWEEP_DATA_ROOT (never a `~` the laptop expands), and GPUs asked for."""
    monkeypatch.setenv(DATA_ROOT_ENV, "/home/ubuntu/data")
    texts = {
        "cluster/gpu.yaml": (REPO / "cluster" / "gpu.yaml").read_text(),
        "docs/cluster.md": (REPO / "docs" / "cluster.md").read_text(),
    }
    seen = 0
    for where, text in texts.items():
        for argv in _submit_args(text):
            seen += 1
            assert not any(a.startswith("~") for a in argv), f"{where}: {argv} has a path the laptop expands"
            args = build_parser().parse_args(argv)
            config, preset = resolve_base(args)
            if config.dataset.startswith("synthetic"):
                continue
            assert config.weights == "imagenet", f"{where}: {argv} builds a {config.backbone} without weights"
            assert config.data_root == "/home/ubuntu/data" or args.data_root, f"{where}: {argv}"
            if where.startswith("cluster/gpu"):
                assert args.data_root is None, f"{where}: the nodes export {DATA_ROOT_ENV}; no --data-root"
            assert args.gpus_per_trial > 0, f"{where}: {argv} runs a real-data sweep on CPUs"
    assert seen >= 3, f"found only {seen} ray submit commands"


# ------------------------------------------------------------------------------ 3. --data-root from the nodes


def test_data_root_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "data"))
    config, _ = resolve_base(build_parser().parse_args(["--dataset", "paris6k"]))
    assert config.data_root == str(tmp_path / "data")
    given, _ = resolve_base(build_parser().parse_args(["--dataset", "paris6k", "--data-root", "/elsewhere"]))
    assert given.data_root == "/elsewhere", "a flag wins over the environment"
    synthetic, _ = resolve_base(build_parser().parse_args([]))
    assert synthetic.data_root is None, "the synthetic set keeps its own cache"
    quoted, _ = resolve_base(build_parser().parse_args(["--dataset", "paris6k", "--data-root", "~/d"]))
    assert quoted.data_root == os.path.expanduser("~/d"), "a quoted ~ is this machine's home"


def test_without_the_environment_real_data_still_needs_a_data_root(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(UsageError, match="needs --data-root"):
        resolve_base(build_parser().parse_args(["--dataset", "paris6k"]))


# ------------------------------------------------------------------------- 4. GPUs asked for on a cluster


def _check(preset: str, *flags: str, on_cluster: bool) -> None:
    """The check as validate calls it, on the flags as the CLI parses them."""
    args = build_parser().parse_args(["--preset", preset, "--data-root", "/data", *flags])
    check_gpus_for_preset(preset, args.gpus_per_trial, args.cpu_only, on_cluster)


def test_a_poster_sweep_on_a_cluster_without_gpus_is_refused_unless_cpu_only():
    for preset in ("poster-alexnet", "poster-vgg16"):
        with pytest.raises(PreflightError, match="--gpus-per-trial 1") as err:
            _check(preset, on_cluster=True)
        assert "--cpu-only" in str(err.value)
        _check(preset, "--cpu-only", on_cluster=True)
        _check(preset, "--gpus-per-trial", "0.5", on_cluster=True)
        _check(preset, on_cluster=False)  # a local run
    _check(TEST_PRESET, on_cluster=True)  # not a GPU preset
    with pytest.raises(PreflightError, match="pick one"):
        _check("poster-vgg16", "--cpu-only", "--gpus-per-trial", "1", on_cluster=False)


def test_what_counts_as_a_cluster(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` recorded here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not joins_cluster(None)
    assert joins_cluster("10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert joins_cluster(None)


def test_the_cli_refuses_a_gpu_less_poster_sweep_on_a_cluster_before_ray(tmp_path):
    # The address is never dialled: the refusal comes before Ray starts.
    proc = run_sweep_cli(
        ["--preset", "poster-vgg16", "--data-root", str(tmp_path), "--ray-address", "127.0.0.1:9"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--gpus-per-trial 1" in proc.stderr and "--cpu-only" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------- 5. one mining per trial


def _trial_meta() -> dict:
    # The test preset's config, with tuples cut to 3 images and 48 px squares so a pass takes seconds.
    config = preset_config(TEST_PRESET).to_dict() | {
        "image_size": 48,
        "num_negatives": 1,
        "neg_pool_size": 20,
    }
    return {"config": config, "train_split": "synthetic-train"}


def _tiny_model() -> NetVLADModel:
    torch.manual_seed(0)
    return NetVLADModel(NetVLADConfig("tiny", 4, None))


def test_a_trial_mines_hard_negatives_once_over_its_train_fn_calls():
    """The four train_fn calls of a pareto.yaml trial (sparsify, two prune rounds, quantize), more steps in all
    than one pass over the anchors (the base fine-tune's re-mining period): one mining, at the first step."""
    meta = _trial_meta()
    miner = trial_miner(meta, None, seed=0)
    model = _tiny_model()
    train_fn = retrain_fn(model, meta, miner, 3e-3, device=torch.device("cpu"))
    per_pass = math.ceil(len(miner) / meta["config"]["batch_size"])
    calls = [per_pass // 2, per_pass // 4, per_pass // 4, per_pass // 2]
    assert sum(calls) > per_pass
    for steps in calls:
        assert len(train_fn(model, steps)) == steps
    assert miner.refreshes == 1


def test_a_trial_re_mines_when_asked_counting_steps_across_calls():
    meta = _trial_meta()
    miner = trial_miner(meta, None, seed=0)
    model = _tiny_model()
    train_fn = retrain_fn(model, meta, miner, 3e-3, device=torch.device("cpu"), refresh_every=3)
    for steps in (2, 2, 2):
        train_fn(model, steps)
    assert miner.refreshes == 2  # steps 0 and 3 of the trial's six


# ---------------------------------------------------------------------------- 6. the cluster's code version


def test_code_version_reads_the_version_the_cluster_setup_exports(monkeypatch):
    monkeypatch.setenv(CODE_VERSION_ENV, "src-0123456789ab")
    assert code_version().endswith("+src-0123456789ab")


def test_gpu_yaml_exports_the_code_version_the_docs_recompute(tmp_path):
    """The setup command that hashes the synced source, run on a copy laid out as a node has it, gives the hash the
    docs' command gives in the checkout, and covers exactly what file_mounts copy."""
    config = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    command = next(c for c in config["setup_commands"] if CODE_VERSION_ENV in c)
    hashed = command.split("find ", 1)[1].split(" -type", 1)[0].split()
    assert sorted(hashed) == sorted(config["file_mounts"].values())
    node = tmp_path / "home" / "vladsweep"
    for local in config["file_mounts"].values():
        source, target = REPO / local, node / local
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(*config["rsync_exclude"]))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    exported = (tmp_path / "home" / ".vladsweep_env").read_text()
    on_node = re.search(rf"export {CODE_VERSION_ENV}=src-([0-9a-f]{{12}})\n", exported).group(1)
    docs = (REPO / "docs" / "cluster.md").read_text()
    block = next(b for b in docs.split("```bash\n")[1:] if b.startswith("find pyproject.toml"))
    docs_command = block.split("```", 1)[0].replace("\\\n", " ")
    local = subprocess.run(["bash", "-c", docs_command], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert local.stdout.strip() == on_node
