"""Exact-value checks of four pieces of the package's inference arithmetic, each against a
closed form, with fixed seeds and tolerances from the Monte Carlo standard error:

1. ``--elbo rws``'s guide gradient (wake-phi) estimates d/dphi KL(p(z|x) || q) -- its sign
   and size, not only its mean zero at q = p (which holds for either sign);
2. the KL warm-up (:class:`ppl_vae.inference.svi.LatentScale` as a run's ``Session.step``
   applies it, times the model's ``beta``) scales the latent sites and only them, in the
   differentiable loss training uses, for ``mc`` and ``analytic``;
3. ``analytic``'s own ``differentiable_loss`` (TraceMeanField_ELBO, the training path, not
   Pyro's ``.loss``) with ``beta != 1`` on a linear-Gaussian model: per draw and in
   expectation, value and gradient;
4. ``compare``'s gradient statistics (:func:`gradient_stats`: total variance, SNR, mean norm)
   on a model whose per-draw gradient is an affine function of a standard normal.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from ppl_vae import TrainConfig, make_elbo
from ppl_vae.evaluation.comparison import gradient_stats
from ppl_vae.run.session import Session

F64 = torch.float64


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# -- 1. RWS: the wake-phi guide gradient is the inclusive KL's ------------------------------------

# z ~ N(0, 1), x | z ~ N(z, s^2): p(z|x) = N(x / (1 + s^2), s^2 / (1 + s^2))
RWS_X, RWS_S = 1.0, 0.8
RWS_MU_P = RWS_X / (1 + RWS_S**2)
RWS_VAR_P = RWS_S**2 / (1 + RWS_S**2)
RWS_M, RWS_SIGMA = 0.2, 0.9  # the perturbed guide q = N(m, sigma^2): sigma > sigma_p (sane weights)


class Replicated(nn.Module):
    """N independent replicates of one problem in one plate: row i is x, with its own guide
    parameters (m_i, log sigma_i), all equal; d loss / d m_i is replicate i's estimate."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.full((n,), RWS_M, dtype=F64))
        self.log_sigma = nn.Parameter(torch.full((n,), math.log(RWS_SIGMA), dtype=F64))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, RWS_S), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.m, self.log_sigma.exp()))


def inclusive_kl_gradient() -> torch.Tensor:
    """d/d(m, log sigma) of KL(N(mu_p, var_p) || N(m, sigma^2)), in closed form."""
    m, var = RWS_M, RWS_SIGMA**2
    return torch.tensor([(m - RWS_MU_P) / var,
                         1 - (RWS_VAR_P + (RWS_MU_P - m) ** 2) / var], dtype=F64)


def first_order_bias() -> torch.Tensor:
    """The self-normalized estimate sum_k w~_k f(z_k) of E_p f has bias -E_q[w^2 (f - E_p f)] / K
    + O(1/K^2) (w = p(z|x) / q(z), E_q w = 1); this returns E_q[w^2 (f - E_p f)] for the two
    per-draw terms f = -d log q(z) / d(m, log sigma), by quadrature (float64)."""
    z = torch.linspace(-14.0, 14.0, 280_001, dtype=F64)
    p = dist.Normal(RWS_MU_P, RWS_VAR_P**0.5).log_prob(z).exp()
    q = dist.Normal(RWS_M, RWS_SIGMA).log_prob(z).exp()
    u = (z - RWS_M) / RWS_SIGMA
    f = torch.stack([-u / RWS_SIGMA, 1 - u**2])
    exact = inclusive_kl_gradient()
    return ((p * p / q) * (f - exact[:, None])).sum(-1) * (z[1] - z[0])


def test_closed_forms_of_the_rws_check_agree_with_quadrature():
    """The closed-form gradient is E_p[-d log q] (quadrature), and the weights' second
    moment is finite (sigma^2 > var_p / 2), so the bias term is a number."""
    z = torch.linspace(-14.0, 14.0, 280_001, dtype=F64)
    p = dist.Normal(RWS_MU_P, RWS_VAR_P**0.5).log_prob(z).exp()
    u = (z - RWS_M) / RWS_SIGMA
    quad = (p * torch.stack([-u / RWS_SIGMA, 1 - u**2])).sum(-1) * (z[1] - z[0])
    assert torch.allclose(quad, inclusive_kl_gradient(), atol=1e-9)
    assert torch.isfinite(first_order_bias()).all()


def test_rws_guide_gradient_estimates_the_inclusive_kl_gradient():
    """Away from the posterior, the mean of the guide's gradient over N replicates is
    d/d(m, log sigma) KL(p(z|x) || q) within 4 standard errors plus twice the first-order
    bias (O(1/K), computed): right sign and size. A flipped sign is off by 2|grad|, uniform
    weights (mean E_q[-d log q] = 0) by |grad|, both many tolerances."""
    k, n = 1000, 3000  # (k != n: weights normalized over the wrong dimension would show)
    exact, bias = inclusive_kl_gradient(), first_order_bias()
    assert exact[0] < -0.4 and exact[1] > 0.25  # a real perturbation: m too small, sigma too big
    m = Replicated(n)
    x = torch.full((n,), RWS_X, dtype=F64)
    pyro.set_rng_seed(0)
    make_elbo("rws", k).differentiable_loss(m.model, m.guide, x).backward()
    g = torch.stack([m.m.grad, m.log_sigma.grad], -1)  # (n, 2): one estimate per replicate
    mean, se = g.mean(0), g.std(0) / math.sqrt(n)
    tol = 4 * se + 2 * bias.abs() / k
    assert ((mean - exact).abs() < tol).all(), (mean, exact, se, bias / k)
    assert (tol < 0.1 * exact.abs()).all()  # the check resolves the gradient's sign and size
    assert (g.std(0) > 1e-3).all()  # an estimate per replicate, not a constant


# -- 2. The KL warm-up in the loss a run trains ---------------------------------------------------

@pytest.mark.parametrize("elbo", ["mc", "analytic"])
def test_kl_warm_up_weights_the_latent_terms_of_the_training_loss(digits, elbo):
    """``Session.step().loss`` (what ``Step`` differentiates) at warm-up weight w on a
    beta = 0.5 VAE, against the same guide draw (same seed) computed by hand:
    -log p(x|z) + w beta (log q(z|x) - log p(z)) for ``mc`` and -log p(x|z) + w beta KL (closed
    form) for ``analytic``; at w = 0 the reconstruction term alone."""
    beta = 0.5
    s = Session(TrainConfig(model_options={"hidden": (16,), "z_dim": 2, "beta": beta},
                            kl_warmup=3, elbo=elbo), digits, progress=False)
    step, vae = s.step(), s.module
    x, = s.args(s.data.train, slice(0, 16))
    seen = []
    for w in (0.0, 0.3, 1.0):
        s.schedule.kl_weight.fill_(w)
        pyro.set_rng_seed(3)
        loss = step.loss(x)
        assert loss.requires_grad
        with torch.no_grad():
            pyro.set_rng_seed(3)  # the same draw of z as the loss's guide
            z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"]
            loc, scale = vae.encode(x)
            recon = F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
            if elbo == "mc":
                kl = (dist.Normal(loc, scale).log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z)).sum()
            else:
                kl = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum()
        expected = recon + w * beta * kl
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-3), (w, kl)
        seen.append((recon.item(), kl.item()))
    # the likelihood term is there, and beta times the KL is far above the tolerance (1e-3)
    assert all(r > 100 and beta * k > 1.0 for r, k in seen), seen


# -- 3. analytic's differentiable_loss with beta --------------------------------------------------

D, Z, S = 3, 2, 0.7
X = torch.tensor([[0.3, -1.2, 0.8], [1.5, 0.2, -0.4], [-0.6, 0.9, 1.1], [0.1, 0.4, -1.3]],
                 dtype=F64)


class BetaLinearGaussian(nn.Module):
    """z ~ N(0, I_2), x | z ~ N(A z + b, s^2 I_3); q(z|x) = N(W x + c, diag exp(2 l)); the site
    z scaled by ``beta`` in model and guide (as the package's VAEs do)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.A = nn.Parameter(torch.tensor([[1.0, 0.2], [0.3, -1.0], [0.5, 0.4]], dtype=F64))
        self.b = nn.Parameter(torch.tensor([0.2, -0.1, 0.3], dtype=F64))
        self.W = nn.Parameter(torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.3]], dtype=F64))
        self.c = nn.Parameter(torch.tensor([1.5, -1.2], dtype=F64))
        self.log_scale = nn.Parameter(torch.tensor([-1.0, -0.7], dtype=F64))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.beta):
                z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.A.T + self.b, S).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.beta):
            pyro.sample("z", dist.Normal(x @ self.W.T + self.c, self.log_scale.exp()
                                         ).to_event(1))

    def log_lik(self, x, z):
        resid = x - z @ self.A.T - self.b
        return (-0.5 * D * math.log(2 * math.pi * S**2) - (resid**2).sum(-1) / (2 * S**2)).sum()

    def kl(self, x):
        mu, var = x @ self.W.T + self.c, (2 * self.log_scale).exp()
        return 0.5 * (mu**2 + var - 1 - var.log()).sum()

    def exact_loss(self, x):
        """-E_q log p(x|z) + beta KL(q || p), summed over the rows, in closed form."""
        mu, var = x @ self.W.T + self.c, (2 * self.log_scale).exp()
        resid = x - mu @ self.A.T - self.b
        fit = (resid**2).sum(-1) + (self.A**2 @ var).sum()  # E|x - A z - b|^2
        expected_log_lik = (-0.5 * D * math.log(2 * math.pi * S**2) - fit / (2 * S**2)).sum()
        return -expected_log_lik + self.beta * self.kl(x)


def test_analytic_differentiable_loss_with_beta_per_draw():
    """Each draw's value is -log p(x|z) at the guide's z (same seed) plus beta times the
    closed-form KL; and its gradient in the guide's scale parameter l, whose only channel
    besides the KL is z, is beta dKL/dl plus the draw's path term."""
    beta = 0.3
    m = BetaLinearGaussian(beta)
    elbo = make_elbo("analytic", 1)
    for seed in range(4):
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(m.model, m.guide, X)
        pyro.set_rng_seed(seed)
        z = poutine.trace(m.guide).get_trace(X).nodes["z"]["value"]  # (differentiable in W, c, l)
        by_hand = -m.log_lik(X, z) + beta * m.kl(X)
        assert loss.item() == pytest.approx(by_hand.item(), rel=1e-12, abs=1e-12)
        got = torch.autograd.grad(loss, list(m.parameters()))
        want = torch.autograd.grad(by_hand, list(m.parameters()))
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert beta * m.kl(X).item() > 0.5 and (1 - beta) * m.kl(X).item() > 1.0  # beta matters


def test_analytic_differentiable_loss_with_beta_in_expectation():
    """Over R draws, the mean value and gradient are those of -E_q log p(x|z) + beta KL in
    closed form (within 4 standard errors); with beta dropped both would be off by
    (1 - beta) KL and its gradient."""
    beta, r = 0.3, 400
    m = BetaLinearGaussian(beta)
    elbo = make_elbo("analytic", 1)
    values, grads = [], []
    for seed in range(r):
        m.zero_grad()
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(m.model, m.guide, X)
        loss.backward()
        values.append(loss.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    values, grads = torch.stack(values), torch.stack(grads)
    m.zero_grad()
    exact = m.exact_loss(X)
    exact.backward()
    exact_grad = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    se = values.std() / math.sqrt(r)
    assert abs(values.mean() - exact) < 4 * se, (values.mean(), exact, se)
    assert (1 - beta) * m.kl(X) > 10 * se  # a dropped beta would be far outside
    gse = grads.std(0) / math.sqrt(r)
    assert ((grads.mean(0) - exact_grad).abs() <= 4 * gse + 1e-10).all(), (
        grads.mean(0), exact_grad, gse)
    # (1 - beta) times the KL's gradient in the guide's parameters, what a dropped beta would
    # add to the mean gradient: resolved by these draws
    guide = [m.W, m.c, m.log_scale]  # (after A and b in the vector)
    kl_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad((1 - beta) * m.kl(X), guide)])
    assert (kl_grad[-4:].abs() > 8 * gse[-4:]).all(), (kl_grad, gse)  # in c and l


# -- 4. compare's gradient variance and SNR -------------------------------------------------------

OBS_S = torch.tensor([0.5, 1.0, 2.0], dtype=F64)  # p(x_j | z_j) = N(z_j, s_j^2), z_j ~ N(0, 1)
GUIDE_SIGMA = torch.tensor([0.7, 1.3, 0.4], dtype=F64)  # q(z_j) = N(m_j, sigma_j^2), sigma fixed
POINT = torch.tensor([[0.8, -0.5, 1.5]], dtype=F64)  # one data point


class Holder(nn.Module):
    def __init__(self, value) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.tensor(value, dtype=F64))


class AffineGradients(nn.Module):
    """Three independent coordinates; the guide's locations m are two parameter groups,
    ``a`` (m_0) and ``b`` (m_1, m_2). With z_j = m_j + sigma_j eps_j, the single-draw
    gradient of -ELBO in m_j is, for ``mc`` (the score of q at z cancels its explicit
    m-dependence) ``c_j z_j - x_j / s_j^2``, c_j = 1 + 1 / s_j^2, and for ``analytic``
    (closed-form KL) ``(z_j - x_j) / s_j^2 + m_j``: both N(c_j m_j - x_j / s_j^2, v_j), with
    v_j = (sigma_j c_j)^2 and (sigma_j / s_j^2)^2; L particles divide v_j by L."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Holder([0.9])
        self.b = Holder([-0.6, 0.2])
        self.register_buffer("sigma", GUIDE_SIGMA.clone())

    def loc(self):
        return torch.cat([self.a.m, self.b.m])

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, OBS_S).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc().expand_as(x), self.sigma).to_event(1))


def exact_gradient_law(estimator: str, particles: int):
    """Per coordinate: the mean and variance of the single-step gradient in m."""
    m = torch.tensor([0.9, -0.6, 0.2], dtype=F64)
    c = 1 + 1 / OBS_S**2
    mean = c * m - POINT[0] / OBS_S**2
    sd = GUIDE_SIGMA * (c if estimator == "mc" else 1 / OBS_S**2)
    return mean, sd**2 / particles


@pytest.mark.parametrize("estimator", ["mc", "analytic"])
def test_gradient_stats_against_the_exact_gradient_distribution(estimator):
    """total_variance = sum_j v_j, snr = mean_j |mu_j| / sqrt(v_j) and (one coordinate)
    mean_norm = E|g|, the folded normal's mean, each within 4 standard errors: sample
    variance se v sqrt(2 / (R - 1)), SNR se sqrt((1 + SNR^2 / 2) / R), E|g| se sd|g| / sqrt(R).
    A variance 3 times too big is off by 2 v, about 30 se."""
    r = 600
    module = AffineGradients()
    pyro.set_rng_seed(0)
    rows = gradient_stats(module, (POINT,), repeats=r, particles=(1, 4), progress=False,
                          estimators=(estimator,))
    by = {(row["particles"], row["group"]): row for row in rows}
    assert set(by) == {(k, g) for k in (1, 4) for g in ("a", "b")}
    for k in (1, 4):
        mean, var = exact_gradient_law(estimator, k)
        snr = mean.abs() / var.sqrt()
        snr_se = ((1 + snr**2 / 2) / r).sqrt()
        for group, j in (("a", [0]), ("b", [1, 2])):
            row = by[(k, group)]
            v = var[j]
            var_se = (v**2 * 2 / (r - 1)).sum().sqrt()
            assert abs(row["total_variance"] - v.sum()) < 4 * var_se, (k, group, row, v)
            assert var_se < 0.2 * v.sum()
            want_snr, want_se = snr[j].mean(), snr_se[j].pow(2).sum().sqrt() / len(j)
            assert abs(row["snr"] - want_snr) < 4 * want_se, (k, group, row["snr"], want_snr)
        # group a, one coordinate: E|g| for g ~ N(mu, v)
        mu, sd = mean[0].item(), var[0].sqrt().item()
        folded = sd * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * sd**2)) + \
            mu * (1 - 2 * normal_cdf(-mu / sd))
        folded_sd = math.sqrt(mu**2 + sd**2 - folded**2)
        assert abs(by[(k, "a")]["mean_norm"] - folded) < 4 * folded_sd / math.sqrt(r)
