"""Stochastic variational inference: the step. ``loss = -ELBO`` of a batch from a Pyro
estimator, differentiated, and ``torch.optim.Adam`` over the module's parameters plus every
``pyro.param`` the program touches (:func:`collect_params`). Owning the step keeps the loss
on the device, the optimizer state a plain ``state_dict``, and skips ``pyro.module``'s
re-registration every step. The epochs are :class:`ppl_vae.run.loop.Loop`'s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pyro
import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..models import Program
from .program import ProgramInfo

LossFn = Callable[..., Tensor]  # ``args -> loss``: a differentiable scalar.
StepFn = Callable[..., Tensor]
"""``args -> loss``: a detached scalar, its gradient already added to the parameters."""


def registered(module: nn.Module, fn: Callable, name: str = "module",
               skip: frozenset[int] = frozenset()) -> Callable:
    """``fn`` (a model or guide of ``module``) that first registers the module's parameters
    as ``name$$$<parameter name>`` (as ``pyro.module`` does), for ``pyro.infer.SVI``, the Jit
    ELBOs and RenyiELBO; tensors whose ``id`` is in ``skip`` (the program's own) are not."""
    named = [(f"{name}$$${n}", p) for n, p in module.named_parameters() if id(p) not in skip]

    def program(*args, **kwargs):
        for full_name, p in named:
            pyro.param(full_name, p)
        return fn(*args, **kwargs)

    return program


def with_params(module: nn.Module, name: str = "module") -> tuple[Callable, Callable]:
    """``module``'s model and guide, :func:`registered`: ready for ``pyro.infer.SVI``. For
    modules whose programs do not call ``pyro.module`` themselves (those already are)."""
    return registered(module, module.model, name), registered(module, module.guide, name)


def elbo_loss(elbo: pyro.infer.ELBO, module: nn.Module, terms: list[Program],
              info: ProgramInfo | None = None) -> LossFn | None:
    """``args -> -ELBO`` (summed over the batch, differentiable) for the weighted ``terms``
    (weight, model, guide); None for an estimator without ``differentiable_loss``
    (RenyiELBO). ``info`` says which tensors the program registers itself."""
    if not hasattr(elbo, "differentiable_loss"):
        return None
    skip = frozenset() if info is None else info.registered
    if type(elbo).__name__.startswith("Jit"):  # one compiled ELBO per model/guide pair
        terms = [(w, registered(module, m, skip=skip), registered(module, g, skip=skip))
                 for w, m, g in terms]
    elbos = [copy.copy(elbo) for _ in terms]

    def loss(*args: Tensor) -> Tensor:
        return sum(w * e.differentiable_loss(m, g, *args)
                   for e, (w, m, g) in zip(elbos, terms, strict=True))

    return loss


def elbo_step(elbo: pyro.infer.ELBO, module: nn.Module, terms: list[Program],
              info: ProgramInfo | None = None) -> StepFn:
    """``args -> -ELBO`` (summed over the batch, detached) after adding its gradient to the
    parameters' ``.grad``: :func:`elbo_loss` differentiated, or for RenyiELBO its
    ``loss_and_grads`` (a float: one host sync per step)."""
    loss = elbo_loss(elbo, module, terms, info)
    if loss is not None:
        return backward_step(loss)
    if len(terms) != 1:
        raise UsageError(f"{type(elbo).__name__} trains one model/guide pair, and this "
                         "objective has several; use --elbo mc, analytic or enum")
    skip = frozenset() if info is None else info.registered
    _, model, guide = terms[0]
    model, guide = registered(module, model, skip=skip), registered(module, guide, skip=skip)
    return lambda *args: torch.tensor(elbo.loss_and_grads(model, guide, *args),
                                      device=args[0].device)


def backward_step(loss: LossFn) -> StepFn:
    """Turn a differentiable loss into a :data:`StepFn`."""

    def step(*args: Tensor) -> Tensor:
        value = loss(*args)
        value.backward()
        return value.detach()

    return step


def collect_params(module: nn.Module, info: ProgramInfo) -> list[Tensor]:
    """The module's parameters and the unconstrained tensor of every ``pyro.param`` site the
    program touches (autoguides, hand-written params), as :class:`pyro.infer.SVI` finds them."""
    params = {id(p): p for p in (*module.parameters(), *info.params) if p.requires_grad}
    return list(params.values())


class TrainStep:
    """One whole training step ``(i, args, total, first_bad)``: the loss of the batch
    ``args``, its gradient and the update; the loss is added to the loop's ``total`` and
    ``first_bad`` lowered to ``i`` (the step's index in its epoch) if it is not finite."""

    def __call__(self, i: int, args: tuple[Tensor, ...], total: Tensor, first_bad: Tensor
                 ) -> None:
        raise NotImplementedError


class EagerStep(TrainStep):
    """The step as PyTorch runs it: zero the gradients, ``step(*args)`` (a :data:`StepFn`),
    the bookkeeping, then ``optimizer.step()``."""

    def __init__(self, step: StepFn, optimizer: torch.optim.Optimizer) -> None:
        self.step, self.optimizer = step, optimizer

    def __call__(self, i: int, args: tuple[Tensor, ...], total: Tensor, first_bad: Tensor
                 ) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.step(*args)
        total += loss
        first_bad.copy_(torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=i)))
        self.optimizer.step()


def hide_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress
