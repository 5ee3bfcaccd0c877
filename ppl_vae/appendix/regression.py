"""Linear regression y = X w + eps, eps ~ Normal(0, sigma^2 I), prior w ~ Normal(0, tau^2 I).

Closed forms (no intercept unless X carries a column of ones)::

    MLE = argmin ||y - X w||^2                      (least squares)
    MAP = (X^T X + lambda I)^{-1} X^T y,  lambda = sigma^2 / tau^2      (ridge regression:
          a Gaussian prior is weight decay)
    w | y ~ Normal(mu, S),  S = (X^T X / sigma^2 + I / tau^2)^{-1},  mu = S X^T y / sigma^2

Mean-field VI (AutoNormal) fits a diagonal Normal: with correlated features the exact
posterior is correlated, and the best diagonal Normal under KL(q || p) has the marginal sds
1 / sqrt(diag(S^{-1})), smaller than the true sqrt(diag(S)) -- it underestimates them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import Tensor

from ..plots import legend_outside, save
from .inference import fit_delta, nuts, summary


def regression_model(X: Tensor, y: Tensor, sigma: float, tau: float,
                     use_prior: bool = True) -> None:
    """w ~ Normal(0, tau^2 I) (masked out for the MLE); y ~ Normal(X w, sigma^2 I)."""
    d = X.shape[1]
    with poutine.mask(mask=use_prior):
        w = pyro.sample("w", dist.Normal(X.new_zeros(d), tau).to_event(1))
    with pyro.plate("data", X.shape[0]):
        # (X * w).sum(-1) rather than X @ w: w may carry particle dims (..., 1, d)
        pyro.sample("y", dist.Normal((X * w).sum(-1), sigma), obs=y)


def exact_posterior(X: Tensor, y: Tensor, sigma: float, tau: float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of w | y."""
    precision = X.T @ X / sigma**2 + torch.eye(X.shape[1], dtype=X.dtype) / tau**2
    cov = torch.linalg.inv(precision)
    return cov @ X.T @ y / sigma**2, cov


def correlated_data(n: int = 50, rho: float = 0.95, sigma: float = 1.0, seed: int = 0
                    ) -> tuple[Tensor, Tensor]:
    """Two features with correlation ``rho``, y = X (1, -0.5) + noise: a posterior with
    strongly correlated coefficients."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    X = torch.stack([z[:, 0], rho * z[:, 0] + (1 - rho**2) ** 0.5 * z[:, 1]], 1)
    y = X @ torch.tensor([1.0, -0.5], dtype=torch.float64)
    return X, y + sigma * torch.randn(n, generator=g, dtype=torch.float64)


def mean_field_vi(X: Tensor, y: Tensor, sigma: float, tau: float, steps: int = 4000,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """Posterior means and sds of an AutoNormal (diagonal Normal) guide fitted by SVI."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(regression_model)
    svi = SVI(regression_model, guide, pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.999}),
              Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(steps):
        svi.step(X, y, sigma, tau)
    return guide.locs.w.detach().clone(), guide.scales.w.detach().clone()


def linear_regression(X: Tensor, y: Tensor, sigma: float = 1.0, tau: float = 1.0,
                      nuts_samples: int = 1000, vi_steps: int = 4000,
                      out: str | os.PathLike | None = None) -> dict:
    """MLE and MAP by AutoDelta against least squares and ridge; the exact posterior against
    NUTS and mean-field VI (means and sds side by side); a figure when ``out`` is given."""
    X, y = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    d = X.shape[1]
    lam = sigma**2 / tau**2
    mle = fit_delta(regression_model, X, y, sigma, tau, False)["w"]
    map_ = fit_delta(regression_model, X, y, sigma, tau, True)["w"]
    mle_exact = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
    map_exact = torch.linalg.solve(X.T @ X + lam * torch.eye(d, dtype=X.dtype), X.T @ y)
    mu, cov = exact_posterior(X, y, sigma, tau)
    table = summary(nuts(regression_model, X, y, sigma, tau, num_samples=nuts_samples))
    vi_mean, vi_sd = mean_field_vi(X, y, sigma, tau, steps=vi_steps)
    mf_sd = 1 / torch.linalg.inv(cov).diagonal().sqrt()  # the optimal diagonal Normal's sds
    rows = [f"w[{i}]" for i in range(d)]
    posterior = {
        "exact_mean": mu.tolist(), "exact_sd": cov.diagonal().sqrt().tolist(),
        "exact_correlation": (cov[0, 1] / cov.diagonal().prod().sqrt()).item() if d > 1 else None,
        **{f"nuts_{c}": table.loc[rows, c].tolist()
           for c in ("mean", "sd", "mcse_mean", "ess_bulk", "r_hat")},
        "mean_field_vi_mean": vi_mean.tolist(), "mean_field_vi_sd": vi_sd.tolist(),
        "mean_field_optimum_sd": mf_sd.tolist()}
    result = {"sigma": sigma, "tau": tau, "lambda": lam, "mle": mle.tolist(),
              "mle_exact": mle_exact.tolist(), "map": map_.tolist(),
              "map_exact": map_exact.tolist(), "posterior": posterior}
    if out is not None:
        _figure(result, Path(out) / "regression.png")
    return result


def _figure(r: dict, path: Path) -> Figure:
    """Posterior sds per coefficient: exact, NUTS, mean-field VI (legend beside the axes)."""
    p = r["posterior"]
    d = len(p["exact_sd"])
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    width = 0.25
    for i, (key, label) in enumerate([("exact_sd", "exact"), ("nuts_sd", "NUTS"),
                                      ("mean_field_vi_sd", "mean-field VI")]):
        ax.bar([j + i * width for j in range(d)], p[key], width, label=label)
    ax.set_xticks([j + width for j in range(d)], [f"w{j}" for j in range(d)])
    ax.set(xlabel="regression coefficient", ylabel="posterior sd",
           title="correlated features: mean-field VI is overconfident")
    legend_outside(ax, title="posterior", title_fontsize=8)
    return save(fig, path)
