"""``python -m ppl_vae.compare``: ELBO estimators side by side on one VAE or CVAE.

The command line is :func:`ppl_vae.cli.compare_main`, the library :mod:`ppl_vae.comparison`.
This file only runs it: as an attribute of the package, ``ppl_vae.compare`` is the function
:func:`ppl_vae.comparison.compare`, and importing this file keeps it so (as ``train.py``).
"""

import sys

from .cli import compare_main
from .comparison import compare

if __name__ == "__main__":
    sys.exit(compare_main())
else:
    sys.modules[__name__] = compare  # type: ignore[assignment]
