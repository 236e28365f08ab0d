"""`multitower` command line: argparse subcommands -> a Config or arguments -> one call.

Every user mistake ends with one line on stderr and exit status 2, never a traceback;
output cut short by a closed pipe (`multitower devices --json | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from multitower.config import AUGMENT_PLACES, COMPILE_MODES, PRECISIONS, Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, RunConfig
from multitower.errors import Interrupted, UserError

# The recipes of `train --recipe` (train/recipe.py RECIPES; listed here so --help needs no torch import).
RECIPE_NAMES = ("tutorial", "fast")

# Where the demo looks for the real CIFAR-10 images when no imported data set exists.
SHARED_CIFAR10 = Path("../shared/datasets/cifar10-jpeg/train")

# What `multitower --help` says the tool is for (the module docstring above is about the code).
# Wrapped here: the raw formatter that keeps TOP_EPILOG's columns keeps the description as written.
DESCRIPTION = """\
Train deep networks on many CPU cores, GPUs and machines: TensorFlow's CIFAR-10
multi-GPU tutorial and the classic parallel strategies (synchronous towers,
local SGD, Downpour, Hogwild, pipelines) on torch.distributed."""
TOP_EPILOG = """\
start here:
  multitower demo                      find or make a data set, train 300 steps, evaluate
  multitower devices                   what this machine offers and what train would pick
then: data -> train -> eval -> report; `multitower COMMAND --help` for each."""

# `train --help`'s examples; tests/test_cli.py parses every one, so they stay valid.
TRAIN_EXAMPLES = [
    ("multitower data synth --out data/synthetic", "make a data set first (or: data import DIR, data download)"),
    ("multitower train --data data/synthetic --steps 2000", "the tutorial's recipe, one process"),
    ("multitower train --data data/cifar10 --recipe fast --epochs 10 --run-dir runs/fast",
     "airbench's recipe"),
    ("multitower train --data data/cifar10 --workers 2 --strategy sync --run-dir runs/sync",
     "2 synchronous workers"),
    ("multitower train --data data/cifar10 --workers 4 --strategy local-sgd --sync-every 8 --dry-run",
     "check a configuration, train nothing"),
    ("multitower train --data data/cifar10 --run-dir runs/sync --resume --steps 4000",
     "continue a run to step 4000"),
]


def train_epilog() -> str:
    return "examples:\n" + "\n".join(f"  {command}\n      {what}" for command, what in TRAIN_EXAMPLES)


def version() -> str:
    """This package's version and torch's, read from its metadata: importing torch took 2.4-2.6 s
    on this repo's 2-core test machine."""
    from importlib.metadata import PackageNotFoundError, version as installed
    from multitower import __version__
    try:
        torch_version = installed("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"multitower {__version__} (torch {torch_version})"


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def flag(group, *names: str, default=None, **kwargs) -> None:
    """A train flag whose value is absent from the parsed arguments unless given (argparse's
    SUPPRESS), so that a resume can tell what the user changed; --help still shows the
    default, from the dataclass."""
    help_text = kwargs.pop("help", "")
    help_text = help_text.replace("%(default)s", str(default)).replace("%(default)r", repr(default))
    group.add_argument(*names, default=argparse.SUPPRESS, help=help_text, **kwargs)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    d, m, o, par, r = DataConfig(), ModelConfig(), OptimConfig(), ParallelConfig(), RunConfig()
    g = p.add_argument_group("data")
    flag(g, "--data", default=d.dir, help="data-set directory made by `multitower data` (required for train)")
    flag(g, "--label", default=d.label, choices=["fine", "coarse"], help="CIFAR-100 label byte (default: %(default)s)")
    flag(g, "--batch-size", type=_whole_number, default=None,
                   help="global batch, examples per step over all workers (default: the recipe's; "
                        "tutorial 128, fast 512)")
    flag(g, "--prefetch", type=_whole_number, default=d.prefetch, help="batches prepared ahead (default: %(default)s)")
    flag(g, "--augment-on", default=d.augment_on, choices=list(AUGMENT_PLACES),
                   help="where batches are augmented: host (loader thread) or device (after copying the "
                        "uint8 images); auto: device on a GPU (default: %(default)s)")
    flag(g, "--eval-split", default=d.eval_split, help="split evaluated by `eval` (default: %(default)s)")
    g = p.add_argument_group("recipe and model")
    flag(g, "--recipe", default=o.recipe, choices=list(RECIPE_NAMES),
                   help="training recipe: tutorial (TF's CIFAR-10 tutorial) or fast (airbench: whitened "
                        "VGG-like net on 32x32, alternating flip, label smoothing, Nesterov SGD, warm-up + "
                        "linear decay, Lookahead, flip+translate TTA); it presets --model, --widths, "
                        "--batch-size, --lr, --ema-decay and the length of the run, flags given win "
                        "(default: %(default)s)")
    flag(g, "--model", default=None, help="model name (default: the recipe's; tutorial cifar10-tf, "
                                                 "fast airbench)")
    flag(g, "--width", type=_whole_number, default=m.width, help="channel multiplier (default: %(default)s)")
    flag(g, "--widths", default=None,
                   help="airbench: channels of its 3 conv groups, e.g. 64,256,256 (airbench94) "
                        "(default: the fast recipe's, 32,128,128 for CPU)")
    g = p.add_argument_group("optimisation")
    flag(g, "--lr", type=float, default=None,
                   help="initial (tutorial) or peak (fast) learning rate (default: the recipe's; tutorial 0.1, "
                        "fast 1.5 x batch / 1024)")
    flag(g, "--lr-decay-factor", type=float, default=o.lr_decay_factor, help="tutorial: staircase decay factor (default: %(default)s)")
    flag(g, "--epochs-per-decay", type=float, default=o.epochs_per_decay, help="tutorial: epochs between decays (default: %(default)s)")
    flag(g, "--ema-decay", type=float, default=None,
                   help="weight moving-average decay (default: the recipe's; tutorial 0.9999, fast 0.99)")
    g = p.add_argument_group("parallelism")
    flag(g, "--strategy", default=par.strategy,
                   help="how workers cooperate: single, sync, local-sgd, hogwild, downpour, pipeline; "
                        "auto = single for 1 worker, sync for more (default: %(default)s)")
    flag(g, "--workers", type=_whole_number, default=par.workers, help="worker processes (default: %(default)s)")
    flag(g, "--device", default=par.device, choices=["auto", "cpu", "cuda"], help="device (default: %(default)s)")
    flag(g, "--threads", type=_whole_number, default=par.threads,
                   help="CPU threads per worker, 0 = cores / workers (default: %(default)s)")
    flag(g, "--grad-compression", default=par.grad_compression, choices=["none", "bf16", "powersgd"],
                   help="gradient all-reduce compression, sync strategy (default: %(default)s)")
    flag(g, "--accumulate", type=_whole_number, default=par.accumulate,
                   help="micro-batches per step per worker, one all-reduce (default: %(default)s)")
    flag(g, "--precision", default=par.precision, choices=PRECISIONS,
                   help="forward/backward precision; bf16/fp16 = autocast with fp32 weights and loss, "
                        "fp16 with dynamic loss scaling "
                        "(AMP on CUDA) (default: %(default)s)")
    flag(g, "--channels-last", action=argparse.BooleanOptionalAction, default=par.channels_last,
                   help="NHWC memory format for convs and images (default: on where the strategy "
                        "applies it: single, sync, local-sgd)")
    flag(g, "--compile", default=par.compile, choices=COMPILE_MODES,
                   help="torch.compile the model in this mode; reduce-overhead = CUDA graphs, CUDA only "
                        "(default: %(default)s: 0.18x eager on a 2-core CPU; on an H200 reduce-overhead 1.92x "
                        "after compiling; single, sync, local-sgd)")
    flag(g, "--timeout", type=float, default=par.timeout_s,
                   help="seconds a collective waits for a silent rank before failing (default: %(default)s)")
    flag(g, "--max-restarts", type=_whole_number, default=par.max_restarts,
                   help="restarts of the worker group after a failure, resuming from the last checkpoint "
                        "(default: %(default)s)")
    flag(g, "--sync-every", type=_whole_number, default=par.sync_every,
                   help="local-sgd: steps between averages of the workers' weights (default: %(default)s)")
    flag(g, "--local-sgd-warmup", type=_whole_number, default=par.local_sgd_warmup,
                   help="local-sgd: fully synchronous steps before local steps begin (default: %(default)s)")
    flag(g, "--ps", type=_whole_number, default=par.ps,
                   help="downpour: parameter-server processes, besides the --workers (default: %(default)s)")
    flag(g, "--n-fetch", type=_whole_number, default=par.n_fetch,
                   help="downpour: steps between a worker's parameter fetches (default: %(default)s)")
    flag(g, "--n-push", type=_whole_number, default=par.n_push,
                   help="downpour: steps between a worker's gradient pushes (default: %(default)s)")
    flag(g, "--ps-optimizer", default=par.ps_optimizer, choices=["sgd", "adagrad"],
                   help="downpour: update applied by the servers; adagrad wants a ~20x smaller --lr "
                        "(default: %(default)s)")
    flag(g, "--stages", type=_whole_number, default=par.stages,
                   help="pipeline: stages the network is cut into, one process each; --workers S x R runs R "
                        "data-parallel replicas of the pipeline (default: %(default)s)")
    flag(g, "--microbatches", type=_whole_number, default=par.microbatches,
                   help="pipeline: micro-batches per replica's share of the global batch (default: %(default)s)")
    flag(g, "--schedule", default=par.schedule, choices=["gpipe", "1f1b"],
                   help="pipeline: micro-batch schedule (default: %(default)s)")
    flag(g, "--cut", default=par.cut,
                   help="pipeline: comma-separated layers where stages 2..S begin, e.g. local3; "
                        "empty = balanced by --balance (default: %(default)r)")
    flag(g, "--balance", default=par.balance, choices=["params", "flops"],
                   help="pipeline: without --cut, balance the stages by parameter count or by forward "
                        "multiply-adds per example (default: %(default)s)")
    flag(g, "--max-memory-per-device", type=int, default=par.max_memory_per_device,
                   help="bytes of parameters + gradients + optimizer state per device, 0 = no limit "
                        "(default: %(default)s)")
    g = p.add_argument_group("run")
    flag(g, "--run-dir", default=r.run_dir, help="run directory (default: %(default)s)")
    flag(g, "--steps", type=_whole_number, default=None,
                   help="total training steps (default: tutorial 2000; fast: from --epochs)")
    flag(g, "--epochs", type=float, default=None,
                   help="train this many epochs instead of --steps: steps = epochs x (training examples // "
                        "batch) (default: fast 10; tutorial: use --steps)")
    flag(g, "--seed", type=_whole_number, default=r.seed, help="seed of weights, data order, distortions (default: %(default)s)")
    flag(g, "--log-every", type=_whole_number, default=r.log_every, help="steps between log lines (default: %(default)s)")
    flag(g, "--summary-every", type=_whole_number, default=r.summary_every,
                   help="steps between TensorBoard summaries, 0 = off (default: %(default)s)")
    flag(g, "--checkpoint-every", type=_whole_number, default=r.checkpoint_every,
                   help="steps between checkpoints (default: %(default)s)")
    flag(g, "--keep-checkpoints", type=_whole_number, default=r.keep_checkpoints,
                   help="newest checkpoints kept (default: %(default)s)")
    flag(g, "--resume", action="store_true", help="continue the run in --run-dir")
    flag(g, "--progress", default=r.progress, choices=["auto", "on", "off"],
                   help="progress bar; auto = only on a terminal (default: %(default)s)")
    g.add_argument("--dry-run", action="store_true", help="check the configuration and data, then exit")
    g.add_argument("--debug", action="store_true",
                   help="print the traceback of an internal error (it is always logged in RUN_DIR/logs/)")


# Parsed train arguments that are not settings of the Config.
NOT_SETTINGS = {"command", "func", "dry_run", "debug"}
# A flag's dest where it is not its setting's field name.
DEST_PATHS = {"data": "data.dir", "model": "model.name", "timeout": "parallel.timeout_s"}


def given_settings(a: argparse.Namespace) -> dict:
    """The settings the command line gave, by dotted path ({"optim.lr": 0.05, ...}): only
    flags actually typed (their defaults are SUPPRESSed), with paths made absolute."""
    fields = {name: f"{section}.{name}" for section, values in Config().to_dict().items() for name in values}
    given = {}
    for dest, value in vars(a).items():
        if dest in NOT_SETTINGS:
            continue
        given[DEST_PATHS.get(dest, fields.get(dest, dest))] = value
    if given.get("data.dir"):
        given["data.dir"] = str(Path(given["data.dir"]).resolve())  # eval works from anywhere
    if "model.widths" in given:
        from multitower.models.airbench import parse_widths
        given["model.widths"] = list(parse_widths(given["model.widths"]))
    if "run.steps" in given and "run.epochs" in given:
        raise UserError("give --steps or --epochs, not both")
    if "run.epochs" in given:
        if not given["run.epochs"] > 0:
            raise UserError(f"--epochs must be positive, got {given['run.epochs']}")
    elif "run.steps" in given:
        given["run.epochs"] = 0.0  # --steps wins over a recipe's (or the run's) epochs
    return given


def recipe_presets(given: dict) -> dict:
    """The recipe's values for the preset settings the command line did not give (train/recipe.py)."""
    from multitower.train.recipe import get_recipe
    recipe = get_recipe(given.get("optim.recipe", OptimConfig().recipe))
    model = given.get("model.name", recipe.defaults.get("model", ModelConfig().name))
    batch_size = given.get("data.batch_size", recipe.defaults.get("batch_size", DataConfig().batch_size))
    presets = {"model.name": model, "data.batch_size": batch_size, "optim.lr": recipe.default_lr(batch_size),
               "optim.ema_decay": recipe.defaults.get("ema_decay", OptimConfig().ema_decay),
               # the recipe's widths belong to the recipe's model
               "model.widths": list(recipe.defaults.get("widths", [])) if model == recipe.defaults.get("model") else []}
    if "run.epochs" in given:
        presets["run.steps"] = RunConfig().steps  # train() derives the steps from the epochs
    else:
        presets["run.steps"] = recipe.defaults.get("steps", RunConfig().steps)
        presets["run.epochs"] = recipe.defaults.get("epochs", 0.0)
    return presets


def config_from_args(a: argparse.Namespace) -> Config:
    """The run's Config: the defaults, the recipe's presets and the flags given; with
    --resume of an existing run, that run's own configuration and the flags given (a
    resume continues the run: train() refuses changes that would alter its trajectory)."""
    given = given_settings(a)
    from multitower.train.run_dir import check_resume, stored_config
    run_dir = Path(given.get("run.run_dir", RunConfig().run_dir))
    stored = stored_config(run_dir) if given.get("run.resume") else None
    if stored is not None:
        resumed = stored.with_values(given)
        check_resume(run_dir, stored, resumed)  # before validate: its message names the run's values
        return resumed.validate()
    return Config().with_values({**recipe_presets(given), **given}).validate()


def cmd_train(a: argparse.Namespace) -> None:
    if a.debug:
        from multitower.launch import DEBUG_ENV
        os.environ[DEBUG_ENV] = "1"  # for the workers too
    cfg = config_from_args(a)
    if not cfg.data.dir:
        raise UserError("--data is required: make one with `multitower data import|download|synth`, "
                        "or run `multitower demo`")
    from multitower.parallel import STRATEGIES
    if cfg.parallel.strategy not in ("auto", *STRATEGIES):
        raise UserError(f"unknown --strategy {cfg.parallel.strategy!r}; known: auto, {', '.join(STRATEGIES)}")
    from multitower.launch import in_launched_worker, launch, run_worker
    if a.dry_run:
        print(preflight(cfg))
        return
    if cfg.parallel.processes() > 1 and not in_launched_worker():
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
    """Everything train() checks before the first step, without touching the run
    directory; run before workers start, so that a bad flag fails once, here."""
    from multitower.data.records import open_dataset
    from multitower.models import model_from_config
    from multitower.train.checkpoint import CheckpointDir
    from multitower.train.loop import check_batch_fits, check_steps_ahead, describe_data, resolve_device, resolve_steps
    from multitower.train.run_dir import check_run_dir
    dataset = open_dataset(cfg.data.dir, label=cfg.data.label)
    split = dataset.split("train")
    check_batch_fits(cfg, len(split))
    cfg = resolve_steps(cfg, len(split))
    device = resolve_device(cfg.parallel.device)
    model = model_from_config(cfg.model, num_classes=dataset.fmt.num_classes)
    run_dir = Path(cfg.run.run_dir)
    check_run_dir(run_dir, cfg)
    check_steps_ahead(cfg, CheckpointDir(run_dir / "checkpoints").latest_step() if cfg.run.resume else None,
                      restarted=False)
    if cfg.parallel.strategy == "downpour":  # --ps beyond the tensor count: fail before starting processes
        from multitower.parallel.downpour import balance_shards
        balance_shards([p.numel() for p in model.parameters()], cfg.parallel.ps)
    if cfg.parallel.strategy == "pipeline":  # a bad --cut or --stages: fail before starting processes
        from multitower.parallel.pipeline import plan_stages
        plan_stages(model, cfg.parallel.stages, cfg.parallel.cut, cfg.parallel.balance)
    # The step's fast path as the strategy will build it (a mode the device cannot run fails here).
    from multitower.data.loader import augments_on_device
    from multitower.parallel import STRATEGIES
    fast = STRATEGIES[cfg.parallel.resolved_strategy(cfg.parallel.workers)].fast_path(cfg.parallel, device)
    augment_place = "device" if augments_on_device(cfg.data.augment_on, device) else "host"
    params = sum(p.numel() for p in model.parameters())
    return (f"{describe_data(dataset)}\n"
            f"dry run: recipe {cfg.optim.recipe}, {cfg.model.name} ({params:,} parameters) on {device}, "
            f"{len(split)} training examples, "
            f"global batch {cfg.data.batch_size}, {cfg.run.steps} steps, strategy {cfg.parallel.strategy} "
            f"x {cfg.parallel.workers}; run dir {cfg.run.run_dir}\n"
            f"fast path: {fast.precision}, {'channels_last' if fast.channels_last else 'NCHW'}, "
            f"compile {fast.compile_mode}, augmentation on the {augment_place}")


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
    train_args = build_parser().parse_args(command)
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


def cmd_eval(a: argparse.Namespace) -> None:
    from multitower import eval as evaluation
    if a.once:
        result = evaluation.evaluate_run(a.run_dir, split=a.split, step=a.step, data_dir=a.data, device=a.device,
                                         batch_size=a.batch_size, use_ema=not a.raw_weights, progress=a.progress)
        print(result.table())
    else:
        evaluation.watch(a.run_dir, interval_s=a.interval, split=a.split, data_dir=a.data, device=a.device,
                         batch_size=a.batch_size, max_evals=a.max_evals, progress=a.progress)


def cmd_data(a: argparse.Namespace) -> None:
    from multitower.data import sources
    if a.data_command == "download":
        ds = sources.download_cifar10(a.out, url=a.url, md5=a.md5, progress=a.progress)
    elif a.data_command == "import":
        ds = sources.import_imagefolder(a.src, a.out, val=a.val, seed=a.seed, workers=a.workers or None,
                                        progress=a.progress)
    else:
        ds = sources.make_synthetic(a.out, train=a.train, val=a.val, seed=a.seed, progress=a.progress)
    counts = ", ".join(f"{name} {len(ds.split(name))}" for name in ds.splits)
    label = " (GENERATED data)" if ds.generated else ""
    print(f"wrote {ds.root}{label}: {counts} examples, {len(ds.class_names)} classes")


def cmd_demo(a: argparse.Namespace) -> None:
    """The README's main job: find or make a data set, train briefly, evaluate once."""
    from multitower.data import sources
    from multitower.data.records import open_dataset
    from multitower.eval import evaluate_run
    from multitower.train.loop import train
    data_dir = Path(a.data_root) / "cifar10"
    synth_dir = Path(a.data_root) / "synthetic"
    if (data_dir / "multitower.json").exists():
        chosen = data_dir
    elif a.cifar_images.is_dir():
        print(f"importing CIFAR-10 from {a.cifar_images} into {data_dir} (once; ~1 min)", flush=True)
        sources.import_imagefolder(a.cifar_images, data_dir, val=5000, seed=0)
        chosen = data_dir
    else:
        print(f"no CIFAR-10 found at {a.cifar_images}: using GENERATED data instead", flush=True)
        if not (synth_dir / "multitower.json").exists():
            sources.make_synthetic(synth_dir)
        chosen = synth_dir
    run_dir = Path(a.run_dir)
    resume = (run_dir / "config.json").exists()
    from multitower.train.checkpoint import CheckpointDir
    done = (CheckpointDir(run_dir / "checkpoints").latest_step() or 0) if resume else 0
    if done:
        print(f"{run_dir} holds a demo run at step {done}: training {a.steps} steps more", flush=True)
    cfg = Config(data=DataConfig(dir=str(chosen.resolve())),
                 run=RunConfig(run_dir=str(run_dir), steps=done + a.steps, resume=resume,
                               checkpoint_every=max(1, a.steps // 2))).validate()
    result = train(cfg)
    print(f"trained {result.step} steps in {result.wall_time_s:.1f} s ({result.examples_per_sec:.1f} examples/sec)")
    evaluation = evaluate_run(run_dir, progress="auto")
    print(evaluation.table())
    if open_dataset(chosen).generated:
        print("note: these figures are on GENERATED data, not CIFAR-10")
    print(demo_next_steps(run_dir, chosen, result.step + a.steps))


def demo_next_steps(run_dir: Path, data_dir: Path, to_step: int) -> str:
    """The demo's last words: where to look at the run, and how to take it further."""
    return "\n".join([
        "next:",
        f"  tensorboard --logdir {run_dir / 'events'}",
        "      loss, learning rate, activations and precision @ 1 (events/eval) in a browser",
        f"  multitower report {run_dir} --out report.html",
        "      one HTML page: curves, throughput, per-class accuracy, confusion matrix",
        f"  multitower train --run-dir {run_dir} --resume --steps {to_step}",
        f"      train on to step {to_step} (a resume takes the run's own settings), then "
        f"`multitower eval {run_dir} --once`"])


def cmd_devices(a: argparse.Namespace) -> None:
    from multitower.devices import run
    print(run(as_json=a.json))


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    from multitower.bench.cost_model import LINKS
    from multitower.plan import PROFILE_SPREAD_WARN, PlanOptions
    o = PlanOptions()
    g = p.add_argument_group("workload")
    g.add_argument("--model", default=o.model, help="model name (default: %(default)s)")
    g.add_argument("--width", type=_whole_number, default=o.width, help="channel multiplier (default: %(default)s)")
    g.add_argument("--batch-size", type=_whole_number, default=o.batch_size,
                   help="examples per device per step; with --strong-scaling the global batch (default: %(default)s)")
    g.add_argument("--strong-scaling", action="store_true", help="keep the global batch fixed and split it over the devices")
    g.add_argument("--compute-ms-per-example", type=float, default=o.compute_ms_per_example,
                   help="ms of forward+backward+update per example on one device; 0 = measure it (default: %(default)s)")
    g.add_argument("--from-benchmark", default=o.from_benchmark,
                   help="read the compute time from a benchmarks/train_step.py JSON (default: measure)")
    g.add_argument("--threads", type=_whole_number, default=o.threads,
                   help="CPU threads of the profiling run, 0 = all cores (default: %(default)s)")
    g.add_argument("--profile-steps", type=_whole_number, default=o.profile_steps,
                   help="steps in each repetition of the profiling run (default: %(default)s)")
    g.add_argument("--profile-reps", type=_whole_number, default=o.profile_reps,
                   help=f"timed repetitions of train's step, the median counts; a spread over "
                        f"{100 * PROFILE_SPREAD_WARN:.0f}%% is said (default: %(default)s)")
    g = p.add_argument_group("interconnect")
    g.add_argument("--link", default=o.link, choices=list(LINKS), help="link between nodes (default: %(default)s)")
    g.add_argument("--intra-link", default=o.intra_link, choices=list(LINKS),
                   help="link between the devices of a node (default: %(default)s)")
    g.add_argument("--devices-per-node", type=_whole_number, default=o.devices_per_node,
                   help="devices in one node (default: %(default)s)")
    g.add_argument("--nics-per-node", type=_whole_number, default=o.nics_per_node,
                   help="inter-node links per node (default: %(default)s)")
    g.add_argument("--bandwidth-gbps", type=float, default=o.bandwidth_gbps,
                   help="measured inter-node bandwidth, Gbit/s; 0 = the --link preset's (default: %(default)s)")
    g.add_argument("--latency-us", type=float, default=o.latency_us,
                   help="measured inter-node latency per message, microseconds; 0 = the preset's (default: %(default)s)")
    g.add_argument("--calibration", default=o.calibration,
                   help="use the alpha/beta of a `plan --calibrate` JSON as the inter-node link (default: none)")
    g = p.add_argument_group("strategies")
    g.add_argument("--no-overlap", action="store_true",
                   help="sync: all-reduce after backward instead of overlapped with it (default: overlapped)")
    g.add_argument("--sync-every", type=_whole_number, default=o.sync_every,
                   help="local SGD: steps between weight averages (default: %(default)s)")
    g.add_argument("--ps", type=_whole_number, default=o.ps, help="downpour: parameter servers (default: %(default)s)")
    g.add_argument("--ps-period", type=_whole_number, default=o.ps_period,
                   help="downpour: steps between a worker's push+fetch (default: %(default)s)")
    g.add_argument("--stages", type=_whole_number, default=o.stages, help="pipeline: stages (default: %(default)s)")
    g.add_argument("--micro-batches", type=_whole_number, default=o.micro_batches,
                   help="pipeline: micro-batches per step, 0 = 4 x stages (default: %(default)s)")
    g.add_argument("--tolerance", type=float, default=o.tolerance,
                   help="fraction by which an approximate strategy (local SGD, downpour) must beat an exact one "
                        "to win (default: %(default)s)")
    g.add_argument("--max-devices", type=_whole_number, default=o.max_devices,
                   help="largest device count in the table (default: %(default)s)")
    g = p.add_argument_group("modes and output")
    g.add_argument("--out-dir", default=o.out_dir, help="where plan.json, plan.png and the calibration and "
                                                        "validation JSON go (default: %(default)s)")
    g.add_argument("--calibrate", action="store_true",
                   help="measure gloo all-reduce alpha and beta on loopback with 2 processes (1 KB .. 16 MB), ~1 min")
    g.add_argument("--validate", action="store_true",
                   help="predict this machine's 1- and 2-worker sync runs and compare with real ones, ~2 min a round")
    g.add_argument("--validate-steps", type=_whole_number, default=30,
                   help="training steps of each measured run (default: %(default)s)")
    g.add_argument("--validate-reps", type=_whole_number, default=2,
                   help="rounds of profile + run per worker count, medians compared (default: %(default)s)")
    g.add_argument("--data", default="", help="data set for --validate (default: a generated one)")
    g.add_argument("--dry-run", action="store_true", help="print the plan's inputs and exit, measuring nothing")


def cmd_plan(a: argparse.Namespace) -> None:
    from multitower import plan
    opts = plan.PlanOptions(
        model=a.model, width=a.width, batch_size=a.batch_size, strong_scaling=a.strong_scaling,
        compute_ms_per_example=a.compute_ms_per_example, from_benchmark=a.from_benchmark, threads=a.threads,
        profile_steps=a.profile_steps, profile_reps=a.profile_reps, link=a.link, intra_link=a.intra_link,
        devices_per_node=a.devices_per_node, nics_per_node=a.nics_per_node, bandwidth_gbps=a.bandwidth_gbps, latency_us=a.latency_us,
        calibration=a.calibration, overlap=not a.no_overlap, sync_every=a.sync_every, ps=a.ps,
        ps_period=a.ps_period, stages=a.stages, micro_batches=a.micro_batches, tolerance=a.tolerance,
        max_devices=a.max_devices, out_dir=a.out_dir).validate()
    if a.calibrate and a.validate:
        raise UserError("--calibrate and --validate are separate runs (--validate calibrates by itself "
                        "unless given --calibration FILE)")
    if a.dry_run:
        mode = "calibrate" if a.calibrate else "validate" if a.validate else "plan"
        print(f"dry run ({mode}), nothing measured or written:\n{plan.describe_inputs(opts)}")
    elif a.calibrate:
        print(plan.calibrate(opts))
    elif a.validate:
        from multitower.bench.validate_plan import run_validation
        print(run_validation(opts, steps=a.validate_steps, data_dir=a.data, reps=a.validate_reps))
    else:
        print(plan.run(opts))


def cmd_report(a: argparse.Namespace) -> None:
    from multitower.report import check_runs, write_report
    if a.dry_run:
        print(check_runs(a.run_dirs))
        return
    print(f"wrote {write_report(a.run_dirs, a.out)}")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    """--progress of the commands besides train (whose flag lives with its others)."""
    from multitower.progress import MODES
    p.add_argument("--progress", default="auto", choices=MODES,
                   help="progress on stderr: auto = a bar on a terminal, else a few plain lines; "
                        "on = the bar anywhere; off = nothing (default: %(default)s)")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (argparse prints the usage too)."""

    def error(self, message: str):
        where = self.prog.removeprefix("multitower").strip()
        self.exit(2, f"multitower: error: {where + ': ' if where else ''}{message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="multitower", description=DESCRIPTION, epilog=TOP_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version(),
                        help="print multitower's and torch's versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model", epilog=train_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cluster", help="run a train command as a multi-node job on emulated nodes of this host "
                                       "(network namespaces, shaped links; root)",
                       description="Run `train ...` as a real multi-node job: each node a network namespace "
                                   "with its own address (198.18.0.100 + i) on one switch, its link shaped "
                                   "by tc tbf (bandwidth only: no latency, netem is not available), torch's "
                                   "launcher in each node as torchrun --nnodes N would, the cores divided "
                                   "among the nodes. Everything made is removed at the end. See docs/cluster.md.")
    p.add_argument("--nodes", type=_whole_number, default=2, help="emulated nodes (default: %(default)s)")
    p.add_argument("--link", default="unshaped",
                   help="each node's link bandwidth, both directions, in tc units: 1gbit, 200mbit, 50mbit "
                        "(tc's mbps means megaBYTES/s), or unshaped (default: %(default)s)")
    p.add_argument("--cores-per-node", type=_whole_number, default=0,
                   help="cores each node runs on; 0 = this machine's cores / nodes, at least 1, nodes sharing "
                        "cores when there are more nodes than cores (default: %(default)s)")
    p.add_argument("--ps-node", action="store_true",
                   help="downpour: its --ps parameter servers on a node of their own, the last; the --workers "
                        "divided among the other nodes (default: every node runs an equal share of all processes)")
    p.add_argument("--min-nodes", type=_whole_number, default=0,
                   help="elastic job (torchrun --nnodes MIN:MAX): it goes on from the newest checkpoint while this "
                        "many nodes are left (needs --max-restarts 1 or more; node 0 serves the rendezvous and "
                        "must stay); 0 = --nodes, every node needed (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the training command and print the network and each node's launcher command; "
                        "make and start nothing (needs no root)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- train FLAGS: the training command; its --workers (and --ps) count the whole "
                        "job's processes, divided among the nodes")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("eval", help="evaluate a run's checkpoints (moving-average weights)")
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument("--once", action="store_true", help="evaluate the newest checkpoint and exit")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between looks for new checkpoints (default: %(default)s)")
    p.add_argument("--max-evals", type=_whole_number, default=None, help="stop after this many evaluations")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's --eval-split)")
    p.add_argument("--step", type=_whole_number, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--data", default=None, help="data-set directory (default: the run's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default: %(default)s)")
    p.add_argument("--batch-size", type=_whole_number, default=500, help="examples per batch (default: %(default)s)")
    p.add_argument("--raw-weights", action="store_true", help="evaluate the trained weights, not their moving average")
    add_progress_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="make a data set: download, import an image folder, or generate")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    from multitower.data.sources import CIFAR10_MD5, CIFAR10_URL
    q = data_sub.add_parser("download", help="download the official CIFAR-10 binary release (checksum-verified)")
    q.add_argument("--out", required=True, help="new directory for the data set")
    q.add_argument("--url", default=CIFAR10_URL, help="tarball address (default: the official one)")
    q.add_argument("--md5", default=CIFAR10_MD5, help="expected MD5 of the tarball (default: the official one)")
    add_progress_flag(q)
    q = data_sub.add_parser("import", help="convert an ImageFolder tree (class sub-folders) to the record format")
    q.add_argument("src", help="folder with one sub-folder of images per class")
    q.add_argument("--out", required=True, help="new directory for the data set")
    q.add_argument("--val", type=_whole_number, default=5000, help="images held out as the val split (default: %(default)s)")
    q.add_argument("--seed", type=_whole_number, default=0, help="seed of the val split (default: %(default)s)")
    q.add_argument("--workers", type=_whole_number, default=0, help="decoding processes, 0 = all cores (default: %(default)s)")
    add_progress_flag(q)
    q = data_sub.add_parser("synth", help="generate a learnable synthetic data set (labelled as generated)")
    q.add_argument("--out", required=True, help="new directory for the data set")
    q.add_argument("--train", type=_whole_number, default=20000, help="training images (default: %(default)s)")
    q.add_argument("--val", type=_whole_number, default=2000, help="validation images (default: %(default)s)")
    q.add_argument("--seed", type=_whole_number, default=0, help="generator seed (default: %(default)s)")
    add_progress_flag(q)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("demo", help="the README's main job: a short real training run plus evaluation")
    p.add_argument("--run-dir", default="runs/demo", help="run directory (default: %(default)s)")
    p.add_argument("--steps", type=_whole_number, default=300, help="training steps (default: %(default)s)")
    p.add_argument("--data-root", default="data", help="where data sets are kept (default: %(default)s)")
    p.add_argument("--cifar-images", type=Path, default=SHARED_CIFAR10,
                   help="CIFAR-10 ImageFolder to import when present (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("devices", help="what this machine offers for training, and what train would pick")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("plan", help="predict each strategy's scaling to 1024 devices (alpha-beta cost model)")
    add_plan_flags(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="one self-contained HTML page comparing runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by train")
    p.add_argument("--out", default="report.html", help="HTML file to write (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="check the run directories, print what they hold, write nothing")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)  # inside: --help can meet a closed pipe too
        args.func(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except UserError as exc:
        print(f"multitower: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("multitower: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): what is left of the output has nowhere to go.
        # Python's documented way (signal module, "Note on SIGPIPE"): point stdout at
        # devnull so that the interpreter's final flush does not fail again, exit 1.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug: one line, the traceback logged (and printed with --debug)
        from multitower.launch import describe_bug
        run_dir = getattr(args, "run_dir", None) if getattr(args, "command", None) == "train" else None
        print(f"multitower: error: {describe_bug(exc, run_dir or '', 0)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
