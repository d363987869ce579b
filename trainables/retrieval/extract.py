"""Global descriptors for a list of images: load (crop, resize, normalize), run the model in batches, L2.

Images keep their aspect ratio (longest side = ``image_size``), so they do not all share one shape. Loaded images
wait in one bucket per shape; a bucket runs as a batch when it holds ``batch_size`` images, and when too many
images are waiting the fullest bucket runs early, so memory stays bounded even when every shape differs. On the
synthetic set, where the images share a size, every batch is full.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainables.data.images import ImageReadError, load_image
from trainables.devices import device_batch, fast_convolutions
from trainables.progress import progress as progress_bar

__all__ = ["extract_descriptors", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else the CPU; strings and devices pass through ``torch.device``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _IndexedImages(Dataset):
    """(index, image tensor) per path, or (index, reason) for an unreadable file.

    The error is returned, not raised, even when unreadable files are not to be skipped: raised in a loader
    worker it would reach the caller as a RuntimeError (DataLoader cannot rebuild an `ImageReadError`), so the
    caller raises it itself, with its path, in the main process."""

    def __init__(self, paths: Sequence[os.PathLike | str], max_size: int, bbxs):
        self.paths = list(paths)
        self.bbxs = list(bbxs) if bbxs is not None else [None] * len(self.paths)
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, load_image(self.paths[i], self.max_size, bbox=self.bbxs[i])
        except ImageReadError as exc:
            return i, exc.reason


def _shape_batches(
    items: Iterator[tuple[int, torch.Tensor | str]], batch_size: int, max_waiting: int, pin: bool = False
) -> Iterator[tuple[list[int], torch.Tensor | str]]:
    """Group (index, image) items into batches of one shape; an item that is no tensor (an unreadable file's
    reason) comes out alone as ([idx], it).

    Batching by shape happens here, after loading (a shape is only known then); ``pin`` stacks into pinned
    memory (`_stack`)."""
    buckets: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    waiting = 0
    for i, img in items:
        if not isinstance(img, torch.Tensor):
            yield [i], img
            continue
        bucket = buckets.setdefault(tuple(img.shape), [])
        bucket.append((i, img))
        waiting += 1
        if len(bucket) == batch_size:
            full = buckets.pop(tuple(img.shape))
        elif waiting > max_waiting:
            full = buckets.pop(max(buckets, key=lambda s: len(buckets[s])))
        else:
            continue
        waiting -= len(full)
        yield [j for j, _ in full], _stack([t for _, t in full], pin)
    for full in buckets.values():
        yield [j for j, _ in full], _stack([t for _, t in full], pin)


def _stack(images: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """One batch; with ``pin``, stacked straight into pinned memory (torch's pinned allocator caches the blocks),
    so the copy to the GPU runs without blocking: pinning each image in the loader and stacking them afterwards
    would give a pageable batch, whose copy waits."""
    if not pin:
        return torch.stack(images)
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=True)
    return torch.stack(images, out=out)


def _describe(model: nn.Module, batch: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """Descriptors of one batch: the mean over scales of the model's outputs, then L2 (as cirtorch's extract_ms)."""
    total = None
    for s in scales:
        x = batch if s == 1.0 else F.interpolate(batch, scale_factor=s, mode="bilinear", align_corners=False)
        out = model(x).float()
        total = out if total is None else total + out
    return F.normalize(total / len(scales), p=2, dim=1)


def extract_descriptors(
    model: nn.Module,
    paths: Sequence[os.PathLike | str],
    image_size: int,
    bbxs: Sequence[Sequence[float] | None] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    scales: tuple[float, ...] = (1.0,),
    progress: bool = True,
    num_workers: int = 0,
    skip_unreadable: bool = False,
    desc: str = "descriptors",
) -> np.ndarray:
    """Describe each image of ``paths`` (cropped to ``bbxs[i]`` when given) with ``model``: float32 ``(n, d)``.

    Each image is resized so its longest side is ``image_size``; images of one shape run as one batch of up to
    ``batch_size``. ``scales`` other than 1 resize the loaded image (bilinear) and average the descriptors before
    the final L2. The model runs in eval mode under ``torch.no_grad()`` on ``device`` (``None``: CUDA when
    available); it is moved there in place, and its train/eval mode is restored afterwards.

    Unreadable files raise ``ImageReadError`` naming the path, unless ``skip_unreadable=True``: then their rows
    are NaN and a warning names them (callers drop those rows, e.g. Paris6k's corrupt database images).

    ``num_workers`` loader processes decode the images while the model runs (0: in line, in this process;
    `trainables.devices.loader_workers` gives a process's number); the descriptors are the same either way, as
    the images come back in order. The loader is iterated once, so its workers are not kept (no
    ``persistent_workers``). On CUDA the batches are stacked into pinned memory and copied without blocking, and
    the model's conv backbone runs in channels_last with cuDNN autotuning (`trainables.devices.fast_convolutions`).
    """
    paths = list(paths)
    if bbxs is not None and len(bbxs) != len(paths):
        raise ValueError(f"got {len(bbxs)} boxes for {len(paths)} images; pass one box (or None) per image")
    if not paths:
        raise ValueError("no images to describe: paths is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty tuple of positive factors, got {scales}")

    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0: load in the main process), got {num_workers}")

    dev = resolve_device(device)
    was_training = model.training
    model.to(dev).eval()
    loader = DataLoader(
        _IndexedImages(paths, image_size, bbxs),
        batch_size=None,  # one image per item: shapes differ, _shape_batches does the batching
        num_workers=num_workers,
    )
    out: np.ndarray | None = None
    unreadable: list[int] = []
    bar = progress_bar(desc, total=len(paths), unit="img", enabled=progress)
    pin = dev.type == "cuda"
    try:
        with torch.no_grad(), fast_convolutions(model, device=dev):
            for idx, batch in _shape_batches(iter(loader), batch_size, max_waiting=4 * batch_size, pin=pin):
                bar.update(len(idx))
                if not isinstance(batch, torch.Tensor):  # an unreadable file: the reason
                    if not skip_unreadable:
                        raise ImageReadError(paths[idx[0]], batch)
                    unreadable.extend(idx)
                    continue
                d = _describe(model, device_batch(batch, dev), scales).cpu().numpy()
                if out is None:
                    out = np.full((len(paths), d.shape[1]), np.nan, dtype=np.float32)
                out[idx] = d
    finally:
        bar.close()
        model.train(was_training)

    if unreadable:
        names = ", ".join(str(paths[i]) for i in sorted(unreadable))
        log.warning("skipped %d unreadable image(s) of %d: %s", len(unreadable), len(paths), names)
    if out is None:
        raise ImageReadError(paths[0], f"none of the {len(paths)} images could be read")
    return out
