"""The VAE as a Pyro program: trace structure, densities, beta scaling, networks, registry."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from helpers import build_model, encoder_scale_inverse
from pyro import poutine
from torch import nn

from ppl_vae import MODELS, VAE, TrainConfig, UsageError, get_model, register_model
from ppl_vae.models import model_name
from ppl_vae.models.vae import VAEOptions
from ppl_vae.run.session import resolve

D, Z, B = 64, 3, 5


def trace(fn, *args):
    t = poutine.trace(fn).get_trace(*args)
    t.compute_log_prob()
    return t


@pytest.fixture
def x():
    return torch.rand(B, D)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_model_trace_structure(x, likelihood):
    vae = VAE(D, z_dim=Z, hidden=(16,), likelihood=likelihood)
    t = trace(vae.model, x)
    z, obs = t.nodes["z"], t.nodes["x"]
    assert z["type"] == obs["type"] == "sample"
    assert not z["is_observed"] and obs["is_observed"]
    assert torch.equal(obs["value"], x)
    for site in (z, obs):
        [frame] = site["cond_indep_stack"]
        assert (frame.name, frame.size, frame.dim) == ("data", B, -1)
        assert site["fn"].batch_shape == (B,)
        assert site["log_prob"].shape == (B,)
    assert z["fn"].event_shape == (Z,) and z["value"].shape == (B, Z)
    assert obs["fn"].event_shape == (D,)
    # the only random choices are z and x (the plate's own subsample site aside)
    latent = [n for n, s in t.nodes.items() if s["type"] == "sample" and not s["is_observed"]
              and n != "data"]
    assert latent == ["z"]


def test_guide_trace_structure(x):
    vae = VAE(D, z_dim=Z, hidden=(16,))
    t = trace(vae.guide, x)
    z = t.nodes["z"]
    assert not z["is_observed"]
    [frame] = z["cond_indep_stack"]
    assert (frame.name, frame.size, frame.dim) == ("data", B, -1)
    assert z["fn"].batch_shape == (B,) and z["fn"].event_shape == (Z,)
    assert z["fn"].has_rsample  # reparameterized: Trace_ELBO gets pathwise gradients
    assert "x" not in t.nodes
    loc, scale = vae.encode(x)
    assert torch.allclose(z["fn"].base_dist.loc, loc)
    assert torch.allclose(z["fn"].base_dist.scale, scale)


def test_vectorized_particles_broadcast(x):
    """Inside a particle plate at dim -2 (how the ELBOs vectorize), shapes become (K, B)."""
    vae = VAE(D, z_dim=Z, hidden=(16,))
    K = 7
    with pyro.plate("particles", K, dim=-2):
        g = trace(vae.guide, x)
    with pyro.plate("particles", K, dim=-2):
        m = trace(poutine.replay(vae.model, trace=g), x)
    assert g.nodes["z"]["value"].shape == (K, B, Z)
    for t, name in ((g, "z"), (m, "z"), (m, "x")):
        assert t.nodes[name]["log_prob"].shape == (K, B)
    assert torch.equal(m.nodes["z"]["value"], g.nodes["z"]["value"])


@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0])
def test_beta_scales_z_in_model_and_guide(x, beta):
    vae = VAE(D, z_dim=Z, hidden=(16,), beta=beta)
    g = trace(vae.guide, x)
    m = trace(poutine.replay(vae.model, trace=g), x)
    for t in (m, g):
        assert t.nodes["z"]["scale"] == pytest.approx(beta)
        assert torch.allclose(t.nodes["z"]["log_prob"], beta * t.nodes["z"]["unscaled_log_prob"])
    assert m.nodes["x"]["scale"] == 1.0  # the likelihood is never scaled


def test_model_densities_are_the_textbook_ones(x):
    """log p(z) is a standard normal, log p(x|z) the Bernoulli cross-entropy of the decoder."""
    vae = VAE(D, z_dim=Z, hidden=(16,))
    t = trace(vae.model, x)
    z = t.nodes["z"]["value"]
    log_pz = -0.5 * (z**2).sum(-1) - 0.5 * Z * math.log(2 * math.pi)
    assert torch.allclose(t.nodes["z"]["log_prob"], log_pz, atol=1e-5)
    log_px = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="none").sum(-1)
    assert torch.allclose(t.nodes["x"]["log_prob"], log_px, atol=1e-4)


def test_gaussian_likelihood_density(x):
    sigma = 0.3
    vae = VAE(D, z_dim=Z, hidden=(16,), likelihood="gaussian", gaussian_scale=sigma)
    t = trace(vae.model, x)
    mean = vae.decoder(t.nodes["z"]["value"])
    expected = (-0.5 * ((x - mean) / sigma) ** 2 - math.log(sigma)
                - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(t.nodes["x"]["log_prob"], expected, atol=1e-3)


def test_guide_log_prob_is_diagonal_normal(x):
    vae = VAE(D, z_dim=Z, hidden=(16,))
    t = trace(vae.guide, x)
    loc, scale = vae.encode(x)
    z = t.nodes["z"]["value"]
    expected = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    assert torch.allclose(t.nodes["z"]["log_prob"], expected, atol=1e-5)


def test_network_shapes_and_outputs():
    vae = VAE(D, z_dim=Z, hidden=(32, 16), activation="tanh")
    linears = [m for m in vae.encoder if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(D, 32), (32, 16), (16, 2 * Z)]
    linears = [m for m in vae.decoder if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(Z, 16), (16, 32), (32, D)]
    assert sum(isinstance(m, nn.Tanh) for m in vae.encoder) == 2
    assert not isinstance(vae.encoder[-1], nn.Tanh)  # raw (loc, scale head) out
    x = torch.rand(B, D)
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (B, Z) and (scale > 0).all()
    r = vae.reconstruct(x)
    assert r.shape == (B, D) and (r >= 0).all() and (r <= 1).all()
    assert not r.requires_grad
    s = vae.sample(11)
    assert s.shape == (11, D) and (s >= 0).all() and (s <= 1).all()
    assert torch.equal(vae.decode(loc), r)


def test_linear_vae_has_single_layers():
    """hidden=() is the linear-Gaussian (probabilistic PCA) model used by test_evaluation."""
    vae = VAE(6, z_dim=2, hidden=(), likelihood="gaussian", gaussian_scale=0.5)
    assert len(vae.encoder) == 1 and isinstance(vae.encoder[0], nn.Linear)
    assert len(vae.decoder) == 1 and isinstance(vae.decoder[0], nn.Linear)
    assert vae.encoder[0].weight.shape == (4, 6) and vae.decoder[0].weight.shape == (6, 2)
    z = torch.randn(3, 2)
    assert torch.equal(vae.decode(z), vae.decoder[0](z))  # Gaussian decode is the mean itself


def test_learn_scale_makes_sigma_a_parameter():
    fixed = VAE(D, z_dim=Z, hidden=(8,), likelihood="gaussian", gaussian_scale=0.2)
    learned = VAE(D, z_dim=Z, hidden=(8,), likelihood="gaussian", gaussian_scale=0.2,
                  learn_scale=True)
    assert "log_scale" not in dict(fixed.named_parameters())
    assert "log_scale" in dict(learned.named_parameters())
    for vae in (fixed, learned):
        assert vae.state_dict()["log_scale"].item() == pytest.approx(math.log(0.2))


def test_bad_likelihood_is_rejected():
    with pytest.raises(ValueError, match="likelihood"):
        VAE(D, z_dim=Z, likelihood="poisson")


@pytest.mark.parametrize("kind, sigma", [
    ("logvar", lambda h: (0.5 * h).exp()),  # h is log sigma^2
    ("logscale", lambda h: h.exp()),  # the old behaviour: h is log sigma
    ("softplus", F.softplus),
])
def test_encoder_scale_head(x, kind, sigma):
    vae = VAE(D, z_dim=Z, hidden=(16,), encoder_scale=kind)
    loc, h = vae.encoder(x).chunk(2, dim=-1)
    got_loc, got_scale = vae.encode(x)
    assert torch.equal(got_loc, loc)
    assert torch.allclose(got_scale, sigma(h))
    t = trace(vae.guide, x)
    assert torch.allclose(t.nodes["z"]["fn"].base_dist.scale, sigma(h))
    assert torch.allclose(encoder_scale_inverse(sigma(h), kind), h, atol=1e-5)


def test_encoder_scale_default_is_softplus():
    assert VAEOptions().encoder_scale == "softplus"  # the measured best (README)
    assert VAE(D, z_dim=Z).scale_head == "softplus"
    with pytest.raises(UsageError, match="encoder_scale='exp' is not one of logvar, logscale"):
        VAEOptions(encoder_scale="exp")


def test_from_options_uses_every_model_option(digits):
    config = resolve(TrainConfig(model_options=dict(
        z_dim=5, hidden=(24,), activation="elu", likelihood="gaussian", gaussian_scale=0.7,
        learn_scale=True, beta=0.25, encoder_scale="logscale")))[0]
    assert isinstance(config.model_options, VAEOptions)
    vae = build_model(config, digits)
    assert isinstance(vae, VAE)
    assert (vae.input_dim, vae.z_dim, vae.likelihood, vae.beta) == (64, 5, "gaussian", 0.25)
    assert vae.encoder[0].out_features == 24 and isinstance(vae.encoder[1], nn.ELU)
    assert vae.log_scale.item() == pytest.approx(math.log(0.7))
    assert isinstance(vae.log_scale, nn.Parameter)
    assert vae.scale_head == "logscale"
    same = VAE.from_options(config.model_options, digits)
    assert (same.z_dim, same.likelihood, same.beta, same.scale_head) == (
        5, "gaussian", 0.25, "logscale")


@pytest.mark.parametrize("name", ["vae", "flow-vae", "conv-vae", "cvae", "ssvae"])
def test_each_family_states_its_options_once(name):
    """The constructor takes the ``Options`` whole: none of its fields is a parameter too."""
    cls = get_model(name)
    params = inspect.signature(cls).parameters
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    assert "options" in params and not fields & set(params), fields & set(params)


def test_options_whole_or_by_keyword_build_the_same_model():
    whole = VAE(D, VAEOptions(z_dim=4, hidden=(7,), encoder_scale="logvar"))
    keywords = VAE(D, z_dim=4, hidden=(7,), encoder_scale="logvar")
    changed = VAE(D, VAEOptions(z_dim=4, hidden=(7,)), encoder_scale="logvar")
    for vae in (whole, keywords, changed):
        assert vae.options == VAEOptions(z_dim=4, hidden=(7,), encoder_scale="logvar")
        assert [p.shape for p in vae.parameters()] == [p.shape for p in whole.parameters()]
    with pytest.raises(UsageError, match="z_dim must be a whole number"):
        VAE(D, z_dim=0)
    with pytest.raises(TypeError, match="takes a VAEOptions, got 4; give single options by"):
        VAE(D, 4)


def test_model_options_are_validated():
    with pytest.raises(UsageError, match="VAE has no option 'batch_size'"):
        resolve(TrainConfig(model_options=dict(batch_size=3)))
    with pytest.raises(UsageError, match="z_dim must be a whole number of at least 1"):
        resolve(TrainConfig(model_options=dict(z_dim=0)))


def test_registry():
    assert get_model("vae") is VAE and MODELS["vae"] is VAE
    assert get_model(VAE) is VAE and model_name(VAE) == "vae"
    with pytest.raises(UsageError, match="unknown model='nope'.*vae"):
        get_model("nope")
    with pytest.raises(TypeError, match="guide"):
        register_model("broken")(type("Broken", (), {"model": None, "from_options": None}))
    assert "broken" not in MODELS

    @register_model("test-vae")
    class MyVAE(VAE):
        pass

    try:
        assert get_model("test-vae") is MyVAE and model_name(MyVAE) == "test-vae"
    finally:
        MODELS.pop("test-vae")

    class OtherVAE(VAE):  # registered under its class name in lower case
        pass

    assert model_name(OtherVAE) == f"{__name__}:test_registry.<locals>.OtherVAE"
    assert register_model(OtherVAE) is OtherVAE
    try:
        assert get_model("othervae") is OtherVAE and model_name(OtherVAE) == "othervae"
    finally:
        MODELS.pop("othervae")
