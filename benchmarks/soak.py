"""Soak test: a 2-worker training run with a worker killed (SIGKILL) every few minutes.

    python benchmarks/soak.py [--minutes 30] [--kill-every 180] [--data DIR]

Starts `multitower train --workers 2 --max-restarts R` for as many steps as fit in
--minutes (from a short timing run), and from outside kills one of its worker
processes every --kill-every seconds, alternating ranks' processes, as an operator's
`kill -9` or a lost machine would. The elastic launcher restarts the group and the
workers resume from the last checkpoint. Then the same run again without faults.

Reports: kills, restarts seen, steps lost (steps trained twice because they came after
the last checkpoint before a kill, from metrics.jsonl), wall time of both runs, and the
final precision@1 of both; on CPU the two final models must be bitwise equal (the
restart test's promise, here under repeated kills). Writes bench-results/soak.json.
tests/test_soak.py runs it for 30 minutes (marked slow; not in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from multitower.bench.measure import environment, write_json
from multitower.data.sources import make_synthetic
from multitower.train.checkpoint import CheckpointDir

FLAGS = ["--workers", "2", "--batch-size", "64", "--summary-every", "0", "--log-every", "1", "--seed", "0"]


def worker_pids(parent: int) -> list[int]:
    """The launcher's worker processes: its children started by multiprocessing's spawn
    (not the resource tracker), oldest first."""
    children = []
    for task in Path(f"/proc/{parent}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    workers = []
    for pid in sorted(set(children)):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except OSError:
            pass
    return workers


def steps_lost(metrics: Path) -> tuple[int, int]:
    """(steps trained twice, resumptions), from metrics logged every step: a record at or
    below the one before starts a resumed attempt at (that step - 1), and the steps from
    there to the one before were trained twice."""
    lost, resumes, last = 0, 0, 0
    for line in metrics.read_text().splitlines():
        step = json.loads(line)["step"]
        if step <= last:
            lost += last - step + 1
            resumes += 1
        last = step
    return lost, resumes


def precision(run_dir: Path) -> float:
    subprocess.run([sys.executable, "-m", "multitower", "eval", str(run_dir), "--once"], check=True,
                   capture_output=True)
    return json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])["precision_at_1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run with kills")
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds between kills")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--data", default="", help="data-set directory (default: a generated one)")
    parser.add_argument("--keep", default="", help="keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--out", default="bench-results/soak.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        data = args.data or str(make_synthetic(tmp / "synthetic", train=20000, val=2000).root)
        common = [sys.executable, "-m", "multitower", "train", "--data", data, *FLAGS,
                  "--checkpoint-every", str(args.checkpoint_every)]

        # Size the run from a short fault-free one's seconds per step (start-up left out).
        subprocess.run([*common, "--steps", "40", "--run-dir", str(tmp / "probe")], check=True, capture_output=True)
        seconds = sorted(json.loads(line)["sec_per_batch"] for line in (tmp / "probe" / "metrics.jsonl").open())
        steps = max(100, int(args.minutes * 60 / seconds[len(seconds) // 2]))
        kills_planned = max(1, int(args.minutes * 60 // args.kill_every))
        print(f"soak: {steps} steps, a kill every {args.kill_every:.0f} s", flush=True)

        faulty, log = tmp / "faulty", open(tmp / "faulty.log", "w")
        start = time.perf_counter()
        job = subprocess.Popen([*common, "--steps", str(steps), "--run-dir", str(faulty),
                                "--max-restarts", str(kills_planned)], stdout=log, stderr=subprocess.STDOUT)
        kills, next_kill = [], start + args.kill_every
        while job.poll() is None:
            time.sleep(1.0)
            if len(kills) < kills_planned and time.perf_counter() >= next_kill:
                pids = worker_pids(job.pid)
                if pids:
                    victim = pids[len(kills) % len(pids)]
                    os.kill(victim, signal.SIGKILL)
                    kills.append(round(time.perf_counter() - start, 1))
                    print(f"soak: killed worker pid {victim} at {kills[-1]} s", flush=True)
                next_kill += args.kill_every
        faulty_wall = time.perf_counter() - start
        log.close()
        output = (tmp / "faulty.log").read_text()
        if job.returncode != 0:
            sys.exit(f"soak: the run with kills failed (exit {job.returncode}):\n{output[-3000:]}")
        lost, resumes = steps_lost(faulty / "metrics.jsonl")

        straight = tmp / "straight"
        start = time.perf_counter()
        subprocess.run([*common, "--steps", str(steps), "--run-dir", str(straight)], check=True, capture_output=True)
        straight_wall = time.perf_counter() - start

        a, b = CheckpointDir(faulty / "checkpoints").load(), CheckpointDir(straight / "checkpoints").load()
        bitwise = all(torch.equal(a[part][k], v) for part in ("model", "ema") for k, v in b[part].items())
        result = {"benchmark": "soak", "environment": environment(),
                  "config": {"minutes": args.minutes, "kill_every_s": args.kill_every, "steps": steps,
                             "checkpoint_every": args.checkpoint_every, "flags": FLAGS,
                             "data": args.data or "generated"},
                  "kills_at_s": kills, "restarts": output.count("(restart "), "resumptions_in_metrics": resumes,
                  "steps_lost": lost, "faulty_wall_s": faulty_wall, "straight_wall_s": straight_wall,
                  "precision_at_1": {"with_kills": precision(faulty), "uninterrupted": precision(straight)},
                  "final_weights_bitwise_equal": bitwise}
        path = write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    print(f"wrote {path}")
    if not bitwise:
        sys.exit("soak: the run with kills ended with other weights than the uninterrupted run")


if __name__ == "__main__":
    main()
