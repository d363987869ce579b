"""PCA whitening of global descriptors, learned from training VLAD vectors and applied as an ``nn.Linear``.

y = diag(lambda + eps)^-1/2 E^T (x - mu), then L2 (the L2 is the model's job). As a Linear layer:
weight = diag(lambda + eps)^-1/2 E^T (out_dim, d) and bias = -weight @ mu, so the compression code treats it like
any other layer. When d > n (VLAD vectors are 16k-32k long, training sets a few thousand images) the eigenvectors
come from the n x n Gram matrix instead of the d x d covariance.

On a CUDA device the centring, the Gram/covariance product and its eigendecomposition run in float64 with torch
there, instead of a host float64 eigh that for VGG16's 32k-d VLAD takes minutes on a few vCPUs and several GB of
host memory; anywhere else numpy computes them on the host, as it always has.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class WhiteningError(ValueError):
    """Whitening cannot be learned as asked (typically: more output dimensions than the data supports)."""


def learn_pca_whitening(
    x: np.ndarray, out_dim: int, eps: float = 1e-9, device: torch.device | str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learn PCA whitening from rows of ``x`` (n, d); returns ``(mu (d,), E (d, out_dim), lambdas (out_dim,))``.

    Eigenvalues are those of the sample covariance (normalized by n - 1), so whitened training vectors have
    identity covariance. ``eps`` is relative to the largest eigenvalue. A CUDA ``device`` computes the
    eigendecomposition there (float64); None or any other device uses numpy on the host. The two agree to float64
    rounding up to the sign of each component, which eigh leaves free on either backend.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise WhiteningError(f"whitening needs a 2-D array of vectors (n, d), got shape {x.shape}")
    n, d = x.shape
    rank = min(n - 1, d)
    if out_dim < 1 or out_dim > rank:
        raise WhiteningError(
            f"cannot learn {out_dim}-d whitening from {n} training images of dimension {d}: at most "
            f"min(n_images - 1, d) = {rank} components exist. Use whitening_dim <= {rank} or more training images."
        )
    if not np.isfinite(x).all():
        raise WhiteningError("training vectors contain NaN or inf")
    if device is not None and torch.device(device).type == "cuda":
        mu, e, vals = _top_components_torch(x, out_dim, torch.device(device))
    else:
        mu, e, vals = _top_components_numpy(np.asarray(x, dtype=np.float64), out_dim)
    lambdas = vals / (n - 1)
    lambdas = lambdas + eps * lambdas[0]
    return mu, e, lambdas


def _too_few_dimensions(out_dim: int, n: int) -> WhiteningError:
    return WhiteningError(
        f"the training vectors span fewer than {out_dim} dimensions ({n} images); lower whitening_dim"
    )


def _top_components_numpy(x: np.ndarray, out_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu, E, eigenvalues of Xc^T Xc)`` of the ``out_dim`` largest components, float64 numpy on the host."""
    n, d = x.shape
    mu = x.mean(axis=0)
    xc = x - mu
    if d > n:
        # Gram trick: G = Xc Xc^T (n x n) shares its nonzero eigenvalues with Xc^T Xc; u = Xc^T v / sqrt(lambda).
        gram = xc @ xc.T
        vals, vecs = np.linalg.eigh((gram + gram.T) / 2)
        order = np.argsort(vals)[::-1][:out_dim]
        vals, vecs = vals[order], vecs[:, order]
        if vals[-1] <= 0:
            raise _too_few_dimensions(out_dim, n)
        e = xc.T @ vecs / np.sqrt(vals)
    else:
        cov = xc.T @ xc
        vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(vals)[::-1][:out_dim]
        vals, e = vals[order], vecs[:, order]
        if vals[-1] <= 0:
            raise _too_few_dimensions(out_dim, n)
    return mu, e, vals


def _top_components_torch(
    x: np.ndarray, out_dim: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same as `_top_components_numpy`, in float64 torch on ``device``.

    The float32 input goes to the device as it is and becomes float64 there, so the host holds no float64 copy.
    """
    n, d = x.shape
    xc = torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=torch.float64)
    mu = xc.mean(dim=0)
    xc -= mu
    # eigh returns ascending eigenvalues: flipped, the largest come first (the numpy path's argsort order).
    if d > n:
        gram = xc @ xc.T
        vals, vecs = torch.linalg.eigh((gram + gram.T) / 2)
        del gram
        vals, vecs = vals.flip(0)[:out_dim], vecs.flip(1)[:, :out_dim]
        if vals[-1] <= 0:
            raise _too_few_dimensions(out_dim, n)
        e = xc.T @ vecs / torch.sqrt(vals)
    else:
        cov = xc.T @ xc
        vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
        del cov
        vals, e = vals.flip(0)[:out_dim], vecs.flip(1)[:, :out_dim]
        if vals[-1] <= 0:
            raise _too_few_dimensions(out_dim, n)
    return mu.cpu().numpy(), e.cpu().numpy(), vals.cpu().numpy()


def whitening_linear(mu: np.ndarray, e: np.ndarray, lambdas: np.ndarray) -> nn.Linear:
    """The ``nn.Linear(d, out_dim)`` computing diag(lambdas)^-1/2 E^T (x - mu)."""
    w = (e / np.sqrt(lambdas)).T  # (out_dim, d)
    b = -w @ mu
    d, out_dim = e.shape
    lin = nn.Linear(d, out_dim)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        lin.bias.copy_(torch.from_numpy(b.astype(np.float32)))
    return lin


def learn_whitening(
    x: np.ndarray, out_dim: int, eps: float = 1e-9, device: torch.device | str | None = None
) -> nn.Linear:
    """Learn PCA whitening from ``x`` (n, d) and return it as an ``nn.Linear(d, out_dim)`` (on the CPU).

    ``device``: where the eigendecomposition runs (see `learn_pca_whitening`; CUDA uses the GPU).
    """
    return whitening_linear(*learn_pca_whitening(x, out_dim, eps, device))
