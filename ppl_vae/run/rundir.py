"""Run directories: one directory, owned by one run at a time.

:meth:`RunDir.open` locks ``<dir>/.lock`` (an ``flock``: a killed run never blocks it),
removes what a killed run left, and writes in place into an empty (or new) directory or with
``resume``; into a hidden ``<dir>/.staging-XXXXXXXX`` with ``overwrite``, swapped in by
:meth:`RunDir.commit`; else :class:`UsageError`. A run that fails before the commit leaves
the directory as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import UsageError
from ..files import STALE_TMP, clean_stale_tmp

LOCK = ".lock"
_OURS = re.compile(r"\.(staging|trash)-[a-z0-9_]{8}")  # tempfile.mkdtemp names of ours


def _cannot(verb: str, path: Path, e: OSError, setting: str) -> UsageError:
    return UsageError(f"cannot {verb} {setting} {str(path)!r}: {e.strerror or e}; "
                      "choose another directory")


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``<directory>/.lock`` (holding our pid), which
    the kernel drops when the process dies. Usable alone; :class:`RunDir` takes one."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, directory: str | os.PathLike, setting: str = "--out") -> DirLock:
        """Lock ``directory`` (which must exist), or :class:`UsageError` if another process
        (or another open in this one) holds it."""
        directory = Path(directory)
        path = directory / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                raise _cannot("lock", directory, e, setting) from e
            if not re.fullmatch(rb"(\d+\n)?", os.pread(fd, 32, 0)):  # (a pid, or nothing yet)
                os.close(fd)
                raise UsageError(f"{setting} {str(directory)!r} holds a {LOCK} file that is not "
                                 "a ppl_vae lock; choose another directory")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if not isinstance(e, BlockingIOError):
                    raise _cannot("lock", directory, e, setting) from e
                by = f" (pid {pid})" if pid.isdigit() else ""
                raise UsageError(f"{setting} {str(directory)!r} is in use by another run{by}; "
                                 "wait for it to finish or choose another directory") from None
            lock = cls(fd, path)
            if lock.intact():  # (its last holder may have unlinked it: try again)
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # the pid only makes the "in use" message better
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def intact(self) -> bool:
        """Whether the lock file is still ours at its path (not deleted with its directory)."""
        try:
            return self._fd is not None and os.path.samestat(os.fstat(self._fd),
                                                             os.stat(self.path))
        except OSError:
            return False

    def release(self) -> None:
        """Delete the lock file and unlock; idempotent. (Deleting is safe: a process that
        opened the old file sees it is gone once it gets the lock, and tries again.)"""
        if self._fd is None:
            return
        if self.intact():  # (not another run's, where the directory was replaced)
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _in_use(paths: list[Path]) -> Path | None:
    """The first directory in or below ``paths`` whose ``.lock`` another process holds."""
    for top in paths:
        for parent, _, names in os.walk(top) if top.is_dir() and not top.is_symlink() else ():
            if LOCK not in names:
                continue
            try:
                fd = os.open(Path(parent) / LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (free: released at close)
            except BlockingIOError:
                return Path(parent)
            except OSError:
                pass
            finally:
                os.close(fd)
    return None


class RunDir:
    """One run's directory, locked for the run's lifetime (:meth:`open`). ``final`` is the
    directory; ``path`` where files go now (the staging directory until :meth:`commit`)."""

    def __init__(self, final: Path, lock: DirLock | None, created: list[Path], setting: str):
        self.final = final
        self.setting = setting
        self._lock = lock
        self._created = created  # directories open() made, outermost first
        self._staging: Path | None = None
        self._fresh = False  # the directory was new or empty: a failed run removes its files
        self.committed = False
        self._closed = False

    @classmethod
    def open(cls, out: str | os.PathLike | None, stem: str, *, overwrite: bool = False,
             resume: bool = False, setting: str = "--out") -> RunDir:
        """Lock and prepare ``out`` (created with its parents), or a new
        ``runs/<stem>-<YYYYmmdd-HHMMSS>[-n]``; see the module. Errors name ``setting``."""
        final, created = _default_dir(stem, setting) if out is None else _make_dir(Path(out),
                                                                                  setting)
        try:
            lock = DirLock.acquire(final, setting)
        except BaseException:
            _rmdirs(created)
            raise
        run = cls(final, lock, created, setting)
        try:
            run._prepare(overwrite, resume)
        except BaseException:
            run.close(ok=False)
            raise
        return run

    def _prepare(self, overwrite: bool, resume: bool) -> None:
        """Refuse a directory holding files (other than what a killed run of ours left) unless
        ``resume`` or ``overwrite``, touching nothing; then remove those leftovers."""
        try:
            entries = list(self.final.iterdir())
            held = [p for p in entries if p.name != LOCK and not _leftover(p)]
            ours = [p for p in entries if _leftover(p) and p.is_dir()]
            staged = [p for p in ours if p.name.startswith(".staging-")]
            trashed = [p for p in ours if p.name.startswith(".trash-") and any(p.iterdir())]
        except OSError as e:
            raise _cannot("read", self.final, e, self.setting) from e
        if staged and trashed:  # a commit killed midway: old files in .trash-*, new in both
            raise UsageError(f"{self.setting} {str(self.final)!r} was being replaced when its "
                             f"run was killed ({', '.join(sorted(p.name for p in ours))} hold "
                             "the old run and the rest of the new one); move out what to keep, "
                             "delete them, and run again")
        self._fresh = not held
        if held and not resume:
            if not overwrite:
                raise UsageError(f"{self.setting} {str(self.final)!r} already holds files; "
                                 "choose a new directory, or pass --overwrite to delete them "
                                 "all (at the new run's first checkpoint)")
            real, cwd = self.final.resolve(), Path.cwd().resolve()
            if real in (Path.home().resolve(), Path(real.anchor)) or cwd.is_relative_to(real):
                raise UsageError(f"{self.setting} {str(self.final)!r} is the working, home or "
                                 "root directory, which --overwrite would empty; choose a run "
                                 "directory")
            if (busy := _in_use(held)) is not None:
                raise UsageError(f"{self.setting} {str(self.final)!r} holds a run in progress "
                                 f"in {str(busy)!r}, which --overwrite would delete; wait for "
                                 "it to finish or stop it")
        try:
            clean_stale_tmp(self.final)
            for p in ours:
                shutil.rmtree(p)
            if held and not resume:
                self._staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.final))
        except OSError as e:
            raise _cannot("write to", self.final, e, self.setting) from e

    @classmethod
    def follow(cls, final: str | os.PathLike) -> RunDir:
        """Another process's run directory (a torchrun rank > 0; rank 0 owns it): its final
        path, no lock; commit and close do nothing."""
        run = cls(Path(final), None, [], "--out")
        run.committed = True
        return run

    @property
    def path(self) -> Path:
        return self._staging if self._staging is not None else self.final

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def check(self) -> None:
        """:class:`UsageError` if the directory (its ``.lock``) was removed or replaced while
        the run held it: writing on would make a run directory without its record."""
        if self._lock is not None and not self._lock.intact():
            raise UsageError(f"{self.setting} {str(self.final)!r} was removed or replaced while "
                             "the run trained (its .lock is gone); nothing more is written "
                             "there: run again")

    def commit(self) -> None:
        """Make this run's files the directory's (staged: the old entries but ``.lock`` go,
        the staged move in); idempotent, the lock stays held. Call at the first checkpoint."""
        if self.committed:
            return
        if self._closed:
            raise RuntimeError(f"commit() after close() of {self.final}")
        staging = self._staging
        if staging is not None:
            try:
                trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.final))
                moved: list[str] = []
                try:
                    for p in list(self.final.iterdir()):
                        if p.name not in (LOCK, staging.name, trash.name):
                            os.rename(p, trash / p.name)
                            moved.append(p.name)
                except OSError:
                    for name in moved:  # put the old run back as it was
                        os.rename(trash / name, self.final / name)
                    trash.rmdir()
                    raise
                for p in list(staging.iterdir()):
                    os.rename(p, self.final / p.name)
                staging.rmdir()
            except OSError as e:
                raise _cannot("replace the old run in", self.final, e, self.setting) from e
            self._staging = None
            shutil.rmtree(trash, ignore_errors=True)  # left over: the next open removes it
        self.committed = True

    def close(self, ok: bool = True) -> None:
        """Release the lock; idempotent. ``ok`` commits first; not ``ok`` and never committed:
        the staging goes, and in a new or empty directory all this run wrote (and made)."""
        if self._closed:
            return
        gone = self._lock is not None and not self._lock.intact()  # (then touch nothing)
        discard = not ok and not self.committed and not gone
        try:
            if ok and not gone:
                self.commit()
            elif discard:
                if self._staging is not None:
                    shutil.rmtree(self._staging, ignore_errors=True)
                    self._staging = None
                if self._fresh:
                    for p in [p for p in self.final.iterdir() if p.name != LOCK]:
                        if p.is_dir() and not p.is_symlink():
                            shutil.rmtree(p)
                        else:
                            p.unlink(missing_ok=True)
        finally:
            self._closed = True
            if self._lock is not None:
                self._lock.release()
            if discard and self._fresh:
                _rmdirs(self._created)

    def __repr__(self) -> str:
        return f"RunDir({str(self.final)!r}, path={str(self.path)!r})"


def _leftover(p: Path) -> bool:
    """What a killed run of ours leaves: a staging or trash directory, a temporary file."""
    ours = _OURS if p.is_dir() else STALE_TMP
    return bool(ours.fullmatch(p.name)) and not p.is_symlink()


def _missing(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist, outermost first."""
    return [p for p in reversed((path, *path.parents)) if not p.exists()]


def _rmdirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return  # not empty (another run's) or gone


def _make_dir(path: Path, setting: str) -> tuple[Path, list[Path]]:
    try:  # (exists() itself raises for a name the file system refuses, e.g. too long)
        if path.exists() and not path.is_dir():
            raise UsageError(f"{setting} {str(path)!r} is a file; give a directory")
        created = _missing(path)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot("create", path, e, setting) from e
    return path, created


def _default_dir(stem: str, setting: str) -> tuple[Path, list[Path]]:
    """A new ``runs/<stem>-<time>[-n]`` made by an exclusive mkdir: never another's."""
    root = Path("runs")
    created = _missing(root)
    base = f"{stem.replace(':', '-').replace('/', '-')}-{_timestamp()}"
    n = 1
    while True:
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            path.mkdir()
            return path, [*created, path]
        except FileExistsError:
            n += 1
        except OSError as e:
            raise _cannot("create", path, e, setting) from e
