"""``python -m ppl_vae.train``: the same as ``python -m ppl_vae train``.

This file only runs the command line (:func:`ppl_vae.cli.train_main`). As an attribute of
the package, ``ppl_vae.train`` is the function :func:`ppl_vae.run.train.train_run`;
importing this file keeps it so (it puts that function in its own place in ``sys.modules``).
"""

import sys

from .cli import train_main
from .run.train import train_run as train

if __name__ == "__main__":
    sys.exit(train_main())
else:
    sys.modules[__name__] = train  # type: ignore[assignment]
