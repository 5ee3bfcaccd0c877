"""p(x | decoder output) for pixel data, shared by the models, and bits per dimension.

``bernoulli`` and ``gaussian`` serve every family (:data:`LIKELIHOODS`); the discretized
logistic (:class:`DiscretizedLogistic`, ``logistic``) is a likelihood of 8-bit images, for
the families that name it among their choices (the convolutional VAE).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.util import broadcast_shape
from torch import Tensor

from ..errors import UsageError

LIKELIHOODS = ("bernoulli", "gaussian")  # The likelihoods of the MLP families (``vae``, ``cvae``).

LEVELS = 256  # Grey levels of an 8-bit subpixel: x in {0, 1/255, ..., 1}.

MIN_LOG_SCALE = -8.0
"""Floor of the discretized logistic's log scale (PixelCNN++ floors at e^-7 on [-1, 1], about
e^-7.7 on [0, 1]): s >= e^-8 = 3.4e-4 keeps (x - mu) / s moderate, and an interior bin
(width 1/255 = 11.7 s) can still hold tanh(1/(1020 s)) = 0.994 of the mass, 0.008 bits."""


class DiscretizedLogistic(dist.TorchDistribution):
    r"""One logistic per subpixel, discretized to the 256 levels ``x = k / 255``.

    With ``s = exp(log_scale)``, ``h = 0.5 / 255`` (half a bin) and ``F`` the logistic CDF
    ``sigma((x - loc) / s)``::

        P(x) = F(x + h) - F(x - h)        0 < x < 1
        P(0) = F(h)                       (the bottom bin takes the tail to -inf)
        P(1) = 1 - F(1 - h)               (the top bin takes the tail to +inf)

    so the 256 probabilities sum to 1 (Salimans et al. 2017, PixelCNN++; Kingma et al. 2016,
    IAF, on x in [0, 1] here). Log-probabilities are computed in softplus form, stably
    everywhere: with ``a = (x + h - loc) / s`` and ``b = (x - h - loc) / s``,
    ``sigma(a) - sigma(b) = sigma(a) (1 - sigma(b)) (1 - e^{b - a})``, hence::

        log P(x) = -softplus(-a) - softplus(b) + log(-expm1(-(a - b)))

    exact even deep in either tail; ``log P(0) = -softplus(-a)``, ``log P(1) = -softplus(b)``.
    A value is scored by the bin centred on it. Event shape () (``.to_event(1)`` for an
    image); not reparameterizable; ``log_scale`` is floored at :data:`MIN_LOG_SCALE`.
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, loc: Tensor, log_scale: Tensor, validate_args: bool | None = None
                 ) -> None:
        shape = broadcast_shape(loc.shape, log_scale.shape)
        self.loc = loc.expand(shape)
        self.log_scale = log_scale.clamp(min=MIN_LOG_SCALE).expand(shape)
        super().__init__(torch.Size(shape), torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> DiscretizedLogistic:
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.log_scale = self.log_scale.expand(batch_shape)
        super(DiscretizedLogistic, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        half = 0.5 / (LEVELS - 1)
        inv_s = torch.exp(-self.log_scale)
        centred = value - self.loc
        a = (centred + half) * inv_s  # upper edge of the bin, standardized
        b = (centred - half) * inv_s  # lower edge
        width = 2 * half * inv_s  # a - b, without the rounding of a difference
        bottom, top = -F.softplus(-a), -F.softplus(b)
        interior = bottom + top + torch.log(-torch.expm1(-width))
        return torch.where(value < half, bottom, torch.where(value > 1 - half, top, interior))

    def sample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
            y = self.loc + self.scale * (u.log() - torch.log1p(-u))
            return (y * (LEVELS - 1)).round().clamp(0, LEVELS - 1) / (LEVELS - 1)

    @property
    def mean(self) -> Tensor:
        """E[x] = sum_{k=1}^{255} P(x >= k/255) / 255, summed level by level (memory of one
        image batch, not 255 of them)."""
        total = torch.zeros_like(self.loc)
        inv_s = torch.exp(-self.log_scale)
        for k in range(1, LEVELS):
            total = total + torch.sigmoid((self.loc - (k - 0.5) / (LEVELS - 1)) * inv_s)
        return total / (LEVELS - 1)


def pixel_likelihood(out: Tensor, kind: str, log_scale: Tensor,
                     mask: Tensor | None = None) -> dist.TorchDistribution:
    """Independent pixels with event shape (D,): ``Bernoulli(logits=out)``,
    ``Normal(out, exp(log_scale))`` or ``DiscretizedLogistic(out, log_scale)`` (``logistic``,
    ``log_scale`` one per pixel or broadcast). Pixels where ``mask`` is False do not enter
    log p."""
    if kind == "bernoulli":
        # validate_args=False: grey-level targets in [0, 1] are allowed, as in Pyro's and
        # PyTorch's VAE examples (log p = -BCE, a cross-entropy, not a density).
        d = dist.Bernoulli(logits=out, validate_args=False)
    elif kind == "logistic":
        d = DiscretizedLogistic(out, log_scale)
    else:
        d = dist.Normal(out, log_scale.exp().expand_as(out))
    if mask is not None:
        d = d.mask(mask)
    return d.to_event(1)


def pixel_mean(out: Tensor, kind: str, log_scale: Tensor | None = None) -> Tensor:
    """E[x | decoder output]: pixel probabilities (Bernoulli), means (Gaussian), or the
    discretized logistic's exact mean."""
    if kind == "logistic":
        return DiscretizedLogistic(out, log_scale).mean
    return torch.sigmoid(out) if kind == "bernoulli" else out


def check_range(data, likelihood: str) -> None:
    """:class:`UsageError` unless a Bernoulli or discretized logistic likelihood gets data in
    [0, 1]; 8-bit (uint8) rows count as their pixels ``x / 255``, in [0, 1] by definition."""
    needs = {"bernoulli": "the Bernoulli likelihood needs [0, 1]",
             "logistic": "the discretized logistic likelihood needs 8-bit levels (uint8) or "
                         "pixels in [0, 1]"}
    if likelihood not in needs or data.train.x.dtype == torch.uint8:
        return
    lo, hi = data.train.x.min().item(), data.train.x.max().item()
    if lo < 0 or hi > 1:
        raise UsageError(f"{data.name}: the data lie in [{lo:g}, {hi:g}] but {needs[likelihood]}"
                         "; rescale them (e.g. x / 255) or use --likelihood 'gaussian'")


def bits_per_dim(log_likelihood: float, dims: int, offset: float = 0.0) -> float:
    """Bits per dimension of a bound on log p(x) in nats per image over ``dims`` subpixels:
    ``(offset * dims - log_likelihood) / (dims ln 2)``. ``offset`` (nats per dimension)
    turns a density of pixels x / 255 into a probability of the 8-bit levels: ln 255 (the
    bin width is 1/255), :data:`GAUSSIAN_OFFSET`."""
    return (offset * dims - log_likelihood) / (dims * math.log(2))


GAUSSIAN_OFFSET = math.log(LEVELS - 1)
"""ln 255: a density on pixels x = k/255 times the bin width 1/255 approximates the
probability of level k (midpoint rule), so -log2 P(k) ~ (-ln p(x) + ln 255) / ln 2."""

