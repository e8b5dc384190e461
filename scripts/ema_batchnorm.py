"""Re-score finished runs with batch-norm statistics of the weight average's own, without training.

    python scripts/ema_batchnorm.py RUN_OR_ENSEMBLE...            # compare, print JSON lines
    python scripts/ema_batchnorm.py --out OUT RUN_OR_ENSEMBLE      # and write re-scored copies

Until this change a run saved its weight average (EMA) with the live model's batch-norm
statistics, gathered for other weights, on augmented images, with dropout on; training now
recomputes them for the average at the end of every epoch (`train.recalibrate_batchnorm`, on the
first 10,000 training images, unaugmented, dropout off). The average never feeds back into
training, so a run made before the change gives, re-scored here, exactly what the same command
gives now. For each finished run this prints validation and test accuracy and loss before and
after, then totals. With --out, OUT gets for each run a folder with its config.json, metrics.jsonl
(the last epoch's validation numbers replaced by the re-scored model's), the re-scored
model.safetensors, report.json and figures; for an ensemble, also the ensemble's report.json and
figures, scored as its ensemble.json says (with test-time augmentation if it was made with it:
seven times the inference). The original folders are not touched. Models without batch norm are
unchanged.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

from mnist_cnn.config import write_json
from mnist_cnn.data import load_mnist
from mnist_cnn.ensemble import finished_runs, is_ensemble, write_ensemble_report
from mnist_cnn.evaluate import load_run, read_history, write_report
from mnist_cnn.train import (
    BN_IMAGES,
    accuracy_halves,
    inference_precision,
    loss_and_accuracy,
    predict_proba,
    recalibrate_batchnorm,
    save_weights,
)

CPU = torch.device("cpu")


def rescore(run: Path, data, out: Path | None) -> dict:
    cfg, model = load_run(run, CPU)
    if cfg.select != "last" or cfg.ema == 0:
        raise SystemExit(f"{run}: only runs that kept the last epoch's weight average")
    amp = inference_precision(cfg.precision, CPU)

    def score() -> tuple[torch.Tensor, dict]:
        val_probs = predict_proba(model, data.val_images, CPU, amp)
        vl, va = loss_and_accuracy(val_probs, data.val_labels)
        tl, ta = loss_and_accuracy(predict_proba(model, data.test_images, CPU, amp),
                                   data.test_labels)
        return val_probs, {"val": round(100 * va, 2), "val_loss": round(vl, 4),
                           "test": round(100 * ta, 2), "test_loss": round(tl, 4)}

    _, saved = score()
    # The images training gives it: the first of the (possibly subset) training images.
    recalibrate_batchnorm(model, data.train_images[: cfg.train_subset][:BN_IMAGES], CPU, amp)
    val_probs, recalibrated = score()
    if out is not None:
        history = read_history(run)
        vl, va = loss_and_accuracy(val_probs, data.val_labels)
        history[-1] |= {"val_loss": vl, "val_accuracy": va,
                        "val_accuracy_halves": accuracy_halves(val_probs, data.val_labels)}
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "config.json", out / "config.json")
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        save_weights(out / "model.safetensors", model,
                     {"epoch": len(history), "val_accuracy": va})
        write_report(out, out, model, cfg, data, CPU, history)
    return {"run": str(run), "saved": saved, "recalibrated": recalibrated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="RUN_OR_ENSEMBLE")
    parser.add_argument("--out", type=Path, help="write re-scored copies here (one folder)")
    args = parser.parse_args()
    if args.out is not None and len(args.folders) != 1:
        parser.error("--out takes one run or ensemble folder")
    data = load_mnist(None, progress=False)
    rows = []
    for folder in args.folders:
        runs = finished_runs(folder)
        for run in runs:
            target = None if args.out is None else (
                args.out / run.name if is_ensemble(folder) else args.out)
            rows.append(rescore(run, data, target))
            print(json.dumps(rows[-1]), flush=True)
        if args.out is not None and is_ensemble(folder):
            spec = json.loads((folder / "ensemble.json").read_text())
            write_json(args.out / "ensemble.json", spec | {"members": [r.name for r in runs]})
            report = write_ensemble_report(args.out, args.out, data, CPU)
            print(json.dumps({"ensemble": str(args.out), "test": 100 * report["test_accuracy"],
                              "test_errors": report["test_errors"],
                              "val": 100 * report["val_accuracy"]}))

    def gained(key: str, size: int) -> int:  # images right after, less images right before
        return sum(round((r["recalibrated"][key] - r["saved"][key]) * size / 100) for r in rows)

    def compare(key: str) -> list[int]:  # runs where it is higher, equal, lower after
        signs = [(a > b) - (a < b) for a, b in
                 ((r["recalibrated"][key], r["saved"][key]) for r in rows)]
        return [signs.count(1), signs.count(0), signs.count(-1)]

    print(json.dumps({
        "runs": len(rows),
        "validation_images_gained": gained("val", 5_000),
        "validation_accuracy_higher_equal_lower": compare("val"),
        "validation_loss_higher_equal_lower": compare("val_loss"),
        "test_images_gained": gained("test", 10_000),
        "test_loss_higher_equal_lower": compare("test_loss"),
    }))


if __name__ == "__main__":
    main()
