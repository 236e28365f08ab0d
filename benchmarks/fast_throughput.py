"""Training throughput of the fast recipe (airbench) at several widths: the whole step as the
loop runs it (batch from the loader with flip + translate, the Single strategy's forward,
label-smoothed loss, backward and Nesterov SGD, moving average of weights and BN
statistics), images/sec, in channels_last and NCHW memory order (--layouts), in fp32 or
bf16/fp16 autocast (--precisions), on the CPU or a GPU (--device).

    python benchmarks/fast_throughput.py --widths 64,256,256 32,128,128 --batch-size 512 --threads 2
    python benchmarks/fast_throughput.py --device cuda --widths 64,256,256 --batch-size 1024 \
        --precisions fp32 bf16 --steps 20 --reps 5

Used to choose the fast recipe's default widths for this CPU (train/recipe.py FAST_CPU_WIDTHS):
~10 epochs of 45,000 images in ~60 minutes needs >= 125 images/sec. Writes JSON
(bench-results/fast_throughput.json). Each width: 1 warm-up step, then the median of --reps
timed repetitions of --steps steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from multitower.bench.measure import benchmark_data, environment, median_rate, write_json
from multitower.api import settings_of
from multitower.config import Config
from multitower.train.build import build_run
from multitower.train.recipe import get_recipe


def measure(widths: list[int], batch_size: int, steps: int, reps: int, root: str, channels_last: bool,
            precision: str, device: torch.device, threads: int) -> dict:
    settings = settings_of(recipe="fast", widths=widths, batch_size=batch_size, channels_last=channels_last,
                           precision=precision, device=device.type, threads=threads, prefetch=1)
    recipe = get_recipe("fast")
    cfg = Config().with_values({"data.dir": str(root), "model.name": "airbench", "optim.ema_decay": 0.99,
                                "optim.lr": recipe.default_lr(batch_size), **settings})
    run = build_run(cfg)
    model, strategy, ema = run.model, run.strategy, run.ema
    batches = iter(run.batches(prefetch=0))
    step = [0]

    def run_once() -> int:
        for _ in range(steps):
            strategy.step(next(batches)).loss.item()  # the loop's NaN check syncs too
            step[0] += 1
            ema.update(model, step[0])
        return steps * batch_size

    rate = median_rate(run_once, repetitions=reps, warmup=1)
    params = sum(p.numel() for p in model.parameters())
    minutes = 10 * 45000 / rate["median"] / 60
    layout = "channels_last" if channels_last else "NCHW"
    print(f"widths {','.join(map(str, widths)):>12} {layout:>13} {precision:>4}  batch {batch_size}: {rate['median']:7.1f} images/sec "
          f"(reps {', '.join(f'{r:.0f}' for r in rate['all'])}); {params:,} parameters; "
          f"10 epochs of 45,000 images: {minutes:.0f} min", flush=True)
    return {"widths": widths, "layout": layout, "precision": precision, "device": str(device), "batch_size": batch_size, "images_per_sec": rate, "parameters": params,
            "minutes_for_10_epochs_of_45000": minutes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", nargs="+", default=["64,256,256", "32,128,128"],
                   help="width triples to measure (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=512, help="global batch (default: %(default)s)")
    p.add_argument("--layouts", nargs="+", default=["channels_last", "nchw"], choices=["channels_last", "nchw"],
                   help="memory formats to measure each width in (default: %(default)s)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                   help="step precisions to measure each width in (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the steps run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="steps per timed repetition (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (default: %(default)s)")
    p.add_argument("--data", default="", help="data set (default: data/cifar10, else generated)")
    p.add_argument("--out", default="bench-results/fast_throughput.json", help="JSON output (default: %(default)s)")
    a = p.parse_args(argv)
    root, generated = benchmark_data(a.data or None)
    print(f"data: {'GENERATED data' if generated else 'CIFAR-10'} from {root}; {a.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores "
          f"(other processes running slow every figure down)", flush=True)
    device = torch.device(a.device)
    results = [measure([int(w) for w in widths.split(",")], a.batch_size, a.steps, a.reps, root,
                       layout == "channels_last", precision, device, a.threads)
               for widths in a.widths for layout in a.layouts for precision in a.precisions]
    path = write_json(a.out, {"benchmark": "fast_throughput", "device": a.device, "threads": a.threads, "data": str(root),
                              "load_average_1min_after": os.getloadavg()[0],
                              "generated_data": generated, "results": results, "environment": environment()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
