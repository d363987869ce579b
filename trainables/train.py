"""Triplet loss and the training loop shared by the base fine-tune and every compression stage of a trial.

`train_triplet(model, miner, steps, lr, extra_loss)` trains the parameters that have ``requires_grad=True`` on
(anchor, positives, hard negatives) tuples from a `trainables.data.tuples.TripletMiner`, re-mining the hard
negatives with the current model every ``refresh_every`` steps. ``extra_loss()`` is added to every step's loss:
the compression stages pass the L1 penalty (or nothing) through it, and call the loop through
`make_train_fn` as ``train_fn(model, steps, extra_loss)``. A penalty with a ``proximal(step_size)`` method
(`trainables.compression.l1.L1Penalty`) is not differentiated: its proximal step runs after each optimizer step.

Loading: with ``num_workers`` (`trainables.devices.loader_workers`), DataLoader workers load the tuples of the
coming steps, drawn ahead in the miner's own order, while the current step trains: the same losses and weights.

Optimizer: Adam (``optimizer="sgd"`` gives SGD with momentum). The loop serves very different tensors (a randomly
initialized tiny CNN; ImageNet convolutions with folded batch norm; a whitening layer whose weights are ~100x
larger than the conv weights; k-means codebooks of 4 to 256 shared values spanning 0.04 to 13), so:

- the base fine-tune uses one absolute learning rate (Adam moves each weight by about ``lr`` per step);
- the compression stages (`make_train_fn`, `RETRAIN_RECIPE`) use *relative* steps: each tensor's learning rate is
  ``lr`` times its own RMS when the stage starts, so one ``lr`` moves every layer, codebook or not, by the same
  fraction of its scale (as Adafactor scales its steps). With an absolute 1e-5, six steps moved a centroid by at
  most 6e-5; relative steps move a 4-bit codebook of any layer by a visible fraction of its spacing.

Retraining a compressed copy also distils from the dense base (``teacher``): the base's triplet loss on its own
training tuples is ~0 (last 10 steps of the embedded base: 0.002), so the triplet loss alone barely tells a damaged
copy what to restore, and at the same lr it lost a further 27-41% test mAP (benchmarks/RESULTS.md); the base's
descriptor of every image in the batch does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainables.data.tuples import SquareLoader, describe_paths_with
from trainables.devices import device_batch, fast_convolutions, model_device

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """Training or evaluation produced a non-finite number: the trial is a failure, not a point on the front.

    ``step`` is the 0-based training step (None when a measurement, not a step, was non-finite); the message
    says what was non-finite and what to change. The one exception type for a diverged trial."""

    def __init__(self, message: str, step: int | None = None):
        self.step = step
        super().__init__(message)

    @classmethod
    def at_step(cls, step: int, loss: float, lr: float) -> DivergedError:
        return cls(
            f"training diverged at step {step}: loss is {loss} (lr={lr}); lower the learning rate or the "
            f"penalty weight",
            step,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray ships errors by pickle, which rebuilds an exception as cls(*args): give both arguments.
        return (DivergedError, (str(self), self.step))


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


#: Optimizers `train_triplet` builds.
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
#: A tensor's RMS below this counts as this much when its relative learning rate is set (zero-initialized biases).
RMS_FLOOR = 1e-3
#: How the compression stages retrain (`make_train_fn`): Adam with per-tensor relative steps; the trial's ``lr``
#: is the step as a fraction of each tensor's RMS. Chosen on the embedded base's validation split
#: (benchmarks/bench_recipe.py, benchmarks/RESULTS.md).
RETRAIN_RECIPE: dict[str, Any] = {"optimizer": "adam", "relative_lr": True}


def _param_groups(params: list[torch.Tensor], lr: float, relative: bool) -> list[dict[str, Any]]:
    """One optimizer group per tensor at ``lr · max(RMS, RMS_FLOOR)`` when ``relative``, else one group at ``lr``."""
    if not relative:
        return [{"params": params, "lr": lr}]
    with torch.no_grad():
        return [
            {"params": [p], "lr": lr * max(float(p.detach().double().pow(2).mean().sqrt()), RMS_FLOOR)}
            for p in params
        ]


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
    optimizer: str = "adam",
    momentum: float = 0.9,
    relative_lr: bool = False,
    step_offset: int = 0,
    teacher: nn.Module | None = None,
    distill_weight: float = 1.0,
    num_workers: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters for ``steps`` steps; returns the total loss of every step.

    ``miner``: a `TripletMiner` (``refresh(describe)``, ``sample(batch_size)``, ``num_positives``,
    ``image_size``). Each step takes ``batch_size`` tuples, embeds all their images in one forward pass, and
    minimizes the mean triplet loss (+ ``extra_loss()``). Hard negatives are re-mined with the current model at
    step 0 and then every ``refresh_every`` steps (None: once per pass over the miner's anchors; 0: never again
    once the miner was mined); ``step_offset`` continues a count of earlier calls (re-mine when ``step_offset +
    step`` is a multiple of ``refresh_every``, and at step 0 if the miner was never refreshed).
    ``optimizer``: ``"adam"`` or ``"sgd"`` (with ``momentum``); ``relative_lr``: each tensor's learning rate is
    ``lr`` times its RMS at the start (see the module docstring). A penalty with a ``proximal`` method is applied
    by its proximal step after each optimizer step, with each tensor's learning rate as the step size; its value
    is still part of the returned losses.
    ``teacher``: a frozen model (the dense base) whose descriptors of the same images the model is pulled
    towards, ``distill_weight`` · mean ‖f(x) − f_teacher(x)‖² added to the loss: the base's triplet loss is ~0 on
    its own training tuples, so a compressed copy learns far more from where the base puts each image.
    ``num_workers`` (`trainables.devices.loader_workers`): with 1 or more and a miner that has ``sample_specs``,
    the tuples of every stretch between two re-minings are drawn when it starts (the same draws, in the same
    order, as one ``sample`` per step: a re-mining is the only other user of the miner's random stream) and
    their images, and those of the re-mining, load in that many worker processes while the model trains; the
    losses and weights are the same as with 0 (each step loads its tuples in line, ``miner.sample``).
    ``on_step(step, loss)`` is called after every step (progress).
    Raises `DivergedError` naming the step when the loss is not finite.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if steps == 0:
        return []
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    if refresh_every is None:
        refresh_every = max(1, math.ceil(len(miner) / batch_size))
    if refresh_every < 0:
        raise ValueError(f"refresh_every must be >= 1, 0 (mine once) or None, got {refresh_every}")
    param_groups = _param_groups(params, lr, relative_lr)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(param_groups, lr=lr)
    else:
        opt = torch.optim.SGD(param_groups, lr=lr, momentum=momentum)
    step_size = {id(p): g["lr"] for g in param_groups for p in g["params"]}
    proximal = getattr(extra_loss, "proximal", None)
    n_pos = miner.num_positives

    def embed(images: torch.Tensor) -> torch.Tensor:
        return model(device_batch(images, device))

    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0: load in the main process), got {num_workers}")
    prefetch = num_workers > 0 and hasattr(miner, "sample_specs")
    loader = SquareLoader(miner.image_size, num_workers if prefetch else 0, pin_memory=device.type == "cuda")
    describe = describe_paths_with(embed, miner.image_size, batch_size=describe_batch_size, loader=loader)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)

    def remines(step: int) -> bool:
        return bool(refresh_every and (step_offset + step) % refresh_every == 0) or (
            step == 0 and not getattr(miner, "refreshes", 0)
        )

    def stretch(step: int) -> int:
        """Steps from ``step`` (a re-mining) up to the next re-mining or the end."""
        end = step + 1
        while end < steps and not remines(end):
            end += 1
        return end - step

    was_training = model.training
    losses: list[float] = []
    bar = None
    if progress:
        bar = tqdm(total=steps, desc="triplet fine-tune", unit="step", leave=False)
    ahead: Iterator[torch.Tensor] | None = None  # the loading images of this stretch's steps (prefetch)
    ahead_sizes: list[list[int]] = []  # their tuples' sizes, step by step
    try:
        with fast_convolutions(model, teacher, device=device):
            for step in range(steps):
                if remines(step):
                    model.eval()
                    with torch.no_grad():
                        miner.refresh(describe)
                    log.debug("step %d: refreshed hard negatives", step)
                if prefetch and (ahead is None or remines(step)):
                    drawn = [miner.sample_specs(batch_size) for _ in range(stretch(step))]
                    ahead_sizes = [[len(spec) for spec in specs] for specs in drawn]
                    # A step's tuples are one batch (their images in tuple order, as torch.cat of the tuples).
                    ahead = loader.load([[image for spec in specs for image in spec] for specs in drawn])
                model.train()
                if ahead is not None:
                    images = device_batch(next(ahead), device)
                    sizes = ahead_sizes.pop(0)
                else:
                    tuples = miner.sample(batch_size)
                    sizes = [t.shape[0] for t in tuples]
                    images = device_batch(torch.cat(tuples), device)
                desc = model(images)
                loss_t = desc.new_zeros(())
                for chunk in torch.split(desc, sizes):
                    loss_t = loss_t + triplet_loss(chunk[0], chunk[1 : 1 + n_pos], chunk[1 + n_pos :], margin)
                loss_t = loss_t / len(sizes)
                loss = loss_t
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(images)
                    loss = loss + distill_weight * ((desc - target) ** 2).sum(dim=1).mean()
                if proximal is not None:
                    with torch.no_grad():
                        value = float(loss.detach()) + float(extra_loss())
                elif extra_loss is not None:
                    loss = loss + extra_loss()
                    value = float(loss.detach())
                else:
                    value = float(loss.detach())
                if not math.isfinite(value):
                    raise DivergedError.at_step(step, value, lr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if proximal is not None:
                    proximal(lambda p: step_size.get(id(p), 0.0))
                losses.append(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", triplet=f"{float(loss_t):.4f}")
                if on_step is not None:
                    on_step(step, value)
    finally:
        ahead = None
        loader.close()
        if bar is not None:
            bar.close()
        model.train(was_training)
    return losses


def make_train_fn(miner: Any, lr: float, **kwargs: Any) -> Callable[..., list[float]]:
    """``train_fn(model, steps, extra_loss=None)`` bound to a miner and learning rate (the compression stages' hook):
    `train_triplet` with `RETRAIN_RECIPE` (relative steps: ``lr`` is a fraction of each tensor's RMS); ``kwargs``
    override it and pass the rest (device, batch size, margin, ...).

    The steps of successive calls are counted together for re-mining: the stages of one trial re-mine hard
    negatives every ``refresh_every`` steps of the trial, not at the start of every stage (a re-mining describes
    every anchor and the negative pool, some 400 images on the synthetic set, several times the cost of a stage's
    training steps on the embedded model). ``refresh_every=0`` mines once, on the first call, and never again:
    what a trial does (`trainables.base.retrain_fn`).

    Safer than ``functools.partial(train_triplet, miner=..., lr=...)``, which cannot be called positionally as
    ``train_fn(model, steps, extra_loss)`` because ``miner`` comes second in `train_triplet`.
    """

    done = 0

    def train_fn(
        model: nn.Module, steps: int, extra_loss: Callable[[], torch.Tensor] | None = None
    ) -> list[float]:
        nonlocal done
        losses = train_triplet(
            model, miner, steps, lr, extra_loss=extra_loss, step_offset=done, **{**RETRAIN_RECIPE, **kwargs}
        )
        done += steps
        return losses

    return train_fn
