"""Cifar10TF is the tutorial's network: same logits as an independent NHWC numpy
implementation fed TF-layout weights, same init, same loss, and stages made by
deleting children compose back to the whole."""

import math

import numpy as np
import pytest
import torch

from multitower.errors import UserError
from multitower.models import MODELS, Cifar10TF, build_model
from multitower.models.cifar10_tf import (
    LAYER_NAMES,
    load_tensorflow_weights,
    loss,
    tensorflow_weight_names,
    tensorflow_weights,
    tower_loss,
    weight_decay_loss,
)

# --- an independent numpy NHWC implementation of cifar10.inference ------------------


def _tf_pads(size, k, s):
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def np_conv_same(x, w, b):
    """tf.nn.conv2d(x, w, [1,1,1,1], 'SAME') + b; x NHWC, w HWIO."""
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    _, t, bt = _tf_pads(h, kh, 1)
    _, l, r = _tf_pads(wd, kw, 1)
    xp = np.pad(x, ((0, 0), (t, bt), (l, r), (0, 0)))
    out = np.zeros((n, h, wd, o))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", xp[:, i : i + h, j : j + wd], w[i, j])
    return out + b


def np_max_pool_same(x, k=3, s=2):
    n, h, w, c = x.shape
    oh, t, bt = _tf_pads(h, k, s)
    ow, l, r = _tf_pads(w, k, s)
    xp = np.pad(x, ((0, 0), (t, bt), (l, r), (0, 0)), constant_values=-np.inf)
    out = np.empty((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = xp[:, i * s : i * s + k, j * s : j * s + k].max(axis=(1, 2))
    return out


def np_lrn(x, r=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75):
    c_total = x.shape[-1]
    out = np.empty_like(x)
    for c in range(c_total):
        sqr_sum = (x[..., max(c - r, 0) : min(c + r, c_total - 1) + 1] ** 2).sum(-1)
        out[..., c] = x[..., c] / (bias + alpha * sqr_sum) ** beta
    return out


def np_inference(images_nhwc, v, lrn=np_lrn):
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    h = relu(np_conv_same(images_nhwc, v["conv1/weights"], v["conv1/biases"]))
    h = lrn(np_max_pool_same(h))
    h = relu(np_conv_same(h, v["conv2/weights"], v["conv2/biases"]))
    h = np_max_pool_same(lrn(h))
    h = h.reshape(h.shape[0], -1)  # NHWC flatten, as TF's tf.reshape
    h = relu(h @ v["local3/weights"] + v["local3/biases"])
    h = relu(h @ v["local4/weights"] + v["local4/biases"])
    return h @ v["softmax_linear/weights"] + v["softmax_linear/biases"]


def tf_arrays(rng, num_classes=10, c=64, d3=384, d4=192, side=6):
    """Weights made as TF would hold them (HWIO, [in, out]); scaled so that every
    layer, LRN included, changes the result noticeably."""
    shapes = {
        "conv1": ((5, 5, 3, c), 0.2),
        "conv2": ((5, 5, c, c), 0.05),
        "local3": ((side * side * c, d3), 1 / math.sqrt(side * side * c)),
        "local4": ((d3, d4), 1 / math.sqrt(d3)),
        "softmax_linear": ((d4, num_classes), 1 / math.sqrt(d4)),
    }
    out = {}
    for name, (shape, std) in shapes.items():
        out[f"{name}/weights"] = (rng.standard_normal(shape) * std).astype(np.float32)
        out[f"{name}/biases"] = (rng.standard_normal(shape[-1]) * 0.1).astype(np.float32)
    return out


def test_logits_equal_tensorflows():
    rng = np.random.default_rng(0)
    arrays = tf_arrays(rng)
    images = (rng.standard_normal((3, 24, 24, 3)) * 3).astype(np.float32)  # NHWC, as TF
    expected = np_inference(images.astype(np.float64), {k: v.astype(np.float64) for k, v in arrays.items()})

    model = Cifar10TF()
    loaded = load_tensorflow_weights(model, arrays)
    assert sorted(loaded) == sorted(arrays)
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert logits.shape == (3, 10)
    assert np.abs(expected).max() > 0.5  # a meaningful scale for the tolerances
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-5)


def _tutorial_order(model, x):
    """cifar10.inference in the tutorial's own order, ReLUs right after the convs,
    from the model's own layers: the reference for the model's moved ReLUs."""
    from multitower.models.tf_ops import lrn
    h = torch.relu(model.conv1(x))
    h = lrn(model.pool1(h), 4, 1.0, 0.001 / 9.0, 0.75)
    h = model.pool2(lrn(torch.relu(model.conv2(h)), 4, 1.0, 0.001 / 9.0, 0.75))
    return model.softmax_linear(model.local4(model.local3(h)))


def test_the_moved_relus_compute_the_tutorials_network():
    # conv1's ReLU runs after pool1, and both ReLUs inside the LRNs (ConvBeforeReLU). In
    # float64 the whole network and its gradients agree with the tutorial's order to
    # rounding: MKL's products are not bitwise reproducible across buffers (their results
    # depend on alignment), so the exact checks are on the layers below.
    torch.manual_seed(0)
    model = Cifar10TF().double()
    images = torch.randn(8, 3, 24, 24, dtype=torch.float64) * 2

    def logits_and_grads(forward):
        model.zero_grad()
        logits = forward(images)
        logits.square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]
    ours, ours_grads = logits_and_grads(model)
    reference, reference_grads = logits_and_grads(lambda x: _tutorial_order(model, x))
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-10)
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_after_the_pool_and_inside_the_lrn_changes_no_bit(channels_last):
    # The two moves, on one conv1 output: max-pool commutes with ReLU bit for bit, values
    # and gradients; and LRN(relu=True) is the LRN of relu(x), bit for bit in the fused
    # CPU kernels (float32 channels_last), to rounding in torch ops (float64 NCHW).
    from multitower.models.tf_ops import LRN, lrn
    torch.manual_seed(0)
    dtype = torch.float32 if channels_last else torch.float64
    conv = torch.randn(4, 64, 24, 24, dtype=dtype)
    if channels_last:
        conv = conv.contiguous(memory_format=torch.channels_last)
    model = Cifar10TF().to(dtype)
    g = torch.randn(4, 64, 12, 12, dtype=dtype)

    def value_and_grad(f, x):
        x = x.detach().requires_grad_()
        out = f(x)
        (grad,) = torch.autograd.grad(out, x, g)
        return out.detach(), grad
    pooled_relu = value_and_grad(lambda x: model.pool1(torch.relu(x)), conv)
    relu_pooled = value_and_grad(lambda x: torch.relu(model.pool1(x)), conv)
    assert torch.equal(pooled_relu[0], relu_pooled[0]) and torch.equal(pooled_relu[1], relu_pooled[1])
    assert (pooled_relu[1] == 0).any() and (pooled_relu[1] != 0).any()
    pooled = model.pool1(conv)
    if channels_last:
        from multitower.models import lrn_cpu, tf_ops
        assert tf_ops._fused_kernels(pooled) is lrn_cpu
    norm = LRN(4, 1.0, 0.001 / 9.0, 0.75, relu=True)
    folded = value_and_grad(norm, pooled)
    apart = value_and_grad(lambda x: lrn(torch.relu(x), 4, 1.0, 0.001 / 9.0, 0.75), pooled)
    if channels_last:
        assert torch.equal(folded[0], apart[0]) and torch.equal(folded[1], apart[1])
    else:  # torch ops: the same calls, but MKL's window-sum product may round by alignment
        torch.testing.assert_close(folded, apart, rtol=1e-12, atol=1e-12)


def test_lrn_matters_at_the_test_scale():
    # Guards the previous test: with nn.LocalResponseNorm's alpha/size the logits move.
    rng = np.random.default_rng(0)
    arrays = tf_arrays(rng)
    images = (rng.standard_normal((3, 24, 24, 3)) * 3).astype(np.float64)
    v = {k: a.astype(np.float64) for k, a in arrays.items()}
    a = np_inference(images, v)
    b = np_inference(images, v, lrn=lambda x: np_lrn(x, alpha=0.001 / 81.0))
    assert not np.allclose(a, b, rtol=1e-4, atol=1e-5)


# --- init ---------------------------------------------------------------------------

EXPECTED_INIT = {
    # layer: (weight shape, stddev, bias constant)
    "conv1": ((64, 3, 5, 5), 5e-2, 0.0),
    "conv2": ((64, 64, 5, 5), 5e-2, 0.1),
    "local3": ((384, 2304), 0.04, 0.1),
    "local4": ((192, 384), 0.04, 0.1),
    "softmax_linear": ((10, 192), 1 / 192.0, 0.0),
}


def test_init_matches_the_tutorial():
    torch.manual_seed(0)
    model = Cifar10TF()
    for name, (shape, std, bias) in EXPECTED_INIT.items():
        layer = getattr(model, name)
        assert tuple(layer.weight.shape) == shape
        w = layer.weight.detach()
        assert w.abs().max().item() <= 2 * std + 1e-7, name
        assert w.std().item() == pytest.approx(0.8796 * std, rel=0.05), name
        assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, bias)), name


def test_parameter_counts():
    model = Cifar10TF()
    per_layer = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in EXPECTED_INIT}
    assert per_layer == {
        "conv1": 4_864,
        "conv2": 102_464,
        "local3": 885_120,
        "local4": 73_920,
        "softmax_linear": 1_930,
    }
    assert sum(p.numel() for p in model.parameters()) == 1_068_298
    assert [name for name, _ in model.named_children()] == list(LAYER_NAMES)


def test_width_scales_channels_and_local_sizes():
    model = Cifar10TF(num_classes=7, width=2)
    assert model.conv1.weight.shape == (128, 3, 5, 5)
    assert model.conv2.weight.shape == (128, 128, 5, 5)
    assert model.local3.weight.shape == (768, 6 * 6 * 128)
    assert model.local4.weight.shape == (384, 768)
    assert model.softmax_linear.weight.shape == (7, 384)
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 7)


def test_init_is_deterministic_under_manual_seed():
    torch.manual_seed(3)
    a = Cifar10TF().state_dict()
    torch.manual_seed(3)
    b = Cifar10TF().state_dict()
    torch.manual_seed(4)
    c = Cifar10TF().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


# --- loss ---------------------------------------------------------------------------


def test_tower_loss_is_cross_entropy_plus_weight_decay():
    torch.manual_seed(0)
    model = Cifar10TF()
    images, labels = torch.randn(6, 3, 24, 24), torch.tensor([0, 1, 2, 3, 9, 9])
    logits = model(images)
    total, ce = tower_loss(model, logits, labels)

    log_probs = logits.double().log_softmax(1)
    expected_ce = -log_probs[torch.arange(6), labels].mean()
    w3, w4 = model.local3.weight.double(), model.local4.weight.double()
    expected_wd = 0.004 * (w3.pow(2).sum() + w4.pow(2).sum()) / 2  # 0.004 * tf.nn.l2_loss
    assert ce.item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert weight_decay_loss(model).item() == pytest.approx(expected_wd.item(), rel=1e-5)
    assert total.item() == pytest.approx((expected_ce + expected_wd).item(), rel=1e-5)
    assert loss(model, logits, labels).item() == pytest.approx(total.item(), rel=1e-6)
    # The tutorial logs "step 0, loss = 4.68": ln(10) + 0.004/2 * (0.88*0.04)^2 * 958k
    # decayed weights = 2.30 + 2.37.
    assert 4.6 < total.item() < 4.75


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = Cifar10TF()
    total, _ = tower_loss(model, model(torch.randn(4, 3, 24, 24)), torch.tensor([1, 2, 3, 4]))
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_weight_decay_of_a_stage_without_local_layers_is_zero():
    model = Cifar10TF()
    for name in ("local3", "local4", "softmax_linear"):
        delattr(model, name)
    assert weight_decay_loss(model).item() == 0.0


# --- pipeline stages by deleting children -------------------------------------------


def test_deleting_children_makes_stages():
    torch.manual_seed(0)
    full = Cifar10TF()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        logits = full(x)
        activations = [x]
        for child in full.children():
            activations.append(child(activations[-1]))
        torch.testing.assert_close(activations[-1], logits, rtol=0, atol=0)
        for k in range(len(LAYER_NAMES)):
            tail = Cifar10TF()
            tail.load_state_dict(full.state_dict())
            head = Cifar10TF()
            head.load_state_dict(full.state_dict())
            for name in LAYER_NAMES[:k]:
                delattr(tail, name)
            for name in LAYER_NAMES[k:]:
                delattr(head, name)
            torch.testing.assert_close(head(x), activations[k], rtol=0, atol=0)
            torch.testing.assert_close(tail(activations[k]), logits, rtol=0, atol=0)
            torch.testing.assert_close(tail(head(x)), logits, rtol=0, atol=0)


# --- TF weights: layouts and errors ------------------------------------------------


def test_tensorflow_weights_round_trip():
    torch.manual_seed(0)
    model = Cifar10TF()
    arrays = tensorflow_weights(model)
    assert arrays["conv1/weights"].shape == (5, 5, 3, 64)
    assert arrays["local3/weights"].shape == (2304, 384)
    assert arrays["softmax_linear/weights"].shape == (192, 10)
    assert sorted(tensorflow_weight_names(model).values()) == sorted(arrays)
    other = Cifar10TF()
    load_tensorflow_weights(other, {**arrays, "global_step": np.array(5)})  # extras ignored
    for key, tf_name in tensorflow_weight_names(model).items():
        assert torch.equal(other.state_dict()[key], model.state_dict()[key]), tf_name


def test_load_moving_averages():
    rng = np.random.default_rng(1)
    arrays = tf_arrays(rng)
    shadows = {f"{k}/ExponentialMovingAverage": v * 2 for k, v in arrays.items()}
    model = Cifar10TF()
    load_tensorflow_weights(model, {**arrays, **shadows}, moving_averages=True)
    np.testing.assert_array_equal(tensorflow_weights(model)["local4/weights"], arrays["local4/weights"] * 2)


def test_shape_mismatch_names_the_variable_and_both_shapes():
    model = Cifar10TF()
    arrays = tensorflow_weights(model)
    before = model.conv1.weight.detach().clone()
    arrays["conv1/weights"] = arrays["conv1/weights"] + 1
    arrays["softmax_linear/weights"] = np.zeros((192, 100), np.float32)
    with pytest.raises(UserError, match=r"softmax_linear/weights has shape \[192, 100\].*\[192, 10\]"):
        load_tensorflow_weights(model, arrays)
    assert torch.equal(model.conv1.weight, before)  # nothing copied on error


def test_missing_variable_is_a_user_error():
    arrays = tensorflow_weights(Cifar10TF())
    del arrays["local4/biases"]
    with pytest.raises(UserError, match="local4/biases"):
        load_tensorflow_weights(Cifar10TF(), arrays)


def test_stage_loads_only_its_layers():
    arrays = tensorflow_weights(Cifar10TF())
    stage = Cifar10TF()
    for name in LAYER_NAMES[:6]:
        delattr(stage, name)
    loaded = load_tensorflow_weights(stage, {k: v for k, v in arrays.items() if not k.startswith("conv")})
    assert sorted(loaded) == sorted(k for k in arrays if not k.startswith("conv"))


# --- registry and user errors --------------------------------------------------------


def test_registry():
    assert MODELS["cifar10-tf"] is Cifar10TF
    model = build_model("cifar10-tf", num_classes=100, width=1)
    assert model.softmax_linear.weight.shape == (100, 192)
    with pytest.raises(UserError, match="unknown model 'resnet'.*cifar10-tf"):
        build_model("resnet")


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"num_classes": 0}, {"width": 1.5}, {"image_size": -1}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(UserError):
        Cifar10TF(**kwargs)


def test_wrong_image_size_is_a_user_error():
    with pytest.raises(UserError, match="24x24"):
        Cifar10TF()(torch.randn(1, 3, 32, 32))
    assert Cifar10TF(image_size=32)(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# --- mixed precision ------------------------------------------------------------------


def test_bf16_autocast_forward_is_close_to_fp32():
    torch.manual_seed(0)
    model = Cifar10TF()
    load_tensorflow_weights(model, tf_arrays(np.random.default_rng(0)))
    x = torch.randn(4, 3, 24, 24) * 3
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05
    total, _ = tower_loss(model, low, torch.zeros(4, dtype=torch.long))
    assert total.dtype == torch.float32
