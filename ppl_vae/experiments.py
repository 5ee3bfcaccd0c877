"""Tables made of several training runs: ``python -m ppl_vae experiment NAME [options]``.
``cvae-quadrants``: one CVAE run per observed-quadrant count in ``<out>/quadrants-K`` and
their -log p(y|c) table (Sohn, Lee & Yan 2015); ``--resume`` reads finished runs back and
resumes an interrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import distributed as dist
from .config import TrainConfig, option
from .data import Dataset
from .errors import UsageError
from .files import write_json
from .models.cvae import cll_key, write_cll_table
from .run.session import Session, load_data, resolve
from .run.train import Run, has_checkpoint, resume_config, train_run


@dataclass
class Table:
    """The runs of an experiment and the table made of them."""

    out: Path
    runs: dict[str, Run]
    table: str
    seconds: float


def cvae_quadrants(config: TrainConfig, quadrants: Sequence[int] = (1, 2, 3),
                   data: Dataset | None = None, progress: bool | None = None,
                   resume: bool = False) -> Table:
    """One CVAE run per count in ``quadrants`` (``config``'s other options) in
    ``config.out/quadrants-K`` and their conditional log-likelihood table; see the module."""
    config, _ = resolve(config)
    if getattr(config.model_options, "condition", None) != "quadrants":
        raise UsageError("the cvae-quadrants table trains a CVAE with --condition 'quadrants'")
    if not quadrants or len(set(quadrants)) != len(quadrants):
        raise UsageError(f"--quadrants lists the counts of the table once each, got "
                         f"{list(quadrants)}")
    out = Path(config.out or f"runs/cvae-quadrants-{time.strftime('%Y%m%d-%H%M%S')}")
    configs = {f"quadrants-{k}": replace(config, out=str(out / f"quadrants-{k}"),
                                         model_options=replace(config.model_options,
                                                               quadrants=k))
               for k in quadrants}  # (bad counts fail here, before any run starts)
    data = data if data is not None else load_data(config)
    world = dist.setup(config.cuda)
    start = time.perf_counter()
    runs: dict[str, Run] = {}
    for name, run_config in configs.items():
        where = Path(run_config.out)
        finished = resume and has_checkpoint(where) and (where / "summary.json").is_file()
        session = Session.from_dir(where, cuda=config.cuda) if finished else None
        if session is not None and (session.state.get("loop") or {}).get("done"):
            runs[name] = Run(session.config, session.module, session.data, where,
                             list(session.state.get("history") or []),
                             json.loads((where / "summary.json").read_text()))
        elif resume and has_checkpoint(where):
            runs[name] = train_run(resume_config(where), data, progress, resume=True)
        else:
            runs[name] = train_run(run_config, data, progress)
    seconds = time.perf_counter() - start
    cll = {cll_key(run.config.model_options): run.summary["cll"][
        cll_key(run.config.model_options)] for run in runs.values()}
    table = ""
    if world.main:  # rank 0 writes the table
        table = write_cll_table(out, cll)
        write_json(out / "summary.json", {
            "cll": cll, "runs": {name: run.out.name for name, run in runs.items()},
            "best_epochs": {name: run.summary["best_epoch"] for name, run in runs.items()},
            "train_seconds": {name: run.summary["train_seconds"] for name, run in runs.items()},
            "wall_seconds": seconds, "config": config.to_dict()})
    return Table(out, runs, table, seconds)


@dataclass
class QuadrantsOptions:
    """The options of ``experiment cvae-quadrants`` (its runs take ``train``'s)."""

    quadrants: tuple[int, ...] = option((1, 2, 3), "the observed-quadrant counts of the table, "
                                        "one run each")
    resume: bool = option(False, "continue the table in --out: finished runs are read back, "
                          "an interrupted one resumes")


EXPERIMENTS = {"cvae-quadrants": (cvae_quadrants, "cvae", QuadrantsOptions, "one CVAE per number "
                                  "of observed quadrants and their -log p(y|c) table (Sohn et al. "
                                  "2015)")}
"""name: (function ``(config, **options)``, the model its runs train, its options, help)."""
