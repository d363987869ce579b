"""Lossless coding of one stream of small non-negative integer symbols, for the compressed artifact (layouts.py).

A stream (quantization indices, a position bitmap, relative-index gaps) is stored with whichever coder makes it
smallest:

- ``const``: every symbol is the same; nothing is stored but that value (in the record).
- ``raw``: bit-packed at ``ceil(log2(alphabet))`` bits per symbol, little-endian bit order.
- ``zstd``: Zstandard over the symbols as uint8/uint16/uint32 (wins on streams with repeats and runs).
- ``ans``: the ``constriction`` ANS coder with a categorical model of the stream's own symbol counts. The counts
  (LEB128 varints) are stored in front of the code words, so decoding needs nothing but the payload and its record.
  For i.i.d.-like streams (quantization indices) this lands within a few bytes of the empirical entropy.

Streams up to ``EXACT_LIMIT`` symbols are encoded with every coder and the smallest result is kept. Longer ones
pick by exact sizes where those are known without encoding (``raw``, the ANS size from the entropy of the counts)
and try zstd on a sample first, so a 134M-symbol stream is encoded once instead of three times. The stream
records and payloads as stored in the file are described in docs/artifact-format.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np
import zstandard

CODERS = ("const", "raw", "zstd", "ans")
#: Streams this long or shorter are encoded with every coder and the smallest result is kept.
EXACT_LIMIT = 1 << 22
#: Chunk size for work over long streams, so no stream-sized int64/int32 temporaries are made.
CHUNK = 1 << 22
#: Symbols of a long stream compressed with zstd first, to decide whether the full zstd run can win.
_ZSTD_SAMPLE = 1 << 20


class StreamError(ValueError):
    """A stream payload that does not decode to what its record says."""


@dataclass
class EncodedStream:
    """One coded stream: ``data`` (uint8 payload as stored in the file) and the record needed to decode it."""

    coder: str
    data: np.ndarray
    n: int
    alphabet: int
    table_bytes: int = 0
    value: int = 0

    def record(self) -> dict[str, Any]:
        """JSON-able description kept in the artifact header (payload bytes live in the file's tensors)."""
        rec: dict[str, Any] = {"coder": self.coder, "n": self.n, "alphabet": self.alphabet}
        if self.coder == "ans":
            rec["table_bytes"] = self.table_bytes
        if self.coder == "const":
            rec["value"] = self.value
        return rec


def chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)`` of at most ``size`` elements."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def bit_width(alphabet: int) -> int:
    """Bits per symbol of the ``raw`` coder: enough for symbols ``0 .. alphabet-1``."""
    return max(0, int(alphabet - 1).bit_length())


def symbol_dtype(alphabet: int) -> np.dtype:
    """The smallest unsigned dtype that holds symbols ``0 .. alphabet-1``."""
    if alphabet <= 1 << 8:
        return np.dtype(np.uint8)
    if alphabet <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<u4")


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical zero-order entropy of a stream with these symbol counts, in bits for the whole stream."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    total = c.sum()
    if total <= 0:
        return 0.0
    return float(-(c * np.log2(c / total)).sum())


def binary_entropy_bits(ones: int, n: int) -> float:
    """Entropy of an i.i.d. bit stream of length ``n`` with ``ones`` ones, in bits for the whole stream."""
    return entropy_bits(np.array([n - ones, ones]))


# --- LEB128 varints: the ANS frequency table ---------------------------------------------------------------------


def _varint_encode(values: np.ndarray) -> bytes:
    out = bytearray()
    for v in values.tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _varint_len(values: np.ndarray) -> int:
    v = np.asarray(values, dtype=np.uint64)
    length = np.ones(v.shape, dtype=np.int64)
    for shift in range(7, 64, 7):
        length += v >= (np.uint64(1) << np.uint64(shift))
    return int(length.sum())


def _varint_decode(data: bytes, count: int) -> tuple[np.ndarray, int]:
    values = np.zeros(count, dtype=np.int64)
    pos = 0
    for i in range(count):
        v = shift = 0
        while True:
            if pos >= len(data):
                raise StreamError("frequency table ends early")
            if shift > 56:  # no honest count needs more than 8 varint bytes (and int64 holds no more)
                raise StreamError("frequency table holds a count too large for a stream")
            b = data[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        values[i] = v
    return values, pos


# --- raw bit packing ---------------------------------------------------------------------------------------------


def _pack(symbols: np.ndarray, width: int) -> np.ndarray:
    n = len(symbols)
    if width == 0 or n == 0:
        return np.zeros(0, np.uint8)
    if width == 8:
        return symbols.astype(np.uint8)
    if width == 16:
        return symbols.astype("<u2").view(np.uint8)
    parts = []
    # Chunks are a multiple of 8 symbols, so every chunk ends on a byte boundary and the parts concatenate.
    for sl in chunks(n, CHUNK):
        s = np.ascontiguousarray(symbols[sl], dtype="<u4")
        bits = np.unpackbits(s.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :width]
        parts.append(np.packbits(bits.reshape(-1), bitorder="little"))
    return np.concatenate(parts)


def _unpack(data: np.ndarray, n: int, width: int, dtype: np.dtype) -> np.ndarray:
    if width == 0 or n == 0:
        return np.zeros(n, dtype)
    need = (n * width + 7) // 8
    if len(data) != need:
        raise StreamError(
            f"raw stream holds {len(data)} bytes, expected {need} for {n} symbols of {width} bits"
        )
    if width == 8:
        return data.astype(dtype, copy=True)
    if width == 16:
        return data.view("<u2").astype(dtype)
    out = np.empty(n, dtype)
    for sl in chunks(n, CHUNK):
        m = sl.stop - sl.start
        b0, b1 = sl.start * width // 8, (sl.start * width + m * width + 7) // 8
        bits = np.unpackbits(data[b0:b1], bitorder="little")[: m * width].reshape(m, width)
        full = np.zeros((m, 32), np.uint8)
        full[:, :width] = bits
        out[sl] = np.packbits(full, axis=1, bitorder="little").view("<u4").reshape(-1)
    return out


# --- coders ------------------------------------------------------------------------------------------------------

_ZSTD_LEVEL_SMALL = 19
_ZSTD_LEVEL_BIG = 3


#: Inputs up to this many bytes are always tried at level 19; longer ones (up to 1 MiB) only when level 3 already
#: beats the other coders (`_ZSTD_TRY_19` x their bytes): level 19 runs at ~1 MB/s, and on streams near their
#: entropy (where ANS wins) it gains nothing over level 3 -- 16 such streams were most of a VGG16 encode.
_ZSTD_ALWAYS_19 = 128 << 10
_ZSTD_TRY_19 = 1.0


def _zstd(symbols: np.ndarray, alphabet: int, level: int | None = None) -> np.ndarray:
    raw = np.ascontiguousarray(symbols, dtype=symbol_dtype(alphabet)).tobytes()
    small = len(raw) <= (1 << 20)
    if level is None:
        level = _ZSTD_LEVEL_SMALL if small else _ZSTD_LEVEL_BIG
    # Long inputs on every core: the frame format (and the decoded bytes) are the same as single-threaded.
    cctx = zstandard.ZstdCompressor(level=level, threads=0 if small else -1)
    return np.frombuffer(bytearray(cctx.compress(raw)), np.uint8)


def _zstd_exact(symbols: np.ndarray, alphabet: int, others: int) -> np.ndarray:
    """zstd of a stream of up to `EXACT_LIMIT` symbols: level 19 for short inputs; for longer ones level 3, and
    level 19 as well only if level 3 is within `_ZSTD_TRY_19` x ``others`` (the best other coder's bytes)."""
    nbytes = len(symbols) * symbol_dtype(alphabet).itemsize
    if nbytes <= _ZSTD_ALWAYS_19 or nbytes > (1 << 20):
        return _zstd(symbols, alphabet)
    fast = _zstd(symbols, alphabet, _ZSTD_LEVEL_BIG)
    if len(fast) > _ZSTD_TRY_19 * others:
        return fast
    slow = _zstd(symbols, alphabet, _ZSTD_LEVEL_SMALL)
    return slow if len(slow) <= len(fast) else fast


def _ans_model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    # Probabilities derive from the stored integer counts by the same float64 division on both sides.
    c = np.asarray(counts, dtype=np.float64)
    return constriction.stream.model.Categorical(c / c.sum(), perfect=False)


def _ans_encode(symbols: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, int]:
    used = int(np.flatnonzero(counts).max()) + 1
    table = _varint_encode(np.asarray(counts[:used], dtype=np.int64))
    model = _ans_model(counts[:used])
    coder = constriction.stream.stack.AnsCoder()
    # A stack coder: push the chunks last-first so they decode first-first.
    starts = list(chunks(len(symbols)))
    for sl in reversed(starts):
        coder.encode_reverse(np.ascontiguousarray(symbols[sl], dtype=np.int32), model)
    words = coder.get_compressed().astype("<u4")
    header = np.frombuffer(len(table).to_bytes(4, "little") + used.to_bytes(4, "little") + table, np.uint8)
    return np.concatenate([header, words.view(np.uint8)]), len(table) + 8


def _ans_decode(data: np.ndarray, n: int, alphabet: int, dtype: np.dtype) -> np.ndarray:
    if len(data) < 8:
        raise StreamError("ANS stream is shorter than its 8-byte table header")
    tlen = int.from_bytes(data[:4].tobytes(), "little")
    used = int.from_bytes(data[4:8].tobytes(), "little")
    # Checked before anything is allocated from them: at most one count per symbol of the alphabet, each at most
    # 10 varint bytes, and all inside the payload.
    if not 1 <= used <= alphabet or tlen > 10 * used or 8 + tlen > len(data):
        raise StreamError(
            f"ANS table header is corrupt ({used} counts in {tlen} bytes; alphabet {alphabet}, "
            f"payload {len(data)} bytes)"
        )
    counts, consumed = _varint_decode(data[8 : 8 + tlen].tobytes(), used)
    # The counts are the stream's own symbol counts: they sum to its length.
    if consumed != tlen or int(counts.sum()) != n or counts[used - 1] <= 0:
        raise StreamError("ANS frequency table is corrupt (its counts do not add up to the stream)")
    body = data[8 + tlen :]
    if len(body) % 4:
        raise StreamError("ANS code words are not a whole number of 32-bit words")
    if len(body) < 4:
        raise StreamError("ANS stream has no code words")
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(body).view("<u4").astype(np.uint32))
    model = _ans_model(counts)
    out = np.empty(n, dtype)
    for sl in chunks(n):
        out[sl] = coder.decode(model, sl.stop - sl.start)
    if not coder.is_empty():
        raise StreamError("ANS stream has code words left over after the last symbol")
    return out


def ans_size_estimate(counts: np.ndarray) -> int:
    """Bytes the ``ans`` coder needs for a stream with these counts: table + entropy + the coder's final state."""
    counts = np.asarray(counts)
    nz = np.flatnonzero(counts)
    if len(nz) == 0:
        return 8
    used = int(nz.max()) + 1
    return 8 + _varint_len(counts[:used]) + 4 * math.ceil(entropy_bits(counts) / 32) + 8


def raw_size(n: int, alphabet: int) -> int:
    """Bytes of the ``raw`` coder for ``n`` symbols."""
    return (n * bit_width(alphabet) + 7) // 8


def size_estimate(counts: np.ndarray, alphabet: int) -> int:
    """A close estimate of the best size (``const``/``raw``/``ans``; zstd left out) without encoding."""
    counts = np.asarray(counts)
    n = int(counts.sum())
    if np.count_nonzero(counts) <= 1:
        return 0
    return min(raw_size(n, alphabet), ans_size_estimate(counts))


def encode_symbols(symbols: np.ndarray, alphabet: int, counts: np.ndarray | None = None) -> EncodedStream:
    """Encode ``symbols`` (ints in ``0 .. alphabet-1``) with the coder that makes them smallest (module doc)."""
    symbols = np.asarray(symbols).reshape(-1)
    n = len(symbols)
    if counts is None:
        counts = np.bincount(symbols, minlength=alphabet) if n else np.zeros(alphabet, np.int64)
    if len(counts) > alphabet:
        raise ValueError(f"symbols reach {len(counts) - 1}, outside the alphabet 0..{alphabet - 1}")
    present = np.flatnonzero(counts)
    if len(present) <= 1:
        return EncodedStream("const", np.zeros(0, np.uint8), n, alphabet, value=int(present[0]) if n else 0)

    candidates: list[EncodedStream] = []
    if n <= EXACT_LIMIT:
        # raw's size is known without packing: pack only if it wins (ties: raw, then zstd, then ans).
        packed_size = raw_size(n, alphabet)
        data, tbytes = _ans_encode(symbols, counts)
        zstd = _zstd_exact(symbols, alphabet, min(packed_size, len(data)))
        if packed_size <= min(len(zstd), len(data)):
            return EncodedStream("raw", _pack(symbols, bit_width(alphabet)), n, alphabet)
        candidates.append(EncodedStream("zstd", zstd, n, alphabet))
        candidates.append(EncodedStream("ans", data, n, alphabet, table_bytes=tbytes))
        return min(candidates, key=lambda c: len(c.data))

    sizes = {"raw": raw_size(n, alphabet), "ans": ans_size_estimate(counts)}
    best = min(sizes, key=sizes.__getitem__)
    # zstd's size is only known by running it: try a sample, and the whole stream only if the sample can win.
    sample = symbols[:_ZSTD_SAMPLE]
    sample_counts = np.bincount(sample, minlength=alphabet)
    p = counts / counts.sum()
    sample_ans = -(sample_counts[sample_counts > 0] * np.log2(p[sample_counts > 0])).sum() / 8
    sample_best = min(sample_ans, raw_size(len(sample), alphabet))
    if len(_zstd(sample, alphabet)) < 0.98 * sample_best:
        z = EncodedStream("zstd", _zstd(symbols, alphabet), n, alphabet)
        if len(z.data) < sizes[best]:
            return z
    if best == "raw":
        return EncodedStream("raw", _pack(symbols, bit_width(alphabet)), n, alphabet)
    data, tbytes = _ans_encode(symbols, counts)
    return EncodedStream("ans", data, n, alphabet, table_bytes=tbytes)


def check_stream_record(record: Any, n: int | tuple[int, int], alphabet: int) -> dict[str, Any]:
    """``record`` if it is a well-formed stream record of ``n`` symbols (an int, or an inclusive ``(low, high)``
    range) over exactly ``alphabet``; else `StreamError` saying what is wrong. Nothing is allocated from a record
    that has not passed this."""
    if not isinstance(record, dict):
        raise StreamError(f"stream record {record!r} is not an object")
    coder, count, alpha = record.get("coder"), record.get("n"), record.get("alphabet")
    if coder not in CODERS:
        raise StreamError(f"unknown coder {coder!r}; known: {', '.join(CODERS)}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise StreamError(f"stream length {count!r} is not a non-negative integer")
    low, high = (n, n) if isinstance(n, int) else n
    if not low <= count <= high:
        want = f"{low}" if low == high else f"{low}..{high}"
        raise StreamError(f"stream claims {count} symbols, the tensor needs {want}")
    if alpha != alphabet or isinstance(alpha, bool):
        raise StreamError(f"stream alphabet {alpha!r} is not the {alphabet} this layout uses")
    if coder == "const":
        value = record.get("value", 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < max(1, alphabet):
            raise StreamError(f"const stream value {value!r} is outside the alphabet 0..{alphabet - 1}")
    return record


def zstd_exact(data: bytes, expected: int, what: str) -> bytes:
    """The ``expected`` bytes a zstd frame holds, or `StreamError`: the frame must state its content size and it
    must be exactly ``expected`` (``what`` names them in the message), checked before anything is allocated."""
    try:
        size = zstandard.frame_content_size(data[:18])
    except zstandard.ZstdError as e:
        raise StreamError(f"zstd stream has no valid frame header: {e}") from e
    if size != expected:
        raise StreamError(f"zstd frame holds {size} bytes, expected {expected} for {what}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise StreamError(f"zstd stream does not decompress: {e}") from e
    if len(raw) != expected:
        raise StreamError(f"zstd stream holds {len(raw)} bytes, expected {expected}")
    return raw


def decode_symbols(data: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Inverse of `encode_symbols`: the symbols as the smallest unsigned dtype of the record's alphabet.

    Allocates at most ``n`` symbols (plus the payload's own size): a zstd frame must state its content size, and
    it must be exactly what ``n`` symbols take."""
    try:
        coder, n, alphabet = record["coder"], int(record["n"]), int(record["alphabet"])
    except (KeyError, TypeError, ValueError) as e:
        raise StreamError(f"stream record {record!r} lacks coder/n/alphabet") from e
    if n < 0 or alphabet < 1:
        raise StreamError(f"stream record {record!r} has a negative length or an empty alphabet")
    dtype = symbol_dtype(alphabet)
    data = np.asarray(data, np.uint8).reshape(-1)
    if coder == "const":
        value = int(record.get("value", 0))
        if not 0 <= value < alphabet:
            raise StreamError(f"const stream value {value} is outside the alphabet 0..{alphabet - 1}")
        if len(data):
            raise StreamError(f"const stream carries {len(data)} payload bytes, expected none")
        return np.full(n, value, dtype)
    if coder == "raw":
        out = _unpack(data, n, bit_width(alphabet), dtype)
    elif coder == "zstd":
        raw = zstd_exact(data.tobytes(), n * dtype.itemsize, f"{n} symbols")
        out = np.frombuffer(bytearray(raw), dtype)
    elif coder == "ans":
        out = _ans_decode(data, n, alphabet, dtype)
    else:
        raise StreamError(f"unknown coder {coder!r}; known: {', '.join(CODERS)}")
    if n and int(out.max()) >= alphabet:
        raise StreamError(f"decoded symbol {int(out.max())} is outside the alphabet 0..{alphabet - 1}")
    return out
