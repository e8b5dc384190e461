"""Which images do an ensemble's members get wrong: the same ones, or each its own?

    python scripts/error_overlap.py ENSEMBLE...

For each ensemble folder (written by `mnist-cnn ensemble`), on the validation and on the test
images: each finished member's errors, how many images every member gets wrong, how many at least
one member does, and how many images exactly 1, 2, ... N members get wrong. Images that every
seed gets wrong are out of reach of a change of seed and, mostly, of recipe; a recipe change can
only move the rest. On 5,000 validation images that rest can be a handful a run, which is how
fine a choice made on validation can be (docs/RESULTS.md). The test split's line also counts each
member's errors on its first and its last 5,000 images apart: by MNIST's documentation the two
halves were drawn from different NIST collections (the first, it says, the cleaner and easier
one), and they are not equally hard for these models (docs/RESULTS.md). Prints one JSON line
per folder and split; the models are re-evaluated on the CPU (seconds each).
"""

import argparse
import json
from pathlib import Path

import torch

from mnist_cnn.data import load_mnist
from mnist_cnn.ensemble import finished_runs, is_ensemble
from mnist_cnn.evaluate import load_run
from mnist_cnn.train import inference_precision, predict_proba

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="ENSEMBLE")
    args = parser.parse_args()
    for folder in args.folders:
        if not is_ensemble(folder):
            parser.error(f"{folder} is not an ensemble folder (no ensemble.json)")
    data = load_mnist(None, progress=False)
    splits = {"validation": (data.val_images, data.val_labels),
              "test": (data.test_images, data.test_labels)}
    for folder in args.folders:
        runs = finished_runs(folder)
        if not runs:
            print(json.dumps({"folder": str(folder), "members": 0}), flush=True)
            continue
        wrong = {name: [] for name in splits}  # per split: one bool row per member
        for run in runs:
            cfg, model = load_run(run, CPU)
            amp = inference_precision(cfg.precision, CPU)
            for name, (images, labels) in splits.items():
                wrong[name].append(predict_proba(model, images, CPU, amp).argmax(1) != labels)
        for name, rows in wrong.items():
            w = torch.stack(rows)
            k = w.sum(0)  # how many members get each image wrong
            line = {
                "folder": str(folder), "split": name, "members": len(runs),
                "errors_each": w.sum(1).tolist(),
                "wrong_in_every_member": int((k == len(runs)).sum()),
                "wrong_in_some_member": int((k > 0).sum()),
                "images_wrong_in_1_2_etc_members": [int((k == i).sum())
                                                    for i in range(1, len(runs) + 1)],
            }
            if name == "test":
                line["errors_each_first_5000"] = w[:, :5000].sum(1).tolist()
                line["errors_each_last_5000"] = w[:, 5000:].sum(1).tolist()
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
