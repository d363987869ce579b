"""Honest size accounting of a compressed artifact: per-tensor bytes as stored, against their order-0 entropy.

Everything is measured on the file (`read_size_report` reads only its header): ``memory_mib`` is the file size
from ``os.path.getsize`` / 2**20, each row's ``payload_bytes`` is the bytes of that tensor's entries in the file,
and ``overhead_bytes`` (length prefix + JSON header) is what is left, so the rows and the overhead add up to the
file exactly.

Per row, ``order0_bytes`` is the zero-order empirical entropy of what a compressed layer must convey: the index
stream over its kept weights plus the keep/prune pattern (binary entropy of the mask × parameters); for a
pruned-only layer the kept values at their full width plus that pattern; for a tensor stored as-is its bytes. It is
a reference point, not a lower bound: it treats the symbols as independent, and a coder that uses context (the row a
weight is in, its neighbours) goes below it; ``coded_over_order0`` (payload / order-0) is then under 1.
``poster_bytes`` is the figure the ACPR 2017 poster reports (nonzeros × bits / 8; tensors stored as-is at their
width), so our rows line up with its table. The header fields read here are described in docs/artifact-format.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainables.compression.container import ITEMSIZE, SEP, read_header

MIB = 1 << 20


@dataclass
class LayerSize:
    """One state-dict tensor of the artifact. ``kind``: ``quantized``, ``pruned`` or ``dense`` (stored as-is)."""

    name: str
    group: str
    kind: str
    parameters: int
    nonzeros: int
    sparsity: float
    bits: int
    encoding: str
    payload_bytes: int
    bits_per_nonzero: float
    order0_bytes: float
    coded_over_order0: float
    poster_bytes: float


@dataclass
class SizeReport:
    """Per-tensor rows (``layers``) and ``totals`` of one artifact file (see the module docstring)."""

    path: str
    layers: list[LayerSize] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"path", "layers": [row dicts], "totals": {...}}``."""
        return {"path": self.path, "layers": [asdict(r) for r in self.layers], "totals": dict(self.totals)}

    def to_markdown(self) -> str:
        """The per-layer table and the totals as markdown."""
        head = (
            "| tensor | group | params | nonzeros | sparsity | bits | encoding | bytes | bits/nz | "
            "order-0 B | coded / order-0 | poster-style B |\n|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
        )
        lines = [head]
        for r in self.layers:
            lines.append(
                f"| {r.name} | {r.group or '-'} | {r.parameters:,} | {r.nonzeros:,} | {r.sparsity:.2%} | {r.bits} | "
                f"{r.encoding} | {r.payload_bytes:,} | {r.bits_per_nonzero:.3f} | {r.order0_bytes:,.0f} | "
                f"{r.coded_over_order0:.4f} | "
                f"{r.poster_bytes:,.0f} |"
            )
        t = self.totals
        lines += [
            "",
            f"- file: `{self.path}`: **{t['file_bytes']:,} bytes = {t['memory_mib']:.4f} MiB** (memory_mib)",
            f"- payload {t['payload_bytes']:,} B + header/overhead {t['overhead_bytes']:,} B = {t['file_bytes']:,} B",
            f"- parameters {t['parameters']:,}, nonzeros {t['nonzeros']:,} (sparsity {t['sparsity']:.2%})",
            f"- dense fp32 {t['dense_fp32_bytes']:,} B ({t['dense_fp32_bytes'] / MIB:.2f} MiB); "
            f"compression ratio {t['compression_ratio']:.2f}x",
            f"- order-0 entropy {t['order0_bytes']:,.0f} B ({t['order0_bytes'] / MIB:.4f} MiB); "
            f"file / order-0 = {t['order0_ratio']:.4f}",
            f"- poster-style (nonzeros x bits / 8) {t['poster_bytes']:,.0f} B = {t['poster_mib']:.4f} MiB",
        ]
        return "\n".join(lines)


def record_order0_bytes(rec: dict[str, Any]) -> float:
    """A compressed tensor record's order-0 size in bytes: ``order0_bits`` / 8 (format 2), or the ``bound_bytes``
    that format-1 files stored under that older name."""
    if "order0_bits" in rec:
        return float(rec["order0_bits"]) / 8
    return float(rec.get("bound_bytes", 0.0))


def _encoding(rec: dict[str, Any]) -> str:
    layout = rec["layout"]
    if "escape" in rec:
        layout += f"/{rec['escape'] + 1}"
    parts = [f"{s}:{r['coder']}" for s, r in rec.get("streams", {}).items()]
    if rec["kind"] == "pruned" and layout != "dense":
        parts.append(f"values:{rec['dtype']}")
    if rec["kind"] == "pruned" and layout == "dense":
        parts.append(f"raw {rec['dtype']}")
    if rec.get("scale") == "channel":
        parts.append(f"scale:{rec.get('scale_dtype', 'float32')}x{rec['shape'][0] if rec['shape'] else 1}")
    return f"{layout} ({', '.join(parts)})" if parts else layout


def build_size_report(
    path: str, header: dict[str, Any], index: dict[str, Any], header_bytes: int, file_bytes: int
) -> SizeReport:
    """The `SizeReport` of a file from its parsed header (see `container.read_header`)."""
    sizes = {name: int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for name, v in index.items()}
    module_group = {m: g for g, names in header.get("groups", {}).items() for m in names}
    rows: list[LayerSize] = []
    for key, rec in header["tensors"].items():
        module = key.rsplit(".", 1)[0] if "." in key else ""
        group = module_group.get(module, "")
        if rec["kind"] == "dense":
            entry = index[key]
            params = math.prod(entry["shape"])
            nbytes = sizes[key]
            bits = ITEMSIZE.get(entry["dtype"], 0) * 8
            rows.append(
                LayerSize(
                    name=key,
                    group=group,
                    kind="dense",
                    parameters=params,
                    nonzeros=params,
                    sparsity=0.0,
                    bits=bits,
                    encoding=f"raw {entry['dtype']}",
                    payload_bytes=nbytes,
                    bits_per_nonzero=8 * nbytes / params if params else 0.0,
                    order0_bytes=float(nbytes),
                    coded_over_order0=1.0 if nbytes else 0.0,
                    poster_bytes=float(nbytes),
                )
            )
            continue
        params = math.prod(rec["shape"])
        nnz = int(rec["nonzeros"])
        prefix = key + SEP
        nbytes = sum(s for name, s in sizes.items() if name.startswith(prefix))
        order0 = record_order0_bytes(rec)
        rows.append(
            LayerSize(
                name=key,
                group=group,
                kind=rec["kind"],
                parameters=params,
                nonzeros=nnz,
                sparsity=1.0 - nnz / params if params else 0.0,
                bits=int(rec["bits"]),
                encoding=_encoding(rec),
                payload_bytes=nbytes,
                bits_per_nonzero=8 * nbytes / nnz if nnz else 0.0,
                order0_bytes=order0,
                coded_over_order0=nbytes / order0 if order0 else 0.0,
                poster_bytes=nnz * int(rec["bits"]) / 8,
            )
        )
    payload = sum(sizes.values())
    params = sum(r.parameters for r in rows)
    nnz = sum(r.nonzeros for r in rows)
    order0 = sum(r.order0_bytes for r in rows)
    poster = sum(r.poster_bytes for r in rows)
    totals = {
        "file_bytes": file_bytes,
        "memory_mib": file_bytes / MIB,
        "payload_bytes": payload,
        "overhead_bytes": file_bytes - payload,
        "header_bytes": header_bytes,
        "parameters": params,
        "nonzeros": nnz,
        "sparsity": 1.0 - nnz / params if params else 0.0,
        "dense_fp32_bytes": 4 * params,
        "compression_ratio": 4 * params / file_bytes if file_bytes else 0.0,
        "order0_bytes": order0,
        "order0_ratio": file_bytes / order0 if order0 else 0.0,
        "poster_bytes": poster,
        "poster_mib": poster / MIB,
    }
    return SizeReport(path=str(path), layers=rows, totals=totals)


def read_size_report(path: str | os.PathLike) -> SizeReport:
    """The `SizeReport` of a compressed file, from its header alone (the payload is not decoded)."""
    header, index, header_bytes, file_bytes = read_header(path)
    return build_size_report(str(Path(path)), header, index, header_bytes, file_bytes)
