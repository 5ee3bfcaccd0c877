"""The one exception a user can cause by what they ask for.

Library code raises :class:`UsageError` with one line that names the problem and the fix;
the command-line tools print that line and exit with status 2, never a traceback. Messages
name options as flags (``--overwrite``); raised to a Python caller they name the Python
setting instead (``overwrite=True``, ``dataset='digits'`` for ``--dataset 'digits'``: a
value is quoted), outside :func:`command_line`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sysconfig
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

_CLI = contextvars.ContextVar("ppl_vae_cli", default=False)
FLAGS = ("overwrite", "cuda", "jit", "compile", "validate")  # run switches: "pass overwrite=True"
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Within this block, :class:`UsageError` messages name command-line flags."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def on_command_line() -> bool:
    """Whether a command (not a Python caller) runs: within :func:`command_line`."""
    return _CLI.get()


_MODEL_OPT = re.compile(r"--model-opt (\w+)=(\S+)")
_VALUE = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*) ('[^']*')")  # a flag and a quoted value


def _python_name(match: re.Match) -> str:
    flag = match.group(1)
    if flag.startswith("no-"):
        return f"{flag[3:].replace('-', '_')}=False"
    name = flag.replace("-", "_")
    return f"{name}=True" if flag in FLAGS else name


class Note(UserWarning):
    """What the package says of a run through :mod:`warnings`: a command prints it as one
    ``note:`` line after the run."""


class UsageError(ValueError):
    """Bad input from the user (an option, a file, a missing dataset): a one-line message."""

    def __str__(self) -> str:
        text = super().__str__()
        if _CLI.get():
            return text
        text = _MODEL_OPT.sub(lambda m: f"model_options={{'{m[1]}': {m[2]}}}", text)
        text = _VALUE.sub(lambda m: f"{m[1].replace('-', '_')}={m[2]}", text)
        return _FLAG.sub(_python_name, text)


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of ``e``'s message (at most ``limit`` characters; "" if none)."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


def either(names: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``: choices in a message."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


PACKAGE = str(Path(__file__).resolve().parent) + os.sep  # (not a sibling named ppl_vae_x)
_LIBRARIES = (PACKAGE, *(sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")))


def users_frames(frames: Sequence[traceback.FrameSummary], keep: str | None = None
                 ) -> list[traceback.FrameSummary]:
    """The frames in the user's files: outside this package (but its folder ``keep``, e.g.
    ``"models"``: the shipped families are programs too), the standard library and installed
    packages."""
    kept = PACKAGE + keep + os.sep if keep else "\0"
    return [f for f in frames if f.filename.startswith(kept)
            or not f.filename.startswith(("<", *_LIBRARIES))]


class PluginError(UsageError):
    """A user's own code (the model, guide or a hook of a class outside this package) raised:
    a headline naming the call and the exception, then the frames in the user's files."""


def explain(e: BaseException, name: str, args: Sequence = (), what: str = "") -> str:
    """``Name(shapes): what raised Type: first line`` and the user's frames (the last six
    outside this package, the standard library and installed packages)."""
    shapes = ", ".join(f"{tuple(a.shape)}" if hasattr(a, "shape") else type(a).__name__
                       for a in args)
    said = first_line(e, 10_000)
    lines = [f"{name}({shapes}){': ' + what if what else ''} raised {type(e).__name__}"
             f"{': ' + said if said else ''}"]
    theirs = users_frames(traceback.extract_tb(e.__traceback__))
    lines += [f"  {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in theirs[-6:]]
    return "\n".join(lines)


def from_our_code(e: BaseException) -> bool:
    """Whether ``e`` was raised in this package's code below the user's last frame (a user's
    hook that called back into the package: ``ctx.fit``'s loop, a collective), which reports
    its own errors; an error of the user's code (or of torch, Pyro below it) is not."""
    frames = traceback.extract_tb(e.__traceback__)
    theirs = {id(f) for f in users_frames(frames)}
    last = max((i for i, f in enumerate(frames) if id(f) in theirs), default=None)
    return last is not None and any(f.filename.startswith(PACKAGE) for f in frames[last:])
