"""``python -m ppl_vae.train``: train a VAE (or any registered model) by SVI.

    python -m ppl_vae.train --dataset digits --epochs 20            # offline, seconds
    python -m ppl_vae.train --dataset mnist --elbo analytic --cuda  # full MNIST on a GPU
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import Parser, main_wrapper
from .config import ACTIVATIONS, BINARIZE, ELBOS, LIKELIHOODS, TrainConfig, default_data_dir
from .run import train


def parser() -> Parser:
    d = TrainConfig.__dataclass_fields__  # defaults live in TrainConfig only

    def default(name: str):
        f = d[name]
        return f.default_factory() if callable(f.default_factory) else f.default

    p = Parser(prog="python -m ppl_vae.train", description=__doc__.splitlines()[0],
               formatter_class=lambda prog: __import__("argparse").ArgumentDefaultsHelpFormatter(
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
    g = p.add_argument_group("inference")
    g.add_argument("--elbo", choices=ELBOS, default=default("elbo"),
                   help="mc: Trace_ELBO, analytic: TraceMeanField_ELBO, iwae: RenyiELBO(alpha=0)")
    g.add_argument("--particles", type=int, default=default("particles"),
                   help="samples per data point (vectorized)")
    g.add_argument("--jit", action="store_true", help="use Pyro's Jit* ELBO variants")
    g.add_argument("--lr", type=float, default=default("lr"), help="Adam learning rate")
    g.add_argument("--epochs", type=int, default=default("epochs"))
    g.add_argument("--batch-size", type=int, default=default("batch_size"))
    g.add_argument("--seed", type=int, default=default("seed"))
    g.add_argument("--cuda", action="store_true", help="train and evaluate on the GPU")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-particles", type=int, default=default("eval_particles"),
                   help="samples per test image for the test ELBO")
    g.add_argument("--eval-iwae", type=int, default=default("eval_iwae"), metavar="K",
                   help="also estimate log p(x) by the IWAE bound with K samples (0: off)")
    g.add_argument("--out", default=None, help="run directory (default runs/<model>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="allow --out to hold files")
    return p


def _run(argv: Sequence[str] | None) -> int:
    args = vars(parser().parse_args(argv))
    run = train(TrainConfig(**args))
    s = run.summary
    print(f"test ELBO {s['test_elbo']:.2f} nats/image ({s['eval_particles']} samples per image, "
          f"{s['n_test']} test images), train ELBO {s['train_elbo']:.2f}, "
          f"{s['train_seconds']:.1f} s of training on {s['device']}")
    if "test_log_likelihood_iwae" in s:
        print(f"log p(x) >= {s['test_log_likelihood_iwae']:.2f} nats/image "
              f"(IWAE, K={s['iwae_samples']})")
    print(f"run written to {run.out}")
    return 0


main = main_wrapper("python -m ppl_vae.train", _run)

if __name__ == "__main__":
    sys.exit(main())
