"""``python -m ppl_vae.train`` (as ``python -m ppl_vae train``); imported, this module is
replaced by :func:`ppl_vae.run.train.train_run`, the package's ``ppl_vae.train``."""

import sys

from .cli import train_main
from .run.train import train_run as train

if __name__ == "__main__":
    sys.exit(train_main())
else:
    sys.modules[__name__] = train  # type: ignore[assignment]
