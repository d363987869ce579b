"""Where torch runs: the device a model's weights are on, and the device a trial's GPU share maps to."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def select_device(gpus: float) -> torch.device:
    """CUDA when the trial holds a GPU share and this worker's torch sees CUDA, else the CPU.

    Ray gives a trial with ``gpus < 1`` a share of one card that other trials use too (``--gpus-per-trial 0.5``
    puts two on it); Ray only counts shares, so cap this process's CUDA memory to its share, or one trial can take
    the memory the other needs.
    """
    device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and gpus < 1:
        torch.cuda.set_per_process_memory_fraction(gpus)
    return device
