"""Per-output-channel codebook scales (``scale: channel``): they cut the quantization error of a layer whose channels
differ in scale, the decoded file is the quantized model bit for bit, the scales are counted and checked, and the
contract, plan and search-space schema accept the new parameter and refuse bad values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from search_spaces.schema import SearchSpaceError, load_search_space
from trainables.compression.architectures import register_architecture
from trainables.compression.codec import CodecError, load_compressed, save_compressed
from trainables.compression.container import caller_fields, read_tensors, write_artifact
from trainables.compression.layouts import LAYOUTS, decode_tensor, encode_quantized
from trainables.compression.plan import CompressionPlan, GroupPlan, PlanError
from trainables.compression.prune import apply_mask
from trainables.compression.quantize import (
    SCALE_RANGE,
    _lookup,
    channel_scales,
    quantize_module,
    quantized_view,
)
from trainables.compression.report import read_size_report
from trainables.compression.schedule import quantize_and_finetune
from trainables.contract import TrialConfigError, resolve_trial_config


def build_scaled_toy(config: dict) -> nn.Module:
    c = config["channels"]
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, groups=c),  # depthwise
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c * 16, 6),
    )


register_architecture("scaled-toy", build_scaled_toy)
META = {"architecture": {"name": "scaled-toy", "config": {"channels": 8}}}
LAYERS = ("0", "2", "5")


def _spread_channels(module: nn.Module, low: float = 0.02, high: float = 2.0) -> None:
    """Give ``module``'s output channels scales from ``low`` to ``high`` (as folded batch norm does)."""
    with torch.no_grad():
        w = module.weight
        scales = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), w.shape[0])
        w.mul_(scales.view(-1, *([1] * (w.dim() - 1))) / w.abs().amax())


def _scaled_toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_scaled_toy({"channels": 8}).eval()
    for name in LAYERS:
        _spread_channels(model.get_submodule(name))
    return model


def test_channel_scales_cut_the_error_of_a_spread_layer() -> None:
    torch.manual_seed(0)
    errors = {}
    for scale in ("layer", "channel"):
        layer = nn.Linear(64, 32)
        torch.manual_seed(1)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(32, 64))
        _spread_channels(layer)
        w = layer.weight.detach().clone()
        row = quantize_module(layer, "kmeans", 4, scale=scale)
        with torch.no_grad():
            # Relative error per channel, averaged: the small channels are the ones a shared codebook loses.
            rel = ((layer.weight - w).pow(2).mean(1) / w.pow(2).mean(1)).mean()
            assert row["mse"] == pytest.approx(float((layer.weight - w).pow(2).mean()), rel=1e-5)
        errors[scale] = (row["mse"], float(rel))
    assert errors["channel"][0] < 0.5 * errors["layer"][0]
    assert errors["channel"][1] < 0.05 * errors["layer"][1]


@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (16, 1, 3, 3), (12, 40)])
def test_every_layout_decodes_the_scaled_weight_bit_exact(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(8, generator=g)
    indices = torch.randint(0, 8, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.6
    indices = indices.masked_fill(~mask, 0)
    scale = torch.logspace(-1.7, 0.3, shape[0])
    want = _lookup(codebook, indices, mask, scale)
    assert not torch.equal(want, _lookup(codebook, indices, mask))
    for layout in LAYOUTS:
        rec, payload = encode_quantized(codebook, indices, mask, 3, "kmeans", layout=layout, scale=scale)
        assert rec["scale"] == "channel"
        got = decode_tensor(rec, payload)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), layout  # signs of zeros too
        # These scales are not float16 values: stored as float32, as every file before float16 scales.
        assert "scale_dtype" not in rec and payload["scale"].dtype == np.float32, layout
        half = scale.to(torch.float16).to(torch.float32)
        rec, payload = encode_quantized(codebook, indices, mask, 3, "kmeans", layout=layout, scale=half)
        assert rec["scale_dtype"] == "float16" and payload["scale"].dtype == np.float16, layout
        got = decode_tensor(rec, payload)
        assert torch.equal(got, _lookup(codebook, indices, mask, half)), layout
    with pytest.raises(CodecError, match=f"scale has {shape[0] - 1} values, expected {shape[0]}"):
        encode_quantized(codebook, indices, mask, 3, "kmeans", scale=scale[:-1])
    with pytest.raises(CodecError, match="finite and > 0"):
        encode_quantized(codebook, indices, mask, 3, "kmeans", scale=-scale)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_channel_scaled_file_decodes_bit_exact(tmp_path: Path, sparsity: float) -> None:
    model = _scaled_toy()
    for name in LAYERS:
        m = model.get_submodule(name)
        if sparsity:
            w = m.weight.detach()
            apply_mask(m, w.abs() > w.abs().flatten().kthvalue(int(sparsity * w.numel())).values)
        quantize_module(m, "kmeans", 3, scale="channel")
    # Train the codebooks a little: the file must hold the trained ones, the scales unchanged.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 4, 4)
    model.train()
    before = quantized_view(model.get_submodule("0")).scale.clone()
    model(x).pow(2).sum().backward()
    opt.step()
    model.eval()
    assert torch.equal(quantized_view(model.get_submodule("0")).scale, before)
    path = tmp_path / "m.safetensors"
    report = save_compressed(model, None, path, META, groups={"conv": ["0", "2"], "fc": ["5"]})
    decoded = load_compressed(path).eval()
    with torch.no_grad():
        for name in LAYERS:
            want = model.get_submodule(name).weight
            got = decoded.get_submodule(name).weight
            assert torch.equal(got, want), name
        assert torch.equal(decoded(x), model(x))
    rows = {r.name: r for r in report.layers}
    for name in LAYERS:
        row = rows[f"{name}.weight"]
        channels = model.get_submodule(name).weight.shape[0]
        assert f"scale:float16x{channels}" in row.encoding
    # The scale bytes are in the layer's payload: every stored tensor of the layer, the scales included.
    header, tensors = read_tensors(path)
    for name in LAYERS:
        assert header["tensors"][f"{name}.weight"]["scale_dtype"] == "float16"
        assert tensors[f"{name}.weight::scale"].dtype == torch.float16
        assert rows[f"{name}.weight"].payload_bytes == sum(
            t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(f"{name}.weight::")
        )
    assert read_size_report(path).totals["file_bytes"] == path.stat().st_size


def test_channel_scales_are_float16_values_in_the_float16_range() -> None:
    w = torch.tensor([[0.3, -0.7], [1e-9, 0.0], [0.0, 0.0], [1e6, 2.0], [0.1234567, 0.0]])
    s = channel_scales(w, torch.ones_like(w, dtype=torch.bool))
    assert s.dtype == torch.float32
    assert torch.equal(s.to(torch.float16).to(torch.float32), s)
    low, high = SCALE_RANGE
    assert s.tolist()[:4] == [pytest.approx(0.7, rel=1e-3), low, 1.0, high]
    assert s[4] != 0.1234567 and s[4] == pytest.approx(0.1234567, rel=2**-11)


def test_a_wrong_scale_length_is_refused(tmp_path: Path) -> None:
    model = _scaled_toy()
    quantize_module(model.get_submodule("0"), "kmeans", 3, scale="channel")
    path = tmp_path / "m.safetensors"
    save_compressed(model, None, path, META)
    header, tensors = read_tensors(path)
    tensors["0.weight::scale"] = tensors["0.weight::scale"][:-1].clone()
    fields = caller_fields(header)
    bad = tmp_path / "bad.safetensors"
    write_artifact(bad, tensors, fields)  # checksums are right: only the length is wrong
    with pytest.raises(CodecError, match=r"'0\.weight'.*scale.*F16\[8\]"):
        load_compressed(bad)
    # Scales of the right length that are not finite and positive (checksums recomputed: only the values are bad).
    nan = torch.full((8,), float("nan"), dtype=torch.float16)
    write_artifact(bad, {**tensors, "0.weight::scale": nan}, fields)
    with pytest.raises(CodecError, match="finite and > 0"):
        load_compressed(bad)
    # float32 scales under a record that says float16, and a scale dtype the format does not know.
    write_artifact(bad, {**tensors, "0.weight::scale": torch.ones(8)}, fields)
    with pytest.raises(CodecError, match=r"scale.*F16\[8\]"):
        load_compressed(bad)
    fields["tensors"]["0.weight"]["scale_dtype"] = "bfloat16"
    write_artifact(bad, {**tensors, "0.weight::scale": torch.ones(8)}, fields)
    with pytest.raises(CodecError, match="scale_dtype 'bfloat16' is not one of float32, float16"):
        load_compressed(bad)
    # A record that names a scale kind the format does not know.
    fields["tensors"]["0.weight"]["scale"] = "row"
    write_artifact(bad, {**tensors, "0.weight::scale": torch.ones(8)}, fields)
    with pytest.raises(CodecError, match="scale 'row'"):
        load_compressed(bad)


def test_layer_scaled_files_carry_no_scale(tmp_path: Path) -> None:
    model = _scaled_toy()
    quantize_module(model.get_submodule("0"), "kmeans", 3)
    assert quantized_view(model.get_submodule("0")).scale is None
    assert not any("scale" in k for k in model.state_dict())
    path = tmp_path / "m.safetensors"
    save_compressed(model, CompressionPlan(groups={"conv": GroupPlan()}), path, META)
    header, tensors = read_tensors(path)
    assert "scale" not in header["tensors"]["0.weight"] and not any(k.endswith("::scale") for k in tensors)
    assert "scale" not in header["plan"]["groups"]["conv"]


def test_contract_and_plan_take_scale_per_group() -> None:
    out = resolve_trial_config({"scale_conv": "channel", "groups": "conv,netvlad"})
    assert out["plan"]["groups"]["conv"]["scale"] == "channel"
    assert "scale" not in out["plan"]["groups"]["netvlad"]  # layer: the dict as before the key existed
    plan = CompressionPlan.from_dict(out["plan"])
    assert plan.groups["conv"].scale == "channel" and plan.groups["netvlad"].scale == "layer"
    assert CompressionPlan.from_dict(plan.to_dict()) == plan
    everywhere = resolve_trial_config({"scale": "channel", "groups": "conv,netvlad"})
    assert {g["scale"] for g in everywhere["plan"]["groups"].values()} == {"channel"}
    with pytest.raises(TrialConfigError, match="scale_conv"):
        resolve_trial_config({"scale_conv": "row"})
    with pytest.raises(TrialConfigError, match=r"scale_conv.*'channel'.*kmeans"):
        resolve_trial_config({"scale_conv": "channel", "quant_mode": "uniform"})
    with pytest.raises(PlanError, match=r"groups\.conv\.scale.*'row'"):
        CompressionPlan.from_dict({"groups": {"conv": {"scale": "row"}}})
    with pytest.raises(PlanError, match=r"groups\.conv\.scale = 'channel'.*uniform.*kmeans"):
        CompressionPlan.from_dict({"groups": {"conv": {"quant": "uniform", "scale": "channel"}}})
    with pytest.raises(ValueError, match="kmeans"):
        quantize_module(nn.Linear(4, 4), "uniform", 4, scale="channel")


def test_quantize_stage_applies_the_group_scale() -> None:
    model = _scaled_toy()
    plan = CompressionPlan.from_dict(
        {"groups": {"conv": {"prune": "none", "scale": "channel"}, "fc": {"prune": "none"}}}
    )
    out = quantize_and_finetune(model, plan, {"conv": ["0", "2"], "fc": ["5"]}, lambda m, s, e: [])
    assert [r.get("scale") for r in out["layers"]] == ["channel", "channel", None]
    assert quantized_view(model.get_submodule("2")).scale.shape == (8,)
    assert quantized_view(model.get_submodule("5")).scale is None


def test_search_space_accepts_scale(tmp_path: Path) -> None:
    good = tmp_path / "s.yaml"
    good.write_text(
        "description: x\nsampler: {type: random, seed: 0}\nparams:\n  scale_conv: {choices: [layer, channel]}\n"
        "fixed:\n  scale: channel\n"
    )
    space = load_search_space(good)
    assert space.fixed["scale"] == "channel"
    bad = tmp_path / "b.yaml"
    bad.write_text("description: x\nsampler: {type: random, seed: 0}\nfixed:\n  scale_conv: row\n")
    with pytest.raises(SearchSpaceError, match="scale_conv"):
        load_search_space(bad)
    uniform = tmp_path / "u.yaml"
    uniform.write_text(
        "description: x\nsampler: {type: random, seed: 0}\nfixed:\n  quant_mode: uniform\n  scale: channel\n"
    )
    with pytest.raises(SearchSpaceError, match="scale.*kmeans"):
        load_search_space(uniform)
    unused = tmp_path / "n.yaml"
    unused.write_text(
        "description: x\nsampler: {type: random, seed: 0}\nparams:\n  scale_conv: {choices: [layer, channel]}\n"
        "fixed:\n  quant_mode: none\n"
    )
    with pytest.raises(SearchSpaceError, match="scale_conv.*no effect"):
        load_search_space(unused)


def test_scaled_codebook_gradient_is_the_autograd_formula() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    _spread_channels(conv)
    quantize_module(conv, "kmeans", 3, scale="channel")
    view = quantized_view(conv)
    x = torch.randn(2, 4, 5, 5)
    conv(x).pow(2).sum().backward()
    got = conv.parametrizations.weight.original.grad.clone()
    codebook = view.codebook.clone().requires_grad_(True)
    w = codebook[view.indices] * view.mask.float() * view.scale.view(-1, 1, 1, 1)
    torch.nn.functional.conv2d(x, w, conv.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(got, codebook.grad, rtol=1e-5, atol=1e-6)
    assert got.abs().sum() > 0
