import collections
import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import MNIST

import train_mnist
from conftest import one_line_error, synthetic_digits, write_idx, write_mnist
from models import MNISTNet

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
    split = train_mnist.Split(None, images, labels)
    return train_mnist.DeviceLoader(split, batch_size, shuffle=True, seed=seed)


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


def test_an_epoch_replays_from_seed_and_epoch_alone_as_a_resumed_run_needs():
    trained_on = make_loader()
    for epoch in (1, 2, 3):  # a run that went through epochs 1 and 2 first
        order, _ = epoch_order(trained_on, epoch)
    resumed, _ = epoch_order(make_loader(), 3)  # a new process, resuming at epoch 3
    assert resumed == order


def test_unshuffled_loader_keeps_file_order():
    split = train_mnist.Split(None, torch.zeros(25, 1, 28, 28), torch.arange(25))
    loader = train_mnist.DeviceLoader(split, 10)
    assert [labels.tolist() for _, labels in loader] == [list(range(10)), list(range(10, 20)),
                                                         list(range(20, 25))]


@pytest.mark.parametrize("present", [(), ("train-images-idx3-ubyte",), ("train-images-idx3-ubyte",
                                     "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")], ids=len)
def test_missing_files_are_listed_in_one_line_with_where_they_belong(tmp_path, capsys, present,
                                                                     download_attempts):
    raw = write_mnist(tmp_path / "data") / "MNIST" / "raw"
    for name in set(train_mnist.MNIST_FILES) - set(present):
        (raw / name).unlink()
    for flags in ([], ["--evaluate", str(write_checkpoint(tmp_path))]):  # --evaluate needs all four too
        data_flags = ["--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "runs")]
        assert train_mnist.main([*flags, *data_flags]) == 1
        missing = [name for name in train_mnist.MNIST_FILES if name not in present]
        assert one_line_error(capsys) == (
            f"error: {', '.join(missing)} missing from {raw}, and the download failed (urlopen error the "
            f"tests never download ({MNIST.mirrors[-1]}train-images-idx3-ubyte.gz)). Put the "
            f"file{'s' * (len(missing) > 1)} there (uncompressed), or point --data-dir at the folder that "
            "holds MNIST/raw/")
    # torchvision asked its mirrors, and the guard refused: no test downloads.
    assert download_attempts() and all(url.startswith(tuple(MNIST.mirrors)) for url in download_attempts())
    assert sorted(path.name for path in raw.iterdir()) == sorted(present)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("folder", ["MNIST/raw", "."], ids=["in MNIST-raw", "in the data dir itself"])
def test_missing_files_beside_a_renamed_copy_name_what_is_there(tmp_path, capsys, download_attempts, folder):
    """Kaggle's copy of MNIST names its files train-images.idx3-ubyte and so on: one character off.
    They are named where they are: in MNIST/raw/, or unzipped straight into --data-dir."""
    data = tmp_path / "data"
    raw = write_mnist(data) / "MNIST" / "raw"
    for name in train_mnist.MNIST_FILES:
        (raw / name).rename(data / folder / name.replace("-idx", ".idx"))
    assert train_mnist.main(["--data-dir", str(data), "--log-dir", str(tmp_path / "runs")]) == 1
    renamed = sorted(str(Path(folder) / name.replace("-idx", ".idx")) for name in train_mnist.MNIST_FILES)
    assert one_line_error(capsys).startswith(
        f"error: {', '.join(train_mnist.MNIST_FILES)} missing from {raw} (other files in {data}: "
        f"{', '.join(renamed)}), and the download failed (")
    assert download_attempts()  # it tried, as for any missing file, and the guard refused


@pytest.mark.parametrize(("given", "fix"), [("data/MNIST/raw", "give --data-dir {root}/data"),
                                            ("data/MNIST", "give --data-dir {root}/data"),
                                            ("flat", "move them into {root}/flat/MNIST/raw")])
def test_a_data_dir_one_level_off_names_the_right_one_without_downloading(tmp_path, capsys, given, fix):
    """--data-dir naming the folder of the files itself, or MNIST/: the usual slip, and no download."""
    raw = write_mnist(tmp_path / "data") / "MNIST" / "raw"
    if given == "flat":  # the four files in a folder of their own
        raw = raw.rename(tmp_path / "flat")
    assert train_mnist.main(["--data-dir", str(tmp_path / given), "--log-dir", str(tmp_path / "runs")]) == 1
    assert one_line_error(capsys) == (f"error: the MNIST files are in {raw}, but --data-dir should name the "
                                      f"folder that holds MNIST/raw/: {fix.format(root=tmp_path)}")
    assert not (tmp_path / given / "MNIST").exists() and not (tmp_path / "runs").exists()


def write_checkpoint(tmp_path) -> Path:
    """A checkpoint of an untrained network, as --evaluate reads it."""
    path = tmp_path / "untrained.pt"
    torch.save({"model": MNISTNet().state_dict(), "optimizer": {}, "history": [], "config": {"val_size": 0}},
               path)
    return path


def test_evaluate_tests_a_checkpoint_on_the_test_set(tmp_path, capsys):
    data_dir = write_mnist(tmp_path / "data")
    assert train_mnist.main(["--evaluate", str(write_checkpoint(tmp_path)), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    test_set = train_mnist.load_split(data_dir, train=False, device=CPU)
    net = MNISTNet()
    net.load_state_dict(torch.load(tmp_path / "untrained.pt", weights_only=True)["model"])
    accuracy = (net(test_set.images).argmax(1) == test_set.labels).float().mean().item()
    assert f"Test accuracy: {accuracy:.4f}" in out


class Mirror(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, noting each path asked for; the right files come slowly, as from afar."""

    def __init__(self, *args, asked: list[str], **kwargs) -> None:
        self.asked = asked
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self.asked.append(self.path)
        if self.path.startswith("/good/"):
            time.sleep(0.2)
        with contextlib.suppress(ConnectionError):  # a client that stopped reading (a redirect check)
            super().do_GET()

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def mirrors(tmp_path, monkeypatch) -> list[str]:
    """MNIST's mirrors served on loopback: the first lacks the files, the second has them (a third
    site, /damaged/, serves copies that fail their checksums). Returns the list of the paths asked for."""
    published = write_mnist(tmp_path / "published") / "MNIST" / "raw"
    for folder in ("good", "damaged"):
        (tmp_path / "site" / folder).mkdir(parents=True)
        for name in train_mnist.MNIST_FILES:
            content = gzip.compress((published / name).read_bytes(), mtime=0)
            if folder == "damaged":
                content = content[:-1] + bytes([content[-1] ^ 1])
            (tmp_path / "site" / folder / f"{name}.gz").write_bytes(content)
    good = tmp_path / "site" / "good"
    checksums = [(f"{name}.gz", hashlib.md5((good / f"{name}.gz").read_bytes()).hexdigest())
                 for name in train_mnist.MNIST_FILES]
    monkeypatch.setattr(MNIST, "resources", checksums)
    asked = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Mirror, asked=asked, directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(MNIST, "mirrors", [f"{base}/missing/", f"{base}/good/"])
    yield asked
    server.shutdown()
    server.server_close()


def test_missing_files_are_downloaded_from_the_first_mirror_that_has_them(tmp_path, mirrors):
    assert train_mnist.main(["--epochs", "1", "--num-embeddings", "0", "--device", "cpu", "--val-size", "0",
                             "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "runs")]) == 0
    raw = tmp_path / "data" / "MNIST" / "raw"
    for name in train_mnist.MNIST_FILES:
        assert (raw / name).read_bytes() == (tmp_path / "published" / "MNIST" / "raw" / name).read_bytes()
        assert {path for path in mirrors if path.endswith(f"/{name}.gz")} == {
            f"/{site}/{name}.gz" for site in ("missing", "good")}


def test_a_download_that_fails_its_checksum_is_refused(tmp_path, mirrors, monkeypatch, capsys):
    """torchvision checks each download's MD5: a damaged copy is never read as MNIST."""
    monkeypatch.setattr(MNIST, "mirrors", [MNIST.mirrors[0].replace("/missing/", "/damaged/")])
    assert train_mnist.main(["--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "runs")]) == 1
    data = tmp_path / "data"
    assert one_line_error(capsys) == (
        f"error: {', '.join(train_mnist.MNIST_FILES)} missing from {data / 'MNIST' / 'raw'} (other files in "
        f"{data}: MNIST/raw/train-images-idx3-ubyte.gz), and the download failed (File not found or "
        "corrupted.). Put the files there (uncompressed), or point --data-dir at the folder that holds "
        "MNIST/raw/")
    assert set(mirrors) == {"/damaged/train-images-idx3-ubyte.gz"}  # refused at the first file
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_parallel_sweep_downloads_mnist_once(tmp_path, mirrors, monkeypatch):
    """Its points start at once, each in a process of its own: each would download every file."""
    # Workers started anew, as on macOS: a fork of this process, whose thread serves the mirrors,
    # could inherit a lock that thread holds.
    monkeypatch.setattr(train_mnist.sys, "platform", "darwin")
    assert train_mnist.main(["--lr", "0.05", "0.1", "--jobs", "2", "--epochs", "1", "--num-embeddings", "0",
                             "--device", "cpu", "--val-size", "64", "--data-dir", str(tmp_path / "data"),
                             "--log-dir", str(tmp_path / "runs")]) == 0
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 2
    asked_by_the_sweep = collections.Counter(mirrors)
    mirrors.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        MNIST(tmp_path / "once", download=True)
    assert asked_by_the_sweep == collections.Counter(mirrors)  # what one download asks


@pytest.mark.parametrize("failure", [RuntimeError("operator torchvision::nms does not exist"),
                                     ImportError("No module named 'torchvision'")],
                         ids=["another build", "none"])
def test_a_torchvision_that_does_not_load_is_one_line(tmp_path, capsys, monkeypatch, failure):
    """A torchvision built for another torch (from PyPI beside torch's CPU build, say) fails as
    it loads its operators: the line names the torch it met and how to install the pair."""
    def fail(name):
        raise failure

    broken = types.ModuleType("torchvision.datasets")
    broken.__getattr__ = fail  # `from torchvision.datasets import MNIST` raises as the real import did
    monkeypatch.setitem(sys.modules, "torchvision.datasets", broken)
    data_dir = write_mnist(tmp_path / "data")
    for flags in ([], ["--evaluate", str(write_checkpoint(tmp_path))]):
        assert train_mnist.main([*flags, "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "r")]) == 1
        assert one_line_error(capsys) == (
            f"error: torchvision does not load beside torch {torch.__version__} ({failure}): install the two "
            "together, from the same index, as the README's Install shows")
    assert not (tmp_path / "r").exists()


def test_corrupt_file_is_a_clear_error(tmp_path):
    data_dir = write_mnist(tmp_path)
    write_idx(data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros((2, 2), np.uint8))
    message = (r"raw/train-labels-idx1-ubyte cannot be read: it is truncated, empty or not an MNIST file \(x "
               r"should have 1 dimension instead of 2\); delete it to download it again, or fix --data-dir")
    with pytest.raises(train_mnist.UserError, match=message):
        train_mnist.load_split(data_dir, train=True, device=CPU)
