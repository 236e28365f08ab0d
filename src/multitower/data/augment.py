"""The tutorial's image distortions (cifar10_input.distorted_inputs / inputs), batched.

Training, in the tutorial's order, on each 32x32 image:
  1. tf.random_crop to 24x24: offset uniform in [0, 8] on each axis;
  2. tf.image.random_flip_left_right: p = 0.5;
  3. tf.image.random_brightness(max_delta=63): x + delta, delta ~ U[-63, 63), no clipping
     (the tutorial casts to float32 first, and TF does not clip float images);
  4. tf.image.random_contrast(0.2, 1.8): (x - m_c) * f + m_c, f ~ U[0.2, 1.8), m_c the
     mean of channel c over height and width; no clipping;
  5. tf.image.per_image_standardization: (x - mean) / max(stddev, 1/sqrt(N)), mean and
     population stddev over all N = H*W*C values of the image.
Evaluation: the central 24x24 crop (offset 4) and step 5.

All of it works on whole batches, with no per-image Python loop: crop and flip are one
gather on uint8, and steps 3-5 are folded into one multiply-add per value
(see `_contrast_and_standardize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from multitower.errors import UserError


class PerImageDraws:
    """Base of a dataclass of a batch's random draws: every field a tensor with one entry
    per image. Kept apart from the images so that a global batch's draws can be made once
    and sliced per rank (`d[lo:hi]`), which makes the data independent of the world size."""

    def __len__(self) -> int:
        return getattr(self, fields(self)[0].name).shape[0]

    def __getitem__(self, sl: slice):
        if not isinstance(sl, slice):
            raise TypeError(f"{type(self).__name__} can only be sliced, got {type(sl).__name__}")
        return type(self)(*(getattr(self, f.name)[sl] for f in fields(self)))

    def to(self, device: torch.device, non_blocking: bool = False):
        """The same draws on `device` (for augmentation on the GPU: data/loader.py)."""
        return type(self)(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))


@dataclass(frozen=True)
class Visit:
    """What a training batch's draws may depend on besides its step's generator: the epoch,
    and one fair coin per image of the (global) batch that stays the same for that example
    all run (loader.example_coins). The tutorial's distortions ignore it; the fast recipe's
    alternating flip mirrors an image in the epochs where coin XOR (epoch is odd)."""

    epoch: int
    coins: torch.Tensor  # bool [n]


@dataclass
class Distortions(PerImageDraws):
    """The tutorial's draws for a batch of images (see PerImageDraws)."""

    crop_y: torch.Tensor  # int64, row offset of the crop
    crop_x: torch.Tensor  # int64, column offset of the crop
    flip: torch.Tensor  # bool, mirror left-right after the crop
    brightness: torch.Tensor  # float32, delta added to every value
    contrast: torch.Tensor  # float32, factor on the deviations from each channel's mean


def _float32_below(bound: float) -> torch.Tensor:
    """The largest float32 below float32(bound): lower + (upper - lower) * rand can round up
    to upper (63 - 126 * 2**-24 rounds to 63.0), and a float32 tensor compares against a
    Python float in float32, so the draw must stay under the rounded bound too."""
    rounded = torch.tensor(bound, dtype=torch.float32)
    return torch.nextafter(rounded, torch.tensor(-math.inf))


def _uniform(n: int, lower: float, upper: float, generator: torch.Generator) -> torch.Tensor:
    """n float32 draws from U[lower, upper), upper excluded even after rounding.

    An empty range (lower == upper) turns the distortion off: every draw is `lower`.
    """
    if upper <= lower:
        return torch.full((n,), lower, dtype=torch.float32)
    draws = torch.rand(n, generator=generator) * (upper - lower) + lower
    return torch.minimum(draws, _float32_below(upper))


def sample_distortions(
    n: int,
    generator: torch.Generator,
    *,
    image_size: int = 32,
    crop_size: int = 24,
    max_delta: float = 63.0,
    contrast_lower: float = 0.2,
    contrast_upper: float = 1.8,
) -> Distortions:
    """Draw the distortions of n images from `generator`.

    The draws are made per field in a fixed order (crop_y, crop_x, flip, brightness,
    contrast), so the same generator state always gives the same Distortions.
    """
    if crop_size > image_size:
        raise UserError(
            f"crop_size={crop_size} is larger than image_size={image_size}; use a crop of at most {image_size}"
        )
    if max_delta < 0:
        raise UserError(f"max_delta={max_delta} is negative; use 0 to turn brightness off")
    if not 0 <= contrast_lower <= contrast_upper:
        raise UserError(
            f"contrast range [{contrast_lower}, {contrast_upper}) is invalid; need 0 <= lower <= upper"
        )
    max_offset = image_size - crop_size  # 8 for 32 -> 24: nine possible offsets
    return Distortions(
        crop_y=torch.randint(0, max_offset + 1, (n,), generator=generator),
        crop_x=torch.randint(0, max_offset + 1, (n,), generator=generator),
        flip=torch.rand(n, generator=generator) < 0.5,
        brightness=_uniform(n, -max_delta, max_delta, generator),
        contrast=_uniform(n, contrast_lower, contrast_upper, generator),
    )


def _check_images(images: torch.Tensor, crop_size: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [B,C,H,W], got {images.dtype} {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if crop_size > min(height, width):
        raise UserError(
            f"crop_size={crop_size} is larger than the {height}x{width} images; use at most {min(height, width)}"
        )


def crop_and_flip(images: torch.Tensor, d: Distortions, crop_size: int = 24) -> torch.Tensor:
    """Crop each image at (d.crop_y, d.crop_x) and mirror those with d.flip; uint8 in, uint8 out.

    One gather with computed flat indices: about 300 us for 128 images on one core, against
    600-900 us for the advanced-indexing-into-unfold alternatives.
    """
    _check_images(images, crop_size)
    batch, channels, height, width = images.shape
    if len(d) != batch:
        raise ValueError(f"{len(d)} distortions for a batch of {batch} images")
    steps = torch.arange(crop_size, device=images.device)
    rows = d.crop_y[:, None] + steps  # [B, crop]
    # Flipping after the crop reads the crop's columns right to left.
    column_steps = torch.where(d.flip[:, None], crop_size - 1 - steps, steps)
    columns = d.crop_x[:, None] + column_steps  # [B, crop]
    flat_index = (rows[:, :, None] * width + columns[:, None, :]).reshape(batch, 1, -1)
    pixels = images.reshape(batch, channels, height * width)
    out = torch.gather(pixels, 2, flat_index.expand(batch, channels, -1))
    return out.view(batch, channels, crop_size, crop_size)


def distort(images: torch.Tensor, d: Distortions, crop_size: int = 24) -> torch.Tensor:
    """The tutorial's training distortions: uint8 [B,C,32,32] -> float32 [B,C,24,24].

    After brightness and contrast, x2 = f * (x - m_c) + m_c + delta, whose image mean is
    M + delta (M = mean of the channel means m_c), so x2 - mean = f * (x - m_c) + (m_c - M):
    delta cancels exactly under the standardisation. It is still drawn, as in the tutorial,
    and the tests compare with the step-by-step formula that adds it.
    """
    return _contrast_and_standardize(crop_and_flip(images, d, crop_size), d.contrast)


def _contrast_and_standardize(crops: torch.Tensor, contrast: torch.Tensor | None) -> torch.Tensor:
    """Contrast (factor f per image; None for f = 1) then standardisation of uint8 crops.

    One y = (x - p_c) * a + b_c per value, a and b per image and channel from exact
    statistics. The variance of f * (x - m_c) + (m_c - M) is mean_c(f^2 var_c + (m_c - M)^2).
    p_c is m_c rounded to an integer, so x - p_c is exact in float32 and the sums of squares
    cannot cancel: the result is within a few float32 ulps of the float64 formula, where the
    float32 step-by-step one is off by up to 1e-4 on near-constant images.
    """
    batch, channels, height, width = crops.shape
    per_channel = height * width
    values = crops.reshape(batch, channels, per_channel).to(torch.float32)

    # Sums of integers stay exact in float32 below 2**24: always for the channel sums
    # (at most 255 * 576), and for the squares unless a channel's stddev exceeds 170.
    # The [B, C] statistics then go on in float64; summing the big tensor in float64
    # would cost 3-8x more (a cast pass per sum).
    channel_mean = values.sum(-1).to(torch.float64) / per_channel  # m_c, [B, C]
    pivot = channel_mean.round()
    centred = values.sub_(pivot.to(torch.float32)[..., None])  # integers, exact
    centred_sq_mean = torch.linalg.vecdot(centred, centred).to(torch.float64) / per_channel
    channel_var = (centred_sq_mean - (channel_mean - pivot) ** 2).clamp_min(0.0)

    if contrast is None:
        factor = torch.ones(batch, 1, dtype=torch.float64, device=crops.device)
    else:
        factor = contrast.to(torch.float64)[:, None]  # f, [B, 1]
    image_mean = channel_mean.mean(-1, keepdim=True)  # M, [B, 1]
    between = channel_mean - image_mean  # m_c - M
    variance = (factor**2 * channel_var + between**2).mean(-1, keepdim=True)
    count = channels * per_channel  # N = 1728 for 3x24x24
    denominator = variance.sqrt().clamp_min(1.0 / math.sqrt(count))

    # y = f * (x - m_c) + (m_c - M) = f * (x - p_c) + f * (p_c - m_c) + (m_c - M), over denom.
    scale = (factor / denominator).to(torch.float32)[..., None]  # [B, 1, 1]
    shift = ((factor * (pivot - channel_mean) + between) / denominator).to(torch.float32)[..., None]
    out = centred.mul_(scale).add_(shift)  # in place: `centred` is ours
    return out.view(batch, channels, height, width)


def central_crop(images: torch.Tensor, crop_size: int = 24) -> torch.Tensor:
    """The central crop_size square of each image (offset 4 for 32 -> 24), as a view.

    TF's resize_image_with_crop_or_pad puts the offset at (32 - 24) // 2, rounding down.
    """
    _check_images(images, crop_size)
    height, width = images.shape[-2:]
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return images[..., top : top + crop_size, left : left + crop_size]


def per_image_standardization(x: torch.Tensor) -> torch.Tensor:
    """tf.image.per_image_standardization on a float batch [B,C,H,W].

    (x - mean) / max(stddev, 1/sqrt(N)) over all N = C*H*W values of each image; the
    floor keeps a constant image at zeros instead of dividing by zero. Computed in float64
    and returned in x's dtype: in float32, rounding the mean costs up to 1e-4 on
    near-constant images.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float batch [B,C,H,W], got {x.dtype} {tuple(x.shape)}")
    count = x[0].numel()
    wide = x.to(torch.float64)
    centred = wide - wide.mean(dim=(1, 2, 3), keepdim=True)
    stddev = centred.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return (centred / stddev.clamp_min(1.0 / math.sqrt(count))).to(x.dtype)


def eval_transform(images: torch.Tensor, crop_size: int = 24) -> torch.Tensor:
    """The tutorial's evaluation input: central crop and standardisation, uint8 -> float32.

    Equal to per_image_standardization(central_crop(images).float()), by distort's fast path.
    """
    return _contrast_and_standardize(central_crop(images, crop_size), None)


@dataclass(frozen=True)
class TutorialDistortions:
    """The tutorial's input pipeline as one object, the interface TrainBatches and EvalBatches
    take (`sample(n, generator, visit)` -> per-image draws that slice, `apply(images, draws)`,
    `eval_transform(images)`); data/fast_augment.FlipTranslate is the fast recipe's."""

    crop_size: int = 24

    def sample(self, n: int, generator: torch.Generator, visit: Visit | None = None) -> Distortions:
        return sample_distortions(n, generator, crop_size=self.crop_size)

    def apply(self, images: torch.Tensor, d: Distortions) -> torch.Tensor:
        return distort(images, d, self.crop_size)

    def eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        return eval_transform(images, self.crop_size)
