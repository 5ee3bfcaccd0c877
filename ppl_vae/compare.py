"""``python -m ppl_vae.compare``: the same as ``python -m ppl_vae compare``.

This file only runs the command line (:func:`ppl_vae.cli.compare_main`). As an attribute of
the package, ``ppl_vae.compare`` is the function
:func:`ppl_vae.evaluation.comparison.compare`; importing this file keeps it so.
"""

import sys

from .cli import compare_main
from .evaluation.comparison import compare

if __name__ == "__main__":
    sys.exit(compare_main())
else:
    sys.modules[__name__] = compare  # type: ignore[assignment]
