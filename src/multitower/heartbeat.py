"""Which rank stopped responding: per-rank progress in the launcher's key-value store.

At the start of each iteration each worker records (the step it starts, time) under its rank in the c10d TCPStore
that the launcher (torch's elastic agent, or torchrun) serves at MASTER_ADDR:MASTER_PORT.
When a collective fails (a peer hung past --timeout, or died), the failing worker reads
everyone's progress and names the ranks that fell behind, so the job ends with a message
like "rank 1 stopped responding after starting step 5 (silent for 12 s)" instead of a
bare timeout.
"""

from __future__ import annotations

import datetime
import os
import time

import torch.distributed as dist

PREFIX = "multitower/heartbeat/"


class Heartbeat:
    def __init__(self, rank: int, world_size: int, store: dist.Store | None):
        self.rank, self.world_size, self.store = rank, world_size, store

    @classmethod
    def from_environment(cls, rank: int, world_size: int) -> "Heartbeat":
        """Connect to the launcher's store; without a launcher (one process) do nothing."""
        address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size < 2 or not address or not port:
            return cls(rank, world_size, None)
        store = dist.TCPStore(address, int(port), is_master=False, timeout=datetime.timedelta(seconds=30))
        return cls(rank, world_size, store)

    def beat(self, step: int) -> None:
        """Record that this rank starts global step `step` (1-based) now."""
        if self.store is not None:
            self.store.set(f"{PREFIX}{self.rank}", f"{step} {time.time()}")

    def laggards(self) -> str | None:
        """A sentence naming the ranks behind the most advanced one, or None."""
        if self.store is None:
            return None
        progress = {}
        try:
            for rank in range(self.world_size):
                key = f"{PREFIX}{rank}"
                if self.store.check([key]):
                    step, stamp = self.store.get(key).decode().split()
                    progress[rank] = (int(step), float(stamp))
                else:
                    progress[rank] = (-1, float("nan"))
        except Exception:  # the store itself may be gone with the failing job
            return None
        front = max(step for step, _ in progress.values())
        behind = [(rank, step, stamp) for rank, (step, stamp) in progress.items() if step < front]
        if not behind:
            return None
        now = time.time()
        return "; ".join(
            f"rank {rank} stopped responding " + (f"after starting step {step} (silent for {now - stamp:.0f} s)"
                                                  if step >= 0 else "before its first step")
            for rank, step, stamp in behind)
