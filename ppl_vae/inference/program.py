"""What a model/guide pair is, found by running it once (:class:`ProgramInfo`):
``max_plate_nesting`` (the deepest plate), ``data_plate`` (the plate of the observed site
with one entry per row: latents inside are *local*, the others *global*), ``vectorized``
(whether it broadcasts over a particle plate left of its plates, with the error if not),
and ``registered`` (tensors the program puts in Pyro's param store itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape
from torch import Tensor

from ..errors import PluginError, UsageError, explain, first_line


@dataclass(frozen=True)
class ProgramInfo:
    max_plate_nesting: int
    data_plate: str | None
    global_sites: frozenset[str]
    vectorized: bool
    not_vectorized_because: str
    registered: frozenset[int]
    params: tuple[Tensor, ...]
    auxiliary: frozenset[str] = frozenset()
    score_sites: frozenset[str] = frozenset()
    """latent guide sites without ``rsample`` (their gradient is a score function)"""
    enumerated: frozenset[str] = frozenset()
    """sites marked for enumeration (``infer={"enumerate": ...}``)"""
    closed_kl: frozenset[str] = frozenset()
    """latent sites whose KL(guide || model) torch knows in closed form"""
    model_only: frozenset[str] = frozenset()
    """latent sites the model samples and the guide does not (drawn from their prior, or
    summed out where marked for enumeration)"""
    model_only_score: frozenset[str] = frozenset()
    """those of ``model_only`` without ``rsample``"""
    row_plates: frozenset[str] = frozenset()
    """every plate of an observed site with one entry per row (``data_plate`` the first)"""
    outside: frozenset[str] = frozenset()
    """the sample sites, observed ones too, in none of ``row_plates`` (global terms)"""

    def describe(self, num_samples: int, passes: int = 1) -> str:
        """One line: how ``num_samples`` samples per data point are drawn and scored (in
        ``passes`` passes over the rows)."""
        how = (f"{num_samples:,} samples per data point in one vectorized pass" if
               self.vectorized and passes == 1 else
               f"{num_samples:,} samples per data point, vectorized, in {passes:,} passes over "
               "the rows" if self.vectorized else
               f"{num_samples} samples per data point drawn one after another (the model "
               f"cannot take a samples dimension: {self.not_vectorized_because})")
        if self.data_plate is None:
            how += ("; the model has no plate over the data points, so every bound is joint "
                    "over the whole set (all rows in one pass), reported per point")
        elif self.global_sites:
            shown = sorted(self.global_sites - self.auxiliary) or sorted(self.global_sites)
            how += (f"; global latents {', '.join(shown)} are shared by "
                    "all data points, so the IWAE bound is joint over the test set")
        return how


def _sample_sites(trace) -> list[dict]:
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]


def plate_frames(site: dict) -> list:
    """The site's vectorized plates (those with a dim)."""
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]


class ProgramError(PluginError):
    """A model's or guide's own exception on its first run: one headline naming the call, the
    frames in the user's files and Pyro's trace shapes so far."""


def _run_first(model: Callable, guide: Callable, args: tuple) -> tuple:
    """The guide's and the replayed model's traces with every log-density computed; what
    they raise becomes a :class:`ProgramError`."""
    guide_tracer, model_tracer, fn = poutine.trace(), poutine.trace(), guide
    try:
        with guide_tracer:
            guide(*args)
        fn = model
        with model_tracer:
            poutine.replay(model, trace=guide_tracer.trace)(*args)
    except UsageError:
        raise
    except Exception as e:
        raise ProgramError(_explain(e, fn, args, (guide_tracer, model_tracer))) from None
    for fn, tracer in ((guide, guide_tracer), (model, model_tracer)):
        for site in _sample_sites(tracer.trace):
            try:  # (its shape: see _check_pair)
                site["log_prob"] = scale_and_mask(site["fn"].log_prob(site["value"]),
                                                  site["scale"], site["mask"])
            except Exception as e:
                raise ProgramError(_explain(e, fn, args, (guide_tracer, model_tracer),
                                            f"the log-density of site {site['name']!r}")
                                   ) from None
    return guide_tracer.trace, model_tracer.trace


def _check_pair(guide_trace, model_trace, nesting: int) -> None:
    """Refuse what Pyro's validation would (a run trains with it off): a guide site that is
    observed, or latent and neither the model's nor marked auxiliary, and a log-density
    whose shape its plates do not explain (a plate missing, or sized other than the rows)."""
    for s in _sample_sites(guide_trace):
        if s["infer"].get("is_auxiliary") or s["infer"].get("_deterministic"):
            continue
        if s["is_observed"]:
            raise UsageError(f"the guide observes site {s['name']!r} (obs=...), which would "
                             "count as a latent's density; a guide draws latents: drop it there")
        if s["name"] not in model_trace.nodes:
            unmatched = [m["name"] for m in _sample_sites(model_trace)
                         if not m["is_observed"] and m["name"] not in guide_trace.nodes]
            raise UsageError(f"the guide samples {s['name']!r}, which the model does not" + (
                f" (the model's {unmatched[0]!r} has no guide site)" if unmatched else "") +
                "; name it as the model's site, or mark it infer={'is_auxiliary': True}")
    for who, trace in (("guide", guide_trace), ("model", model_trace)):
        for s in _sample_sites(trace):
            try:
                check_site_shape(s, nesting)
            except ValueError as e:
                what = ", ".join(line.strip() for line in str(e).splitlines()[:2])
                raise UsageError(f"the {who} {what}: its plates do not explain the shape of its "
                                 "log-density; put it in the plate over the rows (of size "
                                 "x.shape[0]), or .to_event(...) its event dims") from None


def _explain(e: Exception, fn: Callable, args: tuple, tracers: tuple, what: str = "") -> str:
    owner = getattr(fn, "__self__", None)
    name = f"{type(owner).__name__}.{fn.__name__}" if owner is not None else \
        getattr(fn, "__qualname__", repr(fn))
    lines = [explain(e, name, args, what)]
    for tracer in tracers:
        trace = getattr(tracer, "trace", None)
        if trace is not None and any(s["type"] == "sample" for s in trace.nodes.values()):
            with contextlib.suppress(Exception):  # (a table is a help, not a must)
                lines.append(trace.format_shapes())
    return "\n".join(lines)


@torch.no_grad()
def inspect_program(model: Callable, guide: Callable, *args: Tensor) -> ProgramInfo:
    """Run ``guide`` and ``model`` (replayed) once on ``args`` (two or more rows, so the data
    plate can be told apart), then once more with a samples plate. What the user's
    program raises on that first run is a :class:`ProgramError`."""
    with poutine.trace(param_only=True) as params:
        guide_trace, model_trace = _run_first(model, guide, args)
    sites = _sample_sites(guide_trace) + _sample_sites(model_trace)
    rows = args[0].shape[0] if args and torch.is_tensor(args[0]) and args[0].dim() else 1
    for s in [*guide_trace.nodes.values(), *model_trace.nodes.values()]:
        if site_is_subsample(s) and s["fn"].subsample_size is not None and s["fn"].size == rows:
            raise UsageError(f"the program's plate {s['name']!r} over the data points "
                             f"subsamples them (subsample_size); ppl_vae batches the data "
                             "itself (--batch-size) and scores every row: drop subsample_size")
        if site_is_subsample(s) and len(s["value"]) == rows != s["fn"].size:  # (replayed)
            raise UsageError(f"the program's plate {s['name']!r} has size {s['fn'].size} but "
                             f"holds the batch's {rows} rows, which Pyro would scale by "
                             f"{s['fn'].size}/{rows}: give it size x.shape[0]")
    nesting = max([-f.dim for s in sites for f in plate_frames(s)], default=0)
    _check_pair(guide_trace, model_trace, nesting)
    row_plates = [f.name for s in _sample_sites(model_trace) if s["is_observed"]
                  for f in plate_frames(s) if len(s["fn"].batch_shape) >= -f.dim
                  and s["fn"].batch_shape[f.dim] == rows]
    data_plate = next(iter(row_plates), None)
    local = {s["name"] for s in sites if any(f.name in row_plates for f in plate_frames(s))}
    outside = {s["name"] for s in sites} - local if data_plate is not None else set()
    latent = {s["name"] for s in sites if not s["is_observed"]}
    values = [s["value"] for s in params.trace.nodes.values()]
    unconstrained = tuple(getattr(v, "unconstrained", lambda v=v: v)() for v in values)
    vectorized, why = _try_vectorized(model, guide, nesting, args)
    auxiliary = {s["name"] for s in sites if s["infer"].get("is_auxiliary")}
    guided = [s for s in _sample_sites(guide_trace) if not s["is_observed"]]
    score = {s["name"] for s in guided if not s["fn"].has_rsample}
    enumerated = {s["name"] for s in sites if s["infer"].get("enumerate")}
    closed = {s["name"] for s in guided if s["name"] in model_trace.nodes
              and _has_closed_kl(s["fn"], model_trace.nodes[s["name"]]["fn"])}
    in_model = [s for s in _sample_sites(model_trace) if not s["is_observed"]
                and s["name"] not in guide_trace.nodes]
    return ProgramInfo(nesting, data_plate, frozenset(latent - local), vectorized, why,
                       frozenset(id(t) for t in unconstrained), unconstrained,
                       frozenset(auxiliary), frozenset(score), frozenset(enumerated),
                       frozenset(closed), frozenset(s["name"] for s in in_model),
                       frozenset(s["name"] for s in in_model if not s["fn"].has_rsample),
                       frozenset(row_plates), frozenset(outside))


def inspect_objective(terms: Sequence[tuple[float, Callable, Callable]], *args: Tensor
                      ) -> ProgramInfo:
    """:func:`inspect_program` of every (weight, model, guide) term of an objective on the
    same ``args``, merged: the deepest plates, vectorized only if every term is, the union of
    the sites and parameters found (creating those a guide makes lazily, e.g. an autoguide's)."""
    infos = [inspect_program(m, g, *args) for _, m, g in terms]
    return replace(infos[0], max_plate_nesting=max(i.max_plate_nesting for i in infos),
                   vectorized=all(i.vectorized for i in infos),
                   params=tuple({id(p): p for i in infos for p in i.params}.values()),
                   **{f: frozenset().union(*(getattr(i, f) for i in infos)) for f in (
                       "registered", "score_sites", "enumerated", "closed_kl", "model_only",
                       "row_plates", "outside",
                       "model_only_score")})


def _has_closed_kl(q, p) -> bool:
    """Whether torch has KL(q || p) in closed form; not for a ``Delta`` (an autoguide's
    constrained site), whose KL Pyro takes as ``-log p(v)``, dropping its ``log_density``."""
    if isinstance(q, pyro.distributions.Delta):
        return False
    try:
        torch.distributions.kl_divergence(q, p)
    except Exception:  # no closed form (NotImplementedError), or shapes that do not pair
        return False
    return True


PROBE_PARTICLES = 3  # not 2: a model that folds the samples into the rows (2) shows it


def _try_vectorized(model: Callable, guide: Callable, nesting: int, args: tuple
                    ) -> tuple[bool, str]:
    """Run both programs under a samples plate; every log-density must then carry that
    plate's dim (or broadcast over it), and some must carry it in full."""
    k = PROBE_PARTICLES
    try:
        with pyro.plate("_probe_particles", k, dim=-(nesting + 1)):
            guide_trace = poutine.trace(guide).get_trace(*args)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        baselined = [s["name"] for s in _sample_sites(guide_trace)
                     if s["infer"].get("baseline", {}).get("nn_baseline") is not None]
        if baselined:  # (Pyro's TraceGraph_ELBO calls it on the rows, without the samples)
            return False, f"site {baselined[0]!r} has an nn_baseline"
        seen = False
        for trace in (guide_trace, model_trace):
            trace.compute_log_prob()
            for site in _sample_sites(trace):
                lp = site["log_prob"]
                full = lp.dim() == nesting + 1
                if lp.dim() > nesting + 1 or (full and lp.shape[0] not in (1, k)):
                    return False, (f"site {site['name']!r} has log-probability shape "
                                   f"{tuple(lp.shape)}")
                seen = seen or (full and lp.shape[0] == k)
        if not seen:
            return False, "no site's log-probability has the samples dimension"
    except Exception as e:  # anything the user's program raises on a samples dimension
        return False, f"{type(e).__name__}: {first_line(e, 200)}"[:200]
    return True, ""


@torch.no_grad()
def nonfinite_site(model: Callable, guide: Callable, *args: Tensor) -> str | None:
    """The first site, in the order the guide then the model run, whose sample, log-density
    or KL divergence (guide to prior) is not finite on ``args``; None if every one is."""
    with pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        for trace, density in ((guide_trace, "log q"), (model_trace, "log p")):
            for site in _sample_sites(trace):
                name, value = site["name"], site["value"]
                if torch.is_tensor(value) and value.is_floating_point() \
                        and not torch.isfinite(value).all():
                    return f"site {name!r}: its {'value' if site['is_observed'] else 'sample'}"
                try:
                    lp = site["fn"].log_prob(value)
                except Exception as e:  # a distribution whose parameters went non-finite
                    return f"site {name!r}: {density} fails ({type(e).__name__})"
                if not torch.isfinite(lp).all():
                    return f"site {name!r}: {density}"
                other = guide_trace.nodes.get(name) if trace is model_trace else None
                if other is not None and not site["is_observed"]:
                    try:
                        kl = torch.distributions.kl_divergence(other["fn"], site["fn"])
                    except NotImplementedError:
                        continue
                    if not torch.isfinite(kl).all():
                        return f"site {name!r}: KL(q || p)"
    return None
