"""One worker, one device: the tutorial's single-tower training (cifar10_train.py)."""

from __future__ import annotations

from torch import nn

from multitower.data.loader import Batch
from multitower.parallel.base import StepMetrics, Strategy


class Single(Strategy):
    name = "single"
    joins_group = False

    def wrap(self, model: nn.Module, optimizer) -> None:
        self.model, self.optimizer = self.fast.prepare_model(model), optimizer

    def step(self, batch: Batch) -> StepMetrics:
        self.optimizer.zero_grad(set_to_none=True)
        with self.fast.autocast():
            logits = self.model(self.fast.images(batch.images))
            loss, cross_entropy = self.loss_fn(self.model, logits, batch.labels)
        self.fast.backward(loss)
        self.fast.step(self.optimizer)
        return StepMetrics(loss=loss.detach(), cross_entropy=cross_entropy.detach(),
                           examples=batch.labels.shape[0])
