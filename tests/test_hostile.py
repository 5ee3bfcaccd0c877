"""The fourth round of hostile use: a plug-in's per-epoch hook, M2's options and load_run,
pre-training interrupted, copied run directories, integer options out of range. Each bad
input is one line (exit 2 from the command line) and loses nothing; each legitimate one
trains."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from conftest import SMALL_MODEL
from helpers import assert_one_line_error
from test_resume import without_clock

from ppl_vae import VAE, TrainConfig, UsageError, evaluate_run, load_run, train_run
from ppl_vae.cli import train_main
from ppl_vae.interrupt import Interrupted
from ppl_vae.run.checkpoint import load_checkpoint
from ppl_vae.run.loop import Loop
from ppl_vae.run.train import resume_config

PROG = "python -m ppl_vae train"
M2 = {"hidden": (16,), "z_dim": 2, "m1": 3, "m1_hidden": (8,)}


def small(out: Path, model=VAE, **kw) -> TrainConfig:
    settings = dict(model_options=SMALL_MODEL, dataset="digits", epochs=2, batch_size=128,
                    eval_particles=2)
    return TrainConfig(model=model, out=str(out), **{**settings, **kw})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Hooked(VAE):
    """A VAE whose on_epoch returns (or does) what ``RETURNS`` says for ``epoch``."""

    returns: object = None

    def on_epoch(self, ctx, epoch):
        what = type(self).returns
        return what(self, epoch) if callable(what) else what


def hooked(returns) -> type:
    return type("Hooked", (Hooked,), {"returns": staticmethod(returns) if callable(returns)
                                      else returns})


# -- the per-epoch hook's numbers ------------------------------------------------------------
@pytest.mark.parametrize("returns, fragment", [
    ({"test_elbo": 0.0}, "'test_elbo', which is the run's own column"),
    ({"train_elbo": 1.0}, "'train_elbo', which is the run's own column"),
    ({"train_seconds": 1.0}, "'train_seconds', which is the run's own column"),
    ({"acc": float("nan")}, "'acc': nan, not a finite real number"),
    ({"acc": "high"}, "'acc': 'high', not a finite real number"),
    ({"acc": object()}, "not a finite real number"),
    ({"acc": torch.ones(3)}, "not a finite real number"),
    ({"acc": True}, "not a finite real number"),
    ({1: 0.5}, "the key 1, which is not a name"),
    ([0.5], "returned list [0.5]; return a dict of numbers"),
    (0.5, "returned float 0.5; return a dict of numbers"),
])
def test_a_hook_s_bad_numbers_are_one_line_and_lose_nothing(tmp_path, returns, fragment):
    with pytest.raises(UsageError) as e:
        train_run(small(tmp_path / "r", hooked(returns)), progress=False)
    assert fragment in str(e.value) and "Hooked.on_epoch(ctx, " in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_hook_s_numpy_and_torch_scalars_are_numbers_and_the_run_reads_back(tmp_path):
    """Scalars of numpy and torch are converted to floats: metrics.csv has them, and the
    checkpoint stays readable (weights_only) by evaluate and load_run."""
    cls = hooked(lambda self, epoch: {"a": np.float32(0.25), "b": torch.tensor(0.5),
                                      "c": np.int64(3)} if epoch else None)
    run = train_run(small(tmp_path / "r", cls), progress=False)
    rows = read_csv(run.out / "metrics.csv")
    assert [(r["a"], r["b"], r["c"]) for r in rows] == [("0.25", "0.5", "3.0")] * 2
    assert all(isinstance(v, float) for row in run.history for v in row.values()
               if not isinstance(v, int))
    load_checkpoint(run.out / "checkpoint.pt")
    assert evaluate_run(run.out, model=cls)["test_elbo"] == pytest.approx(
        run.summary["test_elbo"])
    assert load_run(run.out, model=cls, data=False)[1] is not None


def test_numbers_that_come_and_go_between_epochs_keep_metrics_csv_whole(tmp_path):
    cls = hooked(lambda self, epoch: {f"n{epoch}": float(epoch)} if epoch else {})
    run = train_run(small(tmp_path / "r", cls, epochs=3), progress=False)
    rows = read_csv(run.out / "metrics.csv")
    assert [r["n1"] for r in rows] == ["1.0", "", ""] and rows[2]["n3"] == "3.0"


@pytest.mark.parametrize("change, name", [("replace", "weight|bias"), ("reshape", "bias")])
def test_a_hook_that_replaces_a_trained_layer_is_refused(tmp_path, change, name):
    """The optimizer holds the parameters it was built with: a new layer would never train
    (and a reshaped one breaks Adam's state). One line, and epoch 1's checkpoint stays."""
    def act(self, epoch):
        if epoch == 1 and change == "replace":
            self.decoder[0] = torch.nn.Linear(*self.decoder[0].weight.shape[::-1])
        elif epoch == 1:
            self.decoder[0].bias.data = torch.zeros(3)

    with pytest.raises(UsageError, match=r"Hooked.on_epoch\(ctx, 1\) replaced or reshaped the "
                                         rf"parameter 'decoder.0.({name})'"):
        train_run(small(tmp_path / "r", hooked(act), checkpoint_every_steps=5),
                  progress=False)
    kept = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert kept["loop"]["epoch"] == 1 and kept["loop"]["step"] > 0 and not kept["loop"]["done"]


def test_a_schedule_that_makes_the_loss_explode_is_named(tmp_path):
    """A model with a schedule of its own (on_epoch) that diverges: the advice names the
    schedule before the learning rate."""
    def act(self, epoch):
        with torch.no_grad():
            self.decoder[-1].bias.fill_(1e30 * epoch)

    with pytest.raises(UsageError, match=r"check the schedule Hooked.on_epoch sets .*, lower "
                                         r"(--)?lr, or check the data") as e:
        train_run(small(tmp_path / "r", hooked(act), epochs=3), progress=False)
    assert getattr(e.value, "exit_status", 2) == 3


# -- M2: its weight, load_run, batches, schedules, pre-training ------------------------------
@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("m2") / "r"
    return train_run(TrainConfig(model="ssvae", model_options=M2, dataset="digits",
                                 labelled=50, epochs=1, batch_size=64, eval_particles=2,
                                 out=str(out)), progress=False)


def test_load_run_without_data_rebuilds_m2_s_trained_objective(m2_run):
    """The checkpoint's data signature keeps the training split's counts, so M2's
    classification weight (derived from them) is the trained one, and so is the loss."""
    config, module, data = load_run(m2_run.out, data=False)
    assert data is None and module.aux_weight == m2_run.module.aux_weight > 40
    args = m2_run.module.data_args(m2_run.data.train.x[:64], m2_run.data.train.y[:64])
    from ppl_vae.inference.estimators import make_elbo
    from ppl_vae.inference.svi import elbo_loss

    losses = []
    for m in (m2_run.module, module):
        pyro.set_rng_seed(0)
        losses.append(elbo_loss(make_elbo("enum"), m, m.programs())(*args).item())
    assert losses[0] == losses[1]


@pytest.mark.parametrize("share", [0.001, 0.25])
def test_the_classification_weight_is_alpha_b_per_batch_at_any_share(share):
    """A share that rounds to k labelled rows per batch of B takes k / B: the weight per
    labelled row is alpha B / k, so the classification term of a batch is alpha B."""
    from ppl_vae.run.session import Session

    session = Session(TrainConfig(model="ssvae", model_options={**M2, "m1": 0, "alpha": 4.0},
                                  labelled=50, labelled_share=share, batch_size=128),
                      progress=False)
    k = max(1, round(share * 128))
    assert session.data.labelled_share == k / 128
    assert session.module.aux_weight == pytest.approx(4.0 * 128 / k)
    order = session.data.epoch_order(128, torch.Generator().manual_seed(0))
    y = session.data.train.y[order[:128]]
    assert int((y >= 0).sum()) == k


def test_a_share_with_batches_of_one_row_is_one_line(cli, tmp_path):
    result = cli(train_main, ["--model", "ssvae", "--labelled", "50", "--labelled-share", "0.5",
                              "--batch-size", "1", "--out", tmp_path / "r"])
    assert_one_line_error(result, PROG, "--labelled-share", "--batch-size 2 or more")


def test_an_alpha_decay_that_overflows_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"alpha.decay 1e\+37: the classification weight .* "
                                         r"overflows torch.float32 after epoch 1"):
        train_run(TrainConfig(model="ssvae", model_options={**M2, "m1": 0,
                                                            "alpha_decay": 1e37},
                              dataset="digits", labelled=50, epochs=3, batch_size=256,
                              eval_particles=2, out=str(tmp_path / "r")), progress=False)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_pre_training_interrupted_resumes_where_it_stopped(tmp_path, monkeypatch, ema):
    """SIGINT in M1's second epoch: the pre-training checkpoint is kept, and --resume ends
    where the uninterrupted run ends (M1's rows and M2's); with --ema too (a checkpoint of
    pre-training holds the pre-trained weights, not an average of the initial ones)."""
    def config(out):
        return TrainConfig(model="ssvae", model_options=M2, dataset="digits", labelled=50,
                           epochs=3, batch_size=64, eval_particles=2, checkpoint_every_steps=7,
                           ema=ema, out=str(tmp_path / out))

    whole = train_run(config("whole"), progress=False)
    take = Loop._take_step

    def signal_in_m1(self, i, args):
        if self.desc == "M1 VAE" and (self.state.epoch, i) == (2, 3):
            os.kill(os.getpid(), signal.SIGINT)
        return take(self, i, args)

    monkeypatch.setattr(Loop, "_take_step", signal_in_m1)
    with pytest.raises(Interrupted) as stopped:
        train_run(config("cut"), progress=False)
    assert "of pre-training; continue with --resume" in stopped.value.message
    monkeypatch.undo()
    resumed = train_run(resume_config(tmp_path / "cut"), progress=False, resume=True)
    assert without_clock(resumed.history) == without_clock(whole.history)
    m1 = [read_csv(tmp_path / d / "m1_metrics.csv") for d in ("cut", "whole")]
    assert without_clock(m1[0]) == without_clock(m1[1]) and len(m1[0]) == 3


# -- run directories and integer options ----------------------------------------------------
def test_a_copied_run_directory_resumes_twice(tmp_path, cli):
    first = tmp_path / "first"
    assert cli(train_main, ["--epochs", "1", "--hidden", "16", "--out", first]).code == 0
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    for _ in range(2):
        result = cli(train_main, ["--resume", copy])
        assert result.code == 0, result.err
    assert json.loads((copy / "config.json").read_text())["out"] == str(copy)


@pytest.mark.parametrize("value", ["100000", str(2**40), "-1"])
def test_threads_are_bounded(cli, tmp_path, value):
    result = cli(train_main, ["--threads", value, "--out", tmp_path / "r"])
    assert_one_line_error(result, PROG, "--threads must be a whole number in [0, ")
    assert not (tmp_path / "r").exists()


def test_load_run_names_python_arguments(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json in .*; give the directory a "
                                         "training run wrote") as e:
        load_run(tmp_path / "empty")
    assert "--run" not in str(e.value) and " run the directory" not in str(e.value)



# -- --compile and what a schedule rebinds -----------------------------------------------------
class Tempered(VAE):
    """A schedule that rebinds its buffer (``self.temp = torch.tensor(...)``) instead of
    filling it in place."""

    def __init__(self, input_dim, options=None, **changes):
        super().__init__(input_dim, options, **changes)
        self.register_buffer("temp", torch.ones(()))

    def on_epoch(self, ctx, epoch):
        self.temp = torch.tensor(1.0 / (1 + epoch))

    def model(self, x):
        with pyro.poutine.scale(scale=self.temp):
            super().model(x)


@pytest.mark.slow
def test_compile_follows_a_rebound_buffer(tmp_path):
    """The epoch-start look compares the tensors' identities too: the rebound buffer is
    bound and compiled again, and the compiled run follows the eager run."""
    eager = train_run(small(tmp_path / "eager", Tempered, epochs=3), progress=False)
    compiled = train_run(small(tmp_path / "compiled", Tempered, epochs=3, compile=True),
                         progress=False)
    assert compiled.summary["step"] == "compiled (inductor)"
    assert any("'temp' is another tensor object" in n for n in compiled.notes), compiled.notes
    for a, b in zip(compiled.history, eager.history, strict=True):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-4)


# -- a table of runs is a run directory ---------------------------------------------------------
TABLE = ["cvae-quadrants", "--quadrants", "1", "2", "--dataset", "digits", "--hidden", "16",
         "--z-dim", "2", "--epochs", "1", "--eval-particles", "2", "--model-opt",
         "cll_samples=4"]
EXPERIMENT = "python -m ppl_vae experiment"


def test_a_table_never_writes_over_a_training_run(cli, tmp_path):
    run = tmp_path / "run"
    assert cli(train_main, ["--epochs", "1", "--hidden", "16", "--out", run]).code == 0
    kept = (run / "summary.json").read_bytes()
    from ppl_vae.cli import experiment_main

    result = cli(experiment_main, [*TABLE, "--out", run])
    assert_one_line_error(result, EXPERIMENT, "already holds files", "--overwrite")
    assert (run / "summary.json").read_bytes() == kept


def test_a_table_resumes_with_its_own_options_and_says_how(cli, tmp_path, monkeypatch):
    """Interrupted in its second run, the table names its own --resume; that continues it
    with the options it started with (one given otherwise is refused, and --resume needs the
    table's directory)."""
    from ppl_vae.cli import experiment_main

    out = tmp_path / "table"
    take, calls = Loop._take_step, []

    def signal_in_the_second_run(self, i, args):
        if self.desc == "cvae":
            calls.append(i)
            if len(calls) == 15:  # (12 steps a run)
                os.kill(os.getpid(), signal.SIGINT)
        return take(self, i, args)

    monkeypatch.setattr(Loop, "_take_step", signal_in_the_second_run)
    result = cli(experiment_main, [*TABLE, "--out", out])
    assert result.code == 130, result.err
    assert f"quadrants-2: interrupted at epoch 1, step 3; continue the table with --resume " \
           f"--out {out}" in result.err
    monkeypatch.undo()
    for bad, fragment in ((["--z-dim", "5"], "the model option z_dim=5 contradicts the table's 2"),
                          (["--quadrants", "3"], "--quadrants 3 contradicts the table's 1 2")):
        result = cli(experiment_main, ["cvae-quadrants", "--resume", "--out", out, *bad])
        assert_one_line_error(result, EXPERIMENT, fragment)
    result = cli(experiment_main, ["cvae-quadrants", "--resume"])
    assert_one_line_error(result, EXPERIMENT, "--resume continues the table in --out DIR")
    result = cli(experiment_main, ["cvae-quadrants", "--resume", "--out", out, "--z-dim", "2"])
    assert result.code == 0, result.err
    assert json.loads((out / "summary.json").read_text())["cll"].keys() == {"1", "2"}


# -- sizes that cannot finish, and an environment torch cannot start in -------------------------
def test_an_evaluation_that_would_take_weeks_is_refused_and_the_run_finishes_later(
        tmp_path, cli):
    """A mistyped K: the run trains, its final evaluation is refused in one line (timed on
    its first pass), and --resume with a sane --eval-iwae finishes it."""
    out = tmp_path / "r"
    result = cli(train_main, ["--epochs", "1", "--hidden", "16", "--eval-iwae", "2000000000",
                              "--out", out])
    assert_one_line_error(result, PROG, "would take about", "days", "lower --eval-iwae")
    assert (out / "checkpoint.pt").is_file() and not (out / "summary.json").exists()
    result = cli(train_main, ["--resume", out, "--eval-iwae", "20"])
    assert result.code == 0, result.err
    assert json.loads((out / "summary.json").read_text())["iwae_samples"] == 20


@pytest.mark.parametrize("argv, fragments", [
    (["--snr-k", "1", str(10**20)], ["--snr-k must be whole numbers in [1, "]),
    (["--snr-k", "2", "2000000000"], ["needs about", "TB", "lower --particles, --iwae-samples, "
                                      "--snr-k or --eval-batch"]),
    (["--estimators", "iwae-dreg", "--particles", "1"],
     ["--estimators iwae-dreg: iwae-dreg weighs K >= 2 particles", "--particles 1"]),
    (["--model", "ssvae", "--labelled", "50", "--estimators", "stl"],
     ["--estimators stl:", "use enum", "those that fit this model: mc, rws, enum"]),
])
def test_compare_refuses_in_its_own_words(cli, tmp_path, argv, fragments):
    from ppl_vae.cli import compare_main

    result = cli(compare_main, ["--dataset", "digits", "--hidden", "16", "--z-dim", "2",
                                "--repeats", "3", "--no-race", *argv, "--out", tmp_path / "c"])
    assert_one_line_error(result, "python -m ppl_vae compare", *fragments)
    assert "--elbo" not in result.err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_an_inductor_cache_below_a_file_is_one_line(tmp_path, run_module):
    (tmp_path / "afile").write_text("")
    env_dir = str(tmp_path / "afile" / "cache")
    import subprocess
    import sys

    from conftest import REPO

    for args in (["-m", "ppl_vae", "train", "--help"], ["-m", "ppl_vae.train", "--help"]):
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": env_dir,
                                              "PYTHONPATH": str(REPO)})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0
        assert "from TORCHINDUCTOR_CACHE_DIR" in proc.stderr and "Not a directory" in proc.stderr


def test_an_early_stopped_m2_run_read_back_with_its_data_has_its_trained_weight(tmp_path):
    """Read back with its data (evaluate, load_run), a run that held out a validation split
    is rebuilt on the rows it trained on: M2's classification weight a = alpha N / N_l is the
    trained one, as it is when read back without the data."""
    config = TrainConfig(model="ssvae", model_options={**M2, "m1": 0}, dataset="digits",
                         labelled=50, epochs=1, early_stop=1, batch_size=256,
                         eval_particles=2, out=str(tmp_path / "r"))
    trained = train_run(config, progress=False).module.aux_weight
    _, with_data, data = load_run(tmp_path / "r")
    _, without, _ = load_run(tmp_path / "r", data=False)
    assert data.val is not None
    assert float(with_data.aux_weight) == float(without.aux_weight) == float(trained)


class WideRecipe(VAE):
    recipe = {"lr": 3e-3, "batch_size": 32}  # batch_size is not a recipe's to choose


def test_a_recipe_key_a_recipe_cannot_set_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"WideRecipe.recipe sets 'batch_size', which a recipe "
                                         r"cannot choose; it may set elbo, epochs, lr"):
        train_run(small(tmp_path / "r", model=WideRecipe), progress=False)


@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "100000000000000000000"], "--epochs must be a whole number of at most"),
    (["--batch-size", "99999999999999999999999"], "--batch-size must be a whole number of at"),
])
def test_a_whole_number_past_int64_is_one_line(cli, tmp_path, argv, fragment):
    result = cli(train_main, [*argv, "--out", tmp_path / "r"])
    assert_one_line_error(result, PROG, fragment, str(2**62))


def test_compare_repeats_past_the_sample_bound_is_one_line(cli, tmp_path):
    from ppl_vae.cli import compare_main

    result = cli(compare_main, ["--repeats", str(10**20), "--out", tmp_path / "c"])
    assert_one_line_error(result, "python -m ppl_vae compare", "--repeats must be a whole "
                          f"number in [2, {2**31}]")


class FailsLater(VAE):
    """A VAE whose guide raises on its 40th call: in training, long after its first run."""

    calls = 0

    def guide(self, x):
        FailsLater.calls += 1
        if FailsLater.calls == 40:
            raise ValueError("the guide's own bug")
        return super().guide(x)


def test_a_program_that_raises_in_training_is_one_line_and_keeps_the_checkpoint(tmp_path):
    FailsLater.calls = 0
    config = TrainConfig(model=FailsLater, model_options=SMALL_MODEL, dataset="digits",
                         epochs=3, batch_size=64, eval_particles=2, out=str(tmp_path / "r"))
    with pytest.raises(UsageError) as e:
        train_run(config, progress=False)
    head, *frames = str(e.value).splitlines()
    assert "FailsLater.guide((64, 64)): in epoch " in head
    assert "raised ValueError: the guide's own bug; the last good checkpoint" in head
    assert frames and "test_hostile.py" in frames[-1] and "the guide's own bug" in frames[-1]
    kept = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["loop"]
    at = (f"epoch {kept['epoch']}, step {kept['step']}" if kept["step"] else
          f"the start of epoch {kept['epoch']}")
    assert f"the last good checkpoint ({at}) is kept" in head, head


class ScoringFails(VAE):
    """A VAE whose model raises when scoring (eval mode) once training has begun."""

    trained = 0

    def model(self, x):
        if self.training:
            ScoringFails.trained += 1
        elif ScoringFails.trained > 10:
            raise KeyError("scoring is broken")
        return super().model(x)


def test_a_program_that_raises_while_scored_is_one_line(cli, tmp_path):
    ScoringFails.trained = 0
    result = cli(train_main, ["--model", "test_hostile:ScoringFails", "--epochs", "2",
                              "--hidden", "16", "--z-dim", "2", "--out", tmp_path / "r"])
    head, *frames = result.err.strip().splitlines()
    assert result.code == 2 and "Traceback" not in result.err
    assert head == f"{PROG}: error: model() raised KeyError: 'scoring is broken'"
    assert len(frames) == 1 and "test_hostile.py" in frames[0]


def test_a_model_that_calls_sys_exit_is_one_line(cli, tmp_path, monkeypatch):
    """SystemExit from the user's module (at import, in __init__, in model) is said in one
    line naming where, exit status 2; argparse's own exits (--help, a bad flag) stay."""
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(7)\n")
    (tmp_path / "exits.py").write_text(
        "import sys\n"
        "from ppl_vae import VAE\n\n\n"
        "class InInit(VAE):\n"
        "    def __init__(self, input_dim):\n"
        "        raise SystemExit(9)\n\n\n"
        "class InModel(VAE):\n"
        "    def model(self, x):\n"
        "        sys.exit('bye')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for model, said in (("exits_at_import:X", "SystemExit(7) in <module> at exits_at_import.py:2"),
                        ("exits:InInit", "SystemExit(9) in __init__ at exits.py:7"),
                        ("exits:InModel", "SystemExit('bye') in model at exits.py:12")):
        result = cli(train_main, ["--dataset", "digits", "--model", model, "--epochs", "1",
                                  "--out", tmp_path / model.replace(":", "-")])
        assert_one_line_error(result, PROG, f"the model's code exited ({said})")
    assert cli(train_main, ["--help"]).code == 0
    assert cli(train_main, ["--bogus"]).code == 2


class StateDictBomb(VAE):
    """A state_dict with an object a weights_only checkpoint cannot load."""

    def state_dict(self, *args, **kwargs):
        return {**super().state_dict(*args, **kwargs), "evil": object()}


class ExtraState(VAE):
    """Extra state a weights_only checkpoint loads: numbers, names, devices, dtypes, sizes."""

    def get_extra_state(self):
        return {"device": torch.device("cpu"), "dtype": torch.float64, "size": torch.Size([2]),
                "flags": [True, None, 1.5, b"x", 2j], "name": "a"}

    def set_extra_state(self, state):
        self.extra = state


def test_a_state_dict_a_checkpoint_cannot_hold_is_refused_before_training(digits, tmp_path):
    with pytest.raises(UsageError, match=r"^StateDictBomb.state_dict\(\) holds at 'evil' what "
                                         r"a checkpoint \(read with weights_only=True\) cannot "
                                         r"hold \(UnpicklingError\)"):
        train_run(TrainConfig(model=StateDictBomb, epochs=1, out=str(tmp_path / "r")), digits,
                  progress=False)
    assert not (tmp_path / "r").exists()
    options = {"z_dim": 2, "hidden": (16,)}
    run = train_run(TrainConfig(model=ExtraState, model_options=options, epochs=1,
                                out=str(tmp_path / "ok")), digits, progress=False)
    _, module, _ = load_run(run.out, model=ExtraState)
    assert module.extra["dtype"] is torch.float64 and module.extra["flags"][3] == b"x"


def test_a_second_thread_s_run_is_refused_while_one_trains(digits, tmp_path, monkeypatch):
    """Pyro's param store and effect handlers are the process's: a run started in another
    thread while one trains is one line (both failed, each blaming the model)."""
    import threading

    take, inside, go_on, done = Loop._take_step, threading.Event(), threading.Event(), []

    def waits(self, i, args):
        inside.set()
        go_on.wait(60)
        return take(self, i, args)

    monkeypatch.setattr(Loop, "_take_step", waits)
    cfg = TrainConfig(model_options=SMALL_MODEL, dataset="digits", epochs=1)
    first = threading.Thread(target=lambda: done.append(train_run(
        replace(cfg, out=str(tmp_path / "a")), digits, progress=False)))
    first.start()
    try:
        assert inside.wait(60)
        with pytest.raises(UsageError, match="another thread of this process is training"):
            train_run(replace(cfg, out=str(tmp_path / "b")), digits, progress=False)
    finally:
        go_on.set()
        first.join(120)
    assert done and not (tmp_path / "b").exists()
    monkeypatch.undo()
    train_run(replace(cfg, out=str(tmp_path / "b")), digits, progress=False)  # free again


def test_a_changed_default_dtype_is_one_line(digits):
    """torch.set_default_dtype(float64) with float32 data: one line, not a dtype clash deep in
    the guide."""
    from ppl_vae.run.session import Session

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(UsageError, match=r"default dtype is torch.float64 .* the data are "
                                             r"torch.float32"):
            Session(TrainConfig(model_options=SMALL_MODEL), progress=False)
        with pytest.raises(UsageError, match=r"train.x is torch.float32; give uint8 .* or "
                                             r"torch.float64"):  # (a caller's own data)
            Session(TrainConfig(model_options=SMALL_MODEL), digits, progress=False)
    finally:
        torch.set_default_dtype(default)


def test_training_inside_no_grad_or_inference_mode_trains_the_same(digits, tmp_path):
    cfg = TrainConfig(model_options=SMALL_MODEL, dataset="digits", epochs=1)
    plain = train_run(replace(cfg, out=str(tmp_path / "plain")), progress=False)
    for name, mode in (("no-grad", torch.no_grad), ("inference", torch.inference_mode)):
        with mode():
            run = train_run(replace(cfg, out=str(tmp_path / name)), progress=False)
        assert run.summary["test_elbo"] == plain.summary["test_elbo"]


def test_numpy_scalars_are_taken_as_python_numbers():
    """A notebook's numpy integers and floats are whole numbers and numbers (made Python's,
    so config.json is written); a numpy float for a whole number is still refused."""
    from ppl_vae.run.session import resolve

    config, _ = resolve(TrainConfig(epochs=np.int64(2), lr=np.float32(0.5), seed=np.int32(3),
                                    model_options={"z_dim": np.int64(2),
                                                   "hidden": [np.int64(16)]}))
    assert (config.epochs, config.seed, config.model_options.z_dim) == (2, 3, 2)
    assert config.lr == 0.5 and type(config.epochs) is int and type(config.lr) is float
    assert json.loads(json.dumps(config.to_dict()))["model_options"]["hidden"] == [16]
    with pytest.raises(UsageError, match="epochs takes a whole number, got np.float64"):
        TrainConfig(epochs=np.float64(2.0))


def test_a_split_by_name_and_an_empty_table_from_python(digits, tmp_path):
    from ppl_vae.experiments import cvae_quadrants
    from ppl_vae.run.session import Session

    s = Session(TrainConfig(model_options=SMALL_MODEL), digits, progress=False)
    assert torch.equal(s.score("test", 2).elbo, s.score(s.data.test, 2).elbo)
    with pytest.raises(UsageError, match=r"the name of one the data has \(train, test\), got "
                                         r"'val'"):
        s.score("val", 2)
    with pytest.raises(UsageError, match="quadrants takes one or more counts"):
        cvae_quadrants(TrainConfig(model="cvae", dataset="digits", out=str(tmp_path / "t")),
                       (), digits)


def test_under_torchrun_a_usage_line_comes_from_rank_0_and_a_repeated_signal_is_taken_once(
        cli, monkeypatch):
    """Every rank parses the command line: argparse's own error is printed by rank 0 only
    (each rank exits 2). A worker's second SIGINT/SIGTERM (a terminal's Ctrl-C, then the
    agent's) does not end it before its checkpoint and line."""
    import ppl_vae.interrupt as interrupt

    monkeypatch.setenv("RANK", "1")
    result = cli(train_main, ["--bogus"])
    assert result.code == 2 and result.err == ""
    monkeypatch.setenv("RANK", "0")
    assert_one_line_error(cli(train_main, ["--bogus"]), PROG, "unrecognized arguments: --bogus")
    monkeypatch.setattr(interrupt, "launched", lambda: True)
    guard = interrupt.Guard()
    guard.defers = True
    guard.handle(signal.SIGINT, None)
    guard.handle(signal.SIGTERM, None)  # (without torchrun: os._exit here)
    assert guard.requested == signal.SIGINT
