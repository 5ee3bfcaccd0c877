"""Pyro's ``Trace_ELBO`` without host reads; the pieces the path-derivative estimators
(:class:`STL_ELBO`, :mod:`.dreg`) share with it; and ``TraceGraph_ELBO``.

**Sticking the landing** (Roeder, Wu & Duvenaud 2017): for a reparameterized guide
z = g(eps; phi), the ELBO term ``log p(x, z) - log q(z; phi)`` has a path derivative (through
z) and the direct score ``-d/dphi log q(z; phi)`` at fixed z, of mean zero. STL drops it::

    grad_STL = d/dphi [log p(x, g(eps; phi)) - log q(g(eps; phi); phi')]   at phi' = phi held

an unbiased gradient whose variance vanishes as q approaches the posterior (with q = p(z|x),
``log p(x, z) - log q(z)`` is log p(x) for every z). The model's parameters get the ordinary
gradient; the value is the ELBO's estimate. Per particle, with ``sg`` stop-gradient::

    loss = -(log p(x, z) - log q(z)) - (log q(sg z) - sg log q(sg z))

the last term (value 0) cancelling the direct score for any guide distribution (a flow's
log q at a detached z inverts the flow exactly). Every latent guide site must be
reparameterized.

**TraceGraph_ELBO** (Schulman et al. 2015; Mnih & Gregor 2014): for a guide site
y ~ q(y; phi) without ``rsample`` (not enumerated) the score term
``E_q[d/dphi log q(y) * (C_y - b_y)]``, where C_y is the *downstream* cost of y (the log
densities y's value can influence, by Pyro's dependency graph: Rao-Blackwellization) and b_y
a baseline the site declares in ``infer={"baseline": {...}}``, lowering the variance without
bias. Reparameterized sites get the path gradient; the value is the ELBO's estimate.
"""

from __future__ import annotations

from unittest.mock import patch

import pyro.infer
import pyro.infer.trace_elbo
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import torch_sum
from torch import Tensor

from ..errors import UsageError


def not_reparameterized(guide_trace) -> list[str]:
    return [name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site["fn"].has_rsample]


def refuse_unreparameterized(guide_trace, name: str, instead: str) -> None:
    """:class:`UsageError` naming the first latent guide site without ``rsample``."""
    bad = not_reparameterized(guide_trace)
    if bad:
        raise UsageError(f"--elbo {name} needs every latent guide site reparameterized, and "
                         f"site {bad[0]!r} ({type(guide_trace.nodes[bad[0]]['fn']).__name__}) "
                         f"is not; use --elbo {instead}")


def direct_log_q(guide_trace, dims: set | None = None) -> Tensor | float:
    """log q(sg z) of every latent guide site at its detached value, scaled and masked as the
    site is, summed (over ``dims`` only, when given): its gradient is the direct score
    d/dphi log q(z; phi) at fixed z, and its value that of log q."""
    total: Tensor | float = 0.0
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            lp = scale_and_mask(site["fn"].log_prob(site["value"].detach()), site["scale"],
                                site["mask"])
            total = total + (lp.sum() if dims is None else torch_sum(lp, dims))
    return total


def stop_gradient_delta(x: Tensor | float) -> Tensor | float:
    """``x - sg(x)``: value 0, gradient that of ``x``."""
    return x - x.detach() if torch.is_tensor(x) else 0.0


def log_prob_sum(trace, dims: set | None = None) -> Tensor | float:
    """The log-densities of the trace's sample sites, summed (over ``dims`` only, when given)."""
    return sum((site["log_prob_sum"] if dims is None else torch_sum(site["log_prob"], dims)
                for site in trace.nodes.values() if site["type"] == "sample"), 0.0)


def iwae_loss(self, model, guide, *args, **kwargs) -> float:
    """-IWAE_K's estimate (``differentiable_loss``'s value), as ``RenyiELBO(alpha=0).loss``
    gives it: the ``loss`` of the IWAE-valued estimators."""
    with torch.no_grad():
        return self.differentiable_loss(model, guide, *args, **kwargs).item()


class Trace_ELBO(pyro.infer.Trace_ELBO):
    """Pyro's ``Trace_ELBO`` whose ``differentiable_loss`` keeps the loss on the device
    (Pyro's calls ``.item()`` per site). With every latent site reparameterized the loss is
    -(sum log p(x, z) - sum log q(z|x)); otherwise ``loss + (surrogate -
    surrogate.detach())``: the loss's value with the score-function surrogate's gradient."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            if not not_reparameterized(guide_trace):
                elbo = log_prob_sum(model_trace) - log_prob_sum(guide_trace)
                loss = loss - elbo / self.num_particles
                continue
            # Pyro's torch_item (.item(), looked up when called) the identity: a device tensor
            with patch.object(pyro.infer.trace_elbo, "torch_item", lambda x: x):
                value, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + (value.detach() + surrogate - surrogate.detach()) / self.num_particles
        return loss


class STL_ELBO(Trace_ELBO):
    """``Trace_ELBO`` with the path-derivative (sticking-the-landing) gradient for the guide."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            refuse_unreparameterized(guide_trace, "stl", "mc (score function) or enum")
            elbo = log_prob_sum(model_trace) - log_prob_sum(guide_trace)
            direct = stop_gradient_delta(direct_log_q(guide_trace))
            loss = loss - (elbo + direct) / self.num_particles
        return loss


class TraceGraph_ELBO(pyro.infer.TraceGraph_ELBO):
    """Pyro's ``TraceGraph_ELBO`` with a ``differentiable_loss``: the loss is -ELBO's estimate
    and its gradient the surrogate's (score terms with downstream costs and baselines)."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -elbo.detach() + surrogate - surrogate.detach()
