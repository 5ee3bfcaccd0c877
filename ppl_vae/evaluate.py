"""``python -m ppl_vae.evaluate --run DIR [--eval-iwae K]``: re-evaluate a saved run."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import Parser, main_wrapper
from .run import evaluate_run


def parser() -> Parser:
    p = Parser(prog="python -m ppl_vae.evaluate", description=__doc__)
    p.add_argument("--run", required=True, help="run directory written by ppl_vae.train")
    p.add_argument("--eval-iwae", type=int, default=0, metavar="K",
                   help="IWAE log-likelihood bound with K samples per image (0: off)")
    p.add_argument("--eval-particles", type=int, default=None,
                   help="samples per image for the test ELBO (default: the run's)")
    p.add_argument("--data-dir", default=None, help="dataset root, if it moved")
    p.add_argument("--cuda", action="store_true")
    return p


def _run(argv: Sequence[str] | None) -> int:
    a = parser().parse_args(argv)
    if a.eval_iwae < 0 or (a.eval_particles is not None and a.eval_particles < 1):
        from .errors import UsageError

        raise UsageError("--eval-iwae must be >= 0 and --eval-particles >= 1")
    r = evaluate_run(a.run, a.eval_iwae, a.cuda, a.data_dir, a.eval_particles)
    print(f"test ELBO {r['test_elbo']:.2f} nats/image ({r['eval_particles']} samples per image)")
    if "test_log_likelihood_iwae" in r:
        print(f"log p(x) >= {r['test_log_likelihood_iwae']:.2f} nats/image "
              f"(IWAE, K={r['iwae_samples']})")
    return 0


main = main_wrapper("python -m ppl_vae.evaluate", _run)

if __name__ == "__main__":
    sys.exit(main())
