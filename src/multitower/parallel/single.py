"""One worker, one device: the tutorial's single-tower training (cifar10_train.py)."""

from __future__ import annotations

import torch
from torch import nn

from multitower.config import ParallelConfig
from multitower.data.loader import Batch
from multitower.parallel.base import LossFn, StepMetrics
from multitower.parallel.precision import FastPath


class Single:
    rank = 0
    world_size = 1
    is_rank0 = True

    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        self.device = device
        self.loss_fn = loss_fn
        self.fast = FastPath.from_config(cfg, device)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = self.fast.prepare_model(model), optimizer

    def step(self, batch: Batch) -> StepMetrics:
        self.optimizer.zero_grad(set_to_none=True)
        with self.fast.autocast():
            logits = self.model(self.fast.images(batch.images))
            loss, cross_entropy = self.loss_fn(self.model, logits, batch.labels)
        loss.backward()
        self.optimizer.step()
        return StepMetrics(loss=loss.detach(), cross_entropy=cross_entropy.detach(),
                           examples=batch.labels.shape[0])

    def all_ranks(self, value: float) -> list[float]:
        return [value]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        pass
