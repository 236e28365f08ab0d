"""The training step `multitower train` runs, as a closure to time: the Single strategy's
step() with the step's fast path (precision, memory format, compile) as ParallelConfig
resolves it, the loop's per-step loss read (its NaN check), and the moving-average update.

Timed by benchmarks/train_step.py (against a plain eager step) and by `multitower plan`
(plan.profile_compute). One builder, so that what `plan` predicts from is what `train`
runs: plan's own profile once timed a home-made NCHW step while train defaults to
channels_last (issue 19, item 7).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from multitower.config import Config, ParallelConfig
from multitower.data.loader import Batch, TrainBatches
from multitower.models import build_model
from multitower.models.cifar10_tf import tower_loss
from multitower.parallel.precision import FastPath
from multitower.parallel.single import Single
from multitower.train.ema import ExponentialMovingAverage
from multitower.train.build import build_run
from multitower.train.host import keep_freed_memory


@dataclass
class TrainingStep:
    run: Callable[[], int]
    """Runs the steps and returns the examples they trained on (bench.measure's run_once)."""
    fast: FastPath
    """The fast path the step runs with, as train's Single strategy built it."""
    close: Callable[[], None]
    """Stops the input pipeline's thread, if any."""
    backward_share: Callable[[], float]
    """Runs the steps once more and returns the share of their time spent in backward."""


def timed_backward_share(fast: FastPath, run: Callable[[], int], device: torch.device) -> float:
    """The share of run()'s wall time spent in fast.backward (autograd from the loss back to
    the first layer): what DDP can overlap its all-reduce with, where cost_model's
    Workload.backward_fraction is otherwise a rule of thumb (2/3, from the FLOPs). cifar10-tf
    at batch 64 on one core of a 2-core Xeon measured 0.56-0.62 channels_last, 0.42 NCHW:
    its LRN, pooling and the update do not take time as their FLOPs would."""
    backward, spent = fast.backward, []

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(loss: torch.Tensor) -> None:
        start = time.perf_counter()
        backward(loss)
        synchronize()
        spent.append(time.perf_counter() - start)
    fast.backward = timed
    try:
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        total = time.perf_counter() - start
    finally:
        del fast.backward  # the class's method again
    return sum(spent) / total


def training_step(batch_size: int, steps: int, device: torch.device, *, model: str = "cifar10-tf",
                  width: int = 1, setting: dict | None = None, split=None, lr: float = 0.1) -> TrainingStep:
    """`steps` of train's step on `model` (seeded), SGD at `lr`. `setting`: ParallelConfig
    fields (precision, channels_last, compile); None = train's defaults. `split`: batches
    from these records through the loader (augmentation, prefetch thread), as train reads
    them; None = one fixed batch of random images, in the loader's NCHW float layout (the
    step converts it to the model's memory format, as in train). Sets the process's
    allocator as train does (train/host.py): for every step of this process from then on."""
    keep_freed_memory()
    torch.manual_seed(0)
    net = build_model(model, width=width).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    strategy = Single(ParallelConfig(**(setting or {})), device, tower_loss)
    strategy.wrap(net, optimizer)
    ema = ExponentialMovingAverage(net, 0.9999)
    if split is not None:
        batches = TrainBatches(split, global_batch_size=batch_size, seed=0, device=device)
        iterator, close = iter(batches), batches.close
    else:
        side = getattr(net, "image_size", 24)
        fixed = Batch(images=torch.randn(batch_size, 3, side, side, device=device),
                      labels=torch.randint(0, getattr(net, "num_classes", 10), (batch_size,), device=device),
                      step=0, epoch=0)
        iterator, close = iter(lambda: fixed, None), (lambda: None)
    state = {"step": 0}

    def run() -> int:
        for _ in range(steps):
            strategy.step(next(iterator)).loss.item()  # the loop's per-step NaN check syncs too
            state["step"] += 1
            ema.update(net, state["step"])
        return steps * batch_size
    return TrainingStep(run, strategy.fast, close, lambda: timed_backward_share(strategy.fast, run, device))


def recipe_step(cfg: Config, steps: int, warmup: int = 0) -> TrainingStep:
    """`steps` of the step `multitower train` runs for `cfg` in one process, built as train
    builds it (train/build.build_run: the recipe's model and data-dependent initialisation,
    loss, optimizer at the schedule's first learning rate, the strategy's fast path, the
    moving average, the recipe's Lookahead; the process's threads and allocator), on
    run.batches(): augmentation and prefetch as train reads them. No summaries, logs or
    checkpoints: what benchmarks/train_e2e.py compares the whole job with. `warmup` steps
    run before this returns."""
    run = build_run(cfg)
    strategy, model = run.strategy, run.model
    lr = run.lr_at(0)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    batches = run.batches()
    iterator = iter(batches)
    state = {"step": 0}

    def run_steps(count: int = steps) -> int:
        for _ in range(count):
            strategy.step(next(iterator)).loss.item()  # the loop's per-step NaN check syncs too
            state["step"] += 1
            if run.lookahead is not None:
                run.lookahead.after_step(model, state["step"])
            run.ema.update(model, state["step"])
        return count * cfg.data.batch_size

    def close() -> None:
        batches.close()
        strategy.close()
    run_steps(warmup)
    return TrainingStep(run_steps, strategy.fast, close,
                        lambda: timed_backward_share(strategy.fast, run_steps, strategy.device))
