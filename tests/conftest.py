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
