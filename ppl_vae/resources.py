"""Memory estimated before it is spent: a size that cannot fit is refused in one line
(:class:`~ppl_vae.errors.UsageError`, SI units) instead of failing inside an allocation.

* parameters: :func:`model_size` builds the model on the meta device and counts its bytes
  (None where it cannot be built there: no estimate);
* one SVI step or evaluation pass: :func:`allocated_bytes` of a pass at two sample and two
  row counts (:func:`step_cost`), scaled to ``rows x samples``;
* available memory: ``MemAvailable`` (and a cgroup limit) on the CPU, free memory plus the
  allocator's cache on a GPU (:func:`available_bytes`; None where unknown: checks pass).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import Tensor, nn

from .errors import UsageError

TRAINING_COPIES = 7
"""Bytes per parameter byte while training: weights, gradients and Adam's two moments, and
the loop's snapshot for replaying a divergence (weights and both moments); early stopping
keeps one more copy, the best weights."""
MODEL_HINT = "make the model smaller (--hidden, --z-dim, or the sizes its --model-opt set)"
STEP_HINT = "lower --particles or --batch-size"
EVAL_HINT = "lower --eval-iwae/--eval-particles"


# -- units -------------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """``1.6 TB``, ``22 GB``, ``512 kB``: SI units, two or three significant digits."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 999.5 or unit == "PB":
            break
        n /= 1000
    if unit == "B":
        return f"{n:.0f} B"
    return f"{n:.1f} {unit}" if abs(n) < 9.95 else f"{n:.0f} {unit}"


def format_seconds(s: float) -> str:
    """``40 s``, ``12 min``, ``3.5 h``, ``12 days``."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:,.0f} days"


# -- available memory --------------------------------------------------------------------------
def _read_int(path: str) -> int | None:
    with contextlib.suppress(OSError):
        text = Path(path).read_text().strip()
        return int(text) if text.isdigit() else None
    return None


def _cpu_available() -> int | None:
    known = []
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        known += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1: huge = no limit
            known.append(max(0, limit - usage))
    if not known:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            known.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(known) if known else None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``, or None where unknown (then every
    check passes). On a GPU: free device memory plus what torch's allocator holds unused."""
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_available()
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # no driver, a device index out of range
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(free) + max(0, int(cached))
    return None


def refuse_unless_fits(need: float, device: torch.device | str, what: str, hint: str,
                       shown: str | None = None) -> None:
    """:class:`UsageError` ``"<what> need(s) N but M is available on <device>; <hint>"``
    when ``need`` bytes exceed what ``device`` has free (N: ``need``, or the text ``shown``;
    <device>: ``the CPU``, ``the GPU (cuda:0)``: the two whose free memory is known)."""
    have = available_bytes(device)
    if have is not None and need > have:
        device = torch.device(device)
        place = "the CPU" if device.type == "cpu" else f"the GPU ({device})"
        raise UsageError(f"{what} {shown or format_bytes(need)} but {format_bytes(have)} is "
                         f"available on {place}; {hint}")


# -- parameters --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSize:
    """What a model's parameters and buffers take, counted without allocating them."""

    parameters: int
    parameter_bytes: int
    buffer_bytes: int
    largest: tuple[str, tuple[int, ...]] | None = None

    @property
    def bytes(self) -> int:
        return self.parameter_bytes + self.buffer_bytes


@contextlib.contextmanager
def isolated(devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Leave the RNGs (torch, CUDA, Python, NumPy) and Pyro's param store as they were."""
    store = pyro.get_param_store()
    names = set(store.keys())
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    cuda = [d for d in devices if torch.device(d).type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002 (the legacy global state)
        for name in set(store.keys()) - names:
            del store[name]


def size_of(module: nn.Module) -> ModelSize:
    """Parameter count and bytes of ``module`` (meta or real), its largest tensor named."""
    params = dict(module.named_parameters())
    lazy = next((k for k, p in params.items()
                 if isinstance(p, nn.parameter.UninitializedParameter)), None)
    if lazy is not None:
        raise UsageError(f"{type(module).__name__}'s {lazy!r} is a lazy module's uninitialized "
                         "parameter (nn.LazyLinear and the like); give its size in __init__, "
                         "or initialize it there with a forward on a dummy batch")
    count = sum(p.numel() for p in params.values())
    p_bytes = sum(p.numel() * p.element_size() for p in params.values())
    b_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    largest = max(params.items(), key=lambda kv: kv[1].numel(), default=None)
    return ModelSize(count, p_bytes, b_bytes,
                     None if largest is None else (largest[0], tuple(largest[1].shape)))


def model_size(build: Callable[[], nn.Module]) -> ModelSize | None:
    """:func:`size_of` ``build()`` built on the meta device (RNGs and param store left as they
    were); None when it cannot be built there (a :class:`UsageError` propagates)."""
    with isolated():
        try:
            with torch.device("meta"):
                module = build()
        except UsageError:
            raise
        except Exception:  # the constructor reads values (.item(), numpy) or needs a device
            return None
    return size_of(module) if isinstance(module, nn.Module) else None


def check_model_fits(build: Callable[[], nn.Module], device: torch.device | str = "cpu", *,
                     training: bool = True, early_stop: bool = False) -> ModelSize | None:
    """Refuse, before allocating, a model that cannot fit: one copy on the CPU, and on
    ``device`` the weights (``training``: :data:`TRAINING_COPIES`, one more with
    ``early_stop``). Returns the size, or None if not buildable on meta (nothing checked)."""
    size = model_size(build)
    if size is None:
        return None
    device = torch.device(device)
    need = (size.parameter_bytes * (TRAINING_COPIES + early_stop) + size.buffer_bytes
            if training else size.bytes)
    largest = ""
    if size.largest is not None:
        name, shape = size.largest
        largest = f" (the largest, {name}, is {' x '.join(map(str, shape)) or 'a scalar'})"
    what = f"the model's {size.parameters:,} parameters{largest} need"
    checks = [(torch.device("cpu"), size.bytes, format_bytes(size.bytes))] \
        if device.type != "cpu" else []
    checks.append((device, need, f"{format_bytes(need)} to train (the weights' "
                                 f"{format_bytes(size.bytes)}, their gradients, Adam's moments "
                                 "and the loop's copies)" if training else
                   format_bytes(size.bytes)))
    for place, n, amount in checks:
        refuse_unless_fits(n, place, what, MODEL_HINT, amount)
    return size


@contextlib.contextmanager
def allocation_guard(what: str, hint: str = MODEL_HINT) -> Iterator[None]:
    """Turn an allocation failure inside the block (torch's out-of-memory, ``MemoryError``)
    into one :class:`UsageError` line: the fallback where no estimate was possible."""
    try:
        yield
    except MemoryError:
        raise UsageError(f"{what} ran out of memory; {hint}") from None
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        text = str(e)
        if not (isinstance(e, getattr(torch, "OutOfMemoryError", ())) or
                "can't allocate memory" in text or "out of memory" in text.lower()):
            raise
        tried = text.split("you tried to allocate ", 1)[-1].split(" bytes", 1)[0]
        size = f" (it asked for {format_bytes(int(tried))})" if tried.isdigit() else ""
        raise UsageError(f"{what} ran out of memory{size}; {hint}") from None


# -- activations -------------------------------------------------------------------------------
def allocated_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Bytes of every new tensor the operations of ``fn(*args)`` return (views and in-place
    results not counted): what the call allocates if nothing were freed, an upper bound of
    its peak -- and, with gradients on, of what autograd keeps for the backward pass."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    total = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal total
            out = func(*args, **(kwargs or {}))
            inputs = set()
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    with contextlib.suppress(Exception):
                        inputs.add(t.untyped_storage().data_ptr())
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    with contextlib.suppress(Exception):
                        if t.untyped_storage().data_ptr() not in inputs:
                            total += t.untyped_storage().nbytes()
            return out

    with Count():
        fn(*args)
    return total


@dataclass(frozen=True)
class Cost:
    """Bytes a computation takes per row and sample (``per_draw``) and per row alone
    (``per_row``: what does not grow with the sample count, an encoder's activations)."""

    per_draw: float
    per_row: float

    def bytes(self, rows: int, samples: int = 1) -> float:
        return self.per_draw * rows * samples + self.per_row * rows


def step_cost(step_for: Callable[[int], Callable[..., Any]], args: Sequence[Any],
              device: torch.device | str = "cpu") -> Cost | None:
    """Bytes one SVI step keeps for backward per row x particle and per row: the
    :func:`allocated_bytes` of forwards ``step_for(k)(*args)`` at (rows, k = 2), (rows, 4) and
    (2 rows, 2) fitted to bytes = per_draw * rows * k + per_row * rows + const (RNGs kept);
    None if that fails."""
    with isolated([torch.device(device)]):
        try:
            args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)  # own storage
            rows = [a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() >= 1]
            r = rows[0] if rows and rows[0] else 1
            doubled = tuple(torch.cat([a, a]) if isinstance(a, Tensor) and a.dim() >= 1
                            and a.shape[0] == r else a for a in args)
            m1, m2, m3 = (allocated_bytes(step_for(k), *a)
                          for a, k in ((args, 2), (args, 4), (doubled, 2)))
        except UsageError:
            raise
        except Exception:
            return None
    per_draw = max(0.0, (m2 - m1) / (r * 2))
    return Cost(per_draw, max(0.0, (m3 - m1) / r - per_draw * 2))


def check_step_fits(step_for: Callable[[int], Callable[..., Any]], args: Sequence[Any],
                    rows: int, particles: int, device: torch.device | str = "cpu", *,
                    hint: str = STEP_HINT) -> Cost | None:
    """Refuse an SVI step of ``rows`` x ``particles`` whose autograd graph cannot fit on
    ``device`` (:func:`step_cost`); returns the cost, or None if it could not be measured."""
    cost = step_cost(step_for, args, device)
    if cost is not None:
        refuse_unless_fits(cost.bytes(rows, particles), device,
                           f"one SVI step of {rows:,} rows x {particles:,} particles needs "
                           "about", hint)
    return cost


# -- evaluation --------------------------------------------------------------------------------
def chunk_budget(device: torch.device | str) -> float:
    """Bytes one evaluation chunk may take: half of ``device``'s free memory (inf: unknown)."""
    have = available_bytes(device)
    return math.inf if have is None else have / 2
