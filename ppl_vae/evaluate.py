"""``python -m ppl_vae.evaluate --run DIR [--eval-iwae K]``: re-evaluate a saved run.

The command line is :func:`ppl_vae.cli.evaluate_main`. This file only runs it: as an
attribute of the package, ``ppl_vae.evaluate`` is the function
:func:`ppl_vae.run.evaluate_run`, and importing this file keeps it so (as ``train.py``).
"""

import sys

from .cli import evaluate_main
from .run import evaluate_run

if __name__ == "__main__":
    sys.exit(evaluate_main())
else:
    sys.modules[__name__] = evaluate_run  # type: ignore[assignment]
