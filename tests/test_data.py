import functools
import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

import train_mnist
from conftest import one_line_error, synthetic_digits, write_idx, write_mnist

CPU = torch.device("cpu")


def test_load_split_reads_real_idx_bytes(tmp_path):
    data_dir = write_mnist(tmp_path, train_count=30, test_count=7, seed=3)
    train_set = train_mnist.load_split(data_dir, train=True, device=CPU)
    expected_images, expected_labels = synthetic_digits(30, seed=4)
    assert train_set.raw.dtype == torch.uint8 and train_set.raw.shape == (30, 28, 28)
    assert torch.equal(train_set.raw, torch.from_numpy(expected_images))
    assert train_set.labels.dtype == torch.int64
    assert train_set.labels.tolist() == expected_labels.tolist()
    assert torch.equal(train_set.images, train_mnist.normalize(train_set.raw))
    test_set = train_mnist.load_split(data_dir, train=False, device=CPU)
    assert test_set.raw.shape == (7, 28, 28) and test_set.images.shape == (7, 1, 28, 28)


def test_the_real_files_read_as_published(real_data_dir):
    """The first labels, the class counts and the pixel sums of the published MNIST."""
    train_set = train_mnist.load_split(real_data_dir, train=True, device=CPU)
    test_set = train_mnist.load_split(real_data_dir, train=False, device=CPU)
    assert train_set.raw.shape == (60_000, 28, 28) and test_set.raw.shape == (10_000, 28, 28)
    assert train_set.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert test_set.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(train_set.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                                                         5949]
    assert torch.bincount(test_set.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(train_set.raw.long().sum()) == 1_567_298_545 and int(test_set.raw.long().sum()) == 264_923_200


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
    assert first not in (next_epoch, other_seed)
    assert first != list(range(103))


def test_loader_resumes_mid_epoch_with_the_remaining_batches():
    loader = make_loader()
    loader.set_epoch(3)
    whole = [labels.tolist() for _, labels in loader]
    assert [labels.tolist() for _, labels in loader.batches(first=4)] == whole[4:]


def test_unshuffled_loader_keeps_file_order():
    loader = train_mnist.DeviceLoader(torch.zeros(25, 1, 28, 28), torch.arange(25), 10)
    assert [labels.tolist() for _, labels in loader] == [list(range(10)), list(range(10, 20)),
                                                         list(range(20, 25))]


def test_image_grid_tiles_like_make_grid():
    images = torch.rand(10, 1, 5, 4)
    grid = train_mnist.image_grid(images, columns=4, pad_value=0.5)
    assert grid.shape == (1, 3 * 7 + 2, 4 * 6 + 2)
    assert torch.equal(grid[:, 2:7, 2:6], images[0]) and torch.equal(grid[:, 9:14, 8:12], images[5])
    assert torch.all(grid[:, :2] == 0.5) and torch.all(grid[:, 16:, 14:] == 0.5)  # padding, empty cells


@pytest.mark.parametrize("present", [(), ("train-images-idx3-ubyte",), ("train-images-idx3-ubyte",
                                     "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")], ids=len)
def test_missing_files_are_listed_in_one_line_with_where_they_belong(tmp_path, capsys, present,
                                                                     download_attempts):
    raw = write_mnist(tmp_path / "data") / "MNIST" / "raw"
    for name in set(train_mnist.MNIST_FILES) - set(present):
        (raw / name).unlink()
    code = train_mnist.main(["--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "runs")])
    assert code == 1
    missing = [name for name in train_mnist.MNIST_FILES if name not in present]
    assert one_line_error(capsys) == (
        f"error: {', '.join(missing)} missing from {raw}, and the download failed. Put the "
        f"file{'s' * (len(missing) > 1)} there (uncompressed), or point --data-dir at the folder that holds "
        "MNIST/raw/")
    # Each missing file was asked of each mirror, and the guard refused it: no test downloads.
    assert sorted(download_attempts()) == sorted(f"{mirror}{name}.gz" for mirror in train_mnist.MNIST_MIRRORS
                                                 for name in missing)
    assert sorted(path.name for path in raw.iterdir()) == sorted(present)
    assert not (tmp_path / "runs").exists()


def test_evaluate_needs_only_the_test_files(tmp_path, capsys):
    data_dir = write_mnist(tmp_path / "data")
    assert train_mnist.main(["--epochs", "1", "--num-embeddings", "0", "--device", "cpu", "--val-size", "0",
                             "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "runs"),
                             "--run-name", "r"]) == 0
    for name in train_mnist.MNIST_FILES[:2]:
        (data_dir / "MNIST" / "raw" / name).unlink()
    capsys.readouterr()
    assert train_mnist.main(["--evaluate", str(tmp_path / "runs" / "r"), "--device", "cpu"]) == 0
    assert "Test accuracy: " in capsys.readouterr().out


class Mirror(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass


def test_missing_files_are_downloaded_from_the_first_mirror_that_has_them_whole(tmp_path, monkeypatch):
    """Mirrors served on loopback: one lacks the files, one serves a damaged copy, one is right."""
    published = write_mnist(tmp_path / "published") / "MNIST" / "raw"
    for folder in ("good", "damaged"):
        (tmp_path / "site" / folder).mkdir(parents=True)
        for name in train_mnist.MNIST_FILES:
            content = (published / name).read_bytes()
            if folder == "damaged":
                content = content[:-1] + bytes([content[-1] ^ 1])
            (tmp_path / "site" / folder / f"{name}.gz").write_bytes(gzip.compress(content))
    checksums = {name: hashlib.md5((published / name).read_bytes()).hexdigest()
                 for name in train_mnist.MNIST_FILES}
    monkeypatch.setattr(train_mnist, "MNIST_MD5", checksums)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Mirror, directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    mirrors = (f"{base}/missing/", f"{base}/damaged/", f"{base}/good/")
    monkeypatch.setattr(train_mnist, "MNIST_MIRRORS", mirrors)
    try:
        train_mnist.download_missing(tmp_path / "data", train_mnist.MNIST_FILES[2:])
        test_set = train_mnist.load_split(tmp_path / "data", train=False, device=CPU)
        raw = tmp_path / "data" / "MNIST" / "raw"
        assert sorted(path.name for path in raw.iterdir()) == ["t10k-images-idx3-ubyte",
                                                               "t10k-labels-idx1-ubyte"]
        assert test_set.raw.shape == (100, 28, 28)
        assert train_mnist.main(["--epochs", "1", "--num-embeddings", "0", "--device", "cpu", "--val-size",
                                 "0", "--data-dir", str(tmp_path / "data"), "--log-dir",
                                 str(tmp_path / "runs")]) == 0
    finally:
        server.shutdown()
        server.server_close()
    for name in train_mnist.MNIST_FILES:
        assert (raw / name).read_bytes() == (published / name).read_bytes()


def test_corrupt_file_is_a_clear_error(tmp_path):
    data_dir = write_mnist(tmp_path)
    write_idx(data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros((2, 2), np.uint8))
    with pytest.raises(train_mnist.UserError, match="train-labels-idx1-ubyte is not an MNIST label file"):
        train_mnist.load_split(data_dir, train=True, device=CPU)
