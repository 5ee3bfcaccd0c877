"""The training loop that can stop anywhere and continue exactly: epochs of shuffled steps,
data-parallel across ranks, checkpointed, interruptible and watched for divergence.

Each epoch draws its inputs from a *data* generator on the device and its row order ``perm``
(a permutation of the N rows, or the data's composed batches) from a *shuffle* generator on
the CPU, both seeded by the run's seed and the same on every rank. Step i takes rows
``perm[i*B*W:(i+1)*B*W]`` (``B`` the per-process ``batch_size``, ``W`` the processes), rank r
its contiguous share; with W > 1 the permutation is padded by wrapping to a multiple of W.
:class:`LoopState` plus every rank's RNG state is what a checkpoint needs to continue exactly.
Each step folds ``isfinite(loss)`` into a device-side "first bad step", read every
``check_every`` steps; a bad step is replayed from the last snapshot so ``diagnose`` can name
the site, and :class:`Diverged` is raised.
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import distributed as dist
from ..errors import PluginError, UsageError, explain, from_our_code, users_frames
from ..inference.svi import Step, hide_bar
from ..interrupt import Guard, Interrupted
from ..models import Model
from .checkpoint import load_store_values, store_values

NEVER = 2**62
"""The "first bad step" while every step's loss is finite."""
EXPLODED = 1e6
"""A finite loss per data point this many times the run's first is a divergence."""


class Diverged(UsageError):
    """A non-finite loss: the CLI prints the line and exits with status 3."""

    exit_status = 3


@dataclass
class LoopState:
    """Where a loop stands, as checkpoints save it (besides every rank's RNG and loss)."""

    epoch: int = 1  # the epoch in progress (1-based)
    step: int = 0  # steps of it already taken
    seconds: float = 0.0  # training seconds of it so far
    streams: dict[str, Tensor] = field(default_factory=dict)  # generators at epoch start
    best: float = math.inf  # early stopping: best validation loss, its epoch, bad epochs
    best_epoch: int = 0
    bad: int = 0
    best_state: dict[str, Tensor] | None = None
    done: bool = False
    first_loss: float | None = None  # the run's first step, per data point (divergence)
    logged: tuple | None = None  # the last log's (loss, rows, seconds, steps) in this epoch
    # (after the epoch it was in: less that epoch's totals, so a window spans epochs)


def same_world(size: int, world: Any) -> None:
    """Refuse to continue a checkpoint written by ``size`` processes in another ``world``."""
    if size != world.size:
        raise UsageError(f"the checkpoint was written by {size} processes and this run has "
                         f"{world.size}; resume with --nproc_per_node {size} (the ranks' "
                         "random streams are saved)")


class Loop:
    """Train ``module`` (default: the session's model) by ``step`` (a
    :class:`~ppl_vae.inference.svi.Step`) over ``inputs(generator)`` (default: the session's
    training rows through the model's ``data_args``), in the session's batches, for its
    ``config.epochs`` epochs, on its device and processes. ``validate()`` (loss per row) and
    ``on_epoch(epoch, train_loss, seconds, val_loss)`` run after each epoch in eval mode; with
    ``validate`` the session's ``early_stop`` patience stops early and restores the best weights;
    ``save(loop_state_dict)`` runs after each epoch and every ``checkpoint_every_steps`` steps."""

    def __init__(self, session: Any, step: Step, *, module: nn.Module | None = None,
                 inputs: Callable[[torch.Generator], tuple[Tensor, ...]] | None = None,
                 validate: Callable[[], float] | None = None,
                 on_epoch: Callable[[int, float, float, float | None], None] | None = None,
                 save: Callable[[dict], None] | None = None, desc: str = "epochs") -> None:
        config, world = session.config, session.world
        self.take, self.optimizer = step, step.optimizer
        self.module = session.module if module is None else module
        self.inputs = inputs or session.train_args
        self.batch_size, self.epochs = config.batch_size, config.epochs
        self.per_step = config.batch_size * world.size  # rows a step takes over all ranks
        self.device, self.world, self.data = session.device, world, session.data
        self.validate, self.on_epoch, self.save = validate, on_epoch, save
        self.patience = config.early_stop if validate is not None else 0
        self.checkpoint_every, self.check_every = (config.checkpoint_every_steps,
                                                   config.check_every_steps)
        self.guard = session.guard or Guard()
        self.session = session  # (its logger, where the run logs: the same on every rank)
        self.logs = getattr(config, "log", "none") != "none" and self.module is session.module
        self.log_every = getattr(config, "log_every_steps", 0)
        self.progress = session.progress if world.main else False
        self.desc = desc
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.data_rng = torch.Generator(device=self.device).manual_seed(config.seed)
        self.state = LoopState(streams=self._streams())
        self.total = torch.zeros((), device=self.device)  # this rank's loss over the epoch
        self.first_bad = torch.full((), NEVER, device=self.device, dtype=torch.long)
        self.steps_per_epoch = 0
        self._rows = 0  # rows in the epoch's order
        self._snapshot: dict[str, Any] | None = None
        self.saved = ""  # where the last checkpoint stands ("" before the first)

    # -- checkpoint state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loop's state and every rank's (gathered: a collective call)."""
        mine = {"total": self.total.cpu(), **self._rng()}
        return {**asdict(self.state), "world_size": self.world.size,
                "ranks": dist.gather(mine, self.world)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (restores this rank's RNG: call it last)."""
        counts = [state.get(k) for k in ("epoch", "step", "world_size")]
        if not all(type(n) is int for n in counts) or min(counts) < 0 or 0 in counts[::2]:
            raise ValueError(f"its loop's epoch, step and processes are {counts}")
        same_world(state["world_size"], self.world)
        if state["epoch"] > self.epochs + 1 or not all(
                torch.is_tensor(state.get("streams", {}).get(k)) for k in self._streams()):
            raise ValueError(f"its loop is at epoch {state['epoch']} of {self.epochs}, with "
                             f"the random streams {sorted(state.get('streams') or {})}")
        names = {f for f in LoopState.__dataclass_fields__}
        self.state = LoopState(**{k: v for k, v in state.items() if k in names})
        mine = state["ranks"][self.world.rank]
        self.total.copy_(mine["total"])
        self.saved = self._at()
        self._set_rng(mine)
        self.shuffle.set_state(self.state.streams["shuffle"])  # (a bad one fails here)
        self.data_rng.set_state(self.state.streams["data"])

    def _rng(self) -> dict[str, Tensor]:
        """This process's random state: torch's, and CUDA's on a GPU."""
        return {"rng": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device)
                if self.device.type == "cuda" else torch.empty(0, dtype=torch.uint8)}

    def _set_rng(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and state["cuda"].numel():
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _streams(self) -> dict[str, Tensor]:
        return {"shuffle": self.shuffle.get_state(), "data": self.data_rng.get_state()}

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        """Train to the end (or early stop); returns the best epoch (the last without early
        stopping). Raises :class:`Interrupted` after checkpointing on a signal and
        :class:`Diverged` on a non-finite loss."""
        bar = tqdm(total=self.epochs, initial=self.state.epoch - 1, desc=self.desc,
                   unit="epoch", disable=hide_bar(self.progress))
        while not self.state.done:
            loss, _, val = self.epoch()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.2f}", **({} if val is None else {"val": f"{val:.2f}"}))
        bar.close()
        return self.state.best_epoch if self.patience else self.state.epoch

    def epoch(self) -> tuple[float, float, float | None]:
        """One epoch, its validation, ``on_epoch``, early stopping and checkpoint: (the mean
        loss per row, the epoch's training seconds, the validation loss or None)."""
        s = self.state
        self.module.train()
        self._epoch()
        summed = dist.all_sum(self.total, self.world)
        loss = (summed / self._rows).item()
        seconds = s.seconds
        self.module.eval()
        with self.take.averaged():  # (the weights a run evaluates: with --ema, the average)
            val = self.validate() if self.validate is not None else None
            if self.on_epoch is not None:
                self.on_epoch(s.epoch, loss, s.seconds, val)
            if self.patience:
                if val < s.best:
                    s.best, s.best_epoch, s.bad = val, s.epoch, 0
                    s.best_state = copy.deepcopy(self.module.state_dict())
                else:
                    s.bad += 1
        self.take.after_epoch(val)
        s.done = (self.patience > 0 and s.bad >= self.patience) or s.epoch >= self.epochs
        if s.done:  # the weights the run ends with: the best epoch's, else the last (averaged)
            self.take.settle(s.best_state, self.module)
        else:
            if self.logs and s.logged is not None and len(s.logged) == 4:  # (carried over)
                took = (float(summed), self._rows, s.seconds, self.steps_per_epoch)
                s.logged = tuple(a - b for a, b in zip(s.logged, took, strict=True))
            s.epoch, s.step, s.seconds = s.epoch + 1, 0, 0.0
            s.streams = self._streams()
            self.total.zero_()
        self._save()
        return loss, seconds, val

    def _epoch(self) -> None:
        s, w = self.state, self.world
        self.shuffle.set_state(s.streams["shuffle"])
        self.data_rng.set_state(s.streams["data"])
        inputs = self.inputs(self.data_rng)
        perm = self.data.epoch_order(self.batch_size, self.shuffle)
        if w.parallel and len(perm) % w.size:
            perm = torch.cat([perm, perm[: w.size - len(perm) % w.size]])
        perm = perm.to(self.device)
        self._rows = len(perm)
        steps = self.steps_per_epoch = math.ceil(len(perm) / self.per_step)
        self.first_bad.fill_(NEVER)
        if self._snapshot is None or self._snapshot["at"] != (s.epoch, s.step):
            self._take_snapshot()  # (the epoch-end checkpoint took this one already)
        bar = tqdm(total=steps, initial=s.step, desc=f"epoch {s.epoch}", unit="step",
                   leave=False, disable=hide_bar(self.progress))
        shown = start = time.perf_counter()
        if self.logs and (s.logged is None or len(s.logged) == 3 and s.step == 0):
            s.logged = (0.0, 0, 0.0, 0)  # (a 3-tuple: an older checkpoint's, per epoch)
            self.take.grad_norm.zero_()
        seconds = s.seconds

        def batch(i: int) -> tuple[Tensor, ...]:
            chunk = perm[i * self.per_step:(i + 1) * self.per_step]
            idx = chunk[dist.shard(len(chunk), w)]
            return tuple(t[idx] for t in inputs)

        self._batch = batch
        with self.guard.deferred():
            while s.step < steps:
                if signum := dist.any_max(self.guard.requested, w):
                    s.seconds = seconds + time.perf_counter() - start
                    self._save()
                    raise Interrupted(signum, f"interrupted at epoch {s.epoch}, step {s.step}")
                self._take_step(s.step, batch(s.step))
                s.step += 1
                global_step = self.global_step
                if self.logs and global_step % self.log_every == 0:
                    self._log(global_step, seconds + time.perf_counter() - start)
                if self.check_every and s.step % self.check_every == 0:
                    self._check()
                if self.checkpoint_every and global_step % self.checkpoint_every == 0 \
                        and s.step < steps:
                    s.seconds = seconds + time.perf_counter() - start
                    self._save()
                if not bar.disable:
                    bar.update(1)
                    if time.perf_counter() - shown > 0.5:
                        seen = min(s.step * self.per_step, len(perm))
                        bar.set_postfix(elbo=f"{-self.total.item() * w.size / seen:.2f}")
                        shown = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        s.seconds = seconds + time.perf_counter() - start
        bar.close()
        self._check()

    @property
    def global_step(self) -> int:
        """Steps the run has taken (every epoch before this one is whole)."""
        return (self.state.epoch - 1) * self.steps_per_epoch + self.state.step

    def _log(self, step: int, seconds: float) -> None:
        """Training scalars since the last log (in this epoch or before): the loss per row,
        the learning rate of the last step, the gradient's norm before clipping (mean per
        step), the steps clipped, images per second (host reads here only, on every rank;
        rank 0's logger writes)."""
        loss = float(dist.all_sum(self.total, self.world))
        rows = min(self.state.step * self.per_step, self._rows)
        last = self.state.logged
        took = rows - last[1]
        values = {"train/loss": (loss - last[0]) / max(1, took),
                  "train/lr": self.take.last_lr,
                  "train/images_per_s": took / max(1e-9, seconds - last[2])}
        if self.take.clip_norm or self.take.watch_norm:
            steps = self.state.step - (last[3] if len(last) == 4 else  # (an older checkpoint's)
                                       math.ceil(last[1] / self.per_step))
            values["train/grad_norm"] = float(self.take.grad_norm) / max(1, steps)
            self.take.grad_norm.zero_()
        if self.take.clip_norm:
            values["train/clipped_steps"] = int(self.take.clipped)
        self.state.logged = (loss, rows, seconds, self.state.step)
        if self.session.logger is not None:
            self.session.logger.scalars(step, values)

    def _take_step(self, i: int, args: tuple[Tensor, ...]) -> None:
        try:
            self.take(i, args, self.total, self.first_bad)
        except Exception as e:  # the user's model or guide raised, later than its first run
            theirs = users_frames(traceback.extract_tb(e.__traceback__))
            if isinstance(e, UsageError) or not theirs or from_our_code(e) or \
                    self.module is not self.session.module:  # (ctx.fit's: its hook says it)
                raise
            name = f"{type(self.module).__name__}.{theirs[-1].name}"
            what = f"in epoch {self.state.epoch}, step {i + 1}"
            head, *frames = explain(e, name, args, what).splitlines()
            raise PluginError("\n".join([f"{head}; {self._kept}", *frames])) from None
        if self.state.first_loss is None:  # one host read per run: the divergence reference
            loss = float(dist.all_sum(self.total, self.world)) / (args[0].shape[0]
                                                                 * self.world.size)
            self.state.first_loss = loss if math.isfinite(loss) else None

    def _save(self) -> None:
        self._check()
        if self.save is not None:
            with self.guard.deferred():  # (what the checkpoint holds is then what is said)
                self.save(self.state_dict())
                self.saved = self._at()
            if self.guard.requested and not (self.guard.defers or self.world.parallel):
                raise Interrupted(self.guard.requested)  # (else at the next step, all ranks)
        self._take_snapshot()

    def _at(self) -> str:
        """Where the loop stands, in words (step 0: no step of the epoch taken yet)."""
        s = self.state
        return f"epoch {s.epoch}, step {s.step}" if s.step else f"the start of epoch {s.epoch}"

    # -- divergence -----------------------------------------------------------------------
    def _take_snapshot(self) -> None:
        """What replaying from this step needs (kept in memory, not on disk)."""
        self._snapshot = {
            "at": (self.state.epoch, self.state.step),
            "module": copy.deepcopy(self.module.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "update": copy.deepcopy(self.take.state_dict()),  # (the schedule, the average)
            "store": store_values(), **self._rng()}

    def _check(self) -> None:
        bad = int(dist.all_sum(self.first_bad, self.world, "MIN").item())
        if bad == NEVER:
            self._check_growth()
            return
        site = self._replay(bad)
        where = f"; non-finite: {site}" if site else ""
        raise Diverged(f"training diverged at epoch {self.state.epoch}, step {bad + 1} of "
                       f"{self.steps_per_epoch} (the loss is not finite{where}); {self._kept}; "
                       f"{self._advice}")

    def _check_growth(self) -> None:
        """A finite loss that exploded: the epoch's mean loss per data point so far more than
        ``EXPLODED`` times the run's first (or 1 nat, if that was smaller). Losses that fall,
        or rise by less than six orders of magnitude, never trip it."""
        s, first = self.state, self.state.first_loss
        seen = min(s.step * self.per_step, self._rows)
        if first is None or not seen:
            return
        mean = float(dist.all_sum(self.total, self.world)) / seen
        if abs(mean) <= EXPLODED * max(1.0, abs(first)):
            return
        raise Diverged(f"training diverged at epoch {s.epoch}, by step {s.step} of "
                       f"{self.steps_per_epoch}: the loss reached {mean:.3g} per data point, "
                       f"over {EXPLODED:.0e} times its first value ({first:.3g}); {self._kept}; "
                       f"{self._advice}")

    @property
    def _advice(self) -> str:
        """What to change: with a schedule of the model's own (its ``on_epoch``), that first."""
        own = getattr(type(self.module), "on_epoch", None)
        if own is None or own is Model.on_epoch:
            return "lower --lr or check the data"
        return (f"check the schedule {type(self.module).__name__}.on_epoch sets (the options "
                "it reads), lower --lr, or check the data")

    @property
    def _kept(self) -> str:
        return (f"the last good checkpoint ({self.saved}) is kept" if self.saved else
                "no checkpoint was written" if self.save is not None else "nothing is kept")

    def _replay(self, bad: int) -> str | None:
        """Re-run the steps from the last snapshot up to the bad one, then ``diagnose`` its
        batch (every rank; the first rank's finding is reported)."""
        snap = self._snapshot
        if snap is None or snap["at"][0] != self.state.epoch or snap["at"][1] > bad:
            return None
        self.module.load_state_dict(snap["module"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.take.load_state_dict(snap["update"])
        load_store_values(snap["store"])
        self._set_rng(snap)
        for i in range(snap["at"][1], bad):
            self._take_step(i, self._batch(i))
        found = [f for f in dist.gather(self.take.diagnose(*self._batch(bad)), self.world) if f]
        return found[0] if found else None
