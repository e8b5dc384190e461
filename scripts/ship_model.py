"""Copy a finished run into the package as the shipped default model (half precision).

    python scripts/ship_model.py RUN_DIR

Writes src/mnist_cnn/weights/{model.safetensors, config.json, report.json}. Half precision halves
the file (the strong model's: 1.3 MB → 0.66 MB); tests/test_predict.py checks the shipped model
still reaches the accuracy its report.json states. A distilled run's teacher is recorded by its
folder name only: its absolute path means nothing on a user's machine.
"""

import json
import shutil
import sys
from pathlib import Path

from mnist_cnn.config import write_json
from mnist_cnn.train import _atomic_save, read_safetensors

run = Path(sys.argv[1])
target = Path(__file__).resolve().parents[1] / "src" / "mnist_cnn" / "weights"
target.mkdir(exist_ok=True)
# Floating-point tensors only: batch norm's step counters (int64) stay integers.
tensors = {k: v.half() if v.is_floating_point() else v
           for k, v in read_safetensors(run / "model.safetensors")[0].items()}
# Written as every run's weights are (readable by all, atomically), not by save_file.
_atomic_save(tensors, target / "model.safetensors", {"source": "/".join(run.resolve().parts[-2:])})
shutil.copy(run / "report.json", target / "report.json")
config = json.loads((run / "config.json").read_text())
if config.get("teacher"):
    config["teacher"] = Path(config["teacher"]).name
write_json(target / "config.json", config)
print(f"shipped {run} → {target}")
