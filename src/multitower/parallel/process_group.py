"""Joining the workers' process group, and the one collective every strategy's logging uses."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from multitower.errors import UserError


def init_process_group(device: torch.device, timeout_s: float, strategy: str) -> None:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); a collective that waits longer than `timeout_s` fails."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise UserError(f"--strategy {strategy} runs several worker processes: pass --workers 2 or more "
                        f"(or start it with torchrun)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Workers restarted by the elastic agent reach the same agent store as the
        # attempt before them; without a per-attempt prefix the new group reads the
        # dead workers' addresses (seen on torch 2.13: "connectFullMesh failed ...
        # Connection refused" after --max-restarts).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timeout)
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"multitower/attempt-{attempt}", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)


def gather_floats(value: float, world_size: int, device: torch.device) -> list[float]:
    """`value` from every rank, in rank order (a collective: every rank must call it)."""
    mine = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL needs device tensors
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    return [float(t) for t in gathered]
