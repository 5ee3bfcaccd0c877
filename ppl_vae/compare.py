"""``python -m ppl_vae.compare`` (as ``python -m ppl_vae compare``); imported, this module is
replaced by :func:`ppl_vae.evaluation.comparison.compare`, the package's ``ppl_vae.compare``."""

import sys

from .cli import compare_main
from .evaluation.comparison import compare

if __name__ == "__main__":
    sys.exit(compare_main())
else:
    sys.modules[__name__] = compare  # type: ignore[assignment]
