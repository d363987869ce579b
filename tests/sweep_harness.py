"""Helpers for the multi-node and fault tests: a private Ray temp folder, a several-node Ray on one machine, the
sweep CLI as a process that can be killed, and readers for what a sweep leaves behind. (The real `mlflow server`
is tests/mlflow_server.py, free ports are tests/net.py.)

Isolation. This machine (and CI) runs other Ray users beside these tests. `ray.init()` with no address joins the
cluster recorded in ``<RAY_TMPDIR>/ray/ray_current_cluster`` (``ray start`` and ``ray.cluster_utils.Cluster``
write it), so every Ray here gets its own short ``RAY_TMPDIR``: its drivers never join a stranger's cluster, and the
processes it leaves (which all carry ``RAY_TMPDIR=<that folder>`` in their environment, even Ray's renamed workers)
can be found and ended by pid.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def wait_for(
    condition: Callable[[], Any], what: str, timeout: float, alive: subprocess.Popen | None = None, poll=0.5
):
    """Poll ``condition`` until it returns something truthy (returned); fail naming ``what`` on timeout, or at
    once when the process ``alive`` ends first (its exit would otherwise look like a slow condition)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the sweep exited ({alive.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# ------------------------------------------------------------------------------------------ Ray processes


def processes_with_env(marker: str) -> list[int]:
    """Pids of this user's processes whose environment holds ``marker`` (e.g. ``RAY_TMPDIR=/tmp/vs-ray-x``)."""
    needle = marker.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def process_title(pid: int) -> str:
    """A process's command line (Ray renames its workers and agents, e.g. ``ray::RuntimeEnvAgent``); "" once gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def private_ray_tmpdir() -> Iterator[Path]:
    """A short ``RAY_TMPDIR`` (Ray's socket paths must stay under 107 bytes, pytest's tmp_path is too long).

    On exit every process still carrying it in its environment is killed by pid, and the folder goes."""
    path = Path(tempfile.mkdtemp(prefix="vs-ray-", dir="/tmp"))
    try:
        yield path
    finally:
        kill_pids(processes_with_env(f"RAY_TMPDIR={path}"))
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def local_cluster(ray_tmpdir: Path, head: dict, workers: list[dict]):
    """``ray.cluster_utils.Cluster`` with its head and workers on 127.0.0.1 (conftest sets
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), all under ``ray_tmpdir``. Yields (cluster, worker nodes)."""
    from ray.cluster_utils import Cluster

    previous = os.environ.get("RAY_TMPDIR")
    # Cluster writes and later removes ray_current_cluster under $RAY_TMPDIR: keep both inside the private folder.
    os.environ["RAY_TMPDIR"] = str(ray_tmpdir)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **head})
        nodes = [cluster.add_node(**args) for args in workers]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        if cluster is not None:
            with suppress(Exception):
                cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous


# ------------------------------------------------------------------------------------------ the sweep CLI


class SweepProcess:
    """``python sweep/run.py ARGS`` in its own process (a user's command line), output to files so a long sweep
    never blocks on a full pipe. ``ray_tmpdir`` isolates the local Ray it starts (or the cluster it joins)."""

    def __init__(self, args: list[str], cwd: Path, ray_tmpdir: Path, log_name: str = "sweep"):
        self.args = args
        self.out_path = cwd / f"{log_name}.out"
        self.err_path = cwd / f"{log_name}.err"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "sweep" / "run.py"), *args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=err,
                text=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the sweep did not end within {timeout:.0f} s\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def output(self, tail: int = 6000) -> str:
        return f"--- stdout ---\n{self.stdout[-tail:]}\n--- stderr ---\n{self.stderr[-tail:]}"


def sweep_args(
    space: Path, storage: Path, name: str, mlflow_uri: str, *extra: str, experiment: str = "vladsweep-faults"
) -> list[str]:
    """The CLI arguments of a test sweep (shared base steps, so every test sweep reuses one cached base)."""
    from conftest import TEST_PRESET

    return [
        "--search-space",
        str(space),
        "--storage",
        str(storage),
        "--name",
        name,
        "--mlflow-uri",
        mlflow_uri,
        "--experiment",
        experiment,
        "--preset",
        TEST_PRESET,
        *extra,
    ]


# ------------------------------------------------------------------------------------------ what a sweep leaves


def trial_results(experiment_dir: Path) -> dict[str, list[dict]]:
    """Every result Tune received, per trial id, in order (the trials' result.json, one JSON object a line)."""
    results: dict[str, list[dict]] = {}
    for path in glob.glob(str(experiment_dir / "*" / "result.json")):
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                results.setdefault(row["trial_id"], []).append(row)
    return results


def trial_dirs(experiment_dir: Path) -> dict[str, Path]:
    """Trial id → the trial's folder (its params/results/checkpoints), from the trials' result.json."""
    dirs = {}
    for path in glob.glob(str(experiment_dir / "*" / "result.json")):
        first = Path(path).read_text().split("\n", 1)[0]
        if first.strip():
            dirs[json.loads(first)["trial_id"]] = Path(path).parent
    return dirs


def saved_trial_statuses(experiment_dir: Path) -> dict[str, str]:
    """Trial id → status in the newest experiment state Tune saved (what a ``--resume`` starts from)."""
    files = sorted(glob.glob(str(experiment_dir / "experiment_state-*.json")), key=os.path.getmtime)
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (OSError, json.JSONDecodeError):  # caught mid-write: the next poll reads it whole
        return {}
    statuses = {}
    for json_state, _metadata in state["trial_data"]:
        trial = json.loads(json_state)
        statuses[trial["trial_id"]] = trial["status"]
    return statuses


def tree_snapshot(folder: Path) -> dict[str, int]:
    """Relative path → mtime (ns) of every file under ``folder``: equal snapshots mean nothing was rewritten."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


@dataclass
class MlflowRecord:
    parent: Any  # mlflow.entities.Run
    children: list  # [mlflow.entities.Run]

    def by_trial(self) -> dict[str, Any]:
        return {run.data.tags["trial_id"]: run for run in self.children}


def mlflow_record(
    uri: str, experiment: str = "vladsweep-faults", sweep_dir: str | None = None
) -> MlflowRecord:
    """The sweep's parent run and its child runs (``sweep_dir`` picks the parent when the experiment has many)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {uri}"
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`vladsweep.role` = 'sweep'")
    if sweep_dir is not None:
        parents = [r for r in parents if r.data.tags.get("vladsweep.sweep_dir") == sweep_dir]
    assert len(parents) == 1, f"expected one parent run, found {len(parents)}"
    children = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
        max_results=1000,
    )
    return MlflowRecord(parents[0], children)


def finished_child_runs(uri: str, experiment: str = "vladsweep-faults") -> int:
    """Child runs the live MLflow callback has closed as FINISHED (0 while nothing is there yet)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return 0
        runs = client.search_runs(
            [exp.experiment_id], filter_string="tags.`vladsweep.role` = 'trial' and tags.status = 'FINISHED'"
        )
    except Exception:  # the store is being created by the sweep: try again
        return 0
    return len(runs)
