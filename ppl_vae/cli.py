"""The command-line tools, thin layers over :mod:`ppl_vae.run`.

``python -m ppl_vae.train`` runs :func:`train_main`, ``python -m ppl_vae.evaluate`` runs
:func:`evaluate_main`. Bad input ends in one line ``prog: error: ...`` and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .config import (
    ACTIVATIONS,
    BINARIZE,
    CONDITIONS,
    CVAE_OBJECTIVES,
    ELBOS,
    LIKELIHOODS,
    TrainConfig,
    default_data_dir,
)
from .errors import UsageError
from .run import evaluate_run, train


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: ... (see --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main_wrapper(prog: str, run: Callable[[Sequence[str] | None], int]
                 ) -> Callable[[Sequence[str] | None], int]:
    """Turn :class:`UsageError` into ``prog: error: message`` on stderr and exit status 2."""

    def main(argv: Sequence[str] | None = None) -> int:
        try:
            return run(argv)
        except UsageError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    return main


def train_parser(compare: bool = False) -> Parser:
    d = TrainConfig.__dataclass_fields__  # defaults live in TrainConfig only

    def default(name: str):
        f = d[name]
        return f.default_factory() if callable(f.default_factory) else f.default

    p = Parser(prog="python -m ppl_vae.compare" if compare else "python -m ppl_vae.train",
               description=COMPARE_DESCRIPTION if compare else
               "Train a VAE (or any registered model) by SVI.",
               formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(
                   prog, max_help_position=32))
    g = p.add_argument_group("data")
    g.add_argument("--model", default=default("model"), help="registered model name")
    g.add_argument("--dataset", default=default("dataset"),
                   help="mnist, fashion-mnist, digits (offline) or npz:PATH")
    g.add_argument("--data-dir", default=default_data_dir(),
                   help="dataset root (env PPL_VAE_DATA)")
    g.add_argument("--no-download", dest="download", action="store_false",
                   help="never download; fail if the dataset is missing")
    g.add_argument("--binarize", choices=BINARIZE, default=default("binarize"))
    g = p.add_argument_group("model")
    g.add_argument("--z-dim", type=int, default=default("z_dim"))
    g.add_argument("--hidden", type=int, nargs="+", default=list(default("hidden")),
                   help="hidden layer widths of the encoder (the decoder mirrors them)")
    g.add_argument("--activation", choices=ACTIVATIONS, default=default("activation"))
    g.add_argument("--likelihood", choices=LIKELIHOODS, default=default("likelihood"))
    g.add_argument("--gaussian-scale", type=float, default=default("gaussian_scale"),
                   help="sigma of the Gaussian likelihood (initial value with --learn-scale)")
    g.add_argument("--learn-scale", action="store_true", help="learn the Gaussian sigma")
    g.add_argument("--beta", type=float, default=default("beta"), help="KL weight (beta-VAE)")
    g = p.add_argument_group("conditional VAE (--model cvae)")
    g.add_argument("--condition", choices=CONDITIONS, default=default("condition"),
                   help="quadrants: complete images from observed quadrants; label: "
                        "class-conditional generation")
    g.add_argument("--quadrants", type=int, nargs="+", default=list(default("quadrants")),
                   help="observed-quadrant counts, one model each")
    g.add_argument("--no-baseline-input", dest="baseline_input", action="store_false",
                   help="do not feed the baseline NN's guess to the prior network")
    g.add_argument("--cvae-objective", choices=CVAE_OBJECTIVES,
                   default=default("cvae_objective"))
    g.add_argument("--hybrid-alpha", type=float, default=default("hybrid_alpha"),
                   help="weight of the CVAE term in the hybrid objective")
    g.add_argument("--cll-samples", type=int, default=default("cll_samples"),
                   help="importance samples for -log p(y|c)")
    g = p.add_argument_group("inference")
    if not compare:  # compare measures every estimator
        g.add_argument("--elbo", choices=ELBOS, default=default("elbo"),
                       help="mc: Trace_ELBO, analytic: TraceMeanField_ELBO, "
                            "iwae: RenyiELBO(alpha=0)")
    if compare:
        g.add_argument("--particles", type=int, nargs="+", default=[1, 10],
                       help="particle counts of the mc and analytic estimators to compare "
                            "(the largest is also the K of the race's IWAE racer)")
    else:
        g.add_argument("--particles", type=int, default=default("particles"),
                       help="samples per data point (vectorized)")
    if not compare:
        g.add_argument("--jit", action="store_true", help="use Pyro's Jit* ELBO variants")
    g.add_argument("--lr", type=float, default=default("lr"), help="Adam learning rate")
    g.add_argument("--epochs", type=int, default=default("epochs"))
    g.add_argument("--batch-size", type=int, default=default("batch_size"))
    g.add_argument("--seed", type=int, default=default("seed"))
    g.add_argument("--cuda", action="store_true", help="train and evaluate on the GPU")
    if not compare:
        g.add_argument("--early-stop", type=int, default=default("early_stop"),
                       metavar="PATIENCE",
                       help="stop after PATIENCE epochs without a better validation ELBO "
                            "(0: off)")
        g.add_argument("--val-fraction", type=float, default=default("val_fraction"),
                       help="share of the training split held out for early stopping")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-particles", type=int, default=default("eval_particles"),
                   help="samples per test image for the test ELBO")
    if not compare:
        g.add_argument("--eval-iwae", type=int, default=default("eval_iwae"), metavar="K",
                       help="also estimate log p(x) by the IWAE bound with K samples (0: off)")
    g.add_argument("--out", default=None, help="run directory (default runs/<model>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="allow --out to hold files")
    if compare:
        g = p.add_argument_group("comparison")
        g.add_argument("--run", default=None, help="start from this training run's checkpoint")
        g.add_argument("--warmup-epochs", type=int, default=0,
                       help="without --run: train this many epochs (mc) before measuring")
        g.add_argument("--repeats", type=int, default=200,
                       help="repeated estimates and gradient draws")
        g.add_argument("--iwae-samples", type=int, nargs="+", default=[1, 10, 100],
                       help="K of the IWAE bound estimates")
        g.add_argument("--eval-batch", type=int, default=128,
                       help="test images in the fixed evaluation batch")
        g.add_argument("--no-race", dest="race", action="store_false",
                       help="skip the training race")
        g.add_argument("--target", type=float, default=None,
                       help="test ELBO the race times (default: the worst final one)")
    return p


def _train(argv: Sequence[str] | None) -> int:
    config = TrainConfig(**vars(train_parser().parse_args(argv)))
    if config.model == "cvae" and config.condition == "quadrants":
        from .experiments import train_quadrant_table

        table = train_quadrant_table(config)
        print("-log p(y|c), nats per test image (lower is better):\n" + table.markdown)
        print(f"{table.seconds:.0f} s in all; runs written to {table.out}")
        return 0
    run = train(config)
    s = run.summary
    print(f"test ELBO {s['test_elbo']:.2f} nats/image ({s['eval_particles']} samples per image, "
          f"{s['n_test']} test images), train ELBO {s['train_elbo']:.2f}, "
          f"{s['train_seconds']:.1f} s of training on {s['device']}")
    if "test_log_likelihood_iwae" in s:
        print(f"log p(x) >= {s['test_log_likelihood_iwae']:.2f} nats/image "
              f"(IWAE, K={s['iwae_samples']})")
    if "cll" in s:
        print("-log p(y|c), nats per test image (lower is better):\n"
              + (run.out / "cll_table.md").read_text().split("\n\n", 1)[1])
    print(f"run written to {run.out}")
    return 0


COMPARE_DESCRIPTION = ("Compare ELBO estimators on one model: bound estimates, gradient "
                       "variance and signal-to-noise, and a training race.")
COMPARE_ONLY = ("run", "warmup_epochs", "repeats", "iwae_samples", "eval_batch", "race", "target")


def _compare(argv: Sequence[str] | None) -> int:
    from .comparison import CompareConfig, compare

    args = vars(train_parser(compare=True).parse_args(argv))
    extra = {k: args.pop(k) for k in COMPARE_ONLY}
    particles = args.pop("particles")
    out = args.pop("out")
    config = TrainConfig(**args)
    if config.model == "cvae" and len(config.quadrants) != 1 and config.condition == "quadrants":
        raise UsageError("compare one CVAE at a time: give --quadrants K (1, 2 or 3)")
    result = compare(CompareConfig(train=config, particles=tuple(particles), **extra), out)
    print((result.out / "summary.md").read_text())
    print(f"comparison written to {result.out}")
    return 0


def evaluate_parser() -> Parser:
    p = Parser(prog="python -m ppl_vae.evaluate",
               description="Re-evaluate a saved run: test ELBO, and log p(x) by the IWAE bound.")
    p.add_argument("--run", required=True, help="run directory written by ppl_vae.train")
    p.add_argument("--eval-iwae", type=int, default=0, metavar="K",
                   help="IWAE log-likelihood bound with K samples per image (0: off)")
    p.add_argument("--eval-particles", type=int, default=None,
                   help="samples per image for the test ELBO (default: the run's; with "
                        "--eval-iwae the ELBO uses the same K samples)")
    p.add_argument("--data-dir", default=None, help="dataset root, if it moved")
    p.add_argument("--cuda", action="store_true")
    return p


def _evaluate(argv: Sequence[str] | None) -> int:
    a = evaluate_parser().parse_args(argv)
    if a.eval_iwae < 0 or (a.eval_particles is not None and a.eval_particles < 1):
        raise UsageError("--eval-iwae must be >= 0 and --eval-particles >= 1")
    r = evaluate_run(a.run, a.eval_iwae, a.cuda, a.data_dir, a.eval_particles)
    print(f"test ELBO {r['test_elbo']:.2f} nats/image ({r['eval_particles']} samples per image)")
    if "test_log_likelihood_iwae" in r:
        print(f"log p(x) >= {r['test_log_likelihood_iwae']:.2f} nats/image "
              f"(IWAE, K={r['iwae_samples']})")
    return 0



train_main = main_wrapper("python -m ppl_vae.train", _train)
evaluate_main = main_wrapper("python -m ppl_vae.evaluate", _evaluate)
compare_main = main_wrapper("python -m ppl_vae.compare", _compare)
