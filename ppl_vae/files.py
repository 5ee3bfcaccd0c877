"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every write goes to a hidden temporary file beside its target (``.{name}.XXXXXXXX.tmp``),
is fsynced and renamed over the target; the result gets the mode ``open()`` would give a
new file (``0o666`` less the umask). Any OS failure (disk full, read-only, permission)
removes the temporary file and raises :class:`UsageError` naming the path and the reason.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .errors import UsageError

_TMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # what tempfile.mkstemp names for atomic_write
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


def umask() -> int:
    """The process umask, read without changing it where /proc tells (else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | os.PathLike, e: OSError, setting: str = "--out") -> UsageError:
    """The one-line :class:`UsageError` for an OS failure writing ``path``."""
    reason = e.strerror or str(e)
    if e.errno in _FULL:
        fix = f"free space or choose another {setting}"
    elif e.errno in _DENIED:
        fix = f"make it writable or choose another {setting}"
    else:
        fix = f"check the disk or choose another {setting}"
    return UsageError(f"cannot write {str(path)!r}: {reason}; {fix}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *,
                 setting: str = "--out") -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    The parents are created. An ``OSError`` anywhere removes the temporary file and becomes a
    :class:`UsageError` (``setting`` names the option to change); other errors propagate."""
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
            raise write_error(path, e, setting) from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes | memoryview, *,
                setting: str = "--out") -> None:
    atomic_write(path, lambda f: f.write(data), setting=setting)


def write_text(path: str | os.PathLike, text: str, *, setting: str = "--out") -> None:
    write_bytes(path, text.encode(), setting=setting)


def write_json(path: str | os.PathLike, obj: Any, *, setting: str = "--out") -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n", setting=setting)


def write_csv(path: str | os.PathLike, rows: Sequence[dict], *, setting: str = "--out") -> None:
    """Rows of dicts with the same keys, the header from the first row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue(), setting=setting)


def save_torch(path: str | os.PathLike, obj: Any, *, setting: str = "--out") -> None:
    """``torch.save(obj)`` to memory first, then :func:`write_bytes`: a full disk is then an
    ``OSError`` (a one-line :class:`UsageError`), not torch's ``RuntimeError``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer(), setting=setting)


def clean_stale_tmp(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``directory`` and its
    subdirectories; return their paths relative to ``directory``. Only for a directory this
    process owns (see :class:`ppl_vae.run.rundir.RunDir`): it would delete a live writer's file."""
    root = Path(directory)
    removed = []
    for parent, _, names in os.walk(root):
        for name in names:
            p = Path(parent) / name
            if _TMP.fullmatch(name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(root)))
    return sorted(removed)
