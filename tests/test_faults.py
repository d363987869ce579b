"""Faults a sweep must survive without losing results: the driver SIGKILLed mid-sweep (``--resume`` finishes it,
nothing finished is run again, MLflow and the Optuna study stay one-to-one with Ray's trials), and an MLflow server
that is not there at start (refused in seconds, before anything runs) or goes away mid-sweep (trials go on, results
stay in Ray storage, ``--sync`` logs what is missing once it is back).

Real components throughout: the sweep CLI in its own process with its own local Ray, a real ``mlflow server``
process, the sqlite Optuna study the sweep writes.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import optuna
import pytest
from conftest import TINY_SPACE
from mlflow_server import MlflowServer
from net import free_port
from sweep_harness import (
    SweepProcess,
    mlflow_record,
    private_ray_tmpdir,
    process_title,
    processes_with_env,
    saved_trial_statuses,
    sweep_args,
    tree_snapshot,
    trial_dirs,
    trial_results,
    wait_for,
)

from search_spaces.schema import load_search_space
from sweep.results import collect_rows
from sweep.tuner import STUDY_NAME, make_searcher
from trainables.contract import FINAL_STAGE, MAP_KEY, MEMORY_KEY, OBJECTIVES, STAGES

OBJECTIVE_KEYS = tuple(OBJECTIVES)
RAY_AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def rows_by_trial(experiment_dir: Path) -> dict[str, dict]:
    return {row["trial_id"]: row for row in collect_rows(str(experiment_dir))}


# ------------------------------------------------------------------------------------------ MLflow outages


def test_unreachable_mlflow_is_refused_before_anything_starts(sweep_storage, tiny_space, tmp_path):
    """Nothing listens on the port: exit 2 with the URI and the reason, no traceback, no Ray started, nothing
    written to the storage. (The 90 s limit only guards against a hang; MLflow's own retries would take minutes.)"""
    uri = f"http://127.0.0.1:{free_port()}"
    name = "mlflow-refused"
    with private_ray_tmpdir() as ray_tmp:
        sweep = SweepProcess(sweep_args(tiny_space, sweep_storage, name, uri), tmp_path, ray_tmp)
        code = sweep.wait(timeout=90)
        ray_sessions = list(ray_tmp.rglob("session_*"))
    assert code == 2, sweep.output()
    assert uri in sweep.stderr and "Connection refused" in sweep.stderr, sweep.stderr
    assert "Traceback" not in sweep.stderr
    assert ray_sessions == [], "Ray started although the sweep was refused"
    assert not (sweep_storage / name).exists(), "the refused sweep wrote to the storage"


@pytest.mark.slow
def test_mlflow_lost_mid_sweep_trials_go_on_and_sync_logs_what_is_missing(
    sweep_storage, tiny_space, tmp_path
):
    """A real `mlflow server` dies once the first trial has its child run: the trials finish anyway (results in
    Ray storage), the sweep exits 3 saying how to catch up; with the server back, `--sync` gives every trial its
    child run with the final metrics Ray has — and reuses the child runs made before the outage."""
    name = "mlflow-lost"
    experiment_dir = sweep_storage / name
    server = MlflowServer.in_folder(tmp_path)
    server.start()
    try:
        with private_ray_tmpdir() as ray_tmp:
            sweep = SweepProcess(
                sweep_args(
                    tiny_space, sweep_storage, name, server.url, "--num-samples", "2", "--max-concurrent", "2"
                ),
                tmp_path,
                ray_tmp,
            )
            try:
                early = wait_for(
                    lambda: trial_children(server.url), "the first trial's child run", 420, alive=sweep.proc
                )
                server.kill()
                code = sweep.wait(timeout=600)
            finally:
                sweep.kill()
        assert code == 3, sweep.output()
        assert "--sync" in sweep.stderr and server.url in sweep.stderr, sweep.stderr
        assert "Traceback" not in sweep.stderr, sweep.stderr

        rows = rows_by_trial(experiment_dir)
        assert len(rows) == 2 and all(row["status"] == "ok" for row in rows.values()), rows

        server.restart()
        behind = mlflow_record(server.url).by_trial()
        assert not any(MAP_KEY in run.data.metrics for run in behind.values()), (
            "MLflow was not behind after all"
        )
        with private_ray_tmpdir() as ray_tmp:
            sync = SweepProcess(
                sweep_args(tiny_space, sweep_storage, name, server.url, "--sync"), tmp_path, ray_tmp, "sync"
            )
            try:
                assert sync.wait(timeout=300) == 0, sync.output()
            finally:
                sync.kill()
            assert list(ray_tmp.rglob("session_*")) == [], "--sync started a Ray it does not need"

        record = mlflow_record(server.url)
        children = record.by_trial()
        assert len(record.children) == len(children) == 2 and set(children) == set(rows)
        for trial_id, run in children.items():
            for key in OBJECTIVE_KEYS:
                assert math.isclose(run.data.metrics[key], rows[trial_id][key]), (trial_id, key)
            assert run.info.status == "FINISHED" and run.data.tags["status"] == "FINISHED"
        for trial_id, run_id in early.items():
            assert children[trial_id].info.run_id == run_id, "sync made a second child run for a trial"
        assert record.parent.info.status == "FINISHED"
        assert record.parent.data.tags["trials"] == "2"
    finally:
        server.stop()


def trial_children(uri: str) -> dict[str, str]:
    """Trial id → child run id of the child runs on the server now ({} while there are none)."""
    try:
        return {trial_id: run.info.run_id for trial_id, run in mlflow_record(uri).by_trial().items()}
    except Exception:  # no experiment or parent yet
        return {}


# ------------------------------------------------------------------------------------------ the driver killed


@pytest.mark.slow
def test_driver_killed_mid_sweep_resume_finishes_it(sweep_storage, tiny_space, tmp_path):
    """SIGKILL the driver once Tune has saved a finished trial; its local Ray goes with it. `--resume` runs only
    what was unfinished: finished trials keep their results and checkpoints untouched, every trial has one child
    run, and the Optuna study holds one finished trial per Ray trial with nothing left RUNNING."""
    name = "driver-killed"
    experiment_dir = sweep_storage / name
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = sweep_args(
        tiny_space, sweep_storage, name, mlflow_uri, "--num-samples", "3", "--max-concurrent", "2"
    )
    with private_ray_tmpdir() as killed_tmp, private_ray_tmpdir() as resume_tmp:
        sweep = SweepProcess(args, tmp_path, killed_tmp, "killed")
        try:
            wait_for(
                lambda: "TERMINATED" in saved_trial_statuses(experiment_dir).values(),
                "Tune to save a finished trial",
                600,
                alive=sweep.proc,
            )
            os.kill(sweep.pid, signal.SIGKILL)
            sweep.proc.wait()
        finally:
            sweep.kill()
        # The local Ray the driver started shares its fate: GCS, raylet and the trials' workers go at once. Its two
        # agents notice their raylet is gone and exit by themselves, about a minute later: checked after the resume.
        killed_ray = f"RAY_TMPDIR={killed_tmp}"
        wait_for(
            lambda: set(map(process_title, processes_with_env(killed_ray))) <= RAY_AGENTS | {""},
            "the killed driver's GCS, raylet and trial workers to exit",
            60,
        )

        at_kill = saved_trial_statuses(experiment_dir)
        done = sorted(t for t, status in at_kill.items() if status == "TERMINATED")
        assert 1 <= len(done) < 3, f"nothing left for --resume to do: {at_kill}"
        dirs = trial_dirs(experiment_dir)
        before = {t: (tree_snapshot(dirs[t]), (dirs[t] / "result.json").read_bytes()) for t in done}
        runs_before = mlflow_record(mlflow_uri).by_trial()

        resume = SweepProcess([*args, "--resume"], tmp_path, resume_tmp, "resume")
        try:
            assert resume.wait(timeout=600) == 0, resume.output()
        finally:
            resume.kill()
        wait_for(lambda: not processes_with_env(killed_ray), "the killed driver's Ray agents to exit", 180)

    rows = rows_by_trial(experiment_dir)
    assert len(rows) == 3 and all(row["status"] == "ok" for row in rows.values()), rows
    assert set(at_kill) <= set(rows), "a trial known at the kill was replaced instead of resumed"
    for trial_id in done:
        snapshot, results = before[trial_id]
        assert tree_snapshot(dirs[trial_id]) == snapshot, f"finished trial {trial_id} was written to again"
        assert (dirs[trial_id] / "result.json").read_bytes() == results
    results = trial_results(experiment_dir)
    for trial_id in done:
        assert [r["stage"] for r in results[trial_id]] == list(STAGES)
    for trial_id in set(rows) - set(done):
        # Resumed from the checkpoint Tune had saved: stages go forward; one finished after that save may run
        # again. A trial that had ended after the save reports its recorded result again: measured once.
        stages = [r["stage"] for r in results[trial_id]]
        assert sorted(stages, key=STAGES.index) == stages and set(stages) == set(STAGES), stages
        ends = [r for r in results[trial_id] if r["stage"] == FINAL_STAGE]
        assert all(r["seconds_evaluate"] == ends[0]["seconds_evaluate"] for r in ends), "evaluated twice"
        assert all(r[MAP_KEY] == ends[0][MAP_KEY] for r in ends)

    record = mlflow_record(mlflow_uri)
    children = record.by_trial()
    assert len(record.children) == len(children) == 3 and set(children) == set(rows), "duplicate child runs"
    for trial_id, run in children.items():
        assert run.info.status == "FINISHED"
        for key in OBJECTIVE_KEYS:
            assert math.isclose(run.data.metrics[key], rows[trial_id][key])
        if trial_id in runs_before:
            assert run.info.run_id == runs_before[trial_id].info.run_id

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{experiment_dir / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states, states
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.values for t in complete) == sorted(
        [row[k] for k in OBJECTIVE_KEYS] for row in rows.values()
    )
    # Beyond one per Ray trial, only trials a dying driver asked for and never ran (told FAIL on resume).
    extra = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in extra) and len(extra) <= 2, extra


# ------------------------------------------------------------------------------------------ the study on resume


@pytest.fixture
def searcher_factory(tmp_path):
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(TINY_SPACE)
    space = load_search_space(space_file)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    return lambda: make_searcher(space, seed=0, storage_url=url, max_concurrent=4), url


def test_restore_fails_study_trials_asked_for_after_the_last_save(searcher_factory, tmp_path):
    """A driver that died after asking Optuna for a trial and before Tune saved its state leaves that study trial
    RUNNING with no Tune trial to finish it: the restored searcher tells it FAIL and keeps the known one."""
    make, url = searcher_factory
    dying = make()
    dying.suggest("known")
    dying.save(str(tmp_path / "searcher.pkl"))
    dying.suggest("asked-after-the-save")

    restored = make()
    restored.restore(str(tmp_path / "searcher.pkl"))
    study = optuna.load_study(study_name=STUDY_NAME, storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL]

    restored.searcher.on_trial_complete("known", {MAP_KEY: 0.5, MEMORY_KEY: 1.0})
    study = optuna.load_study(study_name=STUDY_NAME, storage=url)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE and study.trials[0].values == [0.5, 1.0]


def test_a_trial_the_study_already_finished_is_not_told_again(searcher_factory, tmp_path):
    """The driver died after telling Optuna a result and before Tune saved it: the resumed trial ends again, and
    the restored searcher neither raises (Optuna refuses a second tell; Ray logs that) nor changes the values."""
    make, url = searcher_factory
    first = make()
    first.suggest("t")
    first.save(str(tmp_path / "searcher.pkl"))
    first.searcher.on_trial_complete("t", {MAP_KEY: 0.5, MEMORY_KEY: 1.0})

    restored = make()
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.searcher.on_trial_complete("t", {MAP_KEY: 0.25, MEMORY_KEY: 2.0})
    (trial,) = optuna.load_study(study_name=STUDY_NAME, storage=url).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == [0.5, 1.0]


# ------------------------------------------------------------------------------------------ stage checkpoints


def test_a_pruned_model_comes_back_from_its_stage_checkpoint(tmp_path):
    """A trial restored after its prune stage (node lost, driver killed) rebuilds the pruned model from the stage
    checkpoint into a fresh model: same outputs, same masks. (A pruned layer's state_dict has weight_orig and
    weight_mask, which a fresh model does not know.)"""
    import torch
    from torch import nn

    from trainables.compression.prune import apply_mask
    from trainables.compression.schedule import apply_masks, export_masks
    from trainables.pipeline import load_weights, save_weights

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))

    torch.manual_seed(0)
    pruned = make()
    for layer in (pruned[0], pruned[2]):
        apply_mask(layer, layer.weight.abs() > layer.weight.abs().median())
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "weights.safetensors"
    save_weights(pruned, path, export_masks(pruned))

    fresh = make()
    apply_masks(fresh, load_weights(fresh, path), {"conv": ["0", "2"]})
    assert torch.equal(fresh(x), pruned(x))
    restored, original = export_masks(fresh), export_masks(pruned)
    assert restored.keys() == original.keys() and all(torch.equal(restored[k], original[k]) for k in original)
