"""Round seven of hostile use: others' Pyro programs (autoguides in ``__init__``, constrained
latents under ``analytic``, guides that do not match their model)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from torch import nn

from ppl_vae import TrainConfig, UsageError, train
from ppl_vae.inference.estimators import make_elbo, suited
from ppl_vae.inference.program import inspect_program


class PixelBeta(nn.Module):
    """Pyro's idiom: the autoguide made in ``__init__`` (no guide method on the class)."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.guide = AutoNormal(self.model)

    def model(self, x):
        theta = pyro.sample("theta", dist.Beta(x.new_ones(self.input_dim), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Bernoulli(theta, validate_args=False).to_event(1), obs=x)


def test_a_guide_assigned_in_init_trains(digits, tmp_path):
    run = train(TrainConfig(model=PixelBeta, epochs=1, out=str(tmp_path / "r")), data=digits,
                progress=False)
    assert torch.isfinite(torch.tensor(run.summary["test_elbo"]))


def test_a_built_model_without_a_guide_is_refused_in_one_line(digits):
    class NoGuide(nn.Module):
        def __init__(self, input_dim: int) -> None:
            super().__init__()

        def model(self, x):
            pass

    with pytest.raises(UsageError, match="built a NoGuide without guide"):
        train(TrainConfig(model=NoGuide, epochs=1), data=digits, progress=False)


def test_analytic_on_an_autoguide_s_constrained_site_keeps_the_jacobian():
    """AutoNormal's Beta site is a Delta with the log-Jacobian as its log_density; Pyro's
    KL(Delta || p) is -log p(v), dropping it, so 'analytic' there is not the ELBO. Here the
    Delta site is scored by log q - log p, so analytic equals mc at the same draws, and the
    probe does not offer analytic (no closed-form KL is left)."""
    from pyro.infer import TraceMeanField_ELBO as PyroMeanField

    pyro.clear_param_store()
    x = torch.rand(6, 4).bernoulli()
    model = PixelBeta(4)
    model.guide(x)
    info = inspect_program(model.model, model.guide, x)
    assert not info.closed_kl and "analytic" not in suited(info)
    losses = {}
    for name, elbo in (("mc", make_elbo("mc", 3)), ("analytic", make_elbo("analytic", 3)),
                       ("pyro", PyroMeanField(num_particles=3, vectorize_particles=True,
                                              max_plate_nesting=1))):
        pyro.set_rng_seed(3)
        losses[name] = elbo.differentiable_loss(model.model, model.guide, x)
    assert torch.allclose(losses["analytic"], losses["mc"], rtol=1e-6)
    assert not torch.allclose(losses["pyro"], losses["mc"], rtol=1e-3)  # (the Jacobian)


def _vae(guide_body, plate_size=None):
    """A 4-1 VAE whose guide is ``guide_body(x, loc)`` (the model is Pyro's example's)."""

    def model(x):
        with pyro.plate("data", plate_size or x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 1), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z.expand(-1, 4)).to_event(1), obs=x)

    def guide(x):
        guide_body(x, x.sum(-1, keepdim=True) - 2)

    return model, guide


def _plated(name, **kw):
    def body(x, loc):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(name, dist.Normal(loc, 1.0).to_event(1), **kw)
    return body


def _unplated(x, loc):
    pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def _with_factor(x, loc):
    _plated("z")(x, loc)
    pyro.factor("penalty", -loc.pow(2).sum(), has_rsample=True)


@pytest.mark.parametrize("body, plate_size, fragment", [
    (_plated("zz"), None, "the guide samples 'zz', which the model does not (the model's 'z'"),
    (_plated("x", obs=torch.zeros(3, 4)), None, "the guide observes site 'x'"),
    (_unplated, None, 'the guide at site "z", invalid log_prob shape'),
    (_plated("z"), 128, "the program's plate 'data' has size 128 but holds the batch's 3"),
], ids=["a guide site the model lacks", "a guide observing", "a guide without the plate",
        "a plate of a fixed size"])
def test_a_guide_that_does_not_match_its_model_is_refused(body, plate_size, fragment):
    """What Pyro's validation raises or warns (training runs with it off), refused in one
    line by the probe: such programs trained silently, their bounds bounds of nothing."""
    model, guide = _vae(body, plate_size)
    x = torch.rand(3, 4).bernoulli()
    with pytest.raises(UsageError) as e:
        inspect_program(model, guide, x)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_an_auxiliary_guide_site_and_a_guide_factor_are_accepted():
    model, guide = _vae(_with_factor)
    info = inspect_program(model, guide, torch.rand(3, 4).bernoulli())
    assert info.data_plate == "data" and "penalty" in info.auxiliary


def test_tracegraph_with_an_nn_baseline_draws_its_particles_one_by_one():
    """Pyro's TraceGraph_ELBO calls a site's nn_baseline on the rows, without a samples
    dimension: such a program is not vectorized (it ended in Pyro's traceback at 3
    particles), and its particles are drawn one after another."""
    enc, base = nn.Linear(4, 2), nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(x.new_full((len(x), 2), 0.5)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z.sum(-1, keepdim=True) * x.new_ones(4))
                        .to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=enc(x)).to_event(1),
                        infer={"baseline": {"nn_baseline": base, "nn_baseline_input": x}})

    x = torch.rand(5, 4).bernoulli()
    info = inspect_program(model, guide, x)
    assert not info.vectorized and "nn_baseline" in info.not_vectorized_because
    loss = make_elbo("tracegraph", 3, vectorize=info.vectorized).differentiable_loss(
        model, guide, x)
    loss.backward()
    assert torch.isfinite(loss) and enc.weight.grad is not None


class GlobalBias(nn.Module):
    """A global latent b (outside the data plate) and a local z, both guided by a Delta: the
    loss is exact."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.full((input_dim,), 0.3))
        self.enc, self.dec = nn.Linear(input_dim, 2), nn.Linear(2, input_dim)

    def model(self, x):
        b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z) + b, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.sample("b", dist.Delta(self.loc).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.enc(x)).to_event(1))


def test_a_batch_counts_its_share_of_the_global_terms(digits):
    """Each batch of B of the N training rows scales the sites outside the data plate by B/N
    (they counted once per batch, N/B times an epoch): the training loss is the batch's local
    terms plus B/N of the global ones."""
    from ppl_vae import Session

    s = Session(TrainConfig(model=GlobalBias, elbo="mc", batch_size=16), digits,
                progress=False)
    n, m = len(s.data.train), s.module
    for rows in (slice(0, 16), slice(16, 21)):
        (x,) = s.args(s.data.train, rows)
        z = m.enc(x)
        local = (dist.Normal(0.0, 1.0).log_prob(z).sum() +
                 dist.Normal(m.dec(z) + m.loc, 1.0).log_prob(x).sum())
        prior = dist.Normal(0.0, 1.0).log_prob(m.loc).sum()
        expected = -(local + len(x) / n * prior)
        assert torch.allclose(s.step().loss(x), expected, rtol=1e-6), rows
