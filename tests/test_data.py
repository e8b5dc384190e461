import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from mnist_cnn import data
from mnist_cnn.data import DataError, load_arrays, parse_idx, read_idx_file, resolve_data_dir


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)


def test_parse_images_and_labels(images):
    np.testing.assert_array_equal(parse_idx(idx_bytes(images)), images)
    labels = np.array([5, 0, 4], dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels)), labels)


@pytest.mark.parametrize("compress", [False, True])
def test_read_file_raw_or_gzip_with_checksum(tmp_path, images, compress):
    raw = idx_bytes(images)
    path = tmp_path / ("x.gz" if compress else "x")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    sha = hashlib.sha256(raw).hexdigest()
    np.testing.assert_array_equal(read_idx_file(path, sha, (3, 28, 28)), images)


def test_wrong_magic(images):
    raw = bytearray(idx_bytes(images))
    raw[2] = 0x0D  # float data type instead of unsigned byte
    with pytest.raises(DataError, match="wrong magic number"):
        parse_idx(bytes(raw), "f")


def test_truncated_payload(images):
    with pytest.raises(DataError, match="payload is truncated"):
        parse_idx(idx_bytes(images)[:-10], "f")


def test_trailing_bytes(images):
    with pytest.raises(DataError, match="longer than its header says"):
        parse_idx(idx_bytes(images) + b"\0", "f")


def test_too_short():
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\0\0", "f")


def test_wrong_shape(tmp_path, images):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(images))
    with pytest.raises(DataError, match=r"has shape \(3, 28, 28\), expected \(60000, 28, 28\)"):
        read_idx_file(path, shape=(60000, 28, 28))


def test_checksum_mismatch(tmp_path, images):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(images))
    with pytest.raises(DataError, match="SHA-256 .* expected 00"):
        read_idx_file(path, sha256="00" * 32)


def test_corrupt_gzip(tmp_path, images):
    path = tmp_path / "x.gz"
    compressed = gzip.compress(idx_bytes(images // 32))  # compressible, as real digits are
    flipped = bytearray(compressed)
    flipped[20] ^= 0xFF  # inside the deflate stream: zlib itself fails, not the gzip wrapper
    for damaged in (compressed[:-20], bytes(flipped)):
        path.write_bytes(damaged)
        with pytest.raises(DataError, match="corrupt or truncated gzip"):
            read_idx_file(path)


def test_missing_file_without_download(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.* is missing from"):
        load_arrays(tmp_path, download=False)


def test_swapped_file_is_rejected(tmp_path, data_dir, monkeypatch):
    # A real MNIST file under another file's name must not pass.
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        (data_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    )
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: has shape.*; replace it "
                       "with the original MNIST file"):
        load_arrays(tmp_path, download=False)
    # Where missing files are downloaded, deleting a bad one gets a fresh copy: said so.
    monkeypatch.setattr(data, "MIRRORS", ())  # (offline, should it look for another file)
    with pytest.raises(DataError, match="; delete it and run again to download a fresh copy"):
        load_arrays(tmp_path, progress=False)


def test_download_tries_next_mirror_and_verifies(tmp_path, data_dir, monkeypatch):
    # file:// mirrors exercise the real download code without a network.
    monkeypatch.setattr(data, "MIRRORS", ("file:///nonexistent-mirror/", data_dir.as_uri() + "/"))
    arrays = load_arrays(tmp_path / "cache", progress=False)
    assert arrays["t10k-labels-idx1-ubyte"][:5].tolist() == [7, 2, 1, 0, 4]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"{n}.gz" for n in data.FILES
    )


def test_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MIRRORS", ("file:///nonexistent-mirror/",))
    with pytest.raises(DataError, match="(?s)could not download .*\nPut the four MNIST files"):
        load_arrays(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    # A folder made for the download (a mistyped --data-dir, say) is not left behind either.
    with pytest.raises(DataError, match="could not download"):
        load_arrays(tmp_path / "mnsit", progress=False)
    assert not (tmp_path / "mnsit").exists()


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir("flag") == data.Path("flag")
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("MNIST_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "cache" / "mnist-cnn"


def test_real_split(mnist):
    assert mnist.train_images.shape == (55000, 28, 28)
    assert mnist.val_images.shape == (5000, 28, 28)
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_images.dtype == torch.uint8
    # Validation is the first 5,000 of the training file: its first labels are the file's.
    assert mnist.val_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.test_labels[:5].tolist() == [7, 2, 1, 0, 4]
    counts = torch.bincount(torch.cat([mnist.val_labels, mnist.train_labels]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist.test_labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]


def test_split_is_deterministic(mnist, data_dir):
    again = data.load_mnist(data_dir, download=False)
    assert torch.equal(again.train_images, mnist.train_images)
    assert torch.equal(again.val_labels, mnist.val_labels)
