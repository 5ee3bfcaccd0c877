"""What every trainer has: learning-rate schedules, gradient clipping, bf16, weight averaging,
KL warm-up, live logging and config files, each against an exact value, and all of them
together exact under kill-and-resume and --compile."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from dataclasses import replace

import pyro
import pytest
import torch
from helpers import assert_one_line_error
from plugin_models import EnumMixtureVAE
from pyro.infer import config_enumerate
from test_resume import interrupt_at, without_clock

from ppl_vae import TrainConfig, UsageError, train_run
from ppl_vae.cli import train_main
from ppl_vae.interrupt import Interrupted
from ppl_vae.run.session import Session, schedules
from ppl_vae.run.train import resume_config

SMALL = {"hidden": (16,), "z_dim": 2}
PROG = "python -m ppl_vae train"
ALL_ON = dict(lr_schedule="cosine", warmup_steps=50, clip_norm=10.0, ema=0.999, kl_warmup=2,
              precision="bf16", log_every_steps=5)


def config(out, **kw) -> TrainConfig:
    base = dict(model_options=SMALL, dataset="digits", batch_size=64, epochs=3, seed=2,
                eval_particles=2, out=str(out), checkpoint_every_steps=7)
    return TrainConfig(**{**base, **kw})


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- the learning rate ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_the_schedule_s_rate_at_chosen_steps_is_the_formula(kind):
    lr, floor, w, per_epoch, epochs = 2e-3, 1e-4, 10, 23, 4
    cfg = TrainConfig(lr=lr, lr_min=floor, warmup_steps=w, lr_schedule=kind, epochs=epochs)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p], lr=lr)
    sched = schedules(opt, cfg, per_epoch)["scheduler"]
    total = epochs * per_epoch
    seen = {}
    for s in range(total):
        seen[s] = opt.param_groups[0]["lr"]  # the rate step s takes
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    for s in (0, 4, w - 1, w, w + 7, total // 2, total - 1):
        u = (s - w) / (total - w)
        shape = {"cosine": (1 + math.cos(math.pi * u)) / 2, "linear": 1 - u,
                 "constant": 1.0}[kind]
        expected = lr * (s + 1) / w if s < w else floor + (lr - floor) * shape
        assert seen[s] == pytest.approx(expected, rel=1e-12), (s, seen[s], expected)


def test_a_plateau_run_watches_a_validation_split_and_keeps_its_state(tmp_path):
    """The run holds out a validation split, and its checkpoint the scheduler's state (the
    halving itself: the test below)."""
    run = train_run(config(tmp_path / "r", lr_schedule="plateau", early_stop=0, epochs=4,
                           lr=3e-3), progress=False)
    assert run.data.val is not None  # a validation split for the plateau to watch
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    plateau = state["update"]["plateau"]
    assert plateau["patience"] == 4 and plateau["factor"] == 0.5
    with pytest.raises(UsageError, match="plateau takes no warm-up"):
        TrainConfig(lr_schedule="plateau", warmup_steps=5)
    with pytest.raises(UsageError, match="lr.min 0.01 must lie below .*lr 0.001"):
        from ppl_vae.run.session import resolve

        resolve(TrainConfig(lr_schedule="cosine", lr_min=0.01))


@pytest.mark.parametrize("early_stop, n", [(0, 5), (4, 2), (2, 1), (1, 1)])
def test_plateau_halves_at_the_nth_epoch_without_a_better_one(early_stop, n):
    """Fed validation losses that stop improving after the first, the rate is halved at the
    N-th epoch in a row without a better one (N: half the early-stopping patience, at least
    1, so before the run stops; 5 without early stopping), and again N epochs later."""
    from ppl_vae.run.session import schedules

    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    plateau = schedules(opt, TrainConfig(lr_schedule="plateau", early_stop=early_stop,
                                         lr=1e-3), 10)["plateau"]
    rates = []
    for loss in [1.0] + [2.0] * (2 * n + 1):
        plateau.step(loss)
        rates.append(opt.param_groups[0]["lr"])
    assert rates[n] == 1e-3 / 2 and rates[n - 1] == 1e-3 and rates[2 * n] == 1e-3 / 4


# -- clipping and the average ---------------------------------------------------------------------
def test_a_clipped_step_is_clip_grad_norm_then_adam_and_its_norm_is_c(digits):
    s = Session(TrainConfig(model_options=SMALL, clip_norm=5.0), digits, progress=False)
    step = s.step()
    args = s.args(s.data.train, slice(0, 64))
    reference = {k: v.clone() for k, v in s.module.state_dict().items()}
    twin = Session(TrainConfig(model_options=SMALL), digits, progress=False)
    twin.module.load_state_dict(reference)
    plain = twin.step()
    pyro.set_rng_seed(1)
    total, bad = torch.zeros(()), torch.zeros((), dtype=torch.long)
    step(0, args, total, bad)
    pyro.set_rng_seed(1)
    plain.optimizer.zero_grad()
    plain.gradient(*args)
    raw = torch.nn.utils.clip_grad_norm_(plain.params, 5.0)
    assert raw > 5.0 and float(step.grad_norm) == pytest.approx(float(raw), rel=1e-6)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.params]))
    assert float(clipped) == pytest.approx(5.0, rel=1e-5)
    plain.optimizer.step()
    for (name, a), b in zip(s.module.state_dict().items(), twin.module.state_dict().values(),
                            strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), name
    assert int(step.clipped) == 1


def test_the_average_after_k_steps_is_the_formula(digits):
    """a_K = d^K theta_0 + (1 - d) sum_k d^(K-k) theta_k, the parameters after each step."""
    d = 0.9
    s = Session(TrainConfig(model_options=SMALL, ema=d), digits, progress=False)
    step = s.step()
    args = s.args(s.data.train, slice(0, 32))
    p = step.params[0]
    thetas = [p.detach().clone()]
    total, bad = torch.zeros(()), torch.zeros((), dtype=torch.long)
    for i in range(6):
        step(i, args, total, bad)
        thetas.append(p.detach().clone())
    k = len(thetas) - 1
    expected = d ** k * thetas[0] + sum((1 - d) * d ** (k - j) * thetas[j] for j in range(1, k + 1))
    assert torch.allclose(step.ema[0], expected, rtol=1e-5, atol=1e-7)
    with step.averaged():
        assert torch.equal(p, step.ema[0])
    assert torch.equal(p, thetas[-1])  # (its own values after)


def test_the_logged_scalars_cover_the_steps_since_the_last_log(digits, monkeypatch):
    """Each log's train/grad_norm is the mean of the steps' pre-clip norms since the last log
    (a window may span an epoch's end; the partial last batch counts as one step),
    train/loss the loss per row over those steps, and train/lr the rate the last step took."""
    from ppl_vae.inference.svi import Step
    from ppl_vae.run.loop import Loop

    cfg = TrainConfig(model_options=SMALL, clip_norm=1e6, log="tensorboard", log_every_steps=5,
                      batch_size=64, epochs=5, lr_schedule="cosine")
    s = Session(cfg, digits, progress=False)
    step, norms, losses, rows, rates, logged = s.step(), [], [], [], [], {}
    real = Step.__call__

    def recorded(self, i, args, total, first_bad):
        before, lr = (float(self.grad_norm), float(total)), self.optimizer.param_groups[0]["lr"]
        real(self, i, args, total, first_bad)
        norms.append(float(self.grad_norm) - before[0])
        losses.append(float(total) - before[1])
        rows.append(args[0].shape[0])
        rates.append(lr)

    class Logger:
        def scalars(self, at, values):
            logged[at] = values

    monkeypatch.setattr(Step, "__call__", recorded)
    s.logger = Logger()
    loop = Loop(s, step)
    loop.run()
    per_epoch = math.ceil(len(s.data.train) / 64)
    assert len(s.data.train) % 64 and per_epoch * 5 == len(norms) and per_epoch % 5
    for at, values in logged.items():
        first = max(at - 5, 0)
        assert values["train/grad_norm"] == pytest.approx(
            sum(norms[first:at]) / (at - first), rel=1e-5), at
        assert values["train/loss"] == pytest.approx(
            sum(losses[first:at]) / sum(rows[first:at]), rel=1e-4), at
        assert values["train/lr"] == rates[at - 1] != rates[at - 2], at
    assert 5 * per_epoch in logged  # (a log at the partial last batch: 5 epochs of 23 steps)


# -- the KL warm-up and precision -----------------------------------------------------------------
def test_the_kl_weight_per_epoch_and_what_it_scales(tmp_path, digits):
    """Epoch e trains with min(1, (e - 1) / N) on the latent sites: the loss at weight 0 is
    the reconstruction term alone, at weight w the reconstruction plus w times the KL."""
    weights = []
    s = Session(TrainConfig(model_options=SMALL, kl_warmup=3, elbo="analytic"), digits,
                progress=False)
    step = s.step()
    for epoch in range(6):
        s.on_epoch(epoch)
        weights.append(float(s.schedule.kl_weight))
    assert weights == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0], rel=1e-7)
    args = s.args(s.data.train, slice(0, 16))
    losses = []
    for w in (0.0, 0.5, 1.0):
        s.schedule.kl_weight.fill_(w)
        pyro.set_rng_seed(3)
        losses.append(step.loss(*args).item())
    assert losses[1] == pytest.approx((losses[0] + losses[2]) / 2, rel=1e-5)
    assert losses[0] < losses[2]  # (the KL is positive)


class SummedOutInTheModel(EnumMixtureVAE):
    """EnumMixtureVAE with y enumerated in the model and a guide for z alone."""

    @config_enumerate
    def model(self, x):
        super().model(x)

    def guide(self, x):
        pyro.module("mixture_vae", self)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encode(self._cat(x, x.new_zeros(self.k))).chunk(2, -1)
            pyro.sample("z", pyro.distributions.Normal(loc, log_scale.exp()).to_event(1))


def test_kl_warm_up_with_enumeration(digits):
    """Enumerated in the guide (M2's way), the warm-up scales y and z alike and trains; summed
    out in the model, TraceEnum_ELBO needs the site and x at one scale: refused in one line."""
    cfg = TrainConfig(model=EnumMixtureVAE, elbo="enum", kl_warmup=2, epochs=1)
    s = Session(cfg, digits, progress=False)
    step = s.step()
    s.on_epoch(1)
    assert math.isfinite(step.loss(*s.args(s.data.train, slice(0, 8))).item())
    with pytest.raises(UsageError, match="kl.warmup scales the latent sites, but the model "
                                         "sums out 'y'"):
        Session(replace(cfg, model=SummedOutInTheModel), digits, progress=False).step()


def test_bf16_keeps_the_elbo_s_terms_float32(digits):
    from pyro import poutine

    s = Session(TrainConfig(model_options=SMALL, precision="bf16"), digits, progress=False)
    step = s.step()
    args = s.args(s.data.train, slice(0, 8))
    seen = []
    real = poutine.trace_messenger.TraceMessenger._postprocess_message

    def record(self, msg):
        if msg["type"] == "sample":
            seen.append((msg["name"], msg["fn"].log_prob(msg["value"]).dtype,
                         torch.is_autocast_enabled("cpu")))
        return real(self, msg)

    poutine.trace_messenger.TraceMessenger._postprocess_message = record
    try:
        loss = step.loss(*args)
    finally:
        poutine.trace_messenger.TraceMessenger._postprocess_message = real
    assert loss.dtype == torch.float32
    assert {n for n, _, _ in seen} >= {"z", "x"} and all(on for _, _, on in seen)
    assert all(dtype == torch.float32 for _, dtype, _ in seen), seen
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (the networks do run in bf16)
        assert s.module.decoder[0](torch.ones(1, 2)).dtype == torch.bfloat16
    with pytest.raises(UsageError, match="fp16 needs a gradient scaler"):
        TrainConfig(precision="fp16")


# -- all of it, interrupted, compiled, logged -----------------------------------------------------
def events(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if "images_per_s" not in tag and "seconds" not in tag}


def _all_on(tmp_path, monkeypatch, **kw) -> None:
    whole = train_run(config(tmp_path / "whole", log="tensorboard", **ALL_ON, **kw),
                      progress=False)
    interrupt_at(monkeypatch, epoch=2, step=11, signum=signal.SIGTERM)
    with pytest.raises(Interrupted):
        train_run(config(tmp_path / "cut", log="tensorboard", **ALL_ON, **kw), progress=False)
    monkeypatch.undo()
    resumed = train_run(resume_config(tmp_path / "cut"), progress=False, resume=True)
    assert without_clock(resumed.history) == without_clock(whole.history)
    assert {k: v for k, v in resumed.summary.items() if "seconds" not in k} == \
        {k: v for k, v in whole.summary.items() if "seconds" not in k}
    assert events(tmp_path / "cut") == events(tmp_path / "whole")
    # the event file holds metrics.csv's numbers (float32, as TensorBoard keeps them)
    logged = events(tmp_path / "whole")
    for row in read_csv(tmp_path / "whole" / "metrics.csv"):
        for key in ("test_elbo", "train_elbo", "val_elbo"):
            if key in row and row[key]:
                values = [v for _, v in logged[f"epoch/{key}"]]
                assert float(torch.tensor(float(row[key]))) in values, (key, row[key])
    assert whole.summary["clipped_steps"] > 0
    return whole


def test_everything_at_once_resumes_exactly_with_its_event_stream(tmp_path, monkeypatch):
    _all_on(tmp_path, monkeypatch)


@pytest.mark.slow
def test_everything_at_once_compiled_resumes_exactly_without_recompiling(tmp_path,
                                                                        monkeypatch):
    whole = _all_on(tmp_path, monkeypatch, compile=True)
    assert whole.summary["step"] == "compiled (inductor)"
    assert not [n for n in whole.notes if "compiling it again" in n], whole.notes
    eager = train_run(config(tmp_path / "eager", **ALL_ON), progress=False)
    for a, b in zip(whole.history, eager.history, strict=True):
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-4)


def test_mlflow_continues_its_run_without_repeating_steps(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow

    interrupt_at(monkeypatch, epoch=2, step=11, signum=signal.SIGTERM)
    with pytest.raises(Interrupted):
        train_run(config(tmp_path / "cut", log="mlflow", log_every_steps=5, clip_norm=10.0),
                  progress=False)
    monkeypatch.undo()
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "cut" / "mlruns").as_uri())
    run_id = (tmp_path / "cut" / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    train_run(resume_config(tmp_path / "cut"), progress=False, resume=True)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train.loss")]
    assert steps == sorted(set(steps)) and steps[0] == 5 and len(steps) == 3 * 23 // 5
    tests = [m.value for m in client.get_metric_history(run_id, "epoch.test_elbo")]
    assert tests == [float(r["test_elbo"]) for r in read_csv(tmp_path / "cut" / "metrics.csv")]
    assert client.get_run(run_id).data.params["clip_norm"] == "10.0"


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_a_logged_run_overwriting_another_logs_into_the_directory(tmp_path, monkeypatch, kind):
    """Under --overwrite the run is staged until its first checkpoint: the logger opens in the
    run directory then, with what was logged before; a run failing before leaves the old run
    and its log as they were."""
    pytest.importorskip(kind)
    out = tmp_path / "run"
    train_run(config(out, log=kind, epochs=1), progress=False)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    from ppl_vae.run.loop import Loop

    take = Loop._take_step

    def failing(loop, i, args):  # (at step 4, before the first checkpoint at step 7)
        if i == 3:
            raise KeyError("failed")
        return take(loop, i, args)

    monkeypatch.setattr(Loop, "_take_step", failing)
    with pytest.raises(KeyError):
        train_run(config(out, log=kind, log_every_steps=2, overwrite=True), progress=False)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    train_run(config(out, log=kind, log_every_steps=5, overwrite=True), progress=False)
    if kind == "tensorboard":
        assert [s for s, _ in events(out)["train/loss"]] == list(range(5, 3 * 23 + 1, 5))
    else:
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
        run_id = (out / "mlflow_run_id").read_text().strip()
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run_id, "train.loss")]
        assert steps == list(range(5, 3 * 23 + 1, 5))
    assert not list(out.glob(".staging-*"))


class NoParameters(torch.nn.Module):
    """A model and guide with nothing to train."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pyro.distributions.Bernoulli(0.5 * torch.ones(64)).to_event(1),
                        obs=x)

    def guide(self, x):
        pass


def test_nothing_to_train_and_an_overflowing_learning_rate_are_one_line(cli, tmp_path, digits):
    with pytest.raises(UsageError, match="^NoParameters has nothing to train: no nn.Parameter"):
        Session(TrainConfig(model=NoParameters), digits, progress=False).step()
    result = cli(train_main, ["--dataset", "digits", "--lr", "1e39", "--out", tmp_path / "r"])
    assert_one_line_error(result, PROG, "--lr must be a positive number up to 1e+38, got 1e+39")


def test_a_missing_logging_package_is_one_line(cli, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    result = cli(train_main, ["--epochs", "1", "--hidden", "16", "--log", "tensorboard",
                              "--out", tmp_path / "r"])
    assert_one_line_error(result, PROG, "--log tensorboard needs the tensorboard package",
                          'pip install -e ".[tensorboard]"')


# -- config files ---------------------------------------------------------------------------------
def test_a_run_s_config_json_repeats_it_bit_for_bit(cli, tmp_path):
    first = tmp_path / "first"
    assert cli(train_main, ["--epochs", "2", "--hidden", "16", "--lr-schedule", "linear",
                            "--ema", "0.9", "--threads", "1", "--out", first]).code == 0
    again = tmp_path / "again"
    assert cli(train_main, ["--config", first / "config.json", "--out", again]).code == 0
    assert without_clock(read_csv(again / "metrics.csv")) == \
        without_clock(read_csv(first / "metrics.csv"))
    yaml_file = tmp_path / "options.yaml"
    yaml_file.write_text("epochs: 1\nlr_schedule: cosine\nmodel_options:\n  hidden: [8]\n")
    assert cli(train_main, ["--config", yaml_file, "--z-dim", "3", "--out",
                            tmp_path / "y"]).code == 0
    saved = json.loads((tmp_path / "y" / "config.json").read_text())
    assert (saved["epochs"], saved["lr_schedule"], saved["model_options"]["hidden"],
            saved["model_options"]["z_dim"]) == (1, "cosine", [8], 3)
    (tmp_path / "bad.yaml").write_text("lrr: 1\n")
    assert_one_line_error(cli(train_main, ["--config", tmp_path / "bad.yaml"]), PROG,
                          "'lrr' is not an option of a run")
    assert os.path.isdir(first)


def test_config_files_with_resume_compare_and_yaml_numbers(cli, tmp_path):
    """--config with --resume is refused (train and experiment: it would be ignored); compare
    reads a run's config.json without its directory or its training-only options; YAML's
    1e-3 is a number."""
    from ppl_vae.cli import _parse, experiment_main

    first = tmp_path / "first"
    assert cli(train_main, ["--epochs", "1", "--hidden", "16", "--ema", "0.9", "--out",
                            first]).code == 0
    file = first / "config.json"
    assert_one_line_error(cli(train_main, ["--config", file, "--resume", first]), PROG,
                          "--config starts a run; --resume continues one")
    assert_one_line_error(cli(experiment_main, ["cvae-quadrants", "--resume", "--config", file,
                                                "--out", tmp_path / "t"]),
                          "python -m ppl_vae experiment", "--config starts a run")
    args = _parse(["--config", str(file)], compare=True)
    assert "out" not in args and "ema" not in args and args["epochs"] == 1
    yaml_file = tmp_path / "o.yaml"
    yaml_file.write_text("lr: 1e-3\nclip_norm: 2.5E+1\n")
    args = _parse(["--config", str(yaml_file)])
    assert (args["lr"], args["clip_norm"]) == (1e-3, 25.0)


def test_config_files_cannot_replace_a_run_or_slip_past_the_checks(cli, tmp_path, monkeypatch):
    """A run's config.json given back without --out names that run's directory: its
    --overwrite is not taken from the file, so the run is refused and kept. null, values of
    the wrong type and keys that are not strings are one line naming the file's key; a
    flag is never an abbreviation (--kl-warm is not --kl-warmup)."""
    first = tmp_path / "first"
    assert cli(train_main, ["--epochs", "1", "--hidden", "16", "--out", first,
                            "--overwrite"]).code == 0
    (first / "mine.txt").write_text("keep")
    result = cli(train_main, ["--config", first / "config.json", "--epochs", "2"])
    assert result.code == 2 and (first / "mine.txt").read_text() == "keep"
    for text, said in [('{"dataset": null}', "key 'dataset' takes a string, got None"),
                       ('{"epochs": "1"}', "key 'epochs' takes a whole number, got '1'"),
                       ('{"ema": null}', "key 'ema' takes a number, got None"),
                       ('{"model_options": {"z_dim": 0}}',  # (the model's own, by key too)
                        "key 'model_options.z_dim' must be a whole number of at least 1")]:
        (tmp_path / "c.json").write_text(text)
        assert_one_line_error(cli(train_main, ["--config", tmp_path / "c.json"]), PROG, said)
    (tmp_path / "k.yaml").write_text("1: 2\nfoo: 3\n")
    assert_one_line_error(cli(train_main, ["--config", tmp_path / "k.yaml"]), PROG,
                          "1 is not an option of a run")
    assert_one_line_error(cli(train_main, ["--kl-warm", "2", "--out", tmp_path / "a"]), PROG,
                          "unrecognized arguments: --kl-warm 2")


def test_mlflow_takes_a_relative_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    train_run(config("relative", log="mlflow", epochs=1), progress=False)
    assert (tmp_path / "relative" / "mlruns").is_dir()


@pytest.mark.parametrize("ema, said", [(0.999, True), (0.9, False)])
def test_an_average_longer_than_half_the_run_is_said(ema, digits, said):
    """1/(1 - D) steps against the run's: 0.999 over 3 epochs of 23 steps keeps 93% of the
    initial weights, and the run says so with the numbers; 0.9 says nothing."""
    lines = []
    Session(TrainConfig(model_options=SMALL, ema=ema, epochs=3, batch_size=64), digits,
            progress=False).step(log=lines.append)
    notes = [line for line in lines if line.startswith("--ema")]
    steps = 3 * math.ceil(len(digits.train) / 64)
    assert notes == ([f"--ema 0.999 averages over about 1,000 steps, more than half of this "
                      f"run's {steps}: the average still holds much of the initial weights "
                      f"(0.999**{steps} = {0.999 ** steps:.0%} at the end); a smaller D "
                      "follows the training"] if said else [])


@pytest.mark.parametrize("warmup, said", [(100, True), (30, False)])
def test_a_warm_up_longer_than_the_run_is_said(warmup, digits, said):
    """More warm-up steps than the run takes: the learning rate never reaches --lr, said with
    where it ends (3 epochs of 23 steps: 69 of 100, 69%); a shorter warm-up says nothing."""
    lines = []
    Session(TrainConfig(model_options=SMALL, warmup_steps=warmup, epochs=3, batch_size=64),
            digits, progress=False).step(log=lines.append)
    notes = [line for line in lines if line.startswith("--warmup-steps")]
    assert notes == (["--warmup-steps 100 is more than this run's 69 steps: the learning rate "
                      "ends at 69% of --lr 0.001, never reaching it"] if said else [])
