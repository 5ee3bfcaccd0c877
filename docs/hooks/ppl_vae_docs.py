"""MkDocs hooks of the ppl_vae site (``hooks:`` in ``mkdocs.yml``).

* The six notebooks in ``notebooks/`` become the pages ``tutorials/NN_name.ipynb``, rendered
  by mkdocs-jupyter from their committed outputs (``execute: false``): nothing is copied.
* A line ``<!-- cli: NAME -->`` in a page is replaced, at build time, by the help text of the
  real command-line parser NAME (see :data:`HELP`): ``--help`` and the docs cannot disagree.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
WIDTH = "80"  # columns of the help texts (argparse reads $COLUMNS)


def _printed(main: Callable[[list[str]], int], argv: list[str]) -> str:
    """What ``main(argv)`` prints (a ``--help``)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    return out.getvalue()


def _train(model: str = "vae", compare: bool = False) -> str:
    from ppl_vae.cli import train_parser

    return train_parser(model, compare=compare).format_help()


def _model_group(model: str) -> str:
    """Only the ``model options (Class)`` group of ``train --model MODEL --help``."""
    from ppl_vae.cli import train_parser

    parser = train_parser(model)
    for group in parser._action_groups:
        if group.title and group.title.startswith("model options"):
            formatter = parser._get_formatter()
            formatter.start_section(group.title)
            formatter.add_text(group.description)
            formatter.add_arguments(group._group_actions)
            formatter.end_section()
            return formatter.format_help()
    raise ValueError(f"no model options group in train --model {model} --help")


def _evaluate() -> str:
    from ppl_vae.cli import evaluate_parser

    return evaluate_parser().format_help()


def _appendix() -> str:
    from ppl_vae.appendix.__main__ import parser

    return parser().format_help()


def _main(*argv: str) -> Callable[[], str]:
    def text() -> str:
        from ppl_vae.__main__ import main

        return _printed(main, list(argv))

    return text


HELP: dict[str, Callable[[], str]] = {
    "main": _main("--help"),
    "train": _train,
    "evaluate": _evaluate,
    "compare": lambda: _train(compare=True),
    "appendix": _appendix,
    "experiment": _main("experiment", "--help"),
    "experiment cvae-quadrants": _main("experiment", "cvae-quadrants", "--help"),
}
"""``<!-- cli: NAME -->``: NAME's help. ``<!-- cli: model MODEL -->``: that model's group."""

MARKER = re.compile(r"^<!-- cli: (?P<name>[a-z0-9 :_.-]+?) -->$", re.M)


def help_text(name: str) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        if name.startswith("model "):
            return _model_group(name.split(" ", 1)[1])
        if name not in HELP:
            raise KeyError(f"unknown CLI help {name!r}; one of {', '.join(HELP)} or model NAME")
        return HELP[name]()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


_COPIES = tempfile.TemporaryDirectory(prefix="ppl_vae_docs_")


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps the .ipynb files
def on_files(files, config):
    """Each notebook as ``tutorials/NAME.ipynb``, read from a copy (mkdocs-jupyter needs a
    real source file under the File's ``src_dir``)."""
    root = Path(_COPIES.name)
    (root / "tutorials").mkdir(exist_ok=True)
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        shutil.copy2(path, root / "tutorials" / path.name)
        files.append(File(f"tutorials/{path.name}", str(root), config.site_dir,
                          config.use_directory_urls))
    return files


def on_page_markdown(markdown, page, config, files):
    def fenced(match: re.Match) -> str:
        text = help_text(match.group("name")).rstrip()
        return f"```text\n{text}\n```"

    return MARKER.sub(fenced, markdown)


def on_serve(server, config, builder):
    server.watch(str(NOTEBOOKS))  # mkdocs serve: rebuild when a notebook changes
    return server
