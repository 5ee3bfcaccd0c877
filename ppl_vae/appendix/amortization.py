"""How good is the amortized posterior q(z|x)? (Cremer, Li & Duvenaud 2018)

For each image x of a trained VAE::

    log p(x)  >=  ELBO(q*_x)  >=  ELBO(q_phi(.|x))

where q*_x is the best member of the guide's family for that image alone (non-amortized SVI
on its own parameters, the decoder fixed) and q_phi the encoder; log p(x) is the IWAE bound
with many samples from q*_x. The approximation gap log p(x) - ELBO(q*_x) is the price of the
family (a lower bound on it, the IWAE estimate being below log p(x)); the amortization gap
ELBO(q*_x) - ELBO(q_phi) the price of one encoder for all images.

q*_x is a free diagonal Normal per image for the Normal guide; for a flow guide
(:class:`~ppl_vae.models.flow_vae.FlowVAE`) a free base Normal *and* flow context h per
image through the trained, fixed flow networks (a subset of Cremer et al.'s per-image flows,
so the approximation gap here is an upper estimate of theirs), and the best diagonal Normal
as well (``elbo_optimal_normal``). Also: the PSIS diagnostic k-hat of q_phi(z|x) per image
(k < 0.5 good, > 0.7 unreliable), and NUTS draws from the true p(z|x) to set beside q.
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
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


Q_STAR = {"normal": "per-image diagonal Normal (loc, scale)",
          "flow": "per-image base Normal (loc, scale) and flow context h; flow networks fixed"}
"""The families of q*_x, by name."""


def is_flow(vae: nn.Module) -> bool:
    """Whether ``vae``'s guide is a flow (it has a flow VAE's ``posterior``, ``encode_context``)."""
    return all(callable(getattr(vae, name, None)) for name in ("posterior", "encode_context"))


def guide_dist(vae: nn.Module, x: Tensor) -> dist.TorchDistribution:
    """The amortized q(z|x) of ``vae`` for the rows of ``x`` (batch shape (N,), event (d,))."""
    if is_flow(vae):
        return vae.posterior(*vae.encode_context(x))
    loc, scale = vae.encode(x)
    return dist.Normal(loc, scale).to_event(1)


class LocalGuide(nn.Module):
    """q*_x for every row of ``x``, started at the encoder's q(z|x).

    ``family`` ``normal``: a free diagonal Normal per image (for a flow guide started at the
    mean and sd of 256 draws of q_phi); ``flow`` (a flow VAE's default): a free base Normal
    and context h per image, pushed through ``vae``'s flow (its weights fixed)."""

    def __init__(self, vae: nn.Module, x: Tensor, family: str | None = None, seed: int = 0) -> None:
        super().__init__()
        family = family or ("flow" if is_flow(vae) else "normal")
        if family not in Q_STAR:
            raise ValueError(f"family must be one of {', '.join(Q_STAR)}, got {family!r}")
        if family == "flow" and not is_flow(vae):
            raise ValueError("family 'flow' needs a VAE with a flow guide (--model flow-vae)")
        self.family = family
        context = None
        with torch.no_grad():
            if family == "flow":
                loc, scale, context = vae.encode_context(x)
            elif is_flow(vae):  # the moments of the flow's q(z|x)
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    draws = guide_dist(vae, x).sample((256,))
                loc, scale = draws.mean(0), draws.std(0)
            else:
                loc, scale = vae.encode(x)
        self.loc = nn.Parameter(loc.clone())
        self.log_scale = nn.Parameter(scale.log().clone())
        self.context = None if context is None else nn.Parameter(context.clone())
        self._vae = (vae,)  # not a submodule: its weights stay fixed

    def model(self, x: Tensor, rows: Tensor) -> None:
        self._vae[0].model(x)

    def guide(self, x: Tensor, rows: Tensor) -> None:
        """q*(z | x_i) for the images ``x`` at positions ``rows`` of the fitted batch (so
        that :func:`ppl_vae.score` can take them in chunks)."""
        with pyro.plate("data", x.shape[0], device=x.device):
            loc, scale = self.loc[rows], self.log_scale[rows].exp()
            if self.context is None:
                fn = dist.Normal(loc, scale).to_event(1)
            else:
                fn = self._vae[0].posterior(loc, scale, self.context[rows])
            pyro.sample("z", fn)


def optimize_local(vae: nn.Module, x: Tensor, steps: int = 500, lr: float = 0.05,
                   particles: int = 16, seed: int = 0, family: str | None = None) -> LocalGuide:
    """Fit q*_x for every row of ``x`` at once (each image's ELBO depends only on its own
    parameters, so one SVI over the batch optimizes them all). ``family``: see
    :class:`LocalGuide` (default: the guide's own). The Normal's KL is in closed form; a
    flow's is estimated by Monte Carlo (TraceMeanField_ELBO falls back to log q - log p)."""
    local = LocalGuide(vae, x, family, seed=seed)
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
    """Per-image log p(x) (IWAE), ELBO(q*), ELBO(q_phi), the two gaps, and PSIS k-hat (see
    the module). q* is of the guide's own family (``q_star``) and is the IWAE proposal; for
    a flow guide ``elbo_optimal_normal`` is the best diagonal Normal's (else ``elbo_optimal``).
    log p(x) >= ELBO(q*) >= ELBO(q_phi) holds in expectation."""
    if getattr(vae, "beta", 1.0) != 1.0:  # PSIS and NUTS score the beta-scaled program
        raise UsageError("the posterior diagnostics need a VAE trained with beta = 1")
    vae.eval()
    local = optimize_local(vae, x, steps=steps, seed=seed)
    flow = local.family == "flow"
    rows = torch.arange(len(x), device=x.device)
    log_px = score(local, x, rows, num_samples=iwae_samples, iwae=True, seed=seed)
    best = score(local, x, rows, num_samples=elbo_samples, seed=seed + 1)
    amortized = score(vae, x, num_samples=elbo_samples, seed=seed + 2)
    best_normal = best
    if flow:
        normal = optimize_local(vae, x, steps=steps, seed=seed, family="normal")
        best_normal = score(normal, x, rows, num_samples=elbo_samples, seed=seed + 3)
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # psis warns when k-hat is large: we report it
        khat = [float(psis_diagnostic(vae.model, vae.guide, x[i:i + 1],
                                      num_particles=psis_particles, max_plate_nesting=1))
                for i in range(len(x))]
    per_image = {"log_px_iwae": log_px.iwae, "elbo_optimal": best.elbo,
                 "elbo_optimal_normal": best_normal.elbo, "elbo_amortized": amortized.elbo}
    means = {k: v.mean().item() for k, v in per_image.items()}
    return {
        "guide": getattr(vae, "guide_name", "flow") if flow else "normal",  # a flow's: iaf-2
        "q_star": Q_STAR[local.family], "images": len(x), "iwae_samples": iwae_samples,
        "elbo_samples": elbo_samples, "local_steps": steps, **means,
        "approximation_gap": means["log_px_iwae"] - means["elbo_optimal"],
        "amortization_gap": means["elbo_optimal"] - means["elbo_amortized"],
        "psis_khat_mean": float(np.mean(khat)), "psis_khat_above_0.7": sum(k > 0.7 for k in khat),
        "per_image": {**{k: v.tolist() for k, v in per_image.items()}, "psis_khat": khat},
    }


def true_posterior(vae: nn.Module, x: Tensor, num_samples: int = 500, seed: int = 0,
                   warmup_steps: int = 300):
    """NUTS draws from p(z | x) for one image ``x`` (shape (1, D)), decoder fixed."""
    with frozen(vae):
        return nuts(vae.model, x, num_samples=num_samples, warmup_steps=warmup_steps,
                    num_chains=2, seed=seed)


def posterior_figure(vae: nn.Module, images: Tensor, path: str | Path,
                     num_samples: int = 500, seed: int = 0, warmup_steps: int = 300) -> Figure:
    """For 2-D latents: NUTS draws of p(z|x) (ArviZ KDE) with q(z|x)'s draws on top."""
    az = arviz()
    fig = Figure(figsize=(3.2 * len(images) + 1.2, 3.3), layout="constrained")
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    for i, (ax, x) in enumerate(zip(axes, images, strict=True)):
        idata = true_posterior(vae, x[None], num_samples, seed + i, warmup_steps)
        z = idata.posterior["z"].values.reshape(-1, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            az.plot_kde(z[:, 0], z[:, 1], ax=ax, contourf_kwargs={"cmap": "Blues"})
        with torch.no_grad():
            q = guide_dist(vae, x[None]).sample((num_samples,))[:, 0].cpu()
        ax.scatter(q[:, 0], q[:, 1], s=3, c="C3", alpha=0.4, label="q(z|x)")
        ax.set(title=f"image {i}", xlabel="z1", ylabel="z2")
    shaded = Patch(color=colormaps["Blues"](0.6), label="p(z|x), NUTS (KDE)")
    handles, _ = axes[-1].get_legend_handles_labels()
    legend_outside(axes[-1], handles=[shaded, *handles], markerscale=3)
    fig.suptitle("true posterior p(z|x) (NUTS, shaded) and the encoder's q(z|x) (red)")
    return save(fig, path)


GUIDE_COLOURS = {"normal": "C0", "iaf": "C1", "spline": "C2"}
"""One colour per kind of guide, the same in every figure (other kinds: C3, C4, ...)."""


def guide_colour(guide: str) -> str:
    """The colour of ``guide`` (``normal``, ``iaf-2``, ...): by its kind, before the ``-``."""
    return GUIDE_COLOURS.setdefault(guide.split("-")[0], f"C{len(GUIDE_COLOURS)}")


def gaps_figure(results: dict[str, dict], path: str | Path) -> Figure:
    """Approximation and amortization gaps (nats per image), one stacked bar per model,
    coloured by its guide: the approximation gap solid, the amortization gap hatched."""
    names = list(results)
    fig = Figure(figsize=(1.8 * len(names) + 4.5, 3.4), layout="constrained")
    ax = fig.subplots()
    guides = [results[n].get("guide", "normal") for n in names]
    colours = [guide_colour(g) for g in guides]
    approx = [results[n]["approximation_gap"] for n in names]
    amort = [results[n]["amortization_gap"] for n in names]
    ax.bar(names, approx, color=colours, edgecolor="black", linewidth=0.5)
    ax.bar(names, amort, bottom=approx, color=colours, alpha=0.45, hatch="//",
           edgecolor="black", linewidth=0.5)
    ax.set(xlabel="trained model (run)", ylabel="nats per image",
           title="log p(x) - ELBO(q_phi), split in two")
    handles = [Patch(facecolor=guide_colour(g), edgecolor="black", label=f"guide: {g}")
               for g in dict.fromkeys(guides)]
    handles += [Patch(facecolor="0.6", edgecolor="black",
                      label="approximation gap: log p(x) - ELBO(q*)"),
                Patch(facecolor="0.6", alpha=0.45, hatch="//", edgecolor="black",
                      label="amortization gap: ELBO(q*) - ELBO(q_phi)")]
    legend_outside(ax, handles=handles)
    return save(fig, path)
