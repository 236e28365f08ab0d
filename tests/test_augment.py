"""The batched distortions against a plain per-image numpy version of the tutorial's steps."""

import math

import numpy as np
import pytest
import torch

from multitower.data.augment import (
    Distortions,
    central_crop,
    crop_and_flip,
    distort,
    eval_transform,
    per_image_standardization,
    sample_distortions,
)
from multitower.errors import UserError


def reference_distort(image: np.ndarray, y: int, x: int, flip: bool, delta: float, factor: float) -> np.ndarray:
    """The tutorial's steps one by one on one uint8 image [3,32,32], in float64."""
    out = image[:, y : y + 24, x : x + 24].astype(np.float64)
    if flip:
        out = np.flip(out, axis=2)
    out = out + delta
    channel_mean = out.mean(axis=(1, 2), keepdims=True)
    out = (out - channel_mean) * factor + channel_mean
    return reference_standardize(out)


def reference_standardize(image: np.ndarray) -> np.ndarray:
    std = max(image.std(), 1.0 / math.sqrt(image.size))  # numpy's std is the population one
    return (image - image.mean()) / std


def make_draws(n, *, y=0, x=0, flip=False, delta=0.0, factor=1.0) -> Distortions:
    return Distortions(
        crop_y=torch.full((n,), y, dtype=torch.int64),
        crop_x=torch.full((n,), x, dtype=torch.int64),
        flip=torch.full((n,), flip, dtype=torch.bool),
        brightness=torch.full((n,), delta, dtype=torch.float32),
        contrast=torch.full((n,), factor, dtype=torch.float32),
    )


def awkward_batch(seed: int) -> torch.Tensor:
    """Random images plus the hard cases for float32: near-constant, 0/255 only, dark."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    flat = 200 + torch.randint(0, 2, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    binary = torch.randint(0, 2, (8, 3, 32, 32), generator=g, dtype=torch.uint8) * 255
    dark = torch.randint(0, 4, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    # One pixel off by one, inside every crop: stddev under 1/sqrt(N), so the floor acts.
    one_pixel = torch.full((8, 3, 32, 32), 90, dtype=torch.uint8)
    one_pixel[:, 1, 16, 16] = 91
    return torch.cat([uniform, flat, binary, dark, one_pixel])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distort_matches_the_step_by_step_reference(seed):
    images = awkward_batch(seed)
    draws = sample_distortions(len(images), torch.Generator().manual_seed(100 + seed))
    out = distort(images, draws)
    assert out.dtype == torch.float32 and out.shape == (len(images), 3, 24, 24)
    expected = np.stack([
        reference_distort(images[i].numpy(), int(draws.crop_y[i]), int(draws.crop_x[i]), bool(draws.flip[i]),
                          float(draws.brightness[i]), float(draws.contrast[i]))
        for i in range(len(images))
    ])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_constant_image_standardizes_to_zeros():
    images = torch.full((3, 3, 32, 32), 77, dtype=torch.uint8)
    draws = sample_distortions(3, torch.Generator().manual_seed(0))
    assert torch.equal(distort(images, draws), torch.zeros(3, 3, 24, 24))
    assert torch.equal(eval_transform(images), torch.zeros(3, 3, 24, 24))
    assert torch.equal(per_image_standardization(images.float()), torch.zeros(3, 3, 32, 32))


def test_stddev_floor_on_a_nearly_constant_image():
    image = torch.full((1, 3, 24, 24), 90.0)
    image[0, 1, 5, 5] = 91.0
    n = image.numel()  # 1728: stddev = sqrt(n - 1) / n = 0.024 < 1 / sqrt(n) = 0.02406
    out = per_image_standardization(image)
    assert out[0, 1, 5, 5].item() == pytest.approx((1 - 1 / n) * math.sqrt(n), rel=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-1 / n * math.sqrt(n), rel=1e-5)


def position_image() -> torch.Tensor:
    """Channel 0 holds each pixel's row, channel 1 its column: asymmetric in both axes."""
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return torch.stack([rows, cols, rows + cols]).to(torch.uint8)[None]


@pytest.mark.parametrize("y,x", [(0, 0), (8, 8), (0, 8), (8, 0), (3, 5)])
def test_crop_takes_the_window_at_the_offsets(y, x):
    crop = crop_and_flip(position_image(), make_draws(1, y=y, x=x))[0]
    assert torch.equal(crop[0], (torch.arange(y, y + 24)[:, None]).expand(24, 24).to(torch.uint8))
    assert torch.equal(crop[1], (torch.arange(x, x + 24)[None, :]).expand(24, 24).to(torch.uint8))


def test_flip_mirrors_the_crop_left_right():
    image = position_image()
    crop = crop_and_flip(image, make_draws(1, y=2, x=8))[0]
    flipped = crop_and_flip(image, make_draws(1, y=2, x=8, flip=True))[0]
    assert torch.equal(flipped[1, 0], torch.arange(31, 7, -1).to(torch.uint8))  # columns 31 .. 8
    assert torch.equal(flipped, crop.flip(-1))
    assert torch.equal(flipped[0], crop[0])  # rows are untouched
    # And through the whole pipeline: a flipped image standardizes to the mirrored result.
    assert torch.allclose(distort(image, make_draws(1, x=8, flip=True)),
                          distort(image, make_draws(1, x=8)).flip(-1), atol=1e-6)


def test_brightness_cancels_under_standardization():
    images = awkward_batch(7)
    n = len(images)
    base = sample_distortions(n, torch.Generator().manual_seed(3))
    brighter = Distortions(base.crop_y, base.crop_x, base.flip, base.brightness + 50.0, base.contrast)
    # In the step-by-step reference (the tutorial's own formula) ...
    for i in range(0, n, 9):
        args = (images[i].numpy(), int(base.crop_y[i]), int(base.crop_x[i]), bool(base.flip[i]))
        np.testing.assert_allclose(reference_distort(*args, -63.0, float(base.contrast[i])),
                                   reference_distort(*args, 62.9, float(base.contrast[i])), atol=1e-9)
    # ... and in the batched one.
    torch.testing.assert_close(distort(images, brighter), distort(images, base), rtol=0, atol=1e-6)


def test_contrast_changes_the_result():
    # Guards the test above: contrast does not cancel once the channel means differ.
    images = awkward_batch(8)
    a = distort(images, make_draws(len(images), factor=0.3))
    b = distort(images, make_draws(len(images), factor=1.7))
    assert (a - b).abs().max() > 0.1


def test_eval_transform_is_central_crop_and_standardization():
    images = awkward_batch(4)
    assert torch.equal(central_crop(images), images[:, :, 4:28, 4:28])
    expected = np.stack([reference_standardize(img[:, 4:28, 4:28].astype(np.float64)) for img in images.numpy()])
    np.testing.assert_allclose(eval_transform(images).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_image_standardization(central_crop(images).float()).numpy(), expected,
                               rtol=1e-5, atol=1e-5)
    # distort with the central offset, no flip and contrast 1 is the same transform.
    same = make_draws(len(images), y=4, x=4, delta=12.5, factor=1.0)
    torch.testing.assert_close(distort(images, same), eval_transform(images), rtol=0, atol=2e-5)


def test_sample_distortions_ranges():
    d = sample_distortions(200_000, torch.Generator().manual_seed(0))
    for offsets in (d.crop_y, d.crop_x):
        assert offsets.dtype == torch.int64
        assert offsets.min() == 0 and offsets.max() == 8
        assert torch.equal(torch.bincount(offsets).gt(20_000), torch.ones(9, dtype=torch.bool))  # ~22,222 each
    assert d.flip.dtype == torch.bool and 0.49 < d.flip.float().mean() < 0.51
    assert d.brightness.dtype == torch.float32 and d.contrast.dtype == torch.float32
    assert d.brightness.min() >= -63.0 and d.brightness.max() < 63.0
    assert d.brightness.min() < -62.9 and d.brightness.max() > 62.9
    assert d.contrast.min() >= 0.2 and d.contrast.max() < 1.8
    assert d.contrast.min() < 0.201 and d.contrast.max() > 1.799


def test_draws_stay_below_the_upper_bound_after_rounding(monkeypatch):
    # torch.rand's largest value, 1 - 2**-24, gives 63 - 126 * 2**-24, which rounds to 63.0.
    monkeypatch.setattr(torch, "rand", lambda n, generator: torch.full((n,), 1 - 2**-24))
    d = sample_distortions(4, torch.Generator())
    assert (d.brightness < 63.0).all() and (d.brightness > 62.9999).all()
    assert (d.contrast < 1.8).all() and (d.contrast > 1.7999).all()


def test_sample_distortions_is_seeded():
    a = sample_distortions(64, torch.Generator().manual_seed(5))
    b = sample_distortions(64, torch.Generator().manual_seed(5))
    c = sample_distortions(64, torch.Generator().manual_seed(6))
    for name in ("crop_y", "crop_x", "flip", "brightness", "contrast"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.brightness, c.brightness)


def test_slicing_distortions_slices_every_draw():
    d = sample_distortions(10, torch.Generator().manual_seed(1))
    part = d[3:7]
    assert len(part) == 4
    for name in ("crop_y", "crop_x", "flip", "brightness", "contrast"):
        assert torch.equal(getattr(part, name), getattr(d, name)[3:7])
    images = awkward_batch(0)[:10]
    assert torch.equal(distort(images[3:7], part), distort(images, d)[3:7])


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        distort(torch.zeros(2, 3, 32, 32), make_draws(2))
    with pytest.raises(ValueError, match="2 distortions for a batch of 3"):
        distort(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), make_draws(2))
    with pytest.raises(UserError, match="crop_size=40"):
        central_crop(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 40)
    with pytest.raises(UserError, match="crop_size=33"):
        sample_distortions(1, torch.Generator(), crop_size=33)
