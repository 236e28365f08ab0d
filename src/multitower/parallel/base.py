"""The interface every parallel strategy implements; the training loop knows only this.

A strategy owns "how the workers cooperate": it wraps (model, optimizer) once per
process, then each step() does forward, backward, communication and update for its
shard of the global batch. The loop never branches on a strategy's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from multitower.data.loader import Batch

# loss_fn(model, logits, labels) -> (total_loss, cross_entropy); see models.cifar10_tf.tower_loss.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepMetrics:
    """What one step reports. Losses stay tensors so that no host sync happens unless logged."""
    loss: torch.Tensor           # total loss (cross-entropy + weight decay) of this worker's shard
    cross_entropy: torch.Tensor
    examples: int                # examples processed by all workers in this step
    comm_s: float = 0.0          # seconds this worker spent waiting on communication
    # Other scalars this step measured (e.g. downpour's "staleness"); the loop writes each
    # key's mean over the log window's steps that reported it into metrics.jsonl.
    extra: dict[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def step(self, batch: Batch) -> StepMetrics: ...
    def all_ranks(self, value: float) -> list[float]: ...  # every rank's value; a collective
    def state_dict(self) -> dict: ...          # called on every rank; same format at any world size; rank 0 writes it
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...

    @property
    def is_rank0(self) -> bool: ...

    # Optional: a process with a role other than training (downpour's parameter servers)
    # has `trains = False`; train() then calls its `serve()`, which returns when the job
    # is done, and skips the training loop. Strategies without the attribute train.
