"""Classify digits in ordinary image files with a trained model (shipped or from a run folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnist_cnn.evaluate import load_run
from mnist_cnn.preprocess import ImageError, preprocess
from mnist_cnn.train import predict_proba, resolve_precision

# The default model, trained by `mnist-cnn train` with the documented defaults and shipped in the
# package (half precision), so predict and serve work right after install.
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights"


@dataclass
class Classifier:
    model: nn.Module
    device: torch.device
    amp: torch.dtype | None

    @classmethod
    def load(cls, run_dir: Path | None = None, device: torch.device | None = None) -> Classifier:
        device = device or torch.device("cpu")
        cfg, model = load_run(Path(run_dir) if run_dir else DEFAULT_MODEL, device)
        model.eval()
        return cls(model, device, resolve_precision(cfg.precision, device))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 28, 28] MNIST-style images → probabilities [N, 10]."""
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        return predict_proba(self.model, tensor, self.device, self.amp).numpy()


@dataclass
class Prediction:
    name: str
    image: np.ndarray | None = None  # the 28×28 image the model saw
    probabilities: list[float] | None = None
    error: str | None = None

    @property
    def label(self) -> int:
        return int(np.argmax(self.probabilities))

    def to_json(self) -> dict:
        if self.error:
            return {"file": self.name, "error": self.error}
        return {"file": self.name, "prediction": self.label,
                "probabilities": [round(p, 6) for p in self.probabilities]}


def predict_files(classifier: Classifier, paths: list[str]) -> list[Prediction]:
    """Preprocess every file (a bad one gets an error, the others go on) and classify in a batch."""
    results = []
    for path in paths:
        try:
            results.append(Prediction(path, image=preprocess(Path(path).read_bytes())))
        except ImageError as e:
            results.append(Prediction(path, error=str(e)))
        except OSError as e:
            results.append(Prediction(path, error=e.strerror or str(e)))
    good = [r for r in results if r.error is None]
    if good:
        probs = classifier.probabilities(np.stack([r.image for r in good]))
        for r, p in zip(good, probs, strict=True):
            r.probabilities = p.tolist()
    return results
