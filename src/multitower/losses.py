"""A training loss as the strategies call it, split so that model parallelism can apply it.

loss(model, logits, labels) -> (total, cross_entropy): `total` is what backward runs on,
`cross_entropy` what the logs show. A Loss is two terms: `data`, of one batch's logits
(a mean over its examples, so that micro-batches average to the batch's), and optionally
`parameters`, of the model's own weights (the tutorial's weight decay). A pipeline stage
sees only its own layers: the last stage applies the data term to each micro-batch, and
every stage adds the parameter term of the layers it holds (parallel/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy, in float32 whatever the logits' precision (autocast)."""
    return F.cross_entropy(logits.float(), labels.long())


@dataclass(frozen=True)
class Loss:
    data: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    """(logits, labels) -> the batch's mean loss, or (loss, cross-entropy to log)."""
    parameters: Callable[[nn.Module], torch.Tensor] | None = None
    """model -> a term of its weights (e.g. weight decay), over the layers it holds."""

    def data_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, cross-entropy) of the data term alone; the cross-entropy is detached."""
        out = self.data(logits, labels)
        if isinstance(out, tuple):
            return out[0], out[1].detach()
        return out, out.detach()

    def __call__(self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor):
        loss, logged = self.data_terms(logits, labels)
        if self.parameters is not None:
            loss = loss + self.parameters(model)
        return loss, logged


def as_loss(loss) -> Loss:
    """A user's loss as a Loss: a Loss, or a (logits, labels) -> loss callable such as
    torch.nn.functional.cross_entropy or an nn.Module like nn.CrossEntropyLoss()."""
    if isinstance(loss, Loss):
        return loss
    if not callable(loss):
        raise TypeError(f"loss must be a multitower.Loss or a callable (logits, labels) -> loss, got {loss!r}")
    return Loss(data=loss)
