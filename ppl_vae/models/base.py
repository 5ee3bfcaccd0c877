"""The model contract: what the trainer, evaluation, comparison and CLI may ask of a model.

A model is any ``nn.Module`` with Pyro ``model(*args)`` and ``guide(*args)`` methods, a
:class:`Model` subclass or not. Code outside ``ppl_vae.models`` calls its optional hooks
through :func:`hook`: its own method, else the default here (the README's table says when to
override each). Defaults: ``data_args(x, y)`` -> ``(pixels(x),)`` (``x`` (N, D) rows, uint8
for 8-bit sources; ``y`` (N,) labels or None, -1 hidden by ``--labelled``); ``programs()``
-> ``[(1.0, model, guide)]``; ``pretrain(ctx)``: nothing; ``start_epoch(ctx, epoch)``:
nothing (a schedule sets what the epoch's steps read, as a function of the 1-based epoch);
``epoch_metrics(ctx)``: no numbers for an epoch's row of ``metrics.csv``; ``report(ctx)``:
no numbers, and latent means, reconstructions and samples (``encode``/``reconstruct``/
``sample`` where defined); ``from_options(options, data)``: the constructor, with ``input_dim``,
``image_shape`` and ``num_classes`` from the data. ``elbo_refused`` / ``elbo_notes`` map an
``--elbo`` name to why the family cannot train with it / a note the run prints;
``default_elbo``, ``default_epochs``, ``default_lr`` and ``default_early_stop`` are the family's
recipe: what a run takes without ``--elbo``, ``--epochs``, ``--lr`` and ``--early-stop``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import PACKAGE, PluginError, UsageError, explain, from_our_code
from .context import RunContext
from .options import build_by_signature

Program = tuple[float, Callable, Callable]
"""(weight, model, guide): one term of the training objective."""


class Model(nn.Module):
    """Base class with every hook at its default (subclassing it is optional)."""

    Options: ClassVar[type | None] = None
    elbo_refused: ClassVar[dict[str, str]] = {}
    elbo_notes: ClassVar[dict[str, str]] = {}
    default_elbo: ClassVar[str] = "mc"
    default_epochs: ClassVar[int] = 10
    default_lr: ClassVar[float] = 1e-3
    default_early_stop: ClassVar[int] = 0

    def model(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def guide(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def from_options(cls, options: Any, data: Any) -> Model:
        return build_by_signature(cls, options, data)

    def data_args(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
        from ..data import pixels

        return (pixels(x),)

    def programs(self) -> list[Program]:
        return [(1.0, self.model, self.guide)]

    def pretrain(self, ctx: RunContext) -> None:
        return None

    def start_epoch(self, ctx: RunContext, epoch: int) -> None:
        return None

    def epoch_metrics(self, ctx: RunContext) -> dict:
        return {}

    def report(self, ctx: RunContext) -> dict:
        from .figures import default_figures

        default_figures(self, ctx, hook(self, "data_args"), self.guide)
        return {}


HOOKS = ("from_options", "data_args", "programs", "pretrain", "start_epoch", "epoch_metrics",
         "report")


def hook(obj: Any, name: str) -> Callable:
    """``obj``'s hook ``name`` (a class for ``from_options``, else a module): its own method
    where it defines one, else :class:`Model`'s default bound to it."""
    if name not in HOOKS:
        raise AttributeError(f"{name!r} is not a hook of the model contract")
    own = getattr(obj, name, None)
    if callable(own):
        return own if _ours(own) else _explained(own, obj, name)
    default = Model.__dict__[name]
    if isinstance(default, classmethod):
        cls = obj if isinstance(obj, type) else type(obj)
        return default.__func__.__get__(cls)
    return default.__get__(obj)


def _ours(fn: Callable) -> bool:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code is None or code.co_filename.startswith(PACKAGE)


def _explained(fn: Callable, obj: Any, name: str) -> Callable:
    """A user's hook whose own exception becomes a :class:`PluginError`: the call and the
    user's frames, not a traceback (what the package raised below it passes unchanged)."""
    owner = obj.__name__ if isinstance(obj, type) else type(obj).__name__

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, UsageError) or from_our_code(e):
                raise
            raise PluginError(explain(e, f"{owner}.{name}", args)) from None

    return call
