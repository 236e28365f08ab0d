"""`multitower train` and `multitower cluster`: flags -> a Config -> train(), launch() or
run_cluster().

A train flag is a Flag (multitower/flags.py): the generic ones are below, each strategy's
come from its own module. A setting's value is, by rank: the flag typed, then --config
FILE, then (with --resume of an existing run) the run's own config.json, else the
recipe's preset, else the dataclass default. The TensorFlow tutorial's own flags
(--train_dir, --max_steps, --num_gpus, --batch_size per tower, --data_dir,
--log_device_placement) are accepted with its meanings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
from pathlib import Path

from multitower.config import AUGMENT_PLACES, COMPILE_MODES, PRECISIONS, Config, ParallelConfig, RunConfig
from multitower.errors import Interrupted, UserError
from multitower.flags import Flag, add_flags, typed_settings, whole_number

RECIPE_NAMES = ("tutorial", "fast", "plain")  # train/recipe.py RECIPES (listed here: --help imports no torch)


def _widths(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _size(text: str) -> list[int]:
    """HxW (or one number for a square) -> [height, width]."""
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, e.g. 96x128, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, e.g. 96x128, got {text!r}")
    return parts


GROUPS = {
    "data": (
        Flag("--data", "data.dir", "data set: a directory made by `multitower data` (records; any resolution)"),
        Flag("--label", "data.label", "CIFAR-100 label byte", choices=("fine", "coarse")),
        Flag("--batch-size", "data.batch_size", "global batch, examples per step over all workers "
             "(the recipe's: tutorial 128, fast 512, plain 128)", type=whole_number),
        Flag("--image-size", "data.image_size", "resize every image to HxW pixels as it is read "
             "(none = the data's own resolution)", type=_size, metavar="HxW"),
        Flag("--prefetch", "data.prefetch", "batches prepared ahead", type=whole_number),
        Flag("--augment-on", "data.augment_on", "where batches are augmented: host (loader thread) or device "
             "(after copying the uint8 images); auto: device on a GPU", choices=AUGMENT_PLACES),
        Flag("--eval-split", "data.eval_split", "split evaluated by `eval`"),
    ),
    "recipe and model": (
        Flag("--recipe", "optim.recipe", "training recipe: tutorial (TF's CIFAR-10 tutorial), fast (airbench: "
             "whitened VGG-like net, alternating flip, label smoothing, Lookahead, TTA), plain (any model and "
             "image size: flip + translate, cross-entropy, Nesterov SGD, warm-up + linear decay); it presets "
             "--model, --widths, --batch-size, --lr, --ema-decay and the run's length, flags given win",
             choices=RECIPE_NAMES),
        Flag("--model", "model.name", "model: cifar10-tf, airbench, or a factory of your own as "
             "package.module:factory or path/to/file.py:factory (the recipe's)"),
        Flag("--width", "model.width", "cifar10-tf: channel multiplier", type=whole_number),
        Flag("--widths", "model.widths", "airbench: channels of its 3 conv groups, e.g. 64,256,256 "
             "(the fast recipe's, 32,128,128 for CPU)", type=_widths),
    ),
    "optimisation": (
        Flag("--lr", "optim.lr", "initial (tutorial) or peak (fast, plain) learning rate (the recipe's)", type=float),
        Flag("--lr-decay-factor", "optim.lr_decay_factor", "tutorial: staircase decay factor", type=float),
        Flag("--epochs-per-decay", "optim.epochs_per_decay", "tutorial: epochs between decays", type=float),
        Flag("--ema-decay", "optim.ema_decay", "weight moving-average decay (the recipe's)", type=float),
    ),
    "parallelism": (
        Flag("--strategy", "parallel.strategy", "how workers cooperate: single, sync, local-sgd, hogwild, "
             "downpour, pipeline; auto = single for 1 worker, sync for more"),
        Flag("--workers", "parallel.workers", "worker processes, of the whole job (downpour: its trainers)",
             type=whole_number),
        Flag("--device", "parallel.device", "device", choices=("auto", "cpu", "cuda")),
        Flag("--threads", "parallel.threads", "CPU threads per worker, 0 = cores / workers", type=whole_number),
        Flag("--precision", "parallel.precision", "forward/backward precision; bf16/fp16 = autocast with fp32 "
             "weights and loss, fp16 with dynamic loss scaling", choices=PRECISIONS),
        Flag("--channels-last", "parallel.channels_last", "NHWC memory format for convs and images (auto: on "
             "where the strategy applies it: single, sync, local-sgd)", boolean=True),
        Flag("--compile", "parallel.compile", "torch.compile the model in this mode; reduce-overhead = CUDA "
             "graphs, CUDA only (off: measured slower on CPU, docs/performance.md)", choices=COMPILE_MODES),
        Flag("--timeout", "parallel.timeout_s", "seconds a collective waits for a silent rank before failing",
             type=float),
        Flag("--max-restarts", "parallel.max_restarts", "restarts of the worker group after a failure, "
             "resuming from the last checkpoint", type=whole_number),
        Flag("--max-memory-per-device", "parallel.max_memory_per_device", "bytes of parameters + gradients + "
             "optimizer state per device, 0 = no limit", type=whole_number),
    ),
    "run": (
        Flag("--run-dir", "run.run_dir", "run directory"),
        Flag("--steps", "run.steps", "total training steps (tutorial 2000; fast: from --epochs)", type=whole_number),
        Flag("--epochs", "run.epochs", "train this many epochs instead of --steps: steps = epochs x (training "
             "examples // batch) (fast 10; 0 = use --steps)", type=float),
        Flag("--seed", "run.seed", "seed of weights, data order, distortions", type=whole_number),
        Flag("--log-every", "run.log_every", "steps between log lines", type=whole_number),
        Flag("--summary-every", "run.summary_every", "steps between TensorBoard summaries, 0 = off", type=whole_number),
        Flag("--checkpoint-every", "run.checkpoint_every", "steps between checkpoints", type=whole_number),
        Flag("--keep-checkpoints", "run.keep_checkpoints", "newest checkpoints kept", type=whole_number),
        Flag("--resume", "run.resume", "continue the run in --run-dir with its own settings", boolean=True),
        Flag("--progress", "run.progress", "progress bar; auto = only on a terminal", choices=("auto", "on", "off")),
    ),
}
TRAIN_FLAGS = tuple(flag for flags in GROUPS.values() for flag in flags)

# The TensorFlow tutorial's flags (cifar10_train.py, cifar10_multi_gpu_train.py, cifar10.py).
TUTORIAL_FLAGS = (
    ("--train_dir", "train_dir", "the tutorial's --train_dir: --run-dir", {}),
    ("--max_steps", "max_steps", "the tutorial's --max_steps: --steps", {"type": whole_number}),
    ("--num_gpus", "num_gpus", "the tutorial's --num_gpus: towers, i.e. --workers (one per GPU on CUDA)",
     {"type": whole_number}),
    ("--batch_size", "batch_size", "the tutorial's --batch_size: examples per TOWER, so the global --batch-size "
     "is this x --num_gpus (or --workers)", {"type": whole_number}),
    ("--data_dir", "data_dir", "the tutorial's --data_dir: --data", {}),
)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    from multitower.parallel import STRATEGIES  # each strategy's own flags
    defaults = Config().flat()
    for title, flags in GROUPS.items():
        add_flags(p.add_argument_group(title), flags, defaults.get)
    for name, cls in STRATEGIES.items():
        if cls.FLAGS:
            options = {f"parallel.options.{key}": value for key, value in vars(cls.Options()).items()}
            add_flags(p.add_argument_group(f"strategy {name} (only with --strategy {name})"), cls.FLAGS, options.get)
    g = p.add_argument_group("the TensorFlow tutorial's flags")
    for option, dest, help_text, extra in TUTORIAL_FLAGS:
        g.add_argument(option, dest=f"tutorial_{dest}", default=argparse.SUPPRESS, help=help_text, **extra)
    g.add_argument("--log_device_placement", dest="log_device_placement", action="store_true",
                   help="the tutorial's --log_device_placement: print where each rank's tensors and ops live")
    g = p.add_argument_group("modes")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a TOML file ([data], [optim], [parallel], [parallel.options], [run] "
                        "tables, as in config.json) or a run's config.json; flags typed win")
    g.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    g.add_argument("--dry-run", action="store_true", help="check the configuration and data, then exit")
    g.add_argument("--debug", action="store_true",
                   help="print the traceback of an internal error (it is always logged in RUN_DIR/logs/)")


def train_parser() -> argparse.ArgumentParser:
    """`multitower train`'s parser on its own (for `cluster -- train ...` and benchmarks)."""
    from multitower.cli.parser import OneLineParser
    parser = OneLineParser(prog="multitower train")
    add_train_flags(parser)
    return parser


def file_settings(path: str) -> dict:
    """The settings of a --config file, by Config path: TOML, or JSON (a run's config.json)."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise UserError(f"--config {path}: {exc.strerror or exc}") from None
    try:
        if file.suffix == ".json":
            raw = json.loads(text)
        else:
            import tomllib
            raw = tomllib.loads(text)
    except ValueError as exc:
        raise UserError(f"--config {path}: not valid {'JSON' if file.suffix == '.json' else 'TOML'}: "
                        f"{str(exc).splitlines()[0]}") from None
    return _flatten_file(raw, path)


def _flatten_file(raw: dict, path: str) -> dict:
    """{"optim": {"lr": 0.05}} -> {"optim.lr": 0.05}, every key checked against Config's."""
    known = Config().flat()
    settings = {}
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise UserError(f"--config {path}: {section!r} must be a table of settings, e.g. [{section}]")
        for key, value in values.items():
            if (section, key) == ("parallel", "options"):
                settings.update({f"parallel.options.{name}": v for name, v in value.items()})
            elif (section, key) == ("run", "resume"):
                continue  # a mode of the command, not a setting (a run's config.json may hold it)
            elif f"{section}.{key}" in known:
                settings[f"{section}.{key}"] = value
            else:
                raise UserError(f"--config {path}: unknown setting {section}.{key}")
    return settings


def given_settings(a: argparse.Namespace) -> dict:
    """The settings the command line gave, by Config path: --config's, then the flags typed
    (their defaults are SUPPRESSed) and the tutorial's, with paths made absolute."""
    given = file_settings(a.config) if getattr(a, "config", None) else {}
    typed = typed_settings(a)
    for dest, path in (("tutorial_train_dir", "run.run_dir"), ("tutorial_max_steps", "run.steps"),
                       ("tutorial_num_gpus", "parallel.workers"), ("tutorial_data_dir", "data.dir")):
        if hasattr(a, dest):
            if path in typed:
                raise UserError(f"give {dest.replace('tutorial_', '--')} or {path.rpartition('.')[2]}'s flag, not both")
            typed[path] = getattr(a, dest)
    if hasattr(a, "tutorial_batch_size"):  # per tower: the global batch is towers x it
        if "data.batch_size" in typed:
            raise UserError("give --batch_size (per tower, the tutorial's) or --batch-size (global), not both")
        towers = typed.get("parallel.workers", given.get("parallel.workers", ParallelConfig().workers))
        typed["data.batch_size"] = a.tutorial_batch_size * towers
    if getattr(a, "log_device_placement", False):
        typed["run.log_device_placement"] = True
    if "run.steps" in typed and "run.epochs" in typed:
        raise UserError("give --steps or --epochs, not both")
    given.update(typed)
    if given.get("data.dir"):
        given["data.dir"] = str(Path(given["data.dir"]).resolve())  # eval works from anywhere
    if "run.epochs" in typed:
        if not given["run.epochs"] > 0:
            raise UserError(f"--epochs must be positive, got {given['run.epochs']}")
    elif "run.steps" in typed:
        given["run.epochs"] = 0.0  # --steps wins over a recipe's (or the run's) epochs
    return given


def recipe_presets(given: dict) -> dict:
    """The recipe's values for the preset settings the command line did not give (train/recipe.py)."""
    from multitower.train.recipe import get_recipe
    defaults = Config()
    recipe = get_recipe(given.get("optim.recipe", defaults.optim.recipe))
    model = given.get("model.name", recipe.defaults.get("model", defaults.model.name))
    batch_size = given.get("data.batch_size", recipe.defaults.get("batch_size", defaults.data.batch_size))
    presets = {"model.name": model, "data.batch_size": batch_size, "optim.lr": recipe.default_lr(batch_size),
               "optim.ema_decay": recipe.defaults.get("ema_decay", defaults.optim.ema_decay),
               # the recipe's widths belong to the recipe's model
               "model.widths": list(recipe.defaults.get("widths", [])) if model == recipe.defaults.get("model") else []}
    if "run.epochs" in given and given["run.epochs"]:
        presets["run.steps"] = RunConfig().steps  # train() derives the steps from the epochs
    else:
        presets["run.steps"] = recipe.defaults.get("steps", RunConfig().steps)
        presets["run.epochs"] = recipe.defaults.get("epochs", 0.0)
    return presets


def config_from_args(a: argparse.Namespace) -> Config:
    """The run's Config: the defaults, the recipe's presets and the settings given; with
    --resume of an existing run, that run's own configuration and the settings given (a
    resume continues the run: changes that would alter its trajectory are refused)."""
    given = given_settings(a)
    from multitower.train.run_dir import check_resume, stored_config
    run_dir = Path(given.get("run.run_dir", RunConfig().run_dir))
    stored = stored_config(run_dir) if given.get("run.resume") else None
    if stored is not None:
        from multitower.parallel import strategy_class
        resumed = stored.with_values(given)
        # Before validate: its message names the run's values.
        check_resume(run_dir, stored, resumed, strategy_class(stored.parallel))
        return resumed.validate()
    return Config().with_values({**recipe_presets(given), **given}).validate()


def cmd_train(a: argparse.Namespace) -> None:
    if a.debug:
        from multitower.launch import DEBUG_ENV
        os.environ[DEBUG_ENV] = "1"  # for the workers too
    cfg = config_from_args(a)
    from multitower.train.build import check_config
    check_config(cfg)
    if a.print_config:
        print(cfg.to_json())
        return
    if not cfg.data.dir:
        raise UserError("--data is required: make one with `multitower data import|download|synth`, "
                        "or run `multitower demo`")
    from multitower.launch import in_launched_worker, launch, run_worker
    from multitower.parallel import processes
    if a.dry_run:
        print(preflight(cfg))
        return
    if processes(cfg.parallel) > 1 and not in_launched_worker():
        preflight(cfg)
        result = launch(cfg)
    elif in_launched_worker():  # started by torchrun: one worker of the job
        result = run_worker(cfg).__dict__
        if int(os.environ.get("RANK", 0)) != 0:
            return
    else:
        from multitower.train.checkpoint import CheckpointDir
        from multitower.train.loop import train
        try:
            with signals_as_interrupts():
                result = train(cfg).__dict__
        except Interrupted as exc:
            latest = CheckpointDir(Path(cfg.run.run_dir) / "checkpoints").latest_step()
            kept = (f"the newest checkpoint is step {latest} in {cfg.run.run_dir}; --resume continues"
                    if latest is not None else "no checkpoint was written yet")
            raise Interrupted(f"{exc}; {kept}", exc.exit_status - 128) from None
    if result["steps_trained"] == 0:
        # A restart found the run already at its last step (an asynchronous strategy's
        # survivors finished before the launcher saw a worker die).
        print(f"done: step {result['step']}, no step left to train, {result['wall_time_s']:.1f} s")
    else:
        print(f"done: step {result['step']}, loss {result['loss']:.3f}, {result['wall_time_s']:.1f} s, "
              f"{result['examples_per_sec']:.1f} examples/sec")


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP raise Interrupted in the main thread: the run
    records its state and exits in one line (Python's default for SIGTERM is a silent death)."""
    def interrupt(signum, frame):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def preflight(cfg: Config) -> str:
    """Everything train() checks before the first step, without joining a process group or
    touching the run directory: run before workers start, so that a bad flag fails once, here."""
    from multitower.data.loader import augments_on_device
    from multitower.train.build import build_run
    from multitower.train.checkpoint import CheckpointDir
    from multitower.train.loop import check_steps_ahead
    from multitower.train.run_dir import check_run_dir
    run = build_run(cfg, dry=True)
    cfg, run_dir = run.cfg, Path(run.cfg.run.run_dir)
    check_run_dir(run_dir, cfg, run.strategy_class)
    check_steps_ahead(cfg, CheckpointDir(run_dir / "checkpoints").latest_step() if cfg.run.resume else None,
                      restarted=False)
    # The step's fast path as the strategy will build it (a mode the device cannot run fails here).
    fast = run.strategy_class.fast_path(cfg.parallel, run.device)
    augment_place = "device" if augments_on_device(cfg.data.augment_on, run.device) else "host"
    params = sum(p.numel() for p in run.model.parameters())
    return "\n".join(line for line in (
        run.data.describe(),
        f"dry run: recipe {cfg.optim.recipe}, {cfg.model.name} ({params:,} parameters) on {run.device}, "
        f"{len(run.train_split)} training examples, global batch {cfg.data.batch_size}, {cfg.run.steps} steps, "
        f"strategy {run.strategy_class.name} x {cfg.parallel.workers}; run dir {cfg.run.run_dir}",
        run.preflight,
        f"fast path: {fast.precision}, {'channels_last' if fast.channels_last else 'NCHW'}, "
        f"compile {fast.compile_mode}, augmentation on the {augment_place}") if line)


CLUSTER_EXAMPLE = "multitower cluster --nodes 2 --link 1gbit -- train --data DIR --workers 2"


def cmd_cluster(a: argparse.Namespace) -> None:
    """Run the train command after `--` as a multi-node job on emulated nodes (cluster/)."""
    from multitower.cluster import parse_rate, run_cluster
    from multitower.cluster.network import check_rights
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if command[:1] != ["train"]:
        raise UserError(f"give the training command after --, e.g. {CLUSTER_EXAMPLE}")
    rate_bps = parse_rate(a.link)
    dry_run = a.dry_run or "--dry-run" in command
    if not dry_run:
        check_rights()  # before torch is imported: a user without the rights learns it at once
    # The train flags are checked here once, as `train` would, before any node exists.
    train_args = train_parser().parse_args(command[1:])
    from multitower.cluster.job import plan_nodes
    cfg = config_from_args(train_args)
    per_node = plan_nodes(cfg, a.nodes, a.ps_node, a.min_nodes)  # before the slower checks below
    if not cfg.data.dir:
        raise UserError(f"--data is required in the training command, e.g. {CLUSTER_EXAMPLE}")
    checked = preflight(cfg)
    if dry_run:
        print(checked)
    code = run_cluster(a.nodes, rate_bps, command[1:], per_node, cores_per_node=a.cores_per_node,
                       max_restarts=cfg.parallel.max_restarts, min_nodes=a.min_nodes, run_dir=cfg.run.run_dir,
                       dry_run=dry_run)
    if code:
        raise SystemExit(code)
