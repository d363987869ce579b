"""The artifact file: one ``safetensors`` file whose JSON header describes and checksums every stored tensor.

The layout is in docs/artifact-format.md. In short: the safetensors ``__metadata__`` holds one JSON string (key
`META_KEY`) -- format name and version, then the caller's fields (architecture, plan, groups, meta, one record per
state-dict tensor), then a blake2b checksum of every stored tensor (over its name, dtype, shape and bytes) -- and a
second key (`META_CHECKSUM_KEY`) the checksum of that JSON string itself. The streams of a compressed tensor are
stored as tensors named ``<state-dict key>`` `SEP` ``<stream>``. No pickle anywhere.

`write_artifact` writes the file atomically; `read_header` checks it whole (length, header, format version) without
reading the payload; `read_tensors` also reads every tensor and verifies its checksum.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from trainables.compression.errors import CodecError
from trainables.fileio import atomic_write

FORMAT_NAME = "vladsweep-compressed"
#: Written by this code. Version 2: records carry ``order0_bits`` (version 1: ``bound_bytes``, the same figure in
#: bytes under an older, wrong name); everything else decodes the same (docs/artifact-format.md).
FORMAT_VERSION = 2
#: Versions this reader decodes.
READABLE_VERSIONS = (1, 2)
#: ``__metadata__`` keys: the JSON header, and the checksum of that JSON string.
META_KEY = "vladsweep"
META_CHECKSUM_KEY = "vladsweep.blake2b"
#: Separates a state-dict key from the name of one of its streams in the file (``conv.weight::indices``).
SEP = "::"
#: Bytes per element of each safetensors dtype.
ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def _tensor_checksum(name: str, t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    flat = t.contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _json_checksum(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _own_storage(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each one in a storage of its own: safetensors refuses tied tensors and views."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = (
            t.clone() if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
        )
        seen.add(ptr)
    return out


def write_artifact(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], fields: Mapping[str, Any]
) -> None:
    """Write ``tensors`` (CPU, contiguous) to ``path`` with the JSON header ``fields`` (JSON-able, in order) between
    the format name/version and the tensor checksums. Written to a temporary name beside ``path``, flushed to disk
    and renamed, so ``path`` is never half-written and a failed write leaves an old file alone."""
    path = Path(path)
    tensors = _own_storage(tensors)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **fields,
        "checksum": "blake2b-128 of name|dtype|shape|bytes",
        "checksums": {name: _tensor_checksum(name, t) for name, t in tensors.items()},
    }
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CodecError(f"{path}: meta and plan must be JSON-able (finite numbers, str keys): {e}") from e
    metadata = {META_KEY: text, META_CHECKSUM_KEY: _json_checksum(text)}
    atomic_write(path, lambda tmp: _save_reproducible(tensors, tmp, metadata), fsync=True)


def _save_reproducible(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """``safetensors.torch.save_file``, byte for byte the same on every run: safetensors keeps ``__metadata__``
    in a hash map, so its keys come out in a random order and two saves of one model differed in their header
    bytes (and sha256). The header is re-written with those keys sorted, padded with spaces to its length (which
    the format allows), so offsets and everything after the header are untouched."""
    data = memoryview(save(tensors, metadata=metadata))
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + n]))
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen for a re-ordering; keep safetensors' own bytes rather than guess
        text = bytes(data[8 : 8 + n])
    with open(path, "wb") as out:
        out.write(data[:8])
        out.write(text.ljust(n, b" "))
        out.write(data[8 + n :])


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """Parse and check a compressed file's header without reading the payload.

    Returns ``(header, index, header_bytes, file_bytes)``: the JSON header, the safetensors tensor index (name ->
    dtype/shape/data_offsets), the bytes before the first tensor (length prefix + header) and the file size.
    Raises `CodecError` naming the file for a truncated file, trailing bytes, an unparsable or tampered header, or
    an unknown format or version."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CodecError(
                    f"{path}: truncated: {size} bytes, shorter than the 8-byte safetensors length prefix"
                )
            hlen = int.from_bytes(prefix, "little")
            if hlen > size - 8:
                raise CodecError(
                    f"{path}: truncated or not a safetensors file: the header claims {hlen} bytes but only "
                    f"{size - 8} follow the length prefix"
                )
            raw = f.read(hlen)
    except OSError as e:
        raise CodecError(f"{path}: cannot read: {e}") from e
    try:
        index = json.loads(raw)
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"{path}: header is not parsable safetensors JSON ({e})") from e
    file_meta = index.pop("__metadata__", None) or {}
    if not isinstance(file_meta, dict) or not isinstance(file_meta.get(META_KEY), str):
        raise CodecError(
            f"{path}: not a {FORMAT_NAME} file (no '{META_KEY}' entry in the safetensors metadata)"
        )
    text = file_meta[META_KEY]
    if _json_checksum(text) != file_meta.get(META_CHECKSUM_KEY):
        raise CodecError(f"{path}: header checksum mismatch: the '{META_KEY}' metadata was altered")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise CodecError(f"{path}: '{META_KEY}' metadata is not parsable JSON ({e})") from e
    if not isinstance(header, dict):
        raise CodecError(f"{path}: '{META_KEY}' metadata is not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise CodecError(f"{path}: format {header.get('format')!r} is not {FORMAT_NAME!r}")
    if header.get("format_version") not in READABLE_VERSIONS:
        raise CodecError(
            f"{path}: format version {header.get('format_version')!r} is unknown; this reader knows versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        end = max((int(v["data_offsets"][1]) for v in index.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CodecError(f"{path}: tensor index in the header is malformed ({e})") from e
    expected = 8 + hlen + end
    if size < expected:
        raise CodecError(f"{path}: truncated: {size} bytes, the header describes {expected}")
    if size > expected:
        raise CodecError(
            f"{path}: {size - expected} unexpected bytes after the last tensor ({expected} expected)"
        )
    _check_index(path, index, size - 8 - hlen)
    return header, index, 8 + hlen, size


def _check_index(path: Path, index: dict[str, Any], data_bytes: int) -> None:
    """Every tensor entry has a known dtype, a shape of non-negative ints, and a byte range of exactly
    shape x itemsize; the ranges tile the ``data_bytes`` after the header without gap or overlap."""
    spans = []
    for name, entry in index.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in ITEMSIZE:
                raise ValueError(f"unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
            ):
                raise ValueError(f"shape {shape!r} is not a list of non-negative integers")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
                raise ValueError(f"data_offsets {entry['data_offsets']!r} are not integers")
            if not 0 <= start <= end <= data_bytes:
                raise ValueError(f"byte range {start}..{end} lies outside the {data_bytes} payload bytes")
            if end - start != math.prod(shape) * ITEMSIZE[dtype]:
                raise ValueError(f"byte range of {end - start} does not hold {dtype}{shape}")
        except (KeyError, TypeError, ValueError) as e:
            raise CodecError(f"{path}: tensor index entry {name!r} is malformed ({e})") from e
        spans.append((start, end, name))
    spans.sort()
    at = 0
    for start, end, name in spans:
        if start != at:
            raise CodecError(
                f"{path}: tensor {name!r} starts at byte {start} of the payload, expected {at} (gap or overlap)"
            )
        at = end
    if at != data_bytes:
        raise CodecError(f"{path}: the tensors cover {at} of the {data_bytes} payload bytes")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, tensors)`` of a compressed file, every check of `read_header` done and every tensor's checksum
    verified before it is returned; raises `CodecError` naming the file and the damaged tensor."""
    path = Path(path)
    header, index, _, _ = read_header(path)
    sums: dict[str, str] = header.get("checksums", {})
    missing = sorted(set(sums) - set(index))
    unexpected = sorted(set(index) - set(sums))
    if missing or unexpected:
        raise CodecError(
            f"{path}: tensors do not match the header's checksum list (missing: {missing[:5]}, "
            f"unexpected: {unexpected[:5]})"
        )
    loaded: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in index:
                # A copy: safetensors hands out views of its mmap of the file, so a file rewritten in place later
                # would change (or, truncated, crash) the loaded model, and the bytes decoded could differ from
                # the bytes whose checksum was verified.
                t = f.get_tensor(name).clone()
                if _tensor_checksum(name, t) != sums[name]:
                    raise CodecError(
                        f"{path}: checksum mismatch in tensor {name!r}: the file is damaged or altered"
                    )
                loaded[name] = t
    except CodecError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged index
        raise CodecError(f"{path}: cannot read the tensors ({type(e).__name__}: {e})") from e
    return header, loaded
