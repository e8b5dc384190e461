"""Evaluation: test-set numbers of a trained model, as report.json and figures.

`write_report` is used at the end of training and by `mnist-cnn evaluate`, so both write the same
numbers from the same code: the model of the kept epoch (the last, or with `--select best` the
best by validation), scored on the 10,000 test images. The test set is only reported here,
never used to choose anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mnist_cnn import __version__, figures
from mnist_cnn.config import CorruptFile, TrainConfig, corrupt, write_json
from mnist_cnn.data import MNIST
from mnist_cnn.model import count_params
from mnist_cnn.train import (
    inference_precision,
    load_weights,
    loss_and_accuracy,
    precision_name,
    predict_proba,
    prepare_model,
    read_history,
    read_report,
)


def check_run(run_dir: Path) -> None:
    """Raise FileNotFoundError unless a run folder holds what load_run reads (a check of seconds
    before the data loads, rather than after)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir} does not exist")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is a file, not a run or ensemble folder")
    # What `evaluate --out` writes: a report, no model, and no training's metrics.jsonl (a run
    # that lost its config.json and weights keeps that, and is told what it is missing).
    if (run_dir / "report.json").is_file() and not any(
        (run_dir / name).exists() for name in ("config.json", "model.safetensors", "metrics.jsonl")
    ):
        raise FileNotFoundError(
            f"{run_dir} holds a report and figures but no model (what `mnist-cnn evaluate --out "
            "DIR` writes): give the run or ensemble folder it scored")
    for name in ("config.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a finished run folder: {name} is missing "
                "(a run folder is what `mnist-cnn train --out DIR` writes)"
            )


def load_run(run_dir: Path, device: torch.device) -> tuple[TrainConfig, nn.Module]:
    """Rebuild the kept model of a run folder from its config.json and model.safetensors."""
    run_dir = Path(run_dir)
    check_run(run_dir)
    cfg = TrainConfig.load(run_dir / "config.json")
    try:
        model = prepare_model(cfg, device)
    except ValueError as e:  # an unknown model name or width, from an edited config.json
        raise corrupt(run_dir / "config.json", "a run's config.json", e) from None
    load_weights(run_dir / "model.safetensors", model)
    return cfg, model


def kept_val_loss(history: list[dict], report: dict) -> float:
    """Validation loss of the epoch a run kept (report.json has its accuracy only)."""
    for h in history:
        if h["epoch"] == report["best_epoch"]:
            return h["val_loss"]
    raise ValueError(f"metrics.jsonl has no epoch {report['best_epoch']}, the one the run kept")


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[10, 10] counts, rows = true label, columns = predicted label."""
    return torch.bincount(labels * 10 + pred, minlength=100).reshape(10, 10)


def build_report(
    probs: torch.Tensor, labels: torch.Tensor, val_accuracy: float | None,
    history: list[dict], params: int, extra: dict | None = None, select: str = "best",
) -> dict:
    pred = probs.argmax(1)
    cm = confusion_matrix(pred, labels)
    per_class = (cm.diag().float() / cm.sum(1).clamp_min(1).float()).tolist()
    test_loss, test_acc = loss_and_accuracy(probs, labels)
    # The epoch whose weights were kept (the first best, as training keeps it, or the last).
    best = (history[-1] if select == "last" else max(history, key=lambda h: h["val_accuracy"])
            ) if history else {}
    report = {
        "test_accuracy": test_acc,
        "test_errors": int((pred != labels).sum()),
        "test_loss": test_loss,
        "val_accuracy": val_accuracy,
        "epochs": len(history),
        "best_epoch": best.get("epoch"),  # the kept epoch, whichever way it was chosen
        "select": select,
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "params": params,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "version": __version__,
    }
    return report | (extra or {})


def save_report(
    out_dir: Path, probs: torch.Tensor, val_probs: torch.Tensor, data: MNIST,
    histories: list[list[dict]], params: int, extra: dict, seed: int, select: str = "best",
) -> dict:
    """Write report.json and the figures for test/validation probabilities. `histories`
    holds the run's metrics, or each member's for an ensemble (the report counts the first's
    epochs; an ensemble's `extra` gives each member's best epoch)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    val_accuracy = loss_and_accuracy(val_probs, data.val_labels)[1]
    report = build_report(
        probs, data.test_labels, val_accuracy, histories[0], params, extra, select
    )
    figures.write_all(
        out_dir, data.test_images, data.test_labels, probs, histories,
        report["confusion_matrix"], seed,
    )
    # Last: a run with a report.json is finished (train.run_finished), figures included.
    write_json(out_dir / "report.json", report)
    return report


def write_report(
    run_dir: Path, out_dir: Path, model: nn.Module, cfg: TrainConfig, data: MNIST,
    device: torch.device, history: list[dict] | None = None,
) -> dict:
    """Score `model` on validation and test, write report.json and the four figures to out_dir."""
    amp = inference_precision(cfg.precision, device)
    history = read_history(run_dir) if history is None else history
    extra = {"seed": cfg.seed, "model": cfg.model, "scored_in": precision_name(amp)}
    if not history and (run_dir / "report.json").is_file():
        # No metrics.jsonl (the shipped model keeps none): its training, as its report says.
        keys = ("epochs", "best_epoch", "train_seconds")
        try:
            kept = read_report(run_dir, needs=keys)
            extra |= {key: kept[key] for key in keys}
        except CorruptFile:  # damaged: scored anew, without what it said of training
            pass
    return save_report(
        out_dir, predict_proba(model, data.test_images, device, amp),
        predict_proba(model, data.val_images, device, amp), data, [history], count_params(model),
        extra, cfg.seed, cfg.select,
    )
