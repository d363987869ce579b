"""A database of images indexed for one model: a faiss ``IndexFlatIP`` over its descriptors, cached on disk.

`open_index(model, database, image_size, model_key)` lists the images under ``database`` (recursively, so a folder
of images and a dataset root such as ``oxford5k/`` both work), and returns a `DatabaseIndex` to search. The index is
kept beside the database in ``<database>/.vladsweep-index/<model_key[:16]>-s<image_size>.faiss`` with a JSON
manifest (each row's relative path, mtime and size). The next call with the same model and image size reuses it;
when files were added, changed or removed only those are described again (the kept rows are read back from the
index) and the cache is rewritten. When the database folder is not writable the cache goes under
``$VLADSWEEP_CACHE/index`` (default ``~/.cache/vladsweep/index``, see `trainables.fileio.user_cache_dir`) instead.

Nothing here unpickles: faiss's own binary format for the vectors, JSON for the rest. The manifest carries the
sha256 of the index file, so a damaged or mismatched pair is rebuilt rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import nn

from trainables.data.images import ImageReadError
from trainables.fileio import atomic_write, file_sha256, user_cache_dir
from trainables.retrieval.extract import extract_descriptors

__all__ = [
    "CACHE_DIRNAME",
    "IMAGE_EXTENSIONS",
    "DatabaseIndex",
    "IndexBuildError",
    "cache_location",
    "describe_query",
    "list_images",
    "open_index",
]

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".vladsweep-index"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
MANIFEST_FORMAT = "vladsweep-index"
MANIFEST_VERSION = 1


class IndexBuildError(RuntimeError):
    """The database cannot be indexed (no images, nothing readable); the message names the folder."""


def list_images(database: str | os.PathLike) -> list[Path]:
    """Image files under ``database``, recursively, sorted by relative path; hidden files and folders skipped."""
    root = Path(database)
    if not root.is_dir():
        raise IndexBuildError(f"database {root} is not a folder (give a folder of images or a dataset root)")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders hold caches (ours included) and VCS data, never database images.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def cache_location(database: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder for the database's index files: ``cache_dir`` when given, else ``<database>/.vladsweep-index``,
    else (database not writable) a per-database folder under the user cache."""
    if cache_dir is not None:
        path = Path(cache_dir)
        if not _writable_dir(path):
            raise IndexBuildError(f"index folder {path} is not writable; pass another --index-dir")
        return path
    root = Path(database).resolve()
    beside = root / CACHE_DIRNAME
    if _writable_dir(beside):
        return beside
    fallback = user_cache_dir("index", hashlib.sha256(str(root).encode()).hexdigest()[:16])
    if not _writable_dir(fallback):
        raise IndexBuildError(
            f"cannot write an index cache beside {root} nor in {fallback}; pass a writable --index-dir"
        )
    log.info("database folder %s is not writable; caching its index in %s", root, fallback)
    return fallback


@dataclass
class DatabaseIndex:
    """Row ``i`` of ``index`` describes ``paths[i]``; vectors are unit length, so scores are cosine similarities."""

    database: Path
    paths: list[Path]
    index: faiss.Index
    location: Path
    #: How this call got the rows: described now vs read back from the cache.
    extracted: int = 0
    reused: int = 0
    skipped: list[Path] = field(default_factory=list)

    def search(self, descriptors: np.ndarray, top_k: int = 10) -> list[list[tuple[Path, float]]]:
        """Per query descriptor, the ``top_k`` best ``(path, score)`` pairs, best first."""
        q = np.array(np.atleast_2d(descriptors), dtype=np.float32, order="C", copy=True)
        if q.shape[1] != self.index.d:
            raise ValueError(f"query descriptors have dimension {q.shape[1]}, the index {self.index.d}")
        if top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        faiss.normalize_L2(q)
        scores, rows = self.index.search(q, min(int(top_k), self.index.ntotal))
        return [
            [(self.paths[r], float(s)) for r, s in zip(row, score) if r >= 0]
            for row, score in zip(rows, scores)
        ]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _read_cache(manifest_path: Path, index_path: Path, model_key: str, image_size: int):
    """(manifest, index) of a usable cache, or None (absent, another model, damaged: all mean rebuild)."""
    if not (manifest_path.is_file() and index_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        ok = (
            manifest.get("format") == MANIFEST_FORMAT
            and manifest.get("version") == MANIFEST_VERSION
            and manifest.get("model_sha256") == model_key
            and manifest.get("image_size") == image_size
            and manifest.get("index_sha256") == file_sha256(index_path)
        )
        if not ok:
            log.info("index cache %s belongs to another model or is damaged; rebuilding it", index_path)
            return None
        index = faiss.read_index(str(index_path))
        if index.ntotal != len(manifest["files"]):
            log.info("index cache %s does not match its manifest; rebuilding it", index_path)
            return None
        return manifest, index
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.info("index cache %s is unreadable (%s); rebuilding it", index_path, exc)
        return None


def open_index(
    model: nn.Module,
    database: str | os.PathLike,
    image_size: int,
    model_key: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> DatabaseIndex:
    """The index of ``database`` for ``model`` at ``image_size``: from the cache when it is current, else built.

    ``model_key`` identifies the model (`file_sha256` of its artifact): a cache made by another model is never
    reused. Unreadable images are left out with a warning (and not retried until they change on disk).
    """
    root = Path(database)
    images = list_images(root)
    if not images:
        raise IndexBuildError(
            f"no images under {root} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    location = cache_location(root, cache_dir)
    stem = f"{model_key[:16]}-s{image_size}"
    index_path, manifest_path = location / f"{stem}.faiss", location / f"{stem}.json"

    current = {p.relative_to(root).as_posix(): _stat(p) for p in images}
    cached = _read_cache(manifest_path, index_path, model_key, image_size)
    old_rows: dict[str, int] = {}
    old_skipped: set[str] = set()
    old_index = None
    if cached is not None:
        manifest, old_index = cached
        old_rows = {
            f["path"]: i
            for i, f in enumerate(manifest["files"])
            if current.get(f["path"]) == (f["mtime_ns"], f["size"])
        }
        old_skipped = {
            f["path"]
            for f in manifest.get("skipped", [])
            if current.get(f["path"]) == (f["mtime_ns"], f["size"])
        }
        if len(old_rows) == len(manifest["files"]) == len(current) - len(old_skipped):
            log.info("index: reused %s (%d images)", index_path, len(old_rows))
            return DatabaseIndex(
                root,
                [root / f["path"] for f in manifest["files"]],
                old_index,
                index_path,
                reused=len(old_rows),
                skipped=[root / p for p in sorted(old_skipped)],
            )

    todo = [rel for rel in current if rel not in old_rows and rel not in old_skipped]
    t0 = time.monotonic()
    fresh = np.zeros((0, 0), dtype=np.float32)
    if todo:
        try:
            fresh = extract_descriptors(
                model,
                [root / rel for rel in todo],
                image_size,
                batch_size=batch_size,
                device=device,
                progress=progress,
                skip_unreadable=True,
                desc="database",
            )
        except ImageReadError:  # every new file is unreadable: they are skipped like any unreadable file
            fresh = np.full((len(todo), 1), np.nan, dtype=np.float32)
    rows: list[str] = []
    vectors: list[np.ndarray] = []
    skipped = set(old_skipped)
    fresh_row = {rel: i for i, rel in enumerate(todo)}
    for rel in current:  # keep the sorted listing order, whatever came from where
        if rel in old_rows:
            rows.append(rel)
            vectors.append(old_index.reconstruct(old_rows[rel]))
        elif rel in fresh_row:
            vec = fresh[fresh_row[rel]]
            if np.isnan(vec).any():
                skipped.add(rel)
                continue
            rows.append(rel)
            vectors.append(vec)
    if not rows:
        raise IndexBuildError(f"none of the {len(current)} images under {root} could be read")
    matrix = np.ascontiguousarray(np.stack(vectors), dtype=np.float32)
    faiss.normalize_L2(matrix)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)

    # Atomic writes: a concurrent reader sees the old pair or the new files, never half of one.
    atomic_write(index_path, lambda tmp: faiss.write_index(index, str(tmp)))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "model_sha256": model_key,
        "image_size": image_size,
        "database": str(root.resolve()),
        "dim": int(matrix.shape[1]),
        "index_sha256": file_sha256(index_path),
        "files": [{"path": rel, "mtime_ns": current[rel][0], "size": current[rel][1]} for rel in rows],
        "skipped": [
            {"path": rel, "mtime_ns": current[rel][0], "size": current[rel][1]} for rel in sorted(skipped)
        ],
    }
    atomic_write(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    extracted = len(todo) - len(skipped - old_skipped)
    log.info(
        "index: built %s (%d images: extracted %d in %.1f s, reused %d%s)",
        index_path,
        len(rows),
        extracted,
        time.monotonic() - t0,
        len(old_rows),
        f", skipped {len(skipped)} unreadable" if skipped else "",
    )
    return DatabaseIndex(
        root,
        [root / rel for rel in rows],
        index,
        index_path,
        extracted=extracted,
        reused=len(old_rows),
        skipped=[root / p for p in sorted(skipped)],
    )


def describe_query(
    model: nn.Module,
    image: str | os.PathLike,
    image_size: int,
    bbox: Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The (1, d) descriptor of one query image, cropped to ``bbox`` (x1 y1 x2 y2) first when given."""
    return extract_descriptors(
        model, [image], image_size, bbxs=[bbox] if bbox is not None else None, device=device, progress=False
    )
