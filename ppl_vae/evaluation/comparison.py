"""ELBO estimators side by side on one model: the bound, its gradient, and training with it.

For a fixed evaluation batch of B data points:

* **Bound estimates.** R estimates of the per-point bound -loss / B for ``mc``
  (Trace_ELBO) and ``analytic`` (TraceMeanField_ELBO) at each particle count L and for IWAE
  (RenyiELBO, alpha = 0) at each K: mean, sd, se = sd / sqrt(R), ms per estimate. ``mc`` and
  ``analytic`` *agree* when their means differ by less than 4 combined standard errors.
* **Gradient quality.** R SVI gradient draws per estimator and L, per parameter group (the
  top-level children): total variance sum_j Var(g_j), mean norm E||g|| and SNR
  |E g_j| / sd(g_j) averaged over j (Rainforth et al. 2018), from float64 sums of g and g^2;
  a group with an exact gradient has variance 0 and no SNR.
* **SNR against K** (``snr_k``, off by default). The gradient SNR per group for ``iwae`` and
  ``iwae-dreg`` at each K, and the slope of log SNR on log K by least squares. Rainforth et
  al. (2018): about -1/2 for IWAE's inference network, +1/2 for its generative network;
  DReG's inference network keeps a slope >= 0.
* **Training race.** ``mc``, ``analytic`` (one particle) and IWAE (K = the largest count)
  train copies of the same weights on the same batches; test ELBO per epoch and second, and
  the time to a target test ELBO.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyro
import torch
from torch import Tensor, nn
from tqdm import tqdm  # text bars everywhere (tqdm.auto wants ipywidgets in Jupyter)

from .. import resources
from ..config import MOST_SAMPLES, TrainConfig, check_fields, flag, option
from ..errors import UsageError
from ..files import markdown_table, write_csv, write_json, write_text
from ..inference.estimators import ELBOS, suited, unsuited
from ..inference.program import ProgramInfo
from ..inference.svi import Step, hide_bar
from ..models import hook
from ..run.loop import Loop
from ..run.rundir import RunDir
from ..run.session import Session, elbo_for

ESTIMATORS = ("mc", "analytic")
SNR_ESTIMATORS = ("iwae", "iwae-dreg")  # (at K = 1 too: there they are mc and stl)
WEIGHERS = ("iwae-dreg", "rws")  # estimators that weigh K >= 2 particles against each other


@dataclass
class CompareConfig:
    """What ``python -m ppl_vae compare`` measures (model and data options: ``train``); its
    command line is built from these fields."""

    train: TrainConfig = field(default_factory=TrainConfig)
    particles: tuple[int, ...] = option((1, 10), "particle counts of the estimators to compare "
                                        "(the largest is also the K of the race's IWAE racer)",
                                        group="inference", least=1, most=MOST_SAMPLES)
    run: str | None = option(None, "start from this training run's checkpoint (default: a "
                             "fresh model)", type=str, aliases=("--run-dir",))
    warmup_epochs: int = option(0, "without --run: pre-train the model (its pretrain hook) and "
                                "train this many epochs (the model's own estimator) before "
                                "measuring", least=0)
    repeats: int = option(200, "repeated estimates and gradient draws", least=2,
                          most=MOST_SAMPLES)
    iwae_samples: tuple[int, ...] = option((1, 10, 100), "K of the IWAE bound estimates", least=1,
                                            most=MOST_SAMPLES)
    eval_batch: int = option(128, "test images in the fixed evaluation batch", least=2)
    split: str = option("test", "the split of the fixed batch (train: e.g. M2's unlabelled "
                        "rows)", choices=("test", "train"))
    race: bool = option(True, "the training race", off_help="skip the training race")
    target: float | None = option(None, "test ELBO the race times (default: the worst final "
                                  "one)", type=float)
    snr_k: tuple[int, ...] = option((), "also measure the gradient SNR of iwae and iwae-dreg at "
                                    "these K (e.g. 1 3 10 30 100) and fit its log-log slope per "
                                    "parameter group (snr.png; needs a reparameterized guide)",
                                    type=int, least=1, most=MOST_SAMPLES)
    estimators: tuple[str, ...] = option((), "the estimators whose bounds, gradients and race "
                                         "are compared (any --elbo name; iwae-dreg and rws at "
                                         "the --particles >= 2; default: every one that fits "
                                         "the model)", type=str, metavar="ELBO", choices=ELBOS)

    def __post_init__(self) -> None:
        check_fields(self, skip=("train",))
        if not self.particles or not self.iwae_samples:
            raise UsageError("--particles and --iwae-samples take one or more counts")
        for name in ("particles", "iwae_samples", "snr_k", "estimators"):
            values = list(getattr(self, name))
            if len(set(values)) < len(values):
                raise UsageError(f"{flag(name)} lists each value once, got {values}")
        if len(self.snr_k) == 1:
            raise UsageError(f"--snr-k takes two or more different counts, got "
                             f"{list(self.snr_k)}")
        if self.target is not None and not math.isfinite(self.target):
            raise UsageError(f"--target must be a finite ELBO in nats, got {self.target}")


@dataclass
class Comparison:
    """Every number of a comparison, as written to ``results.json`` (all but ``out``)."""

    out: Path
    meta: dict
    bounds: list[dict]
    agreement: list[dict]
    gradients: list[dict]
    race: list[dict]
    race_summary: list[dict]
    snr: list[dict] = field(default_factory=list)
    snr_slopes: list[dict] = field(default_factory=list)


def applicable(estimators: tuple[str, ...], particles: tuple[int, ...]
               ) -> list[tuple[str, int]]:
    """(estimator, L) pairs, those weighing particles (``iwae-dreg``, ``rws``) at L >= 2."""
    return [(e, k) for e in estimators for k in particles if k >= 2 or e not in WEIGHERS]


def bound_estimates(module: nn.Module, args: tuple[Tensor, ...], repeats: int,
                    particles: tuple[int, ...], iwae_samples: tuple[int, ...],
                    progress: bool | None = None, info: ProgramInfo | None = None,
                    estimators: tuple[str, ...] = ESTIMATORS) -> list[dict]:
    """R estimates of the per-data-point bound (the value each estimator reports: the ELBO,
    or the IWAE bound for ``iwae-dreg`` and ``rws``) for every estimator and sample count,
    with the model's guide; IWAE's at each of ``iwae_samples``."""
    model, guide = module.model, module.guide
    b = args[0].shape[0]
    configs = applicable(tuple(e for e in estimators if e != "iwae"), particles)
    configs += [("iwae", k) for k in iwae_samples]
    rows = []
    for name, k in tqdm(configs, desc="bounds", disable=hide_bar(progress)):
        elbo = elbo_for(name, k, info)
        values = torch.empty(repeats, dtype=torch.float64)
        with torch.no_grad():
            elbo.loss(model, guide, *args)  # warm-up, not timed
            start = time.perf_counter()
            for r in range(repeats):
                values[r] = -elbo.loss(model, guide, *args) / b
            seconds = time.perf_counter() - start
        sd = values.std().item()
        rows.append({"estimator": name, "particles": k, "mean": values.mean().item(), "sd": sd,
                     "se": sd / math.sqrt(repeats), "ms_per_estimate": 1e3 * seconds / repeats,
                     "values": values.tolist()})
    return rows


def agreement(bounds: list[dict]) -> list[dict]:
    """For each particle count: do ``mc`` and ``analytic`` agree within 4 standard errors?"""
    by = {(r["estimator"], r["particles"]): r for r in bounds}
    out = []
    for (name, k), mc in by.items():
        if name == "mc" and (an := by.get(("analytic", k))):
            diff, se = mc["mean"] - an["mean"], math.hypot(mc["se"], an["se"])
            out.append({"particles": k, "difference": diff, "combined_se": se,
                        "agree": abs(diff) < 4 * se})
    return out


def gradient_stats(module: nn.Module, args: tuple[Tensor, ...], repeats: int,
                   particles: tuple[int, ...], progress: bool | None = None,
                   info: ProgramInfo | None = None,
                   groups: dict[str, list[nn.Parameter]] | None = None,
                   estimators: tuple[str, ...] = ESTIMATORS,
                   pairs: list[tuple[str, int]] | None = None) -> list[dict]:
    """Variance, mean norm and SNR of R SVI gradient draws, per parameter group (``groups``,
    default :func:`parameter_groups`), for each (estimator, particles) of ``pairs`` (default:
    every one of ``estimators`` at every count)."""
    rows = []
    groups = groups or parameter_groups(module)
    terms = hook(module, "programs")()
    pairs = pairs or [(e, k) for e in estimators for k in particles]
    for name, k in tqdm(pairs, desc="gradients", disable=hide_bar(progress)):
        step = Step.of_elbo(elbo_for(name, k, info), module, terms, info)
        sums: dict[str, list] = {}
        seconds = 0.0
        for r in range(repeats + 1):
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step.gradient(*args)
            if args[0].is_cuda:
                torch.cuda.synchronize(args[0].device)
            if r == 0:
                continue  # warm-up, not counted
            seconds += time.perf_counter() - start
            for group, params in groups.items():
                grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
                if not grads:  # (a group without a gradient is left out)
                    continue
                g = torch.cat(grads).double()
                acc = sums.setdefault(group, [0.0, 0.0, 0.0])
                acc[0], acc[1] = acc[0] + g, acc[1] + g * g
                acc[2] += g.norm().item()
        for group, (s1, s2, norms) in sums.items():
            mean = s1 / repeats
            var = ((s2 - s1 * mean) / (repeats - 1)).clamp_min(0)
            sd = var.sqrt()
            live = sd > 0
            # SNR over the coordinates that vary; None when none does (an exact gradient)
            snr = (mean.abs()[live] / sd[live]).mean().item() if live.any() else None
            rows.append({"estimator": name, "particles": k, "group": group,
                         "total_variance": var.sum().item(), "mean_norm": norms / repeats,
                         "snr": snr, "ms_per_step": 1e3 * seconds / repeats})
    module.zero_grad(set_to_none=True)
    return rows


def snr_slopes(rows: list[dict]) -> list[dict]:
    """Per estimator and group, the least-squares slope of log SNR on log K (and its
    intercept): SNR ~ exp(intercept) K^slope."""
    out = []
    for e, g in sorted({(r["estimator"], r["group"]) for r in rows}):
        pts = [(math.log(r["particles"]), math.log(r["snr"])) for r in rows
               if (r["estimator"], r["group"]) == (e, g) and r["snr"]]
        if len(pts) < 2:
            continue
        slope, intercept = np.polyfit(*zip(*pts, strict=True), 1).tolist()
        out.append({"estimator": e, "group": g, "slope": slope, "intercept": intercept,
                    "points": len(pts)})
    return out


def parameter_groups(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The gradient groups of the comparison: the module's top-level child modules, and its
    own parameters as ``(module)``."""
    groups = {name: list(child.parameters()) for name, child in module.named_children()}
    own = list(module.parameters(recurse=False))
    return {k: v for k, v in {**groups, "(module)": own}.items() if v}


def variance_ratios(gradients: list[dict]) -> list[dict]:
    """Total gradient variance of ``mc`` over ``analytic``, per group and particle count."""
    by = {(r["estimator"], r["particles"], r["group"]): r for r in gradients}
    return [{"particles": k, "group": g,
             "variance_ratio_mc_over_analytic":
                 r["total_variance"] / by[("analytic", k, g)]["total_variance"]
                 if by[("analytic", k, g)]["total_variance"] > 0 else None}  # analytic: exact
            for (e, k, g), r in by.items() if e == "mc" and ("analytic", k, g) in by]


def training_race(session: Session, racers: list[tuple[str, int]], target: float | None
                  ) -> tuple[list[dict], list[dict]]:
    """Train a copy of the session's model per (estimator, particles) on the same batches;
    return the per-epoch rows and a summary with final test ELBO and time to ``target``. Each
    racer's ``on_epoch`` hook runs as in training."""
    config, module = session.config, session.module
    start_state = copy.deepcopy(module.state_dict())
    rows: list[dict] = []
    for name, k in racers:
        racer = copy.deepcopy(module)
        racer.load_state_dict(start_state)
        pyro.set_rng_seed(config.seed)
        step = session.svi_step(name, k, module=racer)
        elapsed = [0.0]

        def on_epoch(epoch: int, loss: float, seconds: float, val, name=name, k=k,
                     racer=racer, elapsed=elapsed) -> None:
            elapsed[0] += seconds
            test = session.score(session.data.test, config.eval_particles, module=racer)
            rows.append({"estimator": name, "particles": k, "epoch": epoch,
                         "train_objective": -loss, "test_elbo": test.elbo.mean().item(),
                         "seconds": elapsed[0]})
            session.on_epoch(epoch, racer)

        session.on_epoch(0, racer)
        Loop(session, step, module=racer,
             inputs=lambda g, racer=racer: session.train_args(g, module=racer),
             on_epoch=on_epoch, desc=f"race {name} x{k}").run()
    finals = {(r["estimator"], r["particles"]): r for r in rows if r["epoch"] == config.epochs}
    goal = target if target is not None else min(r["test_elbo"] for r in finals.values())
    summary = []
    for (name, k), last in finals.items():
        reached = [r for r in rows if (r["estimator"], r["particles"]) == (name, k)
                   and r["test_elbo"] >= goal]
        summary.append({"estimator": name, "particles": k, "final_test_elbo": last["test_elbo"],
                        "train_seconds": last["seconds"], "target": goal,
                        "seconds_to_target": reached[0]["seconds"] if reached else None,
                        "epochs_to_target": reached[0]["epoch"] if reached else None})
    return rows, summary


def chosen(cc: CompareConfig, session: Session) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The estimators compared (the user's, or every one that fits the model and its family
    allows) and those of the SNR-against-K experiment; a choice the family refuses, or an
    SNR experiment no estimator fits, is refused in one line."""
    refused = session.estimators("refuse")
    fits = suited(session.info, refused, len(session.terms))
    for e in cc.estimators:
        why = refused.get(e) or unsuited(e, session.info, len(session.terms))
        if why is None and e in WEIGHERS and max(cc.particles) < 2:
            why = (f"{e} weighs K >= 2 particles against each other, and --particles "
                   f"{' '.join(map(str, cc.particles))} has no such count")
        if why:
            raise UsageError(f"--estimators {e}: {why} (those that fit this model: "
                             f"{', '.join(fits)})")
    snr = tuple(e for e in SNR_ESTIMATORS if e in fits)
    if cc.snr_k and not snr:
        raise UsageError(f"--snr-k measures {' and '.join(SNR_ESTIMATORS)}, and neither fits "
                         "this model (its guide is not reparameterized or its particles do "
                         "not vectorize); drop --snr-k")
    return cc.estimators or fits, snr


RACE_SETTINGS = ("lr", "beta1", "epochs", "batch_size", "seed", "eval_particles", "overwrite")
"""What a comparison of a saved ``--run`` takes from its own options (given ones: the race's
learning rate and epochs default to the run's)."""


def _same_as_run(run: str, given: TrainConfig, recorded: TrainConfig) -> None:
    """Refuse an option given with ``--run`` (other than the race's, not its default) that
    contradicts the run's own: the comparison measures the run's model on its data."""
    mine, theirs, default = given.to_dict(), recorded.to_dict(), TrainConfig().to_dict()
    free = (*RACE_SETTINGS, "data_dir", "cuda", "threads", "out", "download", "model_options")
    clash = [(k, v, theirs.get(k)) for k, v in mine.items()
             if k not in free and v != default.get(k) and v != theirs.get(k)]
    clash += [(k, v, theirs["model_options"].get(k)) for k, v in mine["model_options"].items()
              if v != theirs["model_options"].get(k)]
    if clash:
        key, value, own = clash[0]
        flag = "--" + key.replace("_", "-")
        raise UsageError(f"--run {run!r} compares that run's model, and {flag} {value!r} "
                         f"contradicts its {own!r}; drop {flag}, or compare a fresh model "
                         "without --run")


def compare(cc: CompareConfig, out: str | None = None, progress: bool | None = None
            ) -> Comparison:
    """Run the whole comparison and write ``results.json``, CSV tables, ``summary.md`` and
    figures into ``out`` (default ``runs/compare-<model>-<time>``). One process: the model
    and the data sit on one device."""
    config = cc.train
    if cc.run is not None:
        if cc.warmup_epochs:
            raise UsageError("--warmup-epochs trains a fresh model; a --run is trained already")
        session = Session.from_dir(cc.run, cuda=config.cuda, data_dir=config.data_dir
                                   if config.data_dir != TrainConfig().data_dir else None)
        _same_as_run(cc.run, config, session.config)
        session.config = replace(session.config, **{
            k: getattr(config, k) for k in RACE_SETTINGS if getattr(config, k) is not None})
    else:
        session = Session(config, progress=progress)
    session.progress = progress
    config, module, info = session.config, session.module, session.info
    eager = session.config = replace(config, jit=False)  # (its SVI steps are never jit-compiled)
    with RunDir.open(out, f"compare-{config.model}", overwrite=config.overwrite) as rundir, \
            session.validation():
        out_dir = session.ctx.out = rundir.path
        estimators, snr_estimators = chosen(cc, session)  # (refused before any training)
        args = session.args(getattr(session.data, cc.split), slice(0, cc.eval_batch))
        resources.check_step_fits(  # the most samples any measurement draws at once
            lambda k: session.svi_step("mc", k, optimizer=False).gradient,
            tuple(a[:2] for a in args), len(args[0]),
            max((*cc.particles, *cc.iwae_samples, *cc.snr_k)), session.device,
            hint="lower --particles, --iwae-samples, --snr-k or --eval-batch")
        if cc.warmup_epochs:  # (not with --run); pre-training too runs for the warm-up
            session.config = session.ctx.config = replace(eager, epochs=cc.warmup_epochs)
            hook(module, "pretrain")(session.ctx)
            step = session.svi_step(config.elbo)
            session.on_epoch(0)
            Loop(session, step, on_epoch=lambda epoch, *_: session.on_epoch(epoch),
                 desc="warm-up").run()
            session.config, session.ctx.config = eager, config
        module.eval()
        pyro.set_rng_seed(config.seed)
        bounds = bound_estimates(module, args, cc.repeats, cc.particles, cc.iwae_samples,
                                 progress, info, estimators)
        gradients = gradient_stats(module, args, cc.repeats, cc.particles, progress, info,
                                   pairs=applicable(estimators, cc.particles))
        snr = gradient_stats(module, args, cc.repeats, cc.snr_k, progress, info,
                             estimators=snr_estimators) if cc.snr_k else []
        race_rows, race_summary = [], []
        if cc.race:
            most = max(cc.particles)  # the weighers race with the most particles, the rest 1
            racers = [(e, 1) for e in estimators if e not in ("iwae", *WEIGHERS)]
            racers += [(e, most) for e in estimators if e in WEIGHERS and most > 1]
            if most > 1 and len(session.terms) == 1:
                racers.append(("iwae", most))  # IWAE trains one program
            race_rows, race_summary = training_race(session, racers, cc.target)
        meta = {"config": config.to_dict(), "run": cc.run, "warmup_epochs": cc.warmup_epochs,
                "estimators": list(estimators), "repeats": cc.repeats,
                "eval_batch": args[0].shape[0], "split": cc.split, "dataset": session.data.name,
                "device": str(session.data.test.x.device), "torch": torch.__version__,
                "pyro": pyro.__version__,
                "samples": "one vectorized pass" if info.vectorized else
                           f"one after another ({info.not_vectorized_because})"}
        result = Comparison(out_dir, meta, bounds, agreement(bounds), gradients, race_rows,
                            race_summary, snr, snr_slopes(snr))
        write_outputs(result)
    return replace(result, out=rundir.final)


def summary_markdown(c: Comparison) -> str:
    """The tables a reader wants first, in Markdown."""
    lines = [f"## Bound estimates (nats per data point, R = {c.meta['repeats']}, "
             f"{c.meta['eval_batch']} {c.meta.get('split', 'test')} rows)", "",
             *markdown_table(["estimator", "samples", "mean", "sd", "se", "ms / estimate"],
                             [[r["estimator"], r["particles"], f"{r['mean']:.3f}",
                               f"{r['sd']:.3f}", f"{r['se']:.3f}", f"{r['ms_per_estimate']:.2f}"]
                              for r in c.bounds])]
    if c.agreement:
        lines += ["", "mc vs analytic: " + "; ".join(
            f"L={a['particles']}: difference {a['difference']:+.3f} ± {a['combined_se']:.3f} "
            "(se), " + ("agree" if a["agree"] else "DISAGREE") for a in c.agreement)]
    lines += ["", "## Gradients", "", *markdown_table(
        ["estimator", "L", "group", "total variance", "mean norm", "SNR", "ms / step"],
        [[r["estimator"], r["particles"], r["group"], f"{r['total_variance']:.4g}",
          f"{r['mean_norm']:.4g}", "exact" if r["snr"] is None else f"{r['snr']:.3f}",
          f"{r['ms_per_step']:.2f}"] for r in c.gradients])]
    if ratios := variance_ratios(c.gradients):
        lines += ["", *markdown_table(["L", "group", "variance ratio mc / analytic"], [
            [r["particles"], r["group"], "∞ (analytic exact)" if (v := r[
                "variance_ratio_mc_over_analytic"]) is None else f"{v:.3f}"] for r in ratios])]
    if c.snr_slopes:
        lines += ["", "## Gradient SNR against K (log-log slope)", "", *markdown_table(
            ["estimator", "group", "slope", "points"],
            [[r["estimator"], r["group"], f"{r['slope']:+.3f}", r["points"]]
             for r in c.snr_slopes])]
    if c.race_summary:
        lines += ["", "## Training race", "", *markdown_table(
            ["estimator", "L", "final test ELBO", "train seconds", "seconds to target",
             "epochs to target"],
            [[r["estimator"], r["particles"], f"{r['final_test_elbo']:.2f}",
              f"{r['train_seconds']:.2f}", "-" if r["seconds_to_target"] is None else
              f"{r['seconds_to_target']:.2f}", "-" if r["epochs_to_target"] is None else
              r["epochs_to_target"]] for r in c.race_summary]),
            f"\ntarget: test ELBO {c.race_summary[0]['target']:.2f}"]
    return "\n".join(lines) + "\n"


def write_outputs(c: Comparison) -> None:
    out, ratios = c.out, variance_ratios(c.gradients)
    write_json(out / "results.json", {**{k: v for k, v in asdict(c).items() if k != "out"},
                                      "variance_ratios": ratios})
    write_csv(out / "bounds.csv", [{k: v for k, v in r.items() if k != "values"}
                                   for r in c.bounds])
    write_csv(out / "gradients.csv", c.gradients)
    write_csv(out / "variance_ratios.csv", ratios)
    if c.snr:
        write_csv(out / "snr.csv", c.snr)
        write_csv(out / "snr_slopes.csv", c.snr_slopes)
    if c.race:
        write_csv(out / "race.csv", c.race)
        write_csv(out / "race_summary.csv", c.race_summary)
    write_text(out / "summary.md", summary_markdown(c))
    from .. import plots

    plots.bound_distributions(c.bounds, out / "bounds.png")
    plots.gradient_variance(c.gradients, out / "gradients.png")
    if c.snr_slopes:
        plots.snr_against_k(c.snr, c.snr_slopes, out / "snr.png")
    if c.race:
        plots.race_curves(c.race, out / "race.png")
