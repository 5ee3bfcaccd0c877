"""p(x | decoder output) for pixel data, shared by the models."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor

from ..errors import UsageError

LIKELIHOODS = ("bernoulli", "gaussian")


def pixel_likelihood(out: Tensor, kind: str, log_scale: Tensor,
                     mask: Tensor | None = None) -> dist.TorchDistribution:
    """Independent pixels with event shape (D,): ``Bernoulli(logits=out)`` or
    ``Normal(out, exp(log_scale))``. Pixels where ``mask`` is False do not enter log p."""
    if kind == "bernoulli":
        # validate_args=False: grey-level targets in [0, 1] are allowed, as in Pyro's and
        # PyTorch's VAE examples (log p = -BCE, a cross-entropy, not a density).
        d = dist.Bernoulli(logits=out, validate_args=False)
    else:
        d = dist.Normal(out, log_scale.exp().expand_as(out))
    if mask is not None:
        d = d.mask(mask)
    return d.to_event(1)


def pixel_mean(out: Tensor, kind: str) -> Tensor:
    """E[x | decoder output]: pixel probabilities (Bernoulli) or means (Gaussian)."""
    return torch.sigmoid(out) if kind == "bernoulli" else out


def check_range(data, likelihood: str) -> None:
    """:class:`UsageError` unless a Bernoulli likelihood gets data in [0, 1]."""
    if likelihood != "bernoulli":
        return
    lo, hi = data.train.x.min().item(), data.train.x.max().item()
    if lo < 0 or hi > 1:
        raise UsageError(f"{data.name}: the data lie in [{lo:g}, {hi:g}] but the Bernoulli "
                         "likelihood needs [0, 1]; rescale them (e.g. x / 255) or use "
                         "--likelihood gaussian")
