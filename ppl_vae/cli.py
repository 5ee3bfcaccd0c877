"""What the command-line tools share: one-line errors with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import UsageError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: ... (see --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main_wrapper(prog: str, run: Callable[[Sequence[str] | None], int]
                 ) -> Callable[[Sequence[str] | None], int]:
    """Turn :class:`UsageError` into ``prog: error: message`` on stderr and exit status 2."""

    def main(argv: Sequence[str] | None = None) -> int:
        try:
            return run(argv)
        except UsageError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    return main
