"""Saved runs: read one back (config, trained module, data) and evaluate it again."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import MOST_SAMPLES, TrainConfig, check_fields, option
from ..data import Dataset
from ..errors import UsageError
from ..files import write_json
from ..run.rundir import DirLock
from ..run.session import Session


def load_run(run_dir: str | os.PathLike, cuda: bool = False, data_dir: str | None = None,
             model: type | None = None, data: bool = True
             ) -> tuple[TrainConfig, nn.Module, Dataset | None]:
    """The config, trained module (in eval mode) and data of a saved run directory
    (``model``: the class, for one defined in a notebook); with ``data=False`` no dataset is
    read (the checkpoint knows its shapes) and the module is ready to ``sample``, ``encode``
    and ``reconstruct``."""
    session = Session.from_dir(run_dir, cuda=cuda, data_dir=data_dir, model=model, data=data)
    session.module.eval()
    return session.config, session.module, session.data if data else None


@dataclass
class EvaluateOptions:
    """The options of ``python -m ppl_vae evaluate`` (:func:`evaluate_run`'s)."""

    run: str = option(None, "run directory written by train (--run-dir: the same, a spelling "
                      "torchrun's own --run-path does not swallow)", type=str, required=True,
                      aliases=("--run-dir",))
    eval_iwae: int = option(0, "IWAE log-likelihood bound with K samples per image (0: off)",
                            metavar="K", least=0, most=MOST_SAMPLES)
    eval_particles: int | None = option(None, "samples per image for the test ELBO (default: "
                                        "the run's; with --eval-iwae the ELBO uses the same K "
                                        "samples)", type=int, least=1, most=MOST_SAMPLES)
    data_dir: str | None = option(None, "dataset root, if it moved (default: the run's)",
                                  type=str)
    cuda: bool = option(False, "evaluate on the GPU")

    def __post_init__(self) -> None:
        check_fields(self)


def evaluate_run(run_dir: str | os.PathLike, eval_iwae: int = 0, cuda: bool = False,
                 data_dir: str | None = None, eval_particles: int | None = None,
                 model: type | None = None) -> dict:
    """Re-evaluate a saved run from its ``config.json`` and ``checkpoint.pt`` (the test ELBO,
    the IWAE bound with ``eval_iwae`` samples, and the numbers of the model's ``report``);
    update its ``summary.json`` (atomically) and return the new numbers (``notes``: what it
    reports)."""
    EvaluateOptions(os.fspath(run_dir), eval_iwae, eval_particles, data_dir, cuda)
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and not summary_path.is_file():  # before the long part
        kind = "a directory" if summary_path.is_dir() else "not a regular file"
        raise UsageError(f"{str(summary_path)!r} is {kind}; move it away so that evaluate can "
                         "write the run's summary there")
    if not run_dir.is_dir():
        raise UsageError(f"no run directory {str(run_dir)!r}; give the directory a training "
                         "run wrote")
    if not os.access(run_dir, os.W_OK):
        raise UsageError(f"--run {str(run_dir)!r} is read-only, so its summary.json cannot be "
                         "updated; copy the run directory somewhere writable and evaluate the "
                         "copy")
    lock = DirLock.acquire(run_dir, "--run")  # not while the run trains, nor two at once
    try:
        session = Session.from_dir(run_dir, cuda=cuda, data_dir=data_dir, model=model)
        return _evaluate(session, summary_path, eval_iwae, eval_particles)
    finally:
        lock.release()


def _evaluate(session: Session, summary_path: Path, eval_iwae: int,
              eval_particles: int | None) -> dict:
    config, ctx = session.config, session.ctx
    loop = session.state.get("loop") or {}
    k = eval_iwae or eval_particles or config.eval_particles
    ctx.figures = False  # the numbers again; the run's figures stay as they are
    session.module.eval()
    with session.validation(), torch.no_grad():
        scores = session.score(session.data.test, k, iwae=eval_iwae > 0)
        result = {**scores.summary(), "eval_particles": k}
        result.update(session.report(result))
    notes = [f"evaluation: {scores.method}"]
    if not loop.get("done", True):
        result["stopped_during_epoch"] = f"{loop['epoch']} of {config.epochs}"
        notes.append(f"the run stopped during epoch {loop['epoch']} of {config.epochs} (not "
                     "finished): these are the numbers of its last checkpoint")
    summary, why = read_summary(summary_path)
    if why is not None:  # never silently replaced: renamed to a new <name>.unreadable-<time>
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept, n = summary_path.with_name(f"summary.json.unreadable-{stamp}"), 1
        while kept.exists():
            n += 1
            kept = summary_path.with_name(f"summary.json.unreadable-{stamp}-{n}")
        try:
            os.replace(summary_path, kept)
        except OSError as e:
            raise UsageError(f"{str(summary_path)!r} is unreadable and cannot be moved aside "
                             f"({e.strerror}); move it away yourself and evaluate again"
                             ) from None
        notes.append(f"{str(summary_path)!r} was unreadable ({why}); kept it as {kept.name} "
                     "and wrote a new one")
    if "at_training" not in summary:  # the training run's own numbers, kept beside these
        summary["at_training"] = {k: summary[k] for k in result if k in summary}
    write_json(summary_path, {**summary, **result})
    return {**result, "notes": [*notes, *ctx.notes]}


def read_summary(path: Path) -> tuple[dict, str | None]:
    """A run's ``summary.json`` as a dict ({} if missing), and why it is unreadable (None if
    it is fine or missing)."""
    if not path.is_file():
        return {}, None
    try:
        saved = json.loads(path.read_text())
    except OSError as e:
        return {}, e.strerror or type(e).__name__
    except UnicodeDecodeError:
        return {}, "not text"
    except ValueError as e:  # json.JSONDecodeError
        return {}, f"not JSON: {e}"
    if not isinstance(saved, dict):
        return {}, f"a JSON {type(saved).__name__}, not an object"
    return saved, None
