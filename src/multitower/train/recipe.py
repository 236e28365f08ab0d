"""Training recipes as data: which model, input pipeline, loss, optimizer and learning-rate
schedule a run uses, and how evaluation turns images into logits.

  tutorial  TensorFlow's CIFAR-10 tutorial (the default): cifar10-tf on 24x24 crops with the
            TF distortions, cross-entropy + L2 on local3/local4, plain SGD, staircase decay.
  fast      airbench (Keller Jordan's airbench94 / hlb-CIFAR10, the fastest published CIFAR-10
            training): the `airbench` net on full 32x32 images with a frozen patch-whitening
            first layer fit on the training data, alternating flip + 2-pixel reflect translation,
            per-channel normalisation, label smoothing 0.2, Nesterov SGD (momentum 0.85) with
            weight decay in the optimizer and a 64x learning rate on batch-norm shifts, a linear
            warm-up then linear decay (airbench's triangle: 0.2 -> 1 at 23% -> 0.07), the
            whitening bias trained for the first 3 epochs, Lookahead on the weights from
            epoch 3 (train/lookahead.py), and test-time augmentation over mirror images and
            1-pixel translations (airbench94's tta_level 2).
  plain     any network on images of any size (the one for your own model and data): random
            translation by up to 4 pixels (reflect padding) and flips, inputs scaled to about
            [-2, 2], cross-entropy, Nesterov SGD (momentum 0.9, weight decay 5e-4), a linear
            warm-up over 5% of the run then linear decay to 0.

A Recipe is data: the training loop calls its functions and never branches on its name.
The built-ins are found by name (cfg.optim.recipe); a Python user passes a Recipe of their
own (multitower.fit), e.g. `plain` with their loss and optimizer (with_overrides). Its
functions are top-level, so that a Recipe pickles to spawned workers. `unsupported` names
the strategies it cannot run with, with the reason (one-line UserError).

Batch norm under data parallelism (fast recipe): per replica. Each worker normalises with
the statistics of its own shard of the batch, as airbench's per-batch BN and the usual DDP
practice (SyncBatchNorm would add an all-reduce per BN layer per step, and torch 2.13 has
no SyncBatchNorm on CPU/gloo). Running statistics: with sync, DDP broadcasts rank 0's
buffers before each forward; with local-sgd and hogwild each worker keeps its own, and
checkpoints hold rank 0's. The moving average (train/ema.py) averages the running
statistics along with the weights, so eval sees a matching pair.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from multitower.data.augment import TutorialDistortions
from multitower.data.fast_augment import FlipTranslate
from multitower.errors import UserError
from multitower.losses import Loss, as_loss, cross_entropy
from multitower.models.cifar10_tf import TOWER_LOSS
from multitower.train.lookahead import LookaheadSchedule
from multitower.train.schedule import decay_steps_for, staircase_lr

@dataclass(frozen=True)
class Recipe:
    name: str
    augment: Any
    """Input pipeline: sample(n, generator, visit) -> draws (sliceable per rank), apply(uint8 images,
    draws) -> float training images, eval_transform(uint8 images) -> float eval images."""
    loss: Loss
    """The training loss (multitower.losses.Loss: a data term and a term of the weights)."""
    make_optimizer: Callable[[nn.Module, Any], torch.optim.Optimizer]
    """(model, cfg) -> optimizer. A param group's "lr_scale" multiplies the schedule's lr (default:
    the group's own lr over --lr, so an optimizer of your own keeps its lr as the peak); its
    "train_epochs", if set, is how many epochs it trains (lr 0 afterwards)."""
    make_schedule: Callable[[Any, int], Callable[[int], float]]
    """(cfg, training examples) -> lr_at(step): the learning rate of the update made at `step` (0-based)."""
    prepare_model: Callable[[nn.Module, Any, Any], None]
    """(model, training split, recipe) -> None: data-dependent initialisation before training
    (the fast recipe's whitening); must be deterministic, every rank calls it."""
    eval_logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(model in eval mode, eval images) -> logits; the fast recipe averages over mirror images
    and 1-pixel shifts (TTA)."""
    default_lr: Callable[[int], float]
    """Global batch size -> the --lr the recipe uses unless told otherwise."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """CLI presets for flags not given: model, widths, batch_size, ema_decay, steps or epochs."""
    unsupported: dict[str, str] = field(default_factory=dict)
    """Strategy -> why this recipe cannot run under it."""
    lookahead: LookaheadSchedule | None = None
    """Lookahead the loop applies to the weights while training (fast: airbench's), or None."""
    check_data: Callable[[Any, tuple[int, int, int], nn.Module], None] | None = None
    """(cfg, image shape (C, H, W), model) -> None, a one-line UserError for data or a model
    the recipe cannot train (the tutorial's 24x24 crops need CIFAR's 32x32 images)."""

    def with_overrides(self, loss=None, optimizer=None) -> "Recipe":
        """This recipe with a loss of your own ((logits, labels) -> loss, or a Loss) and/or
        an optimizer of your own (params -> torch.optim.Optimizer; its lr is the peak of
        the recipe's schedule)."""
        changes = {}
        if loss is not None:
            changes["loss"] = as_loss(loss)
        if optimizer is not None:
            changes["make_optimizer"] = OptimizerOverParameters(optimizer)
        return dataclasses.replace(self, **changes) if changes else self


@dataclass(frozen=True)
class OptimizerOverParameters:
    """make_optimizer from a user's factory of an optimizer over the model's parameters."""
    factory: Callable[[Any], torch.optim.Optimizer]

    def __call__(self, model: nn.Module, cfg) -> torch.optim.Optimizer:
        optimizer = self.factory(model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"optimizer must build a torch.optim.Optimizer from the parameters, got "
                            f"{type(optimizer).__name__}")
        return optimizer


def _no_preparation(model: nn.Module, split, recipe) -> None:
    pass


# --- tutorial ---------------------------------------------------------------------------

def _tutorial_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)


@dataclass(frozen=True)
class _Staircase:
    lr: float
    decay_steps: int
    factor: float

    def __call__(self, step: int) -> float:
        return staircase_lr(step, self.lr, self.decay_steps, self.factor)


def _tutorial_schedule(cfg, train_examples: int) -> Callable[[int], float]:
    decay_steps = decay_steps_for(train_examples, cfg.data.batch_size, cfg.optim.epochs_per_decay)
    return _Staircase(cfg.optim.lr, decay_steps, cfg.optim.lr_decay_factor)


def plain_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


def _tutorial_lr(batch_size: int) -> float:
    return 0.1


def _cifar_images_only(cfg, image_shape, model) -> None:
    if tuple(image_shape) != (3, 32, 32):
        c, h, w = image_shape
        raise UserError(f"--recipe {cfg.optim.recipe} trains on CIFAR's 3x32x32 images (the tutorial crops 24x24 "
                        f"of them), but {cfg.data.dir or 'the data'} holds {c}x{h}x{w}: use --recipe plain")


TUTORIAL = Recipe(
    name="tutorial", augment=TutorialDistortions(), loss=TOWER_LOSS,
    make_optimizer=_tutorial_optimizer, make_schedule=_tutorial_schedule,
    prepare_model=_no_preparation, eval_logits=plain_logits, default_lr=_tutorial_lr,
    defaults={"model": "cifar10-tf", "batch_size": 128, "ema_decay": 0.9999, "steps": 2000},
    check_data=_cifar_images_only,
)


# --- fast (airbench) ----------------------------------------------------------------------

@dataclass(frozen=True)
class FastHyper:
    """airbench94's hyperparameters, restated for a mean (not summed) loss over the batch.

    airbench94 sums the loss over a batch of B and gives torch's SGD lr = 11.5 / S and
    weight_decay = (0.0153 B / S) / lr, with S = 1024 (1 + 1 / (1 - momentum)). With a mean
    loss the same updates are lr = 11.5 B / S (= 1.5 x B / 1024 at momentum 0.85, so the lr
    scales linearly with the batch) and weight_decay = 0.0153 / 11.5 (independent of B).
    Batch-norm shifts train at 64x the lr with weight decay / 64, so that every parameter
    shrinks by the same lr x wd per step (airbench's bias_scaler).
    """

    momentum: float = 0.85
    lr_per_1024: float = 11.5 / (1 + 1 / (1 - 0.85))  # peak lr at batch 1024 (1.5)
    weight_decay: float = 0.0153 / 11.5  # ~1.33e-3, in the optimizer, not the loss
    bias_lr_scale: float = 64.0
    label_smoothing: float = 0.2
    warmup_fraction: float = 0.23  # of the run's steps, as airbench
    warmup_start: float = 0.2  # warm-up starts at this fraction of the peak lr, as airbench
    final_lr_fraction: float = 0.07  # the decay ends at this fraction of the peak lr, as airbench
    whitening_images: int = 5000  # training images the whitening layer is fit on (airbench: 5000)
    whitening_bias_epochs: int = 3  # the whitening layer's bias trains this long, then stays (airbench)


FAST = FastHyper()

# Default widths of the fast recipe's airbench net on this project's 2-core CPU, chosen by
# the measured training throughput (benchmarks/fast_throughput.py: full step at batch 512,
# 2 threads, channels_last; see the fast-recipe section of README.md): airbench94's
# 64/256/256 does ~150 images/s on a quiet machine (10 epochs of 45,000 images: ~50 min;
# measured 90.7%), 32/128/128 ~670 (~11 min; 88.2%). A short real run by default; on a GPU
# pass --widths 64,256,256 (airbench94's own).
FAST_CPU_WIDTHS = [32, 128, 128]


@dataclass(frozen=True)
class SmoothedCrossEntropy:
    """loss = (1 - s) * CE(logits, y) + s * mean_k(-log softmax(logits)_k); the plain
    cross-entropy is returned alongside for the logs (no gradient)."""
    smoothing: float

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor):
        logits, labels = logits.float(), labels.long()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        with torch.no_grad():
            cross_entropy = F.cross_entropy(logits, labels)
        return loss, cross_entropy


def label_smoothing_loss(smoothing: float) -> Loss:
    return Loss(data=SmoothedCrossEntropy(smoothing))


def _batch_norm_shifts(model: nn.Module) -> list[nn.Parameter]:
    return [m.bias for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None and m.bias.requires_grad]


def _fast_optimizer(model: nn.Module, cfg, hyper: FastHyper = FAST) -> torch.optim.Optimizer:
    """Three groups: the weights; the batch-norm shifts (64x lr); the whitening bias, trained
    for its first epochs only ("train_epochs": the loop gives the group lr 0 from then on,
    rather than requires_grad=False, which DDP's reducer would not expect)."""
    shifts = _batch_norm_shifts(model)
    whitening_bias = model.whiten.bias
    special = {id(p) for p in shifts} | {id(whitening_bias)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    groups = [{"params": others, "lr_scale": 1.0, "weight_decay": hyper.weight_decay},
              {"params": shifts, "lr_scale": hyper.bias_lr_scale,
               "weight_decay": hyper.weight_decay / hyper.bias_lr_scale},
              {"params": [whitening_bias], "lr_scale": 1.0, "weight_decay": hyper.weight_decay,
               "train_epochs": hyper.whitening_bias_epochs}]
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=hyper.momentum, nesterov=True)


def warmup_linear_decay(step: int, peak: float, total_steps: int, warmup_steps: int,
                        start_factor: float = 0.0, end_factor: float = 0.0) -> float:
    """Linear from start_factor x peak at step 0 to peak at warmup_steps, then linear to
    end_factor x peak at total_steps (airbench's triangle: 0.2, 1, 0.07)."""
    if step < warmup_steps:
        return peak * (start_factor + (1.0 - start_factor) * step / warmup_steps)
    remaining = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return peak * (end_factor + (1.0 - end_factor) * remaining)


@dataclass(frozen=True)
class WarmupLinearDecay:
    """warmup_linear_decay as lr_at(step), over the run's `warmup_fraction` and `total_steps`."""
    peak: float
    total_steps: int
    warmup_fraction: float
    start_factor: float = 0.0
    end_factor: float = 0.0

    def __call__(self, step: int) -> float:
        total = self.total_steps
        warmup = min(max(1, int(self.warmup_fraction * total)), max(total - 1, 0))
        return warmup_linear_decay(step, self.peak, total, warmup, self.start_factor, self.end_factor)


def _fast_schedule(cfg, train_examples: int, hyper: FastHyper = FAST) -> Callable[[int], float]:
    return WarmupLinearDecay(cfg.optim.lr, cfg.run.steps, hyper.warmup_fraction, hyper.warmup_start,
                             hyper.final_lr_fraction)


@torch.no_grad()
def fit_whitening(model: nn.Module, split, recipe: Recipe, images: int = FAST.whitening_images) -> None:
    """Fit the model's whitening layer on the first `images` training images, normalised as
    the training input is (not augmented): deterministic, so every rank fits the same."""
    count = min(images, len(split))
    raw, _ = split.gather(torch.arange(count).numpy())
    model.fit_whitening(recipe.augment.eval_transform(raw).to(next(model.buffers()).device))


def flip_tta_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of the logits of each image and of its mirror image."""
    return 0.5 * (model(images) + model(images.flip(-1)))


def flip_translate_tta_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """airbench94's test-time augmentation (its tta_level 2): half the flip-TTA logits of the
    image, and a quarter each of those of the image shifted by one pixel up-left and
    down-right (reflect padding), six forward passes in all."""
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (flip_tta_logits(model, padded[..., :-2, :-2]) + flip_tta_logits(model, padded[..., 2:, 2:]))
    return 0.5 * flip_tta_logits(model, images) + 0.5 * shifted


def _fast_lr(batch_size: int) -> float:
    return FAST.lr_per_1024 * batch_size / 1024


def _needs_whitening(cfg, image_shape, model) -> None:
    _cifar_images_only(cfg, image_shape, model)
    if not callable(getattr(model, "fit_whitening", None)):
        raise UserError(f"--recipe fast fits a patch-whitening first layer (model.fit_whitening): --model "
                        f"{cfg.model.name} has none; use --model airbench, or --recipe plain for your own model")


FAST_RECIPE = Recipe(
    name="fast", augment=FlipTranslate(pad=2), loss=label_smoothing_loss(FAST.label_smoothing),
    make_optimizer=_fast_optimizer, make_schedule=_fast_schedule,
    prepare_model=fit_whitening, eval_logits=flip_translate_tta_logits, lookahead=LookaheadSchedule(),
    default_lr=_fast_lr,
    defaults={"model": "airbench", "widths": FAST_CPU_WIDTHS, "batch_size": 512, "ema_decay": 0.99,
              "epochs": 10.0},
    unsupported={
        "downpour": "its parameter servers apply plain SGD/Adagrad to the parameters alone: no Nesterov "
                    "momentum, per-group learning rates or batch-norm statistics; use sync, local-sgd or hogwild",
        "pipeline": "its batch norm and whitening layers are not cut into pipeline stages; "
                    "use sync, local-sgd or hogwild",
    },
    check_data=_needs_whitening,
)


# --- plain: your model, your data ---------------------------------------------------------

@dataclass(frozen=True)
class PlainHyper:
    """The plain recipe's settings: the usual ResNet-on-CIFAR choices, at any resolution."""

    momentum: float = 0.9
    weight_decay: float = 5e-4
    pad: int = 4  # pixels of reflect-padded translation (the usual CIFAR random crop)
    warmup_fraction: float = 0.05
    lr_per_128: float = 0.1  # at global batch 128; linear in the batch


PLAIN = PlainHyper()


def _plain_optimizer(model: nn.Module, cfg, hyper: PlainHyper = PLAIN) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=hyper.momentum, nesterov=True,
                           weight_decay=hyper.weight_decay)


def _plain_schedule(cfg, train_examples: int, hyper: PlainHyper = PLAIN) -> Callable[[int], float]:
    return WarmupLinearDecay(cfg.optim.lr, cfg.run.steps, hyper.warmup_fraction)


def _plain_lr(batch_size: int) -> float:
    return PLAIN.lr_per_128 * batch_size / 128


def _plain_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits, labels)


def _fits_the_translation(cfg, image_shape, model) -> None:
    _, height, width = image_shape
    if min(height, width) <= PLAIN.pad:
        raise UserError(f"--recipe plain translates images by up to {PLAIN.pad} pixels: {height}x{width} is too small")


PLAIN_RECIPE = Recipe(
    name="plain",
    # (x / 255 - 0.5) / 0.25 on every channel: inputs in about [-2, 2] whatever the data set.
    augment=FlipTranslate(pad=PLAIN.pad, mean=(0.5,), std=(0.25,), alternate_flip=False),
    loss=Loss(data=_plain_cross_entropy), make_optimizer=_plain_optimizer, make_schedule=_plain_schedule,
    prepare_model=_no_preparation, eval_logits=plain_logits, default_lr=_plain_lr,
    defaults={"model": "cifar10-tf", "batch_size": 128, "ema_decay": 0.999, "steps": 2000},
    check_data=_fits_the_translation,
)

RECIPES: dict[str, Recipe] = {"tutorial": TUTORIAL, "fast": FAST_RECIPE, "plain": PLAIN_RECIPE}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown --recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def check_recipe(cfg, recipe: Recipe) -> None:
    """One-line UserError for a setting the recipe cannot run with (before any process)."""
    if cfg.parallel.strategy in recipe.unsupported:
        raise UserError(f"--recipe {recipe.name} cannot run with --strategy {cfg.parallel.strategy}: "
                        f"{recipe.unsupported[cfg.parallel.strategy]}")
    if cfg.model.widths and cfg.model.name != "airbench":
        raise UserError(f"--widths applies to the airbench model (--recipe fast), not {cfg.model.name}")
    if cfg.model.widths:
        from multitower.models.airbench import parse_widths
        parse_widths(cfg.model.widths)


def steps_for_epochs(epochs: float, train_examples: int, batch_size: int) -> int:
    """ceil(epochs x steps per epoch); the loader drops each epoch's last partial batch."""
    return max(1, math.ceil(epochs * max(1, train_examples // batch_size) - 1e-9))
