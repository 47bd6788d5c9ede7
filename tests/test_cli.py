import subprocess
import sys

import pytest
import torch

import train_mnist
from conftest import REPO


def test_seed_command_parses():
    args = train_mnist.parse_args(["--epochs=5", "--lr=1e-3", "--batch_size=64"])
    assert (args.epochs, args.lr, args.batch_size) == ([5], [1e-3], [64])


def test_both_spellings_of_multi_word_flags():
    underscore = train_mnist.parse_args(
        ["--batch_size=32", "--test_batch_size=50", "--data_dir=d", "--log_dir=l", "--run_name=r",
         "--num_embeddings=3", "--lr_decay=0"])
    hyphen = train_mnist.parse_args(
        ["--batch-size=32", "--test-batch-size=50", "--data-dir=d", "--log-dir=l", "--run-name=r",
         "--num-embeddings=3", "--lr-decay=0"])
    assert vars(underscore) == vars(hyphen)
    assert underscore.batch_size == [32] and underscore.test_batch_size == 50


def test_help_shows_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--epochs", "--lr", "--batch_size", "--momentum", "--seed", "--device", "--data-dir",
                 "--log-dir", "--run-name", "--test-batch-size", "--num-embeddings"):
        assert flag in text
    assert text.count("(default:") >= 12


BAD_FLAGS = [
    ["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "2.5"], ["--epochs", "x"],
    ["--lr", "0"], ["--lr", "-0.1"], ["--lr", "nan"], ["--lr", "inf"],
    ["--batch_size", "0"], ["--test-batch-size", "0"],
    ["--momentum", "1"], ["--momentum", "-0.5"], ["--momentum", "nan"],
    ["--num-embeddings", "-1"], ["--device", "tpu"], ["--lr-decay", "1.5"],
]


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=lambda flags: " ".join(flags))
def test_bad_values_are_refused_with_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert flags[0].lstrip("-").replace("-", "_").split("_")[0] in error
    assert "Traceback" not in error


def test_missing_cuda_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        train_mnist.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no usable CUDA" in capsys.readouterr().err


def test_bad_flag_in_a_real_process_leaves_no_run_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train_mnist.py"), "--lr", "nan", "--log-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "--lr" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
