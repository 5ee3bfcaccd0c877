"""A coin: Beta(alpha, beta) prior on the bias p, n Bernoulli tosses with k heads.

Closed forms::

    MLE  = k / n
    MAP  = (k + alpha - 1) / (n + alpha + beta - 2)      (alpha, beta >= 1; = MLE if both 1)
    p | data ~ Beta(alpha + k, beta + n - k)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro import poutine
from torch import Tensor

from ..plots import legend_outside, save
from .inference import fit_delta, nuts, summary


def coin_model(data: Tensor, alpha: float, beta: float, use_prior: bool = True) -> None:
    """p ~ Beta(alpha, beta); x_i ~ Bernoulli(p). ``use_prior=False`` masks the prior's log
    density out (``poutine.mask``): what is left is the likelihood, and its mode the MLE."""
    with poutine.mask(mask=use_prior):
        p = pyro.sample("p", dist.Beta(torch.tensor(float(alpha), dtype=data.dtype),
                                       torch.tensor(float(beta), dtype=data.dtype)))
    with pyro.plate("tosses", len(data)):
        pyro.sample("x", dist.Bernoulli(p), obs=data)


def coin(data: Tensor, alpha: float = 2.0, beta: float = 2.0, nuts_samples: int = 1000,
         out: str | os.PathLike | None = None) -> dict:
    """MLE and MAP of the bias by AutoDelta, against their closed forms; the NUTS posterior
    against the exact Beta posterior (ArviZ summary); a figure when ``out`` is given."""
    data = torch.as_tensor(data, dtype=torch.float64)
    n, k = len(data), float(data.sum())
    mle = fit_delta(coin_model, data, alpha, beta, False)["p"].item()
    map_ = fit_delta(coin_model, data, alpha, beta, True)["p"].item()
    uniform_map = fit_delta(coin_model, data, 1.0, 1.0, True)["p"].item()
    a, b = alpha + k, beta + n - k
    idata = nuts(coin_model, data, alpha, beta, num_samples=nuts_samples)
    table = summary(idata)
    exact = dist.Beta(torch.tensor(a), torch.tensor(b))
    result = {"n": n, "k": k, "alpha": alpha, "beta": beta, "mle": mle, "mle_exact": k / n,
              "map": map_, "map_exact": (k + alpha - 1) / (n + alpha + beta - 2),
              "map_uniform_prior": uniform_map,
              "posterior_exact": {"mean": a / (a + b), "sd": exact.variance.sqrt().item()},
              "posterior_nuts": {c: float(table.loc["p", c]) for c in table.columns}}
    if out is not None:
        _figure(result, Path(out) / "coin.png", np.asarray(idata.posterior["p"]).ravel())
    return result


def _figure(r: dict, path: Path, draws: np.ndarray) -> Figure:
    grid = torch.linspace(1e-3, 1 - 1e-3, 400, dtype=torch.float64)
    n, k = r["n"], r["k"]
    prior = dist.Beta(torch.tensor(r["alpha"]), torch.tensor(r["beta"])).log_prob(grid).exp()
    post = dist.Beta(torch.tensor(r["alpha"] + k), torch.tensor(r["beta"] + n - k)
                     ).log_prob(grid).exp()
    loglik = k * grid.log() + (n - k) * torch.log1p(-grid)
    lik = torch.softmax(loglik, 0) / (grid[1] - grid[0])  # normalized to compare shapes
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.plot(grid, prior, label=f"prior Beta({r['alpha']:g}, {r['beta']:g})")
    ax.plot(grid, lik, label="likelihood (normalized)")
    ax.hist(draws, bins=40, density=True, color="C2", alpha=0.3,
            label=f"NUTS draws ({len(draws):,})")
    ax.plot(grid, post, label="posterior (exact)")
    ax.axvline(r["mle"], color="k", ls="--", label=f"MLE {r['mle']:.3f}")
    ax.axvline(r["map"], color="C3", ls=":", label=f"MAP {r['map']:.3f}")
    ax.set(xlabel="p", ylabel="density", title=f"coin: {int(k)} heads in {int(n)} tosses")
    legend_outside(ax)
    return save(fig, path)
