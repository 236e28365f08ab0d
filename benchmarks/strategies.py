"""Benchmark: the data-parallel strategies side by side, for a fixed number of examples.

    python benchmarks/strategies.py [--data DIR] [--workers 2] [--steps 150] [--batch-size 128]

Runs `multitower train` once per strategy — sync, downpour, local-sgd with
K = 1, 8 and 32, hogwild — with the same network, data, number of workers, global
batch and steps (so the same number of training examples), then `multitower eval
--once` on the validation split. Reports images/sec (median of the run's log
windows after the first), bytes each worker hands to communication per example
(all-reduce input, pushed gradients + fetched parameters, averaged weights; 0
for hogwild's shared memory) and validation precision@1 of the moving-average
weights. Each configuration is one real run, so the table is one sample per row:
read differences of a few percent as noise.

Writes bench-results/strategies.json. Without --data it trains on a generated data
set (labelled so in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multitower.bench.measure import environment, print_table, write_json
from multitower.data.sources import make_synthetic

# name -> extra `multitower train` flags.
CONFIGS = {
    "sync": ["--strategy", "sync"],
    # One server per worker; fetch and push every step, the paper's most eager setting.
    "downpour": ["--strategy", "downpour", "--ps", "1", "--n-fetch", "1", "--n-push", "1"],
    "local-sgd K=1": ["--strategy", "local-sgd", "--sync-every", "1"],
    "local-sgd K=8": ["--strategy", "local-sgd", "--sync-every", "8"],
    "local-sgd K=32": ["--strategy", "local-sgd", "--sync-every", "32"],
    "hogwild": ["--strategy", "hogwild"],
}


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def measure(name: str, flags: list[str], data: str, run_dir: Path, args) -> dict:
    start = time.perf_counter()
    run([sys.executable, "-m", "multitower", "train", "--data", data, "--run-dir", str(run_dir),
         "--workers", str(args.workers), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
         "--log-every", "10", "--summary-every", "0", "--checkpoint-every", str(args.steps), "--seed", "0",
         *flags])
    wall = time.perf_counter() - start
    run([sys.executable, "-m", "multitower", "eval", str(run_dir), "--once"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["examples_per_sec"] for r in records[1:]] or [r["examples_per_sec"] for r in records]
    # comm_bytes: the mean per step of rank 0's bytes within each log window.
    per_step = statistics.mean(r.get("comm_bytes", 0.0) for r in records)
    per_worker_example = per_step / (args.batch_size / args.workers)
    return {"config": name, "flags": flags, "examples_per_sec": statistics.median(rates),
            "comm_bytes_per_example": per_worker_example, "comm_fraction": statistics.median(
                r.get("comm_fraction", 0.0) for r in records),
            "precision_at_1": evals[-1]["precision_at_1"], "examples": args.steps * args.batch_size,
            "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="data-set directory (default: a generated one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--out", default="bench-results/strategies.json")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown --only {unknown}; known: {', '.join(CONFIGS)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(make_synthetic(os.path.join(tmp, "synthetic"), train=20000, val=2000).root)
        for name in names:
            rows.append(measure(name, CONFIGS[name], data, Path(tmp) / name.replace(" ", "_"), args))
            print(f"{name}: {rows[-1]['examples_per_sec']:.0f} images/sec, "
                  f"precision@1 {rows[-1]['precision_at_1']:.4f}", flush=True)
    result = {"benchmark": "strategies", "environment": environment(),
              "config": {"model": "cifar10-tf", "workers": args.workers, "steps": args.steps,
                         "global_batch": args.batch_size, "data": args.data or "generated"},
              "results": rows}
    path = write_json(args.out, result)
    print()
    print_table([("strategy", "config", "<18"), ("images/sec", "examples_per_sec", ">11.1f"),
                 ("comm bytes/example", "comm_bytes_per_example", ">20,.0f"), ("comm %", "comm_percent", ">8.1f"),
                 ("precision@1", "precision_at_1", ">13.4f")],
                [{**r, "comm_percent": 100 * r["comm_fraction"]} for r in rows])
    print(f"after {args.steps * args.batch_size:,} training examples each; wrote {path}")


if __name__ == "__main__":
    main()
