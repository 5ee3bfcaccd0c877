"""A model family's options: its own dataclass, or its constructor's keywords.

A class that sets ``Options`` (a dataclass) has exactly those options, validated in its
``__post_init__``. Any other class has its constructor's keywords: the data-derived ones
(:data:`DATA_OPTIONS`) filled from the dataset, the others at the class's defaults unless set
(a flag such as ``--z-dim 8``, ``--model-opt key=value``, or ``model_options={...}``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from collections.abc import Mapping
from dataclasses import field
from typing import Any

import torch

from ..config import check_fields, coerce, field_default, flag, options_dict
from ..errors import UsageError, first_line

DATA_OPTIONS = ("input_dim", "image_shape", "num_classes")
"""Constructor keywords filled from the :class:`~ppl_vae.data.Dataset`'s attributes of these
names, never options."""


def declared(cls: type) -> type | None:
    """The family's own ``Options`` dataclass, or None (its constructor is the option group)."""
    opts = getattr(cls, "Options", None)
    return opts if isinstance(opts, type) and dataclasses.is_dataclass(opts) else None


@functools.cache
def options_class(cls: type) -> type:
    """The options of ``cls`` as a dataclass: its ``Options`` with the keywords a subclass's
    constructor adds (e.g. ``components=10``) as further fields, else one field per
    constructor keyword but :data:`DATA_OPTIONS` (metadata ``required`` where it has no
    default; None stands in)."""
    opts, known, fields = declared(cls), set(DATA_OPTIONS), []
    if opts:  # (what its owner's constructor takes is in the Options)
        owner = next(c for c in cls.__mro__ if c.__dict__.get("Options") is opts)
        known |= {p.name for p in _parameters(owner)} | {f.name for f in dataclasses.fields(opts)}
    for p in _parameters(cls):
        need = p.default is p.empty
        if p.name in known or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or \
                opts and (need or p.kind is p.POSITIONAL_ONLY):
            continue
        meta = {"help": f"{cls.__name__}({p.name}=...)", **({"required": True} if need else {})}
        fields.append((p.name, Any, field(default_factory=lambda v=None if need else p.default: v,
                                          metadata=meta)))
    if opts and not fields:
        return opts
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields, bases=(opts,) if opts
                                      else ())


def with_changes(options_cls: type, options: Any, changes: Mapping[str, Any]) -> Any:
    """``options`` (None: ``options_cls()``) with ``changes`` set and checked again: how a
    family's constructor takes its options whole, ``VAE(784, opts)``, or by keyword,
    ``VAE(784, z_dim=8)``."""
    options = options_cls() if options is None else options
    if not isinstance(options, options_cls):
        raise TypeError(f"the options argument takes a {options_cls.__name__}, got "
                        f"{options!r}; give single options by keyword (z_dim=8)")
    return dataclasses.replace(options, **changes) if changes else options


def make_options(cls: type, given: Any = None, keys: str | None = None) -> Any:
    """Options for ``cls`` from a dict, its ``Options``, or None (defaults): an ``Options``
    instance, or for a class without one a dict of the keywords set; :class:`UsageError`
    names a bad one as a flag (or as ``keys + name``, a key of a file)."""
    opts, own = options_class(cls), declared(cls)
    if own and isinstance(given, opts):
        return given
    if dataclasses.is_dataclass(given) and not isinstance(given, type):
        given = dataclasses.asdict(given)
    if not isinstance(given, Mapping | None):
        raise UsageError(f"model options for {cls.__name__} must be a dict or "
                         f"{cls.__name__}.Options, got {type(given).__name__}")
    given = dict(given or {})
    defaults = {f.name: field_default(f) for f in dataclasses.fields(opts)}
    takes_any = not own and any(p.kind is p.VAR_KEYWORD for p in _parameters(cls))
    unknown = sorted(set(given) - set(defaults)) if not takes_any else []
    if unknown:
        raise UsageError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; its "
                         f"options are {', '.join(sorted(defaults)) or 'none'}")
    given = {k: coerce(v, defaults[k], flag(k, keys)) if defaults.get(k) is not None else v
             for k, v in given.items()}
    if own and keys is not None:
        check_keys(cls, given, keys)
    return opts(**given) if own else given


def check_keys(cls: type, given: Mapping, keys: str) -> None:
    """Check the values of ``cls``'s own ``Options`` in ``given`` as ``__post_init__`` does,
    naming a bad one by its key ``keys + name`` in a file (not as a flag)."""
    opts = declared(cls)
    if opts is not None:
        draft = object.__new__(opts)
        fields = dataclasses.fields(opts)
        draft.__dict__.update({f.name: field_default(f) for f in fields})
        draft.__dict__.update({k: v for k, v in given.items() if k in draft.__dict__})
        check_fields(draft, keys)


def build_by_signature(cls: type, options: Any, data: Any, **known: Any) -> Any:
    """``cls(**kwargs)`` from its signature: the ``known`` values, data-derived keywords from
    ``data``, and the options -- whole as ``options=`` where the constructor takes them so,
    else by name -- with the class's own defaults for the rest."""
    params = _parameters(cls)
    whole = (dataclasses.is_dataclass(options) and not isinstance(options, type)
             and any(p.name == "options" for p in params))
    values = options_dict(options)
    kwargs: dict[str, Any] = {"options": options} if whole else {}
    missing = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in kwargs:
            continue
        if p.name in known:
            kwargs[p.name] = known[p.name]
        elif p.name in values:
            kwargs[p.name] = getattr(options, p.name) if whole else values[p.name]
        elif p.name in DATA_OPTIONS and getattr(data, p.name) is not None:
            kwargs[p.name] = getattr(data, p.name)
        elif p.default is inspect.Parameter.empty:
            missing.append(p.name)
    if not whole and any(p.kind is p.VAR_KEYWORD for p in params):
        kwargs.update({k: v for k, v in values.items() if k not in kwargs})
    if missing:
        raise UsageError(f"{cls.__name__} needs {', '.join(missing)}: give "
                         + ", ".join(f"--model-opt {m}=VALUE" for m in missing))
    try:
        return cls(**kwargs)
    except Exception as e:  # the user's constructor refused these values
        if torch.get_default_device().type == "meta":
            raise  # a trial build without storage (resources.model_size): not the user's
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UsageError(f"cannot build {cls.__name__}({shown}): {type(e).__name__}: "
                         f"{first_line(e, 10**6)}") from None


def parse_model_opts(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` from ``--model-opt`` as a dict; values are Python literals
    (``10``, ``0.5``, ``(400, 200)``, ``True``) or else strings."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-opt takes KEY=VALUE (e.g. components=10), got {item!r}")
        try:
            out[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key] = raw.strip()
    return out


def _parameters(cls: type) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return []
