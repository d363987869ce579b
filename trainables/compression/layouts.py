"""How one compressed weight is stored: its layout (``dense``, ``bitmap`` or ``gaps``) and the streams it makes.

- a quantized weight (``quantize.quantized_view``) as its codebook plus, whichever is smallest for that layer,
  ``dense`` (one symbol per weight: the index, or an extra "zero" code where pruned), ``bitmap`` (a keep bitmap +
  the indices of the kept weights) or ``gaps`` (relative-index gaps as in Deep Compression, with an escape symbol
  for gaps too long for the alphabet, + the indices); each stream is coded by `streams.encode_symbols`
  (raw bits, zstd or ANS, the smallest); a channel-scaled weight (``QuantView.scale``) also stores its
  scales, one per output channel (``"scale": "channel"`` in the record, the ``scale`` tensor; float16 when every
  scale is a float16 value, as `quantize.channel_scales` makes them, ``"scale_dtype": "float16"``);
- a pruned, not quantized weight (``quantize.prune_mask``) as its kept values (stored in the weight's dtype) plus the
  positions (``bitmap`` or ``gaps``), or dense when that is smaller.

`encode_quantized` / `encode_pruned` return the tensor's JSON record and its payload arrays (stream name -> bytes);
`decode_tensor` is their inverse. Where those land in the file is `container`'s business; the record fields are
described in docs/artifact-format.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from trainables.compression.errors import CodecError
from trainables.compression.streams import (
    EXACT_LIMIT,
    EncodedStream,
    StreamError,
    binary_entropy_bits,
    check_stream_record,
    chunks,
    decode_symbols,
    encode_symbols,
    entropy_bits,
    raw_size,
    size_estimate,
    symbol_dtype,
)

LAYOUTS = ("dense", "bitmap", "gaps", "rowbitmap")
#: Row classes tried for the ``rowbitmap`` layout (1 = one byte model for the whole tensor).
_ROW_CLASSES = (1, 2, 4, 8, 16)
#: Float dtypes a weight may be stored in, by the name the records use.
FLOAT_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Longest gap alphabet tried for the ``gaps`` layout is 2**_MAX_GAP_BITS (the escape symbol is the last).
_MAX_GAP_BITS = 16


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


# --- the gaps layout ---------------------------------------------------------------------------------------------


def _gaps(mask: np.ndarray) -> Iterator[np.ndarray]:
    """The zero runs before each kept position of ``mask`` (int64), one array per chunk that keeps anything."""
    prev = -1
    for sl in chunks(len(mask)):
        pos = np.flatnonzero(mask[sl]) + sl.start
        if len(pos) == 0:
            continue
        yield np.diff(pos, prepend=prev) - 1
        prev = int(pos[-1])


def _gap_histogram(mask: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the gaps < cap and the list of longer gaps."""
    hist = np.zeros(cap, np.int64)
    big = []
    for g in _gaps(mask):
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
    """The gap stream: each gap g as (g // escape) escape symbols, then g % escape."""
    dtype = symbol_dtype(escape + 1)
    parts = []
    for g in _gaps(mask):
        q, r = np.divmod(g, escape)
        out = np.full(len(g) + int(q.sum()), escape, dtype)
        out[np.cumsum(q + 1) - 1] = r
        parts.append(out)
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _positions_from_gaps(symbols: np.ndarray, escape: int, n: int) -> np.ndarray:
    """Kept positions from a gap stream: a value r advances r + 1 places and keeps the last; an escape advances
    ``escape`` places and keeps none. int32 when the tensor allows (half the memory traffic of int64); a stream
    that reaches past the ``n`` entries of its tensor is refused before the running sum is taken, so it cannot
    wrap around."""
    dtype = np.int32 if n < (1 << 31) else np.int64
    advance = symbols.astype(dtype)
    advance += 1
    is_escape = symbols == escape
    has_escape = bool(is_escape.any())
    if has_escape:
        advance[is_escape] = escape
    total = int(advance.sum(dtype=np.int64))
    if total > n:
        raise StreamError(f"gap stream reaches position {total - 1} of a tensor with {n} entries")
    np.cumsum(advance, out=advance)
    advance -= 1
    if not has_escape:
        return advance
    escapes = np.flatnonzero(is_escape)
    if len(escapes) > len(symbols) >> 6:
        return advance[~is_escape]
    # Few escapes (the usual case): copy the runs between them, much cheaper than a boolean gather.
    bounds = np.concatenate([[-1], escapes, [len(symbols)]])
    return np.concatenate([advance[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1])


def _dense_symbols(indices: np.ndarray, mask: np.ndarray, zero_code: int) -> np.ndarray:
    out = np.empty(len(mask), symbol_dtype(zero_code + 1))
    for sl in chunks(len(mask)):
        out[sl] = np.where(mask[sl], indices[sl], zero_code)
    return out


# --- choosing a layout -------------------------------------------------------------------------------------------


class _Layout:
    """One way to store a tensor: named symbol streams (made lazily) plus tensors stored as they are."""

    def __init__(self, name: str, extra: dict[str, Any] | None = None, fixed_bytes: int = 0) -> None:
        self.name = name
        self.extra = extra or {}
        self.streams: dict[str, tuple[Callable[[], np.ndarray], np.ndarray, int]] = {}
        self.fixed_bytes = fixed_bytes

    def estimate(self) -> int:
        return self.fixed_bytes + sum(size_estimate(c, a) for _, c, a in self.streams.values())


def _position_layouts(m: np.ndarray, nnz: int, fixed_bytes: int) -> tuple[_Layout, _Layout]:
    """The ``bitmap`` and ``gaps`` layouts of keep-mask ``m`` (``nnz`` kept), each with its ``positions`` stream;
    ``fixed_bytes``: what both store as is besides their streams."""
    n = len(m)
    bitmap = _Layout("bitmap", fixed_bytes=fixed_bytes)
    bitmap.streams["positions"] = (lambda: m.view(np.uint8), np.array([n - nnz, nnz]), 2)
    escape, gap_counts = _best_gap_escape(m)
    gaps = _Layout("gaps", {"escape": escape}, fixed_bytes=fixed_bytes)
    gaps.streams["positions"] = (lambda: _gap_symbols(m, escape), gap_counts, escape + 1)
    return bitmap, gaps


def _row_split(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(rows, row_length)`` of a weight for the ``rowbitmap`` layout: rows = output channels (the first axis)."""
    if len(shape) < 2 or shape[0] < 2 or math.prod(shape) == 0:
        return None
    return shape[0], math.prod(shape[1:])


def _rowbitmap_layout(m: np.ndarray, shape: tuple[int, ...], fixed_bytes: int) -> _Layout | None:
    """The ``rowbitmap`` layout of keep-mask ``m``: rows sorted into C classes by how many weights they keep (equal
    row counts per class, C chosen by estimated size), each class's rows packed into bytes (8 weights a symbol, so
    the byte model sees their neighbourhood) and coded as a stream of its own, with its own symbol counts: the row
    class is the context. ``rows`` stores each row's class."""
    split = _row_split(shape)
    if split is None:
        return None
    rows, row_len = split
    m2 = m.reshape(rows, row_len)
    kept = np.count_nonzero(m2, axis=1)
    order = np.argsort(kept, kind="stable")
    per_row = None
    if row_len % 8 == 0:
        # Byte histograms per row once; a class's histogram is then a sum of rows.
        packed = np.packbits(m2, axis=1, bitorder="little")
        per_row = np.zeros((rows, 256), np.int64)
        for lo in range(0, rows, 1024):
            block = packed[lo : lo + 1024]
            ids = np.arange(len(block), dtype=np.int64)[:, None] * 256 + block
            per_row[lo : lo + 1024] = np.bincount(ids.reshape(-1), minlength=256 * len(block)).reshape(
                -1, 256
            )

    def class_counts(cls: np.ndarray, c: int) -> np.ndarray:
        sel = cls == c
        if per_row is not None:
            return per_row[sel].sum(0)
        return np.bincount(np.packbits(m2[sel].reshape(-1), bitorder="little"), minlength=256)

    best: tuple[int, int, np.ndarray, list[np.ndarray]] | None = None
    for classes in _ROW_CLASSES:
        if classes > rows:
            break
        cls = np.empty(rows, np.uint8)
        cls[order] = (np.arange(rows) * classes // rows).astype(np.uint8)
        counts = [class_counts(cls, c) for c in range(classes)]
        size = size_estimate(np.bincount(cls, minlength=classes), classes)
        size += sum(size_estimate(c, 256) for c in counts)
        if best is None or size < best[0]:
            best = (size, classes, cls, counts)
    assert best is not None
    _, classes, cls, counts = best
    layout = _Layout("rowbitmap", {"classes": classes}, fixed_bytes=fixed_bytes)
    layout.streams["rows"] = (lambda: cls, np.bincount(cls, minlength=classes), classes)
    for c in range(classes):
        layout.streams[f"positions.{c}"] = (
            lambda c=c: np.packbits(m2[cls == c].reshape(-1), bitorder="little"),
            counts[c],
            256,
        )
    return layout


def _choose(
    layouts: list[_Layout | None], n: int, force: str | None = None, allowed: tuple[str, ...] | None = None
) -> tuple[_Layout, dict[str, EncodedStream]]:
    """The layout with the fewest bytes: measured by encoding each one for small tensors, estimated from symbol
    counts for large ones (then only the winner is encoded). Earlier layouts win ties. ``force`` names the layout
    to use instead (tests, benchmarks). None entries (a layout the tensor's shape does not allow) are skipped."""
    if force is not None:
        if force not in LAYOUTS:
            raise ValueError(f"layout {force!r} is not one of {', '.join(LAYOUTS)}")
        layouts = [lay for lay in layouts if lay is not None and lay.name == force]
        if not layouts:
            raise ValueError(f"layout {force!r} does not apply to a tensor of this shape")
    layouts = [lay for lay in layouts if lay is not None and (allowed is None or lay.name in allowed)]
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


# --- encoding ----------------------------------------------------------------------------------------------------


def encode_quantized(
    codebook: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor,
    bits: int,
    mode: str,
    *,
    layout: str | None = None,
    allowed: tuple[str, ...] | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encode one quantized weight (``codebook[indices] * mask``, ``* scale[c]`` along dim 0 when ``scale`` is
    given): its header record and its payload arrays (stream name -> uint8 bytes, plus ``codebook`` float32 and
    ``scale`` float32). ``layout`` forces one of `LAYOUTS` (default: the smallest); ``allowed`` limits the choice
    to some of them (benchmarks: the format-1 layouts)."""
    k = 1 << bits
    if codebook.numel() != k:
        raise CodecError(f"codebook has {codebook.numel()} values, expected 2**bits = {k}")
    if indices.shape != mask.shape:
        raise CodecError(f"indices shape {tuple(indices.shape)} differs from mask shape {tuple(mask.shape)}")
    if scale is not None:
        scale = scale.detach().cpu().to(torch.float32).contiguous().reshape(-1)
        channels = _channels(tuple(indices.shape))
        if scale.numel() != channels:
            raise CodecError(f"scale has {scale.numel()} values, expected {channels} (dim 0 of the weight)")
        _check_scale_values(scale.numpy())
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
    bitmap, gaps = _position_layouts(m, nnz, fixed_bytes=0)
    rowbitmap = _rowbitmap_layout(m, tuple(indices.shape), fixed_bytes=0)
    index_stream = (lambda: idx_nz, idx_counts, k)
    for lay in (bitmap, gaps, rowbitmap):
        if lay is not None:
            lay.streams["indices"] = index_stream
    chosen, enc = _choose([dense, bitmap, gaps, rowbitmap], n, layout, allowed)

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
        "order0_bits": round(entropy_bits(idx_counts) + binary_entropy_bits(nnz, n), 1),
    }
    payload = {s: e.data for s, e in enc.items()}
    payload["codebook"] = codebook.detach().cpu().to(torch.float32).contiguous().numpy()
    if scale is not None:
        record["scale"] = "channel"
        half = scale.to(torch.float16)
        if torch.equal(half.to(torch.float32), scale):  # always, for `quantize.channel_scales`
            record["scale_dtype"] = "float16"
            payload["scale"] = half.numpy()
        else:
            payload["scale"] = scale.numpy()
    return record, payload


#: How a record's channel scales are stored (``"scale_dtype"``; absent = float32, the files written before float16
#: scales): the stored tensor's dtype.
_SCALE_DTYPES = {"float32": "F32", "float16": "F16"}


def _channels(shape: tuple[int, ...]) -> int:
    """How many per-channel scales a weight of ``shape`` has: its dim 0 (1 for a 0-d weight)."""
    return int(shape[0]) if shape else 1


def _check_scale_values(scale: np.ndarray) -> None:
    """Scales are finite and > 0 (the encoder's `channel_scales` makes them so); a file with others is damaged."""
    if scale.size and not (np.isfinite(scale).all() and (scale > 0).all()):
        raise CodecError("channel scales must be finite and > 0")


def encode_pruned(
    weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    layout: str | None = None,
    allowed: tuple[str, ...] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encode one pruned, not quantized weight: kept values in the weight's dtype + positions, or dense if smaller.
    ``layout`` forces one of `LAYOUTS` (default: the smallest); ``allowed`` limits the choice to some of them."""
    dtype_name = str(weight.dtype).removeprefix("torch.")
    if dtype_name not in FLOAT_DTYPES:
        raise CodecError(f"pruned weight has dtype {weight.dtype}; supported: {', '.join(FLOAT_DTYPES)}")
    w = weight.detach().cpu().contiguous().reshape(-1)
    m = _flat_numpy(mask).astype(bool, copy=False)
    n, nnz = len(m), int(m.sum())
    itemsize = w.element_size()
    # Values travel as raw bytes (bf16 has no numpy dtype).
    wbytes = w.view(torch.uint8).numpy().reshape(n, itemsize) if n else np.zeros((0, itemsize), np.uint8)

    dense = _Layout("dense", fixed_bytes=n * itemsize)
    bitmap, gaps = _position_layouts(m, nnz, fixed_bytes=nnz * itemsize)
    rowbitmap = _rowbitmap_layout(m, tuple(weight.shape), fixed_bytes=nnz * itemsize)
    # Deciding between these needs no trial encoding of the values: their size is fixed.
    chosen, enc = _choose([bitmap, gaps, rowbitmap, dense], n, layout, allowed)
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
        "order0_bits": round(8 * nnz * itemsize + binary_entropy_bits(nnz, n), 1),
    }
    payload = {s: e.data for s, e in enc.items()}
    payload["values"] = np.ascontiguousarray(values).reshape(-1)
    return record, payload


# --- decoding ----------------------------------------------------------------------------------------------------


def _check_int(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CodecError(f"{what} is {value!r}, expected an integer in {low}..{high}")
    return value


#: The escapes an encoder may choose for the ``gaps`` layout: 2**j - 1, j in 1.._MAX_GAP_BITS.
_ESCAPES = frozenset((1 << j) - 1 for j in range(1, _MAX_GAP_BITS + 1))


def check_record(record: Any, shape: tuple[int, ...], stored: Mapping[str, tuple[str, list[int]]]) -> None:
    """Check a compressed tensor's header record against the shape the architecture expects and the tensors the
    file stores for it (``stored``: stream name -> (safetensors dtype, shape)), so that decoding allocates nothing
    the tensor's shape does not call for. Raises `CodecError` naming the first fault."""
    if not isinstance(record, dict):
        raise CodecError(f"record {record!r} is not an object")
    kind, layout = record.get("kind"), record.get("layout")
    if record.get("shape") != list(shape):
        raise CodecError(f"record shape {record.get('shape')!r} is not the architecture's {list(shape)}")
    n = math.prod(shape)
    nnz = _check_int(record.get("nonzeros"), 0, n, "nonzeros")
    if layout not in LAYOUTS:
        raise CodecError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    streams = record.get("streams")
    if not isinstance(streams, dict):
        raise CodecError("record has no streams object")
    want: dict[str, tuple[int | tuple[int, int], int]] = {}
    if layout == "rowbitmap":
        split = _row_split(shape)
        if split is None:
            raise CodecError(
                f"layout 'rowbitmap' needs a weight of at least 2 x 1 entries, not {list(shape)}"
            )
        classes = _check_int(record.get("classes"), 1, max(_ROW_CLASSES), "classes")
        rows, row_len = split
        want["rows"] = (rows, classes)
        for c in range(classes):
            want[f"positions.{c}"] = ((0, (rows * row_len + 7) // 8), 256)
        # Each class's bytes follow from its row count (checked when decoded); all together they are at most one
        # byte per 8 weights plus one per class, so no set of records makes the decode allocate more.
        claimed = [streams.get(f"positions.{c}") for c in range(classes)]
        total = sum(r["n"] for r in claimed if isinstance(r, dict) and isinstance(r.get("n"), int))
        if total > (rows * row_len) // 8 + classes:
            raise CodecError(f"rowbitmap streams claim {total} bytes for {rows * row_len} weights")
    elif layout in ("bitmap", "gaps"):
        if layout == "bitmap":
            want["positions"] = (n, 2)
        else:
            escape = record.get("escape")
            if escape not in _ESCAPES or isinstance(escape, bool):
                raise CodecError(f"gap escape {escape!r} is not 2**j - 1 for j in 1..{_MAX_GAP_BITS}")
            want["positions"] = ((nnz, nnz + n // escape), escape + 1)
    if kind == "quantized":
        bits = _check_int(record.get("bits"), 1, 16, "bits")
        k = 1 << bits
        if layout == "dense":
            want["symbols"] = (n, k + 1)
        else:
            want["indices"] = (nnz, k)
        payload = {"codebook": ("F32", [k])}
        scale = record.get("scale")
        if scale is not None:
            if scale != "channel":
                raise CodecError(f"scale {scale!r} is not 'channel' (a layer-scaled record has no 'scale')")
            scale_dtype = record.get("scale_dtype", "float32")
            if scale_dtype not in _SCALE_DTYPES:
                raise CodecError(f"scale_dtype {scale_dtype!r} is not one of {', '.join(_SCALE_DTYPES)}")
            payload["scale"] = (_SCALE_DTYPES[scale_dtype], [_channels(shape)])
        elif "scale_dtype" in record:
            raise CodecError("scale_dtype is set on a record without channel scales")
    elif kind == "pruned":
        dtype = record.get("dtype")
        if dtype not in FLOAT_DTYPES:
            raise CodecError(f"pruned dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        itemsize = FLOAT_DTYPES[dtype].itemsize
        if record.get("bits") != 8 * itemsize:
            raise CodecError(f"bits {record.get('bits')!r} do not match dtype {dtype}")
        count = (n if layout == "dense" else nnz) * itemsize
        payload = {"values": ("U8", [count])} if count else {}
    else:
        raise CodecError(f"unknown tensor kind {kind!r}")
    if set(streams) != set(want):
        raise CodecError(f"layout {layout!r} needs streams {sorted(want)}, the record has {sorted(streams)}")
    for name, (count, alphabet) in want.items():
        try:
            rec = check_stream_record(streams[name], count, alphabet)
        except StreamError as e:
            raise CodecError(f"stream {name!r}: {e}") from e
        if rec["coder"] == "const" or rec["n"] == 0 or (rec["coder"] == "raw" and alphabet <= 1):
            continue
        size = raw_size(rec["n"], alphabet) if rec["coder"] == "raw" else None
        payload[name] = ("U8", [size] if size is not None else None)
    if set(stored) != set(payload):
        raise CodecError(f"stores tensors {sorted(stored)}, its record calls for {sorted(payload)}")
    for name, (dtype, want_shape) in payload.items():
        got_dtype, got_shape = stored[name]
        if got_dtype != dtype or len(got_shape) != 1 or (want_shape is not None and got_shape != want_shape):
            raise CodecError(
                f"tensor {name!r} is {got_dtype}{got_shape}, expected {dtype}{want_shape or '[any length]'}"
            )


def _decode_mask(record: dict[str, Any], sym: np.ndarray, n: int) -> np.ndarray:
    """Where the kept weights of a ``bitmap`` or ``gaps`` layout are, from its decoded ``positions`` stream: a bool
    mask (bitmap) or ascending int32/int64 positions (gaps), checked against the record's count."""
    nnz = int(record["nonzeros"])
    if record["layout"] == "rowbitmap":
        raise StreamError("a rowbitmap mask is rebuilt by _rowbitmap_mask")
    if record["layout"] == "bitmap":
        if len(sym) != n:
            raise StreamError(f"bitmap has {len(sym)} entries for {n} weights")
        where = sym.view(np.bool_)  # values checked < 2 by decode_symbols
        kept = int(np.count_nonzero(where))
    elif record["layout"] == "gaps":
        where = _positions_from_gaps(sym, int(record["escape"]), n)
        kept = len(where)
    else:
        raise StreamError(f"unknown layout {record['layout']!r}; known: {', '.join(LAYOUTS)}")
    if kept != nnz:
        raise StreamError(f"{kept} kept positions, the record says {nnz}")
    return where


#: Tensors this large are assembled in blocks on two threads (numpy's fill and masked store release the GIL).
_PARALLEL_FILL = 1 << 23


def _fill_masked(mask: np.ndarray, nz: np.ndarray, codebook: np.ndarray, zero: np.float32) -> np.ndarray:
    """float32 ``codebook[nz]`` where ``mask`` is True (in order), ``zero`` elsewhere."""
    n = len(mask)
    out = np.empty(n, np.float32)
    blocks = list(chunks(n))
    offsets = np.concatenate([[0], np.cumsum([np.count_nonzero(mask[b]) for b in blocks])])

    def fill(i: int) -> None:
        part, keep = out[blocks[i]], mask[blocks[i]]
        part.fill(zero)
        part[keep] = codebook[nz[offsets[i] : offsets[i + 1]]]

    if n < _PARALLEL_FILL:
        for i in range(len(blocks)):
            fill(i)
    else:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(fill, range(len(blocks))))
    return out


def _rowbitmap_mask(record: dict[str, Any], stream: Callable[[str], np.ndarray], n: int) -> np.ndarray:
    """The keep-mask (bool, n) of a ``rowbitmap`` layout from its ``rows`` and ``positions.<class>`` streams."""
    rows, row_len = _row_split(tuple(int(s) for s in record["shape"]))  # type: ignore[misc]
    classes = int(record["classes"])
    cls = stream("rows")
    if len(cls) != rows:
        raise StreamError(f"{len(cls)} row classes for {rows} rows")
    mask = np.empty((rows, row_len), np.bool_)
    for c in range(classes):
        sel = np.flatnonzero(cls == c)
        need = len(sel) * row_len
        packed = stream(f"positions.{c}")
        if len(packed) != (need + 7) // 8:
            raise StreamError(f"class {c} has {len(packed)} bytes for {len(sel)} rows of {row_len}")
        bits = np.unpackbits(packed, count=need, bitorder="little").view(np.bool_)
        mask[sel] = bits.reshape(len(sel), row_len)
    mask = mask.reshape(-1)
    kept = int(np.count_nonzero(mask))
    if kept != int(record["nonzeros"]):
        raise StreamError(f"{kept} kept positions, the record says {record['nonzeros']}")
    return mask


def decode_tensor(
    record: dict[str, Any],
    payload: Mapping[str, np.ndarray],
    decoded: Mapping[str, np.ndarray] | None = None,
) -> torch.Tensor:
    """Rebuild one compressed tensor from its header record and payload arrays (inverse of ``encode_*``).
    ``decoded``: streams already decoded (`decode_streams`), e.g. in parallel; the rest are decoded here.

    A quantized weight comes out bit for bit as the quantized model computes it, ``codebook[indices] * mask`` with
    index 0 at pruned positions (``QuantView``'s convention): kept entries are ``codebook[i]``, pruned ones
    ``codebook[0] * 0.0`` -- the same float ops, done as one gather."""
    shape = tuple(int(s) for s in record["shape"])
    n = math.prod(shape)
    layout = record["layout"]
    decoded = dict(decoded or {})

    def stream(name: str) -> np.ndarray:
        if name not in decoded:
            decoded[name] = decode_symbols(payload.get(name, np.zeros(0, np.uint8)), record["streams"][name])
        return decoded[name]

    if record["kind"] == "quantized":
        k = 1 << int(record["bits"])
        codebook = np.asarray(payload["codebook"], np.float32).reshape(-1)
        if codebook.size != k:
            raise StreamError(f"codebook has {codebook.size} values, expected {k}")
        zero = codebook[:1] * np.float32(0.0)
        scale = None
        if record.get("scale") is not None:
            scale = np.asarray(payload["scale"], np.float32).reshape(-1)
            if scale.size != _channels(shape):
                raise StreamError(f"{scale.size} channel scales for {_channels(shape)} channels")
            try:
                _check_scale_values(scale)
            except CodecError as e:
                raise StreamError(str(e)) from e
        if layout == "dense":
            sym = stream("symbols")
            if len(sym) != n:
                raise StreamError(f"{len(sym)} symbols for {n} weights")
            table = np.concatenate([codebook, zero])  # symbol k = pruned
            return _scaled(table[sym], scale, shape)
        nz = stream("indices")
        where = (
            _rowbitmap_mask(record, stream, n)
            if layout == "rowbitmap"
            else _decode_mask(record, stream("positions"), n)
        )
        if len(nz) != int(record["nonzeros"]):
            raise StreamError(f"{len(nz)} indices for {record['nonzeros']} kept weights")
        if where.dtype == np.bool_:
            return _scaled(_fill_masked(where, nz, codebook, zero[0]), scale, shape)
        out = np.full(n, zero[0], np.float32)
        out[where] = codebook[nz]
        return _scaled(out, scale, shape)

    if record["kind"] == "pruned":
        dtype = FLOAT_DTYPES[record["dtype"]]
        itemsize = dtype.itemsize
        values = np.asarray(payload.get("values", np.zeros(0, np.uint8)), np.uint8).reshape(-1)
        if layout == "dense":
            if values.size != n * itemsize:
                raise StreamError(f"{values.size // itemsize} values for {n} weights")
            return torch.from_numpy(values.copy()).view(dtype).reshape(shape)
        where = (
            _rowbitmap_mask(record, stream, n)
            if layout == "rowbitmap"
            else _decode_mask(record, stream("positions"), n)
        )
        if values.size != int(record["nonzeros"]) * itemsize:
            raise StreamError(f"{values.size // itemsize} values for {record['nonzeros']} kept weights")
        out = np.zeros((n, itemsize), np.uint8)
        out[where] = values.reshape(-1, itemsize)
        return torch.from_numpy(out.reshape(-1)).view(dtype).reshape(shape)
    raise StreamError(f"unknown tensor kind {record['kind']!r}")


def _scaled(flat: np.ndarray, scale: np.ndarray | None, shape: tuple[int, ...]) -> torch.Tensor:
    """The decoded float32 ``codebook[indices] * mask`` (flat), times ``scale[c]`` along dim 0 when there is one,
    in place: the second float32 product the quantized model does (`quantize._lookup`), so the result is bit for
    bit its weight."""
    if scale is not None:
        flat.reshape(_channels(shape), -1)[...] *= scale.reshape(-1, 1)
    return torch.from_numpy(flat).reshape(shape)


def record_streams(record: dict[str, Any]) -> list[str]:
    """The names of a compressed tensor's symbol streams (what `decode_symbols` decodes for it)."""
    return list(record.get("streams", {}))
