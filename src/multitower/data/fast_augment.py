"""The fast recipe's input pipeline (airbench): full 32x32 images, batched, no per-image loop.

Training: random translation by up to `pad` pixels on each axis (a random crop of the image
reflect-padded by `pad`, as airbench's batch_crop on a reflect-padded batch) and a left-right
flip in alternate epochs (airbench's alternating flip; random per draw without the loader's
epoch and per-image coins), then per-channel normalisation with the CIFAR-10 mean and stddev. No
brightness/contrast distortions, no per-image standardisation.
Evaluation: the per-channel normalisation alone.

Crop, reflection and flip are one gather on uint8 with computed indices (the reflected
row/column of every output pixel), as augment.crop_and_flip; normalisation is one
multiply-add per value.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch

from multitower.data.augment import PerImageDraws, Visit
from multitower.errors import UserError

# CIFAR-10's training-set channel statistics on [0, 1] (as airbench, hlb-CIFAR10 and
# torchvision's examples use). Other data (generated, CIFAR-100) is close enough: the
# model's whitening layer is fit on the data itself and centres its patches.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Translations(PerImageDraws):
    """The fast recipe's draws for a batch of images (see augment.PerImageDraws)."""

    shift_y: torch.Tensor  # int64 in [-pad, pad]: output row i reads padded row i + pad + shift_y
    shift_x: torch.Tensor  # int64 in [-pad, pad]
    flip: torch.Tensor  # bool, mirror left-right after the translation


@functools.lru_cache(maxsize=16)
def _scale_and_shift(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's per-channel constants, made once per (mean, std, device): not per batch,
    where on a GPU each would be a blocking host-to-device copy."""
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
    shift = (-torch.tensor(mean, dtype=torch.float32, device=device) / std_t).view(1, -1, 1, 1)
    return scale, shift


def normalize(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 (x / 255 - mean_c) / std_c, as one multiply-add."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [B,C,H,W], got {images.dtype} {tuple(images.shape)}")
    scale, shift = _scale_and_shift(tuple(mean), tuple(std), images.device)
    return torch.addcmul(shift, images.to(torch.float32), scale)


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map positions in [-(size-1), 2(size-1)] into [0, size-1] by mirroring at the edges
    without repeating them (numpy/torch 'reflect' padding: -1 -> 1, size -> size - 2)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


@dataclass(frozen=True)
class FlipTranslate:
    """The fast recipe's training augmentation; `pad` pixels of reflect padding (airbench: 2)."""

    pad: int = 2
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    alternate_flip: bool = True
    """airbench's derandomised flip: each image is mirrored in every other epoch (a coin
    fixed per image picks which), so two consecutive epochs see both views, where random
    flips would show ~half the images the same way twice. False: an independent coin per draw."""

    def sample(self, n: int, generator: torch.Generator, visit: Visit | None = None) -> Translations:
        """Draw n images' translations (shift_y, then shift_x) and flips: with alternate_flip
        and a `visit` (the loader's), flip = coin XOR (epoch is odd); otherwise drawn too."""
        if self.pad < 0:
            raise UserError(f"translation pad={self.pad} is negative")
        shift_y = torch.randint(-self.pad, self.pad + 1, (n,), generator=generator)
        shift_x = torch.randint(-self.pad, self.pad + 1, (n,), generator=generator)
        if self.alternate_flip and visit is not None:
            if len(visit.coins) != n:
                raise ValueError(f"{len(visit.coins)} coins for a batch of {n} images")
            flip = visit.coins ^ (visit.epoch % 2 == 1)
        else:
            flip = torch.rand(n, generator=generator) < 0.5
        return Translations(shift_y=shift_y, shift_x=shift_x, flip=flip)

    def translate_and_flip(self, images: torch.Tensor, d: Translations) -> torch.Tensor:
        """uint8 [B, C, H, W] -> uint8 [B, C, H, W]: out[b, c, i, j] = image[b, c, R(i + dy), R(j' + dx)]
        with R the reflection at the borders and j' = W - 1 - j for flipped images."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images [B,C,H,W], got {images.dtype} {tuple(images.shape)}")
        batch, channels, height, width = images.shape
        if len(d) != batch:
            raise ValueError(f"{len(d)} translations for a batch of {batch} images")
        if self.pad >= min(height, width):
            raise UserError(f"translation pad={self.pad} needs images larger than {height}x{width}")
        rows = reflect(d.shift_y[:, None] + torch.arange(height, device=images.device), height)  # [B, H]
        steps = torch.arange(width, device=images.device)
        # Flip after translating: the output's column j reads the translated column W-1-j.
        column_steps = torch.where(d.flip[:, None], width - 1 - steps, steps)
        columns = reflect(d.shift_x[:, None] + column_steps, width)  # [B, W]
        flat_index = (rows[:, :, None] * width + columns[:, None, :]).reshape(batch, 1, -1)
        pixels = images.reshape(batch, channels, height * width)
        out = torch.gather(pixels, 2, flat_index.expand(batch, channels, -1))
        return out.view(batch, channels, height, width)

    def apply(self, images: torch.Tensor, d: Translations) -> torch.Tensor:
        """Training input: translate, flip, normalise; uint8 [B,3,32,32] -> float32 [B,3,32,32]."""
        return normalize(self.translate_and_flip(images, d), self.mean, self.std)

    def eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation input: the normalisation alone."""
        return normalize(images, self.mean, self.std)
