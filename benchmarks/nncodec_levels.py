"""NNCodec (MPEG NNC, DeepCABAC) on given integer levels: the reference column of ``bench_coders.py``.

Run by ``bench_coders.py --nncodec-python PATH`` in NNCodec's own venv (benchmark-only: it pins numpy 1.26, so it
is never a dependency of the product); needs nothing of this repository, only numpy and nncodec.

Input: an ``.npz`` of one int32 array per layer (the array's name is the state-dict key, its shape the weight's),
written by ``bench_coders.py``. A layer's levels are signed integers, 0 = pruned; ``bench_coders.value_rank_levels``
says how codebook indices become levels (value rank among the used codebook values, ±1 nearest zero).

Each layer is coded on its own with ``nncodec.tensor.encode(levels, {"approx_method": "uniform", "use_dq":
False})``: an int32 tensor is not re-quantized by NNCodec (its approximator "skips" int32 parameters), so DeepCABAC
codes exactly these levels; ``row_skipping`` (NNCodec's default here) lets it skip all-zero rows. The byte count is
the whole bitstream NNCodec returns (its NNR unit headers included: all its decoder needs to rebuild the levels).
The bitstream is decoded again with ``nncodec.tensor.decode`` and compared with the input; a mismatch exits 1.

Output: one JSON line per layer on stdout, as it is done -- ``{"layer", "bytes", "encode_s", "decode_s"}`` -- after
a first line ``{"nncodec": VERSION, "numpy": VERSION}``; ``--json FILE`` also writes ``{layer: {...}}`` at the end.

    .venv-nncodec/bin/python benchmarks/nncodec_levels.py LEVELS.npz [--only KEY,KEY] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time

import numpy as np

#: The settings the issue measured: levels in, levels out (no quantization by NNCodec, no dependent quantization).
NNCODEC_ARGS = {"approx_method": "uniform", "use_dq": False}


def code_layer(levels: np.ndarray, work_dir: str) -> tuple[int, float, float]:
    """``(bitstream bytes, encode s, decode s)`` of one layer's int32 levels; SystemExit if the round trip fails."""
    from nncodec import tensor as nnc_tensor  # lazy: ``--help`` works without NNCodec

    levels = np.ascontiguousarray(levels, dtype=np.int32)
    t0 = time.perf_counter()
    # ``results``: NNCodec also writes the bitstream to a file there (never into the caller's folder).
    bitstream = nnc_tensor.encode(levels, {**NNCODEC_ARGS, "results": work_dir})
    t1 = time.perf_counter()
    decoded = nnc_tensor.decode(bitstream)
    t2 = time.perf_counter()
    decoded = np.asarray(decoded)
    if decoded.shape != levels.shape or not np.array_equal(decoded.astype(np.int64), levels.astype(np.int64)):
        bad = int(np.count_nonzero(decoded.reshape(-1)[: levels.size] != levels.reshape(-1)[: decoded.size]))
        raise SystemExit(
            f"NNCodec round trip failed: decoded shape {decoded.shape} (expected {levels.shape}), "
            f"{bad} levels differ"
        )
    return len(bitstream), t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("levels", help=".npz of int32 levels per layer (written by bench_coders.py)")
    p.add_argument(
        "--only", default=None, help="comma-separated layer names (default: every array, in order)"
    )
    p.add_argument(
        "--json", default=None, help="also write {layer: {bytes, encode_s, decode_s}} to this file"
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="where NNCodec may write its bitstream files (default: a temp folder)",
    )
    args = p.parse_args(argv)
    versions = {"nncodec": importlib.metadata.version("nncodec"), "numpy": np.__version__}
    print(json.dumps(versions), flush=True)
    out: dict[str, dict] = {}
    with (
        np.load(args.levels) as npz,
        tempfile.TemporaryDirectory(prefix="nncodec-", dir=args.work_dir) as work_dir,
    ):
        names = list(npz.files) if args.only is None else args.only.split(",")
        missing = sorted(set(names) - set(npz.files))
        if missing:
            raise SystemExit(f"{args.levels}: no layer {', '.join(missing)} (has {', '.join(npz.files)})")
        for name in names:
            levels = npz[name]
            if levels.dtype != np.int32:
                raise SystemExit(f"{args.levels}: {name}: levels must be int32, got {levels.dtype}")
            try:
                nbytes, enc_s, dec_s = code_layer(levels, work_dir)
            except SystemExit as e:
                raise SystemExit(f"{args.levels}: {name}: {e}") from None
            out[name] = {"bytes": nbytes, "encode_s": round(enc_s, 3), "decode_s": round(dec_s, 3)}
            print(json.dumps({"layer": name, **out[name]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
