"""Honest timing: warm-up excluded, median of repetitions, the machine described in JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def timed_rate(run_once: Callable[[], int]) -> float:
    """Items/sec of one call of `run_once` (which returns the number of items it
    processed). Where CUDA is in use the clock stops after the GPU is done: kernels the
    call queued belong to its time."""
    start = time.perf_counter()
    items = run_once()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return items / (time.perf_counter() - start)


def median_rate(run_once: Callable[[], int], *, repetitions: int = 5, warmup: int = 1) -> dict:
    """Call `run_once` warmup + repetitions times; report items/sec of each timed
    repetition (timed_rate) and their median."""
    for _ in range(warmup):
        run_once()
    rates = [timed_rate(run_once) for _ in range(repetitions)]
    return {"median": statistics.median(rates), "all": rates}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """Hardware, versions and revision, recorded with every benchmark result."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "python": platform.python_version(), "git": git_revision(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def write_json(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def print_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """Print rows as a table: columns are (title, key, format spec) — the spec's width (e.g.
    ">11.1f") fixes the column's; the title is aligned the same way."""
    heads = []
    for title, _, spec in columns:
        align, width = re.match(r"([<>^]?)(\d+)", spec).groups()
        heads.append(f"{title:{align or '>'}{width}}")
    print("".join(heads))
    for row in rows:
        print("".join(f"{row[key]:{spec}}" for _, key, spec in columns))


def benchmark_data(requested: str | None) -> tuple[str, bool]:
    """(data-set directory, whether it is generated) for a benchmark: `requested`, else
    data/cifar10 if imported, else a GENERATED data set in data/synthetic (made once, and
    said so)."""
    from multitower.data.records import open_dataset
    from multitower.data.sources import make_synthetic
    if requested:
        return requested, open_dataset(requested).generated
    if (Path("data/cifar10") / "multitower.json").exists():
        return "data/cifar10", open_dataset("data/cifar10").generated
    synth = Path("data/synthetic")
    print("no data/cifar10 (import it: multitower data import ../shared/datasets/cifar10-jpeg/train "
          "--out data/cifar10 --val 5000): using GENERATED data in data/synthetic instead", flush=True)
    if not (synth / "multitower.json").exists():
        make_synthetic(synth)
    return str(synth), True
