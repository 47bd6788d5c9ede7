"""Experiment management: reproducibility, checkpoints, interrupt and resume, evaluate, sweeps."""

import contextlib
import csv
import datetime
import json
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch

import train_mnist
from conftest import (
    EPOCHS,
    INTERRUPTIBLE,
    QUICK_VALIDATED,
    STEPS_PER_EPOCH,
    assert_same_weights,
    config_of,
    event_points,
    events_of,
    metrics_of,
    one_line_error,
    permission_denied,
    run_script,
    signal_in_a_later_epoch,
    start_script,
    steps_of,
    sweep_table,
    train_in_process,
    weights,
    write_mnist,
)

TIMING_KEYS = {"training_seconds", "images_per_second"}


def metrics_without_timing(run_dir: Path) -> dict:
    return {key: value for key, value in metrics_of(run_dir).items() if key not in TIMING_KEYS}


def test_same_seed_gives_bit_identical_weights_and_metrics(tmp_path, synthetic_data):
    first = train_in_process(synthetic_data, tmp_path, "a", *QUICK_VALIDATED, "--epochs", "2", "--seed", "7")
    second = train_in_process(synthetic_data, tmp_path, "b", *QUICK_VALIDATED, "--epochs", "2", "--seed", "7")
    other = train_in_process(synthetic_data, tmp_path, "c", *QUICK_VALIDATED, "--epochs", "2", "--seed", "8")
    assert_same_weights(weights(first / "checkpoints/last.pt"), weights(second / "checkpoints/last.pt"))
    assert metrics_without_timing(first) == metrics_without_timing(second)
    assert not torch.equal(weights(first / "checkpoints/last.pt")["fc3.weight"],
                           weights(other / "checkpoints/last.pt")["fc3.weight"])


def test_deterministic_flag_turns_on_deterministic_algorithms(tmp_path, synthetic_data):
    try:
        run_dir = train_in_process(synthetic_data, tmp_path, "det", *QUICK_VALIDATED,
                                   "--epochs", "1", "--deterministic")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    plain = train_in_process(synthetic_data, tmp_path, "plain", *QUICK_VALIDATED, "--epochs", "1")
    assert_same_weights(weights(run_dir / "checkpoints/last.pt"), weights(plain / "checkpoints/last.pt"))
    assert config_of(run_dir)["deterministic"] is True


def test_checkpoints_hold_the_whole_state_and_load_weights_only(tmp_path, synthetic_data):
    run_dir = train_in_process(synthetic_data, tmp_path, "ck", *QUICK_VALIDATED, "--epochs", "2")
    last = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    best = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    assert last.keys() == {"model", "optimizer", "best_model", "history", "config"}
    # 320 digits, 64 held out, in batches of 32: 8 steps an epoch
    assert [(row["epoch"], row["step"]) for row in last["history"]] == [(1, 8), (2, 16)]
    assert last["config"]["lr"] == 0.05 and last["config"]["epochs"] == 2
    assert set(last["optimizer"]["state"][0]) == {"momentum_buffer"}
    best_epoch = max(last["history"], key=lambda row: row["validation_accuracy"])["epoch"]
    assert len(best["history"]) == best_epoch == metrics_of(run_dir)["best_epoch"]
    assert_same_weights(last["best_model"], best["model"])  # the weights the test set scores at the end


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    train_mnist.atomic_write(path, b"the previous checkpoint")

    def killed_before_rename(*args):
        raise KeyboardInterrupt  # stands for the process dying between write and rename

    monkeypatch.setattr(train_mnist.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        train_mnist.atomic_write(path, b"a new checkpoint")
    assert path.read_bytes() == b"the previous checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "times"), [(signal.SIGINT, 5), (signal.SIGTERM, 1)],
                         ids=["five Ctrl-C", "SIGTERM"])
def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, interruptible_data, uninterrupted_run,
                                                            signum, times):
    # One run at a time: two on two cores, each with two threads, slow each other down many times.
    run_dir = tmp_path / "interrupted"
    process = start_script(*INTERRUPTIBLE, "--data-dir", str(interruptible_data), "--log-dir", str(tmp_path),
                           "--run-name", "interrupted")
    try:
        signal_in_a_later_epoch(process, run_dir, signum, times)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and err.count("Resume with:") == 1
    assert err.strip().splitlines()[-1] == (f"Stopped by {signal.Signals(signum).name}. Resume with: "
                                            f"python train_mnist.py --resume {run_dir}")
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"]
    assert 2 <= len(stopped_at) < EPOCHS and stopped_at[-1]["step"] == len(stopped_at) * STEPS_PER_EPOCH
    assert not (run_dir / "metrics.json").exists()

    assert train_mnist.main(["--resume", str(run_dir), "--device", "cpu"]) == 0
    assert_same_weights(weights(uninterrupted_run / "checkpoints/last.pt"),
                        weights(run_dir / "checkpoints/last.pt"))
    resumed, uninterrupted = metrics_without_timing(run_dir), metrics_without_timing(uninterrupted_run)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():  # same weights; a float32 ulp in the loss
        assert resumed[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    points = event_points(run_dir)
    assert steps_of(points, "training/loss per step") == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    epoch_ends = [epoch * STEPS_PER_EPOCH for epoch in range(1, EPOCHS + 1)]
    assert steps_of(points, "loss (train)") == steps_of(points, "accuracy (test)") == epoch_ends
    assert sorted(points) == sorted(event_points(uninterrupted_run))  # every point, once


@pytest.mark.parametrize("stopped_in", [2, 3], ids=["in epoch 2", "in the last epoch"])
def test_ctrl_c_with_validation_then_resume_equals_a_run_left_alone(tmp_path, synthetic_data, ctrl_c_in_epoch,
                                                                    stopped_in):
    """With the validation split on: the final weights, best.pt, the best epoch and metrics.json of a
    run stopped by Ctrl-C and resumed are those of the same run left alone."""
    alone = train_in_process(synthetic_data, tmp_path, "alone", *QUICK_VALIDATED,
                             "--epochs", "3", "--lr", "0.01")
    ctrl_c_in_epoch(stopped_in)
    stopped = tmp_path / "stopped"
    assert train_mnist.main([*QUICK_VALIDATED, "--epochs", "3", "--lr", "0.01", "--data-dir",
                             str(synthetic_data), "--log-dir", str(tmp_path), "--run-name", "stopped"]) == 130
    saved = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["history"]
    assert len(saved) == stopped_in - 1 and not (stopped / "metrics.json").exists()
    assert train_mnist.main(["--resume", str(stopped)]) == 0
    for name in ("last", "best"):
        assert_same_weights(weights(alone / "checkpoints" / f"{name}.pt"),
                            weights(stopped / "checkpoints" / f"{name}.pt"))
    assert metrics_without_timing(stopped) == metrics_without_timing(alone)


def test_a_signal_after_any_checkpoint_file_resumes_to_the_run_left_alone(tmp_path, synthetic_data,
                                                                          monkeypatch, restored_signals):
    """An improving epoch writes best.pt, then last.pt. Stopped after either file of any epoch,
    then resumed, the run ends with the files and metrics of one left alone."""
    argv = [*QUICK_VALIDATED, "--epochs", "3", "--lr", "0.01", "--data-dir", str(synthetic_data), "--log-dir",
            str(tmp_path)]
    real_replace, written, stop_after = os.replace, [], [0]

    def replace_then_maybe_ctrl_c(source, target):
        real_replace(source, target)
        if Path(target).parent.name == "checkpoints":
            written.append(Path(target).name)
            if len(written) == stop_after[0]:
                os.kill(os.getpid(), signal.SIGINT)  # just after this file took its place

    monkeypatch.setattr(os, "replace", replace_then_maybe_ctrl_c)
    assert train_mnist.main([*argv, "--run-name", "alone"]) == 0
    files_written = len(written)
    assert files_written > 3 and written.count("best.pt") >= 2  # both files, in more than one epoch
    for stop_after[0] in range(1, files_written + 1):
        written.clear()
        stopped = tmp_path / f"stopped after file {stop_after[0]}"
        assert train_mnist.main([*argv, "--run-name", stopped.name]) == 130
        if not (stopped / "checkpoints" / "last.pt").exists():  # no epoch saved whole: nothing to resume
            continue
        assert train_mnist.main(["--resume", str(stopped)]) == 0
        for name in ("last", "best"):
            assert_same_weights(weights(tmp_path / "alone" / "checkpoints" / f"{name}.pt"),
                                weights(stopped / "checkpoints" / f"{name}.pt"))
        assert metrics_without_timing(stopped) == metrics_without_timing(tmp_path / "alone")


def test_the_test_set_is_scored_once_per_run_or_once_per_epoch_without_validation(tmp_path, synthetic_data,
                                                                                  monkeypatch):
    test_set = train_mnist.load_split(synthetic_data, False, torch.device("cpu"))
    scored, real_test = [], train_mnist.test

    def counting_test(model, loader):
        scored.append(torch.equal(loader.labels, test_set.labels))
        return real_test(model, loader)

    monkeypatch.setattr(train_mnist, "test", counting_test)
    train_in_process(synthetic_data, tmp_path, "validated", *QUICK_VALIDATED, "--epochs", "3")
    assert scored == [False, False, False, True]  # each epoch on the validation set, then the test set once
    scored.clear()
    train_in_process(synthetic_data, tmp_path, "plain", *QUICK_VALIDATED, "--epochs", "3", "--val-size", "0")
    assert scored == [True] * 4  # each epoch on the test set, as the course does, and the final score


def test_evaluate_reports_the_training_accuracy_without_a_run_dir(tmp_path, synthetic_data, capsys):
    run_dir = train_in_process(synthetic_data, tmp_path, "ev", *QUICK_VALIDATED, "--epochs", "2")
    reported = f"Test accuracy: {metrics_of(run_dir)['test_accuracy']:.4f}"  # of best.pt's weights
    capsys.readouterr()
    before = sorted(tmp_path.rglob("*"))
    assert train_mnist.main(["--evaluate", str(run_dir / "checkpoints" / "best.pt"), "--device", "cpu"]) == 0
    assert reported in capsys.readouterr().out
    assert train_mnist.main(["--evaluate", str(run_dir), "--device", "cpu"]) == 0  # a folder: its best.pt
    assert reported in capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    # Without a validation set the run reports its final weights, and a folder means its last.pt.
    plain = train_in_process(synthetic_data, tmp_path, "plain", *QUICK_VALIDATED,
                             "--epochs", "2", "--val-size", "0")
    capsys.readouterr()
    before = sorted(tmp_path.rglob("*"))
    assert train_mnist.main(["--evaluate", str(plain), "--device", "cpu"]) == 0
    last = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["history"][-1]
    assert f"Test accuracy: {last['test_accuracy']:.4f}" in capsys.readouterr().out
    assert metrics_of(plain)["test_accuracy"] == pytest.approx(last["test_accuracy"])
    assert sorted(tmp_path.rglob("*")) == before


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("flag", ["--evaluate", "--resume"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, flag, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as file:
        pickle.dump({"model": RunsCodeWhenUnpickled(marker)}, file)
    torch_saved = tmp_path / "evil-torch.pt"
    torch.save({"model": RunsCodeWhenUnpickled(marker)}, torch_saved)
    # torch names the function that torch.save stored; a raw pickle fails on its first unknown opcode.
    function = f"{os.mkdir.__module__}.mkdir"
    for path, reason in ((evil, "not a file that torch.save wrote"), (torch_saved, f"it holds {function}")):
        assert train_mnist.main([flag, str(path)]) == 1
        line = one_line_error(capsys)
        assert line.startswith(f"error: {path} cannot be loaded safely, so it is refused: "), line
        assert reason in line and "\x1b" not in line, line  # torch's advice carries terminal escapes
        assert not marker.exists()


def test_a_checkpoint_it_may_not_read_is_one_line_that_says_so(tmp_path, capsys, monkeypatch):
    """A file without read permission is not a file that cannot be loaded safely (chmod does not
    stop root, who runs CI: the refusal is made where torch.load opens the file)."""
    denied = tmp_path / "denied.pt"
    torch.save(fake_checkpoint(train_mnist.MNISTNet().state_dict()), denied)
    load = torch.load

    def load_unless_denied(path, *args, **kwargs):
        if Path(path) == denied:
            raise permission_denied(path)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load_unless_denied)
    for flag in ("--evaluate", "--resume"):
        assert train_mnist.main([flag, str(denied)]) == 1
        assert one_line_error(capsys) == f"error: {denied} cannot be read (Permission denied)"


def fake_checkpoint(model: dict) -> dict:
    return {"model": model, "optimizer": {}, "history": [], "config": {}}


def test_unusable_checkpoints_are_clear_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor_only)
    other_net = tmp_path / "other.pt"
    wrong_shapes = {key: torch.zeros(1) for key in train_mnist.MNISTNet().state_dict()}
    torch.save(fake_checkpoint(wrong_shapes), other_net)
    empty, text = tmp_path / "empty.pt", tmp_path / "notes.pt"
    empty.touch()
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    torch.save(fake_checkpoint(train_mnist.MNISTNet().state_dict()), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    unreadable = "so it is refused: it is empty, truncated, or not a file that torch.save wrote"
    cases = [(garbage, unreadable), (empty, unreadable), (text, unreadable), (truncated, unreadable),
             (tensor_only, "not a train_mnist.py checkpoint"),
             (tmp_path / "missing.pt", "no checkpoint at"), (other_net, "different network")]
    data_flags = ["--data-dir", str(write_mnist(tmp_path / "d")), "--log-dir", str(tmp_path / "runs"),
                  "--device", "cpu", "--val-size", "0"]
    (tmp_path / "checkpoints").mkdir()
    weights_only = tmp_path / "checkpoints" / "weights-only.pt"  # the right network, no training state
    torch.save(fake_checkpoint(train_mnist.MNISTNet().state_dict()), weights_only)
    assert train_mnist.main(["--resume", str(weights_only), *data_flags]) == 1
    assert "cannot be resumed" in one_line_error(capsys)
    for path, message in cases:
        for flag in ("--evaluate", "--resume"):
            assert train_mnist.main([flag, str(path), *data_flags]) == 1, (path, flag)
            assert message in one_line_error(capsys), (path, flag)
    assert not (tmp_path / "runs").exists()


def test_sweep_runs_the_grid_and_writes_a_sorted_table(tmp_path, synthetic_data, capsys):
    argv = ["--lr", "0.05", "0.01", "--batch-size", "32", "64", "--epochs", "1", "--num-embeddings", "0",
            "--val-size", "64", "--device", "cpu", "--data-dir", str(synthetic_data), "--log-dir",
            str(tmp_path / "runs")]
    assert train_mnist.main(argv) == 0
    run_dirs = sorted(path for path in (tmp_path / "runs").iterdir() if path.is_dir())
    assert len(run_dirs) == 4
    configs = {(c["lr"], c["batch_size"]) for c in
               (config_of(d) for d in run_dirs)}
    assert configs == {(0.05, 32), (0.05, 64), (0.01, 32), (0.01, 64)}
    for run_dir in run_dirs:
        events = events_of(run_dir)
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    rows = sweep_table(tmp_path / "runs")
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert list(rows[0]) == ["lr", "batch_size", "momentum", "epochs", "validation_accuracy", "test_accuracy",
                             "test_loss", "run_dir", "status"]
    validation = [float(row["validation_accuracy"]) for row in rows]
    assert validation == sorted(validation, reverse=True)  # ranked by validation, never by test
    for row in rows:  # each row names its folder, whose metrics it rounds to 4 places
        metrics = metrics_of(Path(row["run_dir"]))
        assert float(row["test_accuracy"]) == round(metrics["test_accuracy"], 4)
        assert float(row["validation_accuracy"]) == round(metrics["best_validation_accuracy"], 4)
    out = capsys.readouterr().out
    assert "Sweep results, best first" in out and rows[0]["run_dir"] in out


def test_a_sweep_without_lr_gives_each_point_the_rate_of_its_batch(tmp_path, synthetic_data, monkeypatch):
    trained = []
    monkeypatch.setattr(train_mnist, "run", lambda point, _device: trained.append(point) or {})
    assert train_mnist.main(["--batch-size", "32", "64", "256", "--lr", "auto", "0.01", "--data-dir",
                             str(synthetic_data), "--log-dir", str(tmp_path)]) == 0
    rates = {(point.lr, point.batch_size) for point in trained}
    assert rates == {(0.025, 32), (0.05, 64), (0.1, 256), (0.01, 32), (0.01, 64), (0.01, 256)}
    assert {(float(row["lr"]), int(row["batch_size"])) for row in sweep_table(tmp_path)} == rates


def test_two_sweeps_ending_in_the_same_second_keep_both_tables(tmp_path, synthetic_data, monkeypatch):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 1, 10, 15, 0, tzinfo=tz)

    monkeypatch.setattr(train_mnist.datetime, "datetime", Frozen)
    for lrs in (["0.05", "0.01"], ["0.02", "0.03"]):
        argv = [*QUICK_VALIDATED, "--lr", *lrs, "--epochs", "1", "--data-dir", str(synthetic_data),
                "--log-dir", str(tmp_path / "runs")]
        assert train_mnist.main(argv) == 0
    tables = {}
    for table in sorted((tmp_path / "runs").glob("sweep-*.csv")):
        with open(table) as file:
            tables[table.name] = {row["lr"] for row in csv.DictReader(file)}
    assert tables == {"sweep-20261201-101500.csv": {"0.05", "0.01"},
                      "sweep-20261201-101500_2.csv": {"0.02", "0.03"}}


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path, synthetic_data):
    argv = ["--lr", "1e6", "0.05", "--epochs", "1", "--num-embeddings", "0", "--device", "cpu",
            "--val-size", "64", "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path / "runs")]
    assert train_mnist.main(argv) == 0
    rows = sweep_table(tmp_path / "runs")
    assert [row["lr"] for row in rows] == ["0.05", "1000000.0"]
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("failed")


def test_an_interrupted_sweep_still_writes_its_table_with_every_point(tmp_path, synthetic_data,
                                                                      ctrl_c_in_epoch, capsys):
    ctrl_c_in_epoch(4)  # run 1: epochs 1 and 2; run 2: epoch 1, then Ctrl-C as its epoch 2 begins
    argv = [*QUICK_VALIDATED, "--lr", "0.05", "0.02", "0.01", "--epochs", "2", "--data-dir",
            str(synthetic_data), "--log-dir", str(tmp_path / "runs")]
    assert train_mnist.main(argv) == 130
    rows = {row["lr"]: row for row in sweep_table(tmp_path / "runs")}
    stopped = config_of(next((tmp_path / "runs").glob("*lr0.02*")))["run_dir"]
    assert rows["0.05"]["status"] == "ok" and float(rows["0.05"]["test_accuracy"]) > 0.5
    assert rows["0.02"]["status"] == f"stopped: --resume {stopped}" and rows["0.02"]["test_accuracy"] == ""
    assert rows["0.01"]["status"] == "not started"
    out, err = capsys.readouterr()
    assert "Sweep results, best first" in out and "not started" in out
    assert f"Resume with: python train_mnist.py --resume {stopped}" in err
    assert len(torch.load(Path(stopped) / "checkpoints" / "last.pt", weights_only=True)["history"]) == 1


def test_a_finished_run_resumes_only_to_train_longer(tmp_path, synthetic_data, capsys):
    run_dir = train_in_process(synthetic_data, tmp_path, "done", *QUICK_VALIDATED,
                               "--epochs", "1", "--num-embeddings", "8")
    capsys.readouterr()
    assert train_mnist.main(["--resume", str(run_dir), "--device", "cpu"]) == 1
    assert "finished after epoch 1; resume it with --epochs larger than 1" in capsys.readouterr().err
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", "2", "--device", "cpu"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
    assert steps_of(event_points(run_dir), "loss (train)") == [8, 16]
    # The projector shows the embeddings of the run's last session, at its final epoch.
    projector = (run_dir / "projector_config.pbtxt").read_text()
    assert projector.count("tensor_path: \"00002/") == 2 and "00001/" not in projector


# --- The validation split ---------------------------------------------------------------

def test_the_validation_split_is_fixed_and_apart_from_the_training_images(synthetic_data):
    """The same held-out images whatever the seed in use (and so in every run and process)."""
    split = train_mnist.load_split(synthetic_data, True, torch.device("cpu"))
    held_out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        train, validation = train_mnist.hold_out(split, 64)
        assert len(train.labels) == 256 and len(validation.labels) == 64
        held_out.append(validation.raw)
        together = torch.cat([train.raw, validation.raw]).flatten(1)
        assert len(torch.unique(together, dim=0)) == len(torch.unique(split.raw.flatten(1), dim=0))
    assert torch.equal(held_out[0], held_out[1])
    assert train_mnist.hold_out(split, 0) == (split, None)


def test_a_validation_set_as_large_as_the_training_set_is_one_line(tmp_path, synthetic_data, capsys):
    assert train_mnist.main([*QUICK_VALIDATED, "--val-size", "320", "--data-dir", str(synthetic_data),
                             "--log-dir", str(tmp_path), "--run-name", "big"]) == 1
    assert "--val-size 320 leaves none of the 320 training images to train on" in one_line_error(capsys)


def test_without_validation_the_console_says_the_test_set_chose(tmp_path, synthetic_data, capsys):
    run_dir = train_in_process(synthetic_data, tmp_path, "plain", *QUICK_VALIDATED,
                               "--epochs", "1", "--val-size", "0")
    out = capsys.readouterr().out
    assert "(--val-size 0: every epoch was scored on this test set, so this figure is optimistic)" in out
    metrics = metrics_of(run_dir)
    assert metrics["chosen_on"] == "test" and metrics["best_validation_accuracy"] is None


def test_patience_stops_early_and_the_run_finishes_on_its_best_weights(tmp_path, synthetic_data, capsys):
    run_dir = train_in_process(synthetic_data, tmp_path, "patient", *QUICK_VALIDATED,
                               "--epochs", "20", "--patience", "2")
    err = capsys.readouterr().err
    metrics = metrics_of(run_dir)
    best_epoch = metrics["best_epoch"]
    assert f"Stopping early (--patience 2): validation accuracy last improved in epoch {best_epoch}," in err
    assert metrics["epochs"] == metrics["best_epoch"] + 2 < 20
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert len(best["history"]) == metrics["best_epoch"]
    assert train_mnist.main(["--evaluate", str(run_dir / "checkpoints" / "best.pt"), "--device", "cpu"]) == 0
    assert f"Test accuracy: {metrics['test_accuracy']:.4f}" in capsys.readouterr().out
    # Stopped early, it trains on when resumed with more patience, up to the epochs it was given.
    assert train_mnist.main(["--resume", str(run_dir), "--epochs", str(metrics["epochs"])]) == 1
    assert f"finished after epoch {metrics['epochs']}; resume it with" in capsys.readouterr().err
    assert train_mnist.main(["--resume", str(run_dir), "--patience", "0"]) == 0
    assert metrics_of(run_dir)["epochs"] == 20


# --- The recipe's flags -----------------------------------------------------------------

def test_the_schedule_rises_holds_and_falls_as_a_function_of_the_step():
    def rates_of(warmup: float, decay: float, total_steps: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        scheduler = train_mnist.make_scheduler(optimizer, warmup, decay, total_steps)
        rates = []
        for _ in range(total_steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates

    rates = rates_of(0.2, 0.5, total_steps=1000)
    assert rates[0] == pytest.approx(0.1 / 200) and rates[199] == pytest.approx(0.1)  # 200 steps of warm-up
    assert rates[200:501] == pytest.approx([0.1] * 301)  # the hold
    assert rates[600] == pytest.approx(0.1 * 400 / 500)  # the fall, to 0 at the end
    assert rates[999] == pytest.approx(0.1 / 500)
    later = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    later.param_groups[0]["initial_lr"] = 0.1  # as a resume sets it
    train_mnist.make_scheduler(later, 0.2, 0.5, total_steps=1000, start_step=600)
    assert later.param_groups[0]["lr"] == pytest.approx(rates[600])  # a resumed run starts where it was
    # A short run's warm-up spans MIN_WARMUP_STEPS all the same (100), not 10% of its 60 steps;
    # --warmup 0 turns it off.
    assert rates_of(0.1, 0.0, total_steps=60) == pytest.approx([0.1 * (step + 1) / 100 for step in range(60)])
    assert rates_of(0.0, 0.0, total_steps=60) == pytest.approx([0.1] * 60)


def test_nesterov_and_label_smoothing_reach_the_optimizer_and_the_loss(tmp_path, synthetic_data, monkeypatch):
    seen = []
    real_train = train_mnist.train

    def train_and_look(model, optimizer, scheduler, loader, loss_fn, *args, **kwargs):
        seen.append((optimizer.param_groups[0]["nesterov"], loss_fn.label_smoothing))
        return real_train(model, optimizer, scheduler, loader, loss_fn, *args, **kwargs)

    monkeypatch.setattr(train_mnist, "train", train_and_look)
    run_dir = train_in_process(synthetic_data, tmp_path, "recipe", *QUICK_VALIDATED,
                               "--epochs", "1", "--nesterov",
                        "--label-smoothing", "0.1", "--warmup", "0.3")
    assert seen == [(True, 0.1)]
    config = config_of(run_dir)
    assert (config["nesterov"], config["label_smoothing"], config["warmup"]) == (True, 0.1, 0.3)


def test_momentum_0_is_plain_sgd_beside_points_that_keep_nesterov(tmp_path, synthetic_data, monkeypatch):
    """Nesterov's look-ahead needs momentum (torch's SGD refuses it without): --momentum 0 alone
    turns it off, so a sweep over momentum keeps it on its other points."""
    seen = []
    real_train = train_mnist.train

    def train_and_look(model, optimizer, *args, **kwargs):
        seen.append((optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["nesterov"]))
        return real_train(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_mnist, "train", train_and_look)
    assert train_mnist.main([*QUICK_VALIDATED, "--epochs", "1", "--momentum", "0", "0.9", "--data-dir",
                             str(synthetic_data), "--log-dir", str(tmp_path)]) == 0
    assert sorted(seen) == [(0.0, False), (0.9, True)]
    rows = {float(row["momentum"]): row for row in sweep_table(tmp_path)}
    assert {momentum: row["status"] for momentum, row in rows.items()} == {0.0: "ok", 0.9: "ok"}
    assert config_of(Path(rows[0.0]["run_dir"]))["nesterov"] is False  # as it trained
    assert config_of(Path(rows[0.9]["run_dir"]))["nesterov"] is True


def test_jobs_without_a_sweep_is_refused(capsys):
    """--jobs 2 would not make one run faster: refused, not ignored."""
    assert train_mnist.parse_args(["--jobs", "2", "--lr", "0.05", "0.1"])[0].jobs == 2  # a sweep: taken
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(["--jobs", "2", "--lr", "0.05"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        " error: --jobs runs the points of a sweep at once: give several values of --lr, --batch-size, "
        "--momentum or --epochs (for one run in several processes: torchrun)")


# --- Sweeps in parallel -----------------------------------------------------------------

@pytest.mark.slow
def test_a_parallel_sweep_gives_the_rows_of_a_sequential_one_and_survives_a_failed_point(
        tmp_path, synthetic_data, capsys, monkeypatch):
    grid = ["--lr", "0.05", "1e6", "--batch-size", "32", "64", "--epochs", "1", "--num-embeddings", "0",
            "--val-size", "64", "--device", "cpu", "--data-dir", str(synthetic_data)]
    assert train_mnist.main([*grid, "--log-dir", str(tmp_path / "in turn")]) == 0
    # Forks of a fresh `python train_mnist.py`, as a user runs it.
    forked = run_script(*grid, "--log-dir", str(tmp_path / "forked"), "--jobs", "2")
    assert forked.returncode == 0, forked.stderr
    assert forked.stderr.startswith("=== Sweep of 4 runs, 2 at a time, each reported as it ends. Watch them "
                                    f"learn: tensorboard --logdir {tmp_path / 'forked'}\n")
    assert "=== Sweep run 4/4 (lr=1000000.0, batch_size=64, momentum=0.9, epochs=1): failed: training " \
           "diverged" in forked.stderr and "Traceback" not in forked.stdout + forked.stderr
    # On macOS and Windows, or on a GPU: a new `python train_mnist.py` per point.
    monkeypatch.setattr(train_mnist.sys, "platform", "darwin")
    capsys.readouterr()  # the sweep in turn's output
    start_methods, get_context = [], train_mnist.multiprocessing.get_context
    monkeypatch.setattr(train_mnist.multiprocessing, "get_context",
                        lambda method: start_methods.append(method) or get_context(method))
    assert train_mnist.main([*grid, "--log-dir", str(tmp_path / "new processes"), "--jobs", "2"]) == 0
    out, err = capsys.readouterr()
    assert "=== Sweep run 4/4 (lr=1000000.0" in err and "Traceback" not in out + err
    assert start_methods == ["spawn"]

    sequential = {(row["lr"], row["batch_size"]): row for row in sweep_table(tmp_path / "in turn")}
    for way in ("forked", "new processes"):
        rows = {(row["lr"], row["batch_size"]): row for row in sweep_table(tmp_path / way)}
        assert rows.keys() == sequential.keys() and len(rows) == 4
        for point, row in rows.items():
            if point[0] == "1000000.0":  # diverges: reported, and the other points still ran
                assert row["status"].startswith("failed: training diverged")
                assert sequential[point]["status"] == row["status"]
                continue
            assert row["status"] == "ok" and Path(row["run_dir"]).parent == tmp_path / way
            # One thread each instead of two: the same run, up to float rounding.
            assert float(row["test_accuracy"]) == pytest.approx(float(sequential[point]["test_accuracy"]),
                                                                abs=0.003)


def test_a_sweep_starts_no_more_workers_than_points_and_gives_each_its_share_of_the_cores(
        tmp_path, synthetic_data, monkeypatch):
    class NoPool(Exception):
        pass

    def pool(workers, context, initializer, initargs):
        started.append((workers, initargs))
        raise NoPool

    started = []
    monkeypatch.setattr(train_mnist, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(train_mnist.os, "cpu_count", lambda: 16)
    with pytest.raises(NoPool):
        train_mnist.main([*QUICK_VALIDATED, "--lr", "0.01", "0.02", "--epochs", "1", "--jobs", "8",
                          "--data-dir", str(synthetic_data), "--log-dir", str(tmp_path)])
    assert started == [(2, (8,))]  # 2 points: 2 workers of 8 threads, not 8 workers of 2


@pytest.mark.slow
def test_ctrl_c_stops_every_run_of_a_parallel_sweep_with_its_state_saved(tmp_path, interruptible_data):
    argv = [*INTERRUPTIBLE, "--lr", "0.01", "0.02", "0.03", "--data-dir", str(interruptible_data),
            "--log-dir", str(tmp_path), "--jobs", "2"]
    process = start_script(*argv, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*/checkpoints/last.pt"))) < 2:  # a first epoch of both is saved
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the sweep and its runs
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    rows = {row["lr"]: row for row in sweep_table(tmp_path)}
    assert rows["0.03"]["status"] == "not started"
    for lr in ("0.01", "0.02"):
        assert rows[lr]["status"] == f"stopped: --resume {rows[lr]['run_dir']}"
        state = torch.load(Path(rows[lr]["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
        assert len(state["history"]) < EPOCHS and not (Path(rows[lr]["run_dir"]) / "metrics.json").exists()


def child_processes(pid: int) -> list[int]:
    """The processes that `pid` started (Linux: read from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
def test_a_sweep_worker_killed_outright_is_one_line_and_its_runs_resume(tmp_path, interruptible_data):
    """The out-of-memory killer, or kill -9, ends a --jobs worker at once; the pool then stops the
    others. One line says so, the table lists every point, and each run can be resumed."""
    argv = [*INTERRUPTIBLE, "--lr", "0.01", "0.02", "--data-dir", str(interruptible_data),
            "--log-dir", str(tmp_path), "--jobs", "2"]
    process = start_script(*argv)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*/checkpoints/last.pt"))) < 2:  # a first epoch of both is saved
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(child_processes(process.pid)[0], signal.SIGKILL)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: a worker process of the sweep was killed (out of memory, or kill -9), and the others stopped "
        f"with it; their runs are the folders in {tmp_path} without a metrics.json: --resume each"]
    rows = sweep_table(tmp_path)
    assert [row["status"] for row in rows] == ["not finished: a worker process was killed"] * 2
    run_dirs = [run_dir for run_dir in tmp_path.iterdir() if run_dir.is_dir()]
    assert len(run_dirs) == 2 and not any((run_dir / "metrics.json").exists() for run_dir in run_dirs)
    for run_dir in run_dirs:
        assert train_mnist.main(["--resume", str(run_dir)]) == 0
        assert metrics_of(run_dir)["epochs"] == EPOCHS
