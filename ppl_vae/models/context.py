"""What a model's hooks see of the run they are called in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    """What a hook sees of a run: its settings, the model's options, data and directory.

    ``fit(loss, part, name, desc)`` trains the module ``part`` on ``loss(*data_args)`` (a
    differentiable sum over rows) with the run's epochs, batch size, learning rate and early
    stopping, and returns one row per epoch (``train_<name>``, ``test_<name>``, ...).
    ``score(module, *args, num_samples=K, iwae=False, guide=None)`` is
    :func:`ppl_vae.inference.importance.score`. ``log(text)`` adds a line to what the run reports.
    ``summary`` holds the run's own test evaluation (``test_elbo``, ``eval_particles`` and,
    with ``--eval-iwae``, ``test_log_likelihood_iwae``) when ``report`` is called, so a
    model can derive numbers from it without scoring the test split again. ``figures``: whether
    ``report`` draws (``evaluate`` re-computes the numbers only).
    """

    config: Any
    options: Any
    data: Any
    out: Path
    fit: Callable[..., list[dict]] | None = None
    score: Callable[..., Any] | None = None
    progress: bool | None = None
    notes: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    figures: bool = True

    def log(self, text: str) -> None:
        self.notes.append(text)
