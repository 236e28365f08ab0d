"""Moving averages: TensorFlow's ExponentialMovingAverage of the weights (used for
evaluation) and the 0.9 average of the losses shown in logs."""

from __future__ import annotations

import torch
from torch import nn


def tf_ema_decay(decay: float, num_updates: int) -> float:
    """TF's num_updates rule: min(decay, (1 + n) / (10 + n)). Early in training the
    average follows the weights quickly (n=1: 0.18) instead of staying near the init."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class ExponentialMovingAverage:
    """Shadow copies of a model's trainable parameters, updated after every step.

    shadow -= (1 - d) * (shadow - param), with d from tf_ema_decay(decay, global_step)
    where global_step already counts the update just applied (as in the tutorial, whose
    averaging op runs after apply_gradients has incremented global_step).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module, global_step: int) -> None:
        weight = 1.0 - tf_ema_decay(self.decay, global_step)
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (the evaluation model)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"moving-average state lacks {sorted(missing)}")
        for name, tensor in state.items():
            if name in self.shadow:
                self.shadow[name].copy_(tensor)


class LossAverage:
    """tf.train.ExponentialMovingAverage(0.9) of scalar losses, for display only."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.value: float | None = None

    def update(self, loss: float) -> float:
        # TF's shadow variable starts at the first value it sees.
        self.value = loss if self.value is None else self.decay * self.value + (1 - self.decay) * loss
        return self.value
