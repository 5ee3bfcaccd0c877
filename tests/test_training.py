"""SVI training through ppl_vae.train: it learns, it is reproducible, its checkpoint restores."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pyro
import pytest
import torch

from ppl_vae import TrainConfig, UsageError, plots, score
from ppl_vae.checkpoint import load_checkpoint, restore_rng
from ppl_vae.run import build_model, train

TINY = dict(hidden=(16,), z_dim=2, batch_size=128, lr=3e-3, eval_particles=2)


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
        config = TrainConfig(epochs=1, seed=seed, out=str(tmp_path / name), **TINY)
        return train(config, data=digits, progress=False)

    a, b, c = fit(0, "a"), fit(0, "b"), fit(1, "c")
    for key, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[key]), key
    assert a.summary["test_elbo"] == b.summary["test_elbo"]
    assert a.history[0]["train_elbo"] == b.history[0]["train_elbo"]
    assert not torch.equal(a.module.decoder[0].weight, c.module.decoder[0].weight)


@pytest.mark.parametrize("options", [
    dict(elbo="mc"),
    dict(elbo="analytic", particles=2),
    dict(elbo="iwae", particles=3),
    dict(elbo="mc", likelihood="gaussian", learn_scale=True, gaussian_scale=0.5, beta=0.5),
], ids=["mc", "analytic-2", "iwae-3", "gaussian-learned-scale"])
def test_every_parameter_is_trained(digits, tmp_path, options):
    """Every network weight (and a learned sigma) moves, and the test ELBO goes up."""
    config = TrainConfig(epochs=2, out=str(tmp_path / "run"), **{**TINY, **options})
    init = initial_model(config, digits)
    run = train(config, data=digits, progress=False)
    trained = dict(run.module.named_parameters())
    assert set(trained) == {n for n, _ in init.named_parameters()}
    for name, p in init.named_parameters():
        assert not torch.equal(p, trained[name]), f"{name} was not trained"
    x = digits.test.x
    gain = score(run.module, x).elbo.mean() - score(init, x).elbo.mean()
    assert gain > 1, gain
    if not options.get("learn_scale"):
        assert torch.equal(run.module.log_scale, init.log_scale)


def test_checkpoint_round_trip(trained_run):
    run = trained_run
    path = run.out / "checkpoint.pt"
    config = TrainConfig.from_dict(json.loads((run.out / "config.json").read_text()))
    assert config == run.config
    fresh = build_model(config, run.data)
    fresh.load_state_dict(load_checkpoint(path)["model"])
    fresh.eval()
    x = run.data.test.x
    with torch.no_grad():
        for a, b in zip(fresh.encode(x), run.module.encode(x), strict=True):
            assert torch.equal(a, b)
        z = torch.randn(20, config.z_dim)
        assert torch.equal(fresh.decode(z), run.module.decode(z))
        assert torch.equal(fresh.reconstruct(x), run.module.reconstruct(x))
    a = score(fresh, x, num_samples=5, iwae=True, seed=7)
    b = score(run.module, x, num_samples=5, iwae=True, seed=7)
    assert torch.equal(a.elbo, b.elbo) and torch.equal(a.iwae, b.iwae)


def test_checkpoint_contents_load_weights_only(trained_run):
    run = trained_run
    state = torch.load(run.out / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "epoch", "config", "rng"}
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
    rng = state["rng"]["torch"]
    assert rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape
    restore_rng(state)
    assert torch.equal(torch.get_rng_state(), rng)


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
    config = TrainConfig(epochs=1, out=str(out), **TINY)
    with pytest.raises(UsageError, match="already holds files"):
        train(config, data=digits, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run = train(TrainConfig(epochs=1, out=str(out), overwrite=True, **TINY), data=digits,
                progress=False)
    assert (run.out / "summary.json").is_file() and (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        train(TrainConfig(epochs=1, out=str(tmp_path / "file"), **TINY), data=digits)


def test_default_run_directories_are_unique(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = train(TrainConfig(epochs=1, **TINY), data=digits, progress=False)
    b = train(TrainConfig(epochs=1, **TINY), data=digits, progress=False)
    assert a.out != b.out
    for run in (a, b):
        assert (tmp_path / run.out).parent == tmp_path / "runs"
        assert run.out.name.startswith("vae-") and (run.out / "checkpoint.pt").is_file()


def test_package_train_stays_the_function():
    import ppl_vae
    import ppl_vae.run
    import ppl_vae.train  # noqa: F401  (the file python -m ppl_vae.train runs)

    assert ppl_vae.train is ppl_vae.run.train


@pytest.mark.parametrize("z_dim", [1, 2, 5])
def test_latent_figure_for_any_latent_size(tmp_path, z_dim):
    z, labels = torch.randn(50, z_dim), torch.arange(50) % 10
    plots.latent_scatter(z, labels, tmp_path / "latent.png")
    assert (tmp_path / "latent.png").read_bytes().startswith(b"\x89PNG")


def test_unlabelled_latent_figure_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.latent_scatter(torch.randn(50, 2), None, tmp_path / "latent.png")
