"""Every speed figure of the README, measured in one run on one machine:

  1. start-up: `import torch`, `import train_mnist` and `train_mnist.py --help`, each a new process
  2. one epoch against the compute floor (benchmarks/epoch_speed.py), at batch 64 and 128
  3. the default run, `python train_mnist.py`, as a user runs it: its wall time, when its
     validation accuracy first reached 99%, its test accuracy and the share of its logging
  4. a 4-point, 1-epoch sweep with --jobs 1 against --jobs <cores>, alternated

One heavy job at a time, so that none slows another. Prints Markdown tables for the README.

    pip install -c constraints.txt -r requirements.txt
    python benchmarks/report.py --data-dir data [--baseline-dir OLD_CHECKOUT]

--baseline-dir also times another checkout's default run (an older commit, say), just before
this one's, so that the two are compared side by side.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import epoch_speed
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parent.parent
SWEEP = ["--lr", "0.05", "0.1", "--batch_size", "64", "128", "--epochs", "1"]


def seconds_of(command: list[str], cwd: Path = REPO) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=cwd)
    return time.perf_counter() - started


def start_up(repeats: int) -> None:
    commands = {"python -c 'import torch'": [sys.executable, "-c", "import torch"],
                "python -c 'import train_mnist'": [sys.executable, "-c", "import train_mnist"],
                "python train_mnist.py --help": [sys.executable, "train_mnist.py", "--help"]}
    seconds = {name: [] for name in commands}
    for _ in range(repeats):  # interleaved: a drift in the machine's speed hits all three
        for name, command in commands.items():
            seconds[name].append(seconds_of(command))
    torch_alone = statistics.median(seconds["python -c 'import torch'"])
    print(f"\n### Start-up (median of {repeats})\n\n| command | seconds | vs import torch |\n|---|---:|---:|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.2f} | {median / torch_alone:.2f}x |")


def epochs(data_dir: Path, repeats: int) -> None:
    for batch_size in (64, 128):
        median = epoch_speed.measure(data_dir, torch.device("cpu"), batch_size, repeats)
        print(f"\n### One epoch at batch {batch_size} (median of {repeats})\n")
        epoch_speed.print_table(median, 60_000)


def default_run(script: Path, data_dir: Path, log_dir: Path) -> dict:
    """`python train_mnist.py` with no flags but the folders: wall time, and when the monitored
    accuracy first reached 99% (from the wall times TensorBoard keeps with each point)."""
    started = time.time()
    command = [sys.executable, str(script), "--data_dir", str(data_dir), "--log_dir", str(log_dir)]
    seconds = seconds_of(command, cwd=script.parent)
    (run_dir,) = [path for path in log_dir.iterdir() if path.is_dir()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    reached = next((point for point in accuracy_curve(run_dir) if point.value >= 0.99), None)
    return {"seconds": seconds, "metrics": metrics,
            "to_99": None if reached is None else reached.wall_time - started}


def accuracy_curve(run_dir: Path) -> list:
    """The points of the curve that chose the best epoch, with their wall times: "accuracy" in the
    run's validation sub-run; older checkouts wrote "validation accuracy" (or, without a
    validation split, "test accuracy") in the run itself."""
    sub_run = run_dir / "validation"
    events = EventAccumulator(str(sub_run if sub_run.is_dir() else run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    (tag, *_) = [tag for tag in ("accuracy", "validation accuracy", "test accuracy") if tag in tags]
    return events.Scalars(tag)


def default_runs(data_dir: Path, baseline_dir: Path | None, work: Path, repeats: int) -> None:
    """The default run `repeats` times, each just after the baseline's when there is one."""
    runs = {"this checkout": REPO / "train_mnist.py"}
    if baseline_dir:
        runs = {f"baseline ({baseline_dir})": baseline_dir.resolve() / "train_mnist.py"} | runs
    results = {name: [] for name in runs}
    for repeat in range(repeats):
        for index, (name, script) in enumerate(runs.items()):
            results[name].append(default_run(script, data_dir, work / f"default-{repeat}-{index}"))
    print(f"\n### The default run, `python train_mnist.py` ({repeats} times; the median wall time's row)\n")
    print("| checkout | wall s | first >= 99% | test accuracy | training s | logging s "
          "| logging share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    medians = {}
    for name, repeated in results.items():
        result = sorted(repeated, key=lambda one: one["seconds"])[len(repeated) // 2]
        medians[name] = result["seconds"]
        metrics = result["metrics"]
        to_99 = "never" if result["to_99"] is None else f"after {result['to_99']:.1f} s"
        logging, share = metrics.get("visualization_seconds"), "-"
        if logging is not None:
            logging, share = f"{logging:.2f}", f"{logging / metrics['training_seconds']:.1%}"
        print(f"| {name} | {result['seconds']:.1f} | {to_99} | {metrics['test_accuracy']:.2%} | "
              f"{metrics['training_seconds']:.1f} | {logging or '-'} | {share} |")
    for name, repeated in results.items():
        print(f"\n{name}: wall times " + ", ".join(f"{one['seconds']:.1f}" for one in repeated) + " s")
    if baseline_dir:
        baseline, ours = medians.values()
        print(f"\nmedian wall time: {ours / baseline:.2f}x the baseline's")


def sweeps(data_dir: Path, work: Path, repeats: int) -> None:
    """The same sweep with --jobs 1 and --jobs <cores>, alternated `repeats` times: the machine's
    speed drifts, and each pair is side by side."""
    jobs = str(os.cpu_count() or 1)
    rows, seconds = {}, {"1": [], jobs: []}
    for repeat in range(repeats):
        for way in ("1", jobs):
            log_dir = work / f"sweep-{repeat}-jobs-{way}"
            seconds[way].append(seconds_of([sys.executable, "train_mnist.py", *SWEEP, "--jobs", way,
                                            "--data_dir", str(data_dir), "--log_dir", str(log_dir)]))
            (table,) = log_dir.glob("sweep-*.csv")
            with open(table) as file:
                rows[way] = {(row["lr"], row["batch_size"]): row for row in csv.DictReader(file)}
    print(f"\n### A 4-point, 1-epoch sweep: `{' '.join(SWEEP)}`\n")
    print(f"| point | test accuracy, --jobs 1 | test accuracy, --jobs {jobs} |\n|---|---:|---:|")
    for point in sorted(rows["1"]):
        print(f"| lr {point[0]}, batch {point[1]} | {float(rows['1'][point]['test_accuracy']):.2%} | "
              f"{float(rows[jobs][point]['test_accuracy']):.2%} |")
    pairs = ", ".join(f"{one:.1f} s against {many:.1f} s" for one, many in zip(seconds["1"], seconds[jobs]))
    one, many = statistics.median(seconds["1"]), statistics.median(seconds[jobs])
    print(f"\nwall time, --jobs 1 against --jobs {jobs}: {pairs}; medians {one:.1f} s and {many:.1f} s: "
          f"{many / one:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder holding MNIST/raw/")
    parser.add_argument("--baseline-dir", type=Path, help="another checkout whose default run is timed too")
    parser.add_argument("--repeats", type=int, default=5, help="start-ups timed per command")
    parser.add_argument("--epoch-repeats", type=int, default=5, help="epochs timed per pipeline")
    parser.add_argument("--sweep-repeats", type=int, default=3, help="sweeps timed each way")
    parser.add_argument("--run-repeats", type=int, default=3, help="default runs timed per checkout")
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    print(f"Machine: {epoch_speed.machine(torch.device('cpu'))}")
    start_up(args.repeats)
    epochs(data_dir, args.epoch_repeats)
    with tempfile.TemporaryDirectory() as work:
        default_runs(data_dir, args.baseline_dir, Path(work), args.run_repeats)
        sweeps(data_dir, Path(work), args.sweep_repeats)


if __name__ == "__main__":
    main()
