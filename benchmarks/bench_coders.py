"""Coders side by side on the same quantized weights: format-1 layouts, the current coder, and plain zstd -19.

For every compressed layer of the given artifacts (files written by ``save_compressed``: ``bench_poster.py --out
DIR``, ``bench_codec.py --keep DIR``, or a trial's ``model.vlad.safetensors``), the layer's levels (codebook index
per weight, and its keep-mask) are read back from the file and coded again:

- **order-0**: the record's order-0 entropy (index stream + keep pattern), the reference the sizes are read against;
- **format 1**: the layouts of format version 1 (``dense``, ``bitmap``, ``gaps``) with today's stream coders;
- **current**: every layout of this format version (adds ``rowbitmap``: row classes as contexts of a byte-wise
  keep-mask), the smallest kept;
- **zstd -19**: plain Zstandard level 19 of the dense level map (one uint8/uint16 per weight: its index, or 2^b
  where pruned), what anyone gets for free. Multi-threaded, the same output format.

Payload bytes only (codebook included in the coded columns; headers left out: they are the same for all). NNCodec
is not run here: it is benchmark-only and needs its own venv (numpy 1.26).

    .venv/bin/python benchmarks/bench_coders.py FILE [FILE ...] [--layers whiten.weight,...] [--no-zstd]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors import safe_open

from trainables.compression.codec import read_header
from trainables.compression.layouts import decode_tensor, encode_quantized
from trainables.compression.report import record_order0_bytes
from trainables.compression.streams import symbol_dtype

FORMAT1_LAYOUTS = ("dense", "bitmap", "gaps")


def _levels(path: Path, key: str, rec: dict, index: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codebook, indices int32, mask)`` of one quantized layer, recovered exactly from its decoded weight."""
    prefix = key + "::"
    with safe_open(str(path), framework="np") as f:
        payload = {n[len(prefix) :]: f.get_tensor(n) for n in index if n.startswith(prefix)}
    w = decode_tensor(rec, payload).reshape(-1)
    codebook = torch.from_numpy(np.asarray(payload["codebook"], np.float32).copy())
    mask = w != 0
    order = torch.argsort(codebook)
    pos = torch.searchsorted(codebook[order], w).clamp_(max=len(codebook) - 1)
    indices = order[pos].to(torch.int32).masked_fill_(~mask, 0)
    if not torch.equal(codebook[indices] * mask, w) or int(mask.sum()) != rec["nonzeros"]:
        raise SystemExit(f"{path}: {key}: cannot recover the levels (a kept weight equal to 0?)")
    shape = tuple(rec["shape"])
    return codebook, indices.reshape(shape), mask.reshape(shape)


def _bytes(payload: dict[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in payload.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument(
        "--layers", default=None, help="comma-separated state-dict keys (default: every compressed one)"
    )
    p.add_argument("--no-zstd", action="store_true", help="leave out the (slow) zstd -19 column")
    args = p.parse_args(argv)
    wanted = set(args.layers.split(",")) if args.layers else None
    print(
        "| file | layer | params | pruned % | bits | order-0 B | format 1 B | current B | zstd -19 B | "
        "format 1 / order-0 | current / order-0 | current / format 1 | current layout |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in args.files:
        path = Path(name)
        header, index, _, _ = read_header(path)
        totals = dict.fromkeys(("order0", "v1", "now", "zstd"), 0.0)
        for key, rec in header["tensors"].items():
            if rec["kind"] != "quantized" or (wanted is not None and key not in wanted):
                continue
            codebook, indices, mask = _levels(path, key, rec, index)
            bits, mode = int(rec["bits"]), str(rec["mode"])
            t0 = time.perf_counter()
            _, v1 = encode_quantized(codebook, indices, mask, bits, mode, allowed=FORMAT1_LAYOUTS)
            now_rec, now = encode_quantized(codebook, indices, mask, bits, mode)
            order0 = record_order0_bytes(now_rec)
            zstd_bytes = math.nan
            if not args.no_zstd:
                k = 1 << bits
                levels = torch.where(mask, indices, k).reshape(-1).numpy().astype(symbol_dtype(k + 1))
                cctx = zstandard.ZstdCompressor(level=19, threads=-1)
                zstd_bytes = len(cctx.compress(levels.tobytes())) + 4 * k
            print(f"#   {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            n = math.prod(rec["shape"])
            b1, b2 = _bytes(v1), _bytes(now)
            for t, v in zip(totals, (order0, b1, b2, zstd_bytes)):
                totals[t] += v
            print(
                f"| {path.name} | {key} | {n:,} | {100 * (1 - rec['nonzeros'] / n):.2f} | {bits} | {order0:,.0f} | "
                f"{b1:,} | {b2:,} | {zstd_bytes:,.0f} | {b1 / order0:.4f} | {b2 / order0:.4f} | {b2 / b1:.4f} | "
                f"{now_rec['layout']} |",
                flush=True,
            )
        t = totals
        print(
            f"| {path.name} | **all quantized layers** | | | | {t['order0']:,.0f} | {t['v1']:,.0f} | {t['now']:,.0f} | "
            f"{t['zstd']:,.0f} | {t['v1'] / t['order0']:.4f} | {t['now'] / t['order0']:.4f} | "
            f"{t['now'] / t['v1']:.4f} | |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
