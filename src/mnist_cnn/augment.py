"""Random rotation of whole batches with torch operations, on whatever device the batch is on.

One affine grid and one bilinear `grid_sample` rotate a batch about the image centre; pixels that
come in from outside the image are 0, MNIST's background. Angles come from an explicit
`torch.Generator`, so a seed fixes every rotation of a run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_angles(
    n: int, max_degrees: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n angles in degrees, uniform in [-max_degrees, +max_degrees], drawn on the CPU so that a
    seed gives the same angles on every device."""
    u = torch.rand(n, generator=generator)
    return (u * 2 - 1) * max_degrees


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate float images [N, 1, H, W] by per-image angles in degrees, counter-clockwise as the
    image is displayed (row 0 at the top)."""
    rad = degrees.to(images.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # The grid maps each output pixel to where it samples the input, in (x, y) with y pointing
    # down; this matrix turns the displayed image counter-clockwise.
    theta = torch.stack(
        [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
