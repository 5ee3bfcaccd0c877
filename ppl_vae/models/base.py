"""The model contract: what the trainer, evaluation, comparison and CLI may ask of a model.

A model is any ``nn.Module`` with Pyro ``model(*args)`` and ``guide(*args)`` methods, a
:class:`Model` subclass or not. Code outside ``ppl_vae.models`` calls its optional hooks
through :func:`hook`: its own method, else the default here (docs/howto/own-model.md's table
says when to override each). Six hooks: ``from_options(options, data)``: the constructor, with
``input_dim``, ``image_shape`` and ``num_classes`` from the data; ``data_args(x, y)`` ->
``(pixels(x),)`` (``x`` (N, D) rows, uint8 for 8-bit sources; ``y`` (N,) labels or None, -1
hidden by ``--labelled``); ``programs()`` -> ``[(1.0, model, guide)]``; ``pretrain(ctx)``:
nothing; ``on_epoch(ctx, epoch)``: after ``epoch`` epochs (0: before the first; again for the
epoch a resumed run re-enters), sets what the next epoch's steps read (a schedule, a
function of ``epoch``) and returns numbers for that epoch's row of ``metrics.csv``; default
nothing; ``report(ctx)``: no numbers, and latent means, reconstructions and samples
(``encode``/``reconstruct``/``sample`` where defined). Three declared attributes: ``Options``
(the family's options dataclass), ``recipe`` (run options taken where the user gives none:
``elbo``, ``epochs``, ``lr``, ``early_stop``) and ``estimators`` (``{name: ("refuse", why)}``
or ``{name: ("note", text)}``: an ``--elbo`` the family cannot train with, or a note the run
prints).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import PACKAGE, PluginError, UsageError, explain, from_our_code
from .options import build_by_signature


@dataclass
class RunContext:
    """What a hook sees of a run: its settings, the model's options, data and directory.
    ``fit(loss, part, name, desc, inputs)`` trains ``part`` on ``loss(*data_args)`` (or on
    ``loss(*inputs(x, y))``: M1 of M1+M2 on the pixels) with the run's settings and returns
    one row per epoch; ``score`` is :func:`ppl_vae.inference.importance.score` (with Pyro's
    validation as the run has it); ``log(text)`` adds a line to the run's report; ``summary``
    holds the run's test evaluation when ``report`` is called; ``figures``: whether
    ``report`` draws (not under ``evaluate``)."""

    config: Any
    options: Any
    data: Any
    out: Path
    fit: Callable[..., list[dict]] | None = None
    score: Callable[..., Any] | None = None
    progress: bool | None = None
    notes: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    figures: bool = True

    def log(self, text: str) -> None:
        self.notes.append(text)


Program = tuple[float, Callable, Callable]
"""(weight, model, guide): one term of the training objective."""


class Model(nn.Module):
    """Base class with every hook at its default (subclassing it is optional)."""

    Options: ClassVar[type | None] = None
    recipe: ClassVar[dict[str, Any]] = {}
    estimators: ClassVar[dict[str, tuple[str, str]]] = {}

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

    def on_epoch(self, ctx: RunContext, epoch: int) -> dict:
        return {}

    def report(self, ctx: RunContext) -> dict:
        from .figures import default_figures

        default_figures(self, ctx, hook(self, "data_args"), self.guide)
        return {}


HOOKS = ("from_options", "data_args", "programs", "pretrain", "on_epoch", "report")


def hook(obj: Any, name: str) -> Callable:
    """``obj``'s hook ``name`` (a class for ``from_options``, else a module): its own method
    where it defines one, else :class:`Model`'s default bound to it."""
    if name not in HOOKS:
        raise AttributeError(f"{name!r} is not a hook of the model contract")
    owner = obj if isinstance(obj, type) else type(obj)
    own = getattr(obj, name, None)
    if callable(own):
        return own if _ours(own) else _explained(own, f"{owner.__name__}.{name}")
    return Model.__dict__[name].__get__(obj, owner)  # (from_options binds the class)


def _ours(fn: Callable) -> bool:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code is None or code.co_filename.startswith(PACKAGE)


def _explained(fn: Callable, name: str) -> Callable:
    """A user's hook ``name`` (``Owner.hook``) whose own exception becomes a :class:`PluginError`:
    the call and the user's frames (what the package raised below it passes unchanged)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, UsageError) or from_our_code(e):
                raise
            raise PluginError(explain(e, name, args)) from None

    return call
