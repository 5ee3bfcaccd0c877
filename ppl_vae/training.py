"""Stochastic variational inference: the training loop.

Each step draws a batch by a shuffled index into tensors already on the training device,
takes ``loss = -ELBO`` from a Pyro estimator (:mod:`ppl_vae.estimators`) as a differentiable
tensor, and steps a ``torch.optim.Adam`` over every parameter the model and guide touch
(:func:`collect_params`, the same set :class:`pyro.infer.SVI` finds). That is SVI with
Pyro's estimators; owning the loop lets the loss stay on the device (no ``.item()`` per step)
and the optimizer state be a plain ``state_dict`` for checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import pyro
import torch
from pyro import poutine
from torch import Tensor
from tqdm.auto import tqdm

from .data import batches

LossFn = Callable[..., Tensor]


def elbo_loss(elbo: pyro.infer.ELBO, module) -> LossFn:
    """``args -> -ELBO`` summed over the batch, differentiable, for ``module``'s program."""

    def loss(*args: Tensor) -> Tensor:
        return elbo.differentiable_loss(module.model, module.guide, *args)

    return loss


def collect_params(loss: LossFn, *args: Tensor) -> list[Tensor]:
    """Unconstrained tensors of every ``pyro.param`` (and ``pyro.module``) site the loss
    touches, found by one param-only trace, as :class:`pyro.infer.SVI` does."""
    with poutine.trace(param_only=True) as capture:
        loss(*args)
    params = {id(p): p for p in (site["value"].unconstrained()
                                 for site in capture.trace.nodes.values())}
    return list(params.values())


def run_epoch(
    loss: LossFn,
    optimizer: torch.optim.Optimizer,
    inputs: tuple[Tensor, ...],
    batch_size: int,
    desc: str = "",
    progress: bool | None = None,
) -> tuple[float, float]:
    """One pass over shuffled batches of ``inputs`` (rows first, all on one device).

    Returns (mean loss per row, seconds). The loss is summed on the device and read once at
    the end; a visible progress bar reads it at most twice a second for its running ELBO.
    """
    n = inputs[0].shape[0]
    device = inputs[0].device
    total = torch.zeros((), device=device)
    bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=_disable(progress))
    shown, seen = time.perf_counter(), 0
    start = time.perf_counter()
    with pyro.validation_enabled(False):
        for idx in batches(inputs[0], batch_size):
            value = loss(*(t[idx] for t in inputs))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total += value.detach()
            seen += len(idx)
            if not bar.disable:
                bar.update(len(idx))
                if time.perf_counter() - shown > 0.5:
                    bar.set_postfix(elbo=f"{-total.item() / seen:.2f}")
                    shown = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    return total.item() / n, seconds


def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def epochs_bar(epochs: Iterable[int], progress: bool | None = None) -> tqdm:
    return tqdm(epochs, desc="epochs", unit="epoch", disable=_disable(progress))
