"""The ELBO estimators: Pyro classes chosen by make_elbo, and their statistics on the VAE.

Estimates are compared in expectation: R independent estimates of each, means within 4
combined standard errors (|m_a - m_b| < 4 sqrt(se_a^2 + se_b^2)).
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
)
from torch.distributions import kl_divergence

from ppl_vae import VAE, UsageError, make_elbo, score


def repeat(fn, r: int) -> torch.Tensor:
    return torch.tensor([float(fn()) for _ in range(r)], dtype=torch.float64)


def assert_same_mean(a: torch.Tensor, b: torch.Tensor, sem, what: str = "") -> None:
    tol = 4 * math.hypot(sem(a), sem(b))
    diff = (a.mean() - b.mean()).item()
    assert abs(diff) < tol, f"{what}: means differ by {diff:.4f}, 4 SE = {tol:.4f}"


@pytest.fixture
def vae():
    return VAE(64, z_dim=4, hidden=(32,))


@pytest.fixture
def batch(digits):
    return digits.test.x[:32]


# -- which estimator -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, jit, cls", [
    ("mc", False, Trace_ELBO), ("analytic", False, TraceMeanField_ELBO),
    ("mc", True, JitTrace_ELBO), ("analytic", True, JitTraceMeanField_ELBO),
    ("iwae", False, RenyiELBO), ("enum", False, TraceEnum_ELBO),
])
@pytest.mark.parametrize("particles", [1, 4])
def test_make_elbo_classes(name, jit, cls, particles):
    elbo = make_elbo(name, particles, jit)
    assert isinstance(elbo, cls)
    assert elbo.num_particles == particles
    assert elbo.vectorize_particles == (particles > 1)
    # the data plate, plus the particle plate Pyro adds at dim -2 when vectorizing
    assert elbo.max_plate_nesting == 1 + (particles > 1)
    if name == "iwae":
        assert elbo.alpha == 0.0


@pytest.mark.parametrize("particles", [1, 4])
def test_make_elbo_plate_nesting_and_vectorization(particles):
    """A program with two plates gets its particle plate further left; ``vectorize=False``
    draws the particles one after another (no particle plate)."""
    deep = make_elbo("mc", particles, max_plate_nesting=2)
    assert deep.max_plate_nesting == 2 + (particles > 1)
    serial = make_elbo("mc", particles, vectorize=False)
    assert not serial.vectorize_particles and serial.max_plate_nesting == 1
    assert serial.num_particles == particles


def test_make_elbo_rejects_bad_requests():
    # raised to a Python caller, the message names Python settings, not flags
    with pytest.raises(UsageError,
                       match="unknown elbo='exact'; use mc, analytic, stl, iwae, iwae-dreg, rws, "
                             "enum, tracegraph"):
        make_elbo("exact")
    with pytest.raises(UsageError, match="jit=True"):
        make_elbo("iwae", 2, jit=True)
    with pytest.raises(UsageError, match="jit=True with elbo enum"):
        make_elbo("enum", 2, jit=True)


# -- the KL the analytic estimator relies on -----------------------------------------------------

def test_analytic_kl_matches_monte_carlo(sem):
    """KL(q(z|x) || p(z)) in closed form (what TraceMeanField_ELBO uses) equals the mean of
    log q(z) - log p(z) over z ~ q, per data point and summed, within 4 standard errors."""
    # sigma = exp(h) (not the default exp(h / 2)), so the spread below reaches a decade
    vae = VAE(64, z_dim=3, hidden=(32,), encoder_scale="logscale")
    with torch.no_grad():  # spread the posteriors: locs ~ +-2, scales over a decade
        vae.encoder[-1].weight.mul_(6.0)
        vae.encoder[-1].bias.uniform_(-1.0, 1.0)
    x = torch.rand(16, 64)
    g = poutine.trace(vae.guide).get_trace(x)
    m = poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(x)
    q, p = g.nodes["z"]["fn"], m.nodes["z"]["fn"]
    analytic = kl_divergence(q, p)
    assert analytic.shape == (16,)

    loc, scale = vae.encode(x)
    closed_form = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum(-1)
    assert torch.allclose(analytic, closed_form, rtol=1e-5, atol=1e-5)
    assert scale.min() < 0.5 and scale.max() > 2 and loc.abs().max() > 1  # a non-trivial case

    n = 20_000
    with torch.no_grad():
        z = q.sample((n,))
        terms = (q.log_prob(z) - p.log_prob(z)).double()  # (n, 16)
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(n)
    assert ((mc - analytic.double()).abs() < 4 * se).all(), (mc - analytic) / se
    assert abs((mc - analytic).sum()) < 4 * se.pow(2).sum().sqrt()


# -- the estimators in expectation ---------------------------------------------------------------

def test_mc_and_analytic_agree_and_analytic_has_less_variance(batch, sem):
    # sigma = exp(h): posterior scales spread as wide as the variance ratio needs to show in
    # r estimates (the default exp(h / 2) halves the spread and with it the KL's noise)
    vae = VAE(64, z_dim=4, hidden=(32,), encoder_scale="logscale")
    r = 1000
    with torch.no_grad():
        mc = repeat(lambda: make_elbo("mc").loss(vae.model, vae.guide, batch), r)
        an = repeat(lambda: make_elbo("analytic").loss(vae.model, vae.guide, batch), r)
    assert_same_mean(mc, an, sem, "mc vs analytic")
    # the analytic KL removes the KL term's Monte Carlo noise: var(analytic) < var(mc),
    # beyond the sampling error of the log-variances (sd ~ sqrt(2 / (r - 1)) each)
    log_ratio = math.log(mc.var() / an.var())
    assert log_ratio > 4 * math.sqrt(2 * 2 / (r - 1)), log_ratio


def test_beta_weights_only_the_kl(vae, batch):
    """Same seed, same draw of z: loss(beta=1) - loss(beta=0.5) = 0.5 * KL exactly."""
    beta = VAE(64, z_dim=4, hidden=(32,), beta=0.5)
    beta.load_state_dict(vae.state_dict())
    loc, scale = vae.encode(batch)
    kl = (0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum()).item()
    elbo = make_elbo("analytic")
    for seed in range(3):
        torch.manual_seed(seed)
        full = elbo.loss(vae.model, vae.guide, batch)
        torch.manual_seed(seed)
        half = elbo.loss(beta.model, beta.guide, batch)
        assert full - half == pytest.approx(0.5 * kl, rel=1e-4, abs=1e-2)


def test_beta_mc_matches_analytic(batch, sem):
    vae = VAE(64, z_dim=4, hidden=(32,), beta=0.5)
    with torch.no_grad():
        mc = repeat(lambda: make_elbo("mc").loss(vae.model, vae.guide, batch), 600)
        an = repeat(lambda: make_elbo("analytic").loss(vae.model, vae.guide, batch), 600)
    assert_same_mean(mc, an, sem, "beta=0.5 mc vs analytic")


def test_vectorized_particles_average(vae, batch, sem):
    """L vectorized particles: the same expectation, variance divided by L."""
    r, big = 600, 10
    with torch.no_grad():
        one = repeat(lambda: make_elbo("mc", 1).loss(vae.model, vae.guide, batch), r)
        many = repeat(lambda: make_elbo("mc", big).loss(vae.model, vae.guide, batch), r)
    assert_same_mean(one, many, sem, "1 vs 10 particles")
    log_ratio = math.log(one.var() / many.var())
    assert abs(log_ratio - math.log(big)) < 4 * math.sqrt(2 * 2 / (r - 1)), log_ratio


@pytest.mark.slow
def test_iwae_objective_is_per_data_point_iwae_bound(vae, batch, sem):
    """RenyiELBO(alpha=0) with K particles estimates -sum_i IWAE_K(x_i) (a bound per data
    point, not one bound on the whole batch), tighter than the ELBO."""
    r, k = 300, 10
    with torch.no_grad():
        iwae_loss = repeat(lambda: make_elbo("iwae", k).loss(vae.model, vae.guide, batch), r)
        mc_loss = repeat(lambda: make_elbo("mc", k).loss(vae.model, vae.guide, batch), r)
    scored = torch.tensor([-score(vae, batch, num_samples=k, iwae=True, seed=s).iwae.sum()
                           for s in range(r)], dtype=torch.float64)
    assert_same_mean(iwae_loss, scored, sem, "RenyiELBO vs score(iwae=True)")
    gap = (mc_loss.mean() - iwae_loss.mean()).item()
    assert gap > 4 * math.hypot(sem(mc_loss), sem(iwae_loss)), gap


def test_iwae_with_one_particle_is_the_elbo(vae, batch, sem):
    with torch.no_grad():
        iwae = repeat(lambda: make_elbo("iwae", 1).loss(vae.model, vae.guide, batch), 600)
        mc = repeat(lambda: make_elbo("mc", 1).loss(vae.model, vae.guide, batch), 600)
    assert_same_mean(iwae, mc, sem, "IWAE_1 vs ELBO")


@pytest.mark.parametrize("name", ["mc", "analytic"])
def test_jit_estimators_match_eager_on_a_new_batch_size(vae, digits, sem, name):
    """A Jit ELBO compiled on one batch size gives the eager estimator's value in expectation
    on another (the last, smaller batch of an epoch)."""

    def model(x):
        pyro.module("vae", vae)
        vae.model(x)

    def guide(x):
        pyro.module("vae", vae)
        vae.guide(x)

    jit, eager = make_elbo(name, jit=True), make_elbo(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit.differentiable_loss(model, guide, digits.train.x[:100])  # compile
        r, x = 300, digits.train.x[100:138]
        with torch.no_grad():
            a = repeat(lambda: jit.differentiable_loss(model, guide, x), r)
            b = repeat(lambda: eager.differentiable_loss(model, guide, x), r)
    assert_same_mean(a, b, sem, f"jit {name} vs eager")


def test_reference_loss_matches_pyro(batch, sem):
    """The plain-PyTorch yardstick (estimator B by hand) and TraceMeanField_ELBO agree."""
    from helpers import reference

    reference = reference()

    # the yardstick follows the VAE's encoder scale head: each head, both likelihoods
    for vae in (VAE(64, z_dim=4, hidden=(32,), beta=0.5, encoder_scale=head) if gaussian is None
                else VAE(64, z_dim=4, hidden=(32,), likelihood="gaussian", gaussian_scale=gaussian,
                         encoder_scale=head)
                for head in ("softplus", "logvar", "logscale") for gaussian in (None, 0.5)):
        with torch.no_grad():  # spread the scale head, so that sigma(h) differs by head
            vae.encoder[-1].weight[4:].mul_(3.0)
            vae.encoder[-1].bias[4:].uniform_(-1.0, 1.0)
        loss = reference.reference_loss(vae)
        with torch.no_grad():
            ref = repeat(lambda loss=loss: loss(batch), 400)
            pyr = repeat(lambda vae=vae: make_elbo("analytic").loss(vae.model, vae.guide,
                                                                    batch), 400)
        assert_same_mean(ref, pyr, sem,
                         f"reference vs Pyro ({vae.likelihood}, {vae.scale_head})")


# -- ppl_vae's subclasses compute Pyro's numbers, without host syncs ------------------------------

@pytest.mark.parametrize("name, pyro_cls", [("mc", Trace_ELBO), ("analytic", TraceMeanField_ELBO)])
@pytest.mark.parametrize("particles", [1, 3])
def test_sync_free_estimators_equal_pyros(vae, batch, name, pyro_cls, particles):
    """Same seed, same draws: the same loss and gradients as Pyro's own class (to float32
    rounding: the sums run in another order)."""
    results = []
    for elbo in (make_elbo(name, particles),
                 pyro_cls(num_particles=particles, vectorize_particles=particles > 1,
                          max_plate_nesting=1)):
        assert isinstance(elbo, pyro_cls)
        torch.manual_seed(1)
        vae.zero_grad()
        loss = elbo.differentiable_loss(vae.model, vae.guide, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in vae.parameters()]))
    (ours, our_grads), (theirs, their_grads) = results
    # equal up to float32 summation order
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0), (ours, theirs)
    for a, b in zip(our_grads, their_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mc", "analytic"])
def test_differentiable_loss_never_reads_the_host(vae, batch, name, monkeypatch):
    """No ``.item()`` (a CUDA sync) in the step: Pyro's own classes call it per site."""

    def no_item(self):
        raise AssertionError(".item() called inside differentiable_loss")

    elbo = make_elbo(name)
    monkeypatch.setattr(torch.Tensor, "item", no_item)
    with pyro.validation_enabled(False):
        elbo.differentiable_loss(vae.model, vae.guide, batch).backward()
    with pytest.raises(AssertionError, match="item"), pyro.validation_enabled(False):
        (Trace_ELBO if name == "mc" else TraceMeanField_ELBO)(
            max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, batch)


def test_jit_mean_field_compiles_once(vae, batch):
    """Pyro 1.9.2's JitTraceMeanField_ELBO recompiles every call; ours reuses the trace, so
    the Python model runs only while compiling."""
    from ppl_vae.inference.svi import with_params

    model, guide = with_params(vae)
    calls = []

    def counted(*args):
        calls.append(1)
        return model(*args)

    elbo = make_elbo("analytic", jit=True)
    losses = [elbo.differentiable_loss(counted, guide, batch) for _ in range(5)]
    assert len(calls) <= 2  # param discovery and the one trace
    assert all(torch.isfinite(v) for v in losses)


def test_analytic_with_a_discrete_guide_site_is_mc_with_its_score_function_gradient():
    """TraceMeanField_ELBO has no score-function term: with a discrete guide site it would
    train q(y) by a biased gradient, so --elbo analytic takes Trace_ELBO's estimate there."""
    import pyro.distributions as dist

    logits = torch.tensor([0.5, -0.2, 0.1], requires_grad=True)

    def model():
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("x", dist.Normal(y.float(), 1.0), obs=torch.tensor(2.0))

    def guide():
        pyro.sample("y", dist.Categorical(logits=logits))

    def loss_and_grad(name):
        pyro.set_rng_seed(3)
        loss = make_elbo(name).differentiable_loss(model, guide)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad

    with pytest.warns(UserWarning, match="site.s. y are not reparameterized"):
        analytic = loss_and_grad("analytic")
    mc = loss_and_grad("mc")
    assert torch.equal(analytic[0], mc[0]) and torch.equal(analytic[1], mc[1])
    assert analytic[1].abs().sum() > 0  # the score-function gradient reaches q(y)


# -- TraceEnum_ELBO: Pyro's numbers without its host reads ----------------------------------------

def enum_case(digits):
    """M2 on digits with 200 labels (masked terms, y enumerated) in float64."""
    from ppl_vae.data import hide_labels
    from ppl_vae.models import SSVAE

    data = hide_labels(digits, 200, 0)
    m2 = SSVAE(64, 10, z_dim=3, hidden=(16,), m1=0, labelled_rows=True,
               unlabelled_rows=True).double()
    x, y = m2.data_args(data.train.x[:40].double(), data.train.y[:40])
    return m2, (x, y)


def test_enum_elbo_equals_pyros_and_never_reads_the_host(digits, monkeypatch):
    """Every masked term of M2: the loss and gradients of Pyro's TraceEnum_ELBO to float64
    rounding, with no ``bool(tensor)`` or ``.item()`` (Pyro's Dice asks ``mask.all()``)."""
    m2, args = enum_case(digits)
    for _, model, guide in m2.programs():
        results = []
        for elbo in (make_elbo("enum"), TraceEnum_ELBO(max_plate_nesting=1)):
            torch.manual_seed(3)
            m2.zero_grad()
            with pyro.validation_enabled(False), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = elbo.differentiable_loss(model, guide, *args)
            loss.backward()
            results.append((loss.detach(), [p.grad for p in m2.parameters()]))
        (ours, our_grads), (theirs, their_grads) = results
        assert abs(float(ours - theirs)) < 1e-9
        for a, b in zip(our_grads, their_grads, strict=True):
            assert (a is None) == (b is None)
            assert a is None or float((a - b).abs().max()) < 1e-9

    def no_host(self, *a):
        raise AssertionError("the host read a tensor")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_host)
    monkeypatch.setattr(torch.Tensor, "item", no_host)
    _, model, guide = m2.programs()[1]  # the unlabelled term: y enumerated
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_elbo("enum").differentiable_loss(model, guide, *args).backward()
        with pytest.raises(AssertionError, match="host"):
            TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, *args)


def test_enum_elbo_ignores_values_of_zero_probability_like_pyro():
    """A value the guide gives probability 0 and the model log-density -inf: Pyro drops that
    term; ours zeroes it. Both give the finite exact sum and finite gradients."""
    from pyro.infer import config_enumerate

    logits = torch.tensor([0.3, -0.2, -math.inf], dtype=torch.float64, requires_grad=True)

    def model():
        y = pyro.sample("y", dist.Categorical(probs=torch.tensor([0.6, 0.4, 0.0],
                                                                   dtype=torch.float64)))
        pyro.sample("x", dist.Normal(y.to(torch.float64), 1.0), obs=torch.tensor(0.5))

    @config_enumerate
    def guide():
        pyro.sample("y", dist.Categorical(logits=logits))

    q = torch.softmax(logits.detach()[:2], 0)
    p = torch.tensor([0.6, 0.4], dtype=torch.float64)
    lik = dist.Normal(torch.tensor([0.0, 1.0], dtype=torch.float64), 1.0).log_prob(
        torch.tensor(0.5, dtype=torch.float64))
    exact = -(q * (p.log() + lik - q.log())).sum()
    grads = []
    for elbo in (make_elbo("enum", max_plate_nesting=0), TraceEnum_ELBO(max_plate_nesting=0)):
        with pyro.validation_enabled(False):
            loss = elbo.differentiable_loss(model, guide)
        assert abs(float(loss - exact)) < 1e-12
        grads.append(torch.autograd.grad(loss, logits)[0])
    assert torch.isfinite(grads[0]).all()
    assert float((grads[0] - grads[1]).abs().max()) < 1e-12


@pytest.mark.parametrize("particles", [1, 3])
def test_mc_with_a_discrete_guide_site_equals_pyros_without_host_reads(digits, monkeypatch,
                                                                        particles):
    """A guide that samples a discrete y (M2's unlabelled term under --elbo mc): Pyro's loss
    and score-function gradient, with no ``.item()``."""
    m2, args = enum_case(digits)
    _, model, guide = m2.programs()[1]
    results = []
    for elbo in (make_elbo("mc", particles),
                 Trace_ELBO(num_particles=particles, max_plate_nesting=1,
                            vectorize_particles=particles > 1)):
        torch.manual_seed(5)
        m2.zero_grad()
        with pyro.validation_enabled(False):
            loss = elbo.differentiable_loss(model, guide, *args)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m2.parameters()]))
    (ours, our_grads), (theirs, their_grads) = results
    assert abs(float(ours - theirs)) < 1e-9 * abs(float(theirs))
    for a, b in zip(our_grads, their_grads, strict=True):
        assert (a is None) == (b is None)
        assert a is None or float((a - b).abs().max()) < 1e-9

    def no_item(self):
        raise AssertionError("the host read a tensor")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    with pyro.validation_enabled(False):
        make_elbo("mc", particles).differentiable_loss(model, guide, *args).backward()
