"""Stochastic variational inference: the step. ``loss = -ELBO`` of a batch from a Pyro
estimator, differentiated, its gradient summed over the ranks, and ``torch.optim.Adam`` over
the module's parameters plus every ``pyro.param`` the program touches (:func:`collect_params`):
the loss stays on the device and the optimizer state is a plain ``state_dict``. The epochs are
:class:`ppl_vae.run.loop.Loop`'s; :class:`~ppl_vae.inference.compiled.CompiledStep` is the
same step as one compiled graph.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from ..distributed import SINGLE, World, sum_grads
from ..errors import UsageError
from ..models import Program
from .program import ProgramInfo, nonfinite_site

LossFn = Callable[..., Tensor]  # ``args -> loss``: a differentiable scalar.


def registered(module: nn.Module, fn: Callable, name: str = "module",
               info: ProgramInfo | None = None) -> Callable:
    """``fn`` (a model or guide of ``module``) that first registers the module's parameters
    as ``name$$$<parameter name>`` (as ``pyro.module`` does), for ``pyro.infer.SVI``, the Jit
    ELBOs and RenyiELBO; those ``info`` says the program registers itself are not."""
    skip = frozenset() if info is None else info.registered
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
    if type(elbo).__name__.startswith("Jit"):  # one compiled ELBO per model/guide pair
        terms = [(w, registered(module, m, info=info), registered(module, g, info=info))
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
    (this rank's rows), its gradient summed over the ranks, then :meth:`update`; the loss is
    added to the loop's ``total`` and ``first_bad`` lowered to ``i`` if it is not finite.

    ``loss`` is differentiable (``args -> loss``); an estimator without one (RenyiELBO) gives
    ``backward``, ``args -> loss`` after adding the gradient itself. ``terms`` (the
    objective's programs) let :meth:`diagnose` name a non-finite site. The update: the
    gradient's global 2-norm clipped at ``clip_norm`` (``g <- g * min(1, C / (||g|| +
    1e-6))``), the optimizer's step, ``scheduler`` (per step; ``plateau``: by :meth:`after_epoch`
    on the validation loss), and with ``ema`` = d > 0 the moving average ``a <- a + (1 - d)
    (theta - a)`` of the parameters. ``schedule``: a module whose buffers the loss reads (the
    KL warm-up's weight). ``grad_norm`` sums the norms before clipping (with ``clip_norm`` or
    ``watch_norm``), ``clipped`` counts the steps clipped (device tensors)."""

    description = "eager"
    compile_seconds = 0.0

    def __init__(self, params: Sequence[Tensor], optimizer: torch.optim.Optimizer | None = None,
                 loss: LossFn | None = None, *, backward: LossFn | None = None,
                 world: World = SINGLE, terms: Sequence[Program] = (), clip_norm: float = 0.0,
                 ema: float = 0.0, scheduler: Any = None, plateau: Any = None,
                 schedule: nn.Module | None = None) -> None:
        if loss is None and backward is None:
            raise ValueError("a step needs a loss or a backward function")
        self.params, self.optimizer, self.loss, self.world = list(params), optimizer, loss, world
        self._backward, self.terms = backward, list(terms)
        self.clip_norm, self.ema_decay, self.watch_norm = clip_norm, ema, False
        self.scheduler, self.plateau, self.schedule = scheduler, plateau, schedule
        self.last_lr: float | None = None
        device = self.params[0].device if self.params else torch.device("cpu")
        self.ema = [p.detach().clone() for p in self.params] if ema else []
        self.grad_norm = torch.zeros((), device=device)
        self.clipped = torch.zeros((), dtype=torch.long, device=device)

    @classmethod
    def of_elbo(cls, elbo: pyro.infer.ELBO, module: nn.Module, terms: list[Program],
                info: ProgramInfo | None = None, optimizer: torch.optim.Optimizer | None = None,
                world: World = SINGLE, **update: Any) -> Step:
        """The SVI step of ``elbo`` over the weighted ``terms``, training
        :func:`collect_params` (without ``info``, what the probe of the program found: the
        module's parameters); ``update``: the update's settings (see the class)."""
        loss = elbo_loss(elbo, module, terms, info)
        backward = None
        if loss is None:
            if len(terms) != 1:
                raise UsageError(f"{type(elbo).__name__} trains one model/guide pair, and this "
                                 "objective has several; use --elbo mc, analytic or enum")
            model, guide = (registered(module, fn, info=info) for fn in terms[0][1:])

            def backward(*args: Tensor) -> Tensor:
                return torch.tensor(elbo.loss_and_grads(model, guide, *args),
                                    device=args[0].device)

        params = list(module.parameters()) if info is None else collect_params(module, info)
        return cls(params, optimizer, loss, backward=backward, world=world, terms=terms,
                   **update)

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
        self.update()

    def update(self) -> None:
        """After the gradient: clipping, the optimizer's step, the schedule, the average."""
        self.clip([p.grad for p in self.params], self.grad_norm, self.clipped, in_place=True)
        self.optimizer.step()
        self.schedule_step()
        if self.ema:
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - self.ema_decay)

    def schedule_step(self) -> None:
        """The scheduler's step, after keeping ``last_lr``, the rate the step took (logged)."""
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()

    def clip(self, grads: Sequence[Tensor | None], grad_norm: Tensor, clipped: Tensor,
             in_place: bool = False) -> list[Tensor | None]:
        """``grads`` clipped (see the class; as :func:`torch.nn.utils.clip_grad_norm_` does;
        ``in_place`` for the eager step, new tensors for the compiled graph), their norm added
        to ``grad_norm`` and a clipped step to ``clipped``."""
        grads = list(grads)
        if not (self.clip_norm or self.watch_norm):
            return grads
        norm = torch.nn.utils.get_total_norm([g for g in grads if g is not None])
        grad_norm.add_(norm)
        if not self.clip_norm:
            return grads
        clipped.add_(norm + 1e-6 > self.clip_norm)
        coef = (self.clip_norm / (norm + 1e-6)).clamp(max=1.0)
        if in_place:
            torch._foreach_mul_([g for g in grads if g is not None], coef)
            return grads
        return [None if g is None else g * coef for g in grads]

    def after_epoch(self, val_loss: float | None) -> None:
        """The epoch's end: a plateau schedule reads the validation loss."""
        if self.plateau is not None and val_loss is not None:
            self.plateau.step(val_loss)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within: the parameters hold the moving average (filled in place); after: their
        own values again. Without ``ema``: nothing changes."""
        if not self.ema:
            yield
            return
        raw = [p.detach().clone() for p in self.params]
        torch._foreach_copy_([p.detach() for p in self.params], self.ema)
        try:
            yield
        finally:
            torch._foreach_copy_([p.detach() for p in self.params], raw)

    def settle(self, best: dict[str, Tensor] | None, module: nn.Module) -> None:
        """Training is over: ``module`` takes ``best`` (a state) or else the average, and the
        average what it holds (so that nothing moves after)."""
        if best is not None:
            module.load_state_dict(best)
        elif self.ema:
            torch._foreach_copy_([p.detach() for p in self.params], self.ema)
        self.reset_average()

    def reset_average(self) -> None:
        """The average starts from the parameters as they are (after pre-training)."""
        for average, p in zip(self.ema, self.params, strict=False):
            average.copy_(p.detach())

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the update beside the optimizer's state."""
        return {"scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "plateau": None if self.plateau is None else self.plateau.state_dict(),
                "ema": [t.clone() for t in self.ema], "clipped": self.clipped.clone(),
                "grad_norm": self.grad_norm.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("scheduler", "plateau"):
            if getattr(self, name) is not None and state.get(name) is not None:
                getattr(self, name).load_state_dict(state[name])
        for mine, saved in zip(self.ema, state.get("ema") or (), strict=False):
            mine.copy_(saved.detach())
        self.clipped.copy_(state.get("clipped", 0))
        self.grad_norm.copy_(state.get("grad_norm", 0.0))

    def diagnose(self, *args: Tensor) -> str | None:
        """The first site of the objective whose log-density is not finite on ``args``."""
        return next((f for _, m, g in self.terms if (f := nonfinite_site(m, g, *args))), None)


class LatentScale(Messenger):
    """Scale the log-densities of the latent (unobserved) sample sites by ``weight()`` (a
    tensor read at each site: a buffer a schedule fills), in the model and the guide alike:
    the KL terms of every estimator scale as ``poutine.scale`` scales them."""

    def __init__(self, weight: Callable[[], Tensor]) -> None:
        super().__init__()
        self.weight = weight

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.weight() * msg["scale"]


class OutsideScale(Messenger):
    """Scale the log-densities of the sample sites in none of the plates ``plates`` by
    ``scale``, but those marked for enumeration (TraceEnum_ELBO needs them at one scale)."""

    def __init__(self, plates: str | Iterable[str], scale: float) -> None:
        super().__init__()
        self.plates = {plates} if isinstance(plates, str) else set(plates)
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["infer"].get("enumerate") and \
                all(f.name not in self.plates for f in msg["cond_indep_stack"]):
            msg["scale"] = self.scale * msg["scale"]


def batch_share(fn: Callable, plate: Iterable[str], n: int) -> Callable:
    """``fn`` (a model or guide) with its sites outside the plates ``plate`` (global) scaled by
    B / n, B the rows it is given of the n training rows: a batch's loss is then an unbiased
    estimate of B / n times the whole set's negative ELBO, and over an epoch (and the ranks
    of torchrun) the global terms count once, as Pyro's subsampled plate would count them
    (an enumerated one, whose scale TraceEnum_ELBO needs to be its plates', stays whole)."""

    @functools.wraps(fn)
    def scaled(*args: Any, **kwargs: Any) -> Any:
        rows = next((a.shape[0] for a in args if torch.is_tensor(a) and a.dim()), n)
        with OutsideScale(plate, rows / n):
            return fn(*args, **kwargs)

    return scaled


def latent_scaled(fn: Callable, weight: Callable[[], Tensor]) -> Callable:
    """``fn`` (a model or guide) under :class:`LatentScale`, named as ``fn``."""
    return functools.wraps(fn)(LatentScale(weight)(fn))


def hide_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress
