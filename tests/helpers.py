"""What tests share: the `multitower` command as a subprocess, and reading a run's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def multitower(*args, env=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m multitower ARGS` to the end; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "multitower", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def start_multitower(*args, env=None) -> subprocess.Popen:
    """Start `python -m multitower ARGS` in the background (stdout and stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", "multitower", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def status(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def wait_for_step(job: subprocess.Popen, run_dir, step: int, timeout_s: float = 120) -> float:
    """Wait until metrics.jsonl records `step` (or beyond); the monotonic time it was seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = metrics(run_dir)
        if records and records[-1]["step"] >= step:
            return time.monotonic()
        if job.poll() is not None:
            raise AssertionError(f"the job ended (status {job.returncode}) before step {step}: "
                                 f"{job.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def children_of(pid: int) -> list[int]:
    """The processes `pid` started (its main thread's children)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def still_running(pids: list[int], timeout_s: float = 15) -> list[int]:
    """Those of `pids` still running (neither gone nor a zombie) after up to timeout_s."""
    from multitower.procs import process_state
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if process_state(pid) not in ("Z", None)]
    return alive


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.strip()]


def config(data_dir, **settings):
    """A Config of the tutorial recipe on `data_dir`, with train's settings by name
    (strategy="sync", workers=2, batch_size=32, grad_compression="bf16", ...): one thread
    and batch 32 unless given, no summaries, quiet."""
    from multitower.api import settings_of
    from multitower.config import Config
    values = {"batch_size": 32, "threads": 1, "summary_every": 0, "progress": "off", **settings}
    return Config().with_values({"data.dir": str(data_dir), **settings_of(**values)})


def build(data_dir, **settings):
    """The run train() would build in this process (multitower.train.build.build_run)."""
    from multitower.train.build import build_run
    return build_run(config(data_dir, **settings))


def benchmark_script(name: str):
    """benchmarks/NAME.py as a module, to test its functions (the scripts are no package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
