"""Benchmark: multitower's full training step of cifar10-tf against a plain eager fp32
PyTorch step of the same network, measured in the same process; plus the input
pipeline alone on one core. Prints a table of ratios and writes JSON.

    python benchmarks/train_step.py [--data DIR] [--batch-size 128] [--reps 5]

The baseline is the step everyone writes first: pre-made random tensors (no data
pipeline at all), forward, tower loss, backward, SGD. The candidate is what
`multitower train` runs per step: batches from the record files through the
distortions and the prefetch thread, the strategy's step, and the EMA update.
Repetitions alternate baseline and candidate so that machine noise hits both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from multitower.bench.measure import environment, write_json
from multitower.config import ParallelConfig
from multitower.data.loader import TrainBatches
from multitower.data.records import open_dataset
from multitower.data.sources import make_synthetic
from multitower.models import build_model
from multitower.models.cifar10_tf import tower_loss
from multitower.parallel.single import Single
from multitower.train.ema import ExponentialMovingAverage


def eager_baseline(batch_size: int, steps: int):
    """A closure running `steps` plain fp32 eager steps on fixed random tensors."""
    torch.manual_seed(0)
    model = build_model("cifar10-tf")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = torch.randn(batch_size, 3, 24, 24), torch.randint(0, 10, (batch_size,))

    def run() -> int:
        for _ in range(steps):
            optimizer.zero_grad()
            loss, _ = tower_loss(model, model(images), labels)
            loss.backward()
            optimizer.step()
        return steps * batch_size
    return run


def multitower_step(split, batch_size: int, steps: int):
    """A closure running `steps` of multitower's own training step, data included."""
    torch.manual_seed(0)
    model = build_model("cifar10-tf")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = Single(ParallelConfig(), torch.device("cpu"), tower_loss)
    strategy.wrap(model, optimizer)
    ema = ExponentialMovingAverage(model, 0.9999)
    batches = TrainBatches(split, global_batch_size=batch_size, seed=0)
    iterator = iter(batches)
    state = {"step": 0}

    def run() -> int:
        for _ in range(steps):
            strategy.step(next(iterator)).loss.item()  # the loop's per-step NaN check syncs too
            state["step"] += 1
            ema.update(model, state["step"])
        return steps * batch_size
    return run, batches


def pipeline_alone(split, batch_size: int, steps: int):
    batches = TrainBatches(split, global_batch_size=batch_size, seed=0)
    state = {"step": 0}

    def run() -> int:
        for _ in range(steps):
            batches.batch_at(state["step"])
            state["step"] += 1
        return steps * batch_size
    return run


def timed(run) -> float:
    start = time.perf_counter()
    items = run()
    return items / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="data-set directory (default: a generated one in a temp dir)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--out", default="bench-results/train_step.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or make_synthetic(f"{tmp}/synthetic", train=10000, val=100).root
        dataset = open_dataset(data_dir)
        split = dataset.split("train")
        threads = torch.get_num_threads()

        baseline = eager_baseline(args.batch_size, args.steps)
        candidate, batches = multitower_step(split, args.batch_size, args.steps)
        baseline(), candidate()  # warm-up: allocator, caches, first-call costs
        base_rates, cand_rates = [], []
        for _ in range(args.reps):
            base_rates.append(timed(baseline))
            cand_rates.append(timed(candidate))
        batches.close()

        torch.set_num_threads(1)
        pipeline = pipeline_alone(split, args.batch_size, args.steps * 5)
        pipeline()
        pipe_rates = [timed(pipeline) for _ in range(args.reps)]
        torch.set_num_threads(threads)

    base, cand, pipe = (statistics.median(r) for r in (base_rates, cand_rates, pipe_rates))
    result = {
        "benchmark": "train_step", "environment": environment(),
        "config": {"model": "cifar10-tf", "batch_size": args.batch_size, "steps_per_rep": args.steps,
                   "reps": args.reps, "threads": threads, "data": "generated" if not args.data else args.data},
        "eager_fp32_images_per_sec": {"median": base, "all": base_rates},
        "multitower_images_per_sec": {"median": cand, "all": cand_rates},
        "ratio_multitower_to_eager": cand / base,
        "input_pipeline_one_core_images_per_sec": {"median": pipe, "all": pipe_rates},
    }
    path = write_json(args.out, result)
    print(f"{'measurement':<45}{'images/sec':>12}{'ratio':>8}")
    print(f"{'plain eager fp32 step (baseline)':<45}{base:>12.1f}{1.0:>8.2f}")
    print(f"{'multitower full step (data+model+opt+EMA)':<45}{cand:>12.1f}{cand / base:>8.2f}")
    print(f"{'input pipeline alone, 1 core':<45}{pipe:>12.1f}{pipe / base:>8.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
