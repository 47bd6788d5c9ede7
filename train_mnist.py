"""Train a small CNN on MNIST and watch it learn in TensorBoard.

    python train_mnist.py --epochs=5 --lr=1e-3 --batch_size=64
    tensorboard --logdir runs

The story, top to bottom: parse the command line; load MNIST once into two tensors on the
training device; train with SGD, evaluating on the test set after every epoch; log the
curves, the graph, a sample of digits, the learned features and the hyper-parameters to one
TensorBoard run directory.
"""

import argparse
import datetime
import json
import math
import struct
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

from models import MNISTNet

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the training pixels scaled to [0, 1]
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class UserError(Exception):
    """Something the user can fix: main() prints it as one line and exits with code 1."""


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


def momentum_float(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "in [0, 1)")


def unit_fraction(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v <= 1, "in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a small CNN on MNIST and log the training to TensorBoard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--epochs", type=positive_int, default=10, help="passes over the training set")
    add("--lr", type=positive_float, default=0.05, help="peak learning rate of SGD")
    add("--batch_size", "--batch-size", dest="batch_size", type=positive_int, default=64,
        help="training images per step")
    add("--momentum", type=momentum_float, default=0.9, help="SGD momentum")
    add("--lr_decay", "--lr-decay", dest="lr_decay", type=unit_fraction, default=0.2,
        help="final fraction of the steps over which the learning rate falls linearly from "
             "--lr to 0 (0: constant)")
    add("--seed", type=int, default=1, help="seed of the weights and of the batch order")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
        help="where to train; auto takes CUDA if available, else MPS, else the CPU")
    add("--data_dir", "--data-dir", dest="data_dir", type=Path, default=Path("data"),
        help="folder holding MNIST/raw/ (torchvision's layout); downloaded there if absent")
    add("--log_dir", "--log-dir", dest="log_dir", type=Path, default=Path("runs"),
        help="TensorBoard folder; each run gets its own sub-folder")
    add("--run_name", "--run-name", dest="run_name", default=None,
        help="name of this run's folder (default: time stamp and key hyper-parameters)")
    add("--test_batch_size", "--test-batch-size", dest="test_batch_size", type=positive_int,
        default=1000, help="images per evaluation batch")
    add("--num_embeddings", "--num-embeddings", dest="num_embeddings", type=non_negative_int,
        default=256, help="training images shown in the projector (0: none)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except UserError as error:
        parser.error(str(error))  # exits 2, like any other bad flag
    return args


# ----------------------------------------------------------------------------------------
# Data: each split is read once and then lives as one normalized tensor on the device.


def load_mnist(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split as (uint8 images N x 28 x 28, int64 labels), downloading MNIST if absent."""
    raw_dir = data_dir / "MNIST" / "raw"
    images_file, labels_file = (raw_dir / name for name in (MNIST_FILES[:2] if train else MNIST_FILES[2:]))
    if not (images_file.exists() and labels_file.exists()):
        download_mnist(data_dir)
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
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool = False, seed: int = 0) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        count = len(self.labels)
        if not self.shuffle:
            for start in range(0, count, self.batch_size):
                yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            return
        generator = torch.Generator().manual_seed(self.seed * 100_000 + self.epoch)
        order = torch.randperm(count, generator=generator).to(self.labels.device)
        for start in range(0, count, self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.images[batch], self.labels[batch]


# ----------------------------------------------------------------------------------------
# Training and evaluation


def train_epoch(net: MNISTNet, optimizer: torch.optim.Optimizer, scheduler, loader: DeviceLoader,
                description: str) -> tuple[list[float], list[float]]:
    """One pass over the training set; returns each step's loss and learning rate."""
    net.train()
    # Step losses stay on the device and come to the host once per epoch (and every 50
    # steps for the progress bar): a .item() per step would stall a GPU on every batch.
    step_losses = torch.zeros(len(loader), device=loader.labels.device)
    step_lrs = []
    progress = tqdm(loader, desc=description, unit="batch", leave=True, dynamic_ncols=True)
    for step, (images, labels) in enumerate(progress):
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        step_losses[step] = loss.detach()
        if step % 50 == 49:
            progress.set_postfix(loss=f"{step_losses[step - 49:step + 1].mean().item():.4f}")
    return step_losses.tolist(), step_lrs


def train(net: MNISTNet, optimizer: torch.optim.Optimizer, loader: DeviceLoader,
          writer: SummaryWriter, epochs: int, *, scheduler, test_loader: DeviceLoader) -> list[dict]:
    """Train for `epochs`, testing and logging after each; returns one metrics dict per epoch."""
    history = []
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        started = time.perf_counter()
        step_losses, step_lrs = train_epoch(net, optimizer, scheduler, loader, f"Epoch {epoch}/{epochs}")
        seconds = time.perf_counter() - started
        test_loss, test_accuracy = test(net, test_loader)

        first_step = (epoch - 1) * len(loader)
        for offset, (loss, lr) in enumerate(zip(step_losses, step_lrs)):
            writer.add_scalar("training loss/per step", loss, first_step + offset + 1)
            writer.add_scalar("learning rate", lr, first_step + offset + 1)
        train_loss = sum(step_losses) / len(step_losses)
        writer.add_scalar("training loss", train_loss, epoch)
        writer.add_scalar("test loss", test_loss, epoch)
        writer.add_scalar("test accuracy", test_accuracy, epoch)
        history.append({"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                        "test_accuracy": test_accuracy, "seconds": seconds})
        tqdm.write(f"Epoch {epoch}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
                   f"test accuracy {test_accuracy:.4f}")
    return history


@torch.no_grad()
def test(model: MNISTNet, loader: DeviceLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole loader."""
    model.eval()
    device = loader.labels.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for images, labels in loader:
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
    count = len(loader.labels)
    return loss_sum.item() / count, correct.item() / count


def make_scheduler(optimizer: torch.optim.Optimizer, decay_fraction: float, total_steps: int):
    """Hold --lr, then fall linearly to 0 over the last `decay_fraction` of the steps.

    A long constant phase learns fast; the final decay settles the weights into a minimum
    (worth about 0.5% test accuracy here over a constant rate).
    """
    decay_steps = decay_fraction * total_steps
    if decay_steps == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, max(0.0, total_steps - step) / decay_steps))


# ----------------------------------------------------------------------------------------
# Run directory and TensorBoard


def make_run_dir(log_dir: Path, run_name: str | None, args: argparse.Namespace) -> Path:
    """Create a fresh run folder; two runs never share one."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        if run_name is not None:
            run_dir = log_dir / run_name
            run_dir.mkdir()
            return run_dir
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}_lr{args.lr:g}_bs{args.batch_size}_ep{args.epochs}_mom{args.momentum:g}"
        for attempt in range(1000):
            run_dir = log_dir / (base if attempt == 0 else f"{base}_{attempt + 1}")
            try:
                run_dir.mkdir()  # atomic: of two runs racing for a name, one gets it
                return run_dir
            except FileExistsError:
                continue
    except FileExistsError:
        raise UserError(f"run {run_dir} already exists; pick another --run-name") from None
    except OSError as error:
        raise UserError(f"cannot create a run folder in {log_dir}: {error.strerror}; "
                        "fix its permissions or pick another --log-dir") from None
    raise UserError(f"too many runs named {base}* in {log_dir}")


def log_inputs(writer: SummaryWriter, net: MNISTNet, raw_images: torch.Tensor,
               images: torch.Tensor) -> None:
    """A grid of 64 training digits, and the network's graph traced on a real batch."""
    grid = torchvision.utils.make_grid(raw_images[:64].unsqueeze(1).float() / 255, nrow=8)
    writer.add_image("mnist_images", grid)
    with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
        warnings.simplefilter("ignore")
        writer.add_graph(net, images[:64])


@torch.no_grad()
def log_embedding(writer: SummaryWriter, net: MNISTNet, images: torch.Tensor,
                  raw_images: torch.Tensor, labels: torch.Tensor, count: int, seed: int) -> None:
    """Learned 256-d features of `count` random training digits, for the projector."""
    if count == 0:
        return
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    net.eval()
    features = net.get_features(images[pick.to(images.device)]).cpu()
    # Thumbnails in [0, 1]: raw 0-255 values would saturate the sprite to white.
    thumbnails = raw_images[pick].unsqueeze(1).float() / 255
    writer.add_embedding(features, metadata=labels[pick].tolist(), label_img=thumbnails,
                         tag="train features")


def log_hparams(writer: SummaryWriter, args: argparse.Namespace, metrics: dict) -> None:
    """One HPARAMS row for this run, written through the run's own writer.

    SummaryWriter.add_hparams would start a separate sub-run; the metrics named here are the
    run's own `test accuracy` and `test loss` curves, whose last values the tab shows.
    """
    hparam_values = {"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                     "momentum": args.momentum, "seed": args.seed, "lr_decay": args.lr_decay}
    experiment, session_start, session_end = hparams(
        hparam_values, {"test accuracy": metrics["test_accuracy"], "test loss": metrics["test_loss"]})
    for summary in (experiment, session_start, session_end):
        writer.file_writer.add_summary(summary)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------
# Main


def run(args: argparse.Namespace) -> dict:
    """One training run: data, model, run directory, training, final logs. Returns its metrics."""
    device = args.device
    raw_train_images, train_labels = load_mnist(args.data_dir, train=True)
    raw_test_images, test_labels = load_mnist(args.data_dir, train=False)
    train_images = normalize(raw_train_images.to(device))
    test_images = normalize(raw_test_images.to(device))
    train_loader = DeviceLoader(train_images, train_labels.to(device), args.batch_size,
                                shuffle=True, seed=args.seed)
    test_loader = DeviceLoader(test_images, test_labels.to(device), args.test_batch_size)

    torch.manual_seed(args.seed)
    net = MNISTNet().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = make_scheduler(optimizer, args.lr_decay, args.epochs * len(train_loader))

    run_dir = make_run_dir(args.log_dir, args.run_name, args)
    config = {key: str(value) if isinstance(value, (Path, torch.device)) else value
              for key, value in vars(args).items()}
    write_json(run_dir / "config.json", config | {"run_dir": str(run_dir)})
    print(f"Training on {device} with seed {args.seed}; logging to {run_dir}")

    writer = SummaryWriter(run_dir)
    try:
        log_inputs(writer, net, raw_train_images, train_images)
        started = time.perf_counter()
        history = train(net, optimizer, train_loader, writer, args.epochs,
                        scheduler=scheduler, test_loader=test_loader)
        seconds = time.perf_counter() - started
        metrics = {
            "test_accuracy": history[-1]["test_accuracy"],
            "test_loss": history[-1]["test_loss"],
            "epochs": args.epochs,
            "training_seconds": round(seconds, 3),
            "images_per_second": round(args.epochs * len(train_labels) / seconds, 1),
        }
        log_embedding(writer, net, train_images, raw_train_images, train_labels,
                      args.num_embeddings, args.seed)
        log_hparams(writer, args, metrics)
    finally:
        writer.close()
    write_json(run_dir / "metrics.json", metrics)
    print(f"Test accuracy: {metrics['test_accuracy']:.4f}")
    print(f"Run directory: {run_dir}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
