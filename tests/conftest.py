"""Shared test helpers: tiny MNIST-format data sets written as real IDX files, the real MNIST,
and the ways the tests start the script: in-process through main(), or as a real process when
the process itself is under test (its exit code, its console, its signals, torchrun)."""

import csv
import errno
import itertools
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_mnist  # noqa: E402

IMAGE_FILES = {True: "train-images-idx3-ubyte", False: "t10k-images-idx3-ubyte"}
LABEL_FILES = {True: "train-labels-idx1-ubyte", False: "t10k-labels-idx1-ubyte"}
EPOCHS, STEPS_PER_EPOCH = 4, 200  # of INTERRUPTIBLE
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# A run long enough to be interrupted by a signal in its third epoch: 4 epochs of 200 steps
# (interruptible_data's 1,600 digits in batches of 8).
INTERRUPTIBLE = ["--epochs", str(EPOCHS), "--batch-size", "8", "--lr", "0.01", "--num-embeddings", "0",
                 "--device", "cpu", "--val-size", "0"]

# --- No test downloads -------------------------------------------------------------------
# Every process the tests start installs network_guard/download_guard.py (its sitecustomize.py
# does), and so does this one: a download from another machine fails as it would offline, and
# is logged here.
GUARD = REPO / "tests" / "network_guard"
os.environ["PYTHONPATH"] = os.pathsep.join([str(GUARD), *filter(None, [os.environ.get("PYTHONPATH")])])
DOWNLOAD_LOG = Path(tempfile.mkdtemp(prefix="downloads-")) / "attempts.log"
os.environ["TEST_DOWNLOAD_LOG"] = str(DOWNLOAD_LOG)
sys.path.insert(0, str(GUARD))
from download_guard import guarded_urlopen, install  # noqa: E402

install()


@pytest.fixture(autouse=True)
def no_downloads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Fail the test that tried to download, unless it asks for `download_attempts` to check them."""
    DOWNLOAD_LOG.write_text("")
    monkeypatch.setattr(urllib.request, "urlopen", guarded_urlopen)
    yield
    attempts = DOWNLOAD_LOG.read_text().split()
    if attempts and "download_attempts" not in request.fixturenames:
        pytest.fail(f"the test tried to download {attempts[0]} (and {len(attempts) - 1} more)")


@pytest.fixture(autouse=True)
def event_files_in_time_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard reads a run's event files in name order, and a resumed session's purge_step
    holds only if its file sorts last. The names end with the second, the process and a counter
    of the files this process opened: restarted for each test, so that the counter of a test's
    sessions in one second (9, then 10) never sorts them out of order."""
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


@pytest.fixture
def download_attempts() -> Callable[[], list[str]]:
    """Call it for the URLs that the test has tried to download from so far (all refused)."""
    return lambda: DOWNLOAD_LOG.read_text().split()


# --- Data --------------------------------------------------------------------------------

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


def real_mnist_candidates() -> list[Path]:
    """Where the real MNIST is looked for: $MNIST_DATA_DIR, then data/ (where the script puts it),
    then ../shared/data beside the repo."""
    candidates = [Path(os.environ["MNIST_DATA_DIR"])] if os.environ.get("MNIST_DATA_DIR") else []
    return [*candidates, REPO / "data", REPO.parent / "shared" / "data"]


def find_real_mnist() -> Path | None:
    for data_dir in real_mnist_candidates():
        if all((data_dir / "MNIST" / "raw" / name).is_file() for name in train_mnist.MNIST_FILES):
            return data_dir
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker trains on its share of the cores, and so do the processes
    its tests start: with a thread per core in every worker, they would slow each other down."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """-n auto: a worker per core, but at most 4: one file (test_robustness.py) takes over a
    quarter of the suite, so more workers would only wait for it, each holding torch in memory
    (over 500 MB). Without the real MNIST, no worker: one process, where
    pytest_collection_modifyitems can stop the whole run with its one line."""
    return 0 if find_real_mnist() is None else min(4, os.cpu_count() or 1)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Stop at once, with one line, when tests that need the real MNIST are chosen and it is nowhere."""
    needs_real_data = any("real_data_dir" in getattr(item, "fixturenames", ()) for item in items)
    if needs_real_data and find_real_mnist() is None:
        searched = ", ".join(str(path / "MNIST" / "raw") for path in real_mnist_candidates())
        pytest.exit(f"the real MNIST is not in {searched}: run `python train_mnist.py` once to download "
                    "it into data/, or set MNIST_DATA_DIR to the folder that holds MNIST/raw/", returncode=4)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    data_dir = find_real_mnist()
    assert data_dir is not None  # pytest_collection_modifyitems stopped the session otherwise
    return data_dir


# --- Running the script ------------------------------------------------------------------

# Flag presets, one per purpose; a test adds --epochs and what it is about. On write_mnist's 320
# training digits:
# - QUICK_VALIDATED: batches of 32, 64 digits held out for validation;
QUICK_VALIDATED = ["--batch-size", "32", "--lr", "0.05", "--test-batch-size", "50", "--num-embeddings", "0",
                   "--val-size", "64", "--device", "cpu"]
# - CONSTANT_LR: 10 steps an epoch at a constant learning rate, plain momentum, no validation: a run
#   that a test can repeat by hand;
CONSTANT_LR = ["--batch-size", "32", "--lr", "0.05", "--warmup", "0", "--lr-decay", "0", "--no-nesterov",
               "--num-embeddings", "0", "--device", "cpu", "--val-size", "0"]
# - UNVALIDATED: two epochs of the default recipe, without validation or projector;
UNVALIDATED = ["--epochs", "2", "--num-embeddings", "0", "--device", "cpu", "--val-size", "0"]
# - FULLY_LOGGED: two epochs with validation, no warm-up (8 steps in all), a decaying learning rate
#   and the projector's 40 digits.
FULLY_LOGGED = ["--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--test-batch-size", "50",
                "--num-embeddings", "40", "--device", "cpu", "--warmup", "0", "--lr-decay", "0.5",
                "--val-size", "64"]


def train_in_process(data_dir: Path, log_dir: Path, name: str | None, *flags: str) -> Path:
    """main() with these flags into log_dir, checked to end with exit code 0; returns the run
    folder it made: log_dir/name, or the name the run gave itself when `name` is None."""
    before = set(log_dir.iterdir()) if log_dir.exists() else set()
    argv = [*flags, "--data-dir", str(data_dir), "--log-dir", str(log_dir)]
    if name:
        argv += ["--run-name", name]
    assert train_mnist.main(argv) == 0
    (run_dir,) = set(log_dir.iterdir()) - before
    return run_dir


def script_command(*argv: str) -> list[str]:
    return [sys.executable, str(REPO / "train_mnist.py"), *argv]


def run_script(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train_mnist.py ARGV` in a real process, to its end."""
    return subprocess.run(script_command(*argv), capture_output=True, text=True, timeout=timeout, check=False)


def start_script(*argv: str, **popen_options) -> subprocess.Popen:
    """`python train_mnist.py ARGV` started in a real process, to be signalled or waited for."""
    return subprocess.Popen(script_command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen_options)


def torchrun(*argv: str, weights_dir: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 train_mnist.py ARGV`; with weights_dir, through
    ddp_worker.py, which also keeps each process's final weights there."""
    if weights_dir is None:
        command = [*TORCHRUN, str(REPO / "train_mnist.py"), *argv]
    else:
        weights_dir.mkdir(parents=True, exist_ok=True)
        command = [*TORCHRUN, str(REPO / "tests" / "ddp_worker.py"), str(weights_dir), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    """Wait until `path` exists, while `process` still runs."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"the process ended ({process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.01)


def wait_for_epoch(run_dir: Path, epoch: int, process: subprocess.Popen, seconds: float = 120) -> list[dict]:
    """Wait until the run's last.pt has finished `epoch`, while `process` still runs; returns that
    last.pt's history. The file is read only when it has changed: reading it in a tight loop would
    slow the run down."""
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + seconds
    seen = None
    while True:
        stamp = last.stat().st_mtime_ns if last.exists() else None
        if stamp != seen:  # written anew (atomically: always whole)
            seen = stamp
            history = torch.load(last, weights_only=True)["history"]
            if len(history) >= epoch:
                return history
        assert process.poll() is None, f"the process ended ({process.returncode}) before epoch {epoch}"
        assert time.monotonic() < deadline, f"epoch {epoch} did not end within {seconds} s"
        time.sleep(0.01)


def signal_in_a_later_epoch(process: subprocess.Popen, run_dir: Path, signum: int, times: int = 1,
                            timed_epoch: int = 2, whole_group: bool = False) -> None:
    """Send `signum` `times` times, 5 ms apart, at a random moment within the epoch after
    `timed_epoch`, timed by how long that one took: mid-run on a fast machine as on a slow one.
    With `whole_group`, to the process's whole group, as a terminal's Ctrl-C does."""
    wait_for_epoch(run_dir, timed_epoch - 1, process)
    started = time.monotonic()
    wait_for_epoch(run_dir, timed_epoch, process)
    time.sleep(random.uniform(0.0, 0.5) * (time.monotonic() - started))
    for _ in range(times):  # the first asks to stop; the others land while it saves
        if whole_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        time.sleep(0.005)


def permission_denied(path: object) -> PermissionError:
    """The error the OS gives a user without permission to open `path`; tests raise it where the
    script opens a file, since chmod does not stop root, who runs CI."""
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    """The one error line of an in-process main() (progress bars may precede it); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --- Reading what a run wrote ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


def events_of(run_dir: Path) -> EventAccumulator:
    """A run's events read as TensorBoard reads them (what a resumed session's purge_step drops is
    left out), every point kept."""
    events = EventAccumulator(str(run_dir), size_guidance=dict.fromkeys(
        ("scalars", "images", "histograms", "tensors", "compressedHistograms"), 0))
    events.Reload()
    return events


def event_points(run_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of every point TensorBoard shows of the run and of its sub-runs, whose tags are
    named "loss (train)"; a point written twice shows twice."""
    points = []
    sub_runs = sorted({path.parent for path in run_dir.glob("*/events.out.tfevents.*")})
    for folder in [run_dir, *sub_runs]:
        events, sub_run = events_of(folder), "" if folder == run_dir else f" ({folder.name})"
        tags = events.Tags()
        readers = {"scalars": events.Scalars, "images": events.Images, "histograms": events.Histograms,
                   "tensors": events.Tensors}
        points += [(tag + sub_run, event.step) for kind, read in readers.items() for tag in tags[kind]
                   for event in read(tag)]
    return points


def steps_of(points: list[tuple[str, int]], tag: str) -> list[int]:
    return sorted(step for point_tag, step in points if point_tag == tag)


def config_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def sweep_table(log_dir: Path) -> list[dict]:
    """The rows of the one sweep table in `log_dir`, as the CSV holds them (strings)."""
    (table,) = log_dir.glob("sweep-*.csv")
    with open(table) as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="session")
def interruptible_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("interruptible") / "data", train_count=1600, test_count=200)


@pytest.fixture(scope="session")
def uninterrupted_run(interruptible_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The INTERRUPTIBLE run, left alone: what every interrupted and resumed copy must equal."""
    return train_in_process(interruptible_data, tmp_path_factory.mktemp("reference"), "reference",
                            *INTERRUPTIBLE)


@pytest.fixture
def restored_signals():
    """For a test that sends this process a signal: the handlers, and the signals main() keeps
    count of, as they were before it."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    train_mnist.SIGNALS.clear()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture
def ctrl_c_in_epoch(monkeypatch, restored_signals):
    """ctrl_c_in_epoch(n): a real SIGINT reaches this process as the n-th epoch trained in it
    (counting over runs) begins, as if Ctrl-C had been pressed then."""
    real_train = train_mnist.train

    def ctrl_c_in(epoch: int) -> None:
        epochs = itertools.count(1)

        def train(*args, **kwargs):
            if next(epochs) == epoch:
                os.kill(os.getpid(), signal.SIGINT)
            return real_train(*args, **kwargs)

        monkeypatch.setattr(train_mnist, "train", train)

    return ctrl_c_in
