"""Stochastic variational inference: the training loop.

Each step draws a batch by a shuffled index into tensors already on the training device,
takes ``loss = -ELBO`` from a Pyro estimator (:mod:`ppl_vae.estimators`) as a differentiable
tensor, and steps a ``torch.optim.Adam`` over the module's parameters plus every
``pyro.param`` the model and guide touch (:func:`collect_params`). That is SVI with Pyro's
estimators; owning the loop keeps the loss on the device (no ``.item()`` per step), keeps
the optimizer state a plain ``state_dict`` for checkpoints, and skips re-registering the
networks in Pyro's param store every step (``pyro.module``, a quarter of Pyro's overhead
on a 784-400-20 VAE).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import pyro
import torch
from pyro import poutine
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import batches

LossFn = Callable[..., Tensor]
"""``args -> loss``: a differentiable scalar."""
StepFn = Callable[..., Tensor]
"""``args -> loss``: a detached scalar, its gradient already added to the parameters."""


def with_params(module: nn.Module, name: str = "module") -> tuple[Callable, Callable]:
    """``module``'s model and guide, each first registering the module's parameters in Pyro's
    param store (``pyro.module``): what ``pyro.infer.SVI`` with ``pyro.optim`` and the Jit
    ELBOs (which pass param-store tensors into the compiled trace) need."""

    def model(*args, **kwargs):
        pyro.module(name, module)
        return module.model(*args, **kwargs)

    def guide(*args, **kwargs):
        pyro.module(name, module)
        return module.guide(*args, **kwargs)

    return model, guide


def elbo_step(elbo: pyro.infer.ELBO, module: nn.Module) -> StepFn:
    """``args -> -ELBO`` (summed over the batch, detached) for ``module``'s program, after
    adding its gradient to the parameters' ``.grad``.

    Estimators with ``differentiable_loss`` (Trace_ELBO, TraceMeanField_ELBO, their Jit
    variants) give a tensor we differentiate; RenyiELBO has only ``loss_and_grads``, which
    differentiates its own surrogate and returns a float (one host sync per step).
    """
    if not hasattr(elbo, "differentiable_loss"):
        model, guide = with_params(module)
        return lambda *args: torch.tensor(elbo.loss_and_grads(model, guide, *args))
    jit = type(elbo).__name__.startswith("Jit")
    model, guide = with_params(module) if jit else (module.model, module.guide)
    return backward_step(lambda *args: elbo.differentiable_loss(model, guide, *args))


def backward_step(loss: LossFn) -> StepFn:
    """Turn a differentiable loss into a :data:`StepFn`."""

    def step(*args: Tensor) -> Tensor:
        value = loss(*args)
        value.backward()
        return value.detach()

    return step


def collect_params(module: nn.Module, step: StepFn, *args: Tensor) -> list[Tensor]:
    """The module's parameters and the unconstrained tensor of every ``pyro.param`` site the
    step touches (autoguides, hand-written params), found by one param-only trace as
    :class:`pyro.infer.SVI` does."""
    with poutine.trace(param_only=True) as capture:
        step(*args)
    found = (site["value"].unconstrained() for site in capture.trace.nodes.values())
    params = {id(p): p for p in (*module.parameters(), *found) if p.requires_grad}
    return list(params.values())


def run_epoch(
    step: StepFn,
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
            optimizer.zero_grad(set_to_none=True)
            total += step(*(t[idx] for t in inputs))
            optimizer.step()
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
