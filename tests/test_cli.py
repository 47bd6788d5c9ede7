import re
from pathlib import Path

import pytest
import torch

import train_mnist
from conftest import run_script


def parse(argv: list[str]):
    args, checkpoint = train_mnist.parse_args(argv)
    assert checkpoint is None
    return args


def test_seed_command_parses():
    args = parse(["--epochs=5", "--lr=1e-3", "--batch_size=64"])
    assert (args.epochs, args.lr, args.batch_size) == ([5], [1e-3], [64])
    assert (args.momentum, args.seed) == (0.9, 1)  # the defaults of flags not given


def test_a_tilde_is_the_home_folder_even_where_the_shell_leaves_it(tmp_path, monkeypatch):
    """Bash expands ~ in `--data-dir ~/data` but not in `--data-dir=~/data`: a folder named ~ in
    the current one would be made, that `rm -rf ~` then takes for the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = parse(["--data-dir=~/data", "--log-dir=~/runs", "--run-name=~"])
    assert (args.data_dir, args.log_dir) == (tmp_path / "data", tmp_path / "runs")
    assert args.run_name == "~"  # a folder inside --log-dir, never the home folder


@pytest.mark.parametrize(("platform", "path", "typed"), [
    ("linux", "runs/lr0.001_bs64", "runs/lr0.001_bs64"),
    ("linux", "My Drive/runs/x", "'My Drive/runs/x'"),
    ("win32", r"runs\lr0.001_bs64", r"runs\lr0.001_bs64"),  # cmd.exe takes single quotes as part of it
    ("win32", r"C:\My Drive\runs\x", r'"C:\My Drive\runs\x"'),
])
def test_a_printed_path_is_quoted_as_the_shell_of_its_os_needs(platform, path, typed, monkeypatch):
    monkeypatch.setattr(train_mnist.sys, "platform", platform)
    assert train_mnist.typed(Path(path)) == typed


def test_both_spellings_of_multi_word_flags():
    underscore = parse(["--batch_size=32", "--test_batch_size=50", "--data_dir=d", "--log_dir=l",
                        "--run_name=r", "--num_embeddings=3", "--lr_decay=0", "--weight_decay=0.1",
                        "--verify_data"])
    hyphen = parse(["--batch-size=32", "--test-batch-size=50", "--data-dir=d", "--log-dir=l",
                    "--run-name=r", "--num-embeddings=3", "--lr-decay=0", "--weight-decay=0.1",
                    "--verify-data"])
    assert vars(underscore) == vars(hyphen)
    assert underscore.batch_size == [32] and underscore.test_batch_size == 50 and underscore.verify_data


def test_help_shows_every_flag_once_with_its_default_once_and_examples_that_parse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    text = " ".join(help_text.split())
    for group in ("training:", "data:", "logging:", "experiments:", "examples:"):
        assert group in text
    for flag, default in (("--epochs N [N ...]", "6"), ("--lr LR [LR ...]", "auto"),
                          ("--batch-size N [N ...]", "128"), ("--momentum MOMENTUM [MOMENTUM ...]", "0.9"),
                          ("--seed SEED", "1"), ("--device DEVICE", "auto"),
                          ("--data-dir DIR", "data"), ("--log-dir DIR", "runs"),
                          ("--nesterov, --no-nesterov", "True"),
                          ("--deterministic, --no-deterministic", "False"),
                          ("--test-batch-size N", "1000")):
        assert text.count(f" {flag} ") == 1, flag  # one spelling: the underscores are said once, below
        assert f"(default: {default})" in text.split(f" {flag} ", 1)[1].split(" --", 1)[0], flag
    assert "[6]" not in text and "--batch_size N" not in text  # a sweep flag's default is one value
    examples = [line.split("    ")[0].split() for line in help_text.split("examples:")[1].splitlines()
                if line.startswith("  python train_mnist.py")]
    assert len(examples) == 5
    parser = train_mnist.build_parser()
    for command in examples:  # each example is a valid command line
        parser.parse_args(train_mnist.with_dashes(command[2:]))


@pytest.mark.parametrize(("argv", "differences"), [
    ([], "default"),
    (["--epochs=5", "--lr=1e-3", "--batch_size=64"], "lr0.001_bs64_ep5"),
    (["--no-nesterov", "--seed", "2", "--deterministic", "--momentum", "0.5"], "mom0.5_nonesterov_seed2_det"),
    (["--batch-size", "32"], "bs32"),  # its rate, 0.025, is the default for that batch
    (["--batch-size", "32", "--lr", "0.1"], "lr0.1_bs32"),
    (["--momentum", "0"], "mom0"),  # without momentum, no Nesterov: the default for it
], ids=["defaults", "course", "switches", "small batch", "small batch at 0.1", "no momentum"])
def test_a_run_is_named_by_what_differs_from_the_defaults_then_the_time(argv, differences, tmp_path):
    one_run = train_mnist.single_values(parse([*argv, "--log-dir", str(tmp_path)]))
    name = train_mnist.make_run_dir(one_run).name
    assert re.fullmatch(re.escape(differences) + r"_\d{4}-\d{6}", name), name


def test_without_lr_the_rate_is_0_1_scaled_down_for_a_global_batch_under_128(monkeypatch):
    for argv, lr in (([], 0.1), (["--batch-size", "32"], 0.025),
                     (["--batch-size", "64", "--lr", "auto"], 0.05),
                     (["--batch_size", "512"], 0.1), (["--batch-size", "32", "--lr", "0.1"], 0.1)):
        assert train_mnist.single_values(parse(argv)).lr == pytest.approx(lr), argv
    monkeypatch.setattr(train_mnist, "WORLD_SIZE", 2)  # under torchrun: the batches of both processes
    assert train_mnist.single_values(parse(["--batch-size", "32"])).lr == pytest.approx(0.05)
    assert train_mnist.single_values(parse(["--batch-size", "64"])).lr == pytest.approx(0.1)


BAD_FLAGS = [
    ["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "2.5"], ["--epochs", "x"],
    ["--lr", "0"], ["--lr", "-0.1"], ["--lr", "nan"], ["--lr", "inf"],
    ["--batch_size", "0"], ["--test-batch-size", "0"],
    ["--momentum", "1"], ["--momentum", "-0.5"], ["--momentum", "nan"],
    ["--num-embeddings", "-1"], ["--device", "tpu"], ["--lr-decay", "1.5"],
]


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=" ".join)
def test_bad_values_are_refused_with_a_usage_error_naming_flag_and_value(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    last_line = error.strip().splitlines()[-1].replace("_", "-")
    flag, value = flags
    # argparse's own line: "...: error: argument --batch-size/--batch-size: '0' must be ..."
    assert f"error: argument {flag.replace('_', '-')}" in last_line
    assert f"'{value}'" in last_line


DASHES = "type '--' where it shows a dash (–): a text editor turned the two into one; "


@pytest.mark.parametrize(("argv", "unknown", "hint"), [
    (["--epoch", "5"], "--epoch 5", "did you mean --epochs? "),
    (["--batch_sise=64"], "--batch-sise=64", "did you mean --batch-size? "),
    (["-lr", "0.1"], "-lr 0.1", "did you mean --lr? "),
    (["--bs", "64"], "--bs 64", ""),  # nothing close: no guess that would mislead
    (["--seed", "1", "5"], "5", ""),
    (["–epochs=5", "–lr=1e-3", "–batch_size=64"], "–epochs=5 –lr=1e-3 –batch_size=64", DASHES),
    (["—epochs", "5"], "—epochs 5", DASHES),
], ids=["--epoch", "--batch_sise", "-lr", "--bs", "a stray value", "en dashes", "an em dash"])
def test_an_unknown_flag_is_a_usage_error_naming_the_closest_flag(argv, unknown, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith(f"error: unrecognized arguments: {unknown}; {hint}--help lists every flag")


def test_missing_cuda_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        parse(["--device", "cuda:0"])
    assert exit_info.value.code == 2
    assert "argument --device: this machine has no usable CUDA" in capsys.readouterr().err


@pytest.fixture
def two_gpus(monkeypatch) -> None:
    """torch's CUDA queries answer as on a machine with two GPUs (this one may have none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize(("name", "device"), [("cuda", "cuda"), ("cuda:0", "cuda:0"), ("cuda:1", "cuda:1")])
def test_a_gpu_is_named_as_torch_names_it(two_gpus, name, device):
    assert parse(["--device", name]).device == torch.device(device)


@pytest.mark.parametrize(("name", "error"), [
    ("cuda:2", "this machine has no cuda:2: its GPUs are cuda:0 to cuda:1"),
    ("cuda:x", "'cuda:x' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda:", "'cuda:' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda:01", "'cuda:01' is not one of auto, cpu, cuda, cuda:N, mps"),  # torch.device refuses it too
    ("cpu:0", "'cpu:0' is not one of auto, cpu, cuda, cuda:N, mps"),
])
def test_a_gpu_this_machine_lacks_is_a_usage_error(two_gpus, capsys, name, error):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--device", name])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"argument --device: {error}")


def test_parsed_flags_are_not_changed_afterwards(tmp_path, synthetic_data):
    argv = ["--epochs", "1", "--num-embeddings", "0", "--device", "cpu", "--val-size", "32", "--data-dir",
            str(synthetic_data), "--log-dir", str(tmp_path)]
    args = parse(argv)
    before = dict(vars(args))
    assert train_mnist.run(train_mnist.single_values(args), torch.device("cpu")) is not None
    assert vars(args) == before
    assert isinstance(args.device, torch.device) and args.device.type == "cpu"


@pytest.mark.slow
def test_bad_flag_in_a_real_process_leaves_no_run_dir(tmp_path):
    result = run_script("--lr", "nan", "--log-dir", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "argument --lr: 'nan' must be a finite number in (0, inf)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
