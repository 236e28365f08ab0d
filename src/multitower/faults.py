"""Faults injected into a worker at a chosen (rank, step), for tests of failure handling.

Set MULTITOWER_FAULT="RANK:STEP:KIND" in the environment of a training job; the worker
of that rank injects the fault when it reaches that global step:
  raise  an exception (a bug or bad data on one rank)
  exit   os._exit(3) (the process dies without cleaning up)
  kill   SIGKILL to itself (kill -9, OOM killer)
  hang   sleeps forever in the training loop (a rank whose main thread stops responding)
  stop   SIGSTOP to itself: the whole process freezes, as under a debugger or a stalled VM
  slow   sleeps after every step from STEP on: a straggler; "RANK:STEP:slow:SECONDS"
         sets the delay per step (default 0.2 s)
  linger sleeps forever once training is over, before the process group's teardown (a
         worker that never exits); STEP is not used ("RANK:0:linger")
Downpour's parameter servers (global ranks workers .. workers + ps - 1) count as their
"step" the pushes they have applied. Only the first attempt of a job injects it: after an elastic restart
(attempt.current_attempt() > 0) the run goes on, as after a real one-off fault.
Unset, this costs one comparison per step. MULTITOWER_FAULT_LOG=FILE appends the wall time
of each fault to FILE (benchmarks/fault_times.py times the job's answer from it).
"""

from __future__ import annotations

import os
import signal
import time

from multitower.attempt import current_attempt

_SPEC = os.environ.get("MULTITOWER_FAULT", "")
KINDS = ("raise", "exit", "kill", "hang", "stop", "slow", "linger")
SLOW_DEFAULT_S = 0.2


class InjectedFault(RuntimeError):
    pass


def parse(spec: str) -> tuple[int, int, str] | None:
    if not spec:
        return None
    rank, step, kind, *delay = spec.split(":")
    if kind not in KINDS:
        raise ValueError(f"MULTITOWER_FAULT kind must be one of {KINDS}, got {kind!r}")
    if delay and (kind != "slow" or len(delay) > 1):
        raise ValueError(f"MULTITOWER_FAULT is RANK:STEP:KIND, or RANK:STEP:slow:SECONDS; got {spec!r}")
    return int(rank), int(step), kind


def _slow_delay_s(spec: str) -> float:
    parts = spec.split(":")
    return float(parts[3]) if len(parts) == 4 else SLOW_DEFAULT_S


_FAULT = parse(_SPEC)
_SLOW_S = _slow_delay_s(_SPEC) if _FAULT is not None and _FAULT[2] == "slow" else 0.0


def maybe_linger(rank: int) -> None:
    """The "linger" fault: called once training is over (train/loop.py)."""
    if _FAULT is not None and _FAULT[0] == rank and _FAULT[2] == "linger" and current_attempt() == 0:
        while True:
            time.sleep(1)


def maybe_inject(rank: int, step: int) -> None:
    if _FAULT is None or _FAULT[0] != rank or _FAULT[2] == "linger":
        return
    if _FAULT[2] == "slow":
        if step >= _FAULT[1] and current_attempt() == 0:
            time.sleep(_SLOW_S)
        return
    if _FAULT[1] != step:
        return
    if current_attempt() > 0:
        return
    kind = _FAULT[2]
    if os.environ.get("MULTITOWER_FAULT_LOG"):  # when, for benchmarks/fault_times.py
        with open(os.environ["MULTITOWER_FAULT_LOG"], "a") as log:
            log.write(f"{time.time()} {rank} {step} {kind}\n")
    if kind == "raise":
        raise InjectedFault(f"injected fault on rank {rank} at step {step}")
    if kind == "exit":
        os._exit(3)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return  # (only after a SIGCONT)
    while True:  # hang
        time.sleep(3600)
