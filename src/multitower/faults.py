"""Faults injected into a worker at a chosen (rank, step), for tests of failure handling.

Set MULTITOWER_FAULT="RANK:STEP:KIND" in the environment of a training job; the worker
of that rank injects the fault when it reaches that global step:
  raise  an exception (a bug or bad data on one rank)
  exit   os._exit(3) (the process dies without cleaning up)
  kill   SIGKILL to itself (kill -9, OOM killer)
  hang   sleeps forever (a rank that stops responding)
Only the first attempt of a job injects it: after an elastic restart
(TORCHELASTIC_RESTART_COUNT > 0) the run goes on, as after a real one-off fault.
Unset, this costs one comparison per step.
"""

from __future__ import annotations

import os
import signal
import time

_SPEC = os.environ.get("MULTITOWER_FAULT", "")
KINDS = ("raise", "exit", "kill", "hang")


class InjectedFault(RuntimeError):
    pass


def parse(spec: str) -> tuple[int, int, str] | None:
    if not spec:
        return None
    rank, step, kind = spec.split(":")
    if kind not in KINDS:
        raise ValueError(f"MULTITOWER_FAULT kind must be one of {KINDS}, got {kind!r}")
    return int(rank), int(step), kind


_FAULT = parse(_SPEC)


def maybe_inject(rank: int, step: int) -> None:
    if _FAULT is None or (_FAULT[0], _FAULT[1]) != (rank, step):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return
    kind = _FAULT[2]
    if kind == "raise":
        raise InjectedFault(f"injected fault on rank {rank} at step {step}")
    if kind == "exit":
        os._exit(3)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang
        time.sleep(3600)
