"""Stochastic variational inference: the step. ``loss = -ELBO`` of a batch from a Pyro
estimator, differentiated, its gradient summed over the ranks, and ``torch.optim.Adam`` over
the module's parameters plus every ``pyro.param`` the program touches
(:func:`collect_params`). Owning the step keeps the loss on the device, the optimizer state a
plain ``state_dict``, and skips ``pyro.module``'s re-registration every step. The epochs are
:class:`ppl_vae.run.loop.Loop`'s; :class:`~ppl_vae.inference.compiled.CompiledStep` is the
same step as one compiled graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pyro
import torch
from torch import Tensor, nn

from ..distributed import SINGLE, World, sum_grads
from ..errors import UsageError
from ..models import Program
from .program import ProgramInfo, nonfinite_site

LossFn = Callable[..., Tensor]  # ``args -> loss``: a differentiable scalar.


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


def collect_params(module: nn.Module, info: ProgramInfo) -> list[Tensor]:
    """The module's parameters and the unconstrained tensor of every ``pyro.param`` site the
    program touches (autoguides, hand-written params), as :class:`pyro.infer.SVI` finds them."""
    params = {id(p): p for p in (*module.parameters(), *info.params) if p.requires_grad}
    return list(params.values())


class Step:
    """One training step ``step(i, args, total, first_bad)``: the loss of the batch ``args``
    (this rank's rows), its gradient summed over the ranks (:func:`~ppl_vae.distributed.
    sum_grads`), then ``optimizer.step()``; the loss is added to the loop's ``total`` and
    ``first_bad`` lowered to ``i`` (the step's index in its epoch) if it is not finite.

    ``loss`` is differentiable (``args -> loss``); an estimator without one (RenyiELBO) gives
    ``backward`` instead, ``args -> loss`` after adding the gradient itself (a host read per
    step). ``terms`` (the objective's programs) let :meth:`diagnose` name a non-finite site."""

    description = "eager"
    compile_seconds = 0.0

    def __init__(self, params: Sequence[Tensor], optimizer: torch.optim.Optimizer | None = None,
                 loss: LossFn | None = None, *, backward: LossFn | None = None,
                 world: World = SINGLE, terms: Sequence[Program] = ()) -> None:
        if loss is None and backward is None:
            raise ValueError("a step needs a loss or a backward function")
        self.params, self.optimizer, self.loss, self.world = list(params), optimizer, loss, world
        self._backward, self.terms = backward, list(terms)

    @classmethod
    def of_elbo(cls, elbo: pyro.infer.ELBO, module: nn.Module, terms: list[Program],
                info: ProgramInfo | None = None, optimizer: torch.optim.Optimizer | None = None,
                world: World = SINGLE) -> Step:
        """The SVI step of ``elbo`` over the weighted ``terms``, training
        :func:`collect_params` (without ``info``, what the probe of the program found: the
        module's parameters)."""
        loss = elbo_loss(elbo, module, terms, info)
        skip = frozenset() if info is None else info.registered
        backward = None
        if loss is None:
            if len(terms) != 1:
                raise UsageError(f"{type(elbo).__name__} trains one model/guide pair, and this "
                                 "objective has several; use --elbo mc, analytic or enum")
            _, model, guide = terms[0]
            model, guide = (registered(module, model, skip=skip),
                            registered(module, guide, skip=skip))

            def backward(*args: Tensor) -> Tensor:
                return torch.tensor(elbo.loss_and_grads(model, guide, *args),
                                    device=args[0].device)

        params = list(module.parameters()) if info is None else collect_params(module, info)
        return cls(params, optimizer, loss, backward=backward, world=world, terms=terms)

    def gradient(self, *args: Tensor) -> Tensor:
        """This rank's loss of ``args`` (detached), after adding the gradient of the loss
        summed over the ranks to the parameters' ``.grad``."""
        if self._backward is not None:
            value = self._backward(*args)
        else:
            value = self.loss(*args)
            value.backward()
            value = value.detach()
        sum_grads(self.params, self.world)
        return value

    def __call__(self, i: int, args: Sequence[Tensor], total: Tensor, first_bad: Tensor
                 ) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.gradient(*args)
        total += loss
        first_bad.copy_(torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=i)))
        self.optimizer.step()

    def diagnose(self, *args: Tensor) -> str | None:
        """The first site of the objective whose log-density is not finite on ``args``."""
        return next((f for _, m, g in self.terms if (f := nonfinite_site(m, g, *args))), None)


def hide_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress
