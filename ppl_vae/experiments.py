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
from .interrupt import Interrupted
from .models.cvae import cll_key, write_cll_table
from .run.session import Session, load_data, resolve
from .run.train import Run, has_checkpoint, open_run_dir, resume_config, resumed, train_run


@dataclass
class Table:
    """The runs of an experiment and the table made of them."""

    out: Path
    runs: dict[str, Run]
    table: str
    seconds: float


def cvae_quadrants(config: TrainConfig, quadrants: Sequence[int] | None = None,
                   data: Dataset | None = None, progress: bool | None = None,
                   resume: bool = False, given: dict | None = None) -> Table:
    """One CVAE run per count in ``quadrants`` (default 1, 2, 3; ``config``'s other options)
    in ``config.out/quadrants-K`` and their conditional log-likelihood table; see the module.
    The table's directory is a run directory (locked; one holding files is refused without
    ``overwrite``, which replaces it); ``resume`` continues the table in ``config.out`` with
    the options it was started with (``table.json``): an option ``given`` (default: those of
    ``config`` that are not TrainConfig's defaults) that contradicts them is refused."""
    world = dist.setup(config.cuda)
    if resume:
        config, quadrants = _recorded(config, quadrants, given)
    quadrants = (1, 2, 3) if quadrants is None else tuple(int(k) for k in quadrants)
    if not quadrants:
        raise UsageError("--quadrants takes one or more counts of observed quadrants")
    config, _ = resolve(config)
    if getattr(config.model_options, "condition", None) != "quadrants":
        raise UsageError("the cvae-quadrants table trains a CVAE with --condition 'quadrants'")
    if len(set(quadrants)) != len(quadrants):
        raise UsageError(f"--quadrants lists the counts of the table once each, got "
                         f"{list(quadrants)}")
    configs = {f"quadrants-{k}": replace(config, model_options=replace(config.model_options,
                                                                      quadrants=k))
               for k in quadrants}  # (bad counts fail here, before any run starts)
    with open_run_dir(replace(config, model="cvae-quadrants"), world, resume) as table_dir:
        out = table_dir.final
        table_dir.commit()  # (with overwrite: the old contents go now)
        if world.main and not resume:
            write_json(out / TABLE, {"config": config.to_dict(), "quadrants": list(quadrants)})
        data = data if data is not None else load_data(config)
        start = time.perf_counter()
        runs: dict[str, Run] = {}
        for name, run_config in configs.items():
            try:
                runs[name] = _table_run(replace(run_config, out=str(out / name)), data,
                                        progress, resume)
            except Interrupted as e:  # the table's own command continues it
                said = (e.message or "interrupted").split("; continue")[0]
                raise Interrupted(e.signum, f"{name}: {said}; continue the table with --resume "
                                  f"--out {out}") from None
        seconds = time.perf_counter() - start
        cll = {cll_key(run.config.model_options): run.summary["cll"][
            cll_key(run.config.model_options)] for run in runs.values()}
        table = ""
        if world.main:  # rank 0 writes the table
            table = write_cll_table(out, cll)
            write_json(out / "summary.json", {
                "cll": cll, "runs": {name: run.out.name for name, run in runs.items()},
                "best_epochs": {name: run.summary["best_epoch"] for name, run in runs.items()},
                "train_seconds": {n: run.summary["train_seconds"] for n, run in runs.items()},
                "wall_seconds": seconds, "config": config.to_dict()})
    return Table(out, runs, table, seconds)


TABLE = "table.json"
"""The options a table was started with, in its directory: what its ``--resume`` takes."""


def _recorded(config: TrainConfig, quadrants: Sequence[int] | None, given: dict | None
              ) -> tuple[TrainConfig, tuple[int, ...]]:
    """The options of the table in ``config.out`` (its :data:`TABLE`); those ``given`` (or
    set in ``config``) and counts that differ from them are refused."""
    if config.out is None:
        raise UsageError("--resume continues the table in --out DIR; give its directory")
    path = Path(config.out) / TABLE
    try:
        record = json.loads(path.read_text())
        started = TrainConfig.from_dict(record["config"])
        counts = tuple(int(k) for k in record["quadrants"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--resume: {str(path)!r} is not a table's record ({type(e).__name__}); "
                         "give the directory of a table started by this version") from None
    if quadrants is not None and tuple(quadrants) != counts:
        raise UsageError(f"--resume: --quadrants {' '.join(map(str, quadrants))} contradicts "
                         f"the table's {' '.join(map(str, counts))}; drop it to continue")
    if given is None:  # from Python: what config sets apart from the defaults
        default = TrainConfig().to_dict()
        given = {k: v for k, v in config.to_dict().items() if v != default[k]}
    return resumed(started, given, config.out, "table"), counts


def _table_run(config: TrainConfig, data: Dataset, progress: bool | None, resume: bool) -> Run:
    """One run of a table: trained, resumed where it has a checkpoint, or read back when it
    finished."""
    where = Path(config.out)
    if resume and has_checkpoint(where):
        if (where / "summary.json").is_file():
            session = Session.from_dir(where, cuda=config.cuda)
            if (session.state.get("loop") or {}).get("done"):
                return Run(session.config, session.module, session.data, where,
                           list(session.state.get("history") or []),
                           json.loads((where / "summary.json").read_text()))
        return train_run(resume_config(where), data, progress, resume=True)
    return train_run(replace(config, overwrite=True), data, progress)  # (a dir of this table)


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
