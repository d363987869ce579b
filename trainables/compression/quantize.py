"""Per-layer weight quantization on any ``nn.Module``: ``uniform`` (b-bit linear, straight-through) and trained ``kmeans``.

Both modes are ``torch.nn.utils.parametrize`` parametrizations of the module's ``weight``, so the module's own
``forward`` runs unchanged. The effective weight is always ``codebook[indices] * mask.to(float32)`` in float32,
times ``scale[c]`` along dim 0 for a kmeans layer quantized with per-output-channel scales (``scale="channel"``);
``quantized_view`` exposes exactly those tensors for the codec, which decodes them into a dense model that computes
the same outputs.

- ``kmeans`` (Deep Compression): 2^b shared values per layer, linear init over [min, max] of the kept weights, exact
  Lloyd over all of them (``kmeans1d``), then *trained*: the parametrization's trainable tensor is the codebook
  itself (``module.parametrizations.weight.original``, shape (2^b,)), the indices are fixed buffers (the smallest
  integer dtype for 2^b), and the backward sums each cluster's gradients into its centroid (a weighted ``bincount``,
  `_CodebookGather`); pruned weights stay exactly 0.
- ``kmeans`` with ``scale="channel"``: each output channel (dim 0: Linear rows, conv filters, depthwise filters) is
  divided by its scale ``s[c]`` = max |w| of its kept weights before the one shared Lloyd codebook is fit, and the
  effective weight is ``(codebook[indices] * mask) * s[c]``, in that order. A layer whose channels differ by 100x in
  scale (folded batch norm) would otherwise spend nearly all its centroids on its largest channels. ``s`` is a
  fixed float32 buffer: only the codebook is trained (see `quantize_module`).
- ``uniform``: 2^b levels evenly spaced over [min, max] of the kept weights, fixed at quantization time. The latent
  full-precision weight is the trainable tensor; the forward uses its nearest level, the backward passes the
  gradient straight through (masked, so pruned latent weights get none).

Without autograd (evaluation) the weight is built once and reused until its inputs change (`_EvalCache`).

A frozen weight (``requires_grad=False``) stays frozen: parametrize keeps the weight's ``Parameter`` object as the
trainable tensor (kmeans: its data becomes the codebook), so its ``requires_grad`` carries over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.nn.utils import prune as torch_prune

from trainables.compression.kmeans1d import kmeans_1d
from trainables.compression.streams import entropy_bits
from trainables.contract import SCALE_MODES

QUANT_MODES = ("uniform", "kmeans")


@dataclass
class QuantView:
    """What a quantized weight is made of: ``effective weight == codebook[indices] * mask.to(float32)``, times
    ``scale`` along dim 0 when there is one.

    ``codebook``: float32, ``2**bits`` values. ``indices``: int64, the weight's shape (value at pruned positions is
    irrelevant; it is 0 here). ``mask``: bool, the weight's shape, True where the weight is kept. ``mode``:
    ``"uniform"`` or ``"kmeans"``. ``scale``: float32, one positive value per output channel (dim 0), or None.
    """

    codebook: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor
    bits: int
    mode: str
    scale: torch.Tensor | None = None


def index_dtype(k: int) -> torch.dtype:
    """The smallest dtype that holds indices ``0..k-1``: up to 8 bits a stored index costs 1 byte instead of int32's
    4 (the VGG16 whitening has 134M of them)."""
    return torch.uint8 if k <= 1 << 8 else torch.int16 if k <= 1 << 15 else torch.int32


_CHUNK = 1 << 22


def _chunks(*tensors: torch.Tensor):
    """Matching flat chunks of same-shaped tensors."""
    flat = [t.reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), _CHUNK):
        yield tuple(f[start : start + _CHUNK] for f in flat)


def _channel_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (dim 0, everything else): the shape a per-output-channel scale broadcasts over."""
    return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)


def _lookup(
    codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``codebook[indices] * mask.to(float32)``, bit for bit (``x * 1.0``, ``x * 0.0``), then ``* scale[c]`` along
    dim 0 when given (the codec's decoder does the same two float32 products in the same order), as one
    weight-sized tensor: chunk by chunk, so neither an int64 copy of the indices nor a float copy of the mask is
    made, and the scale is applied in place."""
    out = torch.empty(indices.shape, dtype=codebook.dtype, device=codebook.device)
    for o, idx, keep in _chunks(out, indices, mask):
        torch.index_select(codebook, 0, idx.to(torch.int32), out=o)
        o.mul_(keep)
    if scale is not None:
        _channel_view(out).mul_(scale.reshape(-1, 1))
    return out


class _CodebookGather(torch.autograd.Function):
    """``codebook[indices] * mask`` (``* scale[c]`` when given) whose backward is a weighted ``bincount`` (each
    cluster's summed, masked gradient, accumulated in float64 chunk by chunk) instead of autograd's index backward,
    which sorts an int64 copy of every index (gigabytes for the whitening). With a scale, the backward first makes
    one weight-sized ``grad * scale[c]`` (only then: the unscaled path allocates nothing weight-sized)."""

    @staticmethod
    def forward(
        ctx: Any,
        codebook: torch.Tensor,
        indices: torch.Tensor,
        mask: torch.Tensor,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(indices, mask, scale)
        ctx.k = codebook.numel()
        return _lookup(codebook, indices, mask, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        indices, mask, scale = ctx.saved_tensors
        if scale is not None:
            grad = (_channel_view(grad) * scale.reshape(-1, 1)).reshape(grad.shape)
        total = torch.zeros(ctx.k, dtype=torch.float64, device=grad.device)
        for g, idx, keep in _chunks(grad, indices, mask):
            total += torch.bincount(idx, weights=g.double().mul_(keep), minlength=ctx.k)
        return total.to(grad.dtype), None, None, None


class _EvalCache:
    """The last weight a parametrization built without autograd, reused while its inputs are the same tensors at
    the same versions (an optimizer step or ``load_state_dict`` bumps the version): evaluation forwards then do not
    rebuild a 134M-entry weight per batch. Dropped on the first forward with autograd (training), so it holds no
    memory there."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def get(self, build, *inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.clear()
            return build()
        # Inference tensors must not leak into no_grad code that may later save them for backward.
        key = (torch.is_inference_mode_enabled(),) + tuple(
            (t.device, t.data_ptr(), t._version, t.shape) for t in inputs
        )
        if self._key != key or self._value is None:
            self.clear()  # free the old weight before building the new one
            self._value, self._key = build(), key
        return self._value

    def clear(self) -> None:
        self._key = self._value = None

    def __deepcopy__(self, memo: dict) -> _EvalCache:
        return _EvalCache()

    def __getstate__(self) -> dict:
        return {"_key": None, "_value": None}


class KMeansWeight(nn.Module):
    """Parametrization ``codebook -> codebook[indices] * mask`` (``* scale[c]`` along dim 0 when ``scale`` is
    given: float32, one positive value per output channel, a fixed buffer); its trainable input is the (2^bits,)
    codebook."""

    mode = "kmeans"

    def __init__(
        self,
        indices: torch.Tensor,
        mask: torch.Tensor,
        bits: int,
        codebook: torch.Tensor,
        scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("indices", indices.to(index_dtype(2**bits)))
        self.register_buffer("mask", mask.to(torch.bool))
        if scale is not None and (
            scale.dim() != 1 or scale.numel() != (indices.shape[0] if indices.dim() else 1)
        ):
            raise ValueError(
                f"scale has shape {tuple(scale.shape)}, expected ({indices.shape[0] if indices.dim() else 1},): "
                "one value per output channel (dim 0 of the weight)"
            )
        # None: a layer-scaled weight, whose state dict has no 'scale' key (files and checkpoints as before).
        self.register_buffer("scale", None if scale is None else scale.to(torch.float32))
        # The Lloyd result: what an empty cluster keeps in ``right_inverse``. Not saved: it is only used there.
        self.register_buffer("fallback", codebook.to(torch.float32), persistent=False)
        # Handed out by the first right_inverse call (the registration): the Lloyd codebook as it is, without a
        # pass over every weight to recompute it.
        self._pending: torch.Tensor | None = self.fallback
        self._cache = _EvalCache()

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self._cache.get(
                lambda: _CodebookGather.apply(codebook, self.indices, self.mask),
                codebook,
                self.indices,
                self.mask,
            )
        return self._cache.get(
            lambda: _CodebookGather.apply(codebook, self.indices, self.mask, self.scale),
            codebook,
            self.indices,
            self.mask,
            self.scale,
        )

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The least-squares codebook for ``weight`` with the indices (and scales) fixed: each cluster's mean over
        kept entries -- with scales, sum(s·w) / sum(s²) over them -- (an empty cluster keeps its Lloyd centroid).
        At registration: the Lloyd codebook itself."""
        if self._pending is not None:
            codebook, self._pending = self._pending.clone(), None
            return codebook
        k = self.fallback.numel()
        sums = torch.zeros(k, dtype=torch.float64, device=weight.device)
        norms = torch.zeros(k, dtype=torch.float64, device=weight.device)
        w_all = weight.detach()
        if self.scale is None:
            s_all = None
        else:  # one weight-sized tensor, only for a channel-scaled layer
            s_all = _channel_view(torch.ones_like(w_all)).mul_(self.scale.reshape(-1, 1).to(w_all.device))
        # float64 sums (a cluster can hold millions of weights), in chunks so no n-sized float64 copy is made.
        for parts in _chunks(w_all, self.indices, self.mask, *(() if s_all is None else (s_all,))):
            w, idx, keep = parts[:3]
            idx = idx[keep].long()
            if s_all is None:
                sums.index_add_(0, idx, w[keep].double())
                norms += torch.bincount(idx, minlength=k)
            else:
                s = parts[3][keep].double()
                sums.index_add_(0, idx, w[keep].double() * s)
                norms.index_add_(0, idx, s * s)
        means = (sums / torch.where(norms > 0, norms, torch.ones_like(norms))).to(torch.float32)
        return torch.where(norms > 0, means, self.fallback.to(weight.device))


def _gather(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w[mask]`` (numpy's boolean gather is the faster one on CPU)."""
    if w.device.type == "cpu":
        return torch.from_numpy(w.numpy()[mask.numpy()])
    return w[mask]


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An int32 tensor shaped like ``mask``: ``values`` in order where ``mask`` is True, 0 elsewhere."""
    if mask.device.type == "cpu":
        out = np.zeros(mask.shape, dtype=np.int32)
        out[mask.numpy()] = values.numpy()
        return torch.from_numpy(out)
    out = torch.zeros(mask.shape, dtype=torch.int32, device=mask.device)
    return out.masked_scatter_(mask, values.to(mask.device, torch.int32))


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of (a - b)² over ``mask`` in float64, chunked; 0 when the mask is empty."""
    sq, n = 0.0, 0
    for x, y, keep in _chunks(a, b, mask):
        d = (x[keep] - y[keep]).double()
        sq += float(torch.dot(d, d))
        n += int(keep.sum())
    return sq / n if n else 0.0


def _uniform_indices(
    weight: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Nearest level of the evenly spaced ``codebook`` for every entry of ``weight`` (as ``dtype``), chunk by chunk
    (the float quotient and its rounding stay chunk-sized). Rounding, not ``bucketize`` on midpoints: a midpoint
    computed in float32 would not land exactly where ``round`` puts a tie, and the levels must not change."""
    lo = codebook[0]
    step = (codebook[-1] - lo) / (codebook.numel() - 1) if codebook.numel() > 1 else torch.ones_like(lo)
    out = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    if step == 0:
        return out
    for o, w in _chunks(out, weight.detach()):
        o.copy_(torch.round((w - lo) / step).clamp_(0, codebook.numel() - 1))
    return out


class _StraightThrough(torch.autograd.Function):
    """Forward: ``codebook[nearest level] * mask`` exactly; backward: the gradient, masked, to the latent weight."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        indices = _uniform_indices(weight, codebook, index_dtype(codebook.numel()))
        return _lookup(codebook, indices, mask)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad.mul(mask), None, None  # == grad * mask.to(float32), without the float mask


class UniformWeight(nn.Module):
    """Parametrization ``latent -> nearest of 2^bits fixed levels, masked`` with straight-through gradients."""

    mode = "uniform"

    def __init__(self, codebook: torch.Tensor, mask: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("codebook", codebook.to(torch.float32))
        self.register_buffer("mask", mask.to(torch.bool))
        self._cache = _EvalCache()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self._cache.get(
            lambda: _StraightThrough.apply(latent, self.codebook, self.mask), latent, self.codebook, self.mask
        )


def _our_parametrization(module: nn.Module) -> KMeansWeight | UniformWeight | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]
    if len(plist) == 1 and isinstance(plist[0], KMeansWeight | UniformWeight):
        return plist[0]
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module.weight`` is quantized by this module (``quantized_view`` would not be None)."""
    return _our_parametrization(module) is not None


def is_pruned(module: nn.Module) -> bool:
    """Whether ``module.weight`` carries a ``torch.nn.utils.prune`` mask."""
    return any(
        isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == "weight"
        for h in module._forward_pre_hooks.values()
    )


def quantized_view(module: nn.Module) -> QuantView | None:
    """The codebook, indices and mask of ``module.weight``, or None when its weight is not quantized."""
    p = _our_parametrization(module)
    if p is None:
        return None
    with torch.no_grad():
        if isinstance(p, KMeansWeight):
            codebook = module.parametrizations["weight"].original.detach().clone()
            indices = p.indices.long()
            scale = None if p.scale is None else p.scale.clone()
        else:
            scale = None
            codebook = p.codebook.clone()
            latent = module.parametrizations["weight"].original.detach()
            indices = _uniform_indices(latent, codebook)
        indices = indices.masked_fill(~p.mask, 0)
    return QuantView(
        codebook=codebook, indices=indices, mask=p.mask.clone(), bits=p.bits, mode=p.mode, scale=scale
    )


def prune_mask(module: nn.Module) -> torch.Tensor | None:
    """The bool keep-mask of a pruned but not quantized ``module.weight`` (True = kept), or None."""
    if not is_pruned(module):
        return None
    return module.weight_mask.detach().bool()


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight ``module`` uses in its forward (pruned and/or quantized), computed fresh (with autograd)."""
    if is_pruned(module):
        # The same op as the prune hook (mask * orig); module.weight itself is only refreshed at forward time.
        return module.weight_mask.to(module.weight_orig.dtype) * module.weight_orig
    return module.weight


#: The range a channel scale is clamped to: the positive normal float16 values, so every scale is stored exactly
#: in 2 bytes (docs/artifact-format.md#channel-scales).
SCALE_RANGE: tuple[float, float] = (
    float(torch.finfo(torch.float16).tiny),
    float(torch.finfo(torch.float16).max),
)


def channel_scales(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales of ``w`` (dim 0): max |w| over each channel's kept entries, rounded to a float16
    value (held as float32); 1 for a channel with no nonzero kept weight (any positive value decodes it to zeros).

    Max rather than RMS: on the embedded base (EfficientNet-Lite0, folded batch norm; k-means of the conv group
    after training, no pruning) max gave the lower validation drops at 4 and 5 bits when the option was built.
    float16 rather than float32: the codebook is fit to the channel divided by the rounded scale, so the rounding
    (relative 2^-11) only moves the channel's largest normalized weight off 1 by as much, and the file stores half
    the bytes (8,112 scales on the embedded base: 16 KB less)."""
    a = _channel_view(w.detach().abs() * mask)
    s = a.amax(dim=1).to(torch.float32) if a.shape[1] else torch.zeros(a.shape[0], device=w.device)
    s = torch.where(s > 0, s.clamp(*SCALE_RANGE), torch.ones_like(s))
    return s.to(torch.float16).to(torch.float32)


def quantize_module(
    module: nn.Module,
    mode: str,
    bits: int,
    *,
    kmeans_iters: int = 30,
    scale: str = "layer",
    kmeans_rate: float = 0.0,
) -> dict[str, Any]:
    """Quantize ``module.weight`` in place (see the module docstring) and return ``{"mode", "bits", "kept", "mse",
    "kmeans_iterations"}`` (``"scale": "channel"`` added for a channel-scaled layer, ``"kmeans_rate"`` and
    ``"index_entropy_bits"`` -- the order-0 entropy of the kept weights' indices -- for an entropy-constrained
    one); ``mse`` is over the kept weights, against the weights before quantization.

    ``kmeans_rate`` > 0 (kmeans only): the codebook and indices are entropy-constrained k-means
    (``kmeans1d.kmeans_1d(rate=...)``): each kept weight goes to the centroid that best trades its squared error
    against the bits its index costs once the file entropy-codes the indices, so the file is smaller at the same
    bits; the indices are fixed from then on, like Lloyd's.

    ``scale``: ``"layer"`` (one codebook for the raw weights) or ``"channel"`` (kmeans only: the codebook is fit to
    each output channel divided by `channel_scales`, which the effective weight multiplies back). The scales are
    fixed, not trained: the trained codebook already moves every channel's levels together, and a fixed buffer
    keeps the decoded weight a pure function of stored tensors.

    A prune mask, if any, is kept (pruned entries stay 0); without one, the exact zeros of the weight are the pruned
    entries. The weight must be float32 and not already quantized (``strip_compression`` first)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r} is not one of {QUANT_MODES}")
    if scale not in SCALE_MODES:
        raise ValueError(f"scale {scale!r} is not one of {SCALE_MODES}")
    if scale == "channel" and mode != "kmeans":
        raise ValueError(
            f"scale 'channel' needs mode 'kmeans' (uniform levels are not channel-scaled); got mode {mode!r}"
        )
    if kmeans_rate and mode != "kmeans":
        raise ValueError(f"kmeans_rate {kmeans_rate!r} needs mode 'kmeans'; got mode {mode!r}")
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"bits = {bits!r}: must be an integer in 1..16")
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(
            f"{type(module).__name__}.weight is already parametrized; call strip_compression first"
        )
    mask = prune_mask(module)
    if mask is not None:
        torch_prune.remove(module, "weight")  # weight := orig * mask, as a plain Parameter (same object)
    weight = module.weight
    if weight.dtype != torch.float32:
        raise ValueError(
            f"quantization needs a float32 weight, {type(module).__name__}.weight is {weight.dtype}"
        )
    w = weight.detach()
    if mask is None:
        mask = w != 0
    dense = bool(mask.all())
    scales = channel_scales(w, mask) if scale == "channel" else None
    # The values the codebook is fit to: the weights, or each channel over its scale (a temporary only then).
    fit = w if scales is None else (_channel_view(w) / scales.reshape(-1, 1)).reshape(w.shape)
    kept = fit.reshape(-1) if dense else _gather(fit, mask)
    k = 2**bits
    iterations = 0
    if mode == "kmeans":
        res = kmeans_1d(kept.cpu().numpy(), k, iters=kmeans_iters, rate=kmeans_rate)
        iterations = res.iterations
        found = torch.from_numpy(res.indices)
        indices = found.view(w.shape).to(w.device) if dense else _scatter(found, mask)
        centroids = torch.from_numpy(res.centroids).to(torch.float32).to(w.device)
        param: nn.Module = KMeansWeight(indices, mask, bits, centroids, scales)
        # The codebook is Lloyd's, the indices its assignment: its error is Lloyd's (computed on
        # the sorted values in float64; the float32 rounding of the centroids is far below it). Channel-scaled,
        # Lloyd's error is in the scaled values: measured on the weight below instead.
        mse = res.mse if scales is None else None
    else:
        lo, hi = (float(kept.min()), float(kept.max())) if kept.numel() else (0.0, 0.0)
        codebook = torch.linspace(lo, hi, k, dtype=torch.float32, device=w.device)
        param = UniformWeight(codebook, mask, bits)
        mse = None
    parametrize.register_parametrization(module, "weight", param, unsafe=True)
    if mse is None:
        with torch.no_grad():
            mse = _masked_mse(module.weight, w, mask)
        param._cache.clear()  # not held while the next layers are quantized
    row = {
        "mode": mode,
        "bits": bits,
        "kept": int(kept.numel()),
        "mse": mse,
        "kmeans_iterations": iterations,
    }
    if scales is not None:
        row["scale"] = scale
    if kmeans_rate:
        row["kmeans_rate"] = float(kmeans_rate)
        row["index_entropy_bits"] = entropy_bits(np.bincount(res.indices, minlength=k)) / max(
            1, res.indices.size
        )
    return row


def strip_compression(model: nn.Module) -> nn.Module:
    """Remove every prune hook and quantization parametrization in place, leaving plain dense ``weight`` parameters
    equal to the effective weights. Returns ``model``."""
    for module in model.modules():
        if _our_parametrization(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if is_pruned(module):
            torch_prune.remove(module, "weight")
    return model
