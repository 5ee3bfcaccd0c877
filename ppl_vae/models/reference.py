"""The yardstick: the same VAE networks trained by a hand-written PyTorch loss, no Pyro.

:func:`reference_loss` is what a plain-PyTorch VAE computes (Kingma & Welling's estimator B
with one sample), with the VAE's own encoder scale head s (``--encoder-scale``)::

    (mu, h) = g(x),  sigma = s(h),  z = mu + sigma * eps,   eps ~ N(0, I)
    -ELBO = -log p(x|z) + KL(N(mu, sigma^2) || N(0, I)),
    KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 2 log sigma_j - 1)

summed over the batch, like the Pyro losses. Benchmarks and tests compare the Pyro program
against it in the same process, on the same data path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .vae import VAE, encoder_scale


def reference_loss(vae: VAE) -> Callable[[Tensor], Tensor]:
    """``x -> -ELBO`` (summed over rows) of ``vae``'s networks, by hand."""

    def loss(x: Tensor) -> Tensor:
        loc, h = vae.encoder(x).chunk(2, dim=-1)
        scale = encoder_scale(h, vae.scale_head)
        z = loc + scale * torch.randn_like(loc)
        out = vae.decoder(z)
        if vae.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(out, x, reduction="sum")
        else:
            s = vae.log_scale
            nll = (0.5 * ((x - out) / s.exp()) ** 2 + s + 0.5 * math.log(2 * math.pi)).sum()
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 2 * scale.log() - 1).sum()
        return nll + vae.beta * kl

    return loss
