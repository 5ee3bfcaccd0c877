"""The results pages of the docs site: ``docs/results/NAME.md`` and ``NAME.csv``, written by
the benchmark script that makes the table (its ``--docs`` flag), each stamped with the
commit, date, machine, seeds and the exact command, so that re-running the command on a page
rewrites that page.

Everything below the page's notes line (:data:`NOTES`) is written by hand and kept when the
page is written again; everything above it is the script's.

    from results_page import write_page
    write_page("encoder-scale", "The encoder's scale head", table_md, rows, seeds=[0, 1, 2],
               about=__doc__)
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
NOTES = "<!-- notes: written by hand below this line; kept when the script rewrites the page -->"
DOCS_HELP = "also write the table to docs/results/ (the page and its CSV, stamped)"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def commit() -> str:
    """The checkout's commit, and whether files differ from it."""
    head = _git("rev-parse", "--short=12", "HEAD") or "unknown (not a git checkout)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head} (with uncommitted changes)" if dirty else head


def machine() -> str:
    """CPU (model, cores), threads, GPU where one is in use, OS and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores"]
    try:
        import pyro
        import torch

        parts.append(f"{torch.get_num_threads()} torch threads in the script's process")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"GPU {torch.cuda.get_device_name()}")
        parts.append(f"torch {torch.__version__}, pyro {pyro.__version__}")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
    return "; ".join(parts)


def command(argv: Sequence[str] | None = None) -> str:
    """The command line that ran, as one can paste it in the repository's root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(REPO):
        argv[0] = str(script.relative_to(REPO))
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
    return f"{env}python {shlex.join(argv)}"


def docs_rows(results: dict[str, dict], key: str) -> list[dict]:
    """``{name: {field: value}}`` as rows ``{key: name, field: value, ...}``: numbers and
    strings as they are, a list of at most 10 numbers as one cell ("a b c"), longer lists
    and anything else left out (the script's ``--json`` keeps them)."""
    rows = []
    for name, fields in results.items():
        row: dict = {key: name}
        for field, value in fields.items():
            if isinstance(value, list | tuple):
                if len(value) <= 10 and all(isinstance(v, int | float) for v in value):
                    row[field] = " ".join(f"{v:.4g}" for v in value)
            elif isinstance(value, int | float | str) or value is None:
                row[field] = value
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of ``rows`` (every key, in order of first appearance, a column)."""
    def cell(v: object) -> str:  # (no exponents for counts such as images per second)
        if isinstance(v, float):
            return f"{v:,.0f}" if 1e4 <= abs(v) < 1e15 else f"{v:,.4g}"
        return "" if v is None else str(v)

    head = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def page(name: str, title: str, table: str, *, seeds: Sequence[int] | None, about: str | None,
         stamp: dict[str, str], notes: str) -> str:
    what = ""
    if about:  # the first paragraph of the script's docstring
        what = " ".join(about.strip().split("\n\n")[0].split()) + "\n\n"
    cmd, sha = stamp["command"], stamp["commit"]
    rows = [("command", f"`{cmd}`" if re.match(r"(\w+=\S+ )*python ", cmd) else cmd),
            ("commit", f"`{sha}`" if re.fullmatch(r"[0-9a-f]{7,40}( \(.*\))?", sha) else sha),
            ("date", stamp["date"]), ("machine", stamp["machine"]),
            ("seeds", ", ".join(map(str, seeds)) if seeds else "none (no randomness)"),
            ("CSV", f"[{name}.csv]({name}.csv)")]
    head = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"# {title}\n\n{what}| stamp | |\n|---|---|\n{head}\n\n{table.strip()}\n\n"
            f"{NOTES}\n{notes.lstrip()}")


def write_page(name: str, title: str, table: str | None, rows: Sequence[dict], *,
               seeds: Sequence[int] | None = None, about: str | None = None,
               directory: Path = RESULTS) -> Path:
    """Write ``directory/name.md`` (``table``, or one made of ``rows``, under a stamp) and
    ``directory/name.csv`` (``rows``); the old page's notes stay. Returns the page's path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.md"
    notes = "\n## Notes\n\nNone yet.\n"
    if path.is_file() and NOTES in (old := path.read_text()):
        notes = old.split(NOTES, 1)[1]
    stamp = {"command": command(), "commit": commit(), "machine": machine(),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    text = page(name, title, table if table is not None else markdown(rows), seeds=seeds,
                about=about, stamp=stamp, notes=notes)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (directory / f"{name}.csv").write_text(buf.getvalue())
    path.write_text(text)
    print(f"results page written: {path}", file=sys.stderr)
    return path
