"""Encode and decode time of the VGG16-size artifact (VGG16 + NetVLAD K=64 + PCA-4096, 149M parameters).

The model is generated with realistic weights (``bench_poster.realistic_netvlad``), pruned and quantized at one of
the poster's rows (default: 8 bits, 51.77 % pruned, k-means), then timed: ``save_compressed`` (encode, including
reading the quantized views, checksums and the atomic write) and ``load_compressed`` (decode: checks, entropy
decoding, rebuilding the model). The decoded model is checked against the quantized one on a random image.

Generating and k-means-quantizing 149M weights takes minutes, so a run can keep its artifact (``--keep DIR``: the
file plus the reference output) and later runs start from it (``--from FILE``): the quantized model is rebuilt from
the file (codebook + indices + mask, the k-means parametrization as ``quantize_module`` registers it), re-encoded
and decoded. The re-encoded file must decode to the same tensors, bit for bit, and the decoded model must give the
kept reference output exactly. ``--from`` uses only the codec's public functions, so the same command times an older
checkout of the codec (put it first on ``PYTHONPATH``) against this one on the same file.

    .venv/bin/python benchmarks/bench_codec.py [--backbone vgg16] [--bits 8] [--pruned 51.77] [--mode kmeans]
    .venv/bin/python benchmarks/bench_codec.py --keep /tmp/vgg16-art        # ... and keep the artifact
    .venv/bin/python benchmarks/bench_codec.py --from /tmp/vgg16-art/model.safetensors [--skip-encode]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_poster import compress, realistic_netvlad  # noqa: E402  (imports faiss before torch itself)
from torch.nn.utils import parametrize  # noqa: E402

from trainables.compression.codec import load_compressed, save_compressed  # noqa: E402
from trainables.compression.container import read_tensors  # noqa: E402
from trainables.compression.quantize import KMeansWeight  # noqa: E402

MIB = 1 << 20


def _input() -> torch.Tensor:
    return torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def rebuild_quantized(path: Path) -> tuple[torch.nn.Module, dict]:
    """The quantized model stored in ``path``, with its k-means parametrizations registered again: every quantized
    weight's indices are recovered from its decoded values and codebook (exact matches only), its mask from the
    stored zeros. Returns ``(model, header)``."""
    header, stored = read_tensors(path)
    model = load_compressed(path)
    for key, rec in header["tensors"].items():
        if rec["kind"] != "quantized":
            continue
        if rec["mode"] != "kmeans":
            raise SystemExit(f"--from rebuilds k-means layers only; {key} is {rec['mode']}")
        module = model.get_submodule(key.rsplit(".", 1)[0])
        codebook = stored[f"{key}::codebook"]
        w = module.weight.detach()
        mask = w != 0
        order = torch.argsort(codebook)
        pos = torch.searchsorted(codebook[order], w.reshape(-1)).clamp_(max=len(codebook) - 1)
        indices = order[pos].reshape(w.shape).to(torch.int32).masked_fill_(~mask, 0)
        if not torch.equal(codebook[indices] * mask, w) or int(mask.sum()) != rec["nonzeros"]:
            raise SystemExit(f"{key}: cannot recover the indices from the decoded weight")
        param = KMeansWeight(indices, mask, int(rec["bits"]), codebook)
        parametrize.register_parametrization(module, "weight", param, unsafe=True)
    return model, header


def _row(
    name: str, args: argparse.Namespace, t: dict, encode_s: float | None, decode_s: float, diff: float
) -> str:
    dense_mib = t["dense_fp32_bytes"] / MIB
    enc = f"{encode_s:.2f}" if encode_s is not None else "-"
    enc_rate = f"{dense_mib / encode_s:.0f}" if encode_s else "-"
    return (
        f"| {name} | {args.bits} | {100 * t['sparsity']:.2f} | {args.mode} | "
        f"{t['parameters']:,} | {t['memory_mib']:.2f} | {t['overhead_bytes']:,} | {enc} | {decode_s:.2f} | "
        f"{enc_rate} / {dense_mib / decode_s:.0f} | {diff:.1e} | "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--pruned", type=float, default=51.77)
    p.add_argument("--mode", default="kmeans")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", default=None, help="keep the artifact and the reference output in this folder")
    p.add_argument("--from", dest="src", default=None, help="start from an artifact kept with --keep")
    p.add_argument("--skip-encode", action="store_true", help="with --from: time the decode only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        "| model | bits | pruned % | mode | parameters | file MiB | header B | encode s | decode s | dense MiB/s enc / dec | "
        "max abs diff | peak RSS GiB |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    x = _input()

    if args.src is not None:
        src = Path(args.src)
        ref = torch.load(src.with_suffix(".ref.pt"))
        encode_s = None
        with tempfile.TemporaryDirectory() as tmp:
            path = src
            if not args.skip_encode:
                model, header = rebuild_quantized(src)
                args.backbone = header["architecture"]["config"].get("backbone", "?")
                expected = {k: v.clone() for k, v in model.state_dict().items()}
                meta = {"architecture": header["architecture"], **header.get("meta", {})}
                path = Path(tmp) / "model.safetensors"
                t0 = time.perf_counter()
                save_compressed(model, None, path, meta)
                encode_s = time.perf_counter() - t0
                del model
                gc.collect()
            t0 = time.perf_counter()
            loaded = load_compressed(path).eval()
            decode_s = time.perf_counter() - t0
            if not args.skip_encode:
                plain = load_compressed(src).state_dict()
                got = loaded.state_dict()
                for k, v in plain.items():
                    if not torch.equal(
                        got[k].view(torch.uint8) if got[k].dtype.is_floating_point else got[k],
                        v.view(torch.uint8) if v.dtype.is_floating_point else v,
                    ):
                        print(f"# re-encoded tensor {k} differs", file=sys.stderr)
                        return 1
                del expected
            with torch.no_grad():
                diff = float((loaded(x) - ref).abs().max())
            from trainables.compression.report import read_size_report

            t = read_size_report(path).totals
        cfg = loaded.compression_meta["architecture"]["config"]
        print(
            _row(
                f"{cfg.get('backbone', '?')}+NetVLAD+PCA-{cfg.get('whitening_dim', '?')}",
                args,
                t,
                encode_s,
                decode_s,
                diff,
            )
        )
        return 0 if diff == 0.0 else 1

    model = realistic_netvlad(args.backbone)
    compress(model, args.pruned, args.bits, args.mode)
    with torch.no_grad():
        ref = model(x)
    meta = {"architecture": {"name": "netvlad", "config": model.config_dict()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.safetensors"
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
        if args.keep:
            torch.save(ref, path.with_suffix(".ref.pt"))
            (folder / "settings.json").write_text(json.dumps(vars(args)))
    print(_row(f"{args.backbone}+NetVLAD+PCA-4096", args, report.totals, encode_s, decode_s, diff))
    for r in report.layers:
        if r.kind != "dense":
            print(f"#   {r.name}: {r.encoding}, {r.payload_bytes:,} B", file=sys.stderr)
    return 0 if diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
