"""The processes of a data-parallel run under ``torchrun`` (:func:`setup`: gloo on the CPU,
NCCL with ``--cuda``): where this one stands (:class:`World`) and the few collectives the run
needs; without torchrun each is the identity. Each rank takes a disjoint shard of every batch
(:func:`shard`) and the gradients are summed over the ranks (:func:`sum_grads`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import UsageError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and shows progress bars."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank (picklable objects)."""
        return gather(obj, self)


SINGLE = World()
_control: Any = None  # a gloo group for small CPU messages (stop flags) beside NCCL
_store: Any = None  # the group's key-value store: who reports a failure (first_to_report)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    size = os.environ.get("WORLD_SIZE", "1").strip()
    return size.isdigit() and int(size) > 1


def restart_count() -> int:
    """How often ``torchrun --max-restarts`` has restarted this worker group."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def setup(cuda: bool) -> World:
    """Join the process group torchrun describes (once per process); :data:`SINGLE` when
    not launched by torchrun."""
    global _control, _store
    if not launched():
        return SINGLE
    env = {k: os.environ.get(k) for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")}
    bad = next((k for k, v in env.items() if not v or k != "MASTER_ADDR" and not v.isdigit()
                or k == "RANK" and int(v) >= int(os.environ["WORLD_SIZE"])), None)
    if bad is not None:  # (a stray WORLD_SIZE in the environment, say)
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} makes this process one of a "
                         f"torchrun group, but {bad} is "
                         f"{repr(env[bad]) if env[bad] else 'not set'}; launch it "
                         "with torchrun, or unset WORLD_SIZE to run one process")
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(world.local_rank)
        timeout, _store = timedelta(minutes=30), None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun shares one TCPStore across restarts; a key prefix per attempt keeps a
            # restarted group from reading the dead group's addresses (pytorch#135712)
            _store = dist.PrefixStore(f"ppl_vae/attempt_{restart_count()}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                timeout=timeout))
        dist.init_process_group("nccl" if cuda else "gloo", store=_store, rank=world.rank,
                                world_size=world.size, timeout=timeout)  # (no store: env://)
        if _store is None:
            with contextlib.suppress(AttributeError, RuntimeError, ValueError):  # (private)
                _store = dist.distributed_c10d._get_default_store()
        _control = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return world


def first_to_report() -> bool:
    """Whether this process is the one to print a failure's line: the first of the torchrun
    group to fail, whichever rank that is (one line per failed run, also when one rank alone
    meets the error); rank 0 before the group exists (every rank meets the same error then);
    True without torchrun."""
    if not launched():
        return True
    if _store is None:
        rank = os.environ.get("RANK", "0")  # (a bad RANK: its error is this one's)
        return rank == "0" or not rank.isdigit() or int(rank) >= int(os.environ["WORLD_SIZE"])
    with contextlib.suppress(Exception):  # failing: the store's host is gone, this one speaks
        return _store.add("ppl_vae/failed", 1) == 1
    return True


def lost_a_peer(error: BaseException) -> bool:
    """A collective failed because another process of the group died (gloo: "Connection
    closed by peer"; NCCL: a DistBackendError)."""
    if not launched() or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, dist.DistBackendError) or any(
        s in str(error) for s in ("closed by peer", "Connection reset by peer", "Broken pipe"))


def any_max(value: int, world: World) -> int:
    """The largest ``value`` over ranks (a stop flag: one tiny CPU all-reduce over gloo,
    no device sync)."""
    if not world.parallel:
        return value
    t = torch.tensor([int(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return int(t.item())


def all_sum(t: Tensor, world: World, op: str = "SUM") -> Tensor:
    """``t`` summed (or reduced by ``op``, e.g. ``MIN``) over ranks (a new tensor)."""
    t = t.clone()
    if world.parallel:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


def gather(obj: Any, world: World) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (picklable objects)."""
    if not world.parallel:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not world.parallel:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, world: World) -> slice:
    """This rank's contiguous share of ``n`` rows (sizes differ by at most one)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def sum_grads(params: Sequence[Tensor], world: World) -> None:
    """Every ``p.grad`` of ``params`` summed over the ranks, in place (a missing one counts as
    zeros): one flat all-reduce. The objective is a sum over rows, ``L = sum_r L_r`` over the
    ranks' disjoint shards, so its gradient is the sum of the ranks' gradients."""
    if not world.parallel:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p)
