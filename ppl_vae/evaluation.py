"""Per-image test ELBO and the importance-weighted log-likelihood estimate, from Pyro traces.

For data point x and K draws z_k ~ q(z|x) (one vectorized pass: a ``pyro.plate`` of size K
left of the data plate), the log importance weights are::

    log w_k = log p(x, z_k) - log q(z_k|x)

and from them, per data point::

    ELBO(x)    ~ 1/K sum_k log w_k                      (unbiased for the ELBO)
    IWAE_K(x)  = log 1/K sum_k w_k   <= log p(x)        (Burda et al. 2016; E[IWAE_K]
                                                         rises to log p(x) as K grows)

The model is scored as a density: ``poutine.scale`` factors (a beta-VAE's beta) weight the
training objective, not the model, and are left out here; masks are kept. Models must keep
their latents local to the data plate (a batch dimension at -1), as the VAE and CVAE do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

MAX_ELEMENTS = 2**24  # bound on K x rows x D floats held at once (hidden layers come on top)


def log_weights(model: Callable, guide: Callable, *args, num_samples: int,
                max_plate_nesting: int = 1) -> Tensor:
    """``log p(x, z_k) - log q(z_k|x)`` of shape (num_samples, batch), z_k ~ q."""
    particles = pyro.plate("particles", num_samples, dim=-(max_plate_nesting + 1))
    with particles:
        guide_trace = poutine.trace(guide).get_trace(*args)
    with particles:
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    total = torch.zeros((), device=args[0].device)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace = prune_subsample_sites(trace)  # the plates' index sites carry no density
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] == "sample":
                total = total + sign * scale_and_mask(site["unscaled_log_prob"],
                                                      mask=site["mask"])
    batch = args[0].shape[0]
    return total.expand(num_samples, batch)


@dataclass(frozen=True)
class Scores:
    """Per-data-point estimates in nats (higher is better)."""

    elbo: Tensor
    iwae: Tensor | None = None
    iwae_samples: int = 0

    def summary(self) -> dict[str, float | int]:
        """Means over data points: the numbers ``summary.json`` reports."""
        out: dict[str, float | int] = {"test_elbo": self.elbo.mean().item()}
        if self.iwae is not None:
            out["test_log_likelihood_iwae"] = self.iwae.mean().item()
            out["iwae_samples"] = self.iwae_samples
        return out


@torch.no_grad()
def score(module, *inputs: Tensor, num_samples: int = 10, iwae: bool = False,
          seed: int = 0, guide: Callable | None = None) -> Scores:
    """Per-row ELBO (the mean of K log weights) and, if ``iwae``, the IWAE_K bound, for every
    row of ``inputs`` (the arguments of ``module.model``/``module.guide``, rows first).
    ``guide`` replaces ``module.guide`` as the proposal.

    Runs in memory-bounded chunks of rows and of samples, seeded: re-running gives the same
    numbers, and the caller's RNG state is left as it was.
    """
    n = inputs[0].shape[0]
    d = max(1, sum(t[:1].numel() for t in inputs))
    rows = max(1, min(n, MAX_ELEMENTS // (num_samples * d)))
    k_chunk = max(1, min(num_samples, MAX_ELEMENTS // (rows * d)))
    guide = guide or module.guide
    elbos, bounds = [], []
    device = inputs[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            pyro.validation_enabled(False):
        torch.manual_seed(seed)
        for start in range(0, n, rows):
            args = tuple(t[start:start + rows] for t in inputs)
            lw = torch.cat([log_weights(module.model, guide, *args, num_samples=k)
                            for k in _chunks(num_samples, k_chunk)])
            elbos.append(lw.mean(0))
            if iwae:
                bounds.append(torch.logsumexp(lw, 0) - math.log(num_samples))
    return Scores(torch.cat(elbos), torch.cat(bounds) if iwae else None,
                  num_samples if iwae else 0)


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


@torch.no_grad()
def conditional_scores(module, c: Tensor, y: Tensor, samples: int = 100,
                       elbo_particles: int = 10) -> dict[str, float]:
    """The CVAE paper's table for one condition, in nats per data point (lower is better):

    * ``cvae_is``: -log p(y|c) by importance sampling with ``samples`` draws from the proposal
      (q(z|c,y); p(z|c) for a GSNN): -log 1/S sum_s p(y, z_s|c) / q(z_s|c,y);
    * ``cvae_neg_elbo``: the negative ELBO with ``elbo_particles`` draws (Pyro's CVAE table);
    * ``nn_baseline``: -log p(y|c) of the deterministic baseline NN (its BCE);
    * ``gap``: nn_baseline - cvae_is (> 0 when the CVAE wins).
    """
    guide = module.proposal
    is_ = score(module, c, y, num_samples=samples, iwae=True, guide=guide).iwae.mean().item()
    elbo = score(module, c, y, num_samples=elbo_particles, guide=guide).elbo.mean().item()
    nn = sum(module.baseline_loss(cb, yb).item()
             for cb, yb in zip(c.split(4096), y.split(4096), strict=True)) / len(c)
    return {"nn_baseline": nn, "cvae_is": -is_, "cvae_neg_elbo": -elbo, "gap": nn + is_}
