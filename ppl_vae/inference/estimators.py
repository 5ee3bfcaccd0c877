"""The ELBO estimators ``--elbo`` chooses between, all from :mod:`pyro.infer`.

For a data point x, guide q(z|x) and L reparameterized draws z_l ~ q(z|x):

* ``mc`` -- :class:`~pyro.infer.Trace_ELBO`, Kingma & Welling's estimator A::

      1/L sum_l [log p(x, z_l) - log q(z_l|x)]

* ``analytic`` -- :class:`~pyro.infer.TraceMeanField_ELBO`, estimator B: the KL in closed
  form where torch knows it, else Monte Carlo (a guide with a non-reparameterized site gets
  ``mc``'s estimate, whose score-function gradient Pyro's class would drop)::

      1/L sum_l log p(x|z_l) - KL(q(z|x) || p(z))

* ``iwae`` -- :class:`~pyro.infer.RenyiELBO` with alpha = 0, the importance-weighted bound of
  Burda et al. (2016), tighter than the ELBO for L > 1::

      log 1/L sum_l p(x, z_l) / q(z_l|x)

* ``stl`` -- ``mc``'s estimate with the path-derivative ("sticking the landing") gradient for
  the guide (:mod:`.trace_elbo`); ``iwae-dreg`` -- ``iwae``'s bound with the doubly
  reparameterized gradient (:mod:`.dreg`). Both need a reparameterized guide.

* ``rws`` -- reweighted wake-sleep (:mod:`.rws`): the IWAE bound for the model, a
  self-normalized estimate of the inclusive KL's gradient for the guide (any guide);
  ``tracegraph`` -- :class:`~pyro.infer.TraceGraph_ELBO` (:mod:`.trace_elbo`): ``mc`` with
  Rao-Blackwellized score terms and the baselines guide sites declare.

* ``enum`` -- :class:`~pyro.infer.TraceEnum_ELBO`: discrete latents that the guide (or the
  model) marks for enumeration (``config_enumerate``, ``infer={"enumerate": "parallel"}``)
  are summed out exactly; the rest as ``mc``::

      sum_y q(y|x) E_q(z|x,y)[log p(x, y, z) - log q(y|x) - log q(z|x,y)]

The particles are vectorized (one batched pass, a plate left of the model's plates) when
L > 1 and the model broadcasts over that dimension, else drawn one after another.

``Trace_ELBO``, ``TraceMeanField_ELBO`` and ``TraceEnum_ELBO`` here are Pyro's with a
host-free ``differentiable_loss`` (no GPU sync; traceable, :mod:`.compiled`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from unittest.mock import patch

import pyro.distributions as dist
import pyro.infer
import pyro.infer.traceenum_elbo
import torch
from opt_einsum import shared_intermediates
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, JitTrace_ELBO, RenyiELBO
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import MarginalRing
from torch import Tensor
from torch.distributions import kl_divergence

from ..errors import Note, UsageError
from .dreg import IWAE_DReG
from .program import ProgramInfo
from .rws import ReweightedWakeSleep
from .trace_elbo import STL_ELBO, Trace_ELBO, TraceGraph_ELBO, not_reparameterized

ELBOS = ("mc", "analytic", "stl", "iwae", "iwae-dreg", "rws", "enum", "tracegraph")
"""The ``--elbo`` names."""
MAX_PLATE_NESTING = 1  # the data plate (the default; a probe of the program finds the real one)


class TraceMeanField_ELBO(pyro.infer.TraceMeanField_ELBO):
    """Host-free (Pyro's reads the loss once per particle). Per particle::

        -ELBO = -sum_observed log p(x|z) + sum_latent KL(q || p)

    each KL in closed form where ``kl_divergence`` knows it, else ``log q(z) - log p(z)`` at
    the sampled z, as in Pyro, and for a ``Delta`` (whose ``log_density`` Pyro's KL drops); a
    guide's auxiliary site u (an autoguide's) adds ``log q(u)``."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            discrete = not_reparameterized(guide_trace)
            if discrete:  # no score-function term here: Trace_ELBO's estimate instead
                warnings.warn(f"--elbo analytic: the guide's site(s) {', '.join(discrete)} are "
                              "not reparameterized, so this objective uses Trace_ELBO's Monte "
                              "Carlo estimate with score-function gradients (TraceMeanField_ELBO "
                              "would drop them)", Note, stacklevel=2)
                return Trace_ELBO(num_particles=self.num_particles,
                                  max_plate_nesting=self.max_plate_nesting,
                                  vectorize_particles=self.vectorize_particles
                                  ).differentiable_loss(model, guide, *args, **kwargs)
            elbo = 0.0
            for name, q in guide_trace.nodes.items():  # auxiliary guide sites (autoguides'):
                if q["type"] == "sample" and name not in model_trace.nodes:  # - log q, as Pyro
                    elbo = elbo - q["log_prob_sum"]
            for name, site in model_trace.nodes.items():
                if site["type"] == "sample" and site["is_observed"]:
                    elbo = elbo + site["log_prob_sum"]
                elif site["type"] == "sample":
                    q = guide_trace.nodes[name]
                    try:  # (not for a Delta, an autoguide's site: Pyro's KL drops its Jacobian)
                        if isinstance(q["fn"], dist.Delta):
                            raise NotImplementedError
                        kl = kl_divergence(q["fn"], site["fn"])
                        elbo = elbo - scale_and_mask(kl, q["scale"], q["mask"]).sum()
                    except NotImplementedError:
                        elbo = elbo + site["log_prob_sum"] - q["log_prob_sum"]
            loss = loss - elbo / self.num_particles
        return loss


class _HostFreeDice(Dice):
    """Pyro's Dice estimator (Foerster et al. 2018): expected cost ``sum prob * cost`` over
    the enumerated values. Where Pyro drops zero-probability values (``mask.all()`` on the
    host, ``masked_select``) their cost is set to zero: the same sum and gradient, static
    shapes, no host read."""

    def compute_expectation(self, costs):
        with shared_intermediates() as cache:  # as Pyro 1.9's Dice.compute_expectation
            ring = MarginalRing(cache=cache)
            expected_cost = 0.0
            for ordinal, cost_terms in costs.items():
                log_factors = self._get_log_factors(ordinal)
                scale = math.exp(sum(x for x in log_factors if not isinstance(x, Tensor)))
                log_factors = [x for x in log_factors if isinstance(x, Tensor)]
                queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
                for log_factor in log_factors:
                    key = frozenset(log_factor._pyro_dims)
                    if queries.get(key, False) is None:
                        queries[key] = log_factor
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    if queries[key] is None:
                        query = torch.zeros_like(cost)
                        query._pyro_dims = cost._pyro_dims
                        log_factors.append(query)
                        queries[key] = query
                sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
                for query in queries.values():
                    require_backward(query)
                root = ring.sumproduct(log_factors, sum_dims)
                root._pyro_backward()
                probs = {key: query._pyro_backward_result.exp()
                         for key, query in queries.items()}
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    prob = probs[key]
                    prob._pyro_dims = queries[key]._pyro_dims
                    cost, prob = packed.broadcast_all(cost, prob)
                    cost = torch.where(prob > 0, cost, torch.zeros_like(cost))
                    expected_cost = expected_cost + scale * (prob * cost).sum()
        return expected_cost


class TraceEnum_ELBO(pyro.infer.TraceEnum_ELBO):
    """Host-free; Pyro's reads the host twice per step: Dice's ``mask.all()`` (see
    :class:`_HostFreeDice`) and ``warn_if_nan`` on the loss and, by a hook, its gradient (the
    loop's divergence guard watches the loss on the device, and names the non-finite site)."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        elbo = 0.0
        # Pyro's _compute_dice_elbo with _HostFreeDice (it looks Dice up in its module)
        with patch.object(pyro.infer.traceenum_elbo, "Dice", _HostFreeDice):
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                elbo = elbo + pyro.infer.traceenum_elbo._compute_dice_elbo(model_trace,
                                                                           guide_trace)
        if not torch.is_tensor(elbo) or not elbo.requires_grad:
            raise ValueError(f"ELBO is cannot be differentiated: {elbo}")
        return -elbo / self.num_particles


class JitTraceMeanField_ELBO(pyro.infer.JitTraceMeanField_ELBO):
    """Pyro 1.9.2's class tests ``_loss_and_surrogate_loss`` for a compiled function but
    caches it as ``_differentiable_loss``, so it compiles again on every step (3-4x slower
    than no JIT). This one reuses the compiled function."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        compiled = self.__dict__.get("_differentiable_loss")
        if compiled is None:
            return super().differentiable_loss(model, guide, *args, **kwargs)
        return compiled(*args, _pyro_model_id=id(model), _pyro_guide_id=id(guide), **kwargs)


def unsuited(name: str, info: ProgramInfo, programs: int = 1) -> str | None:
    """Why ``--elbo name`` cannot train the program ``info`` describes (an objective summing
    ``programs`` model/guide pairs), in a few words; None if it can."""
    score = ", ".join(sorted(info.score_sites))
    if name in ("stl", "iwae-dreg") and score:
        return f"the guide's site(s) {score} are not reparameterized, which {name} needs"
    if name in ("iwae-dreg", "rws") and not info.vectorized:
        return (f"{name} weighs vectorized particles, and this model cannot take a samples "
                f"dimension ({info.not_vectorized_because})")
    if name == "analytic" and info.model_only:
        return (f"the model samples {', '.join(sorted(info.model_only))}, which the guide does "
                "not, and analytic pairs every latent site of the model with the guide's")
    if name == "tracegraph" and info.model_only_score:
        return (f"the model samples {', '.join(sorted(info.model_only_score))} (not "
                "reparameterized), which the guide does not, and tracegraph needs the guide's "
                "site for a score-function term")
    if name == "iwae" and programs > 1:
        return (f"iwae (RenyiELBO) trains one model/guide pair, and this objective sums "
                f"{programs}")
    return None


def redundant(name: str, info: ProgramInfo) -> str | None:
    """Why ``--elbo name`` is ``mc`` on the program ``info`` describes (``analytic`` also
    where it falls back to ``mc``: a score-function site); None if it is not."""
    if name == "analytic" and (info.score_sites or not info.closed_kl):
        return "no reparameterized site's KL has a closed form"
    if name == "tracegraph" and not info.score_sites:
        return "every guide site is reparameterized"
    if name == "enum" and not info.enumerated:
        return "no site is marked for enumeration"
    return None


def suited(info: ProgramInfo, refused: Iterable[str] = (), programs: int = 1
           ) -> tuple[str, ...]:
    """The ``--elbo`` names that train the program ``info`` describes and are not ``mc`` in
    disguise, less ``refused`` (those a family's ``estimators`` refuse), in the order of
    :data:`ELBOS`."""
    refused = set(refused)
    return tuple(e for e in ELBOS if e not in refused and unsuited(e, info, programs) is None
                 and (e == "mc" or redundant(e, info) is None))


def make_elbo(name: str, particles: int = 1, jit: bool = False,
              max_plate_nesting: int = MAX_PLATE_NESTING, vectorize: bool = True) -> ELBO:
    """The Pyro ELBO for ``--elbo name`` with ``particles`` samples per data point, for a
    program with ``max_plate_nesting`` plates; ``vectorize=False`` draws them one by one."""
    kw = dict(num_particles=particles, vectorize_particles=vectorize and particles > 1,
              max_plate_nesting=max_plate_nesting)
    jitted = {"mc": JitTrace_ELBO, "analytic": JitTraceMeanField_ELBO}  # Pyro's only Jit ones
    if jit and name not in jitted:
        raise UsageError(f"--jit with --elbo {name} is not supported here; drop --jit")
    if name in ("rws", "iwae-dreg"):  # (they refuse unvectorized particles, even K = 1)
        cls = ReweightedWakeSleep if name == "rws" else IWAE_DReG
        return cls(**{**kw, "vectorize_particles": vectorize})
    if name == "iwae":
        with warnings.catch_warnings():  # RenyiELBO warns that alpha=0 is the IWAE bound
            warnings.simplefilter("ignore")
            return RenyiELBO(alpha=0.0, **kw)
    classes = {"mc": Trace_ELBO, "analytic": TraceMeanField_ELBO, "enum": TraceEnum_ELBO,
               "stl": STL_ELBO, "tracegraph": TraceGraph_ELBO}
    if name not in classes:
        raise UsageError(f"unknown --elbo {name!r}; use {', '.join(ELBOS)}")
    if jit:  # torch marks torch.jit.trace deprecated; the Jit ELBOs still work on it
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.*deprecated",
                                category=FutureWarning)  # idempotent: no duplicate filters
        return jitted[name](ignore_jit_warnings=True, **kw)
    return classes[name](**kw)
