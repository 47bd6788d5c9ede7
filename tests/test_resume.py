"""--resume: from the last saved epoch; flags given again win, or are refused; config.json says what
the run really used; TensorBoard shows each point of a resumed run once; one process per run."""

import itertools
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

import train_mnist
from conftest import (
    CONSTANT_LR,
    INTERRUPTIBLE,
    assert_same_weights,
    config_of,
    event_points,
    events_of,
    metrics_of,
    one_line_error,
    start_script,
    steps_of,
    train_in_process,
    wait_for_epoch,
    weights,
)
from models import MNISTNet

CPU = torch.device("cpu")


# --- Flags given again apply after the state is loaded --------------------------------------

def continue_by_hand(checkpoint: Path, data_dir: Path, epoch: int, lr: float, momentum: float,
                     weight_decay: float, batch_size: int = 32) -> dict:
    """The checkpoint's weights and momentum trained one more epoch with these values: plain
    PyTorch, independent of the script's resume."""
    state = torch.load(checkpoint, weights_only=True)
    net = MNISTNet()
    net.load_state_dict(state["model"])
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for index, parameter in enumerate(net.parameters()):
        optimizer.state[parameter]["momentum_buffer"] = state["optimizer"]["state"][index]["momentum_buffer"]
    train_set = train_mnist.load_split(data_dir, True, CPU)
    loader = train_mnist.DeviceLoader(train_set, batch_size, shuffle=True, seed=1)
    loader.set_epoch(epoch)
    net.train()
    for images, labels in loader:
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.state_dict()


@pytest.mark.parametrize("changes", [{"lr": 0.01}, {"momentum": 0.5}, {"weight_decay": 0.0},
                                     {"lr": 0.02, "momentum": 0.0, "weight_decay": 0.01}], ids=str)
def test_a_flag_given_again_applies_from_the_checkpoint_on(tmp_path, synthetic_data, changes):
    run_dir = train_in_process(synthetic_data, tmp_path, "run", *CONSTANT_LR, "--epochs", "1")
    shutil.copy(run_dir / "checkpoints" / "last.pt", tmp_path / "epoch1.pt")
    flags = [item for key, value in changes.items() for item in (f"--{key}", str(value))]
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", "2", *flags]) == 0

    used = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4} | changes
    assert_same_weights(weights(run_dir / "checkpoints" / "last.pt"),
                        continue_by_hand(tmp_path / "epoch1.pt", synthetic_data, 2, **used))
    config = config_of(run_dir)
    assert all(config[key] == value for key, value in changes.items())
    (session,) = config["resumed"]
    assert session["epoch"] == 1 and session["step"] == 10
    before = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    assert session["changed"] == {"epochs": [1, 2]} | {key: [before[key], v] for key, v in changes.items()}


def test_the_other_flags_given_again_are_used_as_given(tmp_path, synthetic_data, monkeypatch):
    """--warmup and --lr-decay recompute the schedule for the steps left, from the step reached;
    the switches, the label smoothing, the test batch, the projector and the data folder are used
    as given."""
    run_dir = train_in_process(synthetic_data, tmp_path, "run", *CONSTANT_LR, "--epochs", "1")
    moved = tmp_path / "moved data"
    shutil.move(synthetic_data, moved)  # the run's own --data-dir is gone
    trained, tested = [], []
    real_train, real_test = train_mnist.train, train_mnist.test

    def train_and_look(model, optimizer, scheduler, loader, loss_fn, *args, **kwargs):
        trained.append((optimizer.param_groups[0]["nesterov"], loss_fn.label_smoothing,
                        torch.are_deterministic_algorithms_enabled()))
        return real_train(model, optimizer, scheduler, loader, loss_fn, *args, **kwargs)

    def test_and_look(model, loader):
        tested.append(loader.batch_size)
        return real_test(model, loader)

    monkeypatch.setattr(train_mnist, "train", train_and_look)
    monkeypatch.setattr(train_mnist, "test", test_and_look)
    monkeypatch.setattr(train_mnist, "MIN_WARMUP_STEPS", 1)  # 20 steps in all: the floor would hide --warmup
    # What --deterministic sets for the whole process, put back after the test.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    try:
        assert train_mnist.main(["--resume", str(run_dir), "--epochs", "2", "--warmup", "0.75", "--lr-decay",
                                 "0.5", "--nesterov", "--label-smoothing", "0.1", "--test-batch-size", "7",
                                 "--num-embeddings", "5", "--deterministic", "--data-dir", str(moved)]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    assert trained == [(True, 0.1, True)]
    assert tested == [7, 7]  # epoch 2 scored on the test set (--val-size 0), then the final test
    # 10 steps at the constant rate, then 10 more of 20 in all: the rate rises over the first 15 of
    # the 20 and falls over the last 10.
    rates = [event.value for event in events_of(run_dir).Scalars("training/learning rate")]
    resumed = [0.05 * min(1, (step + 1) / 15, (20 - step) / 10) for step in range(10, 20)]
    assert rates == pytest.approx([0.05] * 10 + resumed)
    for tag, lines in (("train features", 5), ("test features", 6)):  # the test digits' with a header
        (metadata,) = run_dir.glob(f"*/{tag}/metadata.tsv")
        assert len(metadata.read_text().splitlines()) == lines
    config = config_of(run_dir)
    assert config["data_dir"] == str(moved)
    assert set(config["resumed"][0]["changed"]) == {"epochs", "warmup", "lr_decay", "nesterov",
                                                    "label_smoothing", "test_batch_size", "num_embeddings",
                                                    "deterministic", "data_dir"}


@pytest.mark.parametrize("batch_size", [16, 64])
def test_ctrl_c_then_a_new_batch_size_redoes_the_stopped_epoch_in_the_new_batches(tmp_path, synthetic_data,
                                                                                  ctrl_c_in_epoch, capsys,
                                                                                  batch_size):
    """Stopped in epoch 2 and resumed with another batch size, the run trains epoch 2 again in the
    new batches, from the weights of epoch 1: nothing skipped, no crash."""
    ctrl_c_in_epoch(2)
    run_dir = tmp_path / "stopped"
    assert train_mnist.main([*CONSTANT_LR, "--epochs", "2", "--data-dir", str(synthetic_data), "--log-dir",
                             str(tmp_path), "--run-name", "stopped"]) == 130
    assert capsys.readouterr().err.endswith(f"Stopped by SIGINT. Resume with: python train_mnist.py --resume "
                                            f"{run_dir}\n")
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert [(record["epoch"], record["step"]) for record in state["history"]] == [(1, 10)]
    shutil.copy(run_dir / "checkpoints" / "last.pt", tmp_path / "stopped.pt")

    assert train_mnist.main(["--resume", str(run_dir), "--batch-size", str(batch_size)]) == 0
    assert f"Resuming {run_dir} after epoch 1" in capsys.readouterr().err
    by_hand = continue_by_hand(tmp_path / "stopped.pt", synthetic_data, 2, 0.05, 0.9, 5e-4, batch_size)
    assert_same_weights(weights(run_dir / "checkpoints" / "last.pt"), by_hand)
    steps = 10 + 320 // batch_size  # the x-axis is the steps taken
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"][-1]["step"] == steps
    points = event_points(run_dir)
    assert steps_of(points, "training/loss per step") == list(range(1, steps + 1))
    assert steps_of(points, "loss (train)") == steps_of(points, "loss (test)") == [10, steps]
    assert config_of(run_dir)["resumed"][0]["changed"] == {"batch_size": [32, batch_size]}


def test_a_signal_inside_a_librarys_except_exception_still_stops_the_run(tmp_path, synthetic_data, capfd,
                                                                         ctrl_c_in_epoch, monkeypatch):
    """tqdm asks for the terminal's size at every refresh, inside `except Exception`. A Ctrl-C that
    lands there must still stop the run, at once: nothing may swallow it. (ctrl_c_in_epoch is
    asked for its teardown: it restores the signal handlers.)"""
    asked = itertools.count(1)

    def terminal_size(*_args):
        if next(asked) == 3:  # a refresh in epoch 1
            signal.raise_signal(signal.SIGINT)  # its handler runs here, as a real Ctrl-C's can
        raise OSError("not a terminal")  # as on a pipe: tqdm falls back to its default width

    monkeypatch.setattr(os, "get_terminal_size", terminal_size)
    assert train_mnist.main([*CONSTANT_LR, "--epochs", "2", "--data-dir", str(synthetic_data), "--log-dir",
                             str(tmp_path), "--run-name", "stopped"]) == 130
    assert capfd.readouterr().err.endswith("Stopped by SIGINT before a first epoch was saved: there is "
                                            "nothing to resume.\n")


def test_every_curve_of_an_epoch_is_on_disk_before_its_checkpoint(tmp_path, synthetic_data, monkeypatch):
    """A run killed just after a checkpoint (out of memory, a power cut) resumes from it: the
    epochs it covers must already be in TensorBoard's files, the per-step curves included, even
    when TensorBoard's writing thread lags behind (a busy machine, a slow disk)."""
    real_write = RecordWriter.write

    def slow_write(writer: RecordWriter, data: bytes) -> None:
        time.sleep(0.01)
        real_write(writer, data)

    monkeypatch.setattr(RecordWriter, "write", slow_write)
    real_save_checkpoint, on_disk = train_mnist.save_checkpoint, []

    def look_then_save(state, *args):
        run_dir = Path(state["config"]["run_dir"])
        events, train = events_of(run_dir), events_of(run_dir / "train")
        on_disk.append(([point.step for point in events.Scalars("training/loss per step")],
                        len(events.Histograms("weights/conv1.weight")),
                        len(events.Images("visualizations/conv1 filters")), len(train.Scalars("loss"))))
        return real_save_checkpoint(state, *args)

    monkeypatch.setattr(train_mnist, "save_checkpoint", look_then_save)
    train_in_process(synthetic_data, tmp_path, "run", *CONSTANT_LR, "--epochs", "2")
    assert on_disk == [(list(range(1, 11)), 1, 1, 1), (list(range(1, 21)), 2, 2, 2)]  # 10 steps an epoch


# --- What cannot be honoured is refused -------------------------------------------------

@pytest.fixture
def finished_run(tmp_path, synthetic_data) -> Path:
    return train_in_process(synthetic_data, tmp_path, "done", *CONSTANT_LR, "--epochs", "1")


@pytest.mark.parametrize(("flags", "message"), [
    (["--seed", "2"], "--seed cannot change on --resume"),
    (["--val-size", "64"], "--val-size cannot change on --resume"),
    (["--run-name", "other"], "--run-name cannot rename a run on --resume"),
    (["--lr", "0.1", "0.2", "--epochs", "2"], "--resume continues one run"),
    (["--evaluate", "elsewhere"], "--resume, --evaluate and --predict exclude each other"),
], ids=["seed", "validation", "run name", "sweep", "evaluate"])
def test_flags_that_would_make_another_run_are_refused(finished_run, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(["--resume", str(finished_run), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_outside_its_run_folder_is_refused_and_evaluate_tests_it(finished_run, tmp_path, capsys):
    """--resume goes on in the run's folder, so it needs one; the message points to --evaluate."""
    loose = tmp_path / "copied.pt"
    loose.write_bytes((finished_run / "checkpoints" / "last.pt").read_bytes())
    assert train_mnist.main(["--resume", str(loose), "--epochs", "2"]) == 1
    assert one_line_error(capsys) == ("error: --resume continues a run in its folder: give the run folder, "
                                      "or a checkpoint in its checkpoints/ folder (use --evaluate to test a "
                                      "loose checkpoint)")
    assert train_mnist.main(["--evaluate", str(loose)]) == 0
    assert f"Test accuracy: {metrics_of(finished_run)['test_accuracy']:.4f}" in capsys.readouterr().out


def test_the_log_dir_given_for_a_run_names_its_latest_run(finished_run, tmp_path, capsys):
    """`--evaluate runs` for `--evaluate runs/NAME`: the line names the run to give."""
    older = tmp_path / "earlier"
    shutil.copytree(finished_run, older)
    for path in older.rglob("*.pt"):
        os.utime(path, (0, 0))
    for argv in (["--evaluate", str(tmp_path)], ["--resume", str(tmp_path)],
                 ["--predict", "digit.png", "--checkpoint", str(tmp_path)]):
        assert train_mnist.main(argv) == 1
        name = "best.pt" if "--predict" in argv else "last.pt"
        assert one_line_error(capsys) == (
            f"error: no checkpoint at {tmp_path / 'checkpoints' / name} ({tmp_path} is a folder of runs; "
            f"the latest is {finished_run}); give a .pt file, or a run folder with checkpoints/{name}")


def test_a_runs_name_alone_is_one_line_that_names_its_folder(finished_run, tmp_path, capsys, monkeypatch):
    """`--evaluate NAME`, as TensorBoard lists the run, for `--evaluate runs/NAME`: the line names it."""
    monkeypatch.chdir(tmp_path / "done" / "checkpoints")  # where no "done" is
    for argv in (["--evaluate", "done"], ["--resume", "done"],
                 ["--predict", "digit.png", "--checkpoint", "done"]):
        assert train_mnist.main([*argv, "--log-dir", str(tmp_path)]) == 1
        name = "best.pt" if "--predict" in argv else "last.pt"
        assert one_line_error(capsys) == (f"error: no checkpoint at done (did you mean {finished_run}?); "
                                          f"give a .pt file, or a run folder with checkpoints/{name}")


@pytest.mark.parametrize("part", ["best_model", "optimizer", "history"])
def test_a_checkpoint_missing_part_of_its_state_is_one_line(finished_run, capsys, part):
    path = finished_run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state[part]
    torch.save(state, path)
    assert train_mnist.main(["--resume", str(finished_run), "--epochs", "2"]) == 1
    assert one_line_error(capsys) == (f"error: {path} lacks part of the training state, so it cannot be "
                                      "resumed; --evaluate can still test it")
    assert train_mnist.main(["--evaluate", str(path)]) == 0  # as the line says
    assert "Test accuracy: " in capsys.readouterr().out


@pytest.mark.parametrize(("key", "value"), [("lr", -5), ("epochs", 0), ("test_batch_size", 0),
                                            ("data_dir", ""), ("momentum", "fast"), ("deterministic", "yes")])
def test_a_bad_stored_flag_is_one_line_naming_the_checkpoint(finished_run, capsys, key, value):
    path = finished_run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["config"][key] = value
    torch.save(state, path)
    for flag in ("--resume", "--evaluate"):
        assert train_mnist.main([flag, str(finished_run), "--epochs", "2"]) == 1
        message = one_line_error(capsys)
        assert message.startswith(f"error: {path} holds an invalid flag (argument --{key.replace('_', '-')}")
        assert message.endswith("it was changed, or not written by train_mnist.py")


# --- A finished run reopened: each point once, the whole history kept -------------------

def test_resuming_an_earlier_checkpoint_of_a_finished_run_rewrites_what_came_after(tmp_path, synthetic_data,
                                                                                   capsys):
    run_dir = train_in_process(synthetic_data, tmp_path, "run", *CONSTANT_LR, "--epochs", "3", "--lr", "0.01",
                               "--num-embeddings", "8")
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert len(best["history"]) < 3  # accuracy peaked early on these easy digits
    capsys.readouterr()
    assert train_mnist.main(["--resume", str(run_dir / "checkpoints" / "best.pt"), "--epochs", "3"]) == 1
    assert "finished after epoch 3; resume it with --epochs larger than 3" in one_line_error(capsys)
    assert (run_dir / "metrics.json").exists()

    assert train_mnist.main(["--resume", str(run_dir / "checkpoints" / "best.pt"), "--epochs", "4"]) == 0
    points = event_points(run_dir)
    duplicates = [point for point, count in Counter(points).items() if count > 1]
    assert duplicates == []
    assert steps_of(points, "loss (train)") == [10, 20, 30, 40]
    assert steps_of(points, "training/loss per step") == list(range(1, 41))
    # The old run's figures and test scores at its end, step 30, were purged.
    assert steps_of(points, "visualizations/confusion matrix") == [40]
    assert steps_of(points, "accuracy (test)") == [10, 20, 30, 40]  # with --val-size 0, the test set's curve
    assert steps_of(points, "test/accuracy") == [40]  # and its final score
    assert metrics_of(run_dir)["epochs"] == 4
    # The projector shows the embeddings of the final session.
    projector = (run_dir / "projector_config.pbtxt").read_text()
    assert "00003/" not in projector and 'tensor_path: "00004/train features/tensors.tsv"' in projector


def test_fewer_epochs_than_a_stopped_run_has_trained_are_refused(tmp_path, synthetic_data, ctrl_c_in_epoch,
                                                                  capsys):
    """--epochs counts every epoch of the run: fewer than it has trained cannot finish it."""
    ctrl_c_in_epoch(3)
    argv = [*CONSTANT_LR, "--epochs", "3", "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path)]
    assert train_mnist.main([*argv, "--run-name", "run"]) == 130
    run_dir = tmp_path / "run"
    config = (run_dir / "config.json").read_text()
    capsys.readouterr()
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", "1"]) == 1
    assert one_line_error(capsys) == (f"error: run {run_dir} has trained 2 epochs already, more than "
                                      "--epochs 1; give --epochs 2 or more")
    assert (run_dir / "config.json").read_text() == config and not (run_dir / "metrics.json").exists()
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", "2"]) == 0  # tests the epochs it has
    assert metrics_of(run_dir)["epochs"] == 2


def test_training_a_finished_run_longer_records_what_changed(tmp_path, synthetic_data):
    run_dir = train_in_process(synthetic_data, tmp_path, "run", *CONSTANT_LR, "--epochs", "1",
                               "--num-embeddings", "8")
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", "2", "--lr", "0.02"]) == 0
    projector = (run_dir / "projector_config.pbtxt").read_text()
    for tag in ("train features", "test features"):  # the final session's embeddings
        assert f'tensor_path: "00002/{tag}/tensors.tsv"' in projector and "00001/" not in projector
    (session,) = config_of(run_dir)["resumed"]
    assert session["changed"] == {"lr": [0.05, 0.02], "epochs": [1, 2]} and session["step"] == 10
    # The HPARAMS row keeps the values the run started with: TensorBoard reads a run's first row.
    assert hparams_values(run_dir)["lr"] == 0.05 and hparams_values(run_dir)["epochs"] == 1


def hparams_values(run_dir: Path) -> dict:
    events = events_of(run_dir)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    hparams = data.session_start_info.hparams
    return {key: getattr(hparam, hparam.WhichOneof("kind")) for key, hparam in hparams.items()}


# --- One process per run folder ---------------------------------------------------------

@pytest.mark.slow
def test_a_second_process_on_a_run_is_refused_and_a_killed_holder_never_blocks(tmp_path, interruptible_data,
                                                                               capsys):
    process = start_script(*INTERRUPTIBLE, "--data-dir", str(interruptible_data), "--log-dir", str(tmp_path),
                           "--run-name", "busy")
    run_dir = tmp_path / "busy"
    try:
        wait_for_epoch(run_dir, 1, process)
        capsys.readouterr()
        assert train_mnist.main(["--resume", str(run_dir), "--device", "cpu"]) == 1
        assert one_line_error(capsys) == (f"error: run {run_dir} is in use by another process; wait for it "
                                          "to end, or stop it first")
    finally:
        process.kill()  # SIGKILL: no clean-up at all, the lock file stays behind
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert (run_dir / ".lock").exists()
    # Unfinished: --epochs 1 only finishes it from its epoch-1 checkpoint, without training more.
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", "1", "--device", "cpu"]) == 0
    assert metrics_of(run_dir)["epochs"] == 1
