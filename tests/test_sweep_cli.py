"""Bad input to ``sweep/run.py`` gets a clear error before any trial starts (and before Ray starts)."""

from __future__ import annotations

import os
import subprocess
import time

from conftest import REPO, SYSTEM_DEPS, run_sweep_cli
from net import free_port


def test_help_explains_every_flag(tmp_path):
    proc = run_sweep_cli(["--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    for flag in (
        "--search-space",
        "--num-samples",
        "--max-concurrent",
        "--gpus-per-trial",
        "--cpu-only",
        "--cpus-per-trial",
        "--storage",
        "--name",
        "--resume",
        "--mlflow-uri",
        "--experiment",
        "--dataset",
        "--data-root",
        "--backbone",
        "--seed",
    ):
        assert flag in proc.stdout


def test_a_space_compressing_groups_the_base_lacks_is_refused_before_anything_starts(tmp_path):
    """pareto.yaml compresses the whitening; a base built without whitening has none: refused at once, naming the
    file, the groups and the fix, with nothing left behind (no MLflow store, no storage folder)."""
    proc = run_sweep_cli(
        ["--search-space", "pareto.yaml", "--preset", "tiny", "--whitening-dim", "0", "--storage", "r"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pareto.yaml: groups = 'conv,netvlad,whitening' names whitening" in proc.stderr
    assert "Set groups: conv,netvlad" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_search_space_error_names_file_key_and_value(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("params:\n  bits: {int: [0, 40]}\n  thresold: {float: [0.1, 1.0]}\n")
    proc = run_sweep_cli(["--search-space", str(space), "--storage", str(tmp_path / "r")], cwd=tmp_path)
    assert proc.returncode == 2
    assert str(space) in proc.stderr and "bits" in proc.stderr and "thresold" in proc.stderr
    assert not (tmp_path / "r").exists(), "nothing is written before the input is valid"


def test_unreachable_mlflow_server_refuses_within_seconds(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_sweep_cli(["--mlflow-uri", uri, "--storage", str(tmp_path / "r")], cwd=tmp_path)
    assert proc.returncode == 2
    assert uri in proc.stderr and "does not answer" in proc.stderr
    assert (
        time.monotonic() - start < 60
    )  # a generous bound: interpreter start-up dominates on a loaded machine
    assert not list((tmp_path / "r").glob("*/experiment_state*"))


def test_unwritable_storage_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_sweep_cli(["--storage", str(blocker / "results")], cwd=tmp_path)
    assert proc.returncode == 2
    assert "--storage" in proc.stderr and str(blocker) in proc.stderr


def test_missing_dataset_names_the_missing_files(tmp_path):
    (tmp_path / "data" / "oxford5k").mkdir(parents=True)
    # The tiny preset: the poster presets' ImageNet weights are not on this machine (refused before the data).
    args = ["--preset", "tiny", "--dataset", "paris6k", "--data-root", str(tmp_path / "data")]
    proc = run_sweep_cli([*args, "--storage", str(tmp_path / "r")], cwd=tmp_path)
    assert proc.returncode == 2
    assert "paris6k" in proc.stderr and "download" in proc.stderr


def test_resume_without_a_sweep_and_a_second_run_without_resume(tmp_path):
    proc = run_sweep_cli(["--resume", "--name", "nothing", "--storage", str(tmp_path / "r")], cwd=tmp_path)
    assert proc.returncode == 2 and "no sweep named 'nothing'" in proc.stderr
    existing = tmp_path / "r" / "taken"
    existing.mkdir(parents=True)
    (existing / "experiment_state-2026.json").write_text("{}")
    proc = run_sweep_cli(["--name", "taken", "--storage", str(tmp_path / "r")], cwd=tmp_path)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def _readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()


def test_ci_runs_exactly_the_readmes_test_command_which_installs_the_system_packages():
    run_cmd, test_cmd = _readme_commands()
    assert run_cmd.endswith("sweep/run.py") and test_cmd.endswith("pytest -q")
    assert test_cmd in (REPO / ".ci" / "run").read_text().splitlines(), (
        ".ci/run must run the README's command"
    )
    assert str(SYSTEM_DEPS.relative_to(REPO)) in test_cmd
    assert os.access(SYSTEM_DEPS, os.X_OK) and os.access(REPO / ".ci" / "run", os.X_OK)
    assert "set -euo pipefail" in (REPO / ".ci" / "run").read_text()  # pytest's exit 5 (no tests) fails CI


def test_system_deps_says_what_to_run_when_it_may_not_install(tmp_path):
    """Not root, no sudo: nothing installed, the apt-get line printed, exit status 10."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    for tool in ("sort", "cat"):
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    proc = subprocess.run(
        ["/bin/bash", str(SYSTEM_DEPS)],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 10, proc.stderr
    assert "sudo apt-get install -y" in proc.stderr and "rsync" in proc.stderr and "chromium" in proc.stderr


def test_the_sampler_seed_is_the_space_files_unless_search_seed_is_given(tmp_path):
    """``--seed`` is part of the base's key, so the sampler's seed is apart from it: the space file's
    ``sampler.seed`` by default, ``--search-seed`` when given (a benchmark over sampler seeds reuses one base)."""
    from types import SimpleNamespace

    from search_spaces.schema import load_search_space
    from sweep.run import build_parser, search_seed

    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "description: seeds\nsampler: {type: random, seed: 7}\nnum_samples: 2\n"
        "params:\n  bits: {int: [2, 8]}\n"
    )
    space = load_search_space(space_file)
    args = build_parser().parse_args(["--seed", "3"])
    assert search_seed(SimpleNamespace(args=args, space=space)) == 7
    args = build_parser().parse_args(["--seed", "3", "--search-seed", "11"])
    assert search_seed(SimpleNamespace(args=args, space=space)) == 11
