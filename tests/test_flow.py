"""The flow posterior (``--model flow-vae --flow iaf|spline --flow-layers K``): q(z|x)'s log-density
against a change of variables done by hand (float64, 1e-10) and against a numerical Jacobian;
the IAF step by hand from its MADE; vectorized particles; ``--elbo analytic`` falling back to
the Monte Carlo KL (the same numbers as ``mc``) and saying so once; training and evaluating
end to end on digits."""

from __future__ import annotations

import dataclasses
import json

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from helpers import assert_one_line_error
from pyro import poutine

from ppl_vae import TrainConfig, UsageError, evaluate, load_run, log_weights, make_elbo, score
from ppl_vae.cli import evaluate_main, train_main
from ppl_vae.evaluation.comparison import parameter_groups
from ppl_vae.inference.program import inspect_program
from ppl_vae.models import VAE, FlowVAE, get_model, make_options, options_class
from ppl_vae.models.flow_vae import ANALYTIC_NOTE
from ppl_vae.run.train import train_run

D, Z, H = 12, 3, 16  # a small flow: 12 pixels, 3 latents, 16 hidden units (the context)
FLOWS = [("iaf", 1), ("iaf", 3), ("spline", 1), ("spline", 2)]


def flow_vae(kind: str, layers: int, dtype=torch.float64, seed: int = 0) -> FlowVAE:
    """A small flow VAE whose flow is far from the identity (weights scaled up)."""
    torch.manual_seed(seed)
    vae = FlowVAE(D, z_dim=Z, hidden=(H,), flow=kind, flow_layers=layers).to(dtype)
    with torch.no_grad():
        for p in vae.flows.parameters():
            p.mul_(3.0)
    return vae


def pixels(n: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, D, generator=torch.Generator().manual_seed(seed)).round().to(dtype)


def by_hand(vae: FlowVAE, z0: torch.Tensor, h: torch.Tensor):
    """z = f_K(...f_1(z0)) and sum_k log|det J_k|, calling fresh conditioned transforms (and
    the reversal) one by one."""
    z, logdet = z0, torch.zeros(z0.shape[:-1], dtype=z0.dtype)
    for i, layer in enumerate(vae.flows):
        if i:
            z = z.flip(-1)  # the reversal between layers (volume preserving)
        t = layer.condition(h)
        y = t(z)
        logdet = logdet + t.log_abs_det_jacobian(z, y)
        z = y
    return z, logdet


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # Pyro's inverses allocate in the default dtype
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("kind, layers", FLOWS)
def test_guide_log_density_is_the_change_of_variables(kind, layers, float64):
    vae, x = flow_vae(kind, layers), pixels(6)
    loc, scale, h = vae.encode_context(x)
    torch.manual_seed(5)
    trace = poutine.trace(vae.guide).get_trace(x)
    trace.compute_log_prob()
    site = trace.nodes["z"]
    torch.manual_seed(5)  # the same standard normal draws the guide's base Normal made
    z0 = loc + scale * torch.randn(6, Z)
    z, logdet = by_hand(vae, z0, h)
    torch.testing.assert_close(site["value"], z, rtol=0, atol=1e-10)
    base = dist.Normal(loc, scale).to_event(1).log_prob(z0)
    torch.testing.assert_close(site["log_prob"], base - logdet, rtol=0, atol=1e-10)
    assert (logdet.abs() > 1e-2).all()  # the flow is no identity: the test has teeth
    # a fresh distribution scores z by inverting the flow (no cache): the same density
    fresh = vae.posterior(loc, scale, h).log_prob(z.clone())
    torch.testing.assert_close(fresh, base - logdet, rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind, layers", FLOWS)
def test_log_det_matches_a_numerical_jacobian(kind, layers, float64):
    """log|det dz/dz0| of the whole flow for one point, against autograd's full Jacobian."""
    vae, x = flow_vae(kind, layers), pixels(2)
    _, _, h = vae.encode_context(x)
    z0 = torch.tensor([0.3, -1.2, 0.7])
    jac = torch.autograd.functional.jacobian(lambda v: by_hand(vae, v[None], h[:1])[0][0], z0)
    _, logdet = by_hand(vae, z0[None], h[:1])
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(logdet[0], logabs, rtol=0, atol=1e-10)
    if layers == 1:  # one autoregressive layer in the order 1..d: a triangular Jacobian
        assert torch.equal(jac.triu(1), torch.zeros_like(jac))


def test_one_iaf_step_by_hand_from_its_made(float64):
    """Kingma et al.'s gated IAF step: (m, logit s) = MADE(z0, h), s = sigmoid(logit s + 2),
    z = s z0 + (1 - s) m, log|det| = sum log s; and the MADE is autoregressive."""
    vae, x = flow_vae("iaf", 1), pixels(4)
    loc, scale, h = vae.encode_context(x)
    z0 = loc + scale * torch.randn(4, Z)
    m, logit = vae.flows[0].nn(z0, context=h)
    s = torch.sigmoid(logit + 2.0)
    t = vae.flows[0].condition(h)
    z = t(z0)
    torch.testing.assert_close(z, s * z0 + (1 - s) * m, rtol=0, atol=1e-12)
    torch.testing.assert_close(t.log_abs_det_jacobian(z0, z), s.log().sum(-1),
                               rtol=0, atol=1e-12)
    # output i depends on z0[:i] only: changing z0[i:] leaves m[..., :i+1], s[..., :i+1] alone
    for i in range(Z):
        moved = z0.clone()
        moved[:, i:] += 1.0
        m2, logit2 = vae.flows[0].nn(moved, context=h)
        torch.testing.assert_close(m2[:, :i + 1], m[:, :i + 1], rtol=0, atol=0)
        torch.testing.assert_close(logit2[:, :i + 1], logit[:, :i + 1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["iaf", "spline"])
def test_vectorized_particles_broadcast_the_context(kind, float64):
    vae, x = flow_vae(kind, 2), pixels(5)
    K = 7
    loc, scale, h = vae.encode_context(x)
    torch.manual_seed(3)
    with pyro.plate("_particles", K, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    q = guide_trace.nodes["z"]
    assert q["value"].shape == (K, 5, Z) and q["log_prob"].shape == (K, 5)
    assert q["fn"].batch_shape == (K, 5) and q["fn"].event_shape == (Z,)
    assert {f.name for f in q["cond_indep_stack"]} == {"data", "_particles"}
    assert model_trace.nodes["x"]["log_prob"].shape == (K, 5)
    torch.manual_seed(3)
    z0 = loc + scale * torch.randn(K, 5, Z)
    for k in (0, K - 1):  # particle k of row n used the context of row n
        z, logdet = by_hand(vae, z0[k], h)
        torch.testing.assert_close(q["value"][k], z, rtol=0, atol=1e-10)
        base = dist.Normal(loc, scale).to_event(1).log_prob(z0[k])
        torch.testing.assert_close(q["log_prob"][k], base - logdet, rtol=0, atol=1e-10)
    info = inspect_program(vae.model, vae.guide, x)
    assert info.vectorized
    assert log_weights(vae.model, vae.guide, x, num_samples=K).shape == (K, 5)


def test_importance_weights_use_the_exact_log_q(float64):
    """The log importance weights that ``score`` sums (``log_weights``) equal log p(x, z) -
    log q(z|x) with log q computed afresh: the flow inverted, no cache involved."""
    vae, x = flow_vae("iaf", 2), pixels(4)
    K = 50
    info = inspect_program(vae.model, vae.guide, x)
    torch.manual_seed(11)
    lw = log_weights(vae.model, vae.guide, x, num_samples=K, info=info)
    torch.manual_seed(11)  # the same draws
    with pyro.plate("_particles", K, dim=-2):
        z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"].clone()
    loc, scale, h = vae.encode_context(x)
    z0 = z
    for t in reversed(vae.transforms(h)):  # fresh transforms: inverted, not cached
        z0 = t.inv(z0)
    z_again, logdet = by_hand(vae, z0, h)
    torch.testing.assert_close(z_again, z, rtol=0, atol=1e-10)
    log_q = dist.Normal(loc, scale).to_event(1).log_prob(z0) - logdet
    log_p = (dist.Normal(0.0, 1.0).expand([Z]).to_event(1).log_prob(z)
             + vae.likelihood_dist(z).log_prob(x))
    torch.testing.assert_close(lw, log_p - log_q, rtol=0, atol=1e-8)
    s = score(vae, x, num_samples=K, iwae=True, seed=11)
    assert s.iwae.shape == (4,) and torch.isfinite(s.iwae).all()


@pytest.mark.parametrize("kind", ["iaf", "spline"])
@pytest.mark.parametrize("particles", [1, 3])
def test_analytic_elbo_falls_back_to_the_monte_carlo_kl(kind, particles, float64):
    vae, x = flow_vae(kind, 2), pixels(8)
    losses = {}
    for name in ("mc", "analytic"):
        elbo = make_elbo(name, particles)
        torch.manual_seed(7)
        losses[name] = elbo.differentiable_loss(vae.model, vae.guide, x)
    torch.testing.assert_close(losses["analytic"], losses["mc"], rtol=1e-12, atol=1e-10)
    # and the gradients agree too
    grads = {}
    for name in ("mc", "analytic"):
        vae.zero_grad()
        torch.manual_seed(7)
        make_elbo(name, particles).differentiable_loss(vae.model, vae.guide, x).backward()
        grads[name] = [p.grad.clone() for p in vae.flows.parameters()]
    for a, b in zip(grads["mc"], grads["analytic"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_options_build_the_flow_vae(digits):
    assert {"flow", "flow_layers"} <= {f.name for f in dataclasses.fields(options_class(FlowVAE))}
    assert not {"flow", "flow_layers"} & {f.name for f in dataclasses.fields(options_class(VAE))}
    assert get_model("flow-vae") is FlowVAE
    plain = VAE.from_options(make_options(VAE, {}), digits)
    vae = FlowVAE.from_options(make_options(FlowVAE, {"flow": "spline", "flow_layers": 3}),
                               digits)
    assert type(vae) is FlowVAE and (vae.flow, vae.flow_layers) == ("spline", 3)
    assert vae.guide_name == "spline-3"
    assert len(vae.flows) == 3
    flow_ids = {id(p) for p in vae.flows.parameters()}
    assert flow_ids and flow_ids <= {id(p) for p in vae.parameters()}
    assert "flows" in parameter_groups(vae)
    # the same encoder and decoder as the plain VAE: only the flows are new
    assert {k for k in vae.state_dict() if not k.startswith("flows.")} == set(
        plain.state_dict())
    with pytest.raises(UsageError, match="maf"):
        make_options(FlowVAE, {"flow": "maf"})
    with pytest.raises(UsageError, match="flow.layers"):
        make_options(FlowVAE, {"flow": "iaf", "flow_layers": 0})
    with pytest.raises(UsageError, match="VAE has no option 'flow'"):
        make_options(VAE, {"flow": "iaf"})


SMALL = dict(hidden=(32,), z_dim=4)


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory):
    runs = {}
    for kind, elbo in (("iaf", "analytic"), ("spline", "mc")):
        out = tmp_path_factory.mktemp(kind) / "run"
        config = TrainConfig(model="flow-vae", model_options=dict(SMALL, flow=kind),
                             dataset="digits", epochs=3, seed=0, out=str(out), batch_size=64,
                             lr=3e-3, elbo=elbo, particles=2)
        runs[kind] = train_run(config, progress=False)
    return runs


@pytest.mark.parametrize("kind", ["iaf", "spline"])
def test_train_and_evaluate_end_to_end(flow_runs, kind, sem):
    run = flow_runs[kind]
    assert type(run.module) is FlowVAE and run.module.flow == kind
    history = [row["test_elbo"] for row in run.history]
    assert len(history) == 3 and history[-1] > history[0]
    notes = [n for n in run.notes if "no closed form" in n]
    assert notes == ([ANALYTIC_NOTE.format(flow="iaf")] if kind == "iaf" else [])
    config = json.loads((run.out / "config.json").read_text())
    assert config["model"] == "flow-vae" and config["model_options"]["flow"] == kind
    # reloaded from its directory: the same class and weights, the same scores
    _, module, data = load_run(run.out)
    assert type(module) is FlowVAE and module.flow == kind
    for k, v in run.module.state_dict().items():
        assert torch.equal(v, module.state_dict()[k]), k
    result = evaluate(run.out, eval_iwae=200)
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["test_log_likelihood_iwae"] == pytest.approx(
        result["test_log_likelihood_iwae"])
    s = score(module, data.test.x, num_samples=200, iwae=True)
    assert s.iwae.mean().item() == pytest.approx(result["test_log_likelihood_iwae"], abs=1e-4)
    # IWAE_200 >= the ELBO, by more than its noise, image by image on average
    gain = s.iwae - s.elbo
    assert gain.mean() > 4 * sem(gain) and gain.mean() > 0


def test_the_analytic_note_appears_once_with_particles(tmp_path, digits):
    config = TrainConfig(model="flow-vae", model_options=dict(SMALL, flow="iaf", flow_layers=1),
                         dataset="digits", epochs=2, seed=0, out=str(tmp_path / "run"),
                         batch_size=256, elbo="analytic", particles=3)
    run = train_run(config, digits, progress=False)
    assert sum("no closed form" in n for n in run.notes) == 1
    plain = train_run(dataclasses.replace(config, model="vae", model_options=SMALL,
                                          out=str(tmp_path / "plain")), digits, progress=False)
    assert not any("no closed form" in n for n in plain.notes)


def test_reconstruct_decodes_the_flowed_base_mean(float64):
    vae, x = flow_vae("iaf", 2), pixels(3)
    loc, _, h = vae.encode_context(x)
    z, _ = by_hand(vae, loc, h)
    torch.testing.assert_close(vae.reconstruct(x), vae.decode(z), rtol=0, atol=1e-12)
    assert isinstance(vae.transforms(h)[1], T.Permute)


TRAIN_PROG = "python -m ppl_vae train: error: "


@pytest.mark.parametrize("argv, fragments", [
    (["--flow", "maf"], ["--flow", "'maf'"]),
    (["--flow", "iaf", "--flow-layers", "0"], ["--flow-layers", "at least 1"]),
])
def test_cli_bad_flow_options_are_one_line_errors(cli, tmp_path, argv, fragments):
    out = tmp_path / "run"
    r = cli(train_main, ["--dataset", "digits", "--model", "flow-vae", *argv, "--out", out])
    assert_one_line_error(r, TRAIN_PROG, *fragments)
    assert not out.exists()


def test_cli_trains_and_evaluates_a_flow(cli, tmp_path):
    out = tmp_path / "run"
    r = cli(train_main, ["--dataset", "digits", "--model", "flow-vae", "--flow", "iaf",
                         "--flow-layers", "1",
                         "--hidden", "16", "--z-dim", "2", "--epochs", "1", "--elbo", "analytic",
                         "--out", out])
    assert r.code == 0, r.err
    assert r.out.count("no closed form") == 1
    config = json.loads((out / "config.json").read_text())
    assert (config["model_options"]["flow"], config["model_options"]["flow_layers"]) == (
        "iaf", 1)
    r = cli(evaluate_main, ["--run", out, "--eval-iwae", "20"])
    assert r.code == 0, r.err
    assert json.loads((out / "summary.json").read_text())["iwae_samples"] == 20
