"""Round seven of hostile use: others' Pyro programs (autoguides in ``__init__``, constrained
latents under ``analytic``, guides that do not match their model)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import assert_one_line_error
from pyro.infer.autoguide import AutoNormal
from torch import nn

from ppl_vae import TrainConfig, UsageError, train
from ppl_vae.inference.estimators import make_elbo, suited
from ppl_vae.inference.program import inspect_program


class PixelBeta(nn.Module):
    """Pyro's idiom: the autoguide made in ``__init__`` (no guide method on the class)."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.guide = AutoNormal(self.model)

    def model(self, x):
        theta = pyro.sample("theta", dist.Beta(x.new_ones(self.input_dim), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Bernoulli(theta, validate_args=False).to_event(1), obs=x)


def test_a_guide_assigned_in_init_trains(digits, tmp_path):
    run = train(TrainConfig(model=PixelBeta, epochs=1, out=str(tmp_path / "r")), data=digits,
                progress=False)
    assert torch.isfinite(torch.tensor(run.summary["test_elbo"]))


def test_a_built_model_without_a_guide_is_refused_in_one_line(digits):
    class NoGuide(nn.Module):
        def __init__(self, input_dim: int) -> None:
            super().__init__()

        def model(self, x):
            pass

    with pytest.raises(UsageError, match="built a NoGuide without guide"):
        train(TrainConfig(model=NoGuide, epochs=1), data=digits, progress=False)


def test_analytic_on_an_autoguide_s_constrained_site_keeps_the_jacobian():
    """AutoNormal's Beta site is a Delta with the log-Jacobian as its log_density; Pyro's
    KL(Delta || p) is -log p(v), dropping it, so 'analytic' there is not the ELBO. Here the
    Delta site is scored by log q - log p, so analytic equals mc at the same draws, and the
    probe does not offer analytic (no closed-form KL is left)."""
    from pyro.infer import TraceMeanField_ELBO as PyroMeanField

    pyro.clear_param_store()
    x = torch.rand(6, 4).bernoulli()
    model = PixelBeta(4)
    model.guide(x)
    info = inspect_program(model.model, model.guide, x)
    assert not info.closed_kl and "analytic" not in suited(info)
    losses = {}
    for name, elbo in (("mc", make_elbo("mc", 3)), ("analytic", make_elbo("analytic", 3)),
                       ("pyro", PyroMeanField(num_particles=3, vectorize_particles=True,
                                              max_plate_nesting=1))):
        pyro.set_rng_seed(3)
        losses[name] = elbo.differentiable_loss(model.model, model.guide, x)
    assert torch.allclose(losses["analytic"], losses["mc"], rtol=1e-6)
    assert not torch.allclose(losses["pyro"], losses["mc"], rtol=1e-3)  # (the Jacobian)


def _vae(guide_body, plate_size=None):
    """A 4-1 VAE whose guide is ``guide_body(x, loc)`` (the model is Pyro's example's)."""

    def model(x):
        with pyro.plate("data", plate_size or x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 1), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z.expand(-1, 4)).to_event(1), obs=x)

    def guide(x):
        guide_body(x, x.sum(-1, keepdim=True) - 2)

    return model, guide


def _plated(name, **kw):
    def body(x, loc):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(name, dist.Normal(loc, 1.0).to_event(1), **kw)
    return body


def _unplated(x, loc):
    pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def _with_factor(x, loc):
    _plated("z")(x, loc)
    pyro.factor("penalty", -loc.pow(2).sum(), has_rsample=True)


@pytest.mark.parametrize("body, plate_size, fragment", [
    (_plated("zz"), None, "the guide samples 'zz', which the model does not (the model's 'z'"),
    (_plated("x", obs=torch.zeros(3, 4)), None, "the guide observes site 'x'"),
    (_unplated, None, 'the guide at site "z", invalid log_prob shape'),
    (_plated("z"), 128, "the program's plate 'data' has size 128 but holds the batch's 3"),
], ids=["a guide site the model lacks", "a guide observing", "a guide without the plate",
        "a plate of a fixed size"])
def test_a_guide_that_does_not_match_its_model_is_refused(body, plate_size, fragment):
    """What Pyro's validation raises or warns (training runs with it off), refused in one
    line by the probe: such programs trained silently, their bounds bounds of nothing."""
    model, guide = _vae(body, plate_size)
    x = torch.rand(3, 4).bernoulli()
    with pytest.raises(UsageError) as e:
        inspect_program(model, guide, x)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_an_auxiliary_guide_site_and_a_guide_factor_are_accepted():
    model, guide = _vae(_with_factor)
    info = inspect_program(model, guide, torch.rand(3, 4).bernoulli())
    assert info.data_plate == "data" and "penalty" in info.auxiliary


def test_tracegraph_with_an_nn_baseline_draws_its_particles_one_by_one():
    """Pyro's TraceGraph_ELBO calls a site's nn_baseline on the rows, without a samples
    dimension: such a program is not vectorized (it ended in Pyro's traceback at 3
    particles), and its particles are drawn one after another."""
    enc, base = nn.Linear(4, 2), nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(x.new_full((len(x), 2), 0.5)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z.sum(-1, keepdim=True) * x.new_ones(4))
                        .to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=enc(x)).to_event(1),
                        infer={"baseline": {"nn_baseline": base, "nn_baseline_input": x}})

    x = torch.rand(5, 4).bernoulli()
    info = inspect_program(model, guide, x)
    assert not info.vectorized and "nn_baseline" in info.not_vectorized_because
    loss = make_elbo("tracegraph", 3, vectorize=info.vectorized).differentiable_loss(
        model, guide, x)
    loss.backward()
    assert torch.isfinite(loss) and enc.weight.grad is not None


class GlobalBias(nn.Module):
    """A global latent b (outside the data plate) and a local z, both guided by a Delta: the
    loss is exact."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.full((input_dim,), 0.3))
        self.enc, self.dec = nn.Linear(input_dim, 2), nn.Linear(2, input_dim)

    def model(self, x):
        b = pyro.sample("b", dist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z) + b, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.sample("b", dist.Delta(self.loc).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.enc(x)).to_event(1))


def test_a_batch_counts_its_share_of_the_global_terms(digits):
    """Each batch of B of the N training rows scales the sites outside the data plate by B/N
    (they counted once per batch, N/B times an epoch): the training loss is the batch's local
    terms plus B/N of the global ones."""
    from ppl_vae import Session

    s = Session(TrainConfig(model=GlobalBias, elbo="mc", batch_size=16), digits,
                progress=False)
    n, m = len(s.data.train), s.module
    for rows in (slice(0, 16), slice(16, 21)):
        (x,) = s.args(s.data.train, rows)
        z = m.enc(x)
        local = (dist.Normal(0.0, 1.0).log_prob(z).sum() +
                 dist.Normal(m.dec(z) + m.loc, 1.0).log_prob(x).sum())
        prior = dist.Normal(0.0, 1.0).log_prob(m.loc).sum()
        expected = -(local + len(x) / n * prior)
        assert torch.allclose(s.step().loss(x), expected, rtol=1e-6), rows


# -- the command line (round 7) -------------------------------------------------------------------
def test_overwrite_refuses_a_directory_holding_a_run_in_progress(tmp_path):
    """--overwrite on a parent of a training run's directory deleted that run's files
    under it (its .lock held); now refused in one line, nothing touched."""
    from ppl_vae.run.rundir import DirLock, RunDir

    child = tmp_path / "parent" / "child"
    child.mkdir(parents=True)
    (child / "checkpoint.pt").write_bytes(b"a run's")
    lock = DirLock.acquire(child)
    try:
        with pytest.raises(UsageError, match="holds a run in progress in .*child"):
            RunDir.open(tmp_path / "parent", "x", overwrite=True)
        assert (child / "checkpoint.pt").read_bytes() == b"a run's"
    finally:
        lock.release()
    with RunDir.open(tmp_path / "parent", "x", overwrite=True):  # (its run ended: as before)
        pass


def test_resuming_a_finished_run_keeps_its_summary(tmp_path, digits, cli):
    """--resume of a finished run re-evaluated it and rewrote summary.json, dropping what
    evaluate had added (an IWAE bound that took hours, say); now it is kept, and said so."""
    from conftest import SMALL_MODEL

    from ppl_vae import evaluate_run, train_run
    from ppl_vae.cli import train_main

    out = tmp_path / "run"
    train_run(TrainConfig(model_options=SMALL_MODEL, epochs=1, eval_particles=2,
                          out=str(out)), data=digits, progress=False)
    evaluate_run(str(out), eval_iwae=3)
    before = (out / "summary.json").read_bytes()
    r = cli(train_main, ["--resume", out])
    assert r.code == 0, r.err
    assert (out / "summary.json").read_bytes() == before
    assert "had finished; its summary.json is kept" in r.err + r.out


def test_sigterm_ends_evaluate_through_its_clean_ups(tmp_path, digits, cli, monkeypatch):
    """SIGTERM killed evaluate and compare at once (exit 143, silent, their .lock and
    temporary files left); now it ends them as SIGINT does: one line, 143, nothing left."""
    import os
    import signal

    from conftest import SMALL_MODEL

    from ppl_vae import train_run
    from ppl_vae.cli import evaluate_main
    from ppl_vae.run import session

    out = tmp_path / "run"
    train_run(TrainConfig(model_options=SMALL_MODEL, epochs=1, eval_particles=2,
                          out=str(out)), data=digits, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(session.Session, "score", killed)
    r = cli(evaluate_main, ["--run", out])
    assert r.code == 143 and "interrupted by SIGTERM" in r.err and "\n" not in r.err.strip()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("env, fragment", [
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "abc", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
     "RANK is 'abc'"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
])
def test_a_stray_torchrun_variable_is_one_line(cli, monkeypatch, tmp_path, env, fragment):
    from ppl_vae.cli import train_main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    r = cli(train_main, ["--dataset", "digits", "--epochs", 1, "--out", tmp_path / "r"])
    assert_one_line_error(r, "python -m ppl_vae train: error: ", fragment, "unset WORLD_SIZE")


def test_the_posterior_appendix_refuses_an_m2_run_in_one_line(cli, tmp_path):
    from ppl_vae import train_run
    from ppl_vae.appendix.__main__ import main

    out = tmp_path / "m2"
    train_run(TrainConfig(model="ssvae", model_options={"hidden": (16,), "z_dim": 2},
                          labelled=100, epochs=1, eval_particles=2, out=str(out)),
              progress=False)
    r = cli(main, ["posterior", "--run", out, "--out", tmp_path / "post"])
    assert_one_line_error(r, "python -m ppl_vae appendix: error: ", "is not a plain VAE")


def test_compare_refuses_options_that_contradict_its_run(cli, tmp_path, digits):
    """compare --run measured the run's own model silently whatever --model, --dataset or
    model options were given; a contradiction is now one line."""
    from conftest import SMALL_MODEL

    from ppl_vae import train_run
    from ppl_vae.cli import compare_main

    out = tmp_path / "run"
    train_run(TrainConfig(model_options=SMALL_MODEL, epochs=1, eval_particles=2,
                          out=str(out)), data=digits, progress=False)
    for given, fragment in ((["--model", "cvae"], "--model 'cvae' contradicts its 'vae'"),
                            (["--z-dim", 5], "--z-dim 5 contradicts its 4")):
        r = cli(compare_main, ["--run", out, *given, "--out", tmp_path / "cmp"])
        assert_one_line_error(r, "python -m ppl_vae compare: error: ", fragment)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("forge", [lambda loop: loop.update(streams={}),
                                   lambda loop: loop.update(epoch=1000)],
                         ids=["no random streams", "past the last epoch"])
def test_a_forged_loop_state_is_one_line_on_resume(tmp_path, digits, cli, forge):
    from conftest import SMALL_MODEL

    from ppl_vae import train_run
    from ppl_vae.cli import train_main

    out = tmp_path / "run"
    train_run(TrainConfig(model_options=SMALL_MODEL, epochs=2, eval_particles=2,
                          out=str(out)), data=digits, progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    forge(state["loop"])
    torch.save(state, out / "checkpoint.pt")
    r = cli(train_main, ["--resume", out])
    assert_one_line_error(r, "python -m ppl_vae train: error: ", "does not fit this run")


class LabelsFirst(nn.Module):
    """A labels plate over the rows before the data plate (both one entry per row), and a
    pyro.factor on the parameters outside both: only the factor is a global term."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(10))
        self.enc, self.dec = nn.Linear(input_dim, 2), nn.Linear(12, input_dim)

    def data_args(self, x, y):
        return x, y

    def model(self, x, y):
        pyro.factor("l2", -(self.dec.weight ** 2).sum())
        with pyro.plate("labels", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=self.logits), obs=y)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            h = torch.cat([z, nn.functional.one_hot(y, 10).to(z)], -1)
            pyro.sample("x", dist.Normal(self.dec(h), 1.0).to_event(1), obs=x)

    def guide(self, x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.deterministic("code", self.enc(x), event_dim=1)  # (accepted: Pyro masks it)
            pyro.sample("z", dist.Delta(self.enc(x)).to_event(1))


def test_every_plate_over_the_rows_is_local_and_only_global_terms_take_b_over_n(digits):
    """The first observed plate over the rows was taken for the only one: the data plate's
    likelihood and latents were scaled by B/N as if global. Every plate of an observed site
    with one entry per row is local; the factor outside them (observed, not a latent) takes
    B/N on one process as under torchrun."""
    from pyro.infer import Trace_ELBO

    from ppl_vae import Session

    s = Session(TrainConfig(model=LabelsFirst, elbo="mc", batch_size=16), digits,
                progress=False)
    assert s.info.row_plates == {"labels", "data"} and s.info.outside == {"l2"}
    x, y = s.args(s.data.train, slice(0, 16))
    with pyro.validation_enabled(False):  # (it warns of the guide's deterministic site)
        whole = Trace_ELBO().differentiable_loss(s.module.model, s.module.guide, x, y)
    factor = (s.module.dec.weight ** 2).sum()
    expected = whole - factor + 16 / len(s.data.train) * factor
    with s.validation():  # (off, as a run trains)
        assert torch.allclose(s.step().loss(x, y), expected, rtol=1e-6)


class GlobalDiscrete(nn.Module):
    """A global discrete latent enumerated in the model (the scale of the observation
    noise) and a local one: TraceEnum_ELBO needs them at one scale."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.logits, self.locs = nn.Parameter(torch.zeros(3)), nn.Parameter(
            torch.rand(3, input_dim))

    def model(self, x):
        c = pyro.sample("c", dist.Categorical(logits=x.new_zeros(2)),
                        infer={"enumerate": "parallel"})
        scale = x.new_tensor([0.2, 0.5])[c]
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Categorical(logits=self.logits),
                            infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(self.locs[a], scale.unsqueeze(-1)).to_event(1), obs=x)

    def guide(self, x):
        pass


def test_a_global_enumerated_latent_trains_with_enum(digits, tmp_path):
    run = train(TrainConfig(model=GlobalDiscrete, elbo="enum", epochs=1, eval_particles=2,
                            out=str(tmp_path / "r")), data=digits, progress=False)
    assert torch.isfinite(torch.tensor(run.summary["train_elbo"]))


def test_a_resumed_torchrun_process_compiles_its_first_step(monkeypatch):
    """Under torchrun (the graph gives the gradients only) the first call of a process was
    always eager, a resumed one's too, whose uninterrupted run had compiled that step: 3e-8
    off in the weights. With the optimizer's state restored the first call is compiled."""
    from ppl_vae import VAE
    from ppl_vae.distributed import World
    from ppl_vae.inference.compiled import CompiledStep
    from ppl_vae.inference.svi import Step

    monkeypatch.setattr(CompiledStep, "_agree", lambda self, reason: reason)  # (no group)
    module = VAE(4, z_dim=2, hidden=(3,))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    with pyro.validation_enabled(False):  # (as a run trains)
        step = CompiledStep(Step.of_elbo(make_elbo("mc"), module, module.programs(),
                                         optimizer=optimizer, world=World(0, 2)), module)
    step._calls = 1  # (the process's first call, of a new run: eager)
    assert step.refused is None and step._grads_only and not step._ready()
    trained = torch.optim.Adam(module.parameters(), lr=1e-3)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    trained.step()
    optimizer.load_state_dict(trained.state_dict())  # what --resume restores
    assert step._ready()
