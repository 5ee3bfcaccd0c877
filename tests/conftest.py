"""Shared fixtures: seeding, the offline digits data, a small trained run, CLI helpers."""

from __future__ import annotations

import os

# One thread per process (this one and the runs it starts): tests check numbers, not speed,
# and on a shared 2-core machine more threads only make everything slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyro
import pytest
import torch
from helpers import assert_one_line_error

from ppl_vae import Dataset, TrainConfig, load_dataset
from ppl_vae.run.train import train_run

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A small VAE: three epochs on digits take well under a second on two CPU cores.
# Model options (TrainConfig.model_options) and training options (TrainConfig's own fields).
SMALL_MODEL = dict(hidden=(64,), z_dim=4)
SMALL_TRAIN = dict(batch_size=64, lr=3e-3)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same RNG state and an empty Pyro param store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def digits() -> Dataset:
    """scikit-learn's 8x8 digits: 1438 train / 359 test images of 64 pixels in [0, 1]."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The offline MNIST-10k split (torchvision layout) in ../shared/data, or a skip."""
    raw = SHARED_DATA / "MNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"offline MNIST not found at {raw} (../shared/data relative to the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small VAE trained 3 epochs on digits by :func:`ppl_vae.train_run` (shared,
    read-only)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = TrainConfig(model="vae", model_options=SMALL_MODEL, dataset="digits", epochs=3,
                         seed=0, out=str(out), **SMALL_TRAIN)
    return train_run(config, progress=False)


def _sem(x: torch.Tensor) -> float:
    x = torch.as_tensor(x).detach().double().flatten()
    return (x.std() / math.sqrt(x.numel())).item()


@pytest.fixture(scope="session")
def sem() -> Callable[[torch.Tensor], float]:
    """``sem(x)``: the standard error of the mean of a sample (any shape, flattened)."""
    return _sem


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys) -> Callable[..., CliResult]:
    """Call a tool's ``main(argv)`` in-process; argparse errors (SystemExit) count as exits."""

    def call(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return call


@pytest.fixture(scope="session")
def run_module() -> Callable[..., subprocess.CompletedProcess]:
    """``run_module("ppl_vae.train", *args, cwd=DIR)``: ``python -m`` in a real subprocess."""

    def call(module: str, *args: str | Path, cwd: Path, timeout: float = 300
             ) -> subprocess.CompletedProcess:
        # the checkout first on the path, installed or not
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                              env={**os.environ, "PYTHONPATH": path},
                              capture_output=True, text=True, timeout=timeout)

    return call


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., None]:
    """``one_line_error(result, prog, *fragments)``: exit status 2 and one line on stderr,
    ``prog: error: ...`` naming every fragment, no traceback."""
    return assert_one_line_error
