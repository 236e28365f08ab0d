"""One place that builds a run: the data, the recipe, the strategy, the model and its
optimizer, the moving average and Lookahead. train() (train/loop.py), `train --dry-run`
and the launcher's preflight, the tests and the benchmarks all build through here.

check_config() is every check that needs no process: the config's own, the recipe's and
the strategy's. build_run() makes the parts in the order a run depends on: the
strategy joins its process group first; then the model's initial weights depend on the
seed alone, the same on every rank (and under every strategy); the strategy wraps (or
cuts) model and optimizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from multitower.config import Config
from multitower.data.datasets import Resized
from multitower.data.loader import TrainBatches
from multitower.data.records import open_dataset
from multitower.errors import UserError
from multitower.models import model_from_config
from multitower.parallel import strategy_class
from multitower.parallel.base import Strategy
from multitower.parallel.memory import check_memory_budget
from multitower.train.ema import ExponentialMovingAverage
from multitower.train.host import configure_process
from multitower.train.lookahead import Lookahead
from multitower.train.recipe import Recipe, check_recipe, get_recipe, steps_for_epochs


def resolve_device(name: str) -> torch.device:
    """The device of this process: with several GPUs, worker LOCAL_RANK takes cuda:LOCAL_RANK;
    with more workers than GPUs they wrap around (2 workers on 1 GPU share cuda:0, over gloo:
    parallel/process_group.backend_for)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(name)


def threads_per_worker(requested: int, workers: int) -> int:
    """Divide this machine's cores among the workers on it, so that they do not oversubscribe them."""
    if requested:
        return requested
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", workers))
    return max(1, len(os.sched_getaffinity(0)) // local_workers)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))  # set by the launcher in each worker


def check_config(cfg: Config, recipe: Recipe | None = None) -> Recipe:
    """Every check that needs no process and no data: the config's, the recipe's, the
    strategy's. Returns the recipe (cfg.optim.recipe's unless one is given)."""
    cfg.validate()
    recipe = recipe or get_recipe(cfg.optim.recipe)
    check_recipe(cfg, recipe)
    strategy_class(cfg.parallel, world_size() if world_size() > 1 else None).check(cfg)
    cfg.check_batch_split()
    return recipe


def open_data(cfg: Config, data=None):
    """The data set: `data` (multitower.ImageData, or a directory) or cfg.data.dir's records."""
    if data is None or isinstance(data, (str, os.PathLike)):
        path = data if data is not None else cfg.data.dir
        if not path:
            raise UserError("--data is required: make one with `multitower data import|download|synth`, "
                            "or run `multitower demo`")
        return open_dataset(path, label=cfg.data.label)
    return data


def split_of(cfg: Config, data, name: str):
    """One split as the loader reads it: resized when --image-size asks."""
    split = data.split(name)
    return Resized(split, cfg.data.image_size) if cfg.data.image_size else split


def stored_shape(cfg: Config, data) -> tuple[int, int, int]:
    """(C, H, W) of the images the loader hands the augmentation."""
    channels = data.image_shape[0]
    return (channels, *cfg.data.image_size) if cfg.data.image_size else tuple(data.image_shape)


def example_inputs(cfg: Config, recipe: Recipe, split, count: int = 2) -> torch.Tensor:
    """A few training images as the model sees them (the recipe's eval transform: the
    same size as its training crops), for shape checks and probes."""
    raw, _ = split.gather(torch.arange(min(count, len(split))).numpy())
    return recipe.augment.eval_transform(raw)


def resolve_steps(cfg: Config, train_examples: int) -> Config:
    """cfg with run.steps set from run.epochs when that is given (else unchanged)."""
    if not cfg.run.epochs:
        return cfg
    return cfg.with_values({"run.steps": steps_for_epochs(cfg.run.epochs, train_examples, cfg.data.batch_size)})


def check_batch_fits(cfg: Config, train_examples: int) -> None:
    if cfg.data.batch_size > train_examples:
        raise UserError(f"--batch-size {cfg.data.batch_size} is more than the {train_examples} training "
                        f"examples of {cfg.data.dir or 'the data'}; use --batch-size {train_examples} or less")


def new_model(cfg: Config, recipe: Recipe, data, train_split, model: Callable | None = None) -> nn.Module:
    """The model's initial weights, from the seed alone (the same on every rank), with the
    recipe's data-dependent initialisation; checked against the recipe and the data."""
    example = example_inputs(cfg, recipe, train_split)
    torch.manual_seed(cfg.run.seed)
    built = model_from_config(cfg.model, num_classes=data.num_classes, input_shape=tuple(example.shape[1:]),
                              factory=model)
    if recipe.check_data is not None:
        recipe.check_data(cfg, stored_shape(cfg, data), built)
    return built


@dataclass
class Run:
    """The parts of one run in one process (strategy None in a dry build)."""

    cfg: Config
    recipe: Recipe
    device: torch.device
    data: Any
    train_split: Any
    strategy_class: type[Strategy]
    model: nn.Module
    strategy: Strategy | None = None
    optimizer: torch.optim.Optimizer | None = None
    ema: ExponentialMovingAverage | None = None
    lookahead: Lookahead | None = None
    lr_at: Callable[[int], float] | None = None
    preflight: str = ""
    """What the strategy's preflight found (a line for --dry-run)."""

    def batches(self, start_step: int = 0, prefetch: int | None = None) -> TrainBatches:
        """This process's training batches from `start_step` (its rank's share of each)."""
        cfg, strategy = self.cfg, self.strategy
        return TrainBatches(self.train_split, global_batch_size=cfg.data.batch_size, rank=strategy.rank,
                            world_size=strategy.world_size, seed=cfg.run.seed, start_step=start_step,
                            prefetch=cfg.data.prefetch if prefetch is None else prefetch, device=self.device,
                            augment=self.recipe.augment, augment_on=cfg.data.augment_on)


def build_run(cfg: Config, *, recipe: Recipe | None = None, data=None, model: Callable | None = None,
              dry: bool = False) -> Run:
    """Every part of a run in this process; with dry=True no process group is joined and
    nothing is wrapped (preflight: the model is built and checked, the strategy's
    preflight runs). cfg.run.steps is resolved from --epochs on the way."""
    recipe = check_config(cfg, recipe)
    device = resolve_device(cfg.parallel.device)
    data = open_data(cfg, data)
    train_split = split_of(cfg, data, "train")
    check_batch_fits(cfg, len(train_split))
    cfg = resolve_steps(cfg, len(train_split))
    cls = strategy_class(cfg.parallel, None if dry else world_size())
    strategy = None
    if not dry:
        configure_process(threads_per_worker(cfg.parallel.threads, cfg.parallel.workers))  # threads, allocator
        strategy = cls(cfg.parallel, device, recipe.loss)  # joins the process group first
    built = new_model(cfg, recipe, data, train_split, model)
    preflight = cls.preflight(cfg, built, example_inputs(cfg, recipe, train_split))
    run = Run(cfg=cfg, recipe=recipe, device=device, data=data, train_split=train_split, strategy_class=cls,
              model=built, strategy=strategy, preflight=preflight)
    if dry:
        return run
    built.to(device)
    recipe.prepare_model(built, train_split, recipe)  # e.g. fit the whitening layer (deterministic)
    optimizer = recipe.make_optimizer(built, cfg)
    for group in optimizer.param_groups:  # an optimizer of the user's own keeps its lr as the peak
        group.setdefault("lr_scale", group["lr"] / cfg.optim.lr)
    strategy.wrap(built, optimizer)
    # After wrap: a pipeline stage holds only its own layers.
    check_memory_budget(built, optimizer, cfg.parallel.max_memory_per_device, strategy.rank)
    run.optimizer, run.ema = optimizer, ExponentialMovingAverage(built, cfg.optim.ema_decay)
    # A recipe's Lookahead: on every process's own weights, or rank 0's alone where the
    # processes share one set (hogwild).
    if recipe.lookahead is not None and (strategy.is_rank0 or not strategy.shares_parameters):
        steps_per_epoch = steps_for_epochs(1, len(train_split), cfg.data.batch_size)
        run.lookahead = Lookahead(recipe.lookahead, cfg.run.steps, steps_per_epoch)
    run.lr_at = recipe.make_schedule(cfg, len(train_split))
    return run
