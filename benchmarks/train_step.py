"""Benchmark: multitower's full training step of cifar10-tf against a plain eager fp32
PyTorch step of the same network, measured in the same process; plus the input
pipeline alone on one core. Prints a table of ratios and writes JSON.

    python benchmarks/train_step.py [--data DIR] [--batch-size 128] [--reps 5]

The baseline is the step everyone writes first: pre-made random tensors (no data
pipeline at all), forward, tower loss, backward, SGD, in NCHW with the LRN written
as its formula in tensor ops (PlainLRN; the same function as multitower's, whose
hand-written backward and fused CPU kernels are part of what is measured) and each
ReLU right after its conv (PlainConvReLU; multitower moves them into the LRNs). The candidate is what
`multitower train` runs per step: batches from the record files through the
distortions and the prefetch thread, the strategy's step, and the EMA update.
Repetitions alternate baseline and candidates so that machine noise hits both.

Candidates besides the default step: the fast-path settings (--precision,
--channels-last, --compile; `--candidates` picks them; a compiled candidate's first,
compiling call is part of the warm-up, not timed). Each row also reports achieved FLOP/s
against this machine's fp32 and bf16 matmul peaks, timed here on an n^3 matmul sized to
take ~0.25 s (see matmul_peak_flops);
the network's FLOPs are counted from its conv and dense layers (MACs x 2, x 3 for
forward + backward).

The candidates set the allocator policy `multitower train` sets (train/host.py: glibc keeps
freed memory), which holds for the whole process: the interleaved baseline runs under it
too, so the ratios leave out what it gains. The eager step is also timed once before it is
set (a reference row, not interleaved, so under whatever the machine was doing then).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from multitower.bench.flops import layer_macs
from multitower.bench.measure import environment, timed_rate, write_json
from multitower.bench.step import training_step
from multitower.data.loader import TrainBatches
from multitower.data.records import open_dataset
from multitower.data.sources import make_synthetic
from multitower.models import build_model
from multitower.models.cifar10_tf import tower_loss


class PlainLRN(nn.Module):
    """tf.nn.lrn as one writes it first: the formula in autograd-tracked tensor ops.
    The baseline uses it instead of multitower's hand-written forward/backward
    (models/tf_ops._LRN and the fused CPU kernels), which are part of the fast path
    being measured; the ReLU multitower folds into its LRN runs in PlainConvReLU."""

    def __init__(self, lrn: nn.Module):
        super().__init__()
        self.r, self.bias, self.alpha, self.beta = lrn.depth_radius, lrn.bias, lrn.alpha, lrn.beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x * x
        window = squares.clone()
        for k in range(1, self.r + 1):
            window[:, k:] = window[:, k:] + squares[:, :-k]
            window[:, :-k] = window[:, :-k] + squares[:, k:]
        return x * torch.pow(self.bias + self.alpha * window, -self.beta)


class PlainConvReLU(nn.Module):
    """tf.nn.relu(conv) as the tutorial writes it: the ReLU right after the conv, in
    place, where multitower runs conv1's after pool1 and both inside the LRNs."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(x))


def eager_baseline(batch_size: int, steps: int, device: torch.device):
    """A closure running `steps` plain fp32 eager steps (NCHW, plain LRN) on fixed random tensors."""
    torch.manual_seed(0)
    model = build_model("cifar10-tf").to(device)
    model.conv1, model.conv2 = PlainConvReLU(model.conv1), PlainConvReLU(model.conv2)
    model.norm1, model.norm2 = PlainLRN(model.norm1), PlainLRN(model.norm2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.randn(batch_size, 3, 24, 24, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def run() -> int:
        for _ in range(steps):
            optimizer.zero_grad()
            loss, _ = tower_loss(model, model(images), labels)
            loss.backward()
            optimizer.step()
        return steps * batch_size
    return run


# name -> the fast-path fields of ParallelConfig; "default" is ParallelConfig()'s own setting.
# (The default picks channels_last; fp32-nchw is the layout the baseline uses.)
CANDIDATES = {"default": None,
              "fp32-nchw": {"precision": "fp32", "channels_last": False},
              "fp32-cl": {"precision": "fp32", "channels_last": True},
              "bf16": {"precision": "bf16", "channels_last": False},
              "bf16-cl": {"precision": "bf16", "channels_last": True},
              "fp16-cl": {"precision": "fp16", "channels_last": True},
              "fp32-cl-compile": {"precision": "fp32", "channels_last": True, "compile": "default"},
              "bf16-cl-compile": {"precision": "bf16", "channels_last": True, "compile": "default"},
              "bf16-cl-graphs": {"precision": "bf16", "channels_last": True, "compile": "reduce-overhead"}}


def train_flops_per_example(image_size: int = 24) -> int:
    """Forward + backward FLOPs of one example: 3 x 2 x the MACs of the conv and dense
    layers (bench.flops.layer_macs; pooling, LRN and ReLU are memory-bound and left out)."""
    return 3 * 2 * sum(layer_macs(build_model("cifar10-tf"), image_size))


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """Median FLOP/s of an n^3 torch.matmul in `dtype`: the machine's practical peak. n
    doubles from 256 while one product takes under 0.25 s (up to 4096 on CPU, 16384 on a
    GPU), so a dtype without fast kernels (bf16 on an AVX2 CPU: ~0.3 GFLOP/s) costs
    seconds, not minutes."""
    def one(a, b) -> float:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    n, limit = 256, 16384 if device.type == "cuda" else 4096
    while True:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        one(a, b)  # warm-up
        if n >= limit or one(a, b) > 0.25:
            break
        n *= 2
    return statistics.median(2 * n**3 / one(a, b) for _ in range(reps))


def pipeline_alone(split, batch_size: int, steps: int):
    batches = TrainBatches(split, global_batch_size=batch_size, seed=0)
    state = {"step": 0}

    def run() -> int:
        for _ in range(steps):
            batches.batch_at(state["step"])
            state["step"] += 1
        return steps * batch_size
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="data-set directory (default: a generated one in a temp dir)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--candidates", default="default,fp32-nchw",
                        help=f"comma-separated fast-path settings, of {', '.join(CANDIDATES)} (default: %(default)s; "
                             "bf16 is ~5x slower on a CPU without oneDNN bf16 kernels)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the steps run (the matmul peaks are measured there too)")
    parser.add_argument("--out", default="bench-results/train_step.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or make_synthetic(f"{tmp}/synthetic", train=10000, val=100).root
        dataset = open_dataset(data_dir)
        split = dataset.split("train")
        threads = torch.get_num_threads()

        names = [n for n in args.candidates.split(",") if n]
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            parser.error(f"unknown --candidates {unknown}; known: {', '.join(CANDIDATES)}")
        device = torch.device(args.device)
        baseline = eager_baseline(args.batch_size, args.steps, device)
        baseline()  # warm-up: allocator, caches, first-call costs
        # Before multitower's process settings (train/host.py: freed memory kept, for the whole
        # process, so for the interleaved baseline below too): the eager step as a plain
        # script runs it. Not interleaved, so only a reference; the ratios use the baseline below.
        plain_rates = [timed_rate(baseline) for _ in range(args.reps)]
        # multitower's own step, data included (bench/step.py: the one plan profiles too).
        candidates = {n: training_step(args.batch_size, args.steps, device, setting=CANDIDATES[n], split=split)
                      for n in names}
        baseline()
        for candidate in candidates.values():
            candidate.run()
        base_rates, rates = [], {n: [] for n in names}
        for _ in range(args.reps):
            base_rates.append(timed_rate(baseline))
            for n, candidate in candidates.items():
                rates[n].append(timed_rate(candidate.run))
        for candidate in candidates.values():
            candidate.close()
        peak = {"fp32": matmul_peak_flops(torch.float32, device), "bf16": matmul_peak_flops(torch.bfloat16, device)}

        torch.set_num_threads(1)
        pipeline = pipeline_alone(split, args.batch_size, args.steps * 5)
        pipeline()
        pipe_rates = [timed_rate(pipeline) for _ in range(args.reps)]
        torch.set_num_threads(threads)

    base, pipe = statistics.median(base_rates), statistics.median(pipe_rates)
    plain = statistics.median(plain_rates)
    flops = train_flops_per_example()
    medians = {n: statistics.median(r) for n, r in rates.items()}
    cand = medians.get("default", next(iter(medians.values())))
    result = {
        "benchmark": "train_step", "environment": environment(),
        "config": {"model": "cifar10-tf", "batch_size": args.batch_size, "steps_per_rep": args.steps,
                   "reps": args.reps, "threads": threads, "device": args.device,
                   "data": "generated" if not args.data else args.data},
        "eager_fp32_images_per_sec": {"median": base, "all": base_rates},
        "eager_fp32_glibc_default_images_per_sec": {"median": plain, "all": plain_rates,
                                                    "note": "before the process settings, not interleaved"},
        "multitower_images_per_sec": {"median": cand, "all": rates.get("default", [])},
        "ratio_multitower_to_eager": cand / base,
        "candidates": {n: {"setting": CANDIDATES[n] or "default", "images_per_sec": {"median": medians[n], "all": r},
                           "ratio_to_eager": medians[n] / base, "achieved_flops": medians[n] * flops}
                       for n, r in rates.items()},
        "train_flops_per_example": flops,
        "matmul_peak_flops": peak,
        "eager_fp32_achieved_flops": base * flops,
        "input_pipeline_one_core_images_per_sec": {"median": pipe, "all": pipe_rates},
    }
    path = write_json(args.out, result)
    print(f"train FLOPs/example {flops / 1e6:.1f} M; matmul peak fp32 {peak['fp32'] / 1e9:.1f}, "
          f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    print(f"{'measurement':<45}{'images/sec':>12}{'ratio':>8}{'GFLOP/s':>9}{'%fp32pk':>8}{'%bf16pk':>8}")

    def row(name: str, rate: float) -> None:
        achieved = rate * flops
        # A CPU without bf16 kernels multiplies bf16 slower than fp32: no peak to compare with.
        bf16 = f"{100 * achieved / peak['bf16']:>8.1f}" if peak["bf16"] > peak["fp32"] else f"{'n/a':>8}"
        print(f"{name:<45}{rate:>12.1f}{rate / base:>8.2f}{achieved / 1e9:>9.1f}"
              f"{100 * achieved / peak['fp32']:>8.1f}{bf16}")
    row("plain eager fp32 step (baseline)", base)
    row("  the same before train's allocator setting", plain)
    for n in names:
        row(f"multitower full step, {n}", medians[n])
    print(f"{'input pipeline alone, 1 core':<45}{pipe:>12.1f}{pipe / base:>8.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
