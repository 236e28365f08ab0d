"""The training step `multitower train` runs, as a closure to time: the Single strategy's
step() with the step's fast path (precision, memory format, compile) as ParallelConfig
resolves it, the loop's per-step loss read (its NaN check), and the moving-average update.

Timed by benchmarks/train_step.py (against a plain eager step) and by `multitower plan`
(plan.profile_compute). One builder, so that what `plan` predicts from is what `train`
runs: plan's own profile once timed a home-made NCHW step while train defaults to
channels_last (issue 19, item 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from multitower.config import Config, ParallelConfig
from multitower.data.loader import Batch, TrainBatches
from multitower.models import build_model, model_from_config
from multitower.models.cifar10_tf import tower_loss
from multitower.parallel.precision import FastPath
from multitower.parallel.single import Single
from multitower.train.ema import ExponentialMovingAverage
from multitower.train.host import keep_freed_memory
from multitower.train.lookahead import Lookahead
from multitower.train.recipe import get_recipe, steps_for_epochs


@dataclass
class TrainingStep:
    run: Callable[[], int]
    """Runs the steps and returns the examples they trained on (bench.measure's run_once)."""
    fast: FastPath
    """The fast path the step runs with, as train's Single strategy built it."""
    close: Callable[[], None]
    """Stops the input pipeline's thread, if any."""


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
    return TrainingStep(run, strategy.fast, close)


def recipe_step(cfg: Config, steps: int, split, device: torch.device = torch.device("cpu"),
                warmup: int = 0) -> TrainingStep:
    """`steps` of the step `multitower train` runs for `cfg` (one worker): its recipe's model
    (and data-dependent initialisation), loss, optimizer at the schedule's first learning rate,
    augmentation and prefetch, the Single strategy's fast path, the moving average and the
    recipe's Lookahead. No summaries, logs or checkpoints: what benchmarks/train_e2e.py
    compares the whole job with. cfg.run.steps is the run's length (Lookahead's schedule);
    `warmup` steps run before this returns. Sets the process's allocator as train does."""
    keep_freed_memory()
    recipe = get_recipe(cfg.optim.recipe)
    torch.manual_seed(cfg.run.seed)
    net = model_from_config(cfg.model).to(device)
    recipe.prepare_model(net, split, recipe)
    optimizer = recipe.make_optimizer(net, cfg)
    lr = recipe.make_schedule(cfg, len(split))(0)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    strategy = Single(cfg.parallel, device, recipe.make_loss(cfg))
    strategy.wrap(net, optimizer)
    ema = ExponentialMovingAverage(net, cfg.optim.ema_decay)
    lookahead = None
    if recipe.lookahead is not None:
        lookahead = Lookahead(recipe.lookahead, cfg.run.steps,
                              steps_for_epochs(1, len(split), cfg.data.batch_size))
    batches = TrainBatches(split, global_batch_size=cfg.data.batch_size, seed=cfg.run.seed,
                           prefetch=cfg.data.prefetch, device=device,
                           augment=recipe.augment, augment_on=cfg.data.augment_on)
    iterator = iter(batches)
    state = {"step": 0}

    def run(count: int = steps) -> int:
        for _ in range(count):
            strategy.step(next(iterator)).loss.item()  # the loop's per-step NaN check syncs too
            state["step"] += 1
            if lookahead is not None:
                lookahead.after_step(net, state["step"])
            ema.update(net, state["step"])
        return count * cfg.data.batch_size
    run(warmup)
    return TrainingStep(run, strategy.fast, batches.close)
