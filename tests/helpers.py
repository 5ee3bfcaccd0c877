"""Assertions shared by the test modules (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def reference():
    """``benchmarks/reference.py``: the plain-PyTorch losses the benchmarks measure against."""
    spec = importlib.util.spec_from_file_location("reference", BENCHMARKS / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_one_line_error(result, prog: str, *fragments: str, code: int = 2) -> None:
    """Exit status ``code`` and one line on stderr, ``prog: error: ...`` naming every
    fragment, no traceback."""
    err = result.err.strip()
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err
    assert "\n" not in err, err
    assert err.startswith(prog), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def encoder_scale_inverse(sigma, kind: str):
    """The head output h that ``ppl_vae.models.vae.encoder_scale`` maps to ``sigma``."""
    if kind == "logvar":
        return 2 * sigma.log()
    if kind == "logscale":
        return sigma.log()
    return torch.expm1(sigma).log()
