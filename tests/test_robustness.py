"""Bad input, corrupt data, divergence, start-up and signals, failing disks, name collisions, and a soak."""

import ast
import builtins
import collections
import contextlib
import errno
import hashlib
import io
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from torchvision.datasets import mnist

import train_mnist
from conftest import (
    EPOCHS,
    INTERRUPTIBLE,
    QUICK_VALIDATED,
    REPO,
    STEPS_PER_EPOCH,
    UNVALIDATED,
    assert_same_weights,
    events_of,
    metrics_of,
    one_line_error,
    permission_denied,
    run_script,
    script_command,
    start_script,
    sweep_table,
    synthetic_digits,
    train_in_process,
    wait_for_epoch,
    weights,
    write_idx,
    write_mnist,
)

# --- Flags -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    ["--lr", "0.1", "nan"], ["--batch-size", "64", "0"], ["--momentum", "0.5", "1.5"],
    ["--epochs", "1", "-3"], ["--seed", "-1"], ["--weight-decay", "-1"], ["--weight-decay", "inf"],
    ["--lr-decay", "nan"], ["--test-batch-size", "1e3"],
], ids=" ".join)
def test_every_value_of_every_numeric_flag_is_checked(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(flags)
    assert exit_info.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err.replace("_", "-")


@pytest.mark.parametrize("name", ["", ".", "..", "../outside", "/tmp/elsewhere", "a/b"])
def test_run_name_is_one_folder_inside_the_log_dir(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(["--run-name", name])
    assert exit_info.value.code == 2
    assert f"argument --run-name: {name!r} must be a folder name" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--data-dir", ""], "argument --data-dir: an empty path"),
    (["--log-dir", ""], "argument --log-dir: an empty path"),
    (["--resume", ""], "argument --resume: an empty path"),
    (["--run-name", "x" * 256], f"argument --run-name: '{'x' * 40}'... has a name too long"),
    (["--log-dir", "runs/" + "x" * 256], "has a name too long: at most 255 bytes"),
], ids=["data dir", "log dir", "resume", "run name", "log dir name"])
def test_empty_paths_and_names_too_long_are_refused_before_anything_is_made(flags, message, capsys,
                                                                             tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_trains_and_a_larger_one_is_refused(tmp_path, synthetic_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(["--seed", str(2**64)])
    assert exit_info.value.code == 2 and "argument --seed" in capsys.readouterr().err
    assert train_mnist.main([*UNVALIDATED, "--epochs", "1", "--seed", str(2**64 - 1), "--data-dir",
                             str(synthetic_data), "--log-dir", str(tmp_path)]) == 0


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
    elif how == "a folder in its place":  # as in Kaggle's copy: the file inside a folder of its name
        path = raw / "t10k-images-idx3-ubyte"
        content = path.read_bytes()
        path.unlink()
        path.mkdir()
        (path / path.name).write_bytes(content)
    return path.name


UNREADABLE = "cannot be read: it is truncated, empty or not an MNIST file"
REFETCH = "delete it to download it again, or fix --data-dir"
DAMAGE = {  # how a file is damaged: what the error line says of it, after the file's path
    "truncated": f"{UNREADABLE} (shape '[320, 28, 28]' is invalid for input of size 250780); {REFETCH}",
    "wrong magic": f"{UNREADABLE} (shape '[100, 134612226, 50331648]' is invalid for input of size 92); "
                   f"{REFETCH}",
    "counts disagree": "holds 320 images but {raw}/train-labels-idx1-ubyte holds 7 labels; delete both to "
                       "download them again, or fix --data-dir",
    "wrong image size": f"holds 32x32 images, not 28x28; {REFETCH}",
    "empty": f"{UNREADABLE} (invalid literal for int() with base 16: b''); {REFETCH}",
    "a folder in its place": "is a folder, where MNIST's file of that name belongs: put the file itself "
                             "there, uncompressed",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_data_is_one_clear_line(tmp_path, how, capsys):
    data_dir = write_mnist(tmp_path / "data")
    raw = data_dir / "MNIST" / "raw"
    blamed = corrupt(raw, how)
    if how == "counts disagree":  # the images file is named first, then the labels file
        blamed = "train-images-idx3-ubyte"
    code = train_mnist.main([*UNVALIDATED, "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "runs")])
    assert code == 1
    assert one_line_error(capsys) == f"error: {raw / blamed} {DAMAGE[how].format(raw=raw)}"
    assert not (tmp_path / "runs").exists()


def test_a_data_file_it_may_not_read_is_one_line(tmp_path, capsys, monkeypatch):
    """A file without read permission (chmod does not stop root, who runs CI: the refusal is made
    where torchvision opens the file)."""
    data_dir = write_mnist(tmp_path / "data")
    denied = data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    read_label_file = mnist.read_label_file

    def read_unless_denied(path: str) -> torch.Tensor:
        if Path(path) == denied:
            raise permission_denied(path)
        return read_label_file(path)

    monkeypatch.setattr(mnist, "read_label_file", read_unless_denied)
    argv = [*UNVALIDATED, "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "runs")]
    assert train_mnist.main(argv) == 1
    assert one_line_error(capsys) == f"error: {denied} cannot be read (Permission denied); {REFETCH}"


@pytest.mark.slow
def test_damaged_data_in_a_real_process_exits_1_without_traceback(tmp_path):
    data_dir = write_mnist(tmp_path / "data")
    corrupt(data_dir / "MNIST" / "raw", "truncated")
    result = run_script(*UNVALIDATED, "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "runs"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and f"train-images-idx3-ubyte {UNREADABLE}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_verify_data_accepts_the_real_mnist_and_names_a_changed_file(tmp_path, real_data_dir, capsys):
    for train in (True, False):  # raises if a checksum is wrong
        train_mnist.load_split(real_data_dir, train, torch.device("cpu"), verify=True)
    raw = tmp_path / "copy" / "MNIST" / "raw"
    # copyfile: the copies are writable (they are the user's), even where the real files are read-only
    shutil.copytree(real_data_dir / "MNIST" / "raw", raw, copy_function=shutil.copyfile)
    labels = bytearray((raw / "t10k-labels-idx1-ubyte").read_bytes())
    labels[500] = (labels[500] + 1) % 10  # one label changed: headers and lengths still fine
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    code = train_mnist.main([*UNVALIDATED, "--verify-data", "--data-dir", str(tmp_path / "copy"),
                             "--log-dir", str(tmp_path / "runs")])
    assert code == 1
    changed = hashlib.md5((raw / "t10k-labels-idx1-ubyte").read_bytes()).hexdigest()
    published = "27ae3e4e09519cfbb04c329615203637"  # the test labels, as in MNIST/raw/MD5SUMS
    assert one_line_error(capsys) == (f"error: {raw / 't10k-labels-idx1-ubyte'} does not match the published "
                                      f"MNIST file (md5 {changed}, expected {published}); {REFETCH}")


# --- Divergence --------------------------------------------------------------------------

def test_divergence_stops_within_the_epoch_with_advice_and_no_checkpoint(tmp_path, synthetic_data, capsys):
    log_dir = tmp_path / "runs"
    argv = [*UNVALIDATED, "--lr", "1e6", "--batch-size", "4", "--data-dir", str(synthetic_data), "--log-dir",
            str(log_dir), "--run-name", "boom"]
    assert train_mnist.main(argv) == 1
    message = one_line_error(capsys)
    assert "diverged in epoch 1" in message and "smaller --lr" in message and "1e+06" in message
    run_dir = log_dir / "boom"
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "checkpoints").exists()  # nothing non-finite was ever saved
    # The same command again: the folder it left holds nothing to resume, and the message says so.
    assert train_mnist.main(argv) == 1
    assert one_line_error(capsys) == (f"error: run {run_dir} already exists, without a checkpoint to resume "
                                      "(it stopped before its first epoch ended); delete it or pick another "
                                      "--run-name")


def test_divergence_in_a_long_epoch_stops_within_50_steps_and_keeps_the_finite_checkpoints(
        tmp_path, interruptible_data, capsys):
    """Epochs of 200 steps: one at a sane rate, then the resumed run blows up at --lr 1e6 and
    stops at the first check, 50 steps in; both checkpoints still hold epoch 1's finite weights."""
    run_dir = tmp_path / "run"
    assert train_mnist.main([*INTERRUPTIBLE, "--epochs", "1", "--data-dir", str(interruptible_data),
                             "--log-dir", str(tmp_path), "--run-name", "run"]) == 0
    capsys.readouterr()
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", "2", "--lr", "1e6"]) == 1
    message = one_line_error(capsys)
    assert "diverged in epoch 2" in message and "this run used 1e+06" in message
    for name in ("last", "best"):
        state = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        assert [record["step"] for record in state["history"]] == [STEPS_PER_EPOCH]
        assert all(tensor.isfinite().all() for tensor in state["model"].values())
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    events = events_of(run_dir)
    steps = [event.step for event in events.Scalars("training/loss per step")]
    assert steps == list(range(1, STEPS_PER_EPOCH + 1))  # the first epoch's; the diverged one logs nothing
    assert not (run_dir / "metrics.json").exists()


def test_a_network_with_one_output_for_every_image_stops_with_advice_and_no_checkpoint(
        tmp_path, synthetic_data, capsys, monkeypatch):
    """A step too large can switch off every ReLU of a layer for good (batch 32 at --lr 0.1 did, on
    the real MNIST): the run stops with advice, where it used to train on at 11%. Here conv2's
    ReLUs are switched off by hand, after the first epoch's steps."""
    real_train = train_mnist.train

    def train_then_switch_off_conv2(model, *args, **kwargs):
        step_losses_and_lrs = real_train(model, *args, **kwargs)
        with torch.no_grad():
            model.conv2.bias.fill_(-1e6)
        return step_losses_and_lrs

    monkeypatch.setattr(train_mnist, "train", train_then_switch_off_conv2)
    argv = [*UNVALIDATED, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path), "--run-name", "dead"]
    assert train_mnist.main(argv) == 1
    assert one_line_error(capsys) == ("error: training collapsed in epoch 1: the network gives the same "
                                      "output for every image (a step too large switched off a layer's ReLUs "
                                      "for good); try a smaller --lr (this run used 0.1)")
    assert not (tmp_path / "dead" / "checkpoints").exists()


# The devices' own messages as torch raises them: an OutOfMemoryError from CUDA, plain
# RuntimeErrors from MPS and from the CPU's allocator (the last as a 5 GB address-space limit gave it).
OUT_OF_MEMORY = {
    "cuda": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.50 GiB. GPU 0 has a "
                                        "total capacity of 7.63 GiB of which 1.20 GiB is free."),
    "mps": RuntimeError("MPS backend out of memory (MPS allocated: 7.10 GiB, other allocations: 1.20 GiB, "
                        "max allowed: 9.07 GiB). Tried to allocate 2.00 GiB on private pool."),
    "cpu": RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                        "memory: you tried to allocate 2027520000 bytes. Error code 12 (Cannot allocate "
                        "memory)"),
}
TOO_LARGE = "out of memory on cpu with --batch-size 32 and --test-batch-size 1000: give smaller ones"


def network_out_of_memory_above(monkeypatch: pytest.MonkeyPatch, images: int, error: RuntimeError) -> None:
    """The network raises `error` for a training batch of more than `images`, as a device would."""
    real_forward = train_mnist.MNISTNet.forward

    def forward(net: train_mnist.MNISTNet, x: torch.Tensor) -> torch.Tensor:
        if net.training and len(x) > images:
            raise error
        return real_forward(net, x)

    monkeypatch.setattr(train_mnist.MNISTNet, "forward", forward)


@pytest.mark.parametrize("device", OUT_OF_MEMORY)
def test_batches_too_large_for_the_memory_are_one_line_that_names_the_flags(
        tmp_path, synthetic_data, capsys, monkeypatch, device):
    network_out_of_memory_above(monkeypatch, 16, OUT_OF_MEMORY[device])
    argv = [*UNVALIDATED, "--batch-size", "32", "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path)]
    assert train_mnist.main(argv) == 1
    assert one_line_error(capsys) == f"error: {TOO_LARGE}"


def test_another_runtime_error_is_a_bug_and_keeps_its_traceback(tmp_path, synthetic_data, monkeypatch):
    network_out_of_memory_above(monkeypatch, 16, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    argv = [*UNVALIDATED, "--batch-size", "32", "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path)]
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        train_mnist.main(argv)


def test_a_sweep_point_out_of_memory_is_a_failed_row_and_the_others_run(tmp_path, synthetic_data, capsys,
                                                                         monkeypatch):
    network_out_of_memory_above(monkeypatch, 16, OUT_OF_MEMORY["cuda"])
    argv = [*UNVALIDATED, "--epochs", "1", "--batch-size", "16", "32", "--data-dir", str(synthetic_data),
            "--log-dir", str(tmp_path)]
    assert train_mnist.main(argv) == 0
    rows = {row["batch_size"]: row for row in sweep_table(tmp_path)}
    assert rows["16"]["status"] == "ok"
    assert rows["32"]["status"] == f"failed: {TOO_LARGE}"
    assert "Traceback" not in capsys.readouterr().err


def test_best_checkpoint_is_never_saved_with_non_finite_weights(
        tmp_path, synthetic_data, monkeypatch, capsys):
    real_epoch = train_mnist.train

    def poisoned_epoch(model, *args, **kwargs):
        result = real_epoch(model, *args, **kwargs)
        with torch.no_grad():
            model.fc3.weight[0, 0] = float("nan")  # weights blow up while the loss still looked fine
        return result

    monkeypatch.setattr(train_mnist, "train", poisoned_epoch)
    code = train_mnist.main([*UNVALIDATED, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path),
                             "--run-name", "nan"])
    assert code == 1 and "diverged in epoch 1" in one_line_error(capsys)
    assert not (tmp_path / "nan" / "checkpoints").exists()


# --- Start-up and signals ----------------------------------------------------------------

def test_an_older_python_is_one_line_that_names_the_python_needed():
    """Python 3.9 installs requirements.txt (pip picks torch 2.8 there), then would stop at the
    first `dict | None` type hint with a TypeError. The script checks first: one line."""
    for name in ("train_mnist.py", "models.py"):  # 3.9 reads them, so the check can run at all
        ast.parse((REPO / name).read_text(), feature_version=(3, 9))
    as_python_3_9 = ("import runpy, sys; sys.version_info, sys.version = (3, 9, 6, 'final', 0), '3.9.6'; "
                     "sys.argv = ['train_mnist.py', '--help']; "
                     "runpy.run_path('train_mnist.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", as_python_3_9], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "error: train_mnist.py needs Python 3.10 or later, and this is 3.9.6\n"


def wait_until_it_catches_sigterm(process: subprocess.Popen, seconds: float = 30) -> None:
    """Wait until the script's first lines have run: they catch SIGTERM (Python itself catches
    only SIGINT), before any library loads. Linux lists the caught signals in /proc/PID/status;
    elsewhere, wait a moment longer than Python's own start-up."""
    status = Path(f"/proc/{process.pid}/status")
    if not status.exists():
        time.sleep(0.3)
        return
    deadline = time.monotonic() + seconds
    while not int(re.search(r"SigCgt:\s*(\w+)", status.read_text())[1], 16) >> (signal.SIGTERM - 1) & 1:
        assert time.monotonic() < deadline, f"the script did not start within {seconds} s"
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "delay"), [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.1),
                                               (signal.SIGINT, 0.25)])
def test_a_signal_while_the_libraries_load_is_one_line(tmp_path, synthetic_data, signum, delay):
    process = start_script(*UNVALIDATED, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path))
    # Within the imports, which take longer than the delay even on a fast machine (torch alone does).
    wait_until_it_catches_sigterm(process)
    time.sleep(delay)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert err.strip() == f"Stopped by {signal.Signals(signum).name}; nothing was in progress."
    assert out == "" and list(tmp_path.iterdir()) == [synthetic_data]


def test_a_signal_while_the_data_is_read_stops_at_once_without_a_run_folder(tmp_path, synthetic_data,
                                                                            monkeypatch, restored_signals,
                                                                            capsys):
    real_check_split = train_mnist.check_split

    def ctrl_c_then_check(*args):
        os.kill(os.getpid(), signal.SIGINT)  # as torchvision has just read the training files
        return real_check_split(*args)

    monkeypatch.setattr(train_mnist, "check_split", ctrl_c_then_check)
    argv = [*QUICK_VALIDATED, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path / "runs")]
    assert train_mnist.main(argv) == 130
    assert capsys.readouterr().err == "Stopped by SIGINT.\n"  # nothing to resume, nothing more to say
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_signal_after_the_last_epoch_stops_at_once_and_resume_finishes(tmp_path, interruptible_data):
    run_dir = tmp_path / "my runs" / "run"  # a space: the printed command quotes it, as a shell needs
    process = start_script("--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--num-embeddings", "1400",
                           "--val-size", "200", "--device", "cpu", "--data-dir", str(interruptible_data),
                           "--log-dir", str(run_dir.parent), "--run-name", "run")
    try:
        # The last epoch is saved; the test, the figures and 1,400 embeddings come next.
        wait_for_epoch(run_dir, 1, process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    stopped, pasted = err.rstrip().splitlines()[-1].split(" Resume with: ")
    assert stopped == "Stopped by SIGINT." and pasted == f"python train_mnist.py --resume '{run_dir}'"
    assert not (run_dir / "metrics.json").exists()  # unfinished
    command = shlex.split(pasted)  # as a shell reads the line pasted
    assert command[:2] == ["python", "train_mnist.py"]
    assert train_mnist.main(command[2:]) == 0  # trains nothing more: tests, logs, finishes
    assert metrics_of(run_dir)["epochs"] == 1
    assert len(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"]) == 1


def test_a_signal_inside_a_tensorboard_writer_waits_for_the_logging_then_stops(
        tmp_path, synthetic_data, monkeypatch, restored_signals, capsys):
    """TensorBoard's writers take locks as they write. A run stopped inside one could leave a lock
    taken, and hang as the writer closed. A signal there waits until the logging is done."""
    real_add_pr_curve, curves = SummaryWriter.add_pr_curve, []

    def add_pr_curve(writer, tag, *args, **kwargs):
        if not curves:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, inside the writer's first PR curve
        curves.append(tag)
        return real_add_pr_curve(writer, tag, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_pr_curve", add_pr_curve)
    run_dir = tmp_path / "runs" / "run"
    argv = [*QUICK_VALIDATED, "--epochs", "1", "--num-embeddings", "16", "--data-dir", str(synthetic_data),
            "--log-dir", str(tmp_path / "runs"), "--run-name", "run"]
    assert train_mnist.main(argv) == 130
    assert len(curves) == 10 and (run_dir / "projector_config.pbtxt").exists()  # and the projector after them
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"Stopped by SIGINT. Resume with: python train_mnist.py --resume {run_dir}")
    assert not (run_dir / "metrics.json").exists()  # stopped before it finished
    assert train_mnist.main(["--resume", str(run_dir)]) == 0
    assert metrics_of(run_dir)["epochs"] == 1
    out, err = capsys.readouterr()
    assert "warning" not in (out + err).lower()  # the projector written again over the stopped session's


def test_a_signal_while_a_checkpoint_is_written_keeps_the_last_one_and_leaves_no_temporary_file(
        tmp_path, synthetic_data, monkeypatch, restored_signals):
    real_replace = os.replace

    def ctrl_c_then_replace(source, target):
        if Path(target).name == "last.pt" and (Path(target).parent / "last.pt").exists():
            os.kill(os.getpid(), signal.SIGINT)  # as epoch 2's checkpoint is about to take its place
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", ctrl_c_then_replace)
    run_dir = tmp_path / "runs" / "run"
    argv = [*QUICK_VALIDATED, "--epochs", "2", "--data-dir", str(synthetic_data), "--log-dir",
            str(tmp_path / "runs"), "--run-name", "run"]
    assert train_mnist.main(argv) == 130
    monkeypatch.undo()
    assert not list(run_dir.rglob("*.tmp"))
    assert len(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"]) == 1
    assert train_mnist.main(["--resume", str(run_dir)]) == 0
    assert metrics_of(run_dir)["epochs"] == 2


# --- Disk --------------------------------------------------------------------------------

def test_unusable_log_dir_is_reported_before_training(tmp_path, synthetic_data, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    too_long = tmp_path.joinpath(*["x" * 250] * 20)  # each name allowed, the whole path too long
    for log_dir, fix in ((blocker, "a file stands where a folder should be; pick another --log-dir"),
                         (blocker / "runs", "a file stands where a folder should be; pick another --log-dir"),
                         (too_long, "the path is too long for the filesystem; pick a shorter --log-dir")):
        code = train_mnist.main([*UNVALIDATED, "--data-dir", str(synthetic_data), "--log-dir", str(log_dir)])
        assert code == 1
        message = one_line_error(capsys)
        assert message.startswith(f"error: cannot create a run folder in {log_dir}: ")
        assert message.endswith(fix)
        assert "permissions" not in message


def test_unwritable_run_folder_is_reported_before_training(tmp_path, synthetic_data, monkeypatch, capsys):
    def read_only(path, *args, **kwargs):  # the tests run as root, where permission bits don't bite
        if Path(path).name.startswith(".config.json"):
            raise PermissionError(13, "Permission denied")
        return open(path, *args, **kwargs)

    monkeypatch.setattr(train_mnist, "open", read_only, raising=False)
    code = train_mnist.main([*UNVALIDATED, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path),
                             "--run-name", "ro"])
    assert code == 1
    message = one_line_error(capsys)
    assert "cannot write" in message and "config.json: Permission denied" in message
    assert not (tmp_path / "ro" / "checkpoints").exists()
    assert not list((tmp_path / "ro").glob("events.out.tfevents.*"))  # no training, no logs


class FullDisk(io.FileIO):
    """A file on a disk that fills up: half of the first write lands, then ENOSPC."""

    def write(self, data: bytes) -> int:
        super().write(bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def named(name: str) -> Callable[[Path], bool]:
    return lambda path: path.name == name


def event_file_in(folder: str) -> Callable[[Path], bool]:
    return lambda path: path.name.startswith("events.out.tfevents.") and path.parent.name == folder


# Every file a run writes (the projector's with --num-embeddings): how its name is matched as it
# is opened; how many epochs' checkpoints are saved before its writes fail, as the disk fills;
# and the epochs last.pt then holds (None: no last.pt). The script writes its own files through a
# temporary file, and names them; TensorBoard's writers name none, so the line names the folder.
WRITTEN_FILES = {
    "config.json": (named(".config.json.tmp"), 0, None),
    "last.pt": (named(".last.pt.tmp"), 1, 1),
    "best.pt": (named(".best.pt.tmp"), 0, None),  # written just before last.pt
    "metrics.json": (named(".metrics.json.tmp"), 0, 2),
    "the run's event file": (event_file_in("full"), 1, 1),  # flushed each epoch, before its checkpoint
    "train's event file": (event_file_in("train"), 1, 1),  # the same
    "validation's event file": (event_file_in("validation"), 0, None),  # written as its writer starts
    "tensors.tsv": (named("tensors.tsv"), 0, 2),
    "metadata.tsv": (named("metadata.tsv"), 0, 2),
    "sprite.png": (named("sprite.png"), 0, 2),
    "projector_config.pbtxt": (named("projector_config.pbtxt"), 0, 2),
}


@pytest.mark.parametrize("written", WRITTEN_FILES)
def test_a_full_disk_on_any_file_a_run_writes_is_one_line_and_the_checkpoints_survive(
        tmp_path, synthetic_data, monkeypatch, capsys, written):
    """On any machine, root or not: the file's writes fail as on a full disk (the real small-disk
    tests below need root)."""
    is_it, saved_before, epochs_saved = WRITTEN_FILES[written]
    saves, failed, real_open = [], [], io.open

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        if isinstance(path, int) or not set(mode) & set("wa"):  # a file descriptor, or a read
            return real_open(path, mode, *args, **kwargs)
        path = Path(os.fsdecode(path))  # TensorBoard names its files in bytes
        if is_it(path) and len(saves) >= saved_before:
            failed.append(path)
            return FullDisk(path, "a" if "a" in mode else "w")
        saves.extend([path] if path.name == ".last.pt.tmp" else [])
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_filling_disk)  # the script's own files
    monkeypatch.setattr(io, "open", open_on_a_filling_disk)  # TensorBoard's
    code = train_mnist.main(["--epochs", "2", "--val-size", "64", "--num-embeddings", "16", "--device",
                             "cpu", "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path),
                             "--run-name", "full"])
    monkeypatch.undo()
    assert failed and code == 1
    run_dir = tmp_path / "full"
    if written.endswith((".json", ".pt")):
        expected = (f"error: cannot write {run_dir}/{'checkpoints/' * written.endswith('.pt')}{written}: No "
                    "space left on device; the previous file, if any, is kept. Free some disk space or pick "
                    "another --log-dir")
    else:
        expected = (f"error: cannot write a file in {run_dir}: No space left on device; free some disk space "
                    "or pick another --log-dir")
    assert one_line_error(capsys) == expected
    assert not list(run_dir.rglob("*.tmp"))  # no temporary file left taking the space
    assert not (run_dir / "metrics.json").exists()  # the run did not finish
    last = run_dir / "checkpoints" / "last.pt"
    if epochs_saved is None:
        assert not last.exists()
    else:
        assert len(torch.load(last, weights_only=True)["history"]) == epochs_saved


def unshare_works() -> bool:
    try:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    except OSError:
        return False
    return probe.returncode == 0


def on_a_small_disk(tmp_path: Path, *argv: str, fill_first: bool = False) -> tuple[subprocess.Popen, Path]:
    """The script with its --log-dir on a real 4 MB filesystem (a tmpfs in a mount namespace of
    its own), optionally full from the start. Returns the process and the run folder as this test
    sees it while the process lives (/proc/PID/root/...); when it ends, the disk's content is
    copied to tmp_path/after."""
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    after.mkdir()
    fill = 'cat /dev/zero > "$disk/filler" 2>/dev/null; ' if fill_first else ""
    shell = ('disk=$1; after=$2; shift 2; mount -t tmpfs -o size=4m tmpfs "$disk" || exit 99; ' + fill +
             '"$@"; code=$?; cp -a "$disk/." "$after"; exit $code')
    command = ["unshare", "--mount", "sh", "-c", shell, "sh", str(disk), str(after),
               *script_command(*argv, "--log-dir", str(disk), "--run-name", "run")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, Path(f"/proc/{process.pid}/root{disk}") / "run"


def fill_up(run_dir: Path, leave: int) -> None:
    """Fill the run's disk, then free `leave` bytes."""
    filler = run_dir.parent / "filler"
    with open(filler, "wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(bytes(1 << 16))
    os.truncate(filler, max(0, filler.stat().st_size - leave))


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(), reason="needs `unshare --mount` (root) for a real small disk; "
                    "the tests above fail the writes the way they fail on a full disk")
@pytest.mark.parametrize(("when", "leave", "failing"), [
    ("before the run", 0, "{run_dir}/config.json"),
    ("after epoch 1", 0, "a file in {run_dir}"),  # an event file: TensorBoard's writer names none
    # an epoch's logs fit (140 kB), not a checkpoint (best.pt if the epoch improved, else last.pt):
    ("after epoch 1", 300_000, "{run_dir}/checkpoints/"),
], ids=["config.json", "event file", "checkpoint"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_last_checkpoint_survives(
        tmp_path, interruptible_data, when, leave, failing):
    process, run_dir = on_a_small_disk(tmp_path, *INTERRUPTIBLE, "--data-dir", str(interruptible_data),
                                       fill_first=when == "before the run")
    try:
        if when == "after epoch 1":
            wait_for_epoch(run_dir, 1, process)  # last.pt: the epoch's last write (after best.pt)
            fill_up(run_dir, leave)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Epoch ")]  # no bars
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: cannot write {failing.format(run_dir=tmp_path / 'disk' / 'run')}")
    assert "No space left on device" in lines[0] and "free some disk space" in lines[0].lower()
    after = tmp_path / "after" / "run"
    assert not list(after.rglob("*.tmp"))  # no temporary file left taking the space
    if when == "after epoch 1":
        assert len(torch.load(after / "checkpoints" / "last.pt", weights_only=True)["history"]) == 1
    assert not (after / "metrics.json").exists()


class ClosedPipe(io.StringIO):
    """Standard output piped into a program that has quit, as `| head` leaves it."""

    def write(self, _text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def test_output_into_a_program_that_quit_ends_quietly(tmp_path, synthetic_data, monkeypatch, capsys):
    """A closed console is no file of the run: no 'cannot write' line and no traceback. In a real
    process the script ends as a shell reports a command cut short by `| head`: code 141."""
    argv = [*UNVALIDATED, "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path / "runs")]
    with monkeypatch.context() as patched:
        patched.setattr("sys.stdout", ClosedPipe())
        with pytest.raises(BrokenPipeError):
            train_mnist.main(argv)
    assert "error" not in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "metrics.json").exists()
    whole_run = train_in_process(synthetic_data, tmp_path / "runs", "whole", *UNVALIDATED)
    Image.fromarray(synthetic_digits(1, seed=0)[0][0]).save(tmp_path / "digit.png")
    process = start_script("--predict", str(tmp_path / "digit.png"), "--checkpoint", str(whole_run))
    process.stdout.close()  # before it prints
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == ""


# --- Collisions --------------------------------------------------------------------------

def test_a_taken_name_gets_the_next_free_suffix(tmp_path, monkeypatch):
    args, _ = train_mnist.parse_args(["--epochs", "1", "--log-dir", str(tmp_path), "--device", "cpu"])
    run_args = train_mnist.single_values(args)
    made = [train_mnist.make_run_dir(run_args) for _ in range(3)]  # within one second: the same stamp
    if len({path.name.split("_")[1] for path in made}) > 1:  # the clock passed a second: once more
        made = [train_mnist.make_run_dir(run_args) for _ in range(3)]
    base = made[0].name
    assert [path.name for path in made] == [base, f"{base}_2", f"{base}_3"]
    assert all(path.is_dir() for path in made)


def test_run_name_of_an_existing_run_is_refused_unless_resumed(tmp_path, synthetic_data, capsys):
    log_dir = tmp_path / "runs"
    argv = [*UNVALIDATED, "--epochs", "1", "--data-dir", str(synthetic_data), "--log-dir", str(log_dir),
            "--run-name", "taken"]
    assert train_mnist.main(argv) == 0
    capsys.readouterr()
    assert train_mnist.main(argv) == 1
    assert "already exists" in one_line_error(capsys)
    assert os.listdir(log_dir) == ["taken"]  # no second folder was made
    assert train_mnist.main(["--resume", str(log_dir / "taken"), "--epochs", "2", "--device", "cpu"]) == 0
    assert metrics_of(log_dir / "taken")["epochs"] == 2


# --- Soak --------------------------------------------------------------------------------

def check_complete(run_dir: Path, uninterrupted_run: Path) -> None:
    epochs, steps_per_epoch = EPOCHS, STEPS_PER_EPOCH
    assert metrics_of(run_dir)["epochs"] == epochs
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    steps = [epoch * steps_per_epoch for epoch in range(1, epochs + 1)]
    assert [record["step"] for record in last["history"]] == steps
    assert_same_weights(last["model"], weights(uninterrupted_run / "checkpoints" / "last.pt"))
    torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    events = events_of(run_dir)
    epoch_ends = [record["step"] for record in last["history"]]
    assert [event.step for event in events_of(run_dir / "train").Scalars("loss")] == epoch_ends
    assert [e.step for e in events.Scalars("training/loss per step")] == list(
        range(1, epochs * steps_per_epoch + 1))
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


@pytest.mark.slow
def test_soak_concurrent_interrupted_and_resumed_runs(tmp_path, interruptible_data, uninterrupted_run):
    """Three runs started together with the same flags; one to three of them, drawn at random, are
    stopped by SIGINT or SIGTERM at a random moment after their first epoch, then resumed. Every
    stopped run must have been stopped, and every run ends complete, in its own folder, with the
    weights of the same run left alone. The draws come from a seed that a failure names:
    SOAK_SEED=<seed> replays them."""
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(2**32))
    print(f"Soak test seed {seed}: SOAK_SEED={seed} replays it")  # pytest shows it if the test fails
    rng = random.Random(seed)
    log_dir = tmp_path / "runs"
    argv = [*INTERRUPTIBLE, "--data-dir", str(interruptible_data), "--log-dir", str(log_dir)]
    processes = [start_script(*argv, env=os.environ | {"PYTHONUNBUFFERED": "1"}) for _ in range(3)]
    run_dirs = [Path(process.stdout.readline().rsplit("logging to ", 1)[1].strip()) for process in processes]
    stopped = rng.sample(range(3), rng.randint(1, 3))
    for index in stopped:
        history = wait_for_epoch(run_dirs[index], 1, processes[index])
        # Up to half an epoch later, as long as the first took: mid-run on a fast machine as on a slow one.
        time.sleep(rng.uniform(0.0, 0.5) * history[0]["seconds"])
        processes[index].send_signal(rng.choice([signal.SIGINT, signal.SIGTERM]))
    for index, (process, run_dir) in enumerate(zip(processes, run_dirs)):
        _, err = process.communicate(timeout=300)
        assert "Traceback" not in err, f"SOAK_SEED={seed}"
        if index in stopped:
            assert process.returncode in (130, 143), f"SOAK_SEED={seed}: {err}"
            assert err.rstrip().endswith(f"Resume with: python train_mnist.py --resume {run_dir}")
            assert not (run_dir / "metrics.json").exists()
            assert train_mnist.main(["--resume", str(run_dir), "--device", "cpu"]) == 0
        else:
            assert process.returncode == 0, f"SOAK_SEED={seed}: {err}"
    assert len(set(run_dirs)) == 3 and all(run_dir.parent == log_dir for run_dir in run_dirs)
    suffixes = collections.defaultdict(list)  # runs that started in the same second share a base name
    for run_dir in run_dirs:
        base, suffix = re.fullmatch(r"(.*_\d{4}-\d{6})(?:_(\d+))?", run_dir.name).groups()
        suffixes[base].append(int(suffix or 1))
    assert all(sorted(numbers) == list(range(1, len(numbers) + 1)) for numbers in suffixes.values())
    for run_dir in run_dirs:
        check_complete(run_dir, uninterrupted_run)
