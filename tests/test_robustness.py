"""Bad input, corrupt data, divergence, signals, failing disks, name collisions, and a soak."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_mnist
from conftest import REPO, write_idx, write_mnist

SMALL = ["--epochs", "2", "--num-embeddings", "0", "--device", "cpu"]


def script(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_mnist.py"), *argv], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def one_line_error(capsys) -> str:
    """The one error line (progress bars may precede it on stderr); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --- Flags -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    ["--lr", "0.1", "nan"], ["--batch-size", "64", "0"], ["--momentum", "0.5", "1.5"],
    ["--epochs", "1", "-3"], ["--seed", "-1"], ["--weight-decay", "-1"], ["--weight-decay", "inf"],
    ["--lr-decay", "nan"], ["--test-batch-size", "1e3"],
], ids=lambda flags: " ".join(flags))
def test_every_value_of_every_numeric_flag_is_checked(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(flags)
    assert exit_info.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err.replace("_", "-")


# --- Data --------------------------------------------------------------------------------

def corrupt(raw: Path, how: str) -> str:
    """Damage one file of a synthetic data set; return the name of the file to be blamed."""
    if how == "truncated":
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "wrong magic":
        path = raw / "t10k-labels-idx1-ubyte"
        path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    elif how == "counts disagree":
        path = raw / "train-labels-idx1-ubyte"
        write_idx(path, np.zeros(7, np.uint8))
    elif how == "wrong image size":
        path = raw / "t10k-images-idx3-ubyte"
        write_idx(path, np.zeros((100, 32, 32), np.uint8))
    elif how == "empty":
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(b"")
    return path.name


@pytest.mark.parametrize("how", ["truncated", "wrong magic", "counts disagree", "wrong image size", "empty"])
def test_damaged_data_is_one_clear_line(tmp_path, how, capsys):
    data_dir = write_mnist(tmp_path / "data")
    blamed = corrupt(data_dir / "MNIST" / "raw", how)
    code = train_mnist.main([*SMALL, "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "runs")])
    assert code == 1
    message = one_line_error(capsys)
    assert blamed in message and ("--data-dir" in message or "download" in message)
    assert not (tmp_path / "runs").exists()


def test_damaged_data_in_a_real_process_exits_1_without_traceback(tmp_path):
    data_dir = write_mnist(tmp_path / "data")
    corrupt(data_dir / "MNIST" / "raw", "truncated")
    result = script(*SMALL, "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "runs"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "truncated" in result.stderr


def test_verify_data_accepts_the_real_mnist_and_names_a_changed_file(tmp_path, real_data_dir, capsys):
    for name in train_mnist.MNIST_FILES:
        train_mnist.verify_checksum(real_data_dir / "MNIST" / "raw" / name)  # raises if wrong
    raw = tmp_path / "copy" / "MNIST" / "raw"
    shutil.copytree(real_data_dir / "MNIST" / "raw", raw)
    labels = bytearray((raw / "t10k-labels-idx1-ubyte").read_bytes())
    labels[500] = (labels[500] + 1) % 10  # one label changed: headers and lengths still fine
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    code = train_mnist.main([*SMALL, "--verify-data", "--data-dir", str(tmp_path / "copy"),
                             "--log-dir", str(tmp_path / "runs")])
    assert code == 1
    message = one_line_error(capsys)
    assert "t10k-labels-idx1-ubyte does not match the published MNIST file" in message


# --- Divergence --------------------------------------------------------------------------

def test_divergence_stops_with_advice_and_leaves_no_finished_run(tmp_path, synthetic_data, capsys):
    log_dir = tmp_path / "runs"
    code = train_mnist.main([*SMALL, "--lr", "1e6", "--data-dir", str(synthetic_data), "--log-dir",
                             str(log_dir), "--run-name", "boom"])
    assert code == 1
    message = one_line_error(capsys)
    assert "diverged" in message and "smaller --lr" in message and "1e+06" in message
    run_dir = log_dir / "boom"
    assert not (run_dir / "metrics.json").exists()
    best = run_dir / "checkpoints" / "best.pt"
    if best.exists():
        assert all(t.isfinite().all() for t in torch.load(best, weights_only=True)["model"].values())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert events.Scalars("training loss/per step")  # the logs so far were flushed


def test_best_checkpoint_is_never_saved_with_non_finite_weights(
        tmp_path, synthetic_data, monkeypatch, capsys):
    real_epoch = train_mnist.train_epoch

    def poisoned_epoch(net, *args, **kwargs):
        result = real_epoch(net, *args, **kwargs)
        with torch.no_grad():
            net.fc3.weight[0, 0] = float("nan")  # weights blow up while the loss still looked fine
        return result

    monkeypatch.setattr(train_mnist, "train_epoch", poisoned_epoch)
    code = train_mnist.main([*SMALL, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path),
                             "--run-name", "nan"])
    assert code == 1 and "diverged in epoch 1" in one_line_error(capsys)
    assert not (tmp_path / "nan" / "checkpoints").exists()


# --- Signals -----------------------------------------------------------------------------

def start_training(tmp_path: Path, name: str, epochs: int = 6) -> tuple[subprocess.Popen, Path, list[str]]:
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        write_mnist(data_dir, train_count=4000, test_count=200)
    argv = ["--epochs", str(epochs), "--batch-size", "8", "--lr", "0.01", "--num-embeddings", "0",
            "--device", "cpu", "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "runs")]
    process = subprocess.Popen([sys.executable, str(REPO / "train_mnist.py"), *argv, "--run-name", name],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, tmp_path / "runs" / name, argv


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_second_ctrl_c_while_saving_does_not_corrupt_the_checkpoint(tmp_path):
    process, run_dir, argv = start_training(tmp_path, "twice")
    try:
        wait_for(run_dir / "checkpoints" / "last.pt", process)
        time.sleep(0.2)
        for _ in range(5):  # the first asks to stop; the others land while it saves
            process.send_signal(signal.SIGINT)
            time.sleep(0.005)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["global_step"] >= 500
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", "2", "--device", "cpu"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2


# --- Disk --------------------------------------------------------------------------------

def test_unusable_log_dir_is_reported_before_training(tmp_path, synthetic_data, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for log_dir in (blocker, blocker / "runs"):
        code = train_mnist.main([*SMALL, "--data-dir", str(synthetic_data), "--log-dir", str(log_dir)])
        assert code == 1
        message = one_line_error(capsys)
        assert f"cannot create a run folder in {log_dir}" in message and "--log-dir" in message


def test_unwritable_run_folder_is_reported_before_training(tmp_path, synthetic_data, monkeypatch, capsys):
    real_write_text = Path.write_text

    def read_only(path, *args, **kwargs):  # the tests run as root, where permission bits don't bite
        if path.name.startswith(".config.json"):
            raise PermissionError(13, "Permission denied")
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    code = train_mnist.main([*SMALL, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path),
                             "--run-name", "ro"])
    assert code == 1
    message = one_line_error(capsys)
    assert "cannot write" in message and "config.json: Permission denied" in message
    assert not (tmp_path / "ro" / "checkpoints").exists()
    assert not list((tmp_path / "ro").glob("events.out.tfevents.*"))  # no training, no logs


def test_failing_checkpoint_write_is_reported_and_the_previous_one_survives(
        tmp_path, synthetic_data, monkeypatch, capsys):
    real_save = torch.save
    calls = []

    def full_disk_after_epoch_one(obj, file):
        calls.append(obj["epoch"])
        if obj["epoch"] >= 2:
            file.write(b"partial")
            raise OSError(28, "No space left on device")
        real_save(obj, file)

    monkeypatch.setattr(train_mnist.torch, "save", full_disk_after_epoch_one)
    code = train_mnist.main([*SMALL, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path),
                             "--run-name", "full"])
    monkeypatch.undo()
    assert code == 1
    message = one_line_error(capsys)
    assert "No space left on device" in message and "previous checkpoint is kept" in message
    last = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert not (tmp_path / "full" / "metrics.json").exists()
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


# --- Collisions --------------------------------------------------------------------------

def test_runs_started_together_with_the_same_arguments_get_their_own_folders(tmp_path, synthetic_data):
    argv = [*SMALL, "--epochs", "1", "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path / "runs")]
    processes = [subprocess.Popen([sys.executable, str(REPO / "train_mnist.py"), *argv],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    for process in processes:
        process.communicate(timeout=300)
        assert process.returncode == 0
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 3
    for run_dir in run_dirs:
        assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1


def test_run_name_of_an_existing_run_is_refused_unless_resumed(tmp_path, synthetic_data, capsys):
    argv = [*SMALL, "--epochs", "1", "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path),
            "--run-name", "taken"]
    assert train_mnist.main(argv) == 0
    capsys.readouterr()
    assert train_mnist.main(argv) == 1
    assert "already exists" in one_line_error(capsys)
    assert train_mnist.main(["--resume", str(tmp_path / "taken"), "--epochs", "2", "--device", "cpu"]) == 0


# --- Soak --------------------------------------------------------------------------------

def check_complete(run_dir: Path, epochs: int, steps_per_epoch: int) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == epochs and 0 <= metrics["test_accuracy"] <= 1
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == epochs and last["global_step"] == epochs * steps_per_epoch
    torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("training loss")] == list(range(1, epochs + 1))
    assert [e.step for e in events.Scalars("training loss/per step")] == list(
        range(1, epochs * steps_per_epoch + 1))
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_soak_sequential_concurrent_interrupted_and_resumed_runs(tmp_path):
    rng = random.Random(1234)
    epochs, steps_per_epoch = 3, 500
    finished = []
    for round_ in range(2):  # one after another, then two at the same time, some interrupted
        names = [f"r{round_}-a"] if round_ == 0 else [f"r{round_}-a", f"r{round_}-b"]
        started = [start_training(tmp_path, name, epochs) for name in names]
        for process, run_dir, _ in started:
            if rng.random() < 0.7:
                wait_for(run_dir / "config.json", process)
                time.sleep(rng.uniform(0.5, 2.5))
                if process.poll() is None:
                    process.send_signal(rng.choice([signal.SIGINT, signal.SIGTERM]))
        for process, run_dir, argv in started:
            _, err = process.communicate(timeout=300)
            assert process.returncode in (0, 130, 143), err
            assert "Traceback" not in err
            if process.returncode != 0:
                assert not (run_dir / "metrics.json").exists()
                if (run_dir / "checkpoints" / "last.pt").exists():
                    resumed = script("--resume", str(run_dir), "--device", "cpu")
                else:  # stopped before its first step: nothing to resume, start it again
                    shutil.rmtree(run_dir)
                    resumed = script(*argv, "--run-name", run_dir.name)
                assert resumed.returncode == 0, resumed.stderr
            finished.append(run_dir)
    for run_dir in finished:
        check_complete(run_dir, epochs, steps_per_epoch)
