"""How often does validation pick the run that is better on test?

    python scripts/val_test_agreement.py runs/

Reads the finished runs one level under the given folders (the members of each ensemble
folder, and each `mnist-cnn train` run folder; from their report.json and metrics.jsonl,
nothing is re-evaluated) and pairs runs of the same model and seed from different folders (a
recipe, or the code, changed between them). For each pair: does the run with more validation
images right also have more test images right? And the run with the lower validation loss?
Pairs are also counted by how many validation images apart they are, which is what a tie band
would cut on. Runs shorter than 20 epochs, and copies (the same seed with the same validation
accuracy, validation loss and test accuracy), are left out.

With --perturbed, each run's kept model is also scored on the validation images seen through
the six fixed test-time views (1-pixel shifts, ±8° rotations: 30,000 harder images), a third
reading compared the same way (it loads every model: a few minutes).

This reads the test set to judge the *protocol* (choose on validation accuracy), never to
choose a recipe; pairs share runs, so the counts are descriptive, not independent trials.
"""

import argparse
import itertools
import json
from pathlib import Path

from mnist_cnn.config import TrainConfig
from mnist_cnn.data import VAL_SIZE
from mnist_cnn.ensemble import finished_runs
from mnist_cnn.evaluate import kept_val_loss, read_history
from mnist_cnn.train import read_report

BANDS = {"1": (1, 1), "2-3": (2, 3), ">=4": (4, VAL_SIZE)}  # validation images apart


def load_runs(parents: list[Path]) -> list[dict]:
    runs, seen = [], set()
    for folder in (f for p in parents for f in sorted(p.iterdir()) if f.is_dir()):
        for run in finished_runs(folder):  # not `evaluate --out` folders: no config.json
            cfg = TrainConfig.load(run / "config.json")
            report = read_report(run)
            val_loss = kept_val_loss(read_history(run), report)
            key = (cfg.model, cfg.seed, report["val_accuracy"], val_loss, report["test_errors"])
            if cfg.epochs < 20 or key in seen:
                continue
            seen.add(key)
            runs.append({"path": run, "folder": str(folder), "model": cfg.model,
                         "seed": cfg.seed,
                         "val_errors": round((1 - report["val_accuracy"]) * VAL_SIZE),
                         "val_loss": val_loss, "test_errors": report["test_errors"]})
    return runs


def add_perturbed_errors(runs: list[dict], data_dir: str | None) -> None:
    """Each run's errors on the validation images under the six non-identity TTA views."""
    import torch

    from mnist_cnn.data import load_mnist, resolve_data_dir
    from mnist_cnn.ensemble import TTA, tta_view
    from mnist_cnn.evaluate import load_run
    from mnist_cnn.train import inference_precision, predict_proba

    data = load_mnist(resolve_data_dir(data_dir))
    views = [tta_view(data.val_images, view) for view in TTA[1:]]
    device = torch.device("cpu")
    for run in runs:
        cfg, model = load_run(run["path"], device)
        amp = inference_precision(cfg.precision, device)
        run["val_perturbed_errors"] = sum(
            int((predict_proba(model, x, device, amp).argmax(1) != data.val_labels).sum())
            for x in views
        )


def counted(c: list[int]) -> dict:
    return {"agree": c[0], "disagree": c[1], "test_equal": c[2]}


def tally(runs: list[dict]) -> list[dict]:
    """Per model: the pairs' counts, overall and by how many validation images apart."""
    out = []
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        # per criterion: [agree, disagree, test equal]; accuracy also per band of images apart
        readings = {"val_accuracy": "val_errors", "val_loss": "val_loss"}
        if "val_perturbed_errors" in mine[0]:
            readings["val_perturbed"] = "val_perturbed_errors"
        counts = {name: [0, 0, 0] for name in readings}
        bands = {name: [0, 0, 0] for name in BANDS}
        for a, b in itertools.combinations(mine, 2):
            if a["seed"] != b["seed"] or a["folder"] == b["folder"]:
                continue
            better_test = a["test_errors"] - b["test_errors"]  # > 0: b has fewer test errors
            for name, key in readings.items():
                better_val = a[key] - b[key]  # > 0: b reads better
                if better_val == 0:
                    continue
                slot = 2 if better_test == 0 else 0 if (better_val > 0) == (better_test > 0) else 1
                counts[name][slot] += 1
                if name == "val_accuracy":
                    for band, (lo, hi) in BANDS.items():
                        if lo <= abs(better_val) <= hi:
                            bands[band][slot] += 1
        out.append({
            "model": model, "runs": len(mine),
            **{name: counted(c) for name, c in counts.items()},
            "val_accuracy_by_images_apart": {k: counted(c) for k, c in bands.items()},
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parents", nargs="+", type=Path, metavar="FOLDER",
                        help="folders holding run or ensemble folders (e.g. runs/)")
    parser.add_argument("--perturbed", action="store_true",
                        help="also read validation through the six test-time views")
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DATA_DIR)")
    args = parser.parse_args()
    runs = load_runs(args.parents)
    if args.perturbed:
        add_perturbed_errors(runs, args.data_dir)
    for line in tally(runs):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
