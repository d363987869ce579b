"""Where a sweep keeps its state: the Ray results (experiment dir), the cached base model and the Optuna study.

A sweep's storage is a local path (a shared NFS mount on a cluster) or a URI that pyarrow understands (``s3://``,
``gs://``). Ray's experiment state and trial checkpoints live under ``<storage>/<name>/``; the base model under
``<storage>/_base/<config key>/``, shared by every sweep of that storage with the same base config. The Optuna
study is an sqlite file, which cannot live on an object store, so for a URI storage it stays on the head's disk
beside the working directory.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """The sweep's storage cannot be used; the message names the path and the reason."""


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


@dataclass(frozen=True)
class SweepStorage:
    """Paths of one sweep (``root`` is ``--storage``, ``name`` is ``--name``)."""

    root: str
    name: str

    @classmethod
    def create(cls, root: str, name: str) -> SweepStorage:
        if not is_uri(root):
            root = os.path.abspath(os.path.expanduser(root.removeprefix("file://")))
        return cls(root=root, name=name)

    @property
    def experiment_dir(self) -> str:
        return f"{self.root.rstrip('/')}/{self.name}"

    @property
    def is_local(self) -> bool:
        return not is_uri(self.root)

    def base_dir(self, key: str) -> str:
        # Beside the sweeps, not inside one: sweeps over the same base config in this storage share the build.
        return f"{self.root.rstrip('/')}/_base/{key}"

    @property
    def optuna_url(self) -> str:
        if self.is_local:
            path = Path(self.experiment_dir) / "optuna.db"
        else:
            path = Path.cwd() / "vladsweep_optuna" / f"{self.name}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    def has_experiment(self) -> bool:
        """True when Ray already wrote experiment state here (a sweep to ``--resume``)."""
        fs, path = filesystem_for(self.experiment_dir)
        return fs.get_file_info(f"{path}/experiment_state.json").type != pafs.FileType.NotFound or any(
            info.base_name.startswith("experiment_state")
            for info in _list(fs, path)
            if info.type == pafs.FileType.File
        )

    def check_writable(self) -> None:
        """Write and delete a probe file, so a bad ``--storage`` fails before any trial starts."""
        fs, path = filesystem_for(self.experiment_dir)
        probe = f"{path}/.write-probe-{uuid.uuid4().hex}"
        try:
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(probe) as stream:
                stream.write(b"ok")
            fs.delete_file(probe)
        except Exception as exc:  # pyarrow raises OSError, PermissionError, ArrowInvalid …
            raise StorageError(
                f"--storage {self.root!r}: cannot write to {self.experiment_dir!r} ({exc}). "
                "Pass a writable local folder, a shared NFS path or an s3:// URI you can write to."
            ) from exc


def filesystem_for(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def _list(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []


def exists(location: str) -> bool:
    fs, path = filesystem_for(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload_dir(local_dir: Path, location: str) -> None:
    """Copy a finished local folder to ``location`` (a no-op when they are the same local folder)."""
    fs, path = filesystem_for(location)
    if isinstance(fs, pafs.LocalFileSystem) and Path(path).resolve() == Path(local_dir).resolve():
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, destination_filesystem=fs)
