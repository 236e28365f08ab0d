"""tf.nn.lrn (optionally of tf.nn.relu(x)) forward and backward on a CPU, one pass
each over float32 channels_last memory, compiled with numba: tf_ops.lrn's fast path.

In torch ops the LRN is a dozen passes over its activation (square, window sum,
rsqrt, sqrt, products; more in backward), each reading and writing the whole
tensor, and a ReLU before it two more (forward, backward). Here each pixel's
channels are read once, the ReLU, window sums and scales are computed in cache and
one result is written. The backward recomputes the window sums from x instead of
saving them: arithmetic is cheaper than memory here.

Exact IEEE float32 arithmetic (no fastmath: no reassociation, no contraction into
fused multiply-adds), each pixel alone in a fixed order, so the bits do not depend
on the thread count or the CPU's vector width. Rows (pixels) are split over torch's
intra-op thread count, each chunk in a thread of this module's pool with the GIL
released; numba's own threading layer is not used, as it may not be entered from
two threads at once.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

# nogil: the pool's threads run kernels at once; cache: compiled once per machine, into
# __pycache__; error_model numpy: no zero-division checks, which would stop vectorising.
_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
_inline = numba.njit(inline="always", error_model="numpy")


# The kernels' helpers, inlined into them (numba IR), where their channels / radius /
# span arguments are the kernel's compile-time constants.
@_inline
def _load(x, r, v, sq, relu, channels, radius):
    # v = relu(x[r]) (NaN kept, as torch.relu does; a select, not a branch, so that it
    # vectorises), sq[radius + c] = v[c] ** 2; sq's padding zeros are never written.
    for c in range(channels):
        value = x[r, c]
        v[c] = np.float32(0.0) if (relu and value <= 0) else value
    for c in range(channels):
        sq[c + radius] = v[c] * v[c]


@_inline
def _window_sums(padded, s, channels, span):
    # s[c] = padded[c] + ... + padded[c + span - 1], in that order: channel c's clipped window.
    for c in range(channels):
        total = padded[c]
        for k in range(1, span):
            total = total + padded[c + k]
        s[c] = total


@_inline
def _scales(s, d, scale, bias, alpha, beta, channels):
    # d = bias + alpha * window sum; scale = d ** -beta (two square roots for 0.75).
    for c in range(channels):
        d[c] = bias + alpha * s[c]
    if beta == 0.75:
        for c in range(channels):
            q = np.float32(1.0) / np.sqrt(d[c])
            scale[c] = q * np.sqrt(q)
    elif beta == 0.5:
        for c in range(channels):
            scale[c] = np.float32(1.0) / np.sqrt(d[c])
    else:
        for c in range(channels):
            scale[c] = d[c] ** -beta


@functools.lru_cache(maxsize=None)
def _kernels(channels: int, radius: int):
    """(forward rows, backward rows) compiled for this channel count and window radius:
    as constants they give every loop a fixed trip count, which LLVM unrolls and
    vectorises without run-time checks (1.5x faster than taking them as arguments).
    Closures over ints only, so that numba's cache keeps them."""
    span, padded_width = 2 * radius + 1, channels + 2 * radius

    @_jit
    def forward_rows(x, out, first, last, bias, alpha, beta, relu):
        # x, out: [pixels, channels]; rows first..last-1.
        v, s = np.empty(channels, np.float32), np.empty(channels, np.float32)
        d, scale = np.empty(channels, np.float32), np.empty(channels, np.float32)
        sq = np.zeros(padded_width, np.float32)
        for r in range(first, last):
            _load(x, r, v, sq, relu, channels, radius)
            _window_sums(sq, s, channels, span)
            _scales(s, d, scale, bias, alpha, beta, channels)
            for c in range(channels):
                out[r, c] = v[c] * scale[c]

    @_jit
    def backward_rows(x, grad, grad_x, first, last, bias, alpha, beta, relu):
        #   dL/dv_j = g_j scale_j - 2 alpha beta v_j * sum_{c in W(j)} g_c v_c scale_c / d_c
        # (W symmetric: the window sum's adjoint is the window sum), then ReLU's mask x > 0.
        coef = np.float32(-2.0) * alpha * beta
        v, s = np.empty(channels, np.float32), np.empty(channels, np.float32)
        d, scale = np.empty(channels, np.float32), np.empty(channels, np.float32)
        sq, t = np.zeros(padded_width, np.float32), np.zeros(padded_width, np.float32)
        for r in range(first, last):
            _load(x, r, v, sq, relu, channels, radius)
            _window_sums(sq, s, channels, span)
            _scales(s, d, scale, bias, alpha, beta, channels)
            for c in range(channels):
                t[c + radius] = grad[r, c] * v[c] * scale[c] / d[c]
            _window_sums(t, s, channels, span)
            for c in range(channels):
                value = grad[r, c] * scale[c] + coef * (v[c] * s[c])
                grad_x[r, c] = value if (not relu or x[r, c] > 0) else np.float32(0.0)

    return forward_rows, backward_rows


# Values a thread must have to do for the work to be split: a chunk must outweigh
# handing it to a thread (~2,000 pixels of 64 channels).
_VALUES_PER_THREAD = 1 << 17
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    # A forked child inherits the pool object but none of its threads.
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_forget_pool)


def _helpers(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(count, thread_name_prefix="multitower-lrn"), count
        return _pool


def _run_split(kernel, arrays: tuple, rows: int, constants: tuple) -> None:
    """kernel(*arrays, first, last, *constants) over rows 0..rows-1 (of the first array),
    in as many chunks as torch's intra-op threads; the calling thread takes the first."""
    values = arrays[0].size
    threads = max(1, min(torch.get_num_threads(), rows, values // _VALUES_PER_THREAD))
    bounds = [rows * i // threads for i in range(threads + 1)]
    futures = []
    if threads > 1:
        pool = _helpers(threads - 1)
        futures = [pool.submit(kernel, *arrays, bounds[i], bounds[i + 1], *constants) for i in range(1, threads)]
    kernel(*arrays, bounds[0], bounds[1], *constants)
    for future in futures:
        future.result()


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels take `x`: a 4-D float32 CPU tensor in channels_last memory
    (and not also NCHW-contiguous, as a 1x1 image is: its rows would be ambiguous)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def _rows(t: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] channels_last -> the [N*H*W, C] array over the same memory (view()
    raises rather than copy, so that what a kernel writes lands in `t`)."""
    return t.permute(0, 2, 3, 1).view(-1, t.shape[1]).numpy()


def _constants(bias: float, alpha: float, beta: float, relu: bool) -> tuple:
    # float32 scalars: the kernels' arithmetic stays in float32, as torch's does.
    return np.float32(bias), np.float32(alpha), np.float32(beta), bool(relu)


def forward(x: torch.Tensor, radius: int, bias: float, alpha: float, beta: float,
            relu: bool = False) -> torch.Tensor:
    """tf.nn.lrn of x, or of relu(x); `x` as applies() takes; the result channels_last."""
    out = torch.empty_like(x, memory_format=torch.channels_last)
    rows = _rows(x)
    forward_rows, _ = _kernels(x.shape[1], int(radius))
    _run_split(forward_rows, (rows, _rows(out)), rows.shape[0], _constants(bias, alpha, beta, relu))
    return out


def backward(x: torch.Tensor, grad: torch.Tensor, radius: int, bias: float, alpha: float,
             beta: float, relu: bool = False) -> torch.Tensor:
    """The gradient at `x` of forward(x, ...) for the output gradient `grad` (any layout)."""
    grad = grad.to(torch.float32).contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
    rows = _rows(x)
    _, backward_rows = _kernels(x.shape[1], int(radius))
    _run_split(backward_rows, (rows, _rows(grad), _rows(grad_x)), rows.shape[0], _constants(bias, alpha, beta, relu))
    return grad_x

