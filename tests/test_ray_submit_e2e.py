"""The cluster path for real: `ray up`, `ray submit`, `ray exec`, `ray down` against cluster/local.yaml.

The "cluster" is this machine reached over ssh on 127.0.0.1 (a private sshd, tests/sshd_cluster.py), so every step a
user's `ray up cluster/local.yaml` takes runs here: rsync of the file mounts, the setup commands, MLflow and Ray
started by head_start_ray_commands, the submitted script run on the head in a login shell. Only what needs the
internet differs (the venv is this machine's instead of a fresh uv install).

The module's cluster comes up once; the tests then run in file order and the last one takes it down.
Needs openssh-server, rsync and netcat-openbsd (.ci/run installs them).
"""

from __future__ import annotations

import textwrap
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import fail_missing_system_tools
from net import free_port
from sshd_cluster import REPO, SshdHost, cmdline, listening_addresses, missing_tools, sshd_host

from trainables.contract import OBJECTIVES


@pytest.fixture(autouse=True, scope="module")
def _system_tools():
    fail_missing_system_tools(missing_tools())  # a failure naming the installer, never a silent skip


@dataclass
class UpCluster:
    host: SshdHost
    config: Path
    mlflow_port: int
    down: bool = False

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def ray(self, *args: str, timeout: float = 300):
        return self.host.ray(*args, timeout=timeout)

    def explain(self, what: str, result) -> str:
        """A failure message that shows why: the command's own output, then the head's logs."""
        return f"{what} exited {result.returncode}:\n{result.stdout[-10000:]}\n{self.host.diagnostics()}"

    def submit(self, script: Path, *args: str, timeout: float = 300):
        return self.ray(
            "submit", str(self.config), str(script), *(["--", *args] if args else []), timeout=timeout
        )


@pytest.fixture(scope="module")
def cluster():
    with sshd_host() as host:
        mlflow_port = free_port()
        config = host.cluster_config(
            REPO / "cluster" / "local.yaml",
            f"vse2e-{uuid.uuid4().hex[:8]}",
            VLADSWEEP_MLFLOW_PORT=str(mlflow_port),
            VLADSWEEP_MLFLOW_WORKERS="1",
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
            # Stands in for `pip install -e ~/vladsweep`: the head imports the mounted copy, not this checkout.
            PYTHONPATH="$HOME/vladsweep",
        )
        up = UpCluster(host, host.write_config(config), mlflow_port)
        result = up.ray("up", "-y", str(up.config), timeout=600)
        if result.returncode != 0:
            pytest.fail(up.explain("`ray up`", result))
        yield up
        if not up.down:
            up.ray("down", "-y", str(up.config), timeout=300)


@pytest.mark.slow
def test_ray_up_carried_the_repository_and_started_mlflow_and_ray(cluster):
    mounted = cluster.host.home / "vladsweep"
    for path in ("pyproject.toml", "sweep/run.py", "trainables/pipeline.py", "cluster/head_services.sh"):
        assert (mounted / path).is_file(), f"file_mounts did not carry {path}"
    assert not list(mounted.rglob("__pycache__")), "rsync_exclude should keep __pycache__ off the nodes"

    listening = listening_addresses(cluster.mlflow_port)
    assert listening == {"127.0.0.1"}, f"the head's MLflow server listens on {listening or 'nothing'}"

    status = cluster.ray("exec", str(cluster.config), "ray status", timeout=120)
    assert status.returncode == 0, cluster.explain("`ray exec … ray status`", status)
    assert "Active:" in status.stdout


@pytest.mark.slow
def test_submit_streams_the_output_of_a_script_run_on_the_head(cluster):
    marker = uuid.uuid4().hex
    script = cluster.host.root / "hello_submit.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, pathlib, sweep
        out = pathlib.Path.home() / "submitted.txt"
        out.write_text("{marker}")
        print("SUBMITTED", "{marker}", sweep.__file__, os.environ["MLFLOW_TRACKING_URI"], flush=True)
        """)
    )
    result = cluster.submit(script)
    assert result.returncode == 0, cluster.explain("`ray submit`", result)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("SUBMITTED")), None)
    assert line is not None, f"the script's output did not come back:\n{result.stdout[-4000:]}"
    _, got_marker, sweep_file, tracking_uri = line.split()
    assert got_marker == marker
    assert Path(sweep_file).is_relative_to(cluster.host.home / "vladsweep"), "not the mounted package"
    assert tracking_uri == cluster.mlflow_uri
    assert (cluster.host.home / "submitted.txt").read_text() == marker
    assert (cluster.host.home / "hello_submit.py").is_file(), (
        "ray submit copies the script to the head's home"
    )


@pytest.mark.slow
def test_submit_of_a_failing_script_exits_1_and_shows_why(cluster):
    script = cluster.host.root / "fail_submit.py"
    script.write_text(
        "import sys\nprint('about to fail', flush=True)\nraise SystemExit('deliberate failure: 7')\n"
    )
    result = cluster.submit(script)
    assert result.returncode == 1, cluster.explain("a failing `ray submit`", result)
    assert "about to fail" in result.stdout
    assert "deliberate failure: 7" in result.stdout


@pytest.mark.slow
def test_submit_runs_a_smoke_sweep_logged_to_the_heads_mlflow(cluster):
    from mlflow import MlflowClient

    storage = cluster.host.root / "shared" / "ray_results"
    result = cluster.submit(
        REPO / "sweep" / "run.py",
        "--search-space",
        "search_spaces/smoke.yaml",
        "--num-samples",
        "2",
        "--mlflow-uri",
        cluster.mlflow_uri,
        "--storage",
        str(storage),
        "--name",
        "e2e",
        "--experiment",
        "e2e",
        timeout=840,
    )
    assert result.returncode == 0, cluster.explain("`ray submit … sweep/run.py`", result)

    # Through the head's MLflow server, and straight from the sqlite store it keeps on the head.
    store = cluster.host.home / "mlflow" / "mlflow.db"
    for uri in (cluster.mlflow_uri, f"sqlite:///{store}"):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("e2e")
        assert experiment is not None, f"no experiment 'e2e' in {uri}"
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1, (
            f"{uri}: expected one parent run, found {[r.info.run_name for r in parents]}"
        )
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len(children) == 2, f"{uri}: expected 2 child runs, found {len(children)}"
        assert all(set(OBJECTIVES) <= set(r.data.metrics) for r in children)
    assert (storage / "e2e").is_dir(), "Ray Tune's results are not in --storage"


@pytest.mark.slow
def test_ray_down_stops_ray_on_the_head(cluster):
    result = cluster.ray("down", "-y", str(cluster.config), timeout=300)
    cluster.down = True
    assert result.returncode == 0, cluster.explain("`ray down`", result)
    left = [
        cmd for cmd in map(cmdline, cluster.host.own_processes()) if "raylet" in cmd or "gcs_server" in cmd
    ]
    assert not left, f"Ray processes left after `ray down`: {left}"
    # MLflow is not Ray's: it keeps serving the sweep's runs (docs/cluster.md says how to stop it).
    with urllib.request.urlopen(f"{cluster.mlflow_uri}/health", timeout=10) as response:
        assert response.status == 200
