"""``python -m ppl_vae.evaluate``: the same as ``python -m ppl_vae evaluate``.

This file only runs the command line (:func:`ppl_vae.cli.evaluate_main`). As an attribute
of the package, ``ppl_vae.evaluate`` is the function
:func:`ppl_vae.evaluation.runs.evaluate_run`; importing this file keeps it so.
"""

import sys

from .cli import evaluate_main
from .evaluation.runs import evaluate_run

if __name__ == "__main__":
    sys.exit(evaluate_main())
else:
    sys.modules[__name__] = evaluate_run  # type: ignore[assignment]
