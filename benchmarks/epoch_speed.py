"""How close is one training epoch to the speed limit of this machine?

Times one epoch (MNISTNet, SGD lr 1e-3 momentum 0.9, batch 64 unless --batch-size) three ways,
interleaved in one process run, and prints the ratios:

  floor   forward, backward and step on batches already sliced in memory: no data handling
  ours    train_mnist.py's path: DeviceLoader over device tensors, progress bar, step-loss buffer
  course  torchvision MNIST with per-sample ToTensor/Normalize through a DataLoader (2 workers)

    pip install -c constraints.txt -r requirements.txt
    python benchmarks/epoch_speed.py --data-dir data --repeats 3
"""

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_mnist
from models import MNISTNet

LR, MOMENTUM = 1e-3, 0.9


def new_model(device: torch.device) -> tuple[MNISTNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = MNISTNet().to(device)
    return net, torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(net, optimizer, images, labels) -> None:
    loss = F.cross_entropy(net(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_floor(batches, device) -> float:
    net, optimizer = new_model(device)
    net.train()
    sync(device)
    started = time.perf_counter()
    for images, labels in batches:
        step(net, optimizer, images, labels)
    sync(device)
    return time.perf_counter() - started


def time_ours(loader, device) -> float:
    net, optimizer = new_model(device)
    scheduler = train_mnist.make_scheduler(optimizer, 0.0, 0.2, len(loader))
    loader.set_epoch(1)
    sync(device)
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the bar is drawn, just not shown here
        train_mnist.train(net, optimizer, scheduler, loader, torch.nn.CrossEntropyLoss(), title="Epoch 1/1")
    sync(device)
    return time.perf_counter() - started


def time_course(loader, device) -> float:
    net, optimizer = new_model(device)
    net.train()
    sync(device)
    started = time.perf_counter()  # worker start-up is part of an epoch in this pipeline
    for images, labels in loader:
        step(net, optimizer, images.to(device), labels.to(device))
    sync(device)
    return time.perf_counter() - started


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def course_loader(data_dir: Path, batch_size: int) -> DataLoader:
    # The course's pipeline: torchvision's MNIST, a per-sample transform, a DataLoader with workers.
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(data_dir, train=True, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2)


def measure(data_dir: Path, device: torch.device, batch_size: int, repeats: int) -> dict[str, float]:
    """The median seconds of one epoch for each pipeline, timed in turn `repeats` times."""
    train_set = train_mnist.load_split(data_dir, train=True, device=device)
    images, labels = train_set.images, train_set.labels
    batches = [(images[i:i + batch_size].contiguous(), labels[i:i + batch_size])
               for i in range(0, len(labels), batch_size)]
    ours_loader = train_mnist.DeviceLoader(train_set, batch_size, shuffle=True, seed=1)
    pipelines = {"floor": lambda: time_floor(batches, device), "ours": lambda: time_ours(ours_loader, device),
                 "course": lambda: time_course(course_loader(data_dir, batch_size), device)}
    time_floor(batches[:50], device)  # warm-up: allocator, kernels
    seconds = {name: [] for name in pipelines}
    names = list(pipelines)
    for repeat in range(repeats):  # interleaved, so drifts in machine speed hit all three
        for name in names[repeat % 3:] + names[:repeat % 3]:  # each in every place in turn
            seconds[name].append(pipelines[name]())
        print(f"batch {batch_size}, repeat {repeat + 1}: "
              + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()), file=sys.stderr)
    return {name: statistics.median(values) for name, values in seconds.items()}


def print_table(median: dict[str, float], images: int) -> None:
    print("| pipeline | seconds / epoch | images / s | vs floor |")
    print("|---|---:|---:|---:|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.2f} | {images / seconds:,.0f} | {seconds / median['floor']:.2f}x |")


def machine(device: torch.device) -> str:
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads{gpu}, "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder holding MNIST/raw/")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per pipeline")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    median = measure(args.data_dir, device, args.batch_size, args.repeats)
    print(f"\nMachine: {machine(device)}; median of {args.repeats} epochs, batch {args.batch_size}")
    print_table(median, 60_000)
    print(f"\nours / floor = {median['ours'] / median['floor']:.3f} (target <= 1.25); "
          f"course / ours = {median['course'] / median['ours']:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
