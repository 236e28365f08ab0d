"""The tutorial's summaries as TensorBoard event files, plus metrics.jsonl.

Only rank 0 creates a Summaries object. Event files go to RUN_DIR/events (training)
and evaluation (eval.record, tags eval/...) alike, one run for `tensorboard --logdir RUN_DIR/events`.

Histograms are counted here, with torch ops on the tensor's own device, into exactly the
buckets SummaryWriter.add_histogram would use (TensorBoard's "tensorflow" bins: 0 and
+-1e-12 * 1.1**k up to 1e20), then written with add_histogram_raw. add_histogram itself
copies every value to a float64 numpy array, sorts it in blocks (np.histogram with uneven
bins) and sums its squares with numpy's BLAS, whose own spinning threads then compete
with torch's for the cores: the tutorial's 25 histograms of a cifar10-tf step (8 M
values) took ~1 s on a 2-core CPU. Here a value's bucket comes from its float32 bits in
O(1) (TensorFlowBuckets), about 10 passes over memory for all of them, on torch's threads.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

# The tutorial summarises these layers' outputs (_activation_summary).
ACTIVATION_LAYERS = ("conv1", "conv2", "local3", "local4", "softmax_linear",
                     "block1", "block2", "block3", "head")  # the last four: airbench (fast recipe)
IMAGES_SHOWN = 3  # tf.summary.image's default max_outputs


class TensorFlowBuckets:
    """Counts values into the histogram buckets of `edges` (ascending float64, e.g.
    SummaryWriter.default_bins) as np.histogram(values, bins=edges) does: bucket i holds
    edges[i] <= v < edges[i + 1], the last bucket also v == edges[-1]; values outside
    [edges[0], edges[-1]] and NaN are not counted. Also counts the values equal to 0.

    How: a float32's top 16 bits (sign, exponent, 7 mantissa bits) name a cell of values at
    most 2**-7 = 0.8% wide, narrower than the 10% between these edges, so a cell holds at
    most one threshold. Two 65,536-entry tables give each cell the slot of its lowest value
    and the one threshold inside it: slot = base[cell] + (v >= threshold[cell]), exact for
    every float32. The thresholds are the edges rounded up to float32 (which a float32 value
    passes exactly when it passes the float64 edge), plus 0 and the smallest float32 above
    it, so that the zeros have a slot of their own (the sparsity summary, at no extra pass).
    """

    CELLS = 1 << 16

    def __init__(self, edges):
        edges = np.asarray(edges, dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 2 or not (np.diff(edges) > 0).all():
            raise ValueError("histogram edges must be an ascending list of at least two numbers")
        self.edges = edges
        up = edges.astype(np.float32)
        below = up.astype(np.float64) < edges
        up[below] = np.nextafter(up[below], np.float32(np.inf))
        if up[-1] == edges[-1]:  # the last bucket is closed: only values above the last edge leave it
            up[-1] = np.nextafter(up[-1], np.float32(np.inf))
        # A value's slot is the number of thresholds it reaches: slot 0 is below the range,
        # slot len(thresholds) above it (and NaN). Each slot lies inside one bucket (or
        # outside the range): bucket_slot maps it to 1 + that bucket, or to 0 / len(edges).
        smallest = np.nextafter(np.float32(0), np.float32(1))
        thresholds = np.unique(np.concatenate([up, np.array([0.0, smallest], dtype=np.float32)]))
        self.zero_slot = int(np.searchsorted(thresholds, np.float32(0), side="right"))
        self._bucket_slot = np.concatenate([[0], np.searchsorted(up, thresholds, side="right")])
        top = np.arange(self.CELLS, dtype=np.uint32) << np.uint32(16)
        negative = (top >> np.uint32(31)).astype(bool)
        lowest = np.where(negative, top | np.uint32(0xFFFF), top).view(np.float32)
        highest = np.where(negative, top, top | np.uint32(0xFFFF)).view(np.float32)
        last = len(thresholds) - 1
        with np.errstate(invalid="ignore"):
            base = np.searchsorted(thresholds, lowest, side="right")  # NaN sorts last: the top slot
            inside = np.full(self.CELLS, np.nan, dtype=np.float32)  # no threshold: v >= NaN never holds
            candidate = thresholds[np.minimum(base, last)]
            has = (base <= last) & (candidate <= highest)
            inside[has] = candidate[has]
            second = thresholds[np.minimum(base + 1, last)]
            if (has & (base + 1 <= last) & (second <= highest)).any():
                raise ValueError("histogram edges closer than 1% apart: a cell would hold two")
        self.slots = len(thresholds) + 1
        self._base = torch.from_numpy(base.astype(np.int32))
        self._threshold = torch.from_numpy(inside)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def count(self, values: torch.Tensor) -> tuple[np.ndarray, int]:
        """(int64 [len(edges) - 1]: the count of each bucket, the number of values equal to 0),
        counted on values' device."""
        flat = flat_float32(values)
        tables = self._tables.get(flat.device)
        if tables is None:
            tables = self._tables[flat.device] = (self._base.to(flat.device), self._threshold.to(flat.device),
                                                  torch.ones(1, dtype=torch.int64, device=flat.device))
        base, threshold, one = tables
        # A float32's top 16 bits, as 0..65535.
        cell = torch.bitwise_right_shift(flat.view(torch.int32), 16).bitwise_and_(0xFFFF)
        slot = base.index_select(0, cell)
        slot += flat >= threshold.index_select(0, cell)
        # index_add_ of ones: bincount without its one-thread loop (2.5x less CPU time here).
        per_slot = torch.zeros(self.slots, dtype=torch.int64, device=flat.device)
        per_slot.index_add_(0, slot, one.expand(slot.numel()))
        per_slot = per_slot.cpu().numpy()
        counts = np.bincount(self._bucket_slot, weights=per_slot, minlength=len(self.edges) + 1)
        return counts[1:len(self.edges)].astype(np.int64), int(per_slot[self.zero_slot])


def flat_float32(values: torch.Tensor) -> torch.Tensor:
    """All of values' elements as one float32 vector, in memory order (a view where it can be:
    the order does not matter to a histogram, and a channels_last tensor is dense too)."""
    values = values.detach()
    if values.dtype != torch.float32:
        values = values.float()
    if values.is_contiguous():
        return values.view(-1)
    if values.dim() == 4 and values.is_contiguous(memory_format=torch.channels_last):
        return values.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC order is the memory's
    return values.reshape(-1)


def histogram_fields(values: torch.Tensor, buckets: TensorFlowBuckets) -> tuple[dict, int]:
    """(add_histogram_raw's arguments for `values`, the number of zeros among them). The
    arguments as add_histogram(values, bins=buckets.edges) writes them: the buckets from the
    first to the last non-empty one, with an empty one before (TensorBoard draws the left
    edge from it); min, max and count; the sum and the sum of squares by torch's pairwise
    float32 sums, within ~1e-7 of TensorFlow's float64 ones (histogram.cc) at 5 M values,
    for a quarter of the time of a float64 copy (no TensorBoard dashboard draws them)."""
    flat = flat_float32(values)
    if flat.numel() == 0:
        raise ValueError("a histogram of no values")
    low, high = torch.aminmax(flat)
    small = torch.stack([low, high, flat.sum(), (flat * flat).sum()]).double().tolist()
    counts, zeros = buckets.count(flat)
    limits = buckets.edges
    # As torch.utils.tensorboard.summary.make_histogram: the support, one empty bucket left.
    cum_counts = np.cumsum(np.greater(counts, 0))
    start, end = np.searchsorted(cum_counts, [0, cum_counts[-1] - 1], side="right")
    start, end = int(start), int(end) + 1
    counts = counts[start - 1:end] if start > 0 else np.concatenate([[0], counts[:end]])
    limits = limits[start:end + 1]
    return {"min": small[0], "max": small[1], "num": flat.numel(), "sum": small[2], "sum_squares": small[3],
            "bucket_limits": limits.tolist(), "bucket_counts": counts.tolist()}, zeros


class Summaries:
    def __init__(self, run_dir: str | Path, subdir: str = "events"):
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir / subdir))
        self.buckets = TensorFlowBuckets(self.writer.default_bins)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> int:
        """Writes what writer.add_histogram(tag, values, step) would (see histogram_fields);
        returns the number of values equal to 0."""
        fields, zeros = histogram_fields(values, self.buckets)
        self.writer.add_histogram_raw(tag, global_step=step, **fields)
        return zeros

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def throughput(self, record: dict) -> None:
        """A log step's speed and where the time went, as scalars (metrics.jsonl has them all)."""
        self.scalars({f"throughput/{key}": record[key] for key in
                      ("examples_per_sec", "sec_per_batch", "comm_fraction", "data_wait_fraction")}, record["step"])

    def hparams(self, settings: dict, final_loss: float) -> None:
        """The run's settings and results for TensorBoard's HParams view (comparing runs):
        its final loss now; eval writes hparam/precision_at_1 as it evaluates (eval.record)."""
        # In this run's own directory (torch names a new sub-run by the clock otherwise).
        self.writer.add_hparams(settings, {"hparam/final_loss": final_loss, "hparam/precision_at_1": float("nan")},
                                run_name=".")

    def append_jsonl(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def training_summaries(self, step: int, model: nn.Module, activations: dict[str, torch.Tensor],
                           images: torch.Tensor) -> None:
        """Histograms and sparsity of activations, weights, gradients; a few input images."""
        for name, act in activations.items():
            zeros = self.histogram(f"{name}/activations", act, step)
            self.writer.add_scalar(f"{name}/sparsity", zeros / act.numel(), step)
        for name, p in model.named_parameters():
            tag = name.replace(".", "/")
            self.histogram(tag, p, step)
            if p.grad is not None:
                self.histogram(f"{tag}/gradients", p.grad, step)
        shown = images[:IMAGES_SHOWN].detach().float().cpu()
        # Standardised images have zero mean; rescale each to [0, 1] to display it.
        lo = shown.amin(dim=(1, 2, 3), keepdim=True)
        hi = shown.amax(dim=(1, 2, 3), keepdim=True)
        self.writer.add_images("images", (shown - lo) / (hi - lo).clamp_min(1e-6), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def capture_activations(model: nn.Module, layers=ACTIVATION_LAYERS) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named children during the forward passes inside the block;
    a child with a summary_activation(output) records that instead (cifar10-tf's convs,
    whose ReLU runs in the next layer)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def record(child: nn.Module, _inputs, output: torch.Tensor, name: str) -> None:
        activation = getattr(child, "summary_activation", None)
        captured[name] = (activation(output) if activation is not None else output).detach()
    for name, child in model.named_children():
        if name in layers:
            handles.append(child.register_forward_hook(functools.partial(record, name=name)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
