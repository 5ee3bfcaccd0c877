"""The variational autoencoder as a Pyro model and guide (Kingma & Welling 2014).

Generative model, for each of the N data points (``pyro.plate("data")``)::

    z ~ p(z)   = Normal(0, I_d)
    x ~ p(x|z) = Bernoulli(logits = f(z))          (--likelihood bernoulli)
               | Normal(f(z), sigma^2 I)            (--likelihood gaussian; sigma fixed or learned)

Guide (the encoder, amortized variational posterior)::

    q(z|x) = Normal(mu(x), diag sigma(x)^2),   (mu, log sigma) = g(x)

with f, g multilayer perceptrons. SVI maximizes
``ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) || p(z))`` (or, with ``--elbo iwae``, the
importance-weighted bound); beta != 1 (a beta-VAE) scales the latent site ``z`` with
``poutine.scale`` in both model and guide, so every ELBO estimator in Pyro sees it.

The networks' weights are the module's own parameters (``vae.parameters()``), optimized by
:mod:`ppl_vae.training`; nothing goes through Pyro's param store in the hot loop. For
``pyro.infer.SVI`` with a ``pyro.optim`` optimizer, register them first with
:func:`ppl_vae.training.with_params`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from .likelihoods import pixel_likelihood, pixel_mean
from .nets import mlp
from .registry import register_model

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..data import Dataset


@register_model("vae")
class VAE(nn.Module):
    """VAE with MLP encoder ``D -> hidden -> 2d`` and decoder ``d -> reversed(hidden) -> D``."""

    def __init__(
        self,
        input_dim: int,
        z_dim: int = 20,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        likelihood: str = "bernoulli",
        gaussian_scale: float = 1.0,
        learn_scale: bool = False,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        self.input_dim, self.z_dim, self.likelihood, self.beta = (
            input_dim, z_dim, likelihood, beta)
        self.encoder = mlp([input_dim, *hidden, 2 * z_dim], activation)
        self.decoder = mlp([z_dim, *reversed(hidden), input_dim], activation)
        log_scale = torch.tensor(math.log(gaussian_scale))
        if likelihood == "gaussian" and learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @classmethod
    def from_config(cls, config: TrainConfig, data: Dataset) -> VAE:
        return cls(data.input_dim, config.z_dim, config.hidden, config.activation,
                   config.likelihood, config.gaussian_scale, config.learn_scale, config.beta)

    # -- the probabilistic program -------------------------------------------------------------
    def model(self, x: Tensor) -> None:
        """p(z) p(x|z) for a batch ``x`` of shape (N, D)."""
        with pyro.plate("data", x.shape[0], device=x.device):
            with poutine.scale(scale=self.beta):
                z = pyro.sample("z", self.prior(x.shape[0]).to_event(1))
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x: Tensor) -> None:
        """q(z|x), a diagonal Normal from the encoder."""
        with pyro.plate("data", x.shape[0], device=x.device):
            loc, scale = self.encode(x)
            with poutine.scale(scale=self.beta):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # -- pieces, and what a user calls ---------------------------------------------------------
    def prior(self, n: int) -> dist.Normal:
        """p(z) = Normal(0, I) for ``n`` points (batch shape (n, d))."""
        zeros = self.log_scale.new_zeros(n, self.z_dim)
        return dist.Normal(zeros, torch.ones_like(zeros))

    def likelihood_dist(self, z: Tensor) -> dist.TorchDistribution:
        """p(x|z) with event shape (D,); ``z`` may carry extra leading (particle) dims."""
        return pixel_likelihood(self.decoder(z), self.likelihood, self.log_scale)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Location and scale of q(z|x)."""
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        return loc, log_scale.exp()

    def decode(self, z: Tensor) -> Tensor:
        """E[x|z]: pixel probabilities (Bernoulli) or means (Gaussian)."""
        return pixel_mean(self.decoder(z), self.likelihood)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x|z] at the posterior mean z = mu(x)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """E[x|z] for ``n`` draws z ~ p(z), shape (n, D)."""
        return self.decode(self.prior(n).sample())
