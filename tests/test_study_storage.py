"""The Optuna study kept with the sweep's storage (issue 15): where it lives, its copy in an ``s3://`` storage, the
copy fetched back for a ``--resume`` on a new head, the searcher that opens it where this driver keeps it, and
``--optuna-url``.

The object store is ``moto`` in server mode on 127.0.0.1: a stand-in for the cloud (S3), the one fake here. pyarrow,
Ray and boto reach it through ``AWS_ENDPOINT_URL`` and fake credentials set in the environment. Everything else is
real: sqlite studies, Optuna, Ray Tune, MLflow (sqlite store) and the sweep CLI in its own processes.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import TINY_SPACE, run_sweep_cli
from net import free_port
from sweep_harness import SweepProcess, mlflow_record, private_ray_tmpdir, sweep_args

from search_spaces.schema import load_search_space
from sweep.storage import (
    LOCAL_STUDY_DIR,
    STUDY_FILE,
    STUDY_NAME,
    StorageError,
    StudyLocation,
    SweepStorage,
    check_rdb_url,
    filesystem_for,
)
from trainables.contract import MAP_KEY, MEMORY_KEY

BUCKET = "sweeps"


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points pyarrow, boto and Ray at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }.items():
            monkeypatch.setenv(key, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}/root"
    finally:
        server.stop()


def _keys(location: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(location)
    return sorted(
        info.path
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if info.type == pafs.FileType.File
    )


def _study_with_trials(url: str, values: list[tuple[float, float]]) -> list[tuple[int, list[float]]]:
    study = optuna.create_study(study_name=STUDY_NAME, storage=url, directions=["maximize", "minimize"])
    for value in values:
        trial = study.ask()
        trial.suggest_float("threshold", 0.3, 1.4)
        study.tell(trial, list(value))
    return [(t.number, t.values) for t in study.trials]


def _trials(url: str) -> list[tuple[int, list[float] | None, str]]:
    study = optuna.load_study(study_name=STUDY_NAME, storage=url)
    return [(t.number, t.values, t.state.name) for t in study.trials]


# ------------------------------------------------------------------------------------------ where the study lives


def test_study_location_local_uri_and_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = SweepStorage.create(str(tmp_path / "r"), "s1").study()
    assert local.url == f"sqlite:///{tmp_path / 'r' / 's1' / STUDY_FILE}"
    assert local.kept_at is None and local.local_path is None and local.study_name == STUDY_NAME

    remote = SweepStorage.create("s3://bucket/root/", "s1").study()
    assert remote.kept_at == f"s3://bucket/root/s1/{STUDY_FILE}"
    assert remote.local_path == tmp_path / LOCAL_STUDY_DIR / "s1.db"
    assert remote.url == f"sqlite:///{remote.local_path}"

    server = SweepStorage.create("s3://bucket/root", "s1").study("postgresql://u@db.example/sweeps")
    assert server == StudyLocation("postgresql://u@db.example/sweeps", "s1", kept_at=None, server=True)
    assert server.label == "postgresql://u@db.example/sweeps" and local.label == remote.label == "storage"


# ------------------------------------------------------------------------------------------ the copy in S3


def test_keep_uploads_a_consistent_copy_and_fetch_brings_it_back(s3, tmp_path, monkeypatch):
    head1, head2 = tmp_path / "head1", tmp_path / "head2"
    head1.mkdir(), head2.mkdir()
    monkeypatch.chdir(head1)
    study = SweepStorage.create(s3, "s").study()
    written = _study_with_trials(study.url, [(0.5, 1.0), (0.25, 0.5)])
    study.keep()
    assert _keys(s3) == [f"{BUCKET}/root/s/{STUDY_FILE}"], "the temp key was left behind"

    monkeypatch.chdir(head2)  # a new head: another working directory, no local copy
    resumed = SweepStorage.create(s3, "s").study()
    assert not resumed.local_path.exists()
    assert resumed.fetch_for_resume(has_trials=True) is True
    assert [(n, v) for n, v, _ in _trials(resumed.url)] == written
    # A local copy that is there is the newest (every copy in S3 is made from it): it is kept as it is.
    before = resumed.local_path.read_bytes()
    assert resumed.fetch_for_resume(has_trials=True) is False
    assert resumed.local_path.read_bytes() == before


def test_a_local_copy_behind_the_storage_is_moved_aside_not_used(s3, tmp_path, monkeypatch):
    """Head A ran the sweep, head B resumed it (the copy in S3 has more trials), then A resumes again: its older
    local copy would lose B's trials, so the copy in S3 wins and A's is kept beside it."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    on_a = SweepStorage.create(s3, "s").study()
    _study_with_trials(on_a.url, [(0.5, 1.0)])
    on_a.keep()
    monkeypatch.chdir(tmp_path / "b")
    on_b = SweepStorage.create(s3, "s").study()
    assert on_b.fetch_for_resume(has_trials=True)
    study = optuna.load_study(study_name=STUDY_NAME, storage=on_b.url)
    trial = study.ask()
    trial.suggest_float("threshold", 0.3, 1.4)
    study.tell(trial, [0.25, 0.5])
    on_b.keep()

    assert on_a.fetch_for_resume(has_trials=True) is True
    assert [n for n, _, _ in _trials(on_a.url)] == [0, 1]
    (aside,) = [p for p in on_a.local_path.parent.iterdir() if p != on_a.local_path]
    assert aside.name.startswith("s.db.behind-") and [n for n, _, _ in _trials(f"sqlite:///{aside}")] == [0]


def test_a_new_sweep_sets_aside_a_leftover_local_study_of_the_same_name(s3, tmp_path, monkeypatch):
    """The storage of an earlier sweep named "s" was deleted, its local working copy was not: a new sweep "s"
    must start an empty study (not continue, nor upload, the old one), and the old file is kept."""
    monkeypatch.chdir(tmp_path)
    old = SweepStorage.create(s3, "s").study()
    _study_with_trials(old.url, [(0.5, 1.0)])
    new = SweepStorage.create(s3, "s").study()
    aside = new.set_aside_leftover()
    assert aside is not None and aside.name.startswith("s.db.leftover-") and not new.local_path.exists()
    assert [n for n, _, _ in _trials(f"sqlite:///{aside}")] == [0]
    assert new.set_aside_leftover() is None  # nothing left to set aside


def test_resume_with_the_study_in_neither_place_names_the_uri(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = SweepStorage.create(s3, "gone").study()
    with pytest.raises(StorageError) as err:
        study.fetch_for_resume(has_trials=True)
    assert f"{s3}/gone/{STUDY_FILE}" in str(err.value) and str(study.local_path) in str(err.value)
    # A sweep stopped before Tune ran a trial has no study yet: it starts now, nothing to fetch.
    assert study.fetch_for_resume(has_trials=False) is False
    assert not study.local_path.exists()


def test_a_copy_that_is_not_sqlite_is_refused_and_nothing_is_written(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = SweepStorage.create(s3, "bad").study()
    fs, key = filesystem_for(study.kept_at)
    with fs.open_output_stream(key) as stream:
        stream.write(b"SQLite format 3\0 but cut off")
    with pytest.raises(StorageError, match="not a readable sqlite Optuna study"):
        study.fetch_for_resume(has_trials=True)
    assert not study.local_path.exists() and list(study.local_path.parent.iterdir()) == []


# ------------------------------------------------------------------------------------------ the searcher


def _searcher(tmp_path: Path, location: StudyLocation):
    from sweep.tuner import make_searcher

    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(TINY_SPACE)
    return make_searcher(load_search_space(space_file), seed=0, storage_url=location, max_concurrent=4)


def test_a_restored_searcher_opens_the_study_where_this_driver_keeps_it(s3, tmp_path, monkeypatch):
    """Tune pickles the searcher; Ray's version pickles the open sqlite storage of the first driver's working
    directory, which a new head does not have. Here the pickle holds no storage: the searcher restored on head 2
    continues the study fetched from S3, and every write is copied back to S3."""
    head1, head2 = tmp_path / "head1", tmp_path / "head2"
    head1.mkdir(), head2.mkdir()
    monkeypatch.chdir(head1)
    first = _searcher(head1, SweepStorage.create(s3, "s").study())
    first.suggest("done")
    first.suggest("running")
    first.searcher.on_trial_complete("done", {MAP_KEY: 0.5, MEMORY_KEY: 1.0})
    first.save(str(tmp_path / "searcher.pkl"))
    tuner_pkl = pickle.dumps(first)
    shutil.rmtree(head1)  # the old head is gone

    monkeypatch.chdir(head2)
    study = SweepStorage.create(s3, "s").study()
    assert study.fetch_for_resume(has_trials=True)
    restored = pickle.loads(tuner_pkl)  # what Tuner.restore does with tuner.pkl: no database is opened
    restored.searcher.attach(study)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.searcher.on_trial_complete("running", {MAP_KEY: 0.25, MEMORY_KEY: 0.5})
    restored.suggest("new")

    expected = [(0, [0.5, 1.0], "COMPLETE"), (1, [0.25, 0.5], "COMPLETE"), (2, None, "RUNNING")]
    assert _trials(study.url) == expected
    copy = tmp_path / "from-s3.db"
    fs, key = filesystem_for(study.kept_at)
    copy.write_bytes(fs.open_input_stream(key).read())
    assert _trials(f"sqlite:///{copy}") == expected, "the copy in S3 is behind the study"


def test_restore_grows_the_search_to_a_larger_num_samples(tmp_path):
    from sweep.tuner import AtLeastSamples

    search = AtLeastSamples(
        _searcher(tmp_path, StudyLocation(f"sqlite:///{tmp_path / 'o.db'}", STUDY_NAME)), 5
    )
    search.set_state({"counter": 2, "total_samples": 2, "finished": False, "experiment": None})
    assert search.total_samples == 5 and not search.is_finished()
    search.set_state({"counter": 7, "total_samples": 7, "finished": False, "experiment": None})
    assert search.total_samples == 7, "a smaller --num-samples never shrinks a sweep"


# ------------------------------------------------------------------------------------------ --optuna-url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a SQLAlchemy database URL"),
        ("nosuchdb://host/db", "unknown database scheme 'nosuchdb'"),
        ("sqlite:////nonexistent-vladsweep-dir/sub/optuna.db", "cannot connect"),
    ],
)
def test_optuna_url_is_checked(url, expected):
    with pytest.raises(StorageError) as err:
        check_rdb_url(url)
    assert str(err.value).startswith(f"--optuna-url {url}" if "://" in url else f"--optuna-url {url!r}")
    assert expected in str(err.value)


def test_optuna_url_hides_the_password_and_names_a_missing_driver():
    pytest.importorskip("sqlalchemy")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        expected = "driver for 'postgresql' is not installed"
    else:  # with the driver: nothing listens on the port
        expected = "cannot connect"
    with pytest.raises(StorageError) as err:
        check_rdb_url(f"postgresql://u:secret@127.0.0.1:{free_port()}/db")
    assert "secret" not in str(err.value) and "--optuna-url postgresql://u:***@127.0.0.1" in str(err.value)
    assert expected in str(err.value)


def test_resume_must_keep_the_study_where_the_sweep_started_it(tmp_path):
    """A sweep records its study's place when it starts; ``--resume`` with another place (an ``--optuna-url``
    added, dropped or changed) is refused naming the one to pass, since it would continue an empty study."""
    import json

    from sweep.run import STARTED_FILE, UsageError, check_study_place

    storage = SweepStorage.create(str(tmp_path / "r"), "s")
    own, server = storage.study(), storage.study("postgresql://u:secret@db.example/sweeps")
    (tmp_path / "r" / "s").mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "r" / "s" / STARTED_FILE
    marker.write_text(json.dumps({"name": "s", "started": 0, "study": server.label}))
    check_study_place(storage, server)
    with pytest.raises(UsageError) as err:
        check_study_place(storage, own)
    assert "--optuna-url postgresql://u:***@db.example/sweeps" in str(err.value)
    assert "secret" not in str(err.value)
    marker.write_text(json.dumps({"name": "s", "started": 0, "study": own.label}))
    check_study_place(storage, own)
    with pytest.raises(
        UsageError, match=r"in the storage \(no --optuna-url\), not at --optuna-url postgresql"
    ):
        check_study_place(storage, server)
    marker.write_text(json.dumps({"name": "s", "started": 0}))  # started before the place was recorded
    check_study_place(storage, server)


def test_sweep_refuses_a_bad_optuna_url_before_ray_starts(tmp_path, tiny_space):
    url = "sqlite:////nonexistent-vladsweep-dir/sub/optuna.db"
    with private_ray_tmpdir() as ray_tmp:
        sweep = SweepProcess(
            [
                *sweep_args(tiny_space, tmp_path / "r", "bad-url", f"sqlite:///{tmp_path / 'mlflow.db'}"),
                "--optuna-url",
                url,
            ],
            tmp_path,
            ray_tmp,
        )
        code = sweep.wait(timeout=120)
        ray_sessions = list(ray_tmp.rglob("session_*"))
    assert code == 2, sweep.output()
    assert f"--optuna-url {url}: cannot connect" in sweep.stderr and "Traceback" not in sweep.stderr
    assert ray_sessions == [], "Ray started although the sweep was refused"
    assert not (tmp_path / "r" / "bad-url").exists(), "the refused sweep wrote to the storage"


@pytest.mark.slow
def test_a_sweep_with_an_optuna_url_keeps_the_study_there(tmp_path, sweep_storage, tiny_space):
    """A real sweep (one trial) with ``--optuna-url sqlite:///…``: the study is in that database, named after the
    sweep, and nothing is in the sweep folder."""
    db = tmp_path / "server.db"
    proc = run_sweep_cli(
        [
            *sweep_args(tiny_space, sweep_storage, "rdb-url", f"sqlite:///{tmp_path / 'mlflow.db'}"),
            "--num-samples",
            "1",
            "--optuna-url",
            f"sqlite:///{db}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = optuna.load_study(study_name="rdb-url", storage=f"sqlite:///{db}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert not (sweep_storage / "rdb-url" / STUDY_FILE).exists()
    assert not (tmp_path / LOCAL_STUDY_DIR).exists()


# ------------------------------------------------------------------------------------------ end to end on S3


@pytest.mark.slow
def test_resume_on_a_new_head_continues_the_study_kept_in_s3(s3, tmp_path, tiny_space):
    """Driver 1 (working folder W1) runs 2 trials with ``--storage s3://…``; W1's local study copy is then deleted
    (the head is gone). Driver 2 in W2 resumes with ``--num-samples 3``: the study fetched from S3 goes on (3
    trials, numbers 0-2, driver 1's two with their values), the base is not built again, driver 1's results are
    all still there."""
    from sweep.results import collect_rows

    w1, w2 = tmp_path / "W1", tmp_path / "W2"
    w1.mkdir(), w2.mkdir()
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the tracking server outlives the head
    args = sweep_args(
        tiny_space, s3, "s3-resume", mlflow_uri, "--max-concurrent", "1", experiment="s3-resume"
    )
    experiment_dir = f"{s3}/s3-resume"

    first = run_sweep_cli([*args, "--num-samples", "2"], cwd=w1)
    assert first.returncode == 0, first.stderr[-6000:]
    local1 = w1 / LOCAL_STUDY_DIR / "s3-resume.db"
    study1 = _trials(f"sqlite:///{local1}")
    assert [(n, s) for n, _, s in study1] == [(0, "COMPLETE"), (1, "COMPLETE")]
    copy = tmp_path / "from-s3.db"
    fs, key = filesystem_for(f"{experiment_dir}/{STUDY_FILE}")
    copy.write_bytes(fs.open_input_stream(key).read())
    assert _trials(f"sqlite:///{copy}") == study1, "the study's copy in S3 is not the end of driver 1's study"
    rows1 = {r["trial_id"]: r for r in collect_rows(experiment_dir)}
    parent1 = mlflow_record(mlflow_uri, "s3-resume").parent
    shutil.rmtree(w1)

    second = run_sweep_cli([*args, "--num-samples", "3", "--resume"], cwd=w2)
    assert second.returncode == 0, second.stderr[-6000:]
    assert "Optuna study fetched from" in second.stderr
    study2 = _trials(f"sqlite:///{w2 / LOCAL_STUDY_DIR / 's3-resume.db'}")
    assert [(n, s) for n, _, s in study2] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert study2[:2] == study1, "driver 1's trials changed in the study"

    rows2 = {r["trial_id"]: r for r in collect_rows(experiment_dir)}
    assert len(rows2) == 3 and set(rows1) <= set(rows2)
    for trial_id, row in rows1.items():
        assert row["status"] == "ok" and rows2[trial_id]["status"] == "ok"
        assert rows2[trial_id][MAP_KEY] == row[MAP_KEY] and rows2[trial_id][MEMORY_KEY] == row[MEMORY_KEY]
    record = mlflow_record(mlflow_uri, "s3-resume")
    assert len(record.children) == 3
    assert record.parent.info.run_id == parent1.info.run_id
    assert record.parent.data.tags["base_builds"] == parent1.data.tags["base_builds"] == "1", (
        "the base in S3 was built again on resume"
    )
    assert "base model ready" in second.stderr and "(cached)" in second.stderr
