"""The appendix: AutoDelta MLE/MAP against closed forms, NUTS against exact posteriors (within
ArviZ's Monte Carlo standard errors), the decoder-MAP / weight-decay identity, the gaps of the
amortized posterior, and ``python -m ppl_vae.appendix``.

NUTS is the slow part: chains are short (a few hundred draws) and every NUTS tolerance is
derived from the run's own MCSE / ESS, so a shorter run gives a looser but still honest test.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import assert_one_line_error
from pyro import poutine

from ppl_vae import TrainConfig, score
from ppl_vae.appendix import (
    DecoderMAPVAE,
    coin,
    coin_model,
    correlated_data,
    exact_posterior,
    fit_delta,
    gaps,
    gradient_identity,
    linear_regression,
    map_vs_weight_decay,
    nuts,
    optimize_local,
    regression_model,
    summary,
    true_posterior,
)
from ppl_vae.appendix import __main__ as appendix_cli
from ppl_vae.appendix.__main__ import main
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.importance import log_weights
from ppl_vae.run.train import train_run

PROG = "python -m ppl_vae appendix: error: "
PNG = b"\x89PNG\r\n\x1a\n"
F64_REL = 1e-6  # L-BFGS in float64 reaches ~1e-9 relative here; 1e-6 leaves a wide margin


@pytest.fixture(scope="module", autouse=True)
def one_thread(trained_run):
    """NUTS and the small networks here are thousands of tiny ops: with other jobs on the
    cores, intra-op threading slows them several-fold. One thread for this module (restored
    after); ``trained_run`` is built first, with the suite's usual threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tosses(k: int, n: int) -> torch.Tensor:
    return torch.tensor([1.0] * k + [0.0] * (n - k), dtype=torch.float64)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


# -- coin ----------------------------------------------------------------------------------------

COIN_CASES = [(7, 10, 2.0, 3.0), (3, 20, 5.0, 2.0), (12, 13, 3.5, 1.5), (50, 100, 10.0, 4.0)]


@pytest.mark.parametrize("k, n, a, b", COIN_CASES)
def test_coin_mle_and_map_by_autodelta_match_closed_forms(k, n, a, b):
    data = tosses(k, n)
    mle = fit_delta(coin_model, data, a, b, False)["p"].item()
    map_ = fit_delta(coin_model, data, a, b, True)["p"].item()
    mle_exact, map_exact = k / n, (k + a - 1) / (n + a + b - 2)
    assert abs(mle_exact - map_exact) > 1e3 * F64_REL * mle_exact  # the two can be told apart
    assert mle == pytest.approx(mle_exact, rel=F64_REL)
    assert map_ == pytest.approx(map_exact, rel=F64_REL)


@pytest.mark.parametrize("k, n", [(1, 4), (7, 10), (19, 20)])
def test_coin_map_under_a_uniform_prior_is_the_mle(k, n):
    data = tosses(k, n)
    map_uniform = fit_delta(coin_model, data, 1.0, 1.0, True)["p"].item()
    mle = fit_delta(coin_model, data, 1.0, 1.0, False)["p"].item()
    assert map_uniform == pytest.approx(k / n, rel=F64_REL)
    assert mle == pytest.approx(k / n, rel=F64_REL)


def test_coin_masked_prior_leaves_only_the_likelihood():
    """poutine.mask(False) removes log p(p) from the joint: the trace's log density is the
    Bernoulli log-likelihood alone."""
    data = tosses(3, 8)
    p = torch.tensor(0.3, dtype=torch.float64)
    cond = poutine.condition(coin_model, data={"p": p})
    loglik = 3 * math.log(0.3) + 5 * math.log(0.7)
    log_prior = dist.Beta(torch.tensor(2.0), torch.tensor(5.0)).log_prob(p.float()).item()
    for use_prior, expected in [(False, loglik), (True, loglik + log_prior)]:
        t = poutine.trace(cond).get_trace(data, 2.0, 5.0, use_prior)
        assert t.log_prob_sum().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_coin_full_run_against_the_exact_beta_posterior(tmp_path):
    k, n, a, b = 7, 10, 2.0, 3.0
    r = coin(tosses(k, n), a, b, nuts_samples=300, out=tmp_path)
    assert {"mle", "map", "mle_exact", "map_exact"} <= set(r)
    assert r["mle_exact"] == k / n
    assert r["map_exact"] == pytest.approx((k + a - 1) / (n + a + b - 2))
    assert r["mle"] == pytest.approx(k / n, rel=F64_REL)
    assert r["map"] == pytest.approx(r["map_exact"], rel=F64_REL)
    assert r["map_uniform_prior"] == pytest.approx(k / n, rel=F64_REL)

    post = dist.Beta(torch.tensor(a + k, dtype=torch.float64),
                     torch.tensor(b + n - k, dtype=torch.float64))
    mean, sd = post.mean.item(), post.variance.sqrt().item()
    assert r["posterior_exact"]["mean"] == pytest.approx(mean, rel=1e-6)
    assert r["posterior_exact"]["sd"] == pytest.approx(sd, rel=1e-6)
    p = r["posterior_nuts"]
    assert p["r_hat"] < 1.05
    assert p["ess_bulk"] > 100
    assert 0 < p["mcse_mean"] < 0.1 * sd  # the tolerance below is a real constraint
    assert abs(p["mean"] - mean) < 4 * p["mcse_mean"], (p, mean)
    assert abs(p["sd"] - sd) < 4 * p["mcse_sd"], (p, sd)
    assert p["hdi_3%"] < mean < p["hdi_97%"]
    assert (tmp_path / "coin.png").read_bytes().startswith(PNG)


# -- linear regression ---------------------------------------------------------------------------

@pytest.mark.parametrize("rho, sigma, tau", [(0.95, 0.5, 2.0), (0.5, 2.0, 0.5), (0.99, 0.3, 3.0)])
def test_regression_mle_is_least_squares_and_map_is_ridge(rho, sigma, tau):
    X, y = correlated_data(rho=rho, sigma=sigma)
    lam = sigma**2 / tau**2
    eye = torch.eye(2, dtype=X.dtype)
    least_squares = torch.linalg.solve(X.T @ X, X.T @ y)
    ridge = torch.linalg.solve(X.T @ X + lam * eye, X.T @ y)
    wrong_ridge = torch.linalg.solve(X.T @ X + eye, X.T @ y)  # lambda = 1: sigma, tau ignored
    mle = fit_delta(regression_model, X, y, sigma, tau, False)["w"]
    map_ = fit_delta(regression_model, X, y, sigma, tau, True)["w"]
    assert rel(least_squares, ridge) > 1e-3 and rel(wrong_ridge, ridge) > 1e-3
    assert rel(mle, least_squares) < F64_REL
    assert rel(map_, ridge) < F64_REL


def test_exact_posterior_satisfies_bayes_rule():
    """log N(w; mu, S) = log p(w) + log p(y|w) - log p(y) for any w, with the marginal
    likelihood p(y) = N(y; 0, sigma^2 I + tau^2 X X^T) computed independently."""
    g = torch.Generator().manual_seed(1)
    n, d, sigma, tau = 30, 3, 0.7, 1.3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) \
        + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    mu, cov = exact_posterior(X, y, sigma, tau)
    assert torch.allclose(cov, cov.T)
    precision = X.T @ X / sigma**2 + torch.eye(d, dtype=X.dtype) / tau**2
    assert torch.allclose(torch.linalg.inv(cov), precision, rtol=1e-10, atol=1e-10)
    marginal = dist.MultivariateNormal(torch.zeros(n, dtype=X.dtype),
                                       sigma**2 * torch.eye(n, dtype=X.dtype) + tau**2 * X @ X.T)
    posterior = dist.MultivariateNormal(mu, cov)
    for w in torch.randn(5, d, generator=g, dtype=torch.float64) + mu:
        joint = (dist.Normal(0.0, tau).log_prob(w).sum()
                 + dist.Normal(X @ w, sigma).log_prob(y).sum())
        assert posterior.log_prob(w).item() == pytest.approx(
            (joint - marginal.log_prob(y)).item(), rel=1e-7)  # float64 round-off: ~1e-10


@pytest.fixture(scope="module")
def regression_run():
    """One full ``linear_regression`` on strongly correlated features, lambda != 1."""
    sigma, tau = 0.5, 2.0
    X, y = correlated_data(rho=0.95, sigma=sigma)
    pyro.set_rng_seed(0)
    return X, y, sigma, tau, linear_regression(X, y, sigma, tau, nuts_samples=800, vi_steps=2000)


@pytest.mark.slow
def test_linear_regression_point_estimates(regression_run):
    X, y, sigma, tau, r = regression_run
    assert {"mle", "map", "mle_exact", "map_exact"} <= set(r)
    assert r["lambda"] == pytest.approx(sigma**2 / tau**2)
    least_squares = torch.linalg.solve(X.T @ X, X.T @ y)
    ridge = torch.linalg.solve(X.T @ X + sigma**2 / tau**2 * torch.eye(2, dtype=X.dtype),
                               X.T @ y)
    assert rel(r["mle_exact"], least_squares) < 1e-10
    assert rel(r["map_exact"], ridge) < 1e-10
    assert rel(r["mle"], least_squares) < F64_REL
    assert rel(r["map"], ridge) < F64_REL


@pytest.mark.slow
def test_linear_regression_nuts_matches_the_exact_posterior(regression_run):
    X, y, sigma, tau, r = regression_run
    p = r["posterior"]
    mu, cov = exact_posterior(X, y, sigma, tau)
    sd = cov.diagonal().sqrt()
    assert p["exact_mean"] == pytest.approx(mu.tolist(), rel=1e-12)
    assert p["exact_sd"] == pytest.approx(sd.tolist(), rel=1e-12)
    assert p["exact_correlation"] < -0.9  # correlated features: correlated coefficients
    for i in range(2):
        assert p["nuts_r_hat"][i] < 1.05
        assert 0 < p["nuts_mcse_mean"][i] < 0.1 * sd[i]
        assert abs(p["nuts_mean"][i] - mu[i]) < 4 * p["nuts_mcse_mean"][i], (i, p)
        # sd of a Gaussian from ESS draws: relative standard error ~ 1 / sqrt(2 ESS); the
        # bound follows the chain's own ESS, which differs between torch versions and seeds
        assert p["nuts_ess_bulk"][i] > 100  # enough draws for the checks to mean something
        tol = 4 / math.sqrt(2 * p["nuts_ess_bulk"][i])
        assert abs(p["nuts_sd"][i] / sd[i] - 1) < tol, (i, p)


@pytest.mark.slow
def test_mean_field_vi_underestimates_the_correlated_posterior(regression_run):
    X, y, sigma, tau, r = regression_run
    p = r["posterior"]
    mu, cov = exact_posterior(X, y, sigma, tau)
    precision = X.T @ X / sigma**2 + torch.eye(2, dtype=X.dtype) / tau**2
    best_diagonal = 1 / precision.diagonal().sqrt()  # argmin KL(q || p) over diagonal Normals
    assert p["mean_field_optimum_sd"] == pytest.approx(best_diagonal.tolist(), rel=1e-10)
    exact_sd = cov.diagonal().sqrt()
    for i in range(2):
        assert p["mean_field_vi_sd"][i] < 0.6 * exact_sd[i]
        assert abs(p["mean_field_vi_sd"][i] / best_diagonal[i] - 1) < 0.1
        assert abs(p["mean_field_vi_mean"][i] - mu[i]) < 0.25 * best_diagonal[i]


def test_nuts_returns_inference_data_with_chains_and_draws():
    X, y = correlated_data(n=20, rho=0.5)
    idata = nuts(regression_model, X, y, 1.0, 1.0, num_samples=40, warmup_steps=40,
                 num_chains=2, seed=3)
    assert idata.posterior["w"].shape == (2, 40, 2)
    table = summary(idata)
    assert list(table.index) == ["w[0]", "w[1]"]
    assert {"mean", "sd", "mcse_mean", "ess_bulk", "r_hat", "hdi_3%", "hdi_97%"} <= set(
        table.columns)
    # seeded: the same call gives the same draws
    again = nuts(regression_model, X, y, 1.0, 1.0, num_samples=40, warmup_steps=40,
                 num_chains=2, seed=3)
    np.testing.assert_array_equal(idata.posterior["w"].values, again.posterior["w"].values)


# -- decoder MAP = weight decay ------------------------------------------------------------------

@pytest.mark.parametrize("prior_scale", [0.5, 2.0])
def test_gradient_identity_holds(digits, prior_scale):
    r = gradient_identity(digits.train.x[:64], prior_scale=prior_scale)
    assert r["max_abs_grad"] > 1.0
    assert r["max_abs_diff_decoder"] < 1e-5 * r["max_abs_grad"]
    assert r["max_abs_diff_encoder"] < 1e-5 * r["max_abs_grad"]


def map_and_plain_grads(x, prior_scale):
    """Gradients of the MAP model's -ELBO (AutoDelta on theta) and of the plain VAE's at the
    same z draws, by hand; and theta."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    m = DecoderMAPVAE(x.shape[1], z_dim=2, hidden=(16,), prior_scale=prior_scale,
                      n_data=x.shape[0])
    elbo = make_elbo("mc")
    m.guide(x)
    theta = {k.removesuffix("_unconstrained"): p
             for k, p in m.weights_guide.named_parameters()}
    pyro.set_rng_seed(0)
    elbo.differentiable_loss(m.model, m.guide, x).backward()
    vae = m.plain_vae()
    pyro.set_rng_seed(0)
    elbo.differentiable_loss(vae.model, vae.guide, x).backward()
    plain = {f"decoder.{k}": p.grad for k, p in vae.decoder.named_parameters()}
    assert set(plain) == set(theta)
    return {k: p.grad for k, p in theta.items()}, plain, {k: p.detach() for k, p in theta.items()}


def test_gradient_identity_is_sensitive_to_the_prior_scale(digits):
    """The identity pins the weight-decay term down: with the wrong s^2 it fails by far, and
    without the term (plain gradient alone) too."""
    s = 0.5
    map_grad, plain_grad, theta = map_and_plain_grads(digits.train.x[:64], s)
    scale = max(g.abs().max().item() for g in map_grad.values())

    def worst(s2):
        return max((map_grad[k] - plain_grad[k] - theta[k] / s2).abs().max().item()
                   for k in theta)

    assert worst(s**2) < 1e-5 * scale
    assert worst(1.0) > 1e-2 * scale  # s = 1: the wrong prior
    assert worst(4 * s**2) > 1e-2 * scale
    assert worst(math.inf) > 1e-2 * scale  # no prior term at all


def test_decoder_map_model_puts_weights_outside_the_data_plate(digits):
    pyro.clear_param_store()
    x = digits.train.x[:32]
    s, n_data = 0.7, 1000
    m = DecoderMAPVAE(x.shape[1], z_dim=3, hidden=(16,), prior_scale=s, n_data=n_data)
    t = poutine.trace(m.model).get_trace(x)
    shapes = {"decoder.0.weight": (16, 3), "decoder.0.bias": (16,),
              "decoder.2.weight": (64, 16), "decoder.2.bias": (64,)}
    for name, shape in shapes.items():
        site = t.nodes[name]
        assert site["type"] == "sample" and not site["is_observed"]
        assert "data" not in [f.name for f in site["cond_indep_stack"]]
        assert site["scale"] == 1.0
        assert site["value"].shape == shape
        fn = site["fn"]
        assert fn.event_shape == shape and fn.batch_shape == ()
        assert isinstance(fn.base_dist, dist.Normal)
        assert torch.all(fn.base_dist.loc == 0) and torch.all(fn.base_dist.scale == s)
    for name in ("z", "x"):
        site = t.nodes[name]
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
        assert site["scale"] == pytest.approx(n_data / len(x))
    assert t.nodes["z"]["value"].shape == (32, 3)
    latent = {k for k, v in t.nodes.items() if v["type"] == "sample"
              and not v["is_observed"] and k != "data"}
    assert latent == {*shapes, "z"}
    # theta is drawn once per execution: the decoder inside the plate used the drawn weights
    w0, b0 = t.nodes["decoder.0.weight"]["value"], t.nodes["decoder.0.bias"]["value"]
    w2, b2 = t.nodes["decoder.2.weight"]["value"], t.nodes["decoder.2.bias"]["value"]
    logits = torch.relu(t.nodes["z"]["value"] @ w0.T + b0) @ w2.T + b2
    torch.testing.assert_close(t.nodes["x"]["fn"].base_dist.logits, logits)


def test_map_training_equals_weight_decay(digits, sem):
    r = map_vs_weight_decay(digits, epochs=3)
    n, batch_size, s = len(digits.train), 128, 0.5
    assert r["weight_decay"] == pytest.approx(batch_size / (n * s**2))
    # the model both start from (as map_vs_weight_decay builds it)
    pyro.clear_param_store()
    torch.manual_seed(0)
    m = DecoderMAPVAE(digits.input_dim, z_dim=2, hidden=(64,), prior_scale=s, n_data=n)
    m.guide(digits.train.x[:batch_size])
    start = score(m.plain_vae(), digits.test.x, num_samples=10).elbo
    svi, adam = r["svi_map"]["test_elbo"], r["adam_weight_decay"]["test_elbo"]
    assert abs(svi - adam) < 1.0
    for elbo in (svi, adam):
        assert elbo - start.mean().item() > 4 * sem(start) + 1.0
    assert r["svi_map"]["decoder_weight_norm"] == pytest.approx(
        r["adam_weight_decay"]["decoder_weight_norm"], rel=0.05)


# -- the amortized posterior ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def gap_results(trained_run):
    x = trained_run.data.test.x[:10]
    return x, gaps(trained_run.module, x, iwae_samples=2000, elbo_samples=500, steps=300,
                   psis_particles=500)


def test_gaps_are_ordered_within_monte_carlo_error(gap_results, sem):
    x, g = gap_results
    per = {k: torch.tensor(v, dtype=torch.float64) for k, v in g["per_image"].items()}
    assert g["images"] == len(x) == 10
    for v in per.values():
        assert v.shape == (10,) and torch.isfinite(v).all()
    lp, best, amort = per["log_px_iwae"], per["elbo_optimal_normal"], per["elbo_amortized"]
    assert g["log_px_iwae"] == pytest.approx(lp.mean().item(), rel=1e-6)
    assert g["approximation_gap"] == pytest.approx((lp - best).mean().item(), abs=1e-4)
    assert g["amortization_gap"] == pytest.approx((best - amort).mean().item(), abs=1e-4)
    for name in ("approximation_gap", "amortization_gap"):
        assert math.isfinite(g[name])
    assert (lp - best).mean() > -4 * sem(lp - best)
    assert (best - amort).mean() > -4 * sem(best - amort)
    assert (lp - amort).mean() > -4 * sem(lp - amort)
    assert (lp < 0).all()  # a Bernoulli likelihood: log p(x) < 0


def test_psis_khat_per_image(gap_results):
    x, g = gap_results
    khat = g["per_image"]["psis_khat"]
    assert len(khat) == len(x) and all(math.isfinite(k) for k in khat)
    assert g["psis_khat_mean"] == pytest.approx(float(np.mean(khat)))
    assert g["psis_khat_above_0.7"] == sum(k > 0.7 for k in khat)


def test_optimize_local_improves_every_image_over_the_encoder(trained_run):
    vae, x = trained_run.module, trained_run.data.test.x[10:20]
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    local = optimize_local(vae, x, steps=300)
    for k, v in vae.state_dict().items():  # the decoder stays fixed
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in vae.parameters())
    assert local.loc.shape == local.log_scale.shape == (10, vae.z_dim)
    K = 500
    rows = torch.arange(len(x))
    with torch.no_grad(), pyro.validation_enabled(False):
        pyro.set_rng_seed(1)
        lw_local = log_weights(local.model, local.guide, x, rows, num_samples=K).double()
        pyro.set_rng_seed(2)
        lw_enc = log_weights(vae.model, vae.guide, x, num_samples=K).double()
    gain = lw_local.mean(0) - lw_enc.mean(0)
    se = (lw_local.var(0) / K + lw_enc.var(0) / K).sqrt()
    assert (gain > -4 * se).all(), (gain, se)
    assert gain.mean() > 4 * se.pow(2).sum().sqrt() / len(x), (gain, se)


def test_local_guide_scores_in_row_chunks(trained_run, monkeypatch):
    """``score`` splits rows into chunks when K x rows x D is large: q*_x must still pair
    each image with its own parameters (forced here by a tiny memory bound)."""
    vae, x = trained_run.module, trained_run.data.test.x[20:26]
    local = optimize_local(vae, x, steps=100)
    rows = torch.arange(len(x))
    K = 400
    with torch.no_grad(), pyro.validation_enabled(False):
        pyro.set_rng_seed(3)
        lw = log_weights(local.model, local.guide, x, rows, num_samples=K).double()
    whole = score(local, x, rows, num_samples=K, seed=4).elbo.double()
    monkeypatch.setattr("ppl_vae.inference.importance.MAX_ELEMENTS", 2 * K * (x.shape[1] + 1))
    chunked = score(local, x, rows, num_samples=K, seed=5).elbo.double()
    assert chunked.shape == whole.shape == (len(x),)
    se = lw.std(0) / math.sqrt(K)  # of one image's K-sample ELBO estimate
    assert (se < 0.2).all()
    assert ((chunked - whole).abs() < 4 * math.sqrt(2) * se).all(), (chunked, whole, se)
    assert ((lw.mean(0) - whole).abs() < 4 * math.sqrt(2) * se).all()


@pytest.fixture(scope="module")
def vae_2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("z2") / "run"
    config = TrainConfig(dataset="digits", model_options=dict(hidden=(32,), z_dim=2), epochs=3,
                         seed=0, out=str(out), batch_size=64, lr=3e-3)
    return train_run(config, progress=False)


@pytest.mark.slow
def test_true_posterior_nuts_matches_importance_sampling(vae_2d):
    vae = vae_2d.module
    x = vae_2d.data.test.x[:1]
    idata = true_posterior(vae, x, num_samples=200, seed=0)
    z = idata.posterior["z"]
    assert z.shape == (2, 200, 1, 2)
    assert np.isfinite(z.values).all()
    assert all(p.requires_grad for p in vae.parameters())
    table = summary(idata)
    assert (table["r_hat"] < 1.1).all()  # two short chains on a broad posterior
    # E[z|x] by self-normalized importance sampling with the prior as proposal
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(200_000, 2, generator=g)
    with torch.no_grad():
        logw = vae.likelihood_dist(draws).log_prob(x.expand(len(draws), -1)).double()
    w = (logw - logw.max()).exp()
    w = w / w.sum()
    assert 1 / w.pow(2).sum() > 200  # enough effective draws for the comparison
    is_mean = (w[:, None] * draws.double()).sum(0)
    is_se = (w[:, None].pow(2) * (draws.double() - is_mean).pow(2)).sum(0).sqrt()
    for i in range(2):
        row = table.loc[f"z[0, {i}]"]
        bound = 4 * math.sqrt(row["mcse_mean"] ** 2 + is_se[i].item() ** 2)
        assert abs(row["mean"] - is_mean[i].item()) < bound, (i, row, is_mean, is_se)


# -- the command line ----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_coin_then_regression_write_their_files(cli, tmp_path):
    out = tmp_path / "app"
    r = cli(main, ["coin", "--out", out, "--nuts-samples", 200, "--heads", 6, "--tosses", 9,
                   "--alpha", 2, "--beta", 2])
    assert r.code == 0, r.err
    assert "Traceback" not in r.err
    results = json.loads((out / "results.json").read_text())
    c = results["coin"]
    assert (c["n"], c["k"], c["alpha"], c["beta"]) == (9, 6, 2.0, 2.0)
    assert c["mle"] == pytest.approx(6 / 9, rel=F64_REL)
    assert c["map"] == pytest.approx(7 / 11, rel=F64_REL)
    assert c["seconds"] > 0
    md = (out / "appendix-coin.md").read_text()
    assert "6 heads in 9 tosses" in md and "MAP" in md and "NUTS" in md
    assert (out / "coin.png").read_bytes().startswith(PNG)

    r = cli(main, ["regression", "--out", out, "--nuts-samples", 200, "--rho", 0.9])
    assert r.code == 0, r.err
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"coin", "regression"}  # merged with the earlier run
    assert results["coin"] == c
    reg = results["regression"]
    X, y = correlated_data(rho=0.9, seed=0)
    assert rel(reg["mle"], torch.linalg.solve(X.T @ X, X.T @ y)) < F64_REL
    assert rel(reg["map"], torch.linalg.solve(X.T @ X + torch.eye(2, dtype=X.dtype),
                                              X.T @ y)) < F64_REL
    assert "correlation 0.9" in (out / "appendix-regression.md").read_text()
    assert (out / "regression.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("argv, fragments", [
    (["coin", "--heads", 11, "--tosses", 10], ["--heads", "11 of 10"]),
    (["coin", "--heads", -1], ["--heads"]),
    (["coin", "--tosses", 0, "--heads", 0], ["--tosses"]),
    (["coin", "--alpha", 0.5], ["--alpha"]),
    (["coin", "--beta", 0.9], ["--beta"]),
    (["regression", "--rho", 1], ["--rho", "1.0"]),
    (["regression", "--rho", -1.5], ["--rho"]),
    (["coin", "--nuts-samples", 5], ["--nuts-samples"]),
    (["posterior", "--images", 0], ["--images"]),
    (["dice"], ["invalid choice", "dice"]),
    ([], ["part"]),
])
def test_cli_bad_inputs_are_one_line_errors(cli, tmp_path, argv, fragments):
    out = tmp_path / "out"
    r = cli(main, [*argv, "--out", out])
    assert_one_line_error(r, PROG, *fragments)
    assert not out.exists()  # refused before anything was written


def test_cli_missing_out_is_a_one_line_error(cli):
    r = cli(main, ["coin"])
    assert_one_line_error(r, PROG, "--out")


def test_cli_out_that_is_a_file_is_a_one_line_error(cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli(main, ["coin", "--out", f, "--nuts-samples", 10])
    assert_one_line_error(r, PROG, "--out", str(f))


def fake_runner(part):
    def run(a, out):
        return {"part": part, "alpha": a.alpha}, f"## {part}\n"
    return run


def test_cli_merges_results_into_its_own_directory_only(cli, tmp_path, monkeypatch):
    """results.json keeps other parts' entries (runners faked); a directory that is not an
    appendix's (other files, a results.json not of its parts, one unreadable) is refused in
    one line and left as it was, unless --overwrite; its other programs' files stay."""
    monkeypatch.setitem(appendix_cli.RUNNERS, "coin", fake_runner("coin"))
    monkeypatch.setitem(appendix_cli.RUNNERS, "regression", fake_runner("regression"))
    out = tmp_path / "out"
    assert cli(main, ["coin", "--out", out]).code == 0
    assert json.loads((out / "results.json").read_text())["coin"]["part"] == "coin"
    assert cli(main, ["regression", "--out", out]).code == 0
    assert cli(main, ["coin", "--out", out, "--alpha", 3]).code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"coin", "regression"}
    assert results["coin"]["alpha"] == 3.0  # the newer run replaced the older
    assert (out / "appendix-coin.md").read_text() == "## coin\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for name, text in (("results.json", "{not json"), ("results.json", "[1, 2]"),
                       ("results.json", '{"test_elbo": -90}'), ("notes.txt", "mine")):
        theirs = tmp_path / f"theirs-{len(text)}"
        theirs.mkdir()
        (theirs / name).write_text(text)
        (theirs / "build").mkdir()
        (theirs / "build" / ".model.bin.k3j9x0ab.tmp").write_text("a live writer's")
        before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
        r = cli(main, ["coin", "--out", theirs])
        assert_one_line_error(r, PROG, "already holds files", "--overwrite")
        assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    r = cli(main, ["coin", "--out", theirs, "--overwrite"])
    assert r.code == 0, r.err
    assert sorted(p.name for p in theirs.iterdir()) == ["appendix-coin.md", "results.json"]


def test_cli_posterior_on_a_trained_run(cli, tmp_path, trained_run):
    out = tmp_path / "post"
    r = cli(main, ["posterior", "--out", out, "--run", trained_run.out, "--images", 3,
                   "--iwae-samples", 200])
    assert r.code == 0, r.err
    results = json.loads((out / "results.json").read_text())["posterior"]["runs"]
    [entry] = results.values()
    assert entry["images"] == 3 and entry["iwae_samples"] == 200
    assert entry["z_dim"] == trained_run.config.model_options.z_dim
    assert entry["dataset"] == "digits"
    assert len(entry["per_image"]["psis_khat"]) == 3
    assert all(math.isfinite(entry[k]) for k in ("log_px_iwae", "elbo_optimal_normal",
                                                 "elbo_amortized"))
    assert (out / "gaps.png").read_bytes().startswith(PNG)
    assert "amortization gap" in (out / "appendix-posterior.md").read_text()


def test_cli_posterior_keeps_runs_with_the_same_basename(cli, tmp_path, trained_run):
    for parent in ("a", "b"):
        shutil.copytree(trained_run.out, tmp_path / parent / "run")
    out = tmp_path / "post"
    r = cli(main, ["posterior", "--out", out, "--run", tmp_path / "a" / "run",
                   "--run", tmp_path / "b" / "run", "--images", 1, "--iwae-samples", 10])
    if r.code == 2:  # refusing the ambiguity is fine too
        assert_one_line_error(r, PROG, "--run")
        return
    assert r.code == 0, r.err
    results = json.loads((out / "results.json").read_text())["posterior"]["runs"]
    runs = {v["run"] for v in results.values()}
    assert runs == {str((tmp_path / p / "run").resolve()) for p in ("a", "b")}


# -- the flow guide's gaps -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "run"
    config = TrainConfig(model="flow-vae", dataset="digits",
                         model_options=dict(hidden=(64,), z_dim=4, flow="iaf"),
                         epochs=3, seed=0, out=str(out), batch_size=64, lr=3e-3)
    return train_run(config, progress=False)


def test_local_flow_guide_fits_base_and_context_with_the_flow_fixed(flow_run, trained_run):
    from ppl_vae.appendix.amortization import LocalGuide

    vae, x = flow_run.module, flow_run.data.test.x[:5]
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    local = optimize_local(vae, x, steps=50)
    assert local.family == "flow"
    assert local.loc.shape == local.log_scale.shape == (5, vae.z_dim)
    assert local.context.shape == (5, vae.encoder[-1].in_features)
    _, _, h = vae.encode_context(x)
    assert not torch.allclose(local.context, h)  # the context moved
    for k, v in vae.state_dict().items():  # the flow (and the rest) stayed fixed
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in vae.parameters())
    normal = LocalGuide(vae, x, "normal")
    assert normal.context is None and normal.family == "normal"
    with pytest.raises(ValueError, match="flow"):
        LocalGuide(trained_run.module, x, "flow")
    # q*'s own trace is the flow's pushforward of its base, scored exactly
    rows = torch.arange(len(x))
    with torch.no_grad(), pyro.validation_enabled(False):
        t = poutine.trace(local.guide).get_trace(x, rows)
        t.compute_log_prob()
        q = vae.posterior(local.loc, local.log_scale.exp(), local.context)
        torch.testing.assert_close(t.nodes["z"]["log_prob"],
                                   q.log_prob(t.nodes["z"]["value"].clone()),
                                   rtol=1e-4, atol=1e-4)


def test_gaps_of_a_flow_guide(flow_run, sem):
    vae, x = flow_run.module, flow_run.data.test.x[:8]
    g = gaps(vae, x, iwae_samples=1000, elbo_samples=500, steps=200, psis_particles=300)
    assert g["guide"] == "iaf-2" and "context h" in g["q_star"]
    per = {k: torch.tensor(v, dtype=torch.float64) for k, v in g["per_image"].items()}
    assert set(per) == {"log_px_iwae", "elbo_optimal", "elbo_optimal_normal",
                        "elbo_amortized", "psis_khat"}
    for v in per.values():
        assert v.shape == (8,) and torch.isfinite(v).all()
    lp, best, amort = per["log_px_iwae"], per["elbo_optimal"], per["elbo_amortized"]
    assert g["approximation_gap"] == pytest.approx((lp - best).mean().item(), abs=1e-4)
    assert g["amortization_gap"] == pytest.approx((best - amort).mean().item(), abs=1e-4)
    assert (lp - best).mean() > -4 * sem(lp - best)
    assert (best - amort).mean() > -4 * sem(best - amort)
    normal = per["elbo_optimal_normal"]
    assert g["elbo_optimal_normal"] == pytest.approx(normal.mean().item(), rel=1e-6)
    assert not torch.equal(normal, best)  # a separate fit: the best diagonal Normal
    assert (lp - normal).mean() > -4 * sem(lp - normal)


def test_gaps_figure_has_one_colour_per_guide(tmp_path):
    from matplotlib.colors import to_rgba

    from ppl_vae.appendix.amortization import gaps_figure, guide_colour

    results = {"a": {"guide": "normal", "approximation_gap": 2.0, "amortization_gap": 4.0},
               "b": {"guide": "iaf-2", "approximation_gap": 1.0, "amortization_gap": 3.0},
               "c": {"guide": "iaf-4", "approximation_gap": 0.5, "amortization_gap": 3.5},
               "d": {"approximation_gap": 1.5, "amortization_gap": 2.5}}  # no guide: Normal
    fig = gaps_figure(results, tmp_path / "gaps.png")
    assert (tmp_path / "gaps.png").read_bytes().startswith(PNG)
    bars = fig.axes[0].patches
    assert len(bars) == 8  # approximation gaps, then amortization gaps stacked on them
    want = [guide_colour(g) for g in ("normal", "iaf", "iaf", "normal")]
    assert guide_colour("iaf-2") == guide_colour("iaf-4") != guide_colour("normal")
    for i, colour in enumerate(want):
        for bar in (bars[i], bars[i + 4]):
            assert bar.get_facecolor()[:3] == pytest.approx(to_rgba(colour)[:3])
        assert bars[i + 4].get_y() == pytest.approx(bars[i].get_height())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:2] == ["guide: normal", "guide: iaf-2"]


def test_cli_posterior_table_has_the_flow_guide(cli, tmp_path, trained_run, flow_run):
    out = tmp_path / "post"
    r = cli(main, ["posterior", "--out", out, "--run", trained_run.out, "--run", flow_run.out,
                   "--images", 2, "--iwae-samples", 100])
    assert r.code == 0, r.err
    runs = json.loads((out / "results.json").read_text())["posterior"]["runs"]
    guides = {v["guide"] for v in runs.values()}
    assert guides == {"normal", "iaf-2"}
    for v in runs.values():
        if v["guide"] == "normal":
            assert v["elbo_optimal"] == v["elbo_optimal_normal"]
    md = (out / "appendix-posterior.md").read_text()
    assert "| iaf-2 |" in md and "q* (iaf)" in md and "q* (normal)" in md
    assert (out / "gaps.png").read_bytes().startswith(PNG)
