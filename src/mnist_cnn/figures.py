"""Figures of a run: the reference's two image grids, a confusion matrix and training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

OK, BAD = "#1a7f37", "#cf222e"


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    tmp.replace(path)


def _digit(ax, image: torch.Tensor) -> None:
    ax.imshow(image.numpy(), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def random_results(
    path: Path, images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor,
    seed: int = 0, rows: int = 4, cols: int = 6,
) -> None:
    """A grid of random test images titled with the prediction; errors in red with the truth."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[: rows * cols]
    pred = probs.argmax(1)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.7))
    for ax, i in zip(axes.flat, idx.tolist(), strict=True):
        _digit(ax, images[i])
        p, t = int(pred[i]), int(labels[i])
        title = f"pred {p}" if p == t else f"pred {p} (true {t}) ✗"
        ax.set_title(title, color=OK if p == t else BAD, fontsize=10)
    fig.suptitle("Random test images and predictions", fontsize=12)
    _save(fig, path)


def wrong_results(
    path: Path, images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, n: int = 9
) -> None:
    """The n misclassified test images the model was most confident about."""
    conf, pred = probs.max(1)
    wrong = (pred != labels).nonzero().flatten()
    wrong = wrong[conf[wrong].argsort(descending=True)][:n]
    cols = 3
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.0, rows * 2.25))
    for k, ax in enumerate(axes.flat):
        if k >= len(wrong):
            ax.axis("off")
            continue
        i = int(wrong[k])
        _digit(ax, images[i])
        ax.set_title(
            f"true {int(labels[i])} → pred {int(pred[i])}\n{float(conf[i]):.0%} confident",
            color=BAD, fontsize=10,
        )
    total = int((pred != labels).sum())
    fig.suptitle(f"Wrongly predicted test images ({total} of {len(labels):,} wrong)", fontsize=12)
    _save(fig, path)


def confusion_matrix(path: Path, matrix: list[list[int]]) -> None:
    """The [true, predicted] counts of report.json as a picture."""
    cm = np.array(matrix)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    # Colour shows the errors only: the diagonal would otherwise wash every error out.
    im = ax.imshow(off, cmap="Reds", vmin=0, vmax=max(1, off.max()))
    for t in range(10):
        for p in range(10):
            v = cm[t, p]
            if v:
                color = "white" if t != p and v > off.max() / 2 else "black"
                ax.text(p, t, str(v), ha="center", va="center", fontsize=8, color=color,
                        fontweight="bold" if t == p else "normal")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    errors = int(off.sum())
    ax.set_title(f"Confusion matrix on the test set ({errors} errors; colour = errors)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)


def training_curves(path: Path, histories: list[list[dict]]) -> None:
    """Loss and accuracy per epoch of one run, or of each member of an ensemble."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    many = len(histories) > 1
    lows = []
    for k, history in enumerate(histories):
        if not history:  # a run with no finished epoch: nothing to draw, numbering kept
            continue
        ep = [h["epoch"] for h in history]
        name = f"member {k} " if many else ""
        # One colour per member when there are several (train dashed), else train vs validation.
        if many:
            train_style, val_style = {"color": f"C{k}", "ls": "--", "lw": 1}, {"color": f"C{k}"}
        else:
            train_style = {"color": "C0", "marker": "o", "ms": 3}
            val_style = {"color": "C1", "marker": "o", "ms": 3}
        ax1.plot(ep, [h["train_loss"] for h in history], label=name + "train", **train_style)
        ax1.plot(ep, [h["val_loss"] for h in history], label=name + "validation", **val_style)
        if not many:
            ax2.plot(ep, [100 * h["train_accuracy"] for h in history], label="train", **train_style)
        ax2.plot(ep, [100 * h["val_accuracy"] for h in history], label=name + "validation",
                 **val_style)
        best = max(history, key=lambda h: h["val_accuracy"])
        ax2.axvline(best["epoch"], color=f"C{k}" if many else "gray", ls=":", lw=1)
        if not many:
            ax2.annotate(f"best {100 * best['val_accuracy']:.2f}% (epoch {best['epoch']})",
                         (best["epoch"], 100 * best["val_accuracy"]), textcoords="offset points",
                         xytext=(-10, -30), ha="right", fontsize=9)
        lows.append(min(100 * h["val_accuracy"] for h in history))
    if lows:
        ax2.set_ylim(max(min(lows) - 0.5, 90), 100)
    ax1.set_yscale("log")
    for ax, name in ((ax1, "loss"), (ax2, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if many else None)
    ax1.set_title("Loss (train: with dropout and augmentation)")
    ax2.set_title("Validation accuracy of each member" if many else "Accuracy")
    _save(fig, path)


# What write_all draws for every report (and training_curves.png when there are metrics).
FIGURES = ("random_results.png", "wrong_results.png", "confusion_matrix.png")


def write_all(
    out_dir: Path, images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor,
    histories: list[list[dict]], matrix: list[list[int]], seed: int = 0,
) -> None:
    random, wrong, confusion = (out_dir / name for name in FIGURES)
    random_results(random, images, labels, probs, seed)
    wrong_results(wrong, images, labels, probs)
    confusion_matrix(confusion, matrix)
    if any(histories):
        training_curves(out_dir / "training_curves.png", histories)
    else:  # a model without metrics.jsonl (the shipped one): no curves, not an earlier run's
        (out_dir / "training_curves.png").unlink(missing_ok=True)
