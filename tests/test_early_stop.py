"""Pareto-aware early stopping (issue 12): the rule, the scheduler on real Ray ``Trial`` objects, Optuna's PRUNED,
the trial's early signal on a real tiny model, and one real sweep with ``--early-stop`` (real Ray, Optuna sqlite
study, MLflow sqlite store)."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from conftest import TEST_PRESET, TINY_SPACE, run_sweep_cli
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from safetensors import safe_open

from search_spaces.schema import load_search_space
from sweep.early_stop import DEFAULT_MAP_MARGIN, DEFAULT_MEMORY_MARGIN, EarlyStopRule, FrontPoint
from sweep.early_stop_scheduler import ParetoEarlyStopping
from sweep.tuner import STUDY_NAME, make_searcher
from trainables.contract import (
    EARLY_MAP_KEY,
    EARLY_MEMORY_KEY,
    EARLY_STAGE,
    EARLY_STOP_REASON_KEY,
    FINAL_STAGE,
    MAP_KEY,
    MEMORY_KEY,
    STAGE_KEY,
)

# ---------------------------------------------------------------------------------------------------- the rule


def _front(*points: tuple[str, float, float]) -> list[FrontPoint]:
    return [FrontPoint(name, {MAP_KEY: m, MEMORY_KEY: mib}) for name, m, mib in points]


def _early(m: float, mib: float) -> dict[str, float]:
    return {MAP_KEY: m, MEMORY_KEY: mib}


def test_rule_stops_only_a_projection_dominated_by_more_than_the_margins():
    rule = EarlyStopRule(map_margin=0.02, memory_margin=0.01, min_completed=2)
    done = _front(("t0001", 0.60, 1.0), ("t0002", 0.50, 0.5), ("t0003", 0.40, 2.0))  # t0003 is off the front
    # Larger and worse by far more than the margins: stopped, naming the smallest front file that beats it.
    reason = rule.reason(_early(0.30, 1.2), done)
    assert reason is not None and reason.startswith(f"dominated after {EARLY_STAGE} by t0002 ("), reason
    assert "margin 0.02" in reason and "projected - 1%" in reason
    # Just inside a margin of the front point that would beat it: goes on (the fine-tune may still catch up);
    # just outside: stopped.
    assert rule.reason(_early(0.58 + 1e-6, 1.2), done) is None
    assert rule.reason(_early(0.58 - 1e-6, 1.2), done).startswith("dominated after prune by t0001")
    assert rule.reason(_early(0.30, 0.5 / 0.99 - 1e-6), done) is None
    assert rule.reason(_early(0.30, 0.5 / 0.99 + 1e-6), done).startswith("dominated after prune by t0002")
    # The same size as a front point with the same mAP, or smaller than every completed file: goes on.
    assert rule.reason(_early(0.60, 1.0), done) is None
    assert rule.reason(_early(0.01, 0.4), done) is None
    # The defaults are as documented.
    assert (EarlyStopRule().map_margin, EarlyStopRule().memory_margin) == (
        DEFAULT_MAP_MARGIN,
        DEFAULT_MEMORY_MARGIN,
    )


def test_rule_waits_for_min_completed_and_ranks_by_dominance_not_a_weighted_sum():
    done = _front(("t0001", 0.90, 1.0))
    hopeless = _early(0.10, 5.0)
    assert EarlyStopRule(min_completed=2).reason(hopeless, done) is None
    assert EarlyStopRule(min_completed=1).reason(hopeless, done) is not None
    # Far worse in mAP but smaller than every finished file: no weighted sum decides, it may reach the front.
    assert EarlyStopRule(min_completed=1).reason(_early(0.10, 0.9), done) is None


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"map_margin": -0.1}, "map margin -0.1"),
        ({"map_margin": float("nan")}, "map margin nan"),
        ({"memory_margin": 1.0}, "memory margin 1.0"),
        ({"min_completed": 0}, "min completed 0"),
        ({"min_completed": 2.5}, "min completed 2.5"),
    ],
)
def test_rule_refuses_bad_values_naming_them(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EarlyStopRule(**kwargs)


# ------------------------------------------------------------------------------- the scheduler on real Trials


def _trial(number: int) -> Trial:
    trial = Trial("run_trial", config={"threshold": 0.5}, trial_id=f"id{number}", stub=True)
    trial.experiment_tag = f"{number}_threshold=0.5"
    trial.create_placement_group_factory()  # what Tune does before a trial's state can be saved
    return trial


def _finish(scheduler: ParetoEarlyStopping, trial: Trial, m: float, mib: float) -> None:
    trial.set_status(Trial.RUNNING)
    result = {STAGE_KEY: FINAL_STAGE, MAP_KEY: m, MEMORY_KEY: mib}
    assert scheduler.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE
    trial.update_last_result(result)
    scheduler.on_trial_complete(None, trial, dict(trial.last_result))
    trial.set_status(Trial.TERMINATED)


def _prune_report(scheduler: ParetoEarlyStopping, trial: Trial, m: float, mib: float) -> str:
    """What Tune does with a trial's prune report: the decision, then the result stored as the last one."""
    trial.set_status(Trial.RUNNING)
    result = {STAGE_KEY: EARLY_STAGE, EARLY_MAP_KEY: m, EARLY_MEMORY_KEY: mib}
    decision = scheduler.on_trial_result(None, trial, dict(result))
    trial.update_last_result(result)
    return decision


def _restored(trial: Trial) -> Trial:
    """The trial as ``Tuner.restore`` reads it back from Tune's saved JSON state."""
    state, metadata = trial.get_json_state()
    back = Trial.from_json_state(state, stub=True)
    back.restore_run_metadata(metadata)
    return back


def test_scheduler_stops_a_dominated_trial_marks_its_result_and_rebuilds_after_a_restore(tmp_path):
    scheduler = ParetoEarlyStopping(EarlyStopRule(min_completed=2))
    pickled_at_start = pickle.dumps(scheduler)  # as Tune keeps it in tuner.pkl: empty
    good, small, hopeless, other = (_trial(n) for n in (1, 2, 3, 4))
    for t in (good, small, hopeless, other):
        scheduler.on_trial_add(None, t)

    # Before min_completed trials finished nothing is stopped, however hopeless.
    assert _prune_report(scheduler, good, 0.62, 1.0) == TrialScheduler.CONTINUE
    _finish(scheduler, good, 0.60, 1.0)
    assert _prune_report(scheduler, hopeless, 0.10, 3.0) == TrialScheduler.CONTINUE
    _finish(scheduler, small, 0.40, 0.3)

    # Its partial result is dominated: STOP, and on completion the reason lands in the trial's last result.
    assert _prune_report(scheduler, other, 0.10, 3.0) == TrialScheduler.STOP
    other.get_json_state()  # Tune may have saved (and cached) the prune result in between
    scheduler.on_trial_complete(None, other, dict(other.last_result))
    other.set_status(Trial.TERMINATED)
    reason = other.last_result[EARLY_STOP_REASON_KEY]
    # Both finished trials dominate it; the reason names the smaller file.
    assert reason.startswith("dominated after prune by t0002 (") and "val_mAP 0.4000 >= 0.1000" in reason
    assert other.last_result[EARLY_MAP_KEY] == 0.10, "the rest of the result is kept"

    # Tuner.restore: the scheduler comes back empty from tuner.pkl; on_trial_add of the restored trials rebuilds it.
    fresh = pickle.loads(pickled_at_start)
    assert fresh.completed == {} and fresh.stopped == {}
    for t in (good, small, other, hopeless):
        fresh.on_trial_add(None, _restored(t))
    assert set(fresh.completed) == {"id1", "id2"} and fresh.stopped == {"id4": reason}
    late = _trial(5)
    assert _prune_report(fresh, late, 0.10, 3.0) == TrialScheduler.STOP

    # save/restore keep the same state, for callers that use them.
    scheduler.save(str(tmp_path / "scheduler.pkl"))
    again = ParetoEarlyStopping()
    again.restore(str(tmp_path / "scheduler.pkl"))
    assert again.completed == scheduler.completed and again.stopped == scheduler.stopped
    assert again.rule == EarlyStopRule(min_completed=2)


def test_scheduler_leaves_reports_without_a_signal_alone():
    scheduler = ParetoEarlyStopping(EarlyStopRule(min_completed=1))
    _finish(scheduler, _trial(1), 0.9, 0.1)
    trial = _trial(2)
    trial.set_status(Trial.RUNNING)
    # A sweep started without the signal (or another stage's report) is never stopped.
    for result in (
        {STAGE_KEY: EARLY_STAGE},
        {STAGE_KEY: "quantize", EARLY_MAP_KEY: 0.0, EARLY_MEMORY_KEY: 9.0},
    ):
        assert scheduler.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE


def test_searcher_tells_a_stopped_trial_pruned_and_a_broken_one_fail(tmp_path):
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(TINY_SPACE)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(load_search_space(space_file), seed=0, storage_url=url, max_concurrent=4)
    for tid in ("stopped", "broken", "done"):
        searcher.suggest(tid)
    searcher.on_trial_complete(
        "stopped", {STAGE_KEY: EARLY_STAGE, EARLY_MAP_KEY: 0.1, EARLY_STOP_REASON_KEY: "dominated …"}
    )
    searcher.on_trial_complete("broken", {STAGE_KEY: EARLY_STAGE, EARLY_MAP_KEY: 0.1})
    searcher.on_trial_complete("done", {MAP_KEY: 0.5, MEMORY_KEY: 1.0})
    states = [t.state for t in optuna.load_study(study_name=STUDY_NAME, storage=url).trials]
    TS = optuna.trial.TrialState
    assert states == [TS.PRUNED, TS.FAIL, TS.COMPLETE]


# ----------------------------------------------------------------------------- the trial's early signal


def _file_contents(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """A safetensors file's header metadata and every tensor's bytes. Not the file's own bytes: safetensors writes
    its metadata entries in hash-map order, which changes from one write to the next."""
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {
            k: f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for k in sorted(f.keys())
        }


def test_early_signal_projects_the_shipped_size_and_changes_nothing_else(tmp_path):
    """The prune stage's signal on a real tiny model with the real retraining: with k-means the projected size is
    the shipped file's exactly, the mAP is the pruned model's on the validation split, and the trial ends with
    the same file and numbers as without the signal."""
    from trainables.base import BaseConfig, retrain_fn, trial_miner
    from trainables.compression.plan import CompressionPlan
    from trainables.contract import resolve_trial_config
    from trainables.data.registry import load_dataset
    from trainables.netvlad.model import NetVLADConfig, NetVLADModel
    from trainables.pipeline import STAGE_FUNCTIONS, TrialContext
    from trainables.retrieval.evaluate import evaluate_dataset

    base_config = BaseConfig(image_size=48, batch_size=2, num_negatives=2, neg_pool_size=20)
    meta = {
        "config": base_config.to_dict(),
        "train_split": base_config.train_split,
        "val_splits": base_config.val_splits,
        "test_splits": base_config.test_splits,
        MAP_KEY: 0.5,
        "test_mAP": 0.5,
    }
    settings = resolve_trial_config(
        {"prune_mode": "sigma", "threshold": 0.7, "quant_mode": "kmeans", "bits": 3, "groups": "conv,netvlad"}
        | {"l1_steps": 0, "retrain_steps": 1, "quant_steps": 1, "kmeans_iters": 3, "lr": 3e-3}
    )

    def run(early_signal: bool) -> tuple[TrialContext, float, str]:
        torch.manual_seed(0)
        model = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=None))
        miner = trial_miner(meta, None, seed=0)
        device = torch.device("cpu")
        plan = CompressionPlan.from_dict(settings["plan"])
        groups = {g: n for g, n in model.compression_groups().items() if g in plan.groups}
        work = Path(tempfile.mkdtemp(dir=tmp_path))
        ctx = TrialContext(
            plan, groups, meta, None, device, work, retrain_fn(model, meta, miner, 3e-3, device=device)
        )
        ctx.early_signal = early_signal
        pruned_map = float("nan")
        for stage in STAGE_FUNCTIONS:
            stage.run(model, ctx)
            if stage.name == EARLY_STAGE:
                val = load_dataset(base_config.val_splits[0])
                pruned_map = evaluate_dataset(model, val, base_config.image_size)["mAP"]
        return ctx, pruned_map, _file_contents(ctx.artifact)

    with_signal, pruned_map, file_with = run(True)
    without, _, file_without = run(False)
    assert without.early == {}
    early = with_signal.early
    assert early[EARLY_MEMORY_KEY] == with_signal.final[MEMORY_KEY]
    assert early[EARLY_MAP_KEY] == pytest.approx(pruned_map, abs=1e-9)
    assert file_with == file_without
    assert with_signal.final[MAP_KEY] == without.final[MAP_KEY]
    assert not any(p.name.startswith("early-") for p in with_signal.work.iterdir()), (
        "the draft file is removed"
    )


# ---------------------------------------------------------------------------------------------- the CLI


def test_bad_early_stop_values_are_refused_before_anything_starts(tmp_path):
    proc = run_sweep_cli(
        ["--early-stop", "--early-stop-min-completed", "0", "--storage", str(tmp_path / "r")], cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--early-stop-min-completed 0" in proc.stderr and "integer >= 1" in proc.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------- one real sweep

#: A sound learning rate next to one that wrecks the model in the prune stage's retraining (its val mAP falls to
#: about chance and, its weights scrambled, its k-means indices code larger). With the random sampler's seed 0 the
#: trials come as lr = 3, 3e-3, 3, so trial 3 meets two completed trials and is dominated by trial 2.
EARLY_STOP_SPACE = """\
description: early-stop test - a sound and a wrecking learning rate
sampler: {type: random, seed: 0}
num_samples: 3
params:
  lr: {choices: [3.0e-3, 3.0]}
fixed:
  prune_mode: sigma
  threshold: 0.8
  quant_mode: kmeans
  bits: 4
  l1_steps: 0
  retrain_steps: 2
  quant_steps: 2
  kmeans_iters: 5
"""


@pytest.mark.slow
def test_sweep_with_early_stop_prunes_a_dominated_trial_everywhere(tmp_path, sweep_storage):
    from sweep.results import collect_rows

    space = tmp_path / "early.yaml"
    space.write_text(EARLY_STOP_SPACE)
    name = "early-stop"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--search-space", str(space), "--storage", str(sweep_storage), "--name", name, "--experiment", name,
        "--mlflow-uri", uri, "--preset", TEST_PRESET, "--max-concurrent", "1",
        "--early-stop", "--early-stop-min-completed", "2",
    ]  # fmt: skip
    proc = run_sweep_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    rows = {r["trial_id"]: r for r in collect_rows(str(sweep_storage / name))}
    stopped = [r for r in rows.values() if r["status"] == "stopped"]
    completed = [r for r in rows.values() if r["status"] == "ok"]
    assert len(stopped) >= 1 and len(stopped) + len(completed) == 3, [
        (r["status"], r["config"]) for r in rows.values()
    ]
    assert f"{len(stopped)} stopped early" in proc.stdout
    by_number = {r["number"]: r for r in rows.values()}
    for row in stopped:
        result = row["result"]
        assert row["config"]["lr"] == 3.0, "only the wrecked trials can be dominated"
        assert result[STAGE_KEY] == EARLY_STAGE and MAP_KEY not in result, "stopped right after prune"
        reason = row["stopped_reason"]
        assert reason == result[EARLY_STOP_REASON_KEY] and reason.startswith("dominated after prune by t")
        # The named trial completed and really beats the projection by the margins.
        beater = by_number[int(reason.split(" by t", 1)[1][:4])]
        assert beater["status"] == "ok"
        assert beater[MAP_KEY] >= result[EARLY_MAP_KEY] + DEFAULT_MAP_MARGIN
        assert beater[MEMORY_KEY] <= result[EARLY_MEMORY_KEY] * (1 - DEFAULT_MEMORY_MARGIN)

    # Optuna: the stopped trials are PRUNED (no values), the others points of the study.
    study = optuna.load_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{sweep_storage / name / 'optuna.db'}"
    )
    TS = optuna.trial.TrialState
    pruned = [t for t in study.trials if t.state == TS.PRUNED]
    assert len(pruned) == len(stopped) and all(t.params["lr"] == 3.0 and t.values is None for t in pruned)
    assert sum(t.state == TS.COMPLETE for t in study.trials) == len(completed)

    # MLflow: the stopped run says so and why, is never on the front, and kept its early metrics.
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    children = {
        r.data.tags["trial_id"]: r
        for r in client.search_runs([exp.experiment_id], "tags.`vladsweep.role` = 'trial'", max_results=100)
    }
    assert set(children) == set(rows)
    for row in stopped:
        run = children[row["trial_id"]]
        assert run.data.tags["status"] == "STOPPED" and run.data.tags["pareto"] == "false"
        assert run.data.tags["stopped_reason"] == row["stopped_reason"]
        assert run.info.status == "KILLED"
        assert EARLY_MAP_KEY in run.data.metrics and MAP_KEY not in run.data.metrics
    for row in completed:
        run = children[row["trial_id"]]
        assert run.data.tags["status"] == "FINISHED" and "stopped_reason" not in run.data.tags
        assert EARLY_MEMORY_KEY in run.data.metrics, "every trial reports the signal with --early-stop"
    assert any(children[r["trial_id"]].data.tags["pareto"] == "true" for r in completed)

    # --resume of the ended sweep: nothing reruns, the stopped trial stays stopped (Tune saved its reason).
    again = run_sweep_cli([*args, "--resume"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    after = {r["trial_id"]: r for r in collect_rows(str(sweep_storage / name))}
    assert {t: r["status"] for t, r in after.items()} == {t: r["status"] for t, r in rows.items()}
    study = optuna.load_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{sweep_storage / name / 'optuna.db'}"
    )
    assert len(study.trials) == 3 and sum(t.state == TS.PRUNED for t in study.trials) == len(stopped)


def test_scheduler_state_saves_and_restores_as_plain_json(tmp_path):
    """``save``/``restore`` write JSON (no pickle: a saved state loads without running code) and round-trip the
    rule, the completed front and the stop reasons."""
    from sweep.early_stop import EarlyStopRule, FrontPoint
    from sweep.early_stop_scheduler import ParetoEarlyStopping

    scheduler = ParetoEarlyStopping(EarlyStopRule(map_margin=0.1, min_completed=1))
    scheduler.completed["a"] = FrontPoint("t0001", {"val_mAP": 0.5, "memory_mib": 1.0})
    scheduler.stopped["b"] = "dominated after prune by t0001"
    path = tmp_path / "state.json"
    scheduler.save(str(path))
    json.loads(path.read_text())  # plain JSON
    back = ParetoEarlyStopping()
    back.restore(str(path))
    assert back.rule == scheduler.rule
    assert back.completed == scheduler.completed and back.stopped == scheduler.stopped
