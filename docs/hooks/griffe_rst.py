"""A Griffe extension for the API reference: the package's docstrings are written for Sphinx
(double backticks, ``:class:`` and ``:func:`` roles, ``::`` before a literal block); this
turns the roles into code spans and ``text::`` into ``text:`` when mkdocstrings reads them,
so the pages read cleanly without editing the package. (Listed under ``extensions`` of the
mkdocstrings Python handler in ``mkdocs.yml``.)
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const|ref):`(~?)([^`]+)`")
LITERAL = re.compile(r"(\S)::$", re.M)


def plain(text: str) -> str:
    def span(m: re.Match) -> str:
        target = m.group(2)
        return f"`{target.rsplit('.', 1)[-1] if m.group(1) else target}`"

    return LITERAL.sub(r"\1:", ROLE.sub(span, text))


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
