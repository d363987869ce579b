"""Dataset names -> loaders: one place that knows where each benchmark lives and in which layout.

`load_dataset("synthetic-train")` needs no data (the embedded set is built and cached on first use);
`load_dataset("oxford5k", data_root)` reads `<data_root>/oxford5k` as written by `trainables.data.download`.
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
}


def load_dataset(name: str, data_root: str | os.PathLike | None = None, seed: int = 0) -> RetrievalDataset:
    """Load a dataset by name (see `DATASETS`).

    Real datasets read `<data_root>/<name>`. For `synthetic-*`, `data_root` is the cache folder handed to
    `ensure_synthetic` (None: the default cache) and `seed` picks the generated set.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    layout, folder = DATASETS[name]
    if layout == "synthetic":
        # Lazy: the generator (scikit-image, fonts) loads only when a synthetic split is asked for.
        from trainables.data.synthetic import ensure_synthetic

        root = ensure_synthetic(Path(data_root) if data_root is not None else None, seed=seed)
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
