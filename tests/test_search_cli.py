"""Serving: ``python -m trainables.serving`` on a small folder of synthetic images with a real artifact.

Covers the top-k output, the index cache (built once, reused, updated for new files, per model, and its fallback
when the database folder cannot hold it), a tampered artifact refused with the codec's error, and ``--evaluate``
returning exactly `evaluate_dataset`'s mAP (the number a sweep's trial logs), and the trust checks of a plain file
(``--sha256``, ``--verify-key`` with keys made in the test's folder, and the openssl one-liners of docs/release.md).
The CLI runs as a subprocess where
the process boundary matters (output, exit status, caching across runs); the rest calls `main()` in this process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_artifacts import IMAGE_SIZE, copy_images, tiny_artifact

from trainables.compression.codec import load_compressed
from trainables.contract import ARTIFACT_FILE
from trainables.data.registry import load_dataset
from trainables.data.synthetic import ensure_synthetic
from trainables.fileio import file_sha256
from trainables.retrieval.evaluate import evaluate_dataset
from trainables.serving import cli as serving
from trainables.serving import trust
from trainables.serving.index import CACHE_DIRNAME, list_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_jpg() -> Path:
    return ensure_synthetic() / "test" / "jpg"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / ARTIFACT_FILE
    tiny_artifact(path, bits=4, sparsity=0.5)
    return path


@pytest.fixture
def database(tmp_path, synthetic_jpg) -> Path:
    names = sorted(p.name for p in synthetic_jpg.glob("*.jpg"))[::12][:24]
    copy_images(synthetic_jpg, tmp_path / "db", names)
    return tmp_path / "db"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic as the test process (one torch thread)
    return subprocess.run(
        [sys.executable, "-m", "trainables.serving", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.faiss"))


def test_list_images_is_recursive_and_skips_hidden(tmp_path, synthetic_jpg):
    copy_images(synthetic_jpg, tmp_path, sorted(p.name for p in synthetic_jpg.glob("*.jpg"))[:3])
    (tmp_path / ".hidden").mkdir()
    shutil.copy(next(synthetic_jpg.glob("*.jpg")), tmp_path / ".hidden" / "x.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert len(found) == 3 and found == sorted(found)
    assert {f.split("/")[0] for f in found} == {"a", "b"}


def test_top_k_output_and_the_cache_is_built_then_reused(artifact, database, tmp_path, caplog):
    query = sorted(database.rglob("*.jpg"))[5]
    first = cli("--model", artifact, "--database", database, "--query", query, "--top-k", "5", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "image"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0][2] == str(query) and rows[0][1] == "1.0000", "an image in the database finds itself first"
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "index: built" in first.stderr and "extracted 24" in first.stderr
    assert f"image_size {IMAGE_SIZE}" in first.stderr, "the image size comes from the artifact's meta"
    [index_file] = cache_files(database / CACHE_DIRNAME)
    assert index_file.name.startswith(file_sha256(artifact)[:16])
    built_at = index_file.stat().st_mtime_ns

    second = cli(
        "--model", artifact, "--database", database, "--query", query, "--top-k", "5", "--json", cwd=tmp_path
    )
    assert second.returncode == 0, second.stderr
    assert "index: reused" in second.stderr and "extracted" not in second.stderr
    assert index_file.stat().st_mtime_ns == built_at, "a current cache is not rewritten"
    hits = json.loads(second.stdout)
    assert [h["image"] for h in hits] == [r[2] for r in rows]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)

    # A new file: only it is described; the other rows come back from the cache. It then finds itself.
    new = database / "b" / "new.jpg"
    shutil.copy(sorted(database.rglob("*.jpg"))[0], new)
    os.utime(new, ns=(built_at + 10**9, built_at + 10**9))
    caplog.set_level(logging.INFO, logger="trainables.serving.index")
    assert (
        serving.main(["--model", str(artifact), "--database", str(database), "--query", str(new), "--json"])
        == 0
    )
    assert any("extracted 1 " in r.getMessage() and "reused 24" in r.getMessage() for r in caplog.records)
    assert index_file.stat().st_mtime_ns != built_at
    manifest = json.loads(index_file.with_suffix(".json").read_text())
    assert len(manifest["files"]) == 25 and "b/new.jpg" in [f["path"] for f in manifest["files"]]


def test_another_model_gets_its_own_cache(artifact, database, tmp_path, caplog, capsys):
    other = tmp_path / "other.vlad.safetensors"
    tiny_artifact(other, bits=2, sparsity=0.7)
    caplog.set_level(logging.INFO, logger="trainables.serving.index")
    for model in (artifact, other):
        assert serving.main(["--model", str(model), "--database", str(database), "-q"]) == 0
    names = {p.name[:16] for p in cache_files(database / CACHE_DIRNAME)}
    assert names == {file_sha256(artifact)[:16], file_sha256(other)[:16]}
    assert sum("index: built" in r.getMessage() for r in caplog.records) == 2
    assert "indexed 24 images" in capsys.readouterr().out


def test_unwritable_database_caches_in_the_user_cache(artifact, database, tmp_path, monkeypatch, caplog):
    # Tests run as root here, where a read-only mode does not stop writes; a plain file where the cache folder would
    # go makes the folder impossible to create for any user.
    (database / CACHE_DIRNAME).write_text("in the way")
    monkeypatch.setenv("VLADSWEEP_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="trainables.serving.index")
    assert serving.main(["--model", str(artifact), "--database", str(database), "-q"]) == 0
    [index_file] = list((tmp_path / "cache" / "index").rglob("*.faiss"))
    assert any("not writable" in r.getMessage() for r in caplog.records)
    built_at = index_file.stat().st_mtime_ns
    caplog.clear()
    assert serving.main(["--model", str(artifact), "--database", str(database), "-q"]) == 0
    assert any("index: reused" in r.getMessage() for r in caplog.records)
    assert index_file.stat().st_mtime_ns == built_at


def test_tampered_artifact_is_refused(artifact, database, tmp_path):
    bad = tmp_path / "tampered.vlad.safetensors"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of the payload
    bad.write_bytes(bytes(data))
    proc = cli("--model", bad, "--database", database, "--query", next(database.rglob("*.jpg")), cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("error: ") and str(bad) in proc.stderr and "checksum mismatch" in proc.stderr
    )
    assert proc.stdout == "" and not (database / CACHE_DIRNAME).exists(), "nothing ran on the tampered file"


def test_evaluate_equals_evaluate_dataset(artifact, tmp_path):
    proc = cli("--model", artifact, "--evaluate", "synthetic-test", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    served = json.loads(proc.stdout)
    # What trainables/pipeline.py logs as the trial's mAP: the decoded file, the test split, the base image size.
    logged = evaluate_dataset(load_compressed(artifact), load_dataset("synthetic-test"), IMAGE_SIZE)["mAP"]
    assert served["mAP"] == logged
    assert served["image_size"] == IMAGE_SIZE and served["queries"] == len(
        load_dataset("synthetic-test").queries
    )


def test_bad_inputs_exit_2_with_the_reason(artifact, database, tmp_path, capsys):
    def run(*args) -> str:
        assert serving.main([str(a) for a in args]) == 2
        return capsys.readouterr().err

    assert "no such file" in run("--model", tmp_path / "missing.safetensors", "--database", database)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"no images under {empty}" in run("--model", artifact, "--database", empty)
    no_size = tmp_path / "no-size.vlad.safetensors"
    tiny_artifact(no_size, image_size=None)
    assert "pass --image-size" in run("--model", no_size, "--database", database)
    assert (
        "cannot" in run("--model", artifact, "--database", database, "--query", tmp_path / "nope.jpg").lower()
    )
    assert "unknown dataset 'nope'" in run("--model", artifact, "--evaluate", "nope")
    store = tmp_path / "absent.db"
    err = run("--model", "models:/x@release", "--mlflow-uri", f"sqlite:///{store}", "--database", database)
    assert "no MLflow store" in err and not store.exists()
    for args in (
        ["--database", database, "--bbox", "0", "0", "5", "5"],
        ["--evaluate", "x", "--query", "q.jpg"],
    ):
        with pytest.raises(SystemExit):
            serving.main(["--model", str(artifact), *map(str, args)])


# --- Trust: a plain file checked with --sha256, and ed25519 signatures (--verify-key) -------------------------------


def make_keys(folder: Path, name: str = "release-key") -> tuple[Path, Path]:
    """A fresh ed25519 key pair as PEM files (private PKCS#8, public SubjectPublicKeyInfo), as docs/release.md
    makes them with Python."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign_file(path: Path, private: Path) -> Path:
    """Write ``path``'s detached signature, exactly as ``sweep.release --sign`` does."""
    sig = trust.signature_path(path)
    sig.write_bytes(trust.sign_sha256(trust.load_private_key(private), file_sha256(path)))
    return sig


def test_sha256_flag_refuses_another_file_before_decoding_it(artifact, database, tmp_path, capsys, caplog):
    # Another valid artifact (its own checksums all correct): only the sha256 can tell it is not the released one.
    other = tmp_path / "other.vlad.safetensors"
    tiny_artifact(other, bits=2, sparsity=0.7, seed=3)
    want, got = file_sha256(artifact), file_sha256(other)
    assert serving.main(["--model", str(other), "--sha256", want, "--database", str(database), "-q"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ") and str(other) in err and want in err and got in err and "--sha256" in err
    )
    assert not (database / CACHE_DIRNAME).exists(), "nothing ran on the refused file"

    # The right hash (any case) serves, and says what was checked.
    caplog.set_level(logging.INFO, logger=serving.__name__)
    assert (
        serving.main(["--model", str(artifact), "--sha256", want.upper(), "--database", str(database)]) == 0
    )
    assert "trusted: sha256 matches --sha256" in caplog.text
    with pytest.raises(SystemExit):  # not a sha256 at all: a usage error
        serving.main(["--model", str(artifact), "--sha256", "abc", "--database", str(database)])
    assert "not a sha256 (64 hex digits)" in capsys.readouterr().err


def test_verify_key_refuses_unsigned_and_wrongly_signed_files(artifact, database, tmp_path, capsys, caplog):
    private, public = make_keys(tmp_path)
    _, other_public = make_keys(tmp_path, "someone-else")
    model = tmp_path / "travel" / ARTIFACT_FILE
    model.parent.mkdir()
    shutil.copy(artifact, model)

    def refused(*extra: str) -> str:
        args = ["--model", str(model), "--database", str(database), "-q", *extra]
        assert serving.main(args) == 2
        return capsys.readouterr().err

    err = refused("--verify-key", str(public))
    assert "unsigned" in err and f"{ARTIFACT_FILE}.sig" in err and str(model) in err

    sig = sign_file(model, private)
    assert sig == model.with_name(ARTIFACT_FILE + ".sig") and len(sig.read_bytes()) == 64
    err = refused("--verify-key", str(other_public))
    assert "wrongly signed" in err and str(other_public) in err
    assert trust.key_fingerprint(trust.load_public_key(other_public)) in err
    assert "private key" in refused("--verify-key", str(private)), "the private half is named as the mistake"
    assert "cannot read" in refused("--verify-key", str(tmp_path / "missing.pem"))

    # The signature travels with the file: it verifies, and the log names the key.
    caplog.set_level(logging.INFO, logger=serving.__name__)
    assert (
        serving.main(["--model", str(model), "--verify-key", str(public), "--database", str(database)]) == 0
    )
    fingerprint = trust.key_fingerprint(trust.load_public_key(public))
    assert f"signature {sig.name} by {fingerprint}" in caplog.text

    # A file swapped under a kept signature (a valid artifact, checksums and all) is wrongly signed; so is a
    # truncated signature.
    tiny_artifact(model, bits=2, sparsity=0.7, seed=4)
    assert "wrongly signed" in refused("--verify-key", str(public))
    sign_file(model, private)
    sig.write_bytes(sig.read_bytes()[:40])
    assert "not an ed25519 signature" in refused("--verify-key", str(public))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command line is not installed")
def test_openssl_keys_and_signatures_interoperate(artifact, tmp_path):
    """The openssl one-liners of docs/release.md make keys the release and serving read, and openssl verifies
    the signature the release writes."""
    private, public = tmp_path / "release-key.pem", tmp_path / "release-key.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", private], check=True)
    subprocess.run(["openssl", "pkey", "-in", private, "-pubout", "-out", public], check=True)
    model = tmp_path / ARTIFACT_FILE
    shutil.copy(artifact, model)
    sig = sign_file(model, private)
    trust.verify_signature(model, file_sha256(model), trust.load_public_key(public), str(public))
    digest = tmp_path / "digest.bin"
    subprocess.run(["openssl", "dgst", "-sha256", "-binary", "-out", digest, model], check=True)
    ok = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            public,
            "-rawin",
            "-in",
            digest,
            "-sigfile",
            sig,
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stdout + ok.stderr
