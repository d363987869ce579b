"""Encode and decode time of the VGG16-size artifact (VGG16 + NetVLAD K=64 + PCA-4096, 149M parameters).

The model is generated with realistic weights (``bench_poster.realistic_netvlad``), pruned and quantized at one of
the poster's rows (default: 8 bits, 51.77 % pruned, k-means), then timed: ``save_compressed`` (encode, including
reading the quantized views, checksums and the atomic write) and ``load_compressed`` (decode: checks, entropy
decoding, rebuilding the model). The decoded model is checked against the quantized one on a random image.

    .venv/bin/python benchmarks/bench_codec.py [--backbone vgg16] [--bits 8] [--pruned 51.77] [--mode kmeans]
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_poster import compress, realistic_netvlad  # noqa: E402  (imports faiss before torch itself)

from trainables.compression.codec import load_compressed, save_compressed  # noqa: E402

MIB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--pruned", type=float, default=51.77)
    p.add_argument("--mode", default="kmeans")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = realistic_netvlad(args.backbone)
    compress(model, args.pruned, args.bits, args.mode)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    meta = {"architecture": {"name": "netvlad", "config": model.config_dict()}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        t0 = time.perf_counter()
        report = save_compressed(model, None, path, meta)
        encode_s = time.perf_counter() - t0
        del model
        gc.collect()
        t0 = time.perf_counter()
        loaded = load_compressed(path).eval()
        decode_s = time.perf_counter() - t0
        with torch.no_grad():
            diff = float((loaded(x) - ref).abs().max())
    t = report.totals
    dense_mib = t["dense_fp32_bytes"] / MIB
    print(
        "| model | bits | pruned % | mode | parameters | file MiB | header B | encode s | decode s | dense MiB/s enc / dec | "
        "max abs diff | peak RSS GiB |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    print(
        f"| {args.backbone}+NetVLAD+PCA-4096 | {args.bits} | {100 * t['sparsity']:.2f} | {args.mode} | "
        f"{t['parameters']:,} | {t['memory_mib']:.2f} | {t['overhead_bytes']:,} | {encode_s:.1f} | {decode_s:.1f} | "
        f"{dense_mib / encode_s:.0f} / {dense_mib / decode_s:.0f} | {diff:.1e} | "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.2f} |"
    )
    for r in report.layers:
        if r.kind != "dense":
            print(f"#   {r.name}: {r.encoding}, {r.payload_bytes:,} B", file=sys.stderr)
    return 0 if diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
