"""Pipeline (model) parallelism: the network cut into S contiguous stages, one per
process, each holding only its own layers and their optimizer state; every step's
global batch flows through as M micro-batches on torch.distributed.pipelining
(PipelineStage + ScheduleGPipe, or Schedule1F1B with --schedule 1f1b).

A stage is the loop's model with the children it does not own deleted (the model's
forward skips missing children), so parameter names, and therefore checkpoints, stay
those of the full model. Cut points are the layer names where stages 2..S begin
(--cut local3), or, by default, the contiguous split whose largest stage has the
fewest parameters.

The trap we hit first (torch 2.13, gloo): a schedule decides whether it runs backward
from `loss_fn is not None` on ITS rank (PipelineScheduleSingle: _has_backward). Built
with a loss only on the last stage, the first stage runs forward only: with static
shapes it ends the step without gradients; with shapes inferred at run time the last
stage waits forever in send_object_list for a backward-metadata exchange the first
stage never joins. Every rank must pass the loss function (only the last calls it).
tests/test_pipeline.py pins both the behaviour and the equivalence with one device.

Loss: the last stage's schedule loss is tower_loss's cross-entropy of a micro-batch;
the schedule sums the M micro-batch gradients and divides by M (scale_grads), which is
the gradient of the global batch's mean with equal micro-batches. Each stage then adds
the gradient of the weight decay of the local layers it owns, once per step.

Data: the loop hands each rank its 1/S slice of the global batch (rank order, see
data.loader); one all_gather rebuilds the global batch, whose images the first stage
and whose labels the last stage use.

EMA: the loop's moving average covers this rank's stage; gather_named_tensors()
assembles the full model's average on rank 0 for the checkpoint.
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from multitower.config import ParallelConfig
from multitower.data.loader import Batch
from multitower.errors import UserError
from multitower.models.cifar10_tf import weight_decay_loss
from multitower.parallel.base import LossFn, StepMetrics
from multitower.parallel.process_group import gather_floats, init_process_group

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def split_layers(names: list[str], param_counts: list[int], stages: int, cut: tuple[str, ...] = ()) -> list[list[str]]:
    """The layer names of each stage: contiguous runs of `names`, starting stage i+1 at
    cut[i], or (no cut) the split minimising the largest stage's parameter count.
    Every stage must hold parameters (a stage without any would only relay)."""
    if not 1 <= stages <= len(names):
        raise UserError(f"--stages {stages} must be between 1 and the model's {len(names)} layers")
    if cut:
        if len(cut) != stages - 1:
            raise UserError(f"--cut {','.join(cut)} names {len(cut)} layer(s); --stages {stages} needs {stages - 1}")
        unknown = [c for c in cut if c not in names]
        if unknown:
            raise UserError(f"--cut {','.join(unknown)}: not a layer of the model; layers: {', '.join(names)}")
        starts = [names.index(c) for c in cut]
        if starts != sorted(set(starts)) or starts[0] == 0:
            raise UserError(f"--cut {','.join(cut)} must name distinct layers after {names[0]}, in model order")
    else:
        # Brute force over the C(len-1, S-1) cut positions: at most 70 for cifar10-tf's 9 layers.
        best = None
        for starts in itertools.combinations(range(1, len(names)), stages - 1):
            bounds = (0, *starts, len(names))
            sizes = [sum(param_counts[a:b]) for a, b in zip(bounds, bounds[1:])]
            # Ties go to the later cut: the parameter-free layers before it (pool2) shrink
            # the activation sent between stages (pool2's output is 1/4 of norm2's).
            if min(sizes) > 0 and (best is None or max(sizes) <= best[0]):
                best = (max(sizes), list(starts))
        if best is None:
            raise UserError(f"--stages {stages}: the model has only {sum(1 for c in param_counts if c)} layers "
                            f"with parameters, so some stage would hold none; use fewer stages")
        starts = best[1]
    bounds = (0, *starts, len(names))
    groups = [names[a:b] for a, b in zip(bounds, bounds[1:])]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if sum(param_counts[a:b]) == 0:
            raise UserError(f"stage {i} ({', '.join(groups[i])}) would hold no parameters; move the --cut")
    return groups


def _contiguous_input_grads(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: the gradients of a stage's received inputs come out contiguous."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.requires_grad:
            arg.register_hook(lambda grad: grad.contiguous())


class BusyClock:
    """Seconds this stage spends computing (forward and backward of its layers) during a
    step, from public hooks: forward pre/post hooks on the stage, and for backward the
    span from the stage output's gradient arriving to the last parameter gradient
    accumulated. The rest of the step is the stage waiting: its bubble."""

    def __init__(self, stage: nn.Module):
        self.busy_s = 0.0
        self._forward_start = 0.0
        self._backward_start: float | None = None
        self._backward_last = 0.0
        stage.register_forward_pre_hook(self._before_forward)
        stage.register_forward_hook(self._after_forward)
        for p in stage.parameters():
            p.register_post_accumulate_grad_hook(self._grad_accumulated)

    def _before_forward(self, module, args) -> None:
        self._forward_start = time.perf_counter()

    def _after_forward(self, module, args, output) -> None:
        self.busy_s += time.perf_counter() - self._forward_start
        if output.requires_grad:
            output.register_hook(self._output_grad)

    def _output_grad(self, grad: torch.Tensor) -> None:
        self._close_backward()
        self._backward_start = time.perf_counter()

    def _grad_accumulated(self, param: torch.Tensor) -> None:
        self._backward_last = time.perf_counter()

    def _close_backward(self) -> None:
        if self._backward_start is not None:
            self.busy_s += max(0.0, self._backward_last - self._backward_start)
            self._backward_start = None

    def take(self) -> float:
        self._close_backward()
        busy, self.busy_s = self.busy_s, 0.0
        return busy


class Pipeline:
    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        init_process_group(device, cfg.timeout_s, "pipeline")
        self.cfg = cfg
        self.device = device
        self.loss_fn = loss_fn
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_rank0 = self.rank == 0
        if self.world_size != cfg.stages:
            raise UserError(f"--strategy pipeline --stages {cfg.stages} runs one process per stage, "
                            f"but {self.world_size} were started: pass --workers {cfg.stages}")
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.layers: list[str] = []
        self.param_offset = 0  # parameters (tensors) of the stages before this one, in model order
        self.stage_param_bytes: list[int] = []

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Cut `model` down to this rank's stage, in place, and drop the other stages'
        parameters from `optimizer` (the loop keeps both objects: lr, EMA, summaries)."""
        names = [name for name, _ in model.named_children()]
        counts = [sum(p.numel() for p in child.parameters()) for child in model.children()]
        cut = tuple(c for c in self.cfg.cut.split(",") if c) if self.cfg.cut else ()
        groups = split_layers(names, counts, self.cfg.stages, cut)
        self.layers = groups[self.rank]
        self.param_offset = sum(len(list(getattr(model, n).parameters()))
                                for g in groups[:self.rank] for n in g)
        for name in names:
            if name not in self.layers:
                delattr(model, name)
        owned = {id(p) for p in model.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in owned]
        self.model, self.optimizer = model, optimizer
        mine = sum(p.numel() * p.element_size() for p in model.parameters())
        self.stage_param_bytes = [int(b) for b in gather_floats(float(mine), self.world_size, self.device)]
        print(f"pipeline stage {self.rank}/{self.world_size}: {', '.join(self.layers)} "
              f"({mine:,} parameter bytes)", flush=True)
        # gloo receives only into contiguous buffers, and the library allocates stage i's
        # gradient buffer with the strides of stage i+1's input gradient (run-time
        # metadata inference). local3 flattens NHWC via permute, so its input gradient is
        # strided: stage 0's recv failed, "input tensor has to be contiguous" (torch 2.13).
        model.register_forward_pre_hook(_contiguous_input_grads)
        self.clock = BusyClock(model)
        self.stage = PipelineStage(model, self.rank, self.world_size, self.device)
        # The loss on EVERY rank, though only the last stage calls it: a schedule without
        # one runs no backward on its rank (see the module docstring).
        self.schedule = SCHEDULES[self.cfg.schedule](self.stage, self.cfg.microbatches, loss_fn=self._microbatch_loss)

    def _microbatch_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, logits, labels)[1]  # the cross-entropy; weight decay is added per stage

    def _global_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = [torch.empty_like(batch.images) for _ in range(self.world_size)]
        labels = [torch.empty_like(batch.labels) for _ in range(self.world_size)]
        dist.all_gather(images, batch.images.contiguous())
        dist.all_gather(labels, batch.labels.contiguous())
        return torch.cat(images), torch.cat(labels)

    def step(self, batch: Batch) -> StepMetrics:
        start = time.perf_counter()
        images, labels = self._global_batch(batch)
        gather_s = time.perf_counter() - start
        if images.shape[0] % self.cfg.microbatches:
            raise UserError(f"global batch {images.shape[0]} does not split into --microbatches {self.cfg.microbatches}")
        self.optimizer.zero_grad(set_to_none=True)
        first, last = self.rank == 0, self.rank == self.world_size - 1
        losses: list[torch.Tensor] = []
        self.clock.take()
        schedule_start = time.perf_counter()
        self.schedule.step(*((images,) if first else ()), target=labels if last else None,
                           losses=losses if last else None, return_outputs=False)
        schedule_s = time.perf_counter() - schedule_start
        idle_fraction = max(0.0, 1.0 - self.clock.take() / schedule_s)
        decay = weight_decay_loss(self.model)
        if decay.requires_grad:
            decay.backward()
        self.optimizer.step()
        # One all-reduce: the total loss (cross-entropy from the last stage + every stage's
        # weight decay) for every rank, and each stage's idle fraction for rank 0's log.
        cross_entropy = torch.stack(losses).mean().detach() if last else torch.zeros(())
        report = torch.zeros(2 + self.world_size, dtype=torch.float64)
        report[0], report[1], report[2 + self.rank] = cross_entropy.double(), decay.detach().double(), idle_fraction
        comm_start = time.perf_counter()
        report = report.to(self.device)  # NCCL needs device tensors
        dist.all_reduce(report)
        report = report.cpu()
        comm_s = gather_s + time.perf_counter() - comm_start
        S, M = self.world_size, self.cfg.microbatches
        extra = {"bubble_fraction": float(report[2:].mean()), "bubble_fraction_theory": (S - 1) / (M + S - 1)}
        extra.update({f"stage{r}_idle_fraction": float(report[2 + r]) for r in range(S)})
        extra.update({f"stage{r}_param_bytes": float(b) for r, b in enumerate(self.stage_param_bytes)})
        return StepMetrics(loss=(report[0] + report[1]).float(), cross_entropy=report[0].float(),
                           examples=images.shape[0], comm_s=comm_s, extra=extra)

    def all_ranks(self, value: float) -> list[float]:
        return gather_floats(value, self.world_size, self.device)

    def gather_named_tensors(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stage's tensors keyed by parameter name -> the full model's, in stage
        order (a collective; the loop uses rank 0's result, e.g. the EMA)."""
        parts: list[dict | None] = [None] * self.world_size
        dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in named.items()})
        return {k: v for part in parts for k, v in part.items()}

    def state_dict(self) -> dict:
        """The full model's state_dict and a full-model optimizer state (parameter indices
        in model order, as one optimizer over model.parameters() numbers them)."""
        model_state = self.gather_named_tensors(self.model.state_dict())
        opt = self.optimizer.state_dict()
        mine = {"offset": self.param_offset, "state": opt["state"], "param_groups": opt["param_groups"]}
        parts: list[dict | None] = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        state, params = {}, []
        for part in parts:
            for index, slot in part["state"].items():
                state[part["offset"] + index] = slot
            params += [part["offset"] + i for group in part["param_groups"] for i in group["params"]]
        group = {k: v for k, v in parts[0]["param_groups"][0].items() if k != "params"}
        return {"model": model_state, "optimizer": {"state": state, "param_groups": [{**group, "params": params}]}}

    def load_state_dict(self, state: dict) -> None:
        """Each stage takes its layers' entries of a full-model checkpoint."""
        own = self.model.state_dict()
        self.model.load_state_dict({k: v for k, v in state["model"].items() if k in own})
        n = len(list(self.model.parameters()))
        full = state["optimizer"]
        slots = {i - self.param_offset: s for i, s in full["state"].items()
                 if self.param_offset <= i < self.param_offset + n}
        group = {k: v for k, v in full["param_groups"][0].items() if k != "params"}
        self.optimizer.load_state_dict({"state": slots, "param_groups": [{**group, "params": list(range(n))}]})

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
