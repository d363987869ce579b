"""Where torch runs: the device a model's weights are on, the device a trial's GPU share maps to, how many
loader workers a process runs, the convolutions' memory layout (channels_last), and what CUDA gets on top
(bf16 autocast, cuDNN autotuning)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


#: Overrides `loader_workers`: the number of DataLoader worker processes every loader of this process uses
#: (0: load in the main process). Set it where the rule's guess is wrong, e.g. a node whose CPUs Ray
#: over-declares; on a Ray cluster set it in the workers' environment (or the job's runtime_env).
LOADER_WORKERS_ENV = "VLADSWEEP_LOADER_WORKERS"


def loader_workers(cpus: float) -> int:
    """How many DataLoader workers (image decoding processes) a process given ``cpus`` CPUs runs: one CPU stays
    with the main process (the forward, the optimizer, feeding the GPU), the others decode, so ``int(cpus) - 1``
    and 0 (load in line, as a 1-CPU trial always did) for one CPU or less. ``$VLADSWEEP_LOADER_WORKERS``
    overrides the rule (a non-negative integer, else ValueError naming it)."""
    override = os.environ.get(LOADER_WORKERS_ENV, "").strip()
    if override:
        try:
            workers = int(override)
        except ValueError:
            workers = -1
        if workers < 0:
            raise ValueError(
                f"${LOADER_WORKERS_ENV}={override!r}: expected a non-negative integer (DataLoader worker "
                "processes per loader; 0 loads images in the main process)"
            )
        return workers
    return max(0, int(cpus) - 1)


def process_loader_workers() -> int:
    """`loader_workers` of this process's CPU share as torch's thread count: a Ray trial and the base build task
    set it to the CPUs Ray granted them, ``python -m trainables.base --threads N`` to N."""
    return loader_workers(torch.get_num_threads())


def device_batch(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loaded batch on ``device``: copied without blocking (from pinned memory when a loader pinned it; pinned
    tensors must go straight here, a ``torch.cat``/``stack`` first would copy them to pageable memory), in
    channels_last when it is an image batch, the layout `fast_convolutions` gives the convolutions."""
    batch = batch.to(device, non_blocking=device.type == "cuda")
    return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch


@contextlib.contextmanager
def fast_convolutions(*models: nn.Module | None, device: torch.device) -> Iterator[None]:
    """For the block: each model's conv backbone (its ``backbone`` ``nn.Sequential``) in channels_last, and on
    CUDA ``torch.backends.cudnn.benchmark = True`` (cuDNN times its algorithms once per input shape and keeps the
    fastest; the shapes here repeat). channels_last is the layout tensor cores read without transposing, and the
    one oneDNN's CPU convolutions run fastest in: a training step of the embedded EfficientNet-Lite0 base takes
    0.51-0.58x the time, the tiny / AlexNet / VGG16 backbones 0.73-0.88x (benchmarks/bench_layout.py). The output
    stays channels_last: NetVLAD's ``view(B, D, H*W)`` works on it, H and W stay adjacent in memory. On exit the
    weights go back to the plain layout (checkpoints and compression see what they always did) and
    ``cudnn.benchmark`` to its value. Models without a conv backbone are left exactly as they are."""
    benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    backbones = []
    for model in models:
        backbone = getattr(model, "backbone", None)
        if (
            isinstance(backbone, nn.Sequential)
            and len(backbone) > 0
            and any(isinstance(m, nn.Conv2d) for m in backbone.modules())
            and backbone not in backbones
        ):
            backbones.append(backbone)
    try:
        for backbone in backbones:
            backbone.to(memory_format=torch.channels_last)
        yield
    finally:
        for backbone in backbones:
            backbone.to(memory_format=torch.contiguous_format)
        torch.backends.cudnn.benchmark = benchmark
