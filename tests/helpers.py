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


def build_model(config, data):
    """The model ``config`` describes, built for ``data`` (its family's ``from_options``), as
    a run's session builds it."""
    from ppl_vae.models import hook
    from ppl_vae.run.session import resolve

    config, cls = resolve(config)
    return hook(cls, "from_options")(config.model_options, data)


def loop_session(module, x, batch_size: int = 10, epochs: int = 5, patience: int = 0,
                 **config):
    """What :class:`ppl_vae.run.loop.Loop` reads of a session, for a bare ``module`` trained
    on rows ``x`` (its ``train_args`` give ``(x,)``) in one process."""
    from types import SimpleNamespace

    from ppl_vae.data import Dataset, Split
    from ppl_vae.distributed import SINGLE

    settings = dict(batch_size=batch_size, epochs=epochs, seed=0, early_stop=patience,
                    checkpoint_every_steps=0, check_every_steps=50, **config)
    return SimpleNamespace(config=SimpleNamespace(**settings), world=SINGLE, device=x.device,
                           data=Dataset("rows", Split(x), Split(x), None), guard=None,
                           progress=False, module=module, train_args=lambda g=None: (x,))
