"""Time to accuracy: train a recipe and record the wall-clock minutes at which validation
precision@1 (moving-average weights unless --weights says otherwise; the recipe's eval: flip
and translation TTA for fast) first reaches
each threshold (70%, 80%, 90%, 93%).

    python benchmarks/time_to_accuracy.py --recipe fast                     # data/cifar10, 10 epochs
    python benchmarks/time_to_accuracy.py --recipe tutorial --max-minutes 60
    python benchmarks/time_to_accuracy.py --recipe fast --widths 64,256,256 --eval-every 0.5

Data: --data, else data/cifar10 (`multitower data import ... --out data/cifar10 --val 5000`:
45,000 training and 5,000 validation images of the real CIFAR-10) if present, else a
GENERATED data set (data/synthetic), said so in the output and the JSON.

Every --eval-every epochs the benchmark pauses training and evaluates the val split; the
minutes recorded are training time only (from the start of train(): data set, model, the
fast recipe's whitening fit included; evaluations excluded), with the wall time including
evaluations alongside. It stops at the last threshold, at --max-minutes of training, or at
the end of the run (the recipe's length: fast 10 epochs; tutorial --steps 2000 unless
--epochs/--steps say otherwise). Every other flag is `multitower train`'s (--batch-size,
--lr, --widths, --epochs, --threads, ...). Writes JSON (default
bench-results/time_to_accuracy-<recipe>.json) with the environment; the run directory
(default runs/tta-<recipe>-<time>) keeps checkpoints, metrics.jsonl and events as any run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from multitower.bench.measure import benchmark_data, environment, write_json
from multitower.cli import add_train_flags, config_from_args
from multitower.data.records import open_dataset
from multitower.errors import UserError
from multitower.eval import evaluate_state
from multitower.train.build import resolve_device, resolve_steps
from multitower.train.loop import train

THRESHOLDS = (0.70, 0.80, 0.90, 0.93)


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--eval-every", type=float, default=1.0, help="epochs between evaluations (default: %(default)s)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS),
                   help="precision@1 levels to time, ascending; the last one ends the run (default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=60.0,
                   help="training-time budget; the run stops (after one last evaluation) beyond it (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON output (default: bench-results/time_to_accuracy-<recipe>.json)")
    p.add_argument("--eval-batch-size", type=int, default=500, help="evaluation batch (default: %(default)s)")
    p.add_argument("--weights", nargs="+", choices=("ema", "raw"), default=["ema"],
                   help="weights evaluated: the moving average, the raw trained weights, or both; "
                        "the thresholds are timed on the first named (default: %(default)s)")
    own, rest = p.parse_known_args(argv)
    thresholds = sorted(own.thresholds)

    train_parser = argparse.ArgumentParser(prog="time_to_accuracy.py (train flags)", allow_abbrev=False)
    add_train_flags(train_parser)
    targs = train_parser.parse_args(rest)
    # (train's flags set "section__field" attributes, and only when typed: flags.Flag.dest)
    targs.data__dir, generated = benchmark_data(getattr(targs, "data__dir", None))
    if not hasattr(targs, "run__run_dir"):  # train's default: use a fresh directory of our own
        recipe = getattr(targs, "optim__recipe", "tutorial")
        targs.run__run_dir = f"runs/tta-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    if getattr(targs, "run__progress", "auto") == "auto":
        targs.run__progress = "off"
    cfg = config_from_args(targs)
    dataset = open_dataset(cfg.data.dir, label=cfg.data.label)
    if "val" not in dataset.splits:
        raise UserError(f"{cfg.data.dir} has no val split to measure accuracy on")
    train_examples = len(dataset.split("train"))
    cfg = resolve_steps(cfg, train_examples)
    steps_per_epoch = max(1, train_examples // cfg.data.batch_size)
    eval_every = max(1, round(own.eval_every * steps_per_epoch))
    device = resolve_device(cfg.parallel.device)
    kind = "GENERATED data" if generated else "CIFAR-10"
    print(f"time to accuracy: recipe {cfg.optim.recipe} ({cfg.model.name}"
          f"{' widths ' + ','.join(map(str, cfg.model.widths)) if cfg.model.widths else ''}), {kind} from "
          f"{cfg.data.dir}, batch {cfg.data.batch_size}, {cfg.run.steps} steps ({cfg.run.steps / steps_per_epoch:.1f} "
          f"epochs), eval every {eval_every} steps, budget {own.max_minutes:g} min", flush=True)

    evaluations: list[dict] = []
    reached: dict[str, float | None] = {f"{t:.2f}": None for t in thresholds}
    clock = {"start": time.perf_counter(), "eval_s": 0.0}

    def training_minutes() -> float:
        return (time.perf_counter() - clock["start"] - clock["eval_s"]) / 60

    def on_step(step: int, model, ema) -> bool:
        over_budget = training_minutes() >= own.max_minutes
        if step % eval_every and step != cfg.run.steps and not over_budget:
            return False
        minutes = training_minutes()
        eval_start = time.perf_counter()
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "step": step}
        results = {w: evaluate_state(state, cfg, "val", device=device, batch_size=own.eval_batch_size,
                                     use_ema=w == "ema") for w in own.weights}
        result = results[own.weights[0]]
        clock["eval_s"] += time.perf_counter() - eval_start
        for t in thresholds:
            if reached[f"{t:.2f}"] is None and result.precision_at_1 >= t:
                reached[f"{t:.2f}"] = minutes
        evaluations.append({"step": step, "epoch": step / steps_per_epoch, "training_minutes": minutes,
                            "wall_minutes": (time.perf_counter() - clock["start"]) / 60,
                            "precision_at_1": result.precision_at_1,
                            "precision_at_1_by_weights": {w: r.precision_at_1 for w, r in results.items()}})
        shown = ", ".join(f"{w} {r.precision_at_1:.4f}" for w, r in results.items())
        print(f"  step {step} (epoch {step / steps_per_epoch:.2f}): precision@1 {shown} "
              f"after {minutes:.2f} min of training", flush=True)
        return reached[f"{thresholds[-1]:.2f}"] is not None or over_budget

    result = train(cfg, on_step=on_step)
    out = {"benchmark": "time_to_accuracy", "recipe": cfg.optim.recipe, "model": cfg.model.name,
           "widths": cfg.model.widths, "data": cfg.data.dir, "generated_data": generated,
           "train_examples": train_examples, "batch_size": cfg.data.batch_size, "lr": cfg.optim.lr,
           "planned_steps": cfg.run.steps, "steps_done": result.step, "eval_every_steps": eval_every,
           "max_minutes": own.max_minutes, "timed_weights": own.weights[0], "threads": torch.get_num_threads(),
           "minutes_to_precision": reached, "evaluations": evaluations,
           "training_minutes": training_minutes(), "wall_minutes": (time.perf_counter() - clock["start"]) / 60,
           "run_dir": cfg.run.run_dir, "environment": environment()}
    path = write_json(own.out or f"bench-results/time_to_accuracy-{cfg.optim.recipe}.json", out)
    summary = ", ".join(f"{float(t):.0%}: {'-' if m is None else f'{m:.1f} min'}" for t, m in reached.items())
    print(f"minutes to validation precision@1 ({kind}): {summary}\nwrote {path}")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except UserError as exc:
        print(f"time_to_accuracy: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
