"""The sweep end to end (issue 4): real Ray, real Optuna (sqlite study), real MLflow (sqlite store), real models.

One tiny sweep runs per session (``finished_sweep`` in conftest) and most tests read what it left behind; the
others start their own short sweeps in the same storage root, so the base model is built only once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import TEST_PRESET, run_sweep_cli

from trainables.contract import (
    DROP_KEY,
    MAP_KEY,
    MEMORY_KEY,
    OBJECTIVES,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    ZERO_BYTE_BASELINES,
    map_key,
)

pytestmark = pytest.mark.slow

OBJECTIVE_METRICS = (
    MAP_KEY,
    TEST_MAP_KEY,
    map_key("synthetic-val"),
    map_key("synthetic-test"),
    DROP_KEY,
    TEST_DROP_KEY,
    MEMORY_KEY,
    "compression_ratio",
    "sparsity",
)


def _runs(uri: str, experiment: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("vladsweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("vladsweep.role") == "trial"]
    return client, parents, children


def test_sweep_logs_parent_children_front_and_artifacts(finished_sweep):
    client, parents, children = _runs(finished_sweep.mlflow_uri, finished_sweep.experiment)
    assert len(parents) == 1
    parent = parents[0]
    assert len(children) == 4, [c.data.tags for c in children]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["trial_id"] for c in children}) == 4

    # Parent: the search space, base config, seed and code version as params; base mAP as a metric.
    assert "search_space.sampler.type" in parent.data.params
    assert parent.data.params["seed"] == "0"
    assert "code_version" in parent.data.params and "base.backbone" in parent.data.params
    assert 0 < parent.data.metrics["base_mAP"] <= 1
    # Built at most once, by this sweep or by an earlier one of the session sharing the storage — never twice.
    assert parent.data.tags["base_builds"] in ("0", "1")
    assert [p.name for p in (finished_sweep.storage / "_base").iterdir()] == [parent.data.tags["base_key"]]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "pareto.png", "pareto.html"} <= parent_artifacts

    front = [c for c in children if c.data.tags["pareto"] == "true"]
    assert front, "a finished sweep has a non-empty front"
    assert parent.data.tags["pareto_size"] == str(len(front))
    for child in children:
        assert child.data.tags["status"] == "FINISHED"
        assert child.data.tags["node"].startswith("127.0.0.1")
        for key in OBJECTIVE_METRICS:
            assert math.isfinite(child.data.metrics[key]), key
        assert child.data.params["prune_mode"] == "sigma" and "threshold" in child.data.params
        assert child.data.metrics["seconds_trial"] > 0
    # The front is exactly the non-dominated set of (validation mAP max, memory min): test plays no part.
    assert OBJECTIVES == {MAP_KEY: "max", MEMORY_KEY: "min"} and MAP_KEY == "val_mAP"
    points = {c.info.run_id: (c.data.metrics[MAP_KEY], c.data.metrics[MEMORY_KEY]) for c in children}
    for child in children:
        m, mem = points[child.info.run_id]
        dominated = any(
            (om >= m and omem <= mem) and (om > m or omem < mem)
            for rid, (om, omem) in points.items()
            if rid != child.info.run_id
        )
        assert (child.data.tags["pareto"] == "true") == (not dominated)


def test_sweep_logs_hypervolume_per_trial_and_its_png(finished_sweep):
    from sweep.hypervolume import hypervolume

    client, (parent,), children = _runs(finished_sweep.mlflow_uri, finished_sweep.experiment)
    metrics = parent.data.metrics
    steps = sorted(m.step for m in client.get_metric_history(parent.info.run_id, "hypervolume"))
    # The reference from what the parent shows: the base's size, the best zero-byte baseline on validation.
    ref = (metrics["base_memory_mib"], max(metrics[f"baseline_{n}_val"] for n in ZERO_BYTE_BASELINES))
    points = [{k: c.data.metrics[k] for k in OBJECTIVES} for c in children]
    assert steps == [1, 2, 3, 4] and metrics["hypervolume"] == pytest.approx(hypervolume(points, ref))
    assert "hypervolume.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "hypervolume (val, ref memory=" in finished_sweep.stdout


def test_front_member_file_is_what_memory_and_map_measure(finished_sweep, tmp_path):
    """Honest numbers: memory_mib is the logged file's size, and both mAPs (validation, the objective, and test,
    reported beside it) are the decoded file's."""
    from trainables.compression.codec import load_compressed
    from trainables.data.registry import load_dataset
    from trainables.retrieval.evaluate import evaluate_dataset

    client, _, children = _runs(finished_sweep.mlflow_uri, finished_sweep.experiment)
    member = next(c for c in children if c.data.tags["pareto"] == "true")
    local = Path(client.download_artifacts(member.info.run_id, "model", str(tmp_path)))
    artifact = next(local.glob("*.safetensors"))
    assert {"layers.json", "layers.md", "layers.html"} <= {p.name for p in local.iterdir()}
    assert os.path.getsize(artifact) / 2**20 == pytest.approx(
        member.data.metrics["memory_mib"], rel=0, abs=1e-12
    )

    model = load_compressed(artifact)
    image_size = model.compression_meta["meta"]["base"]["image_size"]
    for split, key in (("synthetic-val", MAP_KEY), ("synthetic-test", TEST_MAP_KEY)):
        measured = evaluate_dataset(model, load_dataset(split), image_size)["mAP"]
        assert measured == pytest.approx(member.data.metrics[key], abs=1e-6), split


def test_resume_of_a_finished_sweep_reruns_nothing(finished_sweep):
    client, (parent_before,), before = _runs(finished_sweep.mlflow_uri, finished_sweep.experiment)
    proc = run_sweep_cli(
        [
            "--resume",
            "--search-space",
            str(finished_sweep.space),
            "--storage",
            str(finished_sweep.storage),
            "--name",
            finished_sweep.name,
            "--experiment",
            finished_sweep.experiment,
            "--mlflow-uri",
            finished_sweep.mlflow_uri,
            "--preset",
            TEST_PRESET,
        ],
        cwd=finished_sweep.root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    _, parents, after = _runs(finished_sweep.mlflow_uri, finished_sweep.experiment)
    assert len(parents) == 1
    assert sorted(r.data.tags["trial_id"] for r in after) == sorted(r.data.tags["trial_id"] for r in before)
    assert {r.info.run_id: r.data.metrics[MAP_KEY] for r in after} == {
        r.info.run_id: r.data.metrics[MAP_KEY] for r in before
    }
    before_builds = parent_before.data.tags["base_builds"]
    assert parents[0].data.tags["base_builds"] == before_builds, "the cached base must be reused, not rebuilt"
    study = optuna.load_study(
        study_name="vladsweep",
        storage=f"sqlite:///{finished_sweep.storage / finished_sweep.name / 'optuna.db'}",
    )
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(len(t.values) == 2 for t in study.trials), "the study is multi-objective"


def _sweep(tmp_path: Path, storage: Path, space: Path, name: str, *extra: str) -> tuple[str, object]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_sweep_cli(
        [
            "--search-space",
            str(space),
            "--storage",
            str(storage),
            "--name",
            name,
            "--experiment",
            name,
            "--mlflow-uri",
            uri,
            "--preset",
            TEST_PRESET,
            *extra,
        ],
        cwd=tmp_path,
    )
    return uri, proc


def test_same_seed_gives_same_configs_and_metrics(tmp_path, sweep_storage, tiny_space):
    results = []
    for name in ("seed-a", "seed-b"):
        uri, proc = _sweep(
            tmp_path, sweep_storage, tiny_space, name, "--num-samples", "2", "--max-concurrent", "1"
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        _, _, children = _runs(uri, name)
        results.append(
            sorted(
                (
                    float(c.data.params["threshold"]),
                    int(c.data.params["bits"]),
                    c.data.metrics[MAP_KEY],
                    c.data.metrics[TEST_MAP_KEY],
                    c.data.metrics[MEMORY_KEY],
                )
                for c in children
            )
        )
    assert len(results[0]) == 2
    assert results[0] == results[1]


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, sweep_storage):
    space = tmp_path / "fails.yaml"
    # sigma 50 prunes every weight of a layer: the plan refuses it, so that trial raises; the other one completes.
    space.write_text(
        "sampler: {type: grid}\n"
        "params:\n  threshold: {choices: [0.5, 50.0]}\n"
        "fixed:\n  prune_mode: sigma\n  bits: 4\n  l1_steps: 1\n  retrain_steps: 1\n  quant_steps: 1\n"
    )
    uri, proc = _sweep(tmp_path, sweep_storage, space, "fails", "--max-failures", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _, parents, children = _runs(uri, "fails")
    by_status = {c.data.tags["status"]: c for c in children}
    assert set(by_status) == {"FINISHED", "FAILED"}
    failed = by_status["FAILED"]
    assert float(failed.data.params["threshold"]) == 50.0
    assert "prune" in failed.data.tags["error"].lower()
    assert failed.data.tags["retries"] == "2", "one try plus one retry (FailureConfig)"
    assert failed.data.tags["pareto"] == "false"
    assert MAP_KEY not in failed.data.metrics and TEST_MAP_KEY not in failed.data.metrics
    assert parents[0].data.tags["pareto_size"] == "1"
    assert "1 failed" in proc.stdout
