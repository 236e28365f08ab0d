"""tf_ops computes TensorFlow's functions: SAME padding (extra pixel bottom/right),
max-pool padding that never wins, and tf.nn.lrn's un-normalised alpha."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from multitower.errors import UserError
from multitower.models import tf_ops
from multitower.models.tf_ops import (
    LRN,
    Conv2dSame,
    MaxPool2dSame,
    conv2d_same,
    lrn,
    max_pool2d_same,
    same_padding,
)


# --- SAME padding ------------------------------------------------------------------

@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (24, 3, 2, (0, 1)),  # pool1: out 12, total 11*2+3-24 = 1, the extra goes after
        (12, 3, 2, (0, 1)),  # pool2: out 6, total 1
        (4, 3, 2, (0, 1)),
        (24, 5, 1, (2, 2)),  # conv1/conv2
        (5, 4, 1, (1, 2)),  # even kernel: total 3
        (7, 3, 2, (1, 1)),  # out 4, total 2
        (6, 1, 2, (0, 0)),  # total would be negative
        (1, 5, 1, (2, 2)),
    ],
)
def test_same_padding_by_hand(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


def test_tutorial_sizes_24_12_6():
    x = torch.randn(2, 3, 24, 24)
    conv = Conv2dSame(3, 8, 5)
    pool = MaxPool2dSame(3, 2)
    h = conv(x)
    assert h.shape == (2, 8, 24, 24)
    h = pool(h)
    assert h.shape == (2, 8, 12, 12)
    assert pool(h).shape == (2, 8, 6, 6)


def test_max_pool_4x4_by_hand_and_torch_padding_differs():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # TF: windows start at rows/cols 0 and 2; the second one covers 2..3 (+1 pad).
    expected = torch.tensor([[[[10.0, 11.0], [14.0, 15.0]]]])
    assert torch.equal(max_pool2d_same(x, 3, 2), expected)
    # PyTorch's symmetric padding=1 starts the windows at -1 and 1: another function.
    torch_sym = F.max_pool2d(x, 3, 2, padding=1)
    assert torch.equal(torch_sym, torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]]))
    assert not torch.equal(torch_sym, expected)


def test_max_pool_padding_never_wins():
    x = -(torch.arange(16.0) + 1).view(1, 1, 4, 4)  # all negative: a zero pad would win
    expected = torch.tensor([[[[-1.0, -3.0], [-9.0, -11.0]]]])
    assert torch.equal(max_pool2d_same(x, 3, 2), expected)


def test_max_pool_24x24_differs_from_torch_padding_1():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 24, 24)
    ours = MaxPool2dSame(3, 2)(x)
    theirs = F.max_pool2d(x, 3, 2, padding=1)
    assert ours.shape == theirs.shape == (2, 4, 12, 12)
    assert not torch.allclose(ours, theirs)
    # Dropping the last row/column makes TF's windows those of plain padding=0, ceil off.
    assert torch.equal(ours[..., :11, :11], F.max_pool2d(x, 3, 2)[..., :11, :11])


def _loop_max_pool_same(x, k, s):
    """The TF definition, window by window: max over [i*s - before, +k) clipped."""
    h, w = x.shape[-2:]
    out_h, out_w = math.ceil(h / s[0]), math.ceil(w / s[1])
    top = max((out_h - 1) * s[0] + k[0] - h, 0) // 2
    left = max((out_w - 1) * s[1] + k[1] - w, 0) // 2
    out = torch.empty(*x.shape[:-2], out_h, out_w)
    for i in range(out_h):
        r0 = i * s[0] - top
        for j in range(out_w):
            c0 = j * s[1] - left
            win = x[..., max(r0, 0) : r0 + k[0], max(c0, 0) : c0 + k[1]]
            out[..., i, j] = win.amax(dim=(-2, -1))
    return out


def test_max_pool_matches_definition_on_a_sweep():
    torch.manual_seed(0)
    one_pass = two_pass = 0
    for h, w, kh, kw, sh, sw in itertools.product([1, 2, 5, 6, 9], [3, 8], [1, 2, 3, 4], [3, 5], [1, 2, 3], [2]):
        x = torch.randn(2, 2, h, w)
        got = max_pool2d_same(x, (kh, kw), (sh, sw))
        assert torch.equal(got, _loop_max_pool_same(x, (kh, kw), (sh, sw))), (h, w, kh, kw, sh, sw)
        fast = tf_ops._ceil_mode_is_same(h, kh, sh, same_padding(h, kh, sh)[0]) and tf_ops._ceil_mode_is_same(
            w, kw, sw, same_padding(w, kw, sw)[0]
        )
        one_pass += fast
        two_pass += not fast
    assert one_pass and two_pass  # both code paths were checked


@pytest.mark.parametrize(
    "size, kernel, stride, pads",
    [
        ((5, 5), 4, 1, (1, 2, 1, 2)),  # even kernel
        ((6, 6), 3, 2, (0, 1, 0, 1)),  # stride 2, odd extra
        ((24, 23), 5, 2, (1, 2, 2, 2)),  # rows: out 12 total 3; cols: out 12 total 4
        ((7, 7), 3, 2, (1, 1, 1, 1)),  # symmetric, conv's own padding
    ],
)
def test_conv_same_against_explicit_pad(size, kernel, stride, pads):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    w = torch.randn(4, 3, kernel, kernel)
    b = torch.randn(4)
    top, bottom, left, right = pads
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride)
    got = conv2d_same(x, w, b, stride)
    assert got.shape[-2:] == (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if top != bottom:
        # TF's asymmetric padding is not torch's symmetric one.
        sym = F.conv2d(F.pad(x, (right, left, bottom, top)), w, b, stride)
        assert not torch.allclose(got, sym)


def test_conv_module_static_and_dynamic_paths_agree():
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, 5)
    x = torch.randn(2, 3, 9, 7)
    assert conv.static_padding == (2, 2)
    torch.testing.assert_close(conv(x), conv2d_same(x, conv.weight, conv.bias), rtol=0, atol=0)
    strided = Conv2dSame(3, 4, 4, stride=2)
    assert strided.static_padding is None
    assert strided(x).shape == (2, 4, 5, 4)


def test_tutorial_layers_make_no_padding_pass(monkeypatch):
    def no_pad(*args, **kwargs):
        raise AssertionError("F.pad called: an extra pass over the activations")

    monkeypatch.setattr(F, "pad", no_pad)
    h = Conv2dSame(3, 8, 5)(torch.randn(2, 3, 24, 24))
    h = MaxPool2dSame(3, 2)(h)
    assert MaxPool2dSame(3, 2)(h).shape == (2, 8, 6, 6)


def test_bad_kernel_is_a_user_error():
    with pytest.raises(UserError, match="kernel_size"):
        MaxPool2dSame(0, 2)
    with pytest.raises(UserError, match="stride"):
        Conv2dSame(3, 4, 3, stride=(1, 2, 3))


# --- tf.nn.lrn ---------------------------------------------------------------------

def _loop_lrn(x, r, bias, alpha, beta):
    """tf.nn.lrn's formula, one channel at a time, window clipped at the edges."""
    out = torch.empty_like(x)
    c_total = x.shape[1]
    for c in range(c_total):
        lo, hi = max(c - r, 0), min(c + r, c_total - 1)
        sqr_sum = (x[:, lo : hi + 1] ** 2).sum(dim=1)
        out[:, c] = x[:, c] / (bias + alpha * sqr_sum) ** beta
    return out


@pytest.mark.parametrize("channels", [8, 64])
@pytest.mark.parametrize(
    "r, bias, alpha, beta",
    [
        (4, 1.0, 0.001 / 9.0, 0.75),  # the tutorial's norm1/norm2
        (5, 1.0, 1.0, 0.5),  # TF's defaults
        (2, 2.0, 0.3, 1.25),
    ],
)
def test_lrn_matches_formula(channels, r, bias, alpha, beta):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64) * 20  # big enough for LRN to matter
    expected = _loop_lrn(x, r, bias, alpha, beta)
    assert not torch.allclose(expected, x, rtol=1e-2)
    torch.testing.assert_close(lrn(x, r, bias, alpha, beta), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        LRN(r, bias, alpha, beta)(x.float()), expected.float(), rtol=1e-5, atol=1e-5
    )


def test_lrn_hand_computed():
    # One pixel, channels [1, 2, 3], radius 1, bias 1, alpha 0.5, beta 0.5:
    # c0: 1/sqrt(1 + 0.5*5); c1: 2/sqrt(1 + 0.5*14); c2: 3/sqrt(1 + 0.5*13).
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    got = lrn(x, depth_radius=1, bias=1.0, alpha=0.5, beta=0.5).flatten().tolist()
    assert got == pytest.approx([0.5345224838248488, 0.7071067811865476, 1.0954451150103321], rel=1e-12)


def test_lrn_is_not_torch_local_response_norm_unless_alpha_scaled():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64) * 5
    ours = lrn(x, 2, 1.0, 0.5, 0.75)
    # nn.LocalResponseNorm averages over the window: same alpha is another function...
    assert not torch.allclose(F.local_response_norm(x, 5, 0.5, 0.75, 1.0), ours)
    # ...and alpha * size gives TF's.
    torch.testing.assert_close(F.local_response_norm(x, 5, 0.5 * 5, 0.75, 1.0), ours)


# beta 0.75 (the tutorial's) and 0.5 take rsqrt shortcuts in the hand-written backward; 0.6 takes pow.
@pytest.mark.parametrize("radius,beta", [(2, 0.75), (4, 0.75), (2, 0.5), (1, 0.6)])
def test_lrn_gradient(radius, beta):
    torch.manual_seed(0)
    x = (torch.randn(2, 7, 2, 3, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lrn(t, radius, 1.0, 0.2, beta), (x,))
    # And against autograd through the loop formula, also in channels_last.
    g = torch.randn(2, 7, 2, 3, dtype=torch.float64)
    (ref,) = torch.autograd.grad(_loop_lrn(x, radius, 1.0, 0.2, beta), x, g)
    (ours,) = torch.autograd.grad(lrn(x, radius, 1.0, 0.2, beta), x, g)
    torch.testing.assert_close(ours, ref)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    (ours_cl,) = torch.autograd.grad(lrn(x_cl, radius, 1.0, 0.2, beta), x_cl, g)
    torch.testing.assert_close(ours_cl, ref)


# --- the fused CPU kernels (models/lrn_cpu.py): float32 channels_last, train's default ---

def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


# The tutorial's LRN at its norm2 shape (enough rows for two threads), and small odd cases:
# fewer channels than the window, TF's defaults, a beta that takes pow.
@pytest.mark.parametrize("shape, r, bias, alpha, beta", [
    ((32, 64, 12, 12), 4, 1.0, 0.001 / 9.0, 0.75),
    ((3, 5, 2, 3), 4, 1.0, 0.3, 0.75),
    ((2, 9, 3, 1), 5, 1.0, 1.0, 0.5),
    ((2, 7, 2, 3), 1, 2.0, 0.2, 0.6),
])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_lrn_matches_the_formula_forward_and_backward(shape, r, bias, alpha, beta, relu):
    from multitower.models import lrn_cpu
    torch.manual_seed(0)
    x64 = (torch.randn(shape, dtype=torch.float64) * 20).requires_grad_()
    g64 = torch.randn(shape, dtype=torch.float64)
    ref = _loop_lrn(x64.relu() if relu else x64, r, bias, alpha, beta)
    (ref_grad,) = torch.autograd.grad(ref, x64, g64)
    x = _channels_last(x64.detach().float()).requires_grad_()
    assert lrn_cpu.applies(x)
    out = lrn(x, r, bias, alpha, beta, relu=relu)
    (grad,) = torch.autograd.grad(out, x, g64.float())
    if relu:  # ReLU's gradient is 0 where x <= 0
        assert (grad[x.detach() <= 0] == 0).all() and (grad[x.detach() > 0] != 0).any()
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4)
    # The torch-ops path, given the same values in NCHW, computes the same function.
    x_nchw = x.detach().contiguous().requires_grad_()
    assert not lrn_cpu.applies(x_nchw)
    out_nchw = lrn(x_nchw, r, bias, alpha, beta, relu=relu)
    (grad_nchw,) = torch.autograd.grad(out_nchw, x_nchw, g64.float())
    torch.testing.assert_close(out, out_nchw)
    torch.testing.assert_close(grad, grad_nchw)


def test_fused_lrn_is_the_same_bits_on_any_thread_count_and_from_two_threads_at_once():
    # Each pixel is computed alone, in a fixed order: splitting the rows over threads,
    # or calls from several threads at once (the pool is shared), cannot change a bit.
    import threading
    from multitower.models import lrn_cpu
    torch.manual_seed(0)
    x = _channels_last(torch.randn(64, 64, 12, 12).relu())
    g = _channels_last(torch.randn(64, 64, 12, 12))
    args = (4, 1.0, 0.001 / 9.0, 0.75)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lrn_cpu.forward(x, *args), lrn_cpu.backward(x, g, *args)
        torch.set_num_threads(4)  # more chunks than this machine has cores
        four = lrn_cpu.forward(x, *args), lrn_cpu.backward(x, g, *args)
        results = [None] * 4

        def call(i):
            results[i] = lrn_cpu.forward(x, *args), lrn_cpu.backward(x, g, *args)
        workers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(threads)
    for got in (four, *results):
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])


def test_fused_lrn_takes_a_gradient_in_any_layout_and_leaves_other_tensors_to_torch_ops():
    from multitower.models import lrn_cpu
    torch.manual_seed(0)
    x = _channels_last(torch.randn(4, 16, 5, 5)).requires_grad_()
    g = torch.randn(4, 16, 5, 5)  # NCHW: the kernel takes a channels_last copy
    (grad,) = torch.autograd.grad(lrn(x, 2, 1.0, 0.5, 0.75), x, g)
    x_nchw = x.detach().contiguous().requires_grad_()
    (expected,) = torch.autograd.grad(lrn(x_nchw, 2, 1.0, 0.5, 0.75), x_nchw, g)
    torch.testing.assert_close(grad, expected)
    assert not lrn_cpu.applies(x.detach().double())
    assert not lrn_cpu.applies(x.detach().contiguous())
    assert not lrn_cpu.applies(_channels_last(torch.randn(4, 16, 1, 1)))  # both layouts at once


def test_lrn_rejects_non_nchw():
    with pytest.raises(UserError, match="NCHW"):
        lrn(torch.randn(3, 4))


# --- truncated normal --------------------------------------------------------------

def test_truncated_normal_statistics():
    torch.manual_seed(0)
    t = tf_ops.truncated_normal_(torch.empty(200_000), stddev=0.05)
    assert t.abs().max() <= 0.1
    # Std of a normal truncated at +-2 sigma: 0.8796 sigma.
    assert t.std().item() == pytest.approx(0.8796 * 0.05, rel=0.01)
    assert abs(t.mean().item()) < 1e-3
