"""What every command line here is made of: a parser whose errors are one line, a help
formatter that shows every default, and the wrapper that turns :class:`UsageError` into one
line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from .errors import UsageError, command_line
from .interrupt import Interrupted


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: ... (see --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Every option shows its default: ``(default: X)``, or ``(off unless given)`` for an
    on/off flag such as ``--no-download``."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "(default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return f"{text} (off unless given)"
        shown = getattr(action, "shown_default", action.default)
        if shown is argparse.SUPPRESS:
            return text
        if isinstance(shown, list | tuple):
            shown = " ".join(map(str, shown)) or "none"
        return f"{text} (default: {'none' if shown is None else shown})"


def _is_main_process() -> bool:
    """Not a non-zero torchrun rank (rank 0 alone prints the one error line)."""
    return os.environ.get("RANK", "0") == "0"


def _show(held: Sequence[warnings.WarningMessage]) -> None:
    for w in held:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def main_wrapper(prog: str, run: Callable[[Sequence[str] | None], int]
                 ) -> Callable[[Sequence[str] | None], int]:
    """Turn :class:`UsageError` into ``prog: error: message`` on stderr and exit status 2.

    Python warnings raised during the run (Pyro's, torch's) are held back and shown once
    it has finished: after its output when it succeeds (or fails with a traceback), never
    when it ends in the one error line or an interruption."""

    def main(argv: Sequence[str] | None = None) -> int:
        held: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                try:
                    status = guarded(argv)
                finally:
                    held = list(caught)
        except BaseException:  # a traceback: the warnings may explain it
            _show(held)
            raise
        if status in (0, None):  # success: what was held back, after the output
            _show(held)
        return status

    def guarded(argv: Sequence[str] | None) -> int:
        try:
            with command_line():
                return run(argv)
        except UsageError as e:  # exit 2; a diverged run 3
            if _is_main_process():
                with command_line():
                    print(f"{prog}: error: {e}", file=sys.stderr)
            return getattr(e, "exit_status", 2)
        except Interrupted as e:  # a run that checkpointed on SIGINT/SIGTERM: 130/143
            if _is_main_process():
                text = e.message or "interrupted before the first checkpoint; nothing to resume"
                print(f"{prog}: {text}", file=sys.stderr)
            return e.status
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    return main
