"""The shared base model of a sweep: built once (as a Ray task, on a worker with the trial's resources), cached in
the sweep's storage under the hash of its config, and reused by every trial and by a resumed sweep."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

from sweep import storage
from trainables.base import BaseConfig

logger = logging.getLogger("vladsweep.base")

META = "meta.json"  # trainables.base.META_FILE


def _build_remote(config: dict[str, Any], location: str, threads: int) -> dict[str, Any]:
    import faiss  # noqa: F401  (DESIGN §9: faiss before torch)
    import torch

    from trainables.base import MODEL_FILE, BaseConfig, build_base

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    with tempfile.TemporaryDirectory(prefix="vladsweep-base-") as tmp:
        out = Path(tmp) / "base"
        build_base(BaseConfig.from_dict(config), out, device=device, progress=False)
        # The dense fp32 file is the base point of the front: what shipping it uncompressed would cost.
        meta = json.loads((out / META).read_text())
        meta["memory_mib"] = (out / MODEL_FILE).stat().st_size / 2**20
        (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        storage.upload_dir(out, location)
    return meta


def ensure_base(
    config: BaseConfig, sweep: storage.SweepStorage, cpus: float, gpus: float
) -> tuple[str, dict[str, Any], bool]:
    """Return (location, meta, built_now). Builds only when no finished base with this config key exists."""
    location = sweep.base_dir(config.key())
    meta_location = f"{location}/{META}"
    if storage.exists(meta_location):
        meta = read_meta(location)
        logger.info("base model %s found in the sweep's storage; not rebuilt", config.key())
        return location, meta, False
    logger.info("building the base model %s (once per sweep) …", config.key())
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_build_remote)
    meta = ray.get(task.remote(config.to_dict(), location, int(max(1, cpus))))
    return location, meta, True


def read_meta(location: str) -> dict[str, Any]:
    fs, path = storage.filesystem_for(location)
    with fs.open_input_stream(f"{path}/{META}") as stream:
        return json.loads(stream.readall().decode())


def base_summary(meta: Mapping[str, Any]) -> dict[str, float]:
    """The base model's mAPs as MLflow metrics (the reference for ``mAP_drop``)."""
    metrics = {"base_mAP": float(meta["mAP"]), "base_memory_mib": float(meta["memory_mib"])}
    for name, maps in meta.get("maps", {}).items():
        for stage in ("off_the_shelf", "finetuned"):
            if stage in maps:
                metrics[f"base_mAP_{name}_{stage}"] = float(maps[stage]["mAP"])
        metrics[f"base_mAP_{name}_random"] = float(maps.get("random", float("nan")))
    return metrics
