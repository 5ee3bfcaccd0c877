"""The variational autoencoder as a Pyro model and guide (Kingma & Welling 2014).

Generative model, for each of the N data points (``pyro.plate("data")``)::

    z ~ p(z)   = Normal(0, I_d)
    x ~ p(x|z) = Bernoulli(logits = f(z))          (--likelihood bernoulli)
               | Normal(f(z), sigma^2 I)            (--likelihood gaussian; sigma fixed or learned)

Guide (the encoder, amortized variational posterior)::

    q(z|x) = Normal(mu(x), diag sigma(x)^2),   (mu, h) = g(x),   sigma = s(h)

with f, g MLPs and the scale head s of ``--encoder-scale``: ``softplus`` sigma = log(1 +
e^h) (the default, docs/results/encoder-scale.md), ``logvar`` sigma = exp(h / 2),
``logscale`` sigma = exp(h). SVI maximizes ``ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) ||
p(z))``; beta scales the site ``z`` (``poutine.scale``) in model and guide. The weights are
the module's own parameters; for ``pyro.infer.SVI`` register them with
:func:`ppl_vae.inference.svi.with_params`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import Tensor, nn

from ..data import pixels
from ..errors import UsageError
from .base import Model
from .likelihoods import check_range, pixel_likelihood, pixel_mean
from .nets import LatentOptions, NetworkOptions, mlp
from .options import build_by_signature, with_changes
from .registry import register_model

if TYPE_CHECKING:
    from ..data import Dataset

ENCODER_SCALES = ("logvar", "logscale", "softplus")


def encoder_scale(h: Tensor, kind: str) -> Tensor:
    """sigma from the encoder's second head ``h``: exp(h/2), exp(h) or softplus(h)."""
    if kind == "logvar":
        return (0.5 * h).exp()
    if kind == "logscale":
        return h.exp()
    return F.softplus(h)


def loc_scale(out: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(loc, sigma) of a Normal from a network's output: its first half, and sigma of
    ``kind`` (:func:`encoder_scale`) from its second half."""
    loc, h = out.chunk(2, dim=-1)
    return loc, encoder_scale(h, kind)


@dataclass
class ScaleOptions(LatentOptions):
    """:class:`LatentOptions` of a family with a Normal encoder's scale head and a Gaussian
    likelihood whose sigma may be learned."""

    learn_scale: bool = field(default=False, metadata={
        "help": "learn the sigma of --likelihood gaussian (--gaussian-scale: its initial value)"})
    encoder_scale: str = field(default="softplus", metadata={
        "help": "encoder's scale head: softplus sigma=softplus(h), logvar sigma=exp(h/2), "
                "logscale sigma=exp(h)", "choices": ENCODER_SCALES})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.learn_scale and self.likelihood != "gaussian":
            raise UsageError("--learn-scale learns the sigma of --likelihood 'gaussian'; add that "
                             "or drop --learn-scale")


@dataclass
class VAEOptions(NetworkOptions, ScaleOptions):
    """The VAE's options (``--model vae``)."""


class GaussianLatentVAE(Model):
    """What every VAE family with z ~ Normal(0, I) and an amortized Normal guide shares: the
    program p(z) p(x|z) q(z|x), the prior, p(x|z), E[x|z], reconstructions and prior samples,
    all in terms of the family's ``encode(x) -> (loc, scale)`` and ``decoder_out(z) -> (loc,
    log_scale)`` of p(x|z). Rows may be 8-bit (uint8): the observed site gets
    :func:`~ppl_vae.data.pixels` of them."""

    def __init__(self, options: ScaleOptions, input_dim: int, likelihood: str) -> None:
        """Keep ``options`` and set ``log_scale``, log sigma of the Gaussian likelihood: a
        parameter with ``learn_scale``, else a buffer."""
        super().__init__()
        self.options, self.input_dim, self.likelihood = options, input_dim, likelihood
        self.z_dim, self.beta, self.scale_head = options.z_dim, options.beta, options.encoder_scale
        log_scale = torch.tensor(math.log(options.gaussian_scale))
        if options.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @classmethod
    def from_options(cls, options: ScaleOptions, data: Dataset, **known: Any
                     ) -> GaussianLatentVAE:
        check_range(data, options.likelihood)
        return build_by_signature(cls, options, data, **known)

    # -- the probabilistic program -------------------------------------------------------------
    def model(self, x: Tensor) -> None:
        """p(z) p(x|z) for a batch ``x`` of shape (N, D)."""
        with pyro.plate("data", x.shape[0], device=x.device):
            with poutine.scale(scale=self.beta):
                z = pyro.sample("z", self.prior(x.shape[0]).to_event(1))
            pyro.sample("x", self.likelihood_dist(z), obs=pixels(x))

    def guide(self, x: Tensor) -> None:
        """q(z|x), the diagonal Normal of ``encode``."""
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
        loc, log_scale = self.decoder_out(z)
        return pixel_likelihood(loc, self.likelihood, log_scale)

    def decode(self, z: Tensor) -> Tensor:
        """E[x|z], (..., D): pixel probabilities (Bernoulli), means (Gaussian), or the
        discretized logistic's exact mean."""
        loc, log_scale = self.decoder_out(z)
        return pixel_mean(loc, self.likelihood, log_scale)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x|z] at the posterior mean z = mu(x)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """E[x|z] for ``n`` draws z ~ p(z), shape (n, D)."""
        return self.decode(self.prior(n).sample())


@register_model("vae")
class VAE(GaussianLatentVAE):
    """VAE with MLP encoder ``D -> hidden -> 2d`` and decoder ``d -> reversed(hidden) -> D``."""

    Options = VAEOptions

    def __init__(self, input_dim: int, options: VAEOptions | None = None,
                 **changes: Any) -> None:
        """A VAE of ``input_dim`` pixels with ``options``, some set by keyword:
        ``VAE(784, z_dim=8)``."""
        o = with_changes(self.Options, options, changes)
        super().__init__(o, input_dim, o.likelihood)
        self.encoder = mlp([input_dim, *o.hidden, 2 * o.z_dim], o.activation)
        self.decoder = mlp([o.z_dim, *reversed(o.hidden), input_dim], o.activation)

    def decoder_out(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's output (logits or means) and the log-scale of p(x|z)."""
        return self.decoder(z), self.log_scale

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Location and scale of q(z|x)."""
        return loc_scale(self.encoder(x), self.scale_head)
