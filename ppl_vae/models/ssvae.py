"""The semi-supervised VAE "M2" of Kingma, Rezende, Mohamed & Welling (2014) (Pyro's ss-vae
example), trained by SVI on partly labelled data (``--model ssvae --labelled N``).

Generative model, for each data point (``pyro.plate("data")``), with K classes::

    y ~ p(y)     = Categorical(1/K)
    z ~ p(z)     = Normal(0, I_d)
    x ~ p(x|y,z) = Bernoulli(logits = f(z, y))          (or Normal(f(z, y), sigma^2 I))

Guide::

    q(y|x)   = Categorical(logits = c(x))               the classifier
    q(z|x,y) = Normal(mu(x, y), diag sigma(x, y)^2)

with c, f and the encoder MLPs (the label enters the first layer of f and of the encoder as
a learned vector per class); ``-1`` marks an unlabelled row (:data:`ppl_vae.data.UNLABELLED`).
The objective (the paper's J^alpha) is three (weight, model, guide) programs, each masked
(``poutine.mask``) to its rows, a term without rows in the training split left out (for
evaluation ``model``/``guide`` are one program over all rows, y observed where labelled):

* labelled rows, y observed: ``L(x, y) = E_q(z|x,y)[log p(x|y,z) + log p(y) + log p(z)
  - log q(z|x,y)]``;
* unlabelled rows, y latent: ``U(x) = sum_y q(y|x) [L(x, y) - log q(y|x)]``; y is marked for
  parallel enumeration, so ``--elbo enum`` sums the K classes exactly, ``mc`` samples y (score
  function); ``analytic`` is refused, ``iwae`` trains one program only;
* labelled rows: ``a * log q(y|x)`` (site ``y_aux``), ``a = alpha / s`` per row when every
  batch holds a share s of labelled rows (``--labelled-share``), else ``alpha * N /
  N_labelled``: alpha * B per batch of B rows either way; epoch e multiplies it by
  ``alpha_decay ** (e - 1)`` (the ``on_epoch`` hook).

**M1+M2** (``--model-opt m1=d1``, the paper's stacked model): x above is then v(x), the
means of an M1 VAE's q(z1|x) (``D -> m1_hidden -> 2 d1``) standardized over the training
split, modelled by ``Normal(f(z, y), sigma^2 I)``. ``pretrain`` fits M1 first and holds it
fixed; samples are decoded to pixels by M1's decoder.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import Tensor, nn

from .. import plots
from ..data import UNLABELLED, pixels
from ..errors import UsageError
from ..files import write_csv
from .base import Model, Program, RunContext
from .figures import draw_or_skip
from .likelihoods import check_range, pixel_likelihood, pixel_mean
from .nets import ACTIVATIONS, NetworkOptions, mlp
from .options import build_by_signature, with_changes
from .registry import register_model
from .vae import VAE, loc_scale

if TYPE_CHECKING:
    from ..data import Dataset

MAX_CLASS_ROWS = 20  # Classes the figures show at most (one row each).
FIGURE_COLUMNS = 10  # Columns of the figures: z draws (samples), test images (analogies).


@dataclass
class SSVAEOptions(NetworkOptions):
    """The M2 model's options (``--model ssvae``; ``--labelled N`` is a run option)."""

    z_dim: int = field(default=50, metadata={"help": "latent dimension d (Pyro's example: 50)",
                                             "least": 1})
    hidden: tuple[int, ...] = field(default=(500,), metadata={
        "help": "hidden layer widths of the classifier and the encoder (the decoder mirrors "
                "them; Pyro's example: 500)", "least": 1})
    alpha: float = field(default=4.0, metadata={
        "help": "weight of the classification term log q(y|x): alpha * B per batch of B "
                "rows, i.e. alpha / --labelled-share per labelled row (alpha * N_train / "
                "N_labelled with --labelled-share 0; the paper's alpha is 0.1, Pyro's example "
                "46 per row)", "least": 0})
    alpha_decay: float = field(default=1.0, metadata={
        "help": "alpha's schedule: epoch e trains with alpha * alpha_decay ** (e - 1) (1: "
                "constant; below 1 the classification term fades, above 1 it grows)", "above": 0})
    classes: int = field(default=0, metadata={
        "help": "number of classes K (0: from the data's labels)", "least": 0})
    m1: int = field(default=50, metadata={
        "help": "M1+M2 (the default recipe, as in the paper): stack M2 on the standardized "
                "encoder means of an M1 VAE with this latent dimension, trained first for "
                "--epochs epochs; 0: M2 alone, on the pixels",
        "absent": 0, "least": 0})  # a run recorded before M1+M2 existed was M2 alone
    m1_hidden: tuple[int, ...] = field(default=(500,), metadata={
        "help": "hidden layer widths of M1's encoder (its decoder mirrors them)", "least": 1})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.classes == 1:
            raise UsageError("--classes takes K >= 2 (0: from the labels), got 1")


class LabelledMLP(nn.Module):
    """An MLP of ``(v, y)`` whose first layer ``Linear(v) + W[y]`` is a linear layer on ``[v,
    onehot(y)]`` (initialized like one) without the one-hot; ``v`` (..., n) and ``y`` broadcast
    against each other's batch dims (enumerated classes on the left)."""

    def __init__(self, in_dim: int, classes: int, widths: Sequence[int],
                 activation: str = "relu") -> None:
        super().__init__()
        self.first = nn.Linear(in_dim, widths[0])
        self.label = nn.Embedding(classes, widths[0])
        bound = 1 / math.sqrt(in_dim + classes)  # nn.Linear's init for the concatenation
        for w in (self.first.weight, self.first.bias, self.label.weight):
            nn.init.uniform_(w, -bound, bound)
        self.rest = (nn.Sequential(ACTIVATIONS[activation](), mlp(widths, activation))
                     if len(widths) > 1 else nn.Identity())

    def forward(self, v: Tensor, y: Tensor) -> Tensor:
        return self.rest(self.first(v) + self.label(y))


@register_model("ssvae")
class SSVAE(Model):
    """M2: classifier ``D -> hidden -> K``, encoder ``(D, y) -> hidden -> 2d`` and decoder
    ``(d, y) -> reversed(hidden) -> D``, D the pixels or M1's features; ``aux_weight`` is a.
    M1 is fitted by :meth:`pretrain` (``train_run`` calls it; a loop of one's own must too)."""

    Options = SSVAEOptions
    recipe = {"elbo": "enum",  # y summed out exactly; mc would sample it (a score function)
              "epochs": 50,  # M1+M2 at 100 labels: 30 epochs fall short (docs: m2-recipe)
              "lr": 3e-3,  # M1+M2 at 100 labels: +4 points over 1e-3, paired (docs: m2-recipe)
              "early_stop": 10}  # (the table's): 3e-3 has late spikes, the best epoch is kept

    def __init__(self, input_dim: int, num_classes: int, options: SSVAEOptions | None = None, *,
                 aux_weight: float = 1.0, labelled_rows: bool = True,
                 unlabelled_rows: bool = True, **changes: Any) -> None:
        """M2 with ``options``, some set by keyword: ``SSVAE(784, 10, z_dim=8)``;
        ``from_options`` turns ``alpha`` and ``classes`` into ``aux_weight`` and
        ``num_classes``; ``labelled_rows``/``unlabelled_rows``: whether the training split has
        rows of each kind."""
        super().__init__()
        o = self.options = with_changes(self.Options, options, changes)
        z_dim, hidden, activation = o.z_dim, o.hidden, o.activation
        self.input_dim, self.classes, self.z_dim = input_dim, num_classes, z_dim
        self.likelihood, self.beta, self.aux_weight = o.likelihood, o.beta, aux_weight
        self.labelled_rows, self.unlabelled_rows = labelled_rows, unlabelled_rows
        if unlabelled_rows:  # what the estimators do with the unlabelled rows' class y
            self.estimators = {"analytic": ("refuse", (
                "TraceMeanField_ELBO assumes a reparameterized guide and would drop the "
                "gradient of q(y|x) on unlabelled rows; use enum (an exact sum over y) or mc"))}
            self.estimators.update({name: ("refuse", (
                f"the class y of unlabelled rows has no reparameterized draw, which {name} "
                "needs; use enum (an exact sum over y)")) for name in ("stl", "iwae-dreg")})
            self.estimators.update({name: ("note", (
                f"ssvae: {name} samples the class y of unlabelled rows from q(y|x) "
                "(a score-function gradient, high variance); enum sums it out exactly"))
                for name in ("mc", "iwae")})
        self.m1 = VAE(input_dim, z_dim=o.m1, hidden=o.m1_hidden, activation=activation,
                      likelihood=o.likelihood, gaussian_scale=o.gaussian_scale) if o.m1 else None
        self.modelled = "gaussian" if o.m1 else o.likelihood  # M2's likelihood of v(x)
        v_dim = o.m1 or input_dim
        if o.m1:  # m and s of the features, set by pretrain
            self.register_buffer("m1_shift", torch.zeros(o.m1))
            self.register_buffer("m1_spread", torch.ones(o.m1))
        self.classifier = mlp([v_dim, *hidden, num_classes], activation)
        self.encoder = LabelledMLP(v_dim, num_classes, [*hidden, 2 * z_dim], activation)
        self.decoder = LabelledMLP(z_dim, num_classes, [*reversed(hidden), v_dim], activation)
        self.register_buffer("log_scale", torch.tensor(math.log(o.gaussian_scale)))
        # alpha's schedule: this epoch's factor on aux_weight (on_epoch sets it in place,
        # so a compiled step reads it as an input; not saved: the epoch decides it)
        self.register_buffer("aux_factor", torch.ones(()), persistent=False)

    @classmethod
    def from_options(cls, options: SSVAEOptions, data: Dataset) -> SSVAE:
        classes = options.classes or data.num_classes
        if classes is None:
            raise UsageError(f"--model 'ssvae' needs the number of classes, and {data.name} has "
                             "no labels; give --model-opt classes=K (every row unlabelled)")
        if data.num_classes is not None and data.num_classes > classes:
            raise UsageError(f"--classes {classes}: {data.name} has labels up to "
                             f"{data.num_classes - 1}")
        if classes < 2:
            raise UsageError(f"--model 'ssvae' needs at least 2 classes; {data.name} has "
                             f"{classes}")
        check_range(data, options.likelihood)
        n = len(data.train)
        labelled = data.labelled or 0
        share = getattr(data, "labelled_share", 0.0) if 0 < labelled < n else 0.0
        # a per labelled row: alpha * B per batch, whether k = share * B labelled rows are in
        # every batch (Dataset.epoch_order) or B * N_labelled / N on average
        aux = options.alpha / share if share else options.alpha * n / labelled if labelled \
            else 0.0
        return build_by_signature(cls, options, data, num_classes=classes, aux_weight=aux,
                                  labelled_rows=labelled > 0, unlabelled_rows=labelled < n)

    def data_args(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """(v(x), y): :meth:`features`, once per batch, and the labels, -1 where unlabelled
        (all of them when ``y`` is None)."""
        v = self.features(x)
        if y is None:
            return v, torch.full((v.shape[0],), UNLABELLED, dtype=torch.long, device=v.device)
        return v, y.long()

    # -- networks ------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """v(x), what M2 models: the pixels, or with M1 its standardized encoder means (M1
        held fixed: no gradient)."""
        x = pixels(x)
        if self.m1 is None:
            return x
        with torch.no_grad():
            return (self.m1.encode(x)[0] - self.m1_shift) / self.m1_spread

    def classify_logits(self, x: Tensor) -> Tensor:
        """Logits of q(y|x), shape (..., K)."""
        return self.classifier(self.features(x))

    def encode(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Location and scale of q(z|x,y); ``y`` may carry dims left of ``x``'s rows."""
        return loc_scale(self.encoder(self.features(x), y), "softplus")

    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        """E[x|y,z]: pixel probabilities (Bernoulli) or means (Gaussian); with M1, its
        decoder's pixels at the un-standardized E[v|y,z]."""
        out = self.decoder(z, y)
        if self.m1 is None:
            return pixel_mean(out, self.likelihood)
        return self.m1.decode(out * self.m1_spread + self.m1_shift)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """argmax_y q(y|x), in chunks of rows."""
        return torch.cat([self.classify_logits(c).argmax(-1) for c in x.split(4096)])

    # -- pieces of the programs ----------------------------------------------------------------
    def _prior_y(self, x: Tensor) -> dist.Categorical:
        return dist.Categorical(logits=x.new_zeros(x.shape[0], self.classes))

    def _z_and_x(self, v: Tensor, y: Tensor) -> None:
        """z ~ p(z), v ~ p(v|y,z) (inside the data plate)."""
        zeros = v.new_zeros(v.shape[0], self.z_dim)
        with poutine.scale(scale=self.beta):
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
        pyro.sample("x", pixel_likelihood(self.decoder(z, y), self.modelled, self.log_scale),
                    obs=v)

    def _z_guide(self, v: Tensor, y: Tensor) -> None:
        """z ~ q(z|v,y) (inside the data plate)."""
        loc, scale = loc_scale(self.encoder(v, y), "softplus")
        with poutine.scale(scale=self.beta):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # -- the probabilistic program: one over all rows, for evaluation -------------------------
    def model(self, x: Tensor, y: Tensor) -> None:
        """p(y) p(z) p(x|y,z) with y observed where ``y >= 0`` (``y_observed``) and latent
        elsewhere (``y_unobserved``)."""
        labelled = y >= 0
        with pyro.plate("data", x.shape[0], device=x.device):
            value = pyro.sample("y", self._prior_y(x), obs=y.clamp(min=0), obs_mask=labelled)
            self._z_and_x(x, value)

    def guide(self, x: Tensor, y: Tensor) -> None:
        """q(y|x) for the unlabelled rows (``y_unobserved``), then q(z|x,y)."""
        labelled = y >= 0
        with pyro.plate("data", x.shape[0], device=x.device):
            with poutine.mask(mask=~labelled):
                guess = pyro.sample("y_unobserved", dist.Categorical(logits=self.classifier(x)))
            self._z_guide(x, torch.where(labelled, y.clamp(min=0), guess))

    # -- the training objective: three masked terms --------------------------------------------
    def model_labelled(self, x: Tensor, y: Tensor) -> None:
        """L(x, y) on the labelled rows: p(y) p(z) p(x|y,z), y observed."""
        with pyro.plate("data", x.shape[0], device=x.device), poutine.mask(mask=y >= 0):
            label = y.clamp(min=0)
            pyro.sample("y", self._prior_y(x), obs=label)
            self._z_and_x(x, label)

    def guide_labelled(self, x: Tensor, y: Tensor) -> None:
        """q(z|x,y) on the labelled rows."""
        with pyro.plate("data", x.shape[0], device=x.device), poutine.mask(mask=y >= 0):
            self._z_guide(x, y.clamp(min=0))

    def model_unlabelled(self, x: Tensor, y: Tensor) -> None:
        """U(x) on the unlabelled rows: p(y) p(z) p(x|y,z), y latent."""
        with pyro.plate("data", x.shape[0], device=x.device), poutine.mask(mask=y < 0):
            self._z_and_x(x, pyro.sample("y", self._prior_y(x)))

    def guide_unlabelled(self, x: Tensor, y: Tensor) -> None:
        """q(y|x) q(z|x,y) on the unlabelled rows, y marked for parallel enumeration (summed
        out by ``TraceEnum_ELBO``, sampled by the other estimators)."""
        with pyro.plate("data", x.shape[0], device=x.device), poutine.mask(mask=y < 0):
            guess = pyro.sample("y", dist.Categorical(logits=self.classifier(x)),
                                infer={"enumerate": "parallel"})
            self._z_guide(x, guess)

    def model_classify(self, x: Tensor, y: Tensor) -> None:
        """log q(y|x) of the labelled rows as an observed site (weight: ``aux_weight``)."""
        with pyro.plate("data", x.shape[0], device=x.device), poutine.mask(mask=y >= 0), \
                poutine.scale(scale=self.aux_factor):
            pyro.sample("y_aux", dist.Categorical(logits=self.classifier(x)),
                        obs=y.clamp(min=0))

    def guide_classify(self, x: Tensor, y: Tensor) -> None:
        """No latent: the classification term is a log-likelihood."""

    def programs(self) -> list[Program]:
        """(1, L), (1, U), (a, log q(y|x)): the terms whose rows the training split has."""
        terms: list[Program] = []
        # TraceEnum_ELBO warns that the labelled terms enumerate nothing: they need not
        warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites "
                                "configured for enumeration", category=UserWarning)
        if self.labelled_rows:
            terms.append((1.0, self.model_labelled, self.guide_labelled))
        if self.unlabelled_rows:
            terms.append((1.0, self.model_unlabelled, self.guide_unlabelled))
        if self.labelled_rows and self.aux_weight > 0:
            terms.append((self.aux_weight, self.model_classify, self.guide_classify))
        return terms

    # -- hooks of the model contract -----------------------------------------------------------
    def pretrain(self, ctx: RunContext) -> None:
        """With M1: fit it by its ELBO (``m1_metrics.csv``), then fix v(x)'s standardization
        (m, s) on the training split."""
        if self.m1 is None:
            return
        elbo = TraceMeanField_ELBO()
        m1 = self.m1

        def m1_loss(x: Tensor, y: Tensor) -> Tensor:  # -ELBO of M1, summed over the rows
            return elbo.differentiable_loss(m1.model, m1.guide, x)

        history = ctx.fit(m1_loss, m1, name="m1_loss", desc="M1 VAE",
                          inputs=lambda x, y: (pixels(x), y))
        write_csv(ctx.out / "m1_metrics.csv", history)
        with torch.no_grad():
            means = torch.cat([m1.encode(pixels(c))[0] for c in ctx.data.train.x.split(4096)])
            self.m1_shift.copy_(means.mean(0))
            self.m1_spread.copy_(means.std(0).clamp(min=1e-6))

    def on_epoch(self, ctx: RunContext, epoch: int) -> dict:
        """alpha's schedule, ``aux_weight * alpha_decay ** epoch`` after ``epoch`` epochs;
        returns the epoch's ``test_accuracy`` (argmax q(y|x))."""
        decay = self.options.alpha_decay
        try:
            factor = decay ** epoch
        except OverflowError:  # past a Python float's range
            factor = math.inf
        if not factor * self.aux_weight < torch.finfo(self.aux_factor.dtype).max:
            raise UsageError(f"--alpha-decay {decay:g}: the classification weight a * "
                             f"{decay:g}**{epoch} overflows {self.aux_factor.dtype} after epoch "
                             f"{epoch}; choose a decay nearer 1 or fewer epochs")
        self.aux_factor.fill_(factor)
        return self.accuracy(ctx.data.test) if epoch else {}

    @torch.no_grad()
    def accuracy(self, test: Any) -> dict:
        """``{"test_accuracy": ...}`` on a labelled split, else {}."""
        if test.y is None or not bool((test.y >= 0).all()):
            return {}
        return {"test_accuracy": (self.predict(test.x) == test.y).double().mean().item()}

    def report(self, ctx: RunContext) -> dict:
        """``labelled``, ``test_accuracy``, ``test_elbo_unlabelled`` (U(x)) and
        ``classification_weight``; ``samples_by_class.png`` and ``analogies.png``."""
        test = ctx.data.test
        out: dict = {"labelled": ctx.data.labelled or 0, "classification_weight": self.aux_weight}
        if self.m1 is not None and not bool(self.m1_shift.any()):
            ctx.log("ssvae: M1 was never fitted (pretrain did not run): M2 saw the features "
                    "of a random M1")
        decay = self.options.alpha_decay
        ctx.log(f"ssvae: {out['labelled']} of {len(ctx.data.train)} training rows labelled; "
                f"classification weight a = {self.aux_weight:.4g} per labelled row"
                + (f" in epoch 1, times {decay:g} each epoch after" if decay != 1 else ""))
        out.update(self.accuracy(test))
        particles = getattr(ctx.config, "eval_particles", 10)
        out["test_elbo_unlabelled"] = unlabelled_bound(self, self.features(test.x), ctx.score,
                                                       particles).mean().item()
        if self.m1 is not None:  # M2's ELBOs are of v(x); M1's is of the pixels
            out["m1_test_elbo"] = ctx.score(self.m1, pixels(test.x), num_samples=particles
                                            ).elbo.mean().item()
            ctx.log(f"M1: test ELBO {out['m1_test_elbo']:.2f} nats per image ({particles} "
                    f"samples); M2 models its {self.m1.z_dim} standardized encoder means, so "
                    "M2's ELBOs are of those, not of pixels")
        said = (f"test accuracy {out['test_accuracy']:.4f}" if "test_accuracy" in out else
                "no test accuracy (the test split has unlabelled rows)")
        ctx.log(f"ssvae: {said}, test ELBO with labels hidden {out['test_elbo_unlabelled']:.2f}")
        self._figures(ctx)
        return out

    @torch.no_grad()
    def _figures(self, ctx: RunContext) -> None:
        data, out = ctx.data, ctx.out
        if (shape := data.image_shape) is None:
            draw_or_skip(ctx, "samples_by_class.png and analogies.png",
                         lambda: "the data are not images")
            return
        shown = min(self.classes, MAX_CLASS_ROWS)
        more = f" (the first {shown} of {self.classes})" if shown < self.classes else ""
        names = [str(k) for k in range(shown)]
        through = " via M1's decoder" if self.m1 is not None else ""
        device = self.log_scale.device
        ys = torch.arange(shown, device=device)[:, None]

        def samples() -> None:
            g = torch.Generator().manual_seed(0)  # the same z in every run's figure
            z = torch.randn(1, FIGURE_COLUMNS, self.z_dim, generator=g).to(device)
            rows = self.decode(z.to(self.log_scale.dtype), ys)  # (classes, columns, D)
            plots.image_grid(list(rows), shape, out / "samples_by_class.png",
                             f"samples E[x|y,z]{through}: one row per class y{more}, the "
                             "same z ~ p(z) down each column", names)

        def analogies() -> str | None:
            test = data.test
            if test.y is None or not bool((test.y >= 0).all()):
                return "the test split has no labels to encode with"
            x, y = pixels(test.x[:FIGURE_COLUMNS]), test.y[:FIGURE_COLUMNS].long()
            z = self.encode(x, y)[0]
            rows = [x, *self.decode(z.unsqueeze(0), ys)]
            plots.image_grid(rows, shape, out / "analogies.png",
                             "analogies: z = mean of q(z|x, y) of the top image, decoded with "
                             f"each class{more}", ["input", *names])
            return None

        draw_or_skip(ctx, "samples_by_class.png", samples)
        draw_or_skip(ctx, "analogies.png", analogies)


@torch.no_grad()
def unlabelled_bound(module: SSVAE, x: Tensor, score, particles: int = 10) -> Tensor:
    """U(x) = sum_y q(y|x) [L(x, y) - log q(y|x)] per row of v(x), exact over the K classes,
    each L(x, y) by ``score`` (:func:`ppl_vae.inference.importance.score`) with ``particles``
    draws of z ~ q(z|x,y)."""
    log_q = torch.cat([F.log_softmax(module.classifier(c), -1) for c in x.split(4096)])
    bound = torch.zeros(x.shape[0], dtype=log_q.dtype, device=x.device)
    for k in range(module.classes):
        y = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        elbo = score(module, x, y, num_samples=particles, seed=k, validate=None).elbo
        elbo = elbo.to(log_q.dtype)
        q = log_q[:, k].exp()
        bound += torch.where(q > 0, q * (elbo - log_q[:, k]), torch.zeros_like(q))
    return bound
