"""How often does validation pick the run that is better on test?

    python scripts/val_test_agreement.py runs/

Reads every finished run under the given folders (ensemble members and single `mnist-cnn train`
runs, from their report.json and metrics.jsonl; nothing is re-evaluated) and pairs runs of the
same model and seed made with different recipes (different folders). For each pair: does the
run with more validation images right also have more test images right? And the run with the
lower validation loss? Pairs are counted by how many validation images apart they are, which
is what a tie band would cut on. Runs shorter than 20 epochs, and copies (the same seed with
the same validation and test numbers), are left out.

This reads the test set to judge the *protocol* (choose on validation accuracy), never to
choose a recipe; pairs share runs, so the counts are descriptive, not independent trials.
"""

import argparse
import itertools
import json
from pathlib import Path

from mnist_cnn.ensemble import finished_runs
from mnist_cnn.evaluate import read_history

VAL_IMAGES = 5000
BANDS = {"1": (1, 1), "2-3": (2, 3), ">=4": (4, VAL_IMAGES)}  # validation images apart


def load_runs(parents: list[Path]) -> list[dict]:
    runs, seen = [], set()
    folders = [f for p in parents for f in sorted(p.iterdir()) if f.is_dir()]
    for folder in folders:
        if not (folder / "ensemble.json").exists() and not (folder / "report.json").exists():
            continue
        for run in finished_runs(folder):
            if not (run / "config.json").exists():  # an `evaluate` output, not a training run
                continue
            cfg = json.loads((run / "config.json").read_text())
            report = json.loads((run / "report.json").read_text())
            kept = next(h for h in read_history(run) if h["epoch"] == report["best_epoch"])
            key = (cfg["model"], cfg["seed"], report["test_accuracy"], report["val_accuracy"])
            if cfg["epochs"] < 20 or key in seen:
                continue
            seen.add(key)
            runs.append({"folder": str(folder), "model": cfg["model"], "seed": cfg["seed"],
                         "val": report["val_accuracy"], "val_loss": kept["val_loss"],
                         "test": report["test_accuracy"]})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parents", nargs="+", type=Path, metavar="FOLDER",
                        help="folders holding run or ensemble folders (e.g. runs/)")
    runs = load_runs(parser.parse_args().parents)
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        # per criterion: [agree, disagree, test tie]; accuracy also per band of images apart
        counts = {"val_accuracy": [0, 0, 0], "val_loss": [0, 0, 0]}
        bands = {name: [0, 0, 0] for name in BANDS}
        for a, b in itertools.combinations(mine, 2):
            if a["seed"] != b["seed"] or a["folder"] == b["folder"]:
                continue
            d_test = round((b["test"] - a["test"]) * 10_000)
            d_val = round((b["val"] - a["val"]) * VAL_IMAGES)
            d_loss = a["val_loss"] - b["val_loss"]  # > 0: b has the lower loss
            for name, d in (("val_accuracy", d_val), ("val_loss", d_loss)):
                if d == 0:
                    continue
                slot = 2 if d_test == 0 else 0 if (d > 0) == (d_test > 0) else 1
                counts[name][slot] += 1
                if name == "val_accuracy":
                    for band, (lo, hi) in BANDS.items():
                        if lo <= abs(d) <= hi:
                            bands[band][slot] += 1
        as_dict = lambda c: {"agree": c[0], "disagree": c[1], "test_equal": c[2]}  # noqa: E731
        print(json.dumps({
            "model": model, "runs": len(mine),
            **{name: as_dict(c) for name, c in counts.items()},
            "val_accuracy_by_images_apart": {k: as_dict(c) for k, c in bands.items()},
        }), flush=True)


if __name__ == "__main__":
    main()
