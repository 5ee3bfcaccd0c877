"""Datasets: digits, npz files, binarization, batching, and the offline MNIST-10k split."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from helpers import build_model
from sklearn.datasets import load_digits

from ppl_vae import TrainConfig, UsageError, load_dataset
from ppl_vae.data import hide_labels, pixels


def rows_sorted(x: torch.Tensor) -> np.ndarray:
    a = x.numpy()
    return a[np.lexsort(a.T[::-1])]


# -- digits --------------------------------------------------------------------------------------

def test_digits_split(digits):
    assert digits.name == "digits" and digits.image_shape == (1, 8, 8)
    assert digits.train.x.shape == (1438, 64) and digits.test.x.shape == (359, 64)
    assert len(digits.train) == 1438 and len(digits.test) == 359
    assert digits.input_dim == 64 and digits.num_classes == 10
    for split in (digits.train, digits.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.long
        assert split.x.min() == 0 and split.x.max() == 1
        assert torch.equal(split.x * 16, (split.x * 16).round())  # grey levels k / 16
        assert set(split.y.tolist()) == set(range(10))
    assert not digits.dynamic
    # the two splits are a partition of scikit-learn's 1797 images, labels kept with rows
    bunch = load_digits()
    everything = torch.cat([digits.train.x, digits.test.x])
    assert np.array_equal(rows_sorted(everything),
                          rows_sorted(torch.as_tensor(bunch.data, dtype=torch.float32) / 16))
    labelled = torch.cat([torch.cat([s.x, s.y[:, None].float()], 1)
                          for s in (digits.train, digits.test)])
    expected = np.concatenate([bunch.data / 16, bunch.target[:, None]], 1).astype(np.float32)
    assert np.array_equal(rows_sorted(labelled), rows_sorted(torch.as_tensor(expected)))


def test_digits_split_ignores_the_global_seed(digits):
    torch.manual_seed(12345)
    again = load_dataset("digits")
    assert torch.equal(again.train.x, digits.train.x) and torch.equal(again.test.y, digits.test.y)


def test_load_dataset_takes_its_last_settings_by_keyword_only():
    # (a fifth value given by position was taken as the likelihood, silently)
    with pytest.raises(TypeError):
        load_dataset("digits", "data", False, "none", 50)


def test_unknown_dataset():
    # raised to a Python caller, the message names the Python setting, not the flag
    with pytest.raises(UsageError, match="unknown dataset='cifar'.*digits"):
        load_dataset("cifar")


def test_missing_mnist_names_the_directory(tmp_path):
    with pytest.raises(UsageError) as e:
        load_dataset("mnist", str(tmp_path), download=False)
    message = str(e.value)
    assert str(tmp_path) in message and "dataset='digits'" in message
    assert "download=False" in message and "--" not in message
    assert "\n" not in message


# -- binarization --------------------------------------------------------------------------------

def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def test_dynamic_binarization(digits, sem):
    dyn = load_dataset("digits", binarize="dynamic")
    assert dyn.dynamic
    assert torch.equal(dyn.train.x, digits.train.x)  # grey levels kept, drawn per epoch
    assert is_binary(dyn.test.x)
    assert torch.equal(dyn.test.x, load_dataset("digits", binarize="dynamic").test.x)
    # the fixed test draw is a draw from the grey levels: pixels at 0 or 1 are kept
    grey = digits.test.x
    assert torch.equal(dyn.test.x[grey == 0], grey[grey == 0])
    assert torch.equal(dyn.test.x[grey == 1], grey[grey == 1])
    first, second = dyn.train_epoch(), dyn.train_epoch()
    assert is_binary(first) and is_binary(second)
    assert first.shape == digits.train.x.shape
    assert not torch.equal(first, second)
    # E[bernoulli(p)] = p: the mean of a draw matches the mean grey level
    p = digits.train.x
    se = math.sqrt((p * (1 - p)).sum().item()) / p.numel()
    assert abs(first.mean().item() - p.mean().item()) < 4 * se


def test_static_binarization(digits):
    st = load_dataset("digits", binarize="static")
    assert not st.dynamic
    assert is_binary(st.train.x) and is_binary(st.test.x)
    assert torch.equal(st.train_epoch(), st.train.x) and torch.equal(st.train_epoch(), st.train.x)
    assert torch.equal(st.train.x, load_dataset("digits", binarize="static").train.x)
    assert torch.equal(st.train.y, digits.train.y)


def test_no_binarization_returns_the_grey_levels(digits):
    assert digits.train_epoch() is digits.train.x


def test_binarize_rejects_bad_requests(tmp_path):
    with pytest.raises(UsageError, match="binarize='half'"):
        load_dataset("digits", binarize="half")
    path = tmp_path / "wide.npz"
    np.savez(path, x=np.linspace(-2, 2, 40).reshape(10, 4))
    with pytest.raises(UsageError, match=r"binarize needs inputs in \[0, 1\]"):
        load_dataset(f"npz:{path}", binarize="static", likelihood="gaussian")


# -- npz -----------------------------------------------------------------------------------------

def save(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.mark.parametrize("shape, image_shape", [
    ((50, 5, 7), (1, 5, 7)), ((50, 16), (1, 4, 4)), ((50, 10), None),
    ((50, 3, 5, 7), (3, 5, 7)), ((50, 1, 6, 6), (1, 6, 6)),
])
@pytest.mark.parametrize("labels", [True, False])
def test_npz_loads(tmp_path, shape, image_shape, labels):
    n = shape[0]
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    x.reshape(n, -1)[:, 0] = np.arange(n) / n  # row i is tagged by its first pixel
    arrays = dict(x=x)
    if labels:
        arrays["y"] = np.arange(n) % 3
    name = save(tmp_path, **arrays)
    data = load_dataset(name)
    assert data.name == name and data.image_shape == image_shape
    d = int(np.prod(shape[1:]))
    assert data.input_dim == d
    assert (len(data.train), len(data.test)) == (40, 10)
    everything = torch.cat([data.train.x, data.test.x])
    assert np.array_equal(rows_sorted(everything), rows_sorted(torch.as_tensor(x.reshape(n, d))))
    if labels:
        assert data.num_classes == 3
        for split in (data.train, data.test):
            row = (split.x[:, 0] * n).round().long()
            assert torch.equal(split.y, row % 3)
    else:
        assert data.train.y is None and data.test.y is None and data.num_classes is None


def test_npz_uint8_rows_are_8_bit_pixels(tmp_path):
    x = np.arange(40, dtype=np.uint8).reshape(10, 4) * 6
    data = load_dataset(save(tmp_path, x=x), likelihood="bernoulli")
    assert data.eight_bit and data.train.x.dtype == torch.uint8
    assert data.image_shape == (1, 2, 2)
    got = pixels(torch.cat([data.train.x, data.test.x]))
    assert got.dtype == torch.float32
    assert np.array_equal(rows_sorted(got), rows_sorted(torch.as_tensor(x) / 255.0))


def test_npz_pixels_beyond_1_need_rescaling_for_bernoulli_only(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4) * 6
    name = save(tmp_path, x=x)
    with pytest.raises(UsageError, match=r"lies in \[0, 234\].*x / 255.*likelihood='gaussian'"):
        load_dataset(name, likelihood="bernoulli")
    # without a likelihood the data load as they are; the model checks the range when built
    data = load_dataset(name)
    assert data.train.x.dtype == torch.float32 and data.train.x.max() > 1
    bernoulli = TrainConfig(dataset=name, model_options=dict(hidden=(4,), z_dim=2))
    with pytest.raises(UsageError, match=r"the data lie in \[0, 234\] but the Bernoulli "
                                         r"likelihood needs \[0, 1\].*x / 255.*"
                                         r"use likelihood='gaussian'"):
        build_model(bernoulli, data)
    gaussian = TrainConfig(dataset=name,
                           model_options=dict(hidden=(4,), z_dim=2, likelihood="gaussian"))
    assert build_model(gaussian, data).likelihood == "gaussian"
    data = load_dataset(name, likelihood="gaussian")
    assert data.train.x.dtype == torch.float32 and data.train.x.max() > 1


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((4, 4))), r"has keys \['images'\] but no 'x'"),
    (dict(x=np.zeros(10)), r"'x' has shape \(10,\)"),
    (dict(x=np.zeros((3, 2, 2, 2))), r"'x' has shape \(3, 2, 2, 2\)"),
    (dict(x=np.zeros((1, 4))), r"N >= 2"),
    (dict(x=np.zeros((4, 0))), r"'x' has shape \(4, 0\)"),
    (dict(x=np.array([["a", "b"], ["c", "d"]])), r"expected real numbers"),
    (dict(x=np.array([[0.5, np.nan], [0.1, 0.2]])), r"NaN or infinite"),
    (dict(x=np.array([[0.5, np.inf], [0.1, 0.2]])), r"NaN or infinite"),
    (dict(x=np.zeros((4, 4)), y=np.arange(3)), r"'y' must be 4 non-negative integers"),
    (dict(x=np.zeros((4, 4)), y=np.arange(4.0)), r"got dtype float64"),
    (dict(x=np.zeros((4, 4)), y=np.array([0, 1, -1, 2])), r"non-negative"),
])
def test_npz_errors(tmp_path, arrays, message):
    with pytest.raises(UsageError, match=message) as e:
        load_dataset(save(tmp_path, **arrays))
    assert "\n" not in str(e.value)


def test_npz_range_is_checked_for_the_bernoulli_likelihood(tmp_path):
    name = save(tmp_path, x=np.full((4, 4), 1.5))
    with pytest.raises(UsageError, match=r"Bernoulli likelihood needs \[0, 1\]") as e:
        load_dataset(name, likelihood="bernoulli")
    assert "\n" not in str(e.value)
    assert load_dataset(name).train.x.max() == 1.5  # no check unless asked


def test_npz_missing_or_unreadable(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "bad.npz").write_bytes(b"definitely not a zip archive")
    with pytest.raises(UsageError, match="not a readable .npz"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    # object arrays would need pickle: refused, never unpickled
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(UsageError, match="not a readable .npz"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")


# -- MNIST-10k (real data, offline) --------------------------------------------------------------

TRAIN_COUNTS = [791, 913, 820, 768, 786, 706, 800, 813, 781, 822]
TEST_COUNTS = [189, 222, 212, 242, 196, 186, 158, 215, 193, 187]


def test_mnist_from_shared_data(mnist_root):
    data = load_dataset("mnist", str(mnist_root), download=False)
    assert data.name == "mnist" and data.image_shape == (1, 28, 28) and data.input_dim == 784
    assert data.train.x.shape == (8000, 784) and data.test.x.shape == (2000, 784)
    for split, counts in ((data.train, TRAIN_COUNTS), (data.test, TEST_COUNTS)):
        assert split.x.dtype == torch.float32
        assert split.x.min() == 0 and split.x.max() == 1
        assert torch.equal(split.x * 255, (split.x * 255).round())
        assert torch.bincount(split.y, minlength=10).tolist() == counts
    assert data.num_classes == 10
    # white strokes on a black background: most pixels are 0, mean intensity about 0.13
    assert 0.1 < data.train.x.mean() < 0.2


# -- images with channels, 8-bit storage, hidden labels -------------------------------------------


def test_sample_patches_are_the_photographs_cut_into_32x32_tiles():
    from sklearn.datasets import load_sample_images

    data = load_dataset("sample-patches")
    assert data.image_shape == (3, 32, 32) and data.eight_bit
    assert (len(data.train), len(data.test)) == (416, 104) and data.num_classes == 2
    photos = load_sample_images().images  # 427 x 640 x 3 each: 13 x 20 tiles
    tiles = []
    for label, img in enumerate(photos):
        for r in range(13):
            for c in range(20):
                tile = img[32 * r: 32 * r + 32, 32 * c: 32 * c + 32].transpose(2, 0, 1)
                tiles.append((torch.as_tensor(tile.copy()).reshape(-1), label))
    want = rows_sorted(torch.stack([t for t, _ in tiles]))
    x = torch.cat([data.train.x, data.test.x])
    assert np.array_equal(rows_sorted(x), want)  # every tile once, channels first
    first = x[0].view(3, 32, 32)  # a row reshaped is the tile in C, H, W order
    assert any(torch.equal(first, t.view(3, 32, 32)) for t, _ in tiles)
    again = load_dataset("sample-patches")  # the split never changes
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.test.y, data.test.y)


def test_npz_channels_last_and_first_load_the_same(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (20, 3, 6, 5), dtype=np.uint8)
    a = load_dataset(save(tmp_path, "a.npz", x=nchw))
    b = load_dataset(save(tmp_path, "b.npz", x=nchw.transpose(0, 2, 3, 1)))
    assert a.image_shape == b.image_shape == (3, 6, 5)
    assert torch.equal(a.train.x, b.train.x) and a.train.x.dtype == torch.uint8
    floats = load_dataset(save(tmp_path, "c.npz", x=nchw.astype(np.float32) / 255))
    assert torch.allclose(floats.train.x, pixels(a.train.x))
    with pytest.raises(UsageError, match="N x C x H x W or N x H x W x C"):
        load_dataset(save(tmp_path, "d.npz", x=np.zeros((4, 5, 6, 7), np.float32)))


def test_the_default_data_args_gives_float_pixels_and_binarize_takes_8_bit_rows():
    from ppl_vae.models import Model, hook

    data = load_dataset("sample-patches")
    (x,) = hook(Model(), "data_args")(data.test.x, data.test.y)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, data.test.x.float() / 255)
    binary = load_dataset("sample-patches", binarize="static")
    assert binary.train.x.dtype == torch.float32
    assert set(binary.train.x.unique().tolist()) <= {0.0, 1.0}


def test_labelled_keeps_a_class_balanced_seeded_draw(digits):
    n = len(digits.train)
    data = hide_labels(digits, 55, seed=1)
    y = data.train.y
    assert data.labelled == 55 and int((y == -1).sum()) == n - 55
    counts = torch.bincount(y[y >= 0], minlength=10)
    assert counts.sum() == 55 and counts.max() - counts.min() == 1  # 5 or 6 per class
    kept = y >= 0
    assert torch.equal(y[kept], digits.train.y[kept])  # the true labels of the kept rows
    assert torch.equal(data.test.y, digits.test.y) and torch.equal(data.train.x, digits.train.x)
    assert torch.equal(hide_labels(digits, 55, seed=1).train.y, y)  # seeded
    assert not torch.equal(hide_labels(digits, 55, seed=2).train.y, y)
    assert load_dataset("digits", labelled=55, seed=1).labelled == 55
    for bad in (0, n + 1):
        with pytest.raises(UsageError, match="labelled must be a whole number"):
            hide_labels(digits, bad)
    with pytest.raises(UsageError, match="class-balanced draw needs"):
        hide_labels(digits, n)  # not enough images in the smallest class


def test_validation_under_hidden_labels_keeps_every_label_for_training(digits):
    data = hide_labels(digits, 100, seed=0).with_validation(0.1)
    assert data.labelled == 100 and int((data.val.y >= 0).sum()) == 0
    assert len(data.train) + len(data.val) == len(digits.train)


def test_label_conditioned_cvae_refuses_hidden_labels(digits):
    cfg = TrainConfig(model="cvae", model_options=dict(condition="label", hidden=(8,), z_dim=2))
    with pytest.raises(UsageError, match="are hidden .*labelled.*model='ssvae'"):
        build_model(cfg, hide_labels(digits, 100))


@pytest.mark.parametrize("name", ["cifar10", "svhn", "celeba"])
def test_missing_colour_datasets_are_one_line_offline(tmp_path, name):
    with pytest.raises(UsageError, match=f"{name} is not in .*sample-patches"):
        load_dataset(name, str(tmp_path), download=False)


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    from torchvision import datasets

    def fail(self):
        os.makedirs(self.raw_folder, exist_ok=True)  # as torchvision does before fetching
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets.MNIST, "download", fail)
    kept = tmp_path / "data" / "mine.txt"
    kept.parent.mkdir()
    kept.write_text("a user's file")
    with pytest.raises(UsageError, match="could not be downloaded .RuntimeError: Error downloa"):
        load_dataset("mnist", str(tmp_path / "data"), download=True)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["mine.txt"]
    with pytest.raises(UsageError):
        load_dataset("mnist", str(tmp_path / "fresh"), download=True)
    assert not (tmp_path / "fresh").exists()
