"""Dataset names -> loaders: one place that knows where each benchmark lives and in which layout.

`load_dataset("synthetic-train")` needs no data (the embedded set is built and cached on first use);
`load_dataset("oxford5k", data_root)` reads `<data_root>/oxford5k` as written by `trainables.data.download`.
Generated variants of the synthetic set (`SYNTHETIC_VARIANTS`) are named ``<variant>-<split>``, e.g.
``synthetic-large-train``: 4,225 training images, enough for the poster's PCA-4096 whitening.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainables.data.oxford import RetrievalDataset, load_original, load_revisited

# name -> (layout, folder under data_root). Synthetic splits live under the synthetic cache root instead.
DATASETS: dict[str, tuple[str, str]] = {
    "synthetic-train": ("synthetic", "train"),
    "synthetic-val": ("synthetic", "val"),
    "synthetic-test": ("synthetic", "test"),
    "oxford5k": ("original", "oxford5k"),
    "paris6k": ("original", "paris6k"),
    "roxford5k": ("revisited", "roxford5k"),
    "rparis6k": ("revisited", "rparis6k"),
    # After the real sets, so the embedded splits head the list of known names.
    "synthetic-large-train": ("synthetic", "train"),
    "synthetic-large-val": ("synthetic", "val"),
    "synthetic-large-test": ("synthetic", "test"),
}

#: Generated synthetic sets: the name prefix of their splits -> the `trainables.data.synthetic.SyntheticSpec`
#: fields they change (kept as plain values so this module does not import the generator). ``synthetic`` is the
#: embedded set. ``synthetic-large``: 580 views of each of the 7 training distractor places give 165 + 4,060 =
#: 4,225 training images, more than the 4,097 that PCA-4096 whitening needs; validation and test, and the image
#: size, are the embedded set's (so those two splits hold the same pictures).
SYNTHETIC_VARIANTS: dict[str, dict[str, int]] = {
    "synthetic": {},
    "synthetic-large": {"train_distractor_views": 580},
}


def load_dataset(name: str, data_root: str | os.PathLike | None = None, seed: int = 0) -> RetrievalDataset:
    """Load a dataset by name (see `DATASETS`).

    Real datasets read `<data_root>/<name>`. For `synthetic-*`, `data_root` is the cache folder handed to
    `ensure_synthetic` (None: the default cache), `seed` picks the generated set and the name's prefix its
    variant (`SYNTHETIC_VARIANTS`).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    layout, folder = DATASETS[name]
    if layout == "synthetic":
        # Lazy: the generator (scikit-image, fonts) loads only when a synthetic split is asked for.
        from trainables.data.synthetic import SyntheticSpec, ensure_synthetic

        spec = SyntheticSpec(**SYNTHETIC_VARIANTS[name.rsplit("-", 1)[0]])
        root = ensure_synthetic(Path(data_root) if data_root is not None else None, seed=seed, spec=spec)
        return load_original(root / folder, name)
    if data_root is None:
        raise ValueError(
            f"dataset {name!r} needs data_root, the folder that holds {folder}/ "
            f"(get the data with: python -m trainables.data.download {name} --dest DATA_ROOT)"
        )
    root = Path(data_root) / folder
    if layout == "original":
        return load_original(root, name)
    return load_revisited(root, name)
