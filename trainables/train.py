"""Triplet loss and the training loop shared by the base fine-tune and every compression stage of a trial.

`train_triplet(model, miner, steps, lr, extra_loss)` trains the parameters that have ``requires_grad=True`` on
(anchor, positives, hard negatives) tuples from a `trainables.data.tuples.TripletMiner`, re-mining the hard
negatives with the current model every ``refresh_every`` steps. ``extra_loss()`` is added to every step's loss:
the compression stages pass the L1 penalty (or nothing) through it, and call the loop through
`make_train_fn` / ``functools.partial`` as ``train_fn(model, steps, extra_loss)``.

Optimizer: Adam. The loop serves very different situations (a randomly initialized tiny CNN trained from scratch
in a few hundred CPU steps; ImageNet conv5 layers; a 67M-weight whitening layer whose weights are ~100x larger
than the conv weights; retraining a pruned or quantized model), and Adam's per-parameter step scaling lets one
learning rate work across all of them, where SGD would need a learning rate per layer group and per stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite; ``step`` says at which step (0-based)."""

    def __init__(self, step: int, loss: float, lr: float):
        self.step = step
        self.loss = loss
        self.lr = lr
        super().__init__(
            f"training diverged at step {step}: loss is {loss} (lr={lr}); lower the learning rate or the "
            f"penalty weight"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); ours takes (step, loss, lr), so say so (Ray ships errors by pickle).
        return (DivergedError, (self.step, self.loss, self.lr))


def triplet_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """NetVLAD's weakly supervised triplet loss on squared distances for one query.

    ``q`` (d,), ``pos`` (P, d), ``neg`` (N, d): sum_j max(0, min_i d²(q, p_i) + margin - d²(q, n_j)).
    Taking the closest positive is the "best matching potential positive" of the NetVLAD paper.
    """
    if q.dim() != 1 or pos.dim() != 2 or neg.dim() != 2:
        raise ValueError(
            f"triplet_loss wants q (d,), pos (P, d), neg (N, d); got {tuple(q.shape)}, {tuple(pos.shape)}, "
            f"{tuple(neg.shape)}"
        )
    d_pos = ((pos - q) ** 2).sum(dim=1).min()
    d_neg = ((neg - q) ** 2).sum(dim=1)
    return torch.clamp(d_pos + margin - d_neg, min=0).sum()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train_triplet(
    model: nn.Module,
    miner: Any,
    steps: int,
    lr: float,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    refresh_every: int | None = None,
    batch_size: int = 4,
    margin: float = 0.1,
    describe_batch_size: int = 16,
) -> list[float]:
    """Train ``model``'s trainable parameters for ``steps`` steps; returns the total loss of every step.

    ``miner``: a `TripletMiner` (``refresh(describe)``, ``sample(batch_size)``, ``num_positives``,
    ``image_size``). Each step takes ``batch_size`` tuples, embeds all their images in one forward pass, and
    minimizes the mean triplet loss (+ ``extra_loss()``). Hard negatives are re-mined with the current model at
    step 0 and then every ``refresh_every`` steps (None: once per pass over the miner's anchors).
    Raises `DivergedError` naming the step when the loss is not finite.
    """
    from trainables.data.tuples import describe_paths_with

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if steps == 0:
        return []
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    if refresh_every is None:
        refresh_every = max(1, math.ceil(len(miner) / batch_size))
    if refresh_every < 1:
        raise ValueError(f"refresh_every must be >= 1 (or None), got {refresh_every}")
    opt = torch.optim.Adam(params, lr=lr)
    n_pos = miner.num_positives

    def embed(images: torch.Tensor) -> torch.Tensor:
        return model(images.to(device))

    describe = describe_paths_with(embed, miner.image_size, batch_size=describe_batch_size)
    was_training = model.training
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="triplet fine-tune", unit="step", leave=False)
    try:
        for step in range(steps):
            if step % refresh_every == 0:
                model.eval()
                with torch.no_grad():
                    miner.refresh(describe)
                log.debug("step %d: refreshed hard negatives", step)
            model.train()
            tuples = miner.sample(batch_size)
            sizes = [t.shape[0] for t in tuples]
            desc = model(torch.cat(tuples).to(device))
            loss_t = desc.new_zeros(())
            for chunk in torch.split(desc, sizes):
                loss_t = loss_t + triplet_loss(chunk[0], chunk[1 : 1 + n_pos], chunk[1 + n_pos :], margin)
            loss_t = loss_t / len(tuples)
            loss = loss_t
            if extra_loss is not None:
                loss = loss + extra_loss()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DivergedError(step, value, lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", triplet=f"{float(loss_t):.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return losses


def make_train_fn(miner: Any, lr: float, **kwargs: Any) -> Callable[..., list[float]]:
    """``train_fn(model, steps, extra_loss=None)`` bound to a miner and learning rate (the compression stages' hook).

    Safer than ``functools.partial(train_triplet, miner=..., lr=...)``, which cannot be called positionally as
    ``train_fn(model, steps, extra_loss)`` because ``miner`` comes second in `train_triplet`.
    """

    def train_fn(
        model: nn.Module, steps: int, extra_loss: Callable[[], torch.Tensor] | None = None
    ) -> list[float]:
        return train_triplet(model, miner, steps, lr, extra_loss=extra_loss, **kwargs)

    return train_fn
