"""Pyro's ``Trace_ELBO`` without host reads, and the pieces the path-derivative estimators
(:mod:`.stl`, :mod:`.dreg`) share with it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyro.infer
import pyro.infer.trace_elbo
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import torch_sum
from torch import Tensor


def not_reparameterized(guide_trace) -> list[str]:
    return [name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site["fn"].has_rsample]


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


def log_prob_sum(trace) -> Tensor:
    return sum(site["log_prob_sum"] for site in trace.nodes.values()
               if site["type"] == "sample")


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
            with _items_kept_on_the_device():
                value, surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + (value.detach() + surrogate - surrogate.detach()) / self.num_particles
        return loss


@contextlib.contextmanager
def _items_kept_on_the_device() -> Iterator[None]:
    """Pyro's ``Trace_ELBO._differentiable_loss_particle`` with its ``torch_item`` (``.item()``)
    the identity: the loss it returns is then a tensor (it looks the name up in its module
    when called)."""
    module = pyro.infer.trace_elbo
    real = module.torch_item
    module.torch_item = lambda x: x
    try:
        yield
    finally:
        module.torch_item = real
