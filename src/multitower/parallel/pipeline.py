"""Pipeline (model) parallelism: the network cut into S contiguous stages, one per
process, each holding only its own layers and their optimizer state; every step's
global batch flows through as M micro-batches on torch.distributed.pipelining
(PipelineStage + ScheduleGPipe, or Schedule1F1B with --schedule 1f1b).

Pipeline x data parallelism: W = S x R processes run R replicas of the pipeline. Rank r
is stage r % S of replica r // S, so replica k is the ranks k*S .. k*S+S-1: rank 0 is
replica 0's first stage, and a replica's ranks hold a contiguous 1/R of the global batch
(data.loader slices it in rank order). Each replica's PipelineStages talk in their own
process group; after the schedule, every stage averages its gradients with the same
stage of the other replicas (one all-reduce of one flat buffer in a per-stage group),
so the replicas stay bitwise equal and the update is the global batch's.

A stage is the loop's model with the children it does not own deleted (the model's
forward skips missing children), so parameter names, and therefore checkpoints, stay
those of the full model. Cut points are the layer names where stages 2..S begin
(--cut local3), or, by default, the contiguous split whose largest stage has the
fewest parameters (--balance params) or forward multiply-accumulates (--balance flops,
counted per layer by bench.flops.layer_macs).

The trap we hit first (torch 2.13, gloo): a schedule decides whether it runs backward
from `loss_fn is not None` on ITS rank (PipelineScheduleSingle: _has_backward). Built
with a loss only on the last stage, the first stage runs forward only: with static
shapes it ends the step without gradients; with shapes inferred at run time the last
stage waits forever in send_object_list for a backward-metadata exchange the first
stage never joins. Every rank must pass the loss function (only the last calls it).
tests/test_pipeline.py pins both the behaviour and the equivalence with one device.

Loss (a multitower.losses.Loss): the last stage's schedule loss is its data term (the
tutorial's cross-entropy) of a micro-batch;
the schedule sums the M micro-batch gradients and divides by M (scale_grads), which is
the gradient of the global batch's mean with equal micro-batches. Each stage then adds
the gradient of its parameter term (the tutorial's weight decay) of the layers it owns,
once per step.

Data: the loop hands each rank its 1/W slice of the global batch (rank order, see
data.loader); one all_gather among a replica's S ranks rebuilds that replica's 1/R of
it, whose images the first stage and whose labels the last stage use.

EMA: the loop's moving average covers this rank's stage; checkpoint_state() assembles
the full model's average from replica 0 on rank 0 for the checkpoint.

Memory: each step measures this stage's peak, on CUDA the allocator's, on CPU the
tensors saved for backward (memory.SavedTensorPeak) plus parameters, gradients and
optimizer state, and reports it per stage as stageN_peak_bytes.
"""

from __future__ import annotations

import datetime
import itertools
import time
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from multitower.bench.flops import layer_macs
from multitower.config import Config, ParallelConfig, check_choice
from multitower.data.loader import Batch
from multitower.errors import UserError
from multitower.flags import Flag, whole_number
from multitower.losses import Loss
from multitower.parallel.base import LossFn, StepMetrics, Strategy
from multitower.parallel.memory import SavedTensorPeak, measured_peak_bytes
from multitower.parallel.process_group import gather_floats

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def split_layers(names: list[str], param_counts: list[int], stages: int, cut: tuple[str, ...] = (),
                 weights: list[int] | None = None) -> list[list[str]]:
    """The layer names of each stage: contiguous runs of `names`, starting stage i+1 at
    cut[i], or (no cut) the split minimising the largest stage's total weight: `weights`
    per layer (e.g. forward MACs, --balance flops), by default the parameter counts.
    Every stage must hold parameters (a stage without any would only relay)."""
    weights = param_counts if weights is None else weights
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
            pairs = list(zip(bounds, bounds[1:]))
            sizes = [sum(weights[a:b]) for a, b in pairs]
            # Ties go to the later cut: the parameter-free layers before it (pool2) shrink
            # the activation sent between stages (pool2's output is 1/4 of norm2's).
            if all(sum(param_counts[a:b]) for a, b in pairs) and (best is None or max(sizes) <= best[0]):
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


def plan_stages(model: nn.Module, stages: int, cut: str = "", balance: str = "params",
                image_size: int | None = None) -> tuple[list[list[str]], list[int]]:
    """split_layers for `model`'s top-level children (--cut, --balance), and each
    child's forward MACs per example (layer_macs on square images of `image_size`; by
    default the model's own `image_size` attribute, else 32)."""
    names = [name for name, _ in model.named_children()]
    counts = [sum(p.numel() for p in child.parameters()) for child in model.children()]
    macs = layer_macs(model, image_size or getattr(model, "image_size", 32))
    groups = split_layers(names, counts, stages, tuple(c for c in cut.split(",") if c),
                          weights=macs if balance == "flops" else None)
    return groups, macs


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


@dataclass
class PipelineOptions:
    stages: int = 2
    """Stages the network is cut into, one process each; --workers S x R runs R data-parallel replicas."""
    microbatches: int = 4
    """Micro-batches each replica's share of the global batch is split into (M; the bubble is (S-1)/(M+S-1))."""
    schedule: str = "gpipe"
    """Micro-batch schedule, "gpipe" (all forwards, then all backwards) or "1f1b"."""
    cut: str = ""
    """Comma-separated top-level children where stages 2..S begin (e.g. "local3"); empty = balanced by `balance`."""
    balance: str = "params"
    """Without a cut, balance the stages by "params" (parameter count) or "flops" (forward multiply-adds)."""


def children_in_order(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a stage computes: the model's (present) top-level children, applied in order."""
    for child in model.children():
        x = child(x)
    return x


class Pipeline(Strategy):
    name = "pipeline"
    Options = PipelineOptions
    FLAGS = (
        Flag("--stages", "parallel.options.stages", "pipeline: stages the network is cut into, one process "
             "each; --workers S x R runs R data-parallel replicas of the pipeline", type=whole_number),
        Flag("--microbatches", "parallel.options.microbatches",
             "pipeline: micro-batches per replica's share of the global batch", type=whole_number),
        Flag("--schedule", "parallel.options.schedule", "pipeline: micro-batch schedule", choices=tuple(SCHEDULES)),
        Flag("--cut", "parallel.options.cut", "pipeline: comma-separated top-level children where stages "
             "2..S begin, e.g. local3; empty = balanced by --balance"),
        Flag("--balance", "parallel.options.balance", "pipeline: without --cut, balance the stages by "
             "parameter count or by forward multiply-adds per example", choices=("params", "flops")),
    )
    refuses = {"--channels-last": "does not convert its stages' layouts",
               "--precision bf16": "sends float32 activations between stages (no autocast across them)",
               "--precision fp16": "sends float32 activations between stages (no autocast across them)",
               "--compile": "is not built to compile its stages (single, sync and local-sgd are)"}
    # The same function cut elsewhere or scheduled otherwise: only rounding differs.
    resume_may_change = frozenset({"stages", "microbatches", "schedule", "cut", "balance"})

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        options = cls.options_of(cfg.parallel)
        if options.stages < 1 or options.microbatches < 1:
            raise UserError(f"--stages and --microbatches must be at least 1, got {options.stages} "
                            f"and {options.microbatches}")
        check_choice("--schedule", options.schedule, tuple(SCHEDULES))
        check_choice("--balance", options.balance, ("params", "flops"))
        stages, workers = options.stages, cfg.parallel.workers
        if workers % stages:
            raise UserError(f"--strategy pipeline --stages {stages} runs one process per stage and replica: "
                            f"pass --workers {stages}, {2 * stages}, ... (stages x replicas; got {workers})")
        replicas = workers // stages  # each replica's pipeline takes 1/replicas of the global batch
        if cfg.data.batch_size % (replicas * options.microbatches):
            raise UserError(f"--batch-size {cfg.data.batch_size} must divide evenly into "
                            f"--microbatches {options.microbatches} x {replicas} replica(s) (--workers / --stages)")

    @classmethod
    def preflight(cls, cfg: Config, model: nn.Module, example: torch.Tensor | None = None) -> str:
        """The cut must be valid, and the model must be what its stages compute: its
        top-level children applied in order (checked on `example` inputs, in eval mode)."""
        options = cls.options_of(cfg.parallel)
        groups, macs = plan_stages(model, options.stages, options.cut, options.balance,
                                   image_size=example.shape[-1] if example is not None else None)
        if example is not None:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    whole, in_order = model(example), children_in_order(model, example)
            finally:
                model.train(was_training)
            if whole.shape != in_order.shape or not torch.equal(whole, in_order):
                raise UserError(f"--strategy pipeline cuts --model {cfg.model.name} between its top-level "
                                f"children, run in order, but its forward computes something else (on a probe "
                                f"batch): make forward apply its children in order (nn.Sequential; a flatten as "
                                f"nn.Flatten), or use another strategy")
        shares = ", ".join(f"{sum(m for n, m in zip([n for n, _ in model.named_children()], macs) if n in g) / max(1, sum(macs)):.0%}"
                           for g in groups)
        return f"pipeline: stages {' | '.join(', '.join(g) for g in groups)} (forward FLOPs {shares})"

    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        super().__init__(cfg, device, loss_fn)
        if not isinstance(loss_fn, Loss):
            raise TypeError("the pipeline strategy needs a multitower.losses.Loss (its data term runs on the "
                            "last stage, its parameter term on every stage)")
        S = self.options.stages
        if self.world_size % S:
            raise UserError(f"--strategy pipeline --stages {S} runs one process per stage and replica, "
                            f"but {self.world_size} were started: pass --workers {S}, {2 * S}, ...")
        self.replicas = self.world_size // S
        self.stage_index, self.replica = self.rank % S, self.rank // S
        # Every rank creates every group, in the same order (a collective); each keeps its own.
        # The timeout explicitly: new groups default to torch's 30 minutes, not the world's.
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        self.pipe_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(k * S, (k + 1) * S)) for k in range(self.replicas)], timeout=timeout)
        self.stage_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(i, self.world_size, S)) for i in range(S)], timeout=timeout)
        self.layers: list[str] = []
        self.param_offset = 0  # parameters (tensors) of the stages before this one, in model order
        self.stage_param_bytes: list[int] = []

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Cut `model` down to this rank's stage, in place, and drop the other stages'
        parameters from `optimizer` (the loop keeps both objects: lr, EMA, summaries)."""
        names = [name for name, _ in model.named_children()]
        groups, macs = plan_stages(model, self.options.stages, self.options.cut, self.options.balance)
        self.layers = groups[self.stage_index]
        flops_share = sum(m for n, m in zip(names, macs) if n in self.layers) / max(1, sum(macs))
        self.param_offset = sum(len(list(getattr(model, n).parameters()))
                                for g in groups[:self.stage_index] for n in g)
        for name in names:
            if name not in self.layers:
                delattr(model, name)
        # The stage computes its children in order (preflight checked that the whole model
        # is its children in order); an instance attribute, so the model's class is untouched.
        model.forward = types.MethodType(children_in_order, model)
        owned = {id(p) for p in model.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in owned]
        self.model, self.optimizer = model, optimizer
        mine = sum(p.numel() * p.element_size() for p in model.parameters())
        S = self.options.stages
        self.stage_param_bytes = [int(b) for b in gather_floats(float(mine), self.world_size, self.device)[:S]]
        replica = f" of replica {self.replica}/{self.replicas}" if self.replicas > 1 else ""
        print(f"pipeline stage {self.stage_index}/{S}{replica}: {', '.join(self.layers)} "
              f"({mine:,} parameter bytes, {flops_share:.0%} of the forward FLOPs)", flush=True)
        # gloo receives only into contiguous buffers, and the library allocates stage i's
        # gradient buffer with the strides of stage i+1's input gradient (run-time
        # metadata inference). local3 flattens NHWC via permute, so its input gradient is
        # strided: stage 0's recv failed, "input tensor has to be contiguous" (torch 2.13).
        model.register_forward_pre_hook(_contiguous_input_grads)
        self.clock = BusyClock(model)
        self.saved = SavedTensorPeak(model)
        self.boundary_bytes = 0
        model.register_forward_hook(self._count_boundary_bytes)
        self.stage = PipelineStage(model, self.stage_index, S, self.device, group=self.pipe_group)
        # The loss on EVERY rank, though only the last stage calls it: a schedule without
        # one runs no backward on its rank (see the module docstring).
        self.schedule = SCHEDULES[self.options.schedule](self.stage, self.options.microbatches, loss_fn=self._microbatch_loss)

    def _count_boundary_bytes(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """What this stage sends its neighbours per micro-batch: its output forward (all
        but the last stage), its input's gradient backward (all but the first)."""
        if self.stage_index < self.options.stages - 1:
            self.boundary_bytes += output.numel() * output.element_size()
        if self.stage_index > 0:
            self.boundary_bytes += sum(a.numel() * a.element_size() for a in args
                                       if isinstance(a, torch.Tensor) and a.requires_grad)

    def _microbatch_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn.data_terms(logits, labels)[0]  # the data term; the parameter term is added per stage

    def _replica_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's share of the global batch: its S ranks' slices, in rank order."""
        S = self.options.stages
        images = [torch.empty_like(batch.images) for _ in range(S)]
        labels = [torch.empty_like(batch.labels) for _ in range(S)]
        dist.all_gather(images, batch.images.contiguous(), group=self.pipe_group)
        dist.all_gather(labels, batch.labels.contiguous(), group=self.pipe_group)
        return torch.cat(images), torch.cat(labels)

    def _average_gradients(self) -> int:
        """Average this stage's gradients over the replicas (the tutorial's average_gradients,
        per stage): one all-reduce of one flat buffer, not one per tensor. Returns bytes sent."""
        for p in self.model.parameters():
            if p.grad is None:  # unused this step: its zeros still take part in the one buffer
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.model.parameters()]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.stage_group)
        flat /= self.replicas
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)
        return flat.numel() * flat.element_size()

    def step(self, batch: Batch) -> StepMetrics:
        S, M, R = self.options.stages, self.options.microbatches, self.replicas
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        images, labels = self._replica_batch(batch)
        gather_s = time.perf_counter() - start
        if images.shape[0] % M:
            raise UserError(f"replica batch {images.shape[0]} does not split into --microbatches {M}")
        self.optimizer.zero_grad(set_to_none=True)
        first, last = self.stage_index == 0, self.stage_index == S - 1
        losses: list[torch.Tensor] = []
        self.clock.take()
        # The all-gather sends this rank's slice to the replica's S-1 other stages.
        self.boundary_bytes = (S - 1) * (batch.images.numel() * batch.images.element_size()
                                         + batch.labels.numel() * batch.labels.element_size())
        schedule_start = time.perf_counter()
        with self.saved:
            self.schedule.step(*((images,) if first else ()), target=labels if last else None,
                               losses=losses if last else None, return_outputs=False)
        schedule_s = time.perf_counter() - schedule_start
        idle_fraction = max(0.0, 1.0 - self.clock.take() / schedule_s)
        allreduce_start, sent = time.perf_counter(), 0
        if R > 1:
            sent = self._average_gradients()
        allreduce_s = time.perf_counter() - allreduce_start
        # After the average: the parameter term's gradient is the same on every replica.
        decay = self.loss_fn.parameters(self.model) if self.loss_fn.parameters is not None else torch.zeros(())
        if decay.requires_grad:
            decay.backward()
        self.optimizer.step()
        peak = measured_peak_bytes(self.model, self.optimizer, self.device, self.saved)
        # One all-reduce: the total loss (cross-entropy from the last stages + every stage's
        # weight decay) for every rank, the bytes sent, and each stage's idle fraction and
        # peak bytes for rank 0's log; all summed over the R replicas, hence the division.
        cross_entropy = torch.stack(losses).mean().detach() if last else torch.zeros(())
        report = torch.zeros(3 + 2 * S, dtype=torch.float64)
        report[0], report[1] = cross_entropy.double(), decay.detach().double()
        report[2 + 2 * S] = self.boundary_bytes + sent
        report[2 + self.stage_index], report[2 + S + self.stage_index] = idle_fraction, peak
        comm_start = time.perf_counter()
        report = report.to(self.device)  # NCCL needs device tensors
        dist.all_reduce(report)
        report = report.cpu() / R
        comm_s = gather_s + allreduce_s + time.perf_counter() - comm_start
        extra = {"bubble_fraction": float(report[2:2 + S].mean()), "bubble_fraction_theory": (S - 1) / (M + S - 1)}
        extra.update({f"stage{r}_idle_fraction": float(report[2 + r]) for r in range(S)})
        extra.update({f"stage{r}_param_bytes": float(b) for r, b in enumerate(self.stage_param_bytes)})
        extra.update({f"stage{r}_peak_bytes": float(report[2 + S + r]) for r in range(S)})
        extra["comm_bytes"] = float(report[2 + 2 * S]) / S  # per rank, as the other strategies report it
        return StepMetrics(loss=(report[0] + report[1]).float(), cross_entropy=report[0].float(),
                           examples=images.shape[0] * R, comm_s=comm_s, extra=extra)

    def _gathered(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stage's tensors keyed by parameter name -> the full model's, in stage order
        (a collective on replica 0's ranks, whose rank 0 keeps the result)."""
        parts: list[dict | None] = [None] * self.options.stages
        dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in named.items()}, group=self.pipe_group)
        return {k: v for part in parts for k, v in part.items()}

    def checkpoint_state(self, loop_state: dict) -> dict | None:
        """The full model's state_dict, moving average and Lookahead, and a full-model
        optimizer state (parameter indices in model order, as one optimizer over
        model.parameters() numbers them), gathered from replica 0's stages; None on the
        other replicas (equal to replica 0), which do not communicate."""
        if self.replica != 0:
            return None
        model_state = self._gathered(self.model.state_dict())
        ema = self._gathered(loop_state["ema"])
        lookahead = self._gathered(loop_state["lookahead"]) if loop_state.get("lookahead") is not None else None
        opt = self.optimizer.state_dict()
        mine = {"offset": self.param_offset, "state": opt["state"], "param_groups": opt["param_groups"]}
        parts: list[dict | None] = [None] * self.options.stages
        dist.all_gather_object(parts, mine, group=self.pipe_group)
        state, params = {}, []
        for part in parts:
            for index, slot in part["state"].items():
                state[part["offset"] + index] = slot
            params += [part["offset"] + i for group in part["param_groups"] for i in group["params"]]
        group = {k: v for k, v in parts[0]["param_groups"][0].items() if k != "params"}
        return {"model": model_state, "optimizer": {"state": state, "param_groups": [{**group, "params": params}]},
                "ema": ema, "lookahead": lookahead}

    def load(self, state: dict) -> dict:
        """Each stage takes its layers' entries of a full-model checkpoint."""
        own = self.model.state_dict()
        self.model.load_state_dict({k: v for k, v in state["model"].items() if k in own})
        n = len(list(self.model.parameters()))
        full = state["optimizer"]
        slots = {i - self.param_offset: s for i, s in full["state"].items()
                 if self.param_offset <= i < self.param_offset + n}
        group = {k: v for k, v in full["param_groups"][0].items() if k != "params"}
        self.optimizer.load_state_dict({"state": slots, "param_groups": [{**group, "params": list(range(n))}]})
        def mine(named: dict | None) -> dict | None:
            return None if named is None else {k: v for k, v in named.items() if k in own}
        return {"ema": mine(state["ema"]), "lookahead": mine(state.get("lookahead"))}
