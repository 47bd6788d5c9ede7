"""--predict on your own images: real MNIST test digits, saved as files the way a user has them."""

import random
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import train_mnist
from conftest import one_line_error, permission_denied, train_in_process
from models import MNISTNet

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow  # every test here uses a model trained for 2 epochs on the real MNIST


@pytest.fixture(scope="module")
def checkpoint(real_data_dir, tmp_path_factory) -> Path:
    """A model trained for 1 epoch on the real training set (validation held out as usual): 98.5%
    of the test digits right."""
    log_dir = tmp_path_factory.mktemp("predict")
    return train_in_process(real_data_dir, log_dir, "model", "--epochs", "1", "--num-embeddings", "0",
                            "--device", "cpu")


@pytest.fixture(scope="module")
def test_digits(real_data_dir) -> train_mnist.Split:
    return train_mnist.load_split(real_data_dir, False, CPU)


def predictions(capsys, *argv: str) -> tuple[int, dict[str, int], list[str]]:
    """main(argv) in this process: its exit code, the digit predicted for each file, its error lines."""
    code = train_mnist.main(list(argv))
    out, err = capsys.readouterr()
    predicted = {}
    for line in out.splitlines():
        path, result = line.rsplit(": ", 1)
        predicted[path] = int(result.split()[0])
    return code, predicted, [line for line in err.splitlines() if line.startswith("error: ")]


def photo_of(digit: np.ndarray, rng: random.Random) -> Image.Image:
    """A 28x28 MNIST digit as a phone might see it: dark ink on white paper, 4 to 10 times larger,
    off-centre on a larger sheet, slightly blurred, with sensor noise."""
    scale = rng.uniform(4, 10)
    ink = Image.fromarray(digit).resize((round(28 * scale),) * 2, Image.BICUBIC)
    width, height = (round(side * rng.uniform(1.4, 2.2)) for side in ink.size)
    sheet = Image.new("L", (width, height), 235)
    place = (rng.randint(0, sheet.width - ink.width), rng.randint(0, sheet.height - ink.height))
    sheet.paste(Image.new("L", ink.size, 20), place, mask=ink)  # dark ink where the digit is bright
    sheet = sheet.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 6, (sheet.height, sheet.width))
    return Image.fromarray((np.asarray(sheet) + noise).clip(0, 255).astype(np.uint8))


def test_28x28_pngs_of_test_digits_get_the_predictions_of_the_tensors(checkpoint, test_digits, tmp_path,
                                                                       capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    for index in range(1000):
        Image.fromarray(test_digits.raw[index].numpy()).save(folder / f"{index:04}.png")
    net = MNISTNet()
    net.load_state_dict(torch.load(checkpoint / "checkpoints" / "best.pt", weights_only=True)["model"])
    net.eval()
    with torch.no_grad():
        expected = net(test_digits.images[:1000]).argmax(dim=1).tolist()
    code, predicted, errors = predictions(capsys, "--predict", str(folder), "--checkpoint", str(checkpoint),
                                          "--device", "cpu")
    assert code == 0 and errors == []
    assert len(predicted) == 1000
    agree = sum(predicted[str(folder / f"{index:04}.png")] == expected[index] for index in range(1000))
    assert agree >= 990, agree


def test_the_readmes_code_loads_the_model_and_reads_digits_as_the_script_does(checkpoint, test_digits):
    """The README's snippet, run as written on a real checkpoint, fed as the README says."""
    readme = (Path(train_mnist.__file__).parent / "README.md").read_text()
    snippet = readme.split("In your own code")[1].split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(snippet.replace("runs/<run-name>", str(checkpoint)), namespace)
    x = (test_digits.raw[:1000, None].float() / 255 - 0.1307) / 0.3081
    with torch.no_grad():
        read = namespace["model"](x).argmax(1)
        expected = train_mnist.test(namespace["model"], train_mnist.DeviceLoader(test_digits, 1000))
    assert torch.equal(read, expected.logits[:1000].argmax(1))
    assert (read == test_digits.labels[:1000]).float().mean() > 0.95


def test_photos_of_test_digits_are_read_right(checkpoint, test_digits, tmp_path, capsys):
    rng = random.Random(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    labels = {}
    for index in range(2000, 2040):  # 20 PNG and 20 JPEG (.jpg, and .jfif as Windows browsers save it)
        path = folder / f"{index}.{'png' if index % 2 else 'jfif' if index % 4 else 'jpg'}"
        photo_of(test_digits.raw[index].numpy(), rng).save(path, quality=85)
        labels[str(path)] = int(test_digits.labels[index])
    seen = tmp_path / "seen"
    code, predicted, errors = predictions(capsys, "--predict", str(folder), "--checkpoint", str(checkpoint),
                                          "--save-inputs", str(seen))
    assert code == 0 and errors == []
    right = sum(predicted[path] == label for path, label in labels.items())
    assert right >= 0.9 * len(labels), f"{right} of {len(labels)}"
    # What the model saw: 28x28, light ink on black, like MNIST.
    inputs = sorted(seen.iterdir())
    assert len(inputs) == 40
    seen_digit = np.asarray(Image.open(inputs[0]))
    assert seen_digit.shape == (28, 28) and seen_digit.max() == 255 and seen_digit[0].max() == 0


def test_a_digit_on_lined_paper_is_read_as_on_plain_paper(checkpoint, test_digits, tmp_path, capsys):
    """A notebook's ruled lines, fainter than the pen, run across the whole photo: they must not
    make the digit's box the whole page, with the digit a speck in it."""
    rng = random.Random(2)
    labels = {}
    for index in range(3000, 3040):
        photo = photo_of(test_digits.raw[index].numpy(), rng)
        for y in range(rng.randint(0, 30), photo.height, 32):  # on paper of 235, the ink at 20
            ImageDraw.Draw(photo).line((0, y, photo.width, y), fill=185, width=2)
        photo.save(tmp_path / f"{index}.png")
        labels[str(tmp_path / f"{index}.png")] = int(test_digits.labels[index])
    code, predicted, errors = predictions(capsys, "--predict", str(tmp_path), "--checkpoint", str(checkpoint))
    assert code == 0 and errors == []
    right = sum(predicted[path] == label for path, label in labels.items())
    assert right >= 0.9 * len(labels), f"{right} of {len(labels)}"


def test_a_phone_photo_stored_on_its_side_is_read_upright_and_its_line_is_whole(checkpoint, test_digits,
                                                                                tmp_path, capsys):
    """A phone keeps a photo's pixels as the sensor saw them and says in EXIF how to turn them. The
    same photo saved upright and saved on its side with EXIF orientation 6 (turn 90 degrees
    clockwise to show) must be read alike, as one whole line each."""
    upright = photo_of(test_digits.raw[4].numpy(), random.Random(1))  # a 4; on its side, it reads as a 5
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    upright.rotate(90, expand=True).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    assert train_mnist.main(["--predict", str(tmp_path / "upright.jpg"), str(tmp_path / "sideways.jpg"),
                             "--checkpoint", str(checkpoint)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    read = []
    for line, name in zip(lines, ("upright.jpg", "sideways.jpg")):
        match = re.fullmatch(rf"{re.escape(str(tmp_path / name))}: (\d) \((\d+\.\d)%\), then (\d) "
                             rf"\((\d+\.\d)%\), (\d) \((\d+\.\d)%\)", line)
        assert match, line
        digits, shares = match.groups()[::2], [float(share) for share in match.groups()[1::2]]
        assert len(set(digits)) == 3 and shares == sorted(shares, reverse=True) and sum(shares) <= 100.1
        read.append(digits[0])
    assert read == ["4", "4"]


def test_a_16_bit_scan_reads_like_the_same_digit_in_8_bits(checkpoint, test_digits, tmp_path, capsys):
    """A scanner may save 16-bit grey levels, which Pillow clips to white on its way to 8 bits."""
    scan = np.asarray(photo_of(test_digits.raw[7].numpy(), random.Random(2)))
    Image.fromarray(scan).save(tmp_path / "8-bit.png")
    Image.fromarray(scan.astype(np.uint16) * 257).save(tmp_path / "16-bit.png")
    code, predicted, errors = predictions(capsys, "--predict", str(tmp_path / "8-bit.png"),
                                          str(tmp_path / "16-bit.png"), "--checkpoint", str(checkpoint))
    assert code == 0 and errors == []
    assert Image.open(tmp_path / "16-bit.png").mode.startswith("I")
    assert predicted[str(tmp_path / "16-bit.png")] == predicted[str(tmp_path / "8-bit.png")] == \
        int(test_digits.labels[7])


def huge_png_header(path: Path, side: int) -> None:
    """A PNG whose header says side x side pixels (its pixels never come: it is refused first)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_each_bad_image_is_one_line_and_the_others_are_still_read(checkpoint, test_digits, tmp_path, capsys):
    good = tmp_path / "seven.png"
    Image.fromarray(255 - test_digits.raw[0].numpy()).save(good)  # a 7, dark on white
    transparent = tmp_path / "transparent.png"  # dark ink on a transparent sheet, as drawing apps save it
    alpha = Image.fromarray(test_digits.raw[1].numpy())
    Image.merge("LA", (Image.new("L", alpha.size, 0), alpha)).save(transparent)
    light = tmp_path / "light.png"  # light ink on a transparent sheet: laid on white, it would vanish
    alpha = Image.fromarray(test_digits.raw[2].numpy())
    Image.merge("LA", (Image.new("L", alpha.size, 255), alpha)).save(light)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))  # an iPhone's format
    Image.new("L", (200, 100), 255).save(tmp_path / "blank.png")
    huge_png_header(tmp_path / "huge.png", 20_000)  # over Pillow's own limit
    huge_png_header(tmp_path / "large.png", 8_000)  # under it, over ours
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    bad = ["notes.png", "empty.jpg", "phone.heic", "blank.png", "huge.png", "large.png", "gone.png"]
    argv = ["--predict", str(good), *(str(tmp_path / name) for name in bad), str(transparent), str(light),
            "--checkpoint", str(checkpoint)]
    code, predicted, errors = predictions(capsys, *argv)
    assert code == 1
    assert predicted == {str(good): int(test_digits.labels[0]), str(transparent): int(test_digits.labels[1]),
                         str(light): int(test_digits.labels[2])}
    assert [error.split(": ")[1] for error in errors] == [str(tmp_path / name) for name in bad]
    reasons = dict(zip(bad, errors))
    for name in ("notes.png", "empty.jpg", "phone.heic"):
        assert reasons[name].endswith(": not in an image format that Pillow reads; save it as PNG or JPEG")
    assert "no digit found: the image is blank" in reasons["blank.png"]
    for name in ("huge.png", "large.png"):
        assert "too large an image (over 50,000,000 pixels)" in reasons[name]
    assert reasons["gone.png"].endswith(": cannot be read as an image (No such file or directory)")


def test_predict_needs_a_checkpoint_and_writes_nothing(checkpoint, test_digits, tmp_path, capsys):
    for argv, error in ((["--predict", "x.png"], "--predict needs --checkpoint, the model that reads the "
                         "images: a run, e.g. runs/NAME"),
                        (["--checkpoint", "runs/x"], "--checkpoint and --save-inputs go with --predict (to "
                         "test a run: --evaluate runs/NAME)"),
                        (["--save-inputs", "seen"], "--checkpoint and --save-inputs go with --predict")):
        with pytest.raises(SystemExit) as exit_info:
            train_mnist.parse_args(argv)
        assert exit_info.value.code == 2 and f"error: {error}" in capsys.readouterr().err
    image = tmp_path / "digit.png"
    Image.fromarray(test_digits.raw[2].numpy()).save(image)
    before = sorted(path for path in checkpoint.parent.rglob("*"))
    code, predicted, _ = predictions(capsys, "--predict", str(image), "--checkpoint",
                                     str(checkpoint / "checkpoints" / "last.pt"))
    assert code == 0 and predicted == {str(image): int(test_digits.labels[2])}
    assert sorted(path for path in checkpoint.parent.rglob("*")) == before
    assert sorted(tmp_path.iterdir()) == [image]
    assert train_mnist.main(["--predict", str(image), "--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "no checkpoint at" in one_line_error(capsys)


def test_predict_under_torchrun_is_refused_before_reading_an_image(checkpoint, tmp_path, monkeypatch):
    """torchrun would start a copy per process, each printing every line: --predict wants python."""
    monkeypatch.setattr(train_mnist, "DISTRIBUTED", True)
    with pytest.raises(train_mnist.UserError) as refused:
        train_mnist.predict([tmp_path / "digit.png"], train_mnist.load_checkpoint(checkpoint, tmp_path), CPU,
                            None)
    assert str(refused.value) == "--predict runs in one process: start it with python, not torchrun"


def test_save_inputs_keeps_one_file_per_image_where_names_repeat(checkpoint, test_digits, tmp_path, capsys):
    """a.jpg beside a.png, and a.png in a second folder: three images, three inputs, each the
    digit of its own image."""
    for folder, name, index in (("one", "a.png", 0), ("one", "a.jpg", 1), ("two", "a.png", 2)):
        (tmp_path / folder).mkdir(exist_ok=True)
        photo = photo_of(test_digits.raw[index].numpy(), random.Random(index))
        photo.save(tmp_path / folder / name, quality=95)
    seen = tmp_path / "seen"
    code, _, errors = predictions(capsys, "--predict", str(tmp_path / "one"), str(tmp_path / "two"),
                                  "--checkpoint", str(checkpoint), "--save-inputs", str(seen))
    assert code == 0 and errors == []
    assert sorted(file.name for file in seen.iterdir()) == ["a.png", "a_2.png", "a_3.png"]
    # In the order read: one/a.jpg, one/a.png, two/a.png; each the digit of its own image.
    for name, image in (("a.png", "one/a.jpg"), ("a_2.png", "one/a.png"), ("a_3.png", "two/a.png")):
        path = tmp_path / image
        model_saw = train_mnist.mnist_digit(train_mnist.read_grey(path), path).mul(255).round().byte()
        assert np.array_equal(np.asarray(Image.open(seen / name)), model_saw.numpy())


def test_save_inputs_never_overwrites_a_file(checkpoint, test_digits, tmp_path, capsys):
    """--save-inputs into the photos' own folder: the photo a.png stays as it was, and a second
    run keeps the first run's file."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo_of(test_digits.raw[0].numpy(), random.Random(0)).save(photos / "a.png")
    photo = (photos / "a.png").read_bytes()
    for _ in range(2):
        code, _, errors = predictions(capsys, "--predict", str(photos / "a.png"), "--checkpoint",
                                      str(checkpoint), "--save-inputs", str(photos))
        assert code == 0 and errors == []
    assert (photos / "a.png").read_bytes() == photo
    assert sorted(file.name for file in photos.iterdir()) == ["a.png", "a_2.png", "a_3.png"]
    assert Image.open(photos / "a_2.png").size == (28, 28)
    assert (photos / "a_2.png").read_bytes() == (photos / "a_3.png").read_bytes()


def test_a_folder_it_may_not_open_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """A folder without read permission, wherever the script meets it (chmod does not stop root,
    who runs CI: the refusal is made where the folder is listed)."""
    folder = tmp_path / "photos"
    folder.mkdir()

    def denied(path: Path):
        raise permission_denied(path)

    monkeypatch.setattr(Path, "iterdir", denied)
    assert train_mnist.main(["--predict", str(folder), "--checkpoint", str(checkpoint)]) == 1
    assert one_line_error(capsys) == (f"error: {folder}: Permission denied; fix its permissions, or give "
                                      "another path")


def test_save_inputs_where_a_file_stands_is_one_line(checkpoint, test_digits, tmp_path, capsys):
    image, taken = tmp_path / "digit.png", tmp_path / "taken"
    Image.fromarray(test_digits.raw[3].numpy()).save(image)
    taken.write_text("a file, not a folder")
    argv = ["--predict", str(image), "--checkpoint", str(checkpoint), "--save-inputs", str(taken)]
    assert train_mnist.main(argv) == 1
    assert one_line_error(capsys) == (f"error: cannot write {taken}/digit.png: File exists; the previous "
                                      "file, if any, is kept. A file stands where a folder should be; pick "
                                      "another --save-inputs")
    assert sorted(tmp_path.iterdir()) == [image, taken] and taken.read_text() == "a file, not a folder"


def test_a_folder_without_images_is_one_line_and_the_others_are_still_read(checkpoint, test_digits, tmp_path,
                                                                          capsys):
    empty, image = tmp_path / "empty", tmp_path / "digit.png"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image, and not named as one")
    # What macOS leaves beside a photo on a USB drive: named as an image, hidden, and none.
    (empty / "._digit.png").write_bytes(b"\x00\x05\x16\x07" + bytes(100))
    Image.fromarray(test_digits.raw[4].numpy()).save(image)
    code, predicted, errors = predictions(capsys, "--predict", str(empty), str(image), "--checkpoint",
                                          str(checkpoint))
    assert code == 1 and predicted == {str(image): int(test_digits.labels[4])}
    assert errors == [f"error: {empty}: no images in this folder (.bmp, .gif, .jfif, .jpeg, .jpg, .png, "
                      ".tif, .tiff, .webp)"]
