"""File helpers every layer shares: the sha256 of a file, atomic writes, and vladsweep's user cache folder.

One definition each, so a cache file, a base model, a downloaded archive and a released artifact are hashed, written
and placed by the same rules. Imports nothing from the project (the bottom of the dependency graph).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

_CHUNK = 1 << 20

#: Environment variable that moves the user cache (synthetic set, index fallbacks, per-node copies).
CACHE_ENV = "VLADSWEEP_CACHE"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (the identity of an artifact, an archive, a cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def user_cache_dir(*parts: str) -> Path:
    """``$VLADSWEEP_CACHE`` (default ``~/.cache/vladsweep``), joined with ``parts``; not created here."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "vladsweep"
    return root.joinpath(*parts)


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a fresh name beside ``path``, then rename it over ``path``: a reader sees the old
    file or the whole new one, never half of one. The file gets the usual umask permissions (``mkstemp`` and
    safetensors create private files); ``fsync`` flushes it to disk before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_directory(
    path: str | os.PathLike,
    build: Callable[[Path], None],
    *,
    is_complete: Callable[[Path], bool],
    replace: bool = False,
) -> Path:
    """Run ``build(tmp)`` in a fresh folder beside ``path`` and rename it to ``path``: a reader sees the whole
    folder or none of it, and an interrupted build leaves nothing under ``path``.

    When ``path`` already exists: with ``replace`` the old folder is swapped out after the build; otherwise a
    complete one (``is_complete(path)``: another process won the race with the same content) is kept and the new
    build discarded, and an incomplete one (not written by this function) is moved aside first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace and not is_complete(path):
        _remove_aside(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a cache reads like any folder
        if replace and path.exists():
            _remove_aside(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if not is_complete(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _remove_aside(path: Path) -> None:
    """Rename ``path`` out of the way (atomic), then delete it: no reader sees a half-deleted folder."""
    stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent))
    os.replace(path, stale / "old")
    shutil.rmtree(stale, ignore_errors=True)
