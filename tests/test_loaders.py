"""The colour loaders on files in torchvision's own on-disk formats, written here with the
libraries torchvision reads them with: CIFAR-10's pickled batches, SVHN's MATLAB files and
CelebA's JPEG folder with its five text files.

torchvision checks each file's MD5 sum against the real dataset's before reading, which
tiny stand-ins cannot match; the tests switch that one check off (``_check_integrity`` and
CIFAR's meta-file check) and leave the reading itself to torchvision, as a user's real files
would be read."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets
from torchvision.datasets import cifar

from ppl_vae import load_dataset
from ppl_vae.cli import train_main

RNG = np.random.default_rng(0)
TINY = ["--epochs", "1", "--batch-size", "8", "--eval-particles", "2", "--no-download"]


@pytest.fixture
def trusted(monkeypatch):
    for name in ("CIFAR10", "SVHN", "CelebA"):
        monkeypatch.setattr(getattr(datasets, name), "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # (meta)


def write_cifar10(root: Path, per_batch: int = 6, test: int = 8) -> np.ndarray:
    """cifar-10-batches-py: five training batches, a test batch and the meta file, each a
    pickled dict of 'data' (N x 3072 uint8, channel planes) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = []
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        y = [int(v) for v in RNG.integers(0, 10, n)]
        labels.append(y)
        batch = {"batch_label": name, "labels": y, "filenames": [f"{i}.png" for i in range(n)],
                 "data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.array(sum(labels[:5], []))


def write_svhn(root: Path, train: int = 30, test: int = 10) -> None:
    """train_32x32.mat / test_32x32.mat: 'X' 32 x 32 x 3 x N uint8, 'y' N x 1 in 1..10
    (10 is the digit 0)."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("test", test)):
        y = RNG.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        savemat(root / f"{name}_32x32.mat",
                {"X": RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})


def write_celeba(root: Path, n: int = 24) -> np.ndarray:
    """celeba/img_align_celeba/*.jpg (178 x 218) and the partition, identity, box, landmark
    and attribute files (40 attributes of -1/1; partition 0 train, 1 valid, 2 test)."""
    from PIL import Image

    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(RNG.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(
            folder / "img_align_celeba" / name, quality=90)
    part = np.array([0] * (n - 8) + [1] * 3 + [2] * 5)
    attrs = RNG.choice([-1, 1], (n, 40))
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{f} {p}\n" for f, p in zip(names, part, strict=True)))
    (folder / "identity_CelebA.txt").write_text("".join(f"{f} {i % 5 + 1}\n"
                                                        for i, f in enumerate(names)))
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{f} 95 71 226 313\n" for f in names))
    marks = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y " \
            "rightmouth_x rightmouth_y"
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{marks}\n" + "".join(f"{f} 69 109 106 113 77 142 73 152 108 154\n"
                                    for f in names))
    header = " ".join(f"attr_{i}" for i in range(40))
    (folder / "list_attr_celeba.txt").write_text(
        f"{n}\n{header}\n" + "".join(f"{f} " + " ".join(map(str, a)) + "\n"
                                     for f, a in zip(names, attrs, strict=True)))
    return (attrs[part == 0, 20] + 1) // 2, (attrs[part == 2, 20] + 1) // 2


def test_cifar10_reads_its_pickled_batches(tmp_path, trusted):
    labels = write_cifar10(tmp_path)
    data = load_dataset("cifar10", str(tmp_path), download=False)
    assert data.image_shape == (3, 32, 32) and data.eight_bit
    assert (len(data.train), len(data.test)) == (30, 8)
    assert data.train.x.shape == (30, 3072) and data.train.x.dtype == torch.uint8
    assert data.train.y.tolist() == labels.tolist()
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(data.train.x[0], torch.as_tensor(raw["data"][0]))  # channel planes kept


def test_svhn_reads_its_matlab_files(tmp_path, trusted):
    write_svhn(tmp_path)
    data = load_dataset("svhn", str(tmp_path), download=False)
    assert (len(data.train), len(data.test)) == (30, 10)
    assert data.train.x.shape == (30, 3072) and data.train.x.dtype == torch.uint8
    assert data.train.y[0] == 0 and set(data.train.y.tolist()) <= set(range(10))  # 10 -> 0


def test_celeba_reads_its_image_folder_and_partition(tmp_path, trusted):
    train_labels, test_labels = write_celeba(tmp_path)
    data = load_dataset("celeba", str(tmp_path), download=False)
    assert data.image_shape == (3, 64, 64)
    assert (len(data.train), len(data.test)) == (16, 5)  # the valid partition is left out
    assert data.train.x.shape == (16, 3 * 64 * 64) and data.train.x.dtype == torch.uint8
    assert data.train.y.tolist() == train_labels.tolist()  # attribute 20 as 0/1
    assert data.test.y.tolist() == test_labels.tolist()
    assert (tmp_path / "celeba" / "ppl_vae-64-train.pt").is_file()  # decoded once, cached
    again = load_dataset("celeba", str(tmp_path), download=False)
    assert torch.equal(again.train.x, data.train.x)


@pytest.mark.parametrize("name, write", [("cifar10", write_cifar10), ("svhn", write_svhn),
                                         ("celeba", write_celeba)])
@pytest.mark.parametrize("model", [["--model", "conv-vae", "--channels", "8", "16"],
                                   ["--model", "vae", "--hidden", "16", "--z-dim", "2"]])
def test_each_trains_from_the_command_line(tmp_path, trusted, cli, name, write, model):
    write(tmp_path / "data")
    out = tmp_path / "run"
    result = cli(train_main, ["--dataset", name, "--data-dir", tmp_path / "data", *TINY,
                              *model, "--out", out])
    assert result.code == 0, result.err
    assert (out / "summary.json").is_file() and (out / "samples.png").is_file()
