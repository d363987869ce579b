"""Oxford5k / Paris6k retrieval datasets in the original (gt text files) and revisited (gnd pickle) layouts.

A `RetrievalDataset` is the whole contract between data and evaluation: the database image names, the query
image names with their boxes, and per query the ground truth as database indices. `gnd[i]["ok"]` are the
positives (good ∪ ok in the original protocol, easy ∪ hard = Medium in the revisited one) and `gnd[i]["junk"]`
is removed from the ranking. Queries stay in the database (original protocol) and are cropped to their box.

Original layout (also what the embedded synthetic set is written in)::

    <root>/jpg/<image>.jpg
    <root>/gt/<query>_{query,good,ok,junk}.txt   # _query.txt: "oxc1_<image> x1 y1 x2 y2" (Paris: no prefix)

Revisited layout::

    <root>/jpg/<image>.jpg
    <root>/gnd_<name>.pkl   # {imlist, qimlist, gnd: [{bbx, easy, hard, junk}, ...]}

The gnd files are pickles from the public release. They are read with `RestrictedUnpickler`, which resolves
no global except numpy's array reconstruction, so a tampered file cannot run code: it fails with an error.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from trainables.data.images import BBox, clip_bbox

_GT_KINDS = ("query", "good", "ok", "junk")
_QUERY_PREFIX = "oxc1_"
_TRAILING_NUMBER = re.compile(r"_\d+$")


class DatasetError(RuntimeError):
    """A dataset folder is missing, incomplete or inconsistent.

    `missing` lists every missing file (not just the first); the message says how to get the data.
    """

    def __init__(self, message: str, missing: list[Path] | None = None):
        self.missing = list(missing or [])
        super().__init__(message)


@dataclass
class RetrievalDataset:
    """A retrieval benchmark: database images, cropped queries and their ground truth (db indices)."""

    name: str
    root: Path
    images: list[str]
    queries: list[str]
    bbxs: list[BBox]
    gnd: list[dict[str, list[int]]]
    layout: str  # "original" or "revisited"
    # Query ids as the gt files name them ('all_souls_1'); empty for revisited (queries are image names there).
    query_names: list[str] = field(default_factory=list)

    def image_path(self, i: int) -> Path:
        return self.root / "jpg" / f"{self.images[i]}.jpg"

    def query_path(self, q: int) -> Path:
        return self.root / "jpg" / f"{self.queries[q]}.jpg"

    def image_paths(self) -> list[Path]:
        return [self.image_path(i) for i in range(len(self.images))]

    def query_paths(self) -> list[Path]:
        return [self.query_path(q) for q in range(len(self.queries))]

    def query_landmark(self, q: int) -> str:
        """Landmark of query q: its name without the trailing number ('all_souls_1' -> 'all_souls')."""
        name = self.query_names[q] if self.query_names else self.queries[q]
        return _TRAILING_NUMBER.sub("", name)

    def landmarks(self) -> dict[str, list[int]]:
        """Landmark name -> sorted db indices of its positives (ok = good ∪ ok), over all of its queries."""
        out: dict[str, set[int]] = {}
        for q in range(len(self.queries)):
            out.setdefault(self.query_landmark(q), set()).update(self.gnd[q]["ok"])
        return {k: sorted(v) for k, v in out.items()}

    def summary(self) -> str:
        return (
            f"{self.name} ({self.layout} layout, {self.root}): {len(self.images)} images, "
            f"{len(self.queries)} queries, {len(self.landmarks())} landmarks"
        )


def _how_to_get(name: str, root: Path) -> str:
    if name.startswith("synthetic"):
        return (
            "The embedded synthetic set is rebuilt by trainables.data.synthetic.ensure_synthetic(); delete the "
            f"damaged folder {root.parent} and load it again."
        )
    return (
        f"Get it with: python -m trainables.data.download {name} --dest {root.parent}  "
        f"(writes {root}; see trainables/data/download.py for the archives and their URLs)"
    )


def _raise_missing(name: str, root: Path, missing: list[Path], what: str = "incomplete") -> None:
    lines = "\n".join(f"  - {p}" for p in missing)
    raise DatasetError(
        f"dataset '{name}' at {root} is {what}: {len(missing)} missing file(s)/folder(s):\n{lines}\n"
        + _how_to_get(name, root),
        missing,
    )


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _parse_query_line(path: Path) -> tuple[str, BBox]:
    lines = _read_list(path)
    parts = lines[0].split() if lines else []
    if len(parts) != 5:
        raise DatasetError(
            f"{path}: expected one line '<image> x1 y1 x2 y2', got {lines[:1] or 'an empty file'}"
        )
    image = parts[0].removeprefix(_QUERY_PREFIX)
    try:
        box = tuple(float(v) for v in parts[1:])
    except ValueError as exc:
        raise DatasetError(f"{path}: box coordinates must be numbers, got {parts[1:]}") from exc
    return image, box  # type: ignore[return-value]


def _check_boxes(name: str, root: Path, queries: list[str], qnames: list[str], bbxs: list[BBox]) -> None:
    """Every query box must overlap its image: a box outside it would crop to nothing at extraction time."""
    bad = []
    for qname, image, box in zip(qnames, queries, bbxs, strict=True):
        path = root / "jpg" / f"{image}.jpg"
        try:
            with Image.open(path) as im:  # header only: cheap
                size = im.size
        except (UnidentifiedImageError, OSError) as exc:
            bad.append(f"  - query '{qname}': cannot read its image {path} ({exc})")
            continue
        if clip_bbox(box, *size) is None:
            bad.append(f"  - query '{qname}': box {box} is outside image {path} of size {size[0]}x{size[1]}")
    if bad:
        raise DatasetError(f"dataset '{name}' at {root} has bad query boxes:\n" + "\n".join(bad))


def load_original(root: str | Path, name: str) -> RetrievalDataset:
    """Read an original-layout dataset (`jpg/*.jpg`, `gt/<q>_{query,good,ok,junk}.txt`); see the module doc.

    The database is every `jpg/*.jpg` (sorted by name). Raises `DatasetError` listing every missing file.
    """
    root = Path(root)
    jpg, gt = root / "jpg", root / "gt"
    missing = [p for p in (root, jpg, gt) if not p.is_dir()]
    if missing:
        _raise_missing(name, root, [p for p in missing if p != root] or [root], "missing")
    qnames = sorted(
        (p.name[: -len("_query.txt")] for p in gt.glob("*_query.txt")),
        key=_natural_key,
    )
    if not qnames:
        _raise_missing(name, root, [gt / "<query>_query.txt"])

    for q in qnames:
        missing += [gt / f"{q}_{k}.txt" for k in _GT_KINDS if not (gt / f"{q}_{k}.txt").is_file()]
    images = sorted(p.stem for p in jpg.glob("*.jpg"))
    index = {n: i for i, n in enumerate(images)}
    if missing:
        _raise_missing(name, root, missing)

    queries: list[str] = []
    bbxs: list[BBox] = []
    lists: list[dict[str, list[str]]] = []
    for q in qnames:
        image, box = _parse_query_line(gt / f"{q}_query.txt")
        queries.append(image)
        bbxs.append(box)
        lists.append({k: _read_list(gt / f"{q}_{k}.txt") for k in ("good", "ok", "junk")})

    wanted = set(queries).union(*(set(v) for d in lists for v in d.values()))
    missing = sorted(jpg / f"{n}.jpg" for n in wanted if n not in index)
    if missing:
        _raise_missing(name, root, missing)
    _check_boxes(name, root, queries, qnames, bbxs)

    gnd = [
        {
            "ok": sorted({index[n] for n in d["good"] + d["ok"]}),
            "junk": sorted({index[n] for n in d["junk"]}),
        }
        for d in lists
    ]
    return RetrievalDataset(name, root, images, queries, bbxs, gnd, "original", query_names=qnames)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the public revisited gnd files that can build plain data and numpy arrays, nothing else.

    Containers, strings and numbers need no globals at all. The only globals allowed are what numpy uses to
    rebuild an ndarray or scalar (the same ones torch's weights_only loader accepts); any other global - the
    way a malicious pickle reaches os.system - raises `pickle.UnpicklingError` instead of being imported.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes of arrays pickled with protocol 2 (py2-era files)
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: gnd files hold only lists, dicts, numbers and numpy arrays"
        )


def read_gnd_file(path: str | Path) -> dict[str, Any]:
    """Read a revisited `gnd_<name>.pkl` safely (see `RestrictedUnpickler`)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: not a readable gnd file ({exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{path}: expected a dict with keys imlist, qimlist, gnd; got {type(obj).__name__}"
        )
    return obj


def _int_list(value: Any) -> list[int]:
    return sorted(int(v) for v in np.asarray(value).ravel())


def load_revisited(root: str | Path, name: str) -> RetrievalDataset:
    """Read a revisited-layout dataset (`jpg/*.jpg` + `gnd_<name>.pkl`); positives = easy ∪ hard (Medium).

    Each gnd entry keeps `easy`, `hard` and `junk` so the Easy and Hard protocols can be computed too.
    Raises `DatasetError` listing every missing file.
    """
    root = Path(root)
    jpg, gnd_path = root / "jpg", root / f"gnd_{name}.pkl"
    missing = [p for p in (jpg, gnd_path) if not p.exists()]
    if missing:
        _raise_missing(name, root, missing, "missing" if not root.is_dir() else "incomplete")
    cfg = read_gnd_file(gnd_path)
    absent = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if absent:
        raise DatasetError(f"{gnd_path}: missing key(s) {absent}; expected imlist, qimlist and gnd")
    images = [str(n) for n in cfg["imlist"]]
    queries = [str(n) for n in cfg["qimlist"]]
    if len(cfg["gnd"]) != len(queries):
        raise DatasetError(f"{gnd_path}: {len(cfg['gnd'])} gnd entries for {len(queries)} queries")

    present = {p.stem for p in jpg.glob("*.jpg")}
    missing = [jpg / f"{n}.jpg" for n in dict.fromkeys(images + queries) if n not in present]
    if missing:
        _raise_missing(name, root, missing)

    gnd, bbxs = [], []
    for i, g in enumerate(cfg["gnd"]):
        absent = [k for k in ("bbx", "easy", "hard", "junk") if k not in g]
        if absent:
            raise DatasetError(f"{gnd_path}: gnd[{i}] (query {queries[i]}) lacks key(s) {absent}")
        easy, hard, junk = _int_list(g["easy"]), _int_list(g["hard"]), _int_list(g["junk"])
        out_of_range = [v for v in easy + hard + junk if not 0 <= v < len(images)]
        if out_of_range:
            raise DatasetError(
                f"{gnd_path}: gnd[{i}] has db indices outside 0..{len(images) - 1}: {out_of_range}"
            )
        gnd.append({"ok": sorted(set(easy) | set(hard)), "junk": junk, "easy": easy, "hard": hard})
        bbxs.append(tuple(float(v) for v in np.asarray(g["bbx"]).ravel()[:4]))
    _check_boxes(name, root, queries, queries, bbxs)
    return RetrievalDataset(name, root, images, queries, bbxs, gnd, "revisited")
