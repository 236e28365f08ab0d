"""Benchmark: how long a job takes to answer a fault, per strategy.

    python benchmarks/fault_times.py [--timeout 20] [--strategies sync,downpour] [--out bench-results/fault_times.json]

For each strategy, a real 2-worker `multitower train` on generated data, with a fault
injected at (rank, step) (multitower/faults.py) that logs its own wall time:
  stop     the process freezes (SIGSTOP): seconds until the job ends with its one line
           naming the frozen rank (expected: about --timeout);
  kill     kill -9: seconds until the one line naming it;
  restart  kill -9 under --max-restarts 1: seconds until the restarted workers log their
           first step, and whether the job ended at its last step;
and SIGINT / SIGTERM to a sync job's launcher: seconds until it exits in one line.
Downpour is faulted twice, on a trainer (rank 1) and on its parameter server (rank 2,
whose steps are the pushes it applied). Figures depend on the machine's load: the
table says the load average when each ran.
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

from multitower.bench.measure import environment, print_table, write_json
from multitower.data.sources import make_synthetic

STRATEGIES = {"sync": [], "local-sgd": ["--strategy", "local-sgd"], "hogwild": ["--strategy", "hogwild"],
              "pipeline": ["--strategy", "pipeline", "--stages", "2"],
              "downpour": ["--strategy", "downpour", "--ps", "1"]}
FAULT_STEP = 30  # after the checkpoint of step 20


def train_command(data: str, run_dir: str, strategy: str, steps: int, timeout: float, *extra) -> list[str]:
    return [sys.executable, "-m", "multitower", "train", "--data", data, "--run-dir", run_dir, "--workers", "2",
            "--steps", str(steps), "--batch-size", "32", "--summary-every", "0", "--log-every", "5",
            "--checkpoint-every", "20", "--timeout", str(timeout), "--progress", "off", *STRATEGIES[strategy], *extra]


def faulted(data: str, tmp: str, strategy: str, rank: int, kind: str, timeout: float, restarts: int) -> dict:
    run_dir, log = f"{tmp}/{strategy}-{rank}-{kind}-{restarts}", f"{tmp}/{strategy}-{rank}-{kind}-{restarts}.log"
    step = FAULT_STEP * (2 if strategy == "downpour" and rank == 2 else 1)  # a server counts pushes
    steps = 60 if restarts else 2000
    env = {**os.environ, "MULTITOWER_FAULT": f"{rank}:{step}:{kind}", "MULTITOWER_FAULT_LOG": log}
    extra = ["--max-restarts", str(restarts)] if restarts else []
    load = os.getloadavg()[0]
    job = subprocess.run(train_command(data, run_dir, strategy, steps, timeout, *extra), capture_output=True,
                         text=True, env=env, timeout=600)
    ended = time.time()
    fault_time = float(Path(log).read_text().split()[0]) if Path(log).exists() else float("nan")
    lines = [line for line in job.stderr.strip().splitlines() if line.strip()]
    row = {"strategy": strategy, "rank": rank, "fault": kind, "max_restarts": restarts, "exit": job.returncode,
           "load_average": load, "stderr_lines": len(lines), "verdict": lines[-1] if lines else ""}
    if restarts:
        records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        # The restart's first record: the first whose step falls back (to the checkpoint's
        # window), where downpour's surviving trainer may have logged on after the fault.
        resumed = next((r for before, r in zip(records, records[1:])
                        if r["wall_time"] > fault_time and r["step"] <= before["step"]), None)
        row.update({"recovered_s": resumed["wall_time"] - fault_time if resumed else None,
                    "final_step": records[-1]["step"] if records else None})
    else:
        row["answer_s"] = ended - fault_time
    return row


def signalled(data: str, tmp: str, sig: signal.Signals, timeout: float) -> dict:
    run_dir = f"{tmp}/signal-{sig.name}"
    job = subprocess.Popen(train_command(data, run_dir, "sync", 2000, timeout), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    metrics = Path(run_dir, "metrics.jsonl")
    while job.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    sent = time.time()
    job.send_signal(sig)
    _, stderr = job.communicate(timeout=120)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return {"strategy": "sync", "rank": "launcher", "fault": sig.name, "max_restarts": 0, "exit": job.returncode,
            "load_average": os.getloadavg()[0], "stderr_lines": len(lines), "verdict": lines[-1] if lines else "",
            "answer_s": time.time() - sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=20.0, help="the jobs' --timeout, seconds")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", default="bench-results/fault_times.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(make_synthetic(f"{tmp}/synthetic", train=4096, val=64).root)
        for strategy in args.strategies.split(","):
            for rank in ([1, 2] if strategy == "downpour" else [1]):
                for kind, restarts in (("stop", 0), ("kill", 0), ("kill", 1)):
                    rows.append(faulted(data, tmp, strategy, rank, kind, args.timeout, restarts))
                    print(json.dumps(rows[-1]), flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            rows.append(signalled(data, tmp, sig, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["what"] = r["fault"] + (" + restart" if r["max_restarts"] else "")
        r.setdefault("answer_s", float("nan"))
        r["recovered"] = r.get("recovered_s") if r.get("recovered_s") is not None else float("nan")
    print_table([("strategy", "strategy", "<10"), ("rank", "rank", "<10"), ("fault", "what", "<16"),
                 ("answer s", "answer_s", ">9.1f"), ("recovered s", "recovered", ">12.1f"), ("exit", "exit", ">5"),
                 ("lines", "stderr_lines", ">6"), ("load", "load_average", ">5.1f")], rows)
    print(f"wrote {write_json(args.out, {'benchmark': 'fault_times', 'timeout_s': args.timeout, 'rows': rows, 'environment': environment()})}")


if __name__ == "__main__":
    main()
