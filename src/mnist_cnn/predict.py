"""Classify digits in ordinary image files with a trained model (shipped or from a run folder)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnist_cnn.config import CorruptFile
from mnist_cnn.ensemble import is_ensemble, model_names, model_proba, read_spec, ready_members
from mnist_cnn.evaluate import load_run
from mnist_cnn.preprocess import ImageError, preprocess, read_file
from mnist_cnn.train import inference_precision, read_report

# The default model, trained by `mnist-cnn train --model strong` (seed 0) and shipped in the
# package (half precision), so predict and serve work right after install.
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights"


@dataclass
class Classifier:
    """A run's kept model, or an ensemble's members averaged: through test-time augmentation when
    the ensemble was made with it (its ensemble.json), as `mnist-cnn ensemble` scored it."""

    models: list[tuple[nn.Module, torch.dtype | None]]  # each with its inference precision
    device: torch.device
    tta: bool = False
    about: str = ""  # which model, in words (serve's page says it)

    @classmethod
    def load(cls, folder: Path | None = None, device: torch.device | None = None) -> Classifier:
        """FileNotFoundError for a folder that is not a finished run or ensemble."""
        device = device or torch.device("cpu")
        folder = Path(folder) if folder else DEFAULT_MODEL
        runs, tta, ensemble = [folder], False, is_ensemble(folder)
        if ensemble:
            runs, tta = ready_members(folder), bool(read_spec(folder).get("tta"))
        models, configs = [], []
        for run in runs:
            cfg, model = load_run(run, device)
            models.append((model.eval(), inference_precision(cfg.precision, device)))
            configs.append(cfg)
        kind = model_names(configs)
        what = (f"an ensemble of {len(runs)} {kind} model{'s' if len(runs) > 1 else ''}"
                if ensemble else f"a {kind} model")
        return cls(models, device, tta, describe(folder, what))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 28, 28] MNIST-style images → probabilities [N, 10]."""
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        total = sum(model_proba(model, tensor, self.device, amp, self.tta)
                    for model, amp in self.models)
        return (total / len(self.models)).numpy()


def describe(folder: Path, what: str) -> str:
    """'a strong model shipped with mnist-cnn, 99.69% on the MNIST test set': `what` and where
    from, by the folder's name only (a page served to others should not show this machine's
    paths), and its report's test accuracy where it has one."""
    resolved = folder.resolve()
    where = ("shipped with mnist-cnn" if resolved == DEFAULT_MODEL
             else f"from {printable(resolved.name)}")
    try:
        accuracy = read_report(folder, needs=("test_accuracy",))["test_accuracy"]
    except (OSError, CorruptFile):  # no report (an ensemble stopped before it was scored)
        accuracy = None
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)):
        return f"{what} {where}"  # none, or an edited one: the model is still usable
    return f"{what} {where}, {100 * accuracy:.2f}% on the MNIST test set"


def printable(name: str) -> str:
    """A file name safe to print on any UTF-8 output: bytes that are not UTF-8 (which argv hands
    over as surrogate escapes, and a strict encoder refuses) become backslash escapes, bad_\\xff."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that stand for no byte (Windows names)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Prediction:
    name: str  # the path as given, to open or save by; print `shown_name`
    image: np.ndarray | None = None  # the 28×28 image the model saw
    probabilities: list[float] | None = None
    error: str | None = None

    @property
    def label(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def shown_name(self) -> str:
        return printable(self.name)

    def to_json(self) -> dict:
        # json.dumps writes an undecodable byte as \udcXX: safe to print, and reversible.
        if self.error:
            return {"file": self.name, "error": self.error}
        return {"file": self.name, "prediction": self.label,
                "probabilities": [round(p, 6) for p in self.probabilities]}


def predict_file(classifier: Classifier, path: str) -> Prediction:
    """Classify one file; a file that cannot be read or classified gets an error, not an
    exception."""
    try:
        image = preprocess(read_file(path))
    except ImageError as e:
        return Prediction(path, error=str(e))
    except OSError as e:
        return Prediction(path, error=e.strerror or str(e))
    probabilities = classifier.probabilities(image[None])[0]
    return Prediction(path, image=image, probabilities=probabilities.tolist())


def predict_files(classifier: Classifier, paths: Iterable[str]) -> Iterator[Prediction]:
    """Each file's result in turn, as soon as it is ready, so that a caller can show it at once
    (decoding a large photo can take far longer than classifying it)."""
    for path in paths:
        yield predict_file(classifier, path)


def unique_png_name(path: str, taken: set[str], folder: Path) -> str:
    """The name in `folder` to save the preprocessed `path` under: x.png for a/x.jpg, then
    x-2.png, x-3.png for later files of the same stem, so that none overwrites another, nor a
    file already there (the input images themselves, when `folder` is theirs). `taken` holds the
    names given so far, case-folded as some file systems ignore case, and gets the new one."""
    stem = Path(path).stem
    name, n = f"{stem}.png", 1
    while name.casefold() in taken or os.path.lexists(folder / name):
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name.casefold())
    return name
