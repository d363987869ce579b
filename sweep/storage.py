"""Where a sweep keeps its state: the Ray results (experiment dir), the cached base model and the Optuna study.

A sweep's storage is a local path (a shared NFS mount on a cluster) or a URI that pyarrow understands (``s3://``,
``gs://``). Ray's experiment state and trial checkpoints live under ``<storage>/<name>/``; the base model under
``<storage>/_base/<config key>/``, shared by every sweep of that storage with the same base config.

The Optuna study (`StudyLocation`) is an sqlite file, ``<storage>/<name>/optuna.db``. sqlite cannot be opened on an
object store, so for a URI storage the driver works on a local copy (``./vladsweep_optuna/<name>.db``) and keeps
``<storage>/<name>/optuna.db`` up to date from it (`StudyLocation.keep`); a ``--resume`` on a new head whose local
copy is missing (or behind) fetches it back first (`StudyLocation.fetch_for_resume`). With ``--optuna-url`` the study lives in
that RDB server instead and nothing is copied.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

logger = logging.getLogger("vladsweep.storage")

#: The study's file in the sweep folder: the study itself (local/NFS storage) or its kept copy (URI storage).
STUDY_FILE = "optuna.db"
#: For a URI storage: the folder, under the driver's working directory, of the local working copies.
LOCAL_STUDY_DIR = "vladsweep_optuna"
#: Optuna's name of the study in a per-sweep sqlite file; in an ``--optuna-url`` server it is the sweep's name.
STUDY_NAME = "vladsweep"


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
    def study_key(self) -> str:
        """Where the study's sqlite file lives in the storage: the file itself, or the kept copy of a URI storage."""
        return f"{self.experiment_dir}/{STUDY_FILE}"

    @property
    def optuna_url(self) -> str:
        """The sqlite URL the driver opens: the study in the sweep folder, or (URI storage) the local working copy
        under the working directory."""
        if self.is_local:
            path = Path(self.study_key)
        else:
            path = Path.cwd() / LOCAL_STUDY_DIR / f"{self.name}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    def study(self, optuna_url: str | None = None) -> StudyLocation:
        """The sweep's study: in ``optuna_url`` (``--optuna-url``, a server: nothing copied, the study named after
        the sweep), else the sqlite file of `optuna_url` — kept in `study_key` too for a URI storage."""
        if optuna_url:
            return StudyLocation(url=optuna_url, study_name=self.name, kept_at=None, server=True)
        return StudyLocation(
            url=self.optuna_url, study_name=STUDY_NAME, kept_at=None if self.is_local else self.study_key
        )

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


@dataclass(frozen=True)
class StudyLocation:
    """Where the sweep's Optuna study lives: ``url`` is what Optuna opens; ``kept_at`` (URI storage only) is the
    study's copy in the sweep's storage, which the driver keeps up to date from the local sqlite file of ``url``."""

    url: str
    study_name: str
    kept_at: str | None = None
    #: True for ``--optuna-url``'s server, False for the sqlite file of the sweep's storage.
    server: bool = False

    @property
    def label(self) -> str:
        """What a sweep records of its study's place, so ``--resume`` can check it is given the same one: the
        server's URL with its password hidden, or ``"storage"``."""
        if not self.server:
            return "storage"
        # Lazy: SQLAlchemy is only needed with --optuna-url.
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def local_path(self) -> Path | None:
        """The local sqlite file of ``url`` when the study is kept in the storage, else None."""
        if self.kept_at is None:
            return None
        return Path(self.url.removeprefix("sqlite:///"))

    def keep(self) -> None:
        """Copy a consistent snapshot of the local study to ``kept_at`` (a no-op when nothing is kept there).

        The snapshot is sqlite's backup API into a temp file (a copy of the file itself could catch a write
        half-done); it is uploaded to a temp key beside ``kept_at`` and then moved over it, so an upload cut off
        half-way leaves the previous copy whole (an object store's move is a server-side copy of the complete
        object). Raises `StorageError` naming ``kept_at``."""
        local = self.local_path
        if local is None or not local.exists():
            return
        fs = tmp_key = None
        try:
            fs, key = filesystem_for(self.kept_at)
            tmp_key = f"{key}.{uuid.uuid4().hex[:8]}.tmp"
            with tempfile.TemporaryDirectory(prefix="vladsweep-study-") as tmp:
                snapshot = Path(tmp) / STUDY_FILE
                _sqlite_backup(local, snapshot)
                data = snapshot.read_bytes()
            fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(tmp_key) as stream:
                stream.write(data)
            fs.move(tmp_key, key)
        except (OSError, sqlite3.Error) as exc:  # pyarrow raises OSError subclasses
            if fs is not None:
                with suppress(OSError):
                    fs.delete_file(tmp_key)
            raise StorageError(f"cannot copy the Optuna study {local} to {self.kept_at} ({exc})") from exc

    def set_aside_leftover(self) -> Path | None:
        """Before a new sweep (no ``--resume``): a local working copy already there is a leftover of an earlier
        sweep of the same name (its storage deleted or another one); the new sweep must not continue it, or
        upload it to its own storage. It is renamed beside itself, never deleted; its new path, or None."""
        local = self.local_path
        if local is None or not local.exists():
            return None
        aside = local.with_name(f"{local.name}.leftover-{int(time.time())}")
        os.replace(local, aside)
        logger.warning(
            "%s is the Optuna study of an earlier sweep of this name, not of this new one: kept as %s",
            local,
            aside,
        )
        return aside

    def fetch_for_resume(self, has_trials: bool) -> bool:
        """Before ``--resume``: bring the study back from ``kept_at`` when the local copy is missing (a new head,
        another working directory) or has fewer trials (this head's copy is older than a later head's run: it is
        moved aside, never deleted); True when it was fetched. Trials are only ever added to a study, so the copy
        with more is the newer one; on a tie the local copy wins (every copy in the storage was made from a local
        one). ``has_trials`` says Tune already ran trials of this sweep: then a study found in neither place is a
        `StorageError` naming both (the search could not go on: the restored trials have no study to report to)."""
        local = self.local_path
        if local is None:
            return False
        try:
            fs, key = filesystem_for(self.kept_at)
            found = fs.get_file_info(key).type == pafs.FileType.File
        except OSError as exc:
            raise StorageError(f"--resume: cannot read the Optuna study at {self.kept_at} ({exc})") from exc
        if not found:
            if has_trials and not local.exists():
                raise StorageError(
                    f"--resume: the sweep's Optuna study is neither at {self.kept_at} nor in the local copy "
                    f"{local}. Copy the study's sqlite file to one of them (from the old head's "
                    f"./{LOCAL_STUDY_DIR}/), or start the sweep again under a new --name."
                )
            return False  # the local copy, or no study yet (stopped before any trial): it starts now
        local.parent.mkdir(parents=True, exist_ok=True)
        fetched = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.fetch")
        try:
            with fs.open_input_stream(key) as stream, open(fetched, "wb") as out:
                while block := stream.read(1 << 20):
                    out.write(block)
            _check_sqlite(fetched, self.kept_at)
            if local.exists():
                have, kept = _trial_count(local), _trial_count(fetched)
                if kept <= have:
                    return False
                aside = local.with_name(f"{local.name}.behind-{int(time.time())}")
                os.replace(local, aside)
                logger.warning(
                    "the local Optuna study %s has %d trials, the copy at %s has %d: resuming from that copy "
                    "(the local one is kept as %s)",
                    local,
                    have,
                    self.kept_at,
                    kept,
                    aside,
                )
            os.replace(fetched, local)
        except OSError as exc:
            raise StorageError(
                f"--resume: cannot fetch the Optuna study {self.kept_at} to {local} ({exc})"
            ) from exc
        finally:
            fetched.unlink(missing_ok=True)
        logger.info("Optuna study fetched from %s to %s", self.kept_at, local)
        return True


def _trial_count(path: Path) -> int:
    """Trials in an sqlite Optuna study (its ``trials`` table); -1 for a file that is not one."""
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def _sqlite_backup(source: Path, target: Path) -> None:
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _check_sqlite(path: Path, origin: str) -> None:
    """Refuse a fetched file that is not a whole sqlite database (a partial or foreign object)."""
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            (verdict,) = con.execute("PRAGMA quick_check").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        verdict = str(exc)
    if verdict != "ok":
        raise StorageError(f"--resume: {origin} is not a readable sqlite Optuna study ({verdict})")


def check_rdb_url(url: str, flag: str = "--optuna-url") -> None:
    """An RDB URL Optuna can keep the study in: a SQLAlchemy URL whose dialect and driver are installed and whose
    server answers now. Raises `StorageError` naming ``flag`` and the URL (its password hidden)."""
    # Lazy: SQLAlchemy is only needed when the flag is given.
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = (
        "e.g. postgresql://user:password@host:5432/db, mysql+pymysql://user@host/db or sqlite:////abs/path.db"
    )
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except ArgumentError as exc:
        raise StorageError(f"{flag} {url!r}: not a SQLAlchemy database URL ({exc}); {example}") from exc
    shown = parsed.render_as_string(hide_password=True)
    # A bounded wait on an unreachable host; sqlite has no network to wait on.
    connect_args = {} if parsed.get_backend_name() == "sqlite" else {"connect_timeout": 10}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args)
    except NoSuchModuleError as exc:
        raise StorageError(
            f"{flag} {shown}: unknown database scheme {parsed.drivername!r}; {example}"
        ) from exc
    except ImportError as exc:
        raise StorageError(
            f"{flag} {shown}: the database driver for {parsed.drivername!r} is not installed ({exc}); install "
            "it (e.g. psycopg2-binary for postgresql, pymysql for mysql+pymysql)"
        ) from exc
    try:
        with engine.connect():
            pass
    except Exception as exc:  # the DBAPI's own OperationalError, TypeError for a bad argument …
        raise StorageError(f"{flag} {shown}: cannot connect ({exc.__class__.__name__}: {exc})") from exc
    finally:
        engine.dispose()


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
