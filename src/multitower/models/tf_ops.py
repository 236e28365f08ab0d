"""TensorFlow-exact building blocks on NCHW tensors: "SAME" convolution and max
pooling, tf.nn.lrn and tf.truncated_normal_initializer.

PyTorch's look-alikes compute different functions: symmetric `padding=1` shifts the
3x3/2 pooling windows by one pixel (TF puts the extra padding on the bottom/right),
and nn.LocalResponseNorm divides alpha by the window size. These ops reproduce TF's
arithmetic so that a TF checkpoint gives the same logits here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from multitower.errors import UserError


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise UserError(f"{what} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one spatial axis: (before, after).

    out = ceil(size / stride); total = max((out - 1) * stride + kernel - size, 0);
    before = total // 2 and the odd pixel, if any, goes after (bottom/right).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_output_size(size: int, stride: int) -> int:
    """Spatial size after a TF "SAME" conv or pool: ceil(size / stride)."""
    return -(-size // stride)


def truncated_normal_(tensor: torch.Tensor, stddev: float, mean: float = 0.0) -> torch.Tensor:
    """tf.truncated_normal_initializer: a normal cut at 2 stddev (values beyond are
    redrawn in TF; torch samples the same truncated distribution by inverse CDF)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=stddev, a=mean - 2 * stddev, b=mean + 2 * stddev)


def conv2d_same(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """tf.nn.conv2d(padding="SAME") on NCHW input with an OIHW weight."""
    sh, sw = _pair(stride, "stride")
    kh, kw = weight.shape[-2:]
    top, bottom = same_padding(x.shape[-2], kh, sh)
    left, right = same_padding(x.shape[-1], kw, sw)
    if top == bottom and left == right:
        # Symmetric: the conv pads on the fly, no extra pass over memory.
        return F.conv2d(x, weight, bias, (sh, sw), padding=(top, left))
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, (sh, sw))


def _ceil_mode_is_same(size: int, kernel: int, stride: int, before: int) -> bool:
    """Whether max_pool2d(padding=before, ceil_mode=True) has TF's SAME windows.

    Torch's windows start at i*stride - before, like TF's, and are clipped to the
    input (padding never wins, exactly like TF's -inf padding); the only possible
    differences are the number of windows and torch's limit padding <= kernel // 2.
    """
    if before > kernel // 2:
        return False
    out = -(-(size + 2 * before - kernel) // stride) + 1
    if (out - 1) * stride >= size + before:  # torch drops a window starting in the padding
        out -= 1
    return out == same_output_size(size, stride)


def max_pool2d_same(
    x: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
) -> torch.Tensor:
    """tf.nn.max_pool(padding="SAME") on NCHW input, in one pass where possible."""
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    h, w = x.shape[-2:]
    top, bottom = same_padding(h, kh, sh)
    left, right = same_padding(w, kw, sw)
    if _ceil_mode_is_same(h, kh, sh, top) and _ceil_mode_is_same(w, kw, sw, left):
        # ceil_mode lets the last window hang over the bottom/right edge, which is
        # TF's extra after-padding (24->12 and 12->6 for 3x3/2 take this path).
        return F.max_pool2d(x, (kh, kw), (sh, sw), padding=(top, left), ceil_mode=True)
    x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    return F.max_pool2d(x, (kh, kw), (sh, sw))


@functools.lru_cache(maxsize=32)
def _window_band(channels: int, radius: int, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[C, C]: `scale` where |c - c'| <= radius, else 0 (symmetric)."""
    index = torch.arange(channels, device=device)
    return ((index[:, None] - index[None, :]).abs() <= radius).to(dtype) * scale


def _channel_window_sum(t: torch.Tensor, radius: int, scale: float = 1.0, shift: float | None = None) -> torch.Tensor:
    """shift + scale * s, s[:, c] = sum of t[:, c'] for |c' - c| <= radius, c' within the
    channels: one matrix product with a band matrix over the channel axis, in t's memory
    format (NCHW or channels_last). It replaced 2 * radius slice additions, each a pass over
    the activation (strided in channels_last): 8 passes for the tutorial's radius 4, where
    the product reads t once (~4% more FLOPs than the whole step, at GEMM speed)."""
    batch, channels, height, width = t.shape
    band = _window_band(channels, radius, scale, t.dtype, t.device)
    bias = None if shift is None else torch.full((1,), shift, dtype=t.dtype, device=t.device)
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        rows = t.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: NHWC is the memory order
        out = rows @ band if bias is None else torch.addmm(bias, rows, band)
        return out.view(batch, height, width, channels).permute(0, 3, 1, 2)
    columns = t.contiguous().view(batch, channels, height * width)
    band = band.expand(batch, channels, channels)
    out = torch.bmm(band, columns) if bias is None else torch.baddbmm(bias, band, columns)
    return out.view(batch, channels, height, width)


def _pow_neg(d: torch.Tensor, beta: float) -> torch.Tensor:
    """d ** -beta. For the tutorial's beta = 0.75 as rsqrt(d) * sqrt(rsqrt(d)): two
    cheap instructions instead of pow's exp/log, ~2x faster on CPU, within an ulp or two."""
    if beta == 0.75:
        scale = torch.rsqrt(d)
        return scale.mul_(scale.sqrt())
    if beta == 0.5:
        return torch.rsqrt(d)
    return d.pow(-beta)


def _fused_kernels(x: torch.Tensor):
    """models.lrn_cpu if its kernels take `x` (imported on first use: numba takes ~0.4 s
    to load), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    import multitower.models.lrn_cpu as lrn_cpu
    return lrn_cpu if lrn_cpu.applies(x) else None


class _LRN(torch.autograd.Function):
    # One function for forward and backward instead of autograd's pow/mul chain: fewer
    # passes over the activation (LRN is memory-bound; it was ~20% of the CPU step).
    #   d_c = bias + alpha * sum_{c' in W(c)} x_c'^2,  out_c = x_c * d_c^-beta
    #   dL/dx_j = g_j d_j^-beta - 2 alpha beta x_j * sum_{c in W(j)} g_c out_c / d_c
    # (the window W is symmetric, so the adjoint of the window sum is the window sum).
    @staticmethod
    def forward(ctx, x: torch.Tensor, radius: int, bias: float, alpha: float, beta: float) -> torch.Tensor:
        d = _channel_window_sum(x * x, radius, alpha, bias)
        scale = _pow_neg(d, beta)
        ctx.save_for_backward(x, d, scale)
        ctx.constants = radius, alpha, beta
        return x * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, d, scale = ctx.saved_tensors
        radius, alpha, beta = ctx.constants
        t = (grad * x).mul_(scale).div_(d)
        window = _channel_window_sum(t, radius, -2.0 * alpha * beta)
        grad_x = (grad * scale).addcmul_(x, window)
        return grad_x, None, None, None, None


class _FusedLRN(torch.autograd.Function):
    # lrn_cpu's kernels: the ReLU before the LRN, if any, folded in; only x is saved.
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernels, radius: int, bias: float, alpha: float, beta: float,
                relu: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.kernels, ctx.constants = kernels, (radius, bias, alpha, beta, relu)
        return kernels.forward(x, *ctx.constants)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.kernels.backward(x, grad, *ctx.constants), None, None, None, None, None, None


def lrn(
    x: torch.Tensor,
    depth_radius: int = 5,
    bias: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    relu: bool = False,
) -> torch.Tensor:
    """tf.nn.lrn over the channel axis of NCHW input (TF's defaults); of tf.nn.relu(x)
    with relu=True.

    sqr_sum[c] = sum of x[c']**2 for c' in [c - r, c + r] clipped to the channels;
    out = x / (bias + alpha * sqr_sum) ** beta. Alpha is not divided by the window
    size (nn.LocalResponseNorm does divide). A float32 channels_last CPU tensor (train's
    default) takes lrn_cpu's fused kernels, anything else torch ops.
    """
    if x.dim() != 4:
        raise UserError(f"lrn expects NCHW input, got shape {tuple(x.shape)}")
    kernels = _fused_kernels(x)
    if kernels is not None:
        return _FusedLRN.apply(x, kernels, depth_radius, bias, alpha, beta, relu)
    if relu:
        x = F.relu(x)
    return _LRN.apply(x, depth_radius, bias, alpha, beta)


class Conv2dSame(nn.Module):
    """Conv2d with TF "SAME" padding, truncated-normal weights and constant biases.

    Parameters keep PyTorch's OIHW layout; see cifar10_tf.load_tensorflow_weights
    for TF's HWIO."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        stddev: float = 5e-2,
        bias_init: float = 0.0,
    ):
        super().__init__()
        kh, kw = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.stddev = stddev
        self.bias_init = bias_init
        # Stride 1 with an odd kernel pads (k-1)/2 on each side whatever the input size.
        self.static_padding = (
            ((kh - 1) // 2, (kw - 1) // 2) if self.stride == (1, 1) and kh % 2 and kw % 2 else None
        )
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        truncated_normal_(self.weight, self.stddev)
        nn.init.constant_(self.bias, self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_padding is not None:
            return F.conv2d(x, self.weight, self.bias, self.stride, padding=self.static_padding)
        return conv2d_same(x, self.weight, self.bias, self.stride)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"{i}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, padding=SAME"


class MaxPool2dSame(nn.Module):
    """tf.nn.max_pool with "SAME" padding."""

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int]):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d_same(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=SAME"


class LRN(nn.Module):
    """tf.nn.lrn as a module (TF's argument names and defaults); relu=True normalises
    tf.nn.relu(x), the ReLU done inside the LRN's own pass where the fused kernels run."""

    def __init__(self, depth_radius: int = 5, bias: float = 1.0, alpha: float = 1.0, beta: float = 0.5,
                 relu: bool = False):
        super().__init__()
        self.relu = relu
        if not isinstance(depth_radius, int) or depth_radius < 0:
            raise UserError(f"LRN depth_radius must be an int >= 0, got {depth_radius!r}")
        self.depth_radius = depth_radius
        self.bias = bias
        self.alpha = alpha
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lrn(x, self.depth_radius, self.bias, self.alpha, self.beta, self.relu)

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return (f"depth_radius={self.depth_radius}, bias={self.bias}, alpha={self.alpha:.6g}, "
                f"beta={self.beta}{relu}")


__all__ = [
    "LRN",
    "Conv2dSame",
    "MaxPool2dSame",
    "conv2d_same",
    "lrn",
    "max_pool2d_same",
    "same_output_size",
    "same_padding",
    "truncated_normal_",
]
