"""What a model's hooks see of the run they are called in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    """What a hook sees of a run: its settings, the model's options, data and directory.
    ``fit(loss, part, name, desc, inputs)`` trains ``part`` on ``loss(*data_args)`` (or on
    ``loss(*inputs(x, y))``: M1 of M1+M2 on the pixels) with the run's settings and returns
    one row per epoch; ``score`` is
    :func:`ppl_vae.inference.importance.score`; ``log(text)`` adds a line to the run's report;
    ``summary`` holds the run's test evaluation when ``report`` is called; ``figures``: whether
    ``report`` draws (not under ``evaluate``)."""

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
