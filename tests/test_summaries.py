"""The summaries' histograms: the buckets, counts and statistics that SummaryWriter.add_histogram
writes, counted with torch ops (train/summaries.py), for every kind of float32 value."""

import math

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import make_histogram

from multitower.train.summaries import TensorFlowBuckets, flat_float32, histogram_fields


@pytest.fixture(scope="module")
def edges(tmp_path_factory) -> list[float]:
    """The buckets add_histogram uses by default (bins="tensorflow")."""
    writer = SummaryWriter(log_dir=str(tmp_path_factory.mktemp("events")))
    writer.close()
    return writer.default_bins


def edge_values(edges) -> torch.Tensor:
    """Every edge as float32, with its float32 neighbours: where rounding could go wrong."""
    e = torch.tensor(edges, dtype=torch.float64).float()
    return torch.cat([e, torch.nextafter(e, torch.full_like(e, math.inf)), torch.nextafter(e, torch.full_like(e, -math.inf))])


def assorted_values(edges) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "normal": torch.randn(100_000, generator=g),
        "tiny and huge": torch.randn(50_000, generator=g) * torch.logspace(-30, 30, 50_000, dtype=torch.float64).float(),
        "relu with zeros and -0.0": torch.cat([torch.relu(torch.randn(10_000, generator=g)), torch.full((100,), -0.0)]),
        "subnormals": torch.tensor([1e-45, -1e-45, 1e-40, -1e-40, 1e-39]),
        "at the edges": edge_values(edges),
        "beyond the range": torch.tensor([3e20, -3e20, 1e30, -1e38, 3.4e38, 0.5]),
        "constant": torch.full((1000,), 0.25),
    }


def test_counts_equal_numpy_histogram_for_every_kind_of_value(edges):
    buckets = TensorFlowBuckets(edges)
    for name, values in assorted_values(edges).items():
        expected, _ = np.histogram(values.double().numpy(), bins=np.asarray(edges))
        got, zeros = buckets.count(values)
        assert (got == expected).all(), f"{name}: {np.flatnonzero(got != expected)[:5]}"
        assert zeros == (values == 0).sum().item(), name


def test_infinities_and_nan_are_not_counted(edges):
    buckets = TensorFlowBuckets(edges)
    values = torch.tensor([math.inf, -math.inf, math.nan, 1.0])
    counts, zeros = buckets.count(values)
    assert counts.sum() == 1 and counts[np.searchsorted(edges, 1.0, side="right") - 1] == 1 and zeros == 0


def test_fields_equal_add_histogram_of_activation_shaped_tensors(edges):
    g = torch.Generator().manual_seed(1)
    buckets = TensorFlowBuckets(edges)
    cases = {
        "channels_last activations": torch.relu(torch.randn(8, 16, 6, 6, generator=g)).contiguous(
            memory_format=torch.channels_last),
        "weights": torch.randn(64, 3, 5, 5, generator=g) * 0.05,
        "bfloat16 logits": torch.randn(32, 10, generator=g).bfloat16(),
        "a transposed view": torch.randn(30, 20, generator=g).t(),
    }
    for name, values in cases.items():
        proto = make_histogram(values.detach().float().numpy().astype(float), edges)
        fields, zeros = histogram_fields(values, buckets)
        assert zeros == (values == 0).sum().item(), name
        assert fields["bucket_limits"] == list(proto.bucket_limit), name
        assert fields["bucket_counts"] == list(proto.bucket), name
        assert (fields["min"], fields["max"], fields["num"]) == (proto.min, proto.max, proto.num), name
        # float32 pairwise sums against float64 ones (histogram_fields says why)
        assert fields["sum"] == pytest.approx(proto.sum, rel=1e-6, abs=1e-6), name
        assert fields["sum_squares"] == pytest.approx(proto.sum_squares, rel=1e-6), name


def test_flat_values_are_views_where_the_memory_is_dense():
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert flat_float32(x).data_ptr() == x.data_ptr()
    assert sorted(flat_float32(x).tolist()) == sorted(x.flatten().tolist())


def test_edges_too_close_together_are_refused():
    with pytest.raises(ValueError, match="closer than 1%"):
        TensorFlowBuckets([1.0005, 1.001, 2.0])  # both inside the float32 cell [1, 1 + 2**-7)


@pytest.mark.parametrize("channels_last", [False, True])
def test_activation_summaries_record_the_tutorials_relu_conv_outputs(channels_last):
    # cifar10-tf's convs leave their ReLU to the next LRN (ConvBeforeReLU); the summaries
    # must still see the tutorial's conv1 and conv2, relu(conv2d + biases): its
    # histograms and sparsity (the zeros) are of those tensors.
    from multitower.models import Cifar10TF
    from multitower.train.summaries import capture_activations
    torch.manual_seed(0)
    model = Cifar10TF()
    images = torch.randn(4, 3, 24, 24) * 2
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    norm1 = {}
    model.norm1.register_forward_hook(lambda _m, _i, out: norm1.setdefault("out", out))
    with torch.no_grad(), capture_activations(model) as activations:
        model(images)
        conv1 = torch.relu(model.conv1(images))
        conv2 = torch.relu(model.conv2(norm1["out"]))
    assert set(activations) == {"conv1", "conv2", "local3", "local4", "softmax_linear"}
    assert torch.equal(activations["conv1"], conv1) and torch.equal(activations["conv2"], conv2)
    for name in ("conv1", "conv2"):
        assert (activations[name] == 0).any() and (activations[name] > 0).any()
