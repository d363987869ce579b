"""NetVLAD models: backbones, the NetVLAD pooling layer, PCA whitening and model assembly."""

from trainables.netvlad.backbones import (
    BACKBONE_DIMS,
    BACKBONES,
    WeightsError,
    WeightsNotFoundError,
    build_backbone,
    imagenet_weights_path,
)
from trainables.netvlad.layers import NetVLAD, alpha_rule, netvlad_pool
from trainables.netvlad.model import (
    NetVLADConfig,
    NetVLADModel,
    build_netvlad,
    fit_whitening,
    init_clusters,
    parameter_summary,
)
from trainables.netvlad.whitening import WhiteningError, learn_pca_whitening, learn_whitening

__all__ = [
    "BACKBONES",
    "BACKBONE_DIMS",
    "NetVLAD",
    "NetVLADConfig",
    "NetVLADModel",
    "WeightsError",
    "WeightsNotFoundError",
    "WhiteningError",
    "alpha_rule",
    "build_backbone",
    "build_netvlad",
    "fit_whitening",
    "imagenet_weights_path",
    "init_clusters",
    "learn_pca_whitening",
    "learn_whitening",
    "netvlad_pool",
    "parameter_summary",
]
