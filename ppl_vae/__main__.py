"""``python -m ppl_vae {train,evaluate,compare,appendix} [options]``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
