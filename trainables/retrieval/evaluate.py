"""mAP of a model on a retrieval dataset: describe the database and the cropped queries, rank, score.

Original layout (Oxford5k/Paris6k and the synthetic set): ``{"mAP": m}`` with positives = good ∪ ok.
Revisited layout: ``{"mAP": medium, "mAP_easy": .., "mAP_medium": .., "mAP_hard": ..}``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables.data.oxford import RetrievalDataset
from trainables.retrieval.extract import extract_descriptors
from trainables.retrieval.metrics import mean_average_precision, revisited_gnd, revisited_map
from trainables.retrieval.rank import rank_database

__all__ = ["describe_dataset", "evaluate_dataset", "random_ranking_map", "score_ranking"]

log = logging.getLogger(__name__)


def describe_dataset(
    model: nn.Module,
    dataset: RetrievalDataset,
    image_size: int,
    device: str | torch.device | None = None,
    progress: bool = False,
    num_workers: int = 0,
    **extract_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """(database descriptors, query descriptors); unreadable database images give NaN rows (see extract).
    ``num_workers``: loader processes that decode the images (`trainables.devices.loader_workers`)."""
    db = extract_descriptors(
        model,
        dataset.image_paths(),
        image_size,
        device=device,
        progress=progress,
        skip_unreadable=True,
        desc=f"{dataset.name} database",
        num_workers=num_workers,
        **extract_kwargs,
    )
    queries = extract_descriptors(
        model,
        dataset.query_paths(),
        image_size,
        bbxs=dataset.bbxs,
        device=device,
        progress=progress,
        desc=f"{dataset.name} queries",
        num_workers=num_workers,
        **extract_kwargs,
    )
    return db, queries


def score_ranking(dataset: RetrievalDataset, ranks: np.ndarray) -> dict[str, float]:
    """mAP figures of a ranking ``(n_ranked, n_queries)`` under the dataset's protocol."""
    if dataset.layout == "revisited":
        m = revisited_map(ranks, dataset.gnd)
        return {"mAP": m["medium"], "mAP_easy": m["easy"], "mAP_medium": m["medium"], "mAP_hard": m["hard"]}
    return {"mAP": mean_average_precision(ranks, dataset.gnd)}


def evaluate_dataset(
    model: nn.Module,
    dataset: RetrievalDataset,
    image_size: int,
    device: str | torch.device | None = None,
    progress: bool = False,
    num_workers: int = 0,
    **extract_kwargs: Any,
) -> dict[str, float]:
    """mAP of ``model`` on ``dataset`` (see the module doc for the keys).

    ``num_workers``: loader processes that decode the images (the process's number:
    `trainables.devices.loader_workers`; the mAP is the same for any). ``extract_kwargs`` go to
    :func:`extract_descriptors` (``batch_size``, ``scales``). Unreadable database images are left out of the
    ranking (a positive among them counts as not retrieved).
    """
    db, queries = describe_dataset(
        model, dataset, image_size, device, progress, num_workers, **extract_kwargs
    )
    readable = np.nonzero(~np.isnan(db).any(axis=1))[0]
    ranks = rank_database(db[readable], queries)
    return score_ranking(dataset, readable[ranks])


def random_ranking_map(dataset: RetrievalDataset, seed: int = 0) -> float:
    """mAP of a uniformly random ranking (the chance baseline): Medium for revisited datasets."""
    rng = np.random.default_rng(seed)
    n_db, n_q = len(dataset.images), len(dataset.queries)
    ranks = np.argsort(rng.random((n_db, n_q)), axis=0)  # each column an independent random permutation
    gnd = revisited_gnd(dataset.gnd, "medium") if dataset.layout == "revisited" else dataset.gnd
    return mean_average_precision(ranks, gnd)
