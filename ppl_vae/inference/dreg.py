"""The doubly reparameterized gradient of the IWAE bound (DReG; Tucker, Lawson, Gu & Maddison
2019).

For a data point x, K reparameterized draws z_k = g(eps_k; phi) from the guide, log weights
``log w_k = log p(x, z_k) - log q(z_k; phi)`` and normalized weights ``w~_k = w_k / sum_j
w_j``, the IWAE bound ``IWAE_K = E[log 1/K sum_k w_k]`` has the gradients::

    d/dtheta IWAE_K = E[sum_k w~_k   d/dtheta log p(x, z_k)]                  (as IWAE's)
    d/dphi   IWAE_K = E[sum_k w~_k^2 d/dphi   log w_k |path]                   (DReG)

where ``|path`` differentiates through z_k only, q's parameters held in log q: the score
term, whose estimate makes IWAE's inference-network SNR fall like 1/sqrt(K) (Rainforth et al.
2018), replaced by its reparameterized equivalent. With q = p(z|x) the phi-gradient is 0.

The surrogate, per data point (``sg``: stop-gradient)::

    S = sum_k sg(w~_k^2) [log p(x, z_k) - log q(z_k) + log q(sg z_k) - sg log q(sg z_k)]
      + sum_k sg(w~_k - w~_k^2) log p(x, sg z_k)

Its theta-gradient is IWAE's (the two terms add to sum_k w~_k d log p), its phi-gradient
DReG's (the second term, one more pass of the model at the detached draws, sees no phi). The
loss is ``-IWAE_K``'s estimate (``logsumexp_k log w_k - log K``, summed over the data points)
with ``-S``'s gradient.

Assumes a reparameterized guide and vectorized particles; the per-point bound sums over the
plates every site shares (as Pyro's ``RenyiELBO``). With K = 1 every w~ is 1: the ELBO with
``stl``'s gradient (training refuses K = 1; ``compare``'s SNR-against-K experiment uses it).
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.infer.util import get_dependent_plate_dims
from torch import Tensor

from ..errors import UsageError
from .trace_elbo import (
    Trace_ELBO,
    direct_log_q,
    iwae_loss,
    log_prob_sum,
    refuse_unreparameterized,
    stop_gradient_delta,
)


class IWAE_DReG(Trace_ELBO):
    """The IWAE bound with K = ``num_particles`` vectorized draws per data point and the
    doubly reparameterized gradient for the guide."""

    def __init__(self, num_particles: int = 2, max_plate_nesting: float = float("inf"),
                 vectorize_particles: bool = True, **kwargs) -> None:
        if not vectorize_particles:
            raise UsageError("--elbo iwae-dreg weighs K particles against each other and needs "
                             "them vectorized, and this model cannot broadcast over a particle "
                             "dimension; use --elbo iwae")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True, **kwargs)

    loss = iwae_loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        (model_trace, guide_trace), = self._get_traces(model, guide, args, kwargs)
        refuse_unreparameterized(guide_trace, "iwae-dreg", "iwae")
        dims = get_dependent_plate_dims(model_trace.nodes.values())
        log_p = log_prob_sum(model_trace, dims)  # (K, *points)
        # (Pyro adds no particle dimension for K = 1: put one in front)
        lift = (lambda t: t.unsqueeze(0) if torch.is_tensor(t) else t) \
            if self.num_particles == 1 else (lambda t: t)
        log_w = lift(log_p - log_prob_sum(guide_trace, dims))
        weights = torch.softmax(log_w.detach(), dim=0)
        path = log_w + lift(stop_gradient_delta(direct_log_q(guide_trace, dims)))
        held = lift(self._model_at_detached_draws(model, guide_trace, dims, args, kwargs))
        surrogate = (weights ** 2 * path).sum() + ((weights - weights ** 2) * held).sum()
        bound = (torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)).sum()
        return -bound.detach() - stop_gradient_delta(surrogate)

    def _model_at_detached_draws(self, model, guide_trace, dims, args, kwargs
                                 ) -> Tensor | float:
        """log p(x, sg z_k) per particle and point: the model replayed on the guide's draws
        with their gradient stopped (theta's gradient only)."""
        fixed = poutine.Trace()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                fixed.add_node(name, **{**site, "value": site["value"].detach()})
        trace = poutine.trace(poutine.replay(self._vectorized_num_particles(model),
                                             trace=fixed)).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        return log_prob_sum(trace, dims)
