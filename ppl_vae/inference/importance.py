"""Per-image test ELBO and the importance-weighted log-likelihood estimate, from Pyro traces.

For data point x and K draws z_k ~ q(z|x) (one vectorized pass: a ``pyro.plate`` of size K
left of the data plate), the log importance weights are::

    log w_k = log p(x, z_k) - log q(z_k|x)

and from them, per data point::

    ELBO(x)    ~ 1/K sum_k log w_k                      (unbiased for the ELBO)
    IWAE_K(x)  = log 1/K sum_k w_k   <= log p(x)        (Burda et al. 2016; E[IWAE_K]
                                                         rises to log p(x) as K grows)

The model is scored as a density: ``poutine.scale`` factors (a beta-VAE's beta) are left
out, masks kept. A latent the guide does not sample is drawn from its prior (it cancels).

Any program works, in chunks of rows and samples. *Global* latents theta (outside the data
plate) are drawn once per sample and shared by every row: with N points the ELBO per point
is ``E[sum_local] + E[log p(theta) - log q(theta)] / N`` and the IWAE bound the joint
``log 1/K sum_k p(X, Z_k, theta_k) / q(Z_k, theta_k|X)``, divided by N.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from tqdm import tqdm

from ..errors import UsageError
from ..resources import (
    EVAL_HINT,
    MODEL_HINT,
    chunk_budget,
    format_seconds,
    refuse_unless_fits,
    step_cost,
)
from .program import ProgramInfo, inspect_program, plate_frames

MAX_ELEMENTS = 2**24  # bound on K x rows x D floats held at once (hidden layers come on top)


def _float_dtype(t: Tensor) -> torch.dtype:
    """The dtype log weights of data ``t`` are summed in: its own if floating, else torch's."""
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _reduce(lp: Tensor, nesting: int, vectorized: bool, data_dim: int | None) -> Tensor:
    """Sum a site's log-density over every plate but the samples and data dims: (K|1, R|1)."""
    lp = torch.as_tensor(lp)
    if not vectorized:
        lp = lp.unsqueeze(0)  # a samples dim of 1
    full = nesting + 1
    if lp.dim() > full:
        raise ValueError(f"a log-density of shape {tuple(lp.shape)} has more dims than the "
                         f"{nesting} plates of the program")
    lp = lp.reshape((1,) * (full - lp.dim()) + lp.shape)
    keep = {0} | ({full + data_dim} if data_dim is not None else set())
    other = [d for d in range(full) if d not in keep]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[0], -1)


def _pass(model: Callable, guide: Callable, args: tuple, info: ProgramInfo, k: int,
          shared: object | None = None) -> tuple[Tensor, Tensor, object]:
    """One pass of ``k`` samples (vectorized) or one sample: (local log weights (k, rows),
    global log weights (k,), the guide's global sites to replay in later chunks)."""
    rows = args[0].shape[0]
    vectorized = info.vectorized
    plate = (pyro.plate("_particles", k, dim=-(info.max_plate_nesting + 1)) if vectorized
             else contextlib.nullcontext())
    with plate:
        g = guide if shared is None else poutine.replay(guide, trace=shared)
        guide_trace = poutine.trace(g).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    local = glob = torch.zeros(1, 1, device=args[0].device, dtype=_float_dtype(args[0]))
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace = prune_subsample_sites(trace)  # the plates' index sites carry no density
        trace.compute_log_prob()
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if sign > 0 and not site["is_observed"] and name not in guide_trace.nodes:
                continue  # proposed from the prior: p/q cancels
            lp = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
            dim = next((f.dim for f in plate_frames(site) if f.name in info.row_plates), None)
            term = sign * _reduce(lp, info.max_plate_nesting, vectorized, dim)
            if dim is None:
                glob = glob + term.sum(-1, keepdim=True)
            else:
                local = local + term
    if shared is None and info.global_sites and info.data_plate is not None:
        shared = guide_trace.copy()
        for name in set(shared.nodes) - info.global_sites:
            shared.remove_node(name)
    return local.expand(k, rows), glob.reshape(-1).expand(k), shared


def log_weights(model: Callable, guide: Callable, *args, num_samples: int,
                info: ProgramInfo | None = None) -> Tensor:
    """``log p(x, z_k) - log q(z_k|x)`` of shape (num_samples, batch), z_k ~ q, with any
    global terms spread evenly over the rows (their sum over rows is the joint weight)."""
    info = info or inspect_program(model, guide, *args)
    k, passes = (num_samples, 1) if info.vectorized else (1, num_samples)
    parts = [_pass(model, guide, args, info, k) for _ in range(passes)]
    local, glob = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return local + glob[:, None] / args[0].shape[0]


@dataclass(frozen=True)
class Scores:
    """Per-data-point estimates in nats (higher is better), and how they were computed."""

    elbo: Tensor
    iwae: Tensor | None = None
    iwae_samples: int = 0
    method: str = ""

    def summary(self) -> dict[str, float | int | str]:
        """Means over data points: the numbers ``summary.json`` reports."""
        out: dict[str, float | int | str] = {"test_elbo": self.elbo.mean().item()}
        if self.iwae is not None:
            out["test_log_likelihood_iwae"] = self.iwae.mean().item()
            out["iwae_samples"] = self.iwae_samples
        if self.method:
            out["eval_method"] = self.method
        return out


@dataclass(frozen=True)
class Plan:
    """How :func:`score` cuts ``n`` rows x ``num_samples`` into passes of ``rows`` x
    ``k_chunk``; ``chunk_bytes``: the measured memory of one pass (None if not measured)."""

    n: int
    num_samples: int
    rows: int
    k_chunk: int
    joint: bool
    info: ProgramInfo
    chunk_bytes: float | None = None

    @property
    def passes(self) -> int:
        return math.ceil(self.n / self.rows) * math.ceil(self.num_samples / self.k_chunk)


def plan_score(module, *inputs: Tensor, num_samples: int, guide: Callable | None = None,
               info: ProgramInfo | None = None) -> Plan:
    """The passes :func:`score` makes: at most :data:`MAX_ELEMENTS` data-sized floats per
    pass, and no more than half the free memory by the measured cost of a pass (hidden
    layers included). :class:`UsageError` when even the smallest pass cannot fit."""
    model, guide = module.model, guide or module.guide
    n, device = inputs[0].shape[0], inputs[0].device
    d = max(1, sum(t[:1].numel() for t in inputs))
    small = tuple(t[: min(n, 2)] for t in inputs)
    info = info or inspect_program(model, guide, *small)
    k_max = num_samples if info.vectorized else 1
    rows = max(1, min(n, MAX_ELEMENTS // (k_max * d)))
    if info.data_plate is None:  # no plate over the rows: they are one joint draw
        rows = n
    k_chunk = max(1, min(k_max, MAX_ELEMENTS // (rows * d)))
    joint = bool(info.global_sites) or info.data_plate is None
    # the bytes one pass allocates per row x sample and per row, measured on two rows
    cost = step_cost(lambda k: lambda *a: _pass(model, guide, a, info, k), small, device)
    chunk_bytes = None
    if cost is not None:
        budget = chunk_budget(device)
        if cost.bytes(rows, k_chunk) > budget and k_chunk > 1:
            fit = (budget / rows - cost.per_row) / max(cost.per_draw, 1.0)
            k_chunk = max(1, min(k_chunk, int(fit)))
        if cost.bytes(rows, k_chunk) > budget and info.data_plate is not None:
            rows = max(1, min(rows, int(budget // max(cost.bytes(1, k_chunk), 1.0))))
        chunk_bytes = cost.bytes(rows, k_chunk)
        refuse_unless_fits(chunk_bytes, device, f"scoring one pass of {rows:,} rows x "
                           f"{k_chunk:,} samples needs about",
                           EVAL_HINT if k_chunk > 1 else MODEL_HINT)
    return Plan(n, num_samples, rows, k_chunk, joint, info, chunk_bytes)


ESTIMATE_SECONDS = 20.0
"""An evaluation expected to take longer prints its estimate (timed on its first pass)."""
LONGEST_SECONDS = 7 * 86400.0
"""An evaluation expected to take longer than a week is refused (a mistyped K)."""
BAR_DELAY = 2.0
"""Seconds before the evaluation's progress bar shows (tqdm's ``delay``)."""


@torch.no_grad()
def score(module, *inputs: Tensor, num_samples: int = 10, iwae: bool = False,
          seed: int = 0, guide: Callable | None = None, progress: bool | None = None,
          info: ProgramInfo | None = None, validate: bool | None = False) -> Scores:
    """Per-row ELBO (the mean of K log weights) and, if ``iwae``, the IWAE_K bound for every
    row of ``inputs`` (the program's arguments, rows first); ``guide`` replaces the proposal;
    ``info``: the caller's :func:`~ppl_vae.inference.program.inspect_program` of the module's
    own program. Memory-bounded chunks (:func:`plan_score`), seeded (the caller's RNG is left
    as it was); a long one prints its estimate and a bar (``progress``: None on a terminal).
    Pyro's validation is off (``validate``), as runs train and score by default (grey-level
    targets lie outside a Bernoulli's support); None: as the caller has it."""
    model, guide = module.model, guide or module.guide
    n, device = inputs[0].shape[0], inputs[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            contextlib.nullcontext() if validate is None else pyro.validation_enabled(validate):
        plan = plan_score(module, *inputs, num_samples=num_samples, guide=guide,
                          info=info if guide == module.guide else None)
        torch.manual_seed(seed)  # after planning: the same draws with or without ``info``
        info, rows, joint = plan.info, plan.rows, plan.joint
        dtype = _float_dtype(inputs[0])
        elbo_sum = torch.zeros(n, device=device, dtype=dtype)
        lse = torch.full((n,), -math.inf, device=device, dtype=dtype)
        joint_lse = torch.full((), -math.inf, device=device, dtype=dtype)
        glob_sum = torch.zeros((), device=device, dtype=dtype)
        bar = tqdm(total=n * num_samples, desc="evaluation", unit="sample", unit_scale=True,
                   leave=False, delay=BAR_DELAY, file=sys.stderr,
                   disable=None if progress is None else not progress)
        began = time.perf_counter()
        for i in range(0, num_samples, plan.k_chunk):
            k = min(plan.k_chunk, num_samples - i)
            shared, total = None, torch.zeros(k, device=device, dtype=dtype)
            for start in range(0, n, rows):
                args = tuple(t[start:start + rows] for t in inputs)
                local, glob, shared = _pass(model, guide, args, info, k, shared)
                if start == 0:
                    glob_sum += glob.sum()
                    total = total + glob
                elbo_sum[start:start + rows] += local.sum(0)
                if iwae and not joint:
                    lse[start:start + rows] = torch.logaddexp(
                        lse[start:start + rows], torch.logsumexp(local, 0))
                total = total + local.sum(1)
                if i == start == 0:  # after the first pass
                    _announce(plan, began, device, progress)
                bar.update(k * args[0].shape[0])
            if iwae and joint:
                joint_lse = torch.logaddexp(joint_lse, torch.logsumexp(total, 0))
        bar.close()
    elbo = elbo_sum / num_samples + glob_sum / (num_samples * n)
    bound = None
    if iwae and joint:  # one bound over the whole set, reported per point
        bound = ((joint_lse - math.log(num_samples)) / n).expand(n).clone()
    elif iwae:
        bound = lse - math.log(num_samples)
    return Scores(elbo, bound, num_samples if iwae else 0, info.describe(num_samples,
                                                                         plan.passes))


def _announce(plan: Plan, began: float, device: torch.device, progress: bool | None) -> None:
    """After the first pass: the estimate line, for an evaluation expected to be long; one
    expected to take longer than :data:`LONGEST_SECONDS` is refused."""
    if plan.passes < 2:
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - began) * plan.passes
    if seconds > LONGEST_SECONDS:
        raise UsageError(f"evaluating {plan.num_samples:,} samples x {plan.n:,} rows would take "
                         f"about {format_seconds(seconds)} ({plan.passes:,} passes, timed on "
                         f"the first); {EVAL_HINT}")
    if seconds > ESTIMATE_SECONDS and progress is not False:
        tqdm.write(f"evaluation: {plan.num_samples:,} samples x {plan.n:,} rows in "
                   f"{plan.passes:,} passes, about {format_seconds(seconds)} (timed on the "
                   "first pass)", file=sys.stderr)
