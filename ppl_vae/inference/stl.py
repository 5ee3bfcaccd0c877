"""Sticking the landing (Roeder, Wu & Duvenaud 2017): the ELBO's path-derivative gradient.

For a reparameterized guide z = g(eps; phi), eps ~ p(eps), the total derivative of the ELBO
term ``log p(x, z) - log q(z; phi)`` splits into a path part (through z) and the direct
score ``-d/dphi log q(z; phi)`` at fixed z, whose expectation is zero. STL drops the score::

    grad_STL = d/dphi [log p(x, g(eps; phi)) - log q(g(eps; phi); phi')]   at phi' = phi held

an unbiased estimate of the ELBO's gradient (the dropped term has mean zero) whose variance
vanishes as q approaches the posterior: with q = p(z|x), ``log p(x, z) - log q(z)`` is
log p(x) for every z, so its path derivative is zero for every draw. The model's parameters
get the ordinary gradient. The value is the ELBO's estimate, unchanged.

Here, per particle: ``loss = -(log p(x, z) - log q(z)) - (log q(sg z) - sg log q(sg z))``,
``sg`` stop-gradient; the last term (value 0) cancels the direct score, whatever the
guide's distributions are (a flow's log q at a detached z inverts the flow exactly).
Assumes every latent guide site is reparameterized; refuses a guide with another.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import UsageError
from .trace_elbo import (
    Trace_ELBO,
    direct_log_q,
    log_prob_sum,
    not_reparameterized,
    stop_gradient_delta,
)


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


def refuse_unreparameterized(guide_trace, name: str, instead: str) -> None:
    """:class:`UsageError` naming the first latent guide site without ``rsample``."""
    bad = not_reparameterized(guide_trace)
    if bad:
        raise UsageError(f"--elbo {name} needs every latent guide site reparameterized, and "
                         f"site {bad[0]!r} ({type(guide_trace.nodes[bad[0]]['fn']).__name__}) "
                         f"is not; use --elbo {instead}")
