"""Bad input and sizes that cannot fit end in exit status 2 and one line on stderr, never a
traceback; tiny data still trains; a damaged run directory is never silently overwritten.

Every case goes through the command-line entry functions (``train_main``/``evaluate_main``
return the exit status); the memory estimates of :mod:`ppl_vae.resources` are also checked
against counts known by hand.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ppl_vae import resources
from ppl_vae.cli import evaluate_main, train_main
from ppl_vae.errors import UsageError
from ppl_vae.inference import importance
from ppl_vae.models.cvae import CVAE
from ppl_vae.models.vae import VAE

SMALL = ["--hidden", "16", "--z-dim", "2", "--batch-size", "64", "--eval-particles", "2",
         "--epochs", "1"]


def run(capsys, main, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code: int, err: str, *fragments: str, codes=(2,)) -> str:
    """Exit status 2 (or ``codes``), exactly one line on stderr naming every fragment."""
    assert code in codes, (code, err)
    assert "Traceback" not in err and "Warning" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m ppl_vae "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def train(capsys, tmp_path, *extra, name="run"):
    return run(capsys, train_main, ["--dataset", "digits", *SMALL, "--out", tmp_path / name,
                                    "--overwrite", *extra])


def npz(tmp_path, name, x, y=None):
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x, **({} if y is None else {"y": y}))
    return f"npz:{path}"


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A writable copy of the shared small trained run."""
    out = tmp_path / "copy"
    shutil.copytree(trained_run.out, out)
    return out


# -- 1. validation splits ----------------------------------------------------------------------
def test_val_fraction_that_leaves_no_training_rows_is_one_line(capsys, tmp_path):
    code, _, err = train(capsys, tmp_path, "--early-stop", "1", "--val-fraction", "0.9999")
    one_line(code, err, "--val-fraction 0.9999", "0 to train on", "lower --val-fraction")
    assert not (tmp_path / "run").exists()


def test_two_rows_with_early_stopping_is_one_line(capsys, tmp_path):
    data = npz(tmp_path, "two", np.random.default_rng(0).random((2, 16), dtype=np.float32))
    code, _, err = run(capsys, train_main, ["--dataset", data, *SMALL, "--out", tmp_path / "r",
                                            "--early-stop", "1"])
    one_line(code, err, "--val-fraction", "1 training row")


def test_tiny_validation_split_trains(capsys, tmp_path):
    data = npz(tmp_path, "six", np.random.default_rng(0).random((6, 16), dtype=np.float32))
    code, _, err = run(capsys, train_main, ["--dataset", data, *SMALL, "--out", tmp_path / "r",
                                            "--early-stop", "1", "--val-fraction", "0.001"])
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["n_val"] == 1 and summary["n_train"] == 4 and summary["n_test"] == 1


# -- 2. tiny data: trains, figures adapt -------------------------------------------------------
@pytest.mark.parametrize("rows", [2, 5])
@pytest.mark.parametrize("model", [["--z-dim", "3"], ["--model", "cvae", "--quadrants", "1"],
                                   ["--model", "cvae", "--condition", "label"]])
def test_tiny_npz_trains_and_skips_what_it_cannot_draw(capsys, tmp_path, rows, model):
    rng = np.random.default_rng(rows)
    data = npz(tmp_path, "tiny", rng.random((rows, 16), dtype=np.float32), np.arange(rows) % 3)
    code, out, err = run(capsys, train_main, ["--dataset", data, *SMALL, *model,
                                              "--out", tmp_path / "r"])
    assert code == 0, err
    assert "Traceback" not in err
    summaries = list((tmp_path / "r").rglob("summary.json"))
    assert summaries and all(json.loads(p.read_text()) for p in summaries)
    if "cvae" not in model:
        assert "figure latent.png skipped: the test split has 1 image" in out
        assert (tmp_path / "r" / "reconstructions.png").is_file()


def test_latent_scatter_of_collapsed_means_draws_quietly(tmp_path):
    from ppl_vae.data import Dataset, Split
    from ppl_vae.models import RunContext
    from ppl_vae.models.figures import default_figures

    class Collapsed(VAE):
        def encode(self, x):
            loc, scale = super().encode(x)
            return torch.zeros_like(loc), scale

    x = torch.rand(6, 16)
    data = Dataset("six", Split(x[:3]), Split(x[3:]), image_shape=(4, 4))
    ctx = RunContext(None, None, data, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default_figures(Collapsed(16, z_dim=3, hidden=(8,)), ctx, lambda x, y: (x,), None)
    assert (tmp_path / "latent.png").is_file(), ctx.notes
    assert not [n for n in ctx.notes if "skipped" in n], ctx.notes


# -- 3. magnitudes that overflow float32 -------------------------------------------------------
def test_gaussian_data_near_1e30_is_one_line(capsys, tmp_path):
    x = (np.random.default_rng(0).standard_normal((40, 16)) * 1e30).astype(np.float32)
    code, _, err = run(capsys, train_main, ["--dataset", npz(tmp_path, "huge", x), *SMALL,
                                            "--likelihood", "gaussian", "--out", tmp_path / "r"])
    one_line(code, err, "e+30", "standardize")


def test_values_beyond_float32_are_one_line(capsys, tmp_path):
    x = np.full((10, 4), 1e300)  # float64: inf once in float32
    code, _, err = run(capsys, train_main, ["--dataset", npz(tmp_path, "inf", x), *SMALL,
                                            "--likelihood", "gaussian", "--out", tmp_path / "r"])
    one_line(code, err, "infinite", "standardize")


# -- 4. sizes that cannot fit ------------------------------------------------------------------
def test_linear_layer_bytes_counted_on_meta():
    size = resources.model_size(lambda: nn.Linear(1000, 1000))
    assert size.parameters == 1_001_000
    assert size.parameter_bytes == 4_004_000 and size.buffer_bytes == 0
    assert size.largest == ("weight", (1000, 1000))
    assert resources.format_bytes(size.parameter_bytes) == "4.0 MB"


def test_vae_and_cvae_sizes_match_a_real_build(digits):
    for build in (lambda: VAE(64, z_dim=3, hidden=(32, 16)),
                  lambda: CVAE(10, 64, None, z_dim=3, hidden=(32,), condition="label")):
        estimate = resources.model_size(build)
        real = resources.size_of(build())
        assert estimate == real
    # 64*400 + 400 + 400*40 + 40 (encoder) + 20*400 + 400 + 400*64 + 64 (decoder), float32
    params = (64 * 400 + 400 + 400 * 40 + 40) + (20 * 400 + 400 + 400 * 64 + 64)
    assert resources.model_size(lambda: VAE(64)).parameter_bytes == 4 * params


def test_meta_build_leaves_rng_and_param_store_alone():
    import random

    import pyro

    class Draws(nn.Module):
        def __init__(self):
            super().__init__()
            random.random()
            self.w = nn.Parameter(pyro.param("made_here", torch.randn(3)))

    torch.manual_seed(1)
    random.seed(1)
    before = torch.rand(1), random.random()
    torch.manual_seed(1)
    random.seed(1)
    assert resources.model_size(Draws).parameters == 3
    assert (torch.rand(1), random.random()) == before
    assert "made_here" not in pyro.get_param_store()


def test_a_model_that_cannot_build_on_meta_gets_no_estimate():
    class ReadsValues(nn.Module):
        def __init__(self):
            super().__init__()
            n = int(torch.tensor(3).item())  # no value on the meta device
            self.lin = nn.Linear(n, n)

    assert resources.model_size(ReadsValues) is None
    assert resources.check_model_fits(ReadsValues) is None


def test_check_model_fits_names_the_figure():
    with pytest.raises(UsageError) as e:
        resources.check_model_fits(lambda: VAE(64, z_dim=10**9, hidden=(400,)))
    text = str(e.value)
    assert "TB" in text and "is available on the CPU" in text and "encoder.2.weight" in text
    assert "\n" not in text
    assert resources.check_model_fits(lambda: VAE(64)).parameters > 0


def test_bad_options_raise_from_the_meta_build():
    def build():
        raise UsageError("--z-dim must be positive")

    with pytest.raises(UsageError, match="must be positive"):
        resources.check_model_fits(build)


def test_step_cost_scales_with_rows_and_particles(monkeypatch, digits):
    import pyro

    from ppl_vae.inference.estimators import make_elbo

    vae = VAE(64, z_dim=4, hidden=(32,))

    def step_for(k):
        elbo = make_elbo("mc", k, max_plate_nesting=1)
        return lambda x: elbo.differentiable_loss(vae.model, vae.guide, x)

    cost = resources.step_cost(step_for, (digits.train.x[:2],))
    # the decoder's activations (32 hidden + 64 outputs floats at least) per row x particle
    assert 4 * (32 + 64) <= cost.per_draw <= 4 * 64 * 50
    assert cost.per_row >= 4 * 32  # the encoder's, once per row
    assert pyro.get_param_store().keys() == set()
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 10**9)
    resources.check_step_fits(step_for, (digits.train.x[:2],), 128, 10)
    with pytest.raises(UsageError, match=r"128 rows x 1,000,000,000 particles .* TB"):
        resources.check_step_fits(step_for, (digits.train.x[:2],), 128, 10**9)


def test_allocated_bytes_counts_new_tensors_only():
    x = torch.zeros(1000)
    assert resources.allocated_bytes(lambda: x + 1) == 4000
    assert resources.allocated_bytes(lambda: x.view(10, 100)) == 0
    assert resources.allocated_bytes(lambda: x.add_(1)) == 0


def test_huge_evaluation_is_planned_without_running(digits):
    vae = VAE(64, z_dim=4, hidden=(16,))
    plan = importance.plan_score(vae, digits.test.x, num_samples=10**9)
    assert plan.passes > 1000 and plan.n == 359 and plan.chunk_bytes is not None


def test_evaluation_that_cannot_fit_is_one_line(capsys, run_copy, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 1000)
    monkeypatch.setattr(resources, "model_size", lambda build: None)  # past the model check
    code, _, err = run(capsys, evaluate_main, ["--run", run_copy, "--eval-iwae", "1000000"])
    one_line(code, err, "needs about", "is available on the CPU")


def test_chunks_shrink_to_the_memory_budget(monkeypatch, digits):
    vae = VAE(64, z_dim=4, hidden=(16,))
    whole = importance.plan_score(vae, digits.test.x, num_samples=100)
    monkeypatch.setattr(importance, "chunk_budget", lambda device: whole.chunk_bytes / 10)
    small = importance.plan_score(vae, digits.test.x, num_samples=100)
    assert small.chunk_bytes <= whole.chunk_bytes / 10 and small.passes > whole.passes
    a = importance.score(vae, digits.test.x[:50], num_samples=100, iwae=True)
    assert torch.isfinite(a.iwae).all()


def test_long_evaluation_prints_its_estimate(capsys, run_copy, monkeypatch):
    monkeypatch.setattr(importance, "ESTIMATE_SECONDS", 0.0)
    code, _, err = run(capsys, evaluate_main, ["--run", run_copy, "--eval-iwae", "2000"])
    assert code == 0, err
    assert "evaluation: 2,000 samples x 359 rows in" in err and "about" in err


def test_sparse_cvae_labels_are_one_line(capsys, tmp_path):
    x = np.random.default_rng(0).random((20, 16), dtype=np.float32)
    y = np.zeros(20, dtype=np.int64)
    y[0] = 10**9
    code, _, err = run(capsys, train_main, ["--dataset", npz(tmp_path, "labels", x, y), *SMALL,
                                            "--model", "cvae", "--condition", "label",
                                            "--out", tmp_path / "r"])
    one_line(code, err, "the labels (0, 1000000000) skip class 1, 2, 3", "numpy.unique")


@pytest.mark.parametrize("labels", [[0, 3, 7], [0, 1, 2, 10**9]])
def test_labels_with_gaps_are_named_for_ssvae(capsys, tmp_path, labels):
    """A class-balanced draw over labels {0, 3, 7} once asked for fewer labels, and a stray
    1e9 for a 49-billion-parameter model: the gap is the problem, and the line says so."""
    x = np.random.default_rng(0).random((40, 16), dtype=np.float32)
    y = np.resize(np.array(labels, dtype=np.int64), 40)
    code, _, err = run(capsys, train_main, ["--dataset", npz(tmp_path, "gaps", x, y), *SMALL,
                                            "--model", "ssvae", "--labelled", "10",
                                            "--out", tmp_path / "r"])
    one_line(code, err, "skip class", "labels must be 0..K-1")
    assert not (tmp_path / "r").exists()


def test_an_out_name_the_file_system_refuses_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, train_main, ["--dataset", "digits", *SMALL,
                                            "--out", tmp_path / ("x" * 300)])
    one_line(code, err, "cannot create --out", "File name too long")


@pytest.mark.parametrize("extra, fragments", [
    (["--hidden", "100000000"], ["parameters", "GB", "is available"]),
    (["--z-dim", "1000000000"], ["parameters", "200 GB", "2000000000 x 16"]),
    (["--particles", "1000000000"], ["1,000,000,000 particles", "--particles"]),
])
def test_huge_sizes_are_refused_before_allocating(capsys, tmp_path, extra, fragments):
    sizes = {"--hidden": "16", "--z-dim": "2"}
    sizes.update(zip(extra[::2], extra[1::2], strict=True))
    code, _, err = run(capsys, train_main, ["--dataset", "digits", "--epochs", "1",
                                            *[a for kv in sizes.items() for a in kv],
                                            "--out", tmp_path / "r"])
    one_line(code, err, *fragments)
    assert not (tmp_path / "r").exists()


# -- 5. a damaged config.json ------------------------------------------------------------------
@pytest.mark.parametrize("key, value, fragment", [
    ("z_dim", 20.5, "'model_options.z_dim'"),
    ("dataset", 123, "'dataset'"),
    ("model", None, "'model'"),
    ("epochs", "ten", "'epochs'"),
    ("model_options", [1], "'model_options'"),
])
def test_bad_config_values_name_the_key_and_file(capsys, run_copy, key, value, fragment):
    path = run_copy / "config.json"
    config = json.loads(path.read_text())
    if key == "z_dim":
        config["model_options"][key] = value
    else:
        config[key] = value
    path.write_text(json.dumps(config))
    code, _, err = run(capsys, evaluate_main, ["--run", run_copy])
    one_line(code, err, fragment, str(path))


def test_flat_config_values_are_checked(capsys, run_copy):
    path = run_copy / "config.json"
    config = json.loads(path.read_text())
    options = config.pop("model_options")
    path.write_text(json.dumps({**config, **options, "z_dim": 20.5}))
    code, _, err = run(capsys, evaluate_main, ["--run", run_copy])
    one_line(code, err, "'z_dim'", str(path))


# -- 6. a damaged summary.json -----------------------------------------------------------------
@pytest.mark.parametrize("content", ["[1, 2]", "{not json", b"\xff\xfe"])
def test_unreadable_summary_is_kept_aside(capsys, run_copy, content):
    path = run_copy / "summary.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, out, err = run(capsys, evaluate_main, ["--run", run_copy])
    assert code == 0, err
    kept = list(run_copy.glob("summary.json.unreadable-*"))
    assert len(kept) == 1
    assert kept[0].read_bytes() == (content if isinstance(content, bytes) else content.encode())
    notes = [line for line in out.splitlines() if "unreadable" in line]
    assert len(notes) == 1 and kept[0].name in notes[0]
    assert "test_elbo" in json.loads(path.read_text())


def test_summary_that_is_a_directory_is_one_line(capsys, run_copy):
    (run_copy / "summary.json").unlink()
    (run_copy / "summary.json").mkdir()
    code, _, err = run(capsys, evaluate_main, ["--run", run_copy])
    one_line(code, err, "summary.json", "is a directory")


# -- 7. warnings of a failing run stay out of its one line -------------------------------------
class WarnsThenRefuses(nn.Module):
    """A plug-in model that warns while being built, then refuses its options."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        warnings.warn("a warning from the failing run", UserWarning, stacklevel=1)
        raise UsageError("refused after a warning")

    def model(self, x):
        pass

    def guide(self, x):
        pass


class WarnsAndTrains(VAE):
    @classmethod
    def from_options(cls, options, data):
        warnings.warn("a warning from the good run", UserWarning, stacklevel=1)
        return super().from_options(options, data)


def test_warnings_before_a_usage_error_are_not_printed(capsys, tmp_path):
    code, _, err = run(capsys, train_main, ["--dataset", "digits", "--model",
                                            f"{__name__}:WarnsThenRefuses",
                                            "--out", tmp_path / "r"])
    one_line(code, err, "refused after a warning")


def test_pyro_warnings_of_a_diverging_run_are_not_printed(capsys, tmp_path):
    x = (np.random.default_rng(0).standard_normal((40, 16)) * 1e15).astype(np.float32)
    code, _, err = run(capsys, train_main, ["--dataset", npz(tmp_path, "big", x), *SMALL,
                                            "--likelihood", "gaussian", "--elbo", "enum",
                                            "--out", tmp_path / "r"])
    one_line(code, err, "diverged", codes=(2, 3))


def test_warnings_of_a_good_run_are_shown_after_it(capsys, tmp_path):
    with pytest.warns(UserWarning, match="a warning from the good run"):
        code, _, err = run(capsys, train_main, ["--dataset", "digits", *SMALL, "--model",
                                                f"{__name__}:WarnsAndTrains",
                                                "--out", tmp_path / "r"])
    assert code == 0, err


def test_the_package_s_own_warnings_are_a_note_line_after_a_good_run(capsys, tmp_path):
    """A warning the package itself raises while training (analytic falling back to Monte
    Carlo for a discrete guide site) is one ``note:`` line after the run, not a Python
    warning with a source line of the package."""
    code, _, err = run(capsys, train_main, ["--dataset", "digits", "--epochs", "1", "--model",
                                            "plugin_models:EnumMixtureVAE", "--elbo",
                                            "analytic", "--out", tmp_path / "r"])
    assert code == 0, err
    notes = [line for line in err.splitlines() if "not reparameterized" in line]
    assert notes == ["python -m ppl_vae train: note: --elbo analytic: the guide's site(s) y are "
                     "not reparameterized, so this objective uses Trace_ELBO's Monte Carlo "
                     "estimate with score-function gradients (TraceMeanField_ELBO would drop "
                     "them)"]
    assert "UserWarning" not in err


def test_warnings_of_a_run_that_crashes_are_still_shown(capsys):
    """A bug of the package (not the user's code, which would be one line) is a traceback,
    and the warnings held back during the run are shown with it (the package's own as a
    ``note:`` line)."""
    from ppl_vae.cli import main_wrapper
    from ppl_vae.errors import PACKAGE, Note

    def crashes(argv):
        warnings.warn("a clue", UserWarning, stacklevel=1)
        warnings.warn("a note", Note, stacklevel=1)
        raise RuntimeError("a bug")

    crashes.__code__ = crashes.__code__.replace(co_filename=PACKAGE + "run/somewhere.py")
    with pytest.warns(UserWarning, match="a clue"), pytest.raises(RuntimeError, match="a bug"):
        main_wrapper("prog", crashes)([])
    assert capsys.readouterr().err == "prog: note: a note\n"


def test_a_loss_that_explodes_finitely_is_a_divergence(capsys, tmp_path):
    """--lr 1e6 once trained to a test ELBO of -1.7e32 and exited 0: a loss per data point a
    million times its first value is reported like a non-finite one (exit 3)."""
    code, _, err = run(capsys, train_main, ["--dataset", "digits", "--lr", "1e6", "--epochs",
                                            "2", "--out", tmp_path / "r"])
    one_line(code, err, "training diverged at epoch 1", "times its first value",
             "lower --lr", codes=(3,))
