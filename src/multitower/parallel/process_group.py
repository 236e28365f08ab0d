"""Joining the workers' process group (and downpour's rpc), and the one collective every
strategy's logging uses."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import register_rendezvous_handler

from multitower.attempt import current_attempt
from multitower.errors import UserError

# rpc's init_method for a job started by the elastic agent (see rpc_init_method).
ATTEMPT_SCHEME = "multitower-attempt"


def uses_agent_store() -> bool:
    """True in a worker started by torch's elastic agent, which serves the workers' store."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The agent's store seen under a prefix of this restart attempt's own.

    The agent keeps one store for the whole job, so workers restarted after a failure
    would otherwise read the dead workers' keys (gloo's and rpc's addresses) and fail
    with "connectFullMesh failed ... Connection refused" (seen on torch 2.13)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"multitower/attempt-{current_attempt()}", store)


def _attempt_rendezvous(url: str, rank: int = -1, world_size: int = -1, timeout=None, **kwargs):
    # A rendezvous handler (torch.distributed.rendezvous's public hook): a generator of
    # (store, rank, world size). rpc sets the store's timeout itself afterwards.
    yield attempt_store(timeout or datetime.timedelta(seconds=300)), rank, world_size


def rpc_init_method() -> str:
    """rpc's init_method: under the elastic agent the per-attempt store, else env://."""
    if not uses_agent_store():
        return "env://"
    try:
        register_rendezvous_handler(ATTEMPT_SCHEME, _attempt_rendezvous)
    except RuntimeError:  # registered already in this process
        pass
    return f"{ATTEMPT_SCHEME}://"


def backend_for(device: torch.device) -> str:
    """NCCL on GPUs, one worker per GPU; gloo on CPU, and where this machine's workers share
    GPUs (NCCL refuses two ranks on one device; gloo all-reduces CUDA tensors through the host)."""
    if device.type != "cuda":
        return "gloo"
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return "nccl" if local_workers <= torch.cuda.device_count() else "gloo"


def init_process_group(device: torch.device, timeout_s: float, strategy: str) -> None:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); a collective that waits longer than `timeout_s` fails."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise UserError(f"--strategy {strategy} runs several worker processes: pass --workers 2 or more "
                        f"(or start it with torchrun)")
    backend = backend_for(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if uses_agent_store():
        dist.init_process_group(backend=backend, store=attempt_store(timeout), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)


def gather_floats(value: float, world_size: int, device: torch.device) -> list[float]:
    """`value` from every rank, in rank order (a collective: every rank must call it)."""
    mine = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL needs device tensors
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    return [float(t) for t in gathered]
