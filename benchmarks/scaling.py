"""Benchmark: synchronous data parallelism on this machine's cores.

    python benchmarks/scaling.py [--batch-size 128] [--steps 15] [--reps 5]

Compares, in one run, the full training step (batches from the record files through
the distortions, forward, backward, all-reduce, update, EMA) of
  * 1 worker using every core (the Single strategy, threads = cores), against
  * N workers with cores / N threads each (the Sync strategy: DDP over gloo on
    loopback), with gradient compression none, bf16 and PowerSGD,
all at the same global batch, and
  * N independent workers, each the Single strategy with its share of the batch and of
    the cores, run at the same time with nothing exchanged: the ceiling N synchronised
    workers could reach here, so that sync's distance from it is what synchronising
    costs (the all-reduce's CPU time on cores that also compute, and each step waiting
    for the slower worker), apart from what splitting the cores gains or loses.
Repetitions alternate the configurations so that machine noise hits all of them;
medians are reported. Also reported: the fraction of step time with an all-reduce in
flight and the bytes all-reduced per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multitower.api import settings_of
from multitower.bench.measure import environment, print_table, write_json
from multitower.config import Config
from multitower.data.sources import make_synthetic
from multitower.train.build import build_run


def build(data_dir: str, **settings):
    """The run `multitower train` would build here, with its settings by name."""
    return build_run(Config().with_values({"data.dir": data_dir, **settings_of(summary_every=0, **settings)}))


def timed_steps(run, warmup: int, steps: int, start_together: bool = False) -> dict:
    """Run warmup + steps training steps; return examples/sec, comm fraction, bytes/step.
    start_together: the timed steps start after a barrier of the process group (ranks that
    otherwise exchange nothing)."""
    strategy, model, ema, world = run.strategy, run.model, run.ema, run.strategy.world_size
    batch_size = run.cfg.data.batch_size
    timer = getattr(strategy, "timer", None)
    with run.batches() as batches:
        iterator = iter(batches)
        for step in range(warmup):
            strategy.step(next(iterator)).loss.item()
            ema.update(model, step + 1)
        if timer is not None:
            timer.take()
        if world > 1 or start_together:
            dist.barrier()
        start = time.perf_counter()
        comm_s, sent = 0.0, 0.0
        for step in range(warmup, warmup + steps):
            metrics = strategy.step(next(iterator))
            metrics.loss.item()
            comm_s += metrics.comm_s
            sent += metrics.extra.get("comm_bytes", 0.0)
            ema.update(model, step + 1)
        elapsed = time.perf_counter() - start
    return {"examples_per_sec": steps * batch_size / elapsed, "comm_fraction": comm_s / elapsed,
            "bytes_per_step": sent / steps}


INDEPENDENT = "independent"  # not a compression: N workers that exchange nothing


def worker(rank: int, world: int, store_path: str, data_dir: str, compression: str, batch_size: int,
           warmup: int, steps: int, out_path: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    if compression == INDEPENDENT:  # the Single strategy (no WORLD_SIZE here), its share of the batch
        run = build(data_dir, batch_size=batch_size // world, threads=threads)
        result = timed_steps(run, warmup, steps, start_together=True)
        rates = [None] * world
        dist.all_gather_object(rates, result["examples_per_sec"])
        result["examples_per_sec"] = sum(rates)
    else:
        run = build(data_dir, strategy="sync", workers=world, grad_compression=compression, batch_size=batch_size,
                    threads=threads)
        result = timed_steps(run, warmup, steps)
    if rank == 0:
        torch.save(result, out_path)
    run.strategy.close()


def run_workers(world: int, data_dir: str, compression: str, args, tmp: str, tag: str) -> dict:
    out = os.path.join(tmp, f"{tag}.pt")
    mp.spawn(worker, nprocs=world, join=True,
             args=(world, os.path.join(tmp, f"store-{tag}"), data_dir, compression, args.batch_size,
                   args.warmup, args.steps, out))
    return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=11,
                        help="untimed steps; PowerSGD compresses from step 10 on")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="bench-results/scaling.json")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))

    configs = [("1 worker x %d threads" % cores, 1, "none")] + [
        (f"{args.workers} workers x {max(1, cores // args.workers)} thread(s), {c}", args.workers, c)
        for c in ("none", "bf16", "powersgd")] + [
        (f"{args.workers} independent workers x {max(1, cores // args.workers)} thread(s), batch "
         f"{args.batch_size // args.workers} each", args.workers, INDEPENDENT)]
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(make_synthetic(f"{tmp}/synthetic", train=10000, val=100).root)
        for rep in range(args.reps):
            for name, world, compression in configs:
                if world == 1:
                    single = build(data_dir, batch_size=args.batch_size, threads=cores)
                    samples[name].append(timed_steps(single, args.warmup, args.steps))
                else:
                    samples[name].append(run_workers(world, data_dir, compression, args, tmp, f"{rep}-{compression}"))
                print(f"rep {rep + 1}/{args.reps} {name}: {samples[name][-1]['examples_per_sec']:.1f} examples/sec",
                      flush=True)

    baseline = statistics.median(s["examples_per_sec"] for s in samples[configs[0][0]])
    table = []
    for name, world, compression in configs:
        rates = [s["examples_per_sec"] for s in samples[name]]
        table.append({"config": name, "workers": world, "compression": compression,
                      "examples_per_sec": statistics.median(rates), "all": rates,
                      "ratio_to_1_worker": statistics.median(rates) / baseline,
                      "comm_fraction": statistics.median(s["comm_fraction"] for s in samples[name]),
                      "allreduce_bytes_per_step": statistics.median(s["bytes_per_step"] for s in samples[name])})
    result = {"benchmark": "scaling", "environment": environment(),
              "config": {"model": "cifar10-tf", "global_batch": args.batch_size, "steps_per_rep": args.steps,
                         "warmup": args.warmup, "reps": args.reps, "data": "generated"},
              "results": table}
    path = write_json(args.out, result)
    print()
    print_table([("configuration", "config", "<40"), ("images/sec", "examples_per_sec", ">11.1f"),
                 ("ratio", "ratio_to_1_worker", ">7.2f"), ("comm %", "comm_percent", ">8.1f"),
                 ("MB all-reduced/step", "allreduce_mb_per_step", ">21.2f")],
                [{**row, "comm_percent": 100 * row["comm_fraction"],
                  "allreduce_mb_per_step": row["allreduce_bytes_per_step"] / 1e6} for row in table])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
