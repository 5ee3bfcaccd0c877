"""Datasets as tensors on the training device, and batches drawn by a shuffled index.

Every split is one ``(N, D)`` tensor of rows (images flattened in C, H, W order,
:attr:`Dataset.image_shape`) and an optional ``(N,)`` label tensor. Pixels are float32 in
[0, 1], except for 8-bit colour sources, whose rows stay uint8 on the device (a quarter of
the memory) and are converted per batch by :func:`pixels`. Binarization is one vectorized
``torch.bernoulli`` over a split.

Sources (``--dataset``): ``mnist``, ``fashion-mnist``, ``cifar10``, ``svhn``, ``celeba``
(64x64, the central 148x148 square resized) from torchvision under ``data_dir``; offline
``digits`` (scikit-learn's 8x8) and ``sample-patches`` (32x32 patches of scikit-learn's two
sample photographs, uint8, labelled by photograph), each a fixed 80/20 split; ``npz:PATH``,
an array ``x`` (N x D, N x H x W, N x C x H x W or N x H x W x C) and optional labels ``y``.
``labelled=N`` keeps N training labels, a class-balanced draw seeded by ``--seed`` (the others
become -1).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError, first_line

SPLIT_SEED = 0  # the digits/npz train/test split and static binarization never change with --seed
TEST_FRACTION = 0.2
UNLABELLED = -1  # The label of a training row whose label ``--labelled`` hid.


def pixels(x: Tensor) -> Tensor:
    """Float pixels of rows ``x``: ``x / 255`` in float32 for 8-bit (uint8) rows, else ``x``."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


@dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` of shape (N, D) (float, or uint8 for 8-bit images) and optional
    integer labels ``y`` of shape (N,) (-1: unlabelled)."""

    x: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), None if self.y is None else self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """Train and test splits plus what models and plots need to know about them; with
    ``dynamic=True`` :meth:`train_epoch` redraws Bernoulli training pixels each epoch."""

    name: str
    train: Split
    test: Split
    image_shape: tuple[int, int, int] | None
    dynamic: bool = False
    val: Split | None = None
    label_name: str = "label"
    """what a label says (figure legends): ``digit``, ``photograph (0 china, 1 flower)``"""
    labelled_share: float = 0.0
    """with labelled and unlabelled training rows: the share of each batch that is labelled
    (:meth:`epoch_order`; 0: batches drawn from all rows alike)"""

    @property
    def input_dim(self) -> int:
        return self.train.x.shape[1]

    @property
    def eight_bit(self) -> bool:
        """Rows are uint8 levels 0..255 (convert with :func:`pixels`)."""
        return self.train.x.dtype == torch.uint8

    @property
    def labelled(self) -> int | None:
        """How many training rows carry a label (None: no labels)."""
        return None if self.train.y is None else int((self.train.y >= 0).sum())

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
            fix = (f"lower --val-fraction (below {(n - 1) / n:.3g} for {n} rows)" if n > 1 else
                   "drop --early-stop or give more data")
            raise UsageError(f"--val-fraction {fraction:g} of the {n} training row"
                             f"{'s' if n != 1 else ''} leaves {n - n_val} to train on and "
                             f"early stopping needs at least one of each; {fix}")
        y = self.train.y
        hidden = None if y is None else (y < 0).nonzero().squeeze(1)
        if hidden is not None and 0 < len(hidden) < n:  # semi-supervised: keep every label
            n_val = min(n_val, len(hidden))  # for training, validate on unlabelled rows
            g = torch.Generator().manual_seed(SPLIT_SEED)
            val_rows = hidden[torch.randperm(len(hidden), generator=g)[:n_val].to(y.device)]
            keep = ~torch.isin(torch.arange(n, device=y.device), val_rows)  # in their order
            train, val = (Split(self.train.x[rows], y[rows]) for rows in (keep, val_rows))
        else:
            train, val = _split(self.train.x, self.train.y, fraction)
        if self.dynamic:
            g = torch.Generator(device=val.x.device).manual_seed(SPLIT_SEED + 1)
            val = replace(val, x=torch.bernoulli(val.x, generator=g))
        return replace(self, train=train, val=val)

    def signature(self) -> dict:
        """What building a model needs to know of the data (checkpoints keep it), for
        :meth:`stand_in`: shapes, classes and the training split's counts."""
        return {"name": self.name, "input_dim": self.input_dim,
                "image_shape": None if self.image_shape is None else list(self.image_shape),
                "eight_bit": self.eight_bit, "num_classes": self.num_classes,
                "partly_labelled": self.labelled is not None and
                0 < self.labelled < len(self.train), "n_train": len(self.train),
                "labelled": self.labelled,
                "label_name": self.label_name, "labelled_share": self.labelled_share}

    @classmethod
    def stand_in(cls, sig: dict) -> Dataset:
        """A dataset of the :meth:`signature`'s shapes and counts, zeros (one row repeated, no
        memory per row): a model built from it derives from them exactly what it would from the
        data (M2's classification weight); what it derives from values must be saved as its
        buffers. For building and probing a model, not for training or evaluation. (An older
        checkpoint's signature, without counts, gives a row per class and an unlabelled one.)"""
        k, hidden = sig.get("num_classes"), int(bool(sig.get("partly_labelled")))
        rows = sig.get("n_train") or max(2, (k or 0) + hidden)
        labelled = sig.get("labelled") if sig.get("n_train") else rows - hidden
        x = torch.zeros(1, sig["input_dim"],
                        dtype=torch.uint8 if sig.get("eight_bit") else torch.float32)
        y = None
        if k is not None:
            y = torch.full((rows,), UNLABELLED)
            y[:labelled] = torch.arange(labelled) % k
        split = Split(x.expand(rows, -1), y)
        shape = sig.get("image_shape")
        return cls(sig["name"], split, split, None if shape is None else tuple(shape),
                   label_name=sig.get("label_name", "label"),
                   labelled_share=sig.get("labelled_share", 0.0))

    def epoch_order(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """The training rows of one epoch in batch order (consecutive ``batch_size`` rows are a
        batch), drawn by ``generator`` on the CPU. Without hidden labels, or with
        ``labelled_share`` 0: a permutation of all rows. Else every batch holds k = round(share
        * B) labelled rows (at least 1, at most B - 1) and B - k unlabelled ones; each
        unlabelled row comes once per epoch, and the labelled rows are cycled, each cycle in a
        fresh order, so that every label is used before any repeats."""
        y, n = self.train.y, len(self.train)
        if y is None or self.labelled_share <= 0:
            return torch.randperm(n, generator=generator)
        seen = (y >= 0).cpu()
        labelled, unlabelled = seen.nonzero().squeeze(1), (~seen).nonzero().squeeze(1)
        if not len(labelled) or not len(unlabelled):
            return torch.randperm(n, generator=generator)
        k = min(max(1, round(self.labelled_share * batch_size)), batch_size - 1)
        rest = batch_size - k
        steps = math.ceil(len(unlabelled) / rest)
        cycles = math.ceil(steps * k / len(labelled))
        lab = torch.cat([labelled[torch.randperm(len(labelled), generator=generator)]
                         for _ in range(cycles)])[:steps * k].view(steps, k)
        unl = unlabelled[torch.randperm(len(unlabelled), generator=generator)]
        return torch.cat([torch.cat([lab[i], unl[i * rest:(i + 1) * rest]]) for i in range(steps)])

    def train_epoch(self, generator: torch.Generator | None = None) -> Tensor:
        """Training inputs for one epoch: resampled pixels under dynamic binarization (drawn
        by ``generator``, or the global RNG)."""
        return torch.bernoulli(self.train.x, generator=generator) if self.dynamic else self.train.x


def load_dataset(name: str, data_dir: str = "data", download: bool = True, binarize: str = "none",
                 *, likelihood: str | None = None, labelled: int = 0, seed: int = 0) -> Dataset:
    """Load ``name`` (see module docstring) on the CPU; raise :class:`UsageError` on bad input.
    ``likelihood="bernoulli"`` also checks that an npz lies in [0, 1] (the models check the
    data they are built for in any case). ``labelled > 0`` keeps that many training labels
    (:func:`hide_labels`, drawn with ``seed``)."""
    if name in TORCHVISION:
        data = _torchvision(name, data_dir, download)
    elif name == "digits":
        data = _digits()
    elif name == "sample-patches":
        data = _sample_patches()
    elif name.startswith("npz:"):
        data = _npz(name[4:], likelihood)
    else:
        raise UsageError(f"unknown --dataset {name!r}; use {', '.join(DATASETS)}")
    data = _binarize(data, binarize)
    return hide_labels(data, labelled, seed) if labelled else data


TORCHVISION = {  # name: (class, image shape, 8-bit rows, what a label says)
    "mnist": ("MNIST", (1, 28, 28), False, "digit"),
    "fashion-mnist": ("FashionMNIST", (1, 28, 28), False, "class"),
    "cifar10": ("CIFAR10", (3, 32, 32), True, "class"),
    "svhn": ("SVHN", (3, 32, 32), True, "digit"),
    "celeba": ("CelebA", (3, 64, 64), True, "male (attribute 20)"),
}
DATASETS = (*TORCHVISION, "digits", "sample-patches", "npz:PATH")
CELEBA_CROP = 148  # the central square of CelebA's 178x218 images, resized to 64x64
PATCH = 32  # the side of a sample-patches tile
COLOUR_CHANNELS = (1, 3, 4)  # the channel counts an npz image may have


def _torchvision(name: str, root: str, download: bool) -> Dataset:
    from torchvision import datasets

    cls_name, shape, eight_bit, label_name = TORCHVISION[name]
    cls = getattr(datasets, cls_name)
    before = _dirs(root)
    try:
        splits = [_tv_split(cls, name, root, train, download) for train in (True, False)]
    except Exception as e:  # torchvision raises RuntimeError / URLError / OSError here
        _remove_empty_dirs(root, keep=before)  # a failed download leaves no empty folders
        how = "and could not be downloaded" if download else "and --no-download was given"
        said, folder = first_line(e), Path(root, cls.__name__)
        if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
            raise UsageError(f"{name}'s files in {os.path.abspath(folder)!r} cannot be read "
                             f"({type(e).__name__}: {said}): incomplete or corrupt? replace "
                             f"them with torchvision's {cls.__name__} files") from None
        if Path(root).name == cls.__name__:
            how += f"; --data-dir takes the folder that holds {cls.__name__}/, its parent"
        raise UsageError(f"{name} is not in {os.path.abspath(root)!r} {how} ({type(e).__name__}"
                         f"{': ' + said if said else ''}); put torchvision's {cls.__name__} files "
                         "there (--data-dir), or run offline with --dataset 'digits', --dataset "
                         "'sample-patches' or --dataset 'npz:PATH'") from None
    rows = [(x.reshape(len(x), -1), y) for x, y in splits]
    train, test = (Split(x.contiguous() if eight_bit else x.float() / 255, y) for x, y in rows)
    return Dataset(name, train, test, image_shape=shape, label_name=label_name)


def _dirs(root: str, depth: int = 3) -> set[str]:
    """The directories under (and including) ``root``, ``depth`` levels down (torchvision's
    ``<root>/<Name>/raw``), and those of the parents it would need."""
    top = Path(os.path.abspath(root))
    found = {str(p) for p in top.parents if p.is_dir()}
    level = [top] if top.is_dir() else []
    for _ in range(depth + 1):
        found.update(map(str, level))
        level = [c for d in level for c in d.iterdir() if c.is_dir() and not c.is_symlink()]
    return found


def _remove_empty_dirs(root: str, keep: set[str]) -> None:
    """Remove the empty directories under (and including) ``root`` not in ``keep``."""
    made = Path(os.path.abspath(root))
    while str(made.parent) not in keep and made.parent != made:  # (a root made with parents)
        made = made.parent
    for path, _, _ in os.walk(made, topdown=False):  # deepest first; nothing if no root
        with contextlib.suppress(OSError):
            if os.path.abspath(path) not in keep and not os.listdir(path):
                os.rmdir(path)


def _tv_split(cls: type, name: str, root: str, train: bool, download: bool
              ) -> tuple[Tensor, Tensor]:
    """(uint8 images N x C x H x W or N x H x W, long labels) of one torchvision split."""
    if name == "svhn":
        s = cls(root, split="train" if train else "test", download=download)
        return torch.as_tensor(s.data), torch.as_tensor(s.labels, dtype=torch.long)
    if name == "celeba":
        return _celeba(cls, root, "train" if train else "test", download)
    s = cls(root, train=train, download=download)
    x = torch.as_tensor(s.data)
    if x.dim() == 4:  # CIFAR-10 stores N x H x W x C
        x = x.permute(0, 3, 1, 2)
    return x, torch.as_tensor(s.targets, dtype=torch.long)


def _celeba(cls: type, root: str, split: str, download: bool) -> tuple[Tensor, Tensor]:
    """CelebA at 64x64 (central 148x148 crop, resized), decoded once and cached as a uint8
    tensor beside torchvision's files; the label is attribute 20 (Male)."""
    from torchvision.transforms import v2
    from tqdm import tqdm

    from .files import save_torch

    cache = os.path.join(root, "celeba", f"ppl_vae-64-{split}.pt")
    if os.path.isfile(cache):
        return tuple(torch.load(cache, weights_only=True))
    crop = v2.Compose([v2.PILToTensor(), v2.CenterCrop(CELEBA_CROP), v2.Resize(64, antialias=True)])
    s = cls(root, split=split, target_type="attr", download=download, transform=crop)
    images = [img for img, _ in tqdm(s, desc=f"celeba {split}: decoding once", unit="img")]
    x, y = torch.stack(images), s.attr[:, 20].long()
    save_torch(cache, (x, y))
    return x, y


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return Dataset("digits", *_split(x, y), image_shape=(1, 8, 8), label_name="digit")


def _sample_patches() -> Dataset:
    """Non-overlapping 32x32 patches of scikit-learn's two sample photographs (china.jpg,
    flower.jpg, 427 x 640 RGB): 13 x 20 per photograph, 520 in all, uint8; label: which
    photograph. A fixed seeded 80/20 split."""
    from sklearn.datasets import load_sample_images

    xs, ys = [], []
    for label, image in enumerate(load_sample_images().images):
        img = torch.tensor(image).permute(2, 0, 1)  # C x H x W
        c, h, w = img.shape
        tiles = img[:, : h - h % PATCH, : w - w % PATCH].unfold(1, PATCH, PATCH).unfold(
            2, PATCH, PATCH)  # C x rows x cols x 32 x 32
        tiles = tiles.permute(1, 2, 0, 3, 4).reshape(-1, c * PATCH * PATCH)
        xs.append(tiles)
        ys.append(torch.full((len(tiles),), label, dtype=torch.long))
    return Dataset("sample-patches", *_split(torch.cat(xs).contiguous(), torch.cat(ys)),
                   image_shape=(3, PATCH, PATCH), label_name="photograph (0 china, 1 flower)")


def _npz(path: str, likelihood: str | None) -> Dataset:
    where, path = f"npz:{path}", os.path.expanduser(path)
    if not path or not os.path.isfile(path):
        what = "a directory" if path and os.path.isdir(path) else "no such file"
        raise UsageError(f"{where}: {what}; give the path of an .npz with an array 'x'")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # (np.save's .npy: one array, no names)
            raise UsageError(f"{where}: one array (numpy.save's .npy), not an .npz of named "
                             "arrays; save it as numpy.savez(path, x=x[, y=labels])")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{where}: not a readable .npz file ({e}); save one with "
                         "numpy.savez(path, x=x, y=y)") from None
    if "x" not in arrays:
        raise UsageError(f"{where}: has keys {sorted(arrays)} but no 'x'; save the inputs as "
                         "numpy.savez(path, x=x[, y=labels])")
    x = arrays["x"]
    if x.ndim not in (2, 3, 4) or x.shape[0] < 2 or x.size == 0:
        raise UsageError(f"{where}: 'x' has shape {x.shape}; expected N x D, N x H x W, "
                         "N x C x H x W or N x H x W x C, N >= 2")
    if x.dtype == np.bool_:
        x = x.astype(np.float32)  # (0/1 data)
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise UsageError(f"{where}: 'x' has dtype {x.dtype}; expected real numbers")
    if x.dtype == np.uint8 and x.max() <= 1:  # 8-bit levels would read 1 as 1/255
        raise UsageError(f"{where}: 'x' is uint8 holding only 0 and 1, but uint8 is read as "
                         "8-bit levels (0-255, divided by 255); save 0/1 data as bool or "
                         "float32 (x.astype(bool))")
    if x.ndim == 4:
        x = _channels_first(x, where)
    side = math.isqrt(x.shape[1]) if x.ndim == 2 else 0  # rows of s*s values: (1, s, s) images
    shape = (tuple(x.shape[1:]) if x.ndim == 4 else (1, *x.shape[1:]) if x.ndim == 3
             else (1, side, side) if side * side == x.shape[1] else None)
    y = _npz_labels(arrays, len(x), where)
    if x.dtype != np.uint8:  # 8-bit images stay 8-bit (converted per batch)
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise UsageError(f"{where}: 'x' contains NaN or infinite values (some may have "
                             "overflowed float32, beyond 3.4e38); clean or drop those rows, or "
                             "standardize the data ((x - mean) / std) before saving")
        check_magnitude(x, where)
        if likelihood == "bernoulli" and (x.min() < 0 or x.max() > 1):
            raise UsageError(f"{where}: 'x' lies in [{x.min():.9g}, {x.max():.9g}] but the "
                             "Bernoulli likelihood needs [0, 1]; rescale it (e.g. x / 255) or use "
                             "--likelihood 'gaussian'")
    rows = torch.as_tensor(np.ascontiguousarray(x.reshape(len(x), -1)))
    return Dataset(where, *_split(rows, y), image_shape=shape)


def _channels_first(x: np.ndarray, where: str) -> np.ndarray:
    """N x C x H x W from N x C x H x W or N x H x W x C (C in 1, 3, 4; the other two axes
    larger): channels first, as torch stores images."""
    first, last = x.shape[1] in COLOUR_CHANNELS, x.shape[3] in COLOUR_CHANNELS
    if first and (not last or x.shape[1] <= x.shape[3]):  # both, e.g. 3 x 3 x 3: the smaller
        return x
    if last:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise UsageError(f"{where}: 'x' has shape {x.shape}; a 4-D array is N x C x H x W or "
                     f"N x H x W x C with C in {COLOUR_CHANNELS}")


def _npz_labels(arrays: dict, n: int, where: str) -> Tensor | None:
    if "y" not in arrays:
        return None
    y = arrays["y"]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise UsageError(f"{where}: 'y' must be {n} non-negative integers (one label "
                         f"per row of 'x'), got dtype {y.dtype} shape {y.shape}")
    present = np.unique(y)
    if len(present) < int(y.max()) + 1:  # class K-1 implies classes 0..K-1: a model per class
        missing = sorted(set(range(min(int(y.max()) + 1, 10**6))) - set(present.tolist()))
        shown = ", ".join(map(str, present[:6])) + (", ..." if len(present) > 6 else "")
        raise UsageError(f"{where}: the labels ({shown}) skip class "
                         f"{', '.join(map(str, missing[:3]))}{', ...' if len(missing) > 3 else ''}"
                         f"; labels must be 0..K-1 with every class present: save "
                         "y=numpy.unique(y, return_inverse=True)[1]")
    return torch.as_tensor(y, dtype=torch.long)


def check_dataset(data: Dataset) -> None:
    """Refuse, in one line, a caller's :class:`Dataset` the models cannot read: splits of
    torch tensors, rows (N, D) of one width D (``image_shape``'s size), at least one row in
    training and test, uint8 or the default float dtype, finite; labels integers (N,),
    ``UNLABELLED`` or more."""
    splits = [(k, s) for k, s in (("train", data.train), ("test", data.test), ("val", data.val))
              if s is not None]
    width, default = None, torch.get_default_dtype()
    for key, split in splits:
        for name, t in (("x", split.x), ("y", split.y)):
            if t is not None and not isinstance(t, Tensor):
                raise UsageError(f"the Dataset's {key}.{name} is a {type(t).__name__}; give a "
                                 "torch tensor (torch.as_tensor)")
        x, y, where = split.x, split.y, f"the Dataset's {key}.x"
        if x.dim() != 2 or not len(x):
            raise UsageError(f"{where} has shape {tuple(x.shape)}; give rows (N, D), N >= 1 "
                             "(images flattened, as load_dataset gives them)")
        width = x.shape[1] if width is None else width
        if x.shape[1] != width:
            raise UsageError(f"{where} has rows of {x.shape[1]} values, the train split "
                             f"{width}; give every split the same width")
        if x.dtype != torch.uint8 and x.dtype != default:
            raise UsageError(f"{where} is {x.dtype}; give uint8 (8-bit levels) or "
                             f"{default} (x.to(torch.get_default_dtype()))")
        if x.is_floating_point() and not bool(x.isfinite().all()):
            raise UsageError(f"{where} contains NaN or infinite values; clean or drop those rows")
        if y is not None and (y.dtype != torch.long or y.shape != (len(x),)
                              or bool((y < UNLABELLED).any())):
            raise UsageError(f"the Dataset's {key}.y must be {len(x)} integer labels (torch.long; "
                             f"{UNLABELLED}: unlabelled), got {y.dtype} of shape {tuple(y.shape)}")
    shape = data.image_shape
    if shape is not None and math.prod(shape) != width:
        raise UsageError(f"the Dataset's image_shape {tuple(shape)} holds {math.prod(shape)} "
                         f"values, its rows {width}; give the shape of one row's image")


def hide_labels(data: Dataset, labelled: int, seed: int = 0) -> Dataset:
    """``data`` with ``labelled`` training labels kept and the rest set to -1: a
    class-balanced draw (``labelled // K`` per class, the remainder to classes drawn at
    random), seeded by ``seed``. Test (and validation) labels are kept."""
    y = data.train.y
    if y is None:
        raise UsageError(f"--labelled {labelled}: {data.name} has no labels to keep")
    n = len(y)
    if not 0 < labelled <= n or labelled != int(labelled):
        raise UsageError(f"--labelled must be a whole number between 1 and the {n} training "
                         f"images (0: every label), got {labelled}")
    classes = data.num_classes
    g = torch.Generator().manual_seed(seed)
    quota = torch.full((classes,), labelled // classes, dtype=torch.long)
    quota[torch.randperm(classes, generator=g)[: labelled % classes]] += 1
    y_cpu = y.cpu()
    keep = []
    for k in range(classes):
        rows = (y_cpu == k).nonzero().squeeze(1)
        if len(rows) < quota[k]:
            raise UsageError(f"--labelled {labelled}: a class-balanced draw needs {int(quota[k])} "
                             f"images of class {k}, and the training split has {len(rows)}; "
                             "give fewer labels")
        keep.append(rows[torch.randperm(len(rows), generator=g)[: quota[k]]])
    kept = torch.cat(keep)
    hidden = torch.full_like(y_cpu, UNLABELLED)
    hidden[kept] = y_cpu[kept]
    return replace(data, train=replace(data.train, y=hidden.to(y.device)))


MAGNITUDE_MARGIN = 1e3
"""How far below float32 overflow the data must stay: ``|x| <= sqrt(float32.max / D) /
MAGNITUDE_MARGIN`` for rows of D values (4.6e15 for 16 values, 6.6e14 for 784)."""


def check_magnitude(x: np.ndarray | Tensor, where: str) -> None:
    """:class:`UsageError` for data (rows first) whose squares, summed over a row, come
    within :data:`MAGNITUDE_MARGIN` squared of float32's largest value: every log-density
    (a Gaussian's ``-(x - mu)^2 / 2 sigma^2``) and gradient would overflow to inf or NaN."""
    dim = math.prod(x.shape[1:])
    peak = float(abs(x).max())
    limit = math.sqrt(float(np.finfo(np.float32).max) / max(1, dim)) / MAGNITUDE_MARGIN
    if peak > limit:
        raise UsageError(f"{where}: the data reach {peak:.3g} in magnitude, beyond {limit:.2g}, "
                         f"where float32 log-densities of rows of {dim} values overflow; "
                         "standardize them ((x - mean) / std) or rescale them")


def _split(x: Tensor, y: Tensor | None, fraction: float = TEST_FRACTION) -> tuple[Split, Split]:
    """A fixed seeded shuffle, then ``1 - fraction`` of the rows first and the rest second."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    n_test = max(1, round(fraction * len(x)))
    return tuple(Split(x[rows], None if y is None else y[rows])
                 for rows in (perm[n_test:], perm[:n_test]))


def _binarize(data: Dataset, how: str) -> Dataset:
    """``static``: one fixed Bernoulli draw of every split. ``dynamic``: a fixed draw of the
    test split; the training split is redrawn every epoch (:meth:`Dataset.train_epoch`)."""
    if how == "none":
        return data
    if how not in ("static", "dynamic"):
        raise UsageError(f"--binarize {how!r} is not one of none, static, dynamic")
    if data.eight_bit:  # Bernoulli draws need grey levels in [0, 1]
        data = replace(data, train=replace(data.train, x=pixels(data.train.x)),
                       test=replace(data.test, x=pixels(data.test.x)))
    if data.train.x.min() < 0 or data.train.x.max() > 1:
        raise UsageError("--binarize needs inputs in [0, 1]; rescale the data or use "
                         "--binarize 'none'")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test = replace(data.test, x=torch.bernoulli(data.test.x, generator=g))
    if how == "dynamic":
        return replace(data, test=test, dynamic=True)
    return replace(data, train=replace(data.train, x=torch.bernoulli(data.train.x, generator=g)),
                   test=test)
