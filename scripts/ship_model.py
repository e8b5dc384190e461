"""Copy a finished run into the package as the shipped default model (half precision).

    python scripts/ship_model.py RUN_DIR

Writes src/mnist_cnn/weights/{model.safetensors, config.json, report.json}. Half precision halves
the file (12.9 MB → 6.5 MB); tests/test_predict.py checks the shipped model still reaches the
accuracy its report.json states.
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

run = Path(sys.argv[1])
target = Path(__file__).resolve().parents[1] / "src" / "mnist_cnn" / "weights"
target.mkdir(exist_ok=True)
tensors = {k: v.half() for k, v in load_file(str(run / "model.safetensors")).items()}
save_file(tensors, str(target / "model.safetensors"), metadata={"source": run.name})
for name in ("config.json", "report.json"):
    shutil.copy(run / name, target / name)
print(f"shipped {run} → {target}")
