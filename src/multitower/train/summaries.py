"""The tutorial's summaries as TensorBoard event files, plus metrics.jsonl.

Only rank 0 creates a Summaries object. Event files go to RUN_DIR/events (training)
and evaluation (eval.record, tags eval/...) alike, one run for `tensorboard --logdir RUN_DIR/events`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

# The tutorial summarises these layers' outputs (_activation_summary).
ACTIVATION_LAYERS = ("conv1", "conv2", "local3", "local4", "softmax_linear",
                     "block1", "block2", "block3", "head")  # the last four: airbench (fast recipe)
IMAGES_SHOWN = 3  # tf.summary.image's default max_outputs


class Summaries:
    def __init__(self, run_dir: str | Path, subdir: str = "events"):
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir / subdir))

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
            act = act.detach().float()
            self.writer.add_histogram(f"{name}/activations", act, step)
            self.writer.add_scalar(f"{name}/sparsity", (act == 0).float().mean().item(), step)
        for name, p in model.named_parameters():
            tag = name.replace(".", "/")
            self.writer.add_histogram(tag, p.detach().float(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"{tag}/gradients", p.grad.detach().float(), step)
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
    """Record the outputs of the named children during the forward passes inside the block."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, child in model.named_children():
        if name in layers:
            handles.append(child.register_forward_hook(
                lambda _m, _inp, out, name=name: captured.__setitem__(name, out.detach())))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
