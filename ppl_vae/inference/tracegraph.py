"""Score-function gradients with Rao-Blackwellization and baselines for guides with
non-reparameterized sites that are not enumerated: Pyro's ``TraceGraph_ELBO`` (Schulman et
al. 2015; Mnih & Gregor 2014).

For a guide site y ~ q(y; phi) without ``rsample``, the ELBO's gradient has the score term
``E_q[d/dphi log q(y) * (C_y - b_y)]`` where C_y is the *downstream* cost of y only (the log
densities that y's value can influence, by the dependency graph Pyro records, instead of the
whole ELBO: Rao-Blackwellization) and b_y a baseline the site declares in
``infer={"baseline": {...}}`` (a decaying average, a network, or a value), which lowers the
variance without bias. Reparameterized sites get the path gradient as in ``Trace_ELBO``.
The value is the ELBO's estimate; baselines' own losses train their networks.
"""

from __future__ import annotations

import pyro.infer
from torch import Tensor


class TraceGraph_ELBO(pyro.infer.TraceGraph_ELBO):
    """Pyro's ``TraceGraph_ELBO`` with a ``differentiable_loss``: the loss is -ELBO's estimate
    and its gradient the surrogate's (score terms with downstream costs and baselines)."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -elbo.detach() + surrogate - surrogate.detach()
