"""The plain state dict of a pruned and/or quantized model: the keys and values its uncompressed architecture has.

``torch.nn.utils.parametrize`` moves ``weight`` to ``parametrizations.weight.original`` and ``torch.nn.utils.prune``
to ``weight_orig`` + ``weight_mask``; the artifact stores every tensor under its plain name (``conv.weight``) so the
rebuilt architecture loads it as is. Neither torch module exposes that mapping, so this walks the modules' own
``_parameters`` / ``_buffers`` / ``_modules`` / ``_forward_pre_hooks`` -- the one place in the codec that does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune


def _prune_hook_names(module: nn.Module) -> set[str]:
    return {
        h._tensor_name
        for h in module._forward_pre_hooks.values()
        if isinstance(h, torch_prune.BasePruningMethod)
    }


def plain_state_entries(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """State-dict key of the uncompressed architecture -> (owning module, tensor name), in state-dict order.

    Parametrized tensors (``parametrizations.<name>.original``) and ``torch.nn.utils.prune`` pairs
    (``<name>_orig`` + ``<name>_mask``) appear under their plain ``<name>``; non-persistent buffers are left out,
    as ``state_dict`` does."""
    out: dict[str, tuple[nn.Module, str]] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        pruned = _prune_hook_names(module)
        is_param = parametrize.is_parametrized(module)
        # Compressed tensors first: in a plain module ``weight`` precedes ``bias``, and both parametrize and
        # prune move it out of that place.
        for name in sorted(pruned):
            out[prefix + name] = (module, name)
        if is_param:
            for name in module.parametrizations:
                out[prefix + name] = (module, name)
        for name, p in module._parameters.items():
            if p is None:
                continue
            if name.endswith("_orig") and name[: -len("_orig")] in pruned:
                continue
            out[prefix + name] = (module, name)
        for name, b in module._buffers.items():
            if b is None or name in module._non_persistent_buffers_set:
                continue
            if name.endswith("_mask") and name[: -len("_mask")] in pruned:
                continue
            out[prefix + name] = (module, name)
        for child_name, child in module._modules.items():
            if child is None or (is_param and child_name == "parametrizations"):
                continue
            walk(child, f"{prefix}{child_name}.")

    walk(model, "")
    return out


def plain_value(module: nn.Module, name: str) -> torch.Tensor:
    """The value of ``module.<name>`` as its forward uses it, detached (for a pruned tensor: orig * mask)."""
    with torch.no_grad():
        if name in _prune_hook_names(module):
            # The hook's own op; ``module.<name>`` is only refreshed at forward time and may be stale.
            return getattr(module, name + "_orig") * getattr(module, name + "_mask")
        return getattr(module, name).detach()
