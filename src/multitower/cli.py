"""`multitower` command line: argparse subcommands -> a Config or arguments -> one call.

Every user mistake ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from multitower.config import AUGMENT_PLACES, COMPILE_MODES, PRECISIONS, Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, RunConfig
from multitower.errors import UserError

# The recipes of `train --recipe` (train/recipe.py RECIPES; listed here so --help needs no torch import).
RECIPE_NAMES = ("tutorial", "fast")

# Where the demo looks for the real CIFAR-10 images when no imported data set exists.
SHARED_CIFAR10 = Path("../shared/datasets/cifar10-jpeg/train")


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def add_train_flags(p: argparse.ArgumentParser) -> None:
    d, m, o, par, r = DataConfig(), ModelConfig(), OptimConfig(), ParallelConfig(), RunConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.dir, help="data-set directory made by `multitower data` (required for train)")
    g.add_argument("--label", default=d.label, choices=["fine", "coarse"], help="CIFAR-100 label byte (default: %(default)s)")
    g.add_argument("--batch-size", type=_whole_number, default=None,
                   help="global batch, examples per step over all workers (default: the recipe's; "
                        "tutorial 128, fast 512)")
    g.add_argument("--prefetch", type=_whole_number, default=d.prefetch, help="batches prepared ahead (default: %(default)s)")
    g.add_argument("--augment-on", default=d.augment_on, choices=list(AUGMENT_PLACES),
                   help="where batches are augmented: host (loader thread) or device (after copying the "
                        "uint8 images); auto: device on a GPU (default: %(default)s)")
    g.add_argument("--eval-split", default=d.eval_split, help="split evaluated by `eval` (default: %(default)s)")
    g = p.add_argument_group("recipe and model")
    g.add_argument("--recipe", default=o.recipe, choices=list(RECIPE_NAMES),
                   help="training recipe: tutorial (TF's CIFAR-10 tutorial) or fast (airbench: whitened "
                        "VGG-like net on 32x32, alternating flip, label smoothing, Nesterov SGD, warm-up + "
                        "linear decay, Lookahead, flip+translate TTA); it presets --model, --widths, "
                        "--batch-size, --lr, --ema-decay and the length of the run, flags given win "
                        "(default: %(default)s)")
    g.add_argument("--model", default=None, help="model name (default: the recipe's; tutorial cifar10-tf, "
                                                 "fast airbench)")
    g.add_argument("--width", type=_whole_number, default=m.width, help="channel multiplier (default: %(default)s)")
    g.add_argument("--widths", default=None,
                   help="airbench: channels of its 3 conv groups, e.g. 64,256,256 (airbench94) "
                        "(default: the fast recipe's, 32,128,128 for CPU)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None,
                   help="initial (tutorial) or peak (fast) learning rate (default: the recipe's; tutorial 0.1, "
                        "fast 1.5 x batch / 1024)")
    g.add_argument("--lr-decay-factor", type=float, default=o.lr_decay_factor, help="tutorial: staircase decay factor (default: %(default)s)")
    g.add_argument("--epochs-per-decay", type=float, default=o.epochs_per_decay, help="tutorial: epochs between decays (default: %(default)s)")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="weight moving-average decay (default: the recipe's; tutorial 0.9999, fast 0.99)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--strategy", default=par.strategy,
                   help="how workers cooperate: single, sync, local-sgd, hogwild, downpour, pipeline; "
                        "auto = single for 1 worker, sync for more (default: %(default)s)")
    g.add_argument("--workers", type=_whole_number, default=par.workers, help="worker processes (default: %(default)s)")
    g.add_argument("--device", default=par.device, choices=["auto", "cpu", "cuda"], help="device (default: %(default)s)")
    g.add_argument("--threads", type=_whole_number, default=par.threads,
                   help="CPU threads per worker, 0 = cores / workers (default: %(default)s)")
    g.add_argument("--grad-compression", default=par.grad_compression, choices=["none", "bf16", "powersgd"],
                   help="gradient all-reduce compression, sync strategy (default: %(default)s)")
    g.add_argument("--accumulate", type=_whole_number, default=par.accumulate,
                   help="micro-batches per step per worker, one all-reduce (default: %(default)s)")
    g.add_argument("--precision", default=par.precision, choices=PRECISIONS,
                   help="forward/backward precision; bf16/fp16 = autocast with fp32 weights and loss, "
                        "fp16 with dynamic loss scaling "
                        "(AMP on CUDA) (default: %(default)s)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=par.channels_last,
                   help="NHWC memory format for convs and images (default: on where the strategy "
                        "applies it: single, sync, local-sgd)")
    g.add_argument("--compile", default=par.compile, choices=COMPILE_MODES,
                   help="torch.compile the model in this mode; reduce-overhead = CUDA graphs, CUDA only "
                        "(default: %(default)s: 0.18x eager on a 2-core CPU; on an H200 reduce-overhead 1.92x "
                        "after compiling; single, sync, local-sgd)")
    g.add_argument("--timeout", type=float, default=par.timeout_s,
                   help="seconds a collective waits for a silent rank before failing (default: %(default)s)")
    g.add_argument("--max-restarts", type=_whole_number, default=par.max_restarts,
                   help="restarts of the worker group after a failure, resuming from the last checkpoint "
                        "(default: %(default)s)")
    g.add_argument("--sync-every", type=_whole_number, default=par.sync_every,
                   help="local-sgd: steps between averages of the workers' weights (default: %(default)s)")
    g.add_argument("--local-sgd-warmup", type=_whole_number, default=par.local_sgd_warmup,
                   help="local-sgd: fully synchronous steps before local steps begin (default: %(default)s)")
    g.add_argument("--ps", type=_whole_number, default=par.ps,
                   help="downpour: parameter-server processes, besides the --workers (default: %(default)s)")
    g.add_argument("--n-fetch", type=_whole_number, default=par.n_fetch,
                   help="downpour: steps between a worker's parameter fetches (default: %(default)s)")
    g.add_argument("--n-push", type=_whole_number, default=par.n_push,
                   help="downpour: steps between a worker's gradient pushes (default: %(default)s)")
    g.add_argument("--ps-optimizer", default=par.ps_optimizer, choices=["sgd", "adagrad"],
                   help="downpour: update applied by the servers; adagrad wants a ~20x smaller --lr "
                        "(default: %(default)s)")
    g.add_argument("--stages", type=_whole_number, default=par.stages,
                   help="pipeline: stages the network is cut into, one process each; --workers S x R runs R "
                        "data-parallel replicas of the pipeline (default: %(default)s)")
    g.add_argument("--microbatches", type=_whole_number, default=par.microbatches,
                   help="pipeline: micro-batches per replica's share of the global batch (default: %(default)s)")
    g.add_argument("--schedule", default=par.schedule, choices=["gpipe", "1f1b"],
                   help="pipeline: micro-batch schedule (default: %(default)s)")
    g.add_argument("--cut", default=par.cut,
                   help="pipeline: comma-separated layers where stages 2..S begin, e.g. local3; "
                        "empty = balanced by --balance (default: %(default)r)")
    g.add_argument("--balance", default=par.balance, choices=["params", "flops"],
                   help="pipeline: without --cut, balance the stages by parameter count or by forward "
                        "multiply-adds per example (default: %(default)s)")
    g.add_argument("--max-memory-per-device", type=int, default=par.max_memory_per_device,
                   help="bytes of parameters + gradients + optimizer state per device, 0 = no limit "
                        "(default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default=r.run_dir, help="run directory (default: %(default)s)")
    g.add_argument("--steps", type=_whole_number, default=None,
                   help="total training steps (default: tutorial 2000; fast: from --epochs)")
    g.add_argument("--epochs", type=float, default=None,
                   help="train this many epochs instead of --steps: steps = epochs x (training examples // "
                        "batch) (default: fast 10; tutorial: use --steps)")
    g.add_argument("--seed", type=_whole_number, default=r.seed, help="seed of weights, data order, distortions (default: %(default)s)")
    g.add_argument("--log-every", type=_whole_number, default=r.log_every, help="steps between log lines (default: %(default)s)")
    g.add_argument("--summary-every", type=_whole_number, default=r.summary_every,
                   help="steps between TensorBoard summaries, 0 = off (default: %(default)s)")
    g.add_argument("--checkpoint-every", type=_whole_number, default=r.checkpoint_every,
                   help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--keep-checkpoints", type=_whole_number, default=r.keep_checkpoints,
                   help="newest checkpoints kept (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    g.add_argument("--progress", default=r.progress, choices=["auto", "on", "off"],
                   help="progress bar; auto = only on a terminal (default: %(default)s)")
    g.add_argument("--dry-run", action="store_true", help="check the configuration and data, then exit")


def recipe_presets(a: argparse.Namespace) -> dict:
    """The recipe's values for the preset flags the user did not give (train/recipe.py)."""
    from multitower.models.airbench import parse_widths
    from multitower.train.recipe import get_recipe
    recipe = get_recipe(a.recipe)
    if a.steps is not None and a.epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    chosen = {key: getattr(a, key) for key in ("model", "widths", "batch_size", "ema_decay")}
    values = {key: recipe.defaults.get(key) if value is None else value for key, value in chosen.items()}
    fallback = {"model": ModelConfig().name, "widths": [], "batch_size": DataConfig().batch_size,
                "ema_decay": OptimConfig().ema_decay}
    values = {key: fallback[key] if value is None else value for key, value in values.items()}
    values["widths"] = list(parse_widths(values["widths"])) if values["widths"] else []
    if a.widths is None and values["model"] != recipe.defaults.get("model"):
        values["widths"] = []  # the recipe's widths belong to the recipe's model
    values["lr"] = a.lr if a.lr is not None else recipe.default_lr(values["batch_size"])
    if a.epochs is not None:
        if not a.epochs > 0:
            raise UserError(f"--epochs must be positive, got {a.epochs}")
        values["steps"], values["epochs"] = RunConfig().steps, a.epochs
    elif a.steps is not None:
        values["steps"], values["epochs"] = a.steps, 0.0
    else:
        values["steps"] = recipe.defaults.get("steps", RunConfig().steps)
        values["epochs"] = recipe.defaults.get("epochs", 0.0)
    return values


def config_from_args(a: argparse.Namespace) -> Config:
    v = recipe_presets(a)
    return Config(
        data=DataConfig(dir=a.data, label=a.label, batch_size=v["batch_size"], prefetch=a.prefetch, eval_split=a.eval_split,
                        augment_on=a.augment_on),
        model=ModelConfig(name=v["model"], width=a.width, widths=v["widths"]),
        optim=OptimConfig(recipe=a.recipe, lr=v["lr"], lr_decay_factor=a.lr_decay_factor,
                          epochs_per_decay=a.epochs_per_decay, ema_decay=v["ema_decay"]),
        parallel=ParallelConfig(strategy=a.strategy, workers=a.workers, device=a.device, threads=a.threads,
                                grad_compression=a.grad_compression, accumulate=a.accumulate,
                                precision=a.precision, channels_last=a.channels_last, compile=a.compile,
                                timeout_s=a.timeout, max_restarts=a.max_restarts,
                                sync_every=a.sync_every, local_sgd_warmup=a.local_sgd_warmup,
                                ps=a.ps, n_fetch=a.n_fetch, n_push=a.n_push, ps_optimizer=a.ps_optimizer,
                                stages=a.stages, microbatches=a.microbatches, schedule=a.schedule, cut=a.cut,
                                balance=a.balance,
                                max_memory_per_device=a.max_memory_per_device),
        run=RunConfig(run_dir=a.run_dir, steps=v["steps"], epochs=v["epochs"], seed=a.seed, log_every=a.log_every,
                      summary_every=a.summary_every, checkpoint_every=a.checkpoint_every,
                      keep_checkpoints=a.keep_checkpoints, resume=a.resume, progress=a.progress),
    ).validate()


def cmd_train(a: argparse.Namespace) -> None:
    cfg = config_from_args(a)
    if not cfg.data.dir:
        raise UserError("--data is required: make one with `multitower data import|download|synth`, "
                        "or run `multitower demo`")
    from multitower.parallel import STRATEGIES
    if cfg.parallel.strategy not in ("auto", *STRATEGIES):
        raise UserError(f"unknown --strategy {cfg.parallel.strategy!r}; known: auto, {', '.join(STRATEGIES)}")
    from multitower.launch import in_launched_worker, launch
    if a.dry_run:
        print(preflight(cfg))
        return
    if cfg.parallel.processes() > 1 and not in_launched_worker():
        preflight(cfg)
        result = launch(cfg)
    else:
        from multitower.train.loop import train
        result = train(cfg).__dict__
        if int(os.environ.get("RANK", 0)) != 0:
            return
    print(f"done: step {result['step']}, loss {result['loss']:.3f}, {result['wall_time_s']:.1f} s, "
          f"{result['examples_per_sec']:.1f} examples/sec")


def preflight(cfg: Config) -> str:
    """Everything train() checks before the first step, without touching the run
    directory; run before workers start, so that a bad flag fails once, here."""
    from multitower.data.records import open_dataset
    from multitower.models import model_from_config
    from multitower.train.loop import check_run_dir, describe_data, resolve_device, resolve_steps
    dataset = open_dataset(cfg.data.dir, label=cfg.data.label)
    split = dataset.split("train")
    cfg = resolve_steps(cfg, len(split))
    device = resolve_device(cfg.parallel.device)
    model = model_from_config(cfg.model, num_classes=dataset.fmt.num_classes)
    check_run_dir(Path(cfg.run.run_dir), cfg)
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
    from multitower.cluster.job import processes_per_node  # before the slower checks below
    processes_per_node(ParallelConfig(strategy=train_args.strategy, workers=train_args.workers,
                                      ps=train_args.ps).processes(), a.nodes)
    cfg = config_from_args(train_args)
    if not cfg.data.dir:
        raise UserError(f"--data is required in the training command, e.g. {CLUSTER_EXAMPLE}")
    checked = preflight(cfg)
    if dry_run:
        print(checked)
    code = run_cluster(a.nodes, rate_bps, command[1:], cfg.parallel.processes(), cores_per_node=a.cores_per_node,
                       max_restarts=cfg.parallel.max_restarts, dry_run=dry_run)
    if code:
        raise SystemExit(code)


def cmd_eval(a: argparse.Namespace) -> None:
    from multitower import eval as evaluation
    if a.once:
        result = evaluation.evaluate_run(a.run_dir, split=a.split, step=a.step, data_dir=a.data, device=a.device,
                                         batch_size=a.batch_size, use_ema=not a.raw_weights)
        print(result.table())
    else:
        evaluation.watch(a.run_dir, interval_s=a.interval, split=a.split, data_dir=a.data, device=a.device,
                         batch_size=a.batch_size, max_evals=a.max_evals)


def cmd_data(a: argparse.Namespace) -> None:
    from multitower.data import sources
    if a.data_command == "download":
        ds = sources.download_cifar10(a.out, url=a.url, md5=a.md5)
    elif a.data_command == "import":
        ds = sources.import_imagefolder(a.src, a.out, val=a.val, seed=a.seed, workers=a.workers or None)
    else:
        ds = sources.make_synthetic(a.out, train=a.train, val=a.val, seed=a.seed)
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
    cfg = Config(data=DataConfig(dir=str(chosen)),
                 run=RunConfig(run_dir=str(run_dir), steps=a.steps, resume=resume,
                               checkpoint_every=max(1, a.steps // 2))).validate()
    result = train(cfg)
    print(f"trained {result.step} steps in {result.wall_time_s:.1f} s ({result.examples_per_sec:.1f} examples/sec)")
    evaluation = evaluate_run(run_dir)
    print(evaluation.table())
    if open_dataset(chosen).generated:
        print("note: these figures are on GENERATED data, not CIFAR-10")


def cmd_devices(a: argparse.Namespace) -> None:
    from multitower.devices import run
    print(run(as_json=a.json))


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    from multitower.bench.cost_model import LINKS
    from multitower.plan import PlanOptions
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
                   help="timed steps of the profiling run, median taken (default: %(default)s)")
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
        profile_steps=a.profile_steps, link=a.link, intra_link=a.intra_link, devices_per_node=a.devices_per_node,
        nics_per_node=a.nics_per_node, bandwidth_gbps=a.bandwidth_gbps, latency_us=a.latency_us,
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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (argparse prints the usage too)."""

    def error(self, message: str):
        where = self.prog.removeprefix("multitower").strip()
        self.exit(2, f"multitower: error: {where + ': ' if where else ''}{message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="multitower", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model")
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="make a data set: download, import an image folder, or generate")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    from multitower.data.sources import CIFAR10_MD5, CIFAR10_URL
    q = data_sub.add_parser("download", help="download the official CIFAR-10 binary release (checksum-verified)")
    q.add_argument("--out", required=True, help="new directory for the data set")
    q.add_argument("--url", default=CIFAR10_URL, help="tarball address (default: the official one)")
    q.add_argument("--md5", default=CIFAR10_MD5, help="expected MD5 of the tarball (default: the official one)")
    q = data_sub.add_parser("import", help="convert an ImageFolder tree (class sub-folders) to the record format")
    q.add_argument("src", help="folder with one sub-folder of images per class")
    q.add_argument("--out", required=True, help="new directory for the data set")
    q.add_argument("--val", type=_whole_number, default=5000, help="images held out as the val split (default: %(default)s)")
    q.add_argument("--seed", type=_whole_number, default=0, help="seed of the val split (default: %(default)s)")
    q.add_argument("--workers", type=_whole_number, default=0, help="decoding processes, 0 = all cores (default: %(default)s)")
    q = data_sub.add_parser("synth", help="generate a learnable synthetic data set (labelled as generated)")
    q.add_argument("--out", required=True, help="new directory for the data set")
    q.add_argument("--train", type=_whole_number, default=20000, help="training images (default: %(default)s)")
    q.add_argument("--val", type=_whole_number, default=2000, help="validation images (default: %(default)s)")
    q.add_argument("--seed", type=_whole_number, default=0, help="generator seed (default: %(default)s)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"multitower: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multitower: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
