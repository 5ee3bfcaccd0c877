"""The command-line tools end to end: files written, options honoured, one-line errors.

Most calls go through ``main(argv)`` in-process (a subprocess costs seconds of imports); a few
run ``python -m ppl_vae train`` / ``python -m ppl_vae.train`` / ``ppl_vae.evaluate`` for real.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from helpers import assert_one_line_error, build_model

from ppl_vae import score
from ppl_vae.cli import evaluate_main, train_main
from ppl_vae.run.session import from_record, load_data

REPO = Path(__file__).resolve().parents[1]

NET = ["--hidden", "32", "--z-dim", "2", "--batch-size", "128", "--eval-particles", "3"]
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ["elbo_curves.png", "reconstructions.png", "samples.png", "latent.png"]
FILES = ["config.json", "metrics.csv", "summary.json", "checkpoint.pt", *FIGURES]
TRAIN_PROG = "python -m ppl_vae train: error: "
EVAL_PROG = "python -m ppl_vae evaluate: error: "


def read_json(path):
    return json.loads(path.read_text())


def assert_run_files(out, image_figures: bool = True) -> None:
    names = {p.name for p in out.iterdir()}
    expected = FILES if image_figures else [f for f in FILES if f not in FIGURES[1:3]]
    assert set(expected) <= names, set(expected) - names
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes left nothing behind
    for name in expected:
        if name.endswith(".png"):
            data = (out / name).read_bytes()
            assert data.startswith(PNG) and len(data) > 1000, name


def initial_test_elbo(out) -> float:
    """Mean test ELBO of the model a run started from (``train`` seeds, then builds)."""
    config = from_record(read_json(out / "config.json"))[0]
    data = load_data(config)
    pyro.set_rng_seed(config.seed)
    module = build_model(config, data)
    return score(module, data.test.x, num_samples=config.eval_particles).elbo.mean().item()


# -- training end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, run_module):
    """``python -m ppl_vae train`` for real: IWAE objective, 3 particles, dynamic binarization,
    and a final IWAE log-likelihood estimate."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = run_module("ppl_vae", "train", "--dataset", "digits", "--epochs", "2", *NET,
                      "--elbo", "iwae", "--particles", "3", "--binarize", "dynamic",
                      "--eval-iwae", "20", "--lr", "3e-3", "--out", "run", cwd=cwd)
    return proc, cwd / "run"


def test_train_cli_writes_every_promised_file(cli_run):
    proc, out = cli_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "run written to run" in proc.stdout and "log p(x) >=" in proc.stdout
    # the notes come after the numbers
    lines = proc.stdout.splitlines()
    note = "evaluation: 20 samples per data point in one vectorized pass"
    assert note in lines
    assert lines.index(note) > max(i for i, line in enumerate(lines) if "log p(x) >=" in line)
    assert_run_files(out)

    with open(out / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["epoch", "train_elbo", "test_elbo", "train_seconds"]
        rows = list(reader)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert float(r["test_elbo"]) < 0 and float(r["train_elbo"]) < 0
        assert float(r["train_seconds"]) > 0

    summary = read_json(out / "summary.json")
    assert summary["test_elbo"] < 0
    assert summary["test_log_likelihood_iwae"] >= summary["test_elbo"]  # same draws: Jensen
    assert summary["iwae_samples"] == 20 and summary["eval_particles"] == 20
    assert summary["epochs"] == 2 and summary["dataset"] == "digits"
    assert summary["train_elbo"] == pytest.approx(float(rows[-1]["train_elbo"]))
    assert summary["n_train"] == 1438 and summary["n_test"] == 359
    assert summary["eval_method"] == "20 samples per data point in one vectorized pass"

    config = read_json(out / "config.json")
    assert config["model"] == "vae"
    assert config["elbo"] == "iwae" and config["particles"] == 3
    assert config["binarize"] == "dynamic" and config["eval_iwae"] == 20
    options = config["model_options"]
    assert options["hidden"] == [32] and options["z_dim"] == 2 and config["epochs"] == 2
    assert options["encoder_scale"] == "softplus"  # the default, written out
    assert "hidden" not in config and "z_dim" not in config  # model options live apart
    assert from_record(config)[0].to_dict() == config
    # an older, flat config.json (model options beside the rest) reads back the same
    flat = {**{k: v for k, v in config.items() if k != "model_options"}, **options}
    assert from_record(flat)[0].to_dict() == config


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_summary(trained_run, tmp_path, run_module):
    """``python -m ppl_vae.evaluate --run DIR`` recomputes summary.json's test ELBO exactly."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.out, run_dir)
    original = read_json(run_dir / "summary.json")
    (run_dir / "summary.json").write_text(json.dumps({**original, "test_elbo": 0.0}))
    proc = run_module("ppl_vae.evaluate", "--run", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"test ELBO {original['test_elbo']:.2f}" in proc.stdout
    assert "evaluation: 10 samples per data point in one vectorized pass" in proc.stdout
    summary = read_json(run_dir / "summary.json")
    assert summary["test_elbo"] == original["test_elbo"]
    kept = summary.pop("at_training")  # the training run's numbers stay beside evaluate's
    assert kept["test_elbo"] == 0.0 and kept["eval_method"] == original["eval_method"]
    assert summary == {**original, "eval_particles": trained_run.config.eval_particles}
    assert summary["eval_method"] == "10 samples per data point in one vectorized pass"
    proc = run_module("ppl_vae.evaluate", "--run", run_dir, "--eval-iwae", "20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_json(run_dir / "summary.json")["at_training"] == kept  # the first, for good


def test_evaluate_respects_the_run_s_lock_and_says_when_it_is_unfinished(
        trained_run, tmp_path, cli, monkeypatch):
    from ppl_vae.run.rundir import DirLock

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.out, run_dir)
    before = (run_dir / "summary.json").read_bytes()
    lock = DirLock.acquire(run_dir)  # as a training run holds it
    try:
        result = cli(evaluate_main, ["--run", run_dir])
    finally:
        lock.release()
    assert_one_line_error(result, EVAL_PROG, "is in use by another run")
    assert (run_dir / "summary.json").read_bytes() == before

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # stopped in epoch 2
    state["loop"] = {**state["loop"], "done": False, "epoch": 2}
    torch.save(state, run_dir / "checkpoint.pt")
    result = cli(evaluate_main, ["--run", run_dir])
    assert result.code == 0, result.err
    assert "stopped during epoch 2 of 3 (not finished)" in result.out
    assert read_json(run_dir / "summary.json")["stopped_during_epoch"] == "2 of 3"


def test_evaluate_reproduces_the_iwae_estimate(cli_run, tmp_path, cli):
    """In-process: re-evaluating with the run's --eval-iwae K gives both numbers exactly
    (the test set's dynamic binarization is a fixed draw)."""
    proc, out = cli_run
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    original = read_json(run_dir / "summary.json")
    tampered = {**original, "test_elbo": 0.0, "test_log_likelihood_iwae": 0.0}
    (run_dir / "summary.json").write_text(json.dumps(tampered))
    result = cli(evaluate_main, ["--run", run_dir, "--eval-iwae", "20"])
    assert result.code == 0, result.err
    assert "log p(x) >=" in result.out
    summary = read_json(run_dir / "summary.json")
    for key in ("test_elbo", "test_log_likelihood_iwae", "iwae_samples"):
        assert summary[key] == original[key], key
    # more samples: a different (tighter) bound, reported as such
    result = cli(evaluate_main, ["--run", run_dir, "--eval-iwae", "200"])
    assert result.code == 0, result.err
    summary = read_json(run_dir / "summary.json")
    assert summary["iwae_samples"] == 200 and summary["eval_particles"] == 200
    assert summary["test_log_likelihood_iwae"] != original["test_log_likelihood_iwae"]


@pytest.mark.parametrize("options", [
    ["--elbo", "analytic", "--likelihood", "gaussian", "--learn-scale", "--gaussian-scale",
     "0.5", "--beta", "0.5"],
    ["--elbo", "mc", "--particles", "3", "--binarize", "static"],
    ["--jit", "--elbo", "mc"],
    ["--encoder-scale", "logscale", "--model-opt", "activation='tanh'", "--model-opt",
     "beta=0.5"],
], ids=["analytic-gaussian-learned-beta", "mc-3-static", "jit-mc", "model-opt"])
def test_train_cli_options(tmp_path, cli, options):
    out = tmp_path / "run"
    result = cli(train_main, ["--dataset", "digits", "--epochs", "1", *NET, "--lr", "1e-2",
                              *options, "--out", out])
    assert result.code == 0, result.err
    assert "Traceback" not in result.err and f"run written to {out}" in result.out
    assert_run_files(out)
    config, summary = read_json(out / "config.json"), read_json(out / "summary.json")
    assert math.isfinite(summary["test_elbo"]) and summary["epochs"] == 1
    assert "test_log_likelihood_iwae" not in summary
    # the run learned something: its test ELBO beats the model it started from
    assert summary["test_elbo"] > initial_test_elbo(out) + 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    model_options = config["model_options"]
    if "--learn-scale" in options:
        assert (model_options["likelihood"], model_options["learn_scale"],
                model_options["beta"]) == ("gaussian", True, 0.5)
        assert state["log_scale"].item() != pytest.approx(math.log(0.5))  # sigma was learned
    if "--binarize" in options:
        assert (config["particles"], config["binarize"]) == (3, "static")
    if "--jit" in options:
        assert config["jit"] is True and config["elbo"] == "mc"
    if "--model-opt" in options:
        assert (model_options["encoder_scale"], model_options["activation"],
                model_options["beta"]) == ("logscale", "tanh", 0.5)


def test_train_cli_on_non_image_npz_without_labels(tmp_path, cli):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((60, 10)).astype(np.float32))
    out = tmp_path / "run"
    result = cli(train_main, ["--dataset", f"npz:{tmp_path / 'd.npz'}", "--epochs", "1", *NET,
                              "--out", out])
    assert result.code == 0, result.err
    assert_run_files(out, image_figures=False)
    assert not (out / "samples.png").exists()  # no image shape: no image grids
    assert ("figure reconstructions.png and samples.png skipped: the data are not images"
            in result.out.splitlines())
    assert read_json(out / "summary.json")["n_test"] == 12


def test_train_cli_on_offline_mnist(mnist_root, tmp_path, cli):
    """Real data: one epoch on the MNIST-10k split read from ../shared/data, never downloaded."""
    out = tmp_path / "run"
    result = cli(train_main, ["--dataset", "mnist", "--data-dir", mnist_root, "--no-download",
                              "--epochs", "1", *NET, "--lr", "3e-3", "--out", out])
    assert result.code == 0, result.err
    assert_run_files(out)
    summary, config = read_json(out / "summary.json"), read_json(out / "config.json")
    assert (summary["dataset"], summary["n_train"], summary["n_test"]) == ("mnist", 8000, 2000)
    assert config["data_dir"] == str(mnist_root) and config["download"] is False
    assert summary["test_elbo"] > initial_test_elbo(out) + 50  # 784 pixels: a big first gain


def test_help(cli):
    result = cli(train_main, ["--help"])
    assert result.code == 0 and "--elbo" in result.out and "--eval-iwae" in result.out
    # the model's own options: the VAE's, and --model-opt for any option
    assert "model options (VAE)" in result.out and "--encoder-scale" in result.out
    assert "--z-dim" in result.out and "--model-opt" in result.out
    assert "--quadrants" not in result.out
    result = cli(evaluate_main, ["--help"])
    assert result.code == 0 and "--run" in result.out


@pytest.mark.cuda
def test_train_on_cuda(tmp_path, cli):
    out = tmp_path / "run"
    result = cli(train_main, ["--dataset", "digits", "--epochs", "1", *NET, "--cuda",
                              "--out", out])
    assert result.code == 0, result.err
    assert read_json(out / "summary.json")["device"].startswith("cuda")
    result = cli(evaluate_main, ["--run", out, "--cuda"])
    assert result.code == 0, result.err


# -- bad input: exit 2 and one line on stderr ----------------------------------------------------

def npz(**arrays):
    def make(tmp_path):
        np.savez(tmp_path / "bad.npz", **arrays)
        return f"npz:{tmp_path / 'bad.npz'}"
    return make


BAD_DATASETS = {
    "unknown": (lambda tmp: "cifar", ["unknown --dataset 'cifar'"]),
    "npz-missing": (lambda tmp: f"npz:{tmp / 'none.npz'}", ["no such file"]),
    "npz-no-x": (npz(images=np.zeros((4, 4))), ["no 'x'"]),
    "npz-ndim": (npz(x=np.zeros(8)), ["'x' has shape (8,)"]),
    "npz-nan": (npz(x=np.array([[0.1, np.nan], [0.2, 0.3]])), ["NaN"]),
    "npz-range": (npz(x=np.full((4, 4), 255.0)), ["[0, 1]", "--likelihood 'gaussian'"]),
    "npz-y-length": (npz(x=np.zeros((4, 4)), y=np.arange(5)), ["'y' must be 4"]),
    "npz-y-float": (npz(x=np.zeros((4, 4)), y=np.zeros(4)), ["'y'", "float64"]),
}


@pytest.mark.parametrize("name", list(BAD_DATASETS))
def test_bad_dataset(tmp_path, cli, name):
    make, fragments = BAD_DATASETS[name]
    out = tmp_path / "run"
    result = cli(train_main, ["--dataset", make(tmp_path), "--epochs", "1", "--out", out])
    assert_one_line_error(result, TRAIN_PROG, *fragments)
    assert not out.exists()


def test_missing_mnist(tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(train_main, ["--dataset", "mnist", "--data-dir", empty, "--no-download",
                              "--out", tmp_path / "run"])
    assert_one_line_error(result, TRAIN_PROG, str(empty), "--dataset 'digits'", "--no-download")


BAD_OPTIONS = {
    "epochs": (["--epochs", "0"], ["--epochs must be a whole number of at least 1"]),
    "batch-size": (["--batch-size", "0"], ["--batch-size must be a whole number of at least 1"]),
    "lr": (["--lr", "-1"], ["--lr must be a positive number"]),
    "lr-nan": (["--lr", "nan"], ["--lr must be a positive number"]),
    "z-dim": (["--z-dim", "0"], ["--z-dim must be a whole number of at least 1"]),
    "particles": (["--particles", "0"], ["--particles must be a whole number in [1, "]),
    "eval-particles": (["--eval-particles", "0"],
                       ["--eval-particles must be a whole number in [1, "]),
    "eval-iwae": (["--eval-iwae", "-5"], ["--eval-iwae"]),
    "hidden": (["--hidden", "64", "0"], ["--hidden"]),
    "beta": (["--beta", "-0.1"], ["--beta must be a positive number"]),
    "beta-zero": (["--beta", "0"], ["--beta must be a positive number"]),
    "iwae-one-particle": (["--elbo", "iwae"], ["--elbo iwae", "--particles"]),
    "gaussian-scale": (["--gaussian-scale", "0"], ["--gaussian-scale must be a positive number"]),
    "jit-iwae": (["--jit", "--elbo", "iwae"], ["--jit with --elbo iwae is not supported"]),
    "compile-jit": (["--compile", "--jit"], ["--jit and --compile", "drop one"]),
    "learn-scale-bernoulli": (["--learn-scale"], ["--learn-scale", "--likelihood 'gaussian'"]),
    "model": (["--model", "transformer"], ["unknown --model 'transformer'", "vae"]),
    "elbo-choice": (["--elbo", "exact"], ["--elbo 'exact' is not one of", "tracegraph"]),
    "int-type": (["--epochs", "two"], ["--epochs", "'two'"]),
    "unknown-flag": (["--epoch", "3", "--frobnicate"], ["--frobnicate"]),
    "encoder-scale": (["--encoder-scale", "exp"], ["--encoder-scale", "'exp'", "(see --help)"]),
    "model-opt-unknown": (["--model-opt", "depth=3"], ["VAE has no option 'depth'", "z_dim"]),
    "model-opt-syntax": (["--model-opt", "z_dim"], ["--model-opt takes KEY=VALUE"]),
    "model-opt-value": (["--model-opt", "z_dim=0"], ["--z-dim must be a whole number"]),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_option(tmp_path, cli, name):
    argv, fragments = BAD_OPTIONS[name]
    out = tmp_path / "run"
    result = cli(train_main, ["--dataset", "digits", *argv, "--out", out])
    assert_one_line_error(result, TRAIN_PROG, *fragments)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_cuda_without_a_gpu(tmp_path, cli):
    result = cli(train_main, ["--cuda", "--epochs", "1", "--out", tmp_path / "run"])
    assert_one_line_error(result, TRAIN_PROG, "--cuda", "no CUDA device")
    result = cli(evaluate_main, ["--run", tmp_path / "run", "--cuda"])
    assert result.code == 2


def test_out_holding_files_is_left_alone(tmp_path, cli):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.txt").write_text("precious")
    result = cli(train_main, ["--epochs", "1", *NET, "--out", out])
    assert_one_line_error(result, TRAIN_PROG, "already holds files", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["results.txt"]
    assert (out / "results.txt").read_text() == "precious"


@pytest.mark.slow
def test_bad_input_in_a_real_subprocess(tmp_path, run_module):
    proc = run_module("ppl_vae.train", "--epochs", "0", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (TRAIN_PROG + "--epochs must be a whole number of at least 1, "
                                               "got 0")
    assert not (tmp_path / "runs").exists()
    proc = run_module("ppl_vae.evaluate", "--run", tmp_path / "nowhere", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no run directory" in proc.stderr


@pytest.fixture
def run_without_checkpoint(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained_run.out / "config.json", run_dir)
    return run_dir


def test_evaluate_bad_runs(tmp_path, cli, run_without_checkpoint):
    result = cli(evaluate_main, ["--run", tmp_path / "missing"])
    assert_one_line_error(result, EVAL_PROG, "no run directory", "missing")
    result = cli(evaluate_main, ["--run", run_without_checkpoint])
    assert_one_line_error(result, EVAL_PROG, "no checkpoint", "checkpoint.pt")
    (run_without_checkpoint / "checkpoint.pt").write_bytes(b"\x00corrupt" * 100)
    result = cli(evaluate_main, ["--run", run_without_checkpoint])
    assert_one_line_error(result, EVAL_PROG, "not a readable ppl_vae checkpoint")
    result = cli(evaluate_main, ["--run", run_without_checkpoint, "--eval-iwae", "-1"])
    assert_one_line_error(result, EVAL_PROG, "--eval-iwae")
    result = cli(evaluate_main, [])
    assert_one_line_error(result, EVAL_PROG, "--run")


# -- regressions: bugs found while writing these tests ------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_out_of_range_seed_is_a_usage_error(tmp_path, cli, seed):
    result = cli(train_main, ["--seed", seed, "--epochs", "1", *NET, "--out", tmp_path / "r"])
    assert_one_line_error(result, TRAIN_PROG, "--seed")


@pytest.mark.parametrize("argv", [
    ["--lr", "inf"], ["--beta", "inf"], ["--likelihood", "gaussian", "--gaussian-scale", "inf"],
], ids=["lr", "beta", "gaussian-scale"])
@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_infinite_options_are_rejected(tmp_path, cli, argv):
    result = cli(train_main, [*argv, "--epochs", "1", *NET, "--out", tmp_path / "r"])
    assert_one_line_error(result, TRAIN_PROG, argv[-2])


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_diverged_training_is_a_one_line_error(tmp_path, cli):
    """Exit 3 naming the epoch, the step and the site; a run that never got to a checkpoint
    leaves nothing behind."""
    out = tmp_path / "run"
    result = cli(train_main, ["--lr", "1e4", "--epochs", "1", "--hidden", "32", "--z-dim", "4",
                              "--out", out])
    assert_one_line_error(result, TRAIN_PROG, "--lr", "epoch 1, step 4 of 12", "site 'z'",
                          code=3)
    assert not out.exists()
    # compiled: the same noise, the same step and site (the replay runs the graph again)
    result = cli(train_main, ["--lr", "1e4", "--epochs", "1", "--hidden", "32", "--z-dim", "4",
                              "--out", out, "--compile"])
    assert_one_line_error(result, TRAIN_PROG, "--lr", "epoch 1, step 4 of 12", "site 'z'",
                          code=3)
    # a schedule: the replay starts from the snapshot's learning rate, not the advanced one
    result = cli(train_main, ["--lr", "1e4", "--epochs", "1", "--hidden", "32", "--z-dim", "4",
                              "--out", out, "--lr-schedule", "linear", "--warmup-steps", "3"])
    assert_one_line_error(result, TRAIN_PROG, "--lr", "epoch 1, step 3 of 12", "site 'z'",
                          code=3)


def test_corrupt_config_json_is_a_usage_error(run_without_checkpoint, cli):
    (run_without_checkpoint / "config.json").write_text("{not json")
    result = cli(evaluate_main, ["--run", run_without_checkpoint])
    assert_one_line_error(result, EVAL_PROG, "config.json")


def test_checkpoint_errors_name_the_path(run_without_checkpoint, cli):
    result = cli(evaluate_main, ["--run", run_without_checkpoint])
    assert_one_line_error(result, EVAL_PROG, str(run_without_checkpoint / "checkpoint.pt"))
    assert "PosixPath" not in result.err


def test_relative_npz_path_still_evaluates(tmp_path, cli, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a" / "d.npz", x=rng.random((40, 16)).astype(np.float32))
    monkeypatch.chdir(tmp_path / "a")
    result = cli(train_main, ["--dataset", "npz:d.npz", "--epochs", "1", *NET,
                              "--out", tmp_path / "run"])
    assert result.code == 0, result.err
    monkeypatch.chdir(tmp_path / "b")
    result = cli(evaluate_main, ["--run", tmp_path / "run"])
    assert result.code == 0, result.err


@pytest.mark.parametrize("command", [[], ["train"]])
def test_help_into_a_reader_that_stops_early_is_no_error(command):
    """``ppl-vae --help | head -1``: the reader closes the pipe; no BrokenPipeError."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ppl_vae", *command, "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before it writes: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_run_dir_is_a_spelling_torchrun_passes_through(trained_run, tmp_path, cli):
    """torchrun's parser takes --run as an abbreviation of its own --run-path; --run-dir
    reaches ppl_vae."""
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(["--nproc_per_node", "1", "-m", "ppl_vae",
                                           "evaluate", "--run-dir", "X"])
    assert parsed.training_script_args == ["evaluate", "--run-dir", "X"]
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.out, run_dir)
    result = cli(evaluate_main, ["--run-dir", run_dir])
    assert result.code == 0, result.err
