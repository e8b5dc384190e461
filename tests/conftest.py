import importlib.util
import os
from pathlib import Path

import pytest

from mnist_cnn.data import load_mnist

# Tests read the real MNIST files from MNIST_DATA_DIR, else from ../shared/data/mnist beside the
# repository (where CI has them). They never download.
DATA_DIR = Path(
    os.environ.get("MNIST_DATA_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not any(DATA_DIR.glob("*-ubyte*")):
        pytest.fail(f"MNIST files not found in {DATA_DIR}: set MNIST_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist(data_dir):
    return load_mnist(data_dir, download=False, progress=False)


def load_script(name: str):
    """A script of scripts/ as a module (they are not part of the package)."""
    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
