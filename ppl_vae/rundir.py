"""Run directories: where a run's files go, created only once its options have proved good."""

from __future__ import annotations

import time
from pathlib import Path

from .errors import UsageError


def resolve_run_dir(out: str | None, stem: str, overwrite: bool = False,
                    setting: str = "--out") -> Path:
    """``out``, or a new ``runs/<stem>-<time>[-n]``; :class:`UsageError` if ``out`` is a file
    or already holds files without ``overwrite`` (``setting`` names the option in errors)."""
    if out is None:
        base = Path("runs") / f"{stem.replace(':', '-').replace('/', '-')}-" \
                              f"{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{setting} {str(path)!r} is a file; give a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        flag = "--overwrite" if setting.startswith("--") else "overwrite=True"
        raise UsageError(f"{setting} {str(path)!r} already holds files; choose a new directory "
                         f"or pass {flag}")
    return path


def make_run_dir(path: Path, setting: str = "--out") -> Path:
    """Create ``path`` (and its parents); :class:`UsageError` when that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {setting} {str(path)!r} ({e.strerror}); choose another "
                         "directory") from None
    return path
