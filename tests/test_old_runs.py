"""Run directories written before the run wing's redesign (by commit e82ba23, kept in
``fixtures/runs-e82ba23.zip``: a finished VAE, the same VAE interrupted in epoch 2, and a
finished M1+M2) still evaluate, load and resume; and a resume or an evaluation reads
``checkpoint.pt`` exactly once."""

from __future__ import annotations

import csv
import functools
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from test_resume import CLOCK

from ppl_vae import TrainConfig, evaluate_run, load_run, train_run
from ppl_vae.cli import evaluate_main, train_main
from ppl_vae.run.checkpoint import load_checkpoint
from ppl_vae.run.train import resume_config

FIXTURE = Path(__file__).parent / "fixtures" / "runs-e82ba23.zip"


@pytest.fixture
def old_runs(tmp_path) -> Path:
    with zipfile.ZipFile(FIXTURE) as z:
        z.extractall(tmp_path)
    return tmp_path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if k not in CLOCK}
                for row in csv.DictReader(f)]


@pytest.mark.parametrize("name", ["vae-finished", "ssvae-finished"])
def test_an_old_run_evaluates_to_its_own_numbers(old_runs, name):
    saved = json.loads((old_runs / name / "summary.json").read_text())
    again = evaluate_run(old_runs / name)
    for key in ("test_elbo", "test_accuracy", "test_elbo_unlabelled", "m1_test_elbo"):
        if key in saved:
            assert again[key] == pytest.approx(saved[key], rel=1e-6), key


def test_an_old_run_loads_with_and_without_its_data(old_runs):
    state = load_checkpoint(old_runs / "vae-finished" / "checkpoint.pt")
    for data in (True, False):
        config, module, _ = load_run(old_runs / "vae-finished", data=data)
        assert config.epochs == 3 and config.model_options.z_dim == 2
        for key, value in state["model"].items():
            assert torch.equal(module.state_dict()[key], value), key
    config, module, _ = load_run(old_runs / "ssvae-finished", data=False)
    assert config.model_options.m1 == 3 and module.m1 is not None


def test_an_old_interrupted_run_resumes_to_the_old_code_s_end(old_runs):
    """Resumed by this version, the run interrupted in epoch 2 ends where the old code's
    uninterrupted run of the same options ended: the same rows of metrics.csv."""
    run = train_run(resume_config(old_runs / "vae-interrupted"), progress=False, resume=True)
    assert len(run.history) == 3
    assert read_csv(run.out / "metrics.csv") == read_csv(old_runs / "vae-finished" /
                                                         "metrics.csv")


class Opens:
    """Counts the reads of files named ``checkpoint.pt`` (a Python audit hook: it cannot be
    removed, so it counts only while a test holds it)."""

    active: list[str] | None = None
    installed = False

    def __enter__(self) -> list[str]:
        if not Opens.installed:
            sys.addaudithook(self._hook)
            Opens.installed = True
        Opens.active = []
        return Opens.active

    def __exit__(self, *exc) -> None:
        Opens.active = None

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        if event == "open" and Opens.active is not None and args[0] is not None and \
                str(args[0]).endswith("checkpoint.pt") and "w" not in str(args[1] or "r"):
            Opens.active.append(str(args[0]))


def test_a_resume_and_an_evaluation_read_the_checkpoint_once(old_runs, cli):
    run = old_runs / "vae-interrupted"
    with Opens() as opened:
        assert cli(train_main, ["--resume", run]).code == 0
    assert len(opened) == 1, opened
    with Opens() as opened:
        assert cli(evaluate_main, ["--run", run]).code == 0
    assert len(opened) == 1, opened
    with Opens() as opened:  # (the counter can fail: a load is a read)
        load_checkpoint(run / "checkpoint.pt")
        load_checkpoint(run / "checkpoint.pt")
    assert len(opened) == 2


def test_a_run_builds_its_model_once_and_resolves_its_recipe_once(monkeypatch, tmp_path):
    """One run: one build of the model (besides the meta-device size check) and one
    resolution of the family's recipe."""
    from ppl_vae.models import VAE
    from ppl_vae.run import session

    built, resolved = [], []
    real_init, real_resolve = VAE.__init__, session.resolve

    @functools.wraps(real_init)  # (the build reads its signature)
    def init(self, *args, **kwargs):
        if torch.get_default_device().type != "meta":  # (not the size check)
            built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "__init__", init)
    monkeypatch.setattr(session, "resolve", lambda *a: resolved.append(1) or real_resolve(*a))
    from ppl_vae.run import train as train_module

    monkeypatch.setattr(train_module, "resolve", session.resolve)
    train_run(TrainConfig(epochs=1, model_options={"hidden": (8,), "z_dim": 2},
                          out=str(tmp_path / "r")), progress=False)
    assert built == [1] and resolved == [1]
