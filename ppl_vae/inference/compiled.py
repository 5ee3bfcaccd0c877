"""The whole SVI step as one compiled graph (``--compile``).

One step of SVI with Adam is a pure function of the parameters theta, Adam's moments (m, v)
and step count t, the batch x and the noise eps that the guide draws::

    L = -ELBO(theta; x, eps),   g = grad_theta L
    m <- beta1 m + (1 - beta1) g,      v <- beta2 v + (1 - beta2) g^2,      t <- t + 1
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + epsilon)

Pyro computes L in Python, site by site; here ``make_fx`` traces the whole step (traces, ELBO,
backward, Adam, the loop's bookkeeping) once per batch shape on fake tensors, inductor compiles
it (a CUDA graph with ``--cuda``), and each step replays it, updating the parameters and Adam's
state in place. The first step (no Adam state yet) is eager; random draws are torch's, in the
eager step's order (``fallback_random``), so a compiled step draws the eager step's noise.

Assumptions, checked (else the step stays eager and one line says why, see
docs/howto/compile.md): a differentiable, host-free loss (not RenyiELBO), Pyro validation off,
plain ``torch.optim.Adam`` (no amsgrad, maximize or tensor lr), every tensor the program reads
an input or an untrained constant, a static structure, a compiler for inductor, and at capture
one compiled step agreeing with one eager step with the same noise (the loss and Adam's new
moments, to float tolerance). At every epoch start the forward's operators and Adam's
hyperparameters are compared with the compiled step's and a change is traced again. Under
``torchrun`` the graph computes each rank's loss and gradients only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from unittest.mock import patch

import pyro
import torch
from pyro.distributions.util import is_validation_enabled as dist_validation
from pyro.infer.util import is_validation_enabled as infer_validation
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from ..distributed import sum_grads
from ..errors import Note, first_line, users_frames
from .svi import LossFn, Step

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
"""The capture check's relative tolerance by dtype (float16/bfloat16, and networks under
bfloat16 autocast: 1e-2)."""


class Refused(Exception):
    """Capture cannot be exact: the message is the one-line reason."""


# -- what can be refused before tracing -------------------------------------------------------
def compiler_missing(device: torch.device) -> str | None:
    """Why inductor cannot build kernels for ``device`` here, or None."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton (inductor's GPU compiler) is not installed"
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler

    found = None
    with contextlib.suppress(Exception):
        found = get_cpp_compiler()
    if not found or not shutil.which(found):
        wanted = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        return (f"no C++ compiler for inductor on the CPU (looked for {wanted!r}; install g++ "
                "or set CXX)")
    return None


def precheck(loss: LossFn | None, optimizer: torch.optim.Optimizer | None,
             device: torch.device, estimator: str = "the estimator") -> str | None:
    """The first reason the step cannot be compiled, known before tracing; None if none.
    ``optimizer`` None: the graph leaves the update to it (under torchrun)."""
    if loss is None:
        return (f"{estimator} has no differentiable loss (RenyiELBO reads its loss on the "
                "host in loss_and_grads)")
    if dist_validation() or infer_validation():
        return "Pyro validation is on (--validate): its checks read tensors on the host"
    if optimizer is not None and type(optimizer) is not torch.optim.Adam:
        return (f"the optimizer is {type(optimizer).__name__}; the graph implements "
                "torch.optim.Adam only")
    for group in optimizer.param_groups if optimizer is not None else ():
        for key in ("amsgrad", "maximize", "differentiable", "decoupled_weight_decay"):
            if group.get(key):
                return f"Adam with {key}=True is not implemented by the graph"
        if torch.is_tensor(group["lr"]):
            return "Adam with a tensor learning rate is not implemented by the graph"
    return compiler_missing(device)


# -- tracing -----------------------------------------------------------------------------------
class _Call(nn.Module):
    """``fn(*args)`` as the forward of a module holding ``module`` and ``schedule``: for
    ``functional_call`` to run ``fn`` with other tensors in their place."""

    def __init__(self, module: nn.Module, fn: Callable, schedule: nn.Module | None) -> None:
        super().__init__()
        self.module, self.fn, self.schedule = module, fn, schedule

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args)


@contextlib.contextmanager
def _store_swapped(values: dict[str, Tensor]) -> Iterator[None]:
    """Pyro's param store with ``values`` (unconstrained) in its ``_params`` (no public way);
    a name the program registers for the first time meanwhile is :class:`Refused`."""
    store = pyro.get_param_store()
    saved = (dict(store._params), dict(store._constraints), dict(store._param_to_name))
    store._params.update(values)
    try:
        yield
    finally:
        created = sorted(set(store._params) - set(saved[0]))
        for table, old in zip((store._params, store._constraints, store._param_to_name), saved,
                              strict=True):
            table.clear()
            table.update(old)
    if created:
        raise Refused(f"a dynamic structure: the program registered new parameters "
                      f"({', '.join(created[:3])}) after its first step")


def _traced_code_paths() -> contextlib.AbstractContextManager:
    """The host-free code paths Pyro and ``torch.distributions`` keep for ``torch.jit.trace``
    (no ``if not mask.all()``, ``.item()`` or assertions), taken under ``make_fx`` too."""
    return patch.object(torch._C, "_get_tracing_state", lambda: True)


def _user_frame(frames: traceback.StackSummary) -> str:
    """`` at file:line`` of the innermost frame of the program (the user's files or a shipped
    family's), else `` in Pyro's <module>`` where Pyro's code met it."""
    mine = users_frames(frames, keep="models")
    if mine:
        return f" at {mine[-1].filename.rsplit('/', 1)[-1]}:{mine[-1].lineno}"
    pyro_frames = [f.filename for f in frames if f"{os.sep}pyro{os.sep}" in f.filename]
    return f" in Pyro's {pyro_frames[-1].rsplit(os.sep + 'pyro' + os.sep, 1)[1]}" \
        if pyro_frames else ""


class _Operators(TorchDispatchMode):
    """Records each operator with its arguments: Python values as they are, tensors by first
    appearance, shape and dtype, and a constant (neither an input nor made) also by value."""

    def __init__(self, inputs: Sequence[Tensor]) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self._inputs = {id(t) for t in inputs}
        self._seen: dict[int, tuple] = {}
        self._alive: list[Tensor] = [*inputs]  # (ids stay unique while recording)

    def _describe(self, t: Tensor, made: bool = False) -> tuple:
        if id(t) not in self._seen:
            value = () if made or id(t) in self._inputs else (  # a large one: changed in place?
                t.detach().cpu().flatten().tolist() if t.numel() <= 4096 else (id(t), t._version))
            self._seen[id(t)] = (len(self._seen), tuple(t.shape), t.dtype, *value)
            self._alive.append(t)
        return self._seen[id(t)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, *(self._describe(a) if isinstance(a, Tensor) else a
                                 for a in torch.utils._pytree.tree_leaves((args, kwargs)))))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self._describe(t, made=True)
        return out


class _FindDynamicShape(TorchDispatchMode):
    """Raises :class:`Refused` at the first operator whose result's shape depends on tensor
    values (a boolean mask, ``nonzero``), naming it and the program line that called it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t) and any(isinstance(d, torch.SymInt) for d in t.shape):
                raise Refused(f"a dynamic structure: the shape of {func} depends on tensor "
                              f"values{_user_frame(traceback.extract_stack())}")
        return out


def _reason(e: Exception) -> str:
    """The one-line refusal for an exception raised while tracing on fake tensors."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    if isinstance(e, Refused):
        return str(e)
    where = _user_frame(traceback.extract_tb(e.__traceback__))
    if isinstance(e, DynamicOutputShapeException):
        return f"a dynamic structure: the shape of {e.func} depends on tensor values{where}"
    if isinstance(e, DataDependentOutputException | GuardOnDataDependentSymNode):
        return f"the program reads a tensor's value in Python{where}"
    wrapped = re.search(r"new Tensor subclass (\w+)", str(e))
    if wrapped:  # (pyro.ops.provenance: TraceGraph_ELBO's dependencies of score-function sites)
        return (f"Pyro wraps the program's tensors in a {wrapped[1]}{where}, which a trace on "
                "fake tensors cannot carry")
    return f"tracing failed{where} ({_first_line(e)})"


@torch.no_grad()
def adam(p: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: Tensor, group: dict,
         lr: Tensor, coef: Tensor) -> None:
    """``torch.optim.Adam``'s update of one tensor in place (the module's formula) at the
    float64 learning rate ``lr`` (an input: a schedule changes it), with the bias corrections
    of its step t given in float64, ``coef = [1 - beta1^t, sqrt(1 - beta2^t)]``."""
    if group["weight_decay"]:
        grad = grad.add(p, alpha=group["weight_decay"])
    beta1, beta2 = group["betas"]
    t.add_(1)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / coef[1].to(v.dtype)).add_(group["eps"])
    p.sub_((lr / coef[0]).to(p.dtype) * m / denom)


def corrections(t: Tensor, groups: Sequence[dict]) -> Tensor:
    """Adam's bias corrections ``[1 - beta1^(t+1), sqrt(1 - beta2^(t+1))]`` (float64) of
    each group for the step after ``t``: what the graph computes once per step."""
    after = t.to(torch.float64) + 1
    return torch.stack([torch.stack([1 - g["betas"][0] ** after,
                                     (1 - g["betas"][1] ** after).sqrt()]) for g in groups])


def _standard_normal_as_randn(gm: torch.fx.GraphModule) -> None:
    """``normal(mean, std)`` (what ``torch.distributions`` draws under tracing) as
    ``randn(shape) * std + mean``: the eager step's ``empty(shape).normal_()`` draws, in the
    same order, by an operator the C++ wrapper calls directly (``normal`` has no C shim)."""
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.aten.normal.Tensor_Tensor:
            continue
        mean, std = node.args
        out = node.meta["val"]
        with gm.graph.inserting_before(node):
            eps = gm.graph.call_function(torch.ops.aten.randn.default, (list(out.shape),),
                                         {"dtype": out.dtype, "device": out.device})
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (eps, std))
            drawn = gm.graph.call_function(torch.ops.aten.add.Tensor, (scaled, mean))
        node.replace_all_uses_with(drawn)
        gm.graph.erase_node(node)
    gm.recompile()


@dataclass
class _Graph:
    """One traced and compiled step for one shape of the batch."""

    signature: tuple  # what a re-trace must reproduce
    compiled: Callable
    fingerprint: tuple | None = None  # the forward's operators (see _fingerprint)


class CompiledStep(Step):
    """The training step ``eager`` (a :class:`~ppl_vae.inference.svi.Step` over ``module``),
    traced and compiled per batch shape, called like it; ``refused``: why it stays eager (a
    line to ``log``). Under torchrun the graph gives this rank's loss and gradients, summed as
    the eager step's, then ``optimizer.step()`` runs eagerly; a refusal on one rank is on all."""

    def __init__(self, eager: Step, module: nn.Module, *,
                 log: Callable[[str], None] | None = None, estimator: str = "the estimator",
                 rtol: float | None = None) -> None:
        self.__dict__.update(eager.__dict__)  # (its parameters, update and statistics)
        self.module, optimizer = module, eager.optimizer
        self.log = log or (lambda text: warnings.warn(text, CompileNote, stacklevel=3))
        trained = (p for g in optimizer.param_groups for p in g["params"])
        self.device = next(trained, next(module.parameters(), torch.zeros(()))).device
        self.graphs: dict[tuple, _Graph] = {}
        self.rtol = rtol  # the capture check's tolerance (None: TOLERANCE by the loss's dtype)
        self.refused: str | None = None
        self._bound, self._moments, self._graph = False, None, None
        self._cudagraphs = self.device.type == "cuda"
        self._forked = [self.device] if self._cudagraphs else []  # (fork_rng's devices)
        self._grads_only = self.world.parallel
        self._next_i, self._calls = -1, 0
        self._hook = optimizer.register_load_state_dict_post_hook(lambda opt: self._rebind())
        self._refuse(self._agree(precheck(self.loss, None if self._grads_only else optimizer,
                                          self.device, estimator)))

    # -- what the Loop calls -------------------------------------------------------------------
    def __call__(self, i: int, args: Sequence[Tensor], total: Tensor, first_bad: Tensor
                 ) -> None:
        self._calls += 1
        if self._bound and i == 0 and (name := self._rebound()) is not None:
            self.log(f"--compile: {name} is another tensor object since the step was compiled "
                     "(rebound, not filled in place); binding and compiling the step again")
            self._bound = False
            self.graphs.clear()
        if self.refused is None and not self._bound and self._ready():
            self._refuse(self._agree(self._bind(total, first_bad)))
        if self.refused is not None or not self._bound:
            super().__call__(i, args, total, first_bad)
            return
        assert total is self.total and first_bad is self.first_bad, "one loop per step"
        for g_index, group in enumerate(() if self._grads_only else self._groups):
            if group["lr"] != self._lr[g_index]:  # (a schedule's: an input, no recompiling)
                self._lr[g_index] = group["lr"]
                self.lr_dev[g_index].fill_(group["lr"])
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        looking = i == 0 or key not in self.graphs  # (the same on every rank)
        reason = None
        try:
            if i == 0:  # each epoch start
                self._retrace(key, args)
            if key not in self.graphs:
                self._capture(key, args)  # compiles and checks; the step follows
        except Refused as e:
            reason = str(e)
        except Exception as e:  # inductor, triton or the program failing in a compiled run
            reason = f"compiling the step failed ({_first_line(e)})"
        if self._grads_only and looking:
            reason = self._agree(reason)
        if reason is not None:
            self._refuse(reason)
        elif self._grads_only:  # the base step, this rank's loss and gradients from the graph
            self._graph = self.graphs[key]
        else:
            if i != self._next_i:
                self.i_dev.fill_(i)
            with torch.no_grad():
                self.graphs[key].compiled(*self._inputs, *args)
            self._next_i = i + 1
            self.schedule_step()
            return
        super().__call__(i, args, total, first_bad)

    def gradient(self, *args: Tensor) -> Tensor:
        """Under torchrun, with the graph :meth:`__call__` chose: this rank's loss and gradients
        from it, summed over the ranks as eager ones are; else the eager step's."""
        graph, self._graph = self._graph, None
        if graph is None:
            return super().gradient(*args)
        with torch.no_grad():
            loss, *grads = graph.compiled(*self._inputs, *args)
            for p, g in zip(self._trained_tensors, grads, strict=True):
                p.grad = g
            sum_grads(self.params, self.world)
        return loss

    @property
    def description(self) -> str:
        """How the run's steps were taken, for the summary."""
        if self.refused is not None:
            return f"eager: {self.refused}"
        return "compiled (inductor, CUDA graphs)" if self._cudagraphs else "compiled (inductor)"

    # -- state the graph reads and writes --------------------------------------------------
    def _ready(self) -> bool:
        """After the first eager step (which makes lazy parameters and Adam's state), or with
        the optimizer's state a resumed run restored (its first step was compiled too)."""
        state = [self.optimizer.state.get(p, {}) for g in self.optimizer.param_groups
                 for p in g["params"]]
        if self._grads_only:
            return self._calls > 1 or any(state)
        return any("exp_avg" in s for s in state)

    def _bind(self, total: Tensor, first_bad: Tensor) -> str | None:
        """Fix the graph's inputs (module tensors, trained store values, Adam's state, the
        corrections, the bookkeeping; under torchrun the tensors only); why it cannot, or None."""
        module_tensors = dict([*self.module.named_parameters(), *self.module.named_buffers()])
        self._module_keys = list(module_tensors)
        by_id = {id(t): k for k, t in module_tensors.items()}
        store = pyro.get_param_store()._params
        trained = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        # store name -> module key (pyro.module), and the store's own trained tensors
        self._store_alias = {name: by_id[id(t)] for name, t in store.items() if id(t) in by_id}
        store_own = {name: t for name, t in store.items()
                     if id(t) not in by_id and id(t) in trained}
        self._store_keys = list(store_own)
        scheduled = dict(self.schedule.named_buffers()) if self.schedule is not None else {}
        self._schedule_keys = list(scheduled)
        tensors = [*module_tensors.values(), *store_own.values(), *scheduled.values()]
        position = {id(t): j for j, t in enumerate(tensors)}
        self._groups: list[dict] = list(self.optimizer.param_groups)
        self._trained, self._group_of, steps = [], [], set()  # (positions, group indices)
        for g_index, group in enumerate(self._groups):
            for p in group["params"]:
                if id(p) not in position:
                    return ("a trainable tensor is not an input: the optimizer trains a "
                            f"tensor of shape {tuple(p.shape)} that is neither the module's "
                            "nor in Pyro's param store")
                state = self.optimizer.state.get(p, {})
                graded = self._grads_only and p.requires_grad
                if graded or "exp_avg" in state:
                    self._trained.append(position[id(p)])
                    self._group_of.append(g_index)
                if not graded and "exp_avg" in state:
                    t = state["step"]  # (no value: fake, meta)
                    steps.add(None if is_fake(t) or t.device.type == "meta" else float(t))
        if len(steps - {None}) > 1:
            return (f"parameters are at different Adam steps ({sorted(steps - {None})[:3]}); the "
                    "graph keeps one count")
        self._tensors = tensors
        self._trained_tensors = [tensors[j] for j in self._trained]
        self.i_dev = torch.zeros((), dtype=torch.long, device=self.device)
        self.lr_dev = torch.zeros(len(self._groups), dtype=torch.float64, device=self.device)
        self.coef = torch.zeros(len(self._groups), 2, dtype=torch.float64, device=self.device)
        averages = {id(p): a for p, a in zip(self.params, self.ema, strict=False)}
        self._averages = [averages[id(t)] for t in self._trained_tensors] if self.ema else []
        self.total, self.first_bad = total, first_bad
        self._bound, self._moments = True, None
        self._inputs = list(tensors)  # (without torchrun, _rebind adds Adam's state and the rest)
        self._rebind()
        return None

    def _rebound(self) -> str | None:
        """The first of the bound tensors that is another object now (a buffer rebound by
        ``self.temp = torch.tensor(...)``), or None."""
        store = pyro.get_param_store()._params
        now = dict([*self.module.named_parameters(), *self.module.named_buffers()])
        now.update({f"pyro.param {k!r}": store.get(k) for k in self._store_keys})
        if self.schedule is not None:
            now.update({f"schedule.{k}": t for k, t in self.schedule.named_buffers()})
        keys = [*self._module_keys, *(f"pyro.param {k!r}" for k in self._store_keys),
                *(f"schedule.{k}" for k in self._schedule_keys)]
        bound = dict(zip(keys, self._tensors, strict=True))
        return next((f"the module's {k!r}" if not k.startswith("pyro.") else k
                     for k in (*bound, *now) if now.get(k) is not bound.get(k)), None)

    def _rebind(self) -> None:
        """Point the graph at the optimizer's state: loaded values are copied into the graph's
        tensors, which go back into the optimizer (fixed addresses); no Adam state unbinds."""
        if not self._bound or self._grads_only:
            return
        if self._hyperparameters() != getattr(self, "_hyper", None):
            self.graphs.clear()  # (Adam's betas or eps the graphs hold are others now)
            self._hyper = self._hyperparameters()
        state = self.optimizer.state
        trained = self._trained_tensors
        if not all("exp_avg" in state.get(p, {}) for p in trained):
            self._bound, self._moments = False, None
            self.graphs.clear()
            return
        slots = [(p, kind) for kind in ("exp_avg", "exp_avg_sq", "step") for p in trained]
        loaded = [state[p][kind] for p, kind in slots]
        if self.device.type != "cpu":  # capturable Adam's layout: the count on the device
            loaded = [x.to(p.device) for x, (p, _) in zip(loaded, slots, strict=True)]
        if self._moments is None:
            self._moments = loaded
        else:
            for mine, new in zip(self._moments, loaded, strict=True):
                if mine is not new:
                    mine.copy_(new)
        for (p, kind), mine in zip(slots, self._moments, strict=True):
            state[p][kind] = mine
        if self._cudagraphs:
            for group in self._groups:
                group["capturable"] = True  # eager steps with the device-side step count
        self._lr = [None] * len(self._groups)  # (a schedule's: copied in by each call)
        if trained:  # the next step's corrections, on the device (no host read)
            step_count = self._moments[2 * len(trained)].to(self.device)
            self.coef.copy_(corrections(step_count, self._groups))
        self._inputs = [*self._tensors, *self._moments, *self._averages, self.lr_dev, self.coef,
                        self.total, self.first_bad, self.i_dev, self.grad_norm, self.clipped]
        self._next_i = -1

    # -- the traced function ---------------------------------------------------------------
    def _function(self, find_dynamic: bool = False) -> Callable:
        """The step as a function of flat tensors: module, store and schedule tensors, Adam's
        (m, v, t) of each trained tensor, their averages, the learning rate and corrections of
        each group, (total, first_bad, i, grad_norm, clipped), the batch; under torchrun of the
        tensors and the batch, returning (loss, grads of the trained tensors)."""
        n_in, n_tr, n_av = len(self._tensors), len(self._trained), len(self._averages)

        def step(*flat: Tensor) -> tuple[Tensor, ...]:
            tensors = flat[:n_in]
            if self._grads_only:
                batch = flat[n_in:]
            else:
                moments, averages = flat[n_in:n_in + 3 * n_tr], flat[n_in + 3 * n_tr:][:n_av]
                rest = flat[n_in + 3 * n_tr + n_av:]
                lr, coef, total, first_bad, i, grad_norm, clipped = rest[:7]
                batch = rest[7:]
            watch = _FindDynamicShape() if find_dynamic else contextlib.nullcontext()
            with watch:
                loss = self._loss_of(tensors, batch)
            trained = [tensors[j] for j in self._trained]
            grads = torch.autograd.grad(loss, trained, allow_unused=True)
            loss = loss.detach()
            if self._grads_only:
                return (loss, *(torch.zeros_like(p) if g is None else g
                                for p, g in zip(trained, grads, strict=True)))
            with torch.no_grad():
                grads = self.clip(grads, grad_norm, clipped)
                counted = None
                for k, g_index in enumerate(self._group_of):
                    if grads[k] is not None:  # (else the loss does not use it: Adam leaves it)
                        t = moments[2 * n_tr + k]
                        adam(trained[k], grads[k], moments[k], moments[n_tr + k], t,
                             self._groups[g_index], lr[g_index], coef[g_index])
                        counted = t if counted is None else counted
                if counted is not None:  # the next step's corrections, once, not per element
                    coef.copy_(corrections(counted, self._groups))
                for average, p in zip(averages, trained, strict=False):
                    average.lerp_(p, 1 - self.ema_decay)
                total.add_(loss)
                first_bad.copy_(torch.where(torch.isfinite(loss), first_bad,
                                            torch.minimum(first_bad, i)))
                i.add_(1)
            return (loss,)

        return step

    def _loss_of(self, tensors: Sequence[Tensor], batch: Sequence[Tensor]) -> Tensor:
        """The loss with ``tensors`` in place of the module's and the param store's own."""
        n_mod, n_store = len(self._module_keys), len(self._store_keys)
        own = dict(zip(self._module_keys, tensors[:n_mod], strict=True))
        store = dict(zip(self._store_keys, tensors[n_mod:n_mod + n_store], strict=True))
        store.update({name: own[key] for name, key in self._store_alias.items()})
        swapped = {f"module.{k}": v for k, v in own.items()}
        swapped.update({f"schedule.{k}": v for k, v in zip(
            self._schedule_keys, tensors[n_mod + n_store:], strict=True)})
        with _store_swapped(store):
            return torch.func.functional_call(_Call(self.module, self.loss, self.schedule),
                                              swapped, tuple(batch), strict=True)

    def _fingerprint(self, args: Sequence[Tensor]) -> tuple | None:
        """The forward's operators (:class:`_Operators`; the RNG and the inputs put back after) and
        Adam's hyperparameters: the Python values the graph holds; None if not to be had."""
        saved = [t.detach().clone() for t in self._inputs]
        record = _Operators([*self._tensors, *args])
        try:
            with torch.random.fork_rng(self._forked), warnings_quiet(), _traced_code_paths(), \
                    record:
                self._loss_of(self._tensors, args)
        except Exception:  # the full trace says why
            return None
        finally:
            self._restore(saved)
        return tuple(record.ops), self._hyperparameters()

    def _hyperparameters(self) -> tuple:
        """What the graph holds of the optimizer's parameter groups."""
        return tuple((tuple(g["betas"]), g["eps"], g["weight_decay"])
                     for g in getattr(self, "_groups", ()))

    def _trace(self, args: Sequence[Tensor], find_dynamic: bool = False
               ) -> torch.fx.GraphModule:
        """The step traced on fake tensors, else :class:`Refused`; a value-dependent shape is
        traced again with ``find_dynamic`` to name the operator and program line."""
        with warnings_quiet(), _traced_code_paths():
            try:
                gm = make_fx(self._function(find_dynamic), tracing_mode="fake",
                             _allow_non_fake_inputs=True)(*self._inputs, *args)
            except Exception as e:
                raise Refused(_reason(e)) from None
        gm.graph.eliminate_dead_code()  # e.g. a plate's index on the CPU that nothing reads
        gm.recompile()                  # (random draws count as used: their order stays)
        for node in gm.graph.nodes:
            value = node.meta.get("val")
            if torch.is_tensor(value) and any(isinstance(d, torch.SymInt) for d in value.shape):
                self._trace(args, find_dynamic=True)
                raise Refused(f"a dynamic structure: the shape of {node.target} depends on "
                              "tensor values")
            if node.op == "get_attr":
                value = getattr(gm, node.target, None)
                if torch.is_tensor(value) and value.requires_grad:
                    raise Refused(f"a trainable tensor is not an input: the program reads a "
                                  f"tensor of shape {tuple(value.shape)} that requires grad "
                                  "but is neither the module's nor a pyro.param")
        return gm

    @staticmethod
    def _signature(gm: torch.fx.GraphModule) -> tuple:
        """The graph's code and the values of its constant tensors."""
        consts = tuple(getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr")
        return gm.code, tuple(c.detach().cpu().clone() if torch.is_tensor(c) else c
                              for c in consts)

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
            torch.equal(x, y) if torch.is_tensor(x) and torch.is_tensor(y) else x is y
            for x, y in zip(a[1], b[1], strict=True))

    def _compile(self, gm: torch.fx.GraphModule, args: Sequence[Tensor]) -> Callable:
        """Inductor's code for ``gm``: on the CPU from the FX graph (no per-call guards) with a
        C++ wrapper (no Python between kernels), trusting the CPU's vector ISA flags (a failed
        build is retried with inductor's own ISA probes); on a GPU by ``torch.compile`` with
        every input but the batch at a static address (replayed as a CUDA graph)."""
        options = {"fallback_random": True}
        try:
            with torch.no_grad(), warnings_quiet():
                if not self._cudagraphs:
                    from torch._guards import TracingContext, tracing
                    from torch._inductor.compile_fx import compile_fx
                    from torch._subclasses.fake_tensor import FakeTensorMode
                    from torch.fx.experimental.symbolic_shapes import ShapeEnv

                    _standard_normal_as_randn(gm)
                    for trust in (True, None):
                        try:
                            with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
                                return compile_fx(gm, [*self._inputs, *args], config_patches={
                                    **options, "cpp_wrapper": True, "cpp.vec_isa_ok": trust})
                        except Exception:
                            if trust is None:
                                raise
                for t in self._inputs:
                    torch._dynamo.mark_static_address(t)
                return torch.compile(gm, fullgraph=True, dynamic=False,
                                     options={**options, "triton.cudagraphs": True})
        except Exception as e:
            raise Refused(f"inductor could not compile the step ({_first_line(e)})") from None

    def _capture(self, key: tuple, args: Sequence[Tensor]) -> None:
        """Trace twice (a differing graph: dynamic), compile, check against the eager step."""
        gm = self._trace(args)
        signature = self._signature(gm)
        if not self._same(signature, self._signature(self._trace(args))):
            raise Refused("a dynamic structure: two traces of the same step differ")
        began = time.perf_counter()
        graph = _Graph(signature, self._compile(gm, args), self._fingerprint(args))
        self._check(graph, args)  # (also the first call, where torch.compile compiles)
        self.compile_seconds += time.perf_counter() - began
        self.graphs[key] = graph

    def _retrace(self, key: tuple, args: Sequence[Tensor]) -> None:
        """Compare the forward's operators (cheap), and if they changed the whole trace; a
        changed graph is compiled anew when each shape is next met, and said so."""
        graph = self.graphs.get(key)
        if graph is None:
            return
        fingerprint = self._fingerprint(args)
        if fingerprint is not None and fingerprint == graph.fingerprint:
            return
        if self._same(graph.signature, self._signature(self._trace(args))):
            graph.fingerprint = fingerprint
            return
        self.log("--compile: the traced step changed since it was compiled (a value the "
                 "program reads from Python, such as a beta); compiling it again")
        self.graphs.clear()
        self._rebind()

    # -- the capture check -----------------------------------------------------------------
    def _check(self, graph: _Graph, args: Sequence[Tensor]) -> None:
        """The capture check (see the module): :class:`Refused` if the loss or the gradient (in
        Adam's new moments, or as returned under torchrun) differ by more than float rounding."""
        saved = [t.detach().clone() for t in self._inputs]
        with warnings_quiet(), torch.random.fork_rng(self._forked):
            loss_e = self.loss(*args)
            grads_e = torch.autograd.grad(loss_e, self._trained_tensors, allow_unused=True)
        loss_e = loss_e.detach()
        if not self._grads_only:  # the gradient the update sees
            grads_e = self.clip(grads_e, self.grad_norm.clone(), self.clipped.clone())
        self._restore(saved)  # (buffers the forward updated)
        with torch.no_grad(), warnings_quiet(), torch.random.fork_rng(self._forked):
            loss_c, *grads_c = graph.compiled(*self._inputs, *args)
        checks = [("the loss", loss_c, loss_e, loss_e.abs() + 1)]
        if self._grads_only:
            checks += [("the gradient", c, e, e.abs())
                       for c, e in zip(grads_c, grads_e, strict=True) if e is not None]
        else:  # Adam's new moments from the eager gradient, by the graph's own update
            n_in, n_tr = len(self._tensors), len(self._trained)
            lr, coef = saved[n_in + 3 * n_tr + len(self._averages):][:2]
            for k, g_index in enumerate(self._group_of):
                g, group = grads_e[k], self._groups[g_index]
                if g is not None:
                    p, m, v, t = (saved[j].clone() for j in (
                        self._trained[k], n_in + k, n_in + n_tr + k, n_in + 2 * n_tr + k))
                    adam(p, g, m, v, t, group, lr[g_index], coef[g_index])
                    m0, v0 = saved[n_in + k], saved[n_in + n_tr + k]
                    checks += [("Adam's m (the gradient)", self._moments[k], m,
                                m0.abs() + (m - group["betas"][0] * m0).abs()),
                               ("Adam's v (the gradient)", self._moments[n_tr + k], v, v0 + v)]
        worst, what = max((_relative_error(c, e, scale), what) for what, c, e, scale in checks)
        self._restore(saved)
        rtol = self.rtol or TOLERANCE.get(loss_e.dtype, 1e-2)
        if not worst <= rtol:
            raise Refused(f"the compiled step disagrees with the eager step with the same noise "
                          f"({what}: relative error {worst:.2g} > {rtol:g})")

    def _restore(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self._inputs, saved, strict=True):
                t.copy_(s)

    # -- refusing ------------------------------------------------------------------------------
    def _agree(self, reason: str | None) -> str | None:
        """Under torchrun, the first rank's reason to refuse (a collective: every rank calls
        it at the same point); else ``reason``."""
        return next((r for r in self.world.gather(reason) if r), None)

    def _refuse(self, reason: str | None) -> None:
        if reason is None or self.refused is not None:
            return
        self.refused = reason
        self.graphs.clear()
        self._hook.remove()  # (the optimizer need not keep this step alive)
        if self.world.main:
            self.log(f"--compile: {reason}; this run trains with the eager step")


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def _relative_error(new: Tensor, expected: Tensor, scale: Tensor) -> float:
    """``|new - expected| / |scale|`` (2-norms); entries that are the same non-finite value in
    both (a step that diverged either way) agree, any other non-finite entry is ``inf``."""
    same = (new == expected) | (new.isnan() & expected.isnan())
    if not bool((same | (new.isfinite() & expected.isfinite())).all()):
        return math.inf
    diff = torch.where(same, 0.0, new - expected).norm()
    floor = 1e-8  # a gradient that is zero everywhere: compare absolutely
    return float(diff) / max(float(torch.where(scale.isfinite(), scale, 0.0).norm()), floor)


class CompileNote(Note):
    """What :class:`CompiledStep` says (a refusal, a recompile) when given no ``log``."""


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    """Tracing and compiling without the noise they print (torch's CUDA-runtime notice on a
    CPU machine, Pyro's warnings, which the eager steps show anyway)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
