"""The yardstick: the same VAE networks trained by a hand-written PyTorch loss, no Pyro.

:func:`reference_loss` is what a plain-PyTorch VAE computes (Kingma & Welling's estimator B
with one sample), with the VAE's own encoder scale head s (``--encoder-scale``)::

    (mu, h) = g(x),  sigma = s(h),  z = mu + sigma * eps,   eps ~ N(0, I)
    -ELBO = -log p(x|z) + KL(N(mu, sigma^2) || N(0, I)),
    KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 2 log sigma_j - 1)

summed over the batch, like the Pyro losses. :func:`cvae_reference_loss` is the same for the
CVAE (Bernoulli pixels), with the prior network's Normal in place of N(0, I). Benchmarks and
tests compare the Pyro programs against them in the same process, on the same data path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ppl_vae.models.cvae import CVAE
from ppl_vae.models.vae import VAE, encoder_scale


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


def cvae_reference_loss(cvae: CVAE) -> Callable[[Tensor, Tensor], Tensor]:
    """``(c, y) -> -ELBO`` (summed over rows) of ``cvae``'s networks, by hand (Bernoulli
    likelihood on the target pixels)::

        -ELBO = -log p(y|c,z) + KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)),   z ~ q(z|c,y)
        KL = sum_j log(sigma_p/sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2
    """
    if cvae.likelihood != "bernoulli":
        raise ValueError("the reference CVAE loss is written for Bernoulli pixels")

    def loss(c: Tensor, y: Tensor) -> Tensor:
        inputs = c
        if cvae.baseline_input:
            with torch.no_grad():
                inputs = torch.cat([c, torch.sigmoid(cvae.baseline(c))], -1)
        p_loc, p_log = cvae.prior_net(inputs).chunk(2, dim=-1)
        seen = y if cvae.target is None else y * cvae.target
        q_loc, q_log = cvae.recognition_net(torch.cat([c, seen], -1)).chunk(2, dim=-1)
        z = q_loc + q_log.exp() * torch.randn_like(q_loc)
        logits = cvae.generation_net(torch.cat([c, z], -1))
        nll = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        if cvae.target is not None:
            nll = nll * cvae.target
        kl = (p_log - q_log + ((2 * q_log).exp() + (q_loc - p_loc) ** 2)
              / (2 * (2 * p_log).exp()) - 0.5)
        return nll.sum() + cvae.beta * kl.sum()

    return loss
