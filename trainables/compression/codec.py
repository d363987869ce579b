"""The compressed artifact: one ``safetensors`` file that really is small, and the model rebuilt from it.

``save_compressed(model, plan, path, meta)`` writes every tensor of the model's *plain* state dict (the keys an
uncompressed model of the same architecture has: ``conv.weight``, not ``parametrizations.weight.original`` or
``weight_orig``):

- a quantized weight (``quantize.quantized_view``) as its codebook plus, whichever is smallest for that layer,
  ``dense`` (one symbol per weight: the index, or an extra "zero" code where pruned), ``bitmap`` (a keep bitmap +
  the indices of the kept weights) or ``gaps`` (relative-index gaps as in Deep Compression, with an escape symbol
  for gaps too long for the alphabet, + the indices); each stream is coded by `streams.encode_symbols`
  (raw bits, zstd or ANS, the smallest);
- a pruned, not quantized weight (``quantize.prune_mask``) as its kept values (stored in the weight's dtype) plus the
  positions (``bitmap`` or ``gaps``), or dense when that is smaller;
- every other tensor (biases, NetVLAD centroids, buffers) as-is, in its own dtype.

The header's ``__metadata__`` holds one JSON string (key ``"vladsweep"``): format name and version, the
``architecture`` ({"name", "config"}) to rebuild the model through the allow-listed `ARCHITECTURES` registry, the
plan, the layer groups, the user's meta, one record per state-dict tensor, and a blake2b checksum of every stored
tensor (over its name, dtype, shape and bytes). A second metadata key carries the checksum of that JSON itself. No
pickle anywhere, and loading runs no code from the file: the builder comes from the registry.

``load_compressed(path)`` checks the file whole (length, header, format version, every checksum) before it decodes
anything, rebuilds the architecture with random weights and fills every tensor of its state dict from the file. A
quantized weight decodes to ``codebook[indices] * mask`` in float32 -- the same ops the quantized model runs -- so
the decoded model computes the same outputs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from trainables.compression.quantize import effective_weight, prune_mask, quantized_view
from trainables.compression.report import SizeReport, read_size_report
from trainables.compression.streams import (
    CHUNK,
    EXACT_LIMIT,
    EncodedStream,
    StreamError,
    binary_entropy_bits,
    chunks,
    decode_symbols,
    encode_symbols,
    entropy_bits,
    size_estimate,
    symbol_dtype,
)

FORMAT_NAME = "vladsweep-compressed"
FORMAT_VERSION = 1
#: ``__metadata__`` keys: the JSON header, and the checksum of that JSON string.
META_KEY = "vladsweep"
META_CHECKSUM_KEY = "vladsweep.blake2b"
#: Separates a state-dict key from the name of one of its streams in the file (``conv.weight::indices``).
SEP = "::"

#: Builders the loader may call, name -> "module:function". Only these (and `register_architecture`) are used.
ARCHITECTURES: dict[str, str] = {"netvlad": "trainables.netvlad.model:build_netvlad"}
_REGISTERED: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}

_TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Longest gap alphabet tried for the ``gaps`` layout is 2**_MAX_GAP_BITS (the escape symbol is the last).
_MAX_GAP_BITS = 16


class CodecError(ValueError):
    """A compressed file that cannot be written or read; the message names the file and what is wrong."""


# --- architecture registry ---------------------------------------------------------------------------------------


def register_architecture(name: str, builder: Callable[[dict[str, Any]], nn.Module] | str) -> None:
    """Allow ``load_compressed`` to rebuild architecture ``name`` with ``builder(config) -> nn.Module`` (random
    weights are fine: every tensor is then filled from the file). ``builder`` may be a ``"module:function"`` string,
    imported only when a file names this architecture."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"architecture name must be a non-empty string, got {name!r}")
    if isinstance(builder, str):
        if ":" not in builder:
            raise ValueError(
                f"builder {builder!r} for architecture {name!r} must look like 'package.module:function'"
            )
        ARCHITECTURES[name] = builder
        _REGISTERED.pop(name, None)
    elif callable(builder):
        _REGISTERED[name] = builder
    else:
        raise TypeError(
            f"builder for architecture {name!r} must be callable or 'module:function', got {builder!r}"
        )


def known_architectures() -> list[str]:
    """Names ``load_compressed`` can rebuild."""
    return sorted(set(ARCHITECTURES) | set(_REGISTERED))


def build_architecture(name: str, config: dict[str, Any]) -> nn.Module:
    """Call the registered builder of ``name`` with ``config``; an unknown name lists the known ones."""
    if name in _REGISTERED:
        builder = _REGISTERED[name]
    elif name in ARCHITECTURES:
        module_name, _, func = ARCHITECTURES[name].partition(":")
        builder = getattr(importlib.import_module(module_name), func)
    else:
        raise CodecError(
            f"unknown architecture {name!r}; known: {', '.join(known_architectures()) or '(none)'} "
            "(add one with trainables.compression.codec.register_architecture)"
        )
    model = builder(dict(config))
    if not isinstance(model, nn.Module):
        raise CodecError(
            f"builder of architecture {name!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def _build_for_loading(name: str, config: dict[str, Any]) -> tuple[nn.Module, bool]:
    """The architecture, built on the meta device when its builder allows (no time or memory spent on random
    weights that are overwritten at once); ``(model, on_meta)``."""
    try:
        with torch.device("meta"):
            return build_architecture(name, config), True
    except CodecError:
        raise
    except Exception:  # a builder that computes on its tensors at init cannot run on meta: build for real
        return build_architecture(name, config), False


# --- the plain state dict of a (possibly pruned / quantized) model -------------------------------------------------


def _prune_hook_names(module: nn.Module) -> set[str]:
    return {
        h._tensor_name
        for h in module._forward_pre_hooks.values()
        if isinstance(h, torch_prune.BasePruningMethod)
    }


def plain_state_entries(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """State-dict key of the uncompressed architecture -> (owning module, tensor name), in state-dict order.

    Parametrized tensors (``parametrizations.<name>.original``) and ``torch.nn.utils.prune`` pairs
    (``<name>_orig`` + ``<name>_mask``) appear under their plain ``<name>``; non-persistent buffers are left out,
    as ``state_dict`` does."""
    out: dict[str, tuple[nn.Module, str]] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        pruned = _prune_hook_names(module)
        is_param = parametrize.is_parametrized(module)
        # Compressed tensors first: in a plain module ``weight`` precedes ``bias``, and both parametrize and
        # prune move it out of that place.
        for name in sorted(pruned):
            out[prefix + name] = (module, name)
        if is_param:
            for name in module.parametrizations:
                out[prefix + name] = (module, name)
        for name, p in module._parameters.items():
            if p is None:
                continue
            if name.endswith("_orig") and name[: -len("_orig")] in pruned:
                continue
            out[prefix + name] = (module, name)
        for name, b in module._buffers.items():
            if b is None or name in module._non_persistent_buffers_set:
                continue
            if name.endswith("_mask") and name[: -len("_mask")] in pruned:
                continue
            out[prefix + name] = (module, name)
        for child_name, child in module._modules.items():
            if child is None or (is_param and child_name == "parametrizations"):
                continue
            walk(child, f"{prefix}{child_name}.")

    walk(model, "")
    return out


def _plain_value(module: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        if name in _prune_hook_names(module):
            # The hook's own op; ``module.<name>`` is only refreshed at forward time and may be stale.
            return getattr(module, name + "_orig") * getattr(module, name + "_mask")
        return getattr(module, name).detach()


# --- encoding one compressed tensor ------------------------------------------------------------------------------


def _flat_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).numpy()


def _gather_indices(indices: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """``indices[mask]`` as the smallest dtype for ``0..k-1``, chunk by chunk (no stream-long int64 temporary);
    an index outside that range is an error."""
    dtype = symbol_dtype(k)
    parts = []
    for sl in chunks(len(mask)):
        v = indices[sl][mask[sl]]
        if v.size and (int(v.min()) < 0 or int(v.max()) >= k):
            raise CodecError(
                f"quantization indices must lie in 0..{k - 1}, found {int(v.min())}..{int(v.max())}"
            )
        parts.append(v.astype(dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _gap_histogram(mask: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the zero runs before each kept position (gaps < cap) and the list of longer gaps."""
    hist = np.zeros(cap, np.int64)
    big = []
    prev = -1
    for sl in chunks(len(mask)):
        pos = np.flatnonzero(mask[sl]) + sl.start
        if len(pos) == 0:
            continue
        g = np.diff(pos, prepend=prev) - 1
        prev = int(pos[-1])
        small = g < cap
        hist += np.bincount(g[small], minlength=cap)
        big.append(g[~small])
    return hist, (np.concatenate(big) if big else np.zeros(0, np.int64))


def _gap_counts(hist: np.ndarray, big: np.ndarray, escape: int) -> np.ndarray:
    """Symbol counts of the gap stream with this escape: gap g -> (g // escape) escapes, then g % escape."""
    g = np.arange(len(hist))
    counts = np.bincount(g % escape, weights=hist, minlength=escape + 1).astype(np.int64)
    counts[escape] = int((g // escape * hist).sum()) + int((big // escape).sum())
    if len(big):
        counts[: escape + 1] += np.bincount(big % escape, minlength=escape + 1)
    return counts


def _best_gap_escape(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """The escape symbol (alphabet - 1, a power of two minus one) that makes the gap stream smallest, with counts."""
    hist, big = _gap_histogram(mask, 1 << _MAX_GAP_BITS)
    best: tuple[int, int, np.ndarray] | None = None
    for k in range(1, _MAX_GAP_BITS + 1):
        escape = (1 << k) - 1
        counts = _gap_counts(hist, big, escape)
        size = size_estimate(counts, escape + 1)
        if best is None or size < best[0]:
            best = (size, escape, counts)
    assert best is not None
    return best[1], best[2]


def _gap_symbols(mask: np.ndarray, escape: int) -> np.ndarray:
    dtype = symbol_dtype(escape + 1)
    parts = []
    prev = -1
    for sl in chunks(len(mask)):
        pos = np.flatnonzero(mask[sl]) + sl.start
        if len(pos) == 0:
            continue
        g = np.diff(pos, prepend=prev) - 1
        prev = int(pos[-1])
        q, r = np.divmod(g, escape)
        out = np.full(len(g) + int(q.sum()), escape, dtype)
        out[np.cumsum(q + 1) - 1] = r
        parts.append(out)
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _positions_from_gaps(symbols: np.ndarray, escape: int) -> np.ndarray:
    """Kept positions from a gap stream: a value r advances r + 1 places and keeps the last; an escape advances
    ``escape`` places and keeps none."""
    sym = torch.from_numpy(symbols)
    is_escape = sym == escape
    advance = sym.to(torch.int64).add_(1).masked_fill_(is_escape, escape)
    return (torch.cumsum(advance, 0).sub_(1))[~is_escape].numpy()


def _dense_symbols(indices: np.ndarray, mask: np.ndarray, zero_code: int) -> np.ndarray:
    out = np.empty(len(mask), symbol_dtype(zero_code + 1))
    for sl in chunks(len(mask)):
        out[sl] = np.where(mask[sl], indices[sl], zero_code)
    return out


class _Layout:
    """One way to store a tensor: named symbol streams (made lazily) plus tensors stored as they are."""

    def __init__(self, name: str, extra: dict[str, Any] | None = None) -> None:
        self.name = name
        self.extra = extra or {}
        self.streams: dict[str, tuple[Callable[[], np.ndarray], np.ndarray, int]] = {}
        self.fixed_bytes = 0

    def estimate(self) -> int:
        return self.fixed_bytes + sum(size_estimate(c, a) for _, c, a in self.streams.values())


LAYOUTS = ("dense", "bitmap", "gaps")


def _choose(
    layouts: list[_Layout], n: int, force: str | None = None
) -> tuple[_Layout, dict[str, EncodedStream]]:
    """The layout with the fewest bytes: measured by encoding each one for small tensors, estimated from symbol
    counts for large ones (then only the winner is encoded). Earlier layouts win ties. ``force`` names the layout
    to use instead (tests, benchmarks)."""
    if force is not None:
        layouts = [lay for lay in layouts if lay.name == force]
        if not layouts:
            raise ValueError(f"layout {force!r} is not one of {', '.join(LAYOUTS)}")
    cache: dict[tuple[str, int], EncodedStream] = {}

    def encode(layout: _Layout) -> dict[str, EncodedStream]:
        out = {}
        for sname, (make, counts, alphabet) in layout.streams.items():
            # bitmap and gaps share the index stream: encode it once.
            key = (sname, id(make)) if sname != "indices" else (sname, 0)
            if key not in cache:
                cache[key] = encode_symbols(make(), alphabet, counts)
            out[sname] = cache[key]
        return out

    if n <= EXACT_LIMIT:
        best = None
        for layout in layouts:
            enc = encode(layout)
            size = layout.fixed_bytes + sum(len(e.data) for e in enc.values())
            if best is None or size < best[0]:
                best = (size, layout, enc)
        assert best is not None
        return best[1], best[2]
    layout = min(layouts, key=lambda lay: lay.estimate())
    return layout, encode(layout)


def encode_quantized(
    codebook: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor,
    bits: int,
    mode: str,
    *,
    layout: str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encode one quantized weight (``codebook[indices] * mask``): its header record and its payload arrays (stream
    name -> uint8 bytes, plus ``codebook`` float32). ``layout`` forces one of `LAYOUTS` (default: the smallest)."""
    k = 1 << bits
    if codebook.numel() != k:
        raise CodecError(f"codebook has {codebook.numel()} values, expected 2**bits = {k}")
    if indices.shape != mask.shape:
        raise CodecError(f"indices shape {tuple(indices.shape)} differs from mask shape {tuple(mask.shape)}")
    idx = _flat_numpy(indices)
    m = _flat_numpy(mask).astype(bool, copy=False)
    n = len(m)
    idx_nz = _gather_indices(idx, m, k)
    nnz = len(idx_nz)
    idx_counts = np.bincount(idx_nz, minlength=k)

    dense = _Layout("dense")
    dense.streams["symbols"] = (
        lambda: _dense_symbols(idx, m, k),
        np.append(idx_counts, n - nnz),
        k + 1,
    )
    index_stream = (lambda: idx_nz, idx_counts, k)
    bitmap = _Layout("bitmap")
    bitmap.streams["positions"] = (lambda: m.view(np.uint8), np.array([n - nnz, nnz]), 2)
    bitmap.streams["indices"] = index_stream
    escape, gap_counts = _best_gap_escape(m)
    gaps = _Layout("gaps", {"escape": escape})
    gaps.streams["positions"] = (lambda: _gap_symbols(m, escape), gap_counts, escape + 1)
    gaps.streams["indices"] = index_stream
    chosen, enc = _choose([dense, bitmap, gaps], n, layout)

    record = {
        "kind": "quantized",
        "shape": list(indices.shape),
        "dtype": "float32",
        "bits": int(bits),
        "mode": str(mode),
        "nonzeros": nnz,
        "layout": chosen.name,
        **chosen.extra,
        "streams": {s: e.record() for s, e in enc.items()},
        "bound_bytes": round((entropy_bits(idx_counts) + binary_entropy_bits(nnz, n)) / 8, 1),
    }
    payload = {s: e.data for s, e in enc.items()}
    payload["codebook"] = codebook.detach().cpu().to(torch.float32).contiguous().numpy()
    return record, payload


def encode_pruned(
    weight: torch.Tensor, mask: torch.Tensor, *, layout: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encode one pruned, not quantized weight: kept values in the weight's dtype + positions, or dense if smaller.
    ``layout`` forces one of `LAYOUTS` (default: the smallest)."""
    dtype_name = str(weight.dtype).removeprefix("torch.")
    if dtype_name not in _TORCH_DTYPES:
        raise CodecError(f"pruned weight has dtype {weight.dtype}; supported: {', '.join(_TORCH_DTYPES)}")
    w = weight.detach().cpu().contiguous().reshape(-1)
    m = _flat_numpy(mask).astype(bool, copy=False)
    n, nnz = len(m), int(m.sum())
    itemsize = w.element_size()
    # Values travel as raw bytes (bf16 has no numpy dtype).
    wbytes = w.view(torch.uint8).numpy().reshape(n, itemsize) if n else np.zeros((0, itemsize), np.uint8)

    dense = _Layout("dense")
    dense.fixed_bytes = n * itemsize
    bitmap = _Layout("bitmap")
    bitmap.fixed_bytes = nnz * itemsize
    bitmap.streams["positions"] = (lambda: m.view(np.uint8), np.array([n - nnz, nnz]), 2)
    escape, gap_counts = _best_gap_escape(m)
    gaps = _Layout("gaps", {"escape": escape})
    gaps.fixed_bytes = nnz * itemsize
    gaps.streams["positions"] = (lambda: _gap_symbols(m, escape), gap_counts, escape + 1)
    # Deciding between these needs no trial encoding of the values: their size is fixed.
    chosen, enc = _choose([bitmap, gaps, dense], n, layout)
    values = wbytes if chosen.name == "dense" else wbytes[m]
    record = {
        "kind": "pruned",
        "shape": list(weight.shape),
        "dtype": dtype_name,
        "bits": itemsize * 8,
        "nonzeros": nnz,
        "layout": chosen.name,
        **chosen.extra,
        "streams": {s: e.record() for s, e in enc.items()},
        "bound_bytes": round(nnz * itemsize + binary_entropy_bits(nnz, n) / 8, 1),
    }
    payload = {s: e.data for s, e in enc.items()}
    payload["values"] = np.ascontiguousarray(values).reshape(-1)
    return record, payload


# --- decoding ----------------------------------------------------------------------------------------------------


def _decode_positions(record: dict[str, Any], payload: Mapping[str, np.ndarray], n: int) -> torch.Tensor:
    """The kept positions (int64, ascending) of a ``bitmap`` or ``gaps`` layout, checked against the record."""
    sym = decode_symbols(payload.get("positions", np.zeros(0, np.uint8)), record["streams"]["positions"])
    if record["layout"] == "bitmap":
        if len(sym) != n:
            raise StreamError(f"bitmap has {len(sym)} entries for {n} weights")
        pos = torch.from_numpy(sym).nonzero().reshape(-1)
    elif record["layout"] == "gaps":
        pos = torch.from_numpy(_positions_from_gaps(sym, int(record["escape"])))
        if len(pos) and int(pos[-1]) >= n:
            raise StreamError(f"gap stream reaches position {int(pos[-1])} of a tensor with {n} entries")
    else:
        raise StreamError(f"unknown layout {record['layout']!r}; known: {', '.join(LAYOUTS)}")
    if len(pos) != int(record["nonzeros"]):
        raise StreamError(f"{len(pos)} kept positions, the record says {record['nonzeros']}")
    return pos


def decode_tensor(record: dict[str, Any], payload: Mapping[str, np.ndarray]) -> torch.Tensor:
    """Rebuild one compressed tensor from its header record and payload arrays (inverse of ``encode_*``).

    A quantized weight comes out bit for bit as the quantized model computes it, ``codebook[indices] * mask`` with
    index 0 at pruned positions (``QuantView``'s convention): kept entries are ``codebook[i]``, pruned ones
    ``codebook[0] * 0.0`` -- the same float ops, done as one gather."""
    shape = tuple(int(s) for s in record["shape"])
    n = math.prod(shape)
    layout = record["layout"]

    def stream(name: str) -> torch.Tensor:
        return torch.from_numpy(
            decode_symbols(payload.get(name, np.zeros(0, np.uint8)), record["streams"][name])
        )

    if record["kind"] == "quantized":
        k = 1 << int(record["bits"])
        codebook = torch.from_numpy(np.asarray(payload["codebook"], np.float32).copy())
        if codebook.numel() != k:
            raise StreamError(f"codebook has {codebook.numel()} values, expected {k}")
        zero = codebook[:1] * 0.0
        if layout == "dense":
            sym = stream("symbols")
            if len(sym) != n:
                raise StreamError(f"{len(sym)} symbols for {n} weights")
            table = torch.cat([codebook, zero])  # symbol k = pruned
            out = torch.empty(n, dtype=torch.float32)
            for sl in chunks(n, CHUNK):
                out[sl] = table[sym[sl].long()]
            return out.reshape(shape)
        pos = _decode_positions(record, payload, n)
        nz = stream("indices")
        if len(nz) != len(pos):
            raise StreamError(f"{len(nz)} indices for {len(pos)} kept weights")
        out = zero.expand(n).clone()
        out[pos] = codebook[nz.long()]
        return out.reshape(shape)

    if record["kind"] == "pruned":
        dtype = _TORCH_DTYPES[record["dtype"]]
        values = torch.from_numpy(np.asarray(payload["values"], np.uint8).copy()).view(dtype)
        if layout == "dense":
            if values.numel() != n:
                raise StreamError(f"{values.numel()} values for {n} weights")
            return values.reshape(shape)
        pos = _decode_positions(record, payload, n)
        if values.numel() != len(pos):
            raise StreamError(f"{values.numel()} values for {len(pos)} kept weights")
        out = torch.zeros(n, dtype=dtype)
        out[pos] = values
        return out.reshape(shape)
    raise StreamError(f"unknown tensor kind {record['kind']!r}")


# --- the file ----------------------------------------------------------------------------------------------------


def _tensor_checksum(name: str, t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    flat = t.contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_checksum(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


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

    def add(name: str, t: torch.Tensor) -> None:
        tensors[name] = t

    for key, (module, name) in plain_state_entries(model).items():
        if SEP in key:
            raise CodecError(f"{path}: state-dict key {key!r} contains {SEP!r}, which the format reserves")
        view = quantized_view(module) if name == "weight" else None
        mask = prune_mask(module) if name == "weight" and view is None else None
        if view is not None:
            rec, payload = encode_quantized(view.codebook, view.indices, view.mask, view.bits, view.mode)
        elif mask is not None:
            rec, payload = encode_pruned(effective_weight(module).detach(), mask)
        else:
            value = _plain_value(module, name).cpu()
            if value.dtype not in (*_TORCH_DTYPES.values(),) and value.is_floating_point():
                raise CodecError(f"{path}: tensor {key!r} has unsupported dtype {value.dtype}")
            add(key, value.contiguous())
            records[key] = {"kind": "dense"}
            continue
        records[key] = rec
        for sname, arr in payload.items():
            if arr.size:
                add(f"{key}{SEP}{sname}", torch.from_numpy(np.ascontiguousarray(arr)))

    # Tied or view tensors share storage, which safetensors refuses: give each stored tensor its own.
    seen: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            tensors[name] = t.clone()
        seen.add(ptr)

    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "plan": _plan_dict(plan),
        "groups": _groups_of(model, groups),
        "meta": user_meta,
        "tensors": records,
        "checksum": "blake2b-128 of name|dtype|shape|bytes",
        "checksums": {name: _tensor_checksum(name, t) for name, t in tensors.items()},
    }
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CodecError(f"{path}: meta and plan must be JSON-able (finite numbers, str keys): {e}") from e

    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name beside the target (same filesystem, so os.replace is atomic), created with the usual umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, tmp, metadata={META_KEY: text, META_CHECKSUM_KEY: _json_checksum(text)})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files 0600; give it the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return read_size_report(path)


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
    if META_KEY not in file_meta:
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
    if header.get("format") != FORMAT_NAME:
        raise CodecError(f"{path}: format {header.get('format')!r} is not {FORMAT_NAME!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise CodecError(
            f"{path}: format version {header.get('format_version')!r} is unknown; this reader knows version "
            f"{FORMAT_VERSION}"
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
    return header, index, 8 + hlen, size


def load_compressed(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model stored by `save_compressed`: every checksum is verified first, then the architecture is
    built through the registry and every state-dict tensor filled from the file. The module gets
    ``compression_meta`` = the header dict (format, architecture, plan, groups, meta, per-tensor records)."""
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
                t = f.get_tensor(name)
                if _tensor_checksum(name, t) != sums[name]:
                    raise CodecError(
                        f"{path}: checksum mismatch in tensor {name!r}: the file is damaged or altered"
                    )
                loaded[name] = t
    except CodecError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged index
        raise CodecError(f"{path}: cannot read the tensors ({type(e).__name__}: {e})") from e

    state: dict[str, torch.Tensor] = {}
    for key, rec in header["tensors"].items():
        if rec.get("kind") == "dense":
            state[key] = loaded[key]
            continue
        prefix = key + SEP
        payload = {n[len(prefix) :]: t.numpy() for n, t in loaded.items() if n.startswith(prefix)}
        try:
            state[key] = decode_tensor(rec, payload)
        except (StreamError, KeyError, ValueError, RuntimeError) as e:
            raise CodecError(f"{path}: tensor {key!r} does not decode ({type(e).__name__}: {e})") from e

    arch = header["architecture"]
    try:
        model, on_meta = _build_for_loading(arch["name"], arch.get("config", {}))
    except CodecError as e:
        raise CodecError(f"{path}: {e}") from e
    except Exception as e:
        raise CodecError(
            f"{path}: the builder of architecture {arch['name']!r} failed on config {arch.get('config')!r} "
            f"({type(e).__name__}: {e})"
        ) from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CodecError(
            f"{path}: the file's tensors do not fit architecture {arch['name']!r} {arch.get('config')}: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
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
