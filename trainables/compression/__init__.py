"""Model compression on any ``nn.Module``: pruning, L1 sparsification, quantization and the compressed artifact."""
