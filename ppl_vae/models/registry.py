"""``--model NAME`` -> a model class. Register your own with :func:`register_model`.

A registered class is an ``nn.Module`` with Pyro ``model(x)`` and ``guide(x)`` methods and a
classmethod ``from_config(config, data)`` that builds it from a
:class:`~ppl_vae.config.TrainConfig` and a :class:`~ppl_vae.data.Dataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..errors import UsageError

T = TypeVar("T", bound=type)
MODELS: dict[str, type] = {}


def register_model(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_model("my-vae")`` makes ``--model my-vae`` build it."""

    def add(cls: T) -> T:
        missing = [m for m in ("model", "guide", "from_config") if not hasattr(cls, m)]
        if missing:
            raise TypeError(f"{cls.__name__} cannot be a model: it lacks {', '.join(missing)}")
        MODELS[name] = cls
        return cls

    return add


def get_model(name: str) -> type:
    """The class registered as ``name``; :class:`UsageError` listing the choices otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(
            f"unknown --model {name!r}; registered models: {', '.join(sorted(MODELS))}"
        ) from None
