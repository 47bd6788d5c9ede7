"""What a run shows about the model: histograms, per-digit accuracy, figures, PR curves, embeddings,
checked in the event files and through a real TensorBoard server."""

import io
import json
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
from conftest import events_of, free_port, synthetic_digits, write_mnist
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
    events = events_of(run_dir)
    per_digit = [events.Scalars(f"validation accuracy per digit/{digit}") for digit in range(10)]
    assert all([event.step for event in curve] == EPOCH_ENDS for curve in per_digit)
    _, train_labels = synthetic_digits(320, seed=1)  # the training split write_mnist wrote
    held_out = torch.randperm(320, generator=torch.Generator().manual_seed(train_mnist.VALIDATION_SEED))[:64]
    counts = np.bincount(train_labels[held_out.numpy()], minlength=10)
    for epoch in range(EPOCHS):
        weighted = sum(curve[epoch].value * count for curve, count in zip(per_digit, counts)) / counts.sum()
        assert weighted == pytest.approx(events.Scalars("validation accuracy")[epoch].value, abs=1e-6)


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


@pytest.mark.slow
def test_a_real_tensorboard_serves_everything(run_dir):
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
                if fetch(f"{base}/runs") == ["v"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not answer within 90 s"
            time.sleep(0.5)

        scalars = fetch(f"{base}/plugin/scalars/tags")["v"]
        expected = {"training loss", "training loss/per step", "validation loss", "validation accuracy",
                    "test loss", "test accuracy", "learning rate", "validation accuracy per digit/0"}
        assert expected <= set(scalars)
        points = fetch(f"{base}/plugin/scalars/scalars?run=v&tag=training%20loss")
        assert [step for _, step, _ in points] == EPOCH_ENDS
        pictures = set(fetch(f"{base}/plugin/images/tags")["v"])
        assert pictures == {f"visualizations/{name}" for name in ("training digits", "conv1 filters",
                                                                  "confusion matrix", "misclassified digits")}
        histograms = set(fetch(f"{base}/plugin/histograms/tags")["v"])
        # TensorBoard lists tags by name: the curves first, then the pictures and histograms.
        assert max(scalars) < min(pictures | histograms)
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
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {
            "validation accuracy", "validation loss", "test accuracy", "test loss"}
        groups = fetch(f"{base}/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
        (group,) = groups["sessionGroups"]
        assert group["name"] == "v"  # the trial's name is the run's
        config = json.loads((run_dir / "config.json").read_text())
        assert group["hparams"]["lr"] == pytest.approx(0.05)
        assert group["hparams"]["batch_size"] == config["batch_size"]
        assert group["hparams"]["nesterov"] is True and group["hparams"]["deterministic"] is False
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metric = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert metric["test accuracy"] == pytest.approx(metrics["test_accuracy"])  # side by side
        assert metric["validation accuracy"] == pytest.approx(metrics["final_validation_accuracy"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
