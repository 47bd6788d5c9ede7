"""How close is one training epoch to the speed limit of this machine?

Times one epoch of the seed command's training (MNISTNet, batch 64, SGD lr 1e-3 momentum 0.9)
three ways, interleaved in one process run, and prints the ratios:

  floor   forward, backward and step on batches already sliced in memory: no data handling
  ours    train_mnist.py's path: DeviceLoader over device tensors, progress bar, step-loss buffer
  course  torchvision MNIST with per-sample ToTensor/Normalize through a DataLoader (2 workers)

    pip install -c constraints.txt torchvision   # the course pipeline needs it; train_mnist.py does not
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
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_mnist
from models import MNISTNet

BATCH_SIZE, LR, MOMENTUM = 64, 1e-3, 0.9


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
        train_mnist.train(net, optimizer, scheduler, loader, torch.nn.CrossEntropyLoss(), first_batch=0,
                          stop=train_mnist.StopFlag(), title="Epoch 1/1")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder holding MNIST/raw/")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per pipeline")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)

    images, labels = train_mnist.load_split(args.data_dir, train=True, device=device)[1:]
    batches = [(images[i:i + BATCH_SIZE].contiguous(), labels[i:i + BATCH_SIZE])
               for i in range(0, len(labels), BATCH_SIZE)]
    ours_loader = train_mnist.DeviceLoader(images, labels, BATCH_SIZE, shuffle=True, seed=1)
    course_dataset = torchvision.datasets.MNIST(
        args.data_dir, train=True,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]))
    course_loader = DataLoader(course_dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=2)

    time_floor(batches[:50], device)  # warm-up: allocator, kernels
    seconds = {"floor": [], "ours": [], "course": []}
    for repeat in range(args.repeats):  # interleaved, so drifts in machine speed hit all three
        seconds["floor"].append(time_floor(batches, device))
        seconds["ours"].append(time_ours(ours_loader, device))
        seconds["course"].append(time_course(course_loader, device))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()),
              file=sys.stderr)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads{gpu}, "
          f"torch {torch.__version__}; median of {args.repeats} epochs, batch {BATCH_SIZE}")
    print("| pipeline | seconds / epoch | images / s | vs floor |")
    print("|---|---:|---:|---:|")
    for name in ("floor", "ours", "course"):
        print(f"| {name} | {median[name]:.2f} | {len(labels) / median[name]:,.0f} | "
              f"{median[name] / median['floor']:.2f}x |")
    print(f"\nours / floor = {median['ours'] / median['floor']:.3f} (target <= 1.25); "
          f"course / ours = {median['course'] / median['ours']:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
