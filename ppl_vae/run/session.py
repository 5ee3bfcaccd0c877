"""One process's run, built once (:class:`Session`): train, evaluate, compare, the
experiments and ``load_run`` all start from one; :meth:`Session.from_dir` reads a run
directory's ``config.json`` and ``checkpoint.pt`` once."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from .. import distributed as dist
from .. import resources
from ..config import RECIPE, TrainConfig
from ..data import Dataset, Split, check_dataset, load_dataset
from ..distributed import SINGLE, World
from ..errors import UsageError, either, first_line
from ..inference.compiled import CompiledStep
from ..inference.estimators import ELBOS, make_elbo, suited, unsuited
from ..inference.importance import Scores, score
from ..inference.program import ProgramInfo, inspect_objective
from ..inference.svi import Step, batch_share, collect_params, latent_scaled
from ..models import RunContext, get_model, hook, make_options, model_name, options_class
from ..models.registry import check_programs
from .checkpoint import load_checkpoint, load_store_values, restore_params, restoring

COLUMNS = ("epoch", "train_elbo", "test_elbo", "val_elbo", "train_seconds")
"""The run's own columns of ``metrics.csv`` (a model's ``on_epoch`` numbers join them)."""
RETIRED = {"start_epoch": "on_epoch(ctx, epoch)", "epoch_metrics": "on_epoch(ctx, epoch)",
           **{f"default_{k}": f"recipe = {{'{k}': ...}}" for k in ("elbo", "epochs", "lr",
                                                                  "early_stop")},
           "elbo_refused": "estimators = {name: ('refuse', why)}",
           "elbo_notes": "estimators = {name: ('note', text)}"}
"""Contract names of earlier versions and what replaced them: a class that still declares
one is refused in one line (its schedule or recipe would otherwise be silently ignored)."""


def _retired(obj: Any) -> None:
    owner = obj.__name__ if isinstance(obj, type) else type(obj).__name__
    for old, new in RETIRED.items():
        if getattr(obj, old, None) is not None:
            raise UsageError(f"{owner} declares {old}, which the model contract replaced by "
                             f"{new}; rename it (docs: howto/own-model.md, the contract)")


def _savable(module: nn.Module) -> None:
    """Refuse a ``state_dict`` that a checkpoint read with ``weights_only=True`` cannot hold
    (its entries other than tensors saved and read back, tensors emptied)."""
    for key, value in module.state_dict().items():
        if isinstance(value, Tensor):
            continue
        buffer = io.BytesIO()
        torch.save(torch.utils._pytree.tree_map_only(Tensor, lambda t: torch.empty(0), value),
                   buffer)
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
        except Exception as e:  # (torch's UnpicklingError names the type)
            raise UsageError(f"{type(module).__name__}.state_dict() holds at {key!r} what a "
                             "checkpoint (read with weights_only=True) cannot hold "
                             f"({type(e).__name__}); keep tensors and numbers there") from None


def _same_data(trained: dict, now: dict, name: str) -> None:
    """Refuse data whose shapes, classes or counts differ from the run's checkpoint's
    (:meth:`~ppl_vae.data.Dataset.signature`): a dataset file replaced since it trained."""
    keys = ("input_dim", "image_shape", "eight_bit", "num_classes", "n_train", "labelled")
    changed = [f"{k} {now[k]} (trained on {trained[k]})" for k in keys
               if k in trained and trained[k] != now.get(k)]
    if changed:
        raise UsageError(f"--dataset {name!r} is not the data the run trained on: "
                         f"{', '.join(changed[:3])}; restore that data, or train a new run")


def resolve(config: TrainConfig, model: type | None = None) -> tuple[TrainConfig, type]:
    """The config a run takes, and its model class (``model``, or the class ``config.model``
    names): the family's recipe where the user gave nothing, its options made and checked,
    the estimator known, paths absolute (so a run can be re-read from anywhere)."""
    cls = model or get_model(config.model)
    _retired(cls)
    config = replace(config, model=model_name(cls),
                     model_options=make_options(cls, config.model_options),
                     data_dir=os.path.abspath(config.data_dir))
    if config.dataset.startswith("npz:"):
        config = replace(config, dataset="npz:" + os.path.abspath(os.path.expanduser(
            config.dataset[4:])))
    recipe = getattr(cls, "recipe", {})
    unknown = sorted(set(recipe) - set(RECIPE))
    if unknown:
        raise UsageError(f"{cls.__name__}.recipe sets {unknown[0]!r}, which a recipe cannot "
                         f"choose; it may set {', '.join(RECIPE)} (docs: howto/own-model.md)")
    config = config.with_recipe(recipe)
    if config.elbo not in ELBOS:
        raise UsageError(f"--elbo {config.elbo!r} is not one of {', '.join(ELBOS)}")
    return config, cls


def from_record(record: Any, model: type | None = None) -> tuple[TrainConfig, type]:
    """:func:`resolve` a run's record (``config.json``, or the checkpoint's copy): a bad
    value is named by its key; an option added since the record was written takes what its
    absence meant (its field's ``metadata["absent"]``: M2's ``m1`` 0); a flat record, as older
    versions wrote, has its model's options picked out by name."""
    missing = [k for k in ("model", "dataset") if isinstance(record, dict) and k not in record]
    if missing:  # (else the default would stand in for what the run trained)
        raise UsageError(f"it has no {missing[0]!r} key, which every run's record holds; "
                         "restore it")
    config = TrainConfig.from_dict(record)
    cls = model or get_model(config.model)
    given, keys = config.model_options, "model_options."
    if "model_options" not in record:  # flat: its keys are the options' names
        names, keys = {f.name for f in dataclasses.fields(options_class(cls))}, ""
        given = {k: v for k, v in given.items() if k in names}
    else:
        options = getattr(cls, "Options", None)
        absent = {f.name: f.metadata["absent"] for f in dataclasses.fields(options)
                  if "absent" in f.metadata} if dataclasses.is_dataclass(options) else {}
        given = {**absent, **given}
    return resolve(replace(config, model_options=make_options(cls, given, keys=keys)), cls)


def device_for(cuda: bool, world: World = SINGLE) -> torch.device:
    """The CPU, or the GPU (this rank's under torchrun)."""
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--cuda was given but no CUDA device is available to torch; "
                         "drop --cuda to run on the CPU")
    return torch.device("cuda", world.local_rank) if world.parallel else torch.device("cuda")


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


def load_data(config: TrainConfig, data: Dataset | None = None) -> Dataset:
    """``data`` (default: the dataset ``config`` names) with its batch composition: each batch
    of B rows holds k = round(``labelled_share`` B) labelled rows, at least 1 and at most
    B - 1, so the share it takes is k / B."""
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.download, config.binarize,
                            labelled=config.labelled, seed=config.seed)
    else:
        check_dataset(data)
    share, b = config.labelled_share, config.batch_size
    if share and not 0 < (data.labelled or 0) < len(data.train):
        raise UsageError("--labelled-share mixes labelled and unlabelled rows in every batch, "
                         f"but {'every' if data.labelled else 'no'} training row of "
                         f"{data.name!r} is labelled; hide labels with --labelled N, or drop "
                         "--labelled-share")
    if share and b < 2:
        raise UsageError("--labelled-share puts labelled and unlabelled rows in every batch, "
                         f"which needs --batch-size 2 or more, got {b}")
    return replace(data, labelled_share=min(max(1, round(share * b)), b - 1) / b if share else 0)


def read_config(run_dir: Path, model: type | None = None) -> tuple[TrainConfig, type]:
    """A run directory's ``config.json``, :func:`from_record`."""
    path = run_dir / "config.json"
    if not path.is_file():
        parts = sorted(p.name for p in run_dir.glob("*") if (p / "config.json").is_file())
        hint = (f"it holds several runs: give one of them, e.g. --run "
                f"{str(run_dir / parts[0])!r}" if parts else
                "give the directory a training run wrote")
        raise UsageError(f"no config.json in {str(run_dir)!r}; {hint}")
    try:
        return from_record(json.loads(path.read_text()), model)
    except ValueError as e:  # bad JSON or bad option values (UsageError is a ValueError)
        raise UsageError(f"{os.fspath(path)!r} is not a readable run config ({e})") from None


class Session:
    """What one process needs for one run of ``config``, built once: the config resolved
    (:func:`resolve`; ``model_class`` given: resolved already, with that class), ``device``
    (this rank's), ``data`` on it (with a validation split under early stopping when
    ``training``), ``module`` built from an empty param store and probed (``info``,
    ``terms``), a checkpoint's ``state`` loaded into it, and ``ctx``, the
    :class:`RunContext` its hooks see (files go to ``out``)."""

    def __init__(self, config: TrainConfig, data: Dataset | None = None, *,
                 model_class: type | None = None, world: World = SINGLE,
                 out: Path | None = None, progress: bool | None = None,
                 state: dict | None = None, training: bool = True) -> None:
        config, cls = (config, model_class) if model_class else resolve(config)
        self.config, self.cls, self.world, self.state = config, cls, world, state
        self.progress = progress if world.main else False
        self.out, self.guard = out or Path("."), None  # (a Guard while train_run runs)
        self.fits: dict[str, dict] = dict((state or {}).get("fits") or {})  # (see fit)
        self.schedule = nn.Module()  # the tensors the run's own schedules set (KL warm-up)
        self.checkpoint: Callable[[], None] | None = None  # writes the run's checkpoint
        self.logger: Any = None  # --log's, on rank 0 while train_run runs (run.log)
        self.device = device_for(config.cuda, world)
        use_threads(config.threads, world.size)
        read = data is None  # (a saved run read back with its data: split as it trained)
        data = load_data(config, data)
        if (training or read) and (config.early_stop or config.lr_schedule == "plateau") and \
                data.val is None:  # (a caller's own validation split is kept)
            data = data.with_validation(config.val_fraction)
        if read and state is not None:  # (as it was split when the checkpoint was written)
            _same_data(state.get("data") or {}, data.signature(), config.dataset)
        self.data = data.to(self.device)
        x, default = self.data.train.x, torch.get_default_dtype()
        if default != torch.float32 and x.is_floating_point() and x.dtype != default:
            raise UsageError(f"torch's default dtype is {default} (torch.set_default_dtype) and "
                             f"the data are {x.dtype}: the model would mix them; make them the "
                             "same")
        pyro.set_rng_seed(config.seed)
        pyro.clear_param_store()
        resources.check_model_fits(self._build, self.device, training=training,
                                   early_stop=training and config.early_stop > 0)
        with self.validation(), resources.allocation_guard("building the model"):
            self.module = self._build().to(self.device)
            _retired(self.module)
            _savable(self.module)
            self.terms = hook(self.module, "programs")()
            self.info = self.probe(self.module)
        if state is not None:
            self.load(state)
        self.ctx = RunContext(config, config.model_options, self.data, self.out,
                              fit=self.fit, score=functools.partial(score, validate=None),
                              progress=self.progress)  # (scores validated as the run is)

    @classmethod
    def from_dir(cls, run_dir: str | os.PathLike, *, cuda: bool = False,
                 data_dir: str | None = None, model: type | None = None, data: bool = True
                 ) -> Session:
        """The session of a saved run, for evaluation (its ``state``: the checkpoint, read
        once); ``data=False`` reads no dataset (a stand-in of the checkpoint's shapes)."""
        run_dir = Path(run_dir)
        config, model_class = read_config(run_dir, model)
        config = replace(config, cuda=cuda, data_dir=data_dir or config.data_dir, threads=0)
        state = load_checkpoint(run_dir / "checkpoint.pt", map_location=device_for(cuda))
        if not data and not state.get("data"):
            raise UsageError(f"the checkpoint in {str(run_dir)!r} predates loading without the "
                             "data; load it with its data (data=True)")
        stand_in = None if data else Dataset.stand_in(state["data"])
        return cls(config, stand_in, model_class=model_class, out=run_dir, progress=False,
                   state=state, training=False)

    @property
    def cuda_devices(self) -> list[torch.device]:
        """The GPUs whose random state the session's work draws from."""
        return [self.device] if self.device.type == "cuda" else []

    def validation(self) -> contextlib.AbstractContextManager:
        """Pyro validation as the run sets it (off unless ``--validate``)."""
        return pyro.validation_enabled(self.config.validate)

    # -- the model ----------------------------------------------------------------------------
    def _build(self) -> nn.Module:
        module = hook(self.cls, "from_options")(self.config.model_options, self.data)
        if not isinstance(module, nn.Module):
            raise UsageError(f"--model {self.config.model!r} built a {type(module).__name__}, "
                             "not a torch.nn.Module; keep the networks in an nn.Module")
        check_programs(module, self.config.model)
        return module

    def probe(self, module: nn.Module) -> ProgramInfo:
        """:func:`inspect_objective` of ``module``'s terms on two training rows."""
        return inspect_objective(hook(module, "programs")(),
                                 *self.args(self.data.train, slice(0, 2), module=module))

    def load(self, state: dict) -> None:
        """The checkpoint's weights and ``pyro.param`` values, into the built module."""
        try:
            self.module.load_state_dict(state["model"])
        except RuntimeError:
            raise UsageError(f"the checkpoint in {str(self.out)!r} does not fit the model "
                             "its config.json describes; was one of them replaced?") from None
        if state.get("store_values"):  # in place: the tensors an optimizer will hold
            load_store_values(state["store_values"])
        else:  # (a checkpoint from before store_values)
            restore_params(state)

    def estimators(self, verdict: str) -> dict[str, str]:
        """The family's ``estimators`` with ``verdict`` ("refuse" or "note"): name -> text."""
        declared = getattr(self.module, "estimators", None) or {}
        return {name: text for name, (kind, text) in declared.items() if kind == verdict}

    def check_estimator(self, name: str) -> None:
        """Refuse, in one line naming the ones that fit, an estimator that cannot train this
        model (its family refuses it, or the program does not suit it)."""
        refused = self.estimators("refuse")
        why = refused.get(name)
        if not why and (why := unsuited(name, self.info, len(self.terms))):
            fits = [e for e in suited(self.info, refused, len(self.terms)) if e != name]
            why += f"; use --elbo {either(fits)}" if fits else ""
        if why:
            raise UsageError(f"--model {self.config.model!r} with --elbo {name}: {why}")

    # -- data ---------------------------------------------------------------------------------
    def args(self, split: Split, rows: slice | None = None, inputs: Callable | None = None,
             module: nn.Module | None = None) -> tuple[Tensor, ...]:
        """The arguments of the model and guide (``data_args``, or ``inputs(x, y)``) for
        (some ``rows`` of) ``split``."""
        x, y = split.x, split.y
        if rows is not None:
            x, y = x[rows], None if y is None else y[rows]
        return (inputs or hook(module or self.module, "data_args"))(x, y)

    def train_args(self, generator: torch.Generator | None = None,
                   inputs: Callable | None = None, module: nn.Module | None = None
                   ) -> tuple[Tensor, ...]:
        """One epoch's training arguments (freshly binarized under dynamic binarization,
        drawn by ``generator``)."""
        epoch = Split(self.data.train_epoch(generator), self.data.train.y)
        return self.args(epoch, inputs=inputs, module=module)

    def score(self, split: Split | str, num_samples: int, iwae: bool = False,
              module: nn.Module | None = None) -> Scores:
        """Per-row ELBO (and IWAE bound) of ``module`` (the session's) on ``split`` (or its
        name: "train", "val", "test"). Under torchrun the rows are sharded over the ranks and
        gathered (every rank gets all rows), unless the program shares global latents across
        rows (then rank 0 scores them all)."""
        if isinstance(split, str):
            if getattr(self.data, split, None) is None or split not in ("train", "val", "test"):
                raise UsageError(f"Session.score takes a split or the name of one the data "
                                 f"has (train, test{', val' * (self.data.val is not None)}), "
                                 f"got {split!r}")
            split = getattr(self.data, split)
        module, world, n = module or self.module, self.world, len(split)
        info = self.info if module is self.module else None
        whole = not world.parallel or info is None or info.data_plate is None or \
            bool(info.global_sites) or n < world.size  # one process scores every row
        part = None if whole and not world.main else score(
            module, *self.args(split, None if whole else dist.shard(n, world), module=module),
            num_samples=num_samples, iwae=iwae, seed=world.rank, info=info,
            validate=self.config.validate)
        if not world.parallel:
            return part
        if whole:  # rank 0's, on every rank
            return _to(dist.broadcast(None if part is None else _to(part, "cpu"), world),
                       split.x.device)
        parts = dist.gather(_to(part, "cpu"), world)
        return _to(Scores(torch.cat([p.elbo for p in parts]),
                          None if part.iwae is None else torch.cat([p.iwae for p in parts]),
                          part.iwae_samples,
                          f"{part.method}; rows sharded over {world.size} processes"),
                   split.x.device)

    # -- training -----------------------------------------------------------------------------
    def adam(self, params: list[Tensor], owner: nn.Module | None = None) -> torch.optim.Adam:
        """Adam over ``params`` (of ``owner``, default the model) with the run's learning rate
        and beta1 (beta2 0.999); none is refused in one line."""
        if not params:
            raise UsageError(f"{type(owner or self.module).__name__} has nothing to train: no "
                             + ("nn.Parameter and no pyro.param site; give its model or guide "
                                "one" if owner in (None, self.module) else
                                "nn.Parameter for ctx.fit to train"))
        return torch.optim.Adam(params, lr=self.config.lr, betas=(self.config.beta1, 0.999))

    def svi_step(self, elbo: str, particles: int = 1, module: nn.Module | None = None,
                 optimizer: bool = True) -> Step:
        """The SVI step of estimator ``elbo`` with ``particles`` over ``module`` (default the
        session's): Adam over its parameters and ``pyro.param`` sites with the run's settings
        (``optimizer=False``: gradients only), gradients summed over the ranks."""
        module = module or self.module
        info = self.info if module is self.module else self.probe(module)
        e = elbo_for(elbo, particles, info, self.config.jit and optimizer)
        adam = self.adam(collect_params(module, info), module) if optimizer else None
        return Step.of_elbo(e, module, hook(module, "programs")(), info, adam, self.world)

    def step(self, log: Callable[[str], None] | None = None) -> Step:
        """The run's SVI step (:meth:`svi_step` of its estimator and particles) with the
        trainer's update (clipping, the learning-rate schedule, the moving average), its KL
        warm-up (``schedule.kl_weight`` on the latent sites) and precision, compiled with
        ``--compile`` (refusals said through ``log``). Refuses an estimator that cannot train
        the model, or a step that cannot fit in memory, before anything is allocated."""
        config, module, info = self.config, self.module, self.info
        self.check_estimator(config.elbo)
        resources.check_step_fits(
            lambda k: self.svi_step(config.elbo, k, optimizer=False).gradient,
            self.args(self.data.train, slice(0, 2)), min(config.batch_size, len(self.data.train)),
            config.particles, self.device)
        terms = self.terms
        summed = sorted(info.model_only & info.enumerated)
        if config.kl_warmup and config.elbo == "enum" and summed:
            raise UsageError(f"--kl-warmup scales the latent sites, but the model sums out "
                             f"{summed[0]!r} (enumerated in the model), "
                             "whose sites TraceEnum_ELBO needs at one scale; drop --kl-warmup, "
                             "or sample that site in the guide")
        if info.outside:  # (sites outside the plates over the rows: once an epoch)
            n, plate = len(self.data.train), info.row_plates
            terms = [(w, batch_share(m, plate, n), batch_share(g, plate, n))
                     for w, m, g in terms]
        if config.kl_warmup:  # (a buffer: the compiled step reads it as an input)
            self.schedule.register_buffer("kl_weight", torch.zeros((), device=self.device))
            terms = [(w, latent_scaled(m, self._kl_weight), latent_scaled(g, self._kl_weight))
                     for w, m, g in terms]
        adam = self.adam(collect_params(module, info))
        elbo = elbo_for(config.elbo, config.particles, info, config.jit)
        step = Step.of_elbo(elbo, module, terms, info, adam, self.world,
                            clip_norm=config.clip_norm, ema=config.ema,
                            schedule=self.schedule if config.kl_warmup else None,
                            **schedules(adam, config, self.steps_per_epoch()))
        step.watch_norm = config.log != "none"  # (the norm before clipping, logged)
        steps = config.epochs * self.steps_per_epoch()
        if config.ema and 2 / (1 - config.ema) > steps and log is not None:
            log(f"--ema {config.ema} averages over about {1 / (1 - config.ema):,.0f} steps, "
                f"more than half of this run's {steps:,}: the average still holds much of the "
                f"initial weights ({config.ema}**{steps:,} = {config.ema ** steps:.0%} at the "
                "end); a smaller D follows the training")
        if config.warmup_steps > steps and log is not None:
            log(f"--warmup-steps {config.warmup_steps:,} is more than this run's {steps:,} steps: "
                f"the learning rate ends at {steps / config.warmup_steps:.0%} of --lr "
                f"{config.lr:g}, never reaching it")
        if config.kl_warmup >= config.epochs and log is not None:
            log(f"--kl-warmup {config.kl_warmup:,} is not less than this run's {config.epochs:,} "
                "epochs: the latent sites' weight ends at "
                f"{(config.epochs - 1) / config.kl_warmup:.0%} in the last, never reaching 1")
        if config.precision == "bf16":
            step.loss, step._backward = (bf16(f, module, self.device)
                                         for f in (step.loss, step._backward))
        if config.compile:
            step = CompiledStep(step, module, log=log, estimator=f"--elbo {config.elbo}",
                                rtol=1e-2 if config.precision == "bf16" else None)
        return step

    def _kl_weight(self) -> Tensor:
        return self.schedule.kl_weight

    def steps_per_epoch(self) -> int:
        """Steps in an epoch of the session's batches and processes."""
        n = len(self.data.epoch_order(self.config.batch_size, torch.Generator().manual_seed(0)))
        w = self.world.size
        return math.ceil((n + (-n) % w) / (self.config.batch_size * w))

    def fit(self, loss: Callable[..., Tensor], part: nn.Module, name: str = "loss",
            desc: str = "pretrain", inputs: Callable | None = None) -> list[dict]:
        """Train ``part`` on ``loss(*data_args)`` (or on ``loss(*inputs(x, y))``) with the run's
        settings, by the same data-parallel loop as SVI; one row per epoch (``ctx.fit``, for a
        family's ``pretrain``). Its state goes into ``fits[desc]`` and, where the run saves
        (``checkpoint``), into the run's checkpoint like an SVI epoch's: a resumed run
        continues a fit where it stopped and skips a finished one."""
        from .loop import Loop

        saved = self.fits.get(desc) or {}
        if saved.get("done"):
            return list(saved["history"])
        history: list[dict] = list(saved.get("history") or [])

        def per_row(split: Split) -> float:
            with torch.no_grad():
                total = sum(loss(*self.args(split, slice(i, i + 4096), inputs)).item()
                            for i in range(0, len(split), 4096))
            return total / len(split)

        def on_epoch(epoch: int, train: float, seconds: float, val: float | None) -> None:
            history.append({"epoch": epoch, f"train_{name}": train,
                            f"test_{name}": per_row(self.data.test), "train_seconds": seconds,
                            **({} if val is None else {f"val_{name}": val})})

        def save(loop_state: dict) -> None:
            self.fits[desc] = {"loop": loop_state, "optimizer": step.optimizer.state_dict(),
                               "history": list(history), "done": loop_state["done"]}
            if self.checkpoint is not None:
                self.checkpoint()

        params = list(part.parameters())
        step = Step(params, self.adam(params, part), loss, world=self.world)
        loop = Loop(self, step, module=part, inputs=lambda g: self.train_args(g, inputs),
                    validate=(lambda: per_row(self.data.val)) if self.config.early_stop else None,
                    on_epoch=on_epoch, save=save, desc=desc)
        if saved:
            with restoring(self.config.out or self.out):  # (rank 0's directory)
                step.optimizer.load_state_dict(saved["optimizer"])
                loop.load_state_dict(saved["loop"])  # last: it restores this rank's RNG
        loop.run()
        return history

    def on_epoch(self, epoch: int, module: nn.Module | None = None) -> dict[str, float]:
        """The model's ``on_epoch(ctx, epoch)`` hook after ``epoch`` epochs (0: before the
        first), in eval mode: the numbers it returns for that epoch's row, finite reals under
        names other than the run's own :data:`COLUMNS` (None: no numbers). A hook that
        returns anything else, or replaces or reshapes a trained parameter (the optimizer
        would go on training the old one), is refused in one line."""
        module = module or self.module
        if hasattr(self.schedule, "kl_weight"):  # the latent sites' weight in epoch + 1
            self.schedule.kl_weight.fill_(min(1.0, epoch / self.config.kl_warmup))
        owner = f"{type(module).__name__}.on_epoch(ctx, {epoch})"
        before = {n: (id(p), p.shape) for n, p in module.named_parameters()}
        got = hook(module, "on_epoch")(self.ctx, epoch)
        after = {n: (id(p), p.shape) for n, p in module.named_parameters()}
        if changed := sorted(set(before.items()) ^ set(after.items())):
            raise UsageError(f"{owner} replaced or reshaped the parameter "
                             f"{changed[0][0]!r}, which the optimizer would not follow; change "
                             "values in place (with torch.no_grad(): p.copy_(...))")
        if got is None:
            return {}
        if not isinstance(got, Mapping):
            raise UsageError(f"{owner} returned {type(got).__name__} {_short(got)}; return a "
                             "dict of numbers for metrics.csv, or None")
        row = {}
        for key, value in got.items():
            if key in COLUMNS or not isinstance(key, str):
                raise UsageError(f"{owner} returned the key {key!r}, which is "
                                 + ("the run's own column" if key in COLUMNS else "not a name")
                                 + " in metrics.csv; name its numbers otherwise")
            try:
                row[key] = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError, RuntimeError):
                row[key] = math.nan
            if isinstance(value, bool | str) or not math.isfinite(row[key]):
                raise UsageError(f"{owner} returned {key!r}: {_short(value)}, not a finite real "
                                 "number; return floats (numpy and torch scalars are taken)")
        return row

    def report(self, summary: dict) -> dict:
        """The model's ``report`` hook with ``ctx.summary`` = ``summary`` (the run's test
        evaluation: not a second one): its numbers (and, where ``ctx.figures``, its figures). A
        hook that fails is logged and gives no numbers: a finished run is never lost to it."""
        self.ctx.summary = dict(summary)
        try:
            with torch.no_grad():
                return dict(hook(self.module, "report")(self.ctx) or {})
        except UsageError:
            raise
        except Exception as e:  # the user's hook failed on the finished run
            self.ctx.log(f"the model's report hook skipped: it raised {type(e).__name__}: "
                         f"{first_line(e, 240)}")
            return {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _to(s: Scores, device: torch.device | str) -> Scores:
    return replace(s, elbo=s.elbo.to(device), iwae=None if s.iwae is None else s.iwae.to(device))


def elbo_for(name: str, k: int, info: ProgramInfo | None, jit: bool = False) -> pyro.infer.ELBO:
    """:func:`make_elbo` for the program ``info`` describes (None: one plate, vectorized)."""
    return make_elbo(name, k, jit, info.max_plate_nesting if info else 1,
                     vectorize=info is None or info.vectorized)


def schedules(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
              ) -> dict[str, Any]:
    """The learning-rate schedule of ``config``: ``scheduler``, stepped after every step
    (:class:`~torch.optim.lr_scheduler.LambdaLR`), or ``plateau``, after every epoch on the
    validation loss (:class:`~torch.optim.lr_scheduler.ReduceLROnPlateau`: halved at the N-th
    epoch in a row without a better one, N half ``--early-stop``'s patience (at least 1: it
    halves before the run stops), or 5 without early stopping). After s steps the rate is
    ``lr * f(s)``: warm-up ``f = (s + 1) / W`` for ``s < W`` (``--warmup-steps``), then with
    ``u = (s - W) / (T - W)`` (T: all the run's steps) ``lr_min / lr`` plus
    ``(1 - lr_min / lr)`` times ``(1 + cos(pi u)) / 2`` (cosine), ``1 - u`` (linear) or 1
    (constant)."""
    kind, w, lr, floor = config.lr_schedule, config.warmup_steps, config.lr, config.lr_min
    if kind == "plateau":
        n = max(1, config.early_stop // 2) if config.early_stop else 5
        return {"plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(  # (torch's patience:
            optimizer, factor=0.5, patience=n - 1, min_lr=floor)}  # bad epochs before the N-th)
    if kind == "constant" and not w:
        return {}
    total = config.epochs * steps_per_epoch

    def factor(s: int) -> float:
        if s < w:
            return (s + 1) / w
        u = min(1.0, (s - w) / max(1, total - w))
        shape = {"cosine": (1 + math.cos(math.pi * u)) / 2, "linear": 1 - u}.get(kind, 1.0)
        return floor / lr + (1 - floor / lr) * shape

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor)}


def bf16(fn: Callable | None, module: nn.Module, device: torch.device) -> Callable | None:
    """``fn`` (a loss) with the networks under ``torch.autocast`` in bfloat16: each child
    module of ``module`` runs in bfloat16 and hands back float32, so log-densities, the
    ELBO's sums and the KL are computed in float32 (the optimizer works on float32 too)."""
    if fn is None:
        return None
    for child in module.children():
        if not getattr(child, "_ppl_vae_float32_out", False):
            child.register_forward_hook(_float32_out)
            child._ppl_vae_float32_out = True

    @functools.wraps(fn)
    def autocast(*args: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args)

    return autocast


def _float32_out(module: nn.Module, inputs: Any, output: Any) -> Any:
    """A child's outputs in float32 while autocast runs it in lower precision."""
    first = next((t for t in torch.utils._pytree.tree_leaves(output) if torch.is_tensor(t)), None)
    if not torch.is_autocast_enabled("cpu" if first is None else first.device.type):
        return None
    return torch.utils._pytree.tree_map(
        lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, output)

