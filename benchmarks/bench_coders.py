"""Coders side by side on the same quantized weights: format-1 layouts, the current coder, zstd -19 and NNCodec.

For every compressed layer of the given artifacts (files written by ``save_compressed``: ``bench_poster.py --out
DIR``, ``bench_codec.py --keep DIR``, or a trial's ``model.vlad.safetensors``), the layer's levels (codebook index
per weight, and its keep-mask) are read back from the file and coded again:

- **order-0**: the record's order-0 entropy (index stream + keep pattern), the reference the sizes are read against;
- **format 1**: the layouts of format version 1 (``dense``, ``bitmap``, ``gaps``) with today's stream coders;
- **current**: every layout of this format version (adds ``rowbitmap``: row classes as contexts of a byte-wise
  keep-mask), the smallest kept;
- **zstd -19**: plain Zstandard level 19 of the dense level map (one uint8/uint16 per weight: its index, or 2^b
  where pruned), what anyone gets for free. Multi-threaded, the same output format.
- **NNCodec** (``--nncodec-python PATH``; default: not run): the MPEG NNC reference coder (DeepCABAC) on the
  layer's signed integer levels (`value_rank_levels`: 0 = pruned, otherwise the value rank among the used codebook
  values, ±1 nearest zero), run by ``benchmarks/nncodec_levels.py`` in NNCodec's own venv (benchmark-only: it pins
  numpy 1.26), which checks that the bitstream decodes to the same levels. Its bytes are the whole bitstream (its
  own headers included). A layer that takes longer than ``--nncodec-timeout`` is reported as timed out.

Payload bytes only, headers of our format left out (the same for all); every coded column includes the codebook
(2^b float32) and, where the layer has them, the per-channel scales (float32), so the columns compare the same
information: for NNCodec they are added to its bitstream. Each file ends with a line for the whole file: its bytes
on disk against its order-0 size (``inspect``'s file / order-0), and the file as it would be with the quantized
layers' stored payload replaced by the current coder's or by NNCodec's bytes.

    .venv/bin/python benchmarks/bench_coders.py FILE [FILE ...] [--layers whiten.weight,...] [--no-zstd]
        [--nncodec-python .venv-nncodec/bin/python] [--nncodec-timeout 600]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

from trainables.compression.container import read_tensors
from trainables.compression.layouts import decode_tensor, encode_quantized
from trainables.compression.report import read_size_report, record_order0_bytes
from trainables.compression.streams import symbol_dtype

FORMAT1_LAYOUTS = ("dense", "bitmap", "gaps")
NNCODEC_SCRIPT = Path(__file__).with_name("nncodec_levels.py")


def _levels(
    path: Path, key: str, rec: dict, stored: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codebook, indices int32, mask, scale or None)`` of one quantized layer, recovered exactly from its decoded
    weight (decoded without its per-channel scales, so each kept weight is exactly one codebook value)."""
    prefix = key + "::"
    payload = {n[len(prefix) :]: t.numpy() for n, t in stored.items() if n.startswith(prefix)}
    unscaled = {k: v for k, v in rec.items() if k != "scale"}
    w = decode_tensor(unscaled, payload).reshape(-1)
    codebook = torch.from_numpy(np.asarray(payload["codebook"], np.float32).copy())
    scale = None
    if rec.get("scale") is not None:
        scale = torch.from_numpy(np.asarray(payload["scale"], np.float32).copy())
    mask = w != 0
    order = torch.argsort(codebook)
    pos = torch.searchsorted(codebook[order], w).clamp_(max=len(codebook) - 1)
    indices = order[pos].to(torch.int32).masked_fill_(~mask, 0)
    if not torch.equal(codebook[indices] * mask, w) or int(mask.sum()) != rec["nonzeros"]:
        raise SystemExit(f"{path}: {key}: cannot recover the levels (a kept weight equal to 0?)")
    shape = tuple(rec["shape"])
    return codebook, indices.reshape(shape), mask.reshape(shape), scale


def value_rank_levels(
    codebook: np.ndarray, indices: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Signed integer levels of one quantized layer for an integer coder (NNCodec): ``(levels int32, order,
    negatives)``.

    0 = pruned. A kept weight's level is the rank of its codebook value among the codebook values that kept weights
    use, counted outward from zero: the used negative values are -1 (nearest zero) down to ``-negatives``, the used
    values >= 0 are +1 (nearest zero) up. So the order of the values is preserved (a larger level never has a
    smaller value; equal codebook values, if any, keep one level each) and the magnitudes are as small as the used
    values allow: DeepCABAC codes a level as a significance flag, a sign and a unary-then-Exp-Golomb magnitude,
    cheapest for small magnitudes, and after magnitude pruning the frequent values are the ones nearest the
    pruning threshold, which get ±1. Unused codebook values (e.g. a ``uniform`` grid's values inside the pruned
    band) get no level, so they leave no gap.
    ``order``: the used codebook indices by value, ascending (level L is ``order[L + negatives]`` for L < 0,
    ``order[L + negatives - 1]`` for L > 0); with the codebook it is all a decoder needs (`indices_from_levels`)."""
    codebook = np.asarray(codebook, np.float32).reshape(-1)
    indices = np.asarray(indices)
    mask = np.asarray(mask, bool)
    if indices.shape != mask.shape:
        raise ValueError(f"indices shape {indices.shape} differs from mask shape {mask.shape}")
    used = np.zeros(codebook.size, bool)
    used[np.unique(indices[mask])] = True
    order = np.flatnonzero(used)
    order = order[np.argsort(codebook[order], kind="stable")]
    negatives = int(np.count_nonzero(codebook[order] < 0))
    level_of_index = np.zeros(codebook.size, np.int32)
    ranks = np.arange(order.size, dtype=np.int32) - negatives
    level_of_index[order] = np.where(ranks < 0, ranks, ranks + 1)
    levels = np.where(mask, level_of_index[indices], 0).astype(np.int32)
    return levels, order, negatives


def indices_from_levels(
    levels: np.ndarray, order: np.ndarray, negatives: int
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `value_rank_levels`: ``(indices, mask)`` with index 0 at pruned positions."""
    levels = np.asarray(levels, np.int64)
    mask = levels != 0
    kept = levels[mask]
    indices = np.zeros(levels.shape, np.int64)
    indices[mask] = np.asarray(order)[np.where(kept < 0, kept + negatives, kept + negatives - 1)]
    return indices, mask


def run_nncodec(
    python: str, levels_npz: Path, layers: list[str], timeout_s: float
) -> tuple[dict[str, int | str], dict[str, str]]:
    """NNCodec's bitstream bytes per layer (or ``"timed out after N s"``), and the versions it reported.

    One ``nncodec_levels.py`` process codes the layers in order, one JSON line each; a layer with no answer within
    ``timeout_s`` is marked, the process killed, and a new one goes on with the layers after it."""
    out: dict[str, int | str] = {}
    versions: dict[str, str] = {}
    todo = list(layers)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    while todo:
        # --work-dir: inside our temp folder, so a killed coder leaves nothing behind.
        cmd = [python, str(NNCODEC_SCRIPT), str(levels_npz), "--only", ",".join(todo)]
        cmd += ["--work-dir", str(levels_npz.parent)]
        # stderr to a file, not a pipe: a full pipe would stall the coder and read as a timeout.
        with tempfile.TemporaryFile("w+") as errors:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
            lines: queue.Queue[str | None] = queue.Queue()

            def pump(stream=proc.stdout, q=lines) -> None:
                for line in stream:
                    q.put(line)
                q.put(None)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            # The first layer's clock also covers the start-up (NNCodec imports torch): a few seconds.
            deadline = time.monotonic() + timeout_s
            timed_out = False
            while todo:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    layer = todo.pop(0)
                    out[layer] = f"timed out after {timeout_s:.0f} s"
                    print(f"#   NNCodec {layer}: {out[layer]}", file=sys.stderr, flush=True)
                    timed_out = True
                    break
                if line is None:
                    proc.wait()
                    errors.seek(0)
                    raise SystemExit(
                        f"{' '.join(cmd)} exited {proc.returncode} before {todo[0]} was coded:\n"
                        f"{errors.read()[-3000:]}"
                    )
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue  # NNCodec's own prints
                if "nncodec" in msg:
                    versions = msg
                elif msg.get("layer") == todo[0]:
                    out[todo.pop(0)] = int(msg["bytes"])
                    print(
                        f"#   NNCodec {msg['layer']}: {msg['bytes']:,} B, encode {msg['encode_s']:.1f} s, "
                        f"decode {msg['decode_s']:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    deadline = time.monotonic() + timeout_s
            if timed_out:
                proc.kill()  # a new process takes the layers after the one that timed out
            proc.wait()
            reader.join()
            proc.stdout.close()
    return out, versions


def _bytes(payload: dict[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in payload.values())


def _ratio(a: float, b: float | str) -> str:
    return f"{a / b:.4f}" if isinstance(b, (int, float)) and b else ""


def _cell(v: float | str) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)


HEADER = (
    "| file | layer | params | pruned % | bits | order-0 B | format 1 B | current B | zstd -19 B | NNCodec B | "
    "format 1 / order-0 | current / order-0 | current / format 1 | current / NNCodec | current layout |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _total_row(name: str, label: str, rows: list[dict]) -> str:
    t = {c: sum(r[c] for r in rows) for c in ("order0", "v1", "now", "zstd")}
    nn = [r["nncodec"] for r in rows]
    nnc: float | str = sum(nn) if all(isinstance(v, int) for v in nn) else "incomplete"
    if any(v == "not run" for v in nn):
        nnc = "not run"
    return (
        f"| {name} | **{label}** | | | | {t['order0']:,.0f} | {t['v1']:,.0f} | {t['now']:,.0f} | "
        f"{_cell(t['zstd'])} | {_cell(nnc)} | {_ratio(t['v1'], t['order0'])} | {_ratio(t['now'], t['order0'])} | "
        f"{_ratio(t['now'], t['v1'])} | {_ratio(t['now'], nnc)} | |"
    )


def bench_file(path: Path, args: argparse.Namespace, wanted: set[str] | None) -> list[str]:
    """The table rows of one artifact (per layer, totals, the whole file)."""
    header, stored = read_tensors(path)
    rows: list[dict] = []
    nn_levels: dict[str, np.ndarray] = {}
    for key, rec in header["tensors"].items():
        if rec["kind"] != "quantized" or (wanted is not None and key not in wanted):
            continue
        codebook, indices, mask, scale = _levels(path, key, rec, stored)
        bits, mode = int(rec["bits"]), str(rec["mode"])
        t0 = time.perf_counter()
        scaled = {} if scale is None else {"scale": scale}
        _, v1 = encode_quantized(codebook, indices, mask, bits, mode, allowed=FORMAT1_LAYOUTS, **scaled)
        now_rec, now = encode_quantized(codebook, indices, mask, bits, mode, **scaled)
        side_bytes = 4 * codebook.numel() + (0 if scale is None else 4 * scale.numel())
        zstd_bytes = math.nan
        if not args.no_zstd:
            k = 1 << bits
            levels = torch.where(mask, indices, k).reshape(-1).numpy().astype(symbol_dtype(k + 1))
            cctx = zstandard.ZstdCompressor(level=19, threads=-1)
            zstd_bytes = len(cctx.compress(levels.tobytes())) + side_bytes
        if args.nncodec_python:
            levels, order, negatives = value_rank_levels(codebook.numpy(), indices.numpy(), mask.numpy())
            back, back_mask = indices_from_levels(levels, order, negatives)
            if not (np.array_equal(back_mask, mask.numpy()) and np.array_equal(back, indices.numpy())):
                raise SystemExit(f"{path}: {key}: the levels do not map back to the indices")
            nn_levels[key] = levels
        print(f"#   {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        n = math.prod(rec["shape"])
        rows.append(
            {
                "key": key,
                "n": n,
                "pruned": 100 * (1 - rec["nonzeros"] / n),
                "bits": bits,
                "order0": record_order0_bytes(now_rec),
                "v1": _bytes(v1),
                "now": _bytes(now),
                "zstd": zstd_bytes,
                "side": side_bytes,
                "layout": now_rec["layout"],
                "nncodec": "not run",
            }
        )
    if nn_levels:
        with tempfile.TemporaryDirectory(prefix="bench-coders-") as tmp:
            npz = Path(tmp) / "levels.npz"
            np.savez(npz, **nn_levels)
            del nn_levels
            coded, versions = run_nncodec(
                args.nncodec_python, npz, [r["key"] for r in rows], args.nncodec_timeout
            )
        print(f"#   NNCodec versions: {versions}", file=sys.stderr, flush=True)
        for r in rows:
            v = coded[r["key"]]
            r["nncodec"] = v + r["side"] if isinstance(v, int) else v
    lines = []
    for r in rows:
        lines.append(
            f"| {path.name} | {r['key']} | {r['n']:,} | {r['pruned']:.2f} | {r['bits']} | {r['order0']:,.0f} | "
            f"{r['v1']:,} | {r['now']:,} | {_cell(r['zstd'])} | {_cell(r['nncodec'])} | "
            f"{_ratio(r['v1'], r['order0'])} | {_ratio(r['now'], r['order0'])} | {_ratio(r['now'], r['v1'])} | "
            f"{_ratio(r['now'], r['nncodec'])} | {r['layout']} |"
        )
    lines.append(_total_row(path.name, "all quantized layers", rows))
    done = [r for r in rows if isinstance(r["nncodec"], int)]
    if args.nncodec_python and 0 < len(done) < len(rows):
        lines.append(_total_row(path.name, f"the {len(done)} layers NNCodec coded", done))
    lines.append(_file_line(path, rows, wanted))
    return lines


def _file_line(path: Path, rows: list[dict], wanted: set[str] | None) -> str:
    """The whole file against its order-0 size, as stored and with the quantized layers re-coded."""
    report = read_size_report(path)
    t = report.totals
    stored = sum(lay.payload_bytes for lay in report.layers if lay.name in {r["key"] for r in rows})
    parts = [f"{t['file_bytes']:,} B on disk, order-0 {t['order0_bytes']:,.0f} B, file / order-0 "]
    parts.append(f"{t['order0_ratio']:.4f}")
    now = t["file_bytes"] - stored + sum(r["now"] for r in rows)
    parts.append(f"; with the current coder {now:,} B ({now / t['order0_bytes']:.4f})")
    nn = [r["nncodec"] for r in rows]
    if nn and all(isinstance(v, int) for v in nn):
        with_nn = t["file_bytes"] - stored + sum(nn)
        parts.append(f"; with NNCodec {with_nn:,} B ({with_nn / t['order0_bytes']:.4f})")
    scope = "" if wanted is None else " (only the --layers re-coded)"
    return f"\n{path.name}, whole file{scope}: {''.join(parts)}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument(
        "--layers", default=None, help="comma-separated state-dict keys (default: every compressed one)"
    )
    p.add_argument("--no-zstd", action="store_true", help="leave out the (slow) zstd -19 column")
    p.add_argument(
        "--nncodec-python",
        default=None,
        metavar="PATH",
        help="python of a venv with nncodec installed (e.g. .venv-nncodec/bin/python); default: NNCodec not run",
    )
    p.add_argument(
        "--nncodec-timeout",
        type=float,
        default=600.0,
        help="seconds NNCodec may take per layer (default 600)",
    )
    args = p.parse_args(argv)
    if args.nncodec_python and not Path(args.nncodec_python).is_file():
        p.error(f"--nncodec-python {args.nncodec_python}: no such file (the python of NNCodec's venv)")
    wanted = set(args.layers.split(",")) if args.layers else None
    for name in args.files:
        print(HEADER)
        for line in bench_file(Path(name), args, wanted):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
