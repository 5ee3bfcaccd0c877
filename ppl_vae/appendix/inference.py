"""Point estimates (MAP and MLE by AutoDelta) and full posteriors (NUTS, ArviZ) with Pyro's
own tools, for the appendix."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS, Trace_ELBO
from pyro.infer.autoguide import AutoDelta

from ..plots import arviz


def fit_delta(model: Callable, *args, max_iter: int = 500) -> dict[str, torch.Tensor]:
    """argmax_theta log p(data, theta) over the latent sites of ``model``: a MAP estimate, or
    the MLE when ``poutine.mask`` hides the prior. An AutoDelta guide delta(theta - theta_hat)
    has no entropy, so its ELBO is log p(data, theta_hat), and deterministic: L-BFGS on it
    reaches machine precision."""
    pyro.clear_param_store()
    guide = AutoDelta(model)
    elbo = Trace_ELBO()
    elbo.differentiable_loss(model, guide, *args)  # creates the guide's parameters
    opt = torch.optim.LBFGS(list(guide.parameters()), lr=1.0, max_iter=max_iter,
                            tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = elbo.differentiable_loss(model, guide, *args)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return {k: v.detach().clone() for k, v in guide.median(*args).items()}


def nuts(model: Callable, *args, num_samples: int = 1000, warmup_steps: int = 500,
         num_chains: int = 2, seed: int = 0, progress: bool = False):
    """NUTS draws of every latent site, ``num_chains`` chains run one after another, as an
    ArviZ ``InferenceData`` (so ``az.summary`` gives R-hat and effective sample sizes)."""
    chains = []
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup_steps,
                    disable_progbar=not progress)
        mcmc.run(*args)
        chains.append({k: v.detach().cpu().numpy() for k, v in mcmc.get_samples().items()})
    return arviz().from_dict(posterior={k: np.stack([ch[k] for ch in chains]) for k in chains[0]})


def summary(idata, hdi_prob: float = 0.94):
    """ArviZ's summary table: mean, sd, HDI, MCSE, ESS (bulk and tail), R-hat."""
    return arviz().summary(idata, hdi_prob=hdi_prob, round_to="none")
