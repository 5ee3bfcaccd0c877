"""``python -m ppl_vae {train,evaluate,compare,appendix,experiment} [options]`` (also the
``ppl-vae`` script)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import PROG, closed_pipe_is_fine, compare_main, evaluate_main, experiment_main, train_main


def appendix_main(argv: Sequence[str] | None = None) -> int:
    from .appendix.__main__ import main as appendix  # (its libraries load when asked for)

    return appendix(argv)


COMMANDS = {"train": (train_main, "train a model by SVI"),
            "evaluate": (evaluate_main, "re-evaluate a saved run"),
            "compare": (compare_main, "compare ELBO estimators on one model"),
            "appendix": (appendix_main, "MLE/MAP with AutoDelta, NUTS and the amortization gaps"),
            "experiment": (experiment_main, "tables of several runs (cvae-quadrants)")}


@closed_pipe_is_fine
def main(argv: Sequence[str] | None = None) -> int:
    """``ppl-vae COMMAND [options]``: the entry point of ``python -m ppl_vae``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: {PROG} {{{','.join(COMMANDS)}}} [options]\n", *(
                f"{name:<10}  {text}" for name, (_, text) in COMMANDS.items()),
                f"\n{PROG} COMMAND --help lists a command's options", sep="\n")
            return 0
        got = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{PROG}: error: {got}; use one of {', '.join(COMMANDS)} (see --help)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
