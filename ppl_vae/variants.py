"""Runs of several variants of one model, and their combined table.

A model whose ``variants(options)`` hook returns (name, options) pairs (one per quadrant
count of a quadrant-completion model, say) is trained once per variant, each in its own run
directory ``out/<name>`` on the same data; the model's ``combine`` hook then writes their
table beside them, with a ``summary.json`` naming the runs and merging the runs' table-like
(dict) metrics. :func:`train` is the entry point for every model: one run,
or several.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import resources
from .config import TrainConfig
from .data import Dataset
from .files import write_json
from .models import hook
from .run import distributed as dist
from .run.checkpoint import load_checkpoint
from .run.train import Run, build_model, has_checkpoint, load_data, open_run_dir, train_run


@dataclass
class Variants:
    """The runs of one set of options that makes several, and their table."""

    out: Path
    runs: dict[str, Run]
    table: str
    seconds: float

    @property
    def summary(self) -> dict:
        return {name: run.summary for name, run in self.runs.items()}


def variants_of(config: TrainConfig) -> list[tuple[str, object]]:
    return hook(config.model_class, "variants")(config.model_options)


def train(config: TrainConfig, data: Dataset | None = None, progress: bool | None = None,
          *, resume: bool = False) -> Run | Variants:
    """Train ``config.model`` by SVI and write its run directory: a :class:`Run`, or for
    options with several variants a :class:`Variants` of one run each. ``resume`` continues
    the run in ``config.out`` (variant runs that finished are read back, the interrupted one
    resumes, the rest start)."""
    variants = variants_of(config)
    if not variants:
        return train_run(config, data, progress, resume=resume)
    world = dist.setup(config.cuda)
    data = data if data is not None else load_data(config)
    for _, options in variants:  # bad options fail here, before any directory is made
        variant = replace(config, model_options=options)
        resources.check_model_fits(lambda v=variant: build_model(v, data), torch.device("cpu"))
        build_model(variant, data)
    with open_run_dir(config, world, resume) as parent:
        config = replace(config, out=str(parent.final),
                         data_dir=os.path.abspath(config.data_dir))
        if not resume and world.main:
            write_json(parent.path / "config.json", config.to_dict())
        start = time.perf_counter()
        runs: dict[str, Run] = {}
        for name, options in variants:
            sub = replace(config, model_options=options, out=str(parent.final / name))
            child = parent.child(name)
            if resume and _finished(parent.final / name):
                runs[name] = _read_run(parent.final / name)
            else:
                runs[name] = train_run(sub, data=data, progress=progress, rundir=child,
                                       resume=resume and has_checkpoint(parent.final / name))
        seconds = time.perf_counter() - start
        summaries = {name: run.summary for name, run in runs.items()}
        if not world.main:  # rank 0 writes the table
            return Variants(parent.final, runs, "", seconds)
        table = hook(config.model_class, "combine")(summaries, parent.path)
        merged: dict[str, dict] = {}
        for s in summaries.values():  # a metric that is a dict per run: one dict for the table
            for key, value in s.items():
                if isinstance(value, dict):
                    merged.setdefault(key, {}).update(value)
        write_json(parent.path / "summary.json", {
            **merged,
            "runs": {name: run.out.name for name, run in runs.items()},
            "best_epochs": {name: run.summary["best_epoch"] for name, run in runs.items()},
            "train_seconds": {name: run.summary["train_seconds"] for name, run in runs.items()},
            "wall_seconds": seconds,
            "config": config.to_dict(),
        })
        return Variants(parent.final, runs, table, seconds)


def _finished(run_dir: Path) -> bool:
    """A variant run that got to its summary (its checkpoint says training is done)."""
    if not (run_dir / "summary.json").is_file() or not has_checkpoint(run_dir):
        return False
    loop = load_checkpoint(run_dir / "checkpoint.pt").get("loop") or {}
    return bool(loop.get("done"))


def _read_run(run_dir: Path) -> Run:
    from .evaluation.runs import load_run

    config, module, data = load_run(run_dir)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    return Run(config, module, data, run_dir, list(state.get("history") or []), summary)
