"""Lookahead (Zhang et al., 2019) as airbench94 schedules it: every `every` steps from epoch
`start_epoch` on, a slow copy of the weights moves towards the trained ("fast") weights,

    slow <- rho * slow + (1 - rho) * fast,   rho = decay_base**every * (step / total)**decay_power,

and the fast weights restart from it (fast <- slow); at the end of every epoch, and of the
run, fast <- slow again. rho grows from 0 to decay_base**every (0.77) over the run: the
average follows the weights closely early and smooths them strongly at the end, and the
final weights are the slow ones. It covers what the moving average covers (train/ema.py:
trainable parameters and batch-norm statistics).

Unlike the evaluation-only moving average, this changes training: the optimizer's momentum
carries on from the restarted weights. Under strategies that keep one copy of the weights
per process (single, sync, local-sgd), each process applies it to its own copy (identical
under sync, like each worker's momentum under local-sgd); under hogwild, whose processes
share the parameters, rank 0 alone applies it to the shared ones (train/loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from multitower.train.ema import averaged_tensors


@dataclass(frozen=True)
class LookaheadSchedule:
    """airbench94's: every 5 steps from epoch 3, decay 0.95**5 x (step / total)**3."""

    every: int = 5
    start_epoch: int = 3
    decay_base: float = 0.95
    decay_power: float = 3.0

    def decay(self, step: int, total_steps: int) -> float:
        return self.decay_base ** self.every * (step / total_steps) ** self.decay_power


class Lookahead:
    def __init__(self, schedule: LookaheadSchedule, total_steps: int, steps_per_epoch: int):
        self.schedule, self.total_steps, self.steps_per_epoch = schedule, total_steps, max(1, steps_per_epoch)
        self.slow: dict[str, torch.Tensor] | None = None  # taken at the first sync step

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every update; `step` counts the updates made, this one included."""
        epoch = (step - 1) // self.steps_per_epoch  # the epoch this update belongs to
        s = self.schedule
        if epoch >= s.start_epoch and step % s.every == 0:
            if self.slow is None:
                self.slow = {name: t.detach().clone() for name, t in averaged_tensors(model)}
            else:
                weight = 1.0 - s.decay(step, self.total_steps)
                for name, t in averaged_tensors(model):
                    self.slow[name].lerp_(t, weight)
                    t.copy_(self.slow[name])
        if self.slow is not None and (step % self.steps_per_epoch == 0 or step >= self.total_steps):
            for name, t in averaged_tensors(model):
                t.copy_(self.slow[name])

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return None if self.slow is None else dict(self.slow)

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        self.slow = None if state is None else {name: t.clone() for name, t in state.items()}
