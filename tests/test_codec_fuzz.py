"""Mutated compressed files: each one is refused with a `CodecError` that names the file, or it decodes -- never a
crash, another exception type, or an allocation beyond twice the honest decode.

Seeded, a fixed number of mutations (no clock in the test: a loaded machine only makes it slower). Mutations whose checksums are left stale (byte flips in the header JSON or the payload,
truncations) must be refused or decode to exactly the original tensors. Mutations that recompute every checksum
(edited lengths, counts, index shapes and dtypes, swapped tensors, flipped payload bytes) model a crafted file: the unkeyed
checksums cannot catch those, so such a file may load, but only as a well-formed model of the architecture's shapes
(trusting a file is the release's sha256 and signature, docs/release.md).
"""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from torch import nn

from trainables.compression import container
from trainables.compression.architectures import register_architecture
from trainables.compression.codec import CodecError, load_compressed, save_compressed
from trainables.compression.prune import apply_mask
from trainables.compression.quantize import quantize_module

MUTATIONS = 1000


def _build(config: dict) -> nn.Module:
    c = config["channels"]
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.Conv2d(c, c, 3),
        nn.Conv2d(c, c, 1),
        nn.Flatten(),
        nn.Linear(c * 36, 10),
    )


register_architecture("fuzz-toy", _build)
META = {"architecture": {"name": "fuzz-toy", "config": {"channels": 8}}}


def _prune(module: nn.Module, sparsity: float) -> None:
    w = module.weight.detach()
    apply_mask(module, w.abs() > w.abs().flatten().kthvalue(int(sparsity * w.numel())).values)


def _model() -> nn.Module:
    """Every layout and kind: quantized weights at 0 / 50 / 95 % pruned, a pruned-only linear layer, dense tensors."""
    torch.manual_seed(0)
    model = _build({"channels": 8})
    quantize_module(model[0], "kmeans", 4)
    _prune(model[2], 0.5)
    quantize_module(model[2], "uniform", 5)
    _prune(model[3], 0.95)
    quantize_module(model[3], "kmeans", 3)
    _prune(model[5], 0.7)
    return model.eval()


def _split(data: bytes) -> tuple[dict, bytes]:
    """A version-3 file's full header (``index`` included, decompressed) and its payload bytes."""
    hlen = int.from_bytes(data[:8], "little")
    stored = json.loads(data[8 : 8 + hlen])
    (hs, he), (ps, pe) = (
        stored[t]["data_offsets"] for t in (container.HEADER_TENSOR, container.PAYLOAD_TENSOR)
    )
    header = json.loads(zstandard.ZstdDecompressor().decompress(data[8 + hlen + hs : 8 + hlen + he]))
    return header, data[8 + hlen + ps : 8 + hlen + pe]


def _reseal(header: dict, payload: bytes) -> bytes:
    """The file with the payload checksum and the header's checksums recomputed (a crafted file)."""
    return container.seal(header, payload)


def _numbers(obj, path=()):
    """Paths to every int in a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, (*path, i))
    elif isinstance(obj, int) and not isinstance(obj, bool):
        yield path


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes, bool]:
    """One mutation of the honest file: ``(kind, bytes, crafted)``; crafted files have recomputed checksums."""
    header, payload = _split(data)
    hlen = int.from_bytes(data[:8], "little")
    kind = rng.choice(
        ["flip_header", "flip_payload", "truncate", "edit_number", "edit_index", "swap", "crafted_flip"]
    )
    if kind == "flip_header":  # the safetensors header: the tensor index and the descriptor
        out = bytearray(data)
        out[rng.randrange(8, 8 + hlen)] ^= 1 << rng.randrange(8)
        return kind, bytes(out), False
    if kind == "flip_payload":  # the compressed header or the payload
        out = bytearray(data)
        out[rng.randrange(8 + hlen, len(data))] ^= 1 << rng.randrange(8)
        return kind, bytes(out), False
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))], False
    if kind == "edit_number":
        paths = list(_numbers(header["tensors"]))
        path = rng.choice(paths)
        old = _get(header["tensors"], path)
        new = rng.choice([old + 1, old - 1, old * 2, 0, -1, 1 << 40, old + rng.randrange(1, 1000)])
        _set(header["tensors"], path, new)
        return kind, _reseal(header, payload), True
    if kind == "edit_index":
        entry = rng.choice(header["index"])
        if rng.random() < 0.2:
            entry[1] = rng.choice(["F32", "U8", "I64", "F16", "U16", "X9"])
        elif entry[2]:
            i = rng.randrange(len(entry[2]))
            entry[2][i] = rng.choice([entry[2][i] + 1, entry[2][i] - 1, entry[2][i] * 4, 1 << 40, 0, -1])
        else:
            entry[2] = [rng.randrange(1, 1 << 40)]
        return kind, _reseal(header, payload), True
    if kind == "swap":
        i, j = rng.sample(range(len(header["index"])), 2)
        index = header["index"]
        index[i][0], index[j][0] = index[j][0], index[i][0]
        return kind, _reseal(header, payload), True
    out = bytearray(payload)
    if out:
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return kind, _reseal(header, bytes(out)), True


def _state_bytes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], bytes]]:
    return {
        k: (tuple(v.shape), v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for k, v in model.state_dict().items()
    }


def _peak(fn) -> tuple[object, int]:
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    out = fn()
    return out, tracemalloc.get_traced_memory()[1] - start


def test_mutated_files_are_refused_or_decode_identically(tmp_path: Path) -> None:
    honest = tmp_path / "honest.safetensors"
    save_compressed(_model(), None, honest, META)
    data = honest.read_bytes()
    reference = _state_bytes(load_compressed(honest))
    shapes = {k: s for k, (s, _) in reference.items()}
    target = tmp_path / "mutated.safetensors"
    rng = random.Random(20240614)
    tracemalloc.start()
    try:
        honest_peak = max(_peak(lambda: load_compressed(honest))[1] for _ in range(3))
        tally: dict[str, list[int]] = {}
        done = 0
        while done < MUTATIONS:
            kind, mutated, crafted = _mutate(data, rng)
            target.write_bytes(mutated)
            counts = tally.setdefault(kind, [0, 0])
            try:
                model, peak = _peak(lambda: load_compressed(target))
            except CodecError as e:
                assert str(target) in str(e), f"{kind}: the error does not name the file: {e}"
                counts[0] += 1
            except BaseException as e:  # a Rust panic is a BaseException: that is a crash too
                pytest.fail(f"mutation {done} ({kind}) raised {type(e).__name__}: {e}")
            else:
                counts[1] += 1
                got = _state_bytes(model)
                assert peak <= 2 * honest_peak + (64 << 10), (
                    f"{kind}: decode allocated {peak} B, honest {honest_peak} B"
                )
                if crafted:
                    assert {k: s for k, (s, _) in got.items()} == shapes, kind
                else:
                    assert got == reference, f"mutation {done} ({kind}) decoded to different tensors"
            done += 1
    finally:
        tracemalloc.stop()
    assert done == MUTATIONS >= 1000
    # Every kind was tried, and most files were refused.
    assert set(tally) == {
        "flip_header",
        "flip_payload",
        "truncate",
        "edit_number",
        "edit_index",
        "swap",
        "crafted_flip",
    }
    print(f"{done} mutations (refused, decoded) by kind: {tally}")
    refused = sum(r for r, _ in tally.values())
    assert refused > 0.6 * done, tally


def test_zstd_frame_claiming_a_huge_size_is_refused_before_decompressing() -> None:
    import zstandard

    from trainables.compression.streams import StreamError, decode_symbols

    frame = zstandard.ZstdCompressor(level=3).compress(bytes(1 << 20))
    with pytest.raises(StreamError, match="zstd frame holds 1048576 bytes, expected 100"):
        decode_symbols(np.frombuffer(frame, np.uint8), {"coder": "zstd", "n": 100, "alphabet": 256})
