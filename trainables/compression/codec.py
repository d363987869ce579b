"""The compressed artifact: one ``safetensors`` file that really is small, and the model rebuilt from it.

The public entry point of the codec; the file format is described in docs/artifact-format.md. The pieces:
`module_state` (the model's plain state dict), `layouts` (how each compressed weight is stored, coded by `streams`),
`container` (the file: its compressed JSON header, the packed payload and its checksum), `architectures` (the builders a file may name) and `report`
(sizes, measured on the written file).

``save_compressed(model, plan, path, meta)`` writes every tensor of the model's *plain* state dict (the keys an
uncompressed model of the same architecture has: ``conv.weight``, not ``parametrizations.weight.original`` or
``weight_orig``): a quantized weight as its codebook + index streams, a pruned, not quantized one as its kept values
+ positions (`layouts`), every other tensor (biases, NetVLAD centroids, buffers) as-is, in its own dtype. The header
carries the ``architecture`` ({"name", "config"}) to rebuild the model through the allow-listed registry, the plan,
the layer groups, the user's meta and one record per state-dict tensor. Loading runs no code from the file.

``load_compressed(path)`` checks the file whole before it allocates or decodes anything from it: length, header,
format version, the stored tensors' index against the payload's length, the architecture (built on the meta device when it
allows) against every record's shape, every record's sizes and counts against those shapes, and every checksum.
Then the streams are decoded in parallel threads and every tensor of the state dict is filled from the file. A
quantized weight decodes to ``codebook[indices] * mask`` in float32 (then ``* scale[c]`` along dim 0 for a
channel-scaled one) -- the same ops the quantized model runs -- so the decoded model computes the same outputs. `verify_file` does the same checks and decoding without a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables.compression.architectures import build_architecture, build_for_loading, known_architectures
from trainables.compression.container import SEP, read_header, read_tensors, write_artifact
from trainables.compression.errors import CodecError
from trainables.compression.layouts import (
    FLOAT_DTYPES,
    check_record,
    decode_tensor,
    encode_pruned,
    encode_quantized,
    record_streams,
)
from trainables.compression.module_state import plain_state_entries, plain_value
from trainables.compression.quantize import effective_weight, prune_mask, quantized_view
from trainables.compression.report import SizeReport, read_size_report
from trainables.compression.streams import StreamError, decode_symbols

# read_header is re-exported: callers check a file's header through the codec's public path.
__all__ = ["CodecError", "load_compressed", "read_header", "save_compressed", "verify_file"]


def _groups_of(model: nn.Module, groups: Mapping[str, Any] | None) -> dict[str, list[str]]:
    if groups is None and callable(getattr(model, "compression_groups", None)):
        groups = model.compression_groups()
    return {str(g): [str(n) for n in names] for g, names in (groups or {}).items()}


def _plan_dict(plan: Any) -> Any:
    if plan is None:
        return None
    if hasattr(plan, "to_dict"):
        return plan.to_dict()
    if isinstance(plan, Mapping):
        return dict(plan)
    raise CodecError(f"plan must be a CompressionPlan, a dict or None, got {type(plan).__name__}")


def _checked_architecture(meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    arch = meta.get("architecture")
    if (
        not isinstance(arch, Mapping)
        or not isinstance(arch.get("name"), str)
        or not isinstance(arch.get("config", {}), Mapping)
    ):
        raise CodecError(
            f"{path}: meta['architecture'] must be {{'name': <one of {known_architectures()}>, 'config': {{...}}}} "
            f"so the model can be rebuilt at load; got {arch!r}"
        )
    return {"name": arch["name"], "config": dict(arch.get("config", {}))}


def save_compressed(
    model: nn.Module,
    plan: Any,
    path: str | os.PathLike,
    meta: Mapping[str, Any],
    *,
    groups: Mapping[str, list[str]] | None = None,
) -> SizeReport:
    """Write ``model`` (pruned / quantized by this package, or plain) to ``path`` as one compressed safetensors file
    and return its `SizeReport` (measured on the written file).

    ``plan``: a ``CompressionPlan``, its dict, or None (stored for the record). ``meta``: JSON-able; must carry
    ``architecture = {"name": ..., "config": {...}}`` naming a registered builder. ``groups``: layer group -> module
    names, for the report (default: ``model.compression_groups()`` when the model has it). The file is written to a
    temporary name beside ``path`` and renamed, so ``path`` is never half-written."""
    path = Path(path)
    architecture = _checked_architecture(meta, path)
    user_meta = {k: v for k, v in meta.items() if k != "architecture"}

    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    for key, (module, name) in plain_state_entries(model).items():
        if SEP in key:
            raise CodecError(f"{path}: state-dict key {key!r} contains {SEP!r}, which the format reserves")
        view = quantized_view(module) if name == "weight" else None
        mask = prune_mask(module) if name == "weight" and view is None else None
        if view is not None:
            rec, payload = encode_quantized(
                view.codebook, view.indices, view.mask, view.bits, view.mode, scale=view.scale
            )
        elif mask is not None:
            rec, payload = encode_pruned(effective_weight(module).detach(), mask)
        else:
            value = plain_value(module, name).cpu()
            if value.dtype not in (*FLOAT_DTYPES.values(),) and value.is_floating_point():
                raise CodecError(f"{path}: tensor {key!r} has unsupported dtype {value.dtype}")
            records[key] = {"kind": "dense"}
            if _exact_in_float16(value):
                value = value.to(torch.float16)
                records[key]["dtype"] = DENSE_WIDENED
            tensors[key] = value.contiguous()
            continue
        records[key] = rec
        for sname, arr in payload.items():
            if arr.size:
                tensors[f"{key}{SEP}{sname}"] = torch.from_numpy(np.ascontiguousarray(arr))

    fields = {
        "architecture": architecture,
        "plan": _plan_dict(plan),
        "groups": _groups_of(model, groups),
        "meta": user_meta,
        "tensors": records,
    }
    write_artifact(path, tensors, fields)
    return read_size_report(path)


#: The dtype a dense record with ``"dtype"`` decodes to: a float32 tensor whose every value is a float16 value
#: (e.g. biases rounded by ``bias_dtype: float16``) is stored as float16 and widened back exactly.
DENSE_WIDENED = "F32"


def _exact_in_float16(value: torch.Tensor) -> bool:
    if value.dtype != torch.float32 or value.numel() == 0:
        return False
    return bool(torch.equal(value.to(torch.float16).to(torch.float32), value))


def _stored_by_record(
    path: Path, header: dict[str, Any], index: dict[str, Any]
) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """State-dict key -> its stored tensors (stream name -> (dtype, shape)); every stored tensor belongs to a
    record (a dense key, or ``<compressed key>::<stream>``)."""
    records = header["tensors"]
    out: dict[str, dict[str, tuple[str, list[int]]]] = {
        k: {} for k, r in records.items() if r.get("kind") != "dense"
    }
    for name, entry in index.items():
        key, sep, stream = name.partition(SEP)
        if sep and key in out:
            out[key][stream] = (entry["dtype"], entry["shape"])
        elif not sep and records.get(name, {}).get("kind") == "dense":
            continue
        else:
            raise CodecError(f"{path}: stored tensor {name!r} belongs to no record of the header")
    return out


def _check_file(
    path: Path, header: dict[str, Any], index: dict[str, Any], shapes: Mapping[str, tuple] | None
) -> None:
    """Every record of the header checked against the stored tensors and, when given, the shapes the architecture
    expects (``shapes``: state-dict key -> shape), before anything is read or decoded."""
    records = header.get("tensors")
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        raise CodecError(f"{path}: the header's 'tensors' is not an object of records")
    if not isinstance(header.get("checksums"), dict):
        raise CodecError(f"{path}: the header has no 'checksums' object")
    if shapes is not None:
        missing = sorted(set(shapes) - set(records))
        unexpected = sorted(set(records) - set(shapes))
        if missing or unexpected:
            arch = header["architecture"]
            raise CodecError(
                f"{path}: the file's tensors do not fit architecture {arch['name']!r} {arch.get('config')}: "
                f"missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
    stored = _stored_by_record(path, header, index)
    for key, rec in records.items():
        if rec.get("kind") == "dense":
            if key not in index:
                raise CodecError(f"{path}: dense tensor {key!r} is not stored in the file")
            widened = rec.get("dtype")
            if widened is not None and (widened != DENSE_WIDENED or index[key]["dtype"] != "F16"):
                raise CodecError(
                    f"{path}: dense tensor {key!r} is stored as {index[key]['dtype']} with dtype {widened!r}; "
                    f"a dense record's dtype may only be {DENSE_WIDENED!r} over a stored F16 tensor"
                )
            shape = tuple(index[key]["shape"])
            if shapes is not None and shape != tuple(shapes[key]):
                raise CodecError(
                    f"{path}: tensor {key!r} has shape {shape} in the file but {tuple(shapes[key])} in architecture "
                    f"{header['architecture']['name']!r}"
                )
            continue
        shape = rec.get("shape")
        if shapes is not None:
            if tuple(shape or ()) != tuple(shapes[key]):
                raise CodecError(
                    f"{path}: tensor {key!r} has shape {tuple(shape or ())} in the file but {tuple(shapes[key])} "
                    f"in architecture {header['architecture']['name']!r}"
                )
        elif not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise CodecError(f"{path}: tensor {key!r}: record shape {shape!r} is not a list of sizes")
        try:
            check_record(rec, tuple(shape), stored[key])
        except CodecError as e:
            raise CodecError(f"{path}: tensor {key!r}: {e}") from e


def _decode_all(
    path: Path, header: dict[str, Any], loaded: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every state-dict tensor of a checked file, its streams decoded in parallel threads (zstd and numpy release
    the GIL), then each tensor assembled."""
    records = header["tensors"]
    jobs = [(key, s) for key, rec in records.items() if rec["kind"] != "dense" for s in record_streams(rec)]

    def payload_of(key: str) -> dict[str, np.ndarray]:
        prefix = key + SEP
        return {n[len(prefix) :]: t.numpy() for n, t in loaded.items() if n.startswith(prefix)}

    def decode_stream(job: tuple[str, str]) -> np.ndarray:
        key, s = job
        data = loaded.get(f"{key}{SEP}{s}")
        return decode_symbols(
            data.numpy() if data is not None else np.zeros(0, np.uint8), records[key]["streams"][s]
        )

    def fail(key: str, e: BaseException) -> CodecError:
        return CodecError(f"{path}: tensor {key!r} does not decode ({type(e).__name__}: {e})")

    # Longest streams first, so the pool is not left waiting on one at the end.
    jobs.sort(key=lambda j: -int(records[j[0]]["streams"][j[1]]["n"]))
    decoded: dict[str, dict[str, np.ndarray]] = {}
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        futures = {job: pool.submit(decode_stream, job) for job in jobs}
        for (key, s), fut in futures.items():
            try:
                decoded.setdefault(key, {})[s] = fut.result()
            except _DECODE_ERRORS as e:
                raise fail(key, e) from e
        state: dict[str, torch.Tensor] = {}
        tensors = {
            key: pool.submit(decode_tensor, rec, payload_of(key), decoded.get(key, {}))
            for key, rec in records.items()
            if rec["kind"] != "dense"
        }
        for key, rec in records.items():
            if rec["kind"] == "dense":
                state[key] = loaded[key].to(torch.float32) if rec.get("dtype") else loaded[key]
                continue
            try:
                state[key] = tensors[key].result()
            except _DECODE_ERRORS as e:
                raise fail(key, e) from e
    return state


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


#: What a damaged stream can raise while it is decoded. ``constriction`` is Rust: a panic surfaces as
#: ``pyo3_runtime.PanicException``, a BaseException; it is caught by name below.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    StreamError,
    CodecError,
    KeyError,
    ValueError,
    RuntimeError,
    IndexError,
)


def verify_file(path: str | os.PathLike) -> dict[str, Any]:
    """Check a compressed file as `load_compressed` does -- the header, the architecture's shapes (built on the meta
    device when it allows, so the shapes bound what is decoded), every record, every checksum -- and decode every
    tensor, without loading a model. Returns the header; raises `CodecError` naming the fault."""
    path = Path(path)
    header, index, _, _ = read_header(path)
    model, _ = _build(path, header)
    _check_file(path, header, index, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    del model
    loaded = _read_checked(path, header)
    _decode_all(path, header, loaded)
    return header


def _read_checked(path: Path, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor, checksums verified (`read_tensors`), from a file whose header is still the one checked."""
    again, loaded = read_tensors(path)
    if again != header:
        raise CodecError(f"{path}: the file changed while it was read")
    return loaded


def _build(path: Path, header: dict[str, Any]) -> tuple[nn.Module, bool]:
    """The header's architecture through the registry (`build_for_loading`), errors named with the file."""
    arch = header.get("architecture")
    if (
        not isinstance(arch, dict)
        or not isinstance(arch.get("name"), str)
        or not isinstance(arch.get("config", {}), dict)
    ):
        raise CodecError(
            f"{path}: the header's architecture {arch!r} is not {{'name': ..., 'config': {{...}}}}"
        )
    try:
        return build_for_loading(arch["name"], arch.get("config", {}))
    except CodecError as e:
        raise CodecError(f"{path}: {e}") from e
    except Exception as e:
        raise CodecError(
            f"{path}: the builder of architecture {arch['name']!r} failed on config {arch.get('config')!r} "
            f"({type(e).__name__}: {e})"
        ) from e


def load_compressed(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model stored by `save_compressed`. Every size, count and offset of the header is checked against
    the architecture's shapes and the file's length, and every checksum verified, before anything is decoded; then
    every state-dict tensor is filled from the file. The module gets ``compression_meta`` = the header dict (format,
    architecture, plan, groups, meta, per-tensor records)."""
    path = Path(path)
    header, index, _, _ = read_header(path)
    model, on_meta = _build(path, header)
    arch = header["architecture"]
    expected = model.state_dict()
    _check_file(path, header, index, {k: tuple(v.shape) for k, v in expected.items()})
    loaded = _read_checked(path, header)
    state = _decode_all(path, header, loaded)
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CodecError(
                f"{path}: tensor {key!r} has shape {tuple(t.shape)} in the file but {tuple(expected[key].shape)} "
                f"in architecture {arch['name']!r}"
            )
    if on_meta:
        model.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            # A non-persistent buffer is not in the file: build for real so the builder computes it.
            model = build_architecture(arch["name"], arch.get("config", {}))
            on_meta = False
    if not on_meta:
        model.load_state_dict(state, strict=True)
    model.compression_meta = {k: v for k, v in header.items() if k != "checksums"}
    return model
