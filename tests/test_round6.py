"""The sixth round of hostile use: data replaced under a run, 0/1 masks saved as uint8, a
run's own data inside the directory --overwrite empties, a hand-edited config.json, models
that subsample their data plate or hold lazy modules, a model that sums out a discrete
latent. Each is one line (exit 2 from the command line) or a note; nothing is lost."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import SMALL_MODEL
from helpers import assert_one_line_error
from pyro.infer import config_enumerate
from torch import nn

from ppl_vae import TrainConfig, UsageError, evaluate_run, load_dataset, train_run
from ppl_vae.cli import evaluate_main, train_main
from ppl_vae.data import Split

PROG = "python -m ppl_vae train"


def small(out: Path, dataset: str = "digits", **kw) -> TrainConfig:
    settings = dict(model_options=SMALL_MODEL, epochs=1, batch_size=64, eval_particles=2)
    return TrainConfig(dataset=dataset, out=str(out), **{**settings, **kw})


def test_a_replaced_dataset_is_refused_on_resume_and_evaluate(tmp_path, cli):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).random((200, 16)).astype("f4"))
    out = tmp_path / "run"
    train_run(small(out, f"npz:{data}"), progress=False)
    np.savez(data, x=np.random.default_rng(1).random((80, 16)).astype("f4"))  # fewer rows
    for result in (cli(train_main, ["--resume", out]), cli(evaluate_main, ["--run", out])):
        assert_one_line_error(result, "", "is not the data the run trained on",
                              "n_train 64 (trained on 160)", "restore that data")
    np.savez(data, x=np.random.default_rng(1).random((200, 25)).astype("f4"))  # wider rows
    with pytest.raises(UsageError, match="input_dim 25 .trained on 16."):
        evaluate_run(out)


def test_zero_one_data_saved_as_uint8_is_refused_and_bool_is_read_as_0_1(tmp_path):
    masks = np.random.default_rng(0).random((50, 16)) < 0.3
    np.savez(tmp_path / "u8.npz", x=masks.astype(np.uint8))
    with pytest.raises(UsageError, match="uint8 holding only 0 and 1.*save 0/1 data as bool"):
        load_dataset(f"npz:{tmp_path / 'u8.npz'}")
    np.savez(tmp_path / "b.npz", x=masks)
    data = load_dataset(f"npz:{tmp_path / 'b.npz'}")
    rows = torch.cat([data.train.x, data.test.x])
    assert rows.dtype == torch.float32 and set(rows.unique().tolist()) == {0.0, 1.0}
    assert rows.sum() == masks.sum()


def test_npz_paths_and_files_that_are_not_npz(tmp_path, monkeypatch):
    np.save(tmp_path / "one.npy", np.zeros((4, 4)))
    with pytest.raises(UsageError, match=r"one array \(numpy.save's .npy\)"):
        load_dataset(f"npz:{tmp_path / 'one.npy'}")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(UsageError, match="a directory; give the path of an .npz"):
        load_dataset(f"npz:{tmp_path / 'dir.npz'}")
    monkeypatch.setenv("HOME", str(tmp_path))
    np.savez(tmp_path / "home.npz", x=np.random.default_rng(0).random((20, 4)))
    assert load_dataset("npz:~/home.npz").input_dim == 4


def test_a_failed_download_keeps_a_data_dir_the_user_made(tmp_path, monkeypatch):
    """A download that makes its folders, then fails (offline): they go, the user's stay."""
    import ppl_vae.data as data_module

    def download_fails(cls, name, root, train, download):
        Path(root, "MNIST", "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(data_module, "_tv_split", download_fails)
    kept = tmp_path / "mine"
    (kept / "other").mkdir(parents=True)  # the user's, empty
    with pytest.raises(UsageError, match="mnist is not in .* could not be downloaded"):
        load_dataset("mnist", str(kept))
    assert sorted(p.name for p in kept.iterdir()) == ["other"]  # MNIST/raw removed
    with pytest.raises(UsageError, match="could not be downloaded"):
        load_dataset("mnist", str(tmp_path / "new" / "sub"))  # made with its parents
    assert not (tmp_path / "new").exists()


def test_overwrite_refuses_to_delete_the_runs_own_data(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj").mkdir()
    np.savez(tmp_path / "proj" / "mine.npz", x=np.random.default_rng(0).random((40, 4)))
    result = cli(train_main, ["--dataset", "npz:proj/mine.npz", "--epochs", "1", "--out", "proj",
                              "--overwrite"])
    assert_one_line_error(result, PROG, "--overwrite would delete the run's own data",
                          "mine.npz")
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == ["mine.npz"]


@pytest.mark.parametrize("key", ["dataset", "model"])
def test_a_config_json_without_its_dataset_or_model_is_refused(tmp_path, key):
    out = tmp_path / "run"
    train_run(small(out), progress=False)
    record = json.loads((out / "config.json").read_text())
    del record[key]
    (out / "config.json").write_text(json.dumps(record))
    with pytest.raises(UsageError, match=f"has no '{key}' key"):
        evaluate_run(out)
    assert "test_elbo" in json.loads((out / "summary.json").read_text())


class Subsampled(nn.Module):
    def __init__(self, input_dim: int, z_dim: int = 2) -> None:
        super().__init__()
        self.z_dim, self.dec = z_dim, nn.Linear(z_dim, input_dim)
        self.enc = nn.Linear(input_dim, 2 * z_dim)

    def model(self, x):
        with pyro.plate("data", x.shape[0], subsample_size=min(32, x.shape[0])) as idx:
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x[idx])

    def guide(self, x):
        with pyro.plate("data", x.shape[0], subsample_size=min(32, x.shape[0])) as idx:
            loc, log_scale = self.enc(x[idx]).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


class Lazy(Subsampled):
    def __init__(self, input_dim: int, z_dim: int = 2) -> None:
        super().__init__(input_dim, z_dim)
        self.enc = nn.LazyLinear(2 * z_dim)


def test_a_subsampling_plate_and_a_lazy_module_are_one_line_before_training(tmp_path):
    with pytest.raises(UsageError, match="plate 'data' over the data points subsamples them"):
        train_run(TrainConfig(model=Subsampled, epochs=1, out=str(tmp_path / "a")),
                  progress=False)
    with pytest.raises(UsageError, match="'enc.weight' is a lazy module's uninitialized"):
        train_run(TrainConfig(model=Lazy, epochs=1, out=str(tmp_path / "b")), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class SummedOut(nn.Module):
    """A mixture prior whose component the model sums out (TraceEnum_ELBO)."""

    def __init__(self, input_dim: int, z_dim: int = 2, k: int = 3) -> None:
        super().__init__()
        self.k, self.z_dim = k, z_dim
        self.mu = nn.Parameter(torch.randn(k, z_dim))
        self.enc, self.dec = nn.Linear(input_dim, 2 * z_dim), nn.Linear(z_dim, input_dim)

    @config_enumerate
    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.k)))
            z = pyro.sample("z", dist.Normal(self.mu[y], 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_a_model_summing_out_a_latent_is_told_the_test_elbo_draws_it(tmp_path):
    run = train_run(TrainConfig(model=SummedOut, elbo="enum", epochs=1, batch_size=256,
                                eval_particles=2, out=str(tmp_path / "run")), progress=False)
    assert any("sums out y in training" in note and "looser bound" in note
               for note in run.notes), run.notes
    mc = train_run(TrainConfig(model=SummedOut, elbo="mc", epochs=1, batch_size=256,
                               eval_particles=2, out=str(tmp_path / "mc")), progress=False)
    assert not any("sums out" in note for note in mc.notes)



def test_a_kl_warmup_the_run_never_finishes_is_said(tmp_path):
    run = train_run(small(tmp_path / "run", epochs=2, kl_warmup=4), progress=False)
    assert any("--kl-warmup 4 is not less than this run's 2 epochs" in n and "ends at 25%" in n
               for n in run.notes), run.notes
    run = train_run(small(tmp_path / "ok", epochs=2, kl_warmup=1), progress=False)
    assert not any("--kl-warmup" in n for n in run.notes)


def test_a_run_directory_removed_while_training_is_not_written_again(tmp_path, monkeypatch):
    import shutil

    from ppl_vae.run.session import Session

    out, real = tmp_path / "run", Session.score
    calls = []

    def remove_then_score(self, *args, **kwargs):  # the first epoch's evaluation
        calls.append(1)
        if len(calls) == 1:
            shutil.rmtree(out)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Session, "score", remove_then_score)
    with pytest.raises(UsageError, match="was removed or replaced while the run trained"):
        train_run(small(out, epochs=2), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("change, said", [
    (dict(test=lambda s: Split(torch.rand(10, 20))), "test.x has rows of 20 values, the train"),
    (dict(test=lambda s: Split(s.x[:0])), "test.x has shape (0, 64)"),
    (dict(train=lambda s: Split(s.x.double(), s.y)), "train.x is torch.float64"),
    (dict(train=lambda s: Split(s.x.numpy(), s.y)), "train.x is a ndarray; give a torch tensor"),
    (dict(train=lambda s: Split(s.x, s.y.float())), "train.y must be"),
    (dict(train=lambda s: Split(s.x, s.y - 5)), "train.y must be"),
    (dict(train=lambda s: Split(s.x.clone().fill_(float("nan")), s.y)), "NaN or infinite"),
    (dict(image_shape=(1, 4, 4)), "image_shape (1, 4, 4) holds 16 values, its rows 64"),
])
def test_a_callers_dataset_is_checked_before_training(tmp_path, digits, change, said):
    fields = {k: (f(getattr(digits, k)) if callable(f) else f) for k, f in change.items()}
    data = replace(digits, **fields)
    with pytest.raises(UsageError, match=re.escape(said)):
        train_run(small(tmp_path / "run"), data=data, progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_model_option_the_model_does_not_have(tmp_path, cli):
    out = tmp_path / "run"
    train_run(small(out), progress=False)
    assert_one_line_error(cli(train_main, ["--resume", out, "--model-opt", "bogus=1"]), PROG,
                          "the run's model has no option 'bogus'", "z_dim")


def test_labelled_share_without_hidden_labels_is_refused(cli, tmp_path):
    result = cli(train_main, ["--model", "ssvae", "--labelled-share", "0.5", "--epochs", "1",
                              "--out", tmp_path / "run"])
    assert_one_line_error(result, PROG, "--labelled-share", "every training row of 'digits' is "
                          "labelled", "--labelled N")


def test_a_switch_a_config_file_sets_is_turned_off_on_the_command_line(tmp_path):
    from ppl_vae.cli import _parse

    (tmp_path / "c.YAML").write_text("epochs: 1\ncompile: true\nvalidate: true\n")
    args = _parse(["--config", str(tmp_path / "c.YAML"), "--no-compile"])
    assert args["compile"] is False and args["validate"] is True
    assert _parse(["--no-compile", "--compile"])["compile"] is True  # (the last one given)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(UsageError, match="holds nothing, not a mapping of options"):
        _parse(["--config", str(tmp_path / "empty.yaml")])


def test_corrupt_dataset_files_are_not_called_missing(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12)
    with pytest.raises(UsageError, match="mnist's files in .* cannot be read"):
        load_dataset("mnist", str(tmp_path), download=False)
    assert (raw / "t10k-labels-idx1-ubyte").is_file()  # (kept: the user's)
    with pytest.raises(UsageError, match="takes the folder that holds MNIST/, its parent"):
        load_dataset("mnist", str(tmp_path / "elsewhere" / "MNIST"), download=False)


def test_resuming_from_python_with_other_options_names_them_not_config_json(tmp_path):
    from test_resume import _signal_in

    from ppl_vae.interrupt import Interrupted

    out = tmp_path / "run"
    config = small(out, epochs=2)
    mp = pytest.MonkeyPatch()
    from ppl_vae.run.session import Session
    _signal_in(mp, Session, "score", 1)  # epoch 1's evaluation: its checkpoint is there
    with pytest.raises(Interrupted):
        train_run(replace(config, checkpoint_every_steps=5), progress=False)
    mp.undo()
    with pytest.raises(UsageError, match=r"with other options than its run's \(ema=0.9, the "
                                         r"run's 0.0\); take the run's with resume_config"):
        train_run(replace(config, checkpoint_every_steps=5, ema=0.9), progress=False,
                  resume=True)


def test_overwrite_without_out_makes_a_new_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train_run(TrainConfig(model_options=SMALL_MODEL, epochs=1, overwrite=True),
                    progress=False)
    out = Path(run.out).resolve()
    assert out.parent == (tmp_path / "runs").resolve() and (out / "summary.json").is_file()


def test_analytic_with_an_autoguide_equals_pyros_trace_mean_field_at_the_same_seed():
    """(auxiliary guide sites: it drew a particle, then Pyro's estimator drew another)"""
    from pyro.infer import TraceMeanField_ELBO as PyroMeanField
    from pyro.infer.autoguide import AutoDiagonalNormal

    from ppl_vae.inference.estimators import make_elbo

    x = torch.randn(20, 3)

    def model(x):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(theta, 1.0).to_event(1), obs=x)

    pyro.clear_param_store()
    guide = AutoDiagonalNormal(model)
    guide(x)  # (its parameters)
    for k in (1, 3):
        pyro.set_rng_seed(7)
        ours = make_elbo("analytic", k).differentiable_loss(model, guide, x)
        pyro.set_rng_seed(7)
        theirs = PyroMeanField(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1
                               ).differentiable_loss(model, guide, x)
        assert torch.allclose(ours, theirs, rtol=1e-6), (k, ours, theirs)


@pytest.mark.parametrize("name, text", [("d.yaml", "epochs: 1\nepochs: 2\n"),
                                        ("d.json", '{"model_options": {"z_dim": 2, "z_dim": 3}}')])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, name, text):
    from ppl_vae.cli import options_file

    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match="is given twice"):
        options_file(str(tmp_path / name))


def test_m2_without_test_labels_says_it_has_no_accuracy(tmp_path, digits):
    from ppl_vae.data import hide_labels

    data = replace(hide_labels(digits, 50, seed=0), test=Split(digits.test.x))
    run = train_run(TrainConfig(model="ssvae", model_options={"hidden": (16,), "z_dim": 2,
                                                              "m1": 0},
                                epochs=1, eval_particles=2, out=str(tmp_path / "run")),
                    data=data, progress=False)
    assert "test_accuracy" not in run.summary
    assert any("no test accuracy (the test split has unlabelled rows)" in n for n in run.notes)
