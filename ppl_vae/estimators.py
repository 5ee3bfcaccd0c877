"""The ELBO estimators ``--elbo`` chooses between, all from :mod:`pyro.infer`.

For a data point x, guide q(z|x) and L reparameterized draws z_l ~ q(z|x):

* ``mc`` -- :class:`~pyro.infer.Trace_ELBO`, Kingma & Welling's estimator A::

      1/L sum_l [log p(x, z_l) - log q(z_l|x)]

* ``analytic`` -- :class:`~pyro.infer.TraceMeanField_ELBO`, estimator B: the KL in closed
  form where Pyro knows it (falling back to Monte Carlo where it does not)::

      1/L sum_l log p(x|z_l) - KL(q(z|x) || p(z))

* ``iwae`` -- :class:`~pyro.infer.RenyiELBO` with alpha = 0, the importance-weighted bound of
  Burda et al. (2016), tighter than the ELBO for L > 1::

      log 1/L sum_l p(x, z_l) / q(z_l|x)

The particles are vectorized (one batched pass, a plate at dim -2) when L > 1.
"""

from __future__ import annotations

import warnings

from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)

from .errors import UsageError

MAX_PLATE_NESTING = 1  # the data plate; vectorized particles go one dim further left


def make_elbo(name: str, particles: int = 1, jit: bool = False) -> ELBO:
    """The Pyro ELBO for ``--elbo name`` with ``particles`` samples per data point."""
    kw = dict(num_particles=particles, vectorize_particles=particles > 1,
              max_plate_nesting=MAX_PLATE_NESTING)
    if name == "iwae":
        if jit:
            raise UsageError("--jit has no IWAE (RenyiELBO) variant in Pyro; drop --jit")
        with warnings.catch_warnings():  # RenyiELBO warns that alpha=0 is the IWAE bound
            warnings.simplefilter("ignore")
            return RenyiELBO(alpha=0.0, **kw)
    classes = {"mc": (Trace_ELBO, JitTrace_ELBO),
               "analytic": (TraceMeanField_ELBO, JitTraceMeanField_ELBO)}
    if name not in classes:
        raise UsageError(f"unknown --elbo {name!r}; use mc, analytic or iwae")
    if jit:  # torch marks torch.jit.trace deprecated; the Jit ELBOs still work on it
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.*deprecated",
                                category=FutureWarning)
        return classes[name][1](ignore_jit_warnings=True, **kw)
    return classes[name][0](**kw)
