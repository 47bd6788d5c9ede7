import subprocess
import sys

import numpy as np
import pytest
import torch

import train_mnist
from conftest import REPO, synthetic_digits, write_idx, write_mnist


def test_load_mnist_reads_real_idx_bytes(tmp_path):
    data_dir = write_mnist(tmp_path, train_count=30, test_count=7, seed=3)
    images, labels = train_mnist.load_mnist(data_dir, train=True)
    expected_images, expected_labels = synthetic_digits(30, seed=4)
    assert images.dtype == torch.uint8 and images.shape == (30, 28, 28)
    assert torch.equal(images, torch.from_numpy(expected_images))
    assert labels.tolist() == expected_labels.tolist()
    test_images, _ = train_mnist.load_mnist(data_dir, train=False)
    assert test_images.shape == (7, 28, 28)


def test_normalize_uses_the_mnist_mean_and_std():
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(1, 28, 2)
    normalized = train_mnist.normalize(images)
    assert normalized.shape == (1, 1, 28, 2) and normalized.dtype == torch.float32
    low, high = normalized[0, 0, 0].tolist()
    assert low == pytest.approx((0 - 0.1307) / 0.3081)
    assert high == pytest.approx((1 - 0.1307) / 0.3081)


def make_loader(count=103, batch_size=10, seed=5):
    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1)
    labels = torch.arange(count)
    return train_mnist.DeviceLoader(images, labels, batch_size, shuffle=True, seed=seed)


def epoch_order(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    for images, labels in batches:  # images and labels stay paired
        assert torch.equal(images.view(-1).long(), labels)
    return [label for _, labels in batches for label in labels.tolist()], [len(b[1]) for b in batches]


def test_loader_yields_every_sample_once_per_epoch_with_the_partial_batch():
    loader = make_loader()
    order, sizes = epoch_order(loader, 1)
    assert sorted(order) == list(range(103))
    assert sizes == [10] * 10 + [3] and len(loader) == 11


def test_loader_shuffles_reproducibly_per_seed_and_epoch():
    first, _ = epoch_order(make_loader(seed=5), 1)
    again, _ = epoch_order(make_loader(seed=5), 1)
    next_epoch, _ = epoch_order(make_loader(seed=5), 2)
    other_seed, _ = epoch_order(make_loader(seed=6), 1)
    assert first == again
    assert first != next_epoch and first != other_seed
    assert first != list(range(103))


def test_unshuffled_loader_keeps_file_order():
    loader = train_mnist.DeviceLoader(torch.zeros(25, 1, 28, 28), torch.arange(25), 10)
    assert [labels.tolist() for _, labels in loader] == [list(range(10)), list(range(10, 20)),
                                                         list(range(20, 25))]


def test_missing_data_says_where_and_how_to_fix(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train_mnist.py"), "--data-dir", str(tmp_path / "nowhere"),
         "--log-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    message = lines[-1]
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte", "--data-dir"):
        assert name in message
    assert not (tmp_path / "runs").exists()


def test_corrupt_file_is_a_clear_error(tmp_path):
    data_dir = write_mnist(tmp_path)
    write_idx(data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros((2, 2), np.uint8))
    with pytest.raises(train_mnist.UserError, match="train-labels-idx1-ubyte|MNIST"):
        train_mnist.load_mnist(data_dir, train=True)
