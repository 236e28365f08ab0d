"""`airbench`: the small VGG-like network of the fastest published CIFAR-10 training
(Keller Jordan's airbench94 / hlb-CIFAR10, https://github.com/KellerJordan/cifar10-airbench),
on full 32x32 images, for `--recipe fast` (see multitower.train.recipe).

  whiten  2x2 conv, 3 -> 24 channels, its filters frozen: the eigenvectors of the training
          data's 2x2x3 patch covariance, scaled by 1/sqrt(eigenvalue), and their negatives
          (fit_whitening; a buffer, so checkpoints and eval reproduce it); its bias starts
          by centring the patches and is a parameter (the fast recipe trains it for the
          first 3 epochs, as airbench), then GELU
  block1  conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU   (widths[0] channels)
  block2  the same                                                     (widths[1])
  block3  the same                                                     (widths[2])
  pool    maxpool 3 (3x3 -> 1x1)
  head    linear, no bias, logits multiplied by logit_scale (airbench: 1/9)

32 -> 31 (whiten, no padding) -> 15 -> 7 -> 3 -> 1. Batch norms have their scale frozen at
1 (only the shift trains), as in airbench. Convolutions start as partial identities
(dirac on the first in_channels filters), as in airbench.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multitower.errors import UserError

# airbench94's widths. The fast recipe's default (train/recipe.py) is chosen by CPU
# throughput and may be narrower.
AIRBENCH_WIDTHS = (64, 256, 256)


class Whitening(nn.Module):
    """A conv whose frozen filters whiten the image's k x k patches.

    For the patch covariance C = V diag(lam) V^T of the data it was fit on, and the patch
    mean m, filter i is v_i / sqrt(lam_i + eps) and bias_i = -filter_i . m, so the outputs
    of the first half of the channels have covariance ~ identity and mean 0; the second half
    are their negatives (so that the GELU after it keeps both signs). The filters are a
    buffer (never trained); the bias is a parameter that fit() initialises and the fast
    recipe's optimizer trains for the first epochs only (train/recipe.py).
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4):
        super().__init__()
        self.in_channels, self.kernel_size, self.eps = in_channels, kernel_size, eps
        dim = in_channels * kernel_size * kernel_size
        self.out_channels = 2 * dim
        # Until fit: the identity basis (each filter picks one pixel of the patch), and negatives.
        eye = torch.eye(dim).view(dim, in_channels, kernel_size, kernel_size)
        self.register_buffer("weight", torch.cat([eye, -eye]))
        self.bias = nn.Parameter(torch.zeros(2 * dim))

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """Every k x k patch of float images [N, C, H, W] as rows [N * P, C * k * k],
        flattened in the conv weight's (C, kh, kw) order."""
        k = self.kernel_size
        cols = F.unfold(images.float(), kernel_size=k)  # [N, C*k*k, P]
        return cols.transpose(1, 2).reshape(-1, self.in_channels * k * k)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Set the filters from the patches of `images` (float, already normalised as the
        training input is). Deterministic: the same images give the same filters."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise UserError(f"whitening needs images [N, {self.in_channels}, H, W], got {tuple(images.shape)}")
        x = self.patches(images).double()
        mean = x.mean(0)
        centred = x - mean
        covariance = centred.T @ centred / x.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
        filters = eigenvectors.T / (eigenvalues.clamp_min(0) + self.eps).sqrt()[:, None]  # [D, D]
        bias = -filters @ mean
        k = self.kernel_size
        shape = (-1, self.in_channels, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).view(shape).to(self.weight.dtype))
        self.bias.copy_(torch.cat([bias, -bias]).to(self.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, frozen filters"


class Conv(nn.Conv2d):
    """3x3 'same' conv without bias, initialised as airbench: default init, then a dirac
    (identity) on the first in_channels filters."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: min(w.size(0), w.size(1))])


class BatchNorm(nn.BatchNorm2d):
    """Batch norm with the scale frozen at 1 (requires_grad False); only the shift trains."""

    def __init__(self, num_features: int, momentum: float = 0.4):
        super().__init__(num_features, eps=1e-5, momentum=momentum)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float):
        super().__init__()
        self.conv1 = Conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(out_channels, bn_momentum)
        self.conv2 = Conv(out_channels, out_channels)
        self.norm2 = BatchNorm(out_channels, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


def parse_widths(widths) -> tuple[int, int, int]:
    """(w1, w2, w3) from a sequence or a "64,256,256" string; a one-line UserError otherwise."""
    if isinstance(widths, str):
        try:
            widths = [int(w) for w in widths.split(",") if w.strip()]
        except ValueError:
            raise UserError(f"--widths must be three comma-separated whole numbers, got {widths!r}") from None
    widths = tuple(widths)
    if len(widths) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise UserError(f"--widths must be three positive whole numbers (block1,block2,block3), got {widths!r}")
    return widths


class Airbench(nn.Module):
    """float32 NCHW images [B, 3, 32, 32], per-channel normalised -> logits.

    widths: channels of the three conv groups (airbench94: 64, 256, 256); `width`
    multiplies them (the registry's common keyword; 1 by default).
    """

    def __init__(self, num_classes: int = 10, width: int = 1, widths=AIRBENCH_WIDTHS,
                 logit_scale: float = 1 / 9, bn_momentum: float = 0.4, whiten_kernel: int = 2):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise UserError(f"width must be a positive integer, got {width!r}")
        w1, w2, w3 = (w * width for w in parse_widths(widths))
        self.num_classes, self.widths, self.logit_scale = num_classes, (w1, w2, w3), logit_scale
        self.whiten = Whitening(3, whiten_kernel)
        self.act = nn.GELU()
        self.block1 = ConvGroup(self.whiten.out_channels, w1, bn_momentum)
        self.block2 = ConvGroup(w1, w2, bn_momentum)
        self.block3 = ConvGroup(w2, w3, bn_momentum)
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(w3, num_classes, bias=False)

    def fit_whitening(self, images: torch.Tensor) -> None:
        self.whiten.fit(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(x))
        x = self.block3(self.block2(self.block1(x)))
        x = self.pool(x).flatten(1)
        if x.shape[1] != self.head.in_features:
            raise UserError(f"airbench takes 32x32 images; got input giving {x.shape[1]} features "
                            f"instead of {self.head.in_features}")
        return self.head(x) * self.logit_scale

    def extra_repr(self) -> str:
        return f"widths={self.widths}, logit_scale={self.logit_scale:.4g}"
