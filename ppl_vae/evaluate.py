"""``python -m ppl_vae.evaluate`` (as ``python -m ppl_vae evaluate``); imported, this module is
replaced by :func:`ppl_vae.evaluation.runs.evaluate_run`, the package's ``ppl_vae.evaluate``."""

import sys

from .cli import evaluate_main
from .evaluation.runs import evaluate_run

if __name__ == "__main__":
    sys.exit(evaluate_main())
else:
    sys.modules[__name__] = evaluate_run  # type: ignore[assignment]
