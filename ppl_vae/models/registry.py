"""``--model NAME`` -> a model class (an ``nn.Module`` with Pyro ``model`` and ``guide``
methods, :mod:`ppl_vae.models.base`). Register your own with :func:`register_model`, name it
by import path (``--model my_module:MyModel``), or pass the class (``TrainConfig(model=MyModel)``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import TypeVar

from ..errors import UsageError

T = TypeVar("T", bound=type)
MODELS: dict[str, type] = {}


def _check(cls: object, name: str) -> type:
    if not isinstance(cls, type):
        raise UsageError(f"--model {name!r} is not a class; a model class needs Pyro model() "
                         "and guide() methods")
    from torch import nn

    from .base import Model  # the contract's placeholders raise NotImplementedError

    # (an nn.Module may assign them in __init__, e.g. ``self.guide = AutoNormal(self.model)``:
    # its instance is checked when built, by check_programs)
    missing = [m for m in ("model", "guide") if getattr(cls, m, None) is getattr(Model, m)
               or not (callable(getattr(cls, m, None)) or issubclass(cls, nn.Module))]
    if missing:
        raise UsageError(f"--model {name!r} lacks {' and '.join(missing)}; a model class needs "
                         "Pyro model() and guide() methods")
    return cls


def check_programs(module: object, name: str) -> None:
    """Refuse a built model without callable ``model`` and ``guide`` (one line)."""
    missing = [m for m in ("model", "guide") if not callable(getattr(module, m, None))]
    if missing:
        raise UsageError(f"--model {name!r} built a {type(module).__name__} without "
                         f"{' and '.join(missing)}; give it Pyro model() and guide() methods, "
                         "or assign them in __init__")


def register_model(name: str | type, cls: T | None = None) -> Callable[[T], T] | T:
    """Make ``--model name`` build ``cls``: as a decorator, ``@register_model("my-vae")``;
    a call, ``register_model("my-vae", MyVAE)``; or ``register_model(MyVAE)``, which
    registers it under its class name in lower case."""
    if isinstance(name, type):
        name, cls = name.__name__.lower(), name

    def add(cls: T) -> T:
        if not isinstance(name, str) or not name or ":" in name:
            raise TypeError(f"register_model takes a name without ':' (which --model reads as "
                            f"module:Class), got {name!r}")
        shipped = MODELS.get(name)
        if shipped is not None and shipped is not cls and \
                shipped.__module__.startswith(f"{__package__}."):
            raise TypeError(f"{name!r} is a shipped family ({shipped.__name__}); register "
                            f"{getattr(cls, '__name__', cls)!r} under another name")
        try:
            MODELS[name] = _check(cls, name)
        except UsageError as e:
            raise TypeError(str(e)) from None
        return cls

    return add if cls is None else add(cls)


def get_model(model: str | type) -> type:
    """The class itself, the class registered as ``model``, or imported from
    ``module:Class``; :class:`UsageError` with the choices or the import failure otherwise."""
    if isinstance(model, type):
        return _check(model, model.__name__)
    if not isinstance(model, str):
        raise UsageError(f"--model must be a registered name, module:Class or a class, got "
                         f"{type(model).__name__}")
    if ":" in model:
        module_name, _, attr = model.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or an error while importing the user's module
            raise UsageError(f"--model {model!r}: cannot import {module_name!r} "
                             f"({type(e).__name__}: {e}); is it on the Python path?") from None
        try:
            target = functools.reduce(getattr, attr.split("."), module)
        except AttributeError:
            raise UsageError(f"--model {model!r}: module {module_name!r} has no {attr!r}") from None
        return _check(target, model)
    if model not in MODELS:
        raise UsageError(f"unknown --model {model!r}; registered models: "
                         f"{', '.join(sorted(MODELS))}, or give module:Class")
    return MODELS[model]


def model_name(cls: type) -> str:
    """How ``config.json`` names ``cls``: its registered name, else ``module:Class``."""
    names = (name for name, registered in MODELS.items() if registered is cls)
    return next(names, f"{cls.__module__}:{cls.__qualname__}")
