"""Summarize finished ensemble folders as the rows of docs/RESULTS.md's accuracy tables.

    python scripts/summarize_runs.py runs/abl/rot runs/abl/shift2 ...

For each folder (written by `mnist-cnn ensemble`, or one `mnist-cnn train` run folder, summarized
as an ensemble of one), over its members: the settings that differ from the defaults, the seeds,
the kept epoch's validation accuracy (mean ± std, what choices are made on) and loss, the raw
weights' validation accuracy when the run kept a weight average (what the same run gives without
it: its last epoch's, or its best epoch's for runs that kept the best), test accuracy (mean ± std,
and each), test errors, training seconds, and the ensemble's own test accuracy and errors.
An ensemble stopped part-way is summarized over its finished members (no ensemble figures).
Nothing is re-evaluated: it reads the report.json and metrics.jsonl files the commands wrote.

Runs that logged `val_accuracy_halves` also get `epoch_choice`: the best epoch chosen on one half
of the validation images and read on the other (both ways, averaged), against the last epoch
read the same way. Picking the best of many noisy epochs always looks good on the images it
was picked on; on the other half it shows whether it picked a better model or a luckier reading.
"""

import dataclasses
import json
import statistics
import sys
from pathlib import Path

from mnist_cnn.config import TrainConfig
from mnist_cnn.ensemble import finished_runs
from mnist_cnn.evaluate import kept_val_loss, read_history
from mnist_cnn.train import read_report


def pct(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def changed_settings(cfg: TrainConfig) -> str:
    default = dataclasses.asdict(TrainConfig())
    # The default clean epochs follow the model and the epochs, its rotation the model: compare
    # with those.
    default["clean_epochs"] = dataclasses.replace(cfg, clean_epochs=None).n_clean_epochs()
    default["max_rotation"] = dataclasses.replace(cfg, max_rotation=None).rotation()
    skip = {"seed", "train_subset"}
    parts = [
        f"{name}={value}" for name, value in dataclasses.asdict(cfg).items()
        if name not in skip and value != default[name]
    ]
    return ", ".join(parts) or "defaults"


def epoch_choice(histories: list[list[dict]]) -> dict | None:
    """Best epoch on one validation half, read on the other, against the last epoch (percent,
    mean over runs), for runs whose metrics have `val_accuracy_halves`."""
    picked, last = [], []
    for history in histories:
        halves = [h.get("val_accuracy_halves") for h in history]
        if not halves or any(x is None for x in halves):
            return None
        for choose, read in ((0, 1), (1, 0)):
            # The first best epoch, as training picks it.
            best = max(range(len(halves)), key=lambda e: halves[e][choose])
            picked.append(halves[best][read])
            last.append(halves[-1][read])
    return {"best_epoch_on_other_half": round(100 * statistics.mean(picked), 3),
            "last_epoch": round(100 * statistics.mean(last), 3)}


def raw_val_accuracy(history: list[dict], select: str) -> float:
    """The plain weights' validation accuracy at the epoch the same rule would keep for them
    (-1 when the run logged none: no weight average)."""
    raw = [h.get("val_accuracy_raw", -1) for h in history]
    return raw[-1] if select == "last" else max(raw)


def summarize(folder: Path) -> dict:
    # An ensemble stopped part-way has finished members, maybe one half-trained, and no report
    # of its own: summarize the finished members (the ensemble fields are then None).
    runs = finished_runs(folder)
    if not runs:
        sys.exit(f"{folder}: no finished run (none with a report.json of all its epochs)")
    reports = [read_report(r) for r in runs]
    histories = [read_history(r) for r in runs]
    configs = [TrainConfig.load(r / "config.json") for r in runs]
    raw = [raw_val_accuracy(h, c.select) for h, c in zip(histories, configs, strict=True)]
    ensemble = read_report(folder) if (folder / "report.json").is_file() else None
    return {
        "folder": str(folder),
        "settings": changed_settings(configs[0]),
        "seeds": [c.seed for c in configs],
        "val": pct([r["val_accuracy"] for r in reports]),
        "val_each": [round(100 * r["val_accuracy"], 2) for r in reports],
        "val_loss_each": [
            round(kept_val_loss(h, rep), 4) for h, rep in zip(histories, reports, strict=True)
        ],
        "val_raw": pct(raw) if min(raw) >= 0 else None,
        "test": pct([r["test_accuracy"] for r in reports]),
        "test_each": [round(100 * r["test_accuracy"], 2) for r in reports],
        "errors": [r["test_errors"] for r in reports],
        "best_epochs": [r["best_epoch"] for r in reports],
        "train_seconds": [round(r["train_seconds"]) for r in reports],
        "ensemble_test": round(100 * ensemble["test_accuracy"], 2) if ensemble else None,
        "ensemble_errors": ensemble["test_errors"] if ensemble else None,
        "ensemble_val": round(100 * ensemble["val_accuracy"], 2) if ensemble else None,
        "epoch_choice": epoch_choice(histories),
    }


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print(json.dumps(summarize(Path(arg))))
