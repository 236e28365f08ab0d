"""`multitower` command line: argparse subcommands -> a Config or arguments -> one call.

Every user mistake ends with one line on stderr and exit status 2, never a traceback;
output cut short by a closed pipe (`multitower devices --json | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from multitower.cli.parser import OneLineParser
from multitower.cli.train import add_train_flags, cmd_cluster, cmd_train, config_from_args  # noqa: F401 (API)
from multitower.config import Config, DataConfig, RunConfig
from multitower.errors import UserError
from multitower.flags import whole_number as _whole_number


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


def _image_size(text: str) -> list[int]:
    from multitower.cli.train import _size
    return _size(text)


def cmd_eval(a: argparse.Namespace) -> None:
    from multitower import eval as evaluation
    if a.checkpoint_dir and a.run_dir and a.checkpoint_dir != a.run_dir:
        raise UserError("give the run directory once: RUN_DIR or --checkpoint_dir, not both")
    a.run_dir = a.run_dir or a.checkpoint_dir
    if not a.run_dir:
        raise UserError("name the run to evaluate: multitower eval RUN_DIR (or --checkpoint_dir RUN_DIR)")
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
                                        progress=a.progress, size=tuple(a.size) if a.size else None)
    else:
        ds = sources.make_synthetic(a.out, train=a.train, val=a.val, seed=a.seed, progress=a.progress, size=a.size)
    counts = ", ".join(f"{name} {len(ds.split(name))}" for name in ds.splits)
    label = " (GENERATED data)" if ds.generated else ""
    c, h, w = ds.image_shape
    print(f"wrote {ds.root}{label}: {counts} examples, {len(ds.class_names)} classes, {c}x{h}x{w} images")


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
        "      loss, learning rate, activations and eval/precision @ 1 in a browser",
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
                   help="global batch, examples per step over all devices, as train's (with --weak-scaling: "
                        "per device) (default: %(default)s)")
    g.add_argument("--weak-scaling", action="store_true",
                   help="grow the global batch with the devices, each keeping --batch-size examples "
                        "(default: the global batch is fixed and split, as in train)")
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
    g.add_argument("--microbatches", type=_whole_number, default=o.microbatches,
                   help="pipeline: micro-batches per replica's share of the step's batch (default: %(default)s)")
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
        model=a.model, width=a.width, batch_size=a.batch_size, weak_scaling=a.weak_scaling,
        compute_ms_per_example=a.compute_ms_per_example, from_benchmark=a.from_benchmark, threads=a.threads,
        profile_steps=a.profile_steps, profile_reps=a.profile_reps, link=a.link, intra_link=a.intra_link,
        devices_per_node=a.devices_per_node, nics_per_node=a.nics_per_node, bandwidth_gbps=a.bandwidth_gbps, latency_us=a.latency_us,
        calibration=a.calibration, overlap=not a.no_overlap, sync_every=a.sync_every, ps=a.ps,
        ps_period=a.ps_period, stages=a.stages, microbatches=a.microbatches, tolerance=a.tolerance,
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


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `multitower`; the train command's flags (every strategy's, so
    importing torch) only when argv's command is train."""
    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineParser(prog="multitower", description=DESCRIPTION, epilog=TOP_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version(),
                        help="print multitower's and torch's versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = sub.choices  # name -> its parser (OneLineParser.parse_args)

    p = sub.add_parser("train", help="train a model", epilog=train_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if argv[:1] == ["train"]:
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
    p.add_argument("run_dir", nargs="?", default=None, help="run directory written by train")
    p.add_argument("--once", "--run_once", action="store_true",
                   help="evaluate the newest checkpoint and exit (--run_once: the tutorial's name)")
    p.add_argument("--interval", "--eval_interval_secs", type=float, default=60.0,
                   help="seconds between looks for new checkpoints (--eval_interval_secs: the tutorial's "
                        "name) (default: %(default)s)")
    p.add_argument("--checkpoint_dir", default=None, help="the tutorial's --checkpoint_dir: the run directory")
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
    q.add_argument("--size", type=_image_size, default=None, metavar="HxW",
                   help="resize every image to HxW pixels (default: keep the images' own size, which they "
                        "must share)")
    add_progress_flag(q)
    q = data_sub.add_parser("synth", help="generate a learnable synthetic data set (labelled as generated)")
    q.add_argument("--out", required=True, help="new directory for the data set")
    q.add_argument("--train", type=_whole_number, default=20000, help="training images (default: %(default)s)")
    q.add_argument("--val", type=_whole_number, default=2000, help="validation images (default: %(default)s)")
    q.add_argument("--seed", type=_whole_number, default=0, help="generator seed (default: %(default)s)")
    q.add_argument("--size", type=_whole_number, default=32, help="image height and width in pixels "
                                                                  "(default: CIFAR's %(default)s)")
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
        args = build_parser(argv).parse_args(argv)  # inside: --help can meet a closed pipe too
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
        run_dir = getattr(args, "run__run_dir", None) if getattr(args, "command", None) == "train" else None
        print(f"multitower: error: {describe_bug(exc, run_dir or '', 0)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
