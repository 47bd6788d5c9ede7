"""Time to accuracy of whole training runs: `python train_mnist.py` with each recipe, as a user
runs it (start-up, data, training, logging), one after another in one sitting.

    python benchmarks/recipe.py --data-dir data [--baseline-dir OLD_CHECKOUT] [--seeds 1 2 3]

Each recipe's wall time and its test and validation accuracy come from its own process and
metrics.json. --baseline-dir times the default run of another checkout of this script (an
older commit, say) in the same sitting, so that the ratio is measured side by side.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "train_mnist.py"
BATCH_128 = ["--batch_size", "128", "--epochs", "5", "--lr", "0.05"]
ONE_CYCLE = ["--warmup", "0.2", "--lr_decay", "0.8"]
RECIPES = {  # name: flags, each adding one choice to the one before
    "before (batch 64, 10 epochs)": ["--batch_size", "64", "--epochs", "10", "--lr", "0.02",
                                     "--lr_decay", "0.2"],
    "batch 128, 5 epochs, lr 0.05": [*BATCH_128, "--lr_decay", "0.2"],
    "+ one-cycle (warm-up 0.2, decay 0.8)": [*BATCH_128, *ONE_CYCLE],
    "+ Nesterov": [*BATCH_128, *ONE_CYCLE, "--nesterov"],
    "+ label smoothing 0.1": [*BATCH_128, *ONE_CYCLE, "--nesterov", "--label_smoothing", "0.1"],
    "+ peak lr 0.1": [*BATCH_128, *ONE_CYCLE, "--nesterov", "--label_smoothing", "0.1", "--lr", "0.1"],
    "peak lr 0.1 without label smoothing": [*BATCH_128, *ONE_CYCLE, "--nesterov", "--lr", "0.1"],
    "warm-up 0.1, hold, decay 0.5": [*BATCH_128, "--warmup", "0.1", "--lr_decay", "0.5", "--nesterov",
                                     "--lr", "0.1"],
    "the same, 6 epochs (the defaults)": [*BATCH_128, "--warmup", "0.1", "--lr_decay", "0.5", "--nesterov",
                                          "--lr", "0.1", "--epochs", "6"],
}


def timed_run(script: Path, flags: list[str], data_dir: Path, log_dir: Path, name: str) -> dict:
    command = [sys.executable, str(script), *flags, "--data_dir", str(data_dir), "--log_dir", str(log_dir),
               "--run_name", name]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=script.parent)
    seconds = time.perf_counter() - started
    metrics = json.loads((log_dir / name / "metrics.json").read_text())
    return {"seconds": seconds, "test": metrics["test_accuracy"],
            "validation": metrics.get("best_validation_accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--baseline-dir", type=Path, help="another checkout whose default run is timed too")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="names from RECIPES")
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    with tempfile.TemporaryDirectory() as log_dir:
        rows = []
        if args.baseline_dir:
            result = timed_run(args.baseline_dir / "train_mnist.py", [], data_dir, Path(log_dir), "baseline")
            rows.append(("baseline: default run of " + str(args.baseline_dir), 1, result))
        for name in args.recipes:
            for seed in args.seeds:
                result = timed_run(SCRIPT, [*RECIPES[name], "--seed", str(seed)], data_dir, Path(log_dir),
                                   f"r{len(rows)}")
                rows.append((name, seed, result))
                print(f"{name} | seed {seed} | {result['seconds']:.1f} s | test {result['test']:.4f}",
                      flush=True)
    baseline = rows[0][2]["seconds"] if args.baseline_dir else None
    print("\n| recipe | seed | wall s | vs baseline | validation | test |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seed, result in rows:
        ratio = f"{result['seconds'] / baseline:.2f}x" if baseline else "-"
        validation = "-" if result["validation"] is None else f"{result['validation']:.2%}"
        seconds, test = f"{result['seconds']:.1f}", f"{result['test']:.2%}"
        print(f"| {name} | {seed} | {seconds} | {ratio} | {validation} | {test} |")


if __name__ == "__main__":
    main()
