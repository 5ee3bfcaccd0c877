"""The model contract: models written by other people train, evaluate, compare and draw with
no adapter, through the CLI (``--model module:Class``) and from Python.

The fixtures are in ``plugin_models.py``: copies of Pyro's own example VAE and CVAE, a
PyroModule VAE, a VAE with a global latent (PyroSample weights + AutoNormal), and a model
with an enumerated discrete latent. Exact checks: importance sampling with the exact
posterior as the proposal gives log p(x) with zero variance, for a model that cannot take a
samples dimension (the loop path) and for one with a global latent shared across chunks.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from plugin_models import (
    EnumMixtureVAE,
    GlobalLatentVAE,
    PyroExampleVAE,
    PyroModuleVAE,
)
from pyro.infer import config_enumerate
from sklearn.datasets import load_digits
from torch import nn

from ppl_vae import TrainConfig, UsageError, evaluate, score, train
from ppl_vae.cli import compare_main, evaluate_main, train_main
from ppl_vae.inference import importance
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.models import MODELS, Model, get_model, hook, register_model
from ppl_vae.run.session import resolve

REPO = Path(__file__).resolve().parents[1]
FIXTURES = "plugin_models"


@pytest.fixture(scope="module")
def digits28(tmp_path_factory) -> str:
    """scikit-learn's digits upsampled to 28x28 (Pyro's examples hard-code 784 pixels)."""
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    path = tmp_path_factory.mktemp("data") / "digits28.npz"
    np.savez(path, x=x.reshape(-1, 28, 28).numpy(), y=bunch.target)
    return f"npz:{path}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# (class name, dataset, extra CLI options)
SMALL = ["--epochs", "2", "--batch-size", "128", "--eval-particles", "3"]
CASES = {
    "PyroExampleVAE": (True, ["--z-dim", "4", "--hidden-dim", "32"]),
    "PyroExampleCVAE": (True, ["--model-opt", "z_dim=4", "--model-opt", "hidden_1=32",
                               "--model-opt", "hidden_2=32"]),
    "PyroModuleVAE": (False, ["--z-dim", "3", "--hidden", "16"]),
    "GlobalLatentVAE": (False, ["--z-dim", "3", "--hidden", "16"]),
    "EnumMixtureVAE": (False, ["--elbo", "enum", "--hidden", "16", "--z-dim", "2"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plugin_trains_evaluates_compares_and_draws_from_the_cli(name, digits28, tmp_path,
                                                                   cli):
    big, extra = CASES[name]
    data = ["--dataset", digits28] if big else ["--dataset", "digits"]
    run = tmp_path / "run"
    result = cli(train_main, ["--model", f"{FIXTURES}:{name}", *data, *SMALL, *extra,
                              "--eval-iwae", "8", "--out", run])
    assert result.code == 0, result.err
    summary = read_json(run / "summary.json")
    assert math.isfinite(summary["test_elbo"]) and summary["iwae_samples"] == 8
    # the IWAE bound lies above the ELBO of the same samples (Jensen)
    assert summary["test_log_likelihood_iwae"] >= summary["test_elbo"] - 1e-4
    assert "evaluation:" in result.out and summary["eval_method"] in result.out
    assert {"config.json", "metrics.csv", "checkpoint.pt", "elbo_curves.png"} <= {
        p.name for p in run.iterdir()}
    drawn = {p.name for p in run.glob("*.png")} - {"elbo_curves.png"}
    skipped = re.findall(r"figure (\S+) skipped: (.+)", result.out)
    for figure in ("latent.png", "reconstructions.png", "samples.png"):
        assert figure in drawn or any(figure == f for f, _ in skipped), (figure, result.out)
    config = read_json(run / "config.json")
    assert config["model"] == f"{FIXTURES}:{name}"

    # the checkpoint round-trips: re-evaluated with the same K and seed, the same numbers
    result = cli(evaluate_main, ["--run", run, "--eval-iwae", "8"])
    assert result.code == 0, result.err
    after = read_json(run / "summary.json")
    assert "evaluation:" in result.out
    for key in ("test_elbo", "test_log_likelihood_iwae"):
        assert after[key] == summary[key], key

    model_opts = [a for a in extra if a not in ("--elbo", "enum")]  # compare runs them all
    result = cli(compare_main, ["--model", f"{FIXTURES}:{name}", *data, *model_opts,
                                "--epochs", "1", "--repeats", "3", "--particles", "1", "2",
                                "--iwae-samples", "2", "--eval-batch", "16",
                                "--out", tmp_path / "cmp"])
    assert result.code == 0, result.err
    results = read_json(tmp_path / "cmp" / "results.json")
    expected = COMPARED.get(name, ("mc", "analytic", "stl", "iwae", "iwae-dreg", "rws"))
    assert results["meta"]["estimators"] == list(expected)  # every one that fits, no more
    assert {r["estimator"] for r in results["bounds"]} == {*expected, "iwae"}
    assert all(math.isfinite(r["mean"]) for r in results["bounds"])
    assert results["gradients"] and results["race_summary"]


COMPARED = {  # compare's estimators where a Normal guide's six do not all fit
    "PyroExampleCVAE": ("mc", "analytic", "stl", "iwae"),  # no samples dim: no weighers
    "GlobalLatentVAE": ("mc", "analytic", "stl", "iwae"),  # (a global latent, likewise)
    "EnumMixtureVAE": ("mc", "iwae", "rws", "enum", "tracegraph"),  # a discrete y
}


def test_pyro_example_cvae_takes_the_loop_and_says_so(digits28, tmp_path, cli):
    _, extra = CASES["PyroExampleCVAE"]
    result = cli(train_main, ["--model", f"{FIXTURES}:PyroExampleCVAE", "--dataset", digits28,
                              *SMALL, *extra, "--out", tmp_path / "run"])
    assert result.code == 0, result.err
    assert "drawn one after another" in result.out and "IndexError" in result.out
    # its observed site holds only the missing pixels: no image to draw, and it says why
    assert "figure reconstructions.png skipped: no observed site" in result.out
    assert (tmp_path / "run" / "latent.png").is_file()


@pytest.mark.parametrize("name", ["PyroModuleVAE", "GlobalLatentVAE", "EnumMixtureVAE"])
def test_plugin_classes_train_from_python(name, tmp_path, digits):
    cls = {"PyroModuleVAE": PyroModuleVAE, "GlobalLatentVAE": GlobalLatentVAE,
           "EnumMixtureVAE": EnumMixtureVAE}[name]
    options = {"hidden": 16, "z_dim": 2}
    config = TrainConfig(model=cls, model_options=options, epochs=1, eval_particles=2,
                         elbo="enum" if name == "EnumMixtureVAE" else "mc",
                         out=str(tmp_path / "run"))
    run = train(config, data=digits, progress=False)
    assert isinstance(run.module, cls) and run.module.z_dim == 2
    assert math.isfinite(run.summary["test_elbo"])
    result = evaluate(run.out, eval_iwae=4, model=cls)  # a class from a notebook
    assert result["iwae_samples"] == 4


def test_global_latent_is_one_draw_shared_by_every_row(digits):
    vae = GlobalLatentVAE(digits.input_dim, z_dim=2, hidden=8)
    s = score(vae, digits.test.x[:20], num_samples=3, iwae=True)
    assert "global latents out.weight are shared" in s.method
    assert "one after another" in s.method  # its weights cannot take a samples dimension
    # the joint bound is one number for the set, reported per row
    assert torch.allclose(s.iwae, s.iwae[:1].expand(20))


# -- exact checks of the two new evaluation paths ---------------------------------------------
class LoopOnlyGaussian(nn.Module):
    """z ~ N(0, 1), x | z ~ N(z, 1) per row; the guide is the exact posterior N(x/2, 1/2).
    The model reshapes z by the batch, so it cannot take a samples dimension."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z.view(x.shape[0]), 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))


class GlobalGaussian(nn.Module):
    """theta ~ N(0, 1), x_i | theta ~ N(theta, 1); the guide is the exact posterior
    N(sum x / (N + 1), 1 / (N + 1)) over the N rows it is given at construction."""

    def __init__(self, x):
        super().__init__()
        n = x.shape[0]
        self.post = (x.sum() / (n + 1), 1 / math.sqrt(n + 1))

    def model(self, x):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(theta, 1.0), obs=x)

    def guide(self, x):
        pyro.sample("theta", dist.Normal(*self.post))


def test_loop_path_is_exact_with_the_exact_posterior():
    x = torch.linspace(-2, 2, 7)
    s = score(LoopOnlyGaussian(), x, num_samples=5, iwae=True)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    assert "drawn one after another" in s.method
    assert torch.allclose(s.iwae, exact, atol=1e-5)
    assert torch.allclose(s.elbo, exact, atol=1e-5)  # log w is constant: ELBO = log p(x)


@pytest.mark.parametrize("max_elements", [10**6, 3])  # one chunk; chunks of one row
def test_global_latent_is_exact_and_shared_across_chunks(monkeypatch, max_elements):
    """log p(X) = log N(X; 0, I + 11^T). Were theta drawn anew per chunk, the log weights
    would vary and the bound would miss it."""
    monkeypatch.setattr(importance, "MAX_ELEMENTS", max_elements)
    x = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.1])
    n = len(x)
    exact = dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + 1).log_prob(x)
    s = score(GlobalGaussian(x), x, num_samples=6, iwae=True)
    assert "global latents theta" in s.method
    assert s.iwae.sum().item() == pytest.approx(exact.item(), abs=1e-4)
    assert s.elbo.sum().item() == pytest.approx(exact.item(), abs=1e-4)


def test_enum_elbo_is_the_exact_sum_over_the_discrete_latent():
    """For y ~ Cat(pi), x | y ~ N(mu_y, 1) and q(y|x) enumerated, TraceEnum_ELBO's loss is
    -sum_y q(y) [log p(x, y) - log q(y)] exactly; Trace_ELBO's Monte Carlo mean agrees."""
    pi = torch.tensor([0.2, 0.5, 0.3])
    mu = torch.tensor([-2.0, 0.0, 3.0])
    q = torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]])
    x = torch.tensor([0.5, -1.5])

    def model(x):
        with pyro.plate("data", 2):
            y = pyro.sample("y", dist.Categorical(pi))
            pyro.sample("x", dist.Normal(mu[y], 1.0), obs=x)

    @config_enumerate
    def guide(x):
        with pyro.plate("data", 2):
            pyro.sample("y", dist.Categorical(q))

    log_joint = pi.log() + dist.Normal(mu, 1.0).log_prob(x[:, None])
    exact = (q * (log_joint - q.log())).sum()
    enum = -make_elbo("enum").loss(model, guide, x)
    assert enum == pytest.approx(exact.item(), abs=1e-5)
    # Trace_ELBO samples y: its mean over particles agrees within 4 standard errors
    terms = log_joint - q.log()  # per data point and class
    var = (q * terms**2).sum(1) - (q * terms).sum(1) ** 2  # the two rows are independent
    mc = -make_elbo("mc", particles=20000).loss(model, guide, x)
    assert abs(mc - exact.item()) < 4 * math.sqrt(var.sum().item() / 20000)
    assert abs(mc - exact.item()) > 0  # a Monte Carlo estimate, not the exact sum


# -- every estimator for a model that calls pyro.module itself -------------------------------
@pytest.mark.parametrize("elbo,particles,jit", [("mc", 1, False), ("analytic", 1, False),
                                                 ("iwae", 2, False), ("enum", 1, False),
                                                 ("mc", 1, True), ("analytic", 1, True),
                                                 ("mc", 2, False)])
def test_pyro_example_vae_under_every_estimator(elbo, particles, jit, digits28, tmp_path):
    config = TrainConfig(model=PyroExampleVAE, model_options={"z_dim": 3, "hidden_dim": 16},
                         dataset=digits28, elbo=elbo, particles=particles,
                         jit=jit, epochs=2, batch_size=256, eval_particles=2,
                         out=str(tmp_path / "run"))
    run = train(config, progress=False)
    first, last = run.history[0]["train_elbo"], run.history[-1]["train_elbo"]
    assert math.isfinite(last) and last > first  # it learns
    # no parameter is registered twice in Pyro's param store
    store = pyro.get_param_store()
    ids = [id(store.get_param(n).unconstrained()) for n in store]
    assert len(ids) == len(set(ids))


def test_one_validation_setting_from_probe_to_last_step(digits, tmp_path):
    seen = []

    class Recording(PyroModuleVAE):
        def model(self, x):
            seen.append(pyro.infer.util.is_validation_enabled())
            return super().model(x)

    for validate in (False, True):
        seen.clear()
        train(TrainConfig(model=Recording, model_options={"hidden": 8, "z_dim": 2},
                          epochs=1, eval_particles=2, validate=validate,
                          out=str(tmp_path / f"v{validate}")), data=digits, progress=False)
        assert seen and set(seen) == {validate}


def test_grey_levels_train_a_strict_bernoulli_model(digits28, tmp_path):
    """Pyro's example VAE scores grey levels with a Bernoulli whose support check fails
    under validation: the default (validate=False) trains it; validate=True says so."""
    base = dict(model=PyroExampleVAE, model_options={"z_dim": 2, "hidden_dim": 8},
                dataset=digits28, epochs=1, eval_particles=2)
    run = train(TrainConfig(**base, out=str(tmp_path / "a")), progress=False)
    assert math.isfinite(run.summary["test_elbo"])
    with pytest.raises(ValueError, match="support|constraint"):
        train(TrainConfig(**base, validate=True, out=str(tmp_path / "b")), progress=False)


# -- building from options --------------------------------------------------------------------
def test_signature_matching_and_model_opt(digits28, tmp_path, cli):
    result = cli(train_main, ["--model", f"{FIXTURES}:PyroExampleVAE", "--dataset", digits28,
                              "--epochs", "1", "--z-dim", "3", "--model-opt", "hidden_dim=24",
                              "--eval-particles", "2", "--out", tmp_path / "run"])
    assert result.code == 0, result.err
    options = read_json(tmp_path / "run" / "config.json")["model_options"]
    assert options == {"z_dim": 3, "hidden_dim": 24}  # use_cuda keeps its own default
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert state["encoder.fc1.weight"].shape == (24, 784)
    assert state["encoder.fc21.weight"].shape == (3, 24)


def test_bad_model_options_are_one_line(digits28, tmp_path, cli, one_line_error):
    prog = "python -m ppl_vae train"
    result = cli(train_main, ["--model", f"{FIXTURES}:PyroExampleVAE", "--model-opt",
                              "components=10", "--out", tmp_path / "a"])
    one_line_error(result, prog, "no option 'components'", "hidden_dim", "z_dim")
    result = cli(train_main, ["--model", f"{FIXTURES}:PyroExampleVAE", "--model-opt",
                              "z_dim", "--out", tmp_path / "b"])
    one_line_error(result, prog, "KEY=VALUE")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_required_keyword_asks_for_model_opt(tmp_path):
    class NeedsWidth(PyroModuleVAE):
        def __init__(self, input_dim, width):
            super().__init__(input_dim, hidden=width)

    with pytest.raises(UsageError, match=r"needs width: give model_options=\{'width': VALUE\}"):
        train(TrainConfig(model=NeedsWidth, epochs=1, out=str(tmp_path / "run")))


def test_cvae_trains_from_python_with_defaults(tmp_path, digits):
    run = train(TrainConfig(model="cvae", epochs=1, eval_particles=2,
                            model_options={"cll_samples": 4}, out=str(tmp_path / "t")),
                data=digits, progress=False)
    assert "CVAE (IS)" in (run.out / "cll_table.md").read_text()
    assert read_json(tmp_path / "t" / "summary.json")["cll"].keys() == {"1"}


def test_classes_are_accepted_everywhere():
    assert get_model(PyroModuleVAE) is PyroModuleVAE
    try:
        register_model(PyroModuleVAE)
        assert MODELS["pyromodulevae"] is PyroModuleVAE
        assert resolve(TrainConfig(model=PyroModuleVAE))[0].model == "pyromodulevae"
    finally:
        MODELS.pop("pyromodulevae", None)
    config = TrainConfig(model=PyroModuleVAE, model_options={"hidden": 8})
    assert config.to_dict()["model"] == "plugin_models:PyroModuleVAE"
    assert config.model_options == {"hidden": 8}


def test_hooks_default_for_plain_modules_and_subclasses():
    plain = PyroModuleVAE(4)
    x = torch.rand(3, 4)
    assert hook(plain, "data_args")(x, None) == (x,)
    assert hook(plain, "programs")() == [(1.0, plain.model, plain.guide)]
    assert hook(plain, "pretrain")(None) is None
    assert hook(plain, "on_epoch")(None, 1) == {}
    with pytest.raises(AttributeError, match="not a hook"):
        hook(plain, "proposal")

    class Sub(Model):
        def model(self, x):
            pass

        def guide(self, x):
            pass

        def data_args(self, x, y):
            return (x, y)

    assert hook(Sub(), "data_args")(x, None) == (x, None)
    with pytest.raises(AttributeError, match="not a hook"):
        hook(plain, "forward")


def test_python_callers_see_python_settings(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UsageError) as e:
        train(TrainConfig(out=str(tmp_path / "full")))
    assert "overwrite=True" in str(e.value) and "--overwrite" not in str(e.value)
    with pytest.raises(UsageError, match="z_dim must be"):
        resolve(TrainConfig(model_options={"z_dim": 0}))


# -- the architecture and the help ------------------------------------------------------------
def test_only_models_name_a_model_family():
    pattern = re.compile(r"CVAE|'cvae'|\"cvae\"")
    offenders = []
    for path in (REPO / "ppl_vae").rglob("*.py"):
        rel = path.relative_to(REPO / "ppl_vae").as_posix()
        if rel.startswith("models/") or rel in ("__init__.py", "experiments.py"):
            continue  # (an experiment is a table of one family's runs)
        offenders += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                      if pattern.search(line)]
    assert offenders == []


def test_no_private_helpers_cross_modules():
    text = "\n".join(p.read_text() for p in (REPO / "ppl_vae").rglob("*.py"))
    assert not re.findall(r"from \S+ import .*\b_[a-z]\w*", text)


@pytest.mark.parametrize("model", ["vae", "cvae", f"{FIXTURES}:PyroExampleVAE"])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_shows_every_default(model, command, cli):
    from ppl_vae.__main__ import main
    from ppl_vae.appendix.__main__ import parser as appendix_parser
    from ppl_vae.cli import HelpFormatter, evaluate_parser, train_parser

    parsers = [train_parser(model, compare=command == "compare"), evaluate_parser(),
               appendix_parser()]
    for parser in parsers:
        formatter = HelpFormatter(parser.prog)
        for action in parser._actions:
            if action.dest == "help":
                continue
            shown = formatter._get_help_string(action)
            assert action.help, action.option_strings
            if not action.option_strings:  # a positional: required by its nature
                continue
            assert any(t in shown for t in ("(default: ", "(off unless given)", "(required)")), \
                shown
            assert "(default: True)" not in shown and "(default: False)" not in shown
    result = cli(main, [command, "--model", model, "--help"])
    assert result.code == 0
    text = re.sub(r"\s+", " ", result.out)
    assert "module:Class" in text and "--no-download never download" in text
    if model == "cvae":
        assert "--no-baseline-input do not feed" in text and "--quadrants" in text


@pytest.mark.slow
def test_one_entry_point_and_the_old_ones(tmp_path):
    """Each entry point's --help exits 0 (run as ``python -m``, in one interpreter)."""
    script = """if True:
        import runpy, sys
        for args in (["ppl_vae", "--help"], ["ppl_vae", "train", "--help"],
                     ["ppl_vae.train", "--help"], ["ppl_vae.evaluate", "--help"],
                     ["ppl_vae.compare", "--help"], ["ppl_vae", "appendix", "--help"]):
            sys.argv = ["-m", *args[1:]]
            try:
                runpy.run_module(args[0], run_name="__main__", alter_sys=True)
            except SystemExit as e:
                assert e.code in (0, None), (args, e.code)
            else:
                raise AssertionError(f"{args} did not exit")
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("usage:") == 6, proc.stdout[-2000:]
    text = (REPO / "pyproject.toml").read_text()
    assert 'ppl-vae = "ppl_vae.__main__:main"' in text


def test_a_renamed_cvae_subclass_keeps_its_families_hooks(tmp_path, digits):
    """The table and the baseline come from the class's hooks, not from its name."""
    from ppl_vae import CVAE

    class MyCVAE(CVAE):
        pass

    try:
        register_model("my-cvae", MyCVAE)
        run = train(TrainConfig(model="my-cvae", epochs=1, eval_particles=2,
                                model_options={"quadrants": 1, "hidden": (16,),
                                               "z_dim": 2, "cll_samples": 3},
                                out=str(tmp_path / "t")), data=digits, progress=False)
    finally:
        MODELS.pop("my-cvae", None)
    assert (run.out / "baseline_metrics.csv").is_file() and "cll" in run.summary
    assert (tmp_path / "t" / "cll_table.md").is_file()


def test_the_readme_third_party_model_trains_from_the_cli(tmp_path, monkeypatch, cli):
    """The README's ten-line model and its command, as written (one epoch here)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(python -m ppl_vae train [^\n]*)", section).group(1)
    (tmp_path / "my_models.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = command.split()[4:]  # after "python -m ppl_vae train"
    sys.modules.pop("my_models", None)  # this file's, not another test's module of that name
    try:
        result = cli(train_main, [*argv, "--epochs", "1"])
    finally:
        sys.modules.pop("my_models", None)  # other tests write their own my_models.py
    assert result.code == 0, result.err
    summary = read_json(tmp_path / "runs" / "tiny" / "summary.json")
    assert summary["iwae_samples"] == 100 and math.isfinite(summary["test_elbo"])
    options = read_json(tmp_path / "runs" / "tiny" / "config.json")["model_options"]
    assert options == {"z_dim": 4, "hidden": 128}


# -- regressions from an adversarial review ------------------------------------------------------
class WithTrainerNames(PyroModuleVAE):
    """Constructor keywords named like run options (lr, seed) and a required one."""

    def __init__(self, input_dim, width, lr=0.1, seed=7):
        super().__init__(input_dim, hidden=width)
        self.lr, self.seed = lr, seed


def test_model_keywords_never_take_run_flags(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "WithTrainerNames", WithTrainerNames)
    name = f"{__name__}:WithTrainerNames"
    result = cli(train_main, ["--model", name, "--help"])
    assert "required: width" in result.out and "the only way for: lr, seed" in result.out
    result = cli(train_main, ["--model", name, "--model-opt", "width=8", "--lr", "0.01",
                              "--seed", "3", "--model-opt", "lr=0.5", "--epochs", "1",
                              "--eval-particles", "2", "--out", tmp_path / "run"])
    assert result.code == 0, result.err
    config = read_json(tmp_path / "run" / "config.json")
    assert (config["lr"], config["seed"], config["epochs"]) == (0.01, 3, 1)
    assert config["model_options"] == {"width": 8, "lr": 0.5}


class ParamStoreVAE(PyroModuleVAE):
    """A global output bias kept in Pyro's param store, not in the module."""

    def model(self, x):
        bias = pyro.param("out_bias", torch.zeros(x.shape[-1]))
        scale = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z) + bias, scale).to_event(1), obs=x)


def test_param_store_values_are_saved_and_restored(tmp_path, digits):
    run = train(TrainConfig(model=ParamStoreVAE, model_options={"hidden": 8, "z_dim": 2},
                            epochs=2, lr=0.05, out=str(tmp_path / "run")), data=digits,
                progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(state["param_store"]) == {"out_bias", "noise"}
    assert not torch.equal(state["param_store"]["out_bias"], torch.zeros(64))  # trained
    pyro.clear_param_store()
    result = evaluate(run.out, model=ParamStoreVAE)
    assert result["test_elbo"] == run.summary["test_elbo"]  # the same numbers, exactly
    assert pyro.param("noise").item() == pytest.approx(state["param_store"]["noise"].item())


class PlatelessGaussian(nn.Module):
    """z_i ~ N(0, 1), x_i | z_i ~ N(z_i, 1) with no plate: to_event over the rows. The guide
    is the exact posterior N(x/2, 1/2), so every log weight is log p(X)."""

    def model(self, x):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)).to_event(1))


def test_a_model_without_a_data_plate_is_scored_jointly(monkeypatch):
    monkeypatch.setattr(importance, "MAX_ELEMENTS", 3)  # would chunk the rows if allowed
    x = torch.linspace(-2, 2, 7)
    s = score(PlatelessGaussian(), x, num_samples=4, iwae=True)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum()
    assert "no plate over the data points" in s.method and "global latents" not in s.method
    assert s.iwae.sum().item() == pytest.approx(exact.item(), abs=1e-4)
    assert s.elbo.sum().item() == pytest.approx(exact.item(), abs=1e-4)


def test_a_figure_that_fails_is_skipped_not_fatal(tmp_path, digits, monkeypatch):
    from ppl_vae.models import figures

    def broken(*args):
        raise RuntimeError("t() expects a tensor with <= 2 dimensions")

    monkeypatch.setattr(figures, "prior_predictive", broken)
    run = train(TrainConfig(model=PyroModuleVAE, model_options={"hidden": 8, "z_dim": 2},
                            epochs=1, eval_particles=2, out=str(tmp_path / "run")),
                data=digits, progress=False)
    assert "figure samples.png skipped: the program raised RuntimeError: t() expects" in (
        "\n".join(run.notes))
    assert (run.out / "summary.json").is_file() and (run.out / "latent.png").is_file()


def test_the_contract_base_class_is_not_a_model():
    with pytest.raises(UsageError, match="lacks model and guide"):
        get_model(Model)


def test_a_family_s_recipe_fills_what_the_user_leaves_out(cli):
    """Without --elbo, --epochs, --lr and --early-stop a run takes the family's recipe (M2's:
    enum, 50 epochs, 3e-3, patience 10), any plug-in's too, and RECIPE for a class without
    one; the user's values win (0 turns early stopping off); a record keeps what its run
    trained with; --help shows the chosen model's."""
    from plugin_models import EnumMixtureVAE

    from ppl_vae.cli import train_main
    from ppl_vae.config import RECIPE
    from ppl_vae.run.session import from_record, resolve

    def recipe(**kw) -> list:
        config = resolve(TrainConfig(**kw))[0]
        return [getattr(config, name) for name in RECIPE]

    assert recipe() == ["mc", 10, 1e-3, 0] == list(RECIPE.values())
    assert recipe(model="ssvae") == ["enum", 50, 3e-3, 10]
    assert recipe(model="ssvae", elbo="mc", epochs=3, lr=1e-4, early_stop=0) == \
        ["mc", 3, 1e-4, 0]
    assert recipe(model=EnumMixtureVAE) == list(RECIPE.values())  # a class without one

    class Mine(EnumMixtureVAE):
        recipe = {"elbo": "enum", "epochs": 2, "lr": 0.02}

    assert recipe(model=Mine) == ["enum", 2, 0.02, 0]
    assert resolve(TrainConfig(model="ssvae"))[0].to_dict()["lr"] == 3e-3
    record = resolve(TrainConfig(model="ssvae"))[0].to_dict() | {"lr": 1e-3, "early_stop": 0}
    assert (from_record(record)[0].lr, from_record(record)[0].early_stop) == (1e-3, 0)
    with pytest.raises(UsageError, match="epochs must be a whole number of at least 1"):
        TrainConfig(model="ssvae", epochs=0)
    with pytest.raises(UsageError, match="lr must be a positive number"):
        TrainConfig(model="ssvae", lr=0)
    shown = cli(train_main, ["--model", "ssvae", "--help"]).out
    blocks = {b.split()[0]: " ".join(b.split()) for b in re.split(r"\n(?=  --)", shown)[1:]}
    for flag, value in (("--elbo", "enum"), ("--epochs", "50"), ("--lr", "0.003"),
                        ("--early-stop", "10")):
        assert blocks[flag].endswith(f"(default: {value})"), blocks[flag]


@pytest.mark.parametrize("old, new", [("start_epoch", "on_epoch"), ("epoch_metrics", "on_epoch"),
                                      ("default_epochs", "recipe"), ("elbo_refused", "estimators")])
def test_a_class_declaring_a_retired_contract_name_is_refused(old, new):
    """A name of the contract's earlier versions would be ignored silently (a schedule never
    applied, a recipe never taken): one line names it and its replacement."""
    from plugin_models import EnumMixtureVAE

    from ppl_vae.run.session import resolve

    Old = type("Old", (EnumMixtureVAE,), {old: (lambda self, *a: None) if "epoch_" in old
                                          or old == "start_epoch" else {"x": 1}})
    with pytest.raises(UsageError, match=f"Old declares {old}, which .* replaced by {new}"):
        resolve(TrainConfig(model=Old))
