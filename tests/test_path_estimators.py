"""Sticking the landing (``--elbo stl``) and the doubly reparameterized IWAE gradient
(``--elbo iwae-dreg``), checked in float64 on a linear-Gaussian model whose posterior and
ELBO are known in closed form:

    z ~ N(0, I_2),  x | z ~ N(A z + b, s^2 I_3),  A with orthogonal columns, so that
    p(z|x) = N(S A^T (x - b) / s^2, S),  S = (I + A^T A / s^2)^-1  is diagonal,

and a linear amortized guide q(z|x) = N(W x + c, diag exp(2 l)) that can equal it.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae import TrainConfig, UsageError, make_elbo, train
from ppl_vae.inference.svi import with_params

D, Z, S = 3, 2, 0.7
X = torch.tensor([[0.3, -1.2, 0.8], [1.5, 0.2, -0.4], [-0.6, 0.9, 1.1], [0.1, 0.4, -1.3]],
                 dtype=torch.float64)


class LinearGaussian(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.tensor([[1.0, 0.2], [0.3, -1.0], [0.5, 0.4]],
                                            dtype=torch.float64))
        self.A = nn.Parameter(q * torch.tensor([1.5, 0.8], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64))
        self.W = nn.Parameter(torch.zeros(Z, D, dtype=torch.float64))
        self.c = nn.Parameter(torch.zeros(Z, dtype=torch.float64))
        self.log_scale = nn.Parameter(torch.zeros(Z, dtype=torch.float64))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            zero = x.new_zeros(x.shape[0], Z)
            z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.A.T + self.b, S).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.W.T + self.c, self.log_scale.exp()
                                         ).to_event(1))

    def guide_params(self):
        return [self.W, self.c, self.log_scale]

    @torch.no_grad()
    def set_exact_posterior(self) -> None:
        cov = torch.linalg.inv(torch.eye(Z, dtype=torch.float64) + self.A.T @ self.A / S**2)
        assert torch.allclose(cov, torch.diag(torch.diag(cov)), atol=1e-12)  # diagonal
        self.W.copy_(cov @ self.A.T / S**2)
        self.c.copy_(-self.W @ self.b)
        self.log_scale.copy_(0.5 * torch.diag(cov).log())

    def exact_elbo(self, x):
        """sum over the rows of E_q[log p(x|z)] + E_q[log p(z)] + H(q), in closed form."""
        mu, var = x @ self.W.T + self.c, (2 * self.log_scale).exp()
        resid = x - mu @ self.A.T - self.b
        fit = -(resid**2).sum(-1) - (self.A**2 @ var).sum()  # E|A (z - mu)|^2
        log_lik = -0.5 * D * math.log(2 * math.pi * S**2) + fit / (2 * S**2)
        log_prior = -0.5 * Z * math.log(2 * math.pi) - 0.5 * ((mu**2).sum(-1) + var.sum())
        entropy = self.log_scale.sum() + 0.5 * Z * (1 + math.log(2 * math.pi))
        return (log_lik + log_prior + entropy).sum()


def perturbed() -> LinearGaussian:
    m = LinearGaussian()
    m.set_exact_posterior()
    with torch.no_grad():
        m.W.add_(0.3)
        m.c.sub_(0.2)
        m.log_scale.add_(torch.tensor([0.4, -0.3], dtype=torch.float64))
    return m


def gradient(m: LinearGaussian, name: str, particles: int, seed: int) -> torch.Tensor:
    """All parameters' gradients of one draw of ``--elbo name``'s loss, as one vector."""
    m.zero_grad()
    pyro.set_rng_seed(seed)
    elbo = make_elbo(name, particles)
    if name == "iwae":  # RenyiELBO: its own backward, into the params it sees registered
        elbo.loss_and_grads(*with_params(m), X)
    else:
        elbo.differentiable_loss(m.model, m.guide, X).backward()
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                      for p in m.parameters()])


GUIDE = slice(D * Z + D, None)  # W, c, log_scale follow A and b in the vector
MODEL = slice(0, D * Z + D)


def draws(m, name, particles, n=400):
    return torch.stack([gradient(m, name, particles, seed) for seed in range(n)])


def assert_mean_equal(a, b, what, sd_b=True):
    """Per component, |mean a - mean b| within 4 standard errors (b exact when sd_b False)."""
    se = a.std(0) ** 2 / len(a)
    if sd_b:
        se = se + b.std(0) ** 2 / len(b)
        b = b.mean(0)
    gap = (a.mean(0) - b).abs()
    assert (gap <= 4 * se.sqrt() + 1e-9).all(), (what, gap, se.sqrt())


@pytest.mark.parametrize("name, particles", [("stl", 1), ("stl", 3), ("iwae-dreg", 2),
                                             ("iwae-dreg", 5), ("iwae-dreg", 20)])
def test_guide_gradient_is_zero_for_every_draw_at_the_exact_posterior(name, particles):
    m = LinearGaussian()
    m.set_exact_posterior()
    for seed in range(10):
        g = gradient(m, name, particles, seed)
        assert g[GUIDE].abs().max() < 1e-10, (seed, g[GUIDE])
    plain = "mc" if name == "stl" else "iwae"
    assert gradient(m, plain, particles, 0)[GUIDE].abs().max() > 1e-2  # the score term


@pytest.mark.parametrize("name", ["mc", "analytic", "stl"])
def test_expected_gradient_is_the_exact_elbo_gradient(name):
    m = perturbed()
    m.zero_grad()
    (-m.exact_elbo(X)).backward()
    exact = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert_mean_equal(draws(m, name, 1), exact, name, sd_b=False)


@pytest.mark.parametrize("particles", [2, 5])
def test_dreg_estimates_the_iwae_gradient(particles):
    """The model's gradient is IWAE's for every draw (the same z from the same seed); the
    guide's has IWAE's mean, with a smaller spread."""
    m = perturbed()
    for seed in range(5):
        a, b = gradient(m, "iwae-dreg", particles, seed), gradient(m, "iwae", particles, seed)
        assert torch.allclose(a[MODEL], b[MODEL], rtol=1e-10, atol=1e-12)
    dreg, iwae = draws(m, "iwae-dreg", particles), draws(m, "iwae", particles)
    assert_mean_equal(dreg[:, GUIDE], iwae[:, GUIDE], "iwae-dreg vs iwae")
    assert (dreg[:, GUIDE].var(0) < iwae[:, GUIDE].var(0)).all()


def test_the_loss_values_are_the_elbo_and_the_iwae_bound():
    m = perturbed()
    for name, plain in (("stl", "mc"), ("iwae-dreg", "iwae")):
        for seed in range(3):
            pyro.set_rng_seed(seed)
            a = make_elbo(name, 4).differentiable_loss(m.model, m.guide, X).item()
            pyro.set_rng_seed(seed)
            b = make_elbo(plain, 4).loss(m.model, m.guide, X)
            pyro.set_rng_seed(seed)
            c = make_elbo(name, 4).loss(m.model, m.guide, X)
            assert a == pytest.approx(b, rel=1e-12) and c == pytest.approx(b, rel=1e-12), name


class DiscreteGuide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(3))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
            pyro.sample("x", dist.Normal(y.double().unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=self.logits))


@pytest.mark.parametrize("name, particles, fix", [("stl", 1, "elbo mc"),
                                                  ("iwae-dreg", 3, "elbo iwae")])
def test_a_site_without_rsample_is_refused_by_name(name, particles, fix):
    m = DiscreteGuide()
    with pytest.raises(UsageError, match=f"site 'y' \\(Categorical\\) is not; use {fix}"):
        make_elbo(name, particles).differentiable_loss(m.model, m.guide, X[:, :1])


def test_dreg_with_one_particle_is_stl():
    m = perturbed()
    for seed in range(3):
        a, b = gradient(m, "iwae-dreg", 1, seed), gradient(m, "stl", 1, seed)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_dreg_refuses_what_it_cannot_weigh():
    with pytest.raises(UsageError, match="needs them vectorized.*use elbo iwae"):
        make_elbo("iwae-dreg", 3, vectorize=False)
    with pytest.raises(UsageError, match="one particle is the plain ELBO"):
        TrainConfig(elbo="iwae-dreg").with_recipe({})


@pytest.mark.parametrize("elbo, compile_", [("stl", False), ("iwae-dreg", False),
                                            ("stl", True), ("iwae-dreg", True)])
def test_training_runs_with_each(digits, tmp_path, elbo, compile_):
    run = train(TrainConfig(elbo=elbo, particles=3, epochs=2, compile=compile_,
                            model_options={"hidden": (16,), "z_dim": 2}, batch_size=128,
                            eval_particles=2, out=str(tmp_path / "r")), data=digits,
                progress=False)
    elbos = [row["test_elbo"] for row in run.history]
    assert all(math.isfinite(e) for e in elbos) and elbos[-1] > elbos[0]
    step = run.summary.get("step", "eager")
    assert step.startswith("compiled") == compile_, step
