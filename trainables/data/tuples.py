"""Training tuples (anchor, positives, hard negatives) mined from a retrieval dataset for the triplet loss.

Anchors are the query images (cropped to their box) and the positive database images of every landmark.
Positives of an anchor are other good ∪ ok images of its landmark; negatives are database images that are
neither positive nor junk for any query of that landmark (other landmarks and distractors), so a partial or
junk view of the anchor's own landmark is never pushed away.

Hard negatives follow cirtorch / NetVLAD: `refresh(describe)` embeds the epoch's anchors and a random pool of
database images with the *current* model and keeps, per anchor, the closest valid negatives (at most one per
other landmark, so the tuple is not N copies of the same look-alike). Before the first refresh negatives are
random. The model stays with the caller: `describe(paths, bbxs) -> (n, d) array` is any closure around it.

Loading: `TripletMiner.sample` loads a step's tuples in line; `sample_specs` draws the same tuples (the same random
stream) without loading them, so a `SquareLoader` can load the coming steps in worker processes while the
current one trains (`trainables.train.train_triplet`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainables.data.images import BBox, ImageReadError, load_image
from trainables.data.oxford import RetrievalDataset

Describe = Callable[[list[Path], list[BBox | None]], np.ndarray]


@dataclass(frozen=True)
class Anchor:
    path: Path
    bbox: BBox | None
    landmark: str
    db_index: int | None  # the anchor's own db index (None for a query whose image is not in the db)
    positives: tuple[int, ...]  # db indices, never the anchor itself


class TripletMiner:
    """Samples (1 + P + N, 3, S, S) tuples: [anchor, P positives, N negatives], square S x S images.

    Deterministic given `seed`. `anchors_per_epoch` (None: all) picks a fresh random anchor subset at every
    `refresh`, as cirtorch does for large training sets. `num_positives` is the P of every tuple (the loss takes
    the closest of them, as NetVLAD's weakly supervised loss does).
    """

    def __init__(
        self,
        dataset: RetrievalDataset,
        image_size: int,
        num_negatives: int = 5,
        neg_pool_size: int = 200,
        seed: int = 0,
        num_positives: int = 1,
        anchors_per_epoch: int | None = None,
    ):
        if num_negatives < 1 or num_positives < 1:
            raise ValueError(
                f"need at least one positive and one negative per tuple, got num_positives={num_positives}, "
                f"num_negatives={num_negatives}"
            )
        self.dataset = dataset
        self.image_size = image_size
        self.num_negatives = num_negatives
        self.num_positives = num_positives
        self.neg_pool_size = neg_pool_size
        self.anchors_per_epoch = anchors_per_epoch
        self.rng = np.random.default_rng(seed)

        n_db = len(dataset.images)
        by_name = {n: i for i, n in enumerate(dataset.images)}
        landmarks = dataset.landmarks()
        # Forbidden as negatives for a landmark: anything any of its queries calls ok or junk.
        forbidden: dict[str, set[int]] = {lm: set() for lm in landmarks}
        for q in range(len(dataset.queries)):
            lm = dataset.query_landmark(q)
            forbidden[lm].update(dataset.gnd[q]["ok"])
            forbidden[lm].update(dataset.gnd[q]["junk"])
        self.landmark_of_image: dict[int, str] = {}
        for lm, idx in landmarks.items():
            for i in idx:
                self.landmark_of_image.setdefault(i, lm)
        self.negatives_for: dict[str, np.ndarray] = {
            lm: np.array(sorted(set(range(n_db)) - forbidden[lm]), dtype=np.int64) for lm in landmarks
        }
        for lm, neg in self.negatives_for.items():
            if len(neg) < num_negatives:
                raise ValueError(
                    f"dataset {dataset.name}: landmark {lm!r} has only {len(neg)} negative images, "
                    f"fewer than num_negatives={num_negatives}"
                )

        anchors: list[Anchor] = []
        for q in range(len(dataset.queries)):
            lm = dataset.query_landmark(q)
            own = by_name.get(dataset.queries[q])
            pos = tuple(i for i in landmarks[lm] if i != own)
            if pos:
                anchors.append(Anchor(dataset.query_path(q), tuple(dataset.bbxs[q]), lm, own, pos))
        for lm, idx in landmarks.items():
            for i in idx:
                pos = tuple(j for j in idx if j != i)
                if pos:
                    anchors.append(Anchor(dataset.image_path(i), None, lm, i, pos))
        if not anchors:
            raise ValueError(f"dataset {dataset.name}: no landmark has two images, nothing to train on")
        self.anchors = anchors
        self.epoch: list[int] = self._pick_epoch()
        self.hard_negatives: dict[int, np.ndarray] = {}  # anchor id -> db indices, from the last refresh
        self._order: list[int] = []
        self.refreshes = 0

    def __len__(self) -> int:
        """Anchors in the current epoch (tuples per pass)."""
        return len(self.epoch)

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.epoch) / batch_size)

    def _pick_epoch(self) -> list[int]:
        n = len(self.anchors)
        if self.anchors_per_epoch is None or self.anchors_per_epoch >= n:
            return list(range(n))
        return sorted(self.rng.choice(n, size=self.anchors_per_epoch, replace=False).tolist())

    def refresh(self, describe: Describe) -> None:
        """Re-mine hard negatives with the current model (call once per epoch, model in eval mode)."""
        self.epoch = self._pick_epoch()
        self._order = []
        n_db = len(self.dataset.images)
        pool = np.sort(self.rng.choice(n_db, size=min(self.neg_pool_size, n_db), replace=False))
        anchors = [self.anchors[a] for a in self.epoch]
        a_desc = np.asarray(describe([a.path for a in anchors], [a.bbox for a in anchors]), dtype=np.float32)
        p_desc = np.asarray(
            describe([self.dataset.image_path(int(i)) for i in pool], [None] * len(pool)), dtype=np.float32
        )
        if a_desc.shape[0] != len(anchors) or p_desc.shape[0] != len(pool):
            raise ValueError(
                f"describe returned {a_desc.shape[0]} and {p_desc.shape[0]} rows for {len(anchors)} anchors and "
                f"{len(pool)} pool images; it must return one descriptor per path"
            )
        # Squared L2 distance; the ordering is what matters (descriptors are L2-normalized in practice).
        d2 = (a_desc**2).sum(1)[:, None] + (p_desc**2).sum(1)[None, :] - 2.0 * a_desc @ p_desc.T
        self.hard_negatives = {}
        for row, a in enumerate(self.epoch):
            allowed = np.isin(pool, self.negatives_for[self.anchors[a].landmark])
            chosen: list[int] = []
            seen_landmarks: set[str] = set()
            for j in np.argsort(d2[row], kind="stable"):
                if not allowed[j]:
                    continue
                idx = int(pool[j])
                lm = self.landmark_of_image.get(idx)  # distractors have none: each counts on its own
                if lm is not None:
                    if lm in seen_landmarks:
                        continue
                    seen_landmarks.add(lm)
                chosen.append(idx)
                if len(chosen) == self.num_negatives:
                    break
            if len(chosen) < self.num_negatives:  # small pool: top up at random
                extra = np.setdiff1d(self.negatives_for[self.anchors[a].landmark], chosen)
                chosen += self.rng.choice(extra, self.num_negatives - len(chosen), replace=False).tolist()
            self.hard_negatives[a] = np.asarray(chosen, dtype=np.int64)
        self.refreshes += 1

    def _next_anchor(self) -> int:
        if not self._order:
            self._order = self.rng.permutation(self.epoch).tolist()
        return self._order.pop()

    def sample_indices(self, batch_size: int) -> list[tuple[int, list[int], list[int]]]:
        """(anchor id, positive db indices, negative db indices) for the next `batch_size` tuples."""
        out = []
        for _ in range(batch_size):
            a = self._next_anchor()
            anchor = self.anchors[a]
            pos = self.rng.choice(
                anchor.positives, self.num_positives, replace=len(anchor.positives) < self.num_positives
            )
            neg = self.hard_negatives.get(a)
            if neg is None:
                neg = self.rng.choice(self.negatives_for[anchor.landmark], self.num_negatives, replace=False)
            out.append((a, [int(i) for i in pos], [int(i) for i in neg]))
        return out

    def sample_specs(self, batch_size: int) -> list[TupleSpec]:
        """The files of the next `batch_size` tuples, nothing loaded yet (the random draws of `sample`)."""
        return [
            [
                (self.anchors[a].path, self.anchors[a].bbox),
                *((self.dataset.image_path(i), None) for i in pos + neg),
            ]
            for a, pos, neg in self.sample_indices(batch_size)
        ]

    def sample(self, batch_size: int) -> list[torch.Tensor]:
        """`batch_size` tuples, each (1 + num_positives + num_negatives, 3, S, S): [anchor, positives, negatives]."""
        images = SquareImages(self.image_size)
        return [images.load(spec) for spec in self.sample_specs(batch_size)]


#: The images of one tuple (or of any batch of square images): (path, box or None) each, anchor first.
TupleSpec = list[tuple[Path, BBox | None]]


class SquareImages(Dataset):
    """Square ``image_size`` images as a Dataset whose item *is* the list of files: ``images[spec]`` is the
    (n, 3, S, S) batch of ``spec``'s (path, box) pairs, as `SquareLoader` hands them to its workers.

    In a worker an unreadable file comes back as its path and reason instead of an `ImageReadError`: raised
    there, DataLoader would re-raise it as a RuntimeError (it cannot rebuild the error), so `SquareLoader`
    raises it in the caller's process with the path, as loading in line does."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def load(self, spec: Sequence[tuple[Path, BBox | None]]) -> torch.Tensor:
        """The batch of ``spec`` (raises `ImageReadError` naming an unreadable file)."""
        return torch.stack([load_image(p, self.image_size, bbox=b, square=True) for p, b in spec])

    def __getitem__(self, spec: Sequence[tuple[Path, BBox | None]]) -> torch.Tensor | _Unreadable:
        try:
            return self.load(spec)
        except ImageReadError as exc:
            return _Unreadable(exc.path, exc.reason)


@dataclass(frozen=True)
class _Unreadable:
    """An `ImageReadError` as a value a worker can send back (DataLoader turns a tuple into a list: a class)."""

    path: Path
    reason: str


class _Queue(Sampler):
    """The "indices" a `SquareLoader` iteration fetches: the batches (lists of files) the caller set last."""

    def __init__(self) -> None:
        self.items: list[TupleSpec] = []

    def __iter__(self) -> Iterator[TupleSpec]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class SquareLoader:
    """Loads batches of square images ahead, in ``num_workers`` DataLoader worker processes, while the caller
    computes: ``load(batches)`` yields the (n, 3, S, S) tensor of each batch (a `TupleSpec`-like list of files)
    in order. One DataLoader with persistent workers serves every call (the training tuples of each stretch
    between two re-minings, and the re-mining's descriptions), so the workers start once per training run.
    ``pin_memory`` (CUDA only) pins each batch as it is, ready for a non-blocking copy: the tuples of a step are
    one batch, so nothing stacks them again into pageable memory. ``num_workers=0`` loads in line, in order."""

    def __init__(self, image_size: int, num_workers: int = 0, pin_memory: bool = False):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: load in the main process), got {num_workers}")
        self.images = SquareImages(image_size)
        self.num_workers = num_workers
        self._queue = _Queue()
        self._loader: DataLoader | None = None
        if num_workers:
            self._loader = DataLoader(
                self.images,
                batch_size=None,  # each item is already a batch
                sampler=self._queue,
                num_workers=num_workers,
                pin_memory=pin_memory,
                persistent_workers=True,
            )

    def load(self, batches: Sequence[Sequence[tuple[Path, BBox | None]]]) -> Iterator[torch.Tensor]:
        """Each batch's images, in order; the loading runs ahead of what the caller has taken so far."""
        if self._loader is None:
            for spec in batches:
                yield self.images.load(spec)
            return
        self._queue.items = [list(spec) for spec in batches]
        for out in self._loader:
            if isinstance(out, _Unreadable):
                raise ImageReadError(out.path, out.reason)
            yield out

    def close(self) -> None:
        """Let the workers go (they end when the loader is collected, at once in CPython); `load` then loads in
        line."""
        self._loader = None


def split_tuple(t: torch.Tensor, num_positives: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor (1,...), positives (P,...), negatives (N,...)) views of one tuple or of its descriptors."""
    return t[:1], t[1 : 1 + num_positives], t[1 + num_positives :]


def describe_paths_with(
    embed: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    batch_size: int = 16,
    loader: SquareLoader | None = None,
) -> Describe:
    """Build a `describe` closure from a batch embedding function (square images, so batches stack): batches of
    ``batch_size`` consecutive files, loaded by ``loader`` (its workers; None: in line)."""
    loader = loader if loader is not None else SquareLoader(image_size)

    def describe(paths: Sequence[Path], bbxs: Sequence[BBox | None]) -> np.ndarray:
        pairs = list(zip(paths, bbxs, strict=True))
        chunks = [pairs[s : s + batch_size] for s in range(0, len(pairs), batch_size)]
        out = []
        for batch in loader.load(chunks):
            with torch.no_grad():
                out.append(embed(batch).detach().cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, 0), np.float32)

    return describe
