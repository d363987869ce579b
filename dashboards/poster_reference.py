"""The published results the views compare a sweep with: the poster's table (Saha, Varma, Jawahar, "Compressing
NetVLAD", ACPR 2017, Table "RESULTS"), as printed, and ``poster_reference`` to turn it into reference points.

The poster gives memory in MB and only the *drop* in mAP, not mAP itself: the points carry the drop (measured on
the poster's test set) as a relative fraction under ``DROP_KEY``, and the views place them at base mAP × (1 − drop)
against the sweep's own base model, on the plot's axis (the validation mAP).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from trainables.contract import DROP_KEY, MEMORY_KEY


class PosterRow(NamedTuple):
    """One compressed model of the table: pruning threshold, bits per weight, % of weights pruned, mAP drop in %
    on Oxford5k and on Paris6k (each fine-tuned on the other set), memory in MB as printed."""

    threshold: float
    bits: int
    pruned_pct: float
    drop_oxford_pct: float
    drop_paris_pct: float
    memory_mb: float


class PosterModel(NamedTuple):
    """A backbone's dense model (``base_mb``) and its compressed ``rows``."""

    label: str
    base_mb: float
    rows: tuple[PosterRow, ...]


POSTER_TABLE: dict[str, PosterModel] = {
    "alexnet": PosterModel(
        "AlexNet + NetVLAD + whitening",
        248.6,
        (
            PosterRow(0.001, 8, 25.77, 0.0, 0.0, 41.4),
            PosterRow(0.005, 8, 48.44, 0.0, 0.0, 32.4),
            PosterRow(0.01, 8, 69.92, 2.1, 1.8, 20.0),
            PosterRow(0.05, 8, 85.77, 14.2, 13.3, 10.3),
            PosterRow(0.005, 5, 52.39, 2.9, 3.4, 19.5),
            PosterRow(0.01, 5, 74.95, 7.3, 6.7, 10.6),
        ),
    ),
    "vgg16": PosterModel(
        "VGG16 + NetVLAD + whitening",
        529.5,
        (
            PosterRow(0.001, 8, 25.52, 0.0, 0.0, 89.6),
            PosterRow(0.005, 8, 51.77, 0.0, 0.0, 65.1),
            PosterRow(0.01, 8, 68.23, 2.0, 2.1, 40.5),
            PosterRow(0.05, 8, 84.68, 11.8, 14.1, 21.7),
            PosterRow(0.005, 5, 55.77, 2.2, 3.6, 42.1),
            PosterRow(0.01, 5, 75.66, 6.8, 5.6, 21.2),
        ),
    ),
}


def poster_reference(backbone: str, dataset: str) -> list[dict[str, Any]] | None:
    """The poster's points for ``backbone`` (``alexnet``/``vgg16``) on ``dataset``'s test set (a name containing
    ``oxford`` or ``paris``), or None when the poster has nothing comparable (e.g. the synthetic set or the tiny
    backbone). Each point: ``label``, ``memory_mib`` (the poster's MB as printed), ``DROP_KEY`` (a relative
    fraction), ``threshold``, ``bits``, ``pruned`` (a fraction); the dense model comes first."""
    model = POSTER_TABLE.get(backbone.lower())
    name = dataset.lower()
    on_oxford = "oxford" in name
    if model is None or not (on_oxford or "paris" in name):
        return None
    points = [
        {
            "label": f"poster {backbone.lower()} base",
            MEMORY_KEY: model.base_mb,
            DROP_KEY: 0.0,
            "threshold": 0.0,
            "bits": 32,
            "pruned": 0.0,
        }
    ]
    for row in model.rows:
        drop_pct = row.drop_oxford_pct if on_oxford else row.drop_paris_pct
        points.append(
            {
                "label": f"poster {backbone.lower()} t={row.threshold:g} {row.bits}-bit",
                MEMORY_KEY: row.memory_mb,
                DROP_KEY: drop_pct / 100.0,
                "threshold": row.threshold,
                "bits": row.bits,
                "pruned": row.pruned_pct / 100.0,
            }
        )
    return points
