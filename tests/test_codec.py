"""The compressed artifact: streams round-trip and are small, decoded models compute what the quantized models
compute, sizes are counted on the file, and damaged files are refused with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from legacy_artifacts import write_legacy
from torch import nn

from trainables.compression import container, layouts, streams
from trainables.compression.architectures import register_architecture
from trainables.compression.codec import CodecError, load_compressed, read_header, save_compressed
from trainables.compression.inspect import main as inspect_main
from trainables.compression.layouts import decode_tensor, encode_pruned, encode_quantized
from trainables.compression.module_state import plain_state_entries
from trainables.compression.plan import CompressionPlan, GroupPlan
from trainables.compression.prune import apply_mask
from trainables.compression.quantize import quantize_module
from trainables.compression.report import MIB, read_size_report
from trainables.compression.schedule import dense_state_dict

REPO = Path(__file__).resolve().parents[1]


def build_toy(config: dict) -> nn.Module:
    c = config["channels"]
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c * 36, 10),
    )


TOY = {"architecture": {"name": "toy", "config": {"channels": 8}}}
TOY_GROUPS = {"conv": ["0", "3"], "fc": ["6"]}
register_architecture("toy", build_toy)


def _prune_quantile(module: nn.Module, sparsity: float) -> None:
    w = module.weight.detach()
    if sparsity > 0:
        t = w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
        apply_mask(module, w.abs() > t)


def compressed_toy(bits: int, sparsity: float, mode: str, seed: int = 0) -> nn.Module:
    """The toy model with conv layers pruned + quantized and the linear layer pruned only."""
    torch.manual_seed(seed)
    model = build_toy({"channels": 8})
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    for i in (0, 3):
        _prune_quantile(model[i], sparsity)
        quantize_module(model[i], mode, bits)
    _prune_quantile(model[6], max(sparsity, 0.3))
    return model.eval()


def _payload_bytes(payload: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in payload.values())


# --- streams -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alphabet,n,kind",
    [
        (2, 5000, "iid"),
        (33, 20000, "iid"),
        (257, 50000, "iid"),
        (4, 30000, "runs"),
        (9, 3, "iid"),
        (5, 0, "iid"),
    ],
)
def test_stream_roundtrip_and_smallest_coder(alphabet: int, n: int, kind: str) -> None:
    rng = np.random.default_rng(alphabet + n)
    if kind == "runs":
        symbols = np.repeat(rng.integers(0, alphabet, n // 500), 500)
    else:
        symbols = rng.choice(alphabet, size=n, p=rng.dirichlet(np.ones(alphabet)))
    enc = streams.encode_symbols(symbols, alphabet)
    out = streams.decode_symbols(enc.data, json.loads(json.dumps(enc.record())))
    np.testing.assert_array_equal(out, symbols)
    if len(np.unique(symbols)) > 1:
        counts = np.bincount(symbols, minlength=alphabet)
        sizes = {
            "raw": len(streams._pack(symbols, streams.bit_width(alphabet))),
            "zstd": len(streams._zstd(symbols, alphabet)),
            "ans": len(streams._ans_encode(symbols, counts)[0]),
        }
        assert len(enc.data) == min(sizes.values()), (enc.coder, sizes)
    if kind == "runs":
        assert enc.coder == "zstd"


@pytest.mark.parametrize("width", list(range(1, 18)))
def test_raw_packing_every_width(width: int) -> None:
    rng = np.random.default_rng(width)
    symbols = rng.integers(0, 1 << width, size=1001)
    packed = streams._pack(symbols, width)
    assert len(packed) == (1001 * width + 7) // 8
    np.testing.assert_array_equal(streams._unpack(packed, 1001, width, np.dtype("<u4")), symbols)


def test_ans_is_near_the_entropy_of_an_iid_stream() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(32, 0.5))
    symbols = rng.choice(32, size=200_000, p=p)
    enc = streams.encode_symbols(symbols, 32)
    bound = streams.entropy_bits(np.bincount(symbols, minlength=32)) / 8
    assert enc.coder == "ans"
    assert len(enc.data) <= bound * 1.002 + enc.table_bytes + 16


# --- one tensor --------------------------------------------------------------------------------------------------


def _hand_view(bits: int, sparsity: float, shape: tuple[int, ...], seed: int):
    """A QuantView-like triple built by hand: indices 0 where pruned, as QuantView documents."""
    g = torch.Generator().manual_seed(seed)
    k = 1 << bits
    codebook = torch.randn(k, generator=g)
    probs = torch.distributions.Dirichlet(torch.ones(k)).sample()
    indices = torch.multinomial(probs, int(np.prod(shape)), replacement=True, generator=g).reshape(shape)
    mask = torch.rand(shape, generator=g) >= sparsity
    return codebook, indices.masked_fill(~mask, 0), mask


@pytest.mark.parametrize(
    "bits,sparsity,shape",
    [(2, 0.0, (40, 30)), (5, 0.5, (64, 3, 3, 3)), (8, 0.97, (300, 200)), (1, 1.0, (17,))],
)
def test_quantized_tensor_every_layout_roundtrips_bit_exact(bits: int, sparsity: float, shape: tuple) -> None:
    codebook, indices, mask = _hand_view(bits, sparsity, shape, seed=bits)
    expected = codebook[indices] * mask.to(torch.float32)
    sizes = {}
    for layout in layouts.LAYOUTS:
        if layout == "rowbitmap" and len(shape) < 2:
            with pytest.raises(ValueError, match="does not apply"):
                encode_quantized(codebook, indices, mask, bits, "kmeans", layout=layout)
            continue
        rec, payload = encode_quantized(codebook, indices, mask, bits, "kmeans", layout=layout)
        assert rec["layout"] == layout and rec["nonzeros"] == int(mask.sum())
        out = decode_tensor(json.loads(json.dumps(rec)), payload)
        # Bit for bit, sign of the pruned zeros included.
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), layout
        sizes[layout] = _payload_bytes(payload)
    rec, payload = encode_quantized(codebook, indices, mask, bits, "kmeans")
    assert _payload_bytes(payload) == min(sizes.values()), (rec["layout"], sizes)


def test_out_of_range_indices_are_refused() -> None:
    codebook, indices, mask = _hand_view(3, 0.2, (10, 10), seed=0)
    indices[mask] = 8
    with pytest.raises(CodecError, match=r"0\.\.7"):
        encode_quantized(codebook, indices, mask, 3, "kmeans")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.1, 0.9, 0.999])
def test_pruned_tensor_roundtrips(dtype: torch.dtype, sparsity: float) -> None:
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(120, 90, generator=g) >= sparsity
    weight = (torch.randn(120, 90, generator=g) * mask).to(dtype)
    sizes = {}
    for layout in layouts.LAYOUTS:
        rec, payload = encode_pruned(weight, mask, layout=layout)
        assert torch.equal(decode_tensor(json.loads(json.dumps(rec)), payload), weight)
        sizes[layout] = _payload_bytes(payload)
    _, payload = encode_pruned(weight, mask)
    assert _payload_bytes(payload) == min(sizes.values())


# --- whole models ------------------------------------------------------------------------------------------------


def test_plain_state_entries_are_the_uncompressed_keys() -> None:
    model = compressed_toy(4, 0.5, "kmeans")
    assert list(plain_state_entries(model)) == list(build_toy({"channels": 8}).state_dict())


@pytest.mark.parametrize(
    "bits,sparsity,mode",
    [(8, 0.0, "kmeans"), (5, 0.5, "uniform"), (4, 0.6, "kmeans"), (3, 0.9, "uniform"), (2, 0.99, "kmeans")],
)
def test_decoded_model_equals_quantized_model(tmp_path: Path, bits: int, sparsity: float, mode: str) -> None:
    model = compressed_toy(bits, sparsity, mode, seed=bits)
    plan = CompressionPlan(groups={"conv": GroupPlan(threshold=0.01, quant=mode, bits=bits)})
    path = tmp_path / "toy.safetensors"
    save_compressed(model, plan, path, {**TOY, "trial": "t1"}, groups=TOY_GROUPS)
    loaded = load_compressed(path).eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-6
    # Every tensor is the quantized model's effective tensor, bit for bit.
    ref = dense_state_dict(model)
    for key, t in loaded.state_dict().items():
        assert torch.equal(t, ref[key]), key
    meta = loaded.compression_meta
    assert meta["meta"] == {"trial": "t1"} and meta["architecture"] == TOY["architecture"]
    assert CompressionPlan.from_dict(meta["plan"]) == plan
    assert meta["tensors"]["0.weight"]["bits"] == bits and meta["tensors"]["0.weight"]["mode"] == mode
    assert meta["tensors"]["6.weight"]["kind"] == "pruned"


def test_the_same_model_saves_to_the_same_bytes(tmp_path: Path) -> None:
    # safetensors orders its metadata keys at random; without the rewrite, 6 saves agree with chance 1/32.
    model = compressed_toy(4, 0.5, "kmeans")
    files = [tmp_path / f"toy{i}.safetensors" for i in range(6)]
    for path in files:
        save_compressed(model, None, path, TOY)
    assert len({path.read_bytes() for path in files}) == 1
    assert torch.equal(
        load_compressed(files[0]).state_dict()["0.weight"], dense_state_dict(model)["0.weight"]
    )


def test_netvlad_roundtrip(tmp_path: Path) -> None:
    from trainables.netvlad.model import NetVLADConfig, NetVLADModel

    torch.manual_seed(0)
    model = NetVLADModel(NetVLADConfig(backbone="tiny", num_clusters=8, whitening_dim=32)).eval()
    groups = model.compression_groups()
    assert groups.pop("depthwise") == []  # the tiny backbone has none
    settings = {"conv": ("kmeans", 6, 0.5), "netvlad": ("uniform", 5, 0.3), "whitening": ("kmeans", 4, 0.8)}
    for group, names in groups.items():
        mode, bits, sparsity = settings[group]
        for name in names:
            module = model.get_submodule(name)
            _prune_quantile(module, sparsity)
            quantize_module(module, mode, bits)
    path = tmp_path / "netvlad.safetensors"
    report = save_compressed(
        model, None, path, {"architecture": {"name": "netvlad", "config": model.config_dict()}}
    )
    loaded = load_compressed(path).eval()
    assert type(loaded).__name__ == "NetVLADModel"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-6
    rows = {r.name: r for r in report.layers}
    assert rows["whiten.weight"].group == "whitening" and rows["whiten.weight"].bits == 4
    assert rows["pool.centroids"].kind == "dense"


class Misc(nn.Module):
    """Tied weights, a bf16 buffer, an int buffer and a non-persistent buffer computed at init."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.register_buffer("bf16", torch.randn(5).to(torch.bfloat16))
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("scale", torch.arange(6.0) + 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.scale


def test_any_module_tied_and_odd_buffers(tmp_path: Path) -> None:
    register_architecture("misc", lambda cfg: Misc())
    model = Misc()
    _prune_quantile(model.a, 0.5)
    path = tmp_path / "misc.safetensors"
    save_compressed(model, None, path, {"architecture": {"name": "misc"}})
    loaded = load_compressed(path)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-6
    assert torch.equal(loaded.bf16, model.bf16) and int(loaded.steps) == 3
    assert torch.equal(loaded.scale, torch.arange(6.0) + 1)  # rebuilt for real, not left on the meta device


# --- sizes -------------------------------------------------------------------------------------------------------


def test_size_report_adds_up_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "toy.safetensors"
    report = save_compressed(compressed_toy(5, 0.6, "kmeans"), None, path, TOY, groups=TOY_GROUPS)
    t = report.totals
    size = os.path.getsize(path)
    assert t["file_bytes"] == size and t["memory_mib"] == size / MIB
    assert t["payload_bytes"] + t["overhead_bytes"] == size
    assert t["overhead_bytes"] == t["header_bytes"]  # no padding between tensors
    assert sum(r.payload_bytes for r in report.layers) == t["payload_bytes"]
    assert t["compression_ratio"] == pytest.approx(t["dense_fp32_bytes"] / size)
    assert t["parameters"] == sum(v.numel() for v in build_toy({"channels": 8}).state_dict().values())
    rows = {r.name: r for r in report.layers}
    conv = rows["3.weight"]
    assert conv.group == "conv" and conv.bits == 5 and conv.kind == "quantized"
    assert conv.poster_bytes == conv.nonzeros * 5 / 8
    assert conv.bits_per_nonzero == pytest.approx(8 * conv.payload_bytes / conv.nonzeros)
    assert read_size_report(path).to_dict() == report.to_dict()
    md = report.to_markdown()
    assert "memory_mib" in md and "3.weight" in md


def test_big_iid_layer_is_within_two_percent_of_its_order0_size(tmp_path: Path) -> None:
    register_architecture("lin", lambda cfg: nn.Linear(cfg["i"], cfg["o"]))
    torch.manual_seed(0)
    lin = nn.Linear(1024, 256)
    _prune_quantile(lin, 0.6)
    quantize_module(lin, "kmeans", 5)
    meta = {"architecture": {"name": "lin", "config": {"i": 1024, "o": 256}}}
    report = save_compressed(lin, None, tmp_path / "lin.safetensors", meta)
    row = next(r for r in report.layers if r.name == "weight")
    codebook_bytes = 32 * 4
    assert row.payload_bytes <= 1.02 * row.order0_bytes + codebook_bytes + 200
    # Beats the naive sparse format: a raw bitmap + raw b-bit indices (the poster-style figure + params / 8).
    assert row.payload_bytes < 0.97 * (row.poster_bytes + row.parameters / 8)


# --- refusing bad files ------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "toy.safetensors"
    save_compressed(compressed_toy(4, 0.5, "kmeans"), None, path, TOY)
    return path


def test_truncated_file_is_refused(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[:-10])
    with pytest.raises(CodecError, match="truncated") as e:
        load_compressed(saved)
    assert str(saved) in str(e.value)
    saved.write_bytes(data[:5])
    with pytest.raises(CodecError, match="truncated"):
        load_compressed(saved)


def test_trailing_bytes_are_refused(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes() + b"xx")
    with pytest.raises(CodecError, match="unexpected bytes"):
        load_compressed(saved)


def _stored_span(path: Path, tensor: str) -> tuple[int, int]:
    """The byte range of one tensor of the safetensors file itself (version 3: ``header`` or ``payload``)."""
    data = path.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + hlen])[tensor]["data_offsets"]
    return 8 + hlen + start, 8 + hlen + end


def _flip_first_byte(path: Path, name: str) -> None:
    """Flip one bit of the first byte of the stored tensor ``name`` (its range from `read_header`'s index)."""
    _, index, header_bytes, _ = read_header(path)
    data = bytearray(path.read_bytes())
    data[header_bytes + index[name]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_payload_is_refused(saved: Path) -> None:
    _, _, header_bytes, size = read_header(saved)
    assert _stored_span(saved, container.PAYLOAD_TENSOR) == (header_bytes, size)  # the payload ends the file
    _flip_first_byte(saved, "3.weight::codebook")
    with pytest.raises(CodecError, match=r"toy\.safetensors: checksum mismatch in the payload"):
        load_compressed(saved)


def test_tampered_version_2_payload_names_the_tensor(saved: Path, tmp_path: Path) -> None:
    header, tensors = container.read_tensors(saved)
    old = tmp_path / "v2.safetensors"
    write_legacy(old, header, tensors, 2)
    _flip_first_byte(old, "3.weight::codebook")
    with pytest.raises(CodecError, match=r"checksum mismatch in tensor '3\.weight::codebook'"):
        load_compressed(old)


def test_tampered_header_is_refused(saved: Path) -> None:
    data = saved.read_bytes()
    start, end = _stored_span(saved, container.HEADER_TENSOR)
    flipped = bytearray(data)
    flipped[(start + end) // 2] ^= 0x04
    saved.write_bytes(bytes(flipped))
    with pytest.raises(CodecError, match="header checksum mismatch: the compressed header was altered"):
        load_compressed(saved)
    saved.write_bytes(data.replace(b'\\"format_version\\":3', b'\\"format_version\\":2', 1))
    with pytest.raises(CodecError, match="header checksum mismatch: the 'vladsweep' metadata was altered"):
        load_compressed(saved)
    saved.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CodecError, match="not parsable"):
        load_compressed(saved)
    saved.write_bytes(b"\x00" * 64)
    with pytest.raises(CodecError):
        load_compressed(saved)


def _with_descriptor(path: Path, edit) -> None:
    """``path`` with its version-3 descriptor changed by ``edit`` and its checksum recomputed (a crafted file)."""
    data = path.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    index = json.loads(data[8 : 8 + hlen])
    descriptor = json.loads(index["__metadata__"][container.META_KEY])
    edit(descriptor)
    text = json.dumps(descriptor)
    index["__metadata__"] = {
        container.META_KEY: text,
        container.META_CHECKSUM_KEY: container._json_checksum(text),
    }
    raw = json.dumps(index, separators=(",", ":")).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + hlen :])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["header"].update(bytes=1 << 40), r"'bytes': 1\.\.67108864"),
        (
            lambda d: d["header"].update(bytes=d["header"]["bytes"] + 1),
            r"zstd frame holds \d+ bytes, expected",
        ),
        (lambda d: d["header"].update(coding="gzip"), "header descriptor"),
        (lambda d: d.update(format_version=2), "has no 'checksums' object"),
    ],
)
def test_a_crafted_header_descriptor_is_refused_before_decompressing(saved: Path, edit, message: str) -> None:
    _with_descriptor(saved, edit)
    with pytest.raises(CodecError, match=message):
        load_compressed(saved)


def test_the_header_is_a_small_part_of_the_file(saved: Path, tmp_path: Path) -> None:
    """Version 3 packs what version 2 spent on per-tensor index entries and checksums and a plain JSON header."""
    report = read_size_report(saved)
    header, tensors = container.read_tensors(saved)
    old = tmp_path / "v2.safetensors"
    write_legacy(old, header, tensors, 2)
    before = read_size_report(old)
    assert report.totals["payload_bytes"] == before.totals["payload_bytes"]
    assert report.totals["overhead_bytes"] < 0.5 * before.totals["overhead_bytes"], (
        report.totals,
        before.totals,
    )
    assert [r.payload_bytes for r in report.layers] == [r.payload_bytes for r in before.layers]


def test_unknown_format_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "future.safetensors"
    monkeypatch.setattr(container, "FORMAT_VERSION", 99)
    monkeypatch.setattr(container, "WRITABLE_VERSIONS", (99,))
    monkeypatch.setattr(container, "READABLE_VERSIONS", (99,))
    save_compressed(compressed_toy(4, 0.5, "kmeans"), None, path, TOY)
    monkeypatch.undo()
    with pytest.raises(CodecError, match="format version 99 is unknown"):
        load_compressed(path)
    with pytest.raises(CodecError, match=r"cannot write format version 1; writable: \(2, 3\)"):
        container.write_artifact(tmp_path / "old.safetensors", {}, {}, version=1)


def test_architecture_errors(tmp_path: Path) -> None:
    model = compressed_toy(4, 0.5, "kmeans")
    with pytest.raises(CodecError, match="architecture"):
        save_compressed(model, None, tmp_path / "a.safetensors", {"trial": 1})
    path = tmp_path / "b.safetensors"
    save_compressed(model, None, path, {"architecture": {"name": "no-such-net", "config": {}}})
    with pytest.raises(CodecError, match=r"unknown architecture 'no-such-net'; known: .*netvlad.*toy"):
        load_compressed(path)
    path = tmp_path / "c.safetensors"
    save_compressed(model, None, path, {"architecture": {"name": "toy", "config": {"channels": 4}}})
    with pytest.raises(CodecError, match="shape"):
        load_compressed(path)
    path = tmp_path / "d.safetensors"
    save_compressed(model, None, path, {"architecture": {"name": "toy", "config": {}}})
    with pytest.raises(CodecError, match=r"builder of architecture 'toy' failed on config \{\} \(KeyError"):
        load_compressed(path)


def test_failed_save_leaves_the_old_file_alone(saved: Path) -> None:
    before = saved.read_bytes()
    with pytest.raises(CodecError, match="JSON"):
        save_compressed(compressed_toy(4, 0.5, "kmeans"), None, saved, {**TOY, "bad": object()})
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


# --- inspect -----------------------------------------------------------------------------------------------------


def test_inspect_cli(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "trainables.compression.inspect", str(saved)]
    table = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True).stdout
    assert "| 3.weight | - |" in table and "memory_mib" in table
    out = subprocess.run(
        [*cmd, "--json"], capture_output=True, text=True, env=env, cwd=REPO, check=True
    ).stdout
    parsed = json.loads(out)
    assert parsed["totals"]["file_bytes"] == os.path.getsize(saved)
    assert {r["name"] for r in parsed["layers"]} >= {"0.weight", "3.weight", "6.weight", "1.running_mean"}
    saved.write_bytes(b"garbage")
    assert inspect_main([str(saved)]) == 2
    assert str(saved) in capsys.readouterr().err


def test_inspect_verify_finds_a_damaged_payload(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect_main([str(saved), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    _flip_first_byte(saved, "3.weight::codebook")
    assert inspect_main([str(saved)]) == 0  # the header alone looks fine
    capsys.readouterr()
    assert inspect_main([str(saved), "--verify"]) == 2
    assert "checksum mismatch in the payload" in capsys.readouterr().err


def test_report_names_order0_and_reads_format_1_records(saved: Path) -> None:
    report = read_size_report(saved)
    row = next(r for r in report.layers if r.name == "3.weight")
    assert row.coded_over_order0 == pytest.approx(row.payload_bytes / row.order0_bytes)
    assert "order0_ratio" in report.totals and "coded / order-0" in report.to_markdown()
    text = json.dumps(report.to_dict())
    assert "bound" not in text
    # A format-1 record stored the same figure in bytes as "bound_bytes".
    from trainables.compression.report import record_order0_bytes

    assert record_order0_bytes({"bound_bytes": 12.5}) == 12.5
    assert record_order0_bytes({"order0_bits": 100.0}) == 12.5


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_still_load(saved: Path, tmp_path: Path, version: int) -> None:
    """A version-1 file (records with ``bound_bytes``) and a version-2 file (a safetensors tensor and a checksum
    per stored tensor) decode to the same tensors and report the same order-0 figures and payload."""
    header, tensors = container.read_tensors(saved)
    before = load_compressed(saved).state_dict()
    old = tmp_path / f"v{version}.safetensors"
    write_legacy(old, header, tensors, version)
    loaded = load_compressed(old)
    assert loaded.compression_meta["format_version"] == version
    for key, t in loaded.state_dict().items():
        assert torch.equal(t, before[key]), key
    rows = {r.name: r for r in read_size_report(old).layers}
    now = {r.name: r for r in read_size_report(saved).layers}
    assert {k: (r.payload_bytes, round(r.order0_bytes, 1)) for k, r in rows.items()} == {
        k: (r.payload_bytes, round(r.order0_bytes, 1)) for k, r in now.items()
    }


def test_row_classes_code_clustered_rows_below_the_gap_stream() -> None:
    """Rows that keep very different fractions (as the whitening's scaled rows do): rowbitmap wins and decodes."""
    g = torch.Generator().manual_seed(3)
    density = torch.linspace(0.02, 0.98, 256).repeat_interleave(1).view(-1, 1)
    mask = torch.rand(256, 512, generator=g) < density
    codebook = torch.randn(16, generator=g)
    indices = torch.randint(0, 16, (256, 512), generator=g).masked_fill(~mask, 0)
    rec, payload = encode_quantized(codebook, indices, mask, 4, "kmeans")
    assert rec["layout"] == "rowbitmap" and rec["classes"] > 1
    _, gaps = encode_quantized(codebook, indices, mask, 4, "kmeans", layout="gaps")
    positions = sum(a.nbytes for s, a in payload.items() if s == "rows" or s.startswith("positions."))
    assert positions < 0.9 * gaps["positions"].nbytes
    out = decode_tensor(json.loads(json.dumps(rec)), payload)
    assert torch.equal(out.view(torch.int32), (codebook[indices] * mask.to(torch.float32)).view(torch.int32))


def test_a_version_3_file_whose_payload_does_not_end_it_is_refused(saved: Path) -> None:
    data = saved.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    index = json.loads(data[8 : 8 + hlen])
    (hs, he), (ps, pe) = (
        index[t]["data_offsets"] for t in (container.HEADER_TENSOR, container.PAYLOAD_TENSOR)
    )
    body = data[8 + hlen :]
    index[container.PAYLOAD_TENSOR]["data_offsets"] = [0, pe - ps]
    index[container.HEADER_TENSOR]["data_offsets"] = [pe - ps, pe - ps + he - hs]
    raw = json.dumps(index, separators=(",", ":")).encode()
    saved.write_bytes(len(raw).to_bytes(8, "little") + raw + body[ps:pe] + body[hs:he])
    with pytest.raises(CodecError, match="'payload' tensor must end the file"):
        load_compressed(saved)
