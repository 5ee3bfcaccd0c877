"""Models defined outside the package: ``--model module:Class`` and ``register_model``."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from helpers import assert_one_line_error

from ppl_vae import Run, TrainConfig, UsageError, register_model, train, train_run
from ppl_vae.cli import train_main
from ppl_vae.models import MODELS, VAE, model_name
from ppl_vae.run.session import resolve

PLUGIN = textwrap.dedent('''
    import pyro
    import pyro.distributions as dist
    from torch import nn


    class TinyVAE(nn.Module):
        """Written outside ppl_vae, with no from_options."""

        def __init__(self, input_dim, z_dim=2, hidden=(32,)):
            super().__init__()
            self.z_dim = z_dim
            self.enc = nn.Linear(input_dim, 2 * z_dim)
            self.dec = nn.Linear(z_dim, input_dim)

        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), self.z_dim), 1.0)
                                .to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.dec(z), validate_args=False)
                            .to_event(1), obs=x)

        def guide(self, x):
            with pyro.plate("data", x.shape[0]):
                loc, log_scale = self.enc(x).chunk(2, -1)
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


    class NotAModel(nn.Module):
        pass


    NOT_A_CLASS = 3
''')


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_models", None)  # imported in-process: other tests write their own


@pytest.mark.slow
def test_model_by_import_path_trains_and_evaluates(plugin_dir, run_module):
    out = plugin_dir / "run"
    proc = run_module("ppl_vae.train", "--model", "my_models:TinyVAE", "--dataset", "digits",
                      "--epochs", "3", "--z-dim", "3", "--out", out, cwd=plugin_dir)
    assert proc.returncode == 0, proc.stderr
    # the constructor's keywords are the options; only those given are recorded
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "my_models:TinyVAE" and config["model_options"] == {"z_dim": 3}
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert state["enc.weight"].shape == (6, 64) and state["dec.weight"].shape == (64, 3)
    summary = json.loads((out / "summary.json").read_text())
    metrics = (out / "metrics.csv").read_text().splitlines()
    first, last = (float(line.split(",")[2]) for line in (metrics[1], metrics[-1]))
    assert last > first  # it learned
    proc = run_module("ppl_vae.evaluate", "--run", out, cwd=plugin_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["test_elbo"] == summary["test_elbo"]


@pytest.mark.parametrize("name, fragment", [
    ("my_models:NotAModel", "without model and guide"),
    ("my_models:NOT_A_CLASS", "is not a class"),
    ("my_models:Missing", "has no 'Missing'"),
    ("no_such_module:Thing", "cannot import 'no_such_module'"),
])
def test_bad_import_paths(plugin_dir, cli, name, fragment):
    result = cli(train_main, ["--model", name, "--dataset", "digits", "--out",
                              plugin_dir / "bad"])
    assert_one_line_error(result, "python -m ppl_vae train: error: ", fragment)


def test_register_by_call_and_decorator(digits, tmp_path):
    class Copy(VAE):
        pass

    try:
        assert register_model("copy-vae", Copy) is Copy
        assert register_model("copy-vae-2")(Copy) is Copy
        run = train(TrainConfig(model="copy-vae", model_options=dict(hidden=(16,), z_dim=2),
                                epochs=1, out=str(tmp_path / "r")), data=digits,
                    progress=False)
        assert isinstance(run, Run) and type(run.module) is Copy
        assert run.module.z_dim == 2 and run.module.encoder[0].out_features == 16
        with pytest.raises(TypeError, match="lacks model and guide"):
            register_model("broken", type("Broken", (), {}))
        # by the class alone: its name in lower case
        assert register_model(Copy) is Copy and MODELS["copy"] is Copy
        # a shipped family is not replaced, and a name --model could not read is refused
        with pytest.raises(TypeError, match="'vae' is a shipped family"):
            register_model("vae", Copy)
        for name in ("my:copy", "", 5):
            with pytest.raises(TypeError, match="register_model takes a name without ':'"):
                register_model(name, Copy)
        assert MODELS["vae"] is VAE
    finally:
        for name in ("copy-vae", "copy-vae-2", "copy", "broken"):
            MODELS.pop(name, None)


def test_a_class_itself_is_a_model(digits, tmp_path):
    class Unregistered(VAE):
        pass

    config = TrainConfig(model=Unregistered, model_options=dict(hidden=(16,), z_dim=2),
                         epochs=1, out=str(tmp_path / "r"))
    resolved, cls = resolve(config)
    assert cls is Unregistered
    assert resolved.model == model_name(Unregistered) == config.to_dict()["model"] == (
        f"{__name__}:test_a_class_itself_is_a_model.<locals>.Unregistered")
    run = train(config, data=digits, progress=False)
    assert type(run.module) is Unregistered
    saved = json.loads((run.out / "config.json").read_text())
    assert saved["model"] == resolved.model


BROKEN = '''
import pyro, pyro.distributions as dist, torch, torch.nn as nn


class Broken(nn.Module):
    def __init__(self, input_dim, z_dim=2, extra=0, wrong_outputs=0):
        super().__init__()
        self.dec = nn.Linear(z_dim + extra, input_dim + wrong_outputs)
        self.enc = nn.Linear(input_dim, 2 * z_dim)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            logits = self.dec(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, s = self.enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, s.exp()).to_event(1))
'''


@pytest.mark.parametrize("option, fragments", [
    ("extra=1", ["Broken.model((2, 64)) raised RuntimeError: mat1 and mat2",
                 "broken_models.py:14 in model: logits = self.dec(z)"]),
    ("wrong_outputs=1", ["Broken.model((2, 64)): the log-density of site 'x' raised "
                         "RuntimeError"]),
])
def test_a_plugin_that_raises_shows_its_own_frames_and_trace_shapes(tmp_path, monkeypatch, cli,
                                                                    option, fragments):
    (tmp_path / "broken_models.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli(train_main, ["--model", "broken_models:Broken", "--dataset", "digits",
                              "--model-opt", option, "--epochs", "1", "--out", tmp_path / "r"])
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("python -m ppl_vae train: error: Broken.model((2, 64))")
    assert "Traceback" not in result.err and "ppl_vae/" not in result.err  # not our internals
    assert "Trace Shapes:" in result.err and "Sample Sites:" in result.err
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)
    assert not (tmp_path / "r").exists()



HOOKED = '''
import pyro, pyro.distributions as dist, torch, torch.nn as nn


class Hooked(nn.Module):
    def __init__(self, input_dim, fail_in=""):
        super().__init__()
        self.dec, self.enc, self.fail_in = nn.Linear(2, input_dim), nn.Linear(input_dim, 4), fail_in

    def model(self, x):
        pyro.module("hooked", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("hooked", self)
        loc, s = self.enc(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, s.exp()).to_event(1))

    def pretrain(self, ctx):
        def loss(x):
            raise ArithmeticError("bad loss")

        if self.fail_in == "fit":
            ctx.fit(loss, self.enc)
        elif self.fail_in == "fit-nothing":
            ctx.fit(loss, nn.Module())

    def on_epoch(self, ctx, epoch):
        if self.fail_in == "on_epoch" and epoch == 2:
            raise KeyError("no schedule for epoch 2")

    def report(self, ctx):
        return {"ratio": 1 / 0} if self.fail_in == "report" else {}
'''


@pytest.fixture
def hooked(tmp_path, monkeypatch):
    (tmp_path / "hooked_models.py").write_text(HOOKED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hooked_models", raising=False)
    yield "hooked_models:Hooked"
    sys.modules.pop("hooked_models", None)


@pytest.mark.parametrize("fail_in, headline, frame", [
    ("on_epoch", "Hooked.on_epoch(RunContext, int) raised KeyError: 'no schedule for "
     "epoch 2'", "in on_epoch: raise KeyError("),
    ("report", "Hooked.report(RunContext) raised ZeroDivisionError: division by zero",
     "in report: return {\"ratio\": 1 / 0}"),
    ("fit", "Hooked.pretrain(RunContext) raised ArithmeticError: bad loss",
     "in loss: raise ArithmeticError("),
])
def test_a_plugin_hook_that_raises_is_one_headline_and_its_frames(hooked, tmp_path, cli,
                                                                   fail_in, headline, frame):
    """A user's hook raising, also in code of theirs a package loop called back (ctx.fit's
    loss): the hook and the user's frames, exit 2, no traceback; a finished epoch's
    checkpoint stays."""
    result = cli(train_main, ["--model", hooked, "--dataset", "digits", "--model-opt",
                              f"fail_in={fail_in}", "--epochs", "2", "--out", tmp_path / "r"])
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert lines[0] == f"python -m ppl_vae train: error: {headline}", result.err
    assert lines[1].startswith(f"  {tmp_path / 'hooked_models.py'}:") and frame in result.err
    assert "Traceback" not in result.err and "ppl_vae/" not in result.err
    assert (tmp_path / "r" / "checkpoint.pt").is_file() == (fail_in != "fit")


def test_what_the_package_raises_below_a_user_hook_is_not_the_plugin_s(hooked, digits,
                                                                        tmp_path):
    """An error raised by the package's code below the user's last frame (ctx.fit given a
    part without parameters: the package's fit refuses it) is not relabelled as the
    plug-in's own."""
    from ppl_vae.errors import PluginError

    with pytest.raises(UsageError, match="^Module has nothing to train") as raised:
        train_run(TrainConfig(model=hooked, model_options={"fail_in": "fit-nothing"},
                              epochs=1, out=str(tmp_path / "fit")), digits, progress=False)
    assert not isinstance(raised.value, PluginError)
