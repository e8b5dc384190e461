"""MNIST on disk and in memory: find, download, verify and parse the four IDX files, then split.

The whole dataset is held as uint8 tensors (70,000 × 28 × 28 bytes ≈ 55 MB); batches are sliced,
augmented and normalized on the device by the training code, never one image at a time.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.config import DataError

# SHA-256 of the *decompressed* IDX files (published originals), with the shape each must have.
# Checked on every load, so a corrupt or swapped file can never be trained on.
FILES: dict[str, tuple[str, tuple[int, ...]]] = {
    "train-images-idx3-ubyte": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        (60000, 28, 28),
    ),
    "train-labels-idx1-ubyte": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        (60000,),
    ),
    "t10k-images-idx3-ubyte": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        (10000, 28, 28),
    ),
    "t10k-labels-idx1-ubyte": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        (10000,),
    ),
}

# The mirrors torchvision uses, tried in order; each serves NAME.gz.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# The first VAL_SIZE images of the training file are the validation set, the remaining 55,000 the
# training set. This is the split of TensorFlow's classic `read_data_sets` (validation_size=5000),
# which the reference project's 55,000 training images come from. It is fixed: it does not depend
# on the seed, so every run and every ensemble member is validated on the same 5,000 images.
VAL_SIZE = 5000
TRAIN_SIZE = 60_000 - VAL_SIZE

# Pixel statistics of the MNIST training set, used to normalize inputs.
MEAN, STD = 0.1307, 0.3081


@dataclass
class MNIST:
    """The dataset in memory: images uint8 [N, 28, 28], labels int64 [N]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def default_data_dir() -> Path:
    """The per-user cache folder used when neither --data-dir nor MNIST_DATA_DIR is given."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-cnn"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else the environment variable MNIST_DATA_DIR, else the per-user cache."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("MNIST_DATA_DIR"):
        return Path(os.environ["MNIST_DATA_DIR"]).expanduser()
    return default_data_dir()


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file of unsigned bytes into an array.

    Raises DataError on a wrong magic number, a zero dimension or a payload whose length does not
    match the header (truncated or with trailing bytes).
    """
    if len(raw) < 4:
        raise DataError(f"{name}: file is too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(
            f"{name}: wrong magic number 0x{raw[:4].hex()} (expected 0x00000801 for labels or "
            "0x00000803 for images): this is not an MNIST IDX file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: header is truncated ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if 0 in dims:
        raise DataError(f"{name}: header declares an empty dimension {dims}")
    expected = int(np.prod(dims))
    payload = len(raw) - header
    if payload != expected:
        what = "truncated" if payload < expected else "longer than its header says"
        raise DataError(
            f"{name}: payload is {what}: header {dims} needs {expected} bytes, file has {payload}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_file(
    path: Path, sha256: str | None = None, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw, and check its checksum and shape when given."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    array = parse_idx(data, str(path))
    if shape is not None and array.shape != shape:
        raise DataError(f"{path}: has shape {array.shape}, expected {shape}")
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DataError(
                f"{path}: SHA-256 of its content is {digest}, expected {sha256}: "
                "the file is corrupt or not the original MNIST file"
            )
    return array


def _find(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download(name: str, data_dir: Path, progress: bool = True) -> Path:
    """Download NAME.gz from the first mirror that serves a verified copy; return its path.

    The file is written to a temporary name in the target folder and renamed into place only after
    its content verified, so an interrupted or bad download never leaves a file behind.
    """
    from tqdm import tqdm

    sha256, shape = FILES[name]
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / f"{name}.gz"
    errors = []
    for mirror in MIRRORS:
        url = mirror + f"{name}.gz"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=data_dir)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"{name}.gz",
                    disable=not progress, leave=False,
                ) as bar:
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            read_idx_file(Path(tmp), sha256, shape)
            os.replace(tmp, target)
            return target
        except (urllib.error.URLError, OSError, DataError) as e:
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if created and not any(data_dir.iterdir()):
        data_dir.rmdir()  # made for this download (perhaps a mistyped --data-dir): not left behind
    raise DataError(
        f"could not download {name}.gz from any mirror:\n  " + "\n  ".join(errors) + "\n"
        f"Put the four MNIST files ({', '.join(f'{n}.gz' for n in FILES)}) in {data_dir} "
        "or point --data-dir / MNIST_DATA_DIR at the folder that holds them."
    )


def load_arrays(
    data_dir: str | os.PathLike | None = None, download: bool = True, progress: bool = True
) -> dict[str, np.ndarray]:
    """Find (downloading if missing and allowed), verify and parse the four files."""
    folder = resolve_data_dir(data_dir)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder: point --data-dir / MNIST_DATA_DIR at "
                        "the folder that holds the MNIST files")
    arrays = {}
    for name, (sha256, shape) in FILES.items():
        path = _find(folder, name)
        if path is None:
            if not download:
                raise DataError(
                    f"{name}(.gz) is missing from {folder}: put the MNIST files there or point "
                    "--data-dir / MNIST_DATA_DIR at them"
                )
            path = _download(name, folder, progress)
        try:
            arrays[name] = read_idx_file(path, sha256, shape)
        except DataError as e:  # (a download is verified before it is kept: this one was here)
            fix = ("delete it and run again to download a fresh copy" if download
                   else "replace it with the original MNIST file")
            raise DataError(f"{e}; {fix}") from None
    return arrays


def load_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = True, progress: bool = True
) -> MNIST:
    """The verified dataset split 55,000 train / 5,000 validation / 10,000 test."""
    a = load_arrays(data_dir, download, progress)
    images = torch.from_numpy(a["train-images-idx3-ubyte"].copy())
    labels = torch.from_numpy(a["train-labels-idx1-ubyte"].astype(np.int64))
    return MNIST(
        train_images=images[VAL_SIZE:],
        train_labels=labels[VAL_SIZE:],
        val_images=images[:VAL_SIZE],
        val_labels=labels[:VAL_SIZE],
        test_images=torch.from_numpy(a["t10k-images-idx3-ubyte"].copy()),
        test_labels=torch.from_numpy(a["t10k-labels-idx1-ubyte"].astype(np.int64)),
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] or float in [0, 1] [N, 1, 28, 28] → normalized float [N, 1, 28, 28]."""
    if images.dtype == torch.uint8:
        images = images.unsqueeze(1).float().div_(255.0)
    return (images - MEAN) / STD
