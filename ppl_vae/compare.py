"""``python -m ppl_vae.compare``: ELBO estimators side by side on one VAE or CVAE.

The command line is :func:`ppl_vae.cli.compare_main`; the library is
:mod:`ppl_vae.comparison`. This file only runs it.
"""

import sys

from .cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
