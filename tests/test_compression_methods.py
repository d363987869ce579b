"""Compression methods on small real models: plans, pruning masks, L1, uniform and trained k-means, the schedule."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainables.compression.kmeans1d import (
    assign_1d,
    entropy_constrained_regions,
    kmeans_1d,
    linear_init,
    midpoint_boundaries,
    quantization_mse,
)
from trainables.compression.l1 import l1_penalty
from trainables.compression.plan import CompressionPlan, GroupPlan, PlanError, default_groups
from trainables.compression.prune import prune_layers, sparsity_report
from trainables.compression.quantize import (
    effective_weight,
    prune_mask,
    quantize_module,
    quantized_view,
    strip_compression,
)
from trainables.compression.schedule import (
    apply_masks,
    compress_model,
    dense_state_dict,
    export_masks,
    prune_and_retrain,
    quantize_and_finetune,
    sparsify,
)


def reference_lloyd(x: np.ndarray, init: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Lloyd on every point: argmin over all centroids, means, empty clusters keep their centroid."""
    c = init.astype(np.float64).copy()
    xd = x.astype(np.float64)
    for _ in range(iters):
        idx = np.abs(xd[:, None] - c[None, :]).argmin(axis=1)
        counts = np.bincount(idx, minlength=c.size)
        sums = np.bincount(idx, weights=xd, minlength=c.size)
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
    return c, np.abs(xd[:, None] - c[None, :]).argmin(axis=1)


def toy_regression(seed: int = 0):
    """A conv+linear model and a teacher with different weights: a loss that training can lower."""
    g = torch.Generator().manual_seed(seed)
    student = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.data.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(32, 2, 6, 6, generator=g)
    with torch.no_grad():
        y = teacher(x)
    return student, x, y


def make_train_fn(x, y, *, lr=0.05, momentum=0.9, weight_decay=1e-2, opt="sgd", calls=None):
    def train(model, steps, extra_loss):
        if calls is not None:
            calls.append(steps)
        params = [p for p in model.parameters() if p.requires_grad]
        if opt == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        losses = []
        for _ in range(steps):
            loss = ((model(x) - y) ** 2).mean()
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    return train


def loss_of(model, x, y) -> float:
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


# ---------------------------------------------------------------------------------------------- 1-D k-means


@pytest.mark.parametrize("k,iters", [(4, 3), (16, 12), (32, 100)])
def test_kmeans_1d_equals_reference_lloyd(k, iters):
    rng = np.random.default_rng(k)
    x = np.concatenate([rng.laplace(0, 0.02, 3000), rng.normal(0.1, 0.01, 1000)]).astype(np.float32)
    rng.shuffle(x)
    init = linear_init(x, k)
    ref_c, ref_idx = reference_lloyd(x, init, iters)
    res = kmeans_1d(x, init=init, iters=iters)
    # With early stopping the fast version may run fewer updates; after convergence the reference no longer moves.
    assert res.iterations <= iters
    np.testing.assert_allclose(res.centroids, ref_c, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res.indices, ref_idx)
    assert res.mse == pytest.approx(quantization_mse(x, ref_c, ref_idx), rel=1e-9)


def test_kmeans_1d_ties_go_to_lower_centroid_and_empty_clusters_stay():
    x = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    # 1.5 is nobody's value; 10.0 starts empty and must stay where it is.
    res = kmeans_1d(x, init=np.array([0.5, 2.5, 10.0]), iters=5)
    assert res.centroids[2] == 10.0
    np.testing.assert_array_equal(assign_1d(np.array([1.5], dtype=np.float32), np.array([1.0, 2.0])), [0])
    assert res.converged


@pytest.mark.parametrize("k", [2, 256, 40000])
def test_assign_1d_lookup_table_matches_binary_search_and_argmin(k):
    rng = np.random.default_rng(k)
    c = np.sort(rng.laplace(0, 0.05, k))
    c[k // 3 : k // 3 + max(1, k // 50)] = c[k // 3]  # collapsed centroids: zero-width clusters
    bounds = midpoint_boundaries(c)
    # Values exactly on, just above and just below every boundary, the centroids themselves, and a Laplacian bulk.
    x = np.concatenate(
        [
            bounds,
            np.nextafter(bounds, np.float32(np.inf)),
            np.nextafter(bounds, np.float32(-np.inf)),
            c.astype(np.float32),
            rng.laplace(0, 0.05, 20000).astype(np.float32),
        ]
    )
    fast = assign_1d(x, c, lookup_table=True)
    np.testing.assert_array_equal(fast, assign_1d(x, c, lookup_table=False))
    if k <= 256:
        dist = np.abs(x.astype(np.float64)[:, None] - c[None, :])
        # Nearest (collapsed centroids make several equally near; any of them is right).
        chosen = np.take_along_axis(dist, fast[:, None].astype(np.int64), axis=1)[:, 0]
        assert bool(np.all(chosen <= dist.min(axis=1) * (1 + 1e-12)))
    assert (
        assign_1d(np.full(10, 0.5, np.float32), np.array([0.0, 1.0]), lookup_table=True).tolist() == [0] * 10
    )


def test_kmeans_mse_at_most_uniform_on_laplacian():
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.laplace(0, 0.01, (64, 256)).astype(np.float32))
    for bits in (2, 4, 6):
        mse = {}
        for mode in ("uniform", "kmeans"):
            layer = nn.Linear(256, 64, bias=False)
            layer.weight.data.copy_(w)
            mse[mode] = quantize_module(layer, mode, bits)["mse"]
        assert mse["kmeans"] < mse["uniform"], (bits, mse)


def _index_entropy(indices: np.ndarray, k: int) -> float:
    share = np.bincount(indices, minlength=k) / indices.size
    share = share[share > 0]
    return float(-(share * np.log2(share)).sum())


def test_entropy_constrained_regions_are_the_argmin_of_error_plus_weighted_bits():
    """The lower envelope gives every value the centroid a brute-force argmin over all of them gives (up to exact
    cost ties); a centroid whose bits are infinite, or that is undercut everywhere, wins nothing."""
    rng = np.random.default_rng(3)
    c = np.sort(rng.normal(0, 1, 24))
    c[5] = c[4]  # a duplicate: the cheaper (else the lower) index keeps it
    bits = rng.uniform(0.5, 9.0, c.size)
    bits[[2, 17]] = np.inf
    x = np.concatenate([rng.normal(0, 1.5, 20000), c]).astype(np.float32)
    for weight in (0.0, 0.05, 0.5, 3.0):
        members, bounds = entropy_constrained_regions(c, bits, weight)
        assert np.all(np.diff(members) > 0) and np.all(np.diff(bounds) >= 0)
        assert not {2, 17} & set(members.tolist())
        chosen = members[np.searchsorted(bounds, x, side="left")]
        penalty = np.where(np.isfinite(bits), weight * np.where(np.isfinite(bits), bits, 0), np.inf)
        cost = (x.astype(np.float64)[:, None] - c[None, :]) ** 2 + penalty[None, :]
        best = cost.min(axis=1)
        np.testing.assert_allclose(cost[np.arange(x.size), chosen], best, rtol=1e-12, atol=1e-12)
        assert (cost[np.arange(x.size), chosen] == best).mean() > 0.999


def test_entropy_constrained_kmeans_lowers_index_entropy_at_a_bounded_cost():
    """rate 0 is Lloyd, bit for bit; a growing rate gives a lower index entropy and a higher error, the indices
    are the assignment the result reports (its mse), the codebook stays ascending, and at about Lloyd-8's
    entropy a 32-centroid entropy-constrained codebook has the lower error (why it exists)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.laplace(0, 0.1, 40000), rng.normal(0, 0.5, 1000)]).astype(np.float32)
    rng.shuffle(x)
    lloyd = kmeans_1d(x, 32)
    same = kmeans_1d(x, 32, rate=0.0)
    np.testing.assert_array_equal(same.indices, lloyd.indices)
    np.testing.assert_array_equal(same.centroids, lloyd.centroids)
    last_h, last_mse = _index_entropy(lloyd.indices, 32), lloyd.mse
    # Rates in units of the largest squared value: var / max² turns "relative error per bit" into them.
    per_var = float(np.var(x.astype(np.float64))) / float(np.abs(x).max()) ** 2
    for rate in (0.02 * per_var, 0.05 * per_var, 0.1 * per_var, 0.2 * per_var):
        res = kmeans_1d(x, 32, rate=rate)
        h = _index_entropy(res.indices, 32)
        assert h < last_h and res.mse > last_mse, (rate, h, last_h, res.mse, last_mse)
        assert res.mse == pytest.approx(quantization_mse(x, res.centroids, res.indices), rel=1e-9)
        assert np.all(np.diff(res.centroids) >= 0)
        last_h, last_mse = h, res.mse
    lloyd8 = kmeans_1d(x, 8, iters=200)
    h8 = _index_entropy(lloyd8.indices, 8)
    ec = min(
        (kmeans_1d(x, 32, rate=r * per_var) for r in np.linspace(0.02, 0.2, 19)),
        key=lambda r: abs(_index_entropy(r.indices, 32) - h8),
    )
    assert _index_entropy(ec.indices, 32) <= h8 + 0.05
    assert ec.mse < lloyd8.mse, (ec.mse, lloyd8.mse)
    with pytest.raises(ValueError, match="rate"):
        kmeans_1d(x, 4, rate=-0.1)


def test_entropy_constrained_objective_never_rises_and_reaches_a_fixed_point():
    """Each step (assign by cost, then means and shares) cannot raise mse/var + rate·H; with enough steps the
    assignment stops changing and rerunning from the result changes nothing."""
    rng = np.random.default_rng(5)
    x = rng.laplace(0, 1.0, 5000).astype(np.float32)
    rate = 0.002
    unit = float(np.abs(x).max()) ** 2
    # From converged Lloyd centroids, so ``iters`` only counts the entropy-constrained steps.
    lloyd = kmeans_1d(x, 16, iters=500)
    assert lloyd.converged
    objective = [lloyd.mse / unit + rate * _index_entropy(lloyd.indices, 16)]
    for iters in range(1, 12):
        res = kmeans_1d(x, init=lloyd.centroids, iters=iters, rate=rate)
        objective.append(res.mse / unit + rate * _index_entropy(res.indices, 16))
    assert all(b <= a + 1e-12 for a, b in zip(objective, objective[1:])), objective
    assert objective[-1] < 0.9 * objective[0], objective  # the rate did move the assignment
    res = kmeans_1d(x, 16, iters=500, rate=rate)
    assert res.converged


def test_entropy_constrained_quantization_ships_a_smaller_file_and_decodes_exactly(tmp_path):
    """The plan key reaches the quantizer, the layer row reports the rate and the index entropy, the file is
    smaller than Lloyd's at the same bits and decodes to the model that was measured; a rate with uniform levels
    is refused by name."""
    from trainables.compression.architectures import register_architecture
    from trainables.compression.codec import load_compressed, save_compressed

    register_architecture("toy-regression", lambda config: toy_regression()[0])
    sizes, entropy = {}, {}
    for rate in (0.0, 0.2):
        model, x, y = toy_regression()
        groups = {"conv": {"quant": "kmeans", "bits": 5}, "fc": {"quant": "kmeans", "bits": 5}}
        if rate:
            groups["fc"]["kmeans_rate"] = rate
        plan = CompressionPlan.from_dict({"groups": groups, "quant_steps": 2})
        assert ("kmeans_rate" in plan.to_dict()["groups"]["fc"]) == bool(rate)
        assert CompressionPlan.from_dict(plan.to_dict()) == plan
        report = quantize_and_finetune(model, plan, default_groups(model), make_train_fn(x, y))
        fc = next(r for r in report["layers"] if r["layer"] == "3")
        assert ("kmeans_rate" in fc) == bool(rate)
        entropy[rate] = _index_entropy(quantized_view(model.get_submodule("3")).indices.numpy().ravel(), 32)
        path = tmp_path / f"{rate}.safetensors"
        sizes[rate] = save_compressed(
            model, plan, path, {"architecture": {"name": "toy-regression", "config": {}}}
        )
        with torch.no_grad():
            assert torch.equal(load_compressed(path)(x), model(x))
        if rate:
            assert fc["index_entropy_bits"] == pytest.approx(entropy[rate])
    assert entropy[0.2] < entropy[0.0] - 0.5
    assert sizes[0.2].totals["payload_bytes"] < sizes[0.0].totals["payload_bytes"]
    with pytest.raises(PlanError, match=r"groups\.fc\.kmeans_rate = 0\.1 with groups\.fc\.quant = 'uniform'"):
        CompressionPlan.from_dict({"groups": {"fc": {"quant": "uniform", "kmeans_rate": 0.1}}})
    with pytest.raises(PlanError, match=r"groups\.fc\.kmeans_rate = -1"):
        CompressionPlan.from_dict({"groups": {"fc": {"kmeans_rate": -1}}})
    with pytest.raises(ValueError, match="kmeans_rate"):
        quantize_module(nn.Linear(4, 4), "uniform", 4, kmeans_rate=0.1)


# ---------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("mode", ["kmeans", "uniform"])
def test_quantized_view_reproduces_effective_weight_exactly(mode):
    model, x, y = toy_regression()
    plan = CompressionPlan(
        groups={"conv": GroupPlan("abs", 0.05, mode, 3), "fc": GroupPlan("sigma", 0.5, mode, 5)},
        quant_steps=5,
    )
    groups = default_groups(model)
    prune_and_retrain(model, plan, groups, make_train_fn(x, y))
    quantize_and_finetune(model, plan, groups, make_train_fn(x, y))
    for name, bits in (("0", 3), ("3", 5)):
        module = model.get_submodule(name)
        view = quantized_view(module)
        assert view is not None and view.mode == mode and view.bits == bits
        assert view.codebook.dtype == torch.float32 and view.codebook.numel() == 2**bits
        assert view.indices.dtype == torch.int64 and view.indices.shape == module.weight.shape
        assert view.mask.dtype == torch.bool and not bool(view.mask.all())
        assert torch.equal(
            view.codebook[view.indices] * view.mask.to(torch.float32), effective_weight(module)
        )
    assert quantized_view(nn.Linear(2, 2)) is None
    out = model(x)
    strip_compression(model)
    assert all("parametrizations" not in k and "_orig" not in k for k in model.state_dict())
    assert torch.equal(model(x), out)


def test_trained_kmeans_really_trains():
    torch.manual_seed(0)
    model, x, y = toy_regression()
    groups = default_groups(model)
    plan = CompressionPlan(
        groups={"conv": GroupPlan("abs", 0.1, "kmeans", 3), "fc": GroupPlan("abs", 0.04, "kmeans", 3)}
    )
    prune_layers(model, plan, groups)
    quantize_and_finetune(model, plan, groups, make_train_fn(x, y))
    frozen = copy.deepcopy(model)
    for name in ("0", "3"):
        frozen.get_submodule(name).parametrizations.weight.original.requires_grad_(False)
    before = {n: quantized_view(model.get_submodule(n)) for n in ("0", "3")}
    loss0 = loss_of(model, x, y)

    train = make_train_fn(x, y, lr=0.02, opt="adamw", weight_decay=0.0)
    train(model, 40, None)
    train(frozen, 40, None)

    for name in ("0", "3"):
        now = quantized_view(model.get_submodule(name))
        assert not torch.equal(now.codebook, before[name].codebook), "centroids did not move"
        assert torch.equal(now.indices, before[name].indices), "indices changed"
        assert torch.equal(now.mask, before[name].mask)
        w = effective_weight(model.get_submodule(name))
        assert bool((w[~now.mask] == 0).all()), "a pruned weight became nonzero"
        assert torch.equal(quantized_view(frozen.get_submodule(name)).codebook, before[name].codebook)
    assert loss_of(model, x, y) < 0.9 * loss0
    assert loss_of(model, x, y) < loss_of(frozen, x, y)


def test_every_compressed_layer_is_retrained_unless_the_plan_keeps_it_frozen():
    model, x, y = toy_regression()
    model[0].weight.requires_grad_(False)  # as the base fine-tune leaves AlexNet's conv1-4
    groups = default_groups(model)
    two_bits = {"conv": GroupPlan("none", 0.0, "kmeans", 2), "fc": GroupPlan("none", 0.0, "kmeans", 2)}
    quantize_and_finetune(model, CompressionPlan(groups=two_bits), groups, make_train_fn(x, y))
    assert model[0].parametrizations.weight.original.requires_grad is True


def test_a_plan_that_keeps_a_frozen_layer_keeps_a_frozen_codebook():
    model, x, y = toy_regression()
    model[0].weight.requires_grad_(False)
    groups = default_groups(model)
    plan = CompressionPlan(
        groups={"conv": GroupPlan("none", 0.0, "kmeans", 2), "fc": GroupPlan("none", 0.0, "kmeans", 2)},
        keep_frozen=True,
    )
    quantize_and_finetune(model, plan, groups, make_train_fn(x, y))
    assert model[0].parametrizations.weight.original.requires_grad is False
    assert model[3].parametrizations.weight.original.requires_grad is True
    before = quantized_view(model[0]).codebook
    make_train_fn(x, y, opt="adamw")(model, 5, None)
    assert torch.equal(quantized_view(model[0]).codebook, before)


def test_uniform_levels_span_kept_range_and_straight_through_gradient():
    torch.manual_seed(3)
    layer = nn.Linear(40, 30)
    with torch.no_grad():
        layer.weight[:, :10] = 0.0  # exact zeros count as pruned when there is no prune mask
    w0 = layer.weight.detach().clone()
    kept = w0[w0 != 0]
    quantize_module(layer, "uniform", 3)
    view = quantized_view(layer)
    np.testing.assert_allclose(
        view.codebook.numpy(), np.linspace(float(kept.min()), float(kept.max()), 8), rtol=1e-6
    )
    assert torch.equal(view.mask, w0 != 0)
    values = set(layer.weight[view.mask].tolist())
    assert values <= set(view.codebook.tolist()) and len(values) > 4
    assert bool((layer.weight[:, :10] == 0).all())
    # Nearest level: the error of every kept weight is at most half a step.
    step = float(view.codebook[1] - view.codebook[0])
    assert float((layer.weight.detach() - w0)[view.mask].abs().max()) <= step / 2 + 1e-6

    # Straight-through: the latent weight gets the gradient of the quantized weight, masked.
    latent = layer.parametrizations.weight.original
    x = torch.randn(8, 40)
    layer(x).pow(2).sum().backward()
    q = layer.weight.detach().requires_grad_()
    (grad_q,) = torch.autograd.grad(nn.functional.linear(x, q, layer.bias).pow(2).sum(), [q])
    assert latent.grad is not None and latent.grad[:, 10:].abs().sum() > 0
    assert torch.equal(latent.grad, grad_q * view.mask)


def test_uniform_latent_weights_train_and_levels_follow():
    model, x, y = toy_regression(1)
    groups = default_groups(model)
    plan = CompressionPlan(groups={"fc": GroupPlan("abs", 0.03, "uniform", 4)})
    prune_layers(model, plan, groups)
    quantize_and_finetune(model, plan, groups, make_train_fn(x, y))
    before = quantized_view(model[3])
    loss0 = loss_of(model, x, y)
    make_train_fn(x, y, lr=0.01, opt="adamw", weight_decay=0.0)(model, 30, None)
    after = quantized_view(model[3])
    assert torch.equal(after.codebook, before.codebook)  # levels are fixed at quantization time
    assert not torch.equal(after.indices[after.mask], before.indices[before.mask])
    assert bool((model[3].weight[~after.mask] == 0).all())
    assert loss_of(model, x, y) < loss0


# ---------------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_masks_hold_through_retraining_with_momentum_and_weight_decay(opt):
    model, x, y = toy_regression()
    groups = default_groups(model)
    plan = CompressionPlan(
        groups={"conv": GroupPlan("abs", 0.08), "fc": GroupPlan("sigma", 0.7)},
        prune_rounds=2,
        retrain_steps=15,
    )
    train = make_train_fn(x, y, opt=opt, lr=0.05 if opt == "sgd" else 0.01, weight_decay=0.05)
    report = prune_and_retrain(model, plan, groups, train)
    assert len(report["rounds"]) == 2 and all(len(r["losses"]) == 15 for r in report["rounds"])
    assert report["rounds"][1]["sparsity"] >= report["rounds"][0]["sparsity"] > 0.2
    for name in ("0", "3"):
        module = model.get_submodule(name)
        mask = prune_mask(module)
        assert mask is not None and not bool(mask.all())
        assert bool((effective_weight(module)[~mask] == 0).all())
        assert bool((module.weight_orig[~mask] == 0).all())  # nothing for decay/momentum to move
    t0 = report["thresholds"]["0"]
    assert t0 == pytest.approx(0.08)
    assert report["sparsity"]["nonzeros"] == sum(
        int(prune_mask(model.get_submodule(n)).sum()) for n in ("0", "3")
    )


def test_iterative_rounds_accumulate_masks():
    model, x, y = toy_regression()
    groups = default_groups(model)
    plan = CompressionPlan(groups={"fc": GroupPlan("abs", 0.05)})
    prune_layers(model, plan, groups)
    first = prune_mask(model[3]).clone()
    make_train_fn(x, y, opt="adamw", lr=0.02, weight_decay=0.5)(model, 20, None)
    prune_layers(model, plan, groups)
    second = prune_mask(model[3])
    assert bool((second <= first).all()) and int(second.sum()) < int(first.sum())


@pytest.mark.parametrize(
    "mode,threshold,expected",
    [
        ("sigma", 1.0, 0.6827),  # P(|z| < 1σ) of a normal
        ("sigma", 0.5, 0.3829),
        ("abs", 0.5, 1 - np.exp(-0.5 / 0.25)),  # Laplace(b=0.25): P(|w| < t) = 1 - exp(-t/b)
    ],
)
def test_sigma_and_abs_thresholds_prune_expected_fraction(mode, threshold, expected):
    rng = np.random.default_rng(7)
    layer = nn.Linear(400, 500, bias=False)
    w = rng.normal(0, 2.0, (500, 400)) if mode == "sigma" else rng.laplace(0, 0.25, (500, 400))
    layer.weight.data.copy_(torch.from_numpy(w.astype(np.float32)))
    plan = CompressionPlan(groups={"fc": GroupPlan(mode, threshold, "none")})
    prune_layers(layer, plan, {"fc": [""]})
    assert sparsity_report(layer, {"fc": [""]})["sparsity"] == pytest.approx(expected, abs=0.006)


def test_whole_layer_prune_refused_unless_allowed():
    model, _, _ = toy_regression()
    groups = default_groups(model)
    max_abs = float(model[3].weight.detach().abs().max())
    plan = CompressionPlan(groups={"conv": GroupPlan("abs", 0.01), "fc": GroupPlan("abs", max_abs + 1e-3)})
    with pytest.raises(PlanError) as err:
        prune_layers(model, plan, groups)
    msg = str(err.value)
    assert (
        "'3'" in msg
        and f"{max_abs:.6g}" in msg
        and "allow_empty_layer" in msg
        and "groups.fc.threshold" in msg
    )
    assert prune_mask(model[0]) is None, "a refused plan must leave every layer untouched"
    sigma = CompressionPlan(groups={"fc": GroupPlan("sigma", 100.0)})
    with pytest.raises(PlanError, match="sigma"):
        prune_layers(model, sigma, groups)
    plan.allow_empty_layer = True
    prune_layers(model, plan, groups)
    assert int(torch.count_nonzero(effective_weight(model[3]))) == 0


def test_l1_penalty_is_lambda_times_abs_sum_and_sparsify_shrinks_weights():
    model, x, y = toy_regression()
    groups = default_groups(model)
    pen = l1_penalty(model, {"fc": groups["fc"]}, 0.01)
    assert float(pen().detach()) == pytest.approx(
        0.01 * float(model[3].weight.detach().abs().sum()), rel=1e-5
    )
    pen().backward()
    assert torch.allclose(model[3].weight.grad, 0.01 * model[3].weight.sign())
    assert model[0].weight.grad is None
    model.zero_grad()
    plain = copy.deepcopy(model)
    train = make_train_fn(x, y, opt="sgd", momentum=0.0, weight_decay=0.0, lr=0.05)
    out = sparsify(
        model, CompressionPlan(groups={"fc": GroupPlan()}, l1_lambda=0.05, l1_steps=20), groups, train
    )
    sparsify(plain, CompressionPlan(groups={"fc": GroupPlan()}, l1_lambda=0.0, l1_steps=20), groups, train)
    assert len(out["losses"]) == 20
    # Same data, same steps: only the L1 term differs, and it must leave the compressed layer smaller in L1 norm.
    assert float(model[3].weight.detach().abs().sum()) < 0.9 * float(plain[3].weight.detach().abs().sum())


# ---------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize(
    "data,needles",
    [
        ({"groups": {"conv": {"bits": 17}}}, ["groups.conv.bits", "17", "1..16"]),
        ({"groups": {"conv": {"bits": 0}}}, ["groups.conv.bits", "0", "1..16"]),
        ({"groups": {"conv": {"bits": 4.0}}}, ["groups.conv.bits", "4.0", "integer"]),
        ({"groups": {"conv": {"bits": True}}}, ["groups.conv.bits", "True"]),
        ({"groups": {"conv": {"threshold": -0.1}}}, ["groups.conv.threshold", "-0.1", ">= 0"]),
        ({"groups": {"conv": {"threshold": "0.1"}}}, ["groups.conv.threshold", "'0.1'", "number"]),
        ({"groups": {"conv": {"prune": "l2"}}}, ["groups.conv.prune", "'l2'", "'abs'", "'sigma'"]),
        ({"groups": {"conv": {"quant": "fp8"}}}, ["groups.conv.quant", "'fp8'", "'kmeans'"]),
        ({"groups": {"conv": {"bitz": 4}}}, ["groups.conv.bitz", "bits"]),
        ({"groups": {"conv": 8}}, ["groups.conv", "8"]),
        ({"groups": ["conv"]}, ["groups", "['conv']"]),
        ({"l1_lambda": -1e-5}, ["l1_lambda", "-1e-05", ">= 0"]),
        ({"l1_lambda": float("nan")}, ["l1_lambda", "nan"]),
        ({"prune_rounds": 0}, ["prune_rounds", "0", ">= 1"]),
        ({"retrain_steps": 2.5}, ["retrain_steps", "2.5", "integer"]),
        ({"allow_empty_layer": "yes"}, ["allow_empty_layer", "'yes'"]),
        ({"l1_lamda": 0.1}, ["l1_lamda", "l1_lambda"]),
    ],
)
def test_bad_plans_name_key_and_value(data, needles):
    with pytest.raises(PlanError) as err:
        CompressionPlan.from_dict(data, source="trial 7 config")
    msg = str(err.value)
    assert msg.startswith("trial 7 config")
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_plan_round_trips_and_validates_group_names():
    import json

    d = {
        "groups": {
            "conv": {"prune": "sigma", "threshold": 1, "quant": "uniform", "bits": 8},
            "whitening": {"bits": 5},
        },
        "l1_lambda": 1e-5,
        "prune_rounds": 3,
    }
    plan = CompressionPlan.from_dict(d)
    assert plan.groups["conv"].threshold == 1.0 and plan.groups["whitening"].quant == "kmeans"
    assert CompressionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    plan.validate(["conv", "netvlad", "whitening"])
    with pytest.raises(PlanError) as err:
        plan.validate(["conv", "netvlad"])
    assert "'whitening'" in str(err.value) and "conv, netvlad" in str(err.value)
    with pytest.raises(PlanError, match="bits = 20"):
        GroupPlan(bits=20)
    with pytest.raises(PlanError, match="groups.fc"):
        CompressionPlan(groups={"fc": {"bits": 4}})


def test_default_groups_by_type_and_from_the_model():
    model, _, _ = toy_regression()
    assert default_groups(model) == {"conv": ["0"], "fc": ["3"]}

    class WithGroups(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def compression_groups(self):
            return {"whitening": ["b"], "netvlad": ["a"]}

    assert default_groups(WithGroups()) == {"whitening": ["b"], "netvlad": ["a"]}
    with pytest.raises(PlanError, match="'missing'"):
        prune_layers(model, CompressionPlan(groups={"fc": GroupPlan()}), {"fc": ["missing"]})


# ---------------------------------------------------------------------------------------------- schedule


def test_masks_checkpoint_through_safetensors(tmp_path):
    model, x, y = toy_regression()
    groups = default_groups(model)
    plan = CompressionPlan(
        groups={"conv": GroupPlan("abs", 0.1), "fc": GroupPlan("abs", 0.05)}, retrain_steps=5
    )
    prune_and_retrain(model, plan, groups, make_train_fn(x, y))
    save_file(dense_state_dict(model), tmp_path / "weights.safetensors")
    save_file(export_masks(model), tmp_path / "masks.safetensors")

    restored, _, _ = toy_regression(5)
    restored.load_state_dict(load_file(tmp_path / "weights.safetensors"))
    apply_masks(restored, load_file(tmp_path / "masks.safetensors"), groups)
    assert torch.equal(restored(x), model(x))
    for name in ("0", "3"):
        assert torch.equal(prune_mask(restored.get_submodule(name)), prune_mask(model.get_submodule(name)))
    # Retraining the restored model keeps its masks, and quantization keeps them too.
    train = make_train_fn(x, y)
    quantize_and_finetune(restored, CompressionPlan(groups=plan.groups, quant_steps=5), groups, train)
    for name in ("0", "3"):
        assert torch.equal(
            quantized_view(restored.get_submodule(name)).mask, prune_mask(model.get_submodule(name))
        )
    with pytest.raises(PlanError, match="no layer group"):
        apply_masks(restored, {"1": torch.ones(1, dtype=torch.bool)}, groups)


def test_compress_model_runs_every_stage_and_skips_zero_steps():
    model, x, y = toy_regression()
    groups = default_groups(model)
    calls: list[int] = []
    plan = CompressionPlan.from_dict(
        {
            "groups": {
                "conv": {"prune": "sigma", "threshold": 0.5, "quant": "kmeans", "bits": 4},
                "fc": {"prune": "abs", "threshold": 0.03, "quant": "uniform", "bits": 6},
            },
            "l1_lambda": 1e-4,
            "l1_steps": 0,
            "prune_rounds": 2,
            "retrain_steps": 3,
            "quant_steps": 4,
        }
    )
    report = compress_model(model, plan, groups, make_train_fn(x, y, calls=calls))
    assert calls == [3, 3, 4]
    assert report["sparsify"]["losses"] == [] and len(report["quantize"]["losses"]) == 4
    assert {r["layer"]: (r["mode"], r["bits"]) for r in report["quantize"]["layers"]} == {
        "0": ("kmeans", 4),
        "3": ("uniform", 6),
    }
    assert 0 < report["quantize"]["sparsity"]["sparsity"] < 1
    with pytest.raises(PlanError, match="available groups: conv, fc"):
        compress_model(model, CompressionPlan(groups={"whitening": GroupPlan()}), groups, make_train_fn(x, y))


@pytest.mark.parametrize("mode", ["kmeans", "uniform"])
def test_extreme_bits_and_an_all_pruned_layer_stay_exact(mode):
    torch.manual_seed(4)
    for bits in (1, 16):
        layer = nn.Linear(30, 20)
        w0 = layer.weight.detach().clone()
        quantize_module(layer, mode, bits)
        view = quantized_view(layer)
        assert view.codebook.numel() == 2**bits
        assert torch.equal(view.codebook[view.indices] * view.mask.float(), layer.weight)
        if bits == 16:  # more levels than weights: close to lossless
            assert float((layer.weight.detach() - w0).abs().max()) < 1e-3
        else:
            assert len(set(layer.weight.detach().flatten().tolist())) <= 2
    empty = nn.Linear(4, 3)
    plan = CompressionPlan(groups={"fc": GroupPlan("abs", 10.0, mode, 4)}, allow_empty_layer=True)
    prune_layers(empty, plan, {"fc": [""]})
    report = quantize_module(empty, mode, 4)
    assert report["kept"] == 0 and bool((empty.weight == 0).all())
    assert not bool(quantized_view(empty).mask.any())


def test_assigning_a_dense_weight_refits_the_codebook_with_indices_fixed():
    torch.manual_seed(5)
    layer = nn.Linear(16, 8)
    quantize_module(layer, "kmeans", 2)
    view = quantized_view(layer)
    target = torch.randn(8, 16)
    layer.weight = target  # parametrize routes this through right_inverse
    after = quantized_view(layer)
    assert torch.equal(after.indices, view.indices)
    for j in range(4):
        members = target[view.indices == j]
        if members.numel():
            assert float(after.codebook[j]) == pytest.approx(float(members.double().mean()), abs=1e-6)
        else:
            assert float(after.codebook[j]) == float(view.codebook[j])


def test_float16_biases_are_rounded_after_training_and_ship_in_two_bytes_exactly(tmp_path):
    """``bias_dtype: float16``: the quantize stage trains, then rounds each quantized layer's bias to float16
    values; the file stores those biases as F16 (2 bytes each) and the decoded model computes exactly what the
    rounded model computes. With the default the biases stay float32 in the file."""
    from trainables.compression.architectures import register_architecture
    from trainables.compression.codec import load_compressed, save_compressed

    register_architecture("toy-regression", lambda config: toy_regression()[0])
    files = {}
    for dtype in ("float32", "float16"):
        model, x, y = toy_regression()
        plan = CompressionPlan.from_dict(
            {
                "groups": {"conv": {"quant": "kmeans", "bits": 4}, "fc": {"quant": "kmeans", "bits": 4}},
                "quant_steps": 2,
                "bias_dtype": dtype,
            }
        )
        before = {
            n: m.bias.detach().clone()
            for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        }
        report = quantize_and_finetune(model, plan, default_groups(model), make_train_fn(x, y))
        path = tmp_path / f"{dtype}.safetensors"
        size = save_compressed(model, plan, path, {"architecture": {"name": "toy-regression", "config": {}}})
        rows = {r.name: r for r in size.layers}
        decoded = load_compressed(path)
        with torch.no_grad():
            assert torch.equal(decoded(x), model(x)), dtype
        for name in ("0", "3"):
            bias = model.get_submodule(name).bias.detach()
            assert not torch.equal(bias, before[name]), "the biases trained"
            exact = torch.equal(bias.half().float(), bias)
            assert exact == (dtype == "float16"), (dtype, name)
            assert rows[f"{name}.bias"].encoding == ("raw F16" if dtype == "float16" else "raw F32")
            assert decoded.get_submodule(name).bias.dtype == torch.float32
        assert report["float16_biases"] == (["0", "3"] if dtype == "float16" else [])
        files[dtype] = size.totals["payload_bytes"]
    assert files["float16"] == files["float32"] - 2 * (6 + 5)  # 11 biases, 2 bytes saved each
    with pytest.raises(PlanError, match="bias_dtype"):
        CompressionPlan.from_dict({"bias_dtype": "int8"})


def test_contract_and_search_space_take_the_kmeans_rate_per_group(tmp_path):
    """``kmeans_rate`` / ``kmeans_rate_<group>`` reach the plan only where they are not 0 (older plans and
    headers read as before); out-of-range values, a rate with uniform levels and a searched rate that cannot
    matter are refused before a trial, naming the key."""
    from search_spaces.schema import SearchSpaceError, load_search_space
    from trainables.contract import TrialConfigError, resolve_trial_config

    out = resolve_trial_config({"kmeans_rate_conv": 0.1, "groups": "conv,netvlad"})
    assert out["plan"]["groups"]["conv"]["kmeans_rate"] == 0.1
    assert "kmeans_rate" not in out["plan"]["groups"]["netvlad"]
    plan = CompressionPlan.from_dict(out["plan"])
    assert plan.groups["conv"].kmeans_rate == 0.1 and plan.groups["netvlad"].kmeans_rate == 0.0
    everywhere = resolve_trial_config({"kmeans_rate": 0.05, "groups": "conv,netvlad"})
    assert {g["kmeans_rate"] for g in everywhere["plan"]["groups"].values()} == {0.05}
    with pytest.raises(TrialConfigError, match=r"kmeans_rate_conv = 2.*0\.\.1"):
        resolve_trial_config({"kmeans_rate_conv": 2})
    with pytest.raises(TrialConfigError, match=r"kmeans_rate_conv = 0\.1.*needs quant_mode 'kmeans'"):
        resolve_trial_config({"kmeans_rate_conv": 0.1, "quant_mode": "uniform"})
    with pytest.raises(PlanError, match=r"groups\.conv\.kmeans_rate = 1\.5.*<= 1"):
        CompressionPlan.from_dict({"groups": {"conv": {"kmeans_rate": 1.5}}})
    # A searched rate that cannot matter (quant_mode none), and one uniform levels cannot take.
    for searched, quant, needle in (
        ("kmeans_rate_conv", "none", "kmeans_rate_conv.*no effect"),
        ("kmeans_rate", "uniform", "kmeans_rate.*kmeans"),
    ):
        space = tmp_path / f"{quant}.yaml"
        space.write_text(
            f"description: x\nsampler: {{type: random, seed: 0}}\nparams:\n  {searched}: {{float: [0.0, 0.2]}}\n"
            f"fixed:\n  quant_mode: {quant}\n"
        )
        with pytest.raises(SearchSpaceError, match=needle):
            load_search_space(space)


class _CentredToy(nn.Module):
    """A conv and a NetVLAD-like ``centroids`` parameter that ships dense beside the quantized weight."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3)
        self.centroids = nn.Parameter(torch.randn(3, 4, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3)) @ self.centroids.T


def test_float16_centroids_are_rounded_after_training_and_ship_in_two_bytes_exactly(tmp_path):
    from trainables.compression.architectures import register_architecture
    from trainables.compression.codec import load_compressed, save_compressed

    register_architecture("centred-toy", lambda config: _CentredToy())
    x = torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    payload = {}
    for dtype in ("float32", "float16"):
        model = _CentredToy()
        plan = CompressionPlan.from_dict(
            {"groups": {"conv": {"bits": 4}}, "quant_steps": 2, "centroids_dtype": dtype}
        )
        assert CompressionPlan.from_dict(plan.to_dict()) == plan
        report = quantize_and_finetune(model, plan, {"conv": ["conv"]}, make_train_fn(x, y))
        centres = model.centroids.detach()
        assert torch.equal(centres.half().float(), centres) == (dtype == "float16")
        assert report["float16_centroids"] == ([""] if dtype == "float16" else [])
        path = tmp_path / f"{dtype}.safetensors"
        size = save_compressed(model, plan, path, {"architecture": {"name": "centred-toy", "config": {}}})
        rows = {r.name: r for r in size.layers}
        assert rows["centroids"].encoding == ("raw F16" if dtype == "float16" else "raw F32")
        with torch.no_grad():
            assert torch.equal(load_compressed(path)(x), model(x))
        payload[dtype] = size.totals["payload_bytes"]
    assert payload["float16"] == payload["float32"] - 2 * 12
    with pytest.raises(PlanError, match="centroids_dtype"):
        CompressionPlan.from_dict({"centroids_dtype": "bfloat16"})
