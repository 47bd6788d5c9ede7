"""Shared test helpers: tiny MNIST-format data sets written as real IDX files, and the real MNIST."""

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMAGE_FILES = {True: "train-images-idx3-ubyte", False: "t10k-images-idx3-ubyte"}
LABEL_FILES = {True: "train-labels-idx1-ubyte", False: "t10k-labels-idx1-ubyte"}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of the MNIST files (big-endian header)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Easy, learnable 28x28 'digits': class c is a bright 6x6 block at a class-specific place."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=count).astype(np.uint8)
    images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        row, col = 3 + 8 * (label // 4), 3 + 7 * (label % 4)
        images[index, row:row + 6, col:col + 6] = 255
    return images, labels


def write_mnist(root: Path, train_count: int = 320, test_count: int = 100, seed: int = 0) -> Path:
    """A data dir in torchvision's layout (root/MNIST/raw/) with synthetic digits; returns root."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for train, count in ((True, train_count), (False, test_count)):
        images, labels = synthetic_digits(count, seed + int(train))
        write_idx(raw / IMAGE_FILES[train], images)
        write_idx(raw / LABEL_FILES[train], labels)
    return root


@pytest.fixture
def synthetic_data(tmp_path: Path) -> Path:
    return write_mnist(tmp_path / "data")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real MNIST: $MNIST_DATA_DIR, or ../shared/data beside the repo. Missing is a failure."""
    data_dir = Path(os.environ.get("MNIST_DATA_DIR", REPO.parent / "shared" / "data"))
    raw = data_dir / "MNIST" / "raw"
    missing = [name for name in (*IMAGE_FILES.values(), *LABEL_FILES.values()) if not (raw / name).is_file()]
    if missing:
        pytest.fail(f"the real MNIST is missing from {raw}: {missing}; set MNIST_DATA_DIR")
    return data_dir
