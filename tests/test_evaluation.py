"""Per-image ELBO and IWAE from Pyro traces, checked against exact log-likelihoods.

The linear-Gaussian VAE is probabilistic PCA: x = W z + b + sigma eps, z ~ N(0, I), so
log p(x) = log N(x; b, W W^T + sigma^2 I) in closed form. With orthogonal columns of W the
exact posterior p(z|x) = N(M^-1 W^T (x - b) / sigma^2, M^-1), M = I + W^T W / sigma^2, is
diagonal, so the VAE's guide can represent it exactly and every importance weight is p(x).
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from helpers import encoder_scale_inverse
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from ppl_vae import VAE, Scores, log_weights, score
from ppl_vae.inference import importance as importance_module
from ppl_vae.inference.program import ProgramError

D, Z, SIGMA = 6, 3, 0.5
F64 = torch.float64


class PPCA:
    """A linear-Gaussian VAE in float64 with its exact marginal and posterior."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vae = VAE(D, z_dim=Z, hidden=(), likelihood="gaussian", gaussian_scale=SIGMA).double()
        self.sigma = self.vae.log_scale.exp().item()  # the sigma the model really uses
        q, _ = torch.linalg.qr(torch.randn(D, Z, generator=g, dtype=F64))
        self.W = q * torch.tensor([2.0, 1.0, 0.5], dtype=F64)  # orthogonal, distinct norms
        self.b = 0.3 * torch.randn(D, generator=g, dtype=F64)
        m = torch.eye(Z, dtype=F64) + self.W.T @ self.W / self.sigma**2
        self.post_cov = torch.linalg.inv(m)
        assert torch.allclose(self.post_cov, torch.diag(torch.diagonal(self.post_cov)))
        with torch.no_grad():
            self.vae.decoder[0].weight.copy_(self.W)
            self.vae.decoder[0].bias.copy_(self.b)
            self.set_exact_encoder()
        self.marginal = MultivariateNormal(
            self.b, self.W @ self.W.T + self.sigma**2 * torch.eye(D, dtype=F64))
        self.x = self.generate(400, g)

    def set_exact_encoder(self) -> None:
        a = self.post_cov @ self.W.T / self.sigma**2
        enc = self.vae.encoder[0]
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:Z] = a
        enc.bias[:Z] = -a @ self.b
        # the second half is the scale head's h, with sigma = s(h) for the default head s
        enc.bias[Z:] = encoder_scale_inverse(torch.diagonal(self.post_cov).sqrt(),
                                             self.vae.scale_head)

    def generate(self, n: int, g: torch.Generator) -> torch.Tensor:
        """x from the model itself: z ~ N(0, I), x = W z + b + sigma eps."""
        z = torch.randn(n, Z, generator=g, dtype=F64)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, D, generator=g, dtype=F64)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        return self.marginal.log_prob(x)

    def posterior(self, x: torch.Tensor) -> Normal:
        loc = (x - self.b) @ self.W @ self.post_cov / self.sigma**2
        return Normal(loc, torch.diagonal(self.post_cov).sqrt().expand_as(loc))


@pytest.fixture
def ppca():
    return PPCA()


def test_ppca_encoder_is_the_exact_posterior(ppca):
    loc, scale = ppca.vae.encode(ppca.x)
    post = ppca.posterior(ppca.x)
    assert torch.allclose(loc, post.loc, atol=1e-12)
    assert torch.allclose(scale, post.scale, atol=1e-12)


def test_exact_posterior_gives_exact_log_weights(ppca):
    """With q(z|x) = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every draw z."""
    lw = log_weights(ppca.vae.model, ppca.vae.guide, ppca.x, num_samples=50)
    assert lw.shape == (50, len(ppca.x)) and lw.dtype == F64
    exact = ppca.log_px(ppca.x)
    assert (lw - exact).abs().max() < 1e-9
    s = score(ppca.vae, ppca.x, num_samples=7, iwae=True)
    assert s.elbo.dtype == s.iwae.dtype == F64  # a float64 model is scored in float64
    assert torch.allclose(s.elbo, exact, atol=1e-9) and torch.allclose(s.iwae, exact, atol=1e-9)


def test_exact_log_weights_survive_chunking(ppca, monkeypatch):
    """Memory-bounded chunks of rows and of samples reassemble in the right order."""
    # one row at a time, its 13 samples in chunks of 5, 5, 3
    monkeypatch.setattr(importance_module, "MAX_ELEMENTS", 5 * D)
    x = ppca.x[:37]
    s = score(ppca.vae, x, num_samples=13, iwae=True)
    assert s.elbo.shape == s.iwae.shape == (37,)
    assert torch.allclose(s.iwae, ppca.log_px(x), atol=1e-9)
    assert torch.allclose(s.elbo, ppca.log_px(x), atol=1e-9)
    # the evaluation line says what happened: no "one vectorized pass" for 37 or more passes
    assert s.method.startswith("13 samples per data point, vectorized, in ")
    assert s.method.endswith(" passes over the rows")
    monkeypatch.undo()
    assert score(ppca.vae, x, num_samples=13).method == \
        "13 samples per data point in one vectorized pass"


@pytest.fixture
def perturbed(ppca):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ppca.vae.encoder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return ppca


def test_elbo_of_an_inexact_encoder(perturbed):
    """ELBO(x) = log p(x) - KL(q(z|x) || p(z|x)): the estimate matches it within 4 SE."""
    ppca, k = perturbed, 2000
    x = ppca.x[:100]
    loc, scale = ppca.vae.encode(x)
    gap = kl_divergence(Normal(loc, scale), ppca.posterior(x)).sum(-1)
    assert (gap > 0).all()
    lw = log_weights(ppca.vae.model, ppca.vae.guide, x, num_samples=k).detach()
    est, se = lw.mean(0), lw.std(0) / math.sqrt(k)
    truth = ppca.log_px(x) - gap
    assert ((est - truth).abs() < 5 * se).all()  # 100 comparisons: 5 SE each
    assert abs((est - truth).sum()) < 4 * se.pow(2).sum().sqrt()


def test_iwae_approaches_exact_log_likelihood(perturbed, sem):
    """Mean ELBO < log p(x); IWAE_2000 is within 4 SE of log p(x) and much closer."""
    ppca = perturbed
    exact = ppca.log_px(ppca.x)
    s = score(ppca.vae, ppca.x, num_samples=2000, iwae=True)
    elbo_gap, iwae_gap = exact - s.elbo, exact - s.iwae
    assert elbo_gap.mean() > 4 * sem(elbo_gap)
    assert abs(iwae_gap.mean()) < 4 * sem(iwae_gap), (iwae_gap.mean(), sem(iwae_gap))
    assert iwae_gap.mean().abs() < 0.1 * elbo_gap.mean()


def test_score_ignores_beta(digits):
    """Scores are densities: a beta-VAE's training weight on the KL is not part of them."""
    x = digits.test.x[:50]
    plain, beta = VAE(64, z_dim=4, hidden=(16,)), VAE(64, z_dim=4, hidden=(16,), beta=0.3)
    beta.load_state_dict(plain.state_dict())
    a = score(plain, x, num_samples=5, iwae=True, seed=3)
    b = score(beta, x, num_samples=5, iwae=True, seed=3)
    assert torch.allclose(a.elbo, b.elbo) and torch.allclose(a.iwae, b.iwae)


def test_score_is_seeded_and_leaves_rng_alone(digits):
    vae = VAE(64, z_dim=4, hidden=(16,))
    x = digits.test.x[:40]
    state = torch.get_rng_state()
    a = score(vae, x, num_samples=5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = score(vae, x, num_samples=5, seed=1)
    c = score(vae, x, num_samples=5, seed=2)
    assert torch.equal(a.elbo, b.elbo)
    assert not torch.equal(a.elbo, c.elbo)
    assert a.iwae is None and a.iwae_samples == 0
    assert a.method == "5 samples per data point in one vectorized pass"
    assert a.summary() == {"test_elbo": pytest.approx(a.elbo.mean().item()),
                           "eval_method": a.method}
    assert not a.elbo.requires_grad


def test_scores_summary():
    s = Scores(torch.tensor([-1.0, -3.0]), torch.tensor([-0.5, -2.5]), 10)
    assert s.summary() == {"test_elbo": -2.0, "test_log_likelihood_iwae": -1.5,
                           "iwae_samples": 10}
    s = Scores(torch.tensor([-1.0, -3.0]), method="how")
    assert s.summary() == {"test_elbo": -2.0, "eval_method": "how"}


def test_iwae_bounds_on_a_trained_vae(trained_run, sem):
    """IWAE_K >= ELBO_K per image (same draws), IWAE_1 = ELBO, and E[IWAE_K] rises with K.

    Different K use different draws, so means are compared through per-image paired
    differences and their standard errors; ELBO_100 (mean of 100 log weights) is the
    low-noise estimate of E[IWAE_1] = ELBO.
    """
    module, x = trained_run.module, trained_run.data.test.x
    s = {k: score(module, x, num_samples=k, iwae=True, seed=k) for k in (1, 10, 100)}
    for k, sk in s.items():
        assert sk.iwae_samples == k
        assert (sk.iwae >= sk.elbo - 1e-4).all(), k  # Jensen, draw by draw
    assert torch.allclose(s[1].iwae, s[1].elbo)
    elbo = s[100].elbo
    d = s[1].iwae - elbo  # E[IWAE_1] = ELBO
    assert abs(d.mean()) < 4 * sem(d)
    d = s[10].iwae - elbo  # E[IWAE_10] > E[IWAE_1]
    assert d.mean() > 4 * sem(d), (d.mean(), sem(d))
    d = s[10].iwae - s[1].iwae  # the same, from the noisy single-draw bound
    assert d.mean() > 4 * sem(d), (d.mean(), sem(d))
    d = s[100].iwae - s[10].iwae  # E[IWAE_100] >= E[IWAE_10]
    assert d.mean() > -4 * sem(d)


def test_score_with_the_callers_program_info_skips_inspection_and_draws_the_same(
        digits, monkeypatch):
    """The trainer passes what its probe found: no second inspection, the same numbers."""
    from ppl_vae.inference.program import inspect_program

    vae = VAE(64, z_dim=3, hidden=(16,))
    x = digits.test.x[:40]
    info = inspect_program(vae.model, vae.guide, x[:2])
    plain = score(vae, x, num_samples=4, iwae=True, seed=3)
    calls = []
    monkeypatch.setattr(importance_module, "inspect_program",
                        lambda *a, **k: calls.append(a) or inspect_program(*a, **k))
    given = score(vae, x, num_samples=4, iwae=True, seed=3, info=info)
    assert not calls
    assert torch.equal(given.elbo, plain.elbo) and torch.equal(given.iwae, plain.iwae)
    score(vae, x, num_samples=4, seed=3, info=info, guide=lambda x: vae.guide(x))
    assert len(calls) == 1  # another proposal is another program: inspected


class BernoulliOnGreyLevels(torch.nn.Module):
    """The README's TinyVAE: a Bernoulli without ``validate_args=False``."""

    def __init__(self) -> None:
        super().__init__()
        self.dec = torch.nn.Linear(2, 64)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", pyro.distributions.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))


def test_score_runs_without_pyro_validation_as_runs_do(digits):
    """With Pyro's validation on (its default in a fresh process), grey-level targets lie
    outside a Bernoulli's support: score checks nothing unless asked, as runs score by
    default; ``validate=True`` (a run's --validate) and None (the caller's setting) check."""
    x = digits.test.x[:8]
    assert ((x > 0) & (x < 1)).any()
    vae = BernoulliOnGreyLevels()
    with pyro.validation_enabled(True):
        assert torch.isfinite(score(vae, x, num_samples=3).elbo).all()
        for validate in (True, None):
            with pytest.raises(ProgramError, match="within the support"):
                score(vae, x, num_samples=3, validate=validate)
