"""The sweep on several Ray nodes (``ray.cluster_utils.Cluster`` on one machine, every node on 127.0.0.1): trials
spread over the nodes and say which node ran them; a node that dies under a trial costs a retry from the trial's
last stage checkpoint, not the trial; declared GPUs are shared (``--gpus-per-trial 0.5``) or not (``1``).

The sweep runs as a user runs it — ``python sweep/run.py --ray-address <head>`` in its own process — against a
cluster this test owns. Nodes of one machine share an IP, so placement is checked by Ray node id.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import suppress
from pathlib import Path

import pytest
from conftest import REPO
from sweep_harness import (
    SweepProcess,
    local_cluster,
    mlflow_record,
    private_ray_tmpdir,
    sweep_args,
    trial_results,
    wait_for,
)

from trainables.contract import FINAL_STAGE, MAP_KEY, STAGES
from trainables.devices import ALLOW_CPU_ENV

pytestmark = pytest.mark.slow

EXPERIMENT = "vladsweep-multinode"


def run_args(space: Path, storage: Path, name: str, mlflow_uri: str, address: str, *extra: str) -> list[str]:
    return sweep_args(
        space, storage, name, mlflow_uri, "--ray-address", address, *extra, experiment=EXPERIMENT
    )


def final_rows(experiment_dir: Path) -> dict[str, dict]:
    from sweep.results import collect_rows

    return {row["trial_id"]: row for row in collect_rows(str(experiment_dir))}


def test_trials_spread_over_nodes_and_the_node_is_tagged(sweep_storage, tiny_space, tmp_path):
    """Two 1-CPU workers and a head with no CPUs: two concurrent 1-CPU trials can only run on different nodes,
    and each trial's MLflow child run names the node (IP/node id) that ran it."""
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "multinode-spread"
    with (
        private_ray_tmpdir() as ray_tmp,
        local_cluster(ray_tmp, head={"num_cpus": 0}, workers=[{"num_cpus": 1}, {"num_cpus": 1}]) as (
            cluster,
            workers,
        ),
    ):
        sweep = SweepProcess(
            run_args(
                tiny_space,
                sweep_storage,
                name,
                mlflow_uri,
                cluster.address,
                "--num-samples",
                "2",
                "--max-concurrent",
                "2",
            ),
            tmp_path,
            ray_tmp,
        )
        try:
            assert sweep.wait(timeout=600) == 0, sweep.output()
        finally:
            sweep.kill()
        worker_ids = {node.node_id for node in workers}

    rows = final_rows(sweep_storage / name)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows.values()), rows
    # Every report of a trial came from one node, a worker (the head has no CPU to give).
    ran_on = {}
    for trial_id, results in trial_results(sweep_storage / name).items():
        nodes = {r["node_id"] for r in results}
        assert len(nodes) == 1, f"trial {trial_id} moved between nodes without a failure: {nodes}"
        ran_on[trial_id] = nodes.pop()
        assert all(r["node_ip"] == "127.0.0.1" for r in results)
    assert set(ran_on.values()) == worker_ids, "the two trials did not run on the two workers"

    record = mlflow_record(mlflow_uri, EXPERIMENT)
    children = record.by_trial()
    assert set(children) == set(rows)
    tags = {trial_id: run.data.tags["node"] for trial_id, run in children.items()}
    assert len(set(tags.values())) == 2, f"both trials tagged with one node: {tags}"
    for trial_id, tag in tags.items():
        ip, short_id = tag.split("/")
        assert ip == "127.0.0.1" and ran_on[trial_id].startswith(short_id), (tag, ran_on[trial_id])


def test_a_node_removed_under_a_trial_costs_a_retry_not_the_trial(sweep_storage, tiny_space, tmp_path):
    """Kill (no graceful stop) the node of the first trial to checkpoint its prune stage: the trial is retried on
    the surviving node from that checkpoint (the pruned weights and masks), the sweep completes, the other trial is
    untouched, MLflow shows the retry."""
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "multinode-node-lost"
    experiment_dir = sweep_storage / name
    # Fast failure detection: GCS declares a silent node dead after ~3 missed 1 s health checks (default ~15 s+).
    fast_health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    with (
        private_ray_tmpdir() as ray_tmp,
        local_cluster(
            ray_tmp,
            head={"num_cpus": 0, "_system_config": fast_health},
            workers=[{"num_cpus": 1}, {"num_cpus": 1}],
        ) as (cluster, workers),
    ):
        sweep = SweepProcess(
            run_args(
                tiny_space,
                sweep_storage,
                name,
                mlflow_uri,
                cluster.address,
                "--num-samples",
                "2",
                "--max-concurrent",
                "2",
                "--max-failures",
                "2",
            ),
            tmp_path,
            ray_tmp,
        )
        try:

            def first_pruned_trial():
                for trial_id, results in trial_results(experiment_dir).items():
                    if len(results) >= 2:
                        return trial_id, results[0]
                return None

            victim, first = wait_for(
                first_pruned_trial, "a trial's prune checkpoint", timeout=480, alive=sweep.proc
            )
            by_id = {node.node_id: node for node in workers}
            assert first["node_id"] in by_id, "the trial reported from a node that is not a worker"
            lost_node_id = first["node_id"]
            cluster.remove_node(by_id[lost_node_id], allow_graceful=False)
            # A lost machine takes its processes along; on this one the trial's worker would outlive its raylet.
            with suppress(ProcessLookupError):
                os.kill(first["pid"], signal.SIGKILL)
            survivor_id = next(node_id for node_id in by_id if node_id != lost_node_id)

            assert sweep.wait(timeout=600) == 0, sweep.output()
        finally:
            sweep.kill()

    rows = final_rows(experiment_dir)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows.values()), rows
    results = trial_results(experiment_dir)

    # The victim: started on the lost node, failed once, went on from its checkpoint on the survivor.
    victim_results = results[victim]
    assert rows[victim]["retries"] >= 1
    assert victim_results[0]["node_id"] == lost_node_id
    assert victim_results[-1]["node_id"] == survivor_id
    # Stages only go forward, none twice (a stage whose report died with the node may be missing: the retry starts
    # from the newest checkpoint Tune knows of).
    stages = [r["stage"] for r in victim_results]
    assert sorted(set(stages), key=STAGES.index) == stages, f"a stage ran twice or out of order: {stages}"
    lost = [r["stage"] for r in victim_results if r["node_id"] == lost_node_id]
    assert lost[:2] == ["sparsify", "prune"]
    restored = [r for r in victim_results if r["node_id"] == survivor_id]
    # The retry's first report counts 1 since the restore but continues the trial's iterations: it began at the
    # prune checkpoint or a later one, not from scratch.
    assert restored[0]["iterations_since_restore"] == 1 and restored[0]["training_iteration"] >= 3
    assert restored[-1]["stage"] == FINAL_STAGE

    # The other trial is still there, whole: every stage once, one node, no failure.
    (other,) = set(rows) - {victim}
    assert [r["stage"] for r in results[other]] == list(STAGES)
    assert {r["node_id"] for r in results[other]} == {survivor_id}
    assert rows[other]["retries"] == 0

    # MLflow: one child run per trial; the victim's records the retry and its final result.
    children = mlflow_record(mlflow_uri, EXPERIMENT).by_trial()
    assert set(children) == set(rows)
    victim_run = children[victim]
    assert int(victim_run.data.tags["retries"]) >= 1
    assert victim_run.data.tags["status"] == "FINISHED" and victim_run.info.status == "FINISHED"
    assert victim_run.data.tags["node"].split("/")[1] == survivor_id[:12]
    assert math.isclose(victim_run.data.metrics[MAP_KEY], rows[victim][MAP_KEY])
    assert children[other].data.tags["retries"] == "0"


def _interval(results: list[dict]) -> tuple[float, float]:
    """When a trial ran: from its start (first report minus that stage's time) to its last report. Tune stamps
    results in whole seconds, so an edge is known to within a second."""
    return results[0]["timestamp"] - results[0]["time_this_iter_s"], results[-1]["timestamp"]


def test_declared_gpus_are_shared_by_halves_and_held_whole(sweep_storage, tiny_space, tmp_path, monkeypatch):
    """One declared GPU (``num_gpus=1``; no CUDA needed — Ray only schedules it) and 2 CPUs: at 0.5 GPU a trial,
    two trials run at once, both on GPU 0; at 1 GPU a trial they never overlap."""
    # The GPU is only declared: let its trials run on the CPU where torch has no CUDA (refused otherwise). Set
    # before the cluster starts, so its raylet, and every trial worker it spawns, inherits it.
    monkeypatch.setenv(ALLOW_CPU_ENV, "1")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with (
        private_ray_tmpdir() as ray_tmp,
        local_cluster(ray_tmp, head={"num_cpus": 2, "num_gpus": 1}, workers=[]) as (cluster, _),
    ):
        for gpus in ("0.5", "1"):
            sweep = SweepProcess(
                run_args(
                    tiny_space,
                    sweep_storage,
                    f"gpus-{gpus}",
                    mlflow_uri,
                    cluster.address,
                    "--num-samples",
                    "2",
                    "--max-concurrent",
                    "2",
                    "--gpus-per-trial",
                    gpus,
                ),
                tmp_path,
                ray_tmp,
                log_name=f"sweep-gpus-{gpus}",
            )
            try:
                assert sweep.wait(timeout=600) == 0, sweep.output()
            finally:
                sweep.kill()

    for gpus in ("0.5", "1"):
        results = trial_results(sweep_storage / f"gpus-{gpus}")
        assert len(results) == 2
        for trial in results.values():
            assert {r["gpu_ids"] for r in trial} == {"0"}, "a trial did not hold GPU 0"
            assert {r["stage"] for r in trial} >= {FINAL_STAGE}
        (a_start, a_end), (b_start, b_end) = sorted(_interval(r) for r in results.values())
        if gpus == "0.5":
            assert b_start < a_end - 2, (
                f"the two half-GPU trials did not run at the same time: {a_end=} {b_start=}"
            )
        else:
            assert b_start >= a_end - 1, f"two whole-GPU trials overlapped on one GPU: {a_end=} {b_start=}"


PROBE = """
import faiss  # noqa: F401  (faiss before torch)
import torch
from trainables.pipeline import select_device

device = select_device({share})
total = torch.cuda.get_device_properties(device).total_memory
torch.cuda.empty_cache()
inside = torch.empty(int(total * {share} * 0.5), dtype=torch.uint8, device=device)
del inside
torch.cuda.empty_cache()
try:
    torch.empty(int(total * ({share} + 0.1)), dtype=torch.uint8, device=device)
    print("beyond-share:allocated")
except torch.cuda.OutOfMemoryError:
    print("beyond-share:refused")
"""


@pytest.mark.gpu
def test_a_fractional_trial_caps_its_cuda_memory_to_its_share():
    """On a real GPU: the device choice a trial makes with 0.5 GPU refuses to allocate beyond half the card,
    and allows half of its share (a fresh process, as a Ray trial worker is)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE.format(share=0.5))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "beyond-share:refused" in proc.stdout, proc.stdout


@pytest.mark.gpu
def test_half_gpu_trials_run_on_cuda(sweep_storage, tiny_space, tmp_path):
    """On a real GPU: two 0.5-GPU trials share GPU 0 at the same time, and both really ran on CUDA."""
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with (
        private_ray_tmpdir() as ray_tmp,
        local_cluster(ray_tmp, head={"num_cpus": 2, "num_gpus": 1}, workers=[]) as (cluster, _),
    ):
        sweep = SweepProcess(
            run_args(
                tiny_space,
                sweep_storage,
                "gpus-cuda",
                mlflow_uri,
                cluster.address,
                "--num-samples",
                "2",
                "--max-concurrent",
                "2",
                "--gpus-per-trial",
                "0.5",
            ),
            tmp_path,
            ray_tmp,
        )
        try:
            assert sweep.wait(timeout=600) == 0, sweep.output()
        finally:
            sweep.kill()
    results = trial_results(sweep_storage / "gpus-cuda")
    assert len(results) == 2
    for trial in results.values():
        assert {r["device"] for r in trial} == {"cuda"} and {r["gpu_ids"] for r in trial} == {"0"}
    (a_start, a_end), (b_start, b_end) = sorted(_interval(r) for r in results.values())
    assert b_start < a_end
