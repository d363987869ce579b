"""The shared base model of a sweep: built once (as a Ray task, on a worker with the trial's resources), cached in
the sweep's storage under the hash of its config, and reused by every trial and by a resumed sweep.

The base's ``meta.json`` is its completion mark: it reaches the storage last, so a build stopped at any point (a
Ctrl-C, a lost node) leaves no base that reads as finished, and the next sweep builds it again. The driver waits
for the task in short slices, so a Ctrl-C reaches it at once (`ensure_base` then cancels the task).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import faiss  # noqa: F401  before torch: both bring OpenMP (docs/traps.md#faiss-before-torch)
import ray
import torch

from sweep import storage
from sweep.preflight import reserve
from trainables.base import META_FILE, MODEL_FILE, BaseConfig, build_base
from trainables.contract import MEMORY_KEY
from trainables.devices import select_device

logger = logging.getLogger("vladsweep.base")


def _build_remote(config: dict[str, Any], location: str, threads: int, gpus: float = 0.0) -> dict[str, Any]:
    """The Ray task: build the base on the worker it was given (on CUDA when it holds ``gpus``, refused when that
    worker's torch cannot use CUDA: `select_device`), then copy it to ``location``."""
    torch.set_num_threads(max(1, threads))
    device = select_device(gpus)
    with tempfile.TemporaryDirectory(prefix="vladsweep-base-") as tmp:
        out = Path(tmp) / "base"
        # Progress as plain lines (a Ray worker's stderr is no terminal): trainables/progress.py.
        build_base(BaseConfig.from_dict(config), out, device=device, progress=True)
        meta_path = out / META_FILE
        meta_text = meta_path.read_text()
        meta = json.loads(meta_text)
        meta_path.unlink()
        storage.upload_dir(out, location)
        _put_last(location, meta_text)
    return meta


def _put_last(location: str, meta_text: str) -> None:
    """Write ``meta.json`` into ``location`` under a temporary name, then move it into place: the mark that the
    base there is complete."""
    fs, path = storage.filesystem_for(location)
    tmp = f"{path}/.{META_FILE}.{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as stream:
        stream.write(meta_text.encode())
    fs.move(tmp, f"{path}/{META_FILE}")


def _wait_interruptibly(ref: ray.ObjectRef, cancel_grace_s: float = 3.0) -> Any:
    """``ray.get(ref)`` in short slices, so a Ctrl-C in the driver lands between two of them. On Ctrl-C the task
    is cancelled (KeyboardInterrupt inside it, so its temporary folder goes), forced after ``cancel_grace_s``."""
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                return ray.get(ready[0])
    except KeyboardInterrupt:
        ray.cancel(ref)
        deadline = time.monotonic() + cancel_grace_s
        while time.monotonic() < deadline and not ray.wait([ref], timeout=0.2)[0]:
            pass
        if not ray.wait([ref], timeout=0)[0]:
            ray.cancel(ref, force=True)
        raise


def ensure_base(
    config: BaseConfig, sweep: storage.SweepStorage, cpus: float, gpus: float, pending_timeout_s: float = 0.0
) -> tuple[str, dict[str, Any], bool]:
    """Return (location, meta, built_now). Builds only when no finished base with this config key exists; the
    build task waits at most ``pending_timeout_s`` for its resources (0: forever), else `PendingTimeout`."""
    location = sweep.base_dir(config.key())
    meta_location = f"{location}/{META_FILE}"
    if storage.exists(meta_location):
        meta = read_meta(location)
        logger.info("base model %s found in the sweep's storage; not rebuilt", config.key())
        return location, meta, False
    logger.info("building the base model %s (once per sweep) …", config.key())
    with reserve(cpus, gpus, pending_timeout_s, "the base model's build task") as strategy:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy)(_build_remote)
        meta = _wait_interruptibly(task.remote(config.to_dict(), location, int(max(1, cpus)), gpus))
    return location, meta, True


def read_meta(location: str) -> dict[str, Any]:
    """The ``meta.json`` of the base at ``location`` (a local path or a storage URI). A base written before
    `build_base` recorded its file's size (e.g. one copied in from an older ``python -m trainables.base``) gets
    ``memory_mib`` from the model file in the storage."""
    fs, path = storage.filesystem_for(location)
    with fs.open_input_stream(f"{path}/{META_FILE}") as stream:
        meta = json.loads(stream.readall().decode())
    if MEMORY_KEY not in meta:
        meta[MEMORY_KEY] = fs.get_file_info(f"{path}/{MODEL_FILE}").size / 2**20
    return meta
