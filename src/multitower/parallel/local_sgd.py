"""Local SGD: every worker trains its own replica and every K steps the replicas'
weights are averaged (the chapter's supervisor, which collects the workers' weights,
averages them and pushes the average back), optionally after W fully synchronous
warm-up steps: post-local SGD (Lin et al. 2018, https://arxiv.org/abs/1808.07217).

Built from torch's documented post-local-SGD recipe, nothing home-made:
  - DDP with post_localSGD_hook: for the first W steps the hook all-reduces the
    gradients (exactly the sync strategy); afterwards it hands each worker its own
    gradient back, so backward sends nothing and the optimizer steps locally;
  - PeriodicModelAverager after every optimizer step: on averaging steps it
    all-reduces all parameters as one flat buffer divided by the world size, on the
    others it does nothing.
Averages happen after global steps W+K, W+2K, ... (see wrap). With K=1 and plain SGD,
averaging the weights after each step equals averaging the gradients: sync, up to rounding.

Moving average (EMA): the loop keeps one per process, over that process's replica, and
checkpoints rank 0's. We keep it that way rather than spend a collective on it: rank 0's
replica is at most K-1 local steps away from the consensus, early in training the EMA
(TF's num_updates rule) follows it closely anyway, and later its horizon (~10,000 steps
at decay 0.9999) spans many averaging periods, over which the drift averages out.

Checkpoints hold the mean of the replicas as "model" (the supervisor's model, what eval
should see), computed on a copy; training replicas are untouched. Under "replicas" they
also hold every rank's own weights, buffers, optimizer state (momentum) and fp16 loss
scale, with the loop's per-process moving average and Lookahead: a resume with as many
workers puts each replica back exactly where it was, so the run goes on bitwise as if
never stopped. With another number of workers, every replica restarts at the mean with
rank 0's optimizer state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook
from torch.distributed.algorithms.model_averaging import averagers
from torch.nn.parallel import DistributedDataParallel

from multitower.config import Config, ParallelConfig
from multitower.errors import UserError
from multitower.flags import Flag, whole_number
from multitower.parallel.base import LossFn, Strategy
from multitower.parallel.sync import CommTimer


@dataclass
class LocalSGDOptions:
    sync_every: int = 4
    """Steps between averages of the workers' weights (K; 1 = every step, like sync)."""
    local_sgd_warmup: int = 0
    """Fully synchronous steps (gradients all-reduced) before local steps begin (W)."""


class LocalSGD(Strategy):
    name = "local-sgd"
    Options = LocalSGDOptions
    FLAGS = (
        Flag("--sync-every", "parallel.options.sync_every",
             "local-sgd: steps between averages of the workers' weights", type=whole_number),
        Flag("--local-sgd-warmup", "parallel.options.local_sgd_warmup",
             "local-sgd: fully synchronous steps before local steps begin", type=whole_number),
    )

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        options = cls.options_of(cfg.parallel)
        if options.sync_every < 1:
            raise UserError(f"--sync-every must be at least 1 step, got {options.sync_every}")
        if options.local_sgd_warmup < 0:
            raise UserError(f"--local-sgd-warmup must be 0 or more steps, got {options.local_sgd_warmup}")

    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        super().__init__(cfg, device, loss_fn)
        self.ddp: DistributedDataParallel | None = None
        self.timer: CommTimer | None = None
        self.hook_state: post_localSGD_hook.PostLocalSGDState | None = None
        self.averager: averagers.PeriodicModelAverager | None = None
        self._warming_up = False

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().wrap(model, optimizer)  # the fast path's layout before DDP sees the model
        every, warmup = self.options.sync_every, self.options.local_sgd_warmup
        # DDP broadcasts rank 0's parameters (and buffers) at construction: all replicas
        # start equal. forward_sync_buffers=False: a buffer broadcast before every forward
        # would be a collective per step; buffers (cifar10-tf has none) then stay per
        # worker, as the averager averages parameters only.
        self.ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True, forward_sync_buffers=False)
        # post_local_gradient_allreduce=False: after warm-up no gradient leaves the worker.
        # (torch's default keeps all-reducing within each machine, which on one machine
        # would be the sync strategy plus averaging.)
        self.hook_state = post_localSGD_hook.PostLocalSGDState(
            process_group=None, subgroup=None, start_localSGD_iter=warmup, post_local_gradient_allreduce=False)
        self.timer = CommTimer()
        self.ddp.register_comm_hook(self.hook_state, self.timer.wrap(post_localSGD_hook.post_localSGD_hook))
        # The averager averages when its step counter s (0-based: the step just taken)
        # has s >= warmup_steps and (s - warmup_steps) % period == 0. torch's example sets
        # warmup_steps = W, which averages right after the first local step (replicas one
        # step apart) and every K after that. W + K - 1 instead averages after 1-based
        # steps W+K, W+2K, ...: every K-th local step, on multiples of K when W = 0.
        self.averager = averagers.PeriodicModelAverager(period=every, warmup_steps=warmup + every - 1)

    @property
    def module(self) -> nn.Module:
        return self.ddp

    def averages_now(self) -> bool:
        """Whether the averager's next call averages (its own rule, from its public fields)."""
        s, avg = self.averager.step, self.averager
        return s >= avg.warmup_steps and (s - avg.warmup_steps) % avg.period == 0

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0):
        # The hook is called for every bucket, but all-reduces only during warm-up.
        self._warming_up = self.hook_state.iter < self.options.local_sgd_warmup
        return super().forward_backward(images, labels, weight)

    def after_update(self) -> tuple[float, dict[str, float]]:
        averaging_s, averaged_bytes = 0.0, 0
        if self.averages_now():
            averaged_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            start = time.perf_counter()
            self.averager.average_parameters(self.model.parameters())
            # The averager re-points every parameter at a slice of its flat buffer, NCHW
            # contiguous: put --channels-last's layout back (same Parameter objects).
            self.fast.apply_layout(self.model)
            if self.device.type == "cuda":
                # NCCL returns before the all-reduce ends; one sync every K steps buys an honest time.
                torch.cuda.synchronize(self.device)
            averaging_s = time.perf_counter() - start
        else:
            self.averager.average_parameters(self.model.parameters())  # only counts the step
        hook_s, hook_bytes = self.timer.take()
        return hook_s + averaging_s, {"comm_bytes": float((hook_bytes if self._warming_up else 0) + averaged_bytes)}

    def close(self) -> None:
        if self.timer is not None:
            self.timer.drain()  # before the process group can go (sync.CommTimer.drain)
        super().close()

    @torch.no_grad()
    def mean_of_replicas(self) -> dict:
        """The replicas' mean under the unwrapped module's keys (an all-reduce of the
        parameters: every rank calls it); buffers are this rank's own."""
        params = list(self.model.parameters())
        # reshape, not parameters_to_vector's view: channels_last weights are not NCHW-contiguous.
        mean = torch.cat([p.detach().reshape(-1) for p in params]) / self.world_size
        dist.all_reduce(mean)
        model_state = self.model.state_dict()
        offset = 0
        for name, p in self.model.named_parameters():
            model_state[name] = mean[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return model_state

    def checkpoint_state(self, loop_state: dict) -> dict | None:
        """The supervisor's model (the replicas' mean, what eval reads) with rank 0's
        optimizer and loop state, and under "replicas" every rank's own replica, optimizer
        state, fp16 loss scale and loop state (gathered on rank 0; host copies, as
        gather_object pickles). Collectives: every rank calls it."""
        mean = self.mean_of_replicas()
        own = _on_host({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        **self.fast.state_dict(), **loop_state})
        gathered = [None] * self.world_size if self.is_rank0 else None
        dist.gather_object(own, gathered, dst=0)
        if not self.is_rank0:
            return None
        return {"model": mean, "optimizer": self.optimizer.state_dict(), **self.fast.state_dict(), **loop_state,
                "replicas": gathered}

    def load(self, state: dict) -> dict:
        """This rank's own replica where the checkpoint holds as many as there are ranks
        now (the run goes on bitwise); otherwise every rank restarts from the mean."""
        replicas = state.get("replicas")
        own = replicas[self.rank] if replicas is not None and len(replicas) == self.world_size else state
        self.model.load_state_dict(own["model"])
        self.optimizer.load_state_dict(own["optimizer"])
        self.fast.load_state_dict(own)
        # Both schedules count steps from 0; a resumed run goes on where it stopped.
        self.hook_state.iter = self.averager.step = int(state["step"])
        return {"ema": own["ema"], "lookahead": own.get("lookahead")}


def _on_host(tree):
    """`tree` (dicts, lists, tuples) with every tensor copied to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: _on_host(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_host(value) for value in tree)
    return tree
