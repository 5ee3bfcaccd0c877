"""A training run from a :class:`~ppl_vae.config.TrainConfig` to files: the function the CLI
wraps. Data -> model -> SVI epochs -> evaluation -> ``config.json``, ``metrics.csv``,
``summary.json``, ``checkpoint.pt`` and figures in the run directory."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn

from . import plots
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Dataset, Split, load_dataset
from .errors import UsageError
from .estimators import make_elbo
from .evaluation import Scores, conditional_scores, score
from .files import write_csv, write_json
from .models import CVAE, get_model
from .tables import write_cll_table
from .training import StepFn, backward_step, collect_params, elbo_step, fit


@dataclass
class Run:
    """What :func:`train` leaves behind, in memory as on disk."""

    config: TrainConfig
    module: nn.Module
    data: Dataset
    out: Path
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def device_for(cuda: bool) -> torch.device:
    if cuda and not torch.cuda.is_available():
        raise UsageError("--cuda was given but no CUDA device is available to torch; "
                         "drop --cuda to run on the CPU")
    return torch.device("cuda" if cuda else "cpu")


def data_args(module: nn.Module, x: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
    """The arguments of ``module.model``/``guide`` for rows ``x`` (labels ``y``): ``(x,)``
    unless the model class says otherwise with a ``data_args(x, y)`` method."""
    fn = getattr(module, "data_args", None)
    return fn(x, y) if fn is not None else (x,)


def load_data(config: TrainConfig) -> Dataset:
    return load_dataset(config.dataset, config.data_dir, config.download, config.binarize,
                        config.likelihood)


def build_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """``from_config(config, data)`` of the model class, or ``cls(input_dim, z_dim=...,
    hidden=...)`` for a class without one."""
    cls = get_model(config.model)
    if hasattr(cls, "from_config"):
        return cls.from_config(config, data)
    try:
        return cls(data.input_dim, z_dim=config.z_dim, hidden=config.hidden)
    except TypeError as e:
        raise UsageError(f"--model {config.model!r} has no from_config(config, data) and "
                         f"cannot be built as {cls.__name__}(input_dim, z_dim=..., hidden=...) "
                         f"({e}); give it a from_config classmethod") from None


def train(config: TrainConfig, data: Dataset | None = None, progress: bool | None = None) -> Run:
    """Train ``config.model`` by SVI and write the run directory. Clears Pyro's param store.

    With ``config.early_stop`` a validation split is carved out of the training split, and
    the run keeps the weights of its best validation ELBO. A CVAE's baseline network is
    trained first (``baseline_metrics.csv``) and its conditional log-likelihood table is
    added to the summary.
    """
    config = replace(config, data_dir=os.path.abspath(config.data_dir))
    if config.dataset.startswith("npz:"):  # so that evaluate --run works from anywhere
        config = replace(config, dataset="npz:" + os.path.abspath(config.dataset[4:]))
    device = device_for(config.cuda)
    out = _run_dir(config)
    config = replace(config, out=str(out))
    data = data if data is not None else load_data(config)
    if config.early_stop:
        data = data.with_validation(config.val_fraction)
    data = data.to(device)
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    module = build_model(config, data).to(device)
    _make_dir(out)  # only once the options have proved good: bad input leaves nothing behind
    run = Run(config, module, data, out)
    write_json(out / "config.json", config.to_dict())
    if isinstance(module, CVAE):
        write_csv(out / "baseline_metrics.csv", _train_baseline(module, data, config, progress))

    step = elbo_step(make_elbo(config.elbo, config.particles, config.jit), module)
    bs = config.batch_size
    optimizer = adam_for(module, step, data, config.lr, rows=bs)

    def validate() -> float:
        return -score_split(module, data.val, config.eval_particles).elbo.mean().item()

    def on_epoch(epoch: int, loss: float, seconds: float, val: float | None) -> None:
        row = {"epoch": epoch, "train_elbo": -loss,
               "test_elbo": score_split(module, data.test, config.eval_particles).summary()[
                   "test_elbo"],
               "train_seconds": seconds}
        if val is not None:
            row["val_elbo"] = -val
        run.history.append(row)
        write_csv(out / "metrics.csv", run.history)
        save_checkpoint(out / "checkpoint.pt", module, optimizer, epoch, config.to_dict())

    best_epoch = fit(step, optimizer, module,
                     lambda: data_args(module, data.train_epoch(), data.train.y), bs,
                     config.epochs, validate=validate if config.early_stop else None,
                     patience=config.early_stop, on_epoch=on_epoch, progress=progress,
                     desc=config.model)
    if config.early_stop:  # the checkpoint holds the best weights, not the last
        save_checkpoint(out / "checkpoint.pt", module, optimizer, best_epoch, config.to_dict())

    k = config.eval_iwae or config.eval_particles
    run.summary = {
        **score_split(module, data.test, k, iwae=config.eval_iwae > 0).summary(),
        "eval_particles": k,
        "train_elbo": run.history[-1]["train_elbo"],
        "epochs": len(run.history),
        "best_epoch": best_epoch,
        "train_seconds": sum(r["train_seconds"] for r in run.history),
        "device": str(device),
        "dataset": data.name,
        "n_train": len(data.train),
        "n_val": 0 if data.val is None else len(data.val),
        "n_test": len(data.test),
    }
    if isinstance(module, CVAE):
        run.summary["cll"] = {cll_key(config): conditional_scores(
            module, *data_args(module, data.test.x, data.test.y), config.cll_samples)}
        write_cll_table(out, run.summary["cll"])
    write_json(out / "summary.json", run.summary)
    write_figures(run)
    return run


def adam_for(module: nn.Module, step: StepFn, data: Dataset, lr: float, rows: int = 2
             ) -> torch.optim.Adam:
    """Adam over every parameter ``step`` trains (:func:`collect_params`, found by running it
    once on the first ``rows`` training rows)."""
    y = None if data.train.y is None else data.train.y[:rows]
    first = data_args(module, data.train.x[:rows], y)
    return torch.optim.Adam(collect_params(module, step, *first), lr=lr)


def cll_key(config: TrainConfig) -> str:
    """The column of the CLL table a CVAE run fills: its quadrant count, or ``label``."""
    return "label" if config.condition == "label" else str(config.quadrants[0])


def _train_baseline(module: CVAE, data: Dataset, config: TrainConfig,
                    progress: bool | None) -> list[dict]:
    """Fit the CVAE's deterministic baseline NN by its BCE on the target pixels (with early
    stopping when asked), before the CVAE itself; it is then held fixed."""
    history: list[dict] = []

    def nll(split: Split) -> float:
        c, y = data_args(module, split.x, split.y)
        with torch.no_grad():
            return module.baseline_loss(c, y).item() / len(split)

    def on_epoch(epoch: int, loss: float, seconds: float, val: float | None) -> None:
        history.append({"epoch": epoch, "train_nll": loss, "test_nll": nll(data.test),
                        "train_seconds": seconds, **({} if val is None else {"val_nll": val})})

    fit(backward_step(module.baseline_loss),
        torch.optim.Adam(module.baseline.parameters(), lr=config.lr), module.baseline,
        lambda: data_args(module, data.train_epoch(), data.train.y), config.batch_size,
        config.epochs, validate=(lambda: nll(data.val)) if config.early_stop else None,
        patience=config.early_stop, on_epoch=on_epoch, progress=progress, desc="baseline NN")
    return history


def score_split(module: nn.Module, split: Split, num_samples: int, iwae: bool = False) -> Scores:
    """Per-row ELBO (and IWAE bound) of ``module`` on ``split``, with the module's
    ``proposal`` guide where it names one."""
    return score(module, *data_args(module, split.x, split.y), num_samples=num_samples,
                 iwae=iwae, guide=getattr(module, "proposal", None))


def load_run(run_dir: str | os.PathLike, cuda: bool = False, data_dir: str | None = None
             ) -> tuple[TrainConfig, nn.Module, Dataset]:
    """The config, trained module (in eval mode) and data of a saved run directory."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        parts = sorted(p.name for p in run_dir.glob("quadrants-*") if p.is_dir())
        hint = (f"it holds a quadrant table: give one of its runs, e.g. --run "
                f"{str(run_dir / parts[0])!r}" if parts else
                "give --run the directory a training run wrote")
        raise UsageError(f"no config.json in {str(run_dir)!r}; {hint}")
    try:
        saved = json.loads(config_path.read_text())
        if not isinstance(saved, dict):
            raise TypeError("not a JSON object")
        config = TrainConfig.from_dict(saved)
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON or bad option values
        raise UsageError(f"{os.fspath(config_path)!r} is not a readable run config ({e})"
                         ) from None
    config = replace(config, cuda=cuda, data_dir=data_dir or config.data_dir)
    device = device_for(cuda)
    state = load_checkpoint(run_dir / "checkpoint.pt", map_location=device)
    data = load_data(config).to(device)
    module = build_model(config, data).to(device)
    try:
        module.load_state_dict(state["model"])
    except RuntimeError:
        raise UsageError(f"the checkpoint in {str(run_dir)!r} does not fit the model its "
                         "config.json describes; was one of them replaced?") from None
    module.eval()
    return config, module, data


def evaluate_run(run_dir: str | os.PathLike, eval_iwae: int = 0, cuda: bool = False,
                 data_dir: str | None = None, eval_particles: int | None = None) -> dict:
    """Re-evaluate a saved run from its ``config.json`` and ``checkpoint.pt``; update its
    ``summary.json`` (atomically) and return the new numbers."""
    run_dir = Path(run_dir)
    config, module, data = load_run(run_dir, cuda, data_dir)
    k = eval_iwae or eval_particles or config.eval_particles
    result = {**score_split(module, data.test, k, iwae=eval_iwae > 0).summary(),
              "eval_particles": k}
    if isinstance(module, CVAE):
        result["cll"] = {cll_key(config): conditional_scores(
            module, *data_args(module, data.test.x, data.test.y), config.cll_samples)}
        write_cll_table(run_dir, result["cll"])
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except ValueError:
        summary = {}  # unreadable: replaced by the new numbers
    write_json(summary_path, {**summary, **result})
    return result


def write_figures(run: Run) -> None:
    """ELBO curves; and for image data: reconstructions, prior samples, latent scatter."""
    out, module, data = run.out, run.module, run.data
    with torch.no_grad():
        _figures(out, module, data, run.history)


def _figures(out: Path, module: nn.Module, data: Dataset, history: list[dict]) -> None:
    plots.elbo_curves(history, out / "elbo_curves.png")
    if isinstance(module, CVAE):
        _cvae_figures(out, module, data)
        return
    if hasattr(module, "encode"):
        plots.latent_scatter(module.encode(data.test.x)[0], data.test.y,
                             out / "latent.png")
    if data.image_shape is None:
        return
    x = data.test.x[:12]
    if hasattr(module, "reconstruct"):
        plots.image_grid([x, module.reconstruct(x)], data.image_shape,
                         out / "reconstructions.png", "test inputs and reconstructions",
                         ["input", "recon"])
    if hasattr(module, "sample"):
        samples = module.sample(64)
        plots.image_grid(list(samples.split(8)), data.image_shape, out / "samples.png",
                         "samples from the prior: E[x|z], z ~ p(z)")


def _cvae_figures(out: Path, cvae: CVAE, data: Dataset) -> None:
    """Quadrants: inputs, truth, the NN's and three CVAE completions of test digits (Sohn et
    al.'s figure). Label: one row of prior samples per class."""
    shape = data.image_shape
    if shape is None:
        return
    if cvae.condition == "label":
        c = torch.eye(cvae.cond_dim, device=data.test.x.device)
        samples = cvae.predict(c, num_samples=10)  # (10, classes, D)
        plots.image_grid(list(samples.transpose(0, 1)), shape, out / "samples_by_label.png",
                         "samples E[y|c,z], z ~ p(z|c), one row per label",
                         [str(k) for k in range(cvae.cond_dim)])
        return
    x = data.test.x[:10]
    c, _ = cvae.data_args(x, None)
    seen = ~cvae.target

    def complete(missing: torch.Tensor) -> torch.Tensor:
        return torch.where(seen, x, missing)

    shown_input = torch.where(seen, x, torch.full_like(x, 0.5))  # missing quadrants grey
    rows = [shown_input, x, complete(cvae.baseline_predict(c))]
    rows += [complete(p) for p in cvae.predict(c, num_samples=3)]
    plots.image_grid(rows, shape, out / "completions.png",
                     "quadrant completion: observed + predicted missing pixels",
                     ["input", "truth", "NN", "CVAE", "CVAE", "CVAE"])


def _run_dir(config: TrainConfig) -> Path:
    if config.out is None:
        stem = Path("runs") / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        out, n = stem, 1
        while out.exists():
            n += 1
            out = stem.with_name(f"{stem.name}-{n}")
    else:
        out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise UsageError(f"--out {str(out)!r} already holds files; choose a new directory or "
                         "pass --overwrite")
    return out


def _make_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {str(out)!r} ({e.strerror}); choose another "
                         "directory") from None
    return out
