"""The compiled SVI step (``--compile``, :mod:`ppl_vae.inference.compiled`): the same loss,
gradients, noise and Adam updates as the eager step; every refusal is one line and the eager
step; checkpoints and resume stay exact.

Compiles are the slow part (seconds each): models are tiny, and a compiled step is reused by
the tests that can share it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import pyro
import pytest
import torch
from conftest import SMALL_MODEL
from helpers import build_model
from plugin_models import GlobalLatentVAE, PyroExampleVAE
from torch import nn

from ppl_vae import TrainConfig
from ppl_vae.data import Dataset, Split
from ppl_vae.inference.compiled import CompiledStep
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.program import inspect_objective
from ppl_vae.inference.svi import Step
from ppl_vae.models import VAE, hook
from ppl_vae.run.loop import NEVER
from ppl_vae.run.train import train_run

ROWS = 6


@pytest.fixture(autouse=True)
def no_validation():
    """As ``ppl_vae train`` runs by default (validation reads tensors on the host)."""
    with pyro.validation_enabled(False):
        yield


def as_float64(data: Dataset) -> Dataset:
    def split(s: Split | None) -> Split | None:
        return None if s is None else Split(s.x.double(), s.y)

    return replace(data, train=split(data.train), test=split(data.test), val=split(data.val))


def binary_rows(n: int, d: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64).bernoulli(generator=g)
    return Dataset("binary", Split(x[: n // 2]), Split(x[n // 2:]), (1, 1, d))


class Setup:
    """A model in float64 on a few rows, its loss, an Adam with state (one eager step
    taken, the moments and step count then zeroed) and a compiled step over it."""

    def __init__(self, module: nn.Module, data: Dataset, elbo: str = "mc", particles: int = 1,
                 lr: float = 1e-3, optimizer=None, **compile_kw) -> None:
        pyro.clear_param_store()
        self.module = module.double()
        args = hook(self.module, "data_args")
        self.args = args(data.train.x[:ROWS], None if data.train.y is None else
                         data.train.y[:ROWS])
        terms = hook(self.module, "programs")()
        info = inspect_objective(terms, *(a[:2] for a in self.args))
        e = make_elbo(elbo, particles, max_plate_nesting=info.max_plate_nesting,
                      vectorize=info.vectorized)
        self.eager = Step.of_elbo(e, self.module, terms, info)
        self.loss, self.params = self.eager.loss, self.eager.params
        self.optimizer = self.eager.optimizer = (
            optimizer(self.params) if optimizer else torch.optim.Adam(self.params, lr=lr))
        self.total = torch.zeros((), dtype=torch.float64)
        self.first_bad = torch.full((), NEVER, dtype=torch.long)
        self.eager(0, self.args, self.total, self.first_bad)
        for state in self.optimizer.state.values():
            for t in state.values():
                t.zero_()
        self.total.zero_()
        self.lines: list[str] = []
        self.step = CompiledStep(self.eager, self.module, log=self.lines.append, **compile_kw)

    def eager_loss_and_grads(self) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        loss = self.loss(*self.args)
        return loss.detach(), list(torch.autograd.grad(loss, self.params, allow_unused=True))

    def compiled_loss_and_grads(self, i: int = 1) -> tuple[torch.Tensor, list]:
        """One compiled step from zero moments: the loss is what it adds to ``total`` and
        the gradient is m / (1 - beta1), exactly."""
        before = self.total.clone()
        self.step(i, self.args, self.total, self.first_bad)
        beta1 = self.optimizer.defaults["betas"][0]
        grads = [self.optimizer.state[p]["exp_avg"] / (1 - beta1)
                 if "exp_avg" in self.optimizer.state[p] else None for p in self.params]
        return self.total - before, grads


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two tensors of one shape (any dtype)."""
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def family(model: str, data: Dataset, **options) -> nn.Module:
    return build_model(TrainConfig(model=model, model_options=options), data)


def case(name: str, digits: Dataset) -> tuple[nn.Module, Dataset, str, int]:
    """(model, float64 data, --elbo, particles) of each case."""
    from ppl_vae.data import hide_labels

    d = as_float64(digits)
    if name == "pyro-example-vae":  # Pyro's examples/vae as published (784 pixels)
        return PyroExampleVAE(z_dim=2, hidden_dim=8), binary_rows(12, 784), "mc", 1
    if name == "global-latent-vae":  # AutoNormal over a global latent, PyroModule/PyroSample
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # its prior's constants are made in __init__
        try:
            return GlobalLatentVAE(20, z_dim=3, hidden=8), binary_rows(12, 20), "mc", 1
        finally:
            torch.set_default_dtype(default)
    if name == "ssvae-enum":
        d = as_float64(hide_labels(digits, 200, 0))
        return family("ssvae", d, hidden=(16,), z_dim=3), d, "enum", 1
    builders = {
        "vae-mc": ("vae", SMALL_MODEL, "mc", 1),
        "vae-analytic": ("vae", SMALL_MODEL, "analytic", 1),
        "vae-particles": ("vae", SMALL_MODEL, "mc", 3),
        "cvae-hybrid": ("cvae", dict(hidden=(16,), z_dim=3, quadrants=2,
                                     cvae_objective="hybrid"), "analytic", 1),
        "conv-vae": ("conv-vae", dict(z_dim=3, channels=(4, 8)), "mc", 1),
        "flow-iaf": ("flow-vae", dict(hidden=(16,), z_dim=3, flow="iaf"), "mc", 1),
    }
    model, options, elbo, k = builders[name]
    return family(model, d, **options), d, elbo, k


CASES = ["vae-mc", "vae-analytic", "vae-particles", "cvae-hybrid", "ssvae-enum", "conv-vae",
         "flow-iaf", "pyro-example-vae", "global-latent-vae"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_compiled_loss_and_gradients_equal_the_eager_step(name, digits):
    """Float64, the same noise: the loss and every gradient to 1e-10; then four more steps
    each way from the same state and noise give the same parameters and Adam state."""
    module, data, elbo, k = case(name, digits)
    s = Setup(module, data, elbo, k)
    rng = torch.get_rng_state()
    loss_e, grads_e = s.eager_loss_and_grads()
    torch.set_rng_state(rng)
    loss_c, grads_c = s.compiled_loss_and_grads()
    assert s.step.refused is None, s.step.refused
    assert s.step.graphs and not s.lines
    graph = next(iter(s.step.graphs.values()))  # a steady look at each epoch start
    assert graph.fingerprint is not None and s.step._fingerprint(s.args) == graph.fingerprint
    assert abs(float(loss_c - loss_e)) < 1e-10, (float(loss_c), float(loss_e))
    for p, g_e, g_c in zip(s.params, grads_e, grads_c, strict=True):
        if g_e is None:
            assert g_c is None or not g_c.any()
            continue
        assert float((g_c - g_e).abs().max()) < 1e-10, tuple(p.shape)

    start = (copy.deepcopy(s.module.state_dict()), copy.deepcopy(s.optimizer.state_dict()),
             torch.get_rng_state())
    for i in range(2, 6):
        s.step(i, s.args, s.total, s.first_bad)
    compiled_state = copy.deepcopy((s.module.state_dict(), s.optimizer.state_dict()))
    s.module.load_state_dict(start[0])
    s.optimizer.load_state_dict(start[1])
    torch.set_rng_state(start[2])
    for i in range(2, 6):
        s.eager(i, s.args, s.total, s.first_bad)
    for key, value in s.module.state_dict().items():
        assert gap(compiled_state[0][key], value) < 1e-9, key
    for index, state in s.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert gap(compiled_state[1]["state"][index][key], value) < 1e-11, (index, key)
    assert s.first_bad.item() == NEVER


# -- refusals: one line, and the eager step ------------------------------------------------------
class ReadsAValue(VAE):
    def guide(self, x):
        if float(x.sum()) < 0:  # a host read: the graph cannot know the branch
            raise ValueError
        super().guide(x)


class UntrackedTensor(VAE):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.shift = torch.zeros(self.z_dim, requires_grad=True)  # not a Parameter

    def encode(self, x):
        loc, scale = super().encode(x)
        return loc + self.shift.to(loc.dtype), scale


class ChangesEveryCall(VAE):
    """A program whose values follow a count of its calls (each trace is a call, too)."""

    calls = 0

    @classmethod
    def reset(cls) -> None:
        cls.calls = 0

    def encode(self, x):
        ChangesEveryCall.calls += 1
        loc, scale = super().encode(x)
        return loc + ChangesEveryCall.calls % 2, scale


class ValueDependentShape(VAE):
    def encode(self, x):
        loc, scale = super().encode(x)
        return loc + x[x > 2].sum(), scale  # (empty: digits lie in [0, 1])


def small(cls, digits) -> tuple[nn.Module, Dataset]:
    return cls(64, z_dim=3, hidden=(8,)), as_float64(digits)


def with_extra_tensor(params):
    return torch.optim.Adam([*params, torch.zeros(3, requires_grad=True)], lr=1e-3)


REFUSALS = {
    "reads-a-value": (ReadsAValue, {}, "the program reads a tensor's value in Python at "
                      "test_compiled.py:"),
    "validation": (VAE, {"validate": True}, "Pyro validation is on (--validate)"),
    "untracked-trainable": (UntrackedTensor, {}, "a trainable tensor is not an input: the "
                            "program reads a tensor of shape (3,) that requires grad"),
    "optimizer-trains-an-outsider": (VAE, {"optimizer": with_extra_tensor},
                                     "a trainable tensor is not an input: the optimizer "
                                     "trains a tensor of shape (3,)"),
    "sgd": (VAE, {"optimizer": lambda p: torch.optim.SGD(p, lr=1e-3)},
            "the optimizer is SGD; the graph implements torch.optim.Adam only"),
    "adamw": (VAE, {"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3)},
              "the optimizer is AdamW"),
    "amsgrad": (VAE, {"optimizer": lambda p: torch.optim.Adam(p, amsgrad=True)},
                "Adam with amsgrad=True is not implemented by the graph"),
    "renyi": (VAE, {"elbo": "iwae", "particles": 2},
              "--elbo iwae has no differentiable loss (RenyiELBO reads"),
    "python-value-changes": (ChangesEveryCall, {}, "a dynamic structure: two traces of the "
                             "same step differ"),
    "value-dependent-shape": (ValueDependentShape, {}, "a dynamic structure: the shape of "
                              "aten.index.Tensor depends on tensor values at "
                              "test_compiled.py:"),
    "adam-steps-differ": (VAE, {"skew_steps": True}, "parameters are at different Adam steps "
                          "([0.0, 5.0]); the graph keeps one count"),
    "inductor-fails": (VAE, {"compile_raises": True}, "compiling the step failed "
                       "(RuntimeError: inductor broke)"),
    "no-compiler": (VAE, {"no_compiler": True}, "no C++ compiler for inductor on the CPU "
                    "(looked for '/nonexistent/c++'"),
    "eager-disagrees": (VAE, {"miscompile": True}, "the compiled step disagrees with the eager "
                        "step with the same noise (Adam's m (the gradient): relative error"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_a_refusal_is_one_line_and_the_eager_step(name, digits, monkeypatch):
    cls, kw, fragment = REFUSALS[name]
    module, data = small(cls, digits)
    kw = dict(kw)
    from torch._inductor import config

    cxx = ("/nonexistent/c++",) if kw.pop("no_compiler", False) else config.cpp.cxx
    if kw.pop("compile_raises", False):  # anything a compiler may raise, not a refusal
        def broken(self, gm, args):
            raise RuntimeError("inductor broke\ndetails")

        monkeypatch.setattr(CompiledStep, "_compile", broken)
    if kw.pop("miscompile", False):  # a graph whose gradient is off by a little
        compile_ = CompiledStep._compile

        def wrong(self, gm, args):
            fn = compile_(self, gm, args)

            def run(*inputs):
                out = fn(*inputs)
                inputs[len(self._tensors)].mul_(1.001)  # the first exp_avg
                return out

            return run

        monkeypatch.setattr(CompiledStep, "_compile", wrong)
    reset = getattr(cls, "reset", lambda: None)
    skew = kw.pop("skew_steps", False)
    with pyro.validation_enabled(kw.pop("validate", False)), config.patch({"cpp.cxx": cxx}):
        s = Setup(module, data, estimator="--elbo iwae" if kw.get("elbo") == "iwae" else
                  "the estimator", **kw)
        if skew:  # e.g. a parameter group added later
            s.optimizer.state[s.params[0]]["step"].fill_(5)
        start = copy.deepcopy((s.module.state_dict(), s.optimizer.state_dict(),
                               torch.get_rng_state()))
        reset()
        for i in range(1, 4):
            s.step(i, s.args, s.total, s.first_bad)
        after = copy.deepcopy(s.module.state_dict())
        s.module.load_state_dict(start[0])
        s.optimizer.load_state_dict(start[1])
        torch.set_rng_state(start[2])
        reset()
        for i in range(1, 4):
            s.eager(i, s.args, s.total, s.first_bad)
    assert s.step.refused is not None and fragment in s.step.refused, s.step.refused
    assert s.lines == [f"--compile: {s.step.refused}; this run trains with the eager step"]
    assert "\n" not in s.lines[0]
    assert not s.step.graphs
    for key, value in s.module.state_dict().items():  # the eager step, exactly
        assert torch.equal(after[key], value), key
    assert s.step.description == f"eager: {s.step.refused}"


# -- noise, re-tracing, the divergence flag -----------------------------------------------------
def test_each_step_draws_new_noise_that_follows_the_seed(digits, sem):
    """At fixed parameters: a compiled step's loss is the eager loss with the same seed (the
    same draws), every step draws anew, and 500 steps average the eager loss (4 SE)."""
    module, data = small(VAE, digits)
    s = Setup(module, data)
    start = copy.deepcopy(s.module.state_dict())

    def compiled_losses(n: int) -> torch.Tensor:
        out = []
        for i in range(1, n + 1):
            s.total.zero_()
            s.step(i, s.args, s.total, s.first_bad)
            out.append(s.total.clone())
            s.module.load_state_dict(start)  # the same parameters every step
        return torch.stack(out)

    torch.manual_seed(1)
    c = compiled_losses(500)
    assert s.step.refused is None and s.step.graphs
    assert len(set(c.tolist())) == 500  # fresh noise every step
    torch.manual_seed(1)
    assert torch.equal(compiled_losses(5), c[:5])  # the seed decides the noise
    torch.manual_seed(1)
    same_seed = torch.stack([s.loss(*s.args).detach() for _ in range(5)])
    assert float((same_seed - c[:5]).abs().max()) < 1e-10  # an eager step's noise, exactly
    torch.manual_seed(2)
    e = torch.stack([s.loss(*s.args).detach() for _ in range(500)])
    tol = 4 * math.hypot(sem(c), sem(e))
    assert abs(float(c.mean() - e.mean())) < tol


class HeldOffset(VAE):
    """A program that reads a plain tensor attribute (not a buffer): a constant to the graph."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.offset = torch.zeros(self.z_dim, dtype=torch.float64)

    def encode(self, x):
        loc, scale = super().encode(x)
        return loc + self.offset, scale


def change_beta(s):
    s.module.beta = 0.5


def change_offset(s):
    s.module.offset.fill_(0.25)  # in place: the same tensor, new values


@pytest.mark.slow
@pytest.mark.parametrize("change", [change_beta, change_offset],
                         ids=["beta", "constant-in-place"])
def test_a_changed_python_value_recompiles_at_the_next_epoch_start(change, digits):
    """What the program reads from Python is held by the graph: within an epoch a change is
    not seen (documented); the look at the next epoch start sees it, says so and compiles
    the step anew, which then equals the eager step (the same noise, the same state)."""
    module, data = small(HeldOffset, digits)
    s = Setup(module, data)
    s.step(1, s.args, s.total, s.first_bad)
    graph = next(iter(s.step.graphs.values()))
    assert s.step._fingerprint(s.args) == graph.fingerprint  # (steady: no trace per epoch)
    change(s)
    start = copy.deepcopy((s.module.state_dict(), s.optimizer.state_dict(),
                           torch.get_rng_state()))
    s.step(0, s.args, s.total, s.first_bad)  # an epoch start
    assert s.lines == ["--compile: the traced step changed since it was compiled (a value the "
                       "program reads from Python, such as a beta); compiling it again"]
    assert s.step.refused is None and len(s.step.graphs) == 1
    compiled_state = copy.deepcopy((s.module.state_dict(), s.optimizer.state_dict()))
    s.module.load_state_dict(start[0])
    s.optimizer.load_state_dict(start[1])
    torch.set_rng_state(start[2])
    s.eager(0, s.args, s.total, s.first_bad)
    for key, value in s.module.state_dict().items():
        assert gap(compiled_state[0][key], value) < 1e-9, key
    for index, state in s.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert gap(compiled_state[1]["state"][index][key], value) < 1e-11, (index, key)


@pytest.mark.slow
def test_a_changed_learning_rate_is_an_input_and_compiles_nothing(digits):
    """The learning rate is an input of the graph (a schedule changes it every step): a new
    value is read at the next step with no message and no new compilation, and the step
    equals the eager step at that rate (the same noise, the same state)."""
    module, data = small(HeldOffset, digits)
    s = Setup(module, data)
    s.step(1, s.args, s.total, s.first_bad)
    graphs = dict(s.step.graphs)
    s.optimizer.param_groups[0]["lr"] = 3e-3
    start = copy.deepcopy((s.module.state_dict(), s.optimizer.state_dict(),
                           torch.get_rng_state()))
    s.step(0, s.args, s.total, s.first_bad)
    assert s.lines == [] and s.step.graphs == graphs
    compiled_state = copy.deepcopy((s.module.state_dict(), s.optimizer.state_dict()))
    s.module.load_state_dict(start[0])
    s.optimizer.load_state_dict(start[1])
    torch.set_rng_state(start[2])
    s.eager(0, s.args, s.total, s.first_bad)
    moved = max(gap(compiled_state[0][k], v) for k, v in start[0].items())
    assert moved > 1e-4  # (the step did move the weights)
    for key, value in s.module.state_dict().items():
        assert gap(compiled_state[0][key], value) < 1e-9, key


@pytest.mark.slow
def test_a_schedule_held_in_a_buffer_is_read_without_compiling_again(digits):
    """M2's alpha schedule sets a buffer in place after each epoch (on_epoch): the
    graph takes buffers as inputs, so the next epoch's step reads the new weight with no
    new compilation, and equals the eager step with the same weight, state and noise."""
    _, data, elbo, k = case("ssvae-enum", digits)
    s = Setup(family("ssvae", data, hidden=(16,), z_dim=3, m1=0, alpha_decay=0.25), data, elbo, k)
    hook(s.module, "on_epoch")(None, 0)
    s.step(1, s.args, s.total, s.first_bad)
    assert s.step.refused is None and s.step.graphs
    hook(s.module, "on_epoch")(SimpleNamespace(data=data), 2)  # the term at 1/16 of its weight
    start = copy.deepcopy((s.module.state_dict(), s.optimizer.state_dict(),
                           torch.get_rng_state()))
    s.step(0, s.args, s.total, s.first_bad)  # an epoch start: nothing changed in the graph
    assert s.lines == [] and s.step.refused is None
    compiled_state = copy.deepcopy((s.module.state_dict(), s.optimizer.state_dict()))
    s.module.load_state_dict(start[0])
    s.optimizer.load_state_dict(start[1])
    torch.set_rng_state(start[2])
    s.eager(0, s.args, s.total, s.first_bad)
    for index, state in s.optimizer.state_dict()["state"].items():
        assert gap(compiled_state[1]["state"][index]["exp_avg"], state["exp_avg"]) < 1e-11
    hook(s.module, "on_epoch")(None, 0)  # (the weight does move the gradient)
    s.module.load_state_dict(start[0])
    s.optimizer.load_state_dict(start[1])
    torch.set_rng_state(start[2])
    s.eager(0, s.args, s.total, s.first_bad)
    assert max(gap(compiled_state[1]["state"][i]["exp_avg"], state["exp_avg"])
               for i, state in s.optimizer.state_dict()["state"].items()) > 1e-6


def test_the_divergence_flag_and_loss_sum_live_in_the_graph(digits):
    module, data = small(VAE, digits)
    s = Setup(module, data)
    s.step(1, s.args, s.total, s.first_bad)
    s.step(2, s.args, s.total, s.first_bad)
    assert s.first_bad.item() == NEVER and torch.isfinite(s.total)
    with torch.no_grad():
        next(s.module.parameters()).fill_(math.nan)
    s.step(3, s.args, s.total, s.first_bad)
    s.step(4, s.args, s.total, s.first_bad)
    assert s.first_bad.item() == 3 and torch.isnan(s.total)
    s.step(9, s.args, s.total, s.first_bad)  # a jump in the index: it is re-read
    s.first_bad.fill_(NEVER)
    s.step(7, s.args, s.total, s.first_bad)
    assert s.first_bad.item() == 7


# -- whole runs ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_compiled_run_follows_the_eager_run_and_resumes_exactly(digits, tmp_path,
                                                                   monkeypatch):
    """Same seed, same noise: the compiled run's history is the eager run's (float32, other
    summation orders); interrupted mid-epoch and resumed, it equals the uninterrupted
    compiled run bit for bit, and its optimizer state keeps torch's layout."""
    from test_resume import config, interrupt_at, without_clock

    from ppl_vae.interrupt import Interrupted
    from ppl_vae.run.checkpoint import load_checkpoint
    from ppl_vae.run.train import resume_config

    clock = {"train_seconds", "compile_seconds"}
    eager = train_run(config(tmp_path / "eager"), data=digits, progress=False)
    whole = train_run(config(tmp_path / "whole", compile=True), data=digits, progress=False)
    assert whole.summary["step"] == "compiled (inductor)", whole.summary["step"]
    for a, b in zip(whole.history, eager.history, strict=True):
        for key in ("train_elbo", "test_elbo"):
            assert abs(a[key] - b[key]) < 1e-3 * abs(b[key]), (key, a[key], b[key])

    interrupt_at(monkeypatch, epoch=2, step=17)
    with pytest.raises(Interrupted):
        train_run(config(tmp_path / "cut", compile=True), data=digits, progress=False)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    reference = torch.optim.Adam(whole.module.parameters())
    reference.load_state_dict(state["optimizer"])  # torch's own Adam takes the state
    assert set(state["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["optimizer"]["state"][0]["step"].item() == 45 + 18  # one count per step
    resumed = train_run(resume_config(tmp_path / "cut"), data=digits, progress=False,
                        resume=True)
    assert resumed.summary["step"] == "compiled (inductor)"
    assert without_clock(resumed.history) == without_clock(whole.history)
    assert {k: v for k, v in resumed.summary.items() if k not in clock} == \
        {k: v for k, v in whole.summary.items() if k not in clock}
    for key, value in whole.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
