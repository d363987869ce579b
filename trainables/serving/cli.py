"""The command line that serves a released model: ``python -m trainables.serving``.

``python -m trainables.serving --model MODEL --database DIR --query IMAGE [--top-k K]`` loads a compressed artifact
(a file, or a registry URI ``models:/NAME@ALIAS``), indexes the images under ``DIR`` (cached, see
:mod:`trainables.serving.index`) and prints the ``K`` most similar with their cosine scores. ``--evaluate DATASET``
instead reports the model's mAP on a benchmark with exactly the protocol the sweep's trials use
(`trainables.retrieval.evaluate.evaluate_dataset` at the artifact's image size), so it equals the trial's mAP.

Nothing is decoded before it is trusted (`trainables.serving.trust`, docs/release.md): a registry model's sha256 must
equal the one `sweep.release` recorded on its version, a plain file's the one given with ``--sha256``, and with
``--verify-key PUB`` the file must carry a valid ed25519 signature (``FILE.sig`` beside it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from trainables.contract import ARTIFACT_FILE
from trainables.fileio import file_sha256
from trainables.serving.trust import (
    ARTIFACT_SHA256_TAG,
    TrustError,
    check_sha256,
    key_fingerprint,
    load_public_key,
    parse_sha256,
    verify_signature,
)

__all__ = ["ModelSpecError", "build_parser", "main", "resolve_model"]

log = logging.getLogger(__name__)


class ModelSpecError(ValueError):
    """``--model`` names nothing loadable; the message says what was looked up and where."""


def _artifact_in(folder: Path, spec: str) -> Path:
    """The compressed file inside a downloaded or given folder: `ARTIFACT_FILE`, else the only one."""
    preferred = folder / ARTIFACT_FILE
    if preferred.is_file():
        return preferred
    found = sorted(folder.rglob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    listing = ", ".join(p.relative_to(folder).as_posix() for p in found) or "none"
    raise ModelSpecError(
        f"--model {spec}: expected one compressed .safetensors file in {folder}, found {listing}"
    )


def resolve_model(spec: str, tracking_uri: str | None, workdir: str | os.PathLike) -> tuple[Path, str]:
    """``(local artifact file, how it was found)`` for ``--model``: a file, a folder holding one, or an MLflow
    URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN/model``) downloaded into ``workdir``.

    A registered version's file must have the sha256 recorded on the version (tag `ARTIFACT_SHA256_TAG`, written by
    ``sweep.release``): a mismatch or a missing record raises `TrustError`, naming both hashes and the version,
    before anything reads the file further. A ``runs:/`` URI is not a release: it has no record to check."""
    if not re.match(r"^[a-z][a-z0-9+.-]*:/", spec):
        path = Path(spec)
        if path.is_dir():
            return _artifact_in(path, spec), str(path)
        if not path.is_file():
            raise ModelSpecError(
                f"--model {spec}: no such file (give a compressed .safetensors file or models:/NAME@ALIAS)"
            )
        return path, str(path)

    # Lazy import: only a registry or run URI (models:/NAME@ALIAS, runs:/...) needs MLflow. Serving a plain file
    # starts without it (MLflow is slow to import), and the library under trainables/ stays MLflow-free.
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError as exc:  # pragma: no cover - mlflow is a dependency; a trimmed install may lack it
        raise ModelSpecError(
            f"--model {spec}: resolving an MLflow URI needs the mlflow package ({exc})"
        ) from exc

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():  # MLflow would silently create an empty store and then report "model not found"
            raise ModelSpecError(
                f"--model {spec}: no MLflow store at {db.resolve()} (from --mlflow-uri {uri}); pass the sweep's "
                "--mlflow-uri"
            )
    # download_artifacts resolves models:/ through the global registry URI, so set both for this process; its
    # progress bar is noise for one small file.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    label, mv, download = spec, None, spec
    try:
        alias = re.fullmatch(r"models:/([^/@]+)@([^/]+)", spec)
        number = re.fullmatch(r"models:/([^/@]+)/(\d+)", spec)
        if alias:
            mv = mlflow.MlflowClient(uri, uri).get_model_version_by_alias(alias[1], alias[2])
        elif number:
            mv = mlflow.MlflowClient(uri, uri).get_model_version(number[1], number[2])
        elif spec.startswith("models:/"):
            raise ModelSpecError(
                f"--model {spec}: give models:/NAME@ALIAS or models:/NAME/VERSION, the forms whose file can be "
                "checked against the sha256 its release recorded"
            )
        if mv is not None:
            label = f"{spec} (version {mv.version}, run {mv.run_id})"
            # The version, not the alias: an alias moved between the lookup and the download must not swap the file.
            download = f"models:/{mv.name}/{mv.version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=download, dst_path=str(workdir)))
    except MlflowException as exc:
        raise ModelSpecError(f"--model {spec}: {exc.message} (MLflow at {uri})") from exc
    path = _artifact_in(local, spec) if local.is_dir() else local
    if mv is not None:
        record = f"the release record of version {mv.version} of {mv.name!r} (tag {ARTIFACT_SHA256_TAG})"
        recorded = mv.tags.get(ARTIFACT_SHA256_TAG)
        if not recorded:
            raise TrustError(
                f"{label}: version {mv.version} of {mv.name!r} has no {ARTIFACT_SHA256_TAG} tag, so its file "
                f"(sha256 {file_sha256(path)}) cannot be checked against a release; refusing it. Register it "
                "with `python -m sweep.release`, which records the sha256."
            )
        check_sha256(file_sha256(path), recorded, label, record)
    return path, label


def _image_size(model, override: int | None, path: Path) -> int:
    if override is not None:
        return override
    meta = getattr(model, "compression_meta", {}).get("meta", {})
    size = meta.get("base", {}).get("image_size") if isinstance(meta.get("base"), dict) else None
    if not isinstance(size, int) or size < 1:
        raise ModelSpecError(
            f"{path}: the artifact's meta has no base.image_size (the sweep records it); pass --image-size"
        )
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainables.serving",
        description="Serve a compressed NetVLAD model: rank a folder of images for a query image, or measure the "
        "model's mAP on a benchmark (the protocol of the sweep's trials).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="compressed artifact: a .safetensors file, a folder with one, or models:/NAME@ALIAS (MLflow registry)",
    )
    p.add_argument(
        "--mlflow-uri",
        default=None,
        help="tracking/registry URI for models:/ (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--database",
        type=Path,
        help="folder of images (searched recursively) or a dataset root, to search in",
    )
    mode.add_argument(
        "--evaluate", metavar="DATASET", help="report mAP on this dataset, e.g. synthetic-test, oxford5k"
    )
    p.add_argument(
        "--query", type=Path, help="query image (with --database); without it the index is only built"
    )
    p.add_argument(
        "--bbox", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"), help="crop the query first"
    )
    p.add_argument("--top-k", type=int, default=10, help="how many database images to print")
    p.add_argument("--data-root", default=None, help="folder holding the datasets for --evaluate (real data)")
    p.add_argument(
        "--image-size", type=int, default=None, help="longest image side (default: the artifact's)"
    )
    p.add_argument(
        "--index-dir", type=Path, default=None, help="where to cache the index (default: beside the database)"
    )
    p.add_argument(
        "--sha256",
        type=_hex_sha256,
        metavar="HEX",
        default=None,
        help="refuse the file unless its sha256 is HEX (for a plain file; a models:/ URI is always checked against "
        "its release record)",
    )
    p.add_argument(
        "--verify-key",
        metavar="PUBFILE",
        default=None,
        help="refuse the file unless FILE.sig beside it is its ed25519 signature by this PEM public key "
        "(sweep.release --sign; docs/release.md)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="only the results (no progress lines on stderr)"
    )
    return p


def _hex_sha256(value: str) -> str:
    try:
        return parse_sha256(value, "--sha256")
    except TrustError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module doc); 0 on success, 2 with ``error: …`` on stderr for bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.query is None and args.bbox is not None:
        parser.error("--bbox crops the query: give --query IMAGE too")
    if args.evaluate is not None and args.query is not None:
        parser.error("--query goes with --database; --evaluate uses the dataset's own queries")
    if args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: must be at least 1")
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size {args.image_size}: must be at least 1")

    # Heavy imports after argument checks, so `--help` and usage errors answer at once. faiss comes before torch:
    # both bring OpenMP (docs/traps.md).
    import faiss  # noqa: F401

    from trainables.compression.codec import CodecError, load_compressed
    from trainables.data.images import ImageReadError
    from trainables.data.oxford import DatasetError
    from trainables.serving.index import IndexBuildError, describe_query, open_index

    # Only now: faiss's loader logs its CPU-feature probing at INFO on import, which is not the CLI's output.
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="vladsweep-model-") as work:
        try:
            # The key first: a bad --verify-key is reported before anything is downloaded.
            key = load_public_key(args.verify_key) if args.verify_key else None
            path, label = resolve_model(
                args.model, args.mlflow_uri, work
            )  # checks a release's recorded sha256
            sha = file_sha256(path)
            checks = ["sha256 matches the release record"] if args.model.startswith("models:/") else []
            if args.sha256 is not None:
                check_sha256(sha, args.sha256, label, "--sha256")
                checks.append("sha256 matches --sha256")
            if key is not None:
                sig = verify_signature(path, sha, key, args.verify_key)
                checks.append(f"signature {sig.name} by {key_fingerprint(key)}")
            # Only a file trusted above is decoded; decoding verifies every checksum first, so a damaged one never
            # runs either.
            model = load_compressed(path)
            image_size = _image_size(model, args.image_size, path)
        except (ModelSpecError, TrustError, CodecError, OSError) as exc:
            return _fail(str(exc))
    log.info("model: %s; sha256 %s…, image_size %d", label, sha[:16], image_size)
    if checks:
        log.info("trusted: %s", "; ".join(checks))

    if args.evaluate is not None:
        from trainables.data.registry import load_dataset
        from trainables.retrieval.evaluate import evaluate_dataset

        try:
            dataset = load_dataset(args.evaluate, args.data_root)
            result = evaluate_dataset(
                model, dataset, image_size, device=args.device, batch_size=args.batch_size
            )
        except (ValueError, DatasetError, ImageReadError) as exc:
            return _fail(str(exc))
        record = {
            "dataset": args.evaluate,
            "image_size": image_size,
            "queries": len(dataset.queries),
            "database": len(dataset.images),
            **result,
        }
        if args.json:
            print(json.dumps(record))
        else:
            extra = "".join(f"  {k} {v:.6f}" for k, v in result.items() if k != "mAP")
            print(
                f"{args.evaluate}: mAP {result['mAP']:.6f}{extra}  ({record['queries']} queries, "
                f"{record['database']} database images, image_size {image_size})"
            )
        return 0

    try:
        db = open_index(
            model,
            args.database,
            image_size,
            sha,
            cache_dir=args.index_dir,
            device=args.device,
            batch_size=args.batch_size,
        )
        if args.query is None:
            print(f"indexed {len(db.paths)} images of {args.database}: {db.location}")
            return 0
        hits = db.search(describe_query(model, args.query, image_size, args.bbox, args.device), args.top_k)[0]
    except (IndexBuildError, ImageReadError, ValueError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps([{"rank": i, "score": s, "image": str(p)} for i, (p, s) in enumerate(hits, 1)]))
    else:
        print(f"{'rank':>4}  {'score':>7}  image")
        for i, (p, s) in enumerate(hits, 1):
            print(f"{i:>4}  {s:>7.4f}  {p}")
    return 0
