"""``python -m trainables.compression.inspect FILE [--json] [--verify]``: the size report of a compressed artifact.

Without ``--verify`` it reads only the file's header (nothing is decoded, no model is built) and prints the
per-tensor table -- parameters, nonzeros, sparsity, bits, encoding, bytes spent, bits per nonzero, order-0 entropy,
coded / order-0, poster-style bytes -- and the totals, ``memory_mib`` (file bytes / 2**20) first among them.
``--verify`` also checks every record against the stored tensors, the payload's checksum (a version-1/2 file: every tensor's), and that every tensor
decodes (a header alone cannot show a damaged payload). ``--json`` prints the same as JSON. Exit status 2 with the
reason on stderr when the file is not a readable artifact or fails verification. The file format:
docs/artifact-format.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from trainables.compression.codec import verify_file
from trainables.compression.errors import CodecError
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
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also verify the checksums and decode every tensor (reads the whole file)",
    )
    args = parser.parse_args(argv)
    try:
        report = read_size_report(args.file)
        if args.verify:
            verify_file(args.file)
    except CodecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = report.to_dict()
        out["verified"] = bool(args.verify)
        print(json.dumps(out, indent=2))
    else:
        print(report.to_markdown())
        print(
            "- verified: every checksum and every tensor decodes"
            if args.verify
            else "- header only (payload not checked; --verify checks checksums and decoding)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
