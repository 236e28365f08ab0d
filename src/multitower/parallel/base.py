"""The interface every parallel strategy implements; the training loop knows only this.

A strategy owns "how the workers cooperate": it wraps (model, optimizer) once per
process, then each step() does forward, backward, communication and update for its
shard of the global batch. The loop never branches on a strategy's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from multitower.data.loader import Batch
from multitower.parallel.precision import FastPath
from multitower.parallel.process_group import gather_floats, init_process_group

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


class Strategy:
    """The interface, and what most strategies share (a subclass overrides what differs).

    A strategy is built once per process from (ParallelConfig, device, loss_fn). When it
    runs several processes (`joins_group`), it joins their process group first; then
    `rank`/`world_size` say which shard of every global batch this process trains on.
    """

    name = "single"
    joins_group = True
    refuses: dict[str, str] = {}
    """Fast-path flags this strategy cannot apply -> why; config.validate refuses them in one
    line, and --channels-last's automatic default stays off."""
    shares_parameters = False
    """True where the processes train one set of weights in shared memory (hogwild): what
    changes the weights outside the optimizer (Lookahead) then runs on rank 0 alone."""
    trains = True
    """False for a process with another role (downpour's parameter servers): train() then
    calls its `serve()`, which returns when the job is done, and skips the training loop."""

    def __init__(self, cfg, device: torch.device, loss_fn: LossFn):
        if self.joins_group:
            init_process_group(device, cfg.timeout_s, self.name)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.cfg, self.device, self.loss_fn = cfg, device, loss_fn
        self.fast = self.fast_path(cfg, device)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def fast_path(cls, cfg, device: torch.device) -> FastPath:
        """The step's FastPath under this strategy: --channels-last's automatic default stays
        off where the strategy refuses it. Also built before any process starts (preflight)."""
        return FastPath.from_config(cfg, device, "--channels-last" not in cls.refuses)

    @property
    def is_rank0(self) -> bool:
        """The process that logs and writes checkpoints."""
        return self.rank == 0

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Take the (model, optimizer) pair this process trains, once, before any step."""
        raise NotImplementedError

    def step(self, batch: Batch) -> StepMetrics:
        """Forward, backward, communication and update on this process's shard of a batch."""
        raise NotImplementedError

    def all_ranks(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order; a collective (the loop calls it at log steps)."""
        if not self.joins_group:
            return [value]
        return gather_floats(value, self.world_size, self.device)

    def gather_named_tensors(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors keyed by parameter name (e.g. the EMA's) -> those of the whole model, as
        rank 0 should checkpoint them. Called on every rank. Here every rank holds the
        whole model; a strategy whose ranks hold parts of it (pipeline) gathers them."""
        return named

    def replica_states(self, loop_state: dict) -> list[dict] | None:
        """Every rank's own state, gathered on rank 0 for the checkpoint's "replicas", where
        the processes' replicas differ between steps (local-sgd); `loop_state` is what the
        loop keeps per process (moving average, Lookahead). A collective: every rank calls
        it. None (here) where rank 0's state stands for every rank."""
        return None

    def own_replica(self, state: dict) -> dict | None:
        """This rank's entry of a checkpoint's "replicas", if it was written by as many
        processes as there are now; None otherwise (resume from the shared state)."""
        replicas = state.get("replicas")
        if replicas is None or len(replicas) != self.world_size:
            return None
        return replicas[self.rank]

    def state_dict(self) -> dict:
        """Called on every rank (it may be a collective); rank 0 writes it. The same keys
        at any world size, so that eval and a resume with other workers can read it."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **self.fast.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.fast.load_state_dict(state)

    def close(self) -> None:
        if self.joins_group and dist.is_initialized():
            dist.destroy_process_group()
