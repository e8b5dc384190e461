"""MNIST test digits dressed up as user photos, to measure `predict` on realistic input.

Each digit is inverted to dark ink on light paper, scaled up, pasted off-centre on a larger
canvas of uneven paper tone, optionally tinted, and JPEG-compressed: everything a phone photo or
a scan does that MNIST never did. Run `python -m mnist_cnn.photos` to measure accuracy on them.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image


def make_photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """uint8 [28, 28] MNIST digit (light on dark) → JPEG bytes of a dark-on-light 'photo'."""
    scale = rng.uniform(3, 10)
    side = round(28 * scale)
    ink = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BILINEAR)
    width, height = (round(side * rng.uniform(1.2, 2.5)) for _ in range(2))
    paper = rng.uniform(0.75, 1.0)
    # Paper with a gentle lighting gradient and grain.
    yy, xx = np.mgrid[0:height, 0:width]
    slope_x, slope_y = rng.uniform(0, 0.08), rng.uniform(0, 0.05)
    tone = paper - slope_x * xx / width - slope_y * yy / height
    canvas = np.clip(tone + rng.normal(0, 0.015, (height, width)), 0, 1) * 255
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    patch = canvas[top : top + side, left : left + side]
    ink_dark = np.asarray(ink, dtype=np.float64) / 255  # 1 = paper, 0 = ink
    canvas[top : top + side, left : left + side] = patch * ink_dark
    image = Image.fromarray(canvas.astype(np.uint8))
    if rng.random() < 0.5:  # a colour photo: blue-ish ink, warm paper
        tint = np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.75, 0.95)])
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64) * tint
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=int(rng.integers(40, 90)))
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    from mnist_cnn.data import load_mnist
    from mnist_cnn.predict import Classifier
    from mnist_cnn.preprocess import preprocess

    parser = argparse.ArgumentParser(
        prog="python -m mnist_cnn.photos",
        description="Accuracy of predict on MNIST test digits turned into user photos.",
    )
    parser.add_argument("--n", type=int, default=10_000, help="test digits to use (first N)")
    parser.add_argument("--checkpoint", help="run or ensemble folder (default: the shipped model)")
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DATA_DIR or cache)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_mnist(args.data_dir)
    classifier = Classifier.load(args.checkpoint)
    rng = np.random.default_rng(args.seed)
    n = min(args.n, len(data.test_images))
    t0 = time.perf_counter()
    images = np.stack([
        preprocess(make_photo(d, rng)) for d in data.test_images[:n].numpy()
    ])
    pred = classifier.probabilities(images).argmax(1)
    clean = classifier.probabilities(data.test_images[:n].numpy()).argmax(1)
    labels = data.test_labels[:n].numpy()
    print(f"user photos: {(pred == labels).mean():.2%} of {n} correct "
          f"(the same digits as plain MNIST: {(clean == labels).mean():.2%}); "
          f"{time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
