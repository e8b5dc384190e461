import io
import json

import numpy as np
import pytest
from PIL import Image

from mnist_cnn import preprocess as pp
from mnist_cnn.cli import main
from mnist_cnn.photos import make_photo
from mnist_cnn.predict import DEFAULT_MODEL, Classifier


@pytest.fixture(scope="module")
def classifier():
    return Classifier.load()


def png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format=fmt, **kw)
    return out.getvalue()


def test_shipped_model_reaches_its_reported_accuracy(mnist, classifier):
    report = json.loads((DEFAULT_MODEL / "report.json").read_text())
    probs = classifier.probabilities(mnist.test_images.numpy())
    accuracy = (probs.argmax(1) == mnist.test_labels.numpy()).mean()
    # Shipped in half precision: allow two test images of difference.
    assert abs(accuracy - report["test_accuracy"]) <= 2e-4
    assert report["test_accuracy"] >= 0.995
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 10 * 1024 * 1024


def test_mnist_digit_survives_preprocessing(mnist, classifier):
    # An MNIST digit is already in MNIST form: preprocessing it again must not change its class.
    digits = mnist.test_images[:300].numpy()
    again = np.stack([pp.to_mnist(d.astype(np.float32) / 255) for d in digits])
    before = classifier.probabilities(digits).argmax(1)
    after = classifier.probabilities(again).argmax(1)
    assert (before == after).mean() >= 0.99


def test_geometry_of_the_result():
    canvas = np.full((300, 500), 255, np.uint8)  # white paper, large
    canvas[40:240, 350:380] = 0  # a dark vertical bar (a "1"), far off centre
    out = pp.preprocess(png(canvas))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    ys, xs = np.nonzero(out > 40)
    assert 19 <= ys.max() - ys.min() + 1 <= 21  # longer side scaled to 20 px
    cy = (out.sum(1) * np.arange(28)).sum() / out.sum()
    cx = (out.sum(0) * np.arange(28)).sum() / out.sum()
    assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6  # centre of mass in the middle
    assert out[0].max() == 0 and out[:, 0].max() == 0  # background is black


@pytest.mark.parametrize("variant", ["inverted", "off_centre_large", "colour", "jpeg", "photo"])
def test_synthetic_user_images_are_classified(variant, mnist, classifier):
    rng = np.random.default_rng(0)
    images, labels = [], mnist.test_labels[:30].numpy()
    for digit in mnist.test_images[:30].numpy():
        dark_on_white = 255 - digit
        if variant == "inverted":
            data = png(dark_on_white)
        elif variant == "off_centre_large":
            canvas = np.full((200, 320), 255, np.uint8)
            big = np.asarray(Image.fromarray(dark_on_white).resize((112, 112)))
            top, left = rng.integers(0, 88), rng.integers(0, 208)
            canvas[top : top + 112, left : left + 112] = big
            data = png(canvas)
        elif variant == "colour":
            rgb = np.stack([dark_on_white, dark_on_white // 2 + 100, np.full_like(digit, 230)], -1)
            data = png(np.where(digit[..., None] > 0, rgb, 240).astype(np.uint8))
        elif variant == "jpeg":
            data = png(np.asarray(Image.fromarray(dark_on_white).resize((84, 84))), fmt="JPEG",
                       quality=40)
        else:
            data = make_photo(digit, rng)
        images.append(pp.preprocess(data))
    predicted = classifier.probabilities(np.stack(images)).argmax(1)
    assert (predicted == labels).sum() >= 29, variant


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (png(np.full((50, 50), 255, np.uint8)), "no ink"),
        (png(np.full((50, 50), 0, np.uint8)), "no ink"),
        (png(np.zeros((64, 64), np.uint8))[:60], "corrupt or truncated"),
    ],
)
def test_bad_images_get_clear_errors(data, message):
    with pytest.raises(pp.ImageError, match=message):
        pp.preprocess(data)


def test_enormous_image_is_refused(monkeypatch):
    monkeypatch.setattr(pp, "MAX_PIXELS", 100 * 100)
    with pytest.raises(pp.ImageError, match="too large"):
        pp.preprocess(png(np.zeros((200, 200), np.uint8)))


def test_transparent_canvas_counts_as_white_paper():
    rgba = np.zeros((100, 100, 4), np.uint8)  # fully transparent
    rgba[20:80, 45:55] = (0, 0, 0, 255)  # opaque black bar
    out = pp.preprocess(png(rgba, "RGBA"))
    assert out[14, 14] > 100 and out[0, 0] == 0


def test_predict_cli(tmp_path, mnist, capsys):
    files = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(png(255 - mnist.test_images[i].numpy()))
        files.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"nope")
    files.insert(1, str(tmp_path / "bad.png"))
    files.append(str(tmp_path / "missing.png"))
    out_dir = tmp_path / "seen"
    assert main(["predict", *files, "--json", "--save-preprocessed", str(out_dir)]) == 1
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == files
    assert [line.get("prediction") for line in lines] == [7, None, 2, 1, None]
    assert "not an image" in lines[1]["error"] and "No such file" in lines[4]["error"]
    assert all(len(line["probabilities"]) == 10 for line in lines if "prediction" in line)
    assert sorted(p.name for p in out_dir.iterdir()) == ["digit0.png", "digit1.png", "digit2.png"]

    assert main(["predict", files[0]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{files[0]}: 7") and "%" in out


def test_classifier_runs_on_cpu_tensors_of_any_batch(classifier):
    probs = classifier.probabilities(np.zeros((1, 28, 28), np.uint8))
    assert probs.shape == (1, 10) and np.isclose(probs.sum(), 1, atol=1e-4)
