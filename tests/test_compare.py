"""python -m ppl_vae compare: estimator statistics that theory pins down, and its outputs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pyro
import pytest
import torch
from helpers import assert_one_line_error

from ppl_vae import VAE
from ppl_vae.cli import compare_main
from ppl_vae.config import TrainConfig
from ppl_vae.errors import UsageError
from ppl_vae.evaluation.comparison import (
    agreement,
    bound_estimates,
    gradient_stats,
    snr_slopes,
    training_race,
)
from ppl_vae.run.session import Session

PROG = "python -m ppl_vae compare: error: "
NET = ["--dataset", "digits", "--hidden", "32", "--z-dim", "2", "--eval-particles", "3"]


@pytest.fixture
def vae_and_batch(digits):
    torch.manual_seed(0)
    return VAE(64, z_dim=3, hidden=(32,)), (digits.test.x[:64],)


def test_mc_and_analytic_agree_in_mean(vae_and_batch):
    vae, args = vae_and_batch
    bounds = bound_estimates(vae, args, repeats=300, particles=(1, 5), iwae_samples=(1,))
    checks = agreement(bounds)
    assert [a["particles"] for a in checks] == [1, 5]
    assert all(a["agree"] for a in checks), checks
    # the check can fail: shift one mean by 10 standard errors
    shifted = [dict(r, mean=r["mean"] + 10 * r["se"]) if r["estimator"] == "mc" else r
               for r in bounds]
    assert not any(a["agree"] for a in agreement(shifted))


def test_iwae_bound_rises_with_k(vae_and_batch):
    vae, args = vae_and_batch
    bounds = bound_estimates(vae, args, repeats=100, particles=(1,), iwae_samples=(1, 10, 100))
    iwae = [r for r in bounds if r["estimator"] == "iwae"]
    for lo, hi in zip(iwae, iwae[1:], strict=False):
        assert hi["mean"] > lo["mean"] - 4 * math.hypot(lo["se"], hi["se"]), (lo, hi)
    assert iwae[-1]["mean"] > iwae[0]["mean"] + 4 * math.hypot(iwae[0]["se"], iwae[-1]["se"])


def test_analytic_kl_removes_encoder_gradient_noise_when_the_decoder_ignores_z(vae_and_batch):
    """With a decoder whose output does not depend on z, the encoder's gradient comes from
    the KL term alone: exact (zero variance) under the analytic estimator, noisy under mc."""
    vae, args = vae_and_batch
    with torch.no_grad():
        vae.decoder[0].weight.zero_()
    rows = gradient_stats(vae, args, repeats=30, particles=(1,))
    enc = {r["estimator"]: r for r in rows if r["group"] == "encoder"}
    assert enc["mc"]["total_variance"] > 0
    assert enc["analytic"]["total_variance"] <= 1e-10 * enc["mc"]["total_variance"]
    assert enc["analytic"]["snr"] is None or enc["analytic"]["snr"] > 1e3  # None: exact


def test_gradient_groups_default_to_the_child_modules(digits):
    """The default groups: each top-level child module, plus "(module)" for the module's own
    parameters (a learned sigma); ``groups`` replaces them."""
    args = (digits.test.x[:16],)
    learned = VAE(64, z_dim=2, hidden=(16,), likelihood="gaussian", learn_scale=True)
    rows = gradient_stats(learned, args, repeats=3, particles=(1,))
    assert {r["group"] for r in rows} == {"encoder", "decoder", "(module)"}
    own = [r for r in rows if r["group"] == "(module)"]
    assert all(r["mean_norm"] > 0 for r in own)  # sigma's gradient, one coordinate

    vae = VAE(64, z_dim=2, hidden=(16,))
    rows = gradient_stats(vae, args, repeats=3, particles=(1,),
                          groups={"everything": list(vae.parameters())})
    assert {r["group"] for r in rows} == {"everything"}


def race_session(digits, **config) -> Session:
    return Session(TrainConfig(dataset="digits", **config), digits, progress=False)


def test_race_gives_every_racer_the_same_batches(digits):
    """Two racers with the same estimator trace the same curve: same start, same batches."""
    session = race_session(digits, epochs=2, batch_size=64, eval_particles=3,
                           model_options={"z_dim": 3, "hidden": (32,)})
    rows, summary = training_race(session, [("mc", 1), ("mc", 1)], None)
    assert len(rows) == 4 and len(summary) == 1  # the duplicate racer shares a key
    first, second = rows[:2], rows[2:]
    assert [r["test_elbo"] for r in first] == [r["test_elbo"] for r in second]
    assert summary[0]["epochs_to_target"] == 2


def test_each_racer_follows_the_family_s_schedule(digits, monkeypatch):
    """The race trains through the contract: each racer's on_epoch runs before its first
    epoch (0) and after each, with the session's context."""
    calls = []
    monkeypatch.setattr(VAE, "on_epoch", lambda self, ctx, epoch: calls.append(
        (self, ctx, epoch)))
    session = race_session(digits, epochs=2, batch_size=256, eval_particles=2,
                           model_options={"z_dim": 2, "hidden": (16,)})
    training_race(session, [("mc", 1), ("analytic", 1)], None)
    assert [(c, e) for _, c, e in calls] == [(session.ctx, e) for e in (0, 1, 2)] * 2
    racers = [m for m, _, _ in calls]  # two copies, each trained by its own hook calls
    assert racers[0] is racers[1] is racers[2] and racers[3] is racers[5]
    assert racers[0] is not racers[3] and all(m is not session.module for m in racers)


def test_compare_end_to_end(tmp_path, cli):
    out = tmp_path / "cmp"
    result = cli(compare_main, [*NET, "--epochs", "2", "--repeats", "10", "--particles", "1",
                                "3", "--iwae-samples", "1", "5", "--eval-batch", "32",
                                "--warmup-epochs", "1", "--out", out])
    assert result.code == 0, result.err
    for name in ("results.json", "bounds.csv", "gradients.csv", "variance_ratios.csv",
                 "race.csv", "race_summary.csv", "summary.md", "bounds.png", "gradients.png",
                 "race.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    # by default every estimator that fits a Normal guide: the weighers at K >= 2 only
    assert results["meta"]["estimators"] == ["mc", "analytic", "stl", "iwae", "iwae-dreg",
                                             "rws"]
    keys = {(r["estimator"], r["particles"]) for r in results["bounds"]}
    assert keys == {("mc", 1), ("mc", 3), ("analytic", 1), ("analytic", 3), ("stl", 1),
                    ("stl", 3), ("iwae-dreg", 3), ("rws", 3), ("iwae", 1), ("iwae", 5)}
    assert {r["group"] for r in results["gradients"]} == {"encoder", "decoder"}
    assert {(r["estimator"], r["particles"]) for r in results["race_summary"]} == {
        ("mc", 1), ("analytic", 1), ("stl", 1), ("iwae-dreg", 3), ("rws", 3), ("iwae", 3)}
    assert "## Training race" in result.out


def test_compare_a_cvae(tmp_path, cli):
    out = tmp_path / "cmp"
    result = cli(compare_main, [*NET, "--model", "cvae", "--quadrants", "1", "--repeats", "5",
                                "--particles", "1", "--iwae-samples", "2", "--eval-batch", "16",
                                "--no-race", "--out", out])
    assert result.code == 0, result.err
    groups = {r["group"] for r in json.loads((out / "results.json").read_text())["gradients"]}
    assert groups == {"prior_net", "recognition_net", "generation_net"}  # baseline is fixed
    assert not (out / "race.png").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--repeats", "1"], "--repeats"),
    (["--particles", "0"], "--particles"),
    (["--iwae-samples", "0"], "--iwae-samples"),
    (["--target", "nan"], "--target"),
    (["--run", "no/such/run"], "config.json"),
])
def test_bad_compare_options(tmp_path, cli, argv, fragment):
    result = cli(compare_main, [*NET, *argv, "--out", tmp_path / "cmp"])
    assert_one_line_error(result, PROG, fragment)


def test_warmup_epochs_need_a_fresh_model(trained_run, tmp_path, cli):
    result = cli(compare_main, [*NET, "--run", trained_run.out, "--warmup-epochs", "1",
                                "--out", tmp_path / "cmp"])
    assert_one_line_error(result, PROG, "--warmup-epochs trains a fresh model", "--run")
    assert not (tmp_path / "cmp").exists()


def test_warmup_pretrains_a_cvae(tmp_path, cli):
    """A CVAE warm-up runs its ``pretrain`` hook (the baseline NN) before the SVI epochs."""
    out = tmp_path / "cmp"
    result = cli(compare_main, [*NET, "--model", "cvae", "--quadrants", "1", "--repeats", "3",
                                "--particles", "1", "--iwae-samples", "2", "--eval-batch", "16",
                                "--epochs", "1", "--warmup-epochs", "1", "--no-race",
                                "--out", out])
    assert result.code == 0, result.err
    baseline = (out / "baseline_metrics.csv").read_text().splitlines()
    assert len(baseline) == 2 and baseline[0].startswith("epoch,train_nll,test_nll")
    assert json.loads((out / "results.json").read_text())["meta"]["warmup_epochs"] == 1


def test_package_compare_stays_the_function():
    import ppl_vae
    import ppl_vae.compare  # noqa: F401  (the file python -m ppl_vae.compare runs)
    import ppl_vae.evaluation.comparison

    assert ppl_vae.compare is ppl_vae.evaluation.comparison.compare


def test_snr_slopes_fit_a_power_law_exactly():
    rows = [{"estimator": e, "group": g, "particles": k, "snr": c * k ** a}
            for e, g, c, a in (("iwae", "encoder", 3.0, -0.5), ("iwae", "decoder", 0.2, 0.5),
                               ("iwae-dreg", "encoder", 1.5, 0.1))
            for k in (1, 3, 10, 30)]
    rows.append({"estimator": "iwae", "group": "encoder", "particles": 100, "snr": None})
    fits = {(r["estimator"], r["group"]): r for r in snr_slopes(rows)}
    assert fits[("iwae", "encoder")]["slope"] == pytest.approx(-0.5, abs=1e-12)
    assert fits[("iwae", "decoder")]["slope"] == pytest.approx(0.5, abs=1e-12)
    assert fits[("iwae-dreg", "encoder")]["intercept"] == pytest.approx(math.log(1.5))
    assert fits[("iwae", "encoder")]["points"] == 4  # an exact gradient (no SNR) left out


def test_compare_measures_snr_against_k(tmp_path, cli):
    out = tmp_path / "cmp"
    result = cli(compare_main, [*NET, "--repeats", "12", "--particles", "1", "--iwae-samples",
                                "2", "--eval-batch", "32", "--no-race", "--snr-k", "1", "4",
                                "16", "--out", out])
    assert result.code == 0, result.err
    results = json.loads((out / "results.json").read_text())
    assert {(r["estimator"], r["particles"]) for r in results["snr"]} == {
        (e, k) for e in ("iwae", "iwae-dreg") for k in (1, 4, 16)}
    assert {(r["estimator"], r["group"]) for r in results["snr_slopes"]} == {
        (e, g) for e in ("iwae", "iwae-dreg") for g in ("encoder", "decoder")}
    assert (out / "snr.png").read_bytes().startswith(b"\x89PNG")
    assert "## Gradient SNR against K" in (out / "summary.md").read_text()
    bad = cli(compare_main, [*NET, "--snr-k", "4", "--out", tmp_path / "bad"])
    assert bad.code == 2 and "--snr-k takes two or more" in bad.err


def test_compare_any_estimators(tmp_path, cli):
    out = tmp_path / "cmp"
    result = cli(compare_main, [*NET, "--epochs", "1", "--repeats", "6", "--particles", "1", "3",
                                "--iwae-samples", "2", "--eval-batch", "16", "--estimators",
                                "mc", "stl", "iwae-dreg", "rws", "tracegraph", "--out", out])
    assert result.code == 0, result.err
    results = json.loads((out / "results.json").read_text())
    expected = {("mc", 1), ("mc", 3), ("stl", 1), ("stl", 3), ("iwae-dreg", 3), ("rws", 3),
                ("tracegraph", 1), ("tracegraph", 3)}
    assert {(r["estimator"], r["particles"]) for r in results["bounds"]} == expected | {
        ("iwae", 2)}
    assert {(r["estimator"], r["particles"]) for r in results["gradients"]} == expected
    assert {(r["estimator"], r["particles"]) for r in results["race_summary"]} == {
        ("mc", 1), ("stl", 1), ("tracegraph", 1), ("iwae-dreg", 3), ("rws", 3), ("iwae", 3)}
    bad = cli(compare_main, [*NET, "--estimators", "exact", "--out", tmp_path / "bad"])
    assert bad.code == 2 and "invalid choice: 'exact'" in bad.err
    for twice, said in ((["--estimators", "mc", "mc"], "['mc', 'mc']"),
                        (["--particles", "2", "2"], "[2, 2]")):
        bad = cli(compare_main, [*NET, *twice, "--out", tmp_path / "bad"])
        assert_one_line_error(bad, "python -m ppl_vae compare",
                              f"{twice[0]} lists each value once, got {said}")


def test_suited_estimators_follow_the_program(digits):
    """Which --elbo names fit is read off the program: reparameterized or not, closed-form KL,
    enumeration, vectorizable particles, several programs; a family's refusals come off."""
    from plugin_models import EnumMixtureVAE, PyroExampleCVAE

    from ppl_vae import SSVAE, FlowVAE
    from ppl_vae.inference.estimators import suited
    from ppl_vae.inference.program import inspect_program

    x = digits.test.x[:4]
    vae = VAE(64, z_dim=2, hidden=(16,))
    assert suited(inspect_program(vae.model, vae.guide, x)) == (
        "mc", "analytic", "stl", "iwae", "iwae-dreg", "rws")
    flow = FlowVAE(64, z_dim=2, hidden=(16,), flow="iaf")  # no closed-form KL: no analytic
    assert suited(inspect_program(flow.model, flow.guide, x)) == (
        "mc", "stl", "iwae", "iwae-dreg", "rws")
    mix = EnumMixtureVAE(64)  # a discrete y, enumerated
    assert suited(inspect_program(mix.model, mix.guide, x)) == (
        "mc", "iwae", "rws", "enum", "tracegraph")
    m2 = SSVAE(64, 10, hidden=(16,), z_dim=2, m1=0)
    labels = torch.tensor([0, -1, 3, -1])
    infos = [inspect_program(m, g, x, labels) for _, m, g in m2.programs()]
    union = {f: frozenset().union(*(getattr(i, f) for i in infos))
             for f in ("score_sites", "enumerated", "closed_kl")}
    info = replace(infos[0], **union)
    refused = [name for name, (kind, _) in m2.estimators.items() if kind == "refuse"]
    assert suited(info, refused, programs=3) == ("mc", "rws", "enum", "tracegraph")
    # Pyro's CVAE indexes by a mask: no samples dimension, so no weighers
    pyro_cvae = PyroExampleCVAE.from_options({"z_dim": 2, "hidden_1": 16, "hidden_2": 16}, None)
    info = inspect_program(pyro_cvae.model, pyro_cvae.guide,
                           *pyro_cvae.data_args(torch.rand(4, 784).round(), None))
    assert not info.vectorized and suited(info) == ("mc", "analytic", "stl", "iwae")


def test_a_latent_only_the_model_samples_refuses_analytic_and_tracegraph(digits):
    """A latent site the guide does not sample (drawn from its prior in the model, or summed
    out there) has no guide site for TraceMeanField_ELBO's pairing, nor, without rsample,
    for TraceGraph_ELBO's score-function term: refused in one line (Pyro raises a KeyError);
    a reparameterized one trains with tracegraph, and the other estimators train."""
    from plugin_models import EnumMixtureVAE

    from ppl_vae.inference.estimators import unsuited
    from ppl_vae.inference.program import inspect_program

    class PriorMixture(EnumMixtureVAE):  # y ~ Categorical in the model only, not enumerated
        def guide(self, x):
            pyro.module("mixture_vae", self)
            with pyro.plate("data", x.shape[0]):
                loc, log_scale = self.encode(self._cat(x, x.new_zeros(self.k))).chunk(2, -1)
                pyro.sample("z", pyro.distributions.Normal(loc, log_scale.exp()).to_event(1))

    class PriorOffset(VAE):  # a Normal offset drawn in the model only
        def model(self, x):
            pyro.sample("offset", pyro.distributions.Normal(0.0, 1.0))
            super().model(x)

    x = digits.test.x[:4]
    info = inspect_program(PriorMixture(64).model, PriorMixture(64).guide, x)
    assert info.model_only == info.model_only_score == {"y"} and not info.enumerated
    assert unsuited("analytic", info) == ("the model samples y, which the guide does not, and "
                                          "analytic pairs every latent site of the model with "
                                          "the guide's")
    assert unsuited("tracegraph", info) == ("the model samples y (not reparameterized), which "
                                            "the guide does not, and tracegraph needs the "
                                            "guide's site for a score-function term")
    assert all(unsuited(e, info) is None for e in ("mc", "stl", "iwae", "iwae-dreg", "rws"))
    with pytest.raises(UsageError, match=r"elbo analytic: the model samples y, .*; use elbo "
                                         r"mc, stl, iwae, iwae-dreg or rws$"):
        Session(TrainConfig(model=PriorMixture, elbo="analytic"), digits, progress=False).step()
    vae = PriorOffset(64, z_dim=2, hidden=(16,))
    info = inspect_program(vae.model, vae.guide, x)
    assert info.model_only == {"offset"} and not info.model_only_score
    assert unsuited("analytic", info) is not None and unsuited("tracegraph", info) is None
    session = Session(TrainConfig(model=PriorOffset, elbo="tracegraph",
                                  model_options={"z_dim": 2, "hidden": (16,)}), digits,
                      progress=False)
    step = session.step()
    step(0, session.args(session.data.train, slice(0, 8)), torch.zeros(()), torch.zeros(()))
    assert all(torch.isfinite(p).all() for p in session.module.parameters())


def test_compare_m2_sums_out_y_with_less_gradient_noise(tmp_path, cli):
    """M2 on its training rows (unlabelled ones among them): by default mc, rws, enum and
    tracegraph; enum's exact sum over y leaves the classifier's gradient far less noisy than
    mc's score function; the estimators M2 refuses are refused in one line."""
    out = tmp_path / "cmp"
    argv = ["--dataset", "digits", "--model", "ssvae", "--labelled", "50", "--hidden", "32",
            "--z-dim", "2", "--repeats", "20", "--particles", "1", "--iwae-samples", "2",
            "--eval-batch", "64", "--split", "train", "--no-race"]
    result = cli(compare_main, [*argv, "--out", out])
    assert result.code == 0, result.err
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["estimators"] == ["mc", "rws", "enum", "tracegraph"]
    var = {r["estimator"]: r["total_variance"] for r in results["gradients"]
           if r["group"] == "classifier"}
    assert set(var) == {"mc", "enum", "tracegraph"}  # rws weighs K >= 2 only
    assert var["enum"] < var["mc"] / 10
    bad = cli(compare_main, [*argv, "--estimators", "stl", "--out", tmp_path / "bad"])
    assert_one_line_error(bad, PROG, "--estimators stl: the class y of unlabelled rows has no "
                               "reparameterized draw")


def test_compare_a_flow_guide(tmp_path, cli):
    """A flow guide has no closed-form KL: no analytic, the path estimators all run."""
    out = tmp_path / "cmp"
    result = cli(compare_main, [*NET, "--model", "flow-vae", "--flow", "iaf", "--repeats", "4",
                                "--particles", "1", "2", "--iwae-samples", "2", "--eval-batch",
                                "16", "--no-race", "--out", out])
    assert result.code == 0, result.err
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["estimators"] == ["mc", "stl", "iwae", "iwae-dreg", "rws"]
    assert {(r["estimator"], r["particles"]) for r in results["gradients"]} == {
        ("mc", 1), ("mc", 2), ("stl", 1), ("stl", 2), ("iwae", 1), ("iwae", 2),
        ("iwae-dreg", 2), ("rws", 2)}
    assert all(math.isfinite(r["mean"]) for r in results["bounds"])
