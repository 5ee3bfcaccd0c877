"""``python -m ppl_vae appendix coin|regression|decoder-map|posterior|all --out DIR``."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..cli import HelpFormatter, Parser, main_wrapper
from ..config import TrainConfig
from ..data import load_dataset
from ..errors import UsageError
from ..evaluation.runs import load_run, read_summary
from ..files import write_json, write_text
from ..run.rundir import RunDir
from ..run.train import train_run
from . import amortization, decoder_map, regression
from .beta_bernoulli import coin

PARTS = ("coin", "regression", "decoder-map", "posterior")


def parser() -> Parser:
    p = Parser(prog="python -m ppl_vae appendix", formatter_class=HelpFormatter,
               description="MLE/MAP with AutoDelta against closed forms, NUTS and ArviZ, "
                           "and the gaps of the amortized posterior.")
    p.add_argument("part", choices=(*PARTS, "all"), help="which part to run")
    p.add_argument("--out", required=True, help="directory for results.json, tables, figures")
    p.add_argument("--heads", type=int, default=7, help="coin: heads")
    p.add_argument("--tosses", type=int, default=10, help="coin: tosses")
    p.add_argument("--alpha", type=float, default=2.0, help="coin: Beta prior alpha")
    p.add_argument("--beta", type=float, default=3.0, help="coin: Beta prior beta")
    p.add_argument("--rho", type=float, default=0.95,
                   help="regression: correlation of the two features")
    p.add_argument("--run", action="append", default=[],
                   help="posterior: a trained VAE run (repeat for several); none: train a "
                        "2-D VAE on digits")
    p.add_argument("--images", type=int, default=20, help="posterior: test images")
    p.add_argument("--iwae-samples", type=int, default=5000,
                   help="posterior: importance samples per image for log p(x)")
    p.add_argument("--nuts-samples", type=int, default=1000,
                   help="NUTS draws per chain (coin, regression, posterior)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the samplers")
    return p


def _run(argv: Sequence[str] | None) -> int:
    a = parser().parse_args(argv)
    if not 0 <= a.heads <= a.tosses or a.tosses < 1:
        raise UsageError(f"--heads must lie in [0, --tosses] and --tosses >= 1, got "
                         f"{a.heads} of {a.tosses}")
    if not (math.isfinite(a.alpha) and math.isfinite(a.beta) and a.alpha >= 1 and a.beta >= 1):
        raise UsageError("--alpha and --beta must be finite and >= 1 (the MAP of a Beta prior "
                         "with a parameter below 1 can sit on the boundary)")
    if not 0 <= a.seed < 2**32:
        raise UsageError(f"--seed must lie in [0, 2**32), got {a.seed}")
    if not -1 < a.rho < 1:
        raise UsageError(f"--rho must lie strictly between -1 and 1, got {a.rho}")
    if a.images < 1 or a.iwae_samples < 1 or a.nuts_samples < 10:
        raise UsageError("--images, --iwae-samples must be >= 1 and --nuts-samples >= 10")
    parts = PARTS if a.part == "all" else (a.part,)
    if "posterior" in parts:  # check the runs before minutes of other work
        a.loaded = [(run_dir, *load_run(run_dir)) for run_dir in a.run]
        for run_dir, _, vae, _ in a.loaded:
            if not hasattr(vae, "encode") or getattr(vae, "beta", 1.0) != 1.0:
                raise UsageError(f"--run {run_dir!r} is not a plain VAE (beta = 1, with an "
                                 "encoder); the posterior part needs one")
    with RunDir.open(a.out, "appendix", resume=True) as rundir:  # parts add to one directory
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
        write_text(out / f"appendix-{a.part}.md", "\n".join(md))
    print(f"written to {out}")
    return 0


def _coin(a, out: Path) -> tuple[dict, str]:
    data = torch.tensor([1.0] * a.heads + [0.0] * (a.tosses - a.heads))
    r = coin(data, a.alpha, a.beta, nuts_samples=a.nuts_samples, out=out)
    p = r["posterior_nuts"]
    text = (f"## Coin: {a.heads} heads in {a.tosses} tosses, Beta({a.alpha:g}, {a.beta:g}) "
            "prior\n\n| | AutoDelta | closed form | abs. error |\n|---|---|---|---|\n"
            f"| MLE (prior masked) | {r['mle']:.6f} | {r['mle_exact']:.6f} | "
            f"{abs(r['mle'] - r['mle_exact']):.1e} |\n"
            f"| MAP | {r['map']:.6f} | {r['map_exact']:.6f} | "
            f"{abs(r['map'] - r['map_exact']):.1e} |\n"
            f"| MAP, uniform prior | {r['map_uniform_prior']:.6f} | {r['mle_exact']:.6f} | "
            f"{abs(r['map_uniform_prior'] - r['mle_exact']):.1e} |\n\n"
            "| posterior | mean | sd | 94% HDI | ESS (bulk) | R-hat |\n|---|---|---|---|---|---|\n"
            f"| exact Beta | {r['posterior_exact']['mean']:.4f} | "
            f"{r['posterior_exact']['sd']:.4f} | | | |\n"
            f"| NUTS (2 chains) | {p['mean']:.4f} ± {p['mcse_mean']:.4f} | {p['sd']:.4f} | "
            f"[{p['hdi_3%']:.3f}, {p['hdi_97%']:.3f}] | {p['ess_bulk']:.0f} | "
            f"{p['r_hat']:.3f} |\n")
    return r, text


def _regression(a, out: Path) -> tuple[dict, str]:
    X, y = regression.correlated_data(rho=a.rho, seed=a.seed)
    r = regression.linear_regression(X, y, 1.0, 1.0, nuts_samples=a.nuts_samples, out=out)
    p = r["posterior"]

    def rel(u, v):
        return max(abs(x - e) / abs(e) for x, e in zip(u, v, strict=True))

    lines = [f"## Linear regression: 50 points, two features with correlation {a.rho}, "
             "sigma = tau = 1\n",
             "| | max relative error vs closed form |", "|---|---|",
             "| MLE (AutoDelta, prior masked) vs least squares | "
             f"{rel(r['mle'], r['mle_exact']):.1e} |",
             f"| MAP (AutoDelta) vs ridge, lambda = sigma^2/tau^2 = {r['lambda']:g} | "
             f"{rel(r['map'], r['map_exact']):.1e} |", "",
             f"Exact posterior correlation of the weights: {p['exact_correlation']:.3f}\n",
             "| coefficient | exact mean | NUTS mean | VI mean | exact sd | NUTS sd | "
             "mean-field VI sd | best diagonal sd |", "|---|---|---|---|---|---|---|---|"]
    for i in range(len(p["exact_sd"])):
        lines.append(f"| w{i} | {p['exact_mean'][i]:.4f} | {p['nuts_mean'][i]:.4f} | "
                     f"{p['mean_field_vi_mean'][i]:.4f} | {p['exact_sd'][i]:.4f} | "
                     f"{p['nuts_sd'][i]:.4f} | {p['mean_field_vi_sd'][i]:.4f} | "
                     f"{p['mean_field_optimum_sd'][i]:.4f} |")
    return r, "\n".join(lines) + "\n"


def _decoder_map(a, out: Path) -> tuple[dict, str]:
    data = load_dataset("digits")
    torch.manual_seed(a.seed)
    ident = decoder_map.gradient_identity(data.train.x[:64], seed=a.seed)
    race = decoder_map.map_vs_weight_decay(data, epochs=20, seed=a.seed)
    r = {"gradient_identity": ident, "training": race}
    text = ("## MAP of a VAE decoder (digits): a Normal(0, 0.5^2) prior on the weights\n\n"
            "One SVI gradient of the AutoDelta objective minus (plain ELBO gradient + "
            f"theta / s^2): max |difference| {ident['max_abs_diff_decoder']:.2e} on the "
            f"decoder (gradients up to {ident['max_abs_grad']:.1f}), "
            f"{ident['max_abs_diff_encoder']:.2e} on the encoder.\n\n"
            "| 20 epochs, same start and batches | test ELBO | decoder weight norm |\n"
            "|---|---|---|\n"
            f"| SVI, AutoDelta on the decoder | {race['svi_map']['test_elbo']:.3f} | "
            f"{race['svi_map']['decoder_weight_norm']:.3f} |\n"
            f"| Adam, weight decay B/(N s^2) = {race['weight_decay']:.4f} | "
            f"{race['adam_weight_decay']['test_elbo']:.3f} | "
            f"{race['adam_weight_decay']['decoder_weight_norm']:.3f} |\n")
    return r, text


def _posterior(a, out: Path) -> tuple[dict, str]:
    loaded = a.loaded
    if not loaded:
        cfg = TrainConfig(dataset="digits", model_options={"z_dim": 2, "hidden": (128,)},
                          epochs=40, lr=3e-3, seed=a.seed, out=str(out / "vae-digits-z2"),
                          overwrite=True)
        run_dir = str(train_run(cfg, progress=False).out)
        loaded = [(run_dir, *load_run(run_dir))]
    results, lines = {}, ["## The amortized posterior: gaps (Cremer et al. 2018) and PSIS\n",
                          "| run | guide | z | images | log p(x) (IWAE) | ELBO(q*) | ELBO(q_phi) | "
                          "approximation gap | amortization gap | ELBO(best Normal) | "
                          "mean k-hat | k-hat > 0.7 |",
                          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    families = {}
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
        lines.append(f"| {name} | {g['guide']} | {z_dim} | {g['images']} | "
                     f"{g['log_px_iwae']:.2f} | {g['elbo_optimal']:.2f} | "
                     f"{g['elbo_amortized']:.2f} | {g['approximation_gap']:.2f} | "
                     f"{g['amortization_gap']:.2f} | {g['elbo_optimal_normal']:.2f} | "
                     f"{g['psis_khat_mean']:.2f} | {g['psis_khat_above_0.7']} |")
        if z_dim == 2 and data.image_shape is not None:
            amortization.posterior_figure(vae, x[:4], out / f"posterior-{name}.png",
                                          num_samples=min(a.nuts_samples, 500), seed=a.seed)
    lines.append("")
    lines += [f"q* ({kind}): {what}." for kind, what in families.items()]
    lines.append("log p(x): IWAE with q* as the proposal. ELBO(best Normal): a free diagonal "
                 "Normal per image (for the Normal guide, q* itself).")
    amortization.gaps_figure(results, out / "gaps.png")
    return {"runs": results}, "\n".join(lines) + "\n"


RUNNERS = {"coin": _coin, "regression": _regression, "decoder-map": _decoder_map,
           "posterior": _posterior}
main = main_wrapper("python -m ppl_vae appendix", _run)

if __name__ == "__main__":
    sys.exit(main())
