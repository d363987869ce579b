"""The allow-list of model builders a compressed artifact may name, so loading one runs no code from the file.

A file's header names its architecture (``{"name", "config"}``, see docs/artifact-format.md); `load_compressed`
rebuilds it only through this registry: the built-in `ARCHITECTURES` plus what `register_architecture` adds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainables.compression.errors import CodecError

#: Builders the loader may call, name -> "module:function", imported only when a file names that architecture.
#: A string and not an import on purpose: compression works on any nn.Module, so this package must not depend on
#: the NetVLAD model (nor pay for importing it); the registry knows it by name only.
ARCHITECTURES: dict[str, str] = {"netvlad": "trainables.netvlad.model:build_netvlad"}
_REGISTERED: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_architecture(name: str, builder: Callable[[dict[str, Any]], nn.Module] | str) -> None:
    """Allow ``load_compressed`` to rebuild architecture ``name`` with ``builder(config) -> nn.Module`` (random
    weights are fine: every tensor is then filled from the file). ``builder`` may be a ``"module:function"`` string,
    imported only when a file names this architecture."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"architecture name must be a non-empty string, got {name!r}")
    if isinstance(builder, str):
        if ":" not in builder:
            raise ValueError(
                f"builder {builder!r} for architecture {name!r} must look like 'package.module:function'"
            )
        ARCHITECTURES[name] = builder
        _REGISTERED.pop(name, None)
    elif callable(builder):
        _REGISTERED[name] = builder
    else:
        raise TypeError(
            f"builder for architecture {name!r} must be callable or 'module:function', got {builder!r}"
        )


def known_architectures() -> list[str]:
    """Names ``load_compressed`` can rebuild."""
    return sorted(set(ARCHITECTURES) | set(_REGISTERED))


def build_architecture(name: str, config: dict[str, Any]) -> nn.Module:
    """Call the registered builder of ``name`` with ``config``; an unknown name lists the known ones."""
    if name in _REGISTERED:
        builder = _REGISTERED[name]
    elif name in ARCHITECTURES:
        module_name, _, func = ARCHITECTURES[name].partition(":")
        builder = getattr(importlib.import_module(module_name), func)
    else:
        raise CodecError(
            f"unknown architecture {name!r}; known: {', '.join(known_architectures()) or '(none)'} "
            "(add one with trainables.compression.architectures.register_architecture)"
        )
    model = builder(dict(config))
    if not isinstance(model, nn.Module):
        raise CodecError(
            f"builder of architecture {name!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def build_for_loading(name: str, config: dict[str, Any]) -> tuple[nn.Module, bool]:
    """The architecture, built on the meta device when its builder allows (no time or memory spent on random
    weights that are overwritten at once); ``(model, on_meta)``."""
    try:
        with torch.device("meta"):
            return build_architecture(name, config), True
    except CodecError:
        raise
    except Exception:  # a builder that computes on its tensors at init cannot run on meta: build for real
        return build_architecture(name, config), False
