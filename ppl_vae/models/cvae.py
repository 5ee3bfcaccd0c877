"""The conditional VAE of Sohn, Lee & Yan (2015) as a Pyro model and guide.

For a condition c and an output y, with a baseline network's guess yhat = sigmoid(f(c)),
for each data point (``pyro.plate("data")``)::

    z ~ p(z|c)   = Normal(mu_p(c, yhat), sigma_p(c, yhat))          prior network
    y ~ p(y|c,z) = Bernoulli(logits = g(c, z))  on the target pixels  generation network

and the guide (recognition network)::

    q(z|c,y) = Normal(mu_q(c, y), sigma_q(c, y))

Conditions (``--condition``):

* ``quadrants``: c is the image with its missing quadrants set to 0; y is the image, only
  its missing pixels scored; ``--quadrants k`` observes the bottom-left quadrant (k=1), the
  left half (k=2) or all but the bottom-right (k=3).
* ``label``: c is the one-hot class, y the whole image (one learned prior per class).

Objectives (``--cvae-objective``): ``cvae``, ELBO = E_q[log p(y|c,z)] - KL(q(z|c,y) ||
p(z|c)); ``gsnn`` (Gaussian stochastic neural network), E_{p(z|c)}[log p(y|c,z)], the ELBO
with the prior network as the guide; ``hybrid``, alpha * cvae + (1 - alpha) * gsnn.
``pretrain`` fits the baseline NN first; ``report`` writes the conditional log-likelihood
table (``cll_table.md``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import Tensor

from .. import plots
from ..data import pixels
from ..errors import UsageError
from ..files import markdown_table, write_csv, write_text
from .base import Model, Program, RunContext
from .figures import draw_or_skip
from .likelihoods import check_range, pixel_likelihood, pixel_mean
from .nets import NetworkOptions, mlp
from .options import build_by_signature, with_changes
from .registry import register_model
from .vae import loc_scale

if TYPE_CHECKING:
    from ..data import Dataset

CONDITIONS = ("quadrants", "label")
OBJECTIVES = ("cvae", "gsnn", "hybrid")


def observed_quadrants(image_shape: tuple[int, ...], k: int) -> Tensor:
    """Boolean (C*H*W,) mask of the pixels observed with ``k`` (1, 2 or 3) quadrants given,
    for images (C, H, W) or (H, W)."""
    if k not in (1, 2, 3):
        raise UsageError(f"--quadrants takes 1, 2 or 3 observed quadrants, got {k}")
    *channels, h, w = image_shape
    seen = torch.zeros(h, w, dtype=torch.bool)
    seen[h // 2:, : w // 2] = True  # bottom left
    if k >= 2:
        seen[:, : w // 2] = True  # left half
    if k == 3:
        seen[: h // 2, :] = True  # and the top half
    return seen.expand(*channels, h, w).reshape(-1)


@dataclass
class CVAEOptions(NetworkOptions):
    """The CVAE's options (``--model cvae``; the network sizes of Sohn et al. are
    ``--hidden 500 500 --z-dim 200``). Its Gaussian sigma is fixed."""

    condition: str = field(default="quadrants", metadata={
        "help": "quadrants: complete images from observed quadrants; label: class-conditional "
                "generation", "choices": CONDITIONS})
    quadrants: int = field(default=1, metadata={
        "help": "observed quadrants (with --condition quadrants; the table of several: "
                "python -m ppl_vae experiment cvae-quadrants)", "choices": (1, 2, 3)})
    baseline_input: bool = field(default=True, metadata={
        "help": "feed the baseline NN's guess to the prior network",
        "off_help": "do not feed the baseline NN's guess to the prior network"})
    cvae_objective: str = field(default="cvae", metadata={
        "help": "cvae: the ELBO; gsnn: E_p(z|c) log p(y|c,z); hybrid: a weighted sum",
        "choices": OBJECTIVES})
    hybrid_alpha: float = field(default=0.5, metadata={
        "help": "weight of the CVAE term in the hybrid objective", "least": 0, "most": 1})
    cll_samples: int = field(default=100, metadata={
        "help": "importance samples per test image for -log p(y|c)", "least": 1})


@register_model("cvae")
class CVAE(Model):
    """CVAE with MLP prior, recognition, generation and baseline networks."""

    Options = CVAEOptions

    def __init__(self, cond_dim: int, out_dim: int, target: Tensor | None = None,
                 options: CVAEOptions | None = None, **changes: Any) -> None:
        """Conditions of ``cond_dim`` and outputs of ``out_dim`` values, of which the mask
        ``target`` (None: all; not ``options.quadrants``) are scored; options set by keyword
        too: ``CVAE(784, 784, target, z_dim=8)``."""
        super().__init__()
        o = self.options = with_changes(self.Options, options, changes)
        self.cond_dim, self.out_dim, self.z_dim = cond_dim, out_dim, o.z_dim
        self.likelihood, self.baseline_input, self.beta = o.likelihood, o.baseline_input, o.beta
        self.objective, self.hybrid_alpha = o.cvae_objective, o.hybrid_alpha
        self.condition = o.condition
        z_dim, hidden, activation = o.z_dim, o.hidden, o.activation
        self.register_buffer("target", target)
        self.register_buffer("log_scale", torch.tensor(o.gaussian_scale).log())
        self.baseline = mlp([cond_dim, *hidden, out_dim], activation)
        self.prior_net = mlp([cond_dim + out_dim * o.baseline_input, *hidden, 2 * z_dim],
                             activation)
        self.recognition_net = mlp([cond_dim + out_dim, *hidden, 2 * z_dim], activation)
        self.generation_net = mlp([cond_dim + z_dim, *reversed(hidden), out_dim], activation)

    @classmethod
    def from_options(cls, options: CVAEOptions, data: Dataset) -> CVAE:
        if options.condition == "label":
            if data.num_classes is None:
                raise UsageError(f"--condition label needs class labels, and {data.name} has "
                                 "none; use --condition 'quadrants' or data with labels 'y'")
            cond_dim, target = data.num_classes, None
            check_labels(data)
            if data.labelled is not None and data.labelled < len(data.train):
                raise UsageError(f"--condition 'label' conditions on every training label, and "
                                 f"{len(data.train) - data.labelled} are hidden (--labelled); "
                                 "drop --labelled (semi-supervised: --model 'ssvae')")
        else:
            if data.image_shape is None:
                raise UsageError(f"--condition quadrants needs images, and {data.name} rows are "
                                 "not square; use --condition 'label'")
            cond_dim = data.input_dim
            target = ~observed_quadrants(data.image_shape, options.quadrants)
        check_range(data, options.likelihood)
        return build_by_signature(cls, options, data, cond_dim=cond_dim,
                                  out_dim=data.input_dim, target=target)

    def data_args(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """(c, y) for images ``x`` (and class ``labels``)."""
        x = pixels(x)
        if self.condition == "label":
            return F.one_hot(labels, self.cond_dim).to(x.dtype), x
        return x * ~self.target, x

    # -- networks ------------------------------------------------------------------------------
    def prior(self, c: Tensor) -> dist.Normal:
        """p(z|c) with batch shape (N, d); the prior network also sees the baseline's guess."""
        # (no gradient into the baseline: it is trained first, then held fixed)
        inputs = torch.cat([c, self.baseline_predict(c)], -1) if self.baseline_input else c
        return dist.Normal(*loc_scale(self.prior_net(inputs), "logscale"))

    def recognition(self, c: Tensor, y: Tensor) -> dist.Normal:
        """q(z|c,y) with batch shape (N, d); it sees only the target pixels of y."""
        y = y if self.target is None else y * self.target
        return dist.Normal(*loc_scale(self.recognition_net(torch.cat([c, y], -1)), "logscale"))

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
        """q(z|c,y); with ``y=None``, and for a GSNN (its recognition network untrained), z
        comes from the prior network: it is also importance sampling's proposal."""
        with pyro.plate("data", c.shape[0], device=c.device):
            q = self.prior(c) if y is None or self.objective == "gsnn" else \
                self.recognition(c, y)
            with poutine.scale(scale=self.beta):
                pyro.sample("z", q.to_event(1))

    def prior_guide(self, c: Tensor, y: Tensor | None = None) -> None:
        """p(z|c) as the guide: training with it is the GSNN objective."""
        self.guide(c, None)

    def programs(self) -> list[Program]:
        """(weight, model, guide) terms of ``--cvae-objective``."""
        if self.objective == "hybrid":
            a = self.hybrid_alpha
            return [(a, self.model, self.guide), (1.0 - a, self.model, self.prior_guide)]
        return [(1.0, self.model, self.guide)]

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
        """-log p(y|c) of the baseline NN on the target pixels, summed over the batch."""
        return -pixel_likelihood(self.baseline(c), self.likelihood, self.log_scale,
                                 self.target).log_prob(y).sum()

    # -- hooks of the model contract -----------------------------------------------------------
    def pretrain(self, ctx: RunContext) -> None:
        """Fit the baseline NN (its BCE on the target pixels) before the CVAE, then hold it."""
        history = ctx.fit(self.baseline_loss, self.baseline, name="nll", desc="baseline NN")
        write_csv(ctx.out / "baseline_metrics.csv", history)

    def report(self, ctx: RunContext) -> dict:
        """The test split's CLL table and its figure: for quadrants, inputs, truth, the NN's
        and three CVAE completions (Sohn et al.'s figure); for labels, prior samples by class."""
        test = ctx.data.test
        c, y = self.data_args(test.x, test.y)
        cll = {cll_key(ctx.options): conditional_scores(self, c, y, ctx.score,
                                                        ctx.options.cll_samples)}
        ctx.log("-log p(y|c), nats per test image (lower is better):\n"
                + write_cll_table(ctx.out, cll))
        self._figures(ctx)
        return {"cll": cll}

    @torch.no_grad()
    def _figures(self, ctx: RunContext) -> None:
        data, out = ctx.data, ctx.out
        name = "samples_by_label.png" if self.condition == "label" else "completions.png"
        if (shape := data.image_shape) is None:
            draw_or_skip(ctx, name, lambda: "the data are not images")
            return

        def by_label() -> None:
            shown = min(self.cond_dim, MAX_LABEL_ROWS)
            c = torch.eye(shown, self.cond_dim, device=data.test.x.device)
            samples = self.predict(c, num_samples=10)  # (10, classes, D)
            more = f" (the first {shown} of {self.cond_dim})" if shown < self.cond_dim else ""
            plots.image_grid(list(samples.transpose(0, 1)), shape, out / "samples_by_label.png",
                             f"samples E[y|c,z], z ~ p(z|c), one row per label{more}",
                             [str(k) for k in range(shown)])
            spread = samples.std(0).mean().item()  # pixel sd across z, within a class
            if spread < UNUSED_LATENT_SD:
                ctx.log(f"samples_by_label.png: the samples of a class barely differ (mean pixel "
                        f"sd {spread:.4f} across z): the latent is unused, p(y|c,z) ignores z")
            else:
                ctx.log(f"samples_by_label.png: within-class variety, mean pixel sd "
                        f"{spread:.3f} across z ~ p(z|c)")

        def completions() -> None:
            x = pixels(data.test.x[:10])
            c, _ = self.data_args(x, None)
            # the observed pixels, and for the missing ones grey (the input), the truth, the
            # NN's and the CVAE's predictions
            missing = [torch.full_like(x, 0.5), x, self.baseline_predict(c),
                       *self.predict(c, num_samples=3)]
            rows = [torch.where(~self.target, x, m) for m in missing]
            plots.image_grid(rows, shape, out / "completions.png",
                             "quadrant completion: observed + predicted missing pixels",
                             ["input", "truth", "NN", *(f"CVAE draw {i}" for i in (1, 2, 3))])

        draw_or_skip(ctx, name, by_label if self.condition == "label" else completions)


UNUSED_LATENT_SD = 0.01  # Mean pixel sd across z below which a class's samples are identical.
MAX_LABEL_ROWS = 20  # Labels ``samples_by_label.png`` shows at most (one row each).
SPARSE_LABELS = 1000  # More classes than this, and 10 times the labels present: refused.


def check_labels(data: Dataset) -> None:
    """:class:`UsageError` for labels that one-hot encode into far more classes than the
    data hold (labels not numbered 0..K-1, e.g. ids or years): the condition layers would be
    that wide."""
    ys = [s.y for s in (data.train, data.test) if s.y is not None]
    present = torch.unique(torch.cat([y.cpu() for y in ys])).numel()
    classes = data.num_classes
    if classes > SPARSE_LABELS and classes > 10 * present:
        raise UsageError(f"--condition label one-hot encodes the labels of {data.name} as "
                         f"{classes:,} classes (labels up to {classes - 1:,}) but only {present} "
                         "distinct labels occur; renumber them 0..K-1 (e.g. numpy.unique(y, "
                         "return_inverse=True)[1])")


def cll_key(options: CVAEOptions) -> str:
    """The column of the CLL table a CVAE run fills: its quadrant count, or ``label``."""
    return "label" if options.condition == "label" else str(options.quadrants)


@torch.no_grad()
def conditional_scores(module: CVAE, c: Tensor, y: Tensor, score: Callable,
                       samples: int = 100, elbo_particles: int = 10) -> dict[str, float]:
    """The CVAE paper's table for one condition, in nats per data point (lower is better):

    * ``cvae_is``: -log p(y|c) by importance sampling with ``samples`` draws from the proposal
      (q(z|c,y); p(z|c) for a GSNN): -log 1/S sum_s p(y, z_s|c) / q(z_s|c,y);
    * ``cvae_neg_elbo``: the negative ELBO with ``elbo_particles`` draws (Pyro's CVAE table);
    * ``nn_baseline``: -log p(y|c) of the deterministic baseline NN (its BCE);
    * ``gap``: nn_baseline - cvae_is (> 0 when the CVAE wins).

    ``score`` is :func:`ppl_vae.inference.importance.score`.
    """
    is_ = score(module, c, y, num_samples=samples, iwae=True, validate=None).iwae.mean().item()
    elbo = score(module, c, y, num_samples=elbo_particles, validate=None).elbo.mean().item()
    nn_ = sum(module.baseline_loss(cb, yb).item()
              for cb, yb in zip(c.split(4096), y.split(4096), strict=True)) / len(c)
    return {"nn_baseline": nn_, "cvae_is": -is_, "cvae_neg_elbo": -elbo, "gap": nn_ + is_}


# -- the table -------------------------------------------------------------------------------
TABLE_ROWS = (("nn_baseline", "NN baseline"), ("cvae_is", "CVAE (IS)"),
              ("cvae_neg_elbo", "CVAE (−ELBO)"), ("gap", "gap (NN − IS)"))


def write_cll_table(out: str | os.PathLike, cll: dict[str, dict[str, float]]) -> str:
    """Write ``cll_table.csv`` and ``cll_table.md`` into ``out``, one row per estimate and one
    column per condition (quadrant count or ``label``); return the Markdown table."""
    titles = {k: "label" if k == "label" else f"{k} quadrant" + "s" * (k != "1")
              for k in sorted(cll)}
    rows = [{"estimate": name, **{t: round(cll[k][key], 2) for k, t in titles.items()}}
            for key, name in TABLE_ROWS]
    md = "\n".join(markdown_table(list(rows[0]), [[f"{v:.2f}" if isinstance(v, float) else v
                                                   for v in r.values()] for r in rows])) + "\n"
    write_csv(Path(out) / "cll_table.csv", rows)
    write_text(Path(out) / "cll_table.md",
               "Negative conditional log-likelihood -log p(y|c), nats per image "
               "(lower is better)\n\n" + md)
    return md
