"""Atomic file writes: each goes to a hidden temporary file beside its target, is fsynced and
renamed over it (mode ``0o666`` less the umask); an OS failure removes the temporary file
and raises a one-line :class:`UsageError`.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .errors import UsageError

STALE_TMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp's names in atomic_write
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


def umask() -> int:
    """The process umask, read without changing it where /proc tells (else set and restored)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``
    (parents created). An ``OSError`` becomes a :class:`UsageError`; others propagate."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            fix = ("free space" if e.errno in _FULL else "make it writable"
                   if e.errno in _DENIED else "check the disk")
            raise UsageError(f"cannot write {str(path)!r}: {e.strerror or e}; {fix} or choose "
                             "another --out") from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Rows of dicts; the header is every key in order of first appearance (a row without
    one leaves its cell empty; no rows: an empty file)."""
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def markdown_table(head: Sequence, rows: Iterable[Sequence]) -> list[str]:
    """The lines of a Markdown table: ``head``, its rule, one line per row (an empty cell as
    ``| |``)."""
    lines = ["|" + "|".join(f" {c} " if str(c) else " " for c in r) + "|" for r in (head, *rows)]
    return [lines[0], "|" + "---|" * len(head), *lines[1:]]


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to memory first, then :func:`write_bytes`: a full disk is then an
    ``OSError`` (a one-line :class:`UsageError`), not torch's ``RuntimeError``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def clean_stale_tmp(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``directory`` and its
    subdirectories but those holding a ``.lock`` (run directories of their own, which clean
    themselves); return their paths relative to ``directory``. Only for a directory this
    process owns (see :class:`ppl_vae.run.rundir.RunDir`): it would delete a live writer's file."""
    root = Path(directory)
    removed = []
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(parent) / d / ".lock").exists()]
        for name in names:
            p = Path(parent) / name
            if STALE_TMP.fullmatch(name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(root)))
    return sorted(removed)
