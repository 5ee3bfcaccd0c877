"""MAP of a VAE's decoder weights: a Gaussian prior on weights is weight decay.

Model: decoder weights theta ~ Normal(0, s^2) (``PyroSample`` on a ``PyroModule``), then for
each of the N data points z ~ Normal(0, I), x ~ Bernoulli(logits = f_theta(z)); a batch of
B points is scaled by N / B. Guide: ``AutoDelta`` on theta, the amortized q(z|x) for z.
With a point mass on theta the loss is::

    -ELBO_MAP = -(N/B) ELBO_batch(theta, phi) - log p(theta)
              = -(N/B) ELBO_batch(theta, phi) + ||theta||^2 / (2 s^2) + const

so its gradient is the plain VAE's plus theta / s^2: divided by N/B, the gradient of the
plain per-batch loss with Adam's ``weight_decay = B / (N s^2)``. The two trainings then
agree up to Adam's epsilon and a partial last batch (about 0.03 nats on digits).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, init_to_value
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn

from ..data import Dataset
from ..inference.estimators import make_elbo
from ..inference.importance import score
from ..inference.program import inspect_program
from ..inference.svi import Step, collect_params
from ..models.nets import mlp
from ..models.vae import VAE


class DecoderMAPVAE(PyroModule):
    """A VAE whose decoder weights are latent variables with a Normal(0, s^2) prior."""

    def __init__(self, input_dim: int, z_dim: int = 2, hidden: Sequence[int] = (64,),
                 prior_scale: float = 1.0, n_data: int = 1, activation: str = "relu") -> None:
        super().__init__()
        self.z_dim, self.prior_scale, self.n_data = z_dim, prior_scale, n_data
        self.encoder = mlp([input_dim, *hidden, 2 * z_dim], activation)
        decoder = mlp([z_dim, *reversed(hidden), input_dim], activation)
        init = {}
        to_pyro_module_(decoder)
        for name, p in list(decoder.named_parameters()):
            layer, attr = name.rsplit(".", 1)
            init[f"decoder.{name}"] = p.detach().clone()  # start where nn.Linear starts
            setattr(decoder.get_submodule(layer), attr, PyroSample(
                dist.Normal(0.0, prior_scale).expand(p.shape).to_event(p.dim())))
        self.decoder = decoder
        # AutoDelta sees only the decoder's sites; the encoder makes the guide for z
        self.weights_guide = AutoDelta(poutine.block(self, hide=["z", "x"]),
                                       init_loc_fn=init_to_value(values=init))

    def forward(self, x: Tensor) -> None:
        """The model: theta ~ p(theta), then z ~ p(z), x ~ p(x | z, theta) per data point."""
        for layer in self.decoder:  # draw theta once, outside the data plate
            if isinstance(layer, nn.Linear):
                layer.weight, layer.bias  # noqa: B018 (a PyroSample draws on access)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.n_data / x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z), validate_args=False)
                        .to_event(1), obs=x)

    def model(self, x: Tensor) -> None:
        self(x)

    def guide(self, x: Tensor) -> None:
        """delta(theta - theta_hat) q(z|x)."""
        self.weights_guide(x)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.n_data / x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def plain_vae(self) -> VAE:
        """The ordinary VAE with this encoder and decoder weights theta_hat."""
        # the same scale head as this guide: sigma = exp(h)
        vae = VAE(self.encoder[0].in_features, z_dim=self.z_dim, hidden=(1,),
                  encoder_scale="logscale")  # its networks are replaced below
        vae.encoder = copy.deepcopy(self.encoder)
        vae.decoder = mlp([1, 1])  # replaced below
        plain = copy.deepcopy(self.decoder)
        for name, value in self.weights_guide.median().items():
            layer, attr = name.removeprefix("decoder.").rsplit(".", 1)
            module = plain.get_submodule(layer)
            delattr(module, attr)
            setattr(module, attr, nn.Parameter(value.detach().clone()))
        vae.decoder = plain
        return vae


def gradient_identity(x: Tensor, prior_scale: float = 0.5, seed: int = 0) -> dict:
    """One SVI gradient of the MAP objective against (N/B) times the plain ELBO's gradient
    plus the weight-decay term theta / s^2, at the same z draws, for a batch of B = len(x)
    out of N = 4B data points: the largest absolute differences."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    ratio = 4.0  # N / B, a power of two: the scaled float32 sums stay exact
    m = DecoderMAPVAE(x.shape[1], z_dim=2, hidden=(16,), prior_scale=prior_scale,
                      n_data=int(ratio * x.shape[0]))
    elbo = make_elbo("mc")
    m.guide(x)  # creates the AutoDelta parameters
    theta = dict(m.weights_guide.named_parameters())
    pyro.set_rng_seed(seed)
    elbo.differentiable_loss(m.model, m.guide, x).backward()
    vae = m.plain_vae()
    pyro.set_rng_seed(seed)
    elbo.differentiable_loss(vae.model, vae.guide, x).backward()
    plain = dict(vae.decoder.named_parameters())
    worst_dec, worst_enc = 0.0, 0.0
    for name, p in theta.items():
        # locs.decoder.0.weight_unconstrained -> 0.weight (a Normal's support needs no map)
        key = name.split(".", 1)[1].removeprefix("decoder.").removesuffix("_unconstrained")
        expected = ratio * plain[key].grad + p.detach() / prior_scale**2
        worst_dec = max(worst_dec, (p.grad - expected).abs().max().item())
    for a, b in zip(m.encoder.parameters(), vae.encoder.parameters(), strict=True):
        worst_enc = max(worst_enc, (a.grad - ratio * b.grad).abs().max().item())
    return {"max_abs_diff_decoder": worst_dec, "max_abs_diff_encoder": worst_enc,
            "max_abs_grad": max(p.grad.abs().max().item() for p in theta.values())}


def map_vs_weight_decay(data: Dataset, epochs: int = 10, batch_size: int = 128,
                        prior_scale: float = 0.5, lr: float = 1e-3, seed: int = 0) -> dict:
    """Train the MAP model by SVI and the plain VAE by Adam with weight decay B / (N s^2) on
    the decoder, from the same start on the same batches; test ELBO of both."""
    n = len(data.train)
    pyro.clear_param_store()
    torch.manual_seed(seed)
    m = DecoderMAPVAE(data.input_dim, z_dim=2, hidden=(64,), prior_scale=prior_scale, n_data=n)
    first = data.train.x[:batch_size]
    m.guide(first)
    vae = m.plain_vae()
    results = {}
    for name in ("svi_map", "adam_weight_decay"):
        pyro.set_rng_seed(seed)
        if name == "svi_map":
            info = inspect_program(m.model, m.guide, first)
            step = Step.of_elbo(make_elbo("mc"), m, [(1.0, m.model, m.guide)], info,
                                torch.optim.Adam(collect_params(m, info), lr=lr))
        else:
            step = Step(list(vae.parameters()), torch.optim.Adam([
                {"params": vae.encoder.parameters()},
                {"params": vae.decoder.parameters(),
                 "weight_decay": batch_size / (n * prior_scale**2)}], lr=lr),
                lambda xb: make_elbo("mc").differentiable_loss(vae.model, vae.guide, xb))
        order = torch.Generator().manual_seed(seed)  # the same batches for both
        total, first_bad = torch.zeros(()), torch.zeros((), dtype=torch.long)
        with pyro.validation_enabled(False):
            for _ in range(epochs):
                for i, rows in enumerate(torch.randperm(n, generator=order).split(batch_size)):
                    step(i, (data.train.x[rows],), total, first_bad)
        trained = m.plain_vae() if name == "svi_map" else vae
        trained.eval()
        results[name] = {
            "test_elbo": score(trained, data.test.x, num_samples=10).elbo.mean().item(),
            "decoder_weight_norm": math.sqrt(sum(float(p.detach().pow(2).sum())
                                                 for p in trained.decoder.parameters())),
        }
    results["weight_decay"] = batch_size / (n * prior_scale**2)
    return results
