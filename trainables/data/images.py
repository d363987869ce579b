"""Image loading for retrieval and training: crop to a query box, resize, ImageNet-normalize.

Every image that enters a model goes through `load_image`, so extraction, training tuples and the synthetic set
all see the same preprocessing. Unreadable files raise `ImageReadError` naming the path; `ImageListDataset`
can instead skip them (Paris6k ships a handful of corrupt JPEGs) and says which it skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BBox = tuple[float, float, float, float]

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


class ImageReadError(OSError):
    """An image file is missing, unreadable or corrupt; `path` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def clip_bbox(bbox: Sequence[float], width: int, height: int) -> BBox | None:
    """Clip an (x1, y1, x2, y2) box to the image; None when nothing of it lies inside (or it is degenerate)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not (x2 > x1 and y2 > y1):
        return None
    cx1, cy1 = max(0.0, x1), max(0.0, y1)
    cx2, cy2 = min(float(width), x2), min(float(height), y2)
    # Less than one pixel left inside is as good as outside: PIL would hand back an empty crop.
    if cx2 - cx1 < 1.0 or cy2 - cy1 < 1.0:
        return None
    return (cx1, cy1, cx2, cy2)


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files only fail here, not at open()
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise ImageReadError(path, "no such file") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 ImageNet-normalized tensor."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return torch.from_numpy((arr - _MEAN) / _STD)


def resize_longest(image: Image.Image, max_size: int, square: bool = False) -> Image.Image:
    """Resize so the longest side is `max_size` (up or down); `square` gives max_size x max_size instead."""
    if max_size < 1:
        raise ValueError(f"max_size must be a positive number of pixels, got {max_size}")
    w, h = image.size
    if square:
        size = (max_size, max_size)
    elif w >= h:
        size = (max_size, max(1, round(h * max_size / w)))
    else:
        size = (max(1, round(w * max_size / h)), max_size)
    if size == (w, h):
        return image
    return image.resize(size, Image.Resampling.BILINEAR)


def load_image(
    path: str | os.PathLike,
    max_size: int,
    bbox: Sequence[float] | None = None,
    square: bool = False,
) -> torch.Tensor:
    """Read an image as a (3, H, W) float32 ImageNet-normalized tensor.

    The image is first cropped to `bbox` (x1, y1, x2, y2 in pixels of the file, as in Oxford's query files;
    a box partly outside is clipped), then resized so its longest side is `max_size`. `square=True` resizes to
    max_size x max_size instead (training batches, so tuples stack). Raises `ImageReadError` naming the path
    when the file cannot be decoded, and `ValueError` when the box lies outside the image.
    """
    path = Path(path)
    image = _open_rgb(path)
    if bbox is not None:
        box = clip_bbox(bbox, *image.size)
        if box is None:
            raise ValueError(
                f"box {tuple(bbox)} lies outside image {path} of size {image.size[0]}x{image.size[1]} "
                "(expected x1 < x2, y1 < y2 overlapping the image)"
            )
        image = image.crop(tuple(round(v) for v in box))
    return to_tensor(resize_longest(image, max_size, square=square))


def is_readable(path: str | os.PathLike) -> bool:
    """Cheap integrity check: decode at reduced scale (JPEG draft mode), enough to catch truncated files."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


class ImageListDataset(Dataset):
    """Images (optionally cropped to boxes) as a torch Dataset, one variable-size tensor per item.

    With `skip_unreadable=True` every file is checked once up front; unreadable ones are dropped, logged (count
    and names) and listed in `skipped`; `indices[i]` is the position in `paths` of item i, so callers can line
    descriptors back up with their image list. Without it, a bad file raises `ImageReadError` when reached.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        max_size: int,
        bbxs: Sequence[Sequence[float] | None] | None = None,
        skip_unreadable: bool = False,
    ):
        self.paths = [Path(p) for p in paths]
        if bbxs is not None and len(bbxs) != len(self.paths):
            raise ValueError(
                f"got {len(bbxs)} boxes for {len(self.paths)} images; pass one box (or None) per image"
            )
        self.bbxs = list(bbxs) if bbxs is not None else [None] * len(self.paths)
        self.max_size = max_size
        self.skipped: list[Path] = []
        if skip_unreadable:
            self.indices = []
            for i, p in enumerate(self.paths):
                if is_readable(p):
                    self.indices.append(i)
                else:
                    self.skipped.append(p)
            if self.skipped:
                log.warning(
                    "skipped %d unreadable image(s) of %d: %s",
                    len(self.skipped),
                    len(self.paths),
                    ", ".join(str(p) for p in self.skipped),
                )
        else:
            self.indices = list(range(len(self.paths)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        j = self.indices[i]
        return load_image(self.paths[j], self.max_size, bbox=self.bbxs[j])
