"""The convolutional VAE (--model conv-vae): networks sized from the image, the program's
trace on float and 8-bit rows, the discretized logistic by hand, bits per dimension, colour
figures, and training end to end with every estimator, evaluate and compare."""

from __future__ import annotations

import dataclasses
import math

import matplotlib.image
import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from ppl_vae import TrainConfig, UsageError, plots, train_run
from ppl_vae.data import Dataset, Split, load_dataset, pixels
from ppl_vae.evaluation.runs import evaluate_run
from ppl_vae.inference.importance import score
from ppl_vae.models import MODELS, RunContext, make_options, options_class
from ppl_vae.models.conv_vae import ConvVAE, ConvVAEOptions, conv_sides
from ppl_vae.models.likelihoods import (
    GAUSSIAN_OFFSET,
    LIKELIHOODS,
    DiscretizedLogistic,
    bits_per_dim,
    check_range,
)
from ppl_vae.models.vae import VAEOptions

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]
TINY = dict(z_dim=3, channels=(4, 8))
B, Z = 3, 3
H = 0.5 / 255  # half a bin


def rows(shape, n=B, uint8=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    if uint8:
        return torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8)
    return torch.rand(n, d, generator=g)


def traces(vae, x, particles=None):
    plate = pyro.plate("particles", particles, dim=-2) if particles else None
    with plate or poutine.block(hide=[]):
        g = poutine.trace(vae.guide).get_trace(x)
        m = poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(x)
    g.compute_log_prob()
    m.compute_log_prob()
    return g, m


# -- networks sized from the image -------------------------------------------------------------
@pytest.mark.parametrize(("shape", "sides"), [
    ((1, 8, 8), [(8, 8), (4, 4)]),
    ((1, 28, 28), [(28, 28), (14, 14), (7, 7)]),
    ((3, 32, 32), [(32, 32), (16, 16), (8, 8), (4, 4)]),
    ((3, 64, 64), [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]),
    ((1, 5, 5), [(5, 5)]),  # too small to halve: linear networks
    ((2, 13, 31), [(13, 31), (6, 15)]),  # odd and unequal sides
])
def test_networks_are_sized_from_the_image(shape, sides):
    assert conv_sides(*shape[1:]) == sides
    for likelihood, out_c in (("bernoulli", shape[0]), ("logistic", 2 * shape[0])):
        vae = ConvVAE(shape, likelihood=likelihood, **TINY)
        convs = [m for m in vae.encoder if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == len(sides) - 1
        assert [c.out_channels for c in convs] == [4, 8, 8, 8][:len(convs)]  # last repeats
        z = torch.randn(2, Z)
        assert vae.decoder(z).shape == (2, out_c, *shape[1:])  # exactly the image, no crop
        h = vae.encoder(torch.rand(2, *shape))
        assert h.shape == (2, 2 * Z)


# -- the program ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "logistic"])
def test_trace_structure(shape, likelihood):
    vae = ConvVAE(shape, likelihood=likelihood, **TINY)
    d = math.prod(shape)
    x = rows(shape)
    g, m = traces(vae, x)
    obs, z = m.nodes["x"], m.nodes["z"]
    assert obs["is_observed"] and not z["is_observed"]
    assert obs["value"].dtype == torch.float32
    assert torch.equal(obs["value"], x.float() / 255)  # 8-bit rows become pixels per batch
    for site in (obs, z, g.nodes["z"]):
        [frame] = site["cond_indep_stack"]
        assert (frame.name, frame.size, frame.dim) == ("data", B, -1)
        assert site["fn"].batch_shape == (B,)
        assert site["log_prob"].shape == (B,)
        assert torch.isfinite(site["log_prob"]).all()
    assert obs["fn"].event_shape == (d,) and z["fn"].event_shape == (Z,)
    assert g.nodes["z"]["fn"].has_rsample
    # float rows give the same program as their 8-bit levels
    _, m2 = traces(vae, pixels(x), particles=None)
    assert torch.equal(m2.nodes["x"]["value"], obs["value"])
    assert vae.data_args(x, None)[0] is x  # uint8 passes through data_args


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
def test_vectorized_particles_broadcast(shape, likelihood):
    """In a particle plate at dim -2 (how the ELBOs vectorize), z is (K, B, d) and the
    decoder folds K into its batch and back: each particle's log p equals its own pass."""
    vae = ConvVAE(shape, likelihood=likelihood, **TINY)
    x, k = rows(shape), 4
    g, m = traces(vae, x, particles=k)
    zs = g.nodes["z"]["value"]
    assert zs.shape == (k, B, Z)
    for t, name in ((g, "z"), (m, "z"), (m, "x")):
        assert t.nodes[name]["log_prob"].shape == (k, B)
    one = vae.likelihood_dist(zs[2]).log_prob(pixels(x))
    torch.testing.assert_close(m.nodes["x"]["log_prob"][2], one, rtol=1e-5, atol=1e-3)


# -- the discretized logistic by hand (float64) -------------------------------------------------
def logistic(loc, s, x):
    loc, s, x = (torch.as_tensor(v, dtype=torch.float64) for v in (loc, s, x))
    return DiscretizedLogistic(loc, s.log())


LEVELS = torch.arange(256, dtype=torch.float64) / 255


def test_logistic_at_a_bin_centre():
    """loc on level k: P = sigma(h/s) - sigma(-h/s) = tanh(h / 2s); the s with
    tanh(h / 2s) = 1/2 gives exactly one bit per subpixel."""
    for s in (0.001, 0.01, 0.3):
        want = math.log(math.tanh(H / (2 * s)))
        got = logistic(100 / 255, s, 0).log_prob(torch.tensor(100 / 255, dtype=torch.float64))
        assert got.item() == pytest.approx(want, rel=1e-12)
    s = H / (2 * math.atanh(0.5))
    x = LEVELS[1:255:10]  # 26 interior levels, each its own loc
    lp = logistic(x, s, 0).log_prob(x)
    torch.testing.assert_close(lp, torch.full_like(lp, -math.log(2)), rtol=1e-12, atol=0)
    assert bits_per_dim(lp.sum().item(), len(x)) == pytest.approx(1.0, rel=1e-12)


def test_logistic_edge_bins_take_the_tails():
    loc, s = 0.3, 0.05
    d = logistic(loc, s, 0)
    sig = torch.sigmoid
    p0 = sig(torch.tensor((H - loc) / s, dtype=torch.float64))
    p1 = sig(torch.tensor(-(1 - H - loc) / s, dtype=torch.float64))  # 1 - sigma(b), exactly
    assert d.log_prob(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(
        p0.log().item(), rel=1e-12)
    assert d.log_prob(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(
        p1.log().item(), rel=1e-12)


def test_logistic_far_from_loc_is_finite_and_exact():
    """Far in the tail sigma(a) - sigma(b) rounds to 0 (log = -inf) even in float64; the
    softplus form stays exact. Reference: mpmath at 50 digits."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for loc, s, x in ((0.0, 0.01, 200 / 255), (1.0, 0.01, 3 / 255), (0.5, 0.001, 254 / 255),
                      (2.0, 0.02, 1.0), (-1.0, 0.02, 0.0)):
        def cdf(v, loc=loc, s=s):  # P(y < v)
            return 1 / (1 + mpmath.exp(-(v - loc) / s))

        def sf(v, loc=loc, s=s):  # P(y > v), exact where cdf(v) rounds to 1
            return 1 / (1 + mpmath.exp((v - loc) / s))

        xm = mpmath.mpf(round(x * 255)) / 255
        hm = mpmath.mpf(1) / 510
        if x == 0:
            want = mpmath.log(cdf(hm))
        elif x == 1:
            want = mpmath.log(sf(1 - hm))
        elif x > loc:
            want = mpmath.log(sf(xm - hm) - sf(xm + hm))
        else:
            want = mpmath.log(cdf(xm + hm) - cdf(xm - hm))
        for dtype, rel in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            d = DiscretizedLogistic(torch.tensor(loc, dtype=dtype),
                                    torch.tensor(math.log(s), dtype=dtype))
            got = d.log_prob(torch.tensor(x, dtype=dtype)).item()
            assert math.isfinite(got)
            assert got == pytest.approx(float(want), rel=rel), (loc, s, x, dtype)
    naive = torch.sigmoid(torch.tensor(78.6)) - torch.sigmoid(torch.tensor(78.4))
    assert naive.log().item() == -math.inf  # what the difference form would give


@pytest.mark.parametrize(("loc", "s"), [(0.5, 0.1), (0.0, 0.01), (1.3, 0.2), (-0.2, 3.0),
                                        (0.7, 4e-4), (0.42, 1e-5)])
def test_logistic_probabilities_sum_to_one(loc, s):
    """Over the 256 levels: 1 within 1e-12 in float64 (1e-5 asked; a sum of 256 terms
    rounds at ~1e-14) and 1e-5 in float32; the mean is sum k/255 P(k)."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        d = DiscretizedLogistic(torch.tensor(loc, dtype=dtype),
                                torch.tensor(math.log(s), dtype=dtype))
        p = d.log_prob(LEVELS.to(dtype)).exp()
        assert abs(p.sum().item() - 1) < tol
        assert d.mean.item() == pytest.approx((p * LEVELS.to(dtype)).sum().item(), abs=tol)


def test_logistic_samples_are_levels_with_the_right_frequencies():
    d = DiscretizedLogistic(torch.tensor(0.5), torch.tensor(math.log(0.004)))
    x = d.sample((20000,))
    levels = (x * 255).round()
    assert torch.equal(levels / 255, x) and x.min() >= 0 and x.max() <= 1
    p = d.log_prob(LEVELS.float()).exp()
    counts = torch.bincount(levels.long(), minlength=256).float()
    # every level's count within 5 binomial standard deviations (+1 for tiny p)
    sd = (20000 * p * (1 - p)).sqrt()
    assert ((counts - 20000 * p).abs() <= 5 * sd + 1).all()


def test_logistic_to_event_mask_and_expand():
    loc = torch.rand(4, 6)
    d = DiscretizedLogistic(loc, torch.full((6,), -3.0))
    assert d.batch_shape == (4, 6) and d.event_shape == ()
    x = (torch.rand(4, 6) * 255).round() / 255
    full = d.to_event(1).log_prob(x)
    assert full.shape == (4,)
    torch.testing.assert_close(full, d.log_prob(x).sum(-1))
    keep = torch.tensor([True, False] * 3)
    masked = d.mask(keep).to_event(1).log_prob(x)
    torch.testing.assert_close(masked, d.log_prob(x)[:, keep].sum(-1))
    e = d.expand((5, 4, 6))
    assert e.log_prob(x).shape == (5, 4, 6)
    assert not d.has_rsample


def test_log_scale_is_floored():
    d = DiscretizedLogistic(torch.tensor(0.5), torch.tensor(-50.0))
    lp = d.log_prob(torch.tensor([0.5, 100 / 255, 0.0, 1.0]))
    assert torch.isfinite(lp).all()


# -- options, registry and data checks ----------------------------------------------------------
def test_registered_with_its_own_likelihoods():
    assert MODELS["conv-vae"] is ConvVAE
    specs = {f.name: f.metadata for f in dataclasses.fields(options_class(ConvVAE))}
    assert "logistic" in specs["likelihood"]["choices"]
    assert "image_shape" not in specs
    assert LIKELIHOODS == ("bernoulli", "gaussian")  # vae and cvae keep theirs
    with pytest.raises(UsageError, match="logistic"):
        VAEOptions(likelihood="logistic")
    with pytest.raises(UsageError, match="learn.scale"):
        ConvVAEOptions(likelihood="logistic", learn_scale=True)
    with pytest.raises(UsageError, match="channels"):
        ConvVAEOptions(channels=(8, 0))
    assert make_options(ConvVAE, {"channels": [8, 16]}).channels == (8, 16)


def dataset(x_train, x_test, shape, name="hand"):
    return Dataset(name, Split(x_train), Split(x_test), image_shape=shape)


def test_check_range_takes_uint8_as_pixels():
    shape = (3, 4, 4)
    eight = dataset(rows(shape, 8), rows(shape, 4), shape)
    for likelihood in ("bernoulli", "logistic", "gaussian"):
        check_range(eight, likelihood)  # 0..255 levels are pixels in [0, 1]
    wide = dataset(rows(shape, 8, uint8=False) * 3, rows(shape, 4, uint8=False), shape)
    for likelihood, name in (("bernoulli", "Bernoulli"), ("logistic", "discretized logistic")):
        with pytest.raises(UsageError, match=f"{name} likelihood needs"):
            check_range(wide, likelihood)
    check_range(wide, "gaussian")


def test_refuses_rows_without_an_image_shape():
    x = torch.rand(6, 10)
    with pytest.raises(UsageError, match="needs images"):
        ConvVAE.from_options(ConvVAEOptions(), dataset(x, x, None))


# -- bits per dimension -------------------------------------------------------------------------
def context(data, **config):
    """A run's context for the report's numbers (no figures)."""
    return RunContext(TrainConfig(model="conv-vae", **config), None, data, None, score=score,
                      figures=False)


@pytest.mark.parametrize("likelihood", ["logistic", "gaussian"])
def test_bits_per_dim_from_the_test_scores(likelihood):
    shape = (3, 8, 8)
    d = math.prod(shape)
    data = dataset(rows(shape, 8), rows(shape, 5, seed=1), shape)
    vae = ConvVAE(shape, likelihood=likelihood, **TINY)
    ctx = context(data, eval_particles=3, eval_iwae=4)
    got = vae.report(ctx)
    s = score(vae, data.test.x, num_samples=4, iwae=True)  # what the run's summary holds
    offset = GAUSSIAN_OFFSET if likelihood == "gaussian" else 0.0
    for key, bound in (("test_bpd_elbo", s.elbo), ("test_bpd_iwae", s.iwae)):
        want = (d * offset - bound.mean().item()) / (d * math.log(2))
        assert got[key] == pytest.approx(want, rel=1e-12)
    assert got["test_bpd_iwae"] <= got["test_bpd_elbo"]
    [note] = ctx.notes
    assert note.startswith(f"bits/dim {got['test_bpd_elbo']:.3f} (test ELBO), "
                           f"{got['test_bpd_iwae']:.3f} (IWAE), 4 samples per image")
    assert ("log2(255)" in note) == (likelihood == "gaussian")
    # a context that carries the run's scores is read, not scored again
    ctx = context(data, eval_particles=3)
    ctx.summary = {"test_elbo": -d * math.log(2) * 5.0}
    assert vae.report(ctx) == {"test_bpd_elbo": pytest.approx(5.0 + offset / math.log(2))}


def test_no_bits_per_dim_for_bernoulli_or_float_data():
    shape = (1, 8, 8)
    eight = dataset(rows(shape, 8), rows(shape, 5), shape)
    ctx = context(eight)
    assert ConvVAE(shape, **TINY).report(ctx) == {}
    assert "cross-entropy" in ctx.notes[0]
    floats = dataset(rows(shape, 8, uint8=False), rows(shape, 5, uint8=False), shape)
    ctx = context(floats)
    assert ConvVAE(shape, likelihood="logistic", **TINY).report(ctx) == {} and not ctx.notes


# -- image grids --------------------------------------------------------------------------------
def png(path):
    return matplotlib.image.imread(path)[..., :3]


def test_image_grid_in_colour_and_grey(tmp_path):
    g = torch.Generator().manual_seed(0)
    colour = torch.zeros(4, 3, 6, 6)
    colour[:, 0] = 1.0  # pure red
    colour[2:, :, :3] = torch.rand(2, 3, 3, 6, generator=g)
    plots.image_grid([colour.reshape(4, -1)], (3, 6, 6), tmp_path / "c.png", "samples")
    rgb = png(tmp_path / "c.png")
    r, gr, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert np.abs(r - gr).max() > 0.5
    assert ((r > 0.9) & (gr < 0.1) & (b < 0.1)).sum() > 50  # red pixels drawn red
    # 8-bit rows are levels: 255 is white
    plots.image_grid([torch.full((2, 3 * 36), 255, dtype=torch.uint8)], (3, 6, 6),
                     tmp_path / "w.png")
    assert png(tmp_path / "w.png")[..., 0].max() == 1.0
    grey = torch.rand(3, 36, generator=g)
    for shape in ((1, 6, 6), (6, 6)):  # the (H, W) of before still works
        plots.image_grid([grey, grey], shape, tmp_path / "g.png", "x", ["a", "b"])
        img = png(tmp_path / "g.png")
        assert np.abs(img[..., 0] - img[..., 1]).max() < 1e-6  # grey: R = G = B


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patches():
    return load_dataset("sample-patches")


@pytest.mark.parametrize(("elbo", "particles"), [("mc", 1), ("analytic", 2), ("iwae", 3)])
def test_trains_on_digits_with_every_estimator(tmp_path, digits, elbo, particles):
    run = train_run(TrainConfig(model="conv-vae", model_options=TINY, dataset="digits",
                                epochs=2, batch_size=128, lr=3e-3, eval_particles=2,
                                elbo=elbo, particles=particles, out=str(tmp_path / "r")),
                    data=digits, progress=False)
    s = run.summary
    assert math.isfinite(s["test_elbo"]) and s["epochs"] == 2
    assert "vectorized" in s["eval_method"]
    assert "test_bpd_elbo" not in s  # float pixels: no bits/dim
    assert run.history[-1]["test_elbo"] > run.history[0]["test_elbo"] - 5
    for name in ("reconstructions.png", "samples.png", "latent.png", "elbo_curves.png"):
        assert (run.out / name).is_file(), run.notes
    assert not [n for n in run.notes if "skipped" in n], run.notes


def test_logistic_on_8_bit_colour_patches(tmp_path, patches):
    """sample-patches stays uint8 (the split is not converted), trains, reports finite
    bits/dim equal to the summary's bounds, and draws colour figures; evaluate agrees."""
    config = TrainConfig(model="conv-vae", model_options={**TINY, "likelihood": "logistic"},
                         dataset="sample-patches", epochs=2, batch_size=128, lr=3e-3,
                         eval_particles=2, eval_iwae=4, out=str(tmp_path / "r"))
    run = train_run(config, data=patches, progress=False)
    assert run.data.train.x.dtype == torch.uint8
    s = run.summary
    d = 3 * 32 * 32
    assert 0 < s["test_bpd_iwae"] <= s["test_bpd_elbo"] < 16
    assert s["test_bpd_elbo"] == pytest.approx(-s["test_elbo"] / (d * math.log(2)), rel=1e-9)
    assert s["test_bpd_iwae"] == pytest.approx(
        -s["test_log_likelihood_iwae"] / (d * math.log(2)), rel=1e-9)
    assert any(n.startswith("bits/dim") for n in run.notes)
    for name in ("reconstructions.png", "samples.png"):
        rgb = png(run.out / name)
        spread = max(np.abs(rgb[..., i] - rgb[..., j]).max() for i, j in ((0, 1), (1, 2)))
        assert spread > 0.05, name  # three distinct channels: drawn in colour
    again = evaluate_run(run.out, eval_iwae=4)
    assert again["test_bpd_iwae"] == pytest.approx(s["test_bpd_iwae"], rel=1e-6)


def test_compare_runs_on_the_conv_vae(tmp_path, digits):
    from ppl_vae.evaluation.comparison import CompareConfig, compare

    config = TrainConfig(model="conv-vae", model_options=TINY, dataset="digits", epochs=1,
                         batch_size=128, eval_particles=2)
    result = compare(CompareConfig(train=config, particles=(1, 2), repeats=3, race=False,
                                   eval_batch=32, iwae_samples=(1, 4)),
                     tmp_path / "cmp")
    assert (result.out / "summary.md").is_file()


def test_command_line_prints_bits_per_dim(tmp_path, cli):
    from ppl_vae.cli import evaluate_main, train_main

    out = tmp_path / "run"
    got = cli(train_main, ["--model", "conv-vae", "--dataset", "sample-patches",
                           "--likelihood", "logistic", "--channels", "4", "8", "--z-dim", "3",
                           "--epochs", "1", "--eval-particles", "2", "--out", out])
    assert got.code == 0, got.err
    [line] = [x for x in got.out.splitlines() if x.startswith("bits/dim ")]
    assert line.endswith("(test ELBO), 2 samples per image: upper bounds on the discretized "
                         "logistic's exact bits/dim")
    got = cli(evaluate_main, ["--run", out])
    assert got.code == 0 and line in got.out.splitlines(), got.out
