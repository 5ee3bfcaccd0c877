"""One training run from a :class:`~ppl_vae.config.TrainConfig` to files.

data -> model (built from its options) -> the model's ``pretrain`` hook -> SVI epochs ->
evaluation and the model's ``metrics`` -> ``config.json``, ``metrics.csv``, ``summary.json``,
``checkpoint.pt`` and figures (``elbo_curves.png`` and the model's ``figures`` hook) in the
run directory. The trainer talks to the model only through the hooks of
:mod:`ppl_vae.models.base`, and runs under one Pyro validation setting (``validate``) from
the first probe of the program to the last figure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn

from .. import plots
from ..checkpoint import save_checkpoint
from ..config import TrainConfig
from ..data import Dataset, Split, load_dataset
from ..errors import UsageError
from ..files import write_csv, write_json
from ..models import RunContext, hook
from ..rundir import make_run_dir, resolve_run_dir
from .estimators import make_elbo
from .importance import Scores, score
from .program import ProgramInfo, inspect_program
from .svi import backward_step, collect_params, elbo_step, fit


@dataclass
class Run:
    """What :func:`train_run` leaves behind, in memory as on disk. ``notes`` are the lines
    the run reports beside its numbers (evaluation path, skipped figures, model tables)."""

    config: TrainConfig
    module: nn.Module
    data: Dataset
    out: Path
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def device_for(cuda: bool) -> torch.device:
    if cuda and not torch.cuda.is_available():
        raise UsageError("--cuda was given but no CUDA device is available to torch; "
                         "drop --cuda to run on the CPU")
    return torch.device("cuda" if cuda else "cpu")


def load_data(config: TrainConfig) -> Dataset:
    return load_dataset(config.dataset, config.data_dir, config.download, config.binarize)


def build_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """The model's ``from_options(options, data)`` hook."""
    cls = config.model_class
    module = hook(cls, "from_options")(config.model_options, data)
    if not isinstance(module, nn.Module):
        raise UsageError(f"--model {config.model_name!r} built a {type(module).__name__}, not "
                         "a torch.nn.Module; keep the networks in an nn.Module")
    return module


def data_args(module: nn.Module, split: Split, rows: slice | None = None) -> tuple[Tensor, ...]:
    """The arguments of ``module.model``/``guide`` for (some rows of) ``split``."""
    x, y = split.x, split.y
    if rows is not None:
        x, y = x[rows], None if y is None else y[rows]
    return hook(module, "data_args")(x, y)


def train_args(module: nn.Module, data: Dataset, generator: torch.Generator | None = None
               ) -> tuple[Tensor, ...]:
    """The arguments of ``module.model``/``guide`` for one epoch of training rows (freshly
    binarized under dynamic binarization, drawn by ``generator``)."""
    return hook(module, "data_args")(data.train_epoch(generator), data.train.y)


def probe(module: nn.Module, data: Dataset) -> ProgramInfo:
    """:func:`inspect_program` of every term of the module's objective on two training rows
    (this also creates parameters that a guide makes lazily, e.g. an autoguide's)."""
    args = data_args(module, data.train, slice(0, 2))
    infos = [inspect_program(m, g, *args) for _, m, g in hook(module, "programs")()]
    first = infos[0]
    return replace(first, max_plate_nesting=max(i.max_plate_nesting for i in infos),
                   vectorized=all(i.vectorized for i in infos),
                   registered=frozenset().union(*(i.registered for i in infos)),
                   params=tuple({id(p): p for i in infos for p in i.params}.values()))


def score_split(module: nn.Module, split: Split, num_samples: int, iwae: bool = False
                ) -> Scores:
    """Per-row ELBO (and IWAE bound) of ``module`` on ``split`` with its proposal."""
    return score(module, *data_args(module, split), num_samples=num_samples, iwae=iwae)


def context(config: TrainConfig, module: nn.Module, data: Dataset, out: Path,
            progress: bool | None) -> RunContext:
    """The :class:`RunContext` hooks receive, with ``fit`` for supervised pre-training."""

    def fit_part(loss, part: nn.Module, name: str = "loss", desc: str = "pretrain"
                 ) -> list[dict]:
        history: list[dict] = []

        def per_row(split: Split) -> float:
            with torch.no_grad():
                total = sum(loss(*data_args(module, split, slice(i, i + 4096))).item()
                            for i in range(0, len(split), 4096))
            return total / len(split)

        def on_epoch(epoch: int, train: float, seconds: float, val: float | None) -> None:
            history.append({"epoch": epoch, f"train_{name}": train,
                            f"test_{name}": per_row(data.test), "train_seconds": seconds,
                            **({} if val is None else {f"val_{name}": val})})

        fit(backward_step(loss), torch.optim.Adam(part.parameters(), lr=config.lr), part,
            lambda: train_args(module, data),
            config.batch_size, config.epochs,
            validate=(lambda: per_row(data.val)) if config.early_stop else None,
            patience=config.early_stop, on_epoch=on_epoch, progress=progress, desc=desc)
        return history

    return RunContext(config, config.model_options, data, out, fit=fit_part, progress=progress,
                      score=score)


def prepare(config: TrainConfig, data: Dataset | None = None
            ) -> tuple[TrainConfig, torch.device, Dataset]:
    """Absolute paths in ``config`` (so a run can be re-read from anywhere), the device and
    the data on it (with a validation split under early stopping)."""
    config = replace(config, data_dir=os.path.abspath(config.data_dir))
    if config.dataset.startswith("npz:"):
        config = replace(config, dataset="npz:" + os.path.abspath(config.dataset[4:]))
    device = device_for(config.cuda)
    data = data if data is not None else load_data(config)
    if config.early_stop:
        data = data.with_validation(config.val_fraction)
    return config, device, data.to(device)


def train_run(config: TrainConfig, data: Dataset | None = None, progress: bool | None = None
              ) -> Run:
    """Train one model by SVI and write its run directory. Clears Pyro's param store.

    With ``config.early_stop`` a validation split is carved out of the training split, and
    the run keeps the weights of its best validation ELBO.
    """
    setting = "--out"
    out = resolve_run_dir(config.out, config.model_name, config.overwrite, setting)
    config = replace(config, out=str(out))
    config, device, data = prepare(config, data)
    with pyro.validation_enabled(config.validate):
        return _train(config, device, data, out, progress)


def _train(config: TrainConfig, device: torch.device, data: Dataset, out: Path,
           progress: bool | None) -> Run:
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    module = build_model(config, data).to(device)
    info = probe(module, data)
    terms = hook(module, "programs")()
    elbo = make_elbo(config.elbo, config.particles, config.jit, info.max_plate_nesting,
                     vectorize=info.vectorized)
    step = elbo_step(elbo, module, terms, info)
    make_run_dir(out)  # only once the options have proved good: bad input leaves nothing
    run = Run(config, module, data, out)
    ctx = context(config, module, data, out, progress)
    write_json(out / "config.json", config.to_dict())
    hook(module, "pretrain")(ctx)

    optimizer = torch.optim.Adam(collect_params(module, info), lr=config.lr)

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
                     lambda: train_args(module, data),
                     config.batch_size, config.epochs,
                     validate=validate if config.early_stop else None,
                     patience=config.early_stop, on_epoch=on_epoch, progress=progress,
                     desc=config.model_name)
    if config.early_stop:  # the checkpoint holds the best weights, not the last
        save_checkpoint(out / "checkpoint.pt", module, optimizer, best_epoch, config.to_dict())

    k = config.eval_iwae or config.eval_particles
    scores = score_split(module, data.test, k, iwae=config.eval_iwae > 0)
    ctx.log(f"evaluation: {scores.method}")
    run.summary = {
        **scores.summary(),
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
    with torch.no_grad():
        run.summary.update(hook(module, "metrics")(ctx))
    write_json(out / "summary.json", run.summary)
    write_figures(run, ctx)
    run.notes = ctx.notes
    return run


def write_figures(run: Run, ctx: RunContext) -> None:
    """ELBO curves, then the model's ``figures`` hook (which logs what it skipped)."""
    plots.elbo_curves(run.history, run.out / "elbo_curves.png")
    with torch.no_grad():
        hook(run.module, "figures")(ctx)
