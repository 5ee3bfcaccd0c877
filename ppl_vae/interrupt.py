"""SIGINT and SIGTERM (Ctrl-C, and what schedulers and torchrun send on pre-emption).

Inside :func:`signals`, the first signal is *deferred* while training steps run: the loop
finishes its step, writes a checkpoint and raises :class:`Interrupted`; elsewhere it raises
:class:`Interrupted` at once. A second signal ends a command at once (``os._exit``) with
status 128 + signal number: checkpoints are written by rename, so the last one is intact; from
Python (a notebook) it raises ``KeyboardInterrupt`` instead, and the process lives on. A
torchrun worker takes only the first (Ctrl-C reaches it from the terminal and again from the
agent; the agent's SIGKILL ends a hung one).
Under torchrun, a run failing out of the training steps defers, and once out of
:func:`signals` ignores, SIGINT/SIGTERM: the agent's SIGTERM after another process died must
not end this one before it has said why in its one line (it exits right after; the agent's
SIGKILL still ends a hung one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from .distributed import launched
from .errors import on_command_line

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal. ``status`` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.message = message

    @property
    def status(self) -> int:
        return 128 + self.signum


class Guard:
    """What the handler sets: ``requested`` (the first signal's number, or 0), and whether
    the training loop ``defers`` it to a step boundary."""

    def __init__(self) -> None:
        self.requested = 0
        self.defers = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals arriving within only set :attr:`requested` (the loop checks it)."""
        outer, self.defers = self.defers, True
        try:
            yield
        except BaseException:
            self.defers = launched()  # (failing under torchrun: see the module's docstring)
            raise
        self.defers = outer

    def handle(self, signum: int, frame: object) -> None:
        if self.requested:  # the second signal: at once (from Python: the caller's to catch)
            if launched():  # (torchrun forwards a terminal's Ctrl-C, which the worker had too)
                return
            if on_command_line():
                os._exit(128 + signum)
            raise KeyboardInterrupt
        self.requested = signum
        if not self.defers:
            raise Interrupted(signum)


@contextlib.contextmanager
def signals() -> Iterator[Guard]:
    """Handle SIGINT/SIGTERM with a :class:`Guard` (only in the main thread; elsewhere the
    guard is inert and Python's handlers stay)."""
    guard = Guard()
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, guard.handle) for s in SIGNALS} if main else {}
    try:
        yield guard
    except BaseException:
        if launched():
            old = dict.fromkeys(old, signal.SIG_IGN)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
