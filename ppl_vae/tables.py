"""The CVAE's conditional log-likelihood table as CSV and Markdown."""

from __future__ import annotations

import os
from pathlib import Path

from .files import write_csv, write_text

ROWS = (("nn_baseline", "NN baseline"), ("cvae_is", "CVAE (IS)"),
        ("cvae_neg_elbo", "CVAE (−ELBO)"), ("gap", "gap (NN − IS)"))


def _title(key: str) -> str:
    return "label" if key == "label" else f"{key} quadrant" + ("s" if key != "1" else "")


def cll_rows(cll: dict[str, dict[str, float]]) -> list[dict[str, str | float]]:
    """One row per estimate, one column per condition (quadrant count or ``label``)."""
    keys = sorted(cll)
    return [{"estimate": name, **{_title(k): round(cll[k][field], 2) for k in keys}}
            for field, name in ROWS]


def cll_markdown(cll: dict[str, dict[str, float]]) -> str:
    """-log p(y|c) in nats per image (lower is better) as a Markdown table."""
    rows = cll_rows(cll)
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h])
                                for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_cll_table(out: str | os.PathLike, cll: dict[str, dict[str, float]]) -> str:
    """Write ``cll_table.csv`` and ``cll_table.md`` into ``out``; return the Markdown."""
    md = cll_markdown(cll)
    write_csv(Path(out) / "cll_table.csv", cll_rows(cll))
    write_text(Path(out) / "cll_table.md",
               "Negative conditional log-likelihood -log p(y|c), nats per image "
               "(lower is better)\n\n" + md)
    return md
