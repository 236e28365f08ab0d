"""The whole configuration of a run as nested dataclasses: one place for defaults.

Every field has a real default and says its unit. `validate()` raises a one-line
UserError naming the bad value. The resolved configuration is written into the
run directory (config.json) and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from multitower.errors import UserError

# --precision's values (parallel/precision.py implements them); here, torch-free, so that
# the CLI's --help imports no torch.
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")  # --compile: parallel/precision.py
AUGMENT_PLACES = ("auto", "host", "device")  # --augment-on: see data/loader.augments_on_device
# Below a second, gloo's own connection set-up times out before any rank could be silent
# (--timeout 0.000001 failed in rendezvous with a 71-line traceback).
MIN_TIMEOUT_S = 1.0
MAX_WORKERS = 1024  # processes one launcher starts on one machine; more is a typo
MAX_RESTARTS = 100  # restarts of a failing group; more hides a fault that recurs


def check_choice(flag: str, value, choices: tuple) -> None:
    """One-line UserError unless `value` is one of `choices` (Config.validate, and the
    classes that take these values directly: FastPath, the loaders)."""
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class DataConfig:
    dir: str = ""
    """Data-set directory in the CIFAR record format (see `multitower data`).
    Empty: the train command refuses; the demo finds or generates one."""
    label: str = "fine"
    """CIFAR-100 only: which label byte to train on, "fine" (100 classes) or "coarse" (20)."""
    batch_size: int = 128
    """Global batch in examples per synchronous step, summed over all workers (tutorial: 128)."""
    prefetch: int = 2
    """Batches prepared ahead by the background thread of each worker."""
    augment_on: str = "auto"
    """Where batches are augmented: "host" (the loader's thread, then copied), "device"
    (the uint8 images copied, then augmented there), "auto" (device for a GPU; see
    data/loader.augments_on_device). Same batches either way, to float rounding."""
    eval_split: str = "val"
    """Split that `eval` uses by default: "val" (import/synth) or "test" (official download)."""
    image_size: list[int] = field(default_factory=list)
    """[height, width] in pixels to resize every image to when the data set is read; empty =
    the data set's own resolution (nothing is resized unless asked)."""


@dataclass
class ModelConfig:
    name: str = "cifar10-tf"
    """Model from the registry in multitower.models."""
    width: int = 1
    """Channel/unit multiplier of cifar10-tf (1 = the tutorial's network)."""
    widths: list[int] = field(default_factory=list)
    """airbench (fast recipe): channels of its three conv groups, e.g. [64, 256, 256];
    empty = the model's default. Not used by cifar10-tf."""


@dataclass
class OptimConfig:
    recipe: str = "tutorial"
    """Training recipe (multitower.train.recipe.RECIPES): "tutorial" (the TF tutorial: 24x24 crops,
    TF distortions, SGD with staircase decay) or "fast" (airbench: whitened VGG-like net on 32x32,
    alternating flip + translate, Nesterov SGD, label smoothing, warm-up + linear decay, Lookahead,
    flip+translate TTA)."""
    lr: float = 0.1
    """Initial learning rate (tutorial INITIAL_LEARNING_RATE); the peak learning rate of the fast recipe."""
    lr_decay_factor: float = 0.1
    """Staircase decay factor (tutorial LEARNING_RATE_DECAY_FACTOR)."""
    epochs_per_decay: float = 350.0
    """Epochs between decays, converted to steps as the tutorial does (NUM_EPOCHS_PER_DECAY)."""
    ema_decay: float = 0.9999
    """Decay of the moving average of the weights used for evaluation (MOVING_AVERAGE_DECAY)."""
    loss_average_decay: float = 0.9
    """Decay of the moving average of the losses shown in logs and summaries."""


@dataclass
class ParallelConfig:
    strategy: str = "auto"
    """How workers cooperate: a key of multitower.parallel.STRATEGIES, or "auto"
    (single for one worker, sync for several)."""
    workers: int = 1
    """Worker processes (one per GPU on CUDA); across machines, all of the job's (downpour: its
    trainers, besides the parameter servers)."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    threads: int = 0
    """Intra-op CPU threads per worker; 0 = the machine's cores divided among the workers."""
    precision: str = "fp32"
    """Compute precision of forward/backward: "fp32", "bf16" (autocast; fp32 weights, optimizer
    and loss; AMP on CUDA) or "fp16" (the same with dynamic loss scaling). fp32 on CPU: measured ~5x slower in bf16 where oneDNN lacks bf16 kernels."""
    channels_last: bool | None = None
    """Conv weights and images in NHWC memory order (same function, only strides differ). None =
    auto: on where the strategy applies it (single, sync, local-sgd), measured faster on CPU
    (1.08-1.13x on the cifar10-tf step) and on an H200 (1.06x cifar10-tf, 1.45x airbench, fp32);
    parallel/precision.py."""
    compile: str = "off"
    """torch.compile of the model's forward (and so backward): "off", or its mode: "default",
    "max-autotune", "reduce-overhead" (CUDA graphs; CUDA only). Off: measured 0.18x eager on
    this repo's CPU; on an H200 1.21x ("default") and 1.92x ("reduce-overhead") after tens of
    seconds of compiling. Single, sync and local-sgd apply it."""
    timeout_s: float = 300.0
    """Seconds a collective may wait for a silent rank before the job fails."""
    max_restarts: int = 0
    """Times the launcher restarts the worker group after a failure (resuming from the last checkpoint)."""
    max_memory_per_device: int = 0
    """Bytes of parameters + gradients + optimizer state one device may hold; a process over it refuses to start. 0 = no limit."""
    options: dict[str, Any] = field(default_factory=dict)
    """The strategy's own settings by name (e.g. local-sgd's {"sync_every": 8}), as its
    module's Options dataclass defines them with their defaults and units
    (multitower/parallel/<strategy>.py); only the chosen strategy's are stored."""

    def resolved_strategy(self, world_size: int) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "sync" if world_size > 1 else "single"


@dataclass
class RunConfig:
    run_dir: str = "runs/cifar10"
    """Directory of this run: config, checkpoints, events, metrics."""
    steps: int = 2000
    """Total synchronous training steps (global_step at the end)."""
    epochs: float = 0.0
    """If positive: train this many epochs; steps = ceil(epochs x (training examples // batch size)),
    set by train() once it knows the training split (0 = use steps)."""
    seed: int = 0
    """Seed of the initial weights, the data order and the distortions."""
    log_every: int = 10
    """Steps between log lines and metrics.jsonl records (tutorial: 10)."""
    summary_every: int = 100
    """Steps between TensorBoard summaries (tutorial: 100); 0 disables them."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (tutorial: 1000); one is always written at the end."""
    keep_checkpoints: int = 5
    """How many of the newest checkpoints to keep."""
    resume: bool = False
    """Continue the run found in run_dir instead of refusing to touch it."""
    progress: str = "auto"
    """Progress bar: "auto" (only on an interactive terminal), "on" or "off"."""
    log_device_placement: bool = False
    """Print, on every rank, where its tensors and ops live (the tutorial's --log_device_placement)."""


# Settings a --resume may change: they leave the run's trajectory alone (how fast or where
# it runs, how often it logs; the same function to rounding), or extend it (steps, epochs).
# A resume that changes any other setting is refused (train/run_dir.py); a strategy names its
# own that may change (Strategy.resume_may_change, e.g. downpour's number of servers).
RESUME_MAY_CHANGE = frozenset({
    "data.prefetch", "data.augment_on", "data.eval_split",
    "parallel.workers", "parallel.device", "parallel.threads", "parallel.channels_last", "parallel.compile",
    "parallel.timeout_s", "parallel.max_restarts", "parallel.max_memory_per_device",
    "run.run_dir", "run.steps", "run.epochs", "run.log_every", "run.summary_every", "run.checkpoint_every",
    "run.keep_checkpoints", "run.resume", "run.progress", "run.log_device_placement",
})
# data.dir is compared by its resolved path; a resume may name a new one only where the old is
# gone (the data set moved).

# A setting's flag where it is not "--" + its name with dashes.
_FLAGS = {"data.dir": "--data", "model.name": "--model", "parallel.timeout_s": "--timeout"}


def flag_of(path: str) -> str:
    """The train flag of a dotted setting path: "optim.lr" -> "--lr", "data.dir" -> "--data",
    "parallel.options.sync_every" -> "--sync-every"."""
    return _FLAGS.get(path, "--" + path.rpartition(".")[2].replace("_", "-"))


# Where each strategy's settings lived before parallel.options: a config.json of then
# (and a checkpoint's copy of it) still reads, keeping its strategy's own.
_LEGACY_OPTIONS = {"grad_compression": "sync", "accumulate": "sync", "sync_every": "local-sgd",
                   "local_sgd_warmup": "local-sgd", "ps": "downpour", "n_fetch": "downpour", "n_push": "downpour",
                   "ps_optimizer": "downpour", "stages": "pipeline", "microbatches": "pipeline",
                   "schedule": "pipeline", "cut": "pipeline", "balance": "pipeline"}


def _moved_to_options(parallel: dict[str, Any]) -> dict[str, Any]:
    legacy = {key: parallel[key] for key in _LEGACY_OPTIONS if key in parallel}
    if not legacy:
        return parallel
    strategy = parallel.get("strategy", "auto")
    if strategy == "auto":  # auto was sync for several workers, single (no settings) for one
        strategy = "sync" if parallel.get("workers", 1) > 1 else "single"
    options = {key: value for key, value in legacy.items() if _LEGACY_OPTIONS[key] == strategy}
    rest = {key: value for key, value in parallel.items() if key not in legacy}
    return {**rest, "options": {**options, **rest.get("options", {})}}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        """Raise UserError for the first impossible setting; return self. The settings
        of the recipe and of the strategy (parallel.options) are checked by their own
        modules (train/build.check_config calls every check)."""
        positive = {
            "--batch-size": self.data.batch_size,
            "--steps": self.run.steps if not self.run.epochs else 1,
            "--log-every": self.run.log_every,
            "--checkpoint-every": self.run.checkpoint_every,
            "--keep-checkpoints": self.run.keep_checkpoints,
            "--workers": self.parallel.workers,
            "--width": self.model.width,
            "--prefetch": self.data.prefetch,
        }
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        check_choice("--augment-on", self.data.augment_on, AUGMENT_PLACES)
        if not self.run.epochs >= 0:
            raise UserError(f"--epochs must be positive (or 0: use --steps), got {self.run.epochs}")
        if self.run.summary_every < 0:
            raise UserError(f"--summary-every must be 0 (off) or positive, got {self.run.summary_every}")
        check_choice("--compile", self.parallel.compile, COMPILE_MODES)
        check_choice("--precision", self.parallel.precision, PRECISIONS)
        if not self.parallel.timeout_s >= MIN_TIMEOUT_S:
            raise UserError(f"--timeout must be at least {MIN_TIMEOUT_S:g} s (a collective's wait for a silent "
                            f"rank; default {ParallelConfig().timeout_s:g}), got {self.parallel.timeout_s:g}")
        if not 0 <= self.parallel.max_restarts <= MAX_RESTARTS:
            raise UserError(f"--max-restarts must be between 0 and {MAX_RESTARTS}, got {self.parallel.max_restarts}")
        if self.parallel.workers > MAX_WORKERS:
            raise UserError(f"--workers must be at most {MAX_WORKERS} processes, got {self.parallel.workers}")
        if self.parallel.max_memory_per_device < 0:
            raise UserError(f"--max-memory-per-device must be 0 (no limit) or positive bytes, "
                            f"got {self.parallel.max_memory_per_device}")
        if self.parallel.threads < 0:
            raise UserError(f"--threads must be 0 (automatic) or positive, got {self.parallel.threads}")
        if not self.optim.lr > 0:
            raise UserError(f"--lr must be positive, got {self.optim.lr}")
        if not 0 < self.optim.lr_decay_factor <= 1:
            raise UserError(f"--lr-decay-factor must be in (0, 1], got {self.optim.lr_decay_factor}")
        if not self.optim.epochs_per_decay > 0:
            raise UserError(f"--epochs-per-decay must be positive, got {self.optim.epochs_per_decay}")
        if not 0 <= self.optim.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.optim.ema_decay}")
        check_choice("--device", self.parallel.device, ("auto", "cpu", "cuda"))
        check_choice("--label", self.data.label, ("fine", "coarse"))
        check_choice("--progress", self.run.progress, ("auto", "on", "off"))
        if self.data.image_size and min(self.data.image_size) < 1:
            raise UserError(f"--image-size must be positive pixels, got {self.data.image_size}")
        return self

    def check_batch_split(self) -> None:
        """The global batch splits evenly among the workers (after the strategy's own
        checks, whose messages say more: train/build.check_config)."""
        if self.data.batch_size % self.parallel.workers:
            raise UserError(f"--batch-size {self.data.batch_size} is the global batch and must divide evenly "
                            f"among --workers {self.parallel.workers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every setting by its dotted path: {"data.batch_size": 128, "optim.lr": 0.1, ...};
        the strategy's own under "parallel.options.<name>"."""
        flat = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                if (section, key) == ("parallel", "options"):
                    flat.update({f"parallel.options.{name}": v for name, v in value.items()})
                else:
                    flat[f"{section}.{key}"] = value
        return flat

    def with_values(self, values: dict[str, Any]) -> "Config":
        """A copy with the settings at the dotted paths of `values` replaced
        ("parallel.options.<name>" sets one of the strategy's own)."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        changes: dict[str, dict[str, Any]] = {}
        options = dict(self.parallel.options)
        for path, value in values.items():
            section, _, key = path.partition(".")
            if section == "parallel" and key.startswith("options."):
                options[key.removeprefix("options.")] = value
                continue
            if section not in sections or key not in {f.name for f in dataclasses.fields(sections[section])}:
                raise UserError(f"unknown setting {path!r}")
            changes.setdefault(section, {})[key] = value
        if options != self.parallel.options:
            changes.setdefault("parallel", {})["options"] = options
        return dataclasses.replace(self, **{name: dataclasses.replace(sections[name], **fields)
                                            for name, fields in changes.items()})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Rebuild from to_dict() output; unknown keys (from a newer version) are an error."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in raw.items():
            if name not in sections:
                raise UserError(f"unknown configuration section {name!r}")
            section_cls = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                           "parallel": ParallelConfig, "run": RunConfig}[name]
            known = {f.name for f in dataclasses.fields(section_cls)}
            if name == "parallel":
                value = _moved_to_options(value)
            unknown = set(value) - known
            if unknown:
                raise UserError(f"unknown configuration keys in {name}: {sorted(unknown)}")
            kwargs[name] = section_cls(**value)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
