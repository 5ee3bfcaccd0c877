"""A training run from a :class:`~ppl_vae.config.TrainConfig` to files: the function the CLI
wraps. Data -> model -> SVI epochs -> evaluation -> ``config.json``, ``metrics.csv``,
``summary.json``, ``checkpoint.pt`` and figures in the run directory."""

from __future__ import annotations

import json
import math
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
from .data import Dataset, load_dataset
from .errors import UsageError
from .estimators import make_elbo
from .evaluation import Scores, score
from .files import write_csv, write_json
from .models import get_model
from .training import collect_params, elbo_step, epochs_bar, run_epoch


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
    return get_model(config.model).from_config(config, data)


def train(config: TrainConfig, data: Dataset | None = None, progress: bool | None = None) -> Run:
    """Train ``config.model`` by SVI and write the run directory. Clears Pyro's param store."""
    config = replace(config, data_dir=os.path.abspath(config.data_dir))
    if config.dataset.startswith("npz:"):  # so that evaluate --run works from anywhere
        config = replace(config, dataset="npz:" + os.path.abspath(config.dataset[4:]))
    device = device_for(config.cuda)
    out = _run_dir(config)
    config = replace(config, out=str(out))
    data = (data if data is not None else load_data(config)).to(device)
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    module = build_model(config, data).to(device)
    step = elbo_step(make_elbo(config.elbo, config.particles, config.jit), module)
    first = data_args(module, data.train.x[: config.batch_size],
                      None if data.train.y is None else data.train.y[: config.batch_size])
    optimizer = torch.optim.Adam(collect_params(module, step, *first), lr=config.lr)
    run = Run(config, module, data, out)
    write_json(out / "config.json", config.to_dict())

    bar = epochs_bar(range(1, config.epochs + 1), progress)
    for epoch in bar:
        module.train()
        inputs = data_args(module, data.train_epoch(), data.train.y)
        train_loss, seconds = run_epoch(step, optimizer, inputs, config.batch_size,
                                        desc=f"epoch {epoch}", progress=progress)
        if not math.isfinite(train_loss):
            raise UsageError(f"training diverged in epoch {epoch} (the ELBO is {-train_loss}); "
                             f"lower --lr (now {config.lr}) or check the data")
        module.eval()
        test_elbo = evaluate(module, data, config.eval_particles).summary()["test_elbo"]
        run.history.append({"epoch": epoch, "train_elbo": -train_loss, "test_elbo": test_elbo,
                            "train_seconds": seconds})
        bar.set_postfix(train_elbo=f"{-train_loss:.2f}", test_elbo=f"{test_elbo:.2f}")
        write_csv(out / "metrics.csv", run.history)
        save_checkpoint(out / "checkpoint.pt", module, optimizer, epoch, config.to_dict())

    final = evaluate(module, data, config.eval_iwae or config.eval_particles,
                     iwae=config.eval_iwae > 0)
    run.summary = {
        **final.summary(),
        "eval_particles": config.eval_iwae or config.eval_particles,
        "train_elbo": run.history[-1]["train_elbo"],
        "epochs": config.epochs,
        "train_seconds": sum(r["train_seconds"] for r in run.history),
        "device": str(device),
        "dataset": data.name,
        "n_train": len(data.train),
        "n_test": len(data.test),
    }
    write_json(out / "summary.json", run.summary)
    write_figures(run)
    return run


def evaluate(module: nn.Module, data: Dataset, num_samples: int, iwae: bool = False) -> Scores:
    """Per-image test ELBO (and IWAE bound) of ``module`` on ``data.test``."""
    return score(module, *data_args(module, data.test.x, data.test.y),
                 num_samples=num_samples, iwae=iwae)


def evaluate_run(run_dir: str | os.PathLike, eval_iwae: int = 0, cuda: bool = False,
                 data_dir: str | None = None, eval_particles: int | None = None) -> dict:
    """Re-evaluate a saved run from its ``config.json`` and ``checkpoint.pt``; update its
    ``summary.json`` (atomically) and return the new numbers."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UsageError(f"no config.json in {str(run_dir)!r}; give --run the directory a "
                         "training run wrote")
    try:
        config = TrainConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as e:  # bad JSON, or options this version rejects
        raise UsageError(f"{os.fspath(config_path)!r} is not a readable run config ({e})"
                         ) from None
    config = replace(config, cuda=cuda, data_dir=data_dir or config.data_dir)
    device = device_for(cuda)
    state = load_checkpoint(run_dir / "checkpoint.pt", map_location=device)
    data = load_data(config).to(device)
    module = build_model(config, data).to(device)
    module.load_state_dict(state["model"])
    module.eval()
    k = eval_iwae or eval_particles or config.eval_particles
    result = {**evaluate(module, data, k, iwae=eval_iwae > 0).summary(), "eval_particles": k}
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
    return out  # created by the first file written into it
