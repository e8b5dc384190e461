"""Turn an ordinary image of a digit into what the model saw in training: a 28×28 MNIST image.

MNIST digits are light ink on black, scaled so the longer side of the ink is 20 px, and placed in
a 28×28 frame with their centre of mass at the centre. A photo of a digit on white paper is none
of that, so we redo the same steps (LeCun et al.'s recipe):

    grayscale → invert if the background is light → subtract the background level → crop to the
    ink → scale the longer side to 20 px (aspect kept) → paste into 28×28 by centre of mass
"""

from __future__ import annotations

import contextlib
import io
import os
import stat

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_BYTES = 20 * 1024 * 1024  # larger files are refused before decoding
MAX_PIXELS = 40_000_000  # ~ a 7,000 × 6,000 photo; larger ones are refused (decompression bombs)
INK_THRESHOLD = 0.25  # after normalization: what counts as ink when cropping


class ImageError(ValueError):
    """An input that cannot be classified; the message says why."""


def _refuse_unless_regular(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise ImageError("is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise ImageError("not a regular file (a device, named pipe or socket)")


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file, with the byte limit applied while reading, not after.

    Anything but a regular file (after following symlinks) is refused before a byte is read:
    a folder, a device such as /dev/zero (endless), a named pipe. The checks are made on the
    opened file itself, so the path cannot be swapped between them and the read; it is opened
    without blocking, because opening a named pipe otherwise waits for a writer. At most
    MAX_BYTES + 1 bytes are read, because the size the system reports can be wrong (files under
    /proc report 0) or the file can grow while it is read.
    """
    nonblock = getattr(os, "O_NONBLOCK", 0)
    flags = os.O_RDONLY | nonblock | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        # Some kinds cannot be opened at all (a folder on Windows, a socket): name the kind;
        # else (missing, no permission) the open's own error stands.
        with contextlib.suppress(OSError):
            _refuse_unless_regular(os.stat(path).st_mode)
        raise
    try:  # checked on the descriptor: fdopen would refuse a folder without closing it
        info = os.fstat(fd)
        _refuse_unless_regular(info.st_mode)
        if info.st_size > MAX_BYTES:
            raise ImageError(f"file is too large ({info.st_size:,} bytes; limit {MAX_BYTES:,})")
        if nonblock:
            os.set_blocking(fd, True)  # a regular file: read it plainly
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ImageError(f"file is too large (over the limit of {MAX_BYTES:,} bytes)")
    return data


def load_image(data: bytes, max_side: int | None = None) -> Image.Image:
    """Decode image bytes (PNG, JPEG, BMP, GIF, WebP, ...) with size checks, made before the
    pixels are decoded: bytes, total pixels, and each side when `max_side` is given."""
    if not data:
        raise ImageError("empty file")
    if len(data) > MAX_BYTES:
        raise ImageError(f"file is too large ({len(data):,} bytes; limit {MAX_BYTES:,})")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"image is too large ({width}×{height} pixels; limit "
                             f"{MAX_PIXELS:,} pixels)")
        if max_side is not None and max(width, height) > max_side:
            raise ImageError(f"image is {width}×{height} pixels; the limit is {max_side} a side")
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, met before the size is known
        raise ImageError(f"image is too large (over the limit of {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image this tool can read (PNG, JPEG, BMP, GIF, WebP)") from None
    except Exception as e:  # decoders of untrusted bytes raise many kinds of errors
        raise ImageError(f"corrupt or truncated image ({e})") from None
    return image


def to_gray(image: Image.Image) -> np.ndarray:
    """Float grayscale in [0, 1]; transparent pixels count as white paper."""
    try:
        image = ImageOps.exif_transpose(image)  # phones store rotation in EXIF
    except Exception:  # a damaged EXIF block (Pillow: SyntaxError, ValueError): read as stored
        pass
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    try:
        gray = image.convert("L")
    except ValueError:  # Pillow decodes some modes it cannot convert (LAB: no route to RGB)
        raise ImageError(f"unsupported colour mode {image.mode}") from None
    return np.asarray(gray, dtype=np.float32) / 255.0


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Float grayscale [H, W] in [0, 1] → uint8 [28, 28], light ink on black, MNIST-style."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = 1.0 - gray if background > 0.5 else gray.copy()
    background = min(background, 1.0 - background)
    # Stretch so the background goes to 0 and the strongest ink to 1.
    peak = float(np.percentile(ink, 99.9))
    if peak - background < 0.15:  # under 0.1% of the pixels darker than the paper
        raise ImageError("no ink found: the image looks blank (or the digit is a tiny part of "
                         "it: crop it closer)")
    ink = np.clip((ink - background) / (peak - background), 0.0, 1.0)
    ys, xs = np.nonzero(ink > INK_THRESHOLD)
    if len(ys) == 0:
        raise ImageError("no ink found: the image looks blank")
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    ink[ink < 0.1] = 0.0  # faint paper texture inside the crop is not ink

    h, w = ink.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray((ink * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    digit = np.asarray(small, dtype=np.float32)

    # Paste so the centre of mass lands where MNIST has it, at pixel (14, 14) (measured over the
    # training set: 14.00 ± 0.29 in both axes), staying inside the frame.
    total = digit.sum()
    if total == 0:  # specks scattered over a large image, averaged away by the resize
        raise ImageError("no digit found: the ink is scattered specks, not a stroke")
    cy = (digit.sum(1) * np.arange(digit.shape[0])).sum() / total
    cx = (digit.sum(0) * np.arange(digit.shape[1])).sum() / total
    top = int(np.clip(round(14.0 - cy), 0, 28 - digit.shape[0]))
    left = int(np.clip(round(14.0 - cx), 0, 28 - digit.shape[1]))
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return np.clip(out, 0, 255).astype(np.uint8)


def preprocess(data: bytes, max_side: int | None = None) -> np.ndarray:
    """Image file bytes → uint8 [28, 28] ready for the model."""
    return to_mnist(to_gray(load_image(data, max_side)))
