"""Runs of several variants of one model, and their combined table.

A model whose ``variants(options)`` hook returns (name, options) pairs (one per quadrant
count of a quadrant-completion model, say) is trained once per variant, each in its own run
directory ``out/<name>`` on the same data; the model's ``combine`` hook then writes their
table beside them, with a ``summary.json`` naming the runs and merging the runs' table-like
(dict) metrics. :func:`train` is the entry point for every model: one run,
or several.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import TrainConfig
from .data import Dataset
from .files import write_json
from .inference.trainer import Run, build_model, load_data, train_run
from .models import hook
from .rundir import make_run_dir, resolve_run_dir


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


def train(config: TrainConfig, data: Dataset | None = None, progress: bool | None = None
          ) -> Run | Variants:
    """Train ``config.model`` by SVI and write its run directory: a :class:`Run`, or for
    options with several variants a :class:`Variants` of one run each."""
    variants = variants_of(config)
    if not variants:
        return train_run(config, data, progress)
    out = resolve_run_dir(config.out, config.model_name, config.overwrite)
    config = replace(config, out=str(out))
    data = data if data is not None else load_data(config)
    for _, options in variants:  # bad options fail here, before any directory is made
        build_model(replace(config, model_options=options), data)
    make_run_dir(out)
    start = time.perf_counter()
    runs: dict[str, Run] = {}
    for name, options in variants:
        sub = replace(config, model_options=options, out=str(out / name))
        runs[name] = train_run(sub, data=data, progress=progress)
    seconds = time.perf_counter() - start
    summaries = {name: run.summary for name, run in runs.items()}
    table = hook(config.model_class, "combine")(summaries, out)
    merged: dict[str, dict] = {}
    for s in summaries.values():  # a metric that is a dict per run: one dict for the table
        for key, value in s.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
    write_json(out / "summary.json", {
        **merged,
        "runs": {name: run.out.name for name, run in runs.items()},
        "best_epochs": {name: run.summary["best_epoch"] for name, run in runs.items()},
        "train_seconds": {name: run.summary["train_seconds"] for name, run in runs.items()},
        "wall_seconds": seconds,
        "config": replace(config, out=str(out.resolve()),
                          data_dir=os.path.abspath(config.data_dir)).to_dict(),
    })
    return Variants(out, runs, table, seconds)
