"""What a run shows about the model: histograms, per-digit accuracy, figures, PR curves, embeddings,
checked in the event files and through a real TensorBoard server."""

import collections
import io
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_mnist
from conftest import config_of, events_of, free_port, synthetic_digits, write_mnist
from models import MNISTNet

EPOCHS = 2
EPOCH_ENDS = [2, 4]  # the steps where the epochs end: 256 training digits in batches of 128


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("visual")
    argv = ["--epochs", str(EPOCHS), "--lr", "0.05", "--num-embeddings", "30", "--device", "cpu",
            "--val-size", "64",
            "--data-dir", str(write_mnist(root / "data")), "--log-dir", str(root / "runs"), "--run-name", "v"]
    assert train_mnist.main(argv) == 0
    return root / "runs" / "v"


def test_weight_and_gradient_histograms_every_epoch(run_dir):
    events = events_of(run_dir)
    for name, _ in MNISTNet().named_parameters():
        for kind in ("weights", "weight gradients"):
            assert [event.step for event in events.Histograms(f"{kind}/{name}")] == EPOCH_ENDS


def test_accuracy_per_digit_every_epoch_adds_up(run_dir):
    validation = events_of(run_dir / "validation")  # the sub-run of the validation set's curves
    per_digit = [validation.Scalars(f"per digit accuracy/{digit}") for digit in range(10)]
    assert all([event.step for event in curve] == EPOCH_ENDS for curve in per_digit)
    _, train_labels = synthetic_digits(320, seed=1)  # the training split write_mnist wrote
    held_out = torch.randperm(320, generator=torch.Generator().manual_seed(train_mnist.VALIDATION_SEED))[:64]
    counts = np.bincount(train_labels[held_out.numpy()], minlength=10)
    for epoch in range(EPOCHS):
        weighted = sum(curve[epoch].value * count for curve, count in zip(per_digit, counts)) / counts.sum()
        assert weighted == pytest.approx(validation.Scalars("accuracy")[epoch].value, abs=1e-6)


def test_misclassified_image_shows_each_wrong_digit_twice_as_large_above_its_labels():
    raw = torch.randint(0, 255, (50, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    predictions = labels.clone()
    predictions[[3, 17, 42]] = torch.tensor([5, 0, 9])
    picture = np.asarray(train_mnist.misclassified_image(raw, labels, predictions))
    assert picture.shape == (30 + 96, 6 * 72 + 8, 3)  # a title, then one row of six places

    def place(column: int) -> np.ndarray:
        return picture[30:, 4 + column * 72:4 + (column + 1) * 72, 0]

    for column, index in enumerate([3, 17, 42]):  # in the order of the test set
        enlarged = raw[index].repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()
        assert np.array_equal(place(column)[:56, 8:64], enlarged)
        assert place(column)[58:].min() < 100  # its caption is written under it
    assert all(place(column).min() == 255 for column in (3, 4, 5))  # three mistakes, three places


def test_confusion_image_puts_right_answers_in_blue_and_mistakes_in_red():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    predictions = torch.tensor([0] * 5 + [1, 1, 2] + [2, 2, 7, 7])
    picture = np.asarray(train_mnist.confusion_image(labels, predictions))

    def background(true: int, predicted: int) -> tuple:  # a cell's corner, clear of its number
        return tuple(int(value) for value in picture[70 + true * 40 + 3, 44 + predicted * 40 + 3])

    assert all(background(digit, digit) == train_mnist.RIGHT for digit in range(10))
    assert background(0, 1) == background(9, 3) == train_mnist.PAPER  # never happened: blank
    once, twice = background(1, 2), background(2, 7)
    assert all(red > green + 40 for red, green, _ in (once, twice))  # mistakes are red...
    assert sum(twice) < sum(once)  # ...darker the more often they happened


def image_of(events: EventAccumulator, tag: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)))


def test_figures_and_filters_are_images(run_dir):
    events = events_of(run_dir)
    for tag in ("visualizations/confusion matrix", "visualizations/misclassified digits"):
        picture = image_of(events, tag)
        assert picture.shape[0] >= 100 and picture.shape[1] > 200 and picture.std() > 10
    filters = events.Images("visualizations/conv1 filters")
    assert [image.step for image in filters] == EPOCH_ENDS
    assert (filters[-1].width, filters[-1].height) == (8 * 42 + 2, 42 + 2)  # 8 filters of 40x40, padded


def test_precision_recall_curve_per_digit(run_dir):
    content = events_of(run_dir).PluginTagToContent("pr_curves")
    assert set(content) == {f"pr curve/{digit}" for digit in range(10)}


def test_test_embedding_has_label_and_prediction_columns(run_dir):
    folder = run_dir / "00002" / "test features"
    rows = (folder / "metadata.tsv").read_text().strip().splitlines()
    assert rows[0] == "label\tprediction" and len(rows) == 31
    assert all(len(row.split("\t")) == 2 for row in rows[1:])
    assert np.loadtxt(folder / "tensors.tsv", delimiter="\t").shape == (30, 256)
    assert (run_dir / "00002" / "train features" / "sprite.png").exists()


def fetch(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard(run_dir):
    """A real TensorBoard server on the run's log folder; yields its data URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir.parent),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if fetch(f"{base}/runs") == ["v", "v/train", "v/validation"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not answer within 90 s"
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def tensorboard_order(tag: str) -> list[tuple]:
    """TensorBoard's own order of tag names (compareTagNames in its frontend): a run of digits
    compares as a number, and "/" and digits come before any other character."""
    return [(0, 0) if token == "/" else (1, int(token)) if token.isdigit() else (2, token)
            for token in re.findall(r"\d+|.", tag)]


def groups_in_order(tags: set[str]) -> list[str]:
    """The groups TensorBoard shows, top to bottom: tags sorted its way, grouped by their first
    path component (Time Series opens the first two, Scalars the first three)."""
    groups = [tag.split("/", 1)[0] for tag in sorted(tags, key=tensorboard_order)]
    return list(dict.fromkeys(groups))


@pytest.mark.slow
def test_tensorboard_opens_on_the_loss_of_both_sets_and_the_validation_accuracy(tensorboard):
    """The groups that open first hold the training and validation loss in one chart, then the
    validation accuracy; the learning rate, the test set's one score, the histograms and the
    pictures come after. Checked on what a real TensorBoard server lists."""
    cards = fetch(f"{tensorboard}/plugin/timeseries/tags")
    runs_of = collections.defaultdict(set)  # a Time Series card is a tag, with a line per run
    for run, tags in cards["scalars"]["runTagInfo"].items():
        for tag in tags:
            runs_of[tag].add(run)
    time_series = set(runs_of) | set(cards["histograms"]["runTagInfo"]["v"]) | set(
        cards["images"]["tagRunSampledInfo"])
    assert groups_in_order(time_series)[:2] == ["accuracy", "loss"]
    assert runs_of["loss"] == {"v/train", "v/validation"} and runs_of["accuracy"] == {"v/validation"}
    after = ["test", "training", "visualizations", "weight gradients", "weights"]
    assert [group for group in groups_in_order(time_series) if group in after] == after
    scalars = {tag for tags in fetch(f"{tensorboard}/plugin/scalars/tags").values() for tag in tags}
    assert groups_in_order(scalars)[:3] == ["accuracy", "loss", "per digit accuracy"]


@pytest.mark.slow
def test_a_real_tensorboard_serves_everything(run_dir, tensorboard):
    base = tensorboard
    runs_of_scalars = fetch(f"{base}/plugin/scalars/tags")
    scalars = runs_of_scalars["v"]
    assert {"training/loss per step", "training/learning rate", "test/loss", "test/accuracy"} <= set(scalars)
    assert set(runs_of_scalars["v/train"]) == {"loss"}
    assert {"loss", "accuracy", "per digit accuracy/0"} <= set(runs_of_scalars["v/validation"])
    for run in ("v/train", "v/validation"):
        points = fetch(f"{base}/plugin/scalars/scalars?run={run}&tag=loss")
        assert [step for _, step, _ in points] == EPOCH_ENDS
    pictures = set(fetch(f"{base}/plugin/images/tags")["v"])
    assert pictures == {f"visualizations/{name}" for name in ("training digits", "conv1 filters",
                                                              "confusion matrix", "misclassified digits")}
    histograms = set(fetch(f"{base}/plugin/histograms/tags")["v"])
    assert fetch(f"{base}/plugin/graphs/info")["v"]["run_graph"] is True
    assert {"weights/conv1.weight", "weight gradients/fc3.weight"} <= histograms
    assert len(fetch(f"{base}/plugin/pr_curves/tags")["v"]) == 10
    assert fetch(f"{base}/plugin/projector/runs") == ["v"]
    embeddings = fetch(f"{base}/plugin/projector/info?run=v")["embeddings"]
    assert {e["tensorName"].split(":")[0] for e in embeddings} == {"train features", "test features"}
    assert all(e["tensorShape"] == [30, 256] and "sprite" in e for e in embeddings)

    experiment = fetch(f"{base}/plugin/hparams/experiment", {"experimentName": ""})
    # Every column, with its type: TensorBoard's numbers are all FLOAT64 (it has no integer
    # type); the switches are booleans.
    types = {info["name"]: info.get("type") for info in experiment["hparamInfos"]}
    switches = ("nesterov", "deterministic")
    numbers = ("lr", "batch_size", "epochs", "momentum", "weight_decay", "warmup", "lr_decay",
               "label_smoothing", "seed", "val_size", "patience")
    expected = dict.fromkeys(numbers, "DATA_TYPE_FLOAT64") | dict.fromkeys(switches, "DATA_TYPE_BOOL")
    assert types == expected
    shown_first = {info["name"] for info in experiment["hparamInfos"] if info.get("differs")}
    assert shown_first == {"lr", "batch_size", "epochs", "momentum", "seed"}  # TensorBoard shows five
    columns = {(metric["name"].get("group", ""), metric["name"]["tag"]): metric["displayName"]
               for metric in experiment["metricInfos"]}
    assert columns == {
        ("validation", "accuracy"): "validation accuracy", ("validation", "loss"): "validation loss",
        ("", "test/accuracy"): "test accuracy", ("", "test/loss"): "test loss"}
    groups = fetch(f"{base}/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [],
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
    (group,) = groups["sessionGroups"]
    assert group["name"] == "v"  # the trial's name is the run's
    config = config_of(run_dir)
    assert group["hparams"]["lr"] == pytest.approx(0.05)
    assert group["hparams"]["batch_size"] == config["batch_size"]
    assert group["hparams"]["nesterov"] is True and group["hparams"]["deterministic"] is False
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metric = {(m["name"].get("group", ""), m["name"]["tag"]): m["value"] for m in group["metricValues"]}
    assert metric["", "test/accuracy"] == pytest.approx(metrics["test_accuracy"])  # side by side
    assert metric["validation", "accuracy"] == pytest.approx(metrics["final_validation_accuracy"])
    assert len(metric) == 4
