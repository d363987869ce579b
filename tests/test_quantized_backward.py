"""The quantized layers' memory-lean forward/backward (`_CodebookGather`, chunked uniform assignment, eval cache)
against the plain autograd formula they replace: same weights bit for bit, same codebook gradients (float
tolerance), same artifact from the quantize stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from trainables.compression import quantize
from trainables.compression.codec import save_compressed
from trainables.compression.plan import CompressionPlan, GroupPlan
from trainables.compression.prune import apply_mask
from trainables.compression.quantize import quantize_module, quantized_view
from trainables.compression.schedule import quantize_and_finetune
from trainables.netvlad.model import build_netvlad


def reference_kmeans_forward(self, codebook: torch.Tensor) -> torch.Tensor:
    """The formula before the custom Function: plain autograd indexing (its backward is the index backward)."""
    return codebook[self.indices.long()] * self.mask.to(torch.float32)


def pruned_layer(seed: int, bits: int, mode: str = "kmeans") -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(120, 50)
    w = layer.weight.detach()
    apply_mask(layer, w.abs() > w.abs().median())
    quantize_module(layer, mode, bits, kmeans_iters=5)
    return layer


@pytest.mark.parametrize("bits", [1, 5, 9, 16])
def test_codebook_gradient_equals_the_autograd_index_path(bits):
    layer = pruned_layer(bits, bits)
    p = layer.parametrizations.weight[0]
    assert p.indices.dtype == quantize.index_dtype(2**bits)
    assert p.indices.element_size() <= (1 if bits <= 8 else 2 if bits <= 15 else 4)
    codebook = layer.parametrizations.weight.original
    x = torch.randn(7, 120)
    out = layer(x)
    out.pow(2).sum().backward()
    ours = codebook.grad.clone()

    ref_cb = codebook.detach().clone().requires_grad_()
    ref_w = reference_kmeans_forward(p, ref_cb)
    assert torch.equal(ref_w, layer.weight), "the forward weight changed"
    nn.functional.linear(x, ref_w, layer.bias).pow(2).sum().backward()
    # float64 truth: each cluster's sum of the masked weight gradient.
    w = layer.weight.detach().requires_grad_()
    (gw,) = torch.autograd.grad(nn.functional.linear(x, w, layer.bias).pow(2).sum(), [w])
    truth = torch.zeros(2**bits, dtype=torch.float64).index_add_(
        0, p.indices.long().flatten(), (gw * p.mask).double().flatten()
    )
    scale = float(truth.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref_cb.grad, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(ours.double(), truth, rtol=1e-6, atol=1e-7 * scale)


def test_uniform_levels_at_ties_equal_round_half_even_with_int64_indices():
    layer = nn.Linear(16, 4)
    with torch.no_grad():
        # Levels 0.5 .. 1.5 (no exact zero: that would count as pruned); weights on the levels and on the exact
        # midpoints as float32 computes them, where round-half-even decides.
        levels = torch.linspace(0.5, 1.5, 8)
        mids = (levels[:-1] + levels[1:]) / 2
        layer.weight.copy_(torch.cat([levels, mids, levels[3:4]]).reshape(1, 16).repeat(4, 1))
    w0 = layer.weight.detach().clone()
    quantize_module(layer, "uniform", 3)
    view = quantized_view(layer)
    lo, step = view.codebook[0], (view.codebook[-1] - view.codebook[0]) / 7
    ref_idx = torch.round((w0 - lo) / step).clamp_(0, 7).to(torch.int64)
    ref = view.codebook[ref_idx] * view.mask.to(torch.float32)
    assert torch.equal(layer.weight, ref)
    assert view.indices.dtype == torch.int64 and torch.equal(view.indices, ref_idx.masked_fill(~view.mask, 0))


@pytest.mark.parametrize("mode", ["kmeans", "uniform"])
def test_eval_weight_is_cached_until_the_trainable_tensor_changes(mode):
    layer = pruned_layer(3, 4, mode)
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first, "rebuilt without a change"
    trained = layer.parametrizations.weight.original
    opt = torch.optim.SGD([trained], lr=0.5)
    x = torch.randn(3, 120)
    w_train = layer.weight
    assert w_train is not first and w_train.grad_fn is not None
    layer(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer.weight
        assert after is not first and not torch.equal(after, first), "a stale weight after an optimizer step"
        fresh = copy.deepcopy(layer).weight
        assert torch.equal(fresh, after) and fresh is not after
    with torch.inference_mode():
        inf = layer.weight
    with torch.no_grad():
        assert layer.weight is not inf and not layer.weight.is_inference()


def _tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_netvlad({"backbone": "tiny", "num_clusters": 4, "whitening_dim": 32})
    for names in model.compression_groups().values():
        for name in names:
            module = model.get_submodule(name)
            w = module.weight.detach()
            apply_mask(module, w.abs() > w.abs().quantile(0.4))
    return model


def _file_content(path) -> tuple[dict, bytes]:
    """A safetensors file as (parsed header, tensor bytes): the writer orders the ``__metadata__`` keys differently
    from one save to the next, so two saves of the same model need not be equal byte for byte."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _stage_artifact(
    tmp_path, name: str, steps: int
) -> tuple[dict, tuple[dict, bytes], dict[str, torch.Tensor]]:
    model = _tiny_model(0)
    groups = model.compression_groups()
    plan = CompressionPlan(
        groups={g: GroupPlan("abs", 0.0, "kmeans", 5) for g in groups}, quant_steps=steps, kmeans_iters=5
    )
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g)
    target = torch.randn(2, 32, generator=g)  # the descriptor is L2-normalized: its own norm has no gradient

    def train(m, n, extra):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        losses = []
        for _ in range(n):
            loss = (m(images) - target).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    quantize_and_finetune(model, plan, groups, train)
    meta = {"architecture": {"name": "netvlad", "config": model.config_dict()}}
    path = tmp_path / name / "model.safetensors"  # one file name: the header records it
    totals = save_compressed(model, plan, path, meta=meta).to_dict()["totals"]
    books = {n: quantized_view(m).codebook for n, m in model.named_modules() if quantize.is_quantized(m)}
    return totals, _file_content(path), books


def test_quantize_stage_artifact_is_unchanged(tmp_path, monkeypatch):
    new_0 = _stage_artifact(tmp_path, "new0", 0)
    new_3 = _stage_artifact(tmp_path, "new3", 3)
    with monkeypatch.context() as mp:
        mp.setattr(quantize.KMeansWeight, "forward", reference_kmeans_forward)
        ref_0 = _stage_artifact(tmp_path, "ref0", 0)
        ref_3 = _stage_artifact(tmp_path, "ref3", 3)
    assert new_0[1] == ref_0[1], "the untrained quantized artifact differs"
    assert new_3[0] == ref_3[0], "artifact size report differs after centroid training"
    assert len(new_3[1][1]) == len(ref_3[1][1])
    assert new_3[2].keys() == ref_3[2].keys() and new_3[2]
    for n in new_3[2]:
        assert not torch.equal(new_3[2][n], new_0[2][n]), f"{n}: centroids did not train"
        torch.testing.assert_close(new_3[2][n], ref_3[2][n], rtol=1e-4, atol=1e-6)
