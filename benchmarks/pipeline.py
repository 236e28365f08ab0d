"""Benchmark: pipeline (model) parallelism on this machine's cores.

    python benchmarks/pipeline.py [--batch-size 128] [--microbatches 1,4,8] [--cut local3] [--steps 4] [--reps 3]

Times the pipeline strategy's full training step of cifar10-tf (batches from the record
files through the distortions, the schedule's forwards and backwards, update, EMA) at one
global batch, for
  * S=1: the pipeline with one stage, in one process using every core: one device running
    the M micro-batches one after another (gradient accumulation);
  * S=2: two processes with cores / 2 threads each, gloo on loopback;
each at M = 1, 4, 8 micro-batches, and the Single strategy (every core) as the reference.
Reported: images/sec; each stage's peak memory (the strategy's stageN_peak_bytes: on CPU
the tensors saved for backward plus parameters, gradients and optimizer state; the same
measure for Single); and the measured bubble (the stages' mean idle share of the
schedule) next to the theoretical (S-1)/(M+S-1). Repetitions alternate the
configurations so that machine noise hits all of them; medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multitower.api import settings_of
from multitower.bench.measure import environment, write_json
from multitower.config import Config
from multitower.data.sources import make_synthetic
from multitower.parallel.memory import SavedTensorPeak, training_state_bytes
from multitower.train.build import build_run


def build(data_dir: str, **settings):
    """The run `multitower train` would build here, with its settings by name."""
    return build_run(Config().with_values({"data.dir": data_dir, **settings_of(summary_every=0, **settings)}))


def timed_steps(run, stages: int, warmup: int, steps: int) -> dict:
    """Run warmup + steps training steps; return examples/sec, per-stage peak bytes and
    the mean measured bubble of the timed steps. stages=0: the Single strategy."""
    strategy, model, optimizer, ema = run.strategy, run.model, run.optimizer, run.ema
    batch_size, world = run.cfg.data.batch_size, run.strategy.world_size
    saved = SavedTensorPeak(model)  # Single's peak, measured as the pipeline measures a stage
    extras, single_peak = [], 0
    with run.batches() as batches:
        iterator = iter(batches)
        for step in range(warmup + steps):
            if step == warmup:
                if world > 1:
                    dist.barrier()
                start = time.perf_counter()
            with saved if stages == 0 else contextlib.nullcontext():
                metrics = strategy.step(next(iterator))
            metrics.loss.item()
            ema.update(model, step + 1)
            if step >= warmup:
                extras.append(metrics.extra)
                single_peak = max(single_peak, saved.peak + training_state_bytes(model, optimizer))
        elapsed = time.perf_counter() - start
    if stages == 0:
        return {"examples_per_sec": steps * batch_size / elapsed, "stage_peak_bytes": [single_peak],
                "bubble_fraction": None}
    return {"examples_per_sec": steps * batch_size / elapsed,
            "stage_peak_bytes": [max(e[f"stage{s}_peak_bytes"] for e in extras) for s in range(stages)],
            "bubble_fraction": statistics.mean(e["bubble_fraction"] for e in extras)}


def pipeline_run(stages: int, microbatches: int, data_dir: str, args, threads: int) -> dict:
    run = build(data_dir, strategy="pipeline", workers=stages, stages=stages, microbatches=microbatches,
                schedule=args.schedule, cut=args.cut if stages > 1 else "", batch_size=args.batch_size,
                threads=threads)
    return timed_steps(run, stages, args.warmup, args.steps)


def worker(rank: int, world: int, store_path: str, data_dir: str, microbatches: list[int], args,
           out_path: str) -> None:
    """One process of the S=2 pipeline: every M in turn, in one process group."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    results = {m: pipeline_run(world, m, data_dir, args, threads) for m in microbatches}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--microbatches", default="1,4,8", help="comma-separated M values")
    parser.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    parser.add_argument("--cut", default="", help="S=2: the layer where stage 2 begins; empty = balanced by parameters")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first infers shapes)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="bench-results/pipeline.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    ms = [int(m) for m in args.microbatches.split(",")]

    configs = ([("single", 0, 1, f"Single, 1 process x {cores} threads")]
               + [(f"S=1 M={m}", 1, m, f"pipeline 1 stage, 1 process x {cores} threads") for m in ms]
               + [(f"S=2 M={m}", 2, m, f"pipeline 2 stages, 2 processes x {max(1, cores // 2)} thread(s)")
                  for m in ms])
    samples: dict[str, list[dict]] = {name: [] for name, *_ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(make_synthetic(f"{tmp}/synthetic", train=2560, val=100).root)
        for rep in range(args.reps):
            # NCHW, as the pipeline's stages (channels_last, Single's CPU default, is measured by train_step.py).
            single = build(data_dir, channels_last=False, batch_size=args.batch_size, threads=cores)
            samples["single"].append(timed_steps(single, 0, args.warmup, args.steps))
            for m in ms:  # S=1: a one-process group in this process
                dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store-{rep}-1-{m}", 1), rank=0,
                                        world_size=1)
                samples[f"S=1 M={m}"].append(pipeline_run(1, m, data_dir, args, cores))
                dist.destroy_process_group()
            out = os.path.join(tmp, f"{rep}-2.pt")
            mp.spawn(worker, nprocs=2, join=True, args=(2, f"{tmp}/store-{rep}-2", data_dir, ms, args, out))
            for m, result in torch.load(out).items():
                samples[f"S=2 M={m}"].append(result)
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{name} {samples[name][-1]['examples_per_sec']:.0f}" for name, *_ in configs) + " images/sec",
                flush=True)

    table = []
    for name, stages, m, setup in configs:
        runs = samples[name]
        s = max(stages, 1)
        table.append({"config": name, "setup": setup, "stages": s, "microbatches": m,
                      "images_per_sec": statistics.median(r["examples_per_sec"] for r in runs),
                      "all": [r["examples_per_sec"] for r in runs],
                      "stage_peak_bytes": [statistics.median(r["stage_peak_bytes"][i] for r in runs)
                                           for i in range(s)],
                      "bubble_fraction": (None if stages == 0 else
                                          statistics.median(r["bubble_fraction"] for r in runs)),
                      "bubble_fraction_theory": None if stages == 0 else (s - 1) / (m + s - 1)})
    result = {"benchmark": "pipeline", "environment": environment(),
              "config": {"model": "cifar10-tf", "global_batch": args.batch_size, "schedule": args.schedule,
                         "cut": args.cut or "balanced", "steps_per_rep": args.steps, "warmup": args.warmup,
                         "reps": args.reps, "data": "generated"},
              "results": table}
    path = write_json(args.out, result)
    print(f"\n{'config':<10}{'setup':<48}{'images/sec':>11}{'peak MB per stage':>20}{'bubble':>8}{'theory':>8}")
    for row in table:
        peaks = " + ".join(f"{b / 1e6:.1f}" for b in row["stage_peak_bytes"])
        bubble = "-" if row["bubble_fraction"] is None else f"{row['bubble_fraction']:.2f}"
        theory = "-" if row["bubble_fraction_theory"] is None else f"{row['bubble_fraction_theory']:.2f}"
        print(f"{row['config']:<10}{row['setup']:<48}{row['images_per_sec']:>11.1f}{peaks:>20}{bubble:>8}{theory:>8}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
