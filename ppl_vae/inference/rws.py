"""Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019), Pyro's
``ReweightedWakeSleep`` with one importance weight per data point.

With K draws z_k ~ q(z|x) (gradients stopped: no reparameterization needed, so discrete
guides work), ``log w_k = log p(x, z_k) - log q(z_k|x)`` and ``w~_k = softmax_k log w_k``:

* wake-theta, the model's objective, the IWAE bound:
  ``log 1/K sum_k w_k``, gradient ``sum_k w~_k d/dtheta log p(x, z_k)``;
* wake-phi, the guide's (``insomnia=1``, the default): ``sum_k sg(w~_k) log q(z_k|x)``, a
  self-normalized importance estimate of ``-d/dphi KL(p(z|x) || q(z|x))`` (the inclusive
  KL; biased O(1/K), unbiased at q = p where every w~_k is 1/K);
* sleep-phi (``insomnia < 1``): ``log q(z|x)`` at (x, z) drawn from the model, mixed in
  with weight ``1 - insomnia``; the guide then takes ``observations=`` (Pyro's convention)
  and the weights are the whole batch's (Pyro's term as it is).

Pyro's class weighs the whole batch as one draw; here, as in ``RenyiELBO``, each data point
has its own weights. The loss's value is ``-IWAE_K``'s estimate; its gradient wake-theta's for
the model and the guide's objective for the guide.
"""

from __future__ import annotations

import inspect
import math
from unittest.mock import patch

import pyro.infer
import torch
from pyro.infer.util import get_dependent_plate_dims
from torch import Tensor

from ..errors import UsageError
from .trace_elbo import iwae_loss, log_prob_sum


class ReweightedWakeSleep(pyro.infer.ReweightedWakeSleep):
    """Pyro's ``ReweightedWakeSleep`` with per-data-point weights and a
    ``differentiable_loss``."""

    def __init__(self, num_particles: int = 2, insomnia: float = 1.0,
                 max_plate_nesting: float = float("inf"), vectorize_particles: bool = True,
                 **kwargs) -> None:
        if num_particles < 2:
            raise UsageError("--elbo rws weighs K particles against each other; give "
                             "--particles K with K >= 2 (e.g. 5)")
        if not vectorize_particles:
            raise UsageError("--elbo rws needs its particles vectorized, and this model cannot "
                             "broadcast over a particle dimension; use --elbo iwae or mc")
        super().__init__(num_particles=num_particles, insomnia=insomnia,
                         max_plate_nesting=max_plate_nesting, vectorize_particles=True,
                         **kwargs)

    def _loss(self, model, guide, args, kwargs):
        if self.insomnia < 1 and "observations" not in inspect.signature(guide).parameters:
            raise UsageError("--elbo rws with sleep-phi (insomnia < 1) runs the guide on the "
                             "model's own draws, passed as observations=; this guide takes "
                             "no such argument: use insomnia=1 (wake-phi)")
        (model_trace, guide_trace), = self._get_traces(model, guide, args, kwargs)
        dims = get_dependent_plate_dims(model_trace.nodes.values())
        log_p = log_prob_sum(model_trace, dims)
        log_q = log_prob_sum(guide_trace, dims) + torch.zeros_like(log_p)  # (none: a likelihood)
        log_w = log_p - log_q.detach()
        wake_theta = -(torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()
        wake_phi = -(torch.softmax(log_w.detach(), 0) * log_q).sum()
        if self.insomnia == 1:
            return wake_theta, wake_phi
        with patch.object(self, "insomnia", 0.0):  # Pyro's pure sleep-phi term (insomnia 0)
            _, sleep = super()._loss(model, guide, args, kwargs)
        return wake_theta, self.insomnia * wake_phi + (1 - self.insomnia) * sleep

    loss = iwae_loss  # (wake-theta's value)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        wake_theta, phi = self._loss(model, guide, args, kwargs)
        both = wake_theta + phi
        return wake_theta.detach() + both - both.detach()
