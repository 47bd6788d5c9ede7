"""Train a small CNN on MNIST and watch it learn in TensorBoard.

    python train_mnist.py --epochs=5 --lr=1e-3 --batch_size=64
    tensorboard --logdir runs

The recipe comes first, in the order it runs: parse the flags; load MNIST onto the device; train
one epoch at a time, scoring each on held-out validation digits and saving a checkpoint; test
once; log it all to one TensorBoard run folder. The machinery follows, one section per concern.
"""

import os
import signal
import sys

if sys.version_info < (3, 10):  # 3.9 would stop at a type hint below (dict | None) with a TypeError
    sys.exit(f"error: train_mnist.py needs Python 3.10 or later, and this is {sys.version.split()[0]}")

if __name__ == "__main__":
    # A Ctrl-C while the libraries load has nothing to save: one line, not a traceback.
    def stop_during_start_up(signum: int, _frame: object) -> None:
        print(f"\nStopped by {signal.Signals(signum).name}; nothing was in progress.", file=sys.stderr)
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop_during_start_up)
    signal.signal(signal.SIGTERM, stop_during_start_up)

import argparse
import contextlib
import csv
import datetime
import difflib
import errno
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import re
import shlex
import subprocess
import threading
import time
import warnings
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from filelock import FileLock, Timeout
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from models import MNISTNet

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the training pixels scaled to [0, 1]
LOSS_EVERY = 50  # steps between two reads of the loss, for the progress bar and divergence

# torchrun starts one copy of this script per process and tells each its RANK among WORLD_SIZE;
# a plain `python train_mnist.py` is process 0 of 1.
DISTRIBUTED = "RANK" in os.environ and "WORLD_SIZE" in os.environ
RANK = int(os.environ["RANK"]) if DISTRIBUTED else 0
WORLD_SIZE = int(os.environ["WORLD_SIZE"]) if DISTRIBUTED else 1
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))  # this process's number on its machine
MAIN_PROCESS = RANK == 0  # process 0 alone prints, logs to TensorBoard and writes files


# ========================================================================================
# The recipe
# ========================================================================================

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(usage="%(prog)s [flags]", description=__doc__.split("\n")[0],
                                     epilog=EXAMPLES, formatter_class=HelpFormatter, allow_abbrev=False,
                                     exit_on_error=False)  # so that stored_flags() can check stored flags too
    add = parser.add_argument_group("training").add_argument
    add("--epochs", type=bounded(int, 1), nargs="+", default=6, metavar="N", help="passes over the data")
    add("--lr", type=learning_rate, nargs="+", default="auto", help="peak learning rate; auto: 0.1, or "
        "0.1 x batch size / 128 for a batch under 128")
    add("--batch-size", type=bounded(int, 1), nargs="+", default=128, metavar="N", help="images per step")
    add("--momentum", type=bounded(float, 0, 1, open_high=True), nargs="+", default=0.9, help="SGD momentum")
    add("--weight-decay", type=bounded(float, 0), default=5e-4, help="SGD weight decay (L2 penalty)")
    add("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum (if any)")
    add("--label-smoothing", type=bounded(float, 0, 1), default=0.0, help="share of a target spread over all")
    add("--warmup", type=bounded(float, 0, 1), default=0.1, help="share of the steps where the rate rises")
    add("--lr-decay", type=bounded(float, 0, 1), default=0.5, help="share of the steps where the rate falls")
    add("--seed", type=bounded(int, 0, 2**64 - 1), default=1, help="seed of the weights and the batch order")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=False, help="repeatable on GPUs")
    add("--device", type=available_device, default="auto", help="auto (the fastest), cpu, cuda[:N] or mps")
    add("--patience", type=bounded(int, 0), default=0, metavar="K", help="stop after K epochs without gain")
    add("--test-batch-size", type=bounded(int, 1), default=1000, metavar="N", help="images per test batch")
    add = parser.add_argument_group("data").add_argument
    add("--data-dir", type=path_flag, default=Path("data"), metavar="DIR", help="folder of MNIST/raw/")
    add("--val-size", type=bounded(int, 0), default=5000, metavar="N", help="training images held out to "
        "score each epoch (0: the test set scores it)")
    add("--verify-data", action=argparse.BooleanOptionalAction, default=False, help="check the files' MD5s")
    add = parser.add_argument_group("logging").add_argument
    add("--log-dir", type=path_flag, default=Path("runs"), metavar="DIR", help="TensorBoard's folder")
    add("--run-name", type=folder_name, metavar="NAME", help="this run's folder (None: its flags and time)")
    add("--num-embeddings", type=bounded(int, 0), default=256, metavar="N", help="digits in the projector")
    add = parser.add_argument_group("experiments").add_argument
    add("--resume", type=path_flag, metavar="PATH", help="continue a run (its folder, or a checkpoint in it)")
    add("--jobs", type=bounded(int, 1), default=1, metavar="N", help="points of a sweep run at once")
    add("--evaluate", type=path_flag, metavar="PATH", help="only test a checkpoint or a run")
    add = parser.add_argument_group("predict your own images").add_argument
    add("--predict", type=path_flag, nargs="+", metavar="IMG", help="images (or folders) to read as digits")
    add("--checkpoint", type=path_flag, metavar="PATH", help="the model for --predict (or a run)")
    add("--save-inputs", type=path_flag, metavar="DIR", help="also save each image as the model saw it")
    return parser


class Split(NamedTuple):
    raw: torch.Tensor  # uint8 digits (N, 28, 28) on the host, for pictures
    images: torch.Tensor  # normalized float (N, 1, 28, 28) on the device
    labels: torch.Tensor  # int64 (N,) on the device


def load_split(data_dir: Path, train: bool, device: torch.device, verify: bool = False) -> Split:
    """The training or the test split, read once: torchvision downloads, checks and reads the files."""
    MNIST = import_mnist()  # torchvision's dataset, imported here, where it is needed: --help stays fast
    with main_process_first():  # under torchrun only process 0 downloads; the others wait for it
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its download messages; ours is one line
                mnist = MNIST(data_dir, train=train, download=download_needed(data_dir))
        except (RuntimeError, AssertionError, ValueError, TypeError, OSError) as error:
            raise data_error(error, data_dir, train) from None
    check_split(mnist.data, mnist.targets, data_dir, train, verify)
    return Split(mnist.data, normalize(mnist.data.to(device)), mnist.targets.to(device))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 digits (N, 28, 28) -> float (N, 1, 28, 28) with the training set's mean and std."""
    return images.unsqueeze(1).float().div(255).sub(MNIST_MEAN).div(MNIST_STD)


class DeviceLoader:
    """Mini-batches indexed out of tensors already on the device: no workers, no per-sample
    transforms (about 3x faster than a DataLoader here). A shuffled epoch's order is seeded by
    (seed, epoch); under torchrun process RANK takes every WORLD_SIZE-th sample of it."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool = False, seed: int = 0) -> None:
        self.images, self.labels, self.batch_size = split.images, split.labels, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        if not self.shuffle:  # evaluation: every process scores the whole set
            return torch.arange(len(self.labels))
        generator = torch.Generator().manual_seed((self.seed * 100_000 + self.epoch) % 2**64)
        order = torch.randperm(len(self.labels), generator=generator)
        order = torch.cat([order, order[:-len(order) % WORLD_SIZE]])  # padded: as many steps in each process
        return order[RANK::WORLD_SIZE]

    def __len__(self) -> int:
        return math.ceil(len(self.order()) / self.batch_size)

    def __iter__(self):
        order = self.order().to(self.labels.device)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.images[batch], self.labels[batch]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, loader: DeviceLoader,
          loss_fn: torch.nn.Module, title: str) -> tuple[list[float], list[float]]:
    """Train one epoch; return each step's loss (averaged over processes) and learning rate.
    Ends early if the loss is no longer finite: run() then reports the divergence."""
    model.train()
    # The losses stay on the device, read every LOSS_EVERY steps: a GPU would wait for an .item().
    step_losses, step_lrs = torch.zeros(len(loader), device=loader.labels.device), []
    # The bar is moved by hand: wrapped around the loader, its generator's cleanup could swallow a Ctrl-C.
    with tqdm(total=len(loader), desc=title, unit="batch", dynamic_ncols=True,
              disable=not MAIN_PROCESS) as bar:
        for step, (images, labels) in enumerate(loader):
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step_lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            step_losses[step] = loss.detach()
            bar.update()
            if step % LOSS_EVERY == LOSS_EVERY - 1:
                recent_loss = mean_over_processes(step_losses[step + 1 - LOSS_EVERY:step + 1].mean()).item()
                bar.set_postfix(loss=f"{recent_loss:.4f}")
                if not math.isfinite(recent_loss):
                    break
    return mean_over_processes(step_losses[:len(step_lrs)]).tolist(), step_lrs


class Evaluation(NamedTuple):
    loss: float
    accuracy: float
    logits: torch.Tensor  # (N, 10): the figures are drawn from them
    labels: torch.Tensor


@torch.no_grad()
def test(model: torch.nn.Module, loader: DeviceLoader) -> Evaluation:
    """Mean cross-entropy and accuracy over a whole evaluation set."""
    model.eval()
    logits = torch.cat([model(images) for images, _ in loader])
    accuracy = (logits.argmax(dim=1) == loader.labels).sum().item() / len(loader.labels)
    return Evaluation(F.cross_entropy(logits, loader.labels).item(), accuracy, logits, loader.labels)


def run(args: argparse.Namespace, device: torch.device, checkpoint: dict | None = None) -> dict | None:
    """One training run, new or resumed from `checkpoint`; returns its final metrics on process 0.
    `args` holds single values: a sweep calls run() once per point of its grid."""
    train_set = load_split(args.data_dir, True, device, args.verify_data)
    test_set = load_split(args.data_dir, False, device, args.verify_data)
    train_set, validation_set = hold_out(train_set, args.val_size)
    # Each epoch is scored on the validation set, which chooses best.pt (without one: the test set).
    monitor, monitored = ("validation", validation_set) if validation_set else ("test", test_set)
    train_loader = DeviceLoader(train_set, args.batch_size, shuffle=True, seed=args.seed)
    set_determinism(args.deterministic)
    torch.manual_seed(args.seed)
    model_without_ddp = MNISTNet().to(device)
    optimizer = torch.optim.SGD(model_without_ddp.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.nesterov, weight_decay=args.weight_decay)
    state = resume(checkpoint, model_without_ddp, optimizer, args) if checkpoint else new_state(args)
    history = state["history"]  # a record per epoch done
    step = history[-1]["step"] if history else 0  # optimizer steps taken: the x-axis of every curve
    scheduler = make_scheduler(optimizer, args.warmup, args.lr_decay,
                               step + (args.epochs - len(history)) * len(train_loader), start_step=step)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    # Under torchrun, DDP averages the gradients of all processes in backward().
    model = DistributedDataParallel(model_without_ddp) if DISTRIBUTED else model_without_ddp

    # Process 0's SummaryWriters (None elsewhere): the run's, and the sub-runs "train" and `monitor`.
    with open_run(state, step, monitor) as (writer, curves), out_of_memory_explained(device, args):
        if writer and not history:
            log_start(writer, model_without_ddp, train_set, state["config"])
        for epoch in range(len(history) + 1, args.epochs + 1):
            train_loader.set_epoch(epoch)
            started = time.perf_counter()
            step_losses, step_lrs = train(model, optimizer, scheduler, train_loader, loss_fn,
                                          title=f"Epoch {epoch}/{args.epochs}")
            seconds = time.perf_counter() - started
            step += len(step_losses)
            evaluation = test(model_without_ddp, DeviceLoader(monitored, args.test_batch_size))
            stop_if_diverged_or_collapsed(model_without_ddp, step_losses, evaluation, epoch, args.lr)
            history.append({"epoch": epoch, "step": step, "train_loss": sum(step_losses) / len(step_losses),
                            f"{monitor}_loss": evaluation.loss, f"{monitor}_accuracy": evaluation.accuracy,
                            "seconds": seconds})
            if writer:
                log_epoch(writer, curves, model_without_ddp, history[-1], evaluation, step_losses, step_lrs,
                          monitor)
            save_checkpoint(state, model_without_ddp, optimizer, monitor)  # last.pt, and best.pt if better
            if out_of_patience(history, args.patience, monitor):
                break

        # The test set, once, on the weights validation chose (without validation, the last ones).
        tested = model_without_ddp
        if validation_set is not None:
            tested = MNISTNet().to(device)
            tested.load_state_dict(state["best_model"])
        evaluation = test(tested, DeviceLoader(test_set, args.test_batch_size))
        return log_results(writer, tested, state, evaluation, train_set, test_set) if writer else None


def main(argv: list[str] | None = None) -> int:
    """Train one run or a sweep of runs, test a checkpoint or read images; returns the exit code."""
    handlers = stop_at_signals(stop_now)  # until main() returns: Ctrl-C stops at once, in one line
    try:
        args, checkpoint = parse_args(argv)
        device = start_distributed(args.device)
        if args.evaluate:
            evaluate(checkpoint, args, device)
        elif args.predict:
            return predict(args.predict, checkpoint, device, args.save_inputs)
        elif is_sweep(args):
            sweep(args, device)
        else:
            run(single_values(args), device, checkpoint)
    except UserError as error:
        report(f"error: {error}", every_node=True)
        return 1
    except PermissionError as error:  # a file or folder this user may not open, wherever it was met
        report(f"error: {error.filename}: {error.strerror}; fix its permissions, or give another path",
               every_node=True)
        return 1
    except Stopped as stopped:
        report(stopped.message())
        return 128 + stopped.signum
    finally:
        stop_at_signals(handlers)
        if DISTRIBUTED and dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ========================================================================================
# Supporting machinery
# ========================================================================================

# --- Flags: checked numbers, either spelling, argparse's help, a resumed run's flags ----

EXAMPLES = """examples:
  python train_mnist.py --epochs=5 --lr=1e-3 --batch_size=64    the course's command: about 97.7%
  python train_mnist.py                                         the defaults: about 99.3% in 6 epochs
  python train_mnist.py --lr 0.05 0.1 --batch-size 64 128 --jobs 2    a sweep of 4 runs, 2 at a time
  python train_mnist.py --resume runs/NAME      continue a run from its last saved epoch, or train it longer
  python train_mnist.py --evaluate runs/NAME    test the weights that a run chose
  torchrun --standalone --nproc_per_node=2 train_mnist.py       one run in 2 processes
  tensorboard --logdir runs                                     then open http://localhost:6006

Every flag takes dashes or underscores: --batch-size or --batch_size."""
NAME_MAX = 255  # bytes in one file or folder name, on the usual filesystems
SWEEP_FLAGS = ("lr", "batch_size", "momentum", "epochs")  # several values of these run a grid


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """argparse's own formats: the examples as written, and each flag's default."""


def bounded(kind: type, low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False):
    """argparse type: a finite number of `kind` from `low` to `high`, each included unless open."""
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high or high == math.inf else ']'}"
    what = "a whole number" if kind is int else "a finite number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and (low < value if open_low else low <= value)
                and (value < high if open_high else value <= high)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {what} in {interval}")
        return value

    return parse


def learning_rate(text: str) -> float | None:
    """--lr: a number above 0, or auto (None until single_values() sets it for the run's batch)."""
    return None if text == "auto" else bounded(float, 0, open_low=True)(text)


def folder_name(text: str) -> str:
    """--run-name: one folder inside --log-dir, never a path that leaves it."""
    if text in ("", ".", "..") or Path(text).name != text or "\\" in text:
        raise argparse.ArgumentTypeError(f"{text!r} must be a folder name, without '/' and not '.' or '..'")
    path_flag(text)  # its checks; a run named ~ stays in --log-dir
    return text


def path_flag(text: str) -> Path:
    """A file or folder, ~ as the home folder: a shell leaves the ~ of --data-dir=~/data as typed."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a folder or file, '.' for the current folder")
    if any(len(os.fsencode(part)) > NAME_MAX for part in Path(text).parts):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}... has a name too long: at most {NAME_MAX} bytes")
    return Path(os.path.expanduser(text))


def typed(path: Path) -> str:
    """A path as it is typed in a command that we print: quoted if a shell would split it, in
    Windows' own way there (double quotes; cmd.exe takes single quotes as part of the path)."""
    if sys.platform == "win32":
        return subprocess.list2cmdline([str(path)])
    return shlex.quote(str(path))


def available_device(name: str) -> torch.device:
    """--device: auto, cpu, cuda (cuda:N, the GPU of index N) or mps, if this machine has it."""
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:(0|[1-9][0-9]*))?", name):  # as torch.device reads them
        raise argparse.ArgumentTypeError(f"{name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    device = torch.device(name)
    kind = device.type
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not has_mps):
        raise argparse.ArgumentTypeError(f"this machine has no usable {kind.upper()}; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"this machine has no {name}: its GPUs are cuda:0 to "
                                         f"cuda:{torch.cuda.device_count() - 1}")
    return device


def with_dashes(argv: list[str]) -> list[str]:
    """--batch_size=64 as --batch-size=64: the course's spelling, and the one --help shows."""
    spelled = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        spelled.append(flag.replace("_", "-") + equals + value if arg.startswith("--") else arg)
    return spelled


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict | None]:
    """The flags, and the checkpoint that --resume, --evaluate or --predict names (None without
    them): a resumed or evaluated run's stored flags are the defaults of those not given again."""
    parser, argv = build_parser(), with_dashes(sys.argv[1:] if argv is None else argv)
    args = parse_or_exit(parser, argv)
    checkpoint = named_checkpoint(parser, args)
    if checkpoint and not args.predict:
        parser.set_defaults(**stored_flags(parser, checkpoint))
        args = parse_or_exit(parser, argv)
    refuse_combinations(parser, args, checkpoint)
    return args, checkpoint


def parse_or_exit(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:  # exit_on_error=False, so that stored_flags() can check a checkpoint's flags too
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as error:
        parser.error(str(error))
    if unknown:  # most often a misspelled flag: name the closest one
        if any(arg.startswith(("–", "—")) for arg in unknown):  # a command copied from slides or a document
            hint = "type '--' where it shows a dash (–): a text editor turned the two into one; "
        else:
            flags = [f"--{key.replace('_', '-')}" for key in vars(args)]
            typo = next((arg.partition("=")[0] for arg in unknown if arg.startswith("-")), "")
            # Close enough that --epoch finds --epochs, and --batchsize --batch-size, but --bs not --jobs.
            closest = difflib.get_close_matches(typo, flags, n=1, cutoff=0.82)
            hint = f"did you mean {closest[0]}? " if closest else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}; {hint}--help lists every flag")
    return args


def named_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict | None:
    """The checkpoint of --resume, --evaluate (a run folder: the weights it tested) or --predict."""
    if sum(map(bool, (args.resume, args.evaluate, args.predict))) > 1:
        parser.error("--resume, --evaluate and --predict exclude each other")
    if args.predict and not args.checkpoint:
        parser.error("--predict needs --checkpoint, the model that reads the images: a run, e.g. runs/NAME")
    if (args.checkpoint or args.save_inputs) and not args.predict:
        parser.error("--checkpoint and --save-inputs go with --predict (to test a run: --evaluate runs/NAME)")
    if args.predict:
        return load_checkpoint(args.checkpoint, args.log_dir, in_run_dir="best.pt")
    if args.evaluate:
        checkpoint = load_checkpoint(args.evaluate, args.log_dir)
        if args.evaluate.is_dir() and checkpoint["config"].get("val_size"):  # the weights it tested
            checkpoint = load_checkpoint(args.evaluate, args.log_dir, in_run_dir="best.pt")
        return checkpoint
    return load_checkpoint(args.resume, args.log_dir) if args.resume else None


def refuse_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace, checkpoint: dict) -> None:
    """--jobs without a sweep; and on --resume, which honours every flag given again, the flags
    that would make it another run."""
    if args.jobs > 1 and not is_sweep(args):  # one run is never split across processes by --jobs
        parser.error("--jobs runs the points of a sweep at once: give several values of --lr, --batch-size, "
                     "--momentum or --epochs (for one run in several processes: torchrun)")
    if not args.resume:
        return
    if is_sweep(args):
        parser.error("--resume continues one run: give single values for " + ", ".join(SWEEP_FLAGS))
    for key, why in (("val_size", "it chose the training images"), ("seed", "it chose the initial weights")):
        if getattr(args, key) != checkpoint["config"].get(key, getattr(args, key)):
            parser.error(f"--{key.replace('_', '-')} cannot change on --resume: {why}; start a new run")
    run_dir = checkpoint["path"].parent.parent  # <run>/checkpoints/<name>.pt
    if args.run_name not in (None, run_dir.name):
        parser.error(f"--run-name cannot rename a run on --resume: it goes on in {run_dir}")


def as_list(value: object) -> list:
    return value if isinstance(value, list) else [value]


def is_sweep(args: argparse.Namespace) -> bool:
    """Several values of a SWEEP_FLAGS flag make a grid of runs."""
    return any(len(as_list(getattr(args, key))) > 1 for key in SWEEP_FLAGS)


def single_values(args: argparse.Namespace) -> argparse.Namespace:
    """One run's flags: a single value of each SWEEP_FLAGS flag, --lr, if not given, for its batch,
    and Nesterov only with momentum: --momentum 0 is plain SGD."""
    run_args = argparse.Namespace(**vars(args) | {key: as_list(getattr(args, key))[0] for key in SWEEP_FLAGS})
    run_args.lr = run_args.lr or default_lr(run_args.batch_size)
    run_args.nesterov = run_args.nesterov and run_args.momentum > 0
    return run_args


# --- Data files: what torchvision leaves unchecked, and one clear line for what fails -----

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")  # in <--data-dir>/MNIST/raw/
MNIST_MD5 = dict(zip(MNIST_FILES, ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
                                   "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637")))
REFETCH = "delete it to download it again, or fix --data-dir"
VALIDATION_SEED = 0  # chooses the --val-size held-out images: the same ones for every run


class UserError(Exception):
    """Something the user can fix: main() prints it as one line and exits with code 1."""


def import_mnist() -> type:
    """torchvision.datasets.MNIST; a torchvision built for another torch (PyPI's, beside torch's
    CPU-only build) fails as it loads: one line that says how to install the pair."""
    try:
        from torchvision.datasets import MNIST
    except (ImportError, OSError, RuntimeError) as error:
        raise UserError(f"torchvision does not load beside torch {torch.__version__} ({error}): install the "
                        "two together, from the same index, as the README's Install shows") from None
    return MNIST


def raw_folder(data_dir: Path) -> Path:
    """Where torchvision's MNIST keeps the four files under --data-dir."""
    return data_dir / "MNIST" / "raw"


def split_files(data_dir: Path, train: bool) -> tuple[Path, Path]:
    """The images file and the labels file of the training or the test split."""
    names = MNIST_FILES[:2] if train else MNIST_FILES[2:]
    return raw_folder(data_dir) / names[0], raw_folder(data_dir) / names[1]


def missing_files(data_dir: Path) -> list[str]:
    return [name for name in MNIST_FILES if not (raw_folder(data_dir) / name).is_file()]


def download_needed(data_dir: Path) -> bool:
    """Whether torchvision has files to download; a --data-dir one level off, or a folder where a
    file belongs, is refused first."""
    missing = missing_files(data_dir)
    if not missing:
        return False
    for name in missing:  # a folder counts as missing: Kaggle's copy has each file inside one of its name
        if (raw_folder(data_dir) / name).is_dir():
            raise UserError(f"{raw_folder(data_dir) / name} is a folder, where MNIST's file of that name "
                            "belongs: put the file itself there, uncompressed")
    for folder in (data_dir, data_dir / "raw"):  # --data-dir naming MNIST/raw/ itself, or MNIST/
        if all((folder / name).is_file() for name in MNIST_FILES):
            if folder.parts[-2:] == ("MNIST", "raw"):
                fix = f"give --data-dir {typed(folder.parent.parent)}"
            else:
                fix = f"move them into {raw_folder(data_dir)}"
            raise UserError(f"the MNIST files are in {folder}, but --data-dir should name the folder that "
                            f"holds MNIST/raw/: {fix}")
    if MAIN_PROCESS:
        print(f"Downloading MNIST into {raw_folder(data_dir)}", file=sys.stderr)
    return True


def data_error(error: Exception, data_dir: Path, train: bool) -> UserError:
    """What went wrong with the MNIST files, in one line: which are missing, or which is damaged."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw_dir, missing = raw_folder(data_dir), missing_files(data_dir)
    if missing:  # torchvision's message ends with what its last mirror answered
        answer = (str(error).strip().splitlines() or ["no answer"])[-1].strip("<>")
        # Files of other names: a copy renamed on the way (Kaggle's has train-images.idx3-ubyte), or
        # compressed, in MNIST/raw/ or in --data-dir itself.
        strays = [path for path in raw_dir.glob("*") if path.name not in MNIST_FILES]
        strays += data_dir.glob("*ubyte*")  # the files unzipped straight into --data-dir
        names = sorted(str(path.relative_to(data_dir)) for path in strays)
        there = f" (other files in {data_dir}: {', '.join(names)})" if names else ""
        return UserError(f"{', '.join(missing)} missing from {raw_dir}{there}, and the download failed "
                         f"({answer}). Put the file{'s' * (len(missing) > 1)} there (uncompressed), or point "
                         "--data-dir at the folder that holds MNIST/raw/")
    for path, read in zip(split_files(data_dir, train), (read_image_file, read_label_file)):
        try:  # torchvision's reader names no file: ask each
            read(str(path))
        except OSError as reading_error:  # e.g. no permission to read it
            return UserError(f"{path} cannot be read ({reading_error.strerror}); {REFETCH}")
        except (RuntimeError, AssertionError, ValueError, TypeError) as reading_error:
            reason = str(reading_error).split("\n")[0] or "a wrong header"
            return UserError(f"{path} cannot be read: it is truncated, empty or not an MNIST file "
                             f"({reason}); {REFETCH}")
    return UserError(f"cannot read MNIST in {raw_dir}: {str(error).splitlines()[0]}; {REFETCH}")


def check_split(images: torch.Tensor, labels: torch.Tensor, data_dir: Path, train: bool,
                verify: bool) -> None:
    """The digits' size and their count, and with --verify-data the published checksums."""
    images_file, labels_file = split_files(data_dir, train)
    if images.shape[1:] != (28, 28):
        raise UserError(f"{images_file} holds {images.shape[1]}x{images.shape[2]} images, not 28x28; "
                        f"{REFETCH}")
    if len(images) != len(labels):
        raise UserError(f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} "
                        "labels; delete both to download them again, or fix --data-dir")
    for path in (images_file, labels_file) if verify else ():
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != MNIST_MD5[path.name]:
            raise UserError(f"{path} does not match the published MNIST file (md5 {digest}, expected "
                            f"{MNIST_MD5[path.name]}); {REFETCH}")


# --- Training: the validation split, the schedule, divergence, memory, determinism ---------


def hold_out(train_set: Split, count: int) -> tuple[Split, Split | None]:
    """(training, validation): `count` training images held out, the same ones in every run,
    chosen by VALIDATION_SEED alone. No validation set when `count` is 0."""
    if count == 0:
        return train_set, None
    if count >= len(train_set.labels):
        raise UserError(f"--val-size {count} leaves none of the {len(train_set.labels)} training images to "
                        "train on; give a smaller --val-size")
    order = torch.randperm(len(train_set.labels), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return subset(train_set, order[count:].sort().values), subset(train_set, order[:count].sort().values)


def subset(split: Split, indices: torch.Tensor) -> Split:
    on_device = indices.to(split.labels.device)
    return Split(split.raw[indices], split.images[on_device], split.labels[on_device])


# 0.1 suits batches of 128. A smaller batch gives noisier gradients: at batch 32, 0.1 made 4 of 5
# six-epoch runs collapse (one output for every image), where 0.025 gave 99.27% to 99.39%.
DEFAULT_LR, DEFAULT_BATCH = 0.1, 128


def default_lr(batch_size: int) -> float:
    """--lr when none is given: 0.1, scaled down in proportion for a global batch (all processes'
    together: DDP averages their gradients) under 128, as the linear scaling rule has it."""
    return DEFAULT_LR * min(batch_size * WORLD_SIZE, DEFAULT_BATCH) / DEFAULT_BATCH


# Rising faster to --lr 0.1, 13 of 40 one-epoch runs (batches of 128 to 1,024) ended below 50%
# accuracy, most at 11%: too large a step had switched off every ReLU of conv2 for good.
MIN_WARMUP_STEPS = 100


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: float, decay: float, total_steps: int,
                   start_step: int = 0) -> LambdaLR:
    """Rise linearly from 0 to --lr over the first `warmup` share of the steps (at least
    MIN_WARMUP_STEPS of them), hold, then fall linearly to 0 over the last `decay` share: the
    warm-up lets a high rate start without blowing up or switching off a layer's ReLUs, the decay
    settles the weights. A function of the step alone, so a resumed run starts at `start_step`."""
    def factor(step: int) -> float:
        rise = min(1.0, (step + 1) / max(warmup * total_steps, MIN_WARMUP_STEPS)) if warmup else 1.0
        fall = min(1.0, max(0.0, total_steps - step) / (decay * total_steps)) if decay else 1.0
        return min(rise, fall)

    return LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def stop_if_diverged_or_collapsed(net: MNISTNet, step_losses: list[float], evaluation: Evaluation,
                                  epoch: int, lr: float) -> None:
    """A loss or weights no longer finite end the run, before a checkpoint keeps them. Squared
    too: weights whose squares overflow have diverged as surely as infinite ones. So does one
    output for every image: a layer's ReLUs no longer fire for any input, so no gradient can
    reach them again (a step too large switched them off)."""
    weights_finite = all(parameter.detach().square().sum().isfinite() for parameter in net.parameters())
    if not (math.isfinite(sum(step_losses)) and weights_finite):
        raise UserError(f"training diverged in epoch {epoch}: the loss or the weights are no longer finite; "
                        f"try a smaller --lr (this run used {lr:g})")
    if len(evaluation.logits) > 1 and (evaluation.logits == evaluation.logits[0]).all():
        raise UserError(f"training collapsed in epoch {epoch}: the network gives the same output for every "
                        "image (a step too large switched off a layer's ReLUs for good); try a smaller --lr "
                        f"(this run used {lr:g})")


@contextlib.contextmanager
def out_of_memory_explained(device: torch.device, args: argparse.Namespace):
    """Batches too large for the device's memory end the run in one line that names the flags to
    lower. torch raises its OutOfMemoryError on a GPU, a plain RuntimeError on the CPU and MPS."""
    try:
        yield
    except RuntimeError as error:
        if not re.search("out of memory|can't allocate memory|not enough memory", str(error)):
            raise
        raise UserError(f"out of memory on {device} with --batch-size {args.batch_size} and "
                        f"--test-batch-size {args.test_batch_size}: give smaller ones") from None


def set_determinism(deterministic: bool) -> None:
    """--deterministic: slower kernels that give the same result every time, on a GPU too."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# --- Signals: Ctrl-C and SIGTERM stop at once; the epochs done are saved already -----------

SIGNALS: list[int] = []  # the signals this process has received


class Stopped(KeyboardInterrupt):
    """Stopped by SIGINT or SIGTERM; `run_dir` is the run it stopped, if it had a folder. Not an
    Exception, like KeyboardInterrupt: a library's `except Exception` (tqdm has some) must not
    swallow it when the signal lands inside one."""

    def __init__(self, signum: int, run_dir: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.run_dir = signum, run_dir

    def resumable(self) -> bool:
        return bool(self.run_dir and (self.run_dir / "checkpoints" / "last.pt").exists())

    def message(self) -> str:
        if self.resumable():
            return f"Stopped by {self}. Resume with: python train_mnist.py --resume {typed(self.run_dir)}"
        if self.run_dir:
            return f"Stopped by {self} before a first epoch was saved: there is nothing to resume."
        return f"Stopped by {self}."


def stop_now(signum: int, _frame: object) -> None:
    """Stop at once: the last epoch's checkpoint is whole (written atomically), and --resume
    redoes the epoch under way. More signals change nothing: the program is on its way out."""
    SIGNALS.append(signum)
    stop_at_signals(signal.SIG_IGN)
    raise Stopped(signum)


def remember(signum: int, _frame: object) -> None:
    """A signal that waits: the code that installed this handler looks at SIGNALS when it can."""
    SIGNALS.append(signum)


@contextlib.contextmanager
def signals_held():
    """A signal that comes within the block stops the program at its end. TensorBoard's writers
    take locks as they write: stopped in the middle, a writer keeps its lock and hangs on close."""
    received, handler = len(SIGNALS), stop_at_signals(remember)
    try:
        yield
    finally:
        came = len(SIGNALS) > received
        stop_at_signals(signal.SIG_IGN if came else handler)  # once stopping, more signals change nothing
    if came:
        raise Stopped(SIGNALS[-1])


def stop_at_signals(handler: object) -> object:
    """Handle SIGINT and SIGTERM with `handler`; returns the one SIGINT had."""
    previous = signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return previous


# --- TensorBoard: what the network does, beyond the curves ------------------------------

PICTURES = "visualizations/"  # TensorBoard sorts tags by name: the pictures come after the curves
HISTOGRAM_BINS = 64  # TensorBoard draws 30 buckets; its default of 774 bins took 4x the time here
EVENT_QUEUE = 10_000  # with TensorBoard's 10, add_scalar waits for the writer's thread every 10 points
HPARAMS = (*SWEEP_FLAGS, "weight_decay", "warmup", "lr_decay", "nesterov", "label_smoothing", "seed",
           "deterministic", "val_size", "patience")


@signals_held()
def log_start(writer: SummaryWriter, net: MNISTNet, train_set: Split, config: dict) -> None:
    """As a run starts: a grid of 64 training digits, the network's graph traced on them, and the
    run's HPARAMS row, written into its own folder (add_hparams would make a sub-run of it). The
    metrics columns show the last points of the run's curves. TensorBoard keeps the first row it
    reads for a run, so a resumed run's changes are in config.json only."""
    from torchvision.utils import make_grid

    writer.add_image(f"{PICTURES}training digits", make_grid(train_set.raw[:64, None] / 255, nrow=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # add_graph traces with torch.jit, which warns of it
        writer.add_graph(net, train_set.images[:64])
    writer.file_writer.add_summary(hparams_columns())
    values = {key: config[key] for key in HPARAMS}
    writer.file_writer.add_summary(hp.hparams_pb(values, trial_id=Path(writer.log_dir).name))


@signals_held()
def log_epoch(writer: SummaryWriter, curves: dict[str, SummaryWriter], net: MNISTNet, record: dict,
              evaluation: Evaluation, step_losses: list[float], step_lrs: list[float], monitor: str) -> None:
    """Every epoch: the curves (the epoch's points at the step where it ends), the weight and
    gradient histograms, the accuracy per digit, the conv1 filters, and a line on the console."""
    from torchvision.utils import make_grid

    step = record["step"]
    # One tag in two sub-runs is one chart with two lines, as Keras draws them. TensorBoard sorts
    # its groups by name and opens the first ones: "accuracy" and "loss" come before the rest.
    curves["train"].add_scalar("loss", record["train_loss"], step)
    curves[monitor].add_scalar("loss", evaluation.loss, step)
    curves[monitor].add_scalar("accuracy", evaluation.accuracy, step)
    for taken, (loss, lr) in enumerate(zip(step_losses, step_lrs), start=step - len(step_losses) + 1):
        writer.add_scalar("training/loss per step", loss, taken)
        writer.add_scalar("training/learning rate", lr, taken)
    for name, parameter in net.named_parameters():
        writer.add_histogram(f"weights/{name}", parameter.detach(), step, bins=HISTOGRAM_BINS)
        writer.add_histogram(f"weight gradients/{name}", parameter.grad, step, bins=HISTOGRAM_BINS)
    labels, predictions = evaluation.labels, evaluation.logits.argmax(dim=1)
    right = torch.bincount(labels[predictions == labels], minlength=10)
    for digit, accuracy in enumerate((right / torch.bincount(labels, minlength=10)).nan_to_num().tolist()):
        curves[monitor].add_scalar(f"per digit accuracy/{digit}", accuracy, step)
    filters = F.interpolate(net.conv1.weight.detach().cpu(), scale_factor=8)  # 5x5 pixels are hard to see
    grid = make_grid(filters, normalize=True, scale_each=True, pad_value=1)  # each filter black to white
    writer.add_image(f"{PICTURES}conv1 filters", grid, step)
    # On disk before the epoch's checkpoint is written: a run killed after the checkpoint loses none
    # of them, and a full disk is reported here, not by TensorBoard's writing thread during the save.
    for each_writer in (writer, *curves.values()):
        each_writer.flush()
    tqdm.write(f"Epoch {record['epoch']}: train loss {record['train_loss']:.4f}, {monitor} loss "
               f"{evaluation.loss:.4f}, {monitor} accuracy {evaluation.accuracy:.4f}")


def log_results(writer: SummaryWriter, tested: MNISTNet, state: dict, evaluation: Evaluation,
                train_set: Split, test_set: Split) -> dict:
    """After training: the test set's score and figures, then metrics.json (last: only a finished
    run has one) and the summary on the console. Returns the final metrics."""
    config, history = state["config"], state["history"]
    log_test(writer, tested, evaluation, train_set, test_set, config, history)
    metrics = final_metrics(history, evaluation, len(train_set.labels))
    write_json(Path(config["run_dir"]) / "metrics.json", metrics)
    print(f"Test accuracy: {evaluation.accuracy:.4f}" + (
        f" (the weights of epoch {metrics['best_epoch']}, chosen by validation accuracy "
        f"{metrics['best_validation_accuracy']:.4f})" if config["val_size"] else
        " (--val-size 0: every epoch was scored on this test set, so this figure is optimistic)"))
    print(f"Run directory: {config['run_dir']}")
    return metrics | {"run_dir": config["run_dir"]}


@signals_held()
def log_test(writer: SummaryWriter, tested: MNISTNet, evaluation: Evaluation, train_set: Split,
             test_set: Split, config: dict, history: list[dict]) -> None:
    """The test set's one score, its confusion matrix, misclassified digits and PR curves, and
    the learned features of training and test digits in the projector."""
    step, predictions = history[-1]["step"], evaluation.logits.argmax(dim=1)
    writer.add_scalar("test/accuracy", evaluation.accuracy, step)
    writer.add_scalar("test/loss", evaluation.loss, step)
    writer.add_image(f"{PICTURES}confusion matrix", confusion_image(evaluation.labels, predictions), step,
                     dataformats="HWC")
    writer.add_image(f"{PICTURES}misclassified digits", misclassified_image(test_set.raw, evaluation.labels,
                     predictions), step, dataformats="HWC")
    probabilities = evaluation.logits.softmax(dim=1)
    for digit in range(10):
        writer.add_pr_curve(f"pr curve/{digit}", evaluation.labels == digit, probabilities[:, digit], step)
    for tag, split, shown in (("train features", train_set, None), ("test features", test_set, predictions)):
        if config["num_embeddings"]:  # filed under the epoch: <run>/000NN/<tag>/
            # A run stopped after its embeddings writes them again on --resume: TensorBoard prints
            # a warning as it replaces the files, which here are meant to be replaced.
            with contextlib.redirect_stdout(io.StringIO()):
                writer.add_embedding(**embedding(tested, split, config["num_embeddings"], config["seed"],
                                                 shown), tag=tag, global_step=len(history))
    writer.flush()


# The two final figures are drawn with Pillow at the size TensorBoard shows them: 0.02 s for
# both here, where matplotlib took 0.3 s to import and 0.6 s to draw them.
PAPER, INK, RIGHT, WRONG = (255, 255, 255), (30, 30, 30), (205, 222, 245), (200, 40, 30)


def confusion_image(labels: torch.Tensor, predictions: torch.Tensor) -> np.ndarray:
    """A cell per (true, predicted) pair with its count: the right answers on a blue diagonal,
    each kind of mistake in red, darker the more often it happened; blank if it never did."""
    counts = torch.bincount(labels * 10 + predictions, minlength=100).view(10, 10).cpu()
    most_wrong = max(1, int((counts - counts.diag().diag()).max()))
    picture = Image.new("RGB", (460, 490), PAPER)
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=15)
    total, wrong = int(counts.sum()), int(counts.sum() - counts.trace())
    draw.text((6, 6), f"Confusion matrix: {total} test digits, {wrong} wrong\nrows: true digit, columns: "
              "predicted", font=ImageFont.load_default(size=14), fill=INK)
    for true, predicted in itertools.product(range(10), range(10)):
        count, x, y = int(counts[true, predicted]), 44 + predicted * 40, 70 + true * 40
        shade = 0.25 + 0.75 * count / most_wrong  # the rarest mistake still shows
        mistake = tuple(round(255 + (channel - 255) * shade) for channel in WRONG)
        fill = RIGHT if true == predicted else mistake if count else PAPER
        draw.rectangle((x, y, x + 40, y + 40), fill=fill, outline=(225, 225, 225))
        if count:
            ink = PAPER if fill == mistake and shade > 0.55 else INK
            draw.text((x + 20, y + 20), str(count), font=font, fill=ink, anchor="mm")
    for digit in range(10):
        draw.text((30, 90 + digit * 40), str(digit), font=font, fill=INK, anchor="mm")
        draw.text((64 + digit * 40, 60), str(digit), font=font, fill=INK, anchor="mm")
    return np.asarray(picture)


def misclassified_image(raw_images: torch.Tensor, labels: torch.Tensor,
                        predictions: torch.Tensor) -> np.ndarray:
    """The first 36 misclassified test digits, each twice its size above its true and predicted digit."""
    wrong = (predictions != labels).nonzero().flatten().cpu()
    picture = Image.new("RGB", (440, 30 + 96 * max(1, math.ceil(min(36, len(wrong)) / 6))), PAPER)
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=13)
    draw.text((6, 6), f"Misclassified test digits: the first {min(36, len(wrong))} of {len(wrong)}",
              font=ImageFont.load_default(size=16), fill=INK)
    for place, index in enumerate(wrong[:36].tolist()):
        x, y = 12 + place % 6 * 72, 30 + place // 6 * 96
        picture.paste(Image.fromarray(raw_images[index].numpy()).resize((56, 56), Image.NEAREST), (x, y))
        draw.multiline_text((x + 28, y + 58), f"true {int(labels[index])}\npred {int(predictions[index])}",
                            font=font, fill=INK, anchor="ma", align="center")
    return np.asarray(picture)


def hparams_columns() -> object:
    """The HPARAMS columns, typed: the switches as booleans, the rest as numbers (TensorBoard has
    none for integers). It shows five at first, those marked as differing between runs: the ones
    that usually do. Then the metrics, the test accuracy first."""
    columns = [hp.HParam(key, hp.Discrete([False, True]) if key in ("nesterov", "deterministic") else
                         hp.RealInterval(0.0, sys.float_info.max)) for key in HPARAMS]
    metrics = [hp.Metric("test/accuracy", display_name="test accuracy"),
               hp.Metric("accuracy", group="validation", display_name="validation accuracy"),
               hp.Metric("test/loss", display_name="test loss"),
               hp.Metric("loss", group="validation", display_name="validation loss")]
    summary = hp.hparams_config_pb(columns, metrics)
    plugin_data = summary.value[0].metadata.plugin_data
    declaration = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
    for column in declaration.experiment.hparam_infos:
        column.differs = column.name in (*SWEEP_FLAGS, "seed")
    plugin_data.content = declaration.SerializeToString()
    return summary


@torch.no_grad()
def embedding(net: MNISTNet, split: Split, count: int, seed: int, predictions: torch.Tensor | None) -> dict:
    """add_embedding's arguments: the 256-d learned features of `count` random digits, labelled
    with the digit (and the prediction, when given), the digits as thumbnails."""
    pick = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:count]
    on_device = pick.to(split.labels.device)
    labels, header = split.labels[on_device].tolist(), None
    if predictions is not None:
        labels = [[*pair] for pair in zip(labels, predictions[on_device].tolist())]
        header = ["label", "prediction"]
    return {"mat": net.eval().get_features(split.images[on_device]).cpu(), "metadata": labels,
            "metadata_header": header, "label_img": split.raw[pick, None] / 255}


# --- Checkpoints and resume ---------------------------------------------------------------
# A checkpoint is a plain dict of tensors, numbers and strings, readable with weights_only=True.

RESUMED_FLAGS = (*HPARAMS, "test_batch_size", "num_embeddings", "data_dir")  # a resumed run's defaults


def new_state(args: argparse.Namespace) -> dict:
    """A new run: its folder (process 0 makes it) and an empty history."""
    run_dir = make_run_dir(args) if MAIN_PROCESS else None
    return {"history": [], "best_model": None, "config": config_of(args, run_dir)}


def best(history: list[dict], monitor: str) -> dict:
    """The epoch with the best accuracy on the `monitor` set (the first, if several tie)."""
    return max(history, key=lambda record: record[f"{monitor}_accuracy"])


def out_of_patience(history: list[dict], patience: int, monitor: str) -> bool:
    chosen = best(history, monitor)
    if not patience or len(history) - chosen["epoch"] < patience:
        return False
    report(f"Stopping early (--patience {patience}): {monitor} accuracy last improved in epoch "
           f"{chosen['epoch']}, to {chosen[f'{monitor}_accuracy']:.4f}")
    return True


def save_checkpoint(state: dict, model_without_ddp: MNISTNet, optimizer: torch.optim.Optimizer,
                    monitor: str) -> None:
    """last.pt after every epoch, and best.pt when the monitored accuracy improved: all that a
    resumed run needs, the best epoch's weights included (the test set scores them at the end)."""
    improved = best(state["history"], monitor) is state["history"][-1]
    if improved:
        state["best_model"] = {key: value.clone() for key, value in model_without_ddp.state_dict().items()}
    state |= {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict()}
    if not MAIN_PROCESS:
        return
    buffer = io.BytesIO()  # in memory first, so that a full disk is the OSError it is
    torch.save(state, buffer)
    # last.pt last: a run stopped between the two files resumes from the epoch before, and redoes
    # this one, best.pt included.
    for name in ("best", "last") if improved else ("last",):
        atomic_write(Path(state["config"]["run_dir"]) / "checkpoints" / f"{name}.pt", buffer.getvalue())


def load_checkpoint(path: Path, log_dir: Path, in_run_dir: str = "last.pt") -> dict:
    """A checkpoint, or a run folder's checkpoints/<in_run_dir>, loaded without running any code."""
    given = path  # a checkpoint, a run folder, or by mistake the folder of runs or a run's name alone
    path = path / "checkpoints" / in_run_dir if path.is_dir() else path
    if not path.is_file():
        # --log-dir itself given (runs, not runs/NAME): name its latest run.
        newest = max(given.glob(f"*/checkpoints/{in_run_dir}"), key=lambda found: found.stat().st_mtime,
                     default=None)
        hint = f" ({given} is a folder of runs; the latest is {newest.parent.parent})" if newest else ""
        if (log_dir / given / "checkpoints" / in_run_dir).is_file():  # NAME alone, as TensorBoard lists it
            hint = f" (did you mean {typed(log_dir / given)}?)"
        raise UserError(f"no checkpoint at {path}{hint}; give a .pt file, or a run folder with "
                        f"checkpoints/{in_run_dir}")
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            # weights_only: tensors, numbers, strings and containers; an object that could run code is refused
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as error:  # torch.load reports a damaged file as other OSErrors too
        raise UserError(f"{path} cannot be read ({error.strerror})") from None
    except Exception as error:  # torch.load raises many types for a file that is no checkpoint
        stored = re.search(r"GLOBAL (\S+)", str(error))  # a function torch.save stored, which it refuses
        reason = (f"it holds {stored[1]}, code that would run as it loads" if stored
                  else "it is empty, truncated, or not a file that torch.save wrote")
        raise UserError(f"{path} cannot be loaded safely, so it is refused: {reason}") from None
    if not isinstance(checkpoint, dict) or {"model", "config"} - checkpoint.keys():
        raise UserError(f"{path} is not a train_mnist.py checkpoint (it lacks the model or the config)")
    return checkpoint | {"path": path}


def stored_flags(parser: argparse.ArgumentParser, checkpoint: dict) -> dict:
    """The flags of a checkpoint's run, each through the same check as on the command line."""
    saved = {key: value for key, value in checkpoint["config"].items() if key in RESUMED_FLAGS}
    argv = []
    for key, value in saved.items():  # as typed: --lr=0.05, --nesterov, --no-deterministic
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        else:
            argv.append(f"--{key}={value}")
    try:
        stored, _ = parser.parse_known_args(with_dashes(argv))
    except argparse.ArgumentError as error:
        raise UserError(f"{checkpoint['path']} holds an invalid flag ({error}): it was changed, or not "
                        "written by train_mnist.py") from None
    return {key: getattr(stored, key) for key in saved}


def restore_model(net: MNISTNet, checkpoint: dict) -> None:
    try:
        net.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"{checkpoint['path']} holds weights of a different network than MNISTNet") from None


def resume(checkpoint: dict, model_without_ddp: MNISTNet, optimizer: torch.optim.Optimizer,
           args: argparse.Namespace) -> dict:
    """The state to go on from the end of the checkpoint's epoch; the flags given again win."""
    restore_model(model_without_ddp, checkpoint)
    run_dir = checkpoint["path"].parent.parent
    if checkpoint["path"].parent.name != "checkpoints":
        raise UserError("--resume continues a run in its folder: give the run folder, or a checkpoint in its "
                        "checkpoints/ folder (use --evaluate to test a loose checkpoint)")
    if args.epochs <= (trained := epochs_finished(run_dir)):
        raise UserError(f"run {run_dir} finished after epoch {trained}; resume it with --epochs larger than "
                        f"{trained} to train longer")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        history = [dict(record) for record in checkpoint["history"]]
        position = {"epoch": len(history), "step": int(history[-1]["step"])}
        best_model = dict(checkpoint["best_model"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError):
        raise UserError(f"{checkpoint['path']} lacks part of the training state, so it cannot be resumed; "
                        "--evaluate can still test it") from None
    if args.epochs < len(history):  # --epochs counts them all
        raise UserError(f"run {run_dir} has trained {len(history)} epochs already, more than --epochs "
                        f"{args.epochs}; give --epochs {len(history)} or more")
    for group in optimizer.param_groups:  # the saved state brought back the old values
        group.update(lr=args.lr, initial_lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                     weight_decay=args.weight_decay)
    report(f"Resuming {run_dir} after epoch {len(history)}")
    config = config_of(args, run_dir, checkpoint, position)
    return {"history": history, "best_model": best_model, "config": config}


def epochs_finished(run_dir: Path) -> int:
    """The epochs a finished run trained, as its metrics.json says (fewer than its --epochs if
    --patience stopped it); 0 while it is unfinished."""
    try:
        return int(json.loads((run_dir / "metrics.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def evaluate(checkpoint: dict, args: argparse.Namespace, device: torch.device) -> None:
    """--evaluate: test a checkpoint and print its accuracy; no training, no run folder."""
    net = MNISTNet().to(device)
    restore_model(net, checkpoint)
    test_set = load_split(args.data_dir, False, device, args.verify_data)
    result = test(net, DeviceLoader(test_set, args.test_batch_size))
    if MAIN_PROCESS:
        print(f"Checkpoint: {checkpoint['path']}")
        print(f"Test loss: {result.loss:.4f}\nTest accuracy: {result.accuracy:.4f}")


# --- Run folders and the files in them ----------------------------------------------------

NAME_KEYS = {"lr": "lr", "batch_size": "bs", "epochs": "ep", "momentum": "mom", "weight_decay": "wd",
             "warmup": "warmup", "lr_decay": "decay", "nesterov": "nesterov", "label_smoothing": "ls",
             "seed": "seed", "deterministic": "det", "val_size": "val", "patience": "patience"}


def make_run_dir(args: argparse.Namespace) -> Path:
    """A fresh run folder, named after what differs from the defaults, then the time: TensorBoard
    cuts long names, so what tells runs apart comes first. Two runs never share one."""
    parser, changed = build_parser(), []
    # The defaults of this run's batch and momentum, as single_values() sets them: not a difference.
    resolved = {"lr": default_lr(args.batch_size), "nesterov": args.momentum > 0}
    for key, short in NAME_KEYS.items():
        default = resolved.get(key, parser.get_default(key))
        if (value := getattr(args, key)) != default:
            switch = short if value else f"no{short}"
            changed.append(switch if isinstance(value, bool) else f"{short}{value:g}")
    base = args.run_name or f"{'_'.join(changed) or 'default'}_{datetime.datetime.now():%m%d-%H%M%S}"
    try:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1 if args.run_name else 1000):
            with contextlib.suppress(FileExistsError):
                run_dir = args.log_dir / (base if attempt == 0 else f"{base}_{attempt + 1}")
                run_dir.mkdir()  # atomic: of two runs racing for a name, one gets it
                return run_dir
    except OSError as error:
        raise UserError(f"cannot create a run folder in {args.log_dir}: {error.strerror}; "
                        f"{how_to_fix(error, '--log-dir')}") from None
    if not (args.log_dir / base / "checkpoints" / "last.pt").exists():
        raise UserError(f"run {args.log_dir / base} already exists, without a checkpoint to resume (it "
                        "stopped before its first epoch ended); delete it or pick another --run-name")
    raise UserError(f"run {args.log_dir / base} already exists; pick another --run-name, or continue it "
                    f"with --resume {typed(args.log_dir / base)}")


def config_of(args: argparse.Namespace, run_dir: Path | None, checkpoint: dict | None = None,
              position: dict | None = None) -> dict:
    """What a run really uses, as JSON (config.json, and in every checkpoint): the resolved flags,
    its folder, and for each time it was resumed, from where and which flags changed."""
    config = {key: str(value) if isinstance(value, (Path, torch.device)) else value
              for key, value in vars(args).items() if key not in ("resume", "evaluate")}
    config |= {"run_dir": str(run_dir), "resumed": []}
    if checkpoint is not None:
        saved = checkpoint["config"]
        changed = {key: [saved[key], config[key]] for key in RESUMED_FLAGS if saved.get(key) != config[key]}
        config["resumed"] = [*saved.get("resumed", []), {"from": str(checkpoint["path"]), **position,
                                                 "changed": changed}]
    return config


@contextlib.contextmanager
def open_run(state: dict, step: int, monitor: str):
    """Process 0 takes the run folder for itself (a second process is refused), writes
    config.json and opens the SummaryWriters: the run's, and the sub-runs "train" and `monitor`.
    A resumed run's writers have TensorBoard drop what a stopped session logged after `step`, the
    last saved one, so that each point shows once."""
    if not MAIN_PROCESS:
        yield None, None
        return
    run_dir, thread_failed = Path(state["config"]["run_dir"]), threading.excepthook
    # The writer's thread would print its failure (a full disk) as a traceback; it is said below.
    threading.excepthook = lambda failed: issubclass(failed.exc_type, OSError) or thread_failed(failed)
    try:
        with FileLock(run_dir / ".lock", timeout=0):
            (run_dir / "metrics.json").unlink(missing_ok=True)  # unfinished until it finishes anew
            write_json(run_dir / "config.json", state["config"])
            with (SummaryWriter(run_dir, purge_step=step + 1, max_queue=EVENT_QUEUE) as writer,
                  SummaryWriter(run_dir / "train", purge_step=step + 1) as train_curves,
                  SummaryWriter(run_dir / monitor, purge_step=step + 1) as monitored_curves):
                curves = {"train": train_curves, monitor: monitored_curves}
                print(f"Training on {state['config']['device']} with seed {state['config']['seed']}"
                      + (f" in {WORLD_SIZE} processes" if DISTRIBUTED else "") + f"; logging to {run_dir}")
                print(f"Watch it learn: tensorboard --logdir {typed(run_dir.parent)}")
                yield writer, curves
    except Timeout:
        raise UserError(f"run {run_dir} is in use by another process; wait for it to end, or stop "
                        "it first") from None
    except BrokenPipeError:  # not a file: the console's output, piped into a program that quit
        raise
    except OSError as error:  # a file TensorBoard writes (an event file, the projector's): it names none
        where = error.filename or f"a file in {run_dir}"
        raise UserError(f"cannot write {where}: {error.strerror}; {how_to_fix(error, '--log-dir')}") from None
    except Stopped as stopped:
        stopped.run_dir = run_dir
        raise
    finally:
        threading.excepthook = thread_failed


def final_metrics(history: list[dict], evaluation: Evaluation, train_count: int) -> dict:
    """metrics.json: the test set's one score, and what validation chose (null without it)."""
    validated, seconds = "validation_accuracy" in history[-1], sum(record["seconds"] for record in history)
    chosen = best(history, "validation" if validated else "test")
    return {"test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss,
            "best_validation_accuracy": chosen["validation_accuracy"] if validated else None,
            "best_epoch": chosen["epoch"],
            "final_validation_accuracy": history[-1]["validation_accuracy"] if validated else None,
            "chosen_on": "validation" if validated else "test", "epochs": len(history),
            "training_seconds": round(seconds, 3),
            "images_per_second": round(len(history) * train_count / seconds, 1)}


def atomic_write(path: Path, content: bytes, flag: str = "--log-dir") -> None:
    """Write a file that no reader and no crash sees half-written: a temporary file, flushed to
    disk, then renamed over the old one. A failure is one UserError; after it, or a signal, the
    old file stays and the temporary one is gone."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}; the previous file, if any, is kept. "
                        f"{how_to_fix(error, flag).capitalize()}") from None
    finally:
        with contextlib.suppress(OSError):  # gone once renamed; still there only if something failed
            temporary.unlink()


def free_path(folder: Path, stem: str, suffix: str) -> Path:
    """folder/<stem><suffix>, or <stem>_2, _3... where a file of that name exists: a new file never
    replaces one (a photo beside its --save-inputs, an earlier sweep's table of the same second)."""
    path, number = folder / f"{stem}{suffix}", 1
    while path.exists():
        number += 1
        path = folder / f"{stem}_{number}{suffix}"
    return path


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def how_to_fix(error: OSError, flag: str) -> str:
    """The remedy for a failed write under the folder that `flag` names."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        return f"free some disk space or pick another {flag}"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"fix its permissions or pick another {flag}"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"a file stands where a folder should be; pick another {flag}"
    if error.errno == errno.ENAMETOOLONG:
        return f"the path is too long for the filesystem; pick a shorter {flag}"
    return f"pick another {flag}"


# --- Sweeps: a grid of runs, in turn or --jobs at a time ---------------------------------


def sweep(args: argparse.Namespace, device: torch.device) -> None:
    """A run for each point of the grid of SWEEP_FLAGS values; a failed point is reported and the
    others go on. Then a table of every point, best validation accuracy first, on the console
    and as runs/sweep-<time>.csv: after Ctrl-C too, which stops every run under way."""
    grid = list(itertools.product(*(as_list(getattr(args, key)) for key in SWEEP_FLAGS)))
    points = [single_values(argparse.Namespace(**vars(args) | dict(zip(SWEEP_FLAGS, values))))
              for values in grid]
    for number, point in enumerate(points, 1):
        point.run_name = args.run_name and f"{args.run_name}-{number}"
    rows = [{key: getattr(point, key) for key in SWEEP_FLAGS} | sweep_row("not started") for point in points]
    # MNIST downloaded once, or found missing once, before points that would all fetch it at once.
    load_split(args.data_dir, False, torch.device("cpu"))
    try:
        if args.jobs > 1 and not DISTRIBUTED:
            # No more workers than points: each gets its share of the cores.
            run_in_processes(points, rows, device, min(args.jobs, len(points)))
        else:
            run_in_turn(points, rows, device)
    finally:
        ranked_by = "validation_accuracy" if args.val_size else "test_accuracy"  # not the test set, if it can
        rows.sort(key=lambda row: -1 if row[ranked_by] is None else row[ranked_by], reverse=True)
        if MAIN_PROCESS:
            stem = f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}"
            write_sweep_table(rows, free_path(args.log_dir, stem, ".csv"))


def sweep_row(status: str, metrics: dict | None = None) -> dict:
    metrics = metrics or {}
    return {"validation_accuracy": metrics.get("best_validation_accuracy"),
            "test_accuracy": metrics.get("test_accuracy"), "test_loss": metrics.get("test_loss"),
            "run_dir": metrics.get("run_dir"), "status": status}


def point_values(point: argparse.Namespace) -> str:
    return ", ".join(f"{key}={getattr(point, key)}" for key in SWEEP_FLAGS)


def run_in_turn(points: list[argparse.Namespace], rows: list[dict], device: torch.device) -> None:
    for number, point in enumerate(points, 1):
        report(f"\n=== Sweep run {number}/{len(points)}: {point_values(point)}")
        try:
            rows[number - 1] |= run_point(point, device)
        except Stopped as stopped:  # Ctrl-C: start no other point
            rows[number - 1] |= stopped_row(stopped)
            raise


def run_point(point: argparse.Namespace, device: torch.device) -> dict:
    """One point of a sweep: its row of the table, however it ended."""
    try:
        return sweep_row("ok", run(point, device))
    except UserError as error:
        report(f"error: {error}", every_node=True)
        return sweep_row(f"failed: {error}")


def stopped_row(stopped: "Stopped") -> dict:
    run_dir = {"run_dir": str(stopped.run_dir) if stopped.run_dir else None}
    return sweep_row(f"stopped: --resume {stopped.run_dir}" if stopped.resumable() else "stopped", run_dir)


def run_in_processes(points: list[argparse.Namespace], rows: list[dict], device: torch.device,
                     jobs: int) -> None:
    """--jobs N: N points at once, each in a worker process with its share of the CPU cores (one
    GPU each, in turn, with several, unless --device names one). On Linux's CPU the workers are
    forks of this process, which has torch loaded already. Elsewhere they start anew: CUDA does
    not survive a fork, Windows has none, and macOS's system libraries make it unsafe (Python's
    default there is spawn)."""
    fork = device.type == "cpu" and sys.platform == "linux"
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once here, for every fork
    gpus = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    report(f"=== Sweep of {len(points)} runs, {jobs} at a time, each reported as it ends. Watch them learn: "
           f"tensorboard --logdir {typed(points[0].log_dir)}")
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("fork" if fork else "spawn"),
                             initializer=start_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(run_in_worker, point, torch.device("cuda", index % gpus) if gpus else device):
                   index for index, point in enumerate(points)}
        try:
            for future in as_completed(futures):
                index = futures[future]
                rows[index] |= future.result()
                report(f"=== Sweep run {index + 1}/{len(points)} ({point_values(points[index])}): "
                       f"{rows[index]['status']}")
        except Stopped as stopped:  # passed on: the workers' runs stop, and no other starts
            # Windows gives Ctrl-C to every process of the console already, and its os.kill would
            # end a worker at once, before the worker returns its row.
            if sys.platform != "win32":
                for worker in multiprocessing.active_children():
                    os.kill(worker.pid, stopped.signum)
            for future, index in futures.items():
                rows[index] |= future.result()
            raise
        except BrokenExecutor:  # a worker killed outright (out of memory, kill -9): the pool ends them all
            # With SIGTERM, which stops their runs; but a worker whose run stopped then waits for
            # work, and the pool for it, forever (Python 3.13): end them for good.
            for worker in multiprocessing.active_children():
                worker.kill()
            for row in rows:
                if row["status"] == "not started":
                    row["status"] = "not finished: a worker process was killed"
            raise UserError(f"a worker process of the sweep was killed (out of memory, or kill -9), and the "
                            f"others stopped with it; their runs are the folders in "
                            f"{typed(points[0].log_dir)} without a metrics.json: --resume each") from None


def start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet = os.open(os.devnull, os.O_WRONLY)  # the sweep reports each point in one line
    os.dup2(quiet, sys.stdout.fileno())
    os.dup2(quiet, sys.stderr.fileno())
    stop_at_signals(remember)  # a signal between two points: start no more


def run_in_worker(point: argparse.Namespace, device: torch.device) -> dict:
    if SIGNALS:
        return sweep_row("not started")
    handlers = stop_at_signals(stop_now)
    try:
        return run_point(point, device)
    except Stopped as stopped:
        return stopped_row(stopped)
    finally:
        stop_at_signals(handlers)


def write_sweep_table(rows: list[dict], path: Path) -> None:
    """The sweep's rows, numbers rounded to 4 places, as a CSV file and on the console."""
    text = io.StringIO(newline="")
    table = csv.DictWriter(text, fieldnames=list(rows[0]))
    table.writeheader()
    table.writerows({key: round(value, 4) if isinstance(value, float) else value
                     for key, value in row.items()} for row in rows)
    atomic_write(path, text.getvalue().encode())
    print(f"\nSweep results, best first (saved to {path}):\n{text.getvalue()}")


# --- torchrun: one process per GPU (or CPU share), gradients averaged by DDP --------------


def start_distributed(device: torch.device) -> torch.device:
    """Under torchrun, join the process group (nccl on GPUs, gloo on the CPU); returns the device
    this process trains on."""
    if DISTRIBUTED and device.type == "cuda":
        if torch.cuda.device_count() <= LOCAL_RANK:
            raise UserError(f"torchrun started more processes on this machine than its "
                            f"{torch.cuda.device_count()} GPUs; give fewer --nproc_per_node, or --device cpu")
        device = torch.device("cuda", LOCAL_RANK)
        torch.cuda.set_device(device)
    if DISTRIBUTED:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@contextlib.contextmanager
def main_process_first():
    """Process 0 runs the block first (a download); the others then run it on what it left."""
    if DISTRIBUTED and not MAIN_PROCESS:
        dist.barrier()
    yield
    if DISTRIBUTED and MAIN_PROCESS:
        dist.barrier()


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    if DISTRIBUTED:
        dist.all_reduce(values)
        values /= WORLD_SIZE
    return values


def report(message: str, every_node: bool = False) -> None:
    """Print to stderr from process 0 (errors: from the first process of each machine)."""
    if MAIN_PROCESS or (every_node and LOCAL_RANK == 0):
        print(message if MAIN_PROCESS else f"[rank {RANK}] {message}", file=sys.stderr)


# --- Predict your own images: each prepared the way MNIST's digits were made ---------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # in a folder
MAX_PIXELS = 50_000_000  # a larger image is refused before it is decoded (a phone photo has about 12 M)


def predict(paths: list[Path], checkpoint: dict, device: torch.device, save_inputs: Path | None) -> int:
    """--predict: one line per image with its three likeliest digits. An image that cannot be
    read is one error line, and the others are still read; returns 1 if any failed."""
    if DISTRIBUTED:
        raise UserError("--predict runs in one process: start it with python, not torchrun")
    net = MNISTNet().to(device).eval()
    restore_model(net, checkpoint)
    failed = 0
    images = []
    for path in paths:  # a folder means the images in it
        if not path.is_dir():
            images.append(path)
        elif found := sorted(file for file in path.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES
                             and not file.name.startswith(".")):  # hidden: macOS's ._IMG_1.jpg, say
            images += found
        else:
            report(f"error: {path}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            failed += 1
    for path in images:
        try:
            digit = mnist_digit(read_grey(path), path)
        except UserError as error:
            report(f"error: {error}")
            failed += 1
            continue
        if save_inputs:  # what the model sees
            png = io.BytesIO()
            Image.fromarray(digit.mul(255).round().byte().numpy()).save(png, "PNG")
            atomic_write(free_path(save_inputs, path.stem, ".png"), png.getvalue(), flag="--save-inputs")
        with torch.no_grad():
            probabilities, digits = net(normalize(digit[None].to(device) * 255)).softmax(dim=1)[0].topk(3)
        likeliest = [f"{digit} ({p:.1%})" for p, digit in zip(probabilities.tolist(), digits.tolist())]
        print(f"{path}: {likeliest[0]}, then {likeliest[1]}, {likeliest[2]}")
    return 1 if failed else 0


def read_grey(path: Path) -> torch.Tensor:
    """An image file as grey levels in [0, 1] (H, W), upright, any transparency laid on white (on
    black, if that leaves it all white: light ink drawn on a transparent sheet)."""
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore")  # Pillow warns of large images; the cap below says it
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height}")
            upright = ImageOps.exif_transpose(image)  # a phone's rotation, kept apart
            if upright.mode.startswith("I") and upright.getextrema()[1] > 255:  # 16-bit grey, as in scans:
                upright = upright.point(lambda level: level / 257)  # to 8 bits, Pillow would clip it white
            upright = upright.convert("RGBA")
            grey = Image.alpha_composite(Image.new("RGBA", upright.size, "white"), upright).convert("L")
            if grey.getextrema()[0] > 230:
                grey = Image.alpha_composite(Image.new("RGBA", upright.size, "black"), upright).convert("L")
    except Image.DecompressionBombError:
        message = f"{path}: too large an image (over {MAX_PIXELS:,} pixels); crop it to the digit"
        raise UserError(message) from None
    except Image.UnidentifiedImageError:  # e.g. an iPhone's HEIC, or a file that is no image
        raise UserError(f"{path}: not in an image format that Pillow reads; save it as PNG or JPEG") from None
    except (OSError, ValueError, SyntaxError) as error:
        # The system's reason for a file it cannot open (No such file or directory), else Pillow's.
        reason = getattr(error, "strerror", None) or str(error).split("\n")[0][:120] or type(error).__name__
        raise UserError(f"{path}: cannot be read as an image ({reason})") from None
    return torch.from_numpy(np.asarray(grey).copy()).float() / 255


def mnist_digit(grey: torch.Tensor, path: Path) -> torch.Tensor:
    """One digit made the way MNIST's were: light ink on black, its bounding box scaled so that
    the longer side is 20 pixels, centred by mass in 28x28. Returns (28, 28) in [0, 1]."""
    paper = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).median()  # the border shows the paper
    ink = (paper - grey if paper > 0.5 else grey - paper).clamp(min=0)
    if ink.max() < 0.1:
        raise UserError(f"{path}: no digit found: the image is blank")
    ink = ink / ink.max()
    ink[ink < 0.2] = 0  # faint marks (paper grain, shadows, JPEG noise) are not ink
    # The digit's box holds its strong strokes: a notebook's ruled lines, fainter, cross the whole page.
    strong = ink >= 0.4
    rows, columns = strong.sum(dim=1).nonzero().flatten(), strong.sum(dim=0).nonzero().flatten()
    ink = ink[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    size = [max(1, round(side * 20 / max(ink.shape))) for side in ink.shape]
    small = F.interpolate(ink[None, None], size=size, mode="bilinear", antialias=True)[0, 0].clamp(min=0)
    small = small / small.max()  # the darkest ink at full strength, as in MNIST
    centre_row = (small.sum(dim=1) * torch.arange(size[0])).sum().item() / small.sum().item()
    centre_column = (small.sum(dim=0) * torch.arange(size[1])).sum().item() / small.sum().item()
    top = min(max(round(14 - centre_row), 0), 28 - size[0])  # MNIST's centre of mass: pixel 14, 14
    left = min(max(round(14 - centre_column), 0), 28 - size[1])
    digit = torch.zeros(28, 28)
    digit[top:top + size[0], left:left + size[1]] = small
    return digit


if __name__ == "__main__":
    try:
        exit_code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # its output went to a program that stopped reading, as `| head` does
        exit_code = 141  # 128 + SIGPIPE: how a shell reports a command cut short that way
    sys.stderr.flush()
    os._exit(exit_code)  # no interpreter teardown: a Ctrl-C in it would end the program without a word
