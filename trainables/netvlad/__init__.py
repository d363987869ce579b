"""NetVLAD models: backbones, batch-norm folding, the NetVLAD pooling layer, PCA whitening and model assembly."""

from trainables.netvlad.backbones import (
    BACKBONE_DIMS,
    BACKBONES,
    WeightsError,
    WeightsNotFoundError,
    build_backbone,
    imagenet_weights_path,
)
from trainables.netvlad.fold_bn import FoldError, fold_batchnorm
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
    "FoldError",
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
    "fold_batchnorm",
    "imagenet_weights_path",
    "init_clusters",
    "learn_pca_whitening",
    "learn_whitening",
    "netvlad_pool",
    "parameter_summary",
]
