"""The model contract: every hook the trainer, evaluation, comparison and CLI call, with its
default.

``data_args(x, y)`` receives a whole split (or some of its rows): ``x`` of shape (N, D),
images flattened in C, H, W order (``data.image_shape``), float -- or uint8 levels 0..255
for 8-bit sources, which the default converts; a model that converts them itself, per
batch inside ``model``/``guide`` (:func:`ppl_vae.data.pixels`), keeps the split 8-bit on
the device -- and labels ``y`` of shape (N,) or None, -1 where ``--labelled`` hid a label.

A model is any ``nn.Module`` with Pyro ``model(*args)`` and ``guide(*args)`` methods. It may
subclass :class:`Model` or not; the code outside ``ppl_vae.models`` calls it only through
:func:`hook`, which returns the model's own method where it defines one and the default below
otherwise.

=====================  =========================================  ==============================
hook                   default                                    override when
=====================  =========================================  ==============================
``Options``            the constructor's keywords                 the family has options to
                                                                  validate and document
``from_options``       ``cls(**keywords)`` matched to the         building needs the data or a
(classmethod)          signature (``input_dim`` etc. from data)   computed argument
``data_args(x, y)``    ``(pixels(x),)``: 8-bit rows as float      model/guide take other inputs
                       x / 255, others as they are                (a condition, labels), or
                                                                  convert 8-bit rows per batch
``programs()``         ``[(1.0, model, guide)]``                  the objective is a weighted
                                                                  sum of several ELBOs
``proposal()``         ``guide``                                  importance sampling should
                                                                  use another guide
``pretrain(ctx)``      nothing                                    a part is fit before SVI
``metrics(ctx)``       ``{}``                                     the summary needs more numbers
``figures(ctx)``       ELBO curves; ``encode``/``reconstruct``/   the family has its own figures
                       ``sample`` when defined, else latent
                       means, reconstructions and prior
                       predictive samples from the program
``parameter_groups()`` the top-level child modules                gradients should be grouped
                                                                  otherwise in ``compare``
=====================  =========================================  ==============================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from .context import RunContext
from .options import build_by_signature, options_dict

Program = tuple[float, Callable, Callable]
"""(weight, model, guide): one term of the training objective."""


class Model(nn.Module):
    """Base class with every hook at its default (subclassing it is optional)."""

    Options: ClassVar[type | None] = None

    def model(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def guide(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def from_options(cls, options: Any, data: Any) -> Model:
        return build_by_signature(cls, options_dict(options), data)

    def data_args(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
        from ..data import pixels

        return (pixels(x),)

    def programs(self) -> list[Program]:
        return [(1.0, self.model, self.guide)]

    def proposal(self) -> Callable:
        return self.guide

    def pretrain(self, ctx: RunContext) -> None:
        return None

    def metrics(self, ctx: RunContext) -> dict:
        return {}

    def figures(self, ctx: RunContext) -> None:
        from .figures import default_figures

        default_figures(self, ctx, hook(self, "data_args"), hook(self, "proposal")())

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {name: list(child.parameters()) for name, child in self.named_children()}
        own = list(self.parameters(recurse=False))
        return {k: v for k, v in {**groups, "(module)": own}.items() if v}


HOOKS = ("from_options", "data_args", "programs", "proposal", "pretrain", "metrics", "figures",
         "parameter_groups")


def hook(obj: Any, name: str) -> Callable:
    """``obj``'s hook ``name`` (a class for the classmethods, else a module): its own method
    where it defines one, else :class:`Model`'s default bound to it."""
    if name not in HOOKS:
        raise AttributeError(f"{name!r} is not a hook of the model contract")
    own = getattr(obj, name, None)
    if callable(own):
        return own
    default = Model.__dict__[name]
    if isinstance(default, classmethod):
        cls = obj if isinstance(obj, type) else type(obj)
        return default.__func__.__get__(cls)
    return default.__get__(obj)
