"""``python -m ppl_vae.train``: train a VAE (or any registered model) by SVI.

    python -m ppl_vae.train --dataset digits --epochs 20            # offline, seconds
    python -m ppl_vae.train --dataset mnist --elbo analytic --cuda  # full MNIST on a GPU

The command line is :func:`ppl_vae.cli.train_main`. This file only runs it: as an attribute of
the package, ``ppl_vae.train`` is the function :func:`ppl_vae.run.train`, and importing this
file keeps it so (it puts that function in its own place in ``sys.modules``).
"""

import sys

from .cli import train_main
from .run import train

if __name__ == "__main__":
    sys.exit(train_main())
else:
    sys.modules[__name__] = train  # type: ignore[assignment]
