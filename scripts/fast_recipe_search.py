"""Candidates for the --fast recipe, each trained for 2 epochs with seeds 0, 1, 2; prints the
final validation accuracy (the choice is made on validation, never on test) and seconds.

    MNIST_DATA_DIR=... python scripts/fast_recipe_search.py

Each candidate changes the --fast recipe as it stood before label smoothing (batch 256, lr 0.003,
10% warm-up, no dropout, no augmentation, EMA 0.99). docs/PERFORMANCE.md quotes its output.
"""

import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch

from mnist_cnn.config import FAST
from mnist_cnn.data import load_mnist
from mnist_cnn.train import train

BEFORE = dataclasses.replace(FAST, lr=3e-3, label_smoothing=0.0)
CANDIDATES = {
    "before": {},
    "label smoothing 0.1": dict(label_smoothing=0.1),
    "batch 128, lr 0.002": dict(batch_size=128, lr=2e-3),
    "lr 0.004": dict(lr=4e-3),
    "warm-up 20%": dict(warmup=0.2),
    "label smoothing 0.1, lr 0.004": dict(label_smoothing=0.1, lr=4e-3),
    "label smoothing 0.1, batch 128, lr 0.002": dict(label_smoothing=0.1, batch_size=128, lr=2e-3),
}

if __name__ == "__main__":
    data = load_mnist()
    device = torch.device("cpu")
    for name, change in CANDIDATES.items():
        vals, secs = [], []
        for seed in range(3):
            cfg = dataclasses.replace(BEFORE, seed=seed, **change)
            with tempfile.TemporaryDirectory() as tmp:
                history = train(cfg, Path(tmp) / "run", data, device, progress=False,
                                log=lambda s: None)
            vals.append(100 * history[-1]["val_accuracy"])
            secs.append(sum(h["seconds"] for h in history))
        print(f"{name:42s} validation {', '.join(f'{v:.2f}' for v in vals)}  "
              f"mean {statistics.mean(vals):.3f}  seconds {', '.join(f'{s:.1f}' for s in secs)}",
              flush=True)
