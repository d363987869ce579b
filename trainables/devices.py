"""Where torch runs: the device a model's weights are on, and the device a trial's GPU share maps to."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

#: Set to 1 to let a process that holds a GPU share run on the CPU when torch sees no CUDA (a Ray cluster whose
#: GPUs are only declared, as the tests' clusters are). Never set on a real GPU cluster.
ALLOW_CPU_ENV = "VLADSWEEP_ALLOW_CPU_FALLBACK"


class NoCudaError(RuntimeError):
    """The process holds a GPU share but torch cannot use CUDA; running on the CPU would be silently slow."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _why_no_cuda(gpus: float) -> str:
    """What a user needs to see to find why CUDA is missing where Ray granted a GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    build = f"torch {torch.__version__}, " + (
        f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build (no CUDA in it)"
    )
    return (
        f"Ray granted this process {gpus:g} GPU but torch cannot use CUDA: torch.cuda.is_available() = False, "
        f"CUDA_VISIBLE_DEVICES = {visible!r}, {build}. Refusing to run on the CPU instead. Check the node's "
        "NVIDIA driver (nvidia-smi) and that its torch is a CUDA build; to run on CPUs on purpose, pass "
        f"--gpus-per-trial 0 (and --cpu-only on a cluster), or set {ALLOW_CPU_ENV}=1 where the GPUs are only "
        "declared to Ray."
    )


def select_device(gpus: float) -> torch.device:
    """CUDA when the process holds a GPU share (``gpus > 0``), the CPU when it holds none.

    Raises `NoCudaError` with the reason (the share, ``CUDA_VISIBLE_DEVICES``, ``torch.cuda.is_available()``,
    the torch build) when it holds a share but torch cannot use CUDA: falling back to the CPU would run a GPU
    sweep many times slower, and only the trial's ``device`` tag would tell. ``$VLADSWEEP_ALLOW_CPU_FALLBACK=1``
    allows that fallback (GPUs only declared to Ray, as in the tests).

    Ray gives a trial with ``gpus < 1`` a share of one card that other trials use too (``--gpus-per-trial 0.5``
    puts two on it); Ray only counts shares, so cap this process's CUDA memory to its share, or one trial can take
    the memory the other needs.
    """
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if os.environ.get(ALLOW_CPU_ENV) == "1":
            return torch.device("cpu")
        raise NoCudaError(_why_no_cuda(gpus))
    if gpus < 1:
        torch.cuda.set_per_process_memory_fraction(gpus)
    return torch.device("cuda")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision where it pays: ``torch.autocast`` in bfloat16 on a CUDA device that has it (Ampere and
    later: the A10G of cluster/gpu.yaml), no change elsewhere (the CPU keeps its float32 numerics). bfloat16, not
    float16: it has float32's range, so the backward needs no loss scaling (a GradScaler in every training loop);
    a CUDA device without bfloat16 runs in float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
