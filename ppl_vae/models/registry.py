"""``--model NAME`` -> a model class. Register your own with :func:`register_model`, or
name it by import path: ``--model my_module:MyModel``.

A model class is an ``nn.Module`` with Pyro ``model(...)`` and ``guide(...)`` methods. It is
built by a classmethod ``from_config(config, data)`` from a
:class:`~ppl_vae.config.TrainConfig` and a :class:`~ppl_vae.data.Dataset` when it has one,
else as ``cls(data.input_dim, z_dim=config.z_dim, hidden=config.hidden)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from ..errors import UsageError

T = TypeVar("T", bound=type)
MODELS: dict[str, type] = {}


def _check(cls: type, name: str) -> type:
    missing = [m for m in ("model", "guide") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        what = f"lacks {' and '.join(missing)}" if isinstance(cls, type) else "is not a class"
        raise UsageError(f"--model {name!r} {what}; a model class needs Pyro model() and "
                         "guide() methods")
    return cls


def register_model(name: str, cls: T | None = None) -> Callable[[T], T] | T:
    """Make ``--model name`` build ``cls``: as a decorator, ``@register_model("my-vae")``,
    or a call, ``register_model("my-vae", MyVAE)``."""

    def add(cls: T) -> T:
        try:
            MODELS[name] = _check(cls, name)
        except UsageError as e:
            raise TypeError(str(e)) from None
        return cls

    return add if cls is None else add(cls)


def get_model(name: str) -> type:
    """The class registered as ``name``, or imported from ``module:Class``;
    :class:`UsageError` with the choices or the import failure otherwise."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or an error while importing the user's module
            raise UsageError(f"--model {name!r}: cannot import {module_name!r} "
                             f"({type(e).__name__}: {e}); is it on the Python path?") from None
        if not hasattr(module, attr):
            raise UsageError(f"--model {name!r}: module {module_name!r} has no {attr!r}")
        return _check(getattr(module, attr), name)
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(
            f"unknown --model {name!r}; registered models: {', '.join(sorted(MODELS))}, "
            "or give module:Class"
        ) from None
