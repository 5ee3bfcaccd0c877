"""The conditional VAE (``--model cvae``): its Pyro program, its likelihood estimates checked
against a closed form, its objectives, early stopping, and the CLI end to end.

The linear-Gaussian CVAE has p(y|c) in closed form: with prior z ~ N(A c + a, diag(s^2)) and
y = Gc c + Gz z + b + sigma eps,

    p(y|c) = N(y; Gc c + b + Gz (A c + a), Gz diag(s^2) Gz^T + sigma^2 I),

and with orthogonal columns of Gz the exact posterior p(z|c,y) = N(M^-1 r, M^-1),
M = diag(1/s^2) + Gz^T Gz / sigma^2, r = Gz^T (y - Gc c - b) / sigma^2 + diag(1/s^2)(A c + a),
is diagonal with a mean linear in [c; y]: one ``nn.Linear`` recognition network holds it.
"""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error, build_model, loop_session
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

import ppl_vae
from ppl_vae import (
    Run,
    TrainConfig,
    UsageError,
    load_dataset,
    log_weights,
    make_elbo,
    score,
)
from ppl_vae.cli import evaluate_main, experiment_main, train_main
from ppl_vae.inference.program import inspect_program
from ppl_vae.inference.svi import Step, collect_params
from ppl_vae.models import hook
from ppl_vae.models.cvae import CVAE, CVAEOptions, conditional_scores, observed_quadrants
from ppl_vae.run.loop import Loop
from ppl_vae.run.session import from_record, load_data

F64 = torch.float64
IMAGE = (8, 8)
PIXELS = 64
CLASSES = 10
TRAIN_PROG = "python -m ppl_vae train: error: "
PNG = b"\x89PNG\r\n\x1a\n"
CLL_FIELDS = ("nn_baseline", "cvae_is", "cvae_neg_elbo", "gap")
CLL_NAMES = ["NN baseline", "CVAE (IS)", "CVAE (−ELBO)", "gap (NN − IS)"]
CVAE_NET = ["--model", "cvae", "--dataset", "digits", "--hidden", "32", "--z-dim", "2",
            "--epochs", "2", "--cll-samples", "10", "--eval-particles", "3"]
RUN_FILES = ["config.json", "metrics.csv", "baseline_metrics.csv", "checkpoint.pt",
             "summary.json", "elbo_curves.png", "cll_table.csv", "cll_table.md"]


def small_cvae(condition: str = "quadrants", k: int = 1, **kw) -> CVAE:
    """A small CVAE for the 8x8 digits (seeded by the autouse ``seeded`` fixture)."""
    kw = {"z_dim": 3, "hidden": (16,), **kw}
    if condition == "label":
        return CVAE(CLASSES, PIXELS, None, condition="label", **kw)
    return CVAE(PIXELS, PIXELS, ~observed_quadrants(IMAGE, k), condition="quadrants", **kw)


def cvae_inputs(cvae: CVAE, digits, n: int | None = None):
    x, labels = digits.test.x[:n], digits.test.y[:n]
    return cvae.data_args(x, labels)


def target_log_lik(cvae: CVAE, c, y, z):
    """log p(y|c,z) of the Bernoulli likelihood on the target pixels, by hand (-BCE)."""
    logits = cvae.generate(c, z)
    ll = -F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
    return ll.sum(-1) if cvae.target is None else (ll * cvae.target).sum(-1)


def split_elbo(module: CVAE, split, k: int):
    """Per-image test ELBO as a run reports it: K draws from the module's guide."""
    return score(module, *module.data_args(split.x, split.y), num_samples=k).elbo


def svi_step(cvae: CVAE, c, y, elbo=None):
    """The run's SVI step for ``cvae`` (every term of its objective) and the program info
    it was built with (from two rows, as the trainer probes)."""
    info = inspect_program(cvae.model, cvae.guide, c[:2], y[:2])
    terms = hook(cvae, "programs")()
    return Step.of_elbo(elbo or make_elbo("mc"), cvae, terms, info).gradient, info


def read_json(path):
    return json.loads(path.read_text())


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def assert_pngs(run, *names):
    for name in names:
        data = (run / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- 1. the program: sites, shapes, plates ------------------------------------------------------

def test_observed_quadrants_layout():
    grid = lambda k: observed_quadrants((4, 4), k).reshape(4, 4).int().tolist()  # noqa: E731
    assert grid(1) == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]  # bottom left
    assert grid(2) == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]  # left half
    assert grid(3) == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]  # all but BR
    assert observed_quadrants((4, 4), 1).dtype == torch.bool
    for k in (0, 4):
        with pytest.raises(UsageError, match="1, 2 or 3"):
            observed_quadrants((4, 4), k)


def test_data_args(digits):
    x, labels = digits.test.x[:5], digits.test.y[:5]
    cvae = small_cvae("quadrants", k=2)
    c, y = cvae.data_args(x, None)
    assert torch.equal(y, x)
    seen = observed_quadrants(IMAGE, 2)
    assert torch.equal(c[:, seen], x[:, seen]) and (c[:, ~seen] == 0).all()
    assert torch.equal(cvae.target, ~seen)
    cvae = small_cvae("label")
    c, y = cvae.data_args(x, labels)
    assert torch.equal(y, x) and c.shape == (5, CLASSES)
    assert torch.equal(c.argmax(-1), labels) and torch.equal(c.sum(-1), torch.ones(5))


@pytest.mark.parametrize("condition", ["quadrants", "label"])
def test_model_and_guide_traces(digits, condition):
    cvae = small_cvae(condition, z_dim=3, beta=0.5)
    c, y = cvae_inputs(cvae, digits, 20)
    n, d = 20, 3
    guide = poutine.trace(cvae.guide).get_trace(c, y)
    model = poutine.trace(poutine.replay(cvae.model, trace=guide)).get_trace(c, y)
    samples = lambda tr: {k for k, s in tr.nodes.items()  # noqa: E731
                          if s["type"] == "sample" and not site_is_subsample(s)}
    assert samples(guide) == {"z"} and samples(model) == {"z", "y"}
    assert site_is_subsample(guide.nodes["data"]) and site_is_subsample(model.nodes["data"])

    for tr in (guide, model):
        z = tr.nodes["z"]
        assert not z["is_observed"] and z["value"].shape == (n, d)
        assert z["fn"].batch_shape == (n,) and z["fn"].event_shape == (d,)
        assert [(f.name, f.size, f.dim) for f in z["cond_indep_stack"]] == [("data", n, -1)]
        assert z["scale"] == 0.5  # beta weighs the KL term, in model and guide alike
    assert torch.equal(model.nodes["z"]["value"], guide.nodes["z"]["value"])

    obs = model.nodes["y"]
    assert obs["is_observed"] and obs["value"] is y and obs["scale"] == 1.0
    assert obs["fn"].batch_shape == (n,) and obs["fn"].event_shape == (PIXELS,)
    assert [f.name for f in obs["cond_indep_stack"]] == ["data"]
    expected = target_log_lik(cvae, c, y, guide.nodes["z"]["value"])
    assert torch.allclose(obs["fn"].log_prob(y), expected, atol=1e-4)

    # the guide given y is the recognition network, given no y the prior network
    q = guide.nodes["z"]["fn"].base_dist
    rec = cvae.recognition(c, y)
    assert torch.equal(q.loc, rec.loc) and torch.equal(q.scale, rec.scale)
    predictive = poutine.trace(cvae.guide).get_trace(c).nodes["z"]
    prior = cvae.prior(c)
    assert predictive["fn"].batch_shape == (n,) and predictive["fn"].event_shape == (d,)
    p = predictive["fn"].base_dist
    assert torch.equal(p.loc, prior.loc) and torch.equal(p.scale, prior.scale)
    assert not torch.allclose(prior.loc, rec.loc)
    # prior_guide ignores y; the model without y samples it
    p2 = poutine.trace(cvae.prior_guide).get_trace(c, y).nodes["z"]["fn"].base_dist
    assert torch.equal(p2.loc, prior.loc)
    sampled = poutine.trace(cvae.model).get_trace(c).nodes["y"]
    assert not sampled["is_observed"] and sampled["value"].shape == (n, PIXELS)


# -- 2. only the missing pixels are scored ------------------------------------------------------

def test_only_missing_pixels_are_scored(digits):
    cvae = small_cvae("quadrants", k=2)
    c, y = cvae_inputs(cvae, digits, 30)
    seen = ~cvae.target
    changed = y.clone()
    changed[:, seen] = torch.where(y[:, seen] < 0.5, 1.0, 0.0)
    assert (changed[:, seen] != y[:, seen]).all()
    guide = poutine.trace(cvae.guide).get_trace(c, y)

    def log_p(obs):
        tr = poutine.trace(poutine.replay(cvae.model, trace=guide)).get_trace(c, obs)
        tr.compute_log_prob()
        return tr.nodes["y"]["log_prob"]

    before = log_p(y)
    assert before.shape == (30,)
    assert torch.equal(log_p(changed), before)
    q0, q1 = cvae.recognition(c, y), cvae.recognition(c, changed)
    assert torch.equal(q0.loc, q1.loc) and torch.equal(q0.scale, q1.scale)

    j = int(cvae.target.nonzero()[0])  # one missing pixel
    one = y.clone()
    one[:, j] = torch.where(y[:, j] < 0.5, 1.0, 0.0)
    assert (log_p(one) != before).all()
    assert (cvae.recognition(c, one).loc != q0.loc).any(-1).all()  # q(z|c,y) sees it
    # the whole difference is that pixel's log-likelihood
    logits = cvae.generate(c, guide.nodes["z"]["value"])[:, j]
    bern = lambda v: -F.binary_cross_entropy_with_logits(logits, v, reduction="none")  # noqa: E731
    assert torch.allclose(log_p(one) - before, bern(one[:, j]) - bern(y[:, j]), atol=1e-4)


# -- 3. a linear-Gaussian CVAE: exact p(y|c) ----------------------------------------------------

C, DY, DZ, SIGMA = 3, 6, 3, 0.5


class LinearGaussianCVAE:
    """A CVAE of single ``nn.Linear`` nets in float64, its exact p(y|c) and p(z|c,y)."""

    def __init__(self, n: int = 300, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)  # noqa: E731
        self.cvae = CVAE(C, DY, None, z_dim=DZ, hidden=(), likelihood="gaussian",
                         gaussian_scale=SIGMA, baseline_input=False,
                         condition="label").double()
        for net in (self.cvae.prior_net, self.cvae.recognition_net, self.cvae.generation_net,
                    self.cvae.baseline):
            assert len(net) == 1 and isinstance(net[0], nn.Linear)
        sigma = self.sigma = self.cvae.log_scale.exp().item()  # the sigma the model uses
        self.A, self.a = randn(DZ, C), 0.3 * randn(DZ)
        self.s = torch.tensor([1.5, 0.8, 0.6], dtype=F64)
        self.Gc, self.b = 0.5 * randn(DY, C), 0.3 * randn(DY)
        q, _ = torch.linalg.qr(randn(DY, DZ))
        self.Gz = q * torch.tensor([2.0, 1.0, 0.5], dtype=F64)  # orthogonal columns
        s_inv = torch.diag(self.s**-2)
        m = s_inv + self.Gz.T @ self.Gz / sigma**2
        self.post_cov = torch.linalg.inv(m)
        assert torch.allclose(self.post_cov, torch.diag(torch.diagonal(self.post_cov)))
        p = self.post_cov
        with torch.no_grad():
            prior = self.cvae.prior_net[0]
            prior.weight.zero_()
            prior.weight[:DZ] = self.A
            prior.bias[:DZ] = self.a
            prior.bias[DZ:] = self.s.log()
            gen = self.cvae.generation_net[0]  # input [c; z]
            gen.weight.copy_(torch.cat([self.Gc, self.Gz], 1))
            gen.bias.copy_(self.b)
            rec = self.cvae.recognition_net[0]  # input [c; y]
            rec.weight.zero_()
            rec.weight[:DZ, :C] = p @ (s_inv @ self.A - self.Gz.T @ self.Gc / sigma**2)
            rec.weight[:DZ, C:] = p @ self.Gz.T / sigma**2
            rec.bias[:DZ] = p @ (s_inv @ self.a - self.Gz.T @ self.b / sigma**2)
            rec.bias[DZ:] = 0.5 * torch.diagonal(p).log()
        self.c = randn(n, C)
        z = self.c @ self.A.T + self.a + self.s * randn(n, DZ)
        self.y = self.c @ self.Gc.T + z @ self.Gz.T + self.b + sigma * randn(n, DY)

    def log_p(self, c, y):
        """Exact log p(y|c)."""
        loc = c @ (self.Gc + self.Gz @ self.A).T + self.b + self.Gz @ self.a
        cov = self.Gz @ torch.diag(self.s**2) @ self.Gz.T + self.sigma**2 * torch.eye(DY,
                                                                                      dtype=F64)
        return MultivariateNormal(loc, cov).log_prob(y)

    def posterior(self, c, y) -> Normal:
        """Exact p(z|c,y)."""
        r = ((y - c @ self.Gc.T - self.b) @ self.Gz / self.sigma**2
             + (c @ self.A.T + self.a) / self.s**2)
        loc = r @ self.post_cov
        return Normal(loc, torch.diagonal(self.post_cov).sqrt().expand_as(loc))


@pytest.fixture
def lg():
    return LinearGaussianCVAE()


def test_linear_gaussian_networks_are_the_exact_distributions(lg):
    prior = lg.cvae.prior(lg.c)
    assert torch.allclose(prior.loc, lg.c @ lg.A.T + lg.a, atol=1e-12)
    assert torch.allclose(prior.scale, lg.s.expand(len(lg.c), DZ), atol=1e-12)
    q, post = lg.cvae.recognition(lg.c, lg.y), lg.posterior(lg.c, lg.y)
    assert torch.allclose(q.loc, post.loc, atol=1e-10)
    assert torch.allclose(q.scale, post.scale, atol=1e-12)


def test_exact_posterior_gives_exact_conditional_log_likelihood(lg):
    """With q(z|c,y) = p(z|c,y) every log weight log p(y,z|c) - log q(z|c,y) is log p(y|c)."""
    cvae, c, y = lg.cvae, lg.c, lg.y
    lw = log_weights(cvae.model, cvae.guide, c, y, num_samples=40)
    assert lw.shape == (40, len(c)) and lw.dtype == F64
    exact = lg.log_p(c, y)
    assert (lw - exact).abs().max() < 1e-8
    s = score(cvae, c, y, num_samples=5, iwae=True)
    assert s.elbo.dtype == s.iwae.dtype == F64  # a float64 model is scored in float64
    assert (s.elbo - exact).abs().max() < 1e-8 and (s.iwae - exact).abs().max() < 1e-8


def test_importance_sampling_approaches_exact_conditional_log_likelihood(lg, sem):
    """With an inexact q: IS with 2000 draws is within 4 SE of -log p(y|c) and far closer
    than the negative ELBO, whose gap is KL(q || p(z|c,y)) (within 4 SE)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lg.cvae.recognition_net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=F64))
    cvae, c, y, k = lg.cvae, lg.c, lg.y, 2000
    exact = lg.log_p(c, y)
    table = conditional_scores(cvae, c, y, score, samples=k, elbo_particles=10)
    s = score(cvae, c, y, num_samples=k, iwae=True)  # seed 0: conditional_scores' draws
    assert table["cvae_is"] == pytest.approx(-s.iwae.mean().item(), abs=1e-12)
    iwae_gap = exact - s.iwae
    assert abs(table["cvae_is"] + exact.mean().item()) < 4 * sem(iwae_gap), (
        table["cvae_is"], -exact.mean().item(), sem(iwae_gap))

    e10 = score(cvae, c, y, num_samples=10).elbo  # conditional_scores' ELBO draws
    assert table["cvae_neg_elbo"] == pytest.approx(-e10.mean().item(), abs=1e-12)
    q = cvae.recognition(c, y)
    kl = kl_divergence(Normal(q.loc, q.scale), lg.posterior(c, y)).sum(-1)
    assert (kl > 0).all()
    d = e10 - (exact - kl)  # E[ELBO estimate] = log p(y|c) - KL(q || p(z|c,y))
    assert abs(d.mean()) < 4 * sem(d), (d.mean(), sem(d))
    elbo_gap = table["cvae_neg_elbo"] + exact.mean().item()
    assert elbo_gap > 4 * sem(exact - e10)
    assert abs(table["cvae_is"] + exact.mean().item()) < 0.1 * elbo_gap

    # the baseline NN's -log p(y|c): a Gaussian NLL of its linear guess, and the gap
    nll = -Normal(cvae.baseline(c), lg.sigma).log_prob(y).sum(-1).mean().item()
    assert table["nn_baseline"] == pytest.approx(nll, rel=1e-10)
    assert table["gap"] == pytest.approx(table["nn_baseline"] - table["cvae_is"], abs=1e-10)


# -- 4. IS below the negative ELBO on digits ----------------------------------------------------

@pytest.mark.parametrize("condition", ["quadrants", "label"])
def test_importance_sampling_beats_the_elbo_on_digits(digits, sem, condition):
    """A randomly initialised CVAE: -log p(y|c) by IS (50 draws) < -ELBO (200 draws), by
    per-image paired differences."""
    cvae = small_cvae(condition, z_dim=4, hidden=(32,))
    c, y = cvae_inputs(cvae, digits)
    is_ = score(cvae, c, y, num_samples=50, iwae=True, seed=1).iwae
    elbo = score(cvae, c, y, num_samples=200, seed=2).elbo
    d = is_ - elbo  # (-ELBO) - (-log p_IS)
    assert d.mean() > 4 * sem(d), (d.mean(), sem(d))


# -- 5. mc and analytic estimators --------------------------------------------------------------

def paired_losses(cvae, guide, c, y, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``repeats`` losses of Trace_ELBO and of TraceMeanField_ELBO, each pair at one seed
    (so the same z draws)."""
    mc, analytic = make_elbo("mc"), make_elbo("analytic")
    a, b = [], []
    for r in range(repeats):
        pyro.set_rng_seed(r)
        a.append(mc.loss(cvae.model, guide, c, y))
        pyro.set_rng_seed(r)
        b.append(analytic.loss(cvae.model, guide, c, y))
    return torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64)


def test_mc_and_analytic_agree_in_expectation_for_the_cvae(digits, sem):
    """Trace_ELBO and TraceMeanField_ELBO on (model, guide): paired draws (same seed: the
    same z ~ q), differences of mean 0 within 4 SE; they are different estimators."""
    cvae = small_cvae("quadrants", z_dim=4)
    c, y = cvae_inputs(cvae, digits, 32)
    a, b = paired_losses(cvae, cvae.guide, c, y, 150)
    d = a - b
    assert d.std() > 0.1  # not the same numbers
    assert abs(d.mean()) < 4 * sem(d), (d.mean(), sem(d))
    assert abs(a.mean() - b.mean()) < 4 * math.hypot(sem(a), sem(b))


def test_mc_and_analytic_agree_for_the_gsnn(digits):
    """GSNN (model, prior_guide): the KL term is exactly 0, so the analytic loss is
    -log p(y|c,z) at z ~ p(z|c), and the mc loss is the same number draw by draw."""
    cvae = small_cvae("quadrants", z_dim=4)
    c, y = cvae_inputs(cvae, digits, 32)
    prior = cvae.prior(c)
    assert (kl_divergence(prior, prior) == 0).all()
    a, b = paired_losses(cvae, cvae.prior_guide, c, y, 60)
    for r in range(60):  # the same draws again: each loss is -log p(y|c,z) at that z
        pyro.set_rng_seed(r)
        z = poutine.trace(cvae.prior_guide).get_trace(c, y).nodes["z"]["value"]
        with torch.no_grad():
            assert b[r].item() == pytest.approx(-target_log_lik(cvae, c, y, z).sum().item(),
                                                rel=1e-5)
    assert b.std() > 0.1  # the draws differ
    assert torch.allclose(a, b, rtol=1e-5)
    assert b.var() <= a.var() * (1 + 1e-4)


# -- 6. objectives ------------------------------------------------------------------------------

def test_programs_of_each_objective():
    cvae = small_cvae(cvae_objective="cvae")
    gsnn = small_cvae(cvae_objective="gsnn")
    hybrid = small_cvae(cvae_objective="hybrid", hybrid_alpha=0.3)
    assert cvae.programs() == [(1.0, cvae.model, cvae.guide)]
    assert gsnn.programs() == [(1.0, gsnn.model, gsnn.guide)]  # the prior network, for a GSNN
    (w1, m1, g1), (w2, m2, g2) = hybrid.programs()
    assert (w1, w2) == (pytest.approx(0.3), pytest.approx(0.7))
    assert (m1, g1, m2, g2) == (hybrid.model, hybrid.guide, hybrid.model, hybrid.prior_guide)
    for module in (cvae, gsnn, hybrid):
        assert hook(module, "programs")() == module.programs()


def test_conditional_scores_use_the_guide_which_is_the_prior_for_a_gsnn(digits):
    """A GSNN never trains q: its guide, IS estimate and ELBO draw from p(z|c); a CVAE's
    from q."""
    for objective in ("gsnn", "cvae"):
        cvae = small_cvae(cvae_objective=objective)
        c, y = cvae_inputs(cvae, digits, 50)
        table = conditional_scores(cvae, c, y, score, samples=7, elbo_particles=3)
        def recognition(c, y, cvae=cvae):  # q(z|c,y), whatever the objective
            with pyro.plate("data", c.shape[0]):
                pyro.sample("z", cvae.recognition(c, y).to_event(1))

        for guide, equal in ((cvae.guide, True),
                             (cvae.prior_guide if objective == "cvae" else recognition, False)):
            iwae = score(cvae, c, y, num_samples=7, iwae=True, guide=guide).iwae.mean().item()
            elbo = score(cvae, c, y, num_samples=3, guide=guide).elbo.mean().item()
            assert (table["cvae_is"] == pytest.approx(-iwae, abs=1e-9)) == equal
            assert (table["cvae_neg_elbo"] == pytest.approx(-elbo, abs=1e-9)) == equal


def _step(state, c, y, seed, objective, alpha=0.5, skip_q_draw=False):
    """(loss, gradients) of one mc ``elbo_step`` from ``state`` with ``seed``."""
    cvae = small_cvae(cvae_objective=objective, hybrid_alpha=alpha)
    cvae.load_state_dict(state)
    step, _ = svi_step(cvae, c, y)
    pyro.set_rng_seed(seed)
    if skip_q_draw:  # the draw z ~ q(z|c,y) that the hybrid's first term takes
        with torch.no_grad():
            cvae.guide(c, y)
    loss = step(c, y)
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad
             for n, p in cvae.named_parameters()}
    return loss, grads


def _assert_same_step(a, b):
    assert a[0] == pytest.approx(b[0].item(), rel=1e-6)
    for name, g in a[1].items():
        assert torch.allclose(g, b[1][name], rtol=1e-5, atol=1e-6), name


def test_hybrid_objective_interpolates(digits):
    """alpha=1 is the CVAE step, alpha=0 the GSNN step. The hybrid's GSNN term draws after
    its CVAE term, so the same seed reaches the GSNN term after one draw z ~ q(z|c,y)."""
    state = small_cvae().state_dict()
    c, y = cvae_inputs(small_cvae(), digits, 40)
    cvae = _step(state, c, y, 3, "cvae")
    gsnn = _step(state, c, y, 3, "gsnn", skip_q_draw=True)
    _assert_same_step(_step(state, c, y, 3, "hybrid", alpha=1.0), cvae)
    _assert_same_step(_step(state, c, y, 3, "hybrid", alpha=0.0), gsnn)
    half = _step(state, c, y, 3, "hybrid", alpha=0.25)
    assert half[0] == pytest.approx(0.25 * cvae[0].item() + 0.75 * gsnn[0].item(), rel=1e-6)
    assert cvae[0] != pytest.approx(gsnn[0].item(), rel=1e-4)  # the terms differ
    for name, g in half[1].items():
        assert torch.allclose(g, 0.25 * cvae[1][name] + 0.75 * gsnn[1][name],
                              rtol=1e-4, atol=1e-6), name


def test_iwae_trains_one_program_only(digits):
    c, y = cvae_inputs(small_cvae(), digits, 16)
    with pytest.raises(UsageError, match="trains one model/guide pair.*several"):
        svi_step(small_cvae(cvae_objective="hybrid"), c, y, make_elbo("iwae", 2))
    for objective in ("cvae", "gsnn"):
        step, _ = svi_step(small_cvae(cvae_objective=objective), c, y, make_elbo("iwae", 2))
        loss = step(c, y)
        assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("objective", ["cvae", "gsnn", "hybrid"])
def test_one_step_trains_the_right_networks(digits, objective):
    """The baseline network is held fixed (no gradient); the GSNN never uses q."""
    cvae = small_cvae(cvae_objective=objective)
    c, y = cvae_inputs(cvae, digits, 32)
    step, info = svi_step(cvae, c, y)
    step(c, y)
    assert all(p.grad is None for p in cvae.baseline.parameters())
    trained = [cvae.prior_net, cvae.generation_net]
    if objective == "gsnn":
        assert all(p.grad is None for p in cvae.recognition_net.parameters())
    else:
        trained.append(cvae.recognition_net)
    for net in trained:
        for p in net.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    # and the optimizer the run builds holds them all; an Adam step leaves the baseline alone
    params = collect_params(cvae, info)
    assert {id(p) for p in params} == {id(p) for p in cvae.parameters()}
    before = copy.deepcopy(cvae.state_dict())
    opt = torch.optim.Adam(params, lr=1e-2)
    opt.zero_grad(set_to_none=True)
    step(c, y)
    opt.step()
    after = cvae.state_dict()
    for name in before:
        moved = not torch.equal(before[name], after[name])
        if name.startswith("baseline") or name in ("target", "log_scale"):
            assert not moved, name
        elif name.startswith("recognition"):
            assert moved == (objective != "gsnn"), name
        else:
            assert moved, name


# -- 7. early stopping in the Loop --------------------------------------------------------------

def _fit(validate, patience, epochs=5):
    net = nn.Linear(3, 1)
    x = torch.randn(40, 3)
    loss = lambda xb: (net(xb) - 1).pow(2).sum()  # noqa: E731
    saved, seen = {}, []

    def on_epoch(epoch, loss, seconds, val):
        saved[epoch] = copy.deepcopy(net.state_dict())
        seen.append((epoch, val))

    params = list(net.parameters())
    best = Loop(loop_session(net, x, epochs=epochs, patience=patience),
                Step(params, torch.optim.Adam(params, lr=0.1), loss), validate=validate,
                on_epoch=on_epoch).run()
    return best, net, saved, seen


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_fit_stops_early_and_restores_the_best_weights():
    vals = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    best, net, saved, seen = _fit(lambda: next(vals), patience=2)
    assert seen == [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.6)]
    assert best == 2
    assert not _same(saved[2], saved[4])  # training moved the weights
    assert _same(net.state_dict(), saved[2])
    assert not net.training


def test_fit_without_patience_runs_every_epoch():
    vals = iter([3.0, 2.0, 2.5, 2.6, 1.5])
    best, net, saved, seen = _fit(lambda: next(vals), patience=0)
    assert [e for e, _ in seen] == [1, 2, 3, 4, 5] and seen[2] == (3, 2.5)
    assert best == 5
    assert _same(net.state_dict(), saved[5])


def test_fit_survives_a_non_finite_first_validation_loss():
    vals = iter([math.inf, 2.0, 1.0, 1.5])
    best, net, saved, seen = _fit(lambda: next(vals), patience=2, epochs=4)
    assert best == 3 and _same(net.state_dict(), saved[3])


# -- 8. the command line end to end -------------------------------------------------------------

@pytest.mark.slow
def test_quadrant_table_end_to_end(tmp_path, monkeypatch, cli):
    """Two CVAEs (1 and 3 observed quadrants) with early stopping, their table, and
    ``evaluate`` reproducing one run's numbers."""
    monkeypatch.chdir(tmp_path)
    result = cli(experiment_main, ["cvae-quadrants", "--quadrants", "1", "3", *CVAE_NET,
                                   "--early-stop", "1", "--out", "out"])
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    assert "| CVAE (IS) |" in result.out and "runs written to out" in result.out
    # each run's notes (first lines), then the table, then where the runs went
    lines = result.out.splitlines()
    for k in ("1", "3"):
        assert (f"quadrants-{k}: evaluation: 3 samples per data point in one vectorized pass"
                in lines)
        assert f"quadrants-{k}: -log p(y|c), nats per test image (lower is better):" in lines
    notes = [i for i, line in enumerate(lines) if line.startswith("quadrants-")]
    table_start = lines.index("| estimate | 1 quadrant | 3 quadrants |")
    assert max(notes) < table_start < lines.index(next(x for x in lines if "runs written" in x))
    out = tmp_path / "out"

    table = read_json(out / "summary.json")
    assert set(table["cll"]) == {"1", "3"}
    for row in table["cll"].values():
        assert set(row) == set(CLL_FIELDS) and all(math.isfinite(v) for v in row.values())
        assert row["nn_baseline"] > 0 and row["cvae_is"] > 0 and row["cvae_neg_elbo"] > 0
        assert row["gap"] == pytest.approx(row["nn_baseline"] - row["cvae_is"], abs=1e-9)
    # three observed quadrants leave a quarter of the pixels to predict, one leaves three
    assert table["cll"]["3"]["cvae_is"] < 0.5 * table["cll"]["1"]["cvae_is"]
    # the runs, beside the table, by variant name
    assert table["runs"] == {"quadrants-1": "quadrants-1", "quadrants-3": "quadrants-3"}
    assert table["config"]["model"] == "cvae"
    assert table["config"]["model_options"]["condition"] == "quadrants"
    assert set(table["best_epochs"]) == set(table["train_seconds"]) == set(table["runs"])
    assert not (out / "table.md").exists()  # the CVAE's table is cll_table.*

    fields, rows = read_csv(out / "cll_table.csv")
    assert fields == ["estimate", "1 quadrant", "3 quadrants"]
    assert [r["estimate"] for r in rows] == CLL_NAMES
    for r, field in zip(rows, CLL_FIELDS, strict=True):
        for k, col in (("1", "1 quadrant"), ("3", "3 quadrants")):
            assert float(r[col]) == pytest.approx(round(table["cll"][k][field], 2))
    md = (out / "cll_table.md").read_text()
    assert "| estimate | 1 quadrant | 3 quadrants |" in md and "| CVAE (IS) |" in md

    for k in ("1", "3"):
        run = out / f"quadrants-{k}"
        names = {p.name for p in run.iterdir()}
        assert {*RUN_FILES, "completions.png"} <= names, names
        assert "samples_by_label.png" not in names and not [n for n in names if ".tmp" in n]
        assert_pngs(run, "elbo_curves.png", "completions.png")
        config = read_json(run / "config.json")
        options = config["model_options"]
        assert (config["model"], options["condition"], options["quadrants"]) == (
            "cvae", "quadrants", int(k))
        assert config["early_stop"] == 1 and config["out"] == f"out/quadrants-{k}"
        fields, rows = read_csv(run / "metrics.csv")
        assert fields == ["epoch", "train_elbo", "test_elbo", "train_seconds", "val_elbo"]
        assert [int(r["epoch"]) for r in rows] in ([1], [1, 2])
        assert all(float(r["val_elbo"]) < 0 for r in rows)
        fields, rows = read_csv(run / "baseline_metrics.csv")
        assert fields == ["epoch", "train_nll", "test_nll", "train_seconds", "val_nll"]
        assert all(float(r["test_nll"]) > 0 for r in rows)
        summary = read_json(run / "summary.json")
        assert summary["cll"] == {k: table["cll"][k]}
        assert summary["best_epoch"] == table["best_epochs"][f"quadrants-{k}"]
        assert summary["train_seconds"] == table["train_seconds"][f"quadrants-{k}"]
        assert summary["n_val"] > 0 and summary["n_train"] + summary["n_val"] == 1438
        assert summary["eval_particles"] == 3 and summary["test_elbo"] < 0
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        assert state["epoch"] == summary["best_epoch"]
        assert int(state["model"]["target"].sum()) == {"1": 48, "3": 16}[k]

    # re-evaluation gives that run's numbers again, exactly
    run = out / "quadrants-1"
    original = read_json(run / "summary.json")
    tampered = {**original, "test_elbo": 0.0, "cll": {"1": dict.fromkeys(CLL_FIELDS, 0.0)}}
    (run / "summary.json").write_text(json.dumps(tampered))
    result = cli(evaluate_main, ["--run", "out/quadrants-1"])
    assert result.code == 0, result.err
    assert f"test ELBO {original['test_elbo']:.2f}" in result.out
    assert "evaluation: 3 samples per data point in one vectorized pass" in result.out
    assert "| CVAE (IS) |" in result.out  # the model's metrics note: its table
    summary = read_json(run / "summary.json")
    assert summary["test_elbo"] == original["test_elbo"]
    assert summary["cll"] == original["cll"]
    assert summary.pop("at_training")["test_elbo"] == 0.0  # what was there, kept beside
    assert summary == original


def test_label_cvae_end_to_end(tmp_path, cli):
    out = tmp_path / "run"
    result = cli(train_main, [*CVAE_NET, "--condition", "label", "--out", out])
    assert result.code == 0, result.err
    assert f"run written to {out}" in result.out and "| CVAE (IS) |" in result.out
    names = {p.name for p in out.iterdir()}
    assert {*RUN_FILES, "samples_by_label.png"} <= names, names
    assert "completions.png" not in names
    assert_pngs(out, "elbo_curves.png", "samples_by_label.png")
    summary = read_json(out / "summary.json")
    assert set(summary["cll"]) == {"label"} and summary["n_val"] == 0
    row = summary["cll"]["label"]
    assert row["gap"] == pytest.approx(row["nn_baseline"] - row["cvae_is"], abs=1e-9)
    fields, rows = read_csv(out / "cll_table.csv")
    assert fields == ["estimate", "label"] and [r["estimate"] for r in rows] == CLL_NAMES
    assert float(rows[1]["label"]) == pytest.approx(round(row["cvae_is"], 2))
    fields, _ = read_csv(out / "metrics.csv")
    assert "val_elbo" not in fields
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert "target" not in state  # every pixel is scored
    assert state["prior_net.0.weight"].shape == (32, CLASSES + PIXELS)  # label + NN guess
    assert state["recognition_net.0.weight"].shape == (32, CLASSES + PIXELS)


def test_the_quadrant_table_from_python_and_resumed(digits, tmp_path):
    """``ppl_vae.experiments.cvae_quadrants``: one ordinary run per count and their table;
    run again with ``resume=True`` it reads the finished runs back and trains nothing."""
    from ppl_vae.experiments import cvae_quadrants

    small = dict(hidden=(16,), z_dim=2, cll_samples=5)
    common = dict(model="cvae", epochs=1, batch_size=128, eval_particles=2)
    config = TrainConfig(model_options=small, out=str(tmp_path / "quad"), **common)
    result = cvae_quadrants(config, (2,), data=digits, progress=False)
    assert result.out == tmp_path / "quad" and list(result.runs) == ["quadrants-2"]
    run = result.runs["quadrants-2"]
    assert isinstance(run, Run) and run.out == tmp_path / "quad" / "quadrants-2"
    assert run.config.model_options.quadrants == 2
    assert run.notes[0] == "evaluation: 2 samples per data point in one vectorized pass"
    assert "| estimate | 2 quadrants |" in result.table and result.seconds > 0
    assert (result.out / "cll_table.md").is_file() and (result.out / "summary.json").is_file()
    again = cvae_quadrants(config, (2,), data=digits, progress=False, resume=True)
    assert again.table == result.table and again.runs["quadrants-2"].summary == run.summary

    label = TrainConfig(model_options=dict(condition="label", **small),
                        out=str(tmp_path / "label"), **common)
    run = ppl_vae.train(label, data=digits, progress=False)
    assert isinstance(run, Run) and set(run.summary["cll"]) == {"label"}
    with pytest.raises(UsageError, match="a CVAE with condition='quadrants'"):
        cvae_quadrants(label, (1,), data=digits)


CVAE_OPTIONS = {
    "gsnn-analytic": ["--cvae-objective", "gsnn", "--elbo", "analytic"],
    "hybrid": ["--cvae-objective", "hybrid", "--hybrid-alpha", "0.3"],
    "iwae-3": ["--elbo", "iwae", "--particles", "3"],
    "no-baseline-input": ["--no-baseline-input"],
}


@pytest.mark.parametrize("name", list(CVAE_OPTIONS))
def test_cvae_options_train(tmp_path, cli, sem, name):
    """Each option trains: the test ELBO beats the initial model's (paired, 4 SE), the
    networks that should move moved, and the config records the option."""
    argv = CVAE_OPTIONS[name]
    out = tmp_path / "out"
    result = cli(train_main, [*CVAE_NET, "--quadrants", "2", "--lr", "1e-2", *argv,
                              "--out", out])
    assert result.code == 0, result.err
    run = out
    assert {*RUN_FILES, "completions.png"} <= {p.name for p in run.iterdir()}
    config = from_record(read_json(run / "config.json"))[0]
    options = config.model_options
    assert isinstance(options, CVAEOptions) and options.quadrants == 2
    expected = {"gsnn-analytic": ("gsnn", "analytic", 1, True),
                "hybrid": ("hybrid", "mc", 1, True), "iwae-3": ("cvae", "iwae", 3, True),
                "no-baseline-input": ("cvae", "mc", 1, False)}[name]
    assert (options.cvae_objective, config.elbo, config.particles,
            options.baseline_input) == expected
    if name == "hybrid":
        assert options.hybrid_alpha == 0.3

    data = load_data(config)
    pyro.set_rng_seed(config.seed)  # what train builds first
    init = build_model(config, data)
    trained = build_model(config, data)
    trained.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    trained.eval()
    assert trained.objective == options.cvae_objective
    if name == "no-baseline-input":
        assert trained.prior_net[0].weight.shape[1] == PIXELS  # c only
    else:
        assert trained.prior_net[0].weight.shape[1] == 2 * PIXELS  # c and the NN's guess
    init_state, trained_state = init.state_dict(), trained.state_dict()
    for key in init_state:
        moved = not torch.equal(init_state[key], trained_state[key])
        if key in ("target", "log_scale"):
            assert not moved
        elif key.startswith("recognition"):  # the GSNN never uses q
            assert moved == (name != "gsnn-analytic"), key
        else:
            assert moved, key

    after = split_elbo(trained, data.test, config.eval_particles)
    summary = read_json(run / "summary.json")
    assert summary["test_elbo"] == after.mean().item()
    d = after - split_elbo(init, data.test, config.eval_particles)
    assert d.mean() > 4 * sem(d), (d.mean(), sem(d))


# -- 9. bad input: exit 2 and one line ----------------------------------------------------------

def _npz(tmp_path, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return f"npz:{tmp_path / 'd.npz'}"


_RNG = np.random.default_rng(0)
BAD_CVAE = {
    "quadrants-4": (["--quadrants", "4"], ["--quadrants", "4", "1, 2, 3"]),
    "quadrants-opt-4": (["--model-opt", "quadrants=4"], ["--quadrants 4", "1, 2, 3"]),
    "label-without-labels": (
        ["--condition", "label", "--dataset", lambda t: _npz(t, x=_RNG.random((40, 16)))],
        ["--condition label", "labels"]),
    "quadrants-not-square": (
        ["--condition", "quadrants", "--dataset", lambda t: _npz(t, x=_RNG.random((40, 10)))],
        ["--condition quadrants", "square"]),
    # found when the SVI step is built: IWAE trains one model/guide pair, the hybrid two
    "hybrid-iwae": (["--cvae-objective", "hybrid", "--elbo", "iwae", "--particles", "2"],
                    ["trains one model/guide pair", "--elbo mc, analytic, stl, iwae-dreg or rws"]),
    "hybrid-alpha": (["--hybrid-alpha", "2"], ["--hybrid-alpha", "[0, 1]"]),
    "hybrid-alpha-nan": (["--hybrid-alpha", "nan"], ["--hybrid-alpha"]),
    "val-fraction": (["--val-fraction", "1"], ["--val-fraction"]),
    "early-stop": (["--early-stop", "-1"], ["--early-stop"]),
    "objective": (["--cvae-objective", "bogus"], ["--cvae-objective", "bogus"]),
    # the CVAE has no learned sigma: no such flag, and no such option
    "learn-scale": (["--likelihood", "gaussian", "--learn-scale"],
                    ["unrecognized arguments: --learn-scale"]),
    "learn-scale-opt": (["--likelihood", "gaussian", "--model-opt", "learn_scale=True"],
                        ["CVAE has no option 'learn_scale'"]),
}


@pytest.mark.parametrize("name", list(BAD_CVAE))
def test_bad_cvae_input(tmp_path, cli, one_line_error, name):
    argv, fragments = BAD_CVAE[name]
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    out = tmp_path / "run"
    result = cli(train_main, [*CVAE_NET, *argv, "--out", out])
    one_line_error(result, TRAIN_PROG, *fragments)
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


MODEL_ERRORS = ["label-without-labels", "quadrants-not-square", "learn-scale",
                "learn-scale-opt"]


@pytest.mark.parametrize("name", MODEL_ERRORS)
def test_invalid_model_options_leave_no_directory(tmp_path, cli, name):
    argv, fragments = BAD_CVAE[name]
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    out = tmp_path / "run"
    assert cli(train_main, [*CVAE_NET, *argv, "--out", out]).code == 2
    assert not out.exists()


def test_corrected_command_reuses_the_out_of_a_failed_one(tmp_path, cli):
    rng = np.random.default_rng(0)
    data = _npz(tmp_path, x=rng.random((40, 10)), y=rng.integers(0, 3, 40))
    out = tmp_path / "run"
    base = [*CVAE_NET, "--epochs", "1", "--dataset", data, "--out", out]
    assert cli(train_main, [*base, "--condition", "quadrants"]).code == 2  # not square
    result = cli(train_main, [*base, "--condition", "label"])
    assert result.code == 0, result.err


# -- 10. real data ------------------------------------------------------------------------------

def test_cvae_on_offline_mnist(mnist_root):
    """One quadrant observed on 28x28 MNIST: 588 of 784 pixels to predict; one SVI step."""
    config = TrainConfig(model="cvae", dataset="mnist", data_dir=str(mnist_root),
                         download=False, model_options=dict(quadrants=1, hidden=(32,),
                                                            z_dim=2))
    data = load_dataset("mnist", str(mnist_root), download=False)
    cvae = build_model(config, data)
    assert isinstance(cvae, CVAE) and cvae.target.shape == (784,)
    assert int(cvae.target.sum()) == 588
    assert not cvae.target.reshape(28, 28)[14:, :14].any()  # bottom-left observed
    c, y = cvae.data_args(data.train.x[:64], data.train.y[:64])
    step, info = svi_step(cvae, c, y)
    params = collect_params(cvae, info)
    opt = torch.optim.Adam(params, lr=1e-3)
    before = copy.deepcopy(cvae.generation_net.state_dict())
    opt.zero_grad(set_to_none=True)
    loss = step(c, y)
    opt.step()
    assert torch.isfinite(loss) and loss > 0
    assert not _same(before, cvae.generation_net.state_dict())


@pytest.mark.parametrize("quadrants", [1, 3])
def test_the_plain_pytorch_reference_is_the_analytic_elbo(digits, quadrants):
    """``cvae_reference_loss`` (the benchmarks' yardstick) draws the same z from the same seed
    and computes Pyro's ``--elbo analytic`` loss and gradients, to float64 rounding."""
    from helpers import reference

    cvae_reference_loss = reference().cvae_reference_loss

    data = ppl_vae.load_dataset("digits")
    cvae = CVAE.from_options(CVAEOptions(hidden=(16,), z_dim=3, quadrants=quadrants),
                             data).double()
    c, y = cvae.data_args(data.train.x[:20].double(), None)
    results = []
    for loss in (cvae_reference_loss(cvae),
                 lambda c, y: ppl_vae.make_elbo("analytic").differentiable_loss(
                     cvae.model, cvae.guide, c, y)):
        torch.manual_seed(4)
        cvae.zero_grad()
        with pyro.validation_enabled(False):
            value = loss(c, y)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in cvae.parameters()
                                         if p.grad is not None]))
    (ours, our_grads), (pyros, pyro_grads) = results
    assert abs(float(ours - pyros)) < 1e-9 * abs(float(pyros))
    assert len(our_grads) == len(pyro_grads)
    for a, b in zip(our_grads, pyro_grads, strict=True):
        assert float((a - b).abs().max()) < 1e-9


def test_a_bad_table_count_is_one_line(tmp_path, cli):
    result = cli(experiment_main, ["cvae-quadrants", "--quadrants", "1", "5", *CVAE_NET,
                                   "--out", tmp_path / "t"])
    assert_one_line_error(result, "python -m ppl_vae experiment: error: ", "--quadrants 5",
                          "1, 2, 3")
    assert not (tmp_path / "t").exists()
    result = cli(experiment_main, ["cvae-quadrants", "--quadrants", "2", "2", *CVAE_NET,
                                   "--out", tmp_path / "t"])
    assert_one_line_error(result, "python -m ppl_vae experiment: error: ", "once each")
    result = cli(experiment_main, ["quadrant-table"])
    assert_one_line_error(result, "python -m ppl_vae experiment: error: ",
                          "unknown experiment 'quadrant-table'", "cvae-quadrants")
