"""Shared pytest setup: keep every Ray server on loopback and keep torch small on the 2-core CI machine."""

import os

# DESIGN §9: without this Ray binds the machine's network address; with it every node stays on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import faiss  # noqa: E402,F401  (DESIGN §9: faiss before torch, both bring OpenMP)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (marked gpu); run with a GPU to exercise it")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
