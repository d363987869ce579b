"""The container's own bytes: the same artifacts written as format version 2 and as version 3, side by side.

Version 2 stores every stream as a safetensors tensor of its own (a JSON index entry each), the header as plain
JSON metadata and a 128-bit checksum per tensor; version 3 packs every stream into one ``payload`` tensor under one
checksum and stores the header zstd-compressed (docs/artifact-format.md). The payload bytes are the same in both:
only the overhead differs. For every given artifact (a trial's ``model.vlad.safetensors``, ``bench_poster.py --out
DIR``, ...) the script reads the file, writes both versions to a temporary folder, checks that both decode to the
same tensors, and prints one table row: file bytes, overhead bytes and the ratio of the two files; then the sums.

    .venv/bin/python benchmarks/bench_container.py FILE [FILE ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.compression.container import caller_fields, read_tensors, write_artifact  # noqa: E402
from trainables.compression.report import read_size_report  # noqa: E402


def measure(path: Path, workdir: Path) -> dict:
    """Bytes of ``path`` re-written as version 2 and as version 3 (same fields, same tensors)."""
    header, tensors = read_tensors(path)
    fields = caller_fields(header)
    row: dict = {"file": str(path), "tensors": len(tensors)}
    decoded = {}
    for version in (2, 3):
        out = workdir / f"v{version}.safetensors"
        write_artifact(out, tensors, fields, version=version)
        totals = read_size_report(out).totals
        row[f"v{version}"] = {k: totals[k] for k in ("file_bytes", "payload_bytes", "overhead_bytes")}
        decoded[version] = read_tensors(out)[1]
    if decoded[2].keys() != decoded[3].keys() or not all(
        torch.equal(decoded[2][k], decoded[3][k]) for k in decoded[2]
    ):
        raise SystemExit(f"{path}: versions 2 and 3 do not hold the same tensors")
    if row["v2"]["payload_bytes"] != row["v3"]["payload_bytes"]:
        raise SystemExit(f"{path}: versions 2 and 3 have different payloads")
    return row


def _name(path: Path) -> str:
    """A short row name: a Ray trial's id when the path holds one (``run_trial_<id>_…``), else the folder."""
    found = re.search(r"run_trial_([0-9a-f]{8})", str(path))
    return found.group(1) if found else (path.parent.name or str(path))


def _line(name: str, tensors: int | str, v2: dict, v3: dict) -> str:
    return (
        f"| {name} | {tensors} | {v2['payload_bytes']:,} | {v2['overhead_bytes']:,} | {v3['overhead_bytes']:,} | "
        f"{v2['file_bytes']:,} | {v3['file_bytes']:,} | {v3['file_bytes'] / v2['file_bytes']:.3f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.files:
            rows.append(measure(path, Path(tmp)))
    print(
        "| file | stored tensors | payload B | v2 overhead B | v3 overhead B | v2 file B | v3 file B | v3 / v2 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_line(_name(Path(row["file"])), row["tensors"], row["v2"], row["v3"]))
    total = {v: {k: sum(r[v][k] for r in rows) for k in rows[0][v]} for v in ("v2", "v3")}
    print(_line(f"**all {len(rows)}**", sum(r["tensors"] for r in rows), total["v2"], total["v3"]))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "total": total}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
