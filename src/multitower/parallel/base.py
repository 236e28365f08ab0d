"""The interface every parallel strategy implements; the training loop knows only this.

A strategy owns "how the workers cooperate". Before any process starts, its class
holds its facts: its Options (settings with defaults and units) and their FLAGS, the
fast-path flags it refuses, how many processes it needs and which role each has, and
check()/preflight() for what it cannot do. In each training process it wraps (model,
optimizer) once, then each step() does forward, backward, communication and update for
its shard of the global batch; checkpoint_state()/load() move its state in and out of
checkpoints in one format at any world size. The loop never branches on a strategy's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from multitower.config import Config, ParallelConfig
from multitower.data.loader import Batch
from multitower.errors import UserError
from multitower.flags import Flag
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


@dataclass
class NoOptions:
    """A strategy without settings of its own."""


class Strategy:
    """The interface, and what most strategies share (a subclass overrides what differs).

    A strategy is built once per training process from (ParallelConfig, device, loss_fn).
    When it runs several processes (`joins_group`), it joins their process group first;
    then `rank`/`world_size` say which shard of every global batch this process trains on.
    """

    name = "single"
    Options: type = NoOptions
    FLAGS: tuple[Flag, ...] = ()
    """The flags of its Options' fields (paths "parallel.options.<field>")."""
    joins_group = True
    refuses: dict[str, str] = {}
    """Fast-path flags this strategy cannot apply -> why; check() refuses them in one line,
    and --channels-last's automatic default stays off."""
    resume_may_change: frozenset[str] = frozenset()
    """Options a --resume may change (they leave the trajectory alone), beyond config's."""
    shares_parameters = False
    """True where the processes train one set of weights in shared memory (hogwild): what
    changes the weights outside the optimizer (Lookahead) then runs on rank 0 alone."""
    ends_in_step = True
    """True where every rank leaves the loop at the same step (a collective each step or
    period), so its teardown waits for no peer's training; False where ranks run apart
    (downpour's graceful rpc shutdown waits for the slowest worker; hogwild)."""

    # -- facts, before any process starts ------------------------------------------------
    @classmethod
    def options_of(cls, cfg: ParallelConfig):
        """This strategy's Options from cfg.options; a setting it does not have is refused
        in one line."""
        known = {f.name for f in dataclasses.fields(cls.Options)}
        foreign = sorted(set(cfg.options) - known)
        if foreign:  # (parallel.strategy_class names the strategies that have it)
            raise UserError(f"--strategy {cls.name} takes no --{foreign[0].replace('_', '-')}; drop the flag")
        return cls.Options(**cfg.options)

    @classmethod
    def check(cls, cfg: Config) -> None:
        """One-line UserError for a setting this strategy cannot run (before any process)."""
        cls.options_of(cfg.parallel)
        used = (("--channels-last", cfg.parallel.channels_last is True),
                (f"--precision {cfg.parallel.precision}", cfg.parallel.precision != "fp32"),
                ("--compile", cfg.parallel.compile != "off"))
        for flag, is_used in used:
            if is_used and flag in cls.refuses:
                raise UserError(f"--strategy {cls.name} cannot take {flag}: it {cls.refuses[flag]}; drop the flag")

    @classmethod
    def processes(cls, cfg: ParallelConfig) -> int:
        """Processes the launcher starts for this strategy (downpour adds its servers)."""
        return cfg.workers

    @classmethod
    def serves(cls, cfg: ParallelConfig, rank: int) -> bool:
        """Whether global rank `rank` serves the others instead of training (downpour's
        parameter servers): decided where processes start, before the training loop."""
        return False

    @classmethod
    def preflight(cls, cfg: Config, model: nn.Module, example: torch.Tensor | None = None) -> str:
        """Checks that need the model (a cut, a shard layout), in every process before it
        trains and in the launcher before any starts; `example`: a few inputs as the model
        sees them. A line for `train --dry-run`, or ""."""
        return ""

    @classmethod
    def fast_path(cls, cfg: ParallelConfig, device: torch.device) -> FastPath:
        """The step's FastPath under this strategy: --channels-last's automatic default stays
        off where the strategy refuses it. Also built before any process starts (preflight)."""
        return FastPath.from_config(cfg, device, "--channels-last" not in cls.refuses)

    # -- in each training process ----------------------------------------------------------
    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        if self.joins_group:
            init_process_group(device, cfg.timeout_s, self.name)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.cfg, self.device, self.loss_fn = cfg, device, loss_fn
        self.options = self.options_of(cfg)
        self.fast = self.fast_path(cfg, device)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def is_rank0(self) -> bool:
        """The process that logs and writes checkpoints."""
        return self.rank == 0

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Take the (model, optimizer) pair this process trains, once, before any step."""
        self.model, self.optimizer = self.fast.prepare_model(model), optimizer

    @property
    def module(self) -> nn.Module:
        """What the forward pass calls: the model, or its DDP wrapper."""
        return self.model

    def step(self, batch: Batch) -> StepMetrics:
        """Forward, backward, communication and update on this process's shard of a batch:
        forward_backward, the optimizer's step, then after_update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, cross_entropy = self.forward_backward(batch.images, batch.labels)
        self.fast.step(self.optimizer)
        comm_s, extra = self.after_update()
        return StepMetrics(loss=loss, cross_entropy=cross_entropy, examples=batch.labels.shape[0] * self.world_size,
                           comm_s=comm_s, extra=extra)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0):
        """The loss of one (micro-)batch through self.module, its gradients accumulated,
        scaled by `weight` (its share of the step's batch); (loss, cross-entropy), detached."""
        with self.fast.autocast():
            loss, cross_entropy = self.loss_fn(self.model, self.module(self.fast.images(images)), labels)
        self.fast.backward(loss * weight if weight != 1.0 else loss)
        return loss.detach(), cross_entropy.detach()

    def after_update(self) -> tuple[float, dict[str, float]]:
        """Work after the optimizer's step (local-sgd averages, downpour pushes); (seconds
        the step spent communicating, StepMetrics.extra)."""
        return 0.0, {}

    def all_ranks(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order; a collective (the loop calls it at log steps)."""
        if not self.joins_group:
            return [value]
        return gather_floats(value, self.world_size, self.device)

    def checkpoint_state(self, loop_state: dict) -> dict | None:
        """The checkpoint's strategy part: the unwrapped model, optimizer and fast-path
        state, with `loop_state` (the loop's per-process moving average and Lookahead),
        in the same format at any world size. Called on every rank (it may be a
        collective); rank 0 gets the dict and writes it, the others may get None."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **self.fast.state_dict(), **loop_state}

    def load(self, state: dict) -> dict:
        """Load a checkpoint written by checkpoint_state (by any world size); returns this
        process's loop state ({"ema", "lookahead"}) to restore."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.fast.load_state_dict(state)
        return {"ema": state.get("ema"), "lookahead": state.get("lookahead")}

    def close(self) -> None:
        if self.joins_group and dist.is_initialized():
            dist.destroy_process_group()
