"""Train a small CNN on MNIST and watch it learn in TensorBoard.

    python train_mnist.py --epochs=5 --lr=1e-3 --batch_size=64
    tensorboard --logdir runs

The story, top to bottom: parse the command line; load MNIST once into two tensors on the
training device; train with SGD, testing after every epoch and saving a checkpoint; log the
curves, the graph, a sample of digits, histograms, figures of the test results, the learned
features and the hyper-parameters to one TensorBoard run directory. Around it: resume after
Ctrl-C, evaluate a checkpoint, sweep a grid of hyper-parameters, and run data-parallel in
several processes under torchrun.
"""

import argparse
import csv
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import pickle
import signal
import struct
import sys
import time
import warnings
from pathlib import Path

import matplotlib
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

matplotlib.use("Agg")  # figures are drawn into TensorBoard images, never shown on screen
import matplotlib.pyplot as plt  # noqa: E402

from models import MNISTNet

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the training pixels scaled to [0, 1]
MNIST_MD5 = {  # the published checksums of the four uncompressed files
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_FILES = tuple(MNIST_MD5)
SWEEP_FLAGS = ("lr", "batch_size", "momentum", "epochs")  # flags that take several values
# Flags a resumed run takes from its checkpoint unless given again on the command line.
RESUMED_FLAGS = (*SWEEP_FLAGS, "weight_decay", "lr_decay", "seed", "test_batch_size",
                 "num_embeddings", "data_dir", "deterministic")


class UserError(Exception):
    """Something the user can fix: main() prints it as one line and exits with code 1."""


class Interrupted(Exception):
    """Stopped by SIGINT or SIGTERM (after saving the state, if training); exit code 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: Path | None = None  # the run to resume, once it has a checkpoint


# ----------------------------------------------------------------------------------------
# Command line


def _number(kind: type, text: str, check, requirement: str):
    """argparse type helper: parse `text` as `kind` and refuse values failing `check`."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not check(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be {requirement}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "a whole number >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def momentum_float(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "in [0, 1)")


def unit_fraction(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v <= 1, "in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a small CNN on MNIST and log the training to TensorBoard. "
                    "Several values for --lr, --batch_size, --momentum or --epochs run a sweep "
                    "over their grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--epochs", type=positive_int, nargs="+", default=[10], metavar="N",
        help="passes over the training set")
    add("--lr", type=positive_float, nargs="+", default=[0.02], metavar="LR",
        help="peak learning rate of SGD")
    add("--batch_size", "--batch-size", dest="batch_size", type=positive_int, nargs="+", default=[64],
        metavar="N", help="training images per step")
    add("--momentum", type=momentum_float, nargs="+", default=[0.9], metavar="M", help="SGD momentum")
    add("--weight_decay", "--weight-decay", dest="weight_decay", type=non_negative_float, metavar="WD",
        default=5e-4, help="SGD weight decay (L2 penalty)")
    add("--lr_decay", "--lr-decay", dest="lr_decay", type=unit_fraction, metavar="FRACTION", default=0.2,
        help="final fraction of the steps over which the learning rate falls linearly from "
             "--lr to 0 (0: constant)")
    add("--seed", type=non_negative_int, metavar="N", default=1,
        help="seed of the weights and of the batch order")
    add("--deterministic", action="store_true",
        help="use only deterministic algorithms (bit-reproducible on one GPU too, a little slower)")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
        help="where to train; auto takes CUDA if available, else MPS, else the CPU")
    add("--data_dir", "--data-dir", dest="data_dir", type=Path, metavar="DIR", default=Path("data"),
        help="folder holding MNIST/raw/ (torchvision's layout); downloaded there if absent")
    add("--log_dir", "--log-dir", dest="log_dir", type=Path, metavar="DIR", default=Path("runs"),
        help="TensorBoard folder; each run gets its own sub-folder")
    add("--run_name", "--run-name", dest="run_name", metavar="NAME", default=None,
        help="name of this run's folder (default: time stamp and key hyper-parameters)")
    add("--test_batch_size", "--test-batch-size", dest="test_batch_size", type=positive_int, metavar="N",
        default=1000, help="images per evaluation batch")
    add("--num_embeddings", "--num-embeddings", dest="num_embeddings", type=non_negative_int, metavar="N",
        default=256, help="training images shown in the projector (0: none)")
    add("--verify_data", "--verify-data", dest="verify_data", action="store_true",
        help="check the MNIST files against the published checksums before using them")
    add("--resume", type=Path, default=None, metavar="PATH",
        help="continue the run of this checkpoint (or run folder) up to --epochs in total")
    add("--evaluate", type=Path, default=None, metavar="PATH",
        help="only test this checkpoint (or run folder's last.pt) and print its accuracy")
    return parser


def resolve_device(name: str) -> torch.device:
    """Turn --device into a torch.device this machine has, or raise UserError."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no usable CUDA GPU; use --device cpu or auto")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: this machine has no Apple MPS device; use --device cpu or auto")
    return torch.device(name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; with --resume or --evaluate, unset flags come from the checkpoint's config."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.evaluate:
        parser.error("--resume and --evaluate exclude each other")
    checkpoint = None
    if args.resume or args.evaluate:
        checkpoint = load_checkpoint(args.resume or args.evaluate)  # UserError: main() reports it
        saved = checkpoint["config"]
        parser.set_defaults(**{key: saved[key] for key in RESUMED_FLAGS if key in saved})
        args = parser.parse_args(argv)
    args.checkpoint = checkpoint
    for key in SWEEP_FLAGS:  # a single value, from the command line or a checkpoint, is a list of one
        value = getattr(args, key)
        setattr(args, key, value if isinstance(value, list) else [value])
    if args.resume and any(len(getattr(args, key)) > 1 for key in SWEEP_FLAGS):
        parser.error("--resume continues one run: give single values for " + ", ".join(SWEEP_FLAGS))
    try:
        args.device = resolve_device(args.device)
    except UserError as error:
        parser.error(str(error))  # exits 2, like any other bad flag
    return args


def expand_sweep(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per point of the grid of SWEEP_FLAGS values, each holding single values."""
    grid = itertools.product(*(getattr(args, key) for key in SWEEP_FLAGS))
    runs = [argparse.Namespace(**(vars(args) | dict(zip(SWEEP_FLAGS, values)))) for values in grid]
    if len(runs) > 1 and args.run_name is not None:
        for index, one_run in enumerate(runs, start=1):
            one_run.run_name = f"{args.run_name}-{index}"
    return runs


    return args


# ----------------------------------------------------------------------------------------
# Data: each split is read once and then lives as one normalized tensor on the device.


def load_mnist(data_dir: Path, train: bool, verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split as (uint8 images N x 28 x 28, int64 labels), downloading MNIST if absent.

    With `verify`, the files must also match the published checksums.
    """
    raw_dir = data_dir / "MNIST" / "raw"
    images_file, labels_file = (raw_dir / name for name in (MNIST_FILES[:2] if train else MNIST_FILES[2:]))
    if not (images_file.exists() and labels_file.exists()):
        download_mnist(data_dir)
    if verify:
        for path in (images_file, labels_file):
            verify_checksum(path)
    image_count = check_idx_file(images_file, (28, 28))
    label_count = check_idx_file(labels_file, ())
    if image_count != label_count:
        raise UserError(f"{images_file} holds {image_count} images but {labels_file} holds "
                        f"{label_count} labels; {REFETCH}")
    dataset = torchvision.datasets.MNIST(data_dir, train=train)
    return dataset.data, dataset.targets


REFETCH = "delete the MNIST files and run again to download fresh copies, or fix --data-dir"


def download_mnist(data_dir: Path) -> None:
    """Fetch MNIST with torchvision, or explain where the files should go."""
    try:
        torchvision.datasets.MNIST(data_dir, download=True)
    except (RuntimeError, OSError):
        raise UserError(
            f"MNIST not found in {data_dir / 'MNIST' / 'raw'} and the download failed. Put the four "
            f"files {', '.join(MNIST_FILES)} (uncompressed) there, or point --data-dir at the "
            "folder that holds MNIST/raw/."
        ) from None


def verify_checksum(path: Path) -> None:
    try:
        digest = hashlib.md5(path.read_bytes()).hexdigest()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; {REFETCH}") from None
    if digest != MNIST_MD5[path.name]:
        raise UserError(f"{path} does not match the published MNIST file (md5 {digest}, expected "
                        f"{MNIST_MD5[path.name]}); {REFETCH}")


def check_idx_file(path: Path, item_shape: tuple[int, ...]) -> int:
    """Check an IDX file's magic number, item shape and length; return its item count."""
    dims = 1 + len(item_shape)
    try:
        with open(path, "rb") as file:
            header = file.read(4 + 4 * dims)
        size = path.stat().st_size
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; {REFETCH}") from None
    if len(header) < 4 + 4 * dims or header[:4] != bytes((0, 0, 0x08, dims)):
        kind = "image" if item_shape else "label"
        raise UserError(f"{path} is not an MNIST {kind} file (wrong magic number); {REFETCH}")
    count, *shape = struct.unpack(f">{dims}I", header[4:])
    if tuple(shape) != item_shape:
        raise UserError(f"{path} holds {'x'.join(map(str, shape))} images, not 28x28; {REFETCH}")
    expected = len(header) + count * math.prod(item_shape)
    if size != expected:
        raise UserError(f"{path} is {size} bytes but its header promises {expected}: truncated or "
                        f"corrupt; {REFETCH}")
    return count


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 digits (N, 28, 28) -> float (N, 1, 28, 28) with the training set's mean and std."""
    return images.unsqueeze(1).float().div(255).sub(MNIST_MEAN).div(MNIST_STD)


class DeviceLoader:
    """Mini-batches drawn from tensors that already live on the device.

    No workers and no per-sample transforms: a batch is one index into two tensors. With
    shuffle, each epoch's order is a permutation seeded by (seed, epoch) alone, so any epoch
    can be replayed exactly. The last partial batch is kept.

    Under torchrun each of the `world_size` processes takes every world_size-th sample of that
    order, starting at its `rank`: together they see every sample once per epoch. A shuffled
    order is first padded with its own first few samples to a multiple of world_size, so that
    every process takes the same number of steps (as torch's DistributedSampler does).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
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
            generator = torch.Generator().manual_seed(self.seed * 100_000 + self.epoch)
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

    def __iter__(self):
        return self.batches()

    def batches(self, first: int = 0):
        """The epoch's batches from number `first` on (a resumed epoch skips those done)."""
        order = self.indices()
        for start in range(first * self.batch_size, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.images[batch], self.labels[batch]


# ----------------------------------------------------------------------------------------
# Training and evaluation


@dataclasses.dataclass
class Progress:
    """Where a run stands; saved in every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed in the epoch under way
    loss_sum: float = 0.0  # sum of those batches' losses, for the epoch's mean
    best_accuracy: float = -1.0
    seconds: float = 0.0  # training time so far, over all sessions of the run
    logging_seconds: float = 0.0  # time spent on histograms, figures and embeddings
    history: list = dataclasses.field(default_factory=list)  # one metrics dict per epoch


class StopFlag:
    """SIGINT and SIGTERM, handled for the whole program.

    While a run is under way (`deferred`), a signal only asks to stop: training honours it
    between two steps by saving the state and raising Interrupted, so the saved state is
    always consistent and no library is interrupted halfway. Before a run has a folder there
    is nothing to save, and the signal raises Interrupted at once. Once stopping, further
    signals change nothing, so a second Ctrl-C cannot break a checkpoint being written.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False

    def __enter__(self) -> "StopFlag":
        self.previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            # Once stopping, the program is on its way out: a late signal must not turn the
            # clean exit into a KeyboardInterrupt traceback.
            signal.signal(sig, signal.SIG_IGN if self.signum is not None else handler)

    def _request(self, signum: int, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if not self.deferred:
            raise Interrupted(signum)
        tqdm.write(f"\n{signal.Signals(signum).name}: stopping after this step and saving the state...")


def train_epoch(net: MNISTNet, optimizer: torch.optim.Optimizer, scheduler, loader: DeviceLoader,
                description: str, first_batch: int = 0, stop: StopFlag | None = None
                ) -> tuple[list[float], list[float]]:
    """Train on the epoch's batches from `first_batch` on; returns each step's loss and learning rate.

    Returns early, with fewer steps, when `stop` is raised or the loss stops being finite.
    Under torchrun the losses are the mean over all processes, and all stop at the same step.
    """
    net.train()
    # Step losses stay on the device and come to the host once per epoch (and every 50
    # steps for the progress bar): a .item() per step would stall a GPU on every batch.
    step_losses = torch.zeros(len(loader) - first_batch, device=loader.labels.device)
    step_lrs = []
    progress = tqdm(loader.batches(first_batch), desc=description, total=len(loader), initial=first_batch,
                    unit="batch", dynamic_ncols=True, disable=loader.rank != 0)
    with progress:
        for step, (images, labels) in enumerate(progress):
            if should_stop(stop, check_now=step % 50 == 0):
                break
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step_lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            step_losses[step] = loss.detach()
            if step % 50 == 49:
                recent_loss = step_losses[step - 49:step + 1].mean().item()
                progress.set_postfix(loss=f"{recent_loss:.4f}")
                if agreed_max(0.0 if math.isfinite(recent_loss) else 1.0):
                    break  # diverged: train() reports it
    step_losses = step_losses[:len(step_lrs)]
    if loader.world_size > 1:
        dist.all_reduce(step_losses)
        step_losses /= loader.world_size
    return step_losses.tolist(), step_lrs


def agreed_max(value: float) -> float:
    """The largest `value` over all processes: a decision every process then takes together.

    In a single process it is just `value`. Under torchrun it is one small all-reduce, made
    at the same step on every process (every 50 steps), never per step.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item()


def should_stop(stop: StopFlag | None, check_now: bool = True) -> bool:
    """Has a signal asked to stop? Under torchrun the processes agree, at steps where `check_now`."""
    if stop is None:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return stop.signum is not None
    if not check_now:
        return False
    signum = int(agreed_max(float(stop.signum or 0)))
    if signum and stop.signum is None:
        stop.signum = signum  # another process got the signal: stop with it
    return signum != 0


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

    def class_accuracy(self) -> list[float]:
        """Accuracy on the test digits of each class, 0 to 9."""
        hits = torch.bincount(self.labels[self.predictions == self.labels], minlength=10)
        return (hits / torch.bincount(self.labels, minlength=10).clamp(min=1)).tolist()


@torch.no_grad()
def test(model: MNISTNet, loader: DeviceLoader) -> Evaluation:
    """Mean cross-entropy and accuracy over the whole test set.

    Under torchrun each process scores its share of the test set and the logits of all of
    them are gathered, so every process reports the numbers of the whole set.
    """
    model.eval()
    logits = torch.cat([model(images) for images, _ in loader])
    if loader.world_size > 1:
        logits = gather_shards(logits, loader.world_size, len(loader.labels))
    loss = F.cross_entropy(logits, loader.labels, reduction="sum").item() / len(loader.labels)
    accuracy = (logits.argmax(dim=1) == loader.labels).sum().item() / len(loader.labels)
    return Evaluation(loss, accuracy, logits, loader.labels)


def gather_shards(shard: torch.Tensor, world_size: int, count: int) -> torch.Tensor:
    """Reassemble rows that process r computed for samples r, r + world_size, ... of `count`."""
    longest = math.ceil(count / world_size)
    padded = torch.zeros(longest, *shard.shape[1:], dtype=shard.dtype, device=shard.device)
    padded[:len(shard)] = shard
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    whole = torch.empty(count, *shard.shape[1:], dtype=shard.dtype, device=shard.device)
    for rank, part in enumerate(parts):
        rows = len(range(rank, count, world_size))
        whole[rank::world_size] = part[:rows]
    return whole


def train(net: MNISTNet, optimizer: torch.optim.Optimizer, loader: DeviceLoader,
          writer: SummaryWriter, epochs: int, *, scheduler, test_loader: DeviceLoader,
          progress: Progress, save, stop: StopFlag) -> Evaluation | None:
    """Train from `progress` up to `epochs`, testing, logging and checkpointing after each epoch.

    Returns the last epoch's test results, or None when no epoch was left to train.

    `net` may be wrapped in DistributedDataParallel; `writer` and `save(name)` (which writes
    checkpoints/<name>.pt) do nothing outside process 0. On a stop request the state is
    saved to last.pt and Interrupted is raised.
    """
    module = getattr(net, "module", net)  # the plain MNISTNet inside a DDP wrapper
    steps_per_epoch = len(loader)
    result = None
    while progress.epoch < epochs:
        epoch = progress.epoch + 1
        loader.set_epoch(epoch)
        started = time.perf_counter()
        step_losses, step_lrs = train_epoch(net, optimizer, scheduler, loader, f"Epoch {epoch}/{epochs}",
                                            first_batch=progress.batch, stop=stop)
        first_step = (epoch - 1) * steps_per_epoch + progress.batch + 1
        for offset, (loss, lr) in enumerate(zip(step_losses, step_lrs)):
            writer.add_scalar("training loss/per step", loss, first_step + offset)
            writer.add_scalar("learning rate", lr, first_step + offset)
        progress.batch += len(step_losses)
        progress.loss_sum += sum(step_losses)
        progress.seconds += time.perf_counter() - started
        if not (math.isfinite(progress.loss_sum) and all(p.isfinite().all() for p in module.parameters())):
            raise UserError(f"training diverged in epoch {epoch}: the loss or the weights are no longer "
                            f"finite; try a smaller --lr (this run used "
                            f"{optimizer.param_groups[0]['initial_lr']:g})")
        if progress.batch < steps_per_epoch:  # stopped mid-epoch
            save("last")
            raise Interrupted(stop.signum)

        result = test(module, test_loader)
        test_loss, test_accuracy = result.loss, result.accuracy
        train_loss = progress.loss_sum / steps_per_epoch
        writer.add_scalar("training loss", train_loss, epoch)
        writer.add_scalar("test loss", test_loss, epoch)
        writer.add_scalar("test accuracy", test_accuracy, epoch)
        started = time.perf_counter()
        log_epoch_details(writer, module, result, epoch)
        progress.logging_seconds += time.perf_counter() - started
        progress.history.append({"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                                 "test_accuracy": test_accuracy})
        progress.epoch, progress.batch, progress.loss_sum = epoch, 0, 0.0
        if loader.rank == 0:
            tqdm.write(f"Epoch {epoch}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
                       f"test accuracy {test_accuracy:.4f}")
        writer.flush()
        save("last")
        if test_accuracy > progress.best_accuracy:
            progress.best_accuracy = test_accuracy
            save("best")
        if should_stop(stop):
            raise Interrupted(stop.signum)
    return result


def make_scheduler(optimizer: torch.optim.Optimizer, decay_fraction: float, total_steps: int,
                   start_step: int = 0):
    """Hold --lr, then fall linearly to 0 over the last `decay_fraction` of the steps.

    A long constant phase learns fast; the final decay settles the weights into a minimum
    (worth about 0.5% test accuracy here over a constant rate).
    """
    decay_steps = decay_fraction * total_steps

    def factor(step: int) -> float:
        return 1.0 if decay_steps == 0 else min(1.0, max(0.0, total_steps - step) / decay_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


# ----------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and numbers, readable with weights_only=True.


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "global_step", "progress", "rng", "config"}


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write atomically: a temporary file, flushed to disk, then renamed over the old one."""
    path.parent.mkdir(exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {error.strerror}; the previous checkpoint "
                        "is kept. Free some disk space or pick another --log-dir") from None


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint file, or a run folder's checkpoints/last.pt, without running any code."""
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; give a .pt file or a run folder with checkpoints/last.pt")
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
        raise UserError(
            f"{path} cannot be loaded safely: it is not a PyTorch checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
        raise UserError(f"{path} is not a train_mnist.py checkpoint (it lacks model, optimizer, ...)")
    checkpoint["path"] = path
    return checkpoint


def restore_model(net: MNISTNet, checkpoint: dict) -> None:
    try:
        net.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"{checkpoint['path']} holds weights of a different network than MNISTNet") from None


# ----------------------------------------------------------------------------------------
# Run directory and TensorBoard


def make_run_dir(log_dir: Path, run_name: str | None, args: argparse.Namespace) -> Path:
    """Create a fresh run folder; two runs never share one, even when started together."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = run_name or f"{stamp}_lr{args.lr:g}_bs{args.batch_size}_ep{args.epochs}_mom{args.momentum:g}"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1 if run_name else 1000):
            run_dir = log_dir / (base if attempt == 0 else f"{base}_{attempt + 1}")
            try:
                run_dir.mkdir()  # atomic: of two runs racing for a name, one gets it
                return run_dir
            except FileExistsError:
                continue
    except OSError as error:
        raise UserError(f"cannot create a run folder in {log_dir}: {error.strerror}; "
                        "fix its permissions or pick another --log-dir") from None
    if run_name:
        raise UserError(f"run {log_dir / run_name} already exists; pick another --run-name, "
                        f"or continue it with --resume {log_dir / run_name}")
    raise UserError(f"too many runs named {base}* in {log_dir}; pick a --run-name")


def log_inputs(writer: SummaryWriter, net: MNISTNet, raw_images: torch.Tensor,
               images: torch.Tensor) -> None:
    """A grid of 64 training digits, and the network's graph traced on a real batch."""
    grid = torchvision.utils.make_grid(raw_images[:64].unsqueeze(1).float() / 255, nrow=8)
    writer.add_image("mnist_images", grid)
    with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
        warnings.simplefilter("ignore")
        writer.add_graph(net, images[:64])


@torch.no_grad()
def log_embedding(writer: SummaryWriter, tag: str, net: MNISTNet, images: torch.Tensor,
                  raw_images: torch.Tensor, labels: torch.Tensor, count: int, seed: int, epoch: int,
                  predictions: torch.Tensor | None = None) -> None:
    """Learned 256-d features of `count` random digits, for the projector.

    Labelled with the digit, and with the network's prediction too when given, so that the
    projector can colour the points by either.
    """
    if count == 0:
        return
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    net.eval()
    features = net.get_features(images[pick.to(images.device)]).cpu()
    # Thumbnails in [0, 1]: raw 0-255 values would saturate the sprite to white.
    thumbnails = raw_images[pick].unsqueeze(1).float() / 255
    chosen_labels = labels[pick.to(labels.device)].tolist()
    if predictions is None:
        metadata, header = chosen_labels, None
    else:
        chosen_predictions = predictions[pick.to(predictions.device)].tolist()
        metadata = [list(pair) for pair in zip(chosen_labels, chosen_predictions)]
        header = ["label", "prediction"]
    # Filed under the epoch (<run>/000NN/<tag>/), so that a run resumed to train longer adds
    # its new embedding beside the old one instead of overwriting it.
    writer.add_embedding(features, metadata=metadata, metadata_header=header, label_img=thumbnails,
                         global_step=epoch, tag=tag)


def log_epoch_details(writer: SummaryWriter, net: MNISTNet, result: Evaluation, epoch: int) -> None:
    """Every epoch: weight and gradient histograms, accuracy per digit, the conv1 filters."""
    for name, parameter in net.named_parameters():
        writer.add_histogram(f"weights/{name}", parameter.detach(), epoch)
        if parameter.grad is not None:  # the gradient of the epoch's last step
            writer.add_histogram(f"gradients/{name}", parameter.grad, epoch)
    for digit, accuracy in enumerate(result.class_accuracy()):
        writer.add_scalar(f"test accuracy per digit/{digit}", accuracy, epoch)
    filters = net.conv1.weight.detach().cpu()  # (8, 1, 5, 5)
    low = filters.amin(dim=(1, 2, 3), keepdim=True)
    high = filters.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (filters - low) / (high - low).clamp(min=1e-8)  # each filter stretched to [0, 1]
    enlarged = F.interpolate(scaled, scale_factor=8, mode="nearest")  # 5x5 is too small to see
    writer.add_image("conv1 filters", torchvision.utils.make_grid(enlarged, nrow=8, pad_value=1), epoch)


def confusion_counts(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """counts[true, predicted]: how many test digits of each class got each prediction."""
    return torch.bincount(labels * 10 + predictions, minlength=100).view(10, 10).cpu()


def confusion_figure(labels: torch.Tensor, predictions: torch.Tensor) -> plt.Figure:
    counts = confusion_counts(labels, predictions)
    figure, axes = plt.subplots(figsize=(6.5, 6))
    axes.imshow(counts.clamp(max=int(counts.max()) // 10 or 1).numpy(), cmap="Blues")  # clamped: errors show
    for true in range(10):
        for predicted in range(10):
            count = int(counts[true, predicted])
            axes.text(predicted, true, count, ha="center", va="center", fontsize=8,
                      color="white" if true == predicted else "black")
    axes.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit",
             title="Confusion matrix of the test set (counts)")
    figure.tight_layout()
    return figure


def misclassified_figure(raw_images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                         count: int = 36) -> plt.Figure:
    wrong = (predictions != labels).nonzero().flatten()[:count].cpu()
    columns = 6
    rows = max(1, math.ceil(len(wrong) / columns))
    figure, grid = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.5), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, index in zip(grid.flat, wrong.tolist()):
        axes.imshow(raw_images[index].numpy(), cmap="gray")
        axes.set_title(f"true {int(labels[index])}\npred {int(predictions[index])}", fontsize=8)
    figure.suptitle(f"Misclassified test digits (first {len(wrong)})", fontsize=10)
    figure.tight_layout()
    return figure


def log_final_details(writer: SummaryWriter, net: MNISTNet, result: Evaluation, raw_test_images: torch.Tensor,
                      test_images: torch.Tensor, epoch: int, num_embeddings: int, seed: int) -> None:
    """After training, from the test set: confusion matrix, mistakes, PR curves, embedding."""
    labels, predictions = result.labels, result.predictions
    writer.add_figure("confusion matrix", confusion_figure(labels, predictions), epoch)
    mistakes = misclassified_figure(raw_test_images, labels, predictions)
    writer.add_figure("misclassified digits", mistakes, epoch)
    probabilities = F.softmax(result.logits, dim=1).cpu()
    for digit in range(10):
        writer.add_pr_curve(f"pr curve/{digit}", (labels == digit).cpu(), probabilities[:, digit], epoch)
    log_embedding(writer, "test features", net, test_images, raw_test_images, labels, num_embeddings, seed,
                  epoch, predictions=predictions)


def log_hparams(writer: SummaryWriter, args: argparse.Namespace, metrics: dict) -> None:
    """One HPARAMS row for this run, written through the run's own writer.

    SummaryWriter.add_hparams would start a separate sub-run; the metrics named here are the
    run's own `test accuracy` and `test loss` curves, whose last values the tab shows.
    """
    hparam_values = {"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                     "momentum": args.momentum, "weight_decay": args.weight_decay,
                     "lr_decay": args.lr_decay, "seed": args.seed, "deterministic": args.deterministic}
    experiment, session_start, session_end = hparams(
        hparam_values, {"test accuracy": metrics["test_accuracy"], "test loss": metrics["test_loss"]})
    for summary in (experiment, session_start, session_end):
        writer.file_writer.add_summary(summary)


def write_json(path: Path, data: dict) -> None:
    """Write atomically, like the checkpoints: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror}; free some disk space or "
                        "pick another --log-dir") from None


# ----------------------------------------------------------------------------------------
# Several processes: torchrun starts one copy of this script per process (GPU) and sets
# RANK, LOCAL_RANK and WORLD_SIZE. Every process trains on its share of each batch order;
# process 0 alone shows the progress bar and writes the logs, checkpoints and JSON files.


def start_distributed(args: argparse.Namespace) -> None:
    """Under torchrun, join the process group (gloo on the CPU, nccl on GPUs) and pick this
    process's GPU. A plain `python train_mnist.py` runs as one process and does nothing here."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return
    if args.device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started more processes on this machine than its "
                            f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node="
                            f"{torch.cuda.device_count()} or --device cpu")
        args.device = torch.device("cuda", local_rank)
        torch.cuda.set_device(args.device)
        dist.init_process_group("nccl", device_id=args.device)
    else:
        dist.init_process_group("gloo")


def process_rank() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless started by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class NullWriter:
    """Stands in for SummaryWriter in processes other than 0: they train, but do not log."""

    def __getattr__(self, name: str) -> "NullWriter":
        return self

    def __call__(self, *args, **kwargs) -> "NullWriter":
        return self


def load_splits(args: argparse.Namespace, rank: int, splits: tuple[bool, ...] = (True, False)) -> list:
    """The splits asked for (train=True, test=False) on the device. Under torchrun process 0
    goes first, so that a download happens once; the others then read the files it left."""
    if rank != 0:
        dist.barrier()
    loaded = [load_data(args, train=train) for train in splits]
    if rank == 0 and dist.is_available() and dist.is_initialized():
        dist.barrier()
    return loaded


# ----------------------------------------------------------------------------------------
# Main: one run, a sweep of runs, or the evaluation of a checkpoint


def load_data(args: argparse.Namespace, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One split on the device: (raw uint8 images on the host, normalized images, labels)."""
    raw_images, labels = load_mnist(args.data_dir, train=train, verify=args.verify_data)
    return raw_images, normalize(raw_images.to(args.device)), labels.to(args.device)


def config_of(args: argparse.Namespace) -> dict:
    """The resolved flags of one run, as JSON-ready values (also stored in checkpoints)."""
    skip = {"checkpoint", "resume", "evaluate"}
    config = {key: value[0] if key in SWEEP_FLAGS and isinstance(value, list) else value
              for key, value in vars(args).items() if key not in skip}
    return {key: str(value) if isinstance(value, (Path, torch.device)) else value
            for key, value in config.items()}


def set_determinism(args: argparse.Namespace) -> None:
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def run(args: argparse.Namespace, stop: StopFlag) -> dict:
    """One training run (new or resumed): returns its final metrics."""
    set_determinism(args)
    rank, world_size = process_rank()
    (raw_train_images, train_images, train_labels), (raw_test_images, test_images, test_labels) = (
        load_splits(args, rank))
    train_loader = DeviceLoader(train_images, train_labels, args.batch_size, shuffle=True, seed=args.seed,
                                rank=rank, world_size=world_size)
    test_loader = DeviceLoader(test_images, test_labels, args.test_batch_size, rank=rank,
                               world_size=world_size)

    net, optimizer, scheduler = build_model(args, total_steps=args.epochs * len(train_loader))
    stop.deferred = True  # from here on a signal is honoured at a safe point, with the state saved
    if args.resume:
        restore_model(net, args.checkpoint)
        run_dir = run_dir_to_resume(args.checkpoint, args.epochs)
        progress, scheduler = restore_run(args.checkpoint, optimizer, scheduler, args.lr_decay,
                                          args.epochs * len(train_loader), len(train_loader), world_size)
    else:
        progress = Progress()
        run_dir = make_run_dir(args.log_dir, args.run_name, args) if rank == 0 else None
    config = config_of(args) | {"run_dir": str(run_dir)}
    if rank == 0:
        write_json(run_dir / "config.json", config)
        print(f"Training on {args.device} with seed {args.seed}"
              + (f" in {world_size} processes" if world_size > 1 else "") + f"; logging to {run_dir}")
    # Under torchrun the model is wrapped so that backward() averages the gradients of all
    # processes; each process on its own GPU, if any.
    model = net if world_size == 1 else DistributedDataParallel(
        net, device_ids=[args.device.index] if args.device.type == "cuda" else None)

    def save(name: str) -> None:
        if rank == 0:  # the weights are the same in every process
            save_checkpoint(run_dir / "checkpoints" / f"{name}.pt", {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": progress.epoch,
                "global_step": progress.epoch * len(train_loader) + progress.batch,
                "world_size": world_size, "progress": dataclasses.asdict(progress),
                "rng": {"torch": torch.get_rng_state()}, "config": config})

    writer = SummaryWriter(run_dir) if rank == 0 else NullWriter()
    try:
        if not args.resume:
            log_inputs(writer, net, raw_train_images, train_images)
        final_test = train(model, optimizer, train_loader, writer, args.epochs, scheduler=scheduler,
                           test_loader=test_loader, progress=progress, save=save, stop=stop)
        if final_test is None:  # resumed after its last epoch: test once more for the figures
            final_test = test(net, test_loader)  # every process takes part; process 0 logs
        if rank != 0:
            return {}
        started = time.perf_counter()
        log_embedding(writer, "train features", net, train_images, raw_train_images, train_labels,
                      args.num_embeddings, args.seed, args.epochs)
        log_final_details(writer, net, final_test, raw_test_images, test_images,
                          args.epochs, args.num_embeddings, args.seed)
        progress.logging_seconds += time.perf_counter() - started
        metrics = final_metrics(progress, args.epochs, len(train_labels))
        log_hparams(writer, args, metrics)
        write_json(run_dir / "metrics.json", metrics)  # last: only a finished run has one
    except Interrupted as interrupted:
        if run_dir is not None and (run_dir / "checkpoints" / "last.pt").exists():
            interrupted.run_dir = run_dir
        raise
    finally:
        stop.deferred = False
        writer.close()
    print(f"Test accuracy: {metrics['test_accuracy']:.4f}")
    print(f"Run directory: {run_dir}")
    return metrics


def build_model(args: argparse.Namespace, total_steps: int):
    """The network (seeded), its SGD optimizer and learning-rate schedule."""
    torch.manual_seed(args.seed)
    net = MNISTNet().to(args.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return net, optimizer, make_scheduler(optimizer, args.lr_decay, total_steps)


def final_metrics(progress: Progress, epochs: int, train_count: int) -> dict:
    final = progress.history[-1]
    return {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "epochs": epochs,
        "training_seconds": round(progress.seconds, 3),
        "images_per_second": round(epochs * train_count / progress.seconds, 1),
        "visualization_seconds": round(progress.logging_seconds, 3),
    }


def run_dir_to_resume(checkpoint: dict, epochs: int) -> Path:
    """The folder of the run a checkpoint belongs to, if that run can go on to `epochs`."""
    if checkpoint["path"].parent.name != "checkpoints":
        raise UserError("--resume continues a run in its folder: give the run folder, or a checkpoint "
                        "in its checkpoints/ folder (use --evaluate to test a loose checkpoint)")
    run_dir = checkpoint["path"].parent.parent
    if checkpoint["epoch"] >= epochs and (run_dir / "metrics.json").exists():
        raise UserError(f"run {run_dir} has finished its {checkpoint['epoch']} epochs; "
                        "resume it with a larger --epochs to train longer")
    return run_dir


def restore_run(checkpoint: dict, optimizer: torch.optim.Optimizer, scheduler,
                decay_fraction: float, total_steps: int, steps_per_epoch: int, world_size: int):
    """Load a checkpoint's training state to continue its run; returns (progress, scheduler)."""
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        progress = Progress(**checkpoint["progress"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise UserError(f"{checkpoint['path']} lacks part of the training state (optimizer, schedule "
                        "or position), so it cannot be resumed; --evaluate can still test it") from None
    if checkpoint.get("world_size", 1) != world_size:
        # Another number of processes splits an epoch into other steps: an interrupted epoch
        # starts again from its first batch, and the schedule continues from the epoch's start.
        progress.batch, progress.loss_sum = 0, 0.0
        scheduler = make_scheduler(optimizer, decay_fraction, total_steps,
                                   start_step=progress.epoch * steps_per_epoch)
    if process_rank()[0] == 0:
        print(f"Resuming {checkpoint['path'].parent.parent} at epoch {progress.epoch + 1}, "
              f"batch {progress.batch}")
    return progress, scheduler


def evaluate(args: argparse.Namespace) -> float:
    """Test a checkpoint on the test set; no training, no run directory."""
    checkpoint = args.checkpoint
    net = MNISTNet().to(args.device)
    restore_model(net, checkpoint)
    rank, world_size = process_rank()
    ((_, test_images, test_labels),) = load_splits(args, rank, splits=(False,))
    result = test(net, DeviceLoader(test_images, test_labels, args.test_batch_size, rank=rank,
                                    world_size=world_size))
    if rank == 0:
        print(f"Checkpoint: {checkpoint['path']} (epoch {checkpoint['epoch']})")
        print(f"Test loss: {result.loss:.4f}")
        print(f"Test accuracy: {result.accuracy:.4f}")
    return result.accuracy


def sweep(runs: list[argparse.Namespace], stop: StopFlag) -> list[dict]:
    """Run each point of the grid in turn; a failed run is reported and the sweep goes on."""
    is_main = process_rank()[0] == 0  # under torchrun, process 0 keeps the table
    results = []
    for index, one_run in enumerate(runs, start=1):
        if stop.signum is not None:
            raise Interrupted(stop.signum)
        values = {key: getattr(one_run, key) for key in SWEEP_FLAGS}
        report(f"\n=== Sweep run {index}/{len(runs)}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        try:
            metrics = run(one_run, stop)
            outcome = {"test_accuracy": metrics.get("test_accuracy"), "test_loss": metrics.get("test_loss"),
                       "status": "ok"}
        except UserError as error:
            report(f"error: {error}", every_node=True)
            outcome = {"test_accuracy": None, "test_loss": None, "status": f"failed: {error}"}
        if is_main:
            results.append(values | outcome)
    if not results:
        return results
    results.sort(key=lambda row: -1 if row["test_accuracy"] is None else row["test_accuracy"], reverse=True)
    table_path = runs[0].log_dir / f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"
    with open(table_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print("\nSweep results, best first:")
    print(" ".join(f"{key:>14}" for key in results[0]))
    for row in results:
        print(" ".join(f"{'-' if value is None else value:>14}" for value in row.values()))
    print(f"Saved to {table_path}")
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        with StopFlag() as stop:
            start_distributed(args)
            if args.evaluate:
                evaluate(args)
                return 0
            runs = expand_sweep(args)
            if len(runs) == 1:
                run(runs[0], stop)
            else:
                sweep(runs, stop)
            if stop.signum is not None:  # it came during the final logging: nothing was lost
                report(f"Stopped by {signal.Signals(stop.signum).name} as the run finished.")
                return 128 + stop.signum
    except UserError as error:
        report(f"error: {error}", every_node=True)
        return 1
    except (Interrupted, KeyboardInterrupt) as interrupted:
        signum = getattr(interrupted, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        run_dir = getattr(interrupted, "run_dir", None)
        if run_dir is None:
            report(f"\nStopped by {name} before there was anything to save.")
        else:
            report(f"Stopped by {name}; state saved to {run_dir / 'checkpoints' / 'last.pt'}.\n"
                   f"Resume with: python train_mnist.py --resume {run_dir}")
        return 128 + signum
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def report(message: str, every_node: bool = False) -> None:
    """Print to stderr from process 0 (or, for errors, from the first process of each machine)."""
    rank = process_rank()[0]
    if rank == 0 or (every_node and int(os.environ.get("LOCAL_RANK", 0)) == 0):
        print(message if rank == 0 else f"[rank {rank}] {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
