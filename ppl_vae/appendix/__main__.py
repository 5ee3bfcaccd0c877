"""``python -m ppl_vae appendix coin|regression|decoder-map|posterior|all --out DIR``."""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import HelpFormatter, Parser, add_options, main_wrapper
from ..config import TrainConfig, check_fields, option
from ..data import load_dataset
from ..errors import UsageError
from ..evaluation.runs import load_run, read_summary
from ..files import markdown_table, write_json, write_text
from ..run.rundir import RunDir
from ..run.train import train_run
from . import amortization, decoder_map, regression
from .beta_bernoulli import coin

PARTS = ("coin", "regression", "decoder-map", "posterior")


@dataclass
class AppendixOptions:
    """The options of ``python -m ppl_vae appendix PART`` (``_run`` adds ``loaded``)."""

    out: str = option(None, "directory for results.json, tables, figures", type=str, required=True)
    heads: int = option(7, "coin: heads")
    tosses: int = option(10, "coin: tosses")
    alpha: float = option(2.0, "coin: Beta prior alpha")
    beta: float = option(3.0, "coin: Beta prior beta")
    rho: float = option(0.95, "regression: correlation of the two features", above=-1, below=1)
    run: list[str] = option(list, "posterior: a trained VAE run (repeat for several); none: "
                            "train a 2-D VAE on digits", type=str, action="append", nargs=None)
    images: int = option(20, "posterior: test images", least=1)
    iwae_samples: int = option(5000, "posterior: importance samples per image for log p(x)",
                               least=1)
    nuts_samples: int = option(1000, "NUTS draws per chain (coin, regression, posterior)", least=10)
    seed: int = option(0, "seed of the data and the samplers", least=0, below=2**32)
    overwrite: bool = option(False, "replace what --out holds when it is not an appendix's "
                             "directory (the parts of one add to it without this)")

    def __post_init__(self) -> None:
        if not 0 <= self.heads <= self.tosses or self.tosses < 1:
            raise UsageError(f"--heads must lie in [0, --tosses] and --tosses >= 1, got "
                             f"{self.heads} of {self.tosses}")
        if not all(math.isfinite(v) and v >= 1 for v in (self.alpha, self.beta)):
            raise UsageError("--alpha and --beta must be finite and >= 1 (the MAP of a Beta "
                             "prior with a parameter below 1 can sit on the boundary)")
        check_fields(self)


def parser() -> Parser:
    p = Parser(prog="python -m ppl_vae appendix", formatter_class=HelpFormatter,
               description="MLE/MAP with AutoDelta against closed forms, NUTS and ArviZ, "
                           "and the gaps of the amortized posterior.")
    p.add_argument("part", choices=(*PARTS, "all"), help="which part to run")
    add_options(p, AppendixOptions)
    return p


def _run(argv: Sequence[str] | None) -> int:
    chosen = (args := vars(parser().parse_args(argv))).pop("part")
    a = AppendixOptions(**args)
    parts = PARTS if chosen == "all" else (chosen,)
    if "posterior" in parts:  # check the runs before minutes of other work
        a.loaded = [(run_dir, *load_run(run_dir)) for run_dir in a.run]
        for run_dir, _, vae, _ in a.loaded:
            if not _encodes_x(vae) or getattr(vae, "beta", 1.0) != 1.0:
                raise UsageError(f"--run {run_dir!r} is not a plain VAE (beta = 1, with an "
                                 "encoder of x alone); the posterior part needs one")
    ours = _appendix_dir(Path(a.out))  # (its parts add to it; any other is refused)
    with RunDir.open(a.out, "appendix", resume=ours, overwrite=a.overwrite) as rundir:
        out = rundir.path
        results, md = {}, []
        for part in parts:
            start = time.perf_counter()
            results[part], text = RUNNERS[part](a, out)
            results[part]["seconds"] = time.perf_counter() - start
            md.append(text)
            print(text, flush=True)
        merged, _ = read_summary(out / "results.json")  # unreadable or not ours: replaced
        write_json(out / "results.json", {**merged, **results})
        write_text(out / f"appendix-{chosen}.md", "\n".join(md))
    print(f"written to {out}")
    return 0


def _encodes_x(vae: object) -> bool:
    """Whether the model has ``encode(x)`` (M2's ``encode(x, y)`` is not one)."""
    try:
        params = inspect.signature(vae.encode).parameters.values()
    except (AttributeError, TypeError, ValueError):
        return False
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in params) == 1


def _appendix_dir(out: Path) -> bool:
    """Whether ``out`` holds an appendix's results (a results.json of its parts only)."""
    saved, _ = read_summary(out / "results.json")
    return bool(saved) and set(saved) <= set(PARTS)


def _coin(a, out: Path) -> tuple[dict, str]:
    data = torch.tensor([1.0] * a.heads + [0.0] * (a.tosses - a.heads))
    r = coin(data, a.alpha, a.beta, nuts_samples=a.nuts_samples, out=out)
    p, exact = r["posterior_nuts"], r["posterior_exact"]
    fits = [("MLE (prior masked)", "mle", "mle_exact"), ("MAP", "map", "map_exact"),
            ("MAP, uniform prior", "map_uniform_prior", "mle_exact")]
    return r, "\n".join([
        f"## Coin: {a.heads} heads in {a.tosses} tosses, Beta({a.alpha:g}, {a.beta:g}) prior", "",
        *markdown_table(["", "AutoDelta", "closed form", "abs. error"], [
            [name, f"{r[fit]:.6f}", f"{r[ok]:.6f}", f"{abs(r[fit] - r[ok]):.1e}"]
            for name, fit, ok in fits]), "",
        *markdown_table(["posterior", "mean", "sd", "94% HDI", "ESS (bulk)", "R-hat"], [
            ["exact Beta", f"{exact['mean']:.4f}", f"{exact['sd']:.4f}", "", "", ""],
            ["NUTS (2 chains)", f"{p['mean']:.4f} ± {p['mcse_mean']:.4f}", f"{p['sd']:.4f}",
             f"[{p['hdi_3%']:.3f}, {p['hdi_97%']:.3f}]", f"{p['ess_bulk']:.0f}",
             f"{p['r_hat']:.3f}"]])]) + "\n"


def _regression(a, out: Path) -> tuple[dict, str]:
    X, y = regression.correlated_data(rho=a.rho, seed=a.seed)
    r = regression.linear_regression(X, y, 1.0, 1.0, nuts_samples=a.nuts_samples, out=out)
    p = r["posterior"]

    def rel(u, v):
        return max(abs(x - e) / abs(e) for x, e in zip(u, v, strict=True))

    columns = ("exact_mean", "nuts_mean", "mean_field_vi_mean", "exact_sd", "nuts_sd",
               "mean_field_vi_sd", "mean_field_optimum_sd")
    lines = [f"## Linear regression: 50 points, two features with correlation {a.rho}, "
             "sigma = tau = 1\n",
             *markdown_table(["", "max relative error vs closed form"], [
                 ["MLE (AutoDelta, prior masked) vs least squares",
                  f"{rel(r['mle'], r['mle_exact']):.1e}"],
                 [f"MAP (AutoDelta) vs ridge, lambda = sigma^2/tau^2 = {r['lambda']:g}",
                  f"{rel(r['map'], r['map_exact']):.1e}"]]), "",
             f"Exact posterior correlation of the weights: {p['exact_correlation']:.3f}\n",
             *markdown_table(["coefficient", "exact mean", "NUTS mean", "VI mean", "exact sd",
                              "NUTS sd", "mean-field VI sd", "best diagonal sd"],
                             [[f"w{i}", *(f"{p[c][i]:.4f}" for c in columns)]
                              for i in range(len(p["exact_sd"]))])]
    return r, "\n".join(lines) + "\n"


def _decoder_map(a, out: Path) -> tuple[dict, str]:
    data = load_dataset("digits")
    torch.manual_seed(a.seed)
    ident = decoder_map.gradient_identity(data.train.x[:64], seed=a.seed)
    race = decoder_map.map_vs_weight_decay(data, epochs=20, seed=a.seed)
    rows = [["SVI, AutoDelta on the decoder", race["svi_map"]],
            [f"Adam, weight decay B/(N s^2) = {race['weight_decay']:.4f}",
             race["adam_weight_decay"]]]
    return {"gradient_identity": ident, "training": race}, "\n".join([
        "## MAP of a VAE decoder (digits): a Normal(0, 0.5^2) prior on the weights", "",
        "One SVI gradient of the AutoDelta objective minus (plain ELBO gradient + "
        f"theta / s^2): max |difference| {ident['max_abs_diff_decoder']:.2e} on the "
        f"decoder (gradients up to {ident['max_abs_grad']:.1f}), "
        f"{ident['max_abs_diff_encoder']:.2e} on the encoder.", "",
        *markdown_table(["20 epochs, same start and batches", "test ELBO", "decoder weight norm"],
                        [[name, f"{t['test_elbo']:.3f}", f"{t['decoder_weight_norm']:.3f}"]
                         for name, t in rows])]) + "\n"


def _posterior(a, out: Path) -> tuple[dict, str]:
    loaded = a.loaded
    if not loaded:
        cfg = TrainConfig(dataset="digits", model_options={"z_dim": 2, "hidden": (128,)},
                          epochs=40, lr=3e-3, seed=a.seed, out=str(out / "vae-digits-z2"),
                          overwrite=True)
        run_dir = str(train_run(cfg, progress=False).out)
        loaded = [(run_dir, *load_run(run_dir))]
    results, rows, families = {}, [], {}
    for run_dir, config, vae, data in loaded:
        x = data.test.x[: a.images]
        g = amortization.gaps(vae, x, iwae_samples=a.iwae_samples, seed=a.seed)
        name, n = Path(run_dir).name, 1
        while name in results:  # two runs in directories of the same name
            n += 1
            name = f"{Path(run_dir).name}-{n}"
        z_dim = config.model_options.z_dim
        results[name] = {"run": str(Path(run_dir).resolve()), "z_dim": z_dim,
                         "dataset": data.name, **g}
        families[g["guide"].split("-")[0]] = g["q_star"]
        rows.append([name, g["guide"], z_dim, g["images"], *(f"{g[k]:.2f}" for k in (
            "log_px_iwae", "elbo_optimal", "elbo_amortized", "approximation_gap",
            "amortization_gap", "elbo_optimal_normal", "psis_khat_mean")),
            g["psis_khat_above_0.7"]])
        if z_dim == 2 and data.image_shape is not None:
            amortization.posterior_figure(vae, x[:4], out / f"posterior-{name}.png",
                                          num_samples=min(a.nuts_samples, 500), seed=a.seed)
    lines = ["## The amortized posterior: gaps (Cremer et al. 2018) and PSIS\n",
             *markdown_table(["run", "guide", "z", "images", "log p(x) (IWAE)", "ELBO(q*)",
                              "ELBO(q_phi)", "approximation gap", "amortization gap",
                              "ELBO(best Normal)", "mean k-hat", "k-hat > 0.7"], rows), "",
             *(f"q* ({kind}): {what}." for kind, what in families.items()),
             "log p(x): IWAE with q* as the proposal. ELBO(best Normal): a free diagonal "
             "Normal per image (for the Normal guide, q* itself)."]
    amortization.gaps_figure(results, out / "gaps.png")
    return {"runs": results}, "\n".join(lines) + "\n"


RUNNERS = {"coin": _coin, "regression": _regression, "decoder-map": _decoder_map,
           "posterior": _posterior}
main = main_wrapper("python -m ppl_vae appendix", _run)

if __name__ == "__main__":
    sys.exit(main())
