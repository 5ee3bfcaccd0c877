"""One training run from a :class:`~ppl_vae.config.TrainConfig` to files: the session (data, the
model built and probed) -> ``pretrain`` -> SVI epochs (:class:`~ppl_vae.run.loop.Loop`) ->
evaluation and ``report`` -> ``config.json``, ``metrics.csv``, ``summary.json``, ``checkpoint.pt``
and figures. The model is reached only through the hooks of :mod:`ppl_vae.models.base`. The run
directory (:class:`~ppl_vae.run.rundir.RunDir`) is locked for the run; under torchrun only rank 0
writes files (hooks on other ranks see a scratch directory)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed as dist
from .. import plots
from ..config import TrainConfig
from ..data import TORCHVISION, Dataset
from ..distributed import World
from ..errors import UsageError
from ..files import write_csv, write_json
from ..interrupt import Interrupted, signals
from ..models import hook
from ..models.figures import epoch_images
from .checkpoint import (
    load_checkpoint,
    load_store_values,
    restoring,
    save_checkpoint,
    store_values,
)
from .log import Staged, open_logger, require
from .loop import Loop, same_world
from .rundir import RunDir
from .session import Session, device_for, from_record, resolve


@dataclass
class Run:
    """What :func:`train_run` leaves behind, in memory as on disk. ``notes`` are the lines
    the run reports beside its numbers (evaluation path, skipped figures, model tables)."""

    config: TrainConfig
    module: nn.Module
    data: Dataset
    out: Path
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


NOT_THE_MATH = ("checkpoint_every_steps", "check_every_steps", "data_dir", "threads",
                "eval_iwae")
"""Options a resume may change (how often it saves, where the data now lie, the final
evaluation's IWAE samples)."""


def as_recorded(config: dict) -> dict:
    """A config dict as ``config.json`` holds it (JSON types: tuples are lists), less how the
    run was opened (``overwrite``), which is not part of the run's record."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k != "overwrite"}


def has_checkpoint(out: str | os.PathLike | None) -> bool:
    return out is not None and (Path(out) / "checkpoint.pt").is_file()


def resume_config(run_dir: str | os.PathLike, given: dict | None = None) -> TrainConfig:
    """The options of the run in ``run_dir`` (its ``config.json``; the checkpoint's copy where
    that is missing), with the options ``given`` now: one that contradicts the run's is a
    :class:`UsageError`; those that do not change the math (:data:`NOT_THE_MATH`) are taken."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"--resume {str(path)!r} is not a run directory")
    if not has_checkpoint(path):
        raise UsageError(f"--resume {str(path)!r}: no checkpoint.pt there, so nothing to "
                         "resume; train without --resume (--out DIR) to start a run")
    given = given or {}
    if (out := given.get("out")) is not None and os.path.abspath(out) != os.path.abspath(path):
        raise UsageError(f"--resume continues the run in {str(path)!r} and writes there; drop "
                         f"--out {out!r} (to continue a copy, copy the directory and resume it)")
    saved = path / "config.json"
    try:
        record = json.loads(saved.read_text()) if saved.is_file() else \
            load_checkpoint(path / "checkpoint.pt")["config"]
    except (OSError, ValueError) as e:
        raise UsageError(f"{str(saved)!r} is not readable JSON ({type(e).__name__}); "
                         "delete it to resume from the checkpoint's own copy") from None
    return resumed(TrainConfig.from_dict(record), given, str(path))


def resumed(recorded: TrainConfig, given: dict, out: str, what: str = "run") -> TrainConfig:
    """The ``recorded`` options of a run (or table) continued in ``out``: an option ``given``
    (flag name -> value; model options under ``model_options``) that contradicts them is
    refused; those that do not change the math (:data:`NOT_THE_MATH`) are taken."""
    mine = recorded.to_dict()
    for key, value in given.items():
        if key in ("overwrite", "model_options", "out") or key not in mine or \
                key in NOT_THE_MATH or value == mine[key]:
            continue
        flag = "--" + key.replace("_", "-")
        raise UsageError(f"--resume: {flag} {value!r} contradicts the {what}'s {mine[key]!r}; "
                         f"drop {flag} to continue the {what}, or start a new one")
    options = given.get("model_options") or {}
    for key, value in (options.items() if isinstance(options, dict) else ()):
        if key not in mine["model_options"]:
            raise UsageError(f"--resume: the {what}'s model has no option {key!r} (its "
                             f"options: {', '.join(sorted(mine['model_options'])) or 'none'}); "
                             "drop it to continue the run")
        if json.loads(json.dumps(value)) != \
                json.loads(json.dumps(mine["model_options"][key])):
            raise UsageError(f"--resume: the model option {key}={value!r} contradicts the "
                             f"{what}'s {mine['model_options'][key]!r}; drop it to continue the "
                             f"{what}")
    taken = {k: v for k, v in given.items() if k in NOT_THE_MATH}
    return replace(recorded, **taken, out=out, overwrite=False)


def _resumable(config: TrainConfig, cls: type, path: Path, world: World) -> dict:
    """The checkpoint of the run being resumed (read once), which must agree with ``config``
    (but for :data:`NOT_THE_MATH`), with the directory's ``config.json`` and with the number
    of processes."""
    state = load_checkpoint(path / "checkpoint.pt", map_location=device_for(config.cuda, world))
    loop = state.get("loop")
    size = loop.get("world_size") if isinstance(loop, dict) else None
    if type(size) is int:  # (before anything is written; another value: see restoring)
        same_world(size, world)
    if state.get("loop") is None and not state.get("fits"):
        raise UsageError(f"{str(path)!r} holds a checkpoint from a version that cannot "
                         "resume; start a new run")
    stored = as_recorded(from_record(state["config"], cls)[0].to_dict())
    mine = as_recorded(config.to_dict())
    differ = sorted(k for k in set(stored) | set(mine)
                    if k not in (*NOT_THE_MATH, "out") and stored.get(k) != mine.get(k))
    if differ:
        saved = path / "config.json"
        record = {}
        with contextlib.suppress(OSError, ValueError):
            record = as_recorded(from_record(json.loads(saved.read_text()), cls)[0].to_dict())
        if record and all(record.get(k) == stored.get(k) for k in differ):  # the caller's differ
            raise UsageError(f"resuming {str(path)!r} with other options than its run's (" +
                             ", ".join(f"{k}={mine.get(k)!r}, the run's {stored.get(k)!r}"
                                       for k in differ[:3]) +
                             "); take the run's with resume_config(run_dir), or start a new run")
        where = f"{str(saved)!r}" if saved.is_file() else "the options given"
        raise UsageError(f"{where} differs from the checkpoint's options ("
                         f"{', '.join(differ[:3])}); restore it, or delete it to resume with "
                         "the checkpoint's, or start a new run")
    return state


def _default_out(config: TrainConfig) -> TrainConfig:
    """Under ``torchrun --max-restarts``, a default run directory named by the job's
    rendezvous id, so that restarted workers find the run they continue."""
    if config.out is not None or not dist.launched():
        return config
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        stem = config.model.replace(":", "-").replace("/", "-")
        return replace(config, out=str(Path("runs") / f"{stem}-{run_id}"))
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0):
        raise UsageError("torchrun --max-restarts needs --out (or --rdzv-id), so restarted "
                         "workers find the run they continue")
    return config


def open_run_dir(config: TrainConfig, world: World, resume: bool) -> RunDir:
    """Rank 0 locks and prepares the run directory; the others learn its path (or the
    error) from rank 0."""
    rundir, error = None, ""
    if world.main:
        try:
            rundir = RunDir.open(config.out, config.model, overwrite=config.overwrite,
                                 resume=resume, setting="--resume" if resume else "--out")
        except UsageError as e:
            if not world.parallel:
                raise
            error = str(e)
    final, error = dist.broadcast((str(rundir.final) if rundir else "", error), world)
    if error:
        raise UsageError(error)
    return rundir if world.main else RunDir.follow(final)


_TRAINING = threading.RLock()  # Pyro's param store and effect handlers are the process's


def _one_at_a_time(fn: Callable[..., Run]) -> Callable[..., Run]:
    """``fn`` refusing, in one line, to start while another thread's run trains, and run
    with gradients on (a caller's ``no_grad`` or ``inference_mode`` would stop them)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Run:
        if not _TRAINING.acquire(blocking=False):
            raise UsageError("another thread of this process is training a run, and Pyro's "
                             "param store is the process's: train one after the other, or in "
                             "separate processes")
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return fn(*args, **kwargs)
        finally:
            _TRAINING.release()

    return run


@_one_at_a_time
def train_run(config: TrainConfig, data: Dataset | None = None, progress: bool | None = None,
              *, resume: bool = False) -> Run:
    """Train one model by SVI and write its run directory (clears Pyro's param store).
    ``resume`` continues the run in ``config.out`` from its checkpoint (a worker torchrun
    restarted resumes by itself)."""
    world = dist.setup(config.cuda)
    config, cls = resolve(config)  # once: the family's recipe and options
    require(config.log)
    config = _default_out(config)
    if dist.restart_count() and not resume:
        resume = has_checkpoint(config.out)
        config = replace(config, overwrite=True)  # a restart before any checkpoint: anew
    if resume and not has_checkpoint(config.out):
        raise UsageError(f"--resume: {str(config.out)!r} holds no checkpoint to continue; start "
                         "a new run")
    if config.overwrite and not resume and config.out is not None:  # (its own input too)
        out = Path(config.out).resolve()
        inputs = [config.dataset[4:]] if config.dataset.startswith("npz:") else \
            [config.data_dir] if config.dataset in TORCHVISION else []
        inside = next((p for p in inputs if Path(p).resolve().is_relative_to(out)), None)
        if inside is not None and out.is_dir():
            raise UsageError(f"--overwrite would delete the run's own data {inside!r}, inside "
                             f"--out {config.out!r}; move the data out, or choose a new directory")
    rundir = open_run_dir(config, world, resume)
    config = replace(config, out=str(rundir.final))
    with rundir:  # (closed: committed where the run ends well, else as it was)
        state = _resumable(config, cls, rundir.final, world) if resume else None
        with signals() as guard, contextlib.ExitStack() as stack:
            out = rundir.path if world.main else Path(  # hooks on ranks > 0: a scratch dir
                stack.enter_context(tempfile.TemporaryDirectory(prefix="ppl_vae-rank")))
            run = session = None
            try:
                session = Session(config, data, model_class=cls, world=world, out=out,
                                  progress=progress, state=state)
                session.guard = guard
                with session.validation():
                    run = _train(session, rundir, state)
            except Interrupted as e:  # a resumed run stopped before its first checkpoint
                if e.message or not resume:
                    raise
                raise Interrupted(e.signum, f"interrupted by {signal.Signals(e.signum).name} "
                                  "before the resumed run's first checkpoint; the one it "
                                  f"resumed from is kept; continue with --resume {rundir.final}"
                                  ) from None
            finally:
                if session is not None and session.logger is not None:
                    session.logger.close(ok=run is not None)
        return run


def _train(session: Session, rundir: RunDir, state: dict | None) -> Run:
    config, module, world, ctx = session.config, session.module, session.world, session.ctx
    step = session.step(log=ctx.log)
    run = Run(config, module, session.data, rundir.final)
    saved = rundir.path / "config.json"  # a resume rewrites it only where it differs
    if world.main and (state is None or not saved.is_file() or  # (data that moved)
                       as_recorded(json.loads(saved.read_text())) != as_recorded(config.to_dict())):
        write_json(saved, config.to_dict())

    def save(loop_state: dict | None) -> None:  # (None: pre-training, before the SVI loop)
        if not world.main:
            return
        rundir.check()
        average = step.ema and loop_state is not None  # (pre-training: no average yet)
        raw = {"model": {k: v.clone() for k, v in module.state_dict().items()},
               "store": store_values(module)} if average else None
        with step.averaged() if average else contextlib.nullcontext():
            # ("model": what evaluation reads; "raw": what training goes on)
            save_checkpoint(rundir.path / "checkpoint.pt", module,
                            None if loop_state is None else step.optimizer,
                            len(run.history), config.to_dict(), loop_state, run.history,
                            session.data.signature(), fits=session.fits, raw=raw,
                            update=step.state_dict())
        if session.logger is not None:  # (what it holds never runs ahead of the checkpoint)
            session.logger.flush()
        rundir.commit()  # the first checkpoint: now this run replaces an overwritten one
        if isinstance(session.logger, Staged):
            session.logger.start()
        ctx.out = rundir.path
        if run.history:  # after the checkpoint: metrics.csv is never ahead of it
            write_csv(rundir.path / "metrics.csv", run.history)

    svi = state if state is not None and state.get("loop") is not None else None
    if svi is None:  # a new run, or a resume within pre-training (session.fits)
        note = session.estimators("note").get(config.elbo)
        if note and state is None:
            ctx.log(note)
        summed = sorted(session.info.model_only & session.info.enumerated)
        if summed and config.elbo == "enum" and state is None:
            ctx.log(f"the model sums out {', '.join(summed)} in training (--elbo enum); the test "
                    "ELBO draws it from its prior instead, a looser bound than the training "
                    "ELBO (the IWAE bound, --eval-iwae, stays a bound on log p(x))")
        session.checkpoint = lambda: save(None)
        try:
            hook(module, "pretrain")(ctx)
        except Interrupted as e:
            written = (rundir.final / "checkpoint.pt").is_file() and session.fits
            raise Interrupted(e.signum, f"{e.message or 'interrupted'} of pre-training" + (
                f"; continue with --resume {rundir.final}" if written else
                ", before the first checkpoint; nothing to resume, run it again")) from None
        session.checkpoint = None
        step.reset_average()  # (from the weights SVI starts from)
    else:
        with restoring(rundir.final):
            run.history = list(svi["history"] or [])
            if not all(isinstance(row, dict) for row in run.history):
                raise TypeError("its history holds rows that are not dicts")
            if svi.get("raw"):  # the trained weights (its "model" is their average)
                module.load_state_dict(svi["raw"]["model"])
                load_store_values(svi["raw"]["store"])
            step.optimizer.load_state_dict(svi["optimizer"])
            step.load_state_dict(svi.get("update") or {})
    if svi is None and world.parallel and world.rank:  # each rank its own latent noise
        torch.manual_seed((config.seed * 1_000_003 + world.rank) % 2**63)

    def validate() -> float:
        return -session.score(session.data.val, config.eval_particles).elbo.mean().item()

    def on_epoch(epoch: int, loss: float, seconds: float, val: float | None) -> None:
        test = session.score(session.data.test, config.eval_particles)
        row = {"epoch": epoch, "train_elbo": -loss, "test_elbo": test.elbo.mean().item(),
               "train_seconds": seconds, **({} if val is None else {"val_elbo": -val}),
               **session.on_epoch(epoch)}  # (the family's own numbers: M2's accuracy)
        run.history.append(row)
        if session.logger is not None:
            at = loop.global_step
            session.logger.scalars(at, {f"epoch/{k}": v for k, v in row.items()
                                        if k not in ("epoch", "train_seconds")})
            with torch.random.fork_rng(session.cuda_devices):  # (training draws the same)
                for name, image in epoch_images(module, session.data,
                                                hook(module, "data_args")).items():
                    session.logger.image(at, f"epoch/{name}", image)

    watch = config.early_stop or config.lr_schedule == "plateau"
    loop = Loop(session, step, validate=validate if watch else None, on_epoch=on_epoch,
                save=save, desc=config.model)
    if svi is not None:
        with restoring(rundir.final):
            loop.load_state_dict(svi["loop"])  # last: it restores this rank's RNG
        if world.main and run.history:
            write_csv(rundir.path / "metrics.csv", run.history)
        with contextlib.suppress(OSError, ValueError):  # a finished run: as it is (evaluated)
            if loop.state.done and isinstance(kept := json.loads(
                    (rundir.final / "summary.json").read_text()), dict) and kept:
                run.summary, run.notes = kept, ctx.notes
                ctx.log(f"the run in {str(rundir.final)!r} had finished; its summary.json is "
                        "kept (to score it again: python -m ppl_vae evaluate --run DIR)")
                return run
    if world.main and config.log != "none":
        loop.steps_per_epoch = session.steps_per_epoch()
        at = None if svi is None else loop.global_step
        session.logger = open_logger(config.log, rundir.path, config.to_dict(), at) \
            if rundir.path == rundir.final else Staged(  # (--overwrite: at the commit)
                lambda: open_logger(config.log, rundir.final, config.to_dict(), at))
    module.eval()
    with step.averaged():  # (the weights the hook saw after that epoch: with --ema, averaged)
        session.on_epoch(loop.state.epoch - 1)  # the schedule of the epoch (re-)entered
    try:
        best_epoch = loop.run()
    except Interrupted as e:  # at a step (checkpointed), or in an epoch's evaluation
        what = e.message or (f"interrupted by {signal.Signals(e.signum).name} in epoch "
                             f"{loop.state.epoch}, outside its steps (evaluation or saving)")
        if not loop.saved:
            raise Interrupted(e.signum, f"{what}, before the first checkpoint; nothing to "
                              "resume, run it again") from None
        kept = "" if e.message else f"; the checkpoint at {loop.saved} is kept"
        raise Interrupted(e.signum, f"{what}{kept}; continue with --resume {rundir.final}"
                          ) from None
    try:  # the final evaluation and figures (checkpointed: a signal stops the rest at once)
        k = config.eval_iwae or config.eval_particles
        scores = session.score(session.data.test, k, iwae=config.eval_iwae > 0)
        ctx.log(f"evaluation: {scores.method}")
        data = session.data
        run.summary = {
            **scores.summary(), "eval_particles": k, "train_elbo": run.history[-1]["train_elbo"],
            "epochs": len(run.history), "best_epoch": best_epoch,
            "train_seconds": sum(r["train_seconds"] for r in run.history),
            "device": str(session.device), "processes": world.size,
            **({"step": step.description, "compile_seconds": step.compile_seconds}
               if config.compile else {}),
            **({"clipped_steps": int(step.clipped)} if config.clip_norm else {}),
            "dataset": data.name, "n_train": len(data.train),
            "n_val": 0 if data.val is None else len(data.val), "n_test": len(data.test)}
        if world.main:
            rundir.check()
            plots.elbo_curves(run.history, ctx.out / "elbo_curves.png")
            run.summary.update(session.report(run.summary))
            write_json(rundir.path / "summary.json", run.summary)
            if session.logger is not None:
                session.logger.scalars(loop.global_step, {
                    f"final/{k}": v for k, v in run.summary.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)})
        run.summary, run.notes = dist.broadcast((run.summary, ctx.notes), world)
    except Interrupted as e:
        raise Interrupted(e.signum, f"interrupted by {signal.Signals(e.signum).name} after "
                          f"training, in its evaluation or figures (training is done and "
                          f"checkpointed); continue with --resume {rundir.final} to finish"
                          ) from None
    return run
