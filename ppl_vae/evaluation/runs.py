"""Saved runs: read one back (config, trained module, data) and evaluate it again."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pyro
import torch
from torch import nn

from ..checkpoint import load_checkpoint, restore_params
from ..config import TrainConfig
from ..data import Dataset
from ..errors import UsageError
from ..files import write_json
from ..inference.trainer import build_model, context, device_for, load_data, probe, score_split
from ..models import hook


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
             model: type | None = None) -> tuple[TrainConfig, nn.Module, Dataset]:
    """The config, trained module (in eval mode) and data of a saved run directory."""
    run_dir = Path(run_dir)
    config = read_config(run_dir, model)
    config = replace(config, cuda=cuda, data_dir=data_dir or config.data_dir)
    device = device_for(cuda)
    state = load_checkpoint(run_dir / "checkpoint.pt", map_location=device)
    data = load_data(config).to(device)
    with pyro.validation_enabled(config.validate):
        pyro.clear_param_store()
        module = build_model(config, data).to(device)
        probe(module, data)  # parameters a guide creates lazily exist before loading
    try:
        module.load_state_dict(state["model"])
    except RuntimeError:
        raise UsageError(f"the checkpoint in {str(run_dir)!r} does not fit the model its "
                         "config.json describes; was one of them replaced?") from None
    restore_params(state)
    module.eval()
    return config, module, data


def evaluate_run(run_dir: str | os.PathLike, eval_iwae: int = 0, cuda: bool = False,
                 data_dir: str | None = None, eval_particles: int | None = None,
                 model: type | None = None) -> dict:
    """Re-evaluate a saved run from its ``config.json`` and ``checkpoint.pt`` (the test ELBO,
    the IWAE bound with ``eval_iwae`` samples, and the model's ``metrics`` hook); update its
    ``summary.json`` (atomically) and return the new numbers (``notes``: what it reports)."""
    run_dir = Path(run_dir)
    config, module, data = load_run(run_dir, cuda, data_dir, model)
    k = eval_iwae or eval_particles or config.eval_particles
    ctx = context(config, module, data, run_dir, progress=False)
    with pyro.validation_enabled(config.validate), torch.no_grad():
        scores = score_split(module, data.test, k, iwae=eval_iwae > 0)
        result = {**scores.summary(), "eval_particles": k}
        result.update(hook(module, "metrics")(ctx))
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary = summary if isinstance(summary, dict) else {}
    except ValueError:
        summary = {}  # unreadable: replaced by the new numbers
    write_json(summary_path, {**summary, **result})
    return {**result, "notes": [f"evaluation: {scores.method}", *ctx.notes]}

