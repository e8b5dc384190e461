import io
import json
import os
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_cnn import predict as predict_module
from mnist_cnn import preprocess as pp
from mnist_cnn.cli import main
from mnist_cnn.photos import make_photo
from mnist_cnn.predict import DEFAULT_MODEL, Classifier, predict_files


@pytest.fixture(scope="module")
def classifier():
    return Classifier.load()


def png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format=fmt, **kw)
    return out.getvalue()


def lab_tiff() -> bytes:
    out = io.BytesIO()
    Image.new("LAB", (40, 40)).save(out, format="TIFF")  # Pillow reads LAB but cannot convert it
    return out.getvalue()


def bar() -> bytes:
    """A dark bar on white paper: a 1."""
    canvas = np.full((60, 60), 255, np.uint8)
    canvas[10:50, 28:32] = 0
    return png(canvas)


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
        (lab_tiff(), "unsupported colour mode LAB"),
    ],
)
def test_bad_images_get_clear_errors(data, message):
    with pytest.raises(pp.ImageError, match=message):
        pp.preprocess(data)


def test_specks_scattered_over_a_large_image_are_no_digit():
    # Just over 0.1% of the pixels dark, one by one over 3,000 × 3,000: enough to pass for ink,
    # averaged away to nothing at 20 px (the centre of mass was 0/0).
    paper = np.ones((3000, 3000), np.float32)
    paper[np.random.default_rng(0).random(paper.shape) < 0.00105] = 0.0
    with pytest.raises(pp.ImageError, match="no digit found: the ink is scattered specks"):
        pp.to_mnist(paper)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_damaged_exif_block_is_ignored(fmt):
    canvas = np.full((60, 60), 255, np.uint8)
    canvas[10:50, 28:32] = 0
    plain = pp.preprocess(png(canvas, fmt=fmt, lossless=True))
    assert np.array_equal(pp.preprocess(png(canvas, fmt=fmt, lossless=True,
                                            exif=b"Exif\x00\x00not a TIFF header")), plain)


def test_enormous_image_is_refused(monkeypatch):
    monkeypatch.setattr(pp, "MAX_PIXELS", 100 * 100)
    with pytest.raises(pp.ImageError, match="too large"):
        pp.preprocess(png(np.zeros((200, 200), np.uint8)))


def test_an_image_over_pillows_own_limit_is_too_large_not_unreadable(monkeypatch):
    # Pillow refuses images over twice its MAX_IMAGE_PIXELS before their size can be read.
    monkeypatch.setattr(pp.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(pp.ImageError, match="image is too large"):
        pp.preprocess(png(np.zeros((30, 30), np.uint8)))


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
    # A file name after an option is a file too (argparse alone took it for a stray argument).
    assert main(["predict", *files[:-1], "--json", "--save-preprocessed", str(out_dir),
                 files[-1]]) == 1
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


def test_a_bf16_run_is_scored_in_fp32_where_bf16_is_not_native(tmp_path, monkeypatch):
    # A run trained with --precision bf16, then used on a CPU without native bf16: prediction
    # (and evaluate, teacher labelling) runs in fp32 there, ~9x faster; with native bf16, bf16.
    import shutil

    from mnist_cnn import train

    shutil.copytree(DEFAULT_MODEL, tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**cfg, "precision": "bf16"}))
    for native, amp in ((False, None), (True, torch.bfloat16)):
        monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda native=native: native)
        assert Classifier.load(tmp_path / "run").models[0][1] is amp
    # Runs asking for fp32, or auto, keep what they ask for.
    monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda: True)
    assert train.inference_precision("fp32", torch.device("cpu")) is None
    assert train.inference_precision("auto", torch.device("cpu")) is torch.bfloat16


def test_saved_images_of_files_with_the_same_stem_all_kept(tmp_path, mnist, capsys):
    for folder in "ab":
        (tmp_path / folder).mkdir()
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "b" / "x.jpg"]
    for i, path in enumerate(files):  # test images 0, 1, 2: a 7, a 2, a 1
        path.write_bytes(png(255 - mnist.test_images[i].numpy(), fmt=path.suffix[1:].upper()
                             .replace("JPG", "JPEG")))
    out_dir = tmp_path / "seen"
    assert main(["predict", *map(str, files), "--save-preprocessed", str(out_dir)]) == 0
    saved = ["x.png", "x-2.png", "x-3.png"]  # in the order of the files
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(saved)
    for path, name in zip(files, saved, strict=True):
        expected = pp.preprocess(path.read_bytes())
        assert np.array_equal(np.asarray(Image.open(out_dir / name)), expected), name
    # Into the inputs' own folder: they are neither overwritten nor read after being replaced
    # (a/x.png, read second, is still the 7), and nothing already there is written over.
    original = files[0].read_bytes()
    capsys.readouterr()
    assert main(["predict", str(files[1]), str(files[0]), "--json",
                 "--save-preprocessed", str(tmp_path / "a")]) == 0
    assert [json.loads(s)["prediction"] for s in capsys.readouterr().out.splitlines()] == [2, 7]
    assert files[0].read_bytes() == original
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x-2.png", "x-3.png", "x.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and /dev/zero")
def test_only_regular_files_are_read(tmp_path, capsys):
    (tmp_path / "one.png").write_bytes(bar())
    (tmp_path / "link.png").symlink_to(tmp_path / "one.png")  # followed: a regular file
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
    (tmp_path / "folder").mkdir()
    files = [str(tmp_path / n) for n in ("pipe.png", "folder", "link.png")] + ["/dev/zero"]
    # In a thread, so that a regression fails here instead of hanging the test run.
    done = []
    worker = threading.Thread(target=lambda: done.append(main(["predict", "--json", *files])),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert done == [1]
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == files
    assert "not a regular file" in lines[0]["error"] and "folder" in lines[1]["error"]
    assert lines[2]["prediction"] == 1 and "not a regular file" in lines[3]["error"]


def test_oversized_file_is_refused_without_reading_it(tmp_path, monkeypatch, classifier):
    monkeypatch.setattr(pp, "MAX_BYTES", 100_000)
    big = tmp_path / "big.png"
    big.write_bytes(bar() + b"\0" * 5_000_000)
    tracemalloc.start()
    try:
        [result] = predict_files(classifier, [str(big)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "too large" in result.error and "5,00" in result.error
    assert peak < 1_000_000  # reading the file would take 5 MB


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs Linux /proc")
def test_read_stops_after_the_limit_when_the_size_is_misreported(monkeypatch):
    # /proc files report size 0 whatever they hold: only the bounded read catches them.
    monkeypatch.setattr(pp, "MAX_BYTES", 10)
    with pytest.raises(pp.ImageError, match="over the limit of 10 bytes"):
        pp.read_file("/proc/self/status")


def test_results_are_printed_as_they_come_and_kept_on_ctrl_c(tmp_path, monkeypatch, capsys):
    files = [str(tmp_path / f"{i}.png") for i in range(3)]
    for f in files:
        Path(f).write_bytes(bar())
    calls = []

    def preprocess_then_ctrl_c(data, max_side=None):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while the second file is being decoded
            raise KeyboardInterrupt
        return pp.preprocess(data, max_side)

    monkeypatch.setattr(predict_module, "preprocess", preprocess_then_ctrl_c)
    assert main(["predict", *files]) == 130
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith(f"{files[0]}: 1   (1 ") and len(out.splitlines()) == 1
    assert "Interrupted." in err


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="names must be UTF-8 there")
def test_names_that_are_not_utf8_are_printed_escaped_and_kept_in_json(tmp_path, capsys):
    # pytest's captured stdout is strict UTF-8, like PYTHONIOENCODING=utf-8:strict.
    path = tmp_path / os.fsdecode(b"bad_\xff.png")  # argv gives such a name with surrogates
    path.write_bytes(bar())
    shown = str(tmp_path / "bad_\\xff.png")
    errors = sys.stdout.errors
    assert main(["predict", str(path), str(tmp_path / "other.png")]) == 1
    assert sys.stdout.errors == errors  # the output stream is put back as it was
    out, err = capsys.readouterr()
    assert out.startswith(f"{shown}: 1 ") and "other.png: error" in err
    # --json keeps the name as given (json.dumps escapes the byte as \udcff), so it can be
    # turned back into the file's name.
    assert main(["predict", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == str(path)


def test_names_the_output_cannot_encode_are_printed_escaped(tmp_path, monkeypatch):
    import subprocess

    path = tmp_path / "dígito 七.png"
    path.write_bytes(bar())
    env = {**os.environ, "PYTHONIOENCODING": "ascii:strict"}
    done = subprocess.run([sys.executable, "-m", "mnist_cnn", "predict", str(path),
                           str(tmp_path / "ñ.png")], capture_output=True, env=env, timeout=120)
    assert done.returncode == 1  # the second file is missing
    assert done.stdout.decode("ascii").startswith(f"{tmp_path}{os.sep}d\\xedgito \\u4e03.png: 1 ")
    assert f"{tmp_path}{os.sep}\\xf1.png: error" in done.stderr.decode("ascii")
    # The same for every command (evaluate's, train's and ensemble's last line names the
    # report's folder): not a traceback once the work is done.
    from mnist_cnn import cli

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(cli, "cmd_evaluate", lambda args: print(f"wrote {args.run_dir}") or 0)
    assert main(["evaluate", "résultats"]) == 0
    assert stdout.errors == "strict"
    stdout.flush()
    assert stdout.buffer.getvalue() == b"wrote r\\xe9sultats\n"


def test_an_ensemble_folder_averages_its_members_as_evaluate_scores_them(tmp_path, mnist, capsys):
    import shutil

    from mnist_cnn.config import TrainConfig
    from mnist_cnn.ensemble import ensemble_probas
    from mnist_cnn.train import prepare_model, save_weights

    ens = tmp_path / "ens"
    runs = [ens / "member-0", ens / "member-1"]
    for run in runs:
        shutil.copytree(DEFAULT_MODEL, run)
    torch.manual_seed(0)
    cfg = TrainConfig.load(runs[1] / "config.json")
    save_weights(runs[1] / "model.safetensors", prepare_model(cfg, torch.device("cpu")))
    images = mnist.test_images[:64]
    for tta in (False, True):
        (ens / "ensemble.json").write_text(json.dumps({"members": ["member-0", "member-1"],
                                                       "tta": tta}))
        classifier = Classifier.load(ens)
        assert classifier.tta is tta and len(classifier.models) == 2
        assert classifier.about == "an ensemble of 2 strong models from ens"  # no report yet
        expected = ensemble_probas(runs, [images], torch.device("cpu"), tta)[0].numpy()
        np.testing.assert_allclose(classifier.probabilities(images.numpy()), expected, atol=1e-6)
    # On the command line too; a member not finished is named, for predict and serve alike.
    image = tmp_path / "seven.png"
    image.write_bytes(png(mnist.test_images[0].numpy()))
    assert main(["predict", str(image), "--checkpoint", str(ens), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["prediction"] == int(np.argmax(classifier.probabilities(
        pp.preprocess(image.read_bytes())[None])))
    (runs[1] / "model.safetensors").unlink()
    (runs[0] / "report.json").unlink()
    for command in (["predict", str(image)], ["serve"]):
        assert main([*command, "--checkpoint", str(ens)]) == 2
        err = capsys.readouterr().err
        assert "member-0 not finished (or missing)" in err and "Traceback" not in err
    shutil.copy(DEFAULT_MODEL / "report.json", runs[0])  # finished again; member-1 lacks weights
    assert main(["predict", str(image), "--checkpoint", str(ens)]) == 2
    assert "member-1 is not a finished run folder: model.safetensors is missing" in (
        capsys.readouterr().err)


def test_the_model_is_described_by_kind_folder_name_and_test_accuracy(tmp_path, monkeypatch):
    # What serve's page shows: no path of this machine, only a folder's name, printable.
    import os
    import shutil

    from mnist_cnn.predict import describe

    kind = json.loads((DEFAULT_MODEL / "config.json").read_text())["model"]
    report = json.loads((DEFAULT_MODEL / "report.json").read_text())
    accuracy = f"{100 * report['test_accuracy']:.2f}% on the MNIST test set"
    run = tmp_path / "my run"
    shutil.copytree(DEFAULT_MODEL, run)
    monkeypatch.chdir(tmp_path)
    assert Classifier.load(Path(run.name)).about == f"a {kind} model from my run, {accuracy}"
    # The shipped folder is the shipped model however it is named.
    assert Classifier.load(Path(os.path.relpath(DEFAULT_MODEL))).about == (
        f"a {kind} model shipped with mnist-cnn, {accuracy}")
    # A report whose accuracy is not a number: the model still loads, described without it.
    (run / "report.json").write_text(json.dumps({**report, "test_accuracy": "high"}))
    assert Classifier.load(run).about == f"a {kind} model from my run"
    # A name that is not UTF-8 (the byte 0xff) is escaped: JSON and the page can carry it.
    assert describe(Path("my\udcffrun"), "a model") == "a model from my\\xffrun"


def test_serve_help_says_the_checkpoint_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert "made with it; default: the model shipped with the package) --device" in text
    assert "None" not in text and "(default: cpu) (default: cpu)" not in text
    assert "(default: cpu)" in text


def test_a_reader_that_leaves_early_ends_predict_quietly(tmp_path):
    import subprocess

    image = tmp_path / "bar.png"
    image.write_bytes(bar())
    proc = subprocess.Popen([sys.executable, "-m", "mnist_cnn", "predict", *[str(image)] * 1000],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert err.decode() == ""
