"""The conditional VAE of Sohn, Lee & Yan (2015) as a Pyro model and guide.

For a condition c and an output y, with a baseline network's guess yhat = sigmoid(f(c)),
for each data point (``pyro.plate("data")``)::

    z ~ p(z|c)   = Normal(mu_p(c, yhat), sigma_p(c, yhat))          prior network
    y ~ p(y|c,z) = Bernoulli(logits = g(c, z))  on the target pixels  generation network

and the guide (recognition network)::

    q(z|c,y) = Normal(mu_q(c, y), sigma_q(c, y))

Conditions (``--condition``):

* ``quadrants``: c is the image with its missing quadrants set to 0; y is the image, and only
  the missing pixels enter the likelihood (``dist.mask``). ``--quadrants k`` observes the
  bottom-left quadrant (k=1), the left half (k=2), or all but the bottom-right (k=3), the
  layout of Pyro's CVAE example.
* ``label``: c is the one-hot class, y the whole image (one learned prior per class).

Objectives (``--cvae-objective``), all SVI on the same model:

* ``cvae``: ELBO = E_q[log p(y|c,z)] - KL(q(z|c,y) || p(z|c)).
* ``gsnn``: the Gaussian stochastic neural network, E_{p(z|c)}[log p(y|c,z)]: the same ELBO
  with the prior network as the guide (the KL term is then zero).
* ``hybrid``: alpha * cvae + (1 - alpha) * gsnn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import Tensor, nn

from ..errors import UsageError
from .likelihoods import pixel_likelihood, pixel_mean
from .nets import mlp
from .registry import register_model

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..data import Dataset

Program = tuple[float, Callable, Callable]


def observed_quadrants(image_shape: tuple[int, int], k: int) -> Tensor:
    """Boolean (H*W,) mask of the pixels observed with ``k`` quadrants given (1, 2 or 3)."""
    if k not in (1, 2, 3):
        raise UsageError(f"--quadrants takes 1, 2 or 3 observed quadrants, got {k}")
    h, w = image_shape
    seen = torch.zeros(h, w, dtype=torch.bool)
    seen[h // 2:, : w // 2] = True  # bottom left
    if k >= 2:
        seen[:, : w // 2] = True  # left half
    if k == 3:
        seen[: h // 2, :] = True  # and the top half
    return seen.reshape(-1)


@register_model("cvae")
class CVAE(nn.Module):
    """CVAE with MLP prior, recognition, generation and baseline networks."""

    def __init__(
        self,
        cond_dim: int,
        out_dim: int,
        target: Tensor | None = None,
        z_dim: int = 20,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        likelihood: str = "bernoulli",
        gaussian_scale: float = 1.0,
        baseline_input: bool = True,
        objective: str = "cvae",
        hybrid_alpha: float = 0.5,
        beta: float = 1.0,
        condition: str = "quadrants",
    ) -> None:
        super().__init__()
        self.cond_dim, self.out_dim, self.z_dim = cond_dim, out_dim, z_dim
        self.likelihood, self.baseline_input, self.beta = likelihood, baseline_input, beta
        self.objective, self.hybrid_alpha, self.condition = objective, hybrid_alpha, condition
        # target: the pixels of y that are scored (None: all of them)
        self.register_buffer("target", target)
        self.register_buffer("log_scale", torch.tensor(gaussian_scale).log())
        self.baseline = mlp([cond_dim, *hidden, out_dim], activation)
        self.prior_net = mlp([cond_dim + out_dim * baseline_input, *hidden, 2 * z_dim],
                             activation)
        self.recognition_net = mlp([cond_dim + out_dim, *hidden, 2 * z_dim], activation)
        self.generation_net = mlp([cond_dim + z_dim, *reversed(hidden), out_dim], activation)

    @classmethod
    def from_config(cls, config: TrainConfig, data: Dataset) -> CVAE:
        if config.condition == "label":
            if data.num_classes is None:
                raise UsageError(f"--condition label needs class labels, and {data.name} has "
                                 "none; use --condition quadrants or data with labels 'y'")
            cond_dim, target = data.num_classes, None
        else:
            if data.image_shape is None:
                raise UsageError(f"--condition quadrants needs images, and {data.name} rows are "
                                 "not square; use --condition label")
            if len(config.quadrants) != 1:
                raise UsageError("one CVAE observes one number of quadrants; train several "
                                 "with ppl_vae.experiments.train_quadrant_table")
            cond_dim = data.input_dim
            target = ~observed_quadrants(data.image_shape, config.quadrants[0])
        if config.likelihood == "gaussian" and config.learn_scale:
            raise UsageError("--learn-scale is for the VAE; the CVAE keeps --gaussian-scale fixed")
        return cls(cond_dim, data.input_dim, target, config.z_dim, config.hidden,
                   config.activation, config.likelihood, config.gaussian_scale,
                   config.baseline_input, config.cvae_objective, config.hybrid_alpha,
                   config.beta, config.condition)

    def data_args(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """(c, y) for images ``x`` (and class ``labels``)."""
        if self.condition == "label":
            return F.one_hot(labels, self.cond_dim).to(x.dtype), x
        return x * ~self.target, x

    # -- networks ------------------------------------------------------------------------------
    def baseline_logits(self, c: Tensor) -> Tensor:
        """The deterministic baseline NN, yhat = sigmoid(f(c)), trained first by BCE."""
        return self.baseline(c)

    def prior(self, c: Tensor) -> dist.Normal:
        """p(z|c) with batch shape (N, d); the prior network also sees the baseline's guess."""
        inputs = c
        if self.baseline_input:
            with torch.no_grad():  # the baseline is trained first, then held fixed
                guess = pixel_mean(self.baseline(c), self.likelihood)
            inputs = torch.cat([c, guess], -1)
        loc, log_scale = self.prior_net(inputs).chunk(2, -1)
        return dist.Normal(loc, log_scale.exp())

    def recognition(self, c: Tensor, y: Tensor) -> dist.Normal:
        """q(z|c,y) with batch shape (N, d); it sees only the target pixels of y."""
        y = y if self.target is None else y * self.target
        loc, log_scale = self.recognition_net(torch.cat([c, y], -1)).chunk(2, -1)
        return dist.Normal(loc, log_scale.exp())

    def generate(self, c: Tensor, z: Tensor) -> Tensor:
        """Output of the generation network for z with any leading (particle) dims."""
        return self.generation_net(torch.cat([c.expand(*z.shape[:-1], -1), z], -1))

    # -- the probabilistic program -------------------------------------------------------------
    def model(self, c: Tensor, y: Tensor | None = None) -> None:
        """p(z|c) p(y|c,z); with ``y=None``, y is sampled (prediction)."""
        with pyro.plate("data", c.shape[0], device=c.device):
            with poutine.scale(scale=self.beta):
                z = pyro.sample("z", self.prior(c).to_event(1))
            pyro.sample("y", pixel_likelihood(self.generate(c, z), self.likelihood,
                                              self.log_scale, self.target), obs=y)

    def guide(self, c: Tensor, y: Tensor | None = None) -> None:
        """q(z|c,y); with ``y=None``, z comes from the prior network (prediction)."""
        with pyro.plate("data", c.shape[0], device=c.device):
            q = self.prior(c) if y is None else self.recognition(c, y)
            with poutine.scale(scale=self.beta):
                pyro.sample("z", q.to_event(1))

    def prior_guide(self, c: Tensor, y: Tensor | None = None) -> None:
        """p(z|c) as the guide: training with it is the GSNN objective."""
        self.guide(c, None)

    def programs(self) -> list[Program]:
        """(weight, model, guide) terms of the training objective (``--cvae-objective``)."""
        if self.objective == "gsnn":
            return [(1.0, self.model, self.prior_guide)]
        if self.objective == "hybrid":
            a = self.hybrid_alpha
            return [(a, self.model, self.guide), (1.0 - a, self.model, self.prior_guide)]
        return [(1.0, self.model, self.guide)]

    @property
    def proposal(self) -> Callable:
        """The guide that importance sampling uses: q(z|c,y), or p(z|c) for a GSNN (whose
        recognition network is never trained)."""
        return self.prior_guide if self.objective == "gsnn" else self.guide

    # -- what a user calls ---------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, c: Tensor, num_samples: int = 1) -> Tensor:
        """E[y|c,z] for ``num_samples`` draws z ~ p(z|c): shape (num_samples, N, D)."""
        z = self.prior(c).sample((num_samples,))
        return pixel_mean(self.generate(c, z), self.likelihood)

    @torch.no_grad()
    def baseline_predict(self, c: Tensor) -> Tensor:
        """The baseline NN's prediction yhat = E[y|c] of the target pixels."""
        return pixel_mean(self.baseline(c), self.likelihood)

    def baseline_loss(self, c: Tensor, y: Tensor) -> Tensor:
        """-log p(y|c) of the baseline NN (BCE, or Gaussian NLL) on the target pixels, summed
        over the batch."""
        return -pixel_likelihood(self.baseline(c), self.likelihood, self.log_scale,
                                 self.target).log_prob(y).sum()
