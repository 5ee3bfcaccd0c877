"""The convolutional VAE (``--model conv-vae``): the VAE of :mod:`.vae` with DCGAN-style
convolutional networks, for images of any shape (C, H, W), grey or colour, float or 8-bit.

Generative model, for each of the N images (``pyro.plate("data")``), flattened in C, H, W
order to D = C*H*W subpixels (event shape (D,))::

    z ~ p(z)   = Normal(0, I_d)
    x ~ p(x|z) = Bernoulli(logits = f(z))              (--likelihood bernoulli)
               | Normal(f(z), sigma^2 I)                (gaussian; sigma fixed or learned)
               | DiscretizedLogistic(m(z), exp(l(z)))   (logistic: 256 levels per subpixel)

The guide is the VAE's, ``q(z|x) = Normal(mu(x), diag sigma(x)^2)``, ``(mu, h) = g(x)``,
``sigma = s(h)``; here g is L convolutions (4x4, stride 2, padding 1: n -> floor(n / 2)),
``--channels`` c_1..c_L, L the halvings that keep the smaller side >= 4 (28 -> 14 -> 7;
32 -> 4; an image below 8: L = 0), then a linear map to 2d. The decoder f mirrors it with
transposed convolutions (``output_padding`` 1 where the encoder floored an odd side) to C
output channels (2C for the logistic: m and l per subpixel).

Bits per dimension of a bound on log p(x) (``test_bpd_elbo``, ``test_bpd_iwae``):
``bpd = -bound / (D ln 2)`` for the discretized logistic (an upper bound); the Gaussian's
density of x / 255 adds log2(255) per subpixel (an approximation); the Bernoulli has none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..data import pixels
from ..errors import UsageError
from .base import RunContext
from .likelihoods import GAUSSIAN_OFFSET, LIKELIHOODS, bits_per_dim
from .nets import ACTIVATIONS
from .options import with_changes
from .registry import register_model
from .vae import GaussianLatentVAE, ScaleOptions, loc_scale

if TYPE_CHECKING:
    from ..data import Dataset

CONV_LIKELIHOODS = (*LIKELIHOODS, "logistic")
AUTO = "auto"  # The default likelihood: ``logistic`` for 8-bit data, ``bernoulli`` otherwise.
KERNEL, STRIDE, PADDING = 4, 2, 1
MIN_SIDE = 4  # The encoder halves the image while its smaller side stays at least this.
LOGISTIC_INIT = (0.5, -2.0)
"""The discretized logistic's initial location and log-scale (the decoder's last biases):
mid-grey with s = e^-2, sd s pi / sqrt(3) = 0.25, near a uniform pixel's 0.29 (untrained:
8.6 bits/dim on sample-patches, against 9.6 with location 0 and s = 1)."""


def conv_sides(h: int, w: int) -> list[tuple[int, int]]:
    """The feature map sides of the encoder, from (h, w) down: halved (floor) while the
    smaller side of the result is at least :data:`MIN_SIDE`."""
    sides = [(h, w)]
    while min(sides[-1]) // 2 >= MIN_SIDE:
        a, b = sides[-1]
        sides.append((a // 2, b // 2))
    return sides


def image_chw(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) from ``image_shape`` (C, H, W), or (H, W) for a greyscale image."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"the convolutional VAE needs images of shape (C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


@dataclass
class ConvVAEOptions(ScaleOptions):
    """The convolutional VAE's options (``--model conv-vae``)."""

    z_dim: int = field(default=32, metadata={"help": "latent dimension d", "least": 1})
    channels: tuple[int, ...] = field(default=(32, 64, 128, 256), metadata={
        "help": "channels of the encoder's stride-2 convolutions, one per halving of the "
                "image (as many as its size allows, down to about 4x4; a shorter list repeats "
                "its last); the decoder mirrors them", "least": 1})
    likelihood: str = field(default=AUTO, metadata={
        "help": "the likelihood of each subpixel: logistic is the discretized logistic on 256 "
                "levels (8-bit images; reports bits/dim); auto: logistic for 8-bit data, "
                "bernoulli otherwise", "choices": (AUTO, *CONV_LIKELIHOODS)})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.channels:
            raise UsageError("--channels takes one or more channel counts")


@register_model("conv-vae")
class ConvVAE(GaussianLatentVAE):
    """VAE with a convolutional encoder (C, H, W) -> 2d and a transposed-convolutional
    decoder d -> (C, H, W) (or (2C, H, W) for the discretized logistic)."""

    Options = ConvVAEOptions

    def __init__(self, image_shape: Sequence[int], options: ConvVAEOptions | None = None,
                 **changes: Any) -> None:
        """A VAE of images of ``image_shape`` with ``options``, some set by keyword:
        ``ConvVAE((1, 28, 28), z_dim=8)``; ``likelihood="auto"`` is ``bernoulli`` here
        (``from_options`` picks by the data)."""
        o = with_changes(self.Options, options, changes)
        likelihood = "bernoulli" if o.likelihood == AUTO else o.likelihood
        c, h, w = shape = image_chw(image_shape)
        super().__init__(o, c * h * w, likelihood)
        self.image_shape = shape
        z_dim, channels = o.z_dim, o.channels
        sides = conv_sides(h, w)
        widths = [c] + [channels[min(i, len(channels) - 1)] for i in range(len(sides) - 1)]
        act = ACTIVATIONS[o.activation]
        self.top_shape = (widths[-1], *sides[-1])  # the smallest feature map
        top = math.prod(self.top_shape)

        enc: list[nn.Module] = []
        for a, b in pairwise(widths):
            enc += [nn.Conv2d(a, b, KERNEL, STRIDE, PADDING), act()]
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(top, 2 * z_dim))

        out_channels = 2 * c if likelihood == "logistic" else c
        dec: list[nn.Module] = [nn.Linear(z_dim, top), nn.Unflatten(1, self.top_shape)]
        for i in range(len(sides) - 1, 0, -1):  # from the smallest map back to the image
            (big_h, big_w), (small_h, small_w) = sides[i - 1], sides[i]
            pad = (big_h - 2 * small_h, big_w - 2 * small_w)  # 1 where the encoder floored
            dec += [act(), nn.ConvTranspose2d(widths[i], out_channels if i == 1 else
                                              widths[i - 1], KERNEL, STRIDE, PADDING,
                                              output_padding=pad)]
        if len(sides) == 1:  # an image too small to halve: a linear decoder
            dec = [nn.Linear(z_dim, out_channels * h * w),
                   nn.Unflatten(1, (out_channels, h, w))]
        self.decoder = nn.Sequential(*dec)
        if likelihood == "logistic":  # start broad around mid-grey (see LOGISTIC_INIT)
            last = next(m for m in reversed(self.decoder) if hasattr(m, "bias"))
            with torch.no_grad():
                last.bias.view(2, -1).copy_(torch.tensor(LOGISTIC_INIT)[:, None])

    @classmethod
    def from_options(cls, options: ConvVAEOptions, data: Dataset) -> ConvVAE:
        if data.image_shape is None:
            raise UsageError(f"--model 'conv-vae' needs images, and the rows of {data.name} "
                             "have no image shape; use --model 'vae'")
        shape = image_chw(data.image_shape)
        if math.prod(shape) != data.input_dim:
            raise UsageError(f"{data.name}: image shape {shape} holds {math.prod(shape)} "
                             f"values but the rows have {data.input_dim}")
        if options.likelihood == AUTO:
            options = dataclasses.replace(
                options, likelihood="logistic" if data.eight_bit else "bernoulli")
        return super().from_options(options, data, image_shape=shape)

    def data_args(self, x: Tensor, y: Tensor | None) -> tuple[Tensor]:
        """``(x,)`` as it is: 8-bit rows stay uint8, converted per batch in the program."""
        return (x,)

    # -- pieces (the program, prior, p(x|z), decode, reconstruct, sample: GaussianLatentVAE) ---
    def decoder_out(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's output for ``z`` of shape (..., d), flattened to (..., D): the
        location (logits, means) and the log-scale (per subpixel for the logistic, else the
        global ``log_scale``)."""
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.z_dim))
        c = self.image_shape[0]
        if self.likelihood == "logistic":
            return out[:, :c].reshape(*lead, -1), out[:, c:].reshape(*lead, -1)
        return out.reshape(*lead, -1), self.log_scale

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Location and scale of q(z|x) for rows ``x`` (..., D), float pixels or uint8."""
        lead = x.shape[:-1]
        h = self.encoder(pixels(x).reshape(-1, *self.image_shape))
        return loc_scale(h.reshape(*lead, 2 * self.z_dim), self.scale_head)

    def report(self, ctx: RunContext) -> dict:
        """The default figures and, for 8-bit data, ``test_bpd_elbo`` (and ``test_bpd_iwae``)
        from ``ctx.summary``, else from the test split scored again as the run scored it."""
        super().report(ctx)
        data, config = ctx.data, ctx.config
        if data.train.x.dtype != torch.uint8:
            return {}
        if self.likelihood == "bernoulli":
            ctx.log("bits/dim: none for --likelihood bernoulli, whose log p of grey levels "
                    "x / 255 is a cross-entropy, not a probability of the 8-bit images (use "
                    "--likelihood logistic)")
            return {}
        found, k = ctx.summary, config.eval_iwae or config.eval_particles
        if "test_elbo" in found:
            elbo, iwae = found["test_elbo"], found.get("test_log_likelihood_iwae")
            k = found.get("eval_particles", k)
        else:
            scores = ctx.score(self, *self.data_args(data.test.x, data.test.y), num_samples=k,
                               iwae=config.eval_iwae > 0, progress=ctx.progress)
            elbo = scores.elbo.mean().item()
            iwae = None if scores.iwae is None else scores.iwae.mean().item()
        offset = GAUSSIAN_OFFSET if self.likelihood == "gaussian" else 0.0
        out = {"test_bpd_elbo": bits_per_dim(elbo, self.input_dim, offset)}
        line = f"bits/dim {out['test_bpd_elbo']:.3f} (test ELBO)"
        if iwae is not None:
            out["test_bpd_iwae"] = bits_per_dim(iwae, self.input_dim, offset)
            line += f", {out['test_bpd_iwae']:.3f} (IWAE)"
        line += f", {k} samples per image"
        if offset:
            line += (f"; the Gaussian is a density of x / 255: these add log2(255) = "
                     f"{offset / math.log(2):.3f} bits per subpixel (density times the bin "
                     "width 1/255, an approximation, not a bound)")
        else:
            line += ": upper bounds on the discretized logistic's exact bits/dim"
        ctx.log(line)
        return out
