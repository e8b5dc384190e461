"""Re-score finished runs as if they had kept their last epoch (`--select last`), without training.

    python scripts/keep_last_epoch.py ENSEMBLE_OR_RUN OUT

Training is the same whichever epoch a run keeps; only model.safetensors differs. A run's final
checkpoint holds the last epoch's weights (the weight average when the run kept one), so a run
made before `select` existed can be re-scored with them. (Runs made since finished runs drop
their checkpoint have none; they chose `--select` when they were made.) OUT gets, for each
run, a run folder with the original config.json (select set to "last"), metrics.jsonl, a
model.safetensors taken from the checkpoint, and a fresh report.json and figures; for an
ensemble, also the ensemble's report.json and figures, scored as its ensemble.json says (with
test-time augmentation if it was made with it: seven times the inference). The original
folders are not touched.
"""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from mnist_cnn.config import TrainConfig, write_json
from mnist_cnn.data import load_mnist, resolve_data_dir
from mnist_cnn.ensemble import is_ensemble, member_dirs, write_ensemble_report
from mnist_cnn.evaluate import read_history, write_report
from mnist_cnn.train import prepare_model, read_safetensors, save_weights

CPU = torch.device("cpu")


def keep_last(run: Path, out: Path, data) -> dict:
    cfg = dataclasses.replace(TrainConfig.load(run / "config.json"), select="last")
    history = read_history(run)
    if len(history) != cfg.epochs:
        sys.exit(f"{run} is not finished: {len(history)} of {cfg.epochs} epochs")
    tensors, _ = read_safetensors(run / "checkpoint.safetensors")
    prefix = "ema." if cfg.ema > 0 else "model."
    model = prepare_model(cfg, CPU)
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
    save_weights(out / "model.safetensors", model,
                 {"epoch": len(history), "val_accuracy": history[-1]["val_accuracy"]})
    report = write_report(out, out, model, cfg, data, CPU, history)
    print(f"{run} → {out}: test {100 * report['test_accuracy']:.2f}% "
          f"({report['test_errors']} wrong), validation {100 * report['val_accuracy']:.2f}%")
    return report


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    # Every run checked before anything is written, so none is re-scored in vain.
    missing = [r for r in (member_dirs(source) if is_ensemble(source) else [source])
               if not (r / "checkpoint.safetensors").is_file()]
    if missing:
        sys.exit(f"{', '.join(map(str, missing))}: no checkpoint.safetensors to take the last "
                 "epoch from")
    data = load_mnist(resolve_data_dir(None))
    if is_ensemble(source):
        runs = member_dirs(source)
        for run in runs:
            keep_last(run, target / run.name, data)
        spec = json.loads((source / "ensemble.json").read_text())
        write_json(target / "ensemble.json", spec)
        report = write_ensemble_report(target, target, data, CPU)
        print(f"ensemble → {target}: test {100 * report['test_accuracy']:.2f}% "
              f"({report['test_errors']} wrong), validation {100 * report['val_accuracy']:.2f}%")
    else:
        keep_last(source, target, data)
