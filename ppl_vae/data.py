"""Datasets as tensors on the training device, and batches drawn by a shuffled index.

Every split is one ``(N, D)`` float tensor (pixels in [0, 1] for images) and an optional
``(N,)`` label tensor. Nothing is transformed per item: binarization is one vectorized
``torch.bernoulli`` over a whole split, and a batch is ``x[perm[i:i + batch_size]]``.

Sources (``--dataset``):

* ``mnist``, ``fashion-mnist`` -- torchvision's classes under ``data_dir`` (downloaded if missing).
* ``digits`` -- scikit-learn's bundled 8x8 digits (1,797 images, offline), a fixed 80/20 split.
* ``npz:PATH`` -- the user's array ``x`` (N x H x W or N x D) and optional integer labels ``y``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError

SPLIT_SEED = 0  # the digits/npz train/test split and static binarization never change with --seed
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` of shape (N, D) and optional integer labels ``y`` of shape (N,)."""

    x: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), None if self.y is None else self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """Train and test splits plus what models and plots need to know about them.

    With ``dynamic=True`` the training inputs are grey levels that :meth:`train_epoch`
    turns into fresh Bernoulli pixels every epoch (dynamic binarization).
    """

    name: str
    train: Split
    test: Split
    image_shape: tuple[int, int] | None
    dynamic: bool = False
    val: Split | None = None

    @property
    def input_dim(self) -> int:
        return self.train.x.shape[1]

    @property
    def num_classes(self) -> int | None:
        ys = [s.y for s in (self.train, self.test) if s.y is not None]
        return int(max(int(y.max()) for y in ys)) + 1 if ys else None

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, train=self.train.to(device), test=self.test.to(device),
                       val=None if self.val is None else self.val.to(device))

    def with_validation(self, fraction: float) -> Dataset:
        """Carve a validation split (a fixed seeded ``fraction`` of train) out of train. Under
        dynamic binarization it gets one fixed Bernoulli draw, like the test split. Both parts
        keep at least one row; :class:`UsageError` when that is not possible."""
        n = len(self.train)
        n_val = max(1, round(fraction * n))
        if n_val >= n:
            most = (n - 1) / n if n > 1 else 0
            fix = (f"lower --val-fraction (below {most:.3g} for {n} rows)" if n > 1 else
                   "drop --early-stop or give more data")
            raise UsageError(f"--val-fraction {fraction:g} of the {n} training row"
                             f"{'s' if n != 1 else ''} leaves {n - n_val} to train on and "
                             f"early stopping needs at least one of each; {fix}")
        train, val = _split(self.train.x, self.train.y, fraction)
        if self.dynamic:
            g = torch.Generator(device=val.x.device).manual_seed(SPLIT_SEED + 1)
            val = replace(val, x=torch.bernoulli(val.x, generator=g))
        return replace(self, train=train, val=val)

    def train_epoch(self, generator: torch.Generator | None = None) -> Tensor:
        """Training inputs for one epoch: resampled pixels under dynamic binarization (drawn
        by ``generator``, or the global RNG)."""
        return torch.bernoulli(self.train.x, generator=generator) if self.dynamic else self.train.x


def batches(x: Tensor, batch_size: int, generator: torch.Generator | None = None
            ) -> Iterator[Tensor]:
    """Yield row indices of ``x`` in shuffled batches, drawn on ``x``'s device by
    ``generator`` (the global RNG if None)."""
    yield from torch.randperm(x.shape[0], device=x.device, generator=generator).split(batch_size)


def load_dataset(
    name: str,
    data_dir: str = "data",
    download: bool = True,
    binarize: str = "none",
    likelihood: str | None = None,
) -> Dataset:
    """Load ``name`` (see module docstring) on the CPU; raise :class:`UsageError` on bad input.
    ``likelihood="bernoulli"`` also checks that an npz lies in [0, 1] (the models check the
    data they are built for in any case)."""
    if name in ("mnist", "fashion-mnist"):
        data = _torchvision(name, data_dir, download)
    elif name == "digits":
        data = _digits()
    elif name.startswith("npz:"):
        data = _npz(name[4:], likelihood)
    else:
        raise UsageError(
            f"unknown --dataset {name!r}; use mnist, fashion-mnist, digits or npz:PATH"
        )
    return _binarize(data, binarize)


def _torchvision(name: str, root: str, download: bool) -> Dataset:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    try:
        splits = [cls(root, train=train, download=download) for train in (True, False)]
    except Exception as e:  # torchvision raises RuntimeError / URLError / OSError here
        how = "and could not be downloaded" if download else "and --no-download was given"
        raise UsageError(
            f"{name} is not in {os.path.abspath(root)!r} {how} ({type(e).__name__}); put "
            f"torchvision's {cls.__name__}/raw files there (--data-dir), or run offline with "
            f"--dataset digits or --dataset npz:PATH"
        ) from None
    train, test = (Split(s.data.reshape(len(s.data), -1).float() / 255, s.targets.long())
                   for s in splits)
    return Dataset(name, train, test, image_shape=(28, 28))


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    train, test = _split(x, y)
    return Dataset("digits", train, test, image_shape=(8, 8))


def _npz(path: str, likelihood: str | None) -> Dataset:
    where = f"npz:{path}"
    if not os.path.isfile(path):
        raise UsageError(f"{where}: no such file; give the path of an .npz with an array 'x'")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise UsageError(f"{where}: not a readable .npz file ({e}); save one with "
                         "numpy.savez(path, x=x, y=y)") from None
    if "x" not in arrays:
        raise UsageError(f"{where}: has keys {sorted(arrays)} but no 'x'; save the inputs as "
                         "numpy.savez(path, x=x[, y=labels])")
    x = arrays["x"]
    if x.ndim not in (2, 3) or x.shape[0] < 2 or x.size == 0:
        raise UsageError(f"{where}: 'x' has shape {x.shape}; expected N x D or N x H x W, "
                         "N >= 2")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise UsageError(f"{where}: 'x' has dtype {x.dtype}; expected real numbers")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UsageError(f"{where}: 'x' contains NaN or infinite values (some may have "
                         "overflowed float32, beyond 3.4e38); clean or drop those rows, or "
                         "standardize the data ((x - mean) / std) before saving")
    check_magnitude(x, where)
    if likelihood == "bernoulli" and (x.min() < 0 or x.max() > 1):
        raise UsageError(
            f"{where}: 'x' lies in [{x.min():g}, {x.max():g}] but the Bernoulli likelihood needs "
            "[0, 1]; rescale it (e.g. x / 255) or use --likelihood gaussian"
        )
    y = None
    if "y" in arrays:
        y = arrays["y"]
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise UsageError(f"{where}: 'y' must be {x.shape[0]} non-negative integers (one label "
                             f"per row of 'x'), got dtype {y.dtype} shape {y.shape}")
        y = torch.as_tensor(y, dtype=torch.long)
    if x.ndim == 3:
        shape = x.shape[1:]
    else:
        side = math.isqrt(x.shape[1])
        shape = (side, side) if side * side == x.shape[1] else None
    train, test = _split(torch.as_tensor(x.reshape(len(x), -1)), y)
    return Dataset(where, train, test, image_shape=shape)


MAGNITUDE_MARGIN = 1e3
"""How far below float32 overflow the data must stay: squared values summed over a row
(a Gaussian log-density) stay below ``float32.max / MAGNITUDE_MARGIN**2``."""


def max_magnitude(dim: int) -> float:
    """The largest absolute input value :func:`check_magnitude` lets through for rows of
    ``dim`` values: ``sqrt(float32.max / dim) / MAGNITUDE_MARGIN`` (4.6e15 for 16 values,
    6.6e14 for 784)."""
    return math.sqrt(float(np.finfo(np.float32).max) / max(1, dim)) / MAGNITUDE_MARGIN


def check_magnitude(x: np.ndarray | Tensor, where: str) -> None:
    """:class:`UsageError` for data (rows first) whose squares, summed over a row, come
    within :data:`MAGNITUDE_MARGIN` squared of float32's largest value: every log-density
    (a Gaussian's ``-(x - mu)^2 / 2 sigma^2``) and gradient would overflow to inf or NaN."""
    if len(x) == 0:
        return
    dim = math.prod(x.shape[1:])
    peak = float(abs(x).max())
    limit = max_magnitude(dim)
    if peak > limit:
        raise UsageError(f"{where}: the data reach {peak:.3g} in magnitude, beyond {limit:.2g}, "
                         f"where float32 log-densities of rows of {dim} values overflow; "
                         "standardize them ((x - mean) / std) or rescale them")


def _split(x: Tensor, y: Tensor | None, fraction: float = TEST_FRACTION
           ) -> tuple[Split, Split]:
    """A fixed seeded shuffle, then ``1 - fraction`` of the rows first and the rest second."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    n_test = max(1, round(fraction * len(x)))
    tr, te = perm[n_test:], perm[:n_test]
    return (Split(x[tr], None if y is None else y[tr]),
            Split(x[te], None if y is None else y[te]))


def _binarize(data: Dataset, how: str) -> Dataset:
    """``static``: one fixed Bernoulli draw of every split. ``dynamic``: a fixed draw of the
    test split; the training split is redrawn every epoch (:meth:`Dataset.train_epoch`)."""
    if how == "none":
        return data
    if how not in ("static", "dynamic"):
        raise UsageError(f"--binarize {how!r} is not one of none, static, dynamic")
    if data.train.x.min() < 0 or data.train.x.max() > 1:
        raise UsageError("--binarize needs inputs in [0, 1]; rescale the data or use "
                         "--binarize none")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test = replace(data.test, x=torch.bernoulli(data.test.x, generator=g))
    if how == "dynamic":
        return replace(data, test=test, dynamic=True)
    return replace(data, train=replace(data.train, x=torch.bernoulli(data.train.x, generator=g)),
                   test=test)
