"""One training run from a :class:`~ppl_vae.config.TrainConfig` to files: data -> model
(``from_options``) -> ``pretrain`` -> SVI epochs (:class:`~ppl_vae.run.loop.Loop`) ->
evaluation and ``report`` -> ``config.json``, ``metrics.csv``, ``summary.json``,
``checkpoint.pt`` and figures. The model is reached only through the hooks of
:mod:`ppl_vae.models.base`, under one Pyro validation setting. The run directory
(:class:`~ppl_vae.run.rundir.RunDir`) is locked for the run; under torchrun only rank 0
writes files (hooks on other ranks see a scratch directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn

from .. import plots, resources
from ..config import TrainConfig
from ..data import Dataset, Split, load_dataset
from ..errors import UsageError, either
from ..files import write_csv, write_json
from ..inference.compiled import CompiledStep
from ..inference.estimators import make_elbo, suited, unsuited
from ..inference.importance import Scores, score
from ..inference.program import ProgramInfo, inspect_program, nonfinite_site
from ..inference.svi import EagerStep, TrainStep, collect_params, elbo_loss, elbo_step
from ..interrupt import Guard, Interrupted, signals
from ..models import RunContext, hook
from . import distributed as dist
from .checkpoint import load_checkpoint, load_store_values, save_checkpoint
from .distributed import World
from .loop import Loop
from .rundir import RunDir


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


def device_for(cuda: bool) -> torch.device:
    if cuda and not torch.cuda.is_available():
        raise UsageError("--cuda was given but no CUDA device is available to torch; "
                         "drop --cuda to run on the CPU")
    return torch.device("cuda" if cuda else "cpu")


def use_threads(threads: int = 0, processes: int = 1) -> int:
    """Set torch's CPU threads: ``threads``, or with 0 the free cores (the cores less the
    1-minute load average, at least 1) shared among ``processes``: a thread that waits for a
    core other jobs hold stalls every parallel op. With ``OMP_NUM_THREADS`` set and
    ``threads`` 0, torch's own choice stands. Returns the count."""
    if not threads:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, round(cores - busy) // max(1, processes))  # the free cores
    torch.set_num_threads(threads)
    return threads


def adam(params: list[Tensor], config: TrainConfig) -> torch.optim.Adam:
    """Adam over ``params`` with the run's learning rate and beta1 (beta2 0.999)."""
    return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, 0.999))


def load_data(config: TrainConfig) -> Dataset:
    data = load_dataset(config.dataset, config.data_dir, config.download, config.binarize,
                        labelled=config.labelled, seed=config.seed)
    return replace(data, labelled_share=config.labelled_share)  # the batch composition


def build_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """The model's ``from_options(options, data)`` hook."""
    cls = config.model_class
    module = hook(cls, "from_options")(config.model_options, data)
    if not isinstance(module, nn.Module):
        raise UsageError(f"--model {config.model_name!r} built a {type(module).__name__}, not "
                         "a torch.nn.Module; keep the networks in an nn.Module")
    return module


def data_args(module: nn.Module, split: Split, rows: slice | None = None,
              inputs: Callable | None = None) -> tuple[Tensor, ...]:
    """The arguments of ``module.model``/``guide`` (or of ``inputs(x, y)``) for (some rows
    of) ``split``."""
    x, y = split.x, split.y
    if rows is not None:
        x, y = x[rows], None if y is None else y[rows]
    return (inputs or hook(module, "data_args"))(x, y)


def train_args(module: nn.Module, data: Dataset, generator: torch.Generator | None = None,
               inputs: Callable | None = None) -> tuple[Tensor, ...]:
    """The arguments of ``module.model``/``guide`` (or of ``inputs(x, y)``) for one epoch of
    training rows (freshly binarized under dynamic binarization, drawn by ``generator``)."""
    return (inputs or hook(module, "data_args"))(data.train_epoch(generator), data.train.y)


def setup_model(config: TrainConfig, data: Dataset, device: torch.device,
                training: bool = True) -> tuple[nn.Module, ProgramInfo]:
    """The run's model, built once and probed once: refused before anything is allocated
    when its weights (with ``training``: and the loop's copies) cannot fit on ``device``,
    built there from an empty param store, and its program inspected (:func:`probe`)."""
    pyro.clear_param_store()
    resources.check_model_fits(lambda: build_model(config, data), device, training=training,
                               early_stop=training and config.early_stop > 0)
    with resources.allocation_guard("building the model"):
        module = build_model(config, data).to(device)
    return module, probe(module, data)


def probe(module: nn.Module, data: Dataset) -> ProgramInfo:
    """:func:`inspect_program` of every term of the module's objective on two training rows
    (this also creates parameters that a guide makes lazily, e.g. an autoguide's)."""
    args = data_args(module, data.train, slice(0, 2))
    infos = [inspect_program(m, g, *args) for _, m, g in hook(module, "programs")()]
    first = infos[0]
    return replace(first, max_plate_nesting=max(i.max_plate_nesting for i in infos),
                   vectorized=all(i.vectorized for i in infos),
                   registered=frozenset().union(*(i.registered for i in infos)),
                   params=tuple({id(p): p for i in infos for p in i.params}.values()),
                   **{f: frozenset().union(*(getattr(i, f) for i in infos))
                      for f in ("score_sites", "enumerated", "closed_kl")})


def score_split(module: nn.Module, split: Split, num_samples: int, iwae: bool = False,
                world: World = dist.SINGLE, info: ProgramInfo | None = None) -> Scores:
    """Per-row ELBO (and IWAE bound) of ``module`` on ``split`` with its proposal. Under
    torchrun the rows are sharded over the ranks and gathered (every rank gets all rows),
    unless the program shares global latents across rows (then rank 0 scores them all)."""
    n = len(split)
    if not world.parallel:
        return score(module, *data_args(module, split), num_samples=num_samples, iwae=iwae,
                     info=info)
    joint = info is None or info.data_plate is None or bool(info.global_sites)
    if joint or n < world.size:
        scores = (score(module, *data_args(module, split), num_samples=num_samples, iwae=iwae,
                        info=info) if world.main else None)
        scores = dist.broadcast(None if scores is None else _to(scores, "cpu"), world)
        return _to(scores, split.x.device)
    part = score(module, *data_args(module, split, dist.shard(n, world)),
                 num_samples=num_samples, iwae=iwae, seed=world.rank, info=info)
    parts = dist.gather(_to(part, "cpu"), world)
    return _to(Scores(torch.cat([p.elbo for p in parts]),
                      None if part.iwae is None else torch.cat([p.iwae for p in parts]),
                      part.iwae_samples,
                      f"{part.method}; rows sharded over {world.size} processes"),
               split.x.device)


def _to(s: Scores, device: torch.device | str) -> Scores:
    return replace(s, elbo=s.elbo.to(device), iwae=None if s.iwae is None else s.iwae.to(device))


def context(config: TrainConfig, module: nn.Module, data: Dataset, out: Path,
            progress: bool | None, world: World = dist.SINGLE, guard: Guard | None = None
            ) -> RunContext:
    """The :class:`RunContext` hooks receive, with ``fit`` for supervised pre-training (by
    the same data-parallel loop as SVI, not checkpointed)."""
    device = data.train.x.device

    def fit_part(loss, part: nn.Module, name: str = "loss", desc: str = "pretrain",
                 inputs: Callable | None = None) -> list[dict]:
        history: list[dict] = []

        def per_row(split: Split) -> float:
            with torch.no_grad():
                total = sum(loss(*data_args(module, split, slice(i, i + 4096), inputs)).item()
                            for i in range(0, len(split), 4096))
            return total / len(split)

        def on_epoch(epoch: int, train: float, seconds: float, val: float | None) -> None:
            history.append({"epoch": epoch, f"train_{name}": train,
                            f"test_{name}": per_row(data.test), "train_seconds": seconds,
                            **({} if val is None else {f"val_{name}": val})})

        params = list(part.parameters())
        Loop(dist.data_parallel_step(loss, part, params, world),
             adam(params, config), part,
             lambda g: train_args(module, data, g, inputs), config.batch_size, config.epochs,
             seed=config.seed, device=device, world=world,
             validate=(lambda: per_row(data.val)) if config.early_stop else None,
             patience=config.early_stop, on_epoch=on_epoch, guard=guard,
             check_every=config.check_every_steps, progress=progress, desc=desc).run()
        return history

    return RunContext(config, config.model_options, data, out, fit=fit_part, progress=progress,
                      score=score)


def prepare(config: TrainConfig, data: Dataset | None = None, world: World = dist.SINGLE
            ) -> tuple[TrainConfig, torch.device, Dataset]:
    """Absolute paths in ``config`` (so a run can be re-read from anywhere), the device
    (this rank's GPU under torchrun) and the data on it (with a validation split under
    early stopping, unless the data bring their own)."""
    config = replace(config, data_dir=os.path.abspath(config.data_dir))
    if config.dataset.startswith("npz:"):
        config = replace(config, dataset="npz:" + os.path.abspath(config.dataset[4:]))
    device = device_for(config.cuda)
    use_threads(config.threads, world.size)
    if device.type == "cuda" and world.parallel:
        device = torch.device("cuda", world.local_rank)
    data = replace(data, labelled_share=config.labelled_share) if data is not None else \
        load_data(config)
    if config.early_stop and data.val is None:  # a caller's own validation split is kept
        data = data.with_validation(config.val_fraction)
    return config, device, data.to(device)


def _default_out(config: TrainConfig) -> TrainConfig:
    """Under ``torchrun --max-restarts``, a default run directory named by the job's
    rendezvous id, so that restarted workers find the run they continue."""
    if config.out is not None or not dist.launched():
        return config
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        stem = config.model_name.replace(":", "-").replace("/", "-")
        return replace(config, out=str(Path("runs") / f"{stem}-{run_id}"))
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0):
        raise UsageError("torchrun --max-restarts needs --out (or --rdzv-id), so restarted "
                         "workers find the run they continue")
    return config


def open_run_dir(config: TrainConfig, world: World, resume: bool):
    """Rank 0 locks and prepares the run directory; the others learn its path (or the
    error) from rank 0."""
    result: tuple[str, str] = ("", "")
    rundir = None
    if world.main:
        try:
            rundir = RunDir.open(config.out, config.model_name, overwrite=config.overwrite,
                                 resume=resume)
            result = ("ok", str(rundir.final))
        except UsageError as e:
            result = ("error", str(e))
            if not world.parallel:
                raise
    kind, text = dist.broadcast(result, world)
    if kind == "error":
        raise UsageError(text)
    return rundir if world.main else RunDir.follow(text)


def has_checkpoint(out: str | os.PathLike | None) -> bool:
    return out is not None and (Path(out) / "checkpoint.pt").is_file()


NOT_THE_MATH = ("checkpoint_every_steps", "check_every_steps", "data_dir", "threads")
"""Options a resume may change (how often it saves, where the data now lie)."""


def as_recorded(config: dict) -> dict:
    """A config dict as ``config.json`` holds it (JSON types: tuples are lists), less how the
    run was opened (``overwrite``), which is not part of the run's record."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k != "overwrite"}


def resume_config(run_dir: str | os.PathLike, given: dict | None = None) -> TrainConfig:
    """The stored config of the run in ``run_dir`` (from its checkpoint), checked against the
    options ``given`` now: one that contradicts it is a :class:`UsageError`."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"--resume {str(path)!r} is not a run directory")
    if not (path / "checkpoint.pt").is_file():
        raise UsageError(f"--resume {str(path)!r}: no checkpoint.pt there, so nothing to "
                         "resume; train without --resume (--out DIR) to start a run")
    given = dict(given or {})
    out = given.pop("out", None)
    if out is not None and os.path.abspath(out) != os.path.abspath(path):
        raise UsageError(f"--resume continues the run in {str(path)!r} and writes there; drop "
                         f"--out {out!r} (to continue a copy, copy the directory and resume it)")
    state = load_checkpoint(path / "checkpoint.pt")
    if state.get("loop") is None:
        raise UsageError(f"{str(path)!r} holds a checkpoint from a version that cannot "
                         "resume; start a new run")
    stored = TrainConfig.from_dict(state["config"])
    mine = stored.to_dict()
    saved = path / "config.json"
    if saved.is_file():  # the run's two records must agree
        try:
            on_disk = json.loads(saved.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{str(saved)!r} is not readable JSON ({type(e).__name__}); "
                             "delete it to resume from the checkpoint's own copy") from None
        plain = as_recorded(mine)
        on_disk = as_recorded(on_disk) if isinstance(on_disk, dict) else {}
        differ = sorted(k for k in set(plain) | set(on_disk)
                        if k not in NOT_THE_MATH and on_disk.get(k) != plain.get(k))
        if differ:
            raise UsageError(f"{str(saved)!r} differs from the checkpoint's options ("
                             f"{', '.join(differ[:3])}); restore it, or delete it to resume "
                             "with the checkpoint's, or start a new run")
        stored = replace(stored, **{k: on_disk[k] for k in NOT_THE_MATH if k in on_disk})
    for key, value in given.items():
        if key in ("overwrite", "model_options") or key not in mine:
            continue
        if key in NOT_THE_MATH:
            stored = replace(stored, **{key: value})
            continue
        if value != mine[key]:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume: {flag} {value!r} contradicts the run's {mine[key]!r}; "
                             f"drop {flag} to continue the run, or start a new one")
    options = given.get("model_options") or {}
    stored_options = mine["model_options"]
    for key, value in (options.items() if isinstance(options, dict) else ()):
        if key in stored_options and \
                json.loads(json.dumps(value)) != json.loads(json.dumps(stored_options[key])):
            raise UsageError(f"--resume: --model-opt {key}={value!r} contradicts the run's "
                             f"{stored_options[key]!r}; drop it to continue the run")
    return replace(stored, out=str(Path(run_dir)), overwrite=False)


def train_run(config: TrainConfig, data: Dataset | None = None, progress: bool | None = None,
              *, resume: bool = False) -> Run:
    """Train one model by SVI and write its run directory (clears Pyro's param store).
    ``resume`` continues the run in ``config.out`` from its checkpoint (a worker torchrun
    restarted resumes by itself)."""
    world = dist.setup(config.cuda)
    if not world.main:
        progress = False
    config = _default_out(config)
    if dist.restart_count() and not resume:
        resume = has_checkpoint(config.out)
        config = replace(config, overwrite=True)  # a restart before any checkpoint: anew
    if resume and not has_checkpoint(config.out):
        raise UsageError(f"--resume: {str(config.out)!r} holds no checkpoint to continue; start "
                         "a new run")
    rundir = open_run_dir(config, world, resume)
    config = replace(config, out=str(rundir.final))
    ok = False
    try:
        config, device, data = prepare(config, data, world)
        with pyro.validation_enabled(config.validate), signals() as guard, \
                contextlib.ExitStack() as stack:  # hooks on ranks > 0 write into a scratch dir
            out = rundir.path if world.main else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="ppl_vae-rank")))
            run = _train(config, device, data, rundir, out, progress, world, guard, resume)
        ok = True
        return run
    finally:
        rundir.close(ok)


def _train(config: TrainConfig, device: torch.device, data: Dataset, rundir, out: Path,
           progress: bool | None, world: World, guard: Guard, resume: bool) -> Run:
    state = load_checkpoint(rundir.final / "checkpoint.pt", map_location=device) \
        if resume else None
    pyro.set_rng_seed(config.seed)
    module, info = setup_model(config, data, device)
    terms = hook(module, "programs")()
    refused = getattr(module, "elbo_refused", {})
    why = refused.get(config.elbo)
    if not why and (why := unsuited(config.elbo, info, len(terms))):
        fits = [e for e in suited(info, refused, len(terms)) if e != config.elbo]
        why += f"; use --elbo {either(fits)}" if fits else ""
    if why:
        raise UsageError(f"--model {config.model_name} with --elbo {config.elbo}: {why}")

    def step_for(k: int):  # the objective with k particles, for the memory estimate
        e = make_elbo(config.elbo, k, False, info.max_plate_nesting, vectorize=info.vectorized)
        return elbo_loss(e, module, terms, info) or elbo_step(e, module, terms, info)

    resources.check_step_fits(step_for, data_args(module, data.train, slice(0, 2)),
                              min(config.batch_size, len(data.train)), config.particles, device)
    elbo = make_elbo(config.elbo, config.particles, config.jit, info.max_plate_nesting,
                     vectorize=info.vectorized)
    params = collect_params(module, info)
    loss = elbo_loss(elbo, module, terms, info)
    step = (dist.data_parallel_step(loss, module, params, world) if loss is not None else
            dist.grads_all_reduced(elbo_step(elbo, module, terms, info), params, world))
    run = Run(config, module, data, rundir.final)
    ctx = context(config, module, data, out, progress, world, guard)
    saved = rundir.path / "config.json"  # a resume rewrites it only where it differs
    if world.main and (state is None or not saved.is_file() or  # (data that moved)
                       as_recorded(json.loads(saved.read_text())) != as_recorded(config.to_dict())):
        write_json(saved, config.to_dict())
    if state is None:
        note = getattr(module, "elbo_notes", {}).get(config.elbo)
        if note:
            ctx.log(note)
        try:
            hook(module, "pretrain")(ctx)
        except Interrupted as e:
            raise Interrupted(e.signum, f"{e.message or 'interrupted'} of pre-training, before "
                              "the first checkpoint; nothing to resume, run it again") from None
    else:
        module.load_state_dict(state["model"])
        load_store_values(state.get("store_values") or {})
        run.history = list(state["history"] or [])
    optimizer = adam(params, config)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    elif world.parallel and world.rank:  # each rank its own latent noise
        torch.manual_seed((config.seed * 1_000_003 + world.rank) % 2**63)

    def validate() -> float:
        return -score_split(module, data.val, config.eval_particles, world=world,
                            info=info).elbo.mean().item()

    def on_epoch(epoch: int, loss: float, seconds: float, val: float | None) -> None:
        test = score_split(module, data.test, config.eval_particles, world=world, info=info)
        row = {"epoch": epoch, "train_elbo": -loss, "test_elbo": test.elbo.mean().item(),
               "train_seconds": seconds}
        if val is not None:
            row["val_elbo"] = -val
        row.update(hook(module, "epoch_metrics")(ctx))  # the family's own: M2's accuracy
        run.history.append(row)

    def save(loop_state: dict) -> None:
        if not world.main:
            return
        save_checkpoint(rundir.path / "checkpoint.pt", module, optimizer, len(run.history),
                        config.to_dict(), loop_state, run.history, data.signature())
        rundir.commit()  # the first checkpoint: now this run replaces an overwritten one
        ctx.out = rundir.path
        if run.history:  # after the checkpoint: metrics.csv is never ahead of it
            write_csv(rundir.path / "metrics.csv", run.history)

    def diagnose(*args: Tensor) -> str | None:
        return next((f for _, m, g in terms if (f := nonfinite_site(m, g, *args))), None)

    take: TrainStep = EagerStep(step, optimizer)
    if config.compile:
        take = CompiledStep(loss, module, optimizer, take, world=world, log=ctx.log,
                            estimator=f"--elbo {config.elbo}")
    loop = Loop(take, optimizer, module, lambda g: train_args(module, data, g),
                config.batch_size, config.epochs, seed=config.seed, device=device, world=world,
                validate=validate if config.early_stop else None, patience=config.early_stop,
                on_epoch=on_epoch, on_start=lambda epoch: hook(module, "start_epoch")(ctx, epoch),
                save=save, checkpoint_every=config.checkpoint_every_steps,
                check_every=config.check_every_steps, guard=guard, diagnose=diagnose,
                progress=ctx.progress, desc=config.model_name,
                order=lambda n, g: data.epoch_order(config.batch_size, g))
    if state is not None:
        loop.load_state_dict(state["loop"])  # last: it restores this rank's RNG
        if world.main and run.history:
            write_csv(rundir.path / "metrics.csv", run.history)
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
    with _after_training(rundir.final):  # (checkpointed: a signal stops the rest at once)
        k = config.eval_iwae or config.eval_particles
        scores = score_split(module, data.test, k, iwae=config.eval_iwae > 0, world=world,
                             info=info)
        ctx.log(f"evaluation: {scores.method}")
        run.summary = {
            **scores.summary(),
            "eval_particles": k,
            "train_elbo": run.history[-1]["train_elbo"],
            "epochs": len(run.history),
            "best_epoch": best_epoch,
            "train_seconds": sum(r["train_seconds"] for r in run.history),
            "device": str(device),
            "processes": world.size,
            **({"step": take.description, "compile_seconds": take.compile_seconds}
               if isinstance(take, CompiledStep) else {}),
            "dataset": data.name,
            "n_train": len(data.train),
            "n_val": 0 if data.val is None else len(data.val),
            "n_test": len(data.test),
        }
        if world.main:
            ctx.summary = dict(run.summary)  # the report derives from it, not a second evaluation
            plots.elbo_curves(run.history, ctx.out / "elbo_curves.png")
            run.summary.update(report(module, ctx))
            write_json(rundir.path / "summary.json", run.summary)
        run.summary, run.notes = dist.broadcast((run.summary, ctx.notes), world)
    return run


@contextlib.contextmanager
def _after_training(final: Path):
    """The final evaluation and figures: an interruption says the run is checkpointed."""
    try:
        yield
    except Interrupted as e:
        raise Interrupted(e.signum, f"interrupted by {signal.Signals(e.signum).name} after "
                          f"training, in its evaluation or figures (training is done and "
                          f"checkpointed); continue with --resume {final} to finish") from None


def report(module: nn.Module, ctx: RunContext) -> dict:
    """The model's ``report`` hook: its numbers (and, where ``ctx.figures``, its figures).
    A hook that fails is logged and gives no numbers: a finished run is never lost to it."""
    try:
        with torch.no_grad():
            return dict(hook(module, "report")(ctx) or {})
    except UsageError:
        raise
    except Exception as e:  # the user's hook failed on the finished run
        first = (str(e).strip().splitlines() or [""])[0]
        ctx.log(f"the model's report hook skipped: it raised {type(e).__name__}: {first}"[:300])
        return {}
