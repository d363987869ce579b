"""Release: read a sweep back from a real MLflow sqlite store, pick a front member, register it, resolve its alias.

The store is written here with MlflowClient in the layout `sweep.tracking` writes (parent run tagged
``vladsweep.role = sweep``, child runs with ``trial_id`` / ``status`` / ``pareto`` tags and metrics, front members'
files under ``model/``; the parent's base and baseline metrics), with real compressed artifacts of a tiny NetVLAD
model. The artifacts' sizes are measured; their val and test mAP values are set by the test so the front's shape is
known — except in the last test, where the trial's test mAP is measured the way `trainables.pipeline` measures it
and the served model must reproduce it exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from tiny_artifacts import IMAGE_SIZE, tiny_artifact

from sweep import release, tracking
from sweep.release import (
    BASE_TEST_MAP_METRIC,
    ReleaseError,
    open_sweep,
    parse_fraction,
    pick_by_max_drop,
    pick_by_max_memory,
)
from trainables.compression.codec import load_compressed
from trainables.contract import (
    ARTIFACT_FILE,
    DROP_KEY,
    LAYERS_JSON,
    MAP_KEY,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    baseline_metric,
    map_key,
)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "release-tests"
BASE_MAP, BASE_TEST_MAP = 0.80, 0.76
#: The main sweep's baselines on val and test: thumbnails (0.62) is the best zero-byte one, above t1 (0.60).
BASELINES = {
    "random": (0.03, 0.02),
    "thumbnails": (0.62, 0.58),
    "histogram": (0.41, 0.40),
    "off_the_shelf": (0.7, 0.66),
}


@dataclass
class Store:
    root: Path
    uri: str
    client: MlflowClient
    parent: str = ""
    old_parent: str = ""
    runs: dict[str, str] = field(default_factory=dict)  # trial id -> run id
    files: dict[str, Path] = field(default_factory=dict)  # trial id -> artifact file


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_sweep(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    start_ms: int,
    trials: list[dict],
    base_map: float,
    workdir: Path,
    base_test_map: float | None = None,
    baselines: dict[str, tuple[float, float]] | None = None,
) -> tuple[str, dict[str, str], dict[str, Path]]:
    """A parent run and one child run per trial, as `sweep.tracking.sync_sweep` leaves them; ``baselines`` is
    name -> (val mAP, test mAP), logged as the parent's ``baseline_<name>_val`` / ``_test``."""
    parent = client.create_run(
        experiment_id,
        run_name=name,
        start_time=start_ms,
        tags={"vladsweep.role": "sweep", "vladsweep.sweep_dir": str(workdir / name)},
    ).info.run_id
    base_test_map = base_map if base_test_map is None else base_test_map
    parent_metrics = {
        tracking.BASE_MAP_METRIC: base_map,
        BASE_TEST_MAP_METRIC: base_test_map,
        tracking.BASE_MEMORY_METRIC: 1150080 / 2**20,
    }
    for name, (val, test) in (baselines or {}).items():
        parent_metrics[baseline_metric(name, "val")] = val
        parent_metrics[baseline_metric(name, "test")] = test
        parent_metrics[baseline_metric(name, "synthetic-val")] = val
        parent_metrics[baseline_metric(name, "synthetic-test")] = test
    client.log_batch(
        parent,
        metrics=[Metric(k, v, 0, 0) for k, v in parent_metrics.items()],
        params=[Param("base.image_size", str(IMAGE_SIZE))],
    )
    runs, files = {}, {}
    for i, t in enumerate(trials):
        status = t.get("status", "FINISHED")
        run = client.create_run(
            experiment_id,
            run_name=f"run_trial_{t['id']}",
            start_time=start_ms + 1 + i,
            tags={
                "mlflow.parentRunId": parent,
                "trial_id": t["id"],
                "vladsweep.role": "trial",
                "status": status,
                "pareto": "true" if t.get("pareto") else "false",
                "node": "127.0.0.1/test",
            },
        ).info.run_id
        runs[t["id"]] = run
        params = {"bits": t.get("bits", 4), "sparsity_target": t.get("sparsity", 0.5), "base_key": "k"}
        metrics = {}
        if status == "FINISHED":
            path = workdir / t["id"] / ARTIFACT_FILE
            totals = tiny_artifact(path, t.get("bits", 4), t.get("sparsity", 0.5), seed=i)
            files[t["id"]] = path
            mib = t.get("memory_mib", totals["memory_mib"])
            val = t["mAP"]
            test = t["test"](path) if callable(t.get("test")) else t.get("test", val - 0.02)
            metrics = {
                MAP_KEY: val,
                TEST_MAP_KEY: test,
                map_key("synthetic-val"): val,
                map_key("synthetic-test"): test,
                DROP_KEY: (base_map - val) / base_map,
                TEST_DROP_KEY: (base_test_map - test) / base_test_map,
                "memory_mib": mib,
                "compression_ratio": totals["dense_fp32_bytes"] / (mib * 2**20),
                "sparsity": totals["sparsity"],
            }
            if t.get("artifact", t.get("pareto")):
                (path.parent / LAYERS_JSON).write_text(json.dumps({"totals": totals}))
                client.log_artifacts(run, str(path.parent), artifact_path="model")
        client.log_batch(
            run,
            metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        client.set_terminated(run, "FINISHED" if status == "FINISHED" else "FAILED")
    client.set_tag(parent, "pareto_run_ids", ",".join(runs[t["id"]] for t in trials if t.get("pareto")))
    client.set_terminated(parent, "FINISHED")
    return parent, runs, files


#: The main sweep: "mAP" is the val mAP (what decides), "test" the test mAP. Memory grows with bits (measured on
#: the files): t1 < t2 < t4 < t3.
TRIALS = [
    # Val drop 25 %; below the thumbnails baseline (0.62).
    {"id": "t1", "bits": 2, "sparsity": 0.8, "mAP": 0.60, "test": 0.57, "pareto": True},
    # Val drop 2.5 %, test drop 0 %: on test it would beat t3, but selection never looks at test.
    {"id": "t2", "bits": 4, "sparsity": 0.5, "mAP": 0.78, "test": 0.76, "pareto": True},
    {"id": "t3", "bits": 8, "sparsity": 0.0, "mAP": 0.788, "test": 0.70, "pareto": True},  # val drop 1.5 %
    # Dominated by t2 (bigger and worse). It keeps the file it got while it was on the front of an earlier sync.
    {"id": "t4", "bits": 6, "sparsity": 0.3, "mAP": 0.70, "pareto": False, "artifact": True},
    # Dominated, never on the front: no file logged.
    {"id": "t5", "bits": 8, "sparsity": 0.0, "mAP": 0.65, "pareto": False, "memory_mib": 0.5},
    {"id": "t6", "status": "FAILED"},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("release")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    client.create_experiment("no-sweeps-here", artifact_location=str(root / "artifacts-empty"))
    s = Store(root, uri, client)
    s.old_parent, old_runs, _ = log_sweep(
        client, exp, "old-sweep", 1_000_000, [{"id": "old1", "mAP": 0.5, "pareto": True}], 0.6, root / "old"
    )
    s.parent, s.runs, s.files = log_sweep(
        client, exp, "main-sweep", 2_000_000, TRIALS, BASE_MAP, root / "main", BASE_TEST_MAP, BASELINES
    )
    s.runs["old1"] = old_runs["old1"]
    mibs = {t: client.get_run(s.runs[t]).data.metrics["memory_mib"] for t in ("t1", "t2", "t3", "t4")}
    assert mibs["t1"] < mibs["t2"] < mibs["t4"] < mibs["t3"], f"the test's front needs this order: {mibs}"
    return s


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    code = release.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_release_resolves_the_store_like_the_sweep(tmp_path, monkeypatch):
    """A relative sqlite URI names the same file for `sweep/run.py` and the release; a missing store is refused."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReleaseError, match=str(tmp_path / "mlflow.db")):
        release.check_store("sqlite:///mlflow.db")
    (tmp_path / "mlflow.db").touch()
    assert release.check_store("sqlite:///mlflow.db") == tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    assert release.check_store("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert release.check_store("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_parse_fraction():
    assert parse_fraction("0.02") == pytest.approx(0.02)
    assert parse_fraction("2%") == pytest.approx(0.02)
    assert parse_fraction(" 2.5 % ") == pytest.approx(0.025)
    assert parse_fraction("0") == 0.0
    with pytest.raises(ReleaseError, match="write 2%"):
        parse_fraction("2")
    with pytest.raises(ReleaseError, match="0.02 or a percentage"):
        parse_fraction("two")
    with pytest.raises(ReleaseError, match="≥ 0"):
        parse_fraction("-1%")


def test_list_shows_the_front_of_the_latest_sweep(store, capsys):
    code, out, _ = run_main(["--mlflow-uri", store.uri, "--experiment", EXPERIMENT], capsys)
    assert code == 0
    assert store.parent in out and "main-sweep" in out
    assert "6 trials, 5 finished, 3 on the Pareto front" in out
    rows = [line for line in out.splitlines() if line[:32] in store.runs.values()]
    assert [r.split()[1] for r in rows] == ["t1", "t2", "t3"], "front rows, smallest file first"
    assert store.runs["t4"] not in out and store.runs["t5"] not in out
    assert "(base model)" in out and "0.8000" in out
    t2 = next(r for r in rows if r.split()[1] == "t2")
    assert "bits=4" in t2 and "base_key" not in t2  # bits varies across trials, base_key not
    header = out.splitlines()[1].split()
    assert header[:8] == [
        "run_id",
        "trial",
        "memory_mib",
        "ratio",
        MAP_KEY,
        "val_drop",
        TEST_MAP_KEY,
        "test_drop",
    ]
    # Val beside test: mAP, drop, test mAP, test drop.
    assert t2.split()[4:8] == ["0.7800", "2.5%", "0.7600", "0.0%"]
    base = next(line for line in out.splitlines() if line.startswith("(base model)"))
    assert base.split()[3:8] == ["1.0", "0.8000", "0.0%", "0.7600", "0.0%"]
    # The baselines, and the front member below the best zero-byte one, marked.
    thumbs = next(line for line in out.splitlines() if line.startswith("(thumbnails)"))
    assert thumbs.split()[1:3] == ["0.6200", "0.5800"] and "the best zero-byte" in thumbs
    t1 = next(r for r in rows if r.split()[1] == "t1")
    assert "BELOW thumbnails" in t1 and "BELOW" not in t2
    assert "Best zero-byte baseline: thumbnails (val_mAP 0.6200); 1 front member below it" in out


def test_parent_run_id_selects_another_sweep(store, capsys):
    code, out, _ = run_main(
        [
            "--mlflow-uri",
            store.uri,
            "--experiment",
            EXPERIMENT,
            "--parent-run-id",
            store.old_parent,
            "--list",
        ],
        capsys,
    )
    assert code == 0
    assert store.runs["old1"] in out and store.runs["t1"] not in out


def test_picks(store):
    sweep = open_sweep(store.uri, EXPERIMENT)
    drop = {x: pick_by_max_drop(sweep, parse_fraction(x)).trial_id for x in ("3%", "0.03", "2%", "25%", "1")}
    # Validation decides: at 2% that is t3 (val drop 1.5%), though its test drop (7.9%) is the front's worst.
    assert drop == {"3%": "t2", "0.03": "t2", "2%": "t3", "25%": "t1", "1": "t1"}
    t3 = sweep.trial(store.runs["t3"])
    assert t3.map_drop == pytest.approx(0.015) and t3.test_drop == pytest.approx(1 - 0.70 / 0.76)
    assert sweep.best_baseline == ("thumbnails", 0.62)
    assert sweep.baselines["off_the_shelf"] == 0.7 and sweep.test_baselines["thumbnails"] == 0.58
    mib = {t: sweep.trial(store.runs[t]).memory_mib for t in ("t1", "t2", "t3", "t4")}
    assert pick_by_max_memory(sweep, mib["t4"]).trial_id == "t2"  # t4 fits too but is dominated
    assert pick_by_max_memory(sweep, mib["t3"]).trial_id == "t3"
    assert pick_by_max_memory(sweep, mib["t1"]).trial_id == "t1"
    assert pick_by_max_memory(sweep, 1e9).trial_id == "t3"


def test_nothing_qualifies_lists_the_closest(store):
    sweep = open_sweep(store.uri, EXPERIMENT)
    with pytest.raises(ReleaseError) as err:
        pick_by_max_drop(sweep, 0.01)
    lines = str(err.value).splitlines()
    assert "at most 1.0%" in lines[0]
    assert "trial t3" in lines[1] and "drop 1.5% (test 7.9%)" in lines[1], (
        "the closest first: the smallest drop"
    )
    assert f"{MAP_KEY} 0.7880 (test 0.7000)" in lines[1]
    assert "trial t2" in lines[2]
    with pytest.raises(ReleaseError) as err:
        pick_by_max_memory(sweep, 0.001)
    assert "fits in 0.001 MiB" in str(err.value) and "trial t1" in str(err.value).splitlines()[1]


def _version(store, name, alias="release"):
    return store.client.get_model_version_by_alias(name, alias)


def test_release_registers_a_version_and_the_alias_resolves(store, capsys, tmp_path, monkeypatch):
    name = "tiny-netvlad"
    base = ["--mlflow-uri", store.uri, "--experiment", EXPERIMENT, "--name", name]
    code, out, err = run_main([*base, "--max-map-drop", "3%"], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"models:/{name}@release"
    assert "trial t2" in out
    mv = _version(store, name)
    assert str(mv.version) == "1" and mv.run_id == store.runs["t2"]
    assert mv.tags["trial_id"] == "t2" and mv.tags["pareto"] == "true" and mv.tags["forced"] == "false"
    assert float(mv.tags[MAP_KEY]) == 0.78 and float(mv.tags[DROP_KEY]) == pytest.approx(0.025)
    assert float(mv.tags[TEST_MAP_KEY]) == 0.76 and float(mv.tags[TEST_DROP_KEY]) == pytest.approx(0.0)
    assert float(mv.tags[BASE_TEST_MAP_METRIC]) == BASE_TEST_MAP
    assert (
        mv.tags["below_zero_byte_baseline"] == "false"
        and mv.tags["best_zero_byte_baseline"] == "thumbnails=0.62"
    )
    assert f"{TEST_MAP_KEY} 0.7600" in mv.description
    assert mv.tags["config.bits"] == "4" and mv.tags["base.image_size"] == str(IMAGE_SIZE)
    assert mv.tags["base.train_image_size"] == str(IMAGE_SIZE)  # the tiny preset trains at its test size
    assert mv.tags["artifact_sha256"] == _sha256(store.files["t2"])
    assert mv.tags["sweep_parent_run_id"] == store.parent

    # What a user of MLflow does with the URI: the file comes back, unchanged, and loads.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store.uri)
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}@release", dst_path=str(tmp_path / "dl"))
    )
    artifact = local / ARTIFACT_FILE
    assert _sha256(artifact) == _sha256(store.files["t2"])
    assert (local / LAYERS_JSON).is_file()
    model = load_compressed(artifact)
    assert model.compression_meta["meta"]["base"]["image_size"] == IMAGE_SIZE
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (1, 32)

    # A second release is a new version and moves the alias; releasing t2 again reuses its version.
    code, out, _ = run_main([*base, "--max-memory-mib", "1000"], capsys)
    assert code == 0 and "trial t3" in out
    assert str(_version(store, name).version) == "2"
    code, out, _ = run_main([*base, "--run-id", store.runs["t2"]], capsys)
    assert code == 0 and "already version 1" in out
    assert str(_version(store, name).version) == "1"
    assert len(store.client.search_model_versions(f"name = '{name}'")) == 2

    # t1 is on the front but below the best zero-byte baseline: refused, whichever way it is picked.
    for pick in (["--run-id", store.runs["t1"]], ["--max-map-drop", "25%"]):
        code, _, err = run_main([*base, *pick, "--alias", "smallest"], capsys)
        assert code == 2, pick
        assert "trial t1" in err and f"{MAP_KEY} 0.6000 < 0.6200 for thumbnails" in err and "--force" in err
    with pytest.raises(mlflow.exceptions.MlflowException):
        _version(store, name, "smallest")
    code, out, err = run_main([*base, "--run-id", store.runs["t1"], "--alias", "smallest", "--force"], capsys)
    assert code == 0 and out.strip().splitlines()[-1] == f"models:/{name}@smallest"
    assert "warning: releasing a trial below the best zero-byte baseline" in err
    mv = _version(store, name, "smallest")
    assert mv.run_id == store.runs["t1"]
    assert mv.tags["below_zero_byte_baseline"] == "true" and mv.tags["forced"] == "true"
    assert str(_version(store, name).version) == "1", "another alias leaves 'release' where it was"


def test_off_front_run_is_refused_with_the_reason_unless_forced(store, capsys):
    name = "forced-netvlad"
    base = [
        "--mlflow-uri",
        store.uri,
        "--experiment",
        EXPERIMENT,
        "--name",
        name,
        "--run-id",
        store.runs["t4"],
    ]
    code, out, err = run_main(base, capsys)
    assert code == 2
    assert "not on the Pareto front" in err and "dominated by trial t2" in err and "--force" in err
    assert "trial t3" not in err, "t3 is bigger than t4: it does not dominate it"
    with pytest.raises(mlflow.exceptions.MlflowException):
        store.client.get_registered_model(name)

    code, out, err = run_main([*base, "--force"], capsys)
    assert code == 0, err
    assert "warning" in err and "dominated by trial t2" in err
    mv = _version(store, name)
    assert mv.run_id == store.runs["t4"] and mv.tags["forced"] == "true" and mv.tags["pareto"] == "false"


def test_forced_run_without_a_file_and_failed_runs_are_refused(store, capsys):
    base = ["--mlflow-uri", store.uri, "--experiment", EXPERIMENT, "--name", "never"]
    code, _, err = run_main([*base, "--run-id", store.runs["t5"], "--force"], capsys)
    assert code == 2 and "no model/model.vlad.safetensors artifact" in err and "trial t5" in err
    code, _, err = run_main([*base, "--run-id", store.runs["t6"], "--force"], capsys)
    assert code == 2 and "status FAILED" in err
    with pytest.raises(mlflow.exceptions.MlflowException):
        store.client.get_registered_model("never")


def test_bad_inputs_name_what_is_wrong(store, capsys, tmp_path):
    base = ["--mlflow-uri", store.uri]
    code, _, err = run_main([*base, "--experiment", "nope"], capsys)
    assert code == 2 and "'nope': no such experiment" in err and EXPERIMENT in err
    code, _, err = run_main([*base, "--experiment", "no-sweeps-here"], capsys)
    assert code == 2 and "has no sweep" in err and "sweep/run.py" in err
    code, _, err = run_main([*base, "--experiment", EXPERIMENT, "--parent-run-id", store.runs["t1"]], capsys)
    assert code == 2 and "not a sweep parent run" in err
    code, _, err = run_main([*base, "--experiment", EXPERIMENT, "--parent-run-id", "0" * 32], capsys)
    assert code == 2 and "no such run" in err
    code, _, err = run_main([*base, "--experiment", EXPERIMENT, "--run-id", store.runs["old1"]], capsys)
    assert code == 2 and "not a trial of sweep 'main-sweep'" in err
    code, _, err = run_main([*base, "--experiment", EXPERIMENT, "--run-id", "t2"], capsys)
    assert code == 2 and f"trial id of run {store.runs['t2']}" in err
    code, _, err = run_main([*base, "--experiment", EXPERIMENT, "--max-map-drop", "2"], capsys)
    assert code == 2 and "write 2%" in err
    code, _, err = run_main([*base, "--experiment", EXPERIMENT, "--max-memory-mib", "-1"], capsys)
    assert code == 2 and "must be a size > 0" in err
    missing = tmp_path / "nothing.db"
    code, _, err = run_main(["--mlflow-uri", f"sqlite:///{missing}", "--experiment", EXPERIMENT], capsys)
    assert code == 2 and str(missing) in err and not missing.exists()
    with pytest.raises(SystemExit):  # argparse: one pick at a time
        release.main([*base, "--max-map-drop", "2%", "--run-id", "x"])


def test_a_damaged_artifact_is_not_released(store, tmp_path, capsys):
    # Every test shares the module's store: a new MLflow database costs ~10 s of migrations on the CI machine.
    client, uri = store.client, store.uri
    exp = client.create_experiment("damaged", artifact_location=str(tmp_path / "artifacts"))
    _, runs, files = log_sweep(
        client, exp, "s", 1, [{"id": "d1", "mAP": 0.5, "pareto": True}], 0.6, tmp_path / "w"
    )
    # Flip one payload byte in the logged copy: the checksum of that tensor no longer matches.
    run = client.get_run(runs["d1"])
    logged = Path(run.info.artifact_uri.removeprefix("file://")) / "model" / ARTIFACT_FILE
    data = bytearray(logged.read_bytes())
    data[-100] ^= 0xFF
    logged.write_bytes(bytes(data))
    code, _, err = run_main(
        ["--mlflow-uri", uri, "--experiment", "damaged", "--max-map-drop", "100%"], capsys
    )
    assert code == 2 and "does not load" in err and "checksum mismatch" in err


def test_released_model_serves_the_mAP_its_trial_logged(store, tmp_path):
    """The whole path, as a user runs it: `python -m sweep.release`, then the search CLI on the models:/ URI."""
    from trainables.data.registry import load_dataset
    from trainables.retrieval.evaluate import evaluate_dataset

    client, uri = store.client, store.uri
    exp = client.create_experiment("chain", artifact_location=str(tmp_path / "artifacts"))

    def measure(path: Path) -> float:
        # The trial's test mAP exactly as trainables/pipeline.py measures it: decode the file, evaluate the split.
        return evaluate_dataset(load_compressed(path), load_dataset("synthetic-test"), IMAGE_SIZE)["mAP"]

    trial = {"id": "c1", "mAP": 0.5, "test": measure, "pareto": True}
    _, runs, _ = log_sweep(client, exp, "chain-sweep", 1, [trial], 0.9, tmp_path / "w")
    logged = client.get_run(runs["c1"]).data.metrics[map_key("synthetic-test")]
    assert logged == client.get_run(runs["c1"]).data.metrics[TEST_MAP_KEY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.run(
        [sys.executable, "-m", "sweep.release", "--mlflow-uri", uri, "--experiment", "chain", "--name", "chain",
         "--max-map-drop", "100%"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    model_uri = proc.stdout.strip().splitlines()[-1]
    assert model_uri == "models:/chain@release"

    proc = subprocess.run(
        [sys.executable, "-m", "trainables.serving", "--model", model_uri, "--mlflow-uri", uri,
         "--evaluate", "synthetic-test", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "version 1, run " + runs["c1"] in proc.stderr
    assert json.loads(proc.stdout)["mAP"] == logged


# --- Trust: serving checks the released sha256; --sign / --verify-key -----------------------------------------------


def _keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A fresh ed25519 key pair as PEM files in the test's folder (keys are never in the repository)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _one_trial_sweep(store: Store, tmp_path: Path, experiment: str) -> tuple[str, Path]:
    """A sweep of one front member in its own experiment of the module's store; (run id, its logged file)."""
    exp = store.client.create_experiment(experiment, artifact_location=str(tmp_path / "artifacts"))
    _, runs, _ = log_sweep(
        store.client, exp, experiment, 1, [{"id": "r1", "mAP": 0.5, "pareto": True}], 0.6, tmp_path / "w"
    )
    run = store.client.get_run(runs["r1"])
    return runs["r1"], Path(run.info.artifact_uri.removeprefix("file://")) / "model" / ARTIFACT_FILE


def _serve(store: Store, model: str, capsys, *extra: str) -> tuple[int, str]:
    """The search CLI in this process, stopped right after the trust checks would pass (an empty database)."""
    from trainables.serving import cli as serving

    empty = store.root / "no-images"
    empty.mkdir(exist_ok=True)
    code = serving.main(["--model", model, "--mlflow-uri", store.uri, "--database", str(empty), *extra])
    return code, capsys.readouterr().err


def test_serving_refuses_a_registry_file_that_is_not_the_released_one(store, tmp_path, capsys):
    from trainables.serving.cli import resolve_model

    run_id, logged = _one_trial_sweep(store, tmp_path, "swapped")
    name = "swapped-netvlad"
    code, _, err = run_main(["--mlflow-uri", store.uri, "--experiment", "swapped", "--name", name,
                             "--max-map-drop", "100%"], capsys)  # fmt: skip
    assert code == 0, err
    released = _sha256(logged)
    assert _version(store, name).tags["artifact_sha256"] == released
    for uri in (f"models:/{name}@release", f"models:/{name}/1"):
        path, label = resolve_model(uri, store.uri, tmp_path / uri.replace("/", "_").replace(":", "_"))
        assert _sha256(path) == released and "version 1" in label

    # Replace the logged file with another valid artifact (its own checksums all correct): only the release's
    # sha256 tells. Both URI forms are refused, naming both hashes and the version, before anything decodes it.
    tiny_artifact(logged, bits=2, sparsity=0.7, seed=9)
    swapped = _sha256(logged)
    for uri in (f"models:/{name}@release", f"models:/{name}/1"):
        code, err = _serve(store, uri, capsys)
        assert code == 2 and err.startswith("error: "), err
        assert released in err and swapped in err and "version 1" in err and name in err
        assert "checksum" not in err, "refused on the release record, not by the decoder"
    # Nor does a new release of the changed file move the alias: the version recorded another file.
    code, _, err = run_main(["--mlflow-uri", store.uri, "--experiment", "swapped", "--name", name,
                             "--run-id", run_id, "--alias", "again"], capsys)  # fmt: skip
    assert code == 2 and released in err and swapped in err and "changed after its release" in err

    # A version without a record (registered by hand, not by the release) is refused too.
    store.client.delete_model_version_tag(name, "1", "artifact_sha256")
    code, err = _serve(store, f"models:/{name}@release", capsys)
    assert code == 2 and "has no artifact_sha256 tag" in err and swapped in err and "version 1" in err
    # A stage or 'latest' cannot name one version to check: refused with the forms that can.
    code, err = _serve(store, f"models:/{name}/latest", capsys)
    assert code == 2 and "models:/NAME@ALIAS or models:/NAME/VERSION" in err


def test_signed_release_verifies_in_and_out_of_mlflow(store, tmp_path, capsys):
    from trainables.serving.cli import resolve_model
    from trainables.serving.trust import key_fingerprint, load_public_key

    private, public = _keys(tmp_path, "release-key")
    _, stranger = _keys(tmp_path, "stranger")
    run_id, logged = _one_trial_sweep(store, tmp_path, "signed")
    base = ["--mlflow-uri", store.uri, "--experiment", "signed", "--name", "signed-netvlad"]

    code, _, err = run_main([*base, "--max-map-drop", "100%", "--sign", str(tmp_path / "none.pem")], capsys)
    assert code == 2 and "--sign" in err and "cannot read" in err
    with pytest.raises(mlflow.exceptions.MlflowException):
        store.client.get_registered_model("signed-netvlad")
    uri = "models:/signed-netvlad@release"
    code, _, err = run_main([*base, "--max-map-drop", "100%", "--alias", "unsigned"], capsys)
    assert code == 0, err
    code, err = _serve(store, "models:/signed-netvlad@unsigned", capsys, "--verify-key", str(public))
    assert code == 2 and "unsigned" in err and f"{ARTIFACT_FILE}.sig" in err

    code, out, err = run_main([*base, "--max-map-drop", "100%", "--sign", str(private)], capsys)
    assert code == 0, err
    fingerprint = key_fingerprint(load_public_key(public))
    assert f"signed: model/{ARTIFACT_FILE}.sig ({fingerprint}" in out and out.strip().endswith(uri)
    assert _version(store, "signed-netvlad").tags["artifact_signed_by"] == fingerprint
    sig = logged.with_name(ARTIFACT_FILE + ".sig")
    assert sig.is_file() and len(sig.read_bytes()) == 64, "the signature lies beside the file in the run"

    # The registry download brings the signature along: the right key passes (an empty database then stops the
    # command after the model loaded), another key is refused naming the fault and the key.
    code, err = _serve(store, uri, capsys, "--verify-key", str(public))
    assert code == 2 and "no images under" in err, err
    code, err = _serve(store, uri, capsys, "--verify-key", str(stranger))
    assert code == 2 and "wrongly signed" in err and str(stranger) in err

    # Outside MLflow: the file and FILE.sig copied together serve as a plain file with the key.
    path, _ = resolve_model(uri, store.uri, tmp_path / "download")
    export = tmp_path / "export"
    export.mkdir()
    for f in (path, path.with_name(path.name + ".sig")):
        (export / f.name).write_bytes(f.read_bytes())
    code, err = _serve(store, str(export / ARTIFACT_FILE), capsys, "--verify-key", str(public))
    assert code == 2 and "no images under" in err, err
    (export / f"{ARTIFACT_FILE}.sig").unlink()
    code, err = _serve(store, str(export / ARTIFACT_FILE), capsys, "--verify-key", str(public))
    assert code == 2 and "unsigned" in err
