"""What ``sweep/run.py`` refuses before it costs anything (sweep/preflight.py), and the ``--pending-timeout`` of a
sweep that waits for resources it does not get.

Fast: the local CPU/GPU check (no Ray starts), weights files (a temporary ``TORCH_HOME``, nothing downloaded),
the whitening dimension against the training split, undecodable images (a copy of the synthetic set, one file
damaged) and their check cache, the sweep lock (two real processes). Slow: a real ``ray.cluster_utils.Cluster``
on 127.0.0.1 — a request no node can hold, the base build and the trials waiting past the timeout.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEST_PRESET, run_sweep_cli
from sweep_harness import (
    SweepProcess,
    local_cluster,
    private_ray_tmpdir,
    saved_trial_statuses,
    sweep_args,
    wait_for,
)

from sweep import preflight
from sweep.storage import SweepStorage
from trainables.base import preset_config
from trainables.data.registry import load_dataset
from trainables.data.synthetic import ensure_synthetic, synthetic_root
from trainables.netvlad.backbones import imagenet_weights_url

EXIT_USAGE, EXIT_PENDING = 2, 4


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_sweep_cli(["--preset", TEST_PRESET, "--storage", str(tmp_path / "r"), *args], cwd=tmp_path)


# ------------------------------------------------------------------------------------------- local resources


def test_more_gpus_or_cpus_than_this_machine_has_are_refused_before_ray_starts(tmp_path, monkeypatch):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gpus = torch.cuda.device_count() + 1
    proc = _cli(tmp_path, "--gpus-per-trial", str(gpus))
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert f"--gpus-per-trial {gpus}: this machine has {gpus - 1} GPU(s)" in proc.stderr
    assert "--ray-address" in proc.stderr
    cpus = len(os.sched_getaffinity(0)) + (os.cpu_count() or 1) + 1  # more than any count of this machine
    proc = _cli(tmp_path, "--cpus-per-trial", str(cpus))
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert f"--cpus-per-trial {cpus}: this machine has" in proc.stderr and "or less" in proc.stderr
    assert not list(ray_tmp.rglob("session_*")), "a refused start must not have started Ray"
    assert not (tmp_path / "r").exists(), "refused before the storage was touched"


def test_a_malformed_loader_workers_variable_is_refused_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("VLADSWEEP_LOADER_WORKERS", "many")
    proc = _cli(tmp_path)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert "$VLADSWEEP_LOADER_WORKERS='many': expected a non-negative integer" in proc.stderr
    assert not (tmp_path / "r").exists(), "refused before the storage was touched"


def test_pending_timeout_must_not_be_negative(tmp_path):
    proc = _cli(tmp_path, "--pending-timeout", "-1")
    assert proc.returncode == EXIT_USAGE and "--pending-timeout -1: must be ≥ 0" in proc.stderr


# ------------------------------------------------------------------------------------------- weights


def test_missing_imagenet_weights_are_refused_naming_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / Path(imagenet_weights_url("alexnet")).name
    proc = _cli(tmp_path, "--backbone", "alexnet", "--weights", "imagenet")
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert str(expected) in proc.stderr and imagenet_weights_url("alexnet") in proc.stderr
    assert "copy the file to" in proc.stderr


def test_a_weights_file_that_does_not_match_its_hash_or_is_missing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("VLADSWEEP_CACHE", str(tmp_path / "cache"))
    config = preset_config(TEST_PRESET, {"backbone": "alexnet", "weights": "imagenet"})
    path = tmp_path / "torch" / "hub" / "checkpoints" / Path(imagenet_weights_url("alexnet")).name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the weights")  # a truncated or wrong copy
    with pytest.raises(preflight.PreflightError, match="corrupt: its sha256 starts with") as err:
        preflight.check_weights(config)
    assert str(path) in str(err.value) and "7be5be79" in str(err.value)
    assert not list((tmp_path / "cache").rglob("weights-*.json")), "a bad file is never remembered as good"

    own = tmp_path / "backbone.pt"
    torch.save({"0.weight": torch.zeros(1)}, own)
    preflight.check_weights(preset_config(TEST_PRESET, {"weights": str(own)}))  # a state-dict path: exists
    with pytest.raises(preflight.PreflightError, match="no such file"):
        preflight.check_weights(preset_config(TEST_PRESET, {"weights": str(tmp_path / "nope.pt")}))


# ------------------------------------------------------------------------------------------- whitening


def test_whitening_with_more_dimensions_than_training_images_is_refused(tmp_path):
    n = len(load_dataset("synthetic-train").image_paths())
    proc = _cli(tmp_path, "--whitening-dim", str(n + 10))
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert f"--whitening-dim {n + 10}: PCA whitening learned on the {n} images" in proc.stderr
    assert f"Pass --whitening-dim {n - 1} or less" in proc.stderr
    preflight.check_whitening(
        preset_config(TEST_PRESET, {"whitening_dim": n - 1}), load_dataset("synthetic-train")
    )


# ------------------------------------------------------------------------------------------- images


@pytest.fixture
def synthetic_copy(tmp_path, monkeypatch) -> Path:
    """A private copy of the synthetic set (its ``--data-root``) and a private user cache for the check cache."""
    src = ensure_synthetic()  # the user's cached set (built once, as every test that reads it does)
    data_root = tmp_path / "data"
    shutil.copytree(src, synthetic_root(data_root))
    monkeypatch.setenv("VLADSWEEP_CACHE", str(tmp_path / "cache"))
    return data_root


def _non_query_image(data_root: Path, split: str = "synthetic-train") -> Path:
    ds = load_dataset(split, data_root)
    return next(ds.image_path(i) for i, name in enumerate(ds.images) if name not in set(ds.queries))


def test_a_zero_byte_image_is_refused_naming_it(tmp_path, synthetic_copy):
    bad = _non_query_image(synthetic_copy)
    bad.write_bytes(b"")
    proc = _cli(tmp_path, "--data-root", str(synthetic_copy))
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    total = sum(
        len(load_dataset(f"synthetic-{s}", synthetic_copy).image_paths()) for s in ("train", "val", "test")
    )
    assert f"1 of {total} images cannot be read" in proc.stderr
    assert f"{bad} (0 bytes)" in proc.stderr and "Replace each with a good copy, or delete it" in proc.stderr


def test_the_image_check_remembers_good_files_and_rechecks_changed_ones(synthetic_copy, monkeypatch):
    train = load_dataset("synthetic-train", synthetic_copy)
    first = preflight.check_images([train], show_progress=False)
    assert first == preflight.ImageCheck(total=len(train.image_paths()), decoded=len(train.image_paths()))
    assert len(list((synthetic_copy.parent / "cache" / "preflight").glob("images-*.json"))) == 1

    decoded: list[Path] = []
    real = preflight._decodable
    monkeypatch.setattr(preflight, "_decodable", lambda p: decoded.append(p) or real(p))
    assert preflight.check_images([train, train], show_progress=False).decoded == 0  # the cache answers
    assert decoded == []

    changed = _non_query_image(synthetic_copy)
    data = changed.read_bytes()
    changed.write_bytes(data[: len(data) // 2])  # truncated: a new size, so checked again
    with pytest.raises(preflight.PreflightError, match="1 of 333 images cannot be read") as err:
        preflight.check_images([train], show_progress=False)
    assert decoded == [changed] and f"{changed} (cannot be decoded)" in str(err.value)
    changed.write_bytes(data)
    assert preflight.check_images([train], show_progress=False).decoded == 1


# ------------------------------------------------------------------------------------------- the sweep lock

_HOLD_LOCK = """
import sys
from sweep import run
run.validate(run.build_parser().parse_args(sys.argv[1:]))
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_sweep_of_the_same_name_is_refused_while_the_first_runs(tmp_path, caplog):
    args = ["--preset", TEST_PRESET, "--storage", str(tmp_path / "r"), "--name", "twice"]
    out = tmp_path / "first.out"
    with open(out, "w") as sink:
        first = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, *args],
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_for(lambda: "locked" in out.read_text(), "the first sweep's lock", timeout=300, alive=first)
        # An impossible whitening, checked only after the lock: a start that got past the lock ends at once
        # with another message instead of running a whole sweep.
        proc = run_sweep_cli([*args, "--whitening-dim", "4000"], cwd=tmp_path)
        assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
        assert (
            f"sweep 'twice' in {tmp_path / 'r'} is already running: pid {first.pid} on host " in proc.stderr
        )
        assert socket.gethostname() in proc.stderr and "started 20" in proc.stderr
        assert "wait for it to end, or pass another --name" in proc.stderr
    finally:
        first.stdin.close()
        first.wait(timeout=60)
    sweep = SweepStorage.create(str(tmp_path / "r"), "twice")
    lock_file = Path(sweep.experiment_dir) / preflight.LOCK_FILE
    assert lock_file.read_text() == "", "the first sweep released its lock at exit"
    with caplog.at_level(logging.INFO, logger="vladsweep.preflight"):
        preflight.lock_sweep(sweep)
        try:
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            with pytest.raises(preflight.PreflightError, match=f"pid {os.getpid()}"):
                preflight.SweepLock(sweep).acquire()  # a second start, even in this process
        finally:
            preflight.release_sweep_locks()
    assert "taking over" not in caplog.text


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    sweep = SweepStorage.create(str(tmp_path / "r"), "stale")
    Path(sweep.experiment_dir).mkdir(parents=True)
    pid = _dead_pid()
    owner = {"host": socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00+00:00"}
    (Path(sweep.experiment_dir) / preflight.LOCK_FILE).write_text(json.dumps(owner))
    with caplog.at_level(logging.INFO, logger="vladsweep.preflight"):
        lock = preflight.SweepLock(sweep)
        lock.acquire()
    lock.release()
    assert (
        f"taking over the lock of sweep 'stale' left by pid {pid} on host {socket.gethostname()}"
        in caplog.text
    )


def test_the_marker_lock_of_uri_storage_refuses_live_and_foreign_owners(tmp_path, caplog):
    """The create-if-absent marker (what URI storage gets), on a local folder: the same rules, no flock."""
    sweep = SweepStorage.create(str(tmp_path / "r"), "marker")
    Path(sweep.experiment_dir).mkdir(parents=True)
    marker = Path(sweep.experiment_dir) / preflight.LOCK_FILE
    holder = preflight.SweepLock(sweep, use_flock=False)
    holder.acquire()
    with pytest.raises(preflight.PreflightError, match=f"pid {os.getpid()} on host"):
        preflight.SweepLock(sweep, use_flock=False).acquire()
    holder.release()
    assert not marker.exists()

    marker.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(preflight.PreflightError, match=f"if that sweep is over, delete {marker}"):
        preflight.SweepLock(sweep, use_flock=False).acquire()
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with caplog.at_level(logging.INFO, logger="vladsweep.preflight"):
        taker = preflight.SweepLock(sweep, use_flock=False)
        taker.acquire()
    assert "taking over" in caplog.text and json.loads(marker.read_text())["pid"] == os.getpid()
    taker.release()


def test_the_pending_trials_callback_pickles_by_reference():
    """Tune pickles the run config with its callbacks for --resume: the class must be found again by name."""
    blob = pickle.dumps(preflight.PendingTrialsCallback())
    assert b"sweep.preflight" in blob and b"PendingTrialsCallback" in blob
    assert type(pickle.loads(blob)) is preflight.PendingTrialsCallback


# ------------------------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def one_cpu_cluster():
    """A head without CPUs and one 1-CPU worker, all on 127.0.0.1, with this process connected to it."""
    import ray

    with (
        private_ray_tmpdir() as ray_tmp,
        local_cluster(ray_tmp, head={"num_cpus": 0}, workers=[{"num_cpus": 1}]) as (
            cluster,
            _,
        ),
    ):
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        try:
            yield cluster, ray_tmp
        finally:
            ray.shutdown()


@pytest.fixture
def cpu_taken(one_cpu_cluster):
    """The cluster's one CPU held by this test (another job's placement group), freed afterwards."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 1}])
    ray.get(group.ready(), timeout=60)
    try:
        yield one_cpu_cluster
    finally:
        remove_placement_group(group)


@pytest.mark.slow
def test_a_request_no_node_can_hold_is_refused_on_a_cluster(one_cpu_cluster, tiny_space, tmp_path):
    cluster, ray_tmp = one_cpu_cluster
    args = sweep_args(tiny_space, tmp_path / "r", "too-big", f"sqlite:///{tmp_path / 'm.db'}")
    sweep = SweepProcess(
        [*args, "--ray-address", cluster.address, "--cpus-per-trial", "3"], tmp_path, ray_tmp
    )
    assert sweep.wait(timeout=300) == EXIT_USAGE, sweep.output()
    assert "--cpus-per-trial 3 --gpus-per-trial 0: no node of the Ray cluster can ever hold" in sweep.stderr
    assert "CPU 0, GPU 0 / CPU 1, GPU 0" in sweep.stderr and "judged from the nodes up now" in sweep.stderr
    assert "Pass --cpus-per-trial 1 or less" in sweep.stderr


@pytest.mark.slow
def test_a_base_build_that_waits_past_the_pending_timeout_stops_the_sweep(cpu_taken, tiny_space, tmp_path):
    cluster, ray_tmp = cpu_taken
    args = sweep_args(tiny_space, tmp_path / "r", "starved", f"sqlite:///{tmp_path / 'm.db'}")
    sweep = SweepProcess(
        [*args, "--ray-address", cluster.address, "--pending-timeout", "3"], tmp_path, ray_tmp
    )
    assert sweep.wait(timeout=300) == EXIT_PENDING, sweep.output()
    err = sweep.stderr
    assert "the base model's build task waited 3 s (--pending-timeout) for CPU 1, GPU 0" in err
    assert "CPU 0, GPU 0 free now" in err and "--pending-timeout 0 to wait" in err
    continue_lines = [line for line in err.splitlines() if "Continue with: " in line]
    assert len(continue_lines) == 1 and continue_lines[0].endswith("--resume"), err[-3000:]
    assert (tmp_path / "r" / "starved" / ".vladsweep-started.json").is_file(), "--resume continues it"
    assert not list((tmp_path / "r").rglob("meta.json")), "no base was built"


def _one_step(config):
    from ray import tune

    tune.report({"done": 1})


@pytest.mark.slow
def test_trials_that_wait_past_the_pending_timeout_stop_tune_resumably(cpu_taken, tmp_path):
    """Real Ray Tune with the sweep's callback: no trial can start, so after the timeout Tune is stopped as on
    Ctrl-C — its state saved with the trials still PENDING, which --resume (Tuner.restore) starts again."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(_one_step, {"cpu": 1}),
        # The budget only ends a test whose watch never fires (it then fails below instead of hanging).
        tune_config=tune.TuneConfig(num_samples=2, time_budget_s=120),
        run_config=tune.RunConfig(
            name="pending",
            storage_path=str(tmp_path),
            callbacks=[preflight.PendingTrialsCallback()],
            verbose=0,
        ),
    )
    with pytest.raises(preflight.PendingTimeout) as err, preflight.watch_trials(2):
        tuner.fit()
    assert (
        "no trial could start for 2 s (--pending-timeout): 2 trial(s) wait in PENDING for CPU 1, GPU 0"
        in str(err.value)
    )
    assert set(saved_trial_statuses(tmp_path / "pending").values()) == {"PENDING"}
    assert preflight._TRIAL_WATCH is None
