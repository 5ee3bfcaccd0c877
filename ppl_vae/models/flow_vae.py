"""The VAE with a normalizing-flow posterior (``--model flow-vae --flow iaf|spline
--flow-layers K``), a family of its own on the VAE's generative model (:mod:`.vae`).

The guide pushes the encoder's diagonal Normal through K invertible transforms, each
conditioned on the encoder's last hidden layer h(x)::

    (mu, sigma, h) = g(x)
    z_0 ~ Normal(mu(x), diag sigma(x)^2)
    z_k = f_k(z_{k-1}; h(x)),   k = 1..K,            z = z_K
    log q(z|x) = log Normal(z_0; mu, sigma) - sum_k log |det d f_k / d z_{k-1}|

with f_k from :mod:`pyro.distributions.transforms`: ``iaf``, the gated inverse
autoregressive flow (Kingma et al. 2016), ``z_k = s * z_{k-1} + (1 - s) * m`` with
``(m, logit s) = MADE(z_{k-1}, h)``, ``s = sigmoid(logit s + 2)``, one MADE hidden layer of
10 d units; or ``spline``, a rational-quadratic autoregressive spline (Durkan et al. 2019),
8 bins on [-3, 3], two hidden layers of 10 d units. Layers are separated by a reversal of z.
``--elbo analytic`` has no closed-form KL for a flow: it uses ``log q - log p`` at the
sampled z, as ``mc`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.nn import ConditionalAutoRegressiveNN
from torch import Tensor, nn

from .registry import register_model
from .vae import VAE, VAEOptions, loc_scale

FLOWS = ("iaf", "spline")

ANALYTIC_NOTE = ("--elbo analytic with --flow {flow}: the KL of a flow posterior to p(z) has "
                 "no closed form; TraceMeanField_ELBO uses the Monte Carlo log q(z|x) - log "
                 "p(z) at the sampled z for it, the same estimate as --elbo mc")


def flow_layer(kind: str, z_dim: int, context_dim: int) -> nn.Module:
    """One conditional transform of ``kind`` (``iaf``, else ``spline``) on R^z_dim, conditioned
    on a context of ``context_dim`` features; the MADE orders the variables 1..d."""
    order = torch.arange(z_dim)
    if kind == "iaf":  # T.conditional_affine_autoregressive with a fixed order
        arn = ConditionalAutoRegressiveNN(z_dim, context_dim, [10 * z_dim], permutation=order)
        return T.ConditionalAffineAutoregressive(arn, stable=True)
    bins = 8  # spline: T.conditional_spline_autoregressive with a fixed order
    arn = ConditionalAutoRegressiveNN(z_dim, context_dim, [10 * z_dim, 10 * z_dim],
                                      param_dims=[bins, bins, bins - 1, bins], permutation=order)
    return T.ConditionalSplineAutoregressive(z_dim, arn, count_bins=bins, bound=3.0,
                                             order="linear")


@dataclass
class FlowVAEOptions(VAEOptions):
    """The flow VAE's options (``--model flow-vae``): the VAE's and the flow's."""

    flow: str = field(default="iaf", metadata={
        "help": "the normalizing flow q(z|x) is pushed through, conditioned on the encoder's "
                "hidden layer: iaf (inverse autoregressive, Kingma et al. 2016), spline "
                "(rational-quadratic autoregressive spline)", "choices": FLOWS})
    flow_layers: int = field(default=2, metadata={
        "help": "transforms in the flow (reversing z between them)", "least": 1})


@register_model("flow-vae")
class FlowVAE(VAE):
    """VAE whose q(z|x) is the encoder's Normal pushed through ``flow_layers`` conditional
    transforms of ``flow``; ``vae.flows`` holds their networks. ``encode`` (the VAE's) gives
    the location and scale of the *base* Normal, before the flow."""

    Options = FlowVAEOptions

    def __init__(self, input_dim: int, options: FlowVAEOptions | None = None,
                 **changes: Any) -> None:
        super().__init__(input_dim, options, **changes)
        self.flow, self.flow_layers = self.options.flow, self.options.flow_layers
        self.estimators = {"analytic": ("note", ANALYTIC_NOTE.format(flow=self.flow))}
        context_dim = self.encoder[-1].in_features  # the last hidden layer's width
        self.flows = nn.ModuleList(flow_layer(self.flow, self.z_dim, context_dim)
                                   for _ in range(self.flow_layers))
        self.register_buffer("reverse", torch.arange(self.z_dim - 1, -1, -1), persistent=False)

    @property
    def guide_name(self) -> str:
        """``iaf-2`` etc.: the flow and its number of layers."""
        return f"{self.flow}-{self.flow_layers}"

    # -- the guide ---------------------------------------------------------------------------
    def guide(self, x: Tensor) -> None:
        """q(z|x): the encoder's Normal through the flow conditioned on h(x)."""
        with pyro.plate("data", x.shape[0], device=x.device):
            loc, scale, h = self.encode_context(x)
            with poutine.scale(scale=self.beta):
                pyro.sample("z", self.posterior(loc, scale, h))

    def encode_context(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Location and scale of the base Normal of q(z|x), and the flow's context h(x)."""
        h = self.encoder[:-1](x)
        return *loc_scale(self.encoder[-1](h), self.scale_head), h

    def transforms(self, h: Tensor) -> list:
        """The flow's transforms conditioned on the context ``h``, reversals between."""
        out: list = []
        for i, layer in enumerate(self.flows):
            if i:
                out.append(T.Permute(self.reverse))
            out.append(layer.condition(h))
        return out

    def posterior(self, loc: Tensor, scale: Tensor, h: Tensor) -> dist.TransformedDistribution:
        """Normal(loc, scale) (event dim 1) pushed through the flow conditioned on ``h``."""
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1),
                                            self.transforms(h))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x|z] at z = f_K(...f_1(mu(x))): the base Normal's mean through the flow."""
        loc, _, h = self.encode_context(x)
        return self.decode(T.ComposeTransform(self.transforms(h))(loc))
