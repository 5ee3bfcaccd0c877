"""Run directories and atomic writes: modes, full or read-only disks, locks, staging."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ppl_vae import files
from ppl_vae.errors import UsageError, command_line
from ppl_vae.files import clean_stale_tmp, save_torch, write_csv, write_json, write_text
from ppl_vae.run import rundir as rundir_module
from ppl_vae.run.rundir import DirLock, RunDir

PACKAGE = Path(files.__file__).parent


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (hidden ones too): file contents, ``None`` for directories."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def old_run(path: Path) -> dict[str, bytes | None]:
    """A finished CVAE-like run in ``path``, with subdirectories of sub-runs."""
    write_json(path / "summary.json", {"old": True})
    write_csv(path / "cll_table.csv", [{"k": 1}])
    write_csv(path / "baseline_metrics.csv", [{"epoch": 1}])
    write_text(path / "samples_by_label.png", "png")
    write_text(path / "q1" / "checkpoint.pt", "old q1")
    write_text(path / "q2" / "metrics.csv", "old q2")
    return snapshot(path)


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# atomic writes


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_torch(tmp_path / "c.pt", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    for name in ("a.json", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
    assert torch.load(tmp_path / "c.pt")["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_full_disk_is_a_one_line_usage_error_and_leaves_the_old_file(tmp_path, monkeypatch,
                                                                    stage):
    path = tmp_path / "checkpoint.pt"
    save_torch(path, {"old": 1})
    before = path.read_bytes()

    def full(*_):
        raise oserror(errno.ENOSPC)

    if stage == "write":
        with pytest.raises(UsageError) as e:
            files.atomic_write(path, full)
    else:
        monkeypatch.setattr(files.os, stage, full)
        with pytest.raises(UsageError) as e:
            save_torch(path, {"new": 2})
    assert str(e.value) == (f"cannot write {str(path)!r}: No space left on device; free space "
                            "or choose another out")
    with command_line():
        assert str(e.value).endswith("free space or choose another --out")
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no .tmp left


def test_other_errors_from_the_writer_propagate_and_leave_no_tmp(tmp_path):
    def broken(_):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        files.atomic_write(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_read_only_disk_is_a_usage_error_naming_the_path(tmp_path, monkeypatch):
    def read_only(*_, **__):
        raise oserror(errno.EROFS)

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(UsageError, match=r"cannot write '.*/r\.json': Read-only file system; "
                                         r"make it writable or choose another out"):
        write_json(tmp_path / "r.json", {})
    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "new" / "run"
    with pytest.raises(UsageError, match=re.escape(f"cannot create out={str(out)!r}: Read-only "
                                                   "file system; choose another directory")):
        RunDir.open(str(out), "vae")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod")
def test_unwritable_directory_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(UsageError, match="Permission denied"):
            write_json(locked / "a.json", {})
        with pytest.raises(UsageError, match="Permission denied"):
            RunDir.open(str(locked), "vae")
    finally:
        locked.chmod(0o755)


def test_clean_stale_tmp_removes_only_what_atomic_write_leaves(tmp_path):
    for name in (".summary.json.ab_9cd12.tmp", "q1/.checkpoint.pt.zzzzzzzz.tmp",
                 "notes.tmp", ".keep.tmp", "summary.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    assert clean_stale_tmp(tmp_path) == [".summary.json.ab_9cd12.tmp",
                                         "q1/.checkpoint.pt.zzzzzzzz.tmp"]
    assert sorted(snapshot(tmp_path)) == [".keep.tmp", "notes.tmp", "q1", "summary.json"]


# run directories


def test_fresh_directory_is_written_in_place_and_the_lock_goes_at_close(tmp_path):
    out = tmp_path / "a" / "run"
    with RunDir.open(str(out), "vae") as d:
        assert d.path == d.final == out
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        write_json(d / "config.json", {})
    assert sorted(snapshot(out)) == ["config.json"]


def test_a_file_or_a_directory_holding_files_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match=r"^out='.*/f' is a file; give a directory$"):
        RunDir.open(str(tmp_path / "f"), "vae", setting="--out")
    before = old_run(tmp_path / "run")
    with pytest.raises(UsageError) as e:
        RunDir.open(str(tmp_path / "run"), "vae")
    with command_line():
        assert str(e.value) == (f"--out {str(tmp_path / 'run')!r} already holds files; choose "
                                "a new directory, or pass --overwrite to delete them all (at "
                                "the new run's first checkpoint)")
    assert "pass overwrite=True to delete them all" in str(e.value)
    assert snapshot(tmp_path / "run") == before  # lock released, nothing touched


def test_a_directory_that_is_not_ours_is_refused_untouched(tmp_path):
    """Refused before anything is removed: files named like a killed run's leftovers in a
    directory holding other files, a .lock that is not a pid (or a link), and the temporary
    files of a run directory nested inside one that is cleaned (it cleans itself)."""
    out = tmp_path / "victim"
    for name in (".staging-abcdefgh/thesis.tex", "sub/deep/.notes.abcdefgh.tmp", "readme.txt",
                 ".x.abcdefgh.tmp"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    before = snapshot(out)
    with pytest.raises(UsageError, match="already holds files"):
        RunDir.open(str(out), "vae")
    assert snapshot(out) == before
    (out / ".lock").write_text("my notes\n")
    before = snapshot(out)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(UsageError, match=r"holds a \.lock file that is not a ppl_vae lock"):
            RunDir.open(str(out), "vae", **flags)
        assert snapshot(out) == before
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(out / "readme.txt")
    with pytest.raises(UsageError, match="cannot lock"):
        RunDir.open(str(out), "vae", resume=True)
    assert (out / "readme.txt").read_text() == "mine"
    (out / ".lock").unlink()
    live = out / "sub" / "live-run"  # another run's directory, in use
    (live / ".lock").parent.mkdir()
    (live / ".lock").write_text("1\n")
    (live / ".c.pt.abcdefgh.tmp").write_text("being written")
    assert clean_stale_tmp(out) == [".x.abcdefgh.tmp", "sub/deep/.notes.abcdefgh.tmp"]
    assert (live / ".c.pt.abcdefgh.tmp").exists()


def test_default_names_are_unique_when_opened_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir_module, "_timestamp", lambda: "20240101-000000")
    barrier, dirs, errors = threading.Barrier(8), [], []

    def start():
        barrier.wait()
        try:
            dirs.append(RunDir.open(None, "cvae:q1/x"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    base = "cvae-q1-x-20240101-000000"
    assert sorted(d.final.name for d in dirs) == sorted([base] + [f"{base}-{n}"
                                                                  for n in range(2, 9)])
    assert all(d.final.parent == Path("runs") for d in dirs)
    for d in dirs:
        d.close(ok=False)  # fresh and failed: nothing left
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_directory_in_use_is_refused_until_its_holder_dies(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, types\n"
         "pkg = types.ModuleType('ppl_vae'); pkg.__path__ = [sys.argv[1]]\n"
         "sys.modules['ppl_vae'] = pkg  # rundir alone: no torch to import\n"
         "from ppl_vae.run.rundir import RunDir\n"
         "d = RunDir.open(sys.argv[2], 'vae')\n"
         "(d.path / 'metrics.csv').write_text('epoch')\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n",
         str(PACKAGE), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n", holder.stderr.read()
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(UsageError) as e, command_line():
                RunDir.open(str(out), "vae", **flags)
            with command_line():
                assert str(e.value) == (f"--out {str(out)!r} is in use by another run "
                                        f"(pid {holder.pid}); wait for it to finish or choose "
                                        "another directory")
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        holder.wait()
    assert sorted(snapshot(out)) == [".lock", "metrics.csv"]
    with RunDir.open(str(out), "vae", resume=True) as d:
        assert d.path == out
    assert sorted(snapshot(out)) == ["metrics.csv"]


def test_the_same_directory_twice_in_one_process_is_refused(tmp_path):
    with RunDir.open(str(tmp_path / "run"), "vae"):
        with pytest.raises(UsageError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            RunDir.open(str(tmp_path / "run"), "vae", overwrite=True)
        with pytest.raises(UsageError, match="in use"):
            DirLock.acquire(tmp_path / "run")
    lock = DirLock.acquire(tmp_path / "run")  # free again
    assert lock.held
    lock.release()
    assert not lock.held and not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("left", [".staging-abcd1234/summary.json",  # killed before commit
                                  ".trash-0000abcd/old.csv"])  # killed as commit cleaned up
def test_open_removes_what_a_killed_run_left(tmp_path, left):
    out = tmp_path / "run"
    write_text(out / "metrics.csv", "epoch")
    for junk in (".metrics.csv.a1b2c3d4.tmp", "q1/.checkpoint.pt.zz_zz_zz.tmp", left):
        (out / junk).parent.mkdir(parents=True, exist_ok=True)
        (out / junk).write_text("junk")
    (out / ".lock").write_text("12345\n")  # its holder died
    with RunDir.open(str(out), "vae", resume=True) as d:
        assert sorted(snapshot(d.final)) == [".lock", "metrics.csv", "q1"]


def test_overwrite_stages_until_commit_then_only_the_new_run_remains(tmp_path):
    out = tmp_path / "run"
    before = old_run(out)
    d = RunDir.open(str(out), "vae", overwrite=True)
    assert d.final == out and d.path != out and d.path.parent == out
    assert d.path.name.startswith(".staging-")
    write_json(d / "summary.json", {"new": True})
    (d / "q1").mkdir()
    save_torch(d / "q1" / "checkpoint.pt", {"new": 1})
    # the old run is intact and readable until commit
    assert {k: v for k, v in snapshot(out).items()
            if not k.startswith((".lock", ".staging-"))} == before
    d.commit()
    d.commit()  # idempotent
    assert d.path == d.final == out
    assert sorted(snapshot(out)) == [".lock", "q1", "q1/checkpoint.pt", "summary.json"]
    write_text(d / "metrics.csv", "epoch")  # written in place after commit
    d.close(ok=False)  # failing after commit keeps the new run
    assert sorted(snapshot(out)) == ["metrics.csv", "q1", "q1/checkpoint.pt", "summary.json"]
    assert (out / "summary.json").read_text() == '{\n  "new": true\n}\n'


def test_a_failure_before_commit_leaves_the_old_run_exactly_as_it_was(tmp_path):
    out = tmp_path / "run"
    before = old_run(out)
    with pytest.raises(KeyError), RunDir.open(str(out), "vae", overwrite=True) as d:
        write_json(d / "summary.json", {"new": True})
        (d / "q3").mkdir()
        write_text(d / "q3" / "metrics.csv", "epoch")
        raise KeyError("diverged")
    assert snapshot(out) == before


def test_close_ok_commits(tmp_path):
    out = tmp_path / "run"
    old_run(out)
    with RunDir.open(str(out), "vae", overwrite=True) as d:
        write_json(d / "summary.json", {"new": True})
    assert sorted(snapshot(out)) == ["summary.json"]
    assert d.committed


@pytest.mark.parametrize("where", ["new", "empty", "default"])
def test_a_fresh_directory_failing_before_commit_leaves_nothing(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    out = {"new": "a/b/run", "empty": "empty", "default": None}[where]
    if where == "empty":
        (tmp_path / "empty").mkdir()
    d = RunDir.open(out, "vae")
    write_json(d / "config.json", {})
    (d / "q1").mkdir()
    write_text(d / "q1" / "metrics.csv", "epoch")
    d.close(ok=False)
    d.close(ok=False)  # idempotent
    assert snapshot(tmp_path) == ({"empty": None} if where == "empty" else {})


def test_resume_writes_in_place_and_a_failure_keeps_the_files(tmp_path):
    out = tmp_path / "run"
    before = old_run(out)
    with pytest.raises(KeyError), RunDir.open(str(out), "vae", resume=True) as d:
        assert d.path == out
        raise KeyError
    assert snapshot(out) == before


def test_a_follower_shares_the_paths_and_owns_nothing(tmp_path):
    """A torchrun rank > 0: rank 0 holds the lock; the follower's commit and close do
    nothing."""
    out = tmp_path / "run"
    with RunDir.open(str(out), "vae") as owner:
        follower = RunDir.follow(out)
        assert follower.path == follower.final == out and os.fspath(follower) == str(out)
        follower.commit()
        follower.close(ok=False)
        with follower:
            pass
        assert (out / ".lock").exists() and owner.final == out
    assert not (out / ".lock").exists()


def test_overwrite_never_empties_the_working_directory(tmp_path, monkeypatch):
    old_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"^out='\.' is the working, home or root directory, "
                                         "which overwrite=True would empty"):
        RunDir.open(".", "vae", overwrite=True)
    assert (tmp_path / "cll_table.csv").exists() and not (tmp_path / ".lock").exists()


def test_a_replacement_killed_midway_is_refused_not_deleted(tmp_path):
    """Killed inside commit(), after some old files went to .trash-* and before the staged
    ones all moved out: both hold what the user may want; refused, nothing removed. Killed
    before the first move (an empty .trash-*) or after the last (no .staging-*): cleaned."""
    out = tmp_path / "run"
    for name in (".trash-abcd1234/summary.json", ".staging-efgh5678/checkpoint.pt",
                 "metrics.csv"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    before = snapshot(out)
    for flags in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(UsageError, match=r"was being replaced when its run was killed "
                                             r"\(\.staging-efgh5678, \.trash-abcd1234 hold"):
            RunDir.open(str(out), "vae", **flags)
        assert snapshot(out) == before
    (out / ".trash-abcd1234" / "summary.json").unlink()
    with RunDir.open(str(out), "vae", resume=True):
        assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.csv"]
