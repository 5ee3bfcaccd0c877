"""The package's layers: every import (lazy ones too) points down or sideways, never up, and
no modules import each other in a circle.

    the command lines (cli, __main__, the ``python -m`` shims, appendix/__main__.py)
    evaluation/, appendix/, experiments   saved runs, the comparison, the tables
    run/                                  running it: the session, train_run, the loop
    inference/                            Pyro math: estimators, programs, importance, steps
    models/                               the contract and the families
    data, plots, resources, interrupt, distributed
    config                                a run's options: a plain value
    errors, files
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ppl_vae"
LAYERS = [
    ("errors", "files"),
    ("config",),
    ("data", "plots", "resources", "interrupt", "distributed"),
    ("models",),
    ("inference",),
    ("run",),
    ("evaluation", "appendix", "experiments"),
    ("cli", "__main__", "train", "evaluate", "compare", "appendix.__main__",
     "__init__"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    matches = [(len(name), level) for level, names in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]  # the most specific name


def imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (outside ``if TYPE_CHECKING:``)."""
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (PACKAGE / sub.replace(".", "/")).exists()
                          or (PACKAGE / (sub.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names]
            found |= {n[len("ppl_vae."):] for n in names if n and n.startswith("ppl_vae.")}
    return {m for m in found if m and m != me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_points_up():
    upward = sorted(f"{m} -> {t}" for m, targets in graph().items() for t in targets
                    if layer(t) > layer(m))
    assert upward == []


def test_no_import_circles():
    edges = graph()
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_only_the_command_lines_and_evaluation_use_the_run_layer():
    users = sorted(m for m, targets in graph().items() if not m.startswith("run")
                   and any(t == "run" or t.startswith("run.") for t in targets)
                   and layer(m) < layer("run"))
    assert users == []
