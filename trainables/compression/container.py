"""The artifact file: one ``safetensors`` file that holds a zstd-compressed JSON header and one payload of bytes.

The layout is in docs/artifact-format.md. In short (version 3, written now): the file stores two uint8 tensors,
``header`` -- the JSON header (format name and version, the caller's fields: architecture, plan, groups, meta, one
record per state-dict tensor; then the index of the stored tensors and a blake2b checksum of the payload),
zstd-compressed -- and ``payload``, every stored tensor's bytes one after the other in index order. The safetensors
``__metadata__`` holds a small JSON string (key `META_KEY`: format name, version, the header's coding, size and
checksum) and a second key (`META_CHECKSUM_KEY`) the checksum of that string. The streams of a compressed tensor
are stored as tensors named ``<state-dict key>`` `SEP` ``<stream>``. No pickle anywhere. Versions 1 and 2 stored
each tensor as a safetensors tensor and the header as plain metadata (37 KB of a 344 KB embedded-front file);
they still read.

`write_artifact` writes the file atomically; `read_header` checks it whole (length, header, format version, the
stored tensors' index against the payload's length) without reading the payload; `read_tensors` also reads every
tensor, the checksums verified.
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
import zstandard
from safetensors import safe_open
from safetensors.torch import save

from trainables.compression.errors import CodecError
from trainables.compression.streams import StreamError, zstd_exact
from trainables.fileio import atomic_write

FORMAT_NAME = "vladsweep-compressed"
#: Written by this code. Version 3: the header zstd-compressed in a ``header`` tensor, every stored tensor packed
#: into one ``payload`` tensor under one checksum. Version 2: one safetensors tensor per stored tensor, the header
#: as plain metadata, a checksum per tensor; records carry ``order0_bits`` (version 1: ``bound_bytes``, the same
#: figure in bytes under an older, wrong name). Records decode the same in every version (docs/artifact-format.md).
FORMAT_VERSION = 3
#: Versions this reader decodes.
READABLE_VERSIONS = (1, 2, 3)
#: Versions `write_artifact` writes (2: for a reader that predates version 3).
WRITABLE_VERSIONS = (2, 3)
#: ``__metadata__`` keys: the JSON header (versions 1-2) or its small descriptor (version 3), and its checksum.
META_KEY = "vladsweep"
META_CHECKSUM_KEY = "vladsweep.blake2b"
#: The two tensors of a version-3 file.
HEADER_TENSOR = "header"
PAYLOAD_TENSOR = "payload"
#: The most bytes a version-3 header may decompress to (a VGG16 artifact's is well under 1 MiB): a crafted
#: descriptor cannot make the reader allocate more.
MAX_HEADER_BYTES = 64 << 20
#: zstd level of the header: it is small, so the slowest level costs milliseconds.
_HEADER_ZSTD_LEVEL = 19
#: Separates a state-dict key from the name of one of its streams in the file (``conv.weight::indices``).
SEP = "::"
#: The torch dtype of each safetensors dtype name this torch has (the names of a version-3 index).
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dtype is not None
}
_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
#: Bytes per element of each safetensors dtype.
ITEMSIZE = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
#: Header keys the container writes itself; the others are the caller's fields (`caller_fields`).
CONTAINER_KEYS = ("format", "format_version", "checksum", "checksums")


def caller_fields(header: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a header as `read_header` returns it that ``write_artifact(path, tensors, fields)`` took:
    everything but `CONTAINER_KEYS`, so a file can be written again (another version, edited tensors)."""
    return {k: v for k, v in header.items() if k not in CONTAINER_KEYS}


def _tensor_checksum(name: str, t: torch.Tensor) -> str:
    """A version-1/2 tensor checksum (version 3 has one checksum over the whole payload)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    flat = t.contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _json_checksum(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _bytes_checksum(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def write_artifact(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    fields: Mapping[str, Any],
    *,
    version: int | None = None,
) -> None:
    """Write ``tensors`` (CPU) to ``path`` with the JSON header ``fields`` (JSON-able, in order) after the format
    name and version. ``version``: one of `WRITABLE_VERSIONS` (None: `FORMAT_VERSION`; 2 for a reader that predates
    version 3). Written to
    a temporary name beside ``path``, flushed to disk and renamed, so ``path`` is never half-written and a failed
    write leaves an old file alone."""
    path = Path(path)
    version = FORMAT_VERSION if version is None else version
    if version not in WRITABLE_VERSIONS:
        raise CodecError(f"{path}: cannot write format version {version!r}; writable: {WRITABLE_VERSIONS}")
    header = {"format": FORMAT_NAME, "format_version": version, **fields}
    if version < 3:
        _write_tensorwise(path, tensors, header)
        return
    index = []
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise CodecError(f"{path}: tensor {name!r} has dtype {t.dtype}, which the format cannot store")
        index.append([name, _DTYPE_NAMES[t.dtype], list(t.shape)])
    payload = b"".join(_tensor_bytes(t) for t in tensors.values())
    try:
        data = seal({**header, "index": index}, payload)
    except (TypeError, ValueError) as e:
        raise CodecError(f"{path}: meta and plan must be JSON-able (finite numbers, str keys): {e}") from e

    def write(tmp: str | os.PathLike) -> None:
        with open(tmp, "wb") as out:
            out.write(data)

    atomic_write(path, write, fsync=True)


def _write_tensorwise(path: Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> None:
    """A version-1/2 file: ``header`` (its ``format_version`` as given) as plain metadata with a checksum per
    tensor, each tensor a safetensors tensor of its own."""
    tensors = _own_storage(tensors)
    header = {
        **{k: v for k, v in header.items() if k not in ("checksum", "checksums")},
        "checksum": "blake2b-128 of name|dtype|shape|bytes",
        "checksums": {name: _tensor_checksum(name, t) for name, t in tensors.items()},
    }
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CodecError(f"{path}: meta and plan must be JSON-able (finite numbers, str keys): {e}") from e
    metadata = {META_KEY: text, META_CHECKSUM_KEY: _json_checksum(text)}

    def write(tmp: str | os.PathLike) -> None:
        with open(tmp, "wb") as out:
            out.write(_reproducible(save(tensors, metadata=metadata)))

    atomic_write(path, write, fsync=True)


def _own_storage(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` contiguous, each in a storage of its own: safetensors refuses tied tensors and views."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = (
            t.clone() if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
        )
        seen.add(ptr)
    return out


def seal(header: Mapping[str, Any], payload: bytes) -> bytes:
    """The bytes of a version-3 file: ``header`` (a JSON-able dict with ``index``) compressed into the ``header``
    tensor, ``payload`` after it, the descriptor (with the payload's checksum) and its checksum in the metadata.
    The digests stay out of the compressed header, so its size depends on the records alone, not on the weights'
    values. Byte for byte the same for the same input (safetensors keeps ``__metadata__`` in a hash map, so its keys
    are re-written sorted)."""
    full = {k: v for k, v in header.items() if k not in ("checksum", "checksums")}
    text = json.dumps(full, separators=(",", ":"), allow_nan=False).encode()
    packed = zstandard.ZstdCompressor(level=_HEADER_ZSTD_LEVEL, write_content_size=True).compress(text)
    descriptor = json.dumps(
        {
            "format": FORMAT_NAME,
            "format_version": full.get("format_version", FORMAT_VERSION),
            "header": {"coding": "zstd", "bytes": len(text), "blake2b": _bytes_checksum(packed)},
            PAYLOAD_TENSOR: {"blake2b": _bytes_checksum(payload)},
        },
        separators=(",", ":"),
    )
    stored = {
        HEADER_TENSOR: torch.frombuffer(bytearray(packed), dtype=torch.uint8),
        PAYLOAD_TENSOR: torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if payload
        else torch.zeros(0, dtype=torch.uint8),
    }
    return _reproducible(
        save(stored, metadata={META_KEY: descriptor, META_CHECKSUM_KEY: _json_checksum(descriptor)})
    )


def _reproducible(data: bytes) -> bytes:
    """safetensors' bytes with ``__metadata__``'s keys sorted in its JSON header, padded with spaces to its length
    (which the format allows), so offsets and everything after the header are untouched."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen for a re-ordering; keep safetensors' own bytes rather than guess
        return data
    return data[:8] + text.ljust(n, b" ") + data[8 + n :]


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """Parse and check a compressed file's header without reading the payload.

    Returns ``(header, index, header_bytes, file_bytes)``: the JSON header, the stored tensors' index (name ->
    dtype/shape/data_offsets, the offsets counted from the first payload byte), the bytes that are not payload
    (length prefix, safetensors header, and in version 3 the compressed header) and the file size. Raises
    `CodecError` naming the file for a truncated file, trailing bytes, an unparsable or tampered header, an index
    that does not tile the payload, or an unknown format or version."""
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
    header = _json_object(path, text, f"'{META_KEY}' metadata")
    _check_format(path, header)
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
    if header["format_version"] < 3:
        if not isinstance(header.get("checksums"), dict):
            raise CodecError(f"{path}: the header has no 'checksums' object")
        return header, index, 8 + hlen, size
    header, packed_index = _read_packed_header(path, header, index, 8 + hlen)
    payload_bytes = int(index[PAYLOAD_TENSOR]["data_offsets"][1]) - int(
        index[PAYLOAD_TENSOR]["data_offsets"][0]
    )
    return header, packed_index, size - payload_bytes, size


def _json_object(path: Path, text: str | bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"{path}: {what} is not parsable JSON ({e})") from e
    if not isinstance(value, dict):
        raise CodecError(f"{path}: {what} is not a JSON object")
    return value


def _check_format(path: Path, header: dict[str, Any]) -> None:
    if header.get("format") != FORMAT_NAME:
        raise CodecError(f"{path}: format {header.get('format')!r} is not {FORMAT_NAME!r}")
    if header.get("format_version") not in READABLE_VERSIONS:
        raise CodecError(
            f"{path}: format version {header.get('format_version')!r} is unknown; this reader knows versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )


def _read_packed_header(
    path: Path, descriptor: dict[str, Any], stored: dict[str, Any], data_start: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A version-3 file's header and index: the two tensors checked, the compressed header's checksum verified and
    its declared size bounded before it is decompressed, then every index entry checked against the payload."""
    if set(stored) != {HEADER_TENSOR, PAYLOAD_TENSOR} or any(
        e["dtype"] != "U8" or len(e["shape"]) != 1 for e in stored.values()
    ):
        raise CodecError(
            f"{path}: a version-3 file stores exactly the uint8 tensors {HEADER_TENSOR!r} and {PAYLOAD_TENSOR!r}; "
            f"this one stores {sorted(stored)[:5]}"
        )
    spec = descriptor.get("header")
    try:
        declared, digest = int(spec["bytes"]), spec["blake2b"]
        if spec["coding"] != "zstd" or not 0 < declared <= MAX_HEADER_BYTES or not isinstance(digest, str):
            raise ValueError(spec)
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(
            f"{path}: the header descriptor {spec!r} is not {{'coding': 'zstd', 'bytes': 1..{MAX_HEADER_BYTES}, "
            f"'blake2b': HEX}} ({type(e).__name__})"
        ) from None
    if stored[PAYLOAD_TENSOR]["data_offsets"][1] != max(e["data_offsets"][1] for e in stored.values()):
        # What this writer makes (safetensors orders equal dtypes by name), and what the payload reader relies on.
        raise CodecError(
            f"{path}: the {PAYLOAD_TENSOR!r} tensor must end the file; here {HEADER_TENSOR!r} follows it"
        )
    start, end = stored[HEADER_TENSOR]["data_offsets"]
    try:
        with open(path, "rb") as f:
            f.seek(data_start + start)
            packed = f.read(end - start)
    except OSError as e:
        raise CodecError(f"{path}: cannot read: {e}") from e
    if _bytes_checksum(packed) != digest:
        raise CodecError(f"{path}: header checksum mismatch: the compressed header was altered")
    try:
        text = zstd_exact(packed, declared, "the header")
    except StreamError as e:
        raise CodecError(f"{path}: the compressed header does not decode ({e})") from e
    header = _json_object(path, text, "the header")
    if (header.get("format"), header.get("format_version")) != (
        descriptor["format"],
        descriptor["format_version"],
    ):
        raise CodecError(f"{path}: the header's format and version differ from its descriptor's")
    entries = header.pop("index", None)
    payload_sum = descriptor.get(PAYLOAD_TENSOR)
    if not isinstance(payload_sum, dict) or not isinstance(payload_sum.get("blake2b"), str):
        raise CodecError(f"{path}: the header descriptor has no payload checksum")
    # Where versions 1-2 kept theirs, so every reader of a header finds the checksums in one place.
    header["checksum"] = "blake2b-128 of the payload bytes"
    header["checksums"] = {PAYLOAD_TENSOR: payload_sum["blake2b"]}
    index: dict[str, Any] = {}
    at = 0
    if not isinstance(entries, list):
        raise CodecError(f"{path}: the header's 'index' is not a list of [name, dtype, shape]")
    for entry in entries:
        try:
            name, dtype, shape = entry
            if not isinstance(name, str) or name in index:
                raise ValueError(f"name {name!r} is not a new string")
            if dtype not in TORCH_DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
            ):
                raise ValueError(f"shape {shape!r} is not a list of non-negative integers")
        except (TypeError, ValueError) as e:
            raise CodecError(f"{path}: index entry {entry!r} is malformed ({e})") from None
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        index[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    payload = stored[PAYLOAD_TENSOR]["data_offsets"]
    _check_index(path, index, payload[1] - payload[0])
    return header, index


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
    """``(header, tensors)`` of a compressed file, every check of `read_header` done and every checksum verified
    before it is returned; raises `CodecError` naming the file (and, before version 3, the damaged tensor)."""
    path = Path(path)
    header, index, header_bytes, size = read_header(path)
    if header["format_version"] >= 3:
        return header, _read_payload(path, header, index, header_bytes, size)
    sums: dict[str, str] = header["checksums"]
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


def _read_payload(
    path: Path, header: dict[str, Any], index: dict[str, Any], payload_start: int, size: int
) -> dict[str, torch.Tensor]:
    """A version-3 file's stored tensors: the payload read once (its length is the file's rest, checked by
    `read_header`), its checksum verified, then cut into tensors by the index, each in memory of its own."""
    try:
        with open(path, "rb") as f:
            f.seek(payload_start)
            payload = f.read(size - payload_start)
    except OSError as e:
        raise CodecError(f"{path}: cannot read: {e}") from e
    if len(payload) != size - payload_start:
        raise CodecError(f"{path}: the file changed while it was read")
    if _bytes_checksum(payload) != header["checksums"][PAYLOAD_TENSOR]:
        raise CodecError(f"{path}: checksum mismatch in the payload: the file is damaged or altered")
    view = memoryview(payload)
    loaded: dict[str, torch.Tensor] = {}
    for name, entry in index.items():
        start, end = entry["data_offsets"]
        dtype = TORCH_DTYPES[entry["dtype"]]
        if end > start:
            t = torch.frombuffer(bytearray(view[start:end]), dtype=dtype)
        else:
            t = torch.zeros(0, dtype=dtype)
        loaded[name] = t.reshape(entry["shape"])
    return loaded
