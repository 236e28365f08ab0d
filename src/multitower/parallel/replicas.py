"""Whether the replicas of a data-parallel job hold the same weights: one digest per rank.

Synchronous data parallelism keeps every replica bitwise equal (each applies the same
averaged gradient to the same weights), and a checkpoint holds rank 0's alone. Across
machines that is an assumption worth checking: a node whose CPU rounds differently, or a
restart that resumed one replica from another step, would go on silently apart. Each
checkpoint therefore records every rank's digest (Sync.state_dict); equal digests are
equal bytes.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state_dict: names, and each tensor's bytes in NCHW order (so a
    channels_last copy digests as its NCHW twin)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replica_digests(model: nn.Module, world_size: int) -> list[str]:
    """Every rank's state_digest, in rank order. A collective: every rank calls it."""
    gathered: list[str | None] = [None] * world_size
    dist.all_gather_object(gathered, state_digest(model))
    return [str(d) for d in gathered]
