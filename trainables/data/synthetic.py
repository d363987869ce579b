"""The embedded synthetic landmark set: a small Oxford-style benchmark built from photos installed packages ship.

Why: the laptop demo and the tests must run the whole pipeline with no data and no network. The set is
written in the original Oxford layout (`jpg/`, `gt/<q>_{query,good,ok,junk}.txt`), so `load_original` reads it
exactly like Oxford5k, and it is deterministic from its seed (same seed -> byte-identical files with the same
numpy/scipy/scikit-image/Pillow builds; other builds may differ slightly in pixel values).

What it is: photographs bundled with scikit-image (`skimage/data/*.png|jpg`, read from the package folder, never
through `skimage.data` fetchers, which may download) and scikit-learn (`load_sample_images`' china/flower) are
cut into regions. Each region is a "place" (a landmark with 5 queries) or a "distractor place" (seen several
times, in no ground truth list), and each image of it is a random camera view: a homography (scale, rotation,
perspective, off-centre framing) of the region and its margin, sky/ground-like background beyond it, occluders,
light changes (gain, colour cast, gamma, shading), blur, noise and JPEG compression. Ground truth follows
Oxford's definitions from the measured visible fraction of the place's core box: good = clear view (>= 70%
visible, mild viewpoint change), ok = strong viewpoint change or partial view (>= 25% visible), junk = < 25%
visible. Query boxes are the core box's bounding rectangle in the query image.

Train and test splits use different source photos, so their places are disjoint. The validation split holds new
views (own random cameras, own images) of the training places: there are not enough bundled photos for a third set
of places, so validation shares places with train and none with test. Everything is small (longest
side 200-256 px) so a tiny CNN on two CPU cores extracts a split in seconds.

Variants (`SyntheticSpec`): the defaults are the embedded set; other specs enlarge the training split (more
views per place and per distractor place, for PCA whitening at the poster's 4096 dimensions, which needs more
than 4096 training images) and change the image size. A view's pixels depend only on its seed keys, so every view
of the embedded set reappears, byte for byte, in a larger variant with the same image size (under another name).
The registry names them (`trainables.data.registry.SYNTHETIC_VARIANTS`: ``synthetic-large-train`` etc.).

Cache: `<cache_dir>/synthetic-v2-s<seed>` (other specs: `synthetic-v2-s<seed>-<SyntheticSpec.tag()>`) where
cache_dir defaults to `trainables.fileio.user_cache_dir()`
(`$VLADSWEEP_CACHE` or `~/.cache/vladsweep`). The folder is built in a temporary sibling and renamed into place
(`trainables.fileio.atomic_directory`), under a best-effort file lock, so concurrent callers (e.g. Ray trials
starting together) never see a half-written set.

Model-free baselines on this set (thumbnail pixels, colour histograms) live in `trainables.retrieval.baselines`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import json
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.transform import ProjectiveTransform, warp

from trainables.fileio import atomic_directory, user_cache_dir
from trainables.progress import track

VERSION = 2
#: ``val`` is last so that adding it left the train and test images unchanged (a split's RNG streams are keyed
#: by its position here).
SPLITS = ("train", "test", "val")
QUERIES_PER_PLACE = 5
VIEWS_PER_PLACE = 10  # db views besides the query images: 4 mild, 4 strong, 2 partial
VIEWS_PER_DISTRACTOR = 24
MARGIN = 0.12  # context around a place's core box, as a fraction of the region
MIN_SIDE, MAX_SIDE = 200, 256
#: The mode of each database view of a place, in view order (cycled when a spec asks for more views).
PLACE_VIEW_MODES = ("mild",) * 4 + ("strong",) * 4 + ("partial",) * 2


@dataclass(frozen=True)
class SyntheticSpec:
    """What a generated set holds besides its seed; the defaults are the embedded set (its cache folder and bytes
    do not depend on this class). Only the training split grows: validation and test keep the embedded set's view
    counts, so evaluating a model on a larger variant costs what it costs on the embedded set. The image size
    applies to every split."""

    #: Database views of each training place besides its queries (modes cycle through `PLACE_VIEW_MODES`).
    train_place_views: int = VIEWS_PER_PLACE
    #: Views of each training distractor place (alternately strong and mild).
    train_distractor_views: int = VIEWS_PER_DISTRACTOR
    #: Range of the longest image side in pixels (each view draws its own).
    min_side: int = MIN_SIDE
    max_side: int = MAX_SIDE

    def __post_init__(self) -> None:
        for name in ("train_place_views", "train_distractor_views"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SyntheticSpec.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.min_side, int) and isinstance(self.max_side, int)) or not (
            32 <= self.min_side <= self.max_side
        ):
            raise ValueError(
                f"SyntheticSpec sides must be integers with 32 <= min_side <= max_side, got "
                f"min_side={self.min_side!r}, max_side={self.max_side!r}"
            )

    @property
    def is_default(self) -> bool:
        return self == SyntheticSpec()

    def tag(self) -> str:
        """The cache folder suffix of a non-default spec ('' for the embedded set)."""
        if self.is_default:
            return ""
        return f"tp{self.train_place_views}-td{self.train_distractor_views}-px{self.min_side}-{self.max_side}"

    def views(self, split: str, landmark: bool) -> int:
        """Views per place (besides its queries) or per distractor place in ``split``."""
        if split != "train":
            return VIEWS_PER_PLACE if landmark else VIEWS_PER_DISTRACTOR
        return self.train_place_views if landmark else self.train_distractor_views


@dataclass(frozen=True)
class Region:
    """A rectangle (fractions of the photo) of one bundled photo; a place when `landmark`, else a distractor."""

    name: str
    source: str  # "skimage:<file>" or "sklearn:<file>"
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 as fractions of width/height
    landmark: bool


def _halves(name: str, source: str, kinds: tuple[bool, bool]) -> list[Region]:
    return [
        Region(f"{name}_west", source, (0.0, 0.0, 0.5, 1.0), kinds[0]),
        Region(f"{name}_east", source, (0.5, 0.0, 1.0, 1.0), kinds[1]),
    ]


def _quarters(name: str, source: str, kinds: tuple[bool, bool, bool, bool]) -> list[Region]:
    boxes = {"nw": (0, 0, 0.5, 0.5), "ne": (0.5, 0, 1, 0.5), "sw": (0, 0.5, 0.5, 1), "se": (0.5, 0.5, 1, 1)}
    return [Region(f"{name}_{k}", source, b, kind) for (k, b), kind in zip(boxes.items(), kinds, strict=True)]


def _whole(name: str, source: str, landmark: bool = True) -> Region:
    return Region(name, source, (0.0, 0.0, 1.0, 1.0), landmark)


# Fixed assignment of photos to splits: no photo appears in both, so places are disjoint by construction.
# Each split: 11 places (as Oxford's 11 landmarks) and 7 distractor places of similar photos.
REGIONS: dict[str, list[Region]] = {
    "train": [
        *_halves("china", "sklearn:china.jpg", (True, True)),
        *_halves("rocket", "skimage:rocket.jpg", (True, False)),
        *_quarters("retina", "skimage:retina.jpg", (True, False, False, True)),
        _whole("astronaut", "skimage:astronaut.png"),
        _whole("camera", "skimage:camera.png"),
        _whole("coins", "skimage:coins.png"),
        _whole("ihc", "skimage:ihc.png"),
        _whole("brick", "skimage:brick.png"),
        _whole("cell", "skimage:cell.png"),
        _whole("gravel", "skimage:gravel.png", landmark=False),
        _whole("page", "skimage:page.png", landmark=False),
        _whole("chessboard", "skimage:chessboard_RGB.png", landmark=False),
        _whole("colorwheel", "skimage:color.png", landmark=False),
    ],
    "test": [
        *_halves("flower", "sklearn:flower.jpg", (True, True)),
        *_halves("motorcycle", "skimage:motorcycle_left.png", (True, False)),
        *_quarters("hubble", "skimage:hubble_deep_field.jpg", (True, False, False, True)),
        *_halves("coffee", "skimage:coffee.png", (True, True)),
        _whole("chelsea", "skimage:chelsea.png"),
        _whole("moon", "skimage:moon.png"),
        _whole("grass", "skimage:grass.png"),
        _whole("clock", "skimage:clock_motion.png"),
        _whole("text", "skimage:text.png", landmark=False),
        _whole("phantom", "skimage:phantom.png", landmark=False),
        _whole("logo", "skimage:logo.png", landmark=False),
        _whole("horse", "skimage:horse.png", landmark=False),
    ],
}
# Validation: new random views of the training places and distractors. The bundled photos are too few for a third
# set of places, so validation shares its places (not its images) with train and none with test: it measures
# what compression costs on views the model never saw, and the test split stays untouched by every choice.
REGIONS["val"] = list(REGIONS["train"])


class SyntheticDataError(RuntimeError):
    """A bundled photo the synthetic set is built from is missing (a stripped scikit-image/scikit-learn)."""


def _source_path(source: str) -> Path:
    pkg, fname = source.split(":", 1)
    # find_spec locates the installed package without importing it (importing sklearn alone costs ~1 s).
    spec = importlib.util.find_spec(pkg)
    locations = list(spec.submodule_search_locations or []) if spec else []
    sub = Path("data") if pkg == "skimage" else Path("datasets") / "images"
    path = Path(locations[0]) / sub / fname if locations else Path(pkg) / sub / fname
    if not path.is_file():
        raise SyntheticDataError(
            f"bundled photo {path} is missing; the synthetic set needs the data files that the scikit-image and "
            "scikit-learn wheels ship (reinstall them from PyPI)"
        )
    return path


def _load_canvas(region: Region) -> np.ndarray:
    """The region's pixels as float32 RGB in [0, 1]; gray photos become 3-channel, alpha is flattened on gray."""
    with Image.open(_source_path(region.source)) as im:
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (128, 128, 128, 255))
            im = Image.alpha_composite(bg, im)
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = region.box
    return np.ascontiguousarray(rgb[round(y1 * h) : round(y2 * h), round(x1 * w) : round(x2 * w)])


# --------------------------------------------------------------------------------------------------- rendering

_MODES = {
    #           zoom range   jitter  rot deg  persp  occl p  gain        cast   gamma       shade  blur  noise
    "query": ((1.0, 1.5), 0.08, 6.0, 0.05, 0.0, (0.8, 1.2), 0.08, (0.85, 1.15), 0.15, 0.6, 0.01),
    "mild": ((0.8, 1.8), 0.15, 12.0, 0.1, 0.3, (0.65, 1.35), 0.12, (0.75, 1.3), 0.3, 1.0, 0.02),
    "strong": ((0.55, 2.6), 0.25, 30.0, 0.22, 0.5, (0.5, 1.5), 0.25, (0.6, 1.6), 0.5, 1.8, 0.04),
    "partial": ((0.5, 1.0), 0.0, 15.0, 0.12, 0.3, (0.6, 1.4), 0.15, (0.7, 1.4), 0.35, 1.2, 0.03),
}
# Accepted visible fraction of the core box per mode (views outside are re-drawn from the same stream).
_VISIBLE = {"query": (0.9, 1.01), "mild": (0.7, 1.01), "strong": (0.25, 1.01), "partial": (0.03, 0.45)}


def _interp_matrix(n: int, k: int) -> np.ndarray:
    """(n, k) weights that linearly interpolate k evenly spaced knots onto n pixels."""
    pos = np.linspace(0, k - 1, n)
    return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(k)[None, :])).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sky/ground-like filler beyond the photo: a smooth colour field plus fine texture, never photo content."""
    # Muted colours (mostly gray, a little tint): a rainbow filler would be a cue no real photo has.
    gray = rng.uniform(0.2, 0.8, size=(3, 4, 1))
    coarse = (gray + rng.uniform(-0.08, 0.08, size=(3, 4, 3))).astype(np.float32)
    coarse[0] = coarse[0] * 0.5 + np.array([0.6, 0.68, 0.8], np.float32) * 0.5  # a sky-ish top row
    field = np.einsum("yi,ijc,xj->yxc", _interp_matrix(h, 3), coarse, _interp_matrix(w, 4))
    fine = ndimage.gaussian_filter(rng.normal(0, 0.08, size=(h, w)).astype(np.float32), 1.5)
    return np.clip(field + fine[..., None], 0, 1)


def _occluders(rng: np.random.Generator, img: np.ndarray, fills: list[np.ndarray], p: float) -> np.ndarray:
    """Paste 1-2 rectangles/ellipses (textures of distractor photos or flat colour); returns the occlusion mask."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), bool)
    if rng.random() >= p:
        return mask
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 3))):
        ow, oh = rng.uniform(0.15, 0.45) * w, rng.uniform(0.2, 0.6) * h
        cx, cy = rng.uniform(0, w), rng.uniform(h * 0.3, h)  # occluders stand on the ground, like people/cars
        if rng.random() < 0.5:
            m = (np.abs(xx - cx) < ow / 2) & (np.abs(yy - cy) < oh / 2)
        else:
            m = ((xx - cx) / (ow / 2)) ** 2 + ((yy - cy) / (oh / 2)) ** 2 < 1
        if fills and rng.random() < 0.7:
            src = fills[int(rng.integers(len(fills)))]
            sh, sw = src.shape[:2]
            y0, x0 = int(rng.integers(0, max(1, sh - h))), int(rng.integers(0, max(1, sw - w)))
            patch = src[y0 : y0 + h, x0 : x0 + w]
            patch = np.pad(patch, ((0, h - patch.shape[0]), (0, w - patch.shape[1]), (0, 0)), mode="reflect")
        else:
            patch = np.broadcast_to(rng.uniform(0.05, 0.95, 3).astype(np.float32), img.shape)
        img[m] = patch[m]
        mask |= m
    return mask


def _photometric(rng: np.random.Generator, img: np.ndarray, mode: tuple) -> np.ndarray:
    _, _, _, _, _, gain, cast, gamma, shade, blur, noise = mode
    h, w = img.shape[:2]
    img = img * rng.uniform(*gain) * rng.uniform(1 - cast, 1 + cast, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (
        np.cos(angle) * np.linspace(-1, 1, w)[None, :] + np.sin(angle) * np.linspace(-1, 1, h)[:, None]
    ) / 2
    img = img * (1 + rng.uniform(0, shade) * ramp.astype(np.float32))[..., None]
    img = np.clip(img, 0, 1) ** rng.uniform(*gamma)
    sigma = rng.uniform(0, blur)
    if sigma > 0.3:
        img = ndimage.gaussian_filter(img, (sigma, sigma, 0))
    img = img + rng.normal(0, rng.uniform(0, noise), img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _homography(src: np.ndarray, dst: np.ndarray) -> ProjectiveTransform | None:
    """The projective map taking the 4 points `src` to `dst` (exact 8x8 solve; None if degenerate)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    try:
        h = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
    except np.linalg.LinAlgError:
        return None
    return ProjectiveTransform(matrix=np.append(h, 1.0).reshape(3, 3))


def _render(
    rng: np.random.Generator,
    canvas: np.ndarray,
    mode_name: str,
    fills: list[np.ndarray],
    sides: tuple[int, int] = (MIN_SIDE, MAX_SIDE),
) -> tuple[np.ndarray, tuple[float, float, float, float], float]:
    """One camera view of a region: (uint8 image, core box in the image, visible fraction of the core box); the
    longest side is drawn from ``sides`` (inclusive)."""
    mode = _MODES[mode_name]
    zoom, jitter, rot, persp, occl_p = mode[:5]
    ch, cw = canvas.shape[:2]
    core = np.array([cw * MARGIN, ch * MARGIN, cw * (1 - MARGIN), ch * (1 - MARGIN)])
    core_w, core_h = core[2] - core[0], core[3] - core[1]
    gx, gy = np.meshgrid(np.linspace(core[0], core[2], 24), np.linspace(core[1], core[3], 24))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    lo, hi = _VISIBLE[mode_name]

    for _ in range(50):
        side = int(rng.integers(sides[0], sides[1] + 1))
        short = round(side * 0.75)
        w, h = (side, short) if rng.random() < 0.6 else (short, side)
        scale = rng.uniform(*zoom) * max(core_w, core_h) / max(w, h)  # canvas px per output px
        centre = np.array([(core[0] + core[2]) / 2, (core[1] + core[3]) / 2])
        if mode_name == "partial":  # look past an edge or corner of the place
            centre += rng.choice([-1, 1], 2) * rng.uniform(0.35, 0.8, 2) * np.array([core_w, core_h])
        else:
            centre += rng.uniform(-jitter, jitter, 2) * np.array([core_w, core_h])
        theta = math.radians(rng.uniform(-rot, rot))
        rmat = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
        src = centre + scale * (corners - [w / 2, h / 2]) @ rmat.T
        src += rng.uniform(-persp, persp, (4, 2)) * scale * np.array([w, h])
        tform = _homography(corners, src)
        if tform is None:
            continue
        # Where the core box lands in the view: visibility before occluders decides whether to keep the draw.
        proj = tform.inverse(grid)
        inside = (proj[:, 0] >= 0) & (proj[:, 0] < w) & (proj[:, 1] >= 0) & (proj[:, 1] < h)
        if not lo <= inside.mean() < hi:
            continue
        break
    else:  # pragma: no cover - the ranges above are wide enough that 50 draws always succeed
        raise RuntimeError(f"could not draw a '{mode_name}' view")

    rgba = np.concatenate([canvas, np.ones((ch, cw, 1), np.float32)], -1)
    warped = warp(rgba, tform, output_shape=(h, w), order=1, mode="constant", cval=0.0, preserve_range=True)
    alpha = warped[..., 3:4].astype(np.float32)
    img = warped[..., :3].astype(np.float32) * alpha + _background(rng, h, w) * (1 - alpha)
    occluded = _occluders(rng, img, fills, occl_p)
    img = _photometric(rng, img, mode)

    pi = np.clip(np.round(proj[inside]).astype(int), 0, [w - 1, h - 1])
    visible = float(inside.sum() - occluded[pi[:, 1], pi[:, 0]].sum()) / len(grid)
    box_pts = tform.inverse(
        np.array([[core[0], core[1]], [core[2], core[1]], [core[2], core[3]], [core[0], core[3]]])
    )
    x1, y1 = np.clip(box_pts.min(0), 0, [w, h])
    x2, y2 = np.clip(box_pts.max(0), 0, [w, h])
    return (img * 255 + 0.5).astype(np.uint8), (float(x1), float(y1), float(x2), float(y2)), visible


# ------------------------------------------------------------------------------------------------- one split


def _jpeg_bytes(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def _label(mode: str, visible: float) -> str:
    if visible < 0.25:
        return "junk"
    if mode in ("query", "mild") and visible >= 0.7:
        return "good"
    return "ok"


def build_split(root: Path, split: str, seed: int, spec: SyntheticSpec | None = None) -> dict:
    """Write one split (`jpg/`, `gt/`) of ``spec`` (None: the embedded set) into `root`; returns its summary for
    the manifest."""
    spec = spec or SyntheticSpec()
    split_id = SPLITS.index(split)
    regions = REGIONS[split]
    canvases = {r.name: _load_canvas(r) for r in regions}
    fills = [canvases[r.name] for r in regions if not r.landmark]
    (root / "jpg").mkdir(parents=True)
    (root / "gt").mkdir()

    # All views of the split, then names from one shuffled counter (like Oxford's all_souls_000013).
    views: list[tuple[Region, str, int]] = []
    for r in regions:
        if r.landmark:
            views += [(r, "query", k) for k in range(QUERIES_PER_PLACE)]
            n = spec.views(split, landmark=True)
            plan = [PLACE_VIEW_MODES[k % len(PLACE_VIEW_MODES)] for k in range(n)]
            views += [(r, m, QUERIES_PER_PLACE + k) for k, m in enumerate(plan)]
        else:
            n = spec.views(split, landmark=False)
            views += [(r, "mild" if k % 2 else "strong", k) for k in range(n)]
    order = np.random.default_rng([seed, split_id, 7919]).permutation(len(views))
    numbers = {int(v): n + 1 for n, v in enumerate(order)}

    gt: dict[str, dict[str, list[str]]] = {
        r.name: {"good": [], "ok": [], "junk": []} for r in regions if r.landmark
    }
    queries: dict[str, list[tuple[str, tuple]]] = {r.name: [] for r in regions if r.landmark}

    def render(view: tuple[Region, str, int]) -> tuple[bytes, tuple, float]:
        r, mode, k = view
        rng = np.random.default_rng([seed, split_id, regions.index(r), k])  # per view: independent of order
        img, box, visible = _render(
            rng,
            canvases[r.name],
            mode,
            [f for f in fills if f is not canvases[r.name]],
            (spec.min_side, spec.max_side),
        )
        return _jpeg_bytes(img, int(rng.integers(70, 96))), box, visible

    # Views render in threads (the warps and the JPEG encoder release the GIL): the same bytes in any order.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        rendered = pool.map(render, views)
        for v, ((r, mode, _), (jpeg, box, visible)) in enumerate(
            track(zip(views, rendered), f"synthetic set: {split}", unit="img", total=len(views))
        ):
            name = f"{r.name}_{numbers[v]:06d}"
            (root / "jpg" / f"{name}.jpg").write_bytes(jpeg)
            if not r.landmark:
                continue
            gt[r.name][_label(mode, visible)].append(name)
            if mode == "query":
                queries[r.name].append((name, box))

    for lm, lists in gt.items():
        for q, (image, box) in enumerate(queries[lm], start=1):
            qid = f"{lm}_{q}"
            coords = " ".join(f"{c:.1f}" for c in box)
            (root / "gt" / f"{qid}_query.txt").write_text(f"oxc1_{image} {coords}\n")
            for kind in ("good", "ok", "junk"):
                (root / "gt" / f"{qid}_{kind}.txt").write_text("".join(f"{n}\n" for n in sorted(lists[kind])))
    return {
        "images": len(views),
        "queries": QUERIES_PER_PLACE * len(gt),
        "landmarks": sorted(gt),
        "distractor_places": sorted(r.name for r in regions if not r.landmark),
        "sources": sorted({r.source for r in regions}),
        "labels": {k: sum(len(v[k]) for v in gt.values()) for k in ("good", "ok", "junk")},
    }


# --------------------------------------------------------------------------------------------------- caching


def synthetic_root(cache_dir: Path | None = None, seed: int = 0, spec: SyntheticSpec | None = None) -> Path:
    """Where the set for ``seed`` lives: ``<cache_dir>/synthetic-v<VERSION>-s<seed>`` (default: the user cache),
    with ``-<spec.tag()>`` appended for a spec other than the embedded set's."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir()
    tag = spec.tag() if spec is not None else ""
    return base / (f"synthetic-v{VERSION}-s{seed}" + (f"-{tag}" if tag else ""))


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes under root (the manifest itself excluded)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Best-effort inter-process lock so concurrent callers build once; correctness rests on the rename."""
    with open(path, "a+") as fh:
        # A filesystem without flock falls back to build-and-rename races, which are still safe.
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(root: Path) -> bool:
    return (root / "manifest.json").is_file()


def build_synthetic(dest: Path, seed: int = 0, spec: SyntheticSpec | None = None) -> dict:
    """Write the whole set (every split and `manifest.json`) of ``spec`` (None: the embedded set) into the empty
    or absent folder `dest`."""
    t0 = time.perf_counter()
    splits = {s: build_split(dest / s, s, seed, spec) for s in SPLITS}
    manifest = {
        "version": VERSION,
        "seed": seed,
        # Only for other specs: the embedded set's manifest keeps its keys.
        **({"spec": dataclasses.asdict(spec)} if spec is not None and not spec.is_default else {}),
        "splits": splits,
        "digest": tree_digest(dest),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def ensure_synthetic(cache_dir: Path | None = None, seed: int = 0, spec: SyntheticSpec | None = None) -> Path:
    """Return the root of the synthetic set for `seed` and ``spec`` (None: the embedded set; with `train/`,
    `val/` and `test/`), building it on first use.

    `cache_dir` defaults to `$VLADSWEEP_CACHE` or `~/.cache/vladsweep`. Safe to call from several processes at
    once: the set is built in a temporary folder and renamed into place, so a reader sees all of it or none.
    """
    root = synthetic_root(cache_dir, seed, spec)
    if _is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root.parent / f".{root.name}.lock"):
        if _is_complete(root):  # another process finished while we waited
            return root
        # A folder without manifest was not written by us (the rename is atomic): it is moved aside. Losing a race
        # without a lock is fine too: the winner's copy is identical, so ours is dropped.
        atomic_directory(root, lambda tmp: build_synthetic(tmp, seed, spec), is_complete=_is_complete)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find) the embedded synthetic landmark set.")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $VLADSWEEP_CACHE or ~/.cache/vladsweep"
    )
    parser.add_argument("--seed", type=int, default=0)
    default = SyntheticSpec()
    g = parser.add_argument_group("variant (SyntheticSpec; the defaults are the embedded set)")
    for field in dataclasses.fields(SyntheticSpec):
        g.add_argument(
            "--" + field.name.replace("_", "-"),
            type=int,
            default=getattr(default, field.name),
            help="%(default)s",
        )
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)})
    except ValueError as exc:
        parser.error(str(exc))
    root = ensure_synthetic(args.cache_dir, args.seed, spec)
    manifest = json.loads((root / "manifest.json").read_text())
    print(root)
    for split, s in manifest["splits"].items():
        print(
            f"{split}: {s['images']} images, {s['queries']} queries, {len(s['landmarks'])} landmarks, labels {s['labels']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
