"""Shared pytest setup: keep every Ray server on loopback and keep torch small on the 2-core CI machine."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Without this Ray binds the machine's network address; with it every node stays on 127.0.0.1
# (docs/traps.md#ray-on-loopback).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import faiss  # noqa: E402,F401  (faiss before torch, both bring OpenMP: docs/traps.md#faiss-before-torch)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (marked gpu); run with a GPU to exercise it")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


REPO = Path(__file__).resolve().parents[1]
#: The one list of the system packages the tests drive, and their installer (the README's test command runs it).
SYSTEM_DEPS = REPO / ".ci" / "system-deps.sh"


def load_benchmark(script: Path):
    """A script of ``benchmarks/`` imported as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fail_missing_system_tools(missing: list[str]) -> None:
    """Fail (never skip) a test whose system tools are missing, naming the command that installs them."""
    if missing:
        pytest.fail(
            f"missing system tools: {', '.join(missing)}. Install them with `{SYSTEM_DEPS.relative_to(REPO)}` "
            "(the README's test command runs it; it needs root or passwordless sudo, otherwise it prints the "
            "`sudo apt-get install …` line to run).",
            pytrace=False,
        )


#: A tiny search space for sweep tests: a random sampler (configs do not depend on which trial finishes first),
#: one or two training steps per stage, and a range wide enough that trials land at different memory/mAP points.
TINY_SPACE = """\
description: test sweep — seconds per trial on the synthetic set
sampler: {type: random, seed: 0}
num_samples: 4
params:
  threshold: {float: [0.3, 1.4]}
  bits: {int: [2, 8]}
fixed:
  prune_mode: sigma
  quant_mode: kmeans
  l1_lambda: 1.0e-6
  l1_steps: 1
  retrain_steps: 2
  quant_steps: 2
  kmeans_iters: 5
"""

#: Base fine-tune steps for tests: the base is built once per storage root and shared by every test sweep.
#: The base every test sweep shares: the tiny CNN with a 10-step fine-tune (built once per session).
TEST_PRESET = "tiny-test"


@dataclass
class FinishedSweep:
    """A sweep that ran to the end once per test session: its storage, MLflow store and names."""

    root: Path
    storage: Path
    mlflow_uri: str
    name: str
    experiment: str
    space: Path
    stdout: str


def run_sweep_cli(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python sweep/run.py ARGS`` as a user runs it: a plain file, its own process and its own local Ray."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "sweep" / "run.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def sweep_storage(tmp_path_factory) -> Path:
    """One storage root for the session's sweeps, so their shared base model is built once."""
    return tmp_path_factory.mktemp("sweep-storage")


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spaces") / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return path


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory, sweep_storage: Path, tiny_space: Path) -> FinishedSweep:
    root = tmp_path_factory.mktemp("finished-sweep")
    mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
    name, experiment = "finished", "vladsweep-tests"
    proc = run_sweep_cli(
        [
            "--search-space",
            str(tiny_space),
            "--storage",
            str(sweep_storage),
            "--name",
            name,
            "--experiment",
            experiment,
            "--mlflow-uri",
            mlflow_uri,
            "--preset",
            TEST_PRESET,
        ],
        cwd=root,
    )
    assert proc.returncode == 0, f"the test sweep failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return FinishedSweep(root, sweep_storage, mlflow_uri, name, experiment, tiny_space, proc.stdout)
