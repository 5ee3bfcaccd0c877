"""SVI training through ppl_vae.train_run: it learns, it is reproducible, its checkpoint
restores."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import numpy as np
import pyro
import pytest
import torch
from helpers import build_model
from pyro.poutine.util import is_validation_enabled

from ppl_vae import VAE, Run, TrainConfig, UsageError, plots, score, train_run
from ppl_vae.evaluation.runs import evaluate_run, load_run
from ppl_vae.run.checkpoint import load_checkpoint
from ppl_vae.run.session import from_record

TINY_MODEL = dict(hidden=(16,), z_dim=2)
TINY_TRAIN = dict(batch_size=128, lr=3e-3, eval_particles=2)


def tiny(model_options: dict | None = None, **train_options) -> TrainConfig:
    """A tiny VAE's config: TINY_MODEL updated by ``model_options``, TINY_TRAIN by the rest."""
    return TrainConfig(model_options={**TINY_MODEL, **(model_options or {})},
                       **{**TINY_TRAIN, **train_options})


def initial_model(config: TrainConfig, data):
    """The model ``train`` starts from: it seeds, clears the param store, then builds."""
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    return build_model(config, data)


def test_training_raises_the_test_elbo(trained_run, sem):
    """Three epochs on digits: a gain of several nats, far beyond the evaluation's SE."""
    run = trained_run
    x = run.data.test.x
    before = score(initial_model(run.config, run.data), x, num_samples=10)
    after = score(run.module, x, num_samples=10)
    gain = (after.elbo.mean() - before.elbo.mean()).item()
    se = math.hypot(sem(before.elbo), sem(after.elbo))
    assert gain > 5 and gain > 20 * se, (gain, se)

    assert [r["epoch"] for r in run.history] == [1, 2, 3]
    assert run.history[-1]["test_elbo"] > run.history[0]["test_elbo"]
    assert run.history[-1]["train_elbo"] > run.history[0]["train_elbo"]
    assert all(r["train_seconds"] > 0 for r in run.history)
    # the summary's test ELBO is the last epoch's (same K, same evaluation seed)
    assert run.summary["test_elbo"] == run.history[-1]["test_elbo"]
    assert run.summary["test_elbo"] == pytest.approx(after.elbo.mean().item(), abs=1e-4)
    assert (run.summary["n_train"], run.summary["n_test"]) == (1438, 359)
    assert run.summary["device"] == "cpu" and run.summary["epochs"] == 3


def test_training_is_reproducible(digits, tmp_path):
    def fit(seed, name):
        config = tiny(epochs=1, seed=seed, out=str(tmp_path / name))
        return train_run(config, data=digits, progress=False)

    a, b, c = fit(0, "a"), fit(0, "b"), fit(1, "c")
    for key, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[key]), key
    assert a.summary["test_elbo"] == b.summary["test_elbo"]
    assert a.history[0]["train_elbo"] == b.history[0]["train_elbo"]
    assert not torch.equal(a.module.decoder[0].weight, c.module.decoder[0].weight)


@pytest.mark.parametrize("model_options, options", [
    ({}, dict(elbo="mc")),
    ({}, dict(elbo="analytic", particles=2)),
    ({}, dict(elbo="iwae", particles=3)),
    (dict(likelihood="gaussian", learn_scale=True, gaussian_scale=0.5, beta=0.5),
     dict(elbo="mc")),
], ids=["mc", "analytic-2", "iwae-3", "gaussian-learned-scale"])
def test_every_parameter_is_trained(digits, tmp_path, model_options, options):
    """Every network weight (and a learned sigma) moves, and the test ELBO goes up."""
    config = tiny(model_options, epochs=2, out=str(tmp_path / "run"), **options)
    init = initial_model(config, digits)
    run = train_run(config, data=digits, progress=False)
    trained = dict(run.module.named_parameters())
    assert set(trained) == {n for n, _ in init.named_parameters()}
    for name, p in init.named_parameters():
        assert not torch.equal(p, trained[name]), f"{name} was not trained"
    x = digits.test.x
    gain = score(run.module, x).elbo.mean() - score(init, x).elbo.mean()
    assert gain > 1, gain
    if not model_options.get("learn_scale"):
        assert torch.equal(run.module.log_scale, init.log_scale)


def test_checkpoint_round_trip(trained_run):
    run = trained_run
    path = run.out / "checkpoint.pt"
    config = from_record(json.loads((run.out / "config.json").read_text()))[0]
    assert config == run.config
    fresh = build_model(config, run.data)
    fresh.load_state_dict(load_checkpoint(path)["model"])
    fresh.eval()
    x = run.data.test.x
    with torch.no_grad():
        for a, b in zip(fresh.encode(x), run.module.encode(x), strict=True):
            assert torch.equal(a, b)
        z = torch.randn(20, config.model_options.z_dim)
        assert torch.equal(fresh.decode(z), run.module.decode(z))
        assert torch.equal(fresh.reconstruct(x), run.module.reconstruct(x))
    a = score(fresh, x, num_samples=5, iwae=True, seed=7)
    b = score(run.module, x, num_samples=5, iwae=True, seed=7)
    assert torch.equal(a.elbo, b.elbo) and torch.equal(a.iwae, b.iwae)


def test_checkpoint_contents_load_weights_only(trained_run):
    run = trained_run
    state = torch.load(run.out / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "epoch", "config", "loop"}
    assert state["epoch"] == run.config.epochs
    assert state["config"] == json.loads((run.out / "config.json").read_text())
    assert set(state["model"]) == set(run.module.state_dict())
    opt = state["optimizer"]
    [group] = opt["param_groups"]
    assert group["lr"] == run.config.lr
    assert len(group["params"]) == len(list(run.module.parameters()))
    steps = run.config.epochs * math.ceil(len(run.data.train) / run.config.batch_size)
    assert all(int(s["step"]) == steps for s in opt["state"].values())
    assert len(opt["state"]) == len(group["params"])
    rng = state["loop"]["ranks"][0]["rng"]  # the random state a resume restores
    assert rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape
    torch.set_rng_state(rng.cpu())
    assert torch.equal(torch.get_rng_state(), rng)


def test_load_and_evaluate_a_run_from_python(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.out, run_dir)
    config, module, data = load_run(run_dir)
    assert config == trained_run.config and not module.training
    for key, value in module.state_dict().items():
        assert torch.equal(value, trained_run.module.state_dict()[key]), key
    assert torch.equal(data.test.x, trained_run.data.test.x)

    r = evaluate_run(run_dir, eval_iwae=20)
    how = "20 samples per data point in one vectorized pass"
    assert r["notes"] == [f"evaluation: {how}"]
    assert r["eval_method"] == how and r["iwae_samples"] == r["eval_particles"] == 20
    assert r["test_log_likelihood_iwae"] >= r["test_elbo"]  # same draws: Jensen
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "notes" not in summary
    assert {k: summary[k] for k in r if k != "notes"} == {k: v for k, v in r.items()
                                                          if k != "notes"}
    assert summary["n_train"] == 1438  # the training numbers are kept


def test_load_checkpoint_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UsageError, match="not a readable"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="no 'model'"):
        load_checkpoint(tmp_path / "other.pt")
    # arbitrary pickled objects are refused (weights_only), not executed
    torch.save({"model": {}, "x": np.dtype("float32").type}, tmp_path / "pickle.pt")
    with pytest.raises(UsageError, match="not a readable"):
        load_checkpoint(tmp_path / "pickle.pt")


def test_out_directory_rules(digits, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    config = tiny(epochs=1, out=str(out))
    # raised to a Python caller, the fix names the Python setting
    with pytest.raises(UsageError, match="already holds files.*pass overwrite=True"):
        train_run(config, data=digits, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run = train_run(tiny(epochs=1, out=str(out), overwrite=True), data=digits, progress=False)
    # --overwrite replaces the old run entirely (once the new one has a checkpoint)
    assert (run.out / "summary.json").is_file() and not (out / "notes.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        train_run(tiny(epochs=1, out=str(tmp_path / "file")), data=digits)


def test_default_run_directories_are_unique(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = train_run(tiny(epochs=1), data=digits, progress=False)
    b = train_run(tiny(epochs=1), data=digits, progress=False)
    assert a.out != b.out
    for run in (a, b):
        assert (tmp_path / run.out).parent == tmp_path / "runs"
        assert run.out.name.startswith("vae-") and (run.out / "checkpoint.pt").is_file()


def test_package_train_stays_the_function():
    import ppl_vae
    import ppl_vae.run.train
    import ppl_vae.train  # noqa: F401  (the file python -m ppl_vae.train runs)

    assert ppl_vae.train is ppl_vae.train_run is ppl_vae.run.train.train_run


def test_package_train_makes_one_run_for_a_vae(digits, tmp_path):
    import ppl_vae

    run = ppl_vae.train(tiny(epochs=1, out=str(tmp_path / "run")), data=digits, progress=False)
    assert isinstance(run, Run) and run.out == tmp_path / "run"
    assert (run.out / "summary.json").is_file()
    assert run.notes[0] == "evaluation: 2 samples per data point in one vectorized pass"
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["eval_method"] == "2 samples per data point in one vectorized pass"


@pytest.mark.parametrize("validate", [False, True])
def test_the_run_uses_its_pyro_validation_setting(digits, tmp_path, validate):
    """The whole run (probe, SVI epochs, evaluation) runs under ``config.validate``, and the
    caller's global setting is back afterwards."""
    seen = []

    class Recording(VAE):
        def model(self, x):
            seen.append(is_validation_enabled())
            return super().model(x)

    outer = not validate
    with pyro.validation_enabled(outer):
        config = TrainConfig(model=Recording, model_options=TINY_MODEL, epochs=1,
                             out=str(tmp_path / "run"), validate=validate, **TINY_TRAIN)
        train_run(config, data=digits, progress=False)
        assert is_validation_enabled() == outer
    assert seen and set(seen) == {validate}


@pytest.mark.parametrize("z_dim", [1, 2, 5])
def test_latent_figure_for_any_latent_size(tmp_path, z_dim):
    z, labels = torch.randn(50, z_dim), torch.arange(50) % 10
    plots.latent_scatter(z, labels, tmp_path / "latent.png")
    assert (tmp_path / "latent.png").read_bytes().startswith(b"\x89PNG")


def test_unlabelled_latent_figure_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.latent_scatter(torch.randn(50, 2), None, tmp_path / "latent.png")


def test_threads_default_to_the_free_cores(monkeypatch):
    """--threads 0: the cores less the load average (at least 1), shared among processes;
    OMP_NUM_THREADS set by the user stands; --threads N is N."""
    from ppl_vae.run.session import use_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        assert use_threads() == 8 and torch.get_num_threads() == 8
        assert use_threads(processes=2) == 4
        monkeypatch.setattr(os, "getloadavg", lambda: (6.8, 5.0, 4.0))  # other jobs: 1 free
        assert use_threads() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (20.0, 20.0, 20.0))
        assert use_threads() == 1
        assert use_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert use_threads() == 2
        with pytest.raises(UsageError, match=r"threads must be a whole number in \[0, "):
            TrainConfig(threads=-1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("model, extra", [("vae", {}), ("ssvae", {"labelled": 50}),
                                          ("cvae", {})])
def test_a_run_loads_without_its_dataset(tmp_path, monkeypatch, model, extra):
    """load_run(dir, data=False): the checkpoint knows the data's shapes; the module is the
    trained one, ready to sample, encode and reconstruct, and no dataset is read."""
    from ppl_vae import load_run
    from ppl_vae.run import session as session_module

    run = train_run(TrainConfig(model=model, dataset="digits", epochs=1, eval_particles=2,
                                model_options={"hidden": (16,), "z_dim": 2},
                                out=str(tmp_path / "r"), **extra), progress=False)

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(session_module, "load_dataset", no_data)
    config, module, data = load_run(tmp_path / "r", data=False)
    assert data is None and config.model == model
    for key, value in run.module.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    if model == "vae":
        x = torch.rand(3, 64)
        assert module.sample(4).shape == (4, 64)
        assert torch.equal(module.encode(x)[0], run.module.encode(x)[0])
        assert module.reconstruct(x).shape == (3, 64)
