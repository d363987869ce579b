"""The search's score (`sweep.hypervolume`) and where it is logged: hand-computed areas, Optuna's own code, the
curve over trials, and the parent run's ``hypervolume`` history in a real MLflow sqlite store, written live by
`sweep.callbacks.TrialRunLogger` (driven with Ray Tune's own ``Trial`` objects) and by `sweep.tracking.sync_sweep`
(idempotent)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from optuna._hypervolume import compute_hypervolume
from ray.tune.experiment import Trial

from sweep import tracking
from sweep.callbacks import TrialRunLogger
from sweep.hypervolume import (
    completion_order,
    hypervolume,
    hypervolume_curve,
    reference_point,
)
from trainables.contract import MAP_KEY, MEMORY_KEY

REF = (10.0, 0.2)  # (memory_mib of the dense base, best zero-byte baseline mAP)
L5 = math.log10(5)


def p(memory: float, value: float, **extra) -> dict:
    return {MEMORY_KEY: memory, MAP_KEY: value, **extra}


# ------------------------------------------------------------------------------------------- the area itself


def test_one_point_is_its_rectangle_on_log_memory():
    # 0.3 mAP above the floor × one decade below 10 MiB.
    assert hypervolume([p(1.0, 0.5)], REF) == pytest.approx(0.3)
    # log axis: 10x smaller doubles the width, 2x smaller adds log10(2), not 10/2 MiB.
    assert hypervolume([p(0.1, 0.5)], REF) == pytest.approx(0.6)
    assert hypervolume([p(5.0, 0.5)], REF) == pytest.approx(0.3 * (1 - L5))


def test_points_not_beating_the_reference_add_nothing():
    assert hypervolume([p(1.0, 0.1)], REF) == 0.0  # below the zero-byte floor
    assert hypervolume([p(20.0, 0.9)], REF) == 0.0  # bigger than the dense base
    assert hypervolume([p(10.0, 0.9), p(1.0, 0.2)], REF) == 0.0  # on the reference's edges: no area
    assert hypervolume([], REF) == 0.0
    failed = [
        p(1.0, 0.5, status="failed"),
        {MAP_KEY: 0.5, MEMORY_KEY: None},
        {MAP_KEY: math.nan, MEMORY_KEY: 1},
    ]
    assert hypervolume(failed, REF) == 0.0
    # mixed with a good one, the bad ones change nothing
    assert hypervolume([p(1.0, 0.1), p(20.0, 0.9), p(1.0, 0.5)], REF) == pytest.approx(0.3)


def test_a_dominated_point_adds_nothing():
    assert hypervolume([p(1.0, 0.5), p(2.0, 0.4)], REF) == pytest.approx(0.3)


def test_three_points_staircase_by_hand():
    points = [p(1.0, 0.5), p(5.0, 0.8), p(0.1, 0.25)]
    # x = log10(MiB) from -1 to 1; heights above 0.2: 0.05 on [-1, 0), 0.3 on [0, log5), 0.6 on [log5, 1].
    expected = 0.05 * 1 + 0.3 * L5 + 0.6 * (1 - L5)
    assert hypervolume(points, REF) == pytest.approx(expected)
    assert hypervolume(list(reversed(points)), REF) == pytest.approx(expected)


def _staircase(points: list[dict], ref: tuple[float, float]) -> float:
    """An independent 2-D area: sweep the points from small to large memory, keeping the best mAP so far."""
    xs = sorted((math.log10(q[MEMORY_KEY]), q[MAP_KEY]) for q in points)
    kept = [(x, y) for x, y in xs if x < math.log10(ref[0]) and y > ref[1]]
    area, best = 0.0, ref[1]
    for i, (x, y) in enumerate(kept):
        best = max(best, y)
        right = kept[i + 1][0] if i + 1 < len(kept) else math.log10(ref[0])
        area += (right - x) * (best - ref[1])
    return area


def test_agrees_with_optuna_and_an_independent_staircase():
    rng = random.Random(0)
    for _ in range(30):
        points = [p(10 ** rng.uniform(-2, 1.3), rng.uniform(0, 1)) for _ in range(rng.randint(1, 25))]
        ours = hypervolume(points, REF)
        beating = [q for q in points if q[MEMORY_KEY] < REF[0] and q[MAP_KEY] > REF[1]]
        theirs = (
            compute_hypervolume(
                np.array([[-q[MAP_KEY], math.log10(q[MEMORY_KEY])] for q in beating]),
                np.array([-REF[1], math.log10(REF[0])]),
            )
            if beating
            else 0.0
        )
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
        assert ours == pytest.approx(_staircase(points, REF), rel=1e-9, abs=1e-12)


def test_a_bad_reference_is_refused():
    with pytest.raises(ValueError, match="memory_mib > 0"):
        hypervolume([p(1.0, 0.5)], (0.0, 0.2))


# --------------------------------------------------------------------------------------------- the curve


def test_curve_counts_failed_trials_skips_unfinished_and_never_decreases():
    rows = [
        p(1.0, 0.5, status="ok"),
        {"status": "failed", MAP_KEY: None, MEMORY_KEY: None},
        p(2.0, 0.4, status="ok"),  # dominated
        p(0.5, 0.5, status="running"),  # not done: no step
        p(5.0, 0.8, status="ok"),
        p(1.0, 0.1, status="ok"),  # below the floor
    ]
    curve = hypervolume_curve(rows, REF)
    assert [s for s, _ in curve] == [1, 2, 3, 4, 5]
    both = 0.3 * L5 + 0.6 * (1 - L5)
    assert [v for _, v in curve] == pytest.approx([0.3, 0.3, 0.3, both, both])
    rng = random.Random(1)
    random_rows = [
        p(10 ** rng.uniform(-2, 1.3), rng.uniform(0, 1), status=rng.choice(["ok", "ok", "failed"]))
        for _ in range(40)
    ]
    values = [v for _, v in hypervolume_curve(random_rows, REF)]
    assert len(values) == 40 and values[-1] > 0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(hypervolume(random_rows, REF))


def test_completion_order_is_the_last_report_time():
    rows = [
        {"trial_id": "a", "result": {"timestamp": 30}},
        {"trial_id": "b", "result": {}},  # failed before reporting: after the others
        {"trial_id": "c", "result": {"timestamp": 10}},
        {"trial_id": "d", "result": {"timestamp": 30}},  # a tie keeps the trials' order
    ]
    assert [r["trial_id"] for r in completion_order(rows)] == ["c", "a", "d", "b"]


# ----------------------------------------------------------------------------------------- the reference


def _meta(**extra) -> dict:
    return {
        MEMORY_KEY: 4.5,
        "val_splits": ["v1", "v2"],
        "test_splits": ["t"],
        "baselines": {
            "v1": {"random": 0.02, "thumbnails": 0.10, "histogram": 0.20, "off_the_shelf": 0.6},
            "v2": {"random": 0.04, "thumbnails": 0.30, "histogram": 0.10, "off_the_shelf": 0.6},
            "t": {"random": 0.01, "thumbnails": 0.05, "histogram": 0.07, "off_the_shelf": 0.5},
        },
        **extra,
    }


def test_reference_point_is_base_size_and_best_zero_byte_baseline_on_validation():
    # thumbnails (0.10 + 0.30) / 2 beats histogram (0.15); off_the_shelf needs the model's bytes: not a floor.
    assert reference_point(_meta()) == pytest.approx((4.5, 0.20))
    assert reference_point(_meta(), split="test") == pytest.approx((4.5, 0.07))
    assert reference_point({MEMORY_KEY: 4.5}) == (4.5, 0.0)  # a base from before baselines were measured


def test_reference_point_refuses_a_meta_without_the_base_size_or_baselines_per_split():
    with pytest.raises(ValueError, match="memory_mib = None"):
        reference_point({"baselines": {}})
    with pytest.raises(ValueError, match=r"val_splits = \['v1', 'nope'\]"):
        reference_point(_meta(val_splits=["v1", "nope"]))


# ------------------------------------------------------------------------------ the parent run in MLflow


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "hv")
    parent = tracking.start_parent_run(uri, "hv", "sweep", str(tmp_path / "sweep"), {}, {})
    return uri, experiment_id, parent, MlflowClient(uri)


def _row(trial_id: str, number: int, status: str, memory=None, value=None, timestamp=None) -> dict:
    """A row as `sweep.results.collect_rows` gives it, for a trial with no checkpoint."""
    result = {"training_iteration": 4}
    if memory is not None:
        result |= {MEMORY_KEY: memory, MAP_KEY: value}
    if timestamp is not None:
        result["timestamp"] = timestamp
    return {
        "trial_id": trial_id,
        "number": number,
        "name": trial_id,
        "status": status,
        "config": {"bits": 4},
        "result": result,
        MAP_KEY: result.get(MAP_KEY),
        MEMORY_KEY: result.get(MEMORY_KEY),
        "node": "127.0.0.1/test",
        "retries": 0,
        "error": "boom" if status == "failed" else None,
        "checkpoint": None,
        "checkpoint_fs": None,
    }


def _history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    entries = client.get_metric_history(run_id, tracking.HYPERVOLUME_METRIC)
    return sorted((m.step, m.value) for m in entries)


def _sync(uri, experiment_id, parent, rows):
    return tracking.sync_sweep(uri, experiment_id, parent, rows, {}, hypervolume_reference=REF)


def test_sync_logs_one_step_per_trial_once_and_the_png(store):
    uri, experiment_id, parent, client = store
    # Listed in creation order; they ended c, a, b(failed), d.
    rows = [
        _row("a", 1, "ok", 1.0, 0.5, timestamp=20),
        _row("b", 2, "failed", timestamp=25),
        _row("c", 3, "ok", 5.0, 0.8, timestamp=10),
        _row("d", 4, "ok", 2.0, 0.4, timestamp=30),
    ]
    _sync(uri, experiment_id, parent, rows)
    final = 0.3 * L5 + 0.6 * (1 - L5)
    expected = [(1, 0.6 * (1 - L5)), (2, final), (3, final), (4, final)]
    history = _history(client, parent)
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert [v for _, v in history] == pytest.approx([v for _, v in expected])
    run = client.get_run(parent)
    assert run.data.metrics[tracking.HYPERVOLUME_METRIC] == pytest.approx(final)
    assert tracking.HYPERVOLUME_PNG in {a.path for a in client.list_artifacts(parent)}
    png = client.download_artifacts(parent, tracking.HYPERVOLUME_PNG)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    _sync(uri, experiment_id, parent, rows)  # a second --sync: nothing new
    assert _history(client, parent) == history

    # --resume re-ran the failed trial and it completed; a fifth trial ended after it.
    rows[1] = _row("b", 2, "ok", 0.1, 0.3, timestamp=40)
    rows.append(_row("e", 5, "failed", timestamp=50))
    _sync(uri, experiment_id, parent, rows)
    after = client.get_metric_history(parent, tracking.HYPERVOLUME_METRIC)
    assert sorted(m.step for m in after) == [1, 2, 3, 4, 5]  # steps 1-4 kept as they were logged
    with_b = hypervolume(rows, REF)
    assert with_b > final
    assert client.get_run(parent).data.metrics[tracking.HYPERVOLUME_METRIC] == pytest.approx(with_b)


def test_sync_corrects_only_the_last_step_when_its_value_changed(store):
    uri, experiment_id, parent, client = store
    rows = [_row("a", 1, "ok", 1.0, 0.5, timestamp=1), _row("b", 2, "failed", timestamp=2)]
    _sync(uri, experiment_id, parent, rows)
    rows[1] = _row("b", 2, "ok", 0.1, 0.3, timestamp=3)  # re-run by --resume, same number of trials done
    _sync(uri, experiment_id, parent, rows)
    steps = sorted(m.step for m in client.get_metric_history(parent, tracking.HYPERVOLUME_METRIC))
    assert steps == [1, 2, 2]  # one correction of the last step; MLflow shows the newest
    assert client.get_run(parent).data.metrics[tracking.HYPERVOLUME_METRIC] == pytest.approx(
        hypervolume(rows, REF)
    )
    _sync(uri, experiment_id, parent, rows)
    assert len(client.get_metric_history(parent, tracking.HYPERVOLUME_METRIC)) == 3


def _trial(trial_id: str, number: int) -> Trial:
    # Ray Tune's own Trial; ``stub`` skips looking the trainable up in a registry (no Ray cluster needed).
    trial = Trial(
        "run_trial", config={"bits": 4}, trial_id=trial_id, experiment_tag=f"{number}_bits=4", stub=True
    )
    trial.set_status(Trial.RUNNING)
    return trial


def test_live_logger_logs_each_ended_trial_and_sync_adds_nothing(store):
    uri, experiment_id, parent, client = store
    logger = TrialRunLogger(uri, experiment_id, parent, {}, hypervolume_reference=REF)
    trials = [_trial(t, i + 1) for i, t in enumerate("abcd")]
    a, b, c, d = trials
    ends = [
        (c, {MEMORY_KEY: 5.0, MAP_KEY: 0.8}, None),
        (a, {MEMORY_KEY: 1.0, MAP_KEY: 0.5}, None),
        (b, {}, "error"),
        (d, {MEMORY_KEY: 2.0, MAP_KEY: 0.4}, None),
    ]
    for t in trials:
        logger.on_trial_start(0, trials, t)
    for clock, (t, objectives, error) in enumerate(ends, start=1):
        result = {"training_iteration": 4, "timestamp": clock * 10, **objectives}
        t.update_last_result(result)
        logger.on_trial_result(0, trials, t, result)
        if error:
            t.set_status(Trial.ERROR)  # Tune marks the trial ERROR before on_trial_error
            logger.on_trial_error(0, trials, t)
        else:
            logger.on_trial_complete(0, trials, t)  # … and TERMINATED only after on_trial_complete
            t.set_status(Trial.TERMINATED)
    final = 0.3 * L5 + 0.6 * (1 - L5)
    history = _history(client, parent)
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert [v for _, v in history] == pytest.approx([0.6 * (1 - L5), final, final, final])

    rows = [
        _row("a", 1, "ok", 1.0, 0.5, timestamp=20),
        _row("b", 2, "failed", timestamp=30),
        _row("c", 3, "ok", 5.0, 0.8, timestamp=10),
        _row("d", 4, "ok", 2.0, 0.4, timestamp=40),
    ]
    _sync(uri, experiment_id, parent, rows)
    assert _history(client, parent) == history
    assert tracking.HYPERVOLUME_PNG in {x.path for x in client.list_artifacts(parent)}


def test_live_logger_without_a_reference_logs_no_hypervolume(store):
    uri, experiment_id, parent, client = store
    logger = TrialRunLogger(uri, experiment_id, parent, {})
    trial = _trial("a", 1)
    trial.update_last_result({MEMORY_KEY: 1.0, MAP_KEY: 0.5})
    logger.on_trial_complete(0, [trial], trial)
    assert _history(client, parent) == []
