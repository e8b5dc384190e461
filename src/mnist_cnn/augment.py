"""Random affine augmentation of whole batches with torch operations, on the batch's device.

One affine grid and one bilinear `grid_sample` rotate, scale, shift (and shear) a whole batch
about the image centre; pixels that come in from outside the image are 0, MNIST's background.
An optional elastic distortion (Simard et al., 2003: a random displacement field smoothed by a
Gaussian) is added to the same grid, so it costs no second resampling. A stroke-thickness
change (a blend towards a 3×3 grey dilation or erosion, before the resampling) imitates thicker
and thinner pens, and cutout (DeVries and Taylor, 2017) erases a random square of the result to
background, so no single stroke can be relied on. The reference project used rotation only
(±20°); the default recipe adds a shift of up to ±2 pixels and widens the rotation to ±25° for
the reference layers, narrows it to ±10° for the strong model (config.py); scale, shear,
elastic distortion, thickness and cutout are there to try. Parameters come from an explicit
`torch.Generator` on the CPU, so a seed fixes every transform on every device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _symmetric(
    shape: int | tuple[int, ...], bound: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform in [-bound, +bound]: the draw behind every random amount here."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def sample_angles(
    n: int, max_degrees: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n angles in degrees, uniform in [-max_degrees, +max_degrees]."""
    return _symmetric(n, max_degrees, generator)


def sample_transforms(
    n: int, max_degrees: float, max_shift: float = 0.0, max_scale: float = 0.0,
    generator: torch.Generator | None = None, max_shear: float = 0.0,
) -> torch.Tensor:
    """[n, 4] per-image (angle in degrees, scale, shift x, shift y in pixels), each uniform in
    ±its maximum (scale in 1 ± max_scale); with max_shear, [n, 5]: a fifth column, the
    horizontal shear (slant) uniform in ±max_shear (for `transform`). Shift, scale and shear
    draw from the generator only when on, so a rotation-only run draws exactly the angles."""
    angles = sample_angles(n, max_degrees, generator)
    scale = torch.ones(n)
    shift = torch.zeros(n, 2)
    if max_scale > 0:
        scale = 1 + _symmetric(n, max_scale, generator)
    if max_shift > 0:
        shift = _symmetric((n, 2), max_shift, generator)
    columns = [angles[:, None], scale[:, None], shift]
    if max_shear > 0:
        columns.append(_symmetric((n, 1), max_shear, generator))
    return torch.cat(columns, 1)


def sample_displacement(
    n: int, size: int, alpha: float, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[n, size, size, 2] elastic displacement fields in pixels (x, y): uniform noise in ±1 per
    pixel, smoothed by a normalized Gaussian of width sigma (zero outside the image), times
    alpha. Simard et al. used alpha 34, sigma 4 on MNIST: about 1.4 pixels of smooth wobble."""
    noise = torch.rand(n * 2, 1, size, size, generator=generator) * 2 - 1
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    # Separable smoothing: rows, then columns.
    noise = F.conv2d(noise, kernel.view(1, 1, 1, -1), padding=(0, radius))
    noise = F.conv2d(noise, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return (noise * alpha).view(n, 2, size, size).permute(0, 2, 3, 1)


def sample_thickness(
    n: int, max_thickness: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n stroke-thickness amounts, uniform in ±max_thickness (for `thicken`)."""
    return _symmetric(n, max_thickness, generator)


def thicken(images: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Make the strokes of float images [N, 1, H, W] thicker or thinner, per image: an amount
    of 1 is a 3×3 grey dilation (every stroke one pixel wider on each side), -1 a 3×3 erosion,
    and amounts in between blend the image with them (a half-grey edge is how a slightly
    thicker or thinner pen looks once digitized, and a blend keeps a thin stroke from vanishing
    entirely)."""
    a = amount.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)
    grown = F.max_pool2d(images, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-images, 3, stride=1, padding=1)
    return images + a.clamp(min=0) * (grown - images) + (-a).clamp(min=0) * (shrunk - images)


def sample_cutout(
    n: int, image_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[n, 2] cutout centres (x, y) in pixels, uniform over the whole image (for `cutout`): a
    square centred near the edge is partly outside, so some images lose less, as in DeVries
    and Taylor's cutout."""
    return torch.rand((n, 2), generator=generator) * image_size


def cutout(images: torch.Tensor, centres: torch.Tensor, size: float) -> torch.Tensor:
    """Set a size × size square of float images [N, 1, H, W] to 0 (background), one per
    image, centred at `centres` [N, 2] (x, y; pixel i spans [i, i + 1)): every pixel whose
    centre lies within size / 2 of the square's centre along both axes."""
    c = centres.to(device=images.device, dtype=images.dtype)
    height, width = images.shape[-2:]
    cols = torch.arange(width, device=images.device, dtype=images.dtype) + 0.5
    rows = torch.arange(height, device=images.device, dtype=images.dtype) + 0.5
    inside_x = (cols[None, :] - c[:, 0:1]).abs() < size / 2  # [N, W]
    inside_y = (rows[None, :] - c[:, 1:2]).abs() < size / 2  # [N, H]
    erased = inside_y[:, :, None] & inside_x[:, None, :]  # [N, H, W]
    return images.masked_fill(erased[:, None], 0.0)


def transform(
    images: torch.Tensor, params: torch.Tensor, displacement: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply per-image (angle, scale, shift x, shift y[, shear]) to float images [N, 1, H, W],
    and an elastic displacement [N, H, W, 2] in pixels (from `sample_displacement`) if given.

    Angles turn the image counter-clockwise as displayed (row 0 at the top); scale > 1 enlarges
    the digit; shifts move it right and down by that many pixels; a shear k slants it, moving
    each row by k times its height above the centre to the right (k 0.2: a vertical stroke leans
    by about 11°), before the rotation, scale and shift."""
    params = params.to(device=images.device, dtype=images.dtype)
    rad = params[:, 0] * (math.pi / 180.0)
    inv_scale = 1.0 / params[:, 1]
    cos, sin = torch.cos(rad) * inv_scale, torch.sin(rad) * inv_scale
    height, width = images.shape[-2:]
    # The grid maps each output pixel to where it samples the input, in normalized (x, y) with
    # y pointing down (one pixel = 2 / size): the inverse of the transform we want to see.
    tx = -(cos * params[:, 2] * 2 / width - sin * params[:, 3] * 2 / height)
    ty = -(sin * params[:, 2] * 2 / width + cos * params[:, 3] * 2 / height)
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )
    if params.shape[1] > 4:
        # The shear comes first in the transform, so its inverse comes last in the grid's map:
        # x_in = x' + k·y' (y down) of the point (x', y') that undoing the rest gives. In grid
        # units, which are pixels times 2 / size: k is per pixel on square images (MNIST's; the
        # rotation above assumes square images too).
        theta[:, 0] += params[:, 4, None] * theta[:, 1]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if displacement is not None:
        # Each output pixel samples from a little further along its field (pixels → grid units).
        to_grid = torch.tensor([2 / width, 2 / height], dtype=images.dtype, device=images.device)
        grid = grid + displacement.to(device=images.device, dtype=images.dtype) * to_grid
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate float images [N, 1, H, W] by per-image angles in degrees (counter-clockwise)."""
    n = len(degrees)
    params = torch.stack([degrees.cpu(), torch.ones(n), torch.zeros(n), torch.zeros(n)], 1)
    return transform(images, params)
