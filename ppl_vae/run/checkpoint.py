"""Checkpoints: model, optimizer and the loop's state (every rank's RNG) in one file, written
atomically and loadable with ``torch.load(..., weights_only=True)`` (tensors, numbers,
strings and containers only). The model state is ``module.state_dict()``, plus the values of
Pyro's param store that are not the module's own parameters (``pyro.param`` sites a program
makes itself), constrained (:func:`restore_params`) and not (:func:`load_store_values`)."""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import pyro
import torch

from ..errors import UsageError, first_line
from ..files import save_torch


def save_checkpoint(path: str | os.PathLike, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, epoch: int,
                    config: dict[str, Any], loop: dict[str, Any] | None = None,
                    history: list[dict] | None = None, data: dict | None = None,
                    **extra: Any) -> None:
    """Write the checkpoint; ``loop`` (:meth:`~ppl_vae.run.loop.Loop.state_dict`) and ``history``
    (the rows of ``metrics.csv``) make it resumable, ``extra`` too (``fits`` while a part is
    pre-trained, :meth:`~ppl_vae.run.session.Session.fit`; ``update``, the step's schedule and
    average; ``raw``, the trained weights where ``model`` holds their average), ``data`` (the data's
    :meth:`~ppl_vae.data.Dataset.signature`) loadable without the dataset."""
    store, values = pyro.get_param_store(), store_values(module)
    state = {
        "model": module.state_dict(),
        "param_store": {name: store[name].detach().clone() for name in values},  # constrained
        "store_values": values,
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "epoch": epoch,
        "config": config,
        "loop": loop,
        "history": history,
        "data": data,
        **extra,
    }
    save_torch(path, state)


def store_values(module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Copies of the unconstrained tensors in Pyro's param store (those that are not
    ``module``'s parameters), for :func:`load_store_values`."""
    own = set() if module is None else {id(p) for p in module.parameters()}
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()
            if id(p) not in own}


@torch.no_grad()
def load_store_values(values: dict[str, torch.Tensor]) -> None:
    """Copy :func:`store_values` back *into* the live tensors (the ones optimizers hold)."""
    live = dict(pyro.get_param_store().named_parameters())
    for name, value in values.items():
        if name in live:
            live[name].copy_(value)


def restore_params(state: dict[str, Any]) -> None:
    """Put saved ``pyro.param`` values back into Pyro's param store (after the program has
    created them, so that their constraints are known)."""
    store = pyro.get_param_store()
    for name, value in state.get("param_store", {}).items():
        store[name] = value  # through the constraint the program registered it with


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """The saved dict; :class:`UsageError` if the file is missing or not a checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path!r}; give the --run directory of a training run")
    try:  # read once; torch's reader skips the zip's CRC-32s: a flipped byte would load as
        with open(path, "rb") as f:  # bad weights, so the archive is tested first
            data = io.BytesIO(f.read())
        broken = zipfile.ZipFile(data).testzip()
        if broken is None:
            data.seek(0)
            state = torch.load(data, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UsageError(f"{path!r} is not a readable ppl_vae checkpoint ({type(e).__name__}); "
                         "retrain or point to another run") from None
    if broken is not None:
        raise UsageError(f"{path!r} is corrupt: its record {broken!r} fails its CRC-32 check; "
                         "restore the file from a backup or retrain (nothing was changed)")
    if not isinstance(state, dict) or "model" not in state:
        raise UsageError(f"{path!r} is not a ppl_vae checkpoint (no 'model' state)")
    return state


@contextlib.contextmanager
def restoring(path: str | os.PathLike) -> Iterator[None]:
    """Continuing from the checkpoint in ``path``: a state it holds that the run cannot take
    (a file forged or from elsewhere: a bad type, count or shape) is one :class:`UsageError`."""
    try:
        yield
    except (UsageError, torch.OutOfMemoryError):  # (memory: the device's, not the file's)
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise UsageError(f"the checkpoint in {os.fspath(path)!r} does not fit this run "
                         f"({type(e).__name__}: {first_line(e)}); was it replaced? restore it, "
                         "or start a new run") from None
