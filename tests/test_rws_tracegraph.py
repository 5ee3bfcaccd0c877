"""Reweighted wake-sleep (``--elbo rws``) and ``TraceGraph_ELBO`` (``--elbo tracegraph``),
checked in float64 against exact values: IWAE's per-draw value and model gradient, the
exact posterior, and the enumerated (exact) ELBO gradient of a model with a discrete latent.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from test_path_estimators import GUIDE, MODEL, LinearGaussian, X, draws, gradient, perturbed
from torch import nn

from ppl_vae import TrainConfig, UsageError, make_elbo, train


def test_rws_value_and_model_gradient_are_iwae_s_for_every_draw():
    m = perturbed()
    for seed in range(5):
        pyro.set_rng_seed(seed)
        value = make_elbo("rws", 4).differentiable_loss(m.model, m.guide, X).item()
        pyro.set_rng_seed(seed)
        iwae = make_elbo("iwae", 4).loss(m.model, m.guide, X)
        pyro.set_rng_seed(seed)
        assert make_elbo("rws", 4).loss(m.model, m.guide, X) == pytest.approx(iwae, rel=1e-12)
        assert value == pytest.approx(iwae, rel=1e-12)
        a, b = gradient(m, "rws", 4, seed), gradient(m, "iwae", 4, seed)
        assert torch.allclose(a[MODEL], b[MODEL], rtol=1e-10, atol=1e-12)


def test_rws_guide_gradient_has_mean_zero_at_the_exact_posterior():
    """There every weight is 1/K and wake-phi is -1/K sum_k d log q(z_k), z_k ~ q: mean 0."""
    m = LinearGaussian()
    m.set_exact_posterior()
    g = draws(m, "rws", 5)[:, GUIDE]
    se = g.std(0) / len(g) ** 0.5
    assert (g.mean(0).abs() <= 4 * se).all(), (g.mean(0), se)
    assert (g.std(0) > 1e-3).any()  # not zero per draw: a score term, unlike stl and dreg


def test_rws_refuses_one_particle_and_sleep_without_observations():
    with pytest.raises(UsageError, match="rws weighs K particles"):
        TrainConfig(elbo="rws").with_recipe({})
    with pytest.raises(UsageError, match="rws weighs K particles"):
        make_elbo("rws", 1)
    m = LinearGaussian()
    elbo = make_elbo("rws", 3)
    elbo.insomnia = 0.5
    with pytest.raises(UsageError, match="observations="):
        elbo.differentiable_loss(m.model, m.guide, X)


class Mixture(nn.Module):
    """y ~ Categorical(pi), x | y ~ N(mu_y, 1) per point; q(y|x) = Categorical(logits
    a x + c). ``baseline``: a constant baseline for the score term of y."""

    def __init__(self) -> None:
        super().__init__()
        self.pi_logits = nn.Parameter(torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64))
        self.mu = nn.Parameter(torch.tensor([-1.5, 0.2, 1.8], dtype=torch.float64))
        self.a = nn.Parameter(torch.tensor([-1.0, 0.1, 0.9], dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64))
        self.baseline = None

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=self.pi_logits))
            pyro.sample("x", dist.Normal(self.mu[y], 1.0), obs=x)

    def guide(self, x):
        infer = {} if self.baseline is None else {"baseline": {"baseline_value": self.baseline}}
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=x[:, None] * self.a + self.c), infer=infer)


XS = torch.tensor([-1.2, 0.4, 2.1, -0.3, 1.0], dtype=torch.float64)


def mixture_gradients(m, name, n=400):
    out = []
    for seed in range(n):
        m.zero_grad()
        pyro.set_rng_seed(seed)
        make_elbo(name, 1).differentiable_loss(m.model, m.guide, XS).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    return torch.stack(out)


def test_tracegraph_estimates_the_exact_enumerated_gradient_and_baselines_cut_variance():
    m = Mixture()
    m.zero_grad()
    make_elbo("enum", 1).differentiable_loss(m.model, config_enumerate(m.guide), XS).backward()
    exact = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    plain = mixture_gradients(m, "tracegraph")
    se = plain.std(0) / len(plain) ** 0.5
    assert ((plain.mean(0) - exact).abs() <= 4 * se + 1e-12).all(), (plain.mean(0), exact, se)
    per_point = [make_elbo("enum", 1).differentiable_loss(  # each point's exact -ELBO
        m.model, config_enumerate(m.guide), XS[i:i + 1]).detach() for i in range(len(XS))]
    m.baseline = -torch.stack(per_point)  # a good constant baseline: the expected cost
    based = mixture_gradients(m, "tracegraph")
    se = based.std(0) / len(based) ** 0.5
    assert ((based.mean(0) - exact).abs() <= 4 * se + 1e-12).all()
    guide = slice(6, None)  # a and c
    assert (based[:, guide].var(0) < plain[:, guide].var(0)).all()


@pytest.mark.parametrize("elbo, compile_", [("rws", False), ("tracegraph", False),
                                            ("rws", True), ("tracegraph", True)])
def test_training_runs_with_each(digits, tmp_path, elbo, compile_):
    run = train(TrainConfig(elbo=elbo, particles=3, epochs=2, batch_size=128, compile=compile_,
                            model_options={"hidden": (16,), "z_dim": 2}, eval_particles=2,
                            out=str(tmp_path / "r")), data=digits, progress=False)
    elbos = [row["test_elbo"] for row in run.history]
    assert all(math.isfinite(e) for e in elbos) and elbos[-1] > elbos[0], elbos
    step = run.summary.get("step", "eager")
    assert step.startswith("compiled") == compile_, step
