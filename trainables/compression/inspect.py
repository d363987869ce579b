"""``python -m trainables.compression.inspect FILE [--json]``: the size report of a compressed artifact.

Reads only the file's header (nothing is decoded, no model is built) and prints the per-tensor table -- parameters,
nonzeros, sparsity, bits, encoding, bytes spent, bits per nonzero, entropy bound, poster-style bytes -- and the
totals, ``memory_mib`` (file bytes / 2**20) first among them. ``--json`` prints the same as JSON. Exit status 2 with
the reason on stderr when the file is not a readable artifact.
"""

from __future__ import annotations

import argparse
import json
import sys

from trainables.compression.codec import CodecError
from trainables.compression.report import read_size_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainables.compression.inspect",
        description="Per-layer size report of a compressed model file (vladsweep-compressed safetensors).",
    )
    parser.add_argument("file", help="the compressed .safetensors file")
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a markdown table"
    )
    args = parser.parse_args(argv)
    try:
        report = read_size_report(args.file)
    except CodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
