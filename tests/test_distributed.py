"""Data-parallel training under torchrun: two CPU processes with gloo."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_mnist
from conftest import (
    REPO,
    TORCHRUN,
    config_of,
    events_of,
    free_port,
    metrics_of,
    signal_in_a_later_epoch,
    torchrun,
    write_mnist,
)

pytestmark = pytest.mark.slow  # every test here starts torchrun, or uses a run it made

COMMON = ["--lr", "0.05", "--num-embeddings", "0", "--device", "cpu", "--test-batch-size", "100",
          "--val-size", "200"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("ddp") / "data", train_count=2000, test_count=300)


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two processes with batch 16 each: a global batch of 32."""
    root = tmp_path_factory.mktemp("ddp-run")
    result = torchrun(*COMMON, "--epochs", "2", "--batch-size", "16", "--data-dir", str(data_dir),
                      "--log-dir", str(root / "runs"), weights_dir=root / "weights")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (root / "runs").iterdir()  # one run folder, written by process 0 alone
    return run_dir, root / "weights"


def test_one_run_dir_with_a_falling_loss(ddp_run):
    run_dir, _ = ddp_run
    assert config_of(run_dir)["batch_size"] == 16
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 3  # one each: run, train, validation
    losses = [event.value for event in events_of(run_dir / "train").Scalars("loss")]
    assert len(losses) == 2 and losses[1] < losses[0]
    # 1,800 training samples (200 held out), 900 per process in batches of 16: 57 steps per epoch
    history = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"]
    assert [record["step"] for record in history] == [57, 2 * 57]
    # The validation set is scored whole: its accuracy is a multiple of 1/200.
    accuracies = [event.value for event in events_of(run_dir / "validation").Scalars("accuracy")]
    assert len(accuracies) == 2 and all(abs(a * 200 - round(a * 200)) < 1e-3 for a in accuracies)


def test_both_processes_end_with_identical_weights(ddp_run):
    _, weights_dir = ddp_run
    rank0 = torch.load(weights_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(weights_dir / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    saved = torch.load(next(iter(weights_dir.parent.glob("runs/*/checkpoints/last.pt"))), weights_only=True)
    assert all(torch.equal(rank0[key], saved["model"][key]) for key in rank0)


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory) -> Path:
    """One process with batch 32: the global batch of the two-process runs."""
    log_dir = tmp_path_factory.mktemp("one-process")
    argv = [*COMMON, "--epochs", "2", "--batch-size", "32", "--data-dir", str(data_dir), "--log-dir",
            str(log_dir), "--run-name", "single"]
    assert train_mnist.main(argv) == 0
    return log_dir / "single"


def assert_trained_alike(one_process_run: Path, two_processes_weights: dict) -> None:
    """The two processes' batches together are exactly the one process's batch, and DDP averages
    their gradients: the weights differ only by float rounding."""
    single_weights = torch.load(one_process_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in single_weights:
        torch.testing.assert_close(two_processes_weights[key], single_weights[key], rtol=1e-3, atol=1e-4)


def test_matches_one_process_with_the_same_global_batch(ddp_run, one_process_run):
    run_dir, weights_dir = ddp_run
    single, parallel = metrics_of(one_process_run), metrics_of(run_dir)
    assert parallel["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=0.01)
    assert_trained_alike(one_process_run, torch.load(weights_dir / "rank0.pt", weights_only=True))


def test_two_machines_run_as_two_torchrun_agents_on_this_one(data_dir, one_process_run, tmp_path):
    """The README's multi-node command with both nodes here: --nnodes=2, one process each,
    meeting at a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mnist",
               str(REPO / "tests" / "ddp_worker.py"), str(weights_dir), *COMMON, "--epochs", "2",
               "--batch-size", "16", "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "runs")]
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        consoles = [agent.communicate(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (out, err) in zip(agents, consoles):
        assert agent.returncode == 0 and "Traceback" not in out + err, err[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # one run folder, from process 0
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["config"]["batch_size"] == 16
    assert "in 2 processes" in "".join(out for out, _ in consoles)
    assert "Test accuracy: " in "".join(out for out, _ in consoles)
    ranks = [torch.load(weights_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])
    assert_trained_alike(one_process_run, ranks[0])


def test_a_two_process_checkpoint_evaluates_in_one_process_to_the_reported_accuracy(ddp_run, capsys):
    run_dir, _ = ddp_run
    reported = f"Test accuracy: {metrics_of(run_dir)['test_accuracy']:.4f}"
    capsys.readouterr()
    assert train_mnist.main(["--evaluate", str(run_dir), "--device", "cpu"]) == 0  # two processes -> one
    assert reported in capsys.readouterr().out.splitlines()


def test_one_process_run_goes_on_in_two_stops_on_ctrl_c_and_resumes_in_one(tmp_path, capsys):
    """One process -> two under torchrun; Ctrl-C stops both at one step; the stopped checkpoint
    evaluates alike under torchrun and in one process; two -> one resumes it."""
    data_dir = write_mnist(tmp_path / "data", train_count=2000, test_count=200)
    run_dir = tmp_path / "runs" / "stopped"
    argv = [*COMMON, "--val-size", "0", "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--data-dir",
            str(data_dir),
            "--log-dir", str(tmp_path / "runs"), "--run-name", "stopped"]
    assert train_mnist.main(argv) == 0  # epoch 1 in one process: 250 steps
    assert metrics_of(run_dir)["epochs"] == 1
    # A terminal's Ctrl-C reaches every process of the foreground group: torchrun and its workers.
    command = [*TORCHRUN, str(REPO / "train_mnist.py"), "--resume", str(run_dir), "--epochs", "5",
               "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        # a moment in epoch 4, timed by epoch 3 (epoch 2 is the first in two processes)
        signal_in_a_later_epoch(process, run_dir, signal.SIGINT, timed_epoch=3, whole_group=True)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert f"Resume with: python train_mnist.py --resume {run_dir}" in err, err[-3000:]
    # torchrun itself reports the signal with a traceback of its own; the workers show none
    assert 'train_mnist.py", line' not in err
    stopped = len(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"])
    assert 3 <= stopped < 5
    assert not (run_dir / "metrics.json").exists()  # a run that trains on is not finished

    evaluated = torchrun("--evaluate", str(run_dir), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (two_processes,) = [line for line in evaluated.stdout.splitlines() if line.startswith("Test accuracy")]
    capsys.readouterr()
    assert train_mnist.main(["--evaluate", str(run_dir), "--device", "cpu"]) == 0
    assert two_processes in capsys.readouterr().out.splitlines()

    # Two processes -> one: the stopped epoch starts again.
    assert train_mnist.main(["--resume", str(run_dir), "--device", "cpu"]) == 0
    assert f"Resuming {run_dir} after epoch {stopped}" in capsys.readouterr().err
    assert metrics_of(run_dir)["epochs"] == 5
    history = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"]
    # The steps of each epoch: 250 in one process, 125 in two.
    steps = [250 * epoch if epoch == 1 else 250 + 125 * (epoch - 1) if epoch <= stopped
             else 250 + 125 * (stopped - 1) + 250 * (epoch - stopped) for epoch in range(1, 6)]
    assert [record["step"] for record in history] == steps
    assert [event.step for event in events_of(run_dir / "train").Scalars("loss")] == steps
