"""Exact resume, signals and run-directory ownership (single process; torchrun in
test_distributed.py)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL_MODEL
from helpers import assert_one_line_error

from ppl_vae import TrainConfig
from ppl_vae.cli import evaluate_main, train_main
from ppl_vae.errors import UsageError
from ppl_vae.interrupt import Interrupted
from ppl_vae.run.checkpoint import load_checkpoint
from ppl_vae.run.loop import Loop
from ppl_vae.run.rundir import RunDir
from ppl_vae.run.train import resume_config, train_run

PROG = "python -m ppl_vae train: error: "
CLOCK = {"train_seconds"}  # wall-clock figures: the only ones a resumed run may change


def config(out: Path, **kw) -> TrainConfig:
    base = dict(model_options=SMALL_MODEL, dataset="digits", batch_size=32, lr=3e-3, epochs=3,
                seed=3, out=str(out), checkpoint_every_steps=10)
    return TrainConfig(**{**base, **kw})


def without_clock(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in rows]


def interrupt_at(monkeypatch, epoch: int, step: int, signum: int = signal.SIGINT) -> None:
    """Send ourselves a real signal when the loop is about to take ``step`` of ``epoch``."""
    take = Loop._take_step

    def step_then_signal(self, i, args):
        if self.desc != "pretrain" and (self.state.epoch, i) == (epoch, step):
            os.kill(os.getpid(), signum)
        return take(self, i, args)

    monkeypatch.setattr(Loop, "_take_step", step_then_signal)


@pytest.mark.parametrize("options", [
    {},  # mid-epoch: the signal writes the checkpoint
    {"binarize": "dynamic", "early_stop": 2, "epochs": 5},  # data stream, best weights
    *({"elbo": e, "particles": k} for e, k in (("stl", 1), ("iwae-dreg", 3), ("rws", 3),
                                               ("tracegraph", 1))),  # each estimator's state
], ids=["plain", "dynamic-early-stop", "stl", "iwae-dreg", "rws", "tracegraph"])
def test_interrupted_then_resumed_equals_uninterrupted(digits, tmp_path, monkeypatch, options):
    whole = train_run(config(tmp_path / "whole", **options), progress=False)

    interrupt_at(monkeypatch, epoch=2, step=17)
    with pytest.raises(Interrupted) as stopped:
        train_run(config(tmp_path / "cut", **options), progress=False)
    assert stopped.value.status == 130
    assert stopped.value.message == (f"interrupted at epoch 2, step 18; continue with --resume "
                                     f"{tmp_path / 'cut'}")
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (state["loop"]["epoch"], state["loop"]["step"]) == (2, 18)
    rows = list(csv.DictReader((tmp_path / "cut" / "metrics.csv").open()))
    assert len(rows) == 1  # never ahead of the checkpoint
    monkeypatch.undo()

    resumed = train_run(resume_config(tmp_path / "cut"), progress=False, resume=True)
    assert without_clock(resumed.history) == without_clock(whole.history)
    assert {k: v for k, v in resumed.summary.items() if k not in CLOCK} == \
        {k: v for k, v in whole.summary.items() if k not in CLOCK}
    for key, value in whole.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    on_disk = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "cut")]
    assert {k: v for k, v in on_disk[0].items() if k not in CLOCK and k != "out"} == \
        {k: v for k, v in on_disk[1].items() if k not in CLOCK and k != "out"}


def test_resume_refuses_contradicting_options(tmp_path, cli):
    out = tmp_path / "run"
    assert cli(train_main, ["--epochs", "1", "--hidden", "16", "--out", out]).code == 0
    result = cli(train_main, ["--resume", out, "--lr", "0.5"])
    assert_one_line_error(result, PROG, "--lr", "contradicts")
    result = cli(train_main, ["--resume", out, "--hidden", "32"])
    assert_one_line_error(result, PROG, "hidden")
    # what the run already stores may be repeated; a finished run re-evaluates the same
    first = json.loads((out / "summary.json").read_text())
    result = cli(train_main, ["--resume", out, "--hidden", "16", "--epochs", "1"])
    assert result.code == 0, result.err
    again = json.loads((out / "summary.json").read_text())
    assert again["test_elbo"] == first["test_elbo"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli(train_main, ["--resume", empty]), PROG, "no checkpoint.pt there",
                          "train without --resume")
    with pytest.raises(UsageError, match="no checkpoint"):
        resume_config(empty)
    # a model option given again, agreeing or not (argparse's append once crashed here)
    assert cli(train_main, ["--resume", out, "--model-opt", "hidden=(16,)"]).code == 0
    assert_one_line_error(cli(train_main, ["--resume", out, "--model-opt", "z_dim=7"]), PROG,
                          "the model option z_dim=7 contradicts")
    # --out elsewhere is not dropped silently
    assert_one_line_error(cli(train_main, ["--resume", out, "--out", tmp_path / "other"]),
                          PROG, "drop --out")
    assert not (tmp_path / "other").exists()


def test_resume_checks_the_run_s_records(tmp_path, cli):
    """config.json must agree with the checkpoint (an edited one is named, a missing one put
    back); a corrupt checkpoint is named as corrupt and nothing is written; data that moved
    is found with --data-dir."""
    out = tmp_path / "run"
    assert cli(train_main, ["--epochs", "1", "--hidden", "16", "--out", out]).code == 0
    saved = (out / "config.json").read_text()
    (out / "config.json").write_text(saved.replace('"lr": 0.001', '"lr": 0.01'))
    assert_one_line_error(cli(train_main, ["--resume", out]), PROG, "config.json",
                          "differs from the checkpoint's options (lr)")
    (out / "config.json").unlink()
    assert cli(train_main, ["--resume", out]).code == 0
    assert json.loads((out / "config.json").read_text()) == json.loads(saved)
    moved = cli(train_main, ["--resume", out, "--data-dir", tmp_path / "elsewhere"])
    assert moved.code == 0, moved.err  # digits need no files; the new place is kept
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(
        tmp_path / "elsewhere")
    assert cli(train_main, ["--resume", out]).code == 0  # and agrees with the checkpoint

    summary = (out / "summary.json").read_bytes()
    corrupt_a_tensor(out / "checkpoint.pt")
    for main, argv in ((train_main, ["--resume", out]), (evaluate_main, ["--run", out])):
        result = cli(main, argv)
        assert result.code == 2 and "is corrupt" in result.err and "CRC-32" in result.err
        assert "\n" not in result.err.strip() and "Traceback" not in result.err
    assert (out / "summary.json").read_bytes() == summary  # the good result is kept


FORGED = {
    "epoch": lambda s: s["loop"].update(epoch=-5),
    "counts": lambda s: s["loop"].update({k: "x" for k in ("epoch", "step", "world_size")}),
    "groups": lambda s: s.update(optimizer={"state": {}, "param_groups": []}),
    "history": lambda s: s.update(history=[1, 2]),
    "ranks": lambda s: s["loop"].update(ranks=[]),
    "loop": lambda s: s.update(loop="garbage"),
    "rng": lambda s: s["loop"]["ranks"][0].update(rng=torch.zeros(3)),
}


@pytest.mark.parametrize("forged", FORGED)
def test_a_checkpoint_that_loads_but_does_not_fit_is_one_line(tmp_path, monkeypatch, cli,
                                                              forged):
    """A checkpoint forged or from elsewhere that torch loads (weights_only) but the run
    cannot continue from: one line naming it, nothing written."""
    out = tmp_path / "run"
    interrupt_at(monkeypatch, epoch=2, step=3)
    with pytest.raises(Interrupted):
        train_run(config(out), progress=False)
    monkeypatch.undo()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    FORGED[forged](state)
    torch.save(state, out / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(cli(train_main, ["--resume", out]), PROG.split(":")[0],
                          f"the checkpoint in {str(out)!r} does not fit this run (",
                          "was it replaced? restore it, or start a new run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_resume_with_another_process_count_is_refused_before_writing(tmp_path, monkeypatch,
                                                                       cli):
    """A copy of a run resumed by another number of processes: refused in one line before
    config.json (whose out names the copy) is rewritten."""
    import shutil

    interrupt_at(monkeypatch, epoch=2, step=3)
    with pytest.raises(Interrupted):
        train_run(config(tmp_path / "run"), progress=False)
    monkeypatch.undo()
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    state["loop"]["world_size"] = 2
    torch.save(state, copy / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert_one_line_error(cli(train_main, ["--resume", copy]), PROG.split(":")[0],
                          "the checkpoint was written by 2 processes and this run has 1; "
                          "resume with --nproc_per_node 2")
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def corrupt_a_tensor(path: Path) -> None:
    """Flip one bit inside a stored tensor: torch.load reads the file without complaint."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        record = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    data = bytearray(path.read_bytes())
    name, extra = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data[record.header_offset + 30 + name + extra + 17] ^= 0x40
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # (still loads: the check must be ours)


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ppl_vae", "train", "--epochs", "200", "--batch-size", "16",
         "--hidden", "32", "--z-dim", "4", "--out", str(out), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_exits_128_plus_signal(tmp_path, signum):
    out = tmp_path / "run"
    proc = _start(out, "--checkpoint-every-steps", "25")
    _wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("python -m ppl_vae train: interrupted at epoch ")
    assert lines[0].endswith(f"; continue with --resume {out}")
    state = load_checkpoint(out / "checkpoint.pt")
    where = lines[0].split("interrupted at ")[1].split(";")[0]
    assert where == f"epoch {state['loop']['epoch']}, step {state['loop']['step']}"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == ".lock"]


def test_a_second_signal_from_python_is_a_keyboard_interrupt(tmp_path, monkeypatch):
    """In a Python process (a notebook) the second signal raises KeyboardInterrupt where a
    command exits at once: the kernel lives on, its handlers restored."""
    take = Loop._take_step

    def twice(self, i, args):
        if (self.state.epoch, i) == (1, 3):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return take(self, i, args)

    monkeypatch.setattr(Loop, "_take_step", twice)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_run(config(tmp_path / "run"), progress=False)
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.slow
def test_second_signal_exits_at_once_with_the_last_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "--checkpoint-every-steps", "1")  # always writing: hit one mid-write
    _wait_for(out / "checkpoint.pt", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    state = load_checkpoint(out / "checkpoint.pt")  # intact, whichever one it is
    assert state["loop"]["epoch"] >= 1
    with RunDir.open(out, "vae", resume=True):  # a write cut short leaves nothing in the way
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_sigkill_then_resume_continues(tmp_path):
    """metrics.csv is never ahead of the checkpoint, stale temporaries do not block the
    directory, and --resume picks up where the checkpoint stands."""
    out = tmp_path / "run"
    proc = _start(out, "--checkpoint-every-steps", "7")
    _wait_for(out / "metrics.csv", proc)
    time.sleep(0.2)
    proc.kill()
    proc.communicate()
    state = load_checkpoint(out / "checkpoint.pt")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) <= len(state["history"])
    (out / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    resumed = subprocess.Popen(
        [sys.executable, "-m", "ppl_vae", "train", "--resume", str(out)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamp, end = (out / "checkpoint.pt").stat().st_mtime_ns, time.monotonic() + 60
    while (out / "checkpoint.pt").stat().st_mtime_ns == stamp:  # training again
        assert resumed.poll() is None and time.monotonic() < end, resumed.communicate()
        time.sleep(0.02)
    resumed.send_signal(signal.SIGINT)
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 130, err
    after = load_checkpoint(out / "checkpoint.pt")
    assert (after["loop"]["epoch"], after["loop"]["step"]) >= \
        (state["loop"]["epoch"], state["loop"]["step"])
    assert after["history"][: len(state["history"])] == state["history"]
    assert not (out / ".checkpoint.pt.abcd1234.tmp").exists()


@pytest.mark.slow
def test_two_runs_on_one_out_directory(tmp_path):
    """The second run is refused while the first holds the directory, which stays the
    first run's alone."""
    out = tmp_path / "run"
    first = _start(out, "--checkpoint-every-steps", "20")
    _wait_for(out / "checkpoint.pt", first)
    second = subprocess.run(
        [sys.executable, "-m", "ppl_vae", "train", "--epochs", "1", "--out", str(out),
         "--overwrite"], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip()
    assert "\n" not in err and "is in use by another run" in err, err
    assert first.poll() is None  # still training, undisturbed
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143, err
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 200 and config["model_options"]["hidden"] == [32]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"] == config
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json"] + (
        ["metrics.csv"] if state["history"] else [])


def test_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(tmp_path, cli):
    out = tmp_path / "run"
    assert cli(train_main, ["--model", "cvae", "--epochs", "1", "--hidden", "16", "--out",
                            out]).code == 0
    before = sorted(p.name for p in out.iterdir())
    assert "cll_table.csv" in before
    # diverges before its first checkpoint: the old run stays exactly as it was
    result = cli(train_main, ["--lr", "1e4", "--epochs", "1", "--hidden", "32", "--z-dim",
                              "4", "--out", out, "--overwrite"])
    assert result.code == 3, result.err
    assert sorted(p.name for p in out.iterdir()) == before
    # succeeds: nothing of the CVAE run is left
    assert cli(train_main, ["--epochs", "1", "--hidden", "16", "--out", out,
                            "--overwrite"]).code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint.pt", "config.json", "elbo_curves.png", "latent.png", "metrics.csv",
         "reconstructions.png", "samples.png", "summary.json"])


def _signal_in(monkeypatch, module, name: str, calls: int = 1) -> None:
    """SIGTERM ourselves inside the ``calls``-th call of ``module.name``."""
    real, seen = getattr(module, name), []

    def wrapped(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("where, calls, fragments, kept", [
    # the second epoch's evaluation: epoch 1's checkpoint is there
    ("score", 2, ["interrupted by SIGTERM in epoch 2, outside its steps",
                        "the checkpoint at the start of epoch 2 is kept", "continue with --resume"],
     True),
    # the first epoch's evaluation: nothing was saved yet, and the message says so
    ("score", 1, ["in epoch 1, outside its steps (evaluation or saving), before the "
                        "first checkpoint",
                        "nothing to resume"], False),
    # the figures after training: the run is checkpointed and finishes on --resume
    ("report", 1, ["after training, in its evaluation or figures", "--resume"], True),
])
def test_a_signal_outside_the_steps_says_what_is_kept(tmp_path, monkeypatch, where, calls,
                                                      fragments, kept):
    from ppl_vae.run.session import Session

    out = tmp_path / "run"
    _signal_in(monkeypatch, Session, where, calls)
    with pytest.raises(Interrupted) as stopped:
        train_run(config(out, epochs=2, checkpoint_every_steps=0), progress=False)
    assert stopped.value.status == 143
    for fragment in fragments:
        assert fragment in stopped.value.message, (fragment, stopped.value.message)
    assert (out / "checkpoint.pt").is_file() == kept
    if kept:
        monkeypatch.undo()
        resumed = train_run(resume_config(out), progress=False, resume=True)
        assert (out / "summary.json").is_file() and len(resumed.history) == 2


def test_a_signal_while_a_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM inside the epoch-end save: the checkpoint is finished, then the run stops and
    names that checkpoint (it named the one before, and the file held the new one)."""
    from ppl_vae.run import train as train_module

    out = tmp_path / "run"
    _signal_in(monkeypatch, train_module, "save_checkpoint", 1)
    with pytest.raises(Interrupted) as stopped:
        train_run(config(out, epochs=2, checkpoint_every_steps=0), progress=False)
    assert "the checkpoint at the start of epoch 2 is kept" in stopped.value.message, \
        stopped.value.message
    assert torch.load(out / "checkpoint.pt", weights_only=True)["loop"]["epoch"] == 2
    monkeypatch.undo()
    assert len(train_run(resume_config(out), progress=False, resume=True).history) == 2


def test_a_resumed_run_stopped_before_its_first_checkpoint_keeps_the_one_it_resumed(
        tmp_path, monkeypatch):
    from ppl_vae.run.session import Session

    out = tmp_path / "run"
    _signal_in(monkeypatch, Session, "score", 2)  # epoch 2's evaluation: epoch 1 is kept
    with pytest.raises(Interrupted):
        train_run(config(out, epochs=2, checkpoint_every_steps=0), progress=False)
    monkeypatch.undo()
    _signal_in(monkeypatch, Session, "on_epoch", 1)  # the resume's first call, before a step
    with pytest.raises(Interrupted) as stopped:
        train_run(resume_config(out), progress=False, resume=True)
    message = stopped.value.message
    assert "nothing to resume" not in message and "before the resumed run's first " \
        "checkpoint; the one it resumed from is kept" in message, message
    assert f"--resume {out}" in message
    monkeypatch.undo()
    assert len(train_run(resume_config(out), progress=False, resume=True).history) == 2
