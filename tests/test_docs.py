"""The README and the docs site checked like code.

* the site builds with ``mkdocs build --strict`` and no warning, and loads nothing from
  another host (slow; skipped where the docs extra is not installed);
* every ``python -m ppl_vae ...`` command (also ``ppl-vae ...``, the old spellings
  ``python -m ppl_vae.train ...`` and ``torchrun ... -m ppl_vae ...``) in a code block or an
  inline code span is parsed by the real parser and the options built from it: an unknown
  flag or a bad value fails;
* every Python block runs, in order per page, in a fresh directory, in quick mode;
* every relative link (pages, files, images, anchors) resolves;
* and the checker itself: a broken link, an unknown flag and a failing block each fail it.

A Python block whose first line is ``# file: NAME.py`` is also written to that file before the
page's commands and later blocks run (``--model my_models:TinyVAE`` imports it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
COMMANDS = ("train", "evaluate", "compare", "appendix", "experiment")
OLD_SPELLINGS = {"ppl_vae.train": "train", "ppl_vae.evaluate": "evaluate",
                 "ppl_vae.compare": "compare"}


def _id(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# -- reading the Markdown -----------------------------------------------------------------------
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)\n(?P<body>.*?)"
                   r"^(?P=indent)(?P=fence)[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(?<!`)`(?!`)([^`]+?)`(?!`)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


@dataclasses.dataclass
class Block:
    lang: str
    body: str
    line: int  # of the block's first line of code


def blocks(text: str) -> list[Block]:
    out = []
    for m in FENCE.finditer(text):
        indent = len(m.group("indent"))
        body = "\n".join(line[indent:] for line in m.group("body").splitlines()) + "\n"
        out.append(Block(m.group("info").strip().split(" ")[0].lower(), body,
                         text.count("\n", 0, m.start()) + 2))
    return out


def prose(text: str) -> str:
    """The text outside fenced blocks (line count kept)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def slugify(text: str) -> str:
    """A heading's anchor as Python-Markdown's toc (MkDocs) makes it from its rendered text."""
    text = re.sub(r"\{:?[^}]*#([\w-]+)[^}]*\}\s*$", "", text)  # attr_list {#id} handled apart
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = prose(path.read_text())
    found = {slugify(m.group(2)) for m in HEADING.finditer(text)}
    found |= set(re.findall(r"\{[^}]*#([\w-]+)[^}]*\}", text))  # {#id}
    found |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return found


# -- links --------------------------------------------------------------------------------------
def link_target(page: Path, target: str) -> Path:
    """The file a relative link points to; ``tutorials/NAME.ipynb`` in the site is
    ``notebooks/NAME.ipynb`` (the docs hook adds them)."""
    path = (page.parent / target).resolve()
    if not path.exists() and path.suffix == ".ipynb" and path.parent == DOCS / "tutorials":
        return REPO / "notebooks" / path.name
    return path


def broken_links(page: Path) -> list[str]:
    """Every relative link of ``page`` whose file or anchor does not exist."""
    text = INLINE.sub(lambda m: " " * len(m.group(0)), prose(page.read_text()))
    bad = []
    for target in [*LINK.findall(text), *REFERENCE.findall(text)]:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = link_target(page, file) if file else page
        if not path.exists():
            bad.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target}: no heading #{anchor} in {_id(path)}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_links_resolve(page):
    assert not broken_links(page), f"{_id(page)}: broken links:\n" + "\n".join(broken_links(page))


# -- commands -----------------------------------------------------------------------------------
def split_commands(tokens: list[str]) -> Iterator[list[str]]:
    """``a && b; c | d`` -> [a], [b], [c], [d]."""
    current: list[str] = []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            if current:
                yield current
            current = []
        else:
            current.append(token)
    if current:
        yield current


def ours(argv: list[str]) -> list[str] | None:
    """``[COMMAND, *args]`` if ``argv`` runs ppl_vae (env assignments skipped), else None."""
    while argv and re.match(r"^\w+=", argv[0]):
        argv = argv[1:]
    if not argv:
        return None
    if argv[0] == "ppl-vae":
        return argv[1:]
    if argv[0] == "torchrun":
        return ["torchrun", *argv[1:]] if "ppl_vae" in argv else None
    if re.fullmatch(r"python[0-9.]*", argv[0]) and argv[1:2] == ["-m"] and len(argv) > 2:
        if argv[2] == "ppl_vae":
            return argv[3:]
        if argv[2] in OLD_SPELLINGS:
            return [OLD_SPELLINGS[argv[2]], *argv[3:]]
    return None


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """Every ppl_vae command in ``page``: (where, [COMMAND, *args]) from shell blocks (lines
    joined at a trailing backslash, comments dropped) and inline code spans."""
    text, found = page.read_text(), []
    for block in blocks(text):
        if block.lang not in ("bash", "sh", "shell", "console", "zsh"):
            continue
        joined = re.sub(r"\\\n", " ", block.body)
        for i, line in enumerate(joined.splitlines()):
            line = re.sub(r"^\s*\$ ", "", line)
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:
                found.append((f"block at line {block.line}: {line}", ["<unreadable>", str(e)]))
                continue
            for argv in split_commands(tokens):
                if (command := ours(argv)) is not None:
                    found.append((f"line ~{block.line + i}: {shlex.join(argv)}", command))
    plain = prose(text)
    for m in INLINE.finditer(plain):
        span = " ".join(m.group(1).split())
        if "{" in span or "..." in span:  # a usage pattern, not a command
            continue
        try:
            argv = shlex.split(span)
        except ValueError:
            continue
        if (command := ours(argv)) is not None:
            found.append((f"line {plain.count(chr(10), 0, m.start()) + 1}: `{span}`", command))
    return found


@contextlib.contextmanager
def _no_exit() -> Iterator[io.StringIO]:
    """argparse's exits as AssertionError (its message in it); a --help exit is fine."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            yield err
    except SystemExit as e:
        if e.code not in (0, None):
            lines = err.getvalue().strip().splitlines() or [f"exit status {e.code}"]
            raise AssertionError(lines[-1]) from None  # (not a whole usage text)
        raise _Help from None


class _Help(Exception):
    """The command asked for --help: parsed, nothing more to build."""


def check_command(command: list[str]) -> None:
    """Parse ``[COMMAND, *args]`` as ppl_vae does, and build the options it would run with.
    Raises AssertionError naming what is wrong."""
    from ppl_vae.errors import UsageError

    try:
        _check(command)
    except _Help:
        pass
    except UsageError as e:
        raise AssertionError(str(e)) from None


def _check(command: list[str]) -> None:
    from ppl_vae import cli
    from ppl_vae.config import TrainConfig
    from ppl_vae.run.session import resolve  # what a run does first: recipe, options, --elbo

    if not command:  # the program named, not run (`ppl-vae`, `python -m ppl_vae`)
        return
    name, args = command[0], command[1:]
    if name == "torchrun":
        from torch.distributed.run import get_args_parser

        with _no_exit():
            launch = get_args_parser().parse_args(args)
        if not (launch.module and launch.training_script == "ppl_vae"):
            raise AssertionError(f"torchrun does not run -m ppl_vae: {shlex.join(args)}")
        return _check(list(launch.training_script_args))
    if name not in COMMANDS:
        raise AssertionError(f"unknown command {name!r}; one of {', '.join(COMMANDS)}")
    if not args:  # the command named, not run
        return
    with _no_exit():
        if name == "train":
            resolve(TrainConfig(**cli._parse(args)))
        elif name == "compare":
            from ppl_vae.evaluation.comparison import CompareConfig

            parsed = cli._parse(args, compare=True)
            own = {f.name: parsed.pop(f.name) for f in dataclasses.fields(CompareConfig)
                   if f.name in parsed}
            parsed.pop("out", None)
            CompareConfig(train=resolve(TrainConfig(**parsed))[0], **own)
        elif name == "evaluate":
            from ppl_vae.evaluation.runs import EvaluateOptions

            EvaluateOptions(**vars(cli.evaluate_parser().parse_args(args)))
        elif name == "appendix":
            from ppl_vae.appendix.__main__ import AppendixOptions, parser

            parsed = vars(parser().parse_args(args))
            parsed.pop("part")
            AppendixOptions(**parsed)
        else:  # experiment NAME [its options] [train's options for its model]
            from ppl_vae.experiments import EXPERIMENTS

            if args[0] in ("-h", "--help"):
                return
            if args[0] not in EXPERIMENTS:
                raise AssertionError(f"unknown experiment {args[0]!r}")
            _, model, options, _ = EXPERIMENTS[args[0]]
            pre = cli.Parser(prog="experiment", add_help=False)
            pre.add_argument("name")
            cli.add_options(pre, options)
            if "-h" in args or "--help" in args:
                return
            known, rest = pre.parse_known_args(args)
            options(**{f.name: getattr(known, f.name) for f in dataclasses.fields(options)})
            resolve(TrainConfig(**cli._parse(["--model", model, *rest])))


def write_files(page: Path, where: Path) -> None:
    """The page's ``# file: NAME.py`` blocks, written to ``where``."""
    for block in blocks(page.read_text()):
        first = block.body.split("\n", 1)[0]
        if block.lang == "python" and (m := re.fullmatch(r"# file: ([\w.]+\.py)", first)):
            (where / m.group(1)).write_text(block.body)


@pytest.fixture
def page_dir(tmp_path, monkeypatch):
    """A fresh working directory on sys.path, its modules forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and \
                str(sys.modules[name].__file__).startswith(str(tmp_path)):
            del sys.modules[name]


def bad_commands(page: Path) -> list[str]:
    bad = []
    for where, command in commands(page):
        try:
            check_command(command)
        except AssertionError as e:
            bad.append(f"{where}\n    -> {e}")
    return bad


PAGES_WITH_COMMANDS = [p for p in PAGES if commands(p)]


@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS, ids=_id)
def test_documented_commands_parse(page, page_dir):
    write_files(page, page_dir)
    for _, command in commands(page):  # a run's config.json the page made before: stand-ins
        for flag_, value in zip(command, command[1:], strict=False):
            if flag_ == "--config" and not Path(value).is_absolute():
                (page_dir / value).parent.mkdir(parents=True, exist_ok=True)
                (page_dir / value).write_text("{}")
    bad = bad_commands(page)
    assert not bad, f"{_id(page)}: commands the parser refuses:\n" + "\n".join(bad)


def test_the_readme_and_docs_show_commands_of_every_kind():
    """The command check sees what it should: every command and torchrun (the old spellings,
    python -m ppl_vae.train and the like, are checked as the command they name)."""
    seen = {c[0] for p in PAGES for _, c in commands(p) if c}
    assert {*COMMANDS, "torchrun"} <= seen, seen


# -- Python blocks ------------------------------------------------------------------------------
RUNNER = r"""
import json, os, re, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for block in blocks:
    code = block["code"]
    first = code.split("\n", 1)[0]
    m = re.fullmatch(r"# file: ([\w.]+\.py)", first)
    if m:
        open(m.group(1), "w").write(code)
    try:  # (compiled at its line in the page: a traceback names the page's lines)
        exec(compile("\n" * (block["line"] - 1) + code, block["page"], "exec"), namespace)
    except BaseException:
        print(f"FAILED: the block at {block['page']}:{block['line']}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
print(f"{len(blocks)} blocks ran")
"""


def quick(code: str) -> str:
    """A block as the tests run it: MNIST as digits, at most 2 epochs."""
    code = re.sub(r"""dataset\s*=\s*(["'])mnist\1""", 'dataset="digits"', code)
    return re.sub(r"\bepochs\s*=\s*(\d+)", lambda m: f"epochs={min(int(m.group(1)), 2)}", code)


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page.read_text()) if b.lang in ("python", "py", "python3")]


def run_blocks(page: Path, where: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Every Python block of ``page``, in order, in one fresh interpreter in ``where``."""
    spec = [{"page": _id(page), "line": b.line, "code": quick(b.body)}
            for b in python_blocks(page)]
    (where / "_blocks.json").write_text(json.dumps(spec))
    (where / "_run_blocks.py").write_text(RUNNER)
    path = os.pathsep.join(filter(None, [str(where), str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PPL_VAE_QUICK": "1", "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "_run_blocks.py", "_blocks.json"], cwd=where,
                          env=env, capture_output=True, text=True, timeout=timeout)


PAGES_WITH_PYTHON = [p for p in PAGES if python_blocks(p)]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=_id)
def test_python_blocks_run(page, tmp_path):
    done = run_blocks(page, tmp_path)
    assert done.returncode == 0, f"{_id(page)}:\n{done.stderr[-4000:]}"


# -- the strict build ---------------------------------------------------------------------------
def _docs_extra_missing() -> str | None:
    import importlib.util

    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter")
               if importlib.util.find_spec(m.split(".")[0]) is None]
    return f"the docs extra is not installed (no {', '.join(missing)}): " \
           'pip install -e ".[docs]"' if missing else None


@pytest.mark.slow
def test_the_site_builds_strictly_and_offline(tmp_path):
    if (why := _docs_extra_missing()) is not None:
        pytest.skip(why)
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "WARNING" not in log, log[-6000:]
    pages = {p: p.read_text() for p in site.rglob("*.html")}
    remote = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""")
    loads = [f"{p.relative_to(site)}: {m.group(0)}" for p, html in pages.items()
             for m in remote.finditer(html)]
    assert not loads, "pages load from another host:\n" + "\n".join(loads[:20])
    assert (site / "assets" / "katex" / "katex.min.js").is_file()
    tutorial = (site / "tutorials" / "01_vae_quickstart" / "index.html").read_text()
    assert "data:image/png;base64" in tutorial  # the committed figures
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "usage: python -m ppl_vae train" in cli and "--encoder-scale" in cli
    assert "arithmatex" in (site / "howto" / "estimators" / "index.html").read_text()


# -- the checker, checked -----------------------------------------------------------------------
def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[fine](other.md#a-section) [here](#page)\n"
                    "[gone](missing.md) [no anchor](other.md#nowhere) ![img](nope.png)\n"
                    "```bash\n[not a link](in-code.md)\n```\n")
    bad = broken_links(page)
    assert len(bad) == 3, bad
    assert any("missing.md" in b for b in bad) and any("#nowhere" in b for b in bad)
    assert any("nope.png" in b for b in bad)


def test_the_command_check_finds_unknown_flags_and_bad_values(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\nRun `python -m ppl_vae train --epochs 2`, then:\n\n"
                    "```bash\npython -m ppl_vae train --dataset digits \\\n"
                    "    --no-such-flag 3   # a comment\n"
                    "python -m ppl_vae train --elbo no-such-estimator\n"
                    "torchrun --nproc_per_node 2 --no-such-torchrun-flag -m ppl_vae train\n"
                    "torchrun --standalone --nproc_per_node 2 -m ppl_vae train --epochs x\n"
                    "python -m ppl_vae compare --repeats 0\n"
                    "python -m ppl_vae evaluate --run-dir r --eval-iwae -5\n"
                    "python -m ppl_vae appendix coin --out o --heads 9 --tosses 3\n"
                    "python -m ppl_vae experiment cvae-quadrants --quadrants x\n"
                    "python -m ppl_vae trian --epochs 2\n```\n"
                    "And `ppl-vae evaluate --run r --no-such-flag`.\n")
    found = commands(page)
    assert len(found) == 11, found
    bad = bad_commands(page)
    said = ["unrecognized arguments: --no-such-flag 3", "'no-such-estimator' is not one of",
            "unrecognized arguments: --no-such-torchrun-flag", "--epochs: invalid int value",
            "repeats must be a whole number in [2,", "eval_iwae must be a whole number in [0,",
            "heads must lie in [0, tosses]", "--quadrants: invalid int value",
            "unknown command 'trian'", "unrecognized arguments: --no-such-flag"]
    assert len(bad) == len(said), "\n".join(bad)
    for fragment, line in zip(said, bad, strict=True):  # (the good inline command passed)
        assert fragment in line, (fragment, line)


def test_the_command_check_passes_good_commands(page_dir):
    for command in (["train", "--dataset", "digits", "--model", "cvae", "--quadrants", "2"],
                    ["train", "--model", "ssvae", "--help"], ["compare", "--run-dir", "r"],
                    ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "ppl_vae",
                     "evaluate", "--run-dir", "r"], ["appendix", "all", "--out", "o"],
                    ["experiment", "cvae-quadrants", "--quadrants", "1", "2", "--z-dim", "4"]):
        check_command(command)


@pytest.mark.slow
def test_the_block_check_fails_a_failing_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n```python\n# file: helper.py\nVALUE = 2\n```\n\n"
                    "```python\nfrom helper import VALUE\nassert VALUE == 2\n"
                    "from ppl_vae import TrainConfig\nTrainConfig(dataset=\"mnist\", epochs=50)\n"
                    "```\n\n```python\nraise RuntimeError('a documented failure')\n```\n")
    assert quick(python_blocks(page)[1].body).count('dataset="digits", epochs=2') == 1
    done = run_blocks(page, tmp_path)
    assert done.returncode == 1
    assert f'File "{page}", line 16' in done.stderr and "a documented failure" in done.stderr
