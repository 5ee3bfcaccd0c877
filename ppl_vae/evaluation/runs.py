"""Saved runs: read one back (config, trained module, data) and evaluate it again."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pyro
import torch
from torch import nn

from ..config import TrainConfig
from ..data import Dataset
from ..errors import UsageError
from ..files import write_json
from ..inference.program import ProgramInfo
from ..run.checkpoint import load_checkpoint, restore_params
from ..run.rundir import DirLock
from ..run.train import (
    context,
    device_for,
    load_data,
    report,
    score_split,
    setup_model,
    use_threads,
)


def read_config(run_dir: Path, model: type | None = None) -> TrainConfig:
    """The run's ``config.json`` as a :class:`TrainConfig` (``model`` overrides the class it
    names, for a class defined in a notebook)."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        parts = sorted(p.name for p in run_dir.glob("*") if (p / "config.json").is_file())
        hint = (f"it holds several runs: give one of them, e.g. --run "
                f"{str(run_dir / parts[0])!r}" if parts else
                "give --run the directory a training run wrote")
        raise UsageError(f"no config.json in {str(run_dir)!r}; {hint}")
    try:
        saved = json.loads(config_path.read_text())
        if not isinstance(saved, dict):
            raise TypeError("not a JSON object")
        if model is not None:
            saved["model"] = model
        return TrainConfig.from_dict(saved)
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON or bad option values
        raise UsageError(f"{os.fspath(config_path)!r} is not a readable run config ({e})"
                         ) from None


def load_run(run_dir: str | os.PathLike, cuda: bool = False, data_dir: str | None = None,
             model: type | None = None, data: bool = True
             ) -> tuple[TrainConfig, nn.Module, Dataset | None]:
    """The config, trained module (in eval mode) and data of a saved run directory; with
    ``data=False`` no dataset is read (the checkpoint knows its shapes) and the module is
    ready to ``sample``, ``encode`` and ``reconstruct``."""
    if data:
        return open_run(run_dir, cuda, data_dir, model)[:3]
    run_dir = Path(run_dir)
    config = read_config(run_dir, model)
    device = device_for(cuda)
    state = load_checkpoint(run_dir / "checkpoint.pt", map_location=device)
    if not state.get("data"):
        raise UsageError(f"the checkpoint in {str(run_dir)!r} predates loading without the "
                         "data; load it with its data (data=True)")
    with pyro.validation_enabled(config.validate):
        module, _ = setup_model(config, Dataset.stand_in(state["data"]), device,
                                training=False)
    _load_state(module, state, run_dir)
    return config, module, None


def _load_state(module: nn.Module, state: dict, run_dir: Path) -> None:
    try:
        module.load_state_dict(state["model"])
    except RuntimeError:
        raise UsageError(f"the checkpoint in {str(run_dir)!r} does not fit the model its "
                         "config.json describes; was one of them replaced?") from None
    restore_params(state)
    module.eval()


def open_run(run_dir: str | os.PathLike, cuda: bool = False, data_dir: str | None = None,
             model: type | None = None
             ) -> tuple[TrainConfig, nn.Module, Dataset, ProgramInfo]:
    """:func:`load_run` and what the probe of the module's program found."""
    run_dir = Path(run_dir)
    config = read_config(run_dir, model)
    config = replace(config, cuda=cuda, data_dir=data_dir or config.data_dir)
    device = device_for(cuda)
    use_threads()
    state = load_checkpoint(run_dir / "checkpoint.pt", map_location=device)
    data = load_data(config).to(device)
    with pyro.validation_enabled(config.validate):  # a guide's lazy parameters exist now
        module, info = setup_model(config, data, device, training=False)
    _load_state(module, state, run_dir)
    return config, module, data, info


def evaluate_run(run_dir: str | os.PathLike, eval_iwae: int = 0, cuda: bool = False,
                 data_dir: str | None = None, eval_particles: int | None = None,
                 model: type | None = None) -> dict:
    """Re-evaluate a saved run from its ``config.json`` and ``checkpoint.pt`` (the test ELBO,
    the IWAE bound with ``eval_iwae`` samples, and the numbers of the model's ``report``);
    update its ``summary.json`` (atomically) and return the new numbers (``notes``: what it
    reports)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and not summary_path.is_file():  # before the long part
        kind = "a directory" if summary_path.is_dir() else "not a regular file"
        raise UsageError(f"{str(summary_path)!r} is {kind}; move it away so that evaluate can "
                         "write the run's summary there")
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK):
        raise UsageError(f"--run {str(run_dir)!r} is read-only, so its summary.json cannot be "
                         "updated; copy the run directory somewhere writable and evaluate the "
                         "copy")
    if not run_dir.is_dir():
        open_run(run_dir, cuda, data_dir, model)  # (its one line: no such run)
    lock = DirLock.acquire(run_dir, "--run")  # not while the run trains, nor two at once
    try:
        return _evaluate(run_dir, summary_path, eval_iwae, cuda, data_dir, eval_particles,
                         model)
    finally:
        lock.release()


def _evaluate(run_dir: Path, summary_path: Path, eval_iwae: int, cuda: bool,
              data_dir: str | None, eval_particles: int | None, model: type | None) -> dict:
    config, module, data, info = open_run(run_dir, cuda, data_dir, model)
    loop = load_checkpoint(run_dir / "checkpoint.pt").get("loop") or {}
    k = eval_iwae or eval_particles or config.eval_particles
    ctx = context(config, module, data, run_dir, progress=False)
    ctx.figures = False  # the numbers again; the run's figures stay as they are
    with pyro.validation_enabled(config.validate), torch.no_grad():
        scores = score_split(module, data.test, k, iwae=eval_iwae > 0, info=info)
        result = {**scores.summary(), "eval_particles": k}
        ctx.summary = dict(result)  # the report derives from it, not a second evaluation
        result.update(report(module, ctx))
    notes = [f"evaluation: {scores.method}"]
    if loop and not loop.get("done", True):
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
