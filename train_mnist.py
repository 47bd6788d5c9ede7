"""Train a small CNN on MNIST and watch it learn in TensorBoard.

    python train_mnist.py --epochs=5 --lr=1e-3 --batch_size=64
    tensorboard --logdir runs

The recipe comes first, in the order it runs: parse the command line; load MNIST once into
tensors on the training device; train with SGD one epoch at a time, testing after each and
saving a checkpoint; log the curves, a sample of digits, the graph, the final figures, the
learned features and the hyper-parameters to one TensorBoard run folder. The supporting
machinery follows under a banner: more TensorBoard figures, checkpoints and resume after
Ctrl-C, run folders and sweeps of hyper-parameters, signals, torchrun, and the checks that turn
a user's mistake into one clear line.
"""

import os
import signal
import sys

if __name__ == "__main__":
    # From the first instant: a Ctrl-C while the libraries load (or after the work is done) has
    # nothing to save, so it ends the program at once with one line instead of a traceback.
    # main() installs the handler that saves the state while a run is under way.
    def leave_at_once(signum: int, _frame: object) -> None:
        print(f"\nStopped by {signal.Signals(signum).name}; nothing was in progress.", file=sys.stderr)
        sys.stdout.flush()
        os._exit(128 + signum)

    for startup_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(startup_signal, leave_at_once)

import argparse
import contextlib
import csv
import dataclasses
import datetime
import errno
import functools
import gc
import gzip
import hashlib
import http.client
import io
import itertools
import json
import math
import pickle
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

try:
    import fcntl  # POSIX file locks: one process per run folder
except ImportError:  # Windows has none: runs there are not guarded against a second process
    fcntl = None


from models import MNISTNet

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the training pixels scaled to [0, 1]
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")  # in torchvision's layout: <--data_dir>/MNIST/raw/<name>
SWEEP_FLAGS = ("lr", "batch_size", "momentum", "epochs")  # several values of these run a grid
HPARAMS = (*SWEEP_FLAGS, "weight_decay", "warmup", "lr_decay", "nesterov", "label_smoothing", "seed",
           "deterministic", "val_size", "patience")
# Flags a resumed run takes from its checkpoint unless they are given again.
RESUMED_FLAGS = (*HPARAMS, "test_batch_size", "num_embeddings", "data_dir")
VALIDATION_SEED = 0  # seeds the choice of the --val_size held-out images: the same for every run
STEP_TAGS = ("training loss/per step", "learning rate")  # logged per step; the other tags per epoch
# TensorBoard sorts tags by name, and groups them by what comes before the first "/": the
# pictures and histograms are filed under names that sort after the curves, which come first.
PICTURES = "visualizations/"
# Events waiting for the SummaryWriter's thread to write them. With TensorBoard's default of 10,
# add_scalar waits on that thread every 10 events: the 5,160 per-step points of a default run
# took 0.32 s of the training's time here, and 0.12 s with this queue.
EVENT_QUEUE = 10_000
# TensorBoard draws a histogram with 30 buckets whatever it is given; 64 are plenty, and take a
# quarter of the time of its default of 774 (0.04 s against 0.15 s for a 6-epoch run here).
HISTOGRAM_BINS = 64
LOSS_EVERY = 50  # steps between two reads of the loss: progress bar, divergence and stop checks

# Several processes: torchrun starts one copy of this script per process and tells each its
# RANK among WORLD_SIZE. A plain `python train_mnist.py` is process 0 of 1.
DISTRIBUTED = "RANK" in os.environ and "WORLD_SIZE" in os.environ
RANK = int(os.environ["RANK"]) if DISTRIBUTED else 0
WORLD_SIZE = int(os.environ["WORLD_SIZE"]) if DISTRIBUTED else 1
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))  # this process's number on its machine
MAIN_PROCESS = RANK == 0  # process 0 alone prints, logs to TensorBoard and writes files


# ========================================================================================
# The recipe
# ========================================================================================

# --- Command line -----------------------------------------------------------------------


EXAMPLES = """\
examples:
  python train_mnist.py --epochs=5 --lr=1e-3 --batch_size=64
      the course's command: about 97.8% test accuracy
  python train_mnist.py
      the defaults: about 99.25% in 6 epochs
  python train_mnist.py --lr 0.05 0.1 --batch_size 64 128 --jobs 2
      a sweep over a grid of 4 runs, 2 at a time
  python train_mnist.py --resume runs/NAME
      continue a run that Ctrl-C stopped (or train it for more --epochs)
  python train_mnist.py --evaluate runs/NAME
      test the weights that a run chose
  torchrun --standalone --nproc_per_node=2 train_mnist.py
      one run in 2 processes
  tensorboard --logdir runs
      then open http://localhost:6006

Every flag also takes dashes: --batch-size for --batch_size."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each flag under one spelling and its default once, as it would be typed."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:  # --nesterov, --no-nesterov
            return ", ".join(action.option_strings[:2])
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{action.option_strings[0]} {metavar}"

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is argparse.SUPPRESS or "(default" in action.help:
            return action.help
        if isinstance(default, bool):
            default = "on" if default else "off"
        elif isinstance(default, list):
            default = " ".join(map(str, default))
        return f"{action.help} (default: {default})"


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=exit_on_error, usage="%(prog)s [flags]",
        description="Train a small CNN on MNIST and log the training to TensorBoard. Several values\n"
                    "for --lr, --batch_size, --momentum or --epochs run a sweep over their grid.",
        epilog=EXAMPLES, formatter_class=HelpFormatter, allow_abbrev=False)
    add = parser.add_argument_group("training").add_argument
    add("--epochs", type=positive_int, nargs="+", default=[6], metavar="N",
        help="passes over the training set")
    add("--lr", type=positive_float, nargs="+", default=[0.1], metavar="LR",
        help="peak learning rate of SGD")
    add("--batch_size", "--batch-size", type=positive_int, nargs="+", default=[128], metavar="N",
        help="training images per step")
    add("--momentum", type=momentum_float, nargs="+", default=[0.9], metavar="M", help="SGD momentum")
    add("--weight_decay", "--weight-decay", type=non_negative_float, default=5e-4, metavar="WD",
        help="SGD weight decay (L2 penalty)")
    add("--nesterov", action=argparse.BooleanOptionalAction, default=True,
        help="Nesterov momentum")
    add("--label_smoothing", "--label-smoothing", type=unit_fraction, default=0.0, metavar="EPSILON",
        help="training targets keep 1 - EPSILON on the true digit and share EPSILON over all ten")
    add("--warmup", type=unit_fraction, default=0.1, metavar="FRACTION",
        help="first fraction of the steps over which the learning rate rises linearly from 0 to --lr")
    add("--lr_decay", "--lr-decay", type=unit_fraction, default=0.5, metavar="FRACTION",
        help="final fraction of the steps over which the learning rate falls linearly from --lr to 0 "
             "(0: constant)")
    add("--seed", type=seed_int, default=1, metavar="N",
        help="seed of the weights and of the batch order")
    add("--deterministic", action=argparse.BooleanOptionalAction, default=False,
        help="use only deterministic algorithms (bit-reproducible on one GPU too, a little slower)")
    add("--device", type=available_device, default="auto", metavar="{auto,cpu,cuda,mps}",
        help="where to train; auto takes CUDA if available, else MPS, else the CPU")
    add("--patience", type=non_negative_int, default=0, metavar="K",
        help="stop when validation accuracy has not improved for K epochs (0: off)")
    add("--test_batch_size", "--test-batch-size", type=positive_int, default=1000, metavar="N",
        help="images per evaluation batch")

    add = parser.add_argument_group("data").add_argument
    add("--data_dir", "--data-dir", type=path_flag, default=Path("data"), metavar="DIR",
        help="folder holding MNIST/raw/ (torchvision's layout); downloaded there if absent")
    add("--val_size", "--val-size", type=non_negative_int, default=5000, metavar="N",
        help="training images held out for validation, the same ones in every run: every epoch is "
             "scored on them and best.pt chosen by them; the test set is used once, at the end (0: "
             "train on all and monitor on the test set)")
    add("--verify_data", "--verify-data", action=argparse.BooleanOptionalAction, default=False,
        help="check the MNIST files against the published checksums before using them")

    add = parser.add_argument_group("logging").add_argument
    add("--log_dir", "--log-dir", type=path_flag, default=Path("runs"), metavar="DIR",
        help="TensorBoard folder; each run gets its own sub-folder")
    add("--run_name", "--run-name", type=folder_name, default=None, metavar="NAME",
        help="name of this run's folder (default: the hyper-parameters that differ from the defaults, "
             "then the time: lr0.001_bs64_ep5_1127-182224)")
    add("--num_embeddings", "--num-embeddings", type=non_negative_int, default=256, metavar="N",
        help="training and test digits shown in the projector (0: none)")

    add = parser.add_argument_group("experiments").add_argument
    add("--resume", type=path_flag, default=None, metavar="PATH",
        help="continue the run of this checkpoint (or run folder) up to --epochs")
    add("--jobs", type=positive_int, default=1, metavar="N",
        help="run N points of a sweep at once, each in a process of its own with its share of the CPU "
             "cores (with several GPUs, one GPU each, in turn)")
    add("--evaluate", type=path_flag, default=None, metavar="PATH",
        help="only test this checkpoint and print its accuracy; a run folder means the weights whose test "
             "accuracy the run reported (best.pt; last.pt with --val_size 0)")

    add = parser.add_argument_group("predict your own images").add_argument
    add("--predict", type=path_flag, nargs="+", default=None, metavar="IMG",
        help="images (or folders of them) to read as digits with --checkpoint; nothing is written")
    add("--checkpoint", type=path_flag, default=None, metavar="PATH",
        help="the model for --predict: a checkpoint, or a run folder (its best.pt)")
    add("--save_inputs", "--save-inputs", type=path_flag, default=None, metavar="DIR",
        help="with --predict: also write each image as the model saw it, 28x28, as a PNG in DIR")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict | None]:
    """The flags, and the checkpoint that --resume, --evaluate or --predict names (None without
    them); a resumed or evaluated run's stored flags are the defaults of those not given again."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(map(bool, (args.resume, args.evaluate, args.predict))) > 1:
        parser.error("--resume, --evaluate and --predict exclude each other")
    if bool(args.predict) != bool(args.checkpoint) or (args.save_inputs and not args.predict):
        parser.error("--predict needs --checkpoint (and --checkpoint and --save_inputs need --predict)")
    checkpoint = None
    if args.predict:
        checkpoint = load_checkpoint(args.checkpoint, in_run_dir="best.pt")  # UserError: main() reports it
    elif args.resume or args.evaluate:
        checkpoint = load_checkpoint(args.resume or args.evaluate)
        if args.evaluate and args.evaluate.is_dir() and checkpoint["config"].get("val_size"):
            checkpoint = load_checkpoint(args.evaluate, in_run_dir="best.pt")  # whose test accuracy it gave
        parser.set_defaults(**stored_flags(checkpoint))
        args = parser.parse_args(argv)
        if args.resume:
            refuse_unresumable(parser, args, checkpoint)
    if args.nesterov and 0 in args.momentum:
        parser.error("--nesterov needs a --momentum above 0 (or give --no-nesterov)")
    return args, checkpoint


# --- Data: each split is read once and lives as one normalized tensor on the device -------


class Split(NamedTuple):
    raw: torch.Tensor  # uint8 digits (N, 28, 28) on the host, for pictures
    images: torch.Tensor  # normalized float (N, 1, 28, 28) on the device
    labels: torch.Tensor  # int64 (N,) on the device


def load_split(data_dir: Path, train: bool, device: torch.device, verify: bool = False) -> Split:
    """The training or the test split, from its two files in <data_dir>/MNIST/raw/."""
    raw_dir = data_dir / "MNIST" / "raw"
    images_file, labels_file = (raw_dir / name for name in (MNIST_FILES[:2] if train else MNIST_FILES[2:]))
    raw_images, labels = read_mnist(images_file, labels_file, verify)  # a damaged file is one clear line
    return Split(raw_images, normalize(raw_images.to(device)), labels.long().to(device))


def hold_out(train_set: Split, count: int) -> tuple[Split, Split | None]:
    """(training, validation): `count` training images held out, the same ones for every run, seed
    and number of processes, since VALIDATION_SEED alone chooses them. None without validation."""
    if count == 0:
        return train_set, None
    total = len(train_set.labels)
    if count >= total:
        raise UserError(f"--val_size {count} leaves none of the {total} training images to train on; "
                        "give a smaller --val_size")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return subset(train_set, order[count:].sort().values), subset(train_set, order[:count].sort().values)


def subset(split: Split, indices: torch.Tensor) -> Split:
    on_device = indices.to(split.labels.device)
    return Split(split.raw[indices], split.images[on_device], split.labels[on_device])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 digits (N, 28, 28) -> float (N, 1, 28, 28) with the training set's mean and std."""
    return images.unsqueeze(1).float().div(255).sub(MNIST_MEAN).div(MNIST_STD)


class DeviceLoader:
    """Mini-batches drawn from tensors that already live on the device: no workers, no per-sample
    transforms, a batch is one index. A shuffled epoch's order is seeded by (seed, epoch) alone,
    so any epoch can be replayed exactly; the last partial batch is kept.

    Under torchrun process `rank` takes every `world_size`-th sample of that order (padded, as
    DistributedSampler does, so that every process takes the same number of steps).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, rank: int = RANK, world_size: int = WORLD_SIZE) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This process's samples for the current epoch, in order."""
        count = len(self.labels)
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * 100_000 + self.epoch) % 2**64)
            order = torch.randperm(count, generator=generator)
            order = torch.cat([order, order[:-count % self.world_size]])
        else:
            order = torch.arange(count)
        return order[self.rank::self.world_size].to(self.labels.device)

    def __len__(self) -> int:
        count = len(self.labels)
        if self.shuffle:
            count = math.ceil(count / self.world_size)
        else:
            count = len(range(self.rank, count, self.world_size))
        return math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, first: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from number `first` on (a resumed epoch skips those done)."""
        order = self.indices()
        for start in range(first * self.batch_size, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.images[batch], self.labels[batch]


# --- One epoch of training, and the test ------------------------------------------------


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
          loader: DeviceLoader, loss_fn: torch.nn.Module, first_batch: int, stop: "StopFlag", title: str,
          ) -> tuple[list[float], list[float]]:
    """Train one epoch from batch `first_batch` on; return each step's loss and learning rate.
    Ends early when a signal asks to stop or the loss is no longer finite (under torchrun, all
    processes at the same step, with losses averaged over them)."""
    model.train()
    # Step losses stay on the device and come to the host every LOSS_EVERY steps: a .item()
    # per step would make a GPU wait for every batch.
    step_losses = torch.zeros(len(loader) - first_batch, device=loader.labels.device)
    step_lrs = []
    with tqdm(loader.batches(first_batch), desc=title, total=len(loader),
              initial=first_batch, unit="batch", dynamic_ncols=True, disable=not MAIN_PROCESS) as bar:
        for step, (images, labels) in enumerate(bar):
            if stop.requested(step):
                break
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step_lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            step_losses[step] = loss.detach()
            if step % LOSS_EVERY == LOSS_EVERY - 1:
                recent_loss = step_losses[step + 1 - LOSS_EVERY:step + 1].mean().item()
                bar.set_postfix(loss=f"{recent_loss:.4f}")
                if any_process(not math.isfinite(recent_loss)):
                    break  # diverged: run() reports it
    return mean_over_processes(step_losses[:len(step_lrs)]).tolist(), step_lrs


@dataclasses.dataclass
class Evaluation:
    """One pass over the test set: the numbers, and the logits for the figures."""

    loss: float
    accuracy: float
    logits: torch.Tensor  # (N, 10), on the device
    labels: torch.Tensor  # (N,)

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)


@torch.no_grad()
def test(model: torch.nn.Module, loader: DeviceLoader) -> Evaluation:
    """Mean cross-entropy and accuracy over the whole test set (under torchrun each process
    scores its share, and the logits of all are gathered)."""
    model.eval()
    logits = gather_from_processes(torch.cat([model(images) for images, _ in loader]), len(loader.labels))
    loss = F.cross_entropy(logits, loader.labels, reduction="sum").item() / len(loader.labels)
    accuracy = (logits.argmax(dim=1) == loader.labels).sum().item() / len(loader.labels)
    return Evaluation(loss, accuracy, logits, loader.labels)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_fraction: float, decay_fraction: float,
                   total_steps: int, start_step: int = 0) -> LambdaLR:
    """Rise linearly from 0 to --lr over the first `warmup_fraction` of the steps, hold, then fall
    linearly to 0 over the last `decay_fraction`. A warm-up lets a high rate start without
    blowing up; the final decay settles the weights into a minimum. The rate is a function of
    the step alone, so a resumed run starts at `start_step`."""
    warmup_steps, decay_steps = warmup_fraction * total_steps, decay_fraction * total_steps

    def factor(step: int) -> float:
        rise = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
        fall = 1.0 if decay_steps == 0 else min(1.0, max(0.0, total_steps - step) / decay_steps)
        return min(rise, fall)

    return LambdaLR(optimizer, factor, last_epoch=start_step - 1)


# --- The run ----------------------------------------------------------------------------


def run(args: argparse.Namespace, device: torch.device, checkpoint: dict | None,  # noqa: C901, PLR0912, PLR0915
        stop: "StopFlag") -> dict | None:
    """One training run, new or resumed from `checkpoint`; returns its final metrics on process 0.
    The recipe's whole story in the order it happens, kept in one function on purpose. `args`
    holds single values: a sweep calls run() once per point of its grid."""
    with main_process_first():  # under torchrun only process 0 downloads; the others wait for it
        download_missing(args.data_dir, MNIST_FILES)
    all_train = load_split(args.data_dir, True, device, args.verify_data)
    train_set, validation_set = hold_out(all_train, args.val_size)
    test_set = load_split(args.data_dir, False, device, args.verify_data)
    # Every epoch is scored on the validation set, and best.pt chosen by it; the test set is used
    # once, at the end. With --val_size 0 the test set takes the validation set's place.
    monitor, monitored = ("validation", validation_set) if validation_set else ("test", test_set)
    train_loader = DeviceLoader(train_set.images, train_set.labels, args.batch_size, shuffle=True,
                                seed=args.seed)
    monitor_loader = DeviceLoader(monitored.images, monitored.labels, args.test_batch_size)
    test_loader = DeviceLoader(test_set.images, test_set.labels, args.test_batch_size)
    steps_per_epoch = len(train_loader)

    set_determinism(args.deterministic)
    torch.manual_seed(args.seed)
    model_without_ddp = MNISTNet().to(device)
    optimizer = torch.optim.SGD(model_without_ddp.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.nesterov, weight_decay=args.weight_decay)
    stop.on_signal = stop.SAVE  # from here on a signal is honoured at a safe point, with the state saved
    if checkpoint is None:
        progress, run_dir = Progress(), make_run_dir(args) if MAIN_PROCESS else None
    else:  # the saved state, then the flags given again
        progress, run_dir = resume(checkpoint, model_without_ddp, optimizer, args)
    best_weights = checkpoint.get("best_model") if checkpoint else None  # of the best epoch so far
    scheduler = make_scheduler(optimizer, args.warmup, args.lr_decay,
                               progress.total_steps(args.epochs, steps_per_epoch), start_step=progress.step)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    model = wrap_for_processes(model_without_ddp, device)  # under torchrun, DDP averages the gradients
    config = config_of(args, run_dir, checkpoint, progress)

    with (claim_run_dir(run_dir, checkpoint, progress, config),  # this process alone writes in it
          SummaryWriter(run_dir, max_queue=EVENT_QUEUE) if MAIN_PROCESS
          else contextlib.nullcontext() as writer):
        if writer:
            print(f"Training on {device} with seed {args.seed}"
                  + (f" in {WORLD_SIZE} processes" if WORLD_SIZE > 1 else "") + f"; logging to {run_dir}")
        if writer and checkpoint is None:
            with progress.timing_logging(), warnings.catch_warnings():
                writer.add_image(f"{PICTURES}training digits",
                                 image_grid(train_set.raw[:64, None] / 255, columns=8))
                warnings.simplefilter("ignore")  # add_graph traces with torch.jit, which warns of it
                writer.add_graph(model_without_ddp, train_set.images[:64])

        while progress.epoch < args.epochs:
            epoch, first_step = progress.epoch + 1, progress.step + 1
            train_loader.set_epoch(epoch)
            started = time.perf_counter()
            step_losses, step_lrs = train(model, optimizer, scheduler, train_loader, loss_fn, progress.batch,
                                          stop, title=f"Epoch {epoch}/{args.epochs}")
            progress.add_steps(step_losses, seconds=time.perf_counter() - started)
            if writer:
                with progress.timing_logging():
                    for step, (loss, lr) in enumerate(zip(step_losses, step_lrs), start=first_step):
                        writer.add_scalar("training loss/per step", loss, step)
                        writer.add_scalar("learning rate", lr, step)
            stop_if_diverged(model_without_ddp, progress.loss_sum, epoch, args.lr)
            if progress.batch < steps_per_epoch:  # a signal stopped the epoch midway: keep its place
                state = training_state(model_without_ddp, optimizer, progress, config, best_weights)
                save_on_main(state, run_dir, "last")
                raise Interrupted(stop.signum, run_dir)

            evaluation = test(model_without_ddp, monitor_loader)
            improved = evaluation.accuracy > progress.best_accuracy
            record = progress.end_epoch(evaluation, steps_per_epoch, monitor)
            if improved:
                best_weights = {key: value.clone() for key, value in model_without_ddp.state_dict().items()}
            if writer:
                writer.add_scalar("training loss", record["train_loss"], epoch)
                writer.add_scalar(f"{monitor} loss", evaluation.loss, epoch)
                writer.add_scalar(f"{monitor} accuracy", evaluation.accuracy, epoch)
                with progress.timing_logging():
                    log_epoch_details(writer, model_without_ddp, evaluation, epoch, monitor)
                    writer.flush()
                tqdm.write(f"Epoch {epoch}: train loss {record['train_loss']:.4f}, {monitor} loss "
                           f"{evaluation.loss:.4f}, {monitor} accuracy {evaluation.accuracy:.4f}")
            state = training_state(model_without_ddp, optimizer, progress, config, best_weights)
            save_on_main(state, run_dir, "last")
            if improved:
                save_on_main(state, run_dir, "best")
            if stop.requested():
                raise Interrupted(stop.signum, run_dir)
            if progress.out_of_patience(args.patience):
                report(f"Stopping early: {monitor} accuracy has not improved for {args.patience} epochs "
                       f"(best {progress.best_accuracy:.4f}, epoch {progress.best_epoch})")
                break

        stop.on_signal = stop.FINISH  # training is over and saved: a signal skips what is left to log
        # The test set, once, on the weights that validation chose (without a validation set, on
        # the final weights, which the test set has scored every epoch).
        tested = model_without_ddp
        if validation_set is not None and best_weights is not None:
            tested = MNISTNet().to(device)
            tested.load_state_dict(best_weights)
        evaluation = test(tested, test_loader)
        if not writer:
            return None
        metrics = log_results(writer, tested, config, progress, evaluation, train_set, test_set, stop)
        write_json(run_dir / "metrics.json", metrics)  # last: only a finished run has one
    print(f"Test accuracy: {metrics['test_accuracy']:.4f}" + (
        f" (the weights of epoch {progress.best_epoch}, chosen by validation accuracy "
        f"{progress.best_accuracy:.4f})" if validation_set else
        " (--val_size 0: best.pt and every epoch's curve were scored on this test set, so this figure is "
        "optimistic)"))
    print(f"Run directory: {run_dir}")
    return metrics | {"run_dir": str(run_dir)}


def log_results(writer: SummaryWriter, tested_net: MNISTNet, config: dict, progress: "Progress",
                evaluation: Evaluation, train_set: Split, test_set: Split, stop: "StopFlag") -> dict:
    """After training: the test set's figures and the learned features of `tested_net` (the weights
    the test set scored), and the HPARAMS row. A signal here skips the figures and embeddings not
    yet made: the training is saved already."""
    epochs, count, seed = progress.epoch, config["num_embeddings"], config["seed"]
    if config["val_size"]:  # the test set's one score; without validation it has a point every epoch
        writer.add_scalar("test accuracy", evaluation.accuracy, epochs)
        writer.add_scalar("test loss", evaluation.loss, epochs)
    with progress.timing_logging(), keep_earlier_embeddings(Path(writer.log_dir)):
        if stop.signum is None:
            log_test_figures(writer, evaluation, test_set.raw, epochs)
        # Filed under the epoch (<run>/000NN/<tag>/): a run resumed to train longer adds its
        # new embeddings beside the old ones.
        for tag, split, predictions in (("train features", train_set, None),
                                        ("test features", test_set, evaluation.predictions)):
            if count and stop.signum is None:
                writer.add_embedding(**embedding(tested_net, split, count, seed, predictions),
                                     tag=tag, global_step=epochs)
    metrics = final_metrics(progress, evaluation, len(train_set.labels))
    # One HPARAMS row, written into this run's own folder (writer.add_hparams would start a
    # separate sub-run): the columns, typed, then this run's values. The metric columns show the
    # last points of the run's own curves.
    writer.file_writer.add_summary(hparams_columns())
    values = {key: config[key] for key in HPARAMS} | {"changed on resume": changes_on_resume(config)}
    writer.file_writer.add_summary(hp.hparams_pb(values, trial_id=Path(writer.log_dir).name))
    writer.flush()
    return metrics


# --- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Train one run, a sweep of runs, or test a checkpoint; returns the exit code."""
    try:
        args, checkpoint = parse_args(argv)
        with StopFlag() as stop:
            device = start_distributed(args.device)
            if args.evaluate:
                evaluate(checkpoint, args, device)
                return 0
            if args.predict:
                return predict(args.predict, checkpoint, device, args.save_inputs)
            runs = expand_sweep(args)
            if len(runs) == 1:
                run(runs[0], device, checkpoint, stop)
            else:
                sweep(runs, device, stop, args.jobs)
            if stop.signum is not None:  # it came during the final logging: nothing was lost
                report(f"Stopped by {signal.Signals(stop.signum).name} as the run finished.")
                return 128 + stop.signum
    except UserError as error:
        report(f"error: {error}", every_node=True)
        return 1
    except (Interrupted, KeyboardInterrupt) as interrupted:
        return report_interrupt(interrupted)
    finally:
        end_distributed()
    return 0


# ========================================================================================
# Supporting machinery
# ========================================================================================

# --- TensorBoard extras: what the network does, beyond the curves ------------------------


def log_epoch_details(writer: SummaryWriter, net: MNISTNet, evaluation: Evaluation, epoch: int,
                      monitor: str) -> None:
    """Every epoch: weight and gradient histograms, accuracy per digit (on the `monitor` set), the
    conv1 filters."""
    for name, parameter in net.named_parameters():
        writer.add_histogram(f"weights/{name}", parameter.detach(), epoch, bins=HISTOGRAM_BINS)
        if parameter.grad is not None:  # the gradient of the epoch's last step
            writer.add_histogram(f"weight gradients/{name}", parameter.grad, epoch, bins=HISTOGRAM_BINS)
    for digit, accuracy in enumerate(class_accuracy(evaluation.labels, evaluation.predictions)):
        writer.add_scalar(f"{monitor} accuracy per digit/{digit}", accuracy, epoch)
    filters = net.conv1.weight.detach().cpu()  # (8, 1, 5, 5)
    low = filters.amin(dim=(1, 2, 3), keepdim=True)
    high = filters.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (filters - low) / (high - low).clamp(min=1e-8)  # each filter stretched to [0, 1]
    enlarged = F.interpolate(scaled, scale_factor=8, mode="nearest")  # 5x5 pixels are too small to see
    writer.add_image(f"{PICTURES}conv1 filters", image_grid(enlarged, columns=8, pad_value=1), epoch)


def image_grid(images: torch.Tensor, columns: int, pad_value: float = 0.0, padding: int = 2) -> torch.Tensor:
    """Images (N, 1, H, W) in [0, 1] tiled into one (1, H', W') picture, as torchvision's make_grid."""
    count, _, height, width = images.shape
    rows = math.ceil(count / columns)
    grid = torch.full((1, rows * (height + padding) + padding, columns * (width + padding) + padding),
                      float(pad_value))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    return grid


def log_test_figures(writer: SummaryWriter, evaluation: Evaluation, raw_images: torch.Tensor,
                     epoch: int) -> None:
    """After training: confusion matrix, misclassified digits, a PR curve per digit."""
    labels, predictions = evaluation.labels, evaluation.predictions
    for tag, picture in ((f"{PICTURES}confusion matrix", confusion_image(labels, predictions)),
                         (f"{PICTURES}misclassified digits",
                          misclassified_image(raw_images, labels, predictions))):
        writer.add_image(tag, np.asarray(picture), epoch, dataformats="HWC")
    probabilities = F.softmax(evaluation.logits, dim=1).cpu()
    for digit in range(10):
        writer.add_pr_curve(f"pr curve/{digit}", (labels == digit).cpu(), probabilities[:, digit], epoch)


def class_accuracy(labels: torch.Tensor, predictions: torch.Tensor) -> list[float]:
    """Accuracy on the test digits of each class, 0 to 9."""
    hits = torch.bincount(labels[predictions == labels], minlength=10)
    return (hits / torch.bincount(labels, minlength=10).clamp(min=1)).tolist()


def confusion_counts(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """counts[true, predicted]: how many test digits of each class got each prediction."""
    return torch.bincount(labels * 10 + predictions, minlength=100).view(10, 10).cpu()


# The two final figures are drawn with Pillow at the size TensorBoard shows them: quicker than
# matplotlib (which the whole run would wait for), and the numbers stay readable in the cards.
PAPER, INK, FAINT = (255, 255, 255), (30, 30, 30), (225, 225, 225)
RIGHT, WRONG = (205, 222, 245), (200, 40, 30)  # a right answer's blue, the colour of mistakes


@functools.cache  # a figure writes a hundred numbers in three sizes: each size loaded once
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's own font: nothing to install


def confusion_image(labels: torch.Tensor, predictions: torch.Tensor) -> Image.Image:
    """The confusion matrix: a cell per (true, predicted) pair with its count. The right answers
    lie on a blue diagonal; each kind of mistake is red, darker the more often it happened; a
    pair that never happened is left blank."""
    counts = confusion_counts(labels, predictions).tolist()
    cell, left, top = 40, 44, 70  # pixels: a cell, and the margins for the digits around the grid
    picture = Image.new("RGB", (left + 10 * cell + 8, top + 10 * cell + 8), PAPER)
    draw = ImageDraw.Draw(picture)
    total, right = sum(map(sum, counts)), sum(counts[digit][digit] for digit in range(10))
    draw.text((6, 6), f"Confusion matrix: {total} test digits, {total - right} wrong", font=font(16),
              fill=INK)
    draw.text((left, 30), "predicted digit", font=font(13), fill=INK)
    draw.text((4, 52), "true", font=font(13), fill=INK)
    most_wrong = max(max(count for predicted, count in enumerate(row) if predicted != true)
                     for true, row in enumerate(counts)) or 1
    for true in range(10):
        draw.text((left - 14, top + true * cell + cell // 2), str(true), font=font(15), fill=INK, anchor="mm")
        draw.text((left + true * cell + cell // 2, top - 10), str(true), font=font(15), fill=INK, anchor="mm")
        for predicted in range(10):
            count = counts[true][predicted]
            x, y = left + predicted * cell, top + true * cell
            background, text = PAPER, INK
            if true == predicted:
                background = RIGHT
            elif count:
                shade = 0.25 + 0.75 * count / most_wrong  # the rarest mistake still shows
                background = tuple(round(255 + (channel - 255) * shade) for channel in WRONG)
                text = PAPER if shade > 0.55 else INK
            draw.rectangle((x, y, x + cell, y + cell), fill=background, outline=FAINT)
            if count:
                draw.text((x + cell // 2, y + cell // 2), str(count), font=font(15 if count < 1000 else 14),
                          fill=text, anchor="mm")
    return picture


def misclassified_image(raw_images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                        count: int = 36) -> Image.Image:
    """The first `count` misclassified test digits, each at twice its size above its true and
    predicted digit."""
    wrong = (predictions != labels).nonzero().flatten().cpu()
    shown = wrong[:count].tolist()
    columns, cell_width, cell_height, top = 6, 72, 96, 30  # pixels
    rows = max(1, math.ceil(len(shown) / columns))
    picture = Image.new("RGB", (columns * cell_width + 8, top + rows * cell_height), PAPER)
    draw = ImageDraw.Draw(picture)
    draw.text((6, 6), f"Misclassified test digits: the first {len(shown)} of {len(wrong)}", font=font(16),
              fill=INK)
    for place, index in enumerate(shown):
        row, column = divmod(place, columns)
        x, y = 4 + column * cell_width + (cell_width - 56) // 2, top + row * cell_height
        picture.paste(Image.fromarray(raw_images[index].numpy()).resize((56, 56), Image.NEAREST), (x, y))
        caption = f"true {int(labels[index])}\npred {int(predictions[index])}"
        draw.multiline_text((x + 28, y + 58), caption, font=font(13), fill=INK, anchor="ma", align="center")
    return picture


# The HPARAMS columns, with their types: TensorBoard has no integer type (its numbers are all
# floats, shown with 5 digits: 64.000) and infers none from the values alone.
ANY_INT, ANY_FLOAT = hp.IntInterval(0, 2**64 - 1), hp.RealInterval(0.0, sys.float_info.max)
SWITCH, FRACTION = hp.Discrete([False, True]), hp.RealInterval(0.0, 1.0)
HPARAM_COLUMNS = (
    hp.HParam("lr", ANY_FLOAT, "lr"), hp.HParam("batch_size", ANY_INT, "batch size"),
    hp.HParam("epochs", ANY_INT, "epochs"), hp.HParam("momentum", FRACTION, "momentum"),
    hp.HParam("weight_decay", ANY_FLOAT, "weight decay"), hp.HParam("warmup", FRACTION, "warm-up"),
    hp.HParam("lr_decay", FRACTION, "lr decay"), hp.HParam("nesterov", SWITCH, "Nesterov"),
    hp.HParam("label_smoothing", FRACTION, "label smoothing"), hp.HParam("seed", ANY_INT, "seed"),
    hp.HParam("deterministic", SWITCH, "deterministic"), hp.HParam("val_size", ANY_INT, "validation images"),
    hp.HParam("patience", ANY_INT, "patience"), hp.HParam("changed on resume", hp.Discrete(["none"])))
# The test accuracy first: TensorBoard puts the metrics after five hyper-parameters, at the
# right edge of a narrow window.
METRIC_COLUMNS = tuple(hp.Metric(tag) for tag in ("test accuracy", "validation accuracy", "test loss",
                                                   "validation loss"))
SHOWN_FIRST = {*SWEEP_FLAGS, "seed"}  # what tells the runs of a sweep, or of seeds, apart


def hparams_columns() -> Summary:
    """TensorBoard's declaration of the HPARAMS columns. It shows five hyper-parameters at first,
    those marked as differing between runs, by name: marked here are the ones that usually do."""
    summary = hp.hparams_config_pb(HPARAM_COLUMNS, METRIC_COLUMNS)
    plugin_data = summary.value[0].metadata.plugin_data
    declaration = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
    for column in declaration.experiment.hparam_infos:
        column.differs = column.name in SHOWN_FIRST
        if column.name == "changed on resume":  # any text: no list of values to filter by
            column.ClearField("domain_discrete")
    plugin_data.content = declaration.SerializeToString()
    return summary


@torch.no_grad()
def embedding(net: MNISTNet, split: Split, count: int, seed: int,
              predictions: torch.Tensor | None = None) -> dict:
    """add_embedding's arguments for the learned 256-d features of `count` random digits.

    Labelled with the digit, and with the network's prediction too when given, so that the
    projector can colour the points by either.
    """
    pick = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:count]
    net.eval()
    features = net.get_features(split.images[pick.to(split.images.device)]).cpu()
    labels = split.labels[pick.to(split.labels.device)].tolist()
    if predictions is None:
        metadata, header = labels, None
    else:
        chosen_predictions = predictions[pick.to(predictions.device)].tolist()
        metadata, header = [list(pair) for pair in zip(labels, chosen_predictions)], ["label", "prediction"]
    # Thumbnails in [0, 1]: raw 0-255 values would saturate the sprite to white.
    return {"mat": features, "metadata": metadata, "metadata_header": header,
            "label_img": split.raw[pick, None] / 255}


# --- Checkpoints, resume and reproducibility ---------------------------------------------
# A checkpoint is a plain dict of tensors and numbers, readable with weights_only=True.

CHECKPOINT_KEYS = {"model", "optimizer", "epoch", "global_step", "progress", "rng", "config"}


@dataclasses.dataclass
class Progress:
    """Where a run stands; saved in every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed in the epoch under way
    step: int = 0  # optimizer steps over the whole run: the x-axis of the per-step curves
    loss_sum: float = 0.0  # sum of those batches' losses, for the epoch's mean
    best_accuracy: float = -1.0  # on the validation set (on the test set with --val_size 0)
    best_epoch: int = 0
    seconds: float = 0.0  # training time so far, over all sessions of the run
    logging_seconds: float = 0.0  # time spent writing TensorBoard: curves, graph, histograms, figures
    history: list = dataclasses.field(default_factory=list)  # one metrics dict per epoch

    def total_steps(self, epochs: int, steps_per_epoch: int) -> int:
        """The run's steps in all: those taken before this epoch's batch 0, then the epochs left at
        today's batch size (a resumed run may change it)."""
        return self.step - self.batch + (epochs - self.epoch) * steps_per_epoch

    def restart_epoch(self) -> None:
        """The epoch under way starts again from its first batch; the steps already taken count."""
        self.batch, self.loss_sum = 0, 0.0

    def add_steps(self, step_losses: list[float], seconds: float) -> None:
        self.step += len(step_losses)
        self.batch += len(step_losses)
        self.loss_sum += sum(step_losses)
        self.seconds += seconds

    def end_epoch(self, evaluation: Evaluation, steps_per_epoch: int, monitor: str) -> dict:
        """Record the finished epoch's metrics (and return them), scored on the `monitor` set;
        the next epoch starts at batch 0."""
        self.epoch += 1
        record = {"epoch": self.epoch, "train_loss": self.loss_sum / steps_per_epoch,
                  f"{monitor}_loss": evaluation.loss, f"{monitor}_accuracy": evaluation.accuracy}
        self.history.append(record)
        if evaluation.accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch = evaluation.accuracy, self.epoch
        self.batch, self.loss_sum = 0, 0.0
        return record

    def out_of_patience(self, patience: int) -> bool:
        """--patience: no better accuracy in the last `patience` epochs (0: never)."""
        return patience > 0 and self.epoch - self.best_epoch >= patience

    @contextlib.contextmanager
    def timing_logging(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.logging_seconds += time.perf_counter() - started


def training_state(model_without_ddp: MNISTNet, optimizer: torch.optim.Optimizer, progress: Progress,
                   config: dict, best_weights: dict | None) -> dict:
    """All that a resumed run needs to continue exactly, the weights of its best epoch included (the
    test set scores them at the end); the weights are the same in every process. The
    learning-rate schedule needs no state of its own: it is a function of the step."""
    return {"model": model_without_ddp.state_dict(), "best_model": best_weights,
            "optimizer": optimizer.state_dict(),
            "epoch": progress.epoch, "global_step": progress.step, "world_size": WORLD_SIZE,
            "progress": dataclasses.asdict(progress), "rng": {"torch": torch.get_rng_state()},
            "config": config}


def save_on_main(checkpoint: dict, run_dir: Path, name: str) -> None:
    """Process 0 writes run_dir/checkpoints/<name>.pt, atomically."""
    if MAIN_PROCESS:
        atomic_write(run_dir / "checkpoints" / f"{name}.pt", lambda file: save_tensors(checkpoint, file))


def save_tensors(checkpoint: dict, file: BinaryIO) -> None:
    """torch.save into memory, then one write to the file: a full disk is then the OSError it is
    (torch.save writing to a file reports it as a RuntimeError). A checkpoint is under 1 MB."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    file.write(buffer.getbuffer())


def load_checkpoint(path: Path, in_run_dir: str = "last.pt") -> dict:
    """Read a checkpoint file, or a run folder's checkpoints/<in_run_dir>, without running any code."""
    if path.is_dir():
        path = path / "checkpoints" / in_run_dir
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; give a .pt file or a run folder with "
                        f"checkpoints/{in_run_dir}")
    try:
        # weights_only: tensors, numbers, strings and containers only; a pickled object that
        # would run code when loaded is refused instead.
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} cannot be loaded safely: it holds Python objects other than tensors "
                        "and numbers, which could run code when unpickled; refused") from None
    except Exception as error:  # torch.load raises many types for a file that is no checkpoint
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"{path} cannot be loaded safely: it is not a PyTorch checkpoint "
                        f"({reason})") from None
    if not isinstance(checkpoint, dict) or not checkpoint.keys() >= CHECKPOINT_KEYS:
        raise UserError(f"{path} is not a train_mnist.py checkpoint (it lacks model, optimizer, ...)")
    checkpoint["path"] = path
    return checkpoint


def as_command_line(flags: dict) -> list[str]:
    """Flag values as the command line that gives them: `--key value`, and `--key` or `--no-key`
    for the on/off flags. A value other than on or off for an on/off flag becomes `--key=value`,
    which the parser refuses with the flag's name."""
    parser, argv = build_parser(), []
    for key, value in flags.items():
        if not isinstance(parser.get_default(key), bool):
            argv += [f"--{key}", str(value)]
        elif isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        else:
            argv.append(f"--{key}={value}")
    return argv


def stored_flags(checkpoint: dict) -> dict:
    """The flags of a checkpoint's run, each through the same check as on the command line."""
    saved = {"val_size": 0} | checkpoint["config"]  # runs from before validation trained on all
    argv = as_command_line({key: saved[key] for key in RESUMED_FLAGS if key in saved})
    try:
        stored, unknown = build_parser(exit_on_error=False).parse_known_args(argv)
        if unknown:
            raise argparse.ArgumentError(None, f"unexpected {' '.join(unknown)}")
    except argparse.ArgumentError as error:
        raise UserError(f"{checkpoint['path']} holds an invalid flag ({error}): it was changed, or not "
                        "written by train_mnist.py") from None
    return {key: getattr(stored, key) for key in RESUMED_FLAGS if key in saved}


def refuse_unresumable(parser: argparse.ArgumentParser, args: argparse.Namespace, checkpoint: dict) -> None:
    """--resume honours every flag given again, except those that would make it another run."""
    if any(len(getattr(args, key)) > 1 for key in SWEEP_FLAGS):
        parser.error("--resume continues one run: give single values for " + ", ".join(SWEEP_FLAGS))
    saved_val_size = checkpoint["config"].get("val_size", 0)
    if args.val_size != saved_val_size:
        parser.error(f"--val_size cannot change on --resume: it chose the training images (this run "
                     f"holds out {saved_val_size}); start a new run for another split")
    saved_seed = checkpoint["config"].get("seed", args.seed)
    if args.seed != saved_seed:
        parser.error(f"--seed cannot change on --resume: it chose the run's initial weights and its "
                     f"batch order (this run has seed {saved_seed}); start a new run for another seed")
    if args.run_name is not None and args.run_name != run_dir_of(checkpoint).name:
        parser.error(f"--run_name cannot rename a run on --resume: it continues in {run_dir_of(checkpoint)}")


def restore_model(net: MNISTNet, checkpoint: dict) -> None:
    try:
        net.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"{checkpoint['path']} holds weights of a different network than MNISTNet") from None


def run_dir_of(checkpoint: dict) -> Path:
    return checkpoint["path"].parent.parent  # <run>/checkpoints/<name>.pt


def resume(checkpoint: dict, model_without_ddp: MNISTNet, optimizer: torch.optim.Optimizer,
           args: argparse.Namespace) -> tuple[Progress, Path]:
    """Load a checkpoint's state to continue its run with `args`: returns (progress, run folder).
    The flags given again win over the saved state; nothing in the run folder changes yet."""
    restore_model(model_without_ddp, checkpoint)  # first: another network's weights are the worse mistake
    if checkpoint["path"].parent.name != "checkpoints":
        raise UserError("--resume continues a run in its folder: give the run folder, or a checkpoint "
                        "in its checkpoints/ folder (use --evaluate to test a loose checkpoint)")
    run_dir = run_dir_of(checkpoint)
    finished = finished_epochs(run_dir, checkpoint)
    if finished is not None and args.epochs <= finished:
        raise UserError(f"run {run_dir} has finished its {finished} epochs; resume it with --epochs larger "
                        f"than {finished} to train longer")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        progress = Progress(**checkpoint["progress"])
        progress.step = int(checkpoint["global_step"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise UserError(f"{checkpoint['path']} lacks part of the training state (optimizer or position), "
                        "so it cannot be resumed; --evaluate can still test it") from None
    for group in optimizer.param_groups:  # the saved state brought back the old values
        group.update(lr=args.lr, initial_lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                     weight_decay=args.weight_decay)
    if (checkpoint["config"].get("batch_size") != args.batch_size
            or checkpoint.get("world_size", 1) != WORLD_SIZE):
        # Another batch size or number of processes splits an epoch into other steps: an
        # interrupted epoch starts again from its first batch.
        progress.restart_epoch()
    if MAIN_PROCESS:
        print(f"Resuming {run_dir} at epoch {progress.epoch + 1}, batch {progress.batch}")
    return progress, run_dir


def finished_epochs(run_dir: Path, checkpoint: dict) -> int | None:
    """How many epochs the run had when it finished (it has a metrics.json); None if unfinished."""
    try:
        return int(json.loads((run_dir / "metrics.json").read_text())["epochs"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # damaged: the checkpoint's run length will do
        return int(checkpoint["config"].get("epochs", checkpoint["epoch"]))


def changes_on_resume(config: dict) -> str:
    """The flags changed by each resume, for the HPARAMS row: e.g. 'lr 0.02->0.05 at step 1876'."""
    changes = [f"{key} {old}->{new} at step {session['step']}"
               for session in config.get("resumed", []) for key, (old, new) in session["changed"].items()]
    return "; ".join(changes) or "none"


def evaluate(checkpoint: dict, args: argparse.Namespace, device: torch.device) -> float:
    """Test a checkpoint on the test set and print its accuracy; no training, no run folder."""
    net = MNISTNet().to(device)
    restore_model(net, checkpoint)
    with main_process_first():  # only process 0 downloads
        download_missing(args.data_dir, MNIST_FILES[2:])  # testing needs only the test files
    test_set = load_split(args.data_dir, False, device, args.verify_data)
    result = test(net, DeviceLoader(test_set.images, test_set.labels, args.test_batch_size))
    if MAIN_PROCESS:
        print(f"Checkpoint: {checkpoint['path']} (epoch {checkpoint['epoch']})")
        print(f"Test loss: {result.loss:.4f}")
        print(f"Test accuracy: {result.accuracy:.4f}")
    return result.accuracy


def set_determinism(deterministic: bool) -> None:
    """--deterministic: slower kernels that give the same result every time, on a GPU too."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


# --- Run folders, files and sweeps -------------------------------------------------------


def make_run_dir(args: argparse.Namespace) -> Path:
    """Create a fresh run folder; two runs never share one, even when started together."""
    base = args.run_name or f"{changed_flags(args)}_{datetime.datetime.now():%m%d-%H%M%S}"
    try:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1 if args.run_name else 1000):
            run_dir = args.log_dir / (base if attempt == 0 else f"{base}_{attempt + 1}")
            with contextlib.suppress(FileExistsError):
                run_dir.mkdir()  # atomic: of two runs racing for a name, one gets it
                return run_dir
    except OSError as error:
        raise UserError(f"cannot create a run folder in {args.log_dir}: {error.strerror}; "
                        f"{how_to_fix(error, '--log-dir')}") from None
    if not args.run_name:
        raise UserError(f"too many runs named {base}* in {args.log_dir}; pick a --run-name")
    taken = args.log_dir / args.run_name
    if not (taken / "checkpoints" / "last.pt").exists():
        raise UserError(f"run {taken} already exists, without a checkpoint to resume (it stopped before "
                        "its first epoch ended); delete it or pick another --run-name")
    raise UserError(f"run {taken} already exists; pick another --run-name, or continue it with "
                    f"--resume {taken}")


NAME_KEYS = {"lr": "lr", "batch_size": "bs", "epochs": "ep", "momentum": "mom", "weight_decay": "wd",
             "warmup": "warmup", "lr_decay": "decay", "nesterov": "nesterov", "label_smoothing": "ls",
             "seed": "seed", "deterministic": "det", "val_size": "val", "patience": "patience"}


def changed_flags(args: argparse.Namespace) -> str:
    """The hyper-parameters that differ from the defaults, short, as a run's name begins:
    `lr0.001_bs64_ep5` for the course's command, `default` for none. TensorBoard cuts long run
    names, so what tells runs apart comes first, and the time stamp last."""
    parser, changed = build_parser(), []
    for key, short in NAME_KEYS.items():
        value, default = getattr(args, key), parser.get_default(key)
        if value != (default[0] if isinstance(default, list) else default):
            switch = short if value else f"no{short}"
            changed.append(switch if isinstance(value, bool) else f"{short}{value:g}")
    return "_".join(changed) or "default"


def config_of(args: argparse.Namespace, run_dir: Path | None, checkpoint: dict | None = None,
              progress: Progress | None = None) -> dict:
    """What a run really uses, as JSON (config.json, and in every checkpoint): the resolved flags,
    its folder, and for each time it was resumed, where and which flags changed."""
    config = {key: str(value) if isinstance(value, (Path, torch.device)) else value
              for key, value in vars(args).items() if key not in {"resume", "evaluate"}}
    config["run_dir"], config["resumed"] = str(run_dir), []
    if checkpoint is not None:
        saved = checkpoint["config"]
        changed = {key: [saved[key], config[key]] for key in RESUMED_FLAGS
                   if key in saved and saved[key] != config[key]}
        session = {"from": str(checkpoint["path"]), "epoch": progress.epoch, "step": progress.step,
                   "changed": changed}
        config["resumed"] = [*saved.get("resumed", []), session]
    return config


@contextlib.contextmanager
def claim_run_dir(run_dir: Path | None, checkpoint: dict | None, progress: Progress,
                  config: dict) -> Iterator[None]:
    """Process 0 takes the run folder for itself alone, forgets what the run wrote after the
    checkpoint it resumes, and writes config.json. From then on a write that fails in the folder
    (a full disk, say) ends the run with one line naming the file."""
    if not MAIN_PROCESS:
        yield
        return
    # SummaryWriter writes from a thread of its own, which prints its failure as a traceback,
    # then hands it to this thread: say it once, here, as one line.
    threads_report = threading.excepthook
    threading.excepthook = lambda failed: issubclass(failed.exc_type, OSError) or threads_report(failed)
    try:
        with lock_run_dir(run_dir):
            if checkpoint is not None:
                forget_after(run_dir, progress)
            write_json(run_dir / "config.json", config)
            yield
    except OSError as error:  # the TensorBoard writer's, or a file that cannot be read or removed
        newest = max(run_dir.glob("events.out.tfevents.*"), key=os.path.getmtime, default=None)
        raise UserError(f"cannot write {error.filename or newest}: {error.strerror}; "
                        f"{how_to_fix(error, '--log-dir')}") from None
    finally:
        threading.excepthook = threads_report


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """One process per run folder: hold an exclusive lock on run_dir/.lock while training in it. The
    kernel drops the lock when its process ends, however it ends, so a stale lock never blocks."""
    if fcntl is None:
        yield
        return
    path = run_dir / ".lock"
    try:
        lock_file = open(path, "a+b", buffering=0)  # noqa: SIM115 (closed below, after the run)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}; {how_to_fix(error, '--log-dir')}") from None
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().decode(errors="replace").strip() or "unknown"
            raise UserError(f"run {run_dir} is in use by another process (PID {holder}); wait for it to "
                            "end, or stop it first") from None
        with contextlib.suppress(OSError):  # the PID only names the holder: a full disk is told later
            lock_file.truncate(0)
            lock_file.write(f"{os.getpid()}\n".encode())
        yield


def forget_after(run_dir: Path, progress: Progress) -> None:
    """Resuming: remove what the run wrote after the checkpoint (metrics.json, the later points of
    every curve, the later embeddings), so that the resumed run writes each point once."""
    (run_dir / "metrics.json").unlink(missing_ok=True)  # unfinished until it finishes anew
    for path in run_dir.glob("events.out.tfevents.*"):
        purge_events(path, progress.epoch, progress.step)
    forget_embeddings_after(run_dir, progress.epoch)


def purge_events(path: Path, epoch: int, step: int) -> None:
    """Rewrite an event file without the points after (epoch, step), and without the HPARAMS row,
    which the run writes anew when it finishes. TensorBoard's purge_step cannot do it: one step
    number for all tags, while the curves per epoch and per step count differently."""
    content = path.read_bytes()
    kept, position = [], 0
    while position + 12 <= len(content):  # records: length (8 bytes), its CRC (4), data, data CRC (4)
        (length,) = struct.unpack_from("<Q", content, position)
        end = position + 12 + length + 4
        if end > len(content):
            break  # a record cut short by a crash
        try:
            event = Event.FromString(content[position + 12:end - 4])
        except DecodeError:
            break  # a damaged record: TensorBoard would stop reading here too
        if not written_after(event, epoch, step):
            kept.append(content[position:end])
        position = end
    if sum(map(len, kept)) < len(content):
        atomic_write(path, lambda file: file.write(b"".join(kept)))


def written_after(event: Event, epoch: int, step: int) -> bool:
    for value in event.summary.value:
        if value.tag.startswith("_hparams_/"):
            return True
        if event.step > (step if value.tag in STEP_TAGS else epoch):
            return True
    return False


def forget_embeddings_after(run_dir: Path, epoch: int) -> None:
    """Remove the embeddings filed under epochs after `epoch` (<run>/000NN/), and their entries."""
    embeddings = projector_entries(run_dir)
    kept = [entry for entry in embeddings if not later_than(entry.tensor_path.split("/")[0], epoch)]
    if len(kept) < len(embeddings):
        write_projector_config(run_dir, kept)
    for folder in run_dir.iterdir():
        if folder.is_dir() and later_than(folder.name, epoch):
            shutil.rmtree(folder)


def later_than(folder_name: str, epoch: int) -> bool:
    return folder_name.isdigit() and int(folder_name) > epoch


@contextlib.contextmanager
def keep_earlier_embeddings(run_dir: Path) -> Iterator[None]:
    """add_embedding rewrites projector_config.pbtxt with this session's embeddings alone: put back
    those of the run's earlier sessions, after the new ones."""
    earlier = projector_entries(run_dir)
    yield
    new = projector_entries(run_dir)
    paths = {entry.tensor_path for entry in new}
    if earlier and new:
        write_projector_config(run_dir, new + [old for old in earlier if old.tensor_path not in paths])


def projector_entries(run_dir: Path) -> list:
    """The embeddings listed in the run's projector_config.pbtxt (none without one)."""
    config_file = run_dir / "projector_config.pbtxt"
    if not config_file.exists():
        return []
    try:
        return list(text_format.Parse(config_file.read_text(), ProjectorConfig()).embeddings)
    except (OSError, text_format.ParseError):
        raise UserError(f"{config_file} is damaged; delete it (the projector then shows the new "
                        "embeddings only)") from None


def write_projector_config(run_dir: Path, embeddings: list) -> None:
    projector = ProjectorConfig()
    projector.embeddings.extend(embeddings)
    text = text_format.MessageToString(projector)
    atomic_write(run_dir / "projector_config.pbtxt", lambda file: file.write(text.encode()))


def final_metrics(progress: Progress, evaluation: Evaluation, train_count: int) -> dict:
    """metrics.json: the test set's one score, and what validation chose (null without it)."""
    final = progress.history[-1] if progress.history else {}
    validated = "validation_accuracy" in final
    return {
        "test_accuracy": evaluation.accuracy,
        "test_loss": evaluation.loss,
        "best_validation_accuracy": progress.best_accuracy if validated else None,
        "best_epoch": progress.best_epoch,
        "final_validation_accuracy": final.get("validation_accuracy"),
        "chosen_on": "validation" if validated else "test",
        "epochs": progress.epoch,
        "training_seconds": round(progress.seconds, 3),
        "images_per_second": round(progress.epoch * train_count / max(progress.seconds, 1e-9), 1),
        "visualization_seconds": round(progress.logging_seconds, 3),
    }


def atomic_write(path: Path, write: Callable[[BinaryIO], object], elsewhere: str = "--log-dir") -> None:
    """Write a file that no reader and no crash sees half-written: a temporary file, flushed to
    disk, then renamed over the old one. A failure is one UserError, and the old file stays."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror}; the previous file, if any, is kept. "
                        f"{how_to_fix(error, elsewhere).capitalize()}") from None


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


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda file: file.write((json.dumps(data, indent=2) + "\n").encode()))


def expand_sweep(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per point of the grid of SWEEP_FLAGS values, each holding single values."""
    grid = list(itertools.product(*(getattr(args, key) for key in SWEEP_FLAGS)))
    runs = []
    for index, values in enumerate(grid, start=1):
        one_run = vars(args) | dict(zip(SWEEP_FLAGS, values))
        if len(grid) > 1 and args.run_name is not None:
            one_run["run_name"] = f"{args.run_name}-{index}"
        runs.append(argparse.Namespace(**one_run))
    return runs


def sweep(runs: list[argparse.Namespace], device: torch.device, stop: "StopFlag",
          jobs: int = 1) -> list[dict]:
    """Run each point of the grid, in turn or `jobs` at a time; a failed run is reported and the
    sweep goes on. A signal stops the runs under way with their state saved; the table then lists
    every point all the same."""
    if jobs > 1 and WORLD_SIZE == 1:
        outcomes, interrupted = run_points_in_processes(runs, jobs, stop)
    else:
        outcomes, interrupted = run_points_in_turn(runs, device, stop)
    results = [{key: getattr(one_run, key) for key in SWEEP_FLAGS} | outcome
               for one_run, outcome in zip(runs, outcomes)]
    # Ranked by validation accuracy: the test set chooses nothing (with --val_size 0 it must).
    rank = "validation_accuracy" if runs[0].val_size else "test_accuracy"
    results.sort(key=lambda row: -1 if row[rank] is None else row[rank], reverse=True)
    if MAIN_PROCESS:
        write_sweep_table(results, runs[0].log_dir / f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv")
    if interrupted is not None:
        raise interrupted
    return results


def sweep_row(status: str, run_dir: str | Path | None = None, metrics: dict | None = None) -> dict:
    """A point's columns of the sweep table: its best validation accuracy, its test accuracy and
    loss (empty unless it finished), its folder and how it ended."""
    metrics = metrics or {}
    return {"validation_accuracy": metrics.get("best_validation_accuracy"),
            "test_accuracy": metrics.get("test_accuracy"), "test_loss": metrics.get("test_loss"),
            "run_dir": run_dir, "status": status}


def stopped_row(run_dir: str | Path | None) -> dict:
    return sweep_row(f"stopped: --resume {run_dir}" if run_dir else "stopped", run_dir)


def run_points_in_turn(runs: list[argparse.Namespace], device: torch.device,
                       stop: "StopFlag") -> tuple[list[dict], "Interrupted | None"]:
    outcomes, interrupted = [], None
    for index, one_run in enumerate(runs, start=1):
        outcome = sweep_row("not started")
        if interrupted is None:
            report(f"\n=== Sweep run {index}/{len(runs)}: {point_name(one_run)}")
            try:
                outcome = run_point(one_run, device, stop)
            except Interrupted as stopped:
                interrupted, outcome = stopped, stopped_row(stopped.run_dir)
        outcomes.append(outcome)
    return outcomes, interrupted


def point_name(one_run: argparse.Namespace) -> str:
    return ", ".join(f"{key}={getattr(one_run, key)}" for key in SWEEP_FLAGS)


def run_point(one_run: argparse.Namespace, device: torch.device, stop: "StopFlag") -> dict:
    """One point of a sweep, run in this process: its row of the table."""
    try:
        metrics = run(one_run, device, None, stop) or {}
    except UserError as error:
        report(f"error: {error}", every_node=True)
        return sweep_row(f"failed: {error}")
    return sweep_row("ok", metrics.get("run_dir"), metrics)


def write_sweep_table(results: list[dict], path: Path) -> None:
    """The sweep's rows, best first, as a CSV and on the console; numbers rounded to 4 places."""
    rows = [{key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}
            for row in results]
    text = io.StringIO(newline="")
    table = csv.DictWriter(text, fieldnames=list(rows[0]))
    table.writeheader()
    table.writerows(rows)
    atomic_write(path, lambda file: file.write(text.getvalue().encode()))
    print("\nSweep results, best first:")
    widths = {key: max(len(key), *(len(str("-" if row[key] is None else row[key])) for row in rows))
              for key in rows[0]}
    print("  ".join(f"{key:>{widths[key]}}" for key in rows[0]))
    for row in rows:
        print("  ".join(f"{'-' if value is None else value!s:>{widths[key]}}" for key, value in row.items()))
    print(f"Saved to {path}")


# --- Sweeps in parallel: --jobs N points at once, each a process of its own ----------------

NOT_PASSED_ON = {"resume", "evaluate", "predict", "checkpoint", "save_inputs", "jobs"}


def run_points_in_processes(runs: list[argparse.Namespace], jobs: int,
                            stop: "StopFlag") -> tuple[list[dict], "Interrupted | None"]:
    """Up to `jobs` points at once, each in a process of its own: on the CPU a fork of this one
    with its share of the cores (a second thread buys a small network little; a second process, a
    second run), with several GPUs a new `python train_mnist.py` on each GPU in turn. A point's
    console goes to a log; its results come from its run folder. A signal is passed on to every
    run under way, which saves its state."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    gpus = torch.cuda.device_count() if runs[0].device.type == "cuda" else 0
    fork = runs[0].device.type == "cpu" and hasattr(os, "fork")  # CUDA does not survive a fork
    if fork:
        import_before_forking()
    stop.on_signal = "stopping every run under way; each saves its state..."
    outcomes = [sweep_row("not started") for _ in runs]
    waiting, running, passed_on = list(range(len(runs))), {}, False
    with tempfile.TemporaryDirectory() as logs:
        while running or (waiting and stop.signum is None):
            while waiting and len(running) < jobs and stop.signum is None:
                index = waiting.pop(0)
                gpu = str(index % gpus) if gpus > 1 else None
                running[index] = start_point(runs[index], threads, gpu, Path(logs) / f"{index}.log", fork)
                report(f"=== Sweep run {index + 1}/{len(runs)} started: {point_name(runs[index])}")
            if stop.signum is not None and not passed_on:
                for process in running.values():
                    process.send_signal(stop.signum)
                passed_on = True
            for index, process in list(running.items()):
                if process.poll() is not None:
                    del running[index]
                    console = (Path(logs) / f"{index}.log").read_text()
                    outcomes[index] = outcome_of(process.returncode, console)
                    report(f"=== Sweep run {index + 1}/{len(runs)}: {outcomes[index]['status']}")
            time.sleep(0.1)
    return outcomes, None if stop.signum is None else Interrupted(stop.signum)


def import_before_forking() -> None:
    """Imported once here, what every run imports on first use, so that the forks share it: torch
    imports its compiler, torch._dynamo, as the first optimizer is built."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])


def start_point(one_run: argparse.Namespace, threads: int, gpu: str | None, log: Path,
                fork: bool) -> "subprocess.Popen | ForkedRun":
    """A new process for one point: a fork of this one, which has torch and the rest loaded
    already, or else a fresh `python train_mnist.py`, which spends seconds importing them."""
    if fork:
        return ForkedRun(command_line(one_run), threads, log)
    environment = os.environ | {"OMP_NUM_THREADS": str(threads)}  # torch's thread count
    if gpu is not None:
        environment["CUDA_VISIBLE_DEVICES"] = gpu
    with open(log, "w") as console:
        return subprocess.Popen([sys.executable, __file__, *command_line(one_run)], stdout=console,
                                stderr=subprocess.STDOUT, env=environment)


class ForkedRun:
    """`main(argv)` in a fork of this process, its console written to `log`; polled and signalled
    like a subprocess.Popen. Forking is safe for torch only before this process has run work on
    several threads (OpenMP's threads do not survive a fork, and a child waiting for them hangs):
    a sweep's supervising process trains nothing itself."""

    def __init__(self, argv: list[str], threads: int, log: Path) -> None:
        self.returncode: int | None = None
        sys.stdout.flush()  # or the child would print this process's pending output again
        sys.stderr.flush()
        with open(log, "w") as console:
            self.pid = os.fork()
            if self.pid == 0:
                os.dup2(console.fileno(), sys.stdout.fileno())
                os.dup2(console.fileno(), sys.stderr.fileno())
                torch.set_num_threads(threads)
                exit_code = 1
                try:
                    exit_code = main(argv)
                finally:
                    leave(exit_code)  # never return into the parent's code

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(wait_status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


def command_line(one_run: argparse.Namespace) -> list[str]:
    """The flags that make `python train_mnist.py` run this one point of a sweep."""
    return as_command_line({key: value for key, value in vars(one_run).items()
                            if value is not None and key not in NOT_PASSED_ON})


def outcome_of(returncode: int, console: str) -> dict:
    """A point's row of the sweep table, from its exit code, its console and its metrics.json."""
    def last(prefix: str) -> str | None:
        return next((line.removeprefix(prefix) for line in reversed(lines) if line.startswith(prefix)), None)

    lines = console.splitlines()
    run_dir = last("Run directory: ")
    if returncode == 0 and run_dir:
        return sweep_row("ok", run_dir, json.loads((Path(run_dir) / "metrics.json").read_text()))
    if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return stopped_row(last("Resume with: python train_mnist.py --resume "))
    return sweep_row(f"failed: {last('error: ') or f'exit code {returncode}'}")


# --- Signals: Ctrl-C and SIGTERM stop at a safe point, with the state saved ---------------


class Interrupted(Exception):
    """Stopped by SIGINT or SIGTERM, after saving the state in `run_dir` if there is one."""

    def __init__(self, signum: int, run_dir: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.run_dir = signum, run_dir


class StopFlag:
    """SIGINT and SIGTERM, handled for the whole program.

    While a run is under way (`on_signal` says what a signal then does), a signal only asks to
    stop: training honours it between two steps by saving the state and raising Interrupted, so
    the saved state is always consistent and no library is interrupted halfway; the final
    logging skips what it has not made yet. Before a run has a folder there is nothing to save,
    and the signal raises Interrupted at once. Once stopping, further signals change nothing,
    so a second Ctrl-C cannot break a checkpoint being written.
    """

    SAVE = "stopping after this step and saving the state..."
    FINISH = "the training is over and saved; finishing without the figures and embeddings left"

    def __init__(self) -> None:
        self.signum: int | None = None
        self.on_signal: str | None = None  # None: a signal stops at once

    def __enter__(self) -> "StopFlag":
        self.previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self.previous.items():
            # Once stopping, the program is on its way out: a late signal must not turn the
            # clean exit into a KeyboardInterrupt traceback.
            signal.signal(sig, signal.SIG_IGN if self.signum is not None else handler)

    def _request(self, signum: int, _frame: object) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.on_signal is None:
            raise Interrupted(signum)
        tqdm.write(f"\n{signal.Signals(signum).name}: {self.on_signal}", file=sys.stderr)

    def requested(self, step: int = 0) -> bool:
        """Has a signal asked to stop? Under torchrun the processes agree, every LOSS_EVERY steps,
        so that all of them stop at the same step."""
        if WORLD_SIZE == 1:
            return self.signum is not None
        if step % LOSS_EVERY:
            return False
        signum = int(agreed_max(self.signum or 0))
        if signum and self.signum is None:
            self.signum = signum  # another process got the signal: stop with it
        return signum != 0


def leave(exit_code: int) -> NoReturn:
    """End this process now, its console flushed, without the interpreter's teardown: Python puts
    the default signal handlers back for it, and a Ctrl-C in that last moment would end the
    process without a word. Everything is written and closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def report_interrupt(interrupted: BaseException) -> int:
    """Say where the state was saved and how to resume; returns the exit code 128 + signal."""
    signum = getattr(interrupted, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    run_dir = getattr(interrupted, "run_dir", None)
    if run_dir is None:
        report(f"\nStopped by {name} before there was anything to save.")
    else:
        report(f"Stopped by {name}; state saved to {run_dir / 'checkpoints' / 'last.pt'}.\n"
               f"Resume with: python train_mnist.py --resume {run_dir}")
    return 128 + signum


# --- torchrun: one process per GPU (or CPU share), gradients averaged by DDP --------------


def start_distributed(device: torch.device) -> torch.device:
    """Under torchrun, join the process group (nccl on GPUs, gloo on the CPU); returns the device
    this process trains on. A plain `python train_mnist.py` does nothing here."""
    if not DISTRIBUTED:
        return device
    if device.type != "cuda":
        dist.init_process_group("gloo")
        return device
    if torch.cuda.device_count() <= LOCAL_RANK:
        gpus = torch.cuda.device_count()
        raise UserError(f"torchrun started more processes on this machine than its {gpus} GPU(s); "
                        f"use --nproc_per_node={gpus} or --device cpu")
    device = torch.device("cuda", LOCAL_RANK)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def end_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        # DDP keeps the process group alive from inside reference cycles: collect them now, so
        # that the group's threads end here and not in the interpreter's teardown at exit.
        gc.collect()
        dist.destroy_process_group()


def wrap_for_processes(model_without_ddp: MNISTNet, device: torch.device) -> torch.nn.Module:
    """Under torchrun, DDP makes backward() average the gradients of all processes."""
    if WORLD_SIZE == 1:
        return model_without_ddp
    return DistributedDataParallel(model_without_ddp,
                                   device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Process 0 runs the block first (a download, say); the others then run it on what it left."""
    if WORLD_SIZE > 1 and not MAIN_PROCESS:
        dist.barrier()
    yield
    if WORLD_SIZE > 1 and MAIN_PROCESS:
        dist.barrier()


def agreed_max(value: float) -> float:
    """The largest `value` over all processes: a decision that every process then takes.

    In one process it is `value`. Under torchrun it is one small all-reduce, made at the same
    step on every process, every LOSS_EVERY steps, never per step.
    """
    if WORLD_SIZE == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only
    flag = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item()


def any_process(condition: bool) -> bool:
    return agreed_max(float(condition)) > 0


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    if WORLD_SIZE > 1:
        dist.all_reduce(values)
        values /= WORLD_SIZE
    return values


def gather_from_processes(shard: torch.Tensor, count: int) -> torch.Tensor:
    """Reassemble the rows that process r computed for samples r, r + WORLD_SIZE, ... of `count`."""
    if WORLD_SIZE == 1:
        return shard
    longest = math.ceil(count / WORLD_SIZE)
    padded = torch.zeros(longest, *shard.shape[1:], dtype=shard.dtype, device=shard.device)
    padded[:len(shard)] = shard
    parts = [torch.empty_like(padded) for _ in range(WORLD_SIZE)]
    dist.all_gather(parts, padded)
    whole = torch.empty(count, *shard.shape[1:], dtype=shard.dtype, device=shard.device)
    for rank, part in enumerate(parts):
        whole[rank::WORLD_SIZE] = part[:len(range(rank, count, WORLD_SIZE))]
    return whole


def report(message: str, every_node: bool = False) -> None:
    """Print to stderr from process 0 (or, for errors, from the first process of each machine)."""
    if MAIN_PROCESS or (every_node and LOCAL_RANK == 0):
        print(message if MAIN_PROCESS else f"[rank {RANK}] {message}", file=sys.stderr)


# --- Predict your own images: each prepared the way MNIST's digits were ---------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # of a folder's files
MAX_PIXELS = 50_000_000  # a larger image is refused before it is decoded (a phone photo has about 12 M)
MNIST_CENTRE = 14.0  # where the centre of mass of MNIST's digits lies, in pixels from the top and the left


def predict(images: list[Path], checkpoint: dict, device: torch.device, save_inputs: Path | None) -> int:
    """--predict: one line per image with the model's three likeliest digits. An image that cannot
    be read is one error line, and the others are still predicted; returns 1 if any failed."""
    if WORLD_SIZE > 1:
        raise UserError("--predict runs in one process: start it with python, not torchrun")
    net = MNISTNet().to(device)
    restore_model(net, checkpoint)
    net.eval()
    failed = 0
    for path in image_files(images):
        try:
            digit = mnist_digit(read_grey(path), path)
        except UserError as error:
            report(f"error: {error}")
            failed += 1
            continue
        if save_inputs:  # what the model sees
            png = png_of(digit)
            atomic_write(save_inputs / f"{path.stem}.png", lambda file, png=png: png.save(file, "PNG"),
                         elsewhere="--save-inputs")
        with torch.no_grad():
            probabilities = F.softmax(net(normalize(digit[None].to(device) * 255)), dim=1)[0].cpu()
        (first, second, third) = zip(*(tensor.tolist() for tensor in probabilities.topk(3)))
        print(f"{path}: {first[1]} ({first[0]:.1%}), then {second[1]} ({second[0]:.1%}), "
              f"{third[1]} ({third[0]:.1%})")
    return 1 if failed else 0


def image_files(paths: list[Path]) -> list[Path]:
    """The paths given, with each folder replaced by the images in it, in name order."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(file for file in path.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def read_grey(path: Path) -> torch.Tensor:
    """An image file as grey levels in [0, 1] (H, W), transparency composited on white paper."""
    try:
        with warnings.catch_warnings():  # Pillow warns of large images; the cap below says it
            warnings.simplefilter("ignore")
            image = Image.open(path)
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height}")
            image = ImageOps.exif_transpose(image)  # a phone photo's rotation, stored beside its pixels
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            grey = image.convert("L")
    except Image.DecompressionBombError:  # Pillow's own cap, or ours
        raise UserError(f"{path}: too large an image (over {MAX_PIXELS:,} pixels); crop it to the "
                        "digit") from None
    except (OSError, ValueError, SyntaxError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise UserError(f"{path}: cannot be read as an image ({reason})") from None
    pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
    return pixels.view(grey.height, grey.width).float() / 255


def mnist_digit(grey: torch.Tensor, path: Path) -> torch.Tensor:
    """A picture of one digit made the way MNIST's were: light ink on black, the ink's bounding box
    scaled so that its longer side is 20 pixels, placed in 28x28 with its centre of mass at the
    centre. Returns (28, 28) in [0, 1]."""
    # Polarity: the border shows the paper; MNIST's ink is light on a black background.
    border = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    paper = border.median()
    ink = (paper - grey if paper > 0.5 else grey - paper).clamp(min=0)
    if ink.max() < 0.1:
        raise UserError(f"{path}: no digit found: the image is blank")
    ink = ink / ink.max()
    ink[ink < 0.2] = 0  # faint marks (paper grain, shadows, JPEG noise) are not ink
    rows, columns = ink.sum(dim=1).nonzero().flatten(), ink.sum(dim=0).nonzero().flatten()
    ink = ink[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    height, width = ink.shape
    scale = 20 / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = F.interpolate(ink[None, None], size=size, mode="bilinear", antialias=True)[0, 0].clamp(min=0)
    small = small / small.max()  # the darkest ink at full strength, as in MNIST
    mass = small.sum()
    centre_row = (small.sum(dim=1) * torch.arange(size[0])).sum() / mass
    centre_column = (small.sum(dim=0) * torch.arange(size[1])).sum() / mass
    top = min(max(round(MNIST_CENTRE - centre_row.item()), 0), 28 - size[0])
    left = min(max(round(MNIST_CENTRE - centre_column.item()), 0), 28 - size[1])
    digit = torch.zeros(28, 28)
    digit[top:top + size[0], left:left + size[1]] = small
    return digit


def png_of(digit: torch.Tensor) -> Image.Image:
    """(28, 28) in [0, 1] as an 8-bit grey image."""
    return Image.frombytes("L", (28, 28), bytes(digit.mul(255).round().byte().flatten().tolist()))


# --- Data files and errors: a download, checks, and a mistake told in one clear line ------

REFETCH = "delete the MNIST files and run again to download fresh copies, or fix --data-dir"
MNIST_MD5 = {  # the published checksums of the four uncompressed files
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")


class UserError(Exception):
    """Something the user can fix: main() prints it as one line and exits with code 1."""


def _number(kind: type, text: str, check: Callable[[float], bool], requirement: str) -> float:
    """argparse type helper: parse `text` as `kind` and refuse values failing `check`."""
    try:
        value = kind(text)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind_name}") from None
    if not check(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be {requirement}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "a whole number >= 0")


def seed_int(text: str) -> int:
    return _number(int, text, lambda v: 0 <= v < 2**64, "a whole number from 0 to 2**64 - 1")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def momentum_float(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "in [0, 1)")


def unit_fraction(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v <= 1, "in [0, 1]")


NAME_MAX = 255  # bytes in one file or folder name, on the usual filesystems (ext4, APFS, NTFS)


def folder_name(text: str) -> str:
    """argparse type of --run_name: one folder inside --log_dir, never a path that leaves it."""
    if text in ("", ".", "..") or any(sep and sep in text for sep in ("/", os.sep, os.altsep)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a folder name, without '/' and not '.' or '..'")
    if len(os.fsencode(text)) > NAME_MAX:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}... is too long: a name has at most {NAME_MAX} bytes")
    return text


def path_flag(text: str) -> Path:
    """argparse type of the folder and file flags: not empty, no name in it too long to exist."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a folder or file, '.' for the current folder")
    if any(len(os.fsencode(part)) > NAME_MAX for part in Path(text).parts):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}... has a name longer than {NAME_MAX} bytes")
    return Path(text)


def available_device(name: str) -> torch.device:
    """argparse type of --device: a device this machine has (auto: CUDA, else MPS, else CPU)."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{name!r} is not one of auto, cpu, cuda, mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("this machine has no usable CUDA GPU; use --device cpu or auto")
    if name == "mps" and not has_mps:
        raise argparse.ArgumentTypeError("this machine has no Apple MPS device; use --device cpu or auto")
    return torch.device(name)


def download_missing(data_dir: Path, names: tuple[str, ...]) -> None:
    """Download those of the MNIST files `names` that are not in <data_dir>/MNIST/raw/ yet, each
    kept only if its checksum is the published one; or say which are missing and where."""
    raw_dir = data_dir / "MNIST" / "raw"
    missing = [name for name in names if not (raw_dir / name).exists()]
    if missing:
        report(f"Downloading {', '.join(missing)} into {raw_dir}")
    failed = []
    for name in missing:
        content = fetch_from_mirrors(name)
        if content is None:
            failed.append(name)
        else:
            atomic_write(raw_dir / name, lambda file, content=content: file.write(content),
                         elsewhere="--data-dir")
    if failed:
        raise UserError(f"{', '.join(failed)} missing from {raw_dir}, and the download failed. Put the "
                        f"file{'s' * (len(failed) > 1)} there (uncompressed), or point --data-dir at the "
                        "folder that holds MNIST/raw/")


def fetch_from_mirrors(name: str) -> bytes | None:
    """The file `name` as published, from the first mirror that serves it whole; None if none does."""
    for mirror in MNIST_MIRRORS:
        request = urllib.request.Request(f"{mirror}{name}.gz", headers={"User-Agent": "train_mnist.py"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                content = gzip.decompress(response.read())
        except (OSError, EOFError, zlib.error, http.client.HTTPException):  # unreachable, refused, cut off
            continue
        if hashlib.md5(content).hexdigest() == MNIST_MD5[name]:
            return content
    return None


def read_mnist(images_file: Path, labels_file: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's digits (N, 28, 28) and labels (N,), as uint8, each file checked; with `verify`,
    against the published checksums too."""
    if verify:
        for path in (images_file, labels_file):
            verify_checksum(path)
    images, labels = read_idx(images_file, (28, 28)), read_idx(labels_file, ())
    if len(images) != len(labels):
        raise UserError(f"{images_file} holds {len(images)} images but {labels_file} holds "
                        f"{len(labels)} labels; {REFETCH}")
    return images, labels


def verify_checksum(path: Path) -> None:
    try:
        digest = hashlib.md5(path.read_bytes()).hexdigest()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; {REFETCH}") from None
    if digest != MNIST_MD5[path.name]:
        raise UserError(f"{path} does not match the published MNIST file (md5 {digest}, expected "
                        f"{MNIST_MD5[path.name]}); {REFETCH}")


def read_idx(path: Path, item_shape: tuple[int, ...]) -> torch.Tensor:
    """The items of an IDX file (MNIST's format) as uint8, once its magic number, item shape and
    length are checked."""
    dims = 1 + len(item_shape)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; {REFETCH}") from None
    header_size = 4 + 4 * dims
    if len(content) < header_size or content[:4] != bytes((0, 0, 0x08, dims)):
        kind = "image" if item_shape else "label"
        raise UserError(f"{path} is not an MNIST {kind} file (wrong magic number); {REFETCH}")
    count, *shape = struct.unpack(f">{dims}I", content[4:header_size])
    if tuple(shape) != item_shape:
        raise UserError(f"{path} holds {'x'.join(map(str, shape))} images, not 28x28; {REFETCH}")
    expected = header_size + count * math.prod(item_shape)
    if len(content) != expected:
        raise UserError(f"{path} is {len(content)} bytes but its header promises {expected}: truncated or "
                        f"corrupt; {REFETCH}")
    return torch.frombuffer(bytearray(content), dtype=torch.uint8)[header_size:].view(count, *item_shape)


def stop_if_diverged(net: MNISTNet, loss_sum: float, epoch: int, lr: float) -> None:
    """A loss or weights that are no longer finite end the run, before a checkpoint keeps them."""
    # Squared too: weights whose squares overflow (above about 1e19 in float32) have diverged as
    # surely as infinite ones, and no histogram can show them.
    if not (math.isfinite(loss_sum) and all(p.detach().square().sum().isfinite() for p in net.parameters())):
        raise UserError(f"training diverged in epoch {epoch}: the loss or the weights are no longer finite; "
                        f"try a smaller --lr (this run used {lr:g})")


if __name__ == "__main__":
    leave(main())
