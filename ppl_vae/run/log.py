"""Live logging (``--log tensorboard|mlflow``): a run's scalars, images and options as it
trains, written by rank 0 into its run directory; every value's step is the run's global step
(steps taken). What a logger has of the run never runs ahead of its checkpoint after a resume:
TensorBoard drops the events past the resumed step (``purge_step``), MLflow is written at each
checkpoint (a local file store cannot take values back)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from ..errors import UsageError
from ..files import write_text


class Logger(Protocol):
    """What the run logs through: numbers by name, images (C, H, W) in [0, 1]; ``flush``: the
    run has checkpointed, what was logged so far stays; ``close``: the run ended (``ok``: it
    finished; else what was logged after its last checkpoint is dropped where it can be)."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def image(self, step: int, name: str, image: Tensor) -> None:  # (by default: dropped)
        pass

    def flush(self) -> None: ...

    def close(self, ok: bool = True) -> None: ...


class TensorBoard(Logger):
    """Event files in ``out/tensorboard``; the options as hyperparameters at the start."""

    def __init__(self, out: Path, options: dict, resumed_at: int | None) -> None:
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
        if resumed_at is None:
            for summary in hparams(_flat(options), {}):
                self.writer.file_writer.add_summary(summary)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, step: int, name: str, image: Tensor) -> None:
        self.writer.add_image(name, image, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, ok: bool = True) -> None:  # (a resume purges what is past its step)
        self.writer.close()


class MLflow(Logger):
    """A local MLflow file store in ``out/mlruns``, one MLflow run per ppl_vae run (its id in
    ``out/mlflow_run_id``); values wait for the next checkpoint; images are not logged."""

    def __init__(self, out: Path, options: dict, resumed_at: int | None) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # (a local file store)
        mlflow = require("mlflow")
        self.entities = mlflow.entities
        store = (out.resolve() / "mlruns").as_uri()
        if not (out / "mlruns").is_dir():  # (MLflow caches a store per path: made anew here,
            from mlflow.store.tracking.file_store import FileStore  # where --overwrite took it)

            FileStore(store)
        self.client = mlflow.tracking.MlflowClient(tracking_uri=store)
        kept = out / "mlflow_run_id"
        if resumed_at is not None and kept.is_file():
            self.run_id = kept.read_text().strip()
            self.client.update_run(self.run_id, "RUNNING")
        else:
            experiment = self.client.get_experiment_by_name("ppl_vae")
            run = self.client.create_run(experiment.experiment_id if experiment else
                                         self.client.create_experiment("ppl_vae"))
            self.run_id = run.info.run_id
            write_text(kept, self.run_id + "\n")
            self.client.log_batch(self.run_id, params=[
                self.entities.Param(k, str(v)[:500]) for k, v in _flat(options).items()])
        self.waiting: list = []

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.waiting += [self.entities.Metric(name.replace("/", "."), float(value), 0, step)
                         for name, value in values.items()]

    def flush(self) -> None:
        for start in range(0, len(self.waiting), 1000):  # (MLflow's batch limit)
            self.client.log_batch(self.run_id, metrics=self.waiting[start:start + 1000])
        self.waiting = []

    def close(self, ok: bool = True) -> None:
        if ok:
            self.flush()
        self.waiting = []  # (a resume logs them again from the checkpoint)
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")


class Staged(Logger):
    """The logger of a run staged to replace another (``--overwrite``): opened by ``start``
    in the run directory once the staged run replaced the old one (its first checkpoint);
    until then what is logged waits in memory, and a run ending before leaves nothing."""

    def __init__(self, start: Callable[[], Logger]) -> None:
        self._start, self.logger, self.waiting = start, None, []

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._call("scalars", step, values)

    def image(self, step: int, name: str, image: Tensor) -> None:
        self._call("image", step, name, image)

    def flush(self) -> None:
        self._call("flush")

    def start(self) -> None:
        if self.logger is None:
            self.logger = self._start()
            for name, args in self.waiting:
                getattr(self.logger, name)(*args)
            self.waiting = []

    def close(self, ok: bool = True) -> None:
        if self.logger is not None:
            self.logger.close(ok)
        self.waiting = []

    def _call(self, name: str, *args: Any) -> None:
        if self.logger is None:
            self.waiting.append((name, args))
        else:
            getattr(self.logger, name)(*args)


LOGGERS = {"tensorboard": TensorBoard, "mlflow": MLflow}


def require(kind: str) -> Any:
    """The package ``--log kind`` needs (None for ``none``), refused in one line where it is
    missing: called by every process before the run does any work."""
    if kind not in LOGGERS:
        return None
    try:
        return __import__(kind, fromlist=["_"])
    except ImportError:
        raise UsageError(f"--log {kind} needs the {kind} package; pip install -e "
                         f"\".[{kind}]\" (or pip install {kind})") from None


def open_logger(kind: str, out: Path, options: dict, resumed_at: int | None) -> Logger | None:
    """The ``--log`` kind's logger for the run in ``out`` (``resumed_at``: the global step a
    resume continues from), or None for ``none``."""
    return LOGGERS[kind](out, options, resumed_at) if kind in LOGGERS else None


def _flat(options: dict) -> dict[str, Any]:
    """A run's options one level deep (model options as ``model_options.name``), as
    hyperparameters: numbers, strings and booleans."""
    flat = {k: v for k, v in options.items() if k != "model_options"}
    flat.update({f"model_options.{k}": v for k, v in options.get("model_options", {}).items()})
    return {k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
            for k, v in flat.items()}
