"""Artifacts in the container's older versions (1 and 2: one safetensors tensor per stored tensor, the header as
plain metadata, a checksum per tensor), written from a current file's header and tensors, so that reading the
models released before version 3 is tested on real bytes of those versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainables.compression import container


def write_legacy(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor], version: int) -> None:
    """``header`` and ``tensors`` (as `container.read_tensors` returns them) as a version-``version`` file: the
    same records (version 1: ``order0_bits`` stored as ``bound_bytes``, its old name)."""
    assert version in (1, 2)
    header = json.loads(json.dumps(header))
    header["format_version"] = version
    if version == 1:
        for rec in header["tensors"].values():
            if "order0_bits" in rec:
                rec["bound_bytes"] = round(rec.pop("order0_bits") / 8, 1)
    container._write_tensorwise(path, tensors, header)
