"""NetVLAD models: backbones, the NetVLAD pooling layer, PCA whitening and model assembly."""
