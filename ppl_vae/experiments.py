"""Experiments made of several runs: the CVAE quadrant-completion table of Sohn et al. (2015).

``train_quadrant_table`` trains one CVAE (and its baseline NN) per number of observed
quadrants, each in its own run directory ``quadrants-K/``, and writes the combined table of
-log p(y|c) (``cll_table.csv``, ``cll_table.md``, ``summary.json``) beside them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import TrainConfig
from .files import write_json
from .run import Run, _make_dir, _run_dir, build_model, load_data, train
from .tables import write_cll_table


@dataclass
class TableRun:
    """The runs of a quadrant table and the table itself."""

    out: Path
    runs: dict[str, Run]
    cll: dict[str, dict[str, float]]
    markdown: str
    seconds: float


def train_quadrant_table(config: TrainConfig, progress: bool | None = None) -> TableRun:
    """One CVAE per count in ``config.quadrants``, on the same data, in ``out/quadrants-K``."""
    out = _run_dir(config)
    data = load_data(config)
    for k in config.quadrants:  # bad options fail here, before any directory is made
        build_model(replace(config, quadrants=(k,)), data)
    _make_dir(out)
    start = time.perf_counter()
    runs: dict[str, Run] = {}
    for k in config.quadrants:
        sub = replace(config, quadrants=(k,), out=str(out / f"quadrants-{k}"))
        runs[str(k)] = train(sub, data=data, progress=progress)
    seconds = time.perf_counter() - start
    cll = {k: run.summary["cll"][k] for k, run in runs.items()}
    markdown = write_cll_table(out, cll)
    write_json(out / "summary.json", {
        "cll": cll,
        "runs": {k: run.out.name for k, run in runs.items()},  # directories beside this file
        "best_epochs": {k: run.summary["best_epoch"] for k, run in runs.items()},
        "train_seconds": {k: run.summary["train_seconds"] for k, run in runs.items()},
        "wall_seconds": seconds,
        "config": replace(config, out=str(out.resolve()),
                          data_dir=os.path.abspath(config.data_dir)).to_dict(),
    })
    return TableRun(out, runs, cll, markdown, seconds)
