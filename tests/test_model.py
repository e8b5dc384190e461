import pytest
import torch

from mnist_cnn.augment import (
    cutout,
    rotate,
    sample_angles,
    sample_cutout,
    sample_displacement,
    sample_thickness,
    sample_transforms,
    thicken,
    transform,
)
from mnist_cnn.model import M7CNN, Dropout, ReferenceCNN, count_params


@pytest.mark.parametrize("padding,params", [("same", 3_231_114), ("valid", 2_379_146)])
def test_output_shape_and_params(padding, params):
    model = ReferenceCNN(padding=padding)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    # conv1 320 + conv2 8,256 + dense (flatten × 1024 + 1024) + dense 10,250
    assert count_params(model) == params


def test_m7_layout():
    # Its layer table in docs/RESULTS.md: 262,234 parameters (the strong model's test is in
    # test_ensemble.py).
    m7 = M7CNN()
    assert m7(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert count_params(m7) == 262_234
    # Four unpadded 7×7 convolutions take 28 to 4 (28 - 4 × 6); --width multiplies the channels.
    m7 = M7CNN(dropout=(0.1, 0.3), width=1.5)
    assert m7.features(torch.zeros(2, 1, 28, 28)).shape == (2, 96, 4, 4)
    assert [m.p for m in m7.modules() if isinstance(m, Dropout)] == [0.1, 0.1, 0.3]
    with pytest.raises(ValueError, match="width must be positive"):
        M7CNN(width=0)


def test_dropout_rates_are_used():
    model = ReferenceCNN(dropout=(0.7, 0.3))
    rates = [m.p for m in model.modules() if isinstance(m, Dropout)]
    assert rates == [0.7, 0.3]


def test_dropout_drops_at_rate_p_and_keeps_the_mean():
    x = torch.ones(1000, 1000)
    layer = Dropout(0.3)
    y = layer.train()(x)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01  # kept units are scaled by 1 / (1 - p)
    assert torch.equal(layer.eval()(x), x)


def test_rotation_by_zero_is_identity():
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(rotate(x, torch.zeros(4)), x, atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_turns_the_image():
    x = torch.rand(2, 1, 28, 28)
    turned = rotate(x, torch.full((2,), 90.0))
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_angles_stay_within_bounds_and_cover_them():
    angles = sample_angles(100_000, 20.0, torch.Generator().manual_seed(0))
    assert angles.abs().max() <= 20.0
    assert angles.min() < -19.9 and angles.max() > 19.9
    assert abs(angles.mean()) < 0.2


def test_random_rotation_is_reproducible_and_varies():
    x = torch.rand(8, 1, 28, 28)

    def rotated(seed):
        return rotate(x, sample_angles(8, 20, torch.Generator().manual_seed(seed)))

    assert torch.equal(rotated(1), rotated(1))
    assert not torch.allclose(rotated(1), rotated(2))


def test_shift_and_scale_move_and_grow_the_digit():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 10] = 1.0
    moved = transform(x, torch.tensor([[0.0, 1.0, 3.0, 2.0]]))  # 3 px right, 2 px down
    assert (moved[0, 0] == moved.max()).nonzero().tolist() == [[12, 13]]
    square = torch.zeros(1, 1, 28, 28)
    square[0, 0, 10:18, 10:18] = 1.0
    doubled = transform(square, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))
    assert abs(doubled.sum().item() - 4 * square.sum().item()) < 1.0  # twice the side


def test_transform_parameters_stay_within_bounds():
    p = sample_transforms(50_000, 10.0, 2.0, 0.1, torch.Generator().manual_seed(0))
    assert p[:, 0].abs().max() <= 10 and (p[:, 1] - 1).abs().max() <= 0.1
    assert p[:, 2:].abs().max() <= 2 and p[:, 2:].abs().max() > 1.99
    # Rotation only draws just the angles: the same numbers as sample_angles.
    rot = sample_transforms(100, 20.0, generator=torch.Generator().manual_seed(3))
    angles = sample_angles(100, 20.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(rot[:, 0], angles)
    assert torch.equal(rot[:, 1:], torch.tensor([[1.0, 0.0, 0.0]]).expand(100, 3))


IDENTITY = torch.tensor([[0.0, 1.0, 0.0, 0.0]])


def test_elastic_field_is_smooth_and_as_strong_as_simard_s():
    field = sample_displacement(200, 28, 34.0, 4.0, torch.Generator().manual_seed(0))
    assert field.shape == (200, 28, 28, 2)
    centre = field[:, 8:20, 8:20]  # away from the zero padding at the border
    assert abs(centre.mean().item()) < 0.1
    assert 1.0 < centre.std().item() < 2.0  # measured ≈ 1.4 px for alpha 34, sigma 4
    # Smooth: neighbours move together (one pixel over, far less change than the field's size).
    step = (centre[:, 1:] - centre[:, :-1]).abs().mean() / centre.abs().mean()
    assert step < 0.2
    again = sample_displacement(200, 28, 34.0, 4.0, torch.Generator().manual_seed(0))
    assert torch.equal(field, again)


def test_elastic_displacement_moves_pixels_by_the_field():
    square = torch.zeros(1, 1, 28, 28)
    square[0, 0, 10:18, 10:18] = 1.0
    zero = transform(square, IDENTITY, torch.zeros(1, 28, 28, 2))
    torch.testing.assert_close(zero, transform(square, IDENTITY))
    torch.testing.assert_close(zero, square)
    # A uniform field of (+2, -1) px samples from 2 right, 1 up: the square moves 2 left, 1 down.
    field = torch.tensor([2.0, -1.0]).expand(1, 28, 28, 2)
    moved = transform(square, IDENTITY, field)
    assert moved[0, 0].nonzero().min(0).values.tolist() == [11, 8]
    # A random field bends the square but keeps it where it was (a wobble, not a move).
    field = sample_displacement(1, 28, 34.0, 4.0, torch.Generator().manual_seed(1))
    warped = transform(square, IDENTITY, field)[0, 0]
    assert (warped - square[0, 0]).abs().sum() > 10
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = torch.stack([(warped * rows).sum(), (warped * cols).sum()]) / warped.sum()
    assert (centre - 13.5).abs().max() < 2.0


def test_shear_slants_a_vertical_stroke_and_is_drawn_only_when_on():
    # A vertical stroke two pixels wide through the centre (columns 13, 14 of 0..27).
    line = torch.zeros(1, 1, 28, 28)
    line[0, 0, :, 13:15] = 1.0
    torch.testing.assert_close(transform(line, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])), line)
    # Shear 0.25: each row moves right by a quarter of its height above the centre (row 13.5,
    # between rows 13 and 14), so the top row about +3.4 px, the bottom row about -3.4 px.
    slanted = transform(line, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.25]]))[0, 0]
    cols = torch.arange(28.0)
    centre = (slanted * cols).sum(1) / slanted.sum(1)  # each row's centre column
    expected = 13.5 + 0.25 * (13.5 - torch.arange(28.0))
    assert (centre[2:-2] - expected[2:-2]).abs().max() < 0.05
    # Off by default: no fifth column and the same draws as before; on: bounded and spread.
    before = sample_transforms(100, 20.0, 2.0, 0.1, torch.Generator().manual_seed(5))
    with_shear = sample_transforms(100, 20.0, 2.0, 0.1, torch.Generator().manual_seed(5),
                                   max_shear=0.3)
    assert before.shape == (100, 4) and with_shear.shape == (100, 5)
    torch.testing.assert_close(with_shear[:, :4], before)
    assert with_shear[:, 4].abs().max() <= 0.3 and with_shear[:, 4].abs().max() > 0.25


def test_thicken_blends_towards_grey_dilation_and_erosion():
    bar = torch.zeros(1, 1, 28, 28)
    bar[0, 0, 4:24, 12:15] = 1.0  # a vertical stroke 3 pixels wide
    bars = bar.expand(5, 1, 28, 28)
    out = thicken(bars, torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    torch.testing.assert_close(out[2], bar[0])  # amount 0: unchanged
    # 1: one pixel wider on each side (5 wide, 22 tall); -1: one narrower (1 wide, 18 tall).
    assert out[4, 0].nonzero().amin(0).tolist() == [3, 11]
    assert out[4, 0].nonzero().amax(0).tolist() == [24, 15]
    torch.testing.assert_close(out[4].sum(), torch.tensor(5.0 * 22))
    torch.testing.assert_close(out[0].sum(), torch.tensor(1.0 * 18))
    # In between, a blend: ink grows with the amount, and the image stays in [0, 1].
    ink = out.sum((1, 2, 3))
    assert (ink[1:] > ink[:-1]).all()
    assert out.min() >= 0 and out.max() <= 1
    amounts = sample_thickness(1000, 0.5, torch.Generator().manual_seed(0))
    assert amounts.abs().max() <= 0.5 and amounts.min() < -0.45 and amounts.max() > 0.45


def test_cutout_erases_a_square_to_background_clipped_at_the_edge():
    images = torch.rand(3, 1, 28, 28) + 0.5  # no pixel is background yet
    centres = torch.tensor([[14.0, 14.0], [0.0, 0.0], [27.9, 5.2]])
    out = cutout(images, centres, 8)
    erased = out == 0
    # Centre (14, 14): pixels 10-17 on both axes, 8 x 8, and nothing else.
    assert erased[0, 0, 10:18, 10:18].all() and erased[0].sum() == 64
    # At a corner a quarter of the square is inside; near the right edge half of it (4 x 8).
    assert erased[1, 0, :4, :4].all() and erased[1].sum() == 16
    assert erased[2, 0, 1:9, 24:].all() and erased[2].sum() == 32
    torch.testing.assert_close(out[~erased], images[~erased])  # the rest untouched
    centres = sample_cutout(1000, 28, torch.Generator().manual_seed(0))
    assert centres.min() >= 0 and centres.max() < 28
    assert centres.min() < 0.1 and centres.max() > 27.9  # the whole image, edges included
