"""``python -m ppl_vae.evaluate --run DIR [--eval-iwae K]``: re-evaluate a saved run.

The command line is :func:`ppl_vae.cli.evaluate_main`; this file only runs it.
"""

import sys

from .cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
