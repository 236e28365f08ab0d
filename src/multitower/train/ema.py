"""Moving averages: TensorFlow's ExponentialMovingAverage of the weights (used for
evaluation) and the 0.9 average of the losses shown in logs."""

from __future__ import annotations

import torch
from torch import nn


def tf_ema_decay(decay: float, num_updates: int) -> float:
    """TF's num_updates rule: min(decay, (1 + n) / (10 + n)). Early in training the
    average follows the weights quickly (n=1: 0.18) instead of staying near the init."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def averaged_tensors(model: nn.Module):
    """(name, tensor) of what the average covers: the trainable parameters, and the
    floating-point buffers (batch norm's running mean and variance, as timm's ModelEmaV2 and
    torch's AveragedModel(use_buffers=True) do; constant buffers such as a frozen whitening
    layer stay equal to themselves). Integer buffers (num_batches_tracked) are not averaged.
    cifar10-tf has no buffers: its average is over its parameters alone, as the tutorial's."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p
    for name, b in model.named_buffers():
        if b.is_floating_point():
            yield name, b


class ExponentialMovingAverage:
    """Shadow copies of a model's trainable parameters (and floating-point buffers), updated
    after every step.

    shadow -= (1 - d) * (shadow - param), with d from tf_ema_decay(decay, global_step)
    where global_step already counts the update just applied (as in the tutorial, whose
    averaging op runs after apply_gradients has incremented global_step).
    The shadow keys are state_dict keys, so eval loads them over a checkpoint's "model".
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {name: t.detach().clone() for name, t in averaged_tensors(model)}

    @torch.no_grad()
    def update(self, model: nn.Module, global_step: int) -> None:
        weight = 1.0 - tf_ema_decay(self.decay, global_step)
        for name, t in averaged_tensors(model):
            if name in self.shadow:
                self.shadow[name].lerp_(t.detach(), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights (and buffers) into `model` (the evaluation model)."""
        for name, t in averaged_tensors(model):
            if name in self.shadow:
                t.copy_(self.shadow[name])

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
