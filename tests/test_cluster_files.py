"""cluster/gpu.yaml and cluster/local.yaml: valid for Ray's own cluster launcher, and shaped the way users rely on.

Validation is Ray's (`prepare_config` then `validate_config`, the steps `ray up` takes before it touches a cloud),
so a file that passes here is one `ray up` accepts. The other tests pin what the files promise: the repository
reaches every node and is installed there, MLflow listens on 127.0.0.1 only, GPU workers scale from zero and are
terminated (never stopped), the AWS workers keep faiss-cpu while on-prem GPU hosts get the GPU build, and a new
head restores the MLflow backup. The last test runs cluster/head_services.sh for real (an MLflow server here).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from net import free_port
from ray.autoscaler._private.util import prepare_config, validate_config
from sshd_cluster import cmdline, listening_addresses

from trainables.retrieval.rank import _GPU_MAX_K

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
FILES = ["gpu.yaml", "local.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def prepared(name: str) -> dict:
    config = prepare_config(load(name))
    validate_config(config)
    return config


def all_commands(config: dict) -> list[str]:
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands")
    return [c for k in keys for c in config.get(k, [])]


@pytest.mark.parametrize("name", FILES)
def test_cluster_file_passes_rays_own_validation(name):
    config = prepared(name)
    assert config["cluster_name"].startswith("vladsweep")
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize(
    ("name", "break_it"),
    [
        ("gpu.yaml", lambda c: c["available_node_types"]["ray.worker.gpu1"]["resources"].update(GPU="1")),
        ("gpu.yaml", lambda c: c["available_node_types"]["ray.worker.gpu1"]["resources"].update(GPU=0.5)),
        ("gpu.yaml", lambda c: c.update(setup_command=c.pop("setup_commands"))),  # a typo'd key
        ("gpu.yaml", lambda c: c["available_node_types"]["ray.worker.gpu1"].update(min_workers="0")),
        ("local.yaml", lambda c: c["auth"].update(ssh_port=2222)),  # Ray's auth block has no ssh_port
    ],
    ids=["string-resource", "float-resource", "unknown-key", "string-min-workers", "ssh-port"],
)
def test_a_broken_copy_fails_validation(name, break_it):
    config = copy.deepcopy(load(name))
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_local_provider_refuses_node_types():
    config = load("local.yaml")
    assert "available_node_types" not in config
    config["available_node_types"] = {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}
    with pytest.raises(Exception, match="not supported for on-premise clusters"):
        prepare_config(config)


def test_local_yaml_names_the_hosts_and_the_ssh_user():
    config = load("local.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and isinstance(provider["worker_ips"], list)
    assert config["auth"]["ssh_user"]


def test_gpu_yaml_has_a_cpu_head_and_gpu_workers_scaling_from_zero():
    config = prepared("gpu.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert types, "at least one GPU worker type"
    for name, node in types.items():
        assert node["min_workers"] == 0, f"{name}: GPU workers must scale from 0 (idle GPUs cost money)"
        assert node["max_workers"] >= 1, name
        assert node["resources"]["GPU"] >= 1, name
        for key, value in node["resources"].items():
            assert type(value) is int, f"{name}.resources.{key} = {value!r} must be an integer"
        assert node["node_config"]["InstanceType"].startswith(("g", "p")), f"{name} is not a GPU instance"
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", FILES)
def test_file_mounts_carry_the_installable_repository(name):
    config = load(name)
    mounts = config["file_mounts"]
    assert all(remote.startswith("~/vladsweep/") for remote in mounts)
    for remote, local in mounts.items():
        assert (REPO / local).exists(), (
            f"{name}: file_mounts {remote}: {local} does not exist in the repository"
        )
        assert (REPO / local).resolve() != REPO, (
            f"{name}: mounting the whole checkout hashes its .venv on each up"
        )
    mounted = {Path(local).parts[0] for local in mounts.values()}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"], "cluster"}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= mounted, f"{name}: file_mounts miss {sorted(needed - mounted)}"
    assert "__pycache__" in config["rsync_exclude"]


@pytest.mark.parametrize("name", FILES)
def test_setup_installs_the_mounted_repository_and_puts_its_venv_on_path(name):
    config = prepared(name)
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = config[role]
        installs = [c for c in commands if re.search(r"pip install\b.*-e ~/vladsweep(\s|$)", c)]
        assert installs, f"{name}: {role} never runs `pip install -e ~/vladsweep`"
        assert any("~/.bashrc" in c and "venv/bin" in c for c in commands), (
            f"{name}: {role}: venv not on PATH"
        )


@pytest.mark.parametrize("name", FILES)
def test_nodes_get_the_ray_version_that_launches_them(name):
    pins = set(re.findall(r"ray\[[^\]]*\]==([\w.]+)", " ".join(all_commands(load(name)))))
    assert pins == {ray.__version__}, f"{name} pins Ray {pins}; this checkout runs Ray {ray.__version__}"


def test_on_prem_gpu_hosts_get_the_gpu_faiss_build():
    config = prepared("local.yaml")
    worker = " ".join(config["worker_setup_commands"])
    # faiss-gpu-cu12 is the PyPI GPU build (CUDA 12 runtime from PyPI); it replaces faiss-cpu, not beside it.
    assert "faiss-gpu-cu12" in worker
    assert worker.index("uninstall") < worker.index("--reinstall-package faiss-gpu-cu12")


def test_gpu_yaml_keeps_faiss_cpu_on_the_workers():
    # A trial's evaluation ranks the whole database (5-6k images), beyond faiss's GPU k limit: the GPU build
    # would never search, only cost setup time (trainables/retrieval/rank.py).
    assert _GPU_MAX_K < 5063, "Oxford5k's full ranking fits faiss's GPU search now: reconsider faiss-gpu"
    config = prepared("gpu.yaml")
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = " ".join(config[role])
        assert "faiss-gpu" not in commands and "uninstall" not in commands, role
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = [d for deps in pyproject["project"].get("optional-dependencies", {}).values() for d in deps]
    assert not [d for d in extras if d.startswith("faiss-gpu")], "an extra installs faiss-gpu"


def test_gpu_yaml_terminates_its_nodes_as_the_docs_say():
    provider = load("gpu.yaml")["provider"]
    assert provider["cache_stopped_nodes"] is False, "stopped nodes keep billing their disks"
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert "`ray down` terminates every instance (`cache_stopped_nodes: false`)" in docs
    assert "cache_stopped_nodes: true" not in docs


def test_a_new_gpu_head_restores_the_mlflow_backup_the_docs_write():
    """`ray down` deletes the head's disk: the backup the docs run before it is the file a new head restores,
    before MLflow starts (head_setup_commands run before head_start_ray_commands)."""
    config = load("gpu.yaml")
    backup = re.search(r"head_services\.sh backup (s3://\S+?)'", (REPO / "docs" / "cluster.md").read_text())
    assert backup, "docs/cluster.md no longer backs up the MLflow store before ray down"
    restore = " ".join(config["head_setup_commands"])
    assert f"aws s3 cp --only-show-errors {backup.group(1)} ~/mlflow/mlflow.db" in restore
    assert "test ! -f ~/mlflow/mlflow.db" in restore, "a restore must never overwrite a live store"


def test_gpu_yaml_exports_the_data_root_and_skips_download_archives():
    commands = " ".join(all_commands(load("gpu.yaml")))
    assert "VLADSWEEP_DATA_ROOT=$HOME/data" in commands
    assert re.search(r"aws s3 sync .*--exclude '\.downloads/\*' s3://YOUR-BUCKET/\S+ ~/data", commands)
    torch_hub = r"aws s3 sync .*s3://YOUR-BUCKET/\S+/torch-hub ~/\.cache/torch/hub/checkpoints"
    assert re.search(torch_hub, commands), "the nodes need the ImageNet weights in torch's cache"


def test_gpu_yaml_syncs_the_datasets_and_shares_storage():
    config = load("gpu.yaml")
    commands = " ".join(all_commands(config))
    assert re.search(r"aws s3 sync .*s3://YOUR-BUCKET/\S+ ~/data", commands)
    assert "VLADSWEEP_STORAGE=s3://" in commands, "the shared storage_path is named for the sweep"
    assert "VLADSWEEP_MLFLOW_ARTIFACTS=s3://" in commands, "MLflow artifacts go to the shared storage"


@pytest.mark.parametrize("name", FILES)
def test_head_starts_mlflow_on_loopback_then_ray(name):
    start = load(name)["head_start_ray_commands"]
    services = next(i for i, c in enumerate(start) if "cluster/head_services.sh start" in c)
    ray_start = next(i for i, c in enumerate(start) if "ray start --head" in c)
    assert services < ray_start
    assert "--dashboard-host=127.0.0.1" in start[ray_start]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start[ray_start]
    script = (CLUSTER / "head_services.sh").read_text()
    server = script[script.index("mlflow server") :].split("\n\n")[0]
    assert "--host 127.0.0.1" in server
    assert "sqlite:///" in server
    for path in CLUSTER.iterdir():
        assert "0.0.0.0" not in path.read_text(), f"{path.name} opens a port to every interface"


def test_no_secret_in_the_cluster_folder():
    patterns = [
        r"AKIA[0-9A-Z]{16}",
        r"aws_secret_access_key",
        r"BEGIN [A-Z ]*PRIVATE KEY",
        r"password\s*[:=]",
    ]
    for path in CLUSTER.iterdir():
        text = path.read_text()
        for pattern in patterns:
            assert not re.search(pattern, text, re.IGNORECASE), f"{path.name} matches {pattern}"


def test_head_services_runs_mlflow_on_loopback_idempotently(tmp_path):
    """The real script and a real MLflow server: start, start again (kept), backup, stop."""
    port = free_port()
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        VLADSWEEP_MLFLOW_PORT=str(port),
        VLADSWEEP_MLFLOW_DIR=str(tmp_path / "mlflow"),
        VLADSWEEP_MLFLOW_WORKERS="1",
    )

    def services(*args: str) -> subprocess.CompletedProcess:
        cmd = ["bash", str(CLUSTER / "head_services.sh"), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    try:
        first = services("start")
        assert first.returncode == 0, first.stdout + first.stderr
        pid = int((tmp_path / "mlflow" / "server.pid").read_text())
        listening = listening_addresses(port)
        assert listening == {"127.0.0.1"}, f"MLflow listens on {listening or 'nothing'}"
        again = services("start")
        assert again.returncode == 0 and "already answers" in again.stdout, again.stdout + again.stderr
        assert int((tmp_path / "mlflow" / "server.pid").read_text()) == pid, "a second server was started"
        backup = services("backup", str(tmp_path / "copy" / "mlflow.db"))
        assert backup.returncode == 0, backup.stderr
        with sqlite3.connect(tmp_path / "copy" / "mlflow.db") as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
        assert {"experiments", "runs"} <= tables
    finally:
        stopped = services("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert services("status").returncode == 1
    assert not cmdline(pid), f"the MLflow server (pid {pid}) outlived `stop`"


def test_head_services_refuses_unknown_commands():
    result = subprocess.run(
        ["bash", str(CLUSTER / "head_services.sh"), "restart"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "usage" in result.stderr
    assert all(word in result.stderr for word in ("start", "stop", "status", "backup"))


PERMISSIONS_SECTION = "### Permissions the head needs to launch workers"


def passrole_check() -> str:
    commands = [c for c in load("gpu.yaml")["head_setup_commands"] if "iam:PassRole" in c]
    assert len(commands) == 1, (
        "gpu.yaml's head setup no longer checks that the head may pass the workers' role"
    )
    return commands[0]


def test_gpu_head_setup_checks_it_may_pass_the_workers_role_as_the_docs_say():
    command = passrole_check()
    assert subprocess.run(["bash", "-n", "-c", command], capture_output=True).returncode == 0
    assert "aws ec2 run-instances --dry-run" in command
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert PERMISSIONS_SECTION in docs.splitlines()
    anchor = "#" + PERMISSIONS_SECTION.lstrip("# ").lower().replace(" ", "-")
    assert f"docs/cluster.md{anchor}" in command, "the warning must point at the docs section"
    assert f"]({anchor})" in docs, "docs/cluster.md step 2 must link the permissions section"
    policy = json.loads(
        re.search(r"```json\n(.*?)```", docs[docs.index(PERMISSIONS_SECTION) :], re.S).group(1)
    )
    passrole = [s for s in policy["Statement"] if s["Action"] == "iam:PassRole"]
    assert passrole and passrole[0]["Resource"].endswith(":role/ray-autoscaler-v1")
    assert (
        "ray-autoscaler-v1"
        in load("gpu.yaml")["available_node_types"]["ray.worker.gpu1"]["node_config"]["IamInstanceProfile"][
            "Arn"
        ]
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            "An error occurred (UnauthorizedOperation) when calling the RunInstances operation",
            "WARNING vladsweep",
        ),
        ("An error occurred (DryRunOperation) when calling the RunInstances operation", "may launch"),
        ("Unable to locate credentials", "could not check"),
        (None, None),  # no aws CLI on the head
    ],
    ids=["refused", "allowed", "cannot-ask", "no-aws-cli"],
)
def test_passrole_check_warns_and_never_fails_ray_up(tmp_path, answer, expected):
    """The head setup command for real in bash, with a fake `aws` and a fake instance metadata `curl` (the cloud)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(
        '#!/bin/bash\ncase "${@: -1}" in */api/token) echo tok;; */mac) echo 0a:1b;; */region) echo us-east-1;;\n'
        "*/ami-id) echo ami-123;; */subnet-id) echo subnet-456;; esac\n"
    )
    if answer is not None:
        (bin_dir / "aws").write_text(
            f'#!/bin/bash\necho "$*" >> "$HOME/aws.log"\necho "{answer}" >&2\nexit 254\n'
        )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(load("gpu.yaml")))
    env = dict(HOME=str(tmp_path), PATH=f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    result = subprocess.run(
        ["bash", "-c", passrole_check()], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    if answer is None:
        assert result.stdout == "" and not (tmp_path / "aws.log").exists()
        return
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(expected in line for line in lines), result.stdout  # one per worker type
    if expected == "WARNING vladsweep":
        assert all("iam:PassRole" in line and "#permissions-the-head" in line for line in lines)
    calls = (tmp_path / "aws.log").read_text().splitlines()
    assert {c.split("--instance-type ")[1].split()[0] for c in calls} == {"g5.xlarge", "g5.12xlarge"}
    profile = "Arn=arn:aws:iam::YOUR-ACCOUNT-ID:instance-profile/ray-autoscaler-v1"
    assert all("--dry-run" in c and profile in c and "ami-123" in c and "subnet-456" in c for c in calls)
