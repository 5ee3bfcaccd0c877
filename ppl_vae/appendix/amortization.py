"""How good is the amortized posterior q(z|x)? (Cremer, Li & Duvenaud 2018)

For each image x of a trained VAE::

    log p(x)  >=  ELBO(q*_x)  >=  ELBO(q_phi(.|x))

where q*_x is a Normal guide optimized for that image alone (non-amortized SVI on its z)
and q_phi the encoder. log p(x) is estimated by the IWAE bound with many samples from q*_x.
The approximation gap log p(x) - ELBO(q*_x) is the price of a diagonal Normal family (a
lower bound on it, since the IWAE estimate is itself below log p(x)); the amortization gap
ELBO(q*_x) - ELBO(q_phi) the price of one encoder for all images.

Also: the PSIS diagnostic k-hat of q_phi(z|x) per image (``pyro.infer.importance``;
k < 0.5 good, > 0.7 unreliable), and NUTS draws from the true p(z|x) to set beside q.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from pyro.infer.importance import psis_diagnostic
from torch import Tensor, nn

from ..errors import UsageError
from ..inference.estimators import make_elbo
from ..inference.importance import score
from ..plots import arviz, legend_outside, save
from .inference import nuts


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradients for ``module``'s parameters inside; each gets its own setting back."""
    before = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


class LocalGuide(nn.Module):
    """q*_x: a free diagonal Normal per image, started at the encoder's output."""

    def __init__(self, vae: nn.Module, x: Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            loc, scale = vae.encode(x)
        self.loc = nn.Parameter(loc.clone())
        self.log_scale = nn.Parameter(scale.log().clone())
        self._vae = (vae,)  # not a submodule: its weights stay fixed

    def model(self, x: Tensor, rows: Tensor) -> None:
        self._vae[0].model(x)

    def guide(self, x: Tensor, rows: Tensor) -> None:
        """q*(z | x_i) for the images ``x`` at positions ``rows`` of the fitted batch (so
        that :func:`ppl_vae.score` can take them in chunks)."""
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", dist.Normal(self.loc[rows], self.log_scale[rows].exp())
                        .to_event(1))


def optimize_local(vae: nn.Module, x: Tensor, steps: int = 500, lr: float = 0.05,
                   particles: int = 16, seed: int = 0) -> LocalGuide:
    """Fit q*_x for every row of ``x`` at once (each image's ELBO depends only on its own
    parameters, so one SVI over the batch optimizes them all)."""
    local = LocalGuide(vae, x)
    elbo = make_elbo("analytic", particles)
    rows = torch.arange(len(x), device=x.device)
    opt = torch.optim.Adam(local.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    pyro.set_rng_seed(seed)
    with frozen(vae), pyro.validation_enabled(False):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            elbo.differentiable_loss(local.model, local.guide, x, rows).backward()
            opt.step()
            sched.step()
    return local


def gaps(vae: nn.Module, x: Tensor, iwae_samples: int = 5000, elbo_samples: int = 1000,
         steps: int = 500, psis_particles: int = 1000, seed: int = 0) -> dict:
    """Per-image log p(x) (IWAE), ELBO(q*), ELBO(q_phi), the two gaps, and PSIS k-hat.

    The IWAE bound is itself below log p(x), so the approximation gap it gives is a lower
    bound; the ordering log p(x) >= ELBO(q*) >= ELBO(q_phi) holds in expectation.
    """
    if getattr(vae, "beta", 1.0) != 1.0:  # PSIS and NUTS score the beta-scaled program
        raise UsageError("the posterior diagnostics need a VAE trained with beta = 1")
    vae.eval()
    local = optimize_local(vae, x, steps=steps, seed=seed)
    rows = torch.arange(len(x), device=x.device)
    log_px = score(local, x, rows, num_samples=iwae_samples, iwae=True, seed=seed)
    best = score(local, x, rows, num_samples=elbo_samples, seed=seed + 1)
    amortized = score(vae, x, num_samples=elbo_samples, seed=seed + 2)
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # psis warns when k-hat is large: we report it
        khat = [float(psis_diagnostic(vae.model, vae.guide, x[i:i + 1],
                                      num_particles=psis_particles, max_plate_nesting=1))
                for i in range(len(x))]
    per_image = {
        "log_px_iwae": log_px.iwae.tolist(),
        "elbo_optimal_normal": best.elbo.tolist(),
        "elbo_amortized": amortized.elbo.tolist(),
        "psis_khat": khat,
    }
    lp, eb, ea = log_px.iwae.mean().item(), best.elbo.mean().item(), amortized.elbo.mean().item()
    return {
        "images": len(x), "iwae_samples": iwae_samples, "elbo_samples": elbo_samples,
        "log_px_iwae": lp, "elbo_optimal_normal": eb, "elbo_amortized": ea,
        "approximation_gap": lp - eb, "amortization_gap": eb - ea,
        "psis_khat_mean": float(np.mean(khat)),
        "psis_khat_above_0.7": int(sum(k > 0.7 for k in khat)),
        "per_image": per_image,
    }


def true_posterior(vae: nn.Module, x: Tensor, num_samples: int = 500, seed: int = 0):
    """NUTS draws from p(z | x) for one image ``x`` (shape (1, D)), decoder fixed."""
    with frozen(vae):
        return nuts(vae.model, x, num_samples=num_samples, warmup_steps=300, num_chains=2,
                    seed=seed)


def posterior_figure(vae: nn.Module, images: Tensor, path: str | Path,
                     num_samples: int = 500, seed: int = 0) -> Figure:
    """For 2-D latents: NUTS draws of p(z|x) (ArviZ KDE) with q(z|x)'s draws on top."""
    az = arviz()
    fig = Figure(figsize=(3.2 * len(images) + 1.2, 3.3), layout="constrained")
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    for i, (ax, x) in enumerate(zip(axes, images, strict=True)):
        idata = true_posterior(vae, x[None], num_samples=num_samples, seed=seed + i)
        z = idata.posterior["z"].values.reshape(-1, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            az.plot_kde(z[:, 0], z[:, 1], ax=ax, contourf_kwargs={"cmap": "Blues"})
        with torch.no_grad():
            loc, scale = vae.encode(x[None])
            q = dist.Normal(loc[0], scale[0]).sample((num_samples,)).cpu()
        ax.scatter(q[:, 0], q[:, 1], s=3, c="C3", alpha=0.4, label="q(z|x)")
        ax.set(title=f"image {i}", xlabel="z1", ylabel="z2")
    shaded = Patch(color=colormaps["Blues"](0.6), label="p(z|x), NUTS (KDE)")
    handles, _ = axes[-1].get_legend_handles_labels()
    legend_outside(axes[-1], handles=[shaded, *handles], markerscale=3)
    fig.suptitle("true posterior p(z|x) (NUTS, shaded) and the encoder's q(z|x) (red)")
    save(fig, path)
    return fig


def gaps_figure(results: dict[str, dict], path: str | Path) -> Figure:
    """Approximation and amortization gaps (nats per image), one pair of bars per model."""
    names = list(results)
    fig = Figure(figsize=(1.8 * len(names) + 4.5, 3.4), layout="constrained")
    ax = fig.subplots()
    approx = [results[n]["approximation_gap"] for n in names]
    amort = [results[n]["amortization_gap"] for n in names]
    ax.bar(names, approx, label="approximation gap: log p(x) - ELBO(q*)")
    ax.bar(names, amort, bottom=approx, label="amortization gap: ELBO(q*) - ELBO(q_phi)")
    ax.set(xlabel="trained model (run)", ylabel="nats per image",
           title="log p(x) - ELBO(q_phi), split in two")
    legend_outside(ax)
    save(fig, path)
    return fig
