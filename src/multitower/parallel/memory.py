"""The training state one device holds, checked against --max-memory-per-device."""

from __future__ import annotations

import torch
from torch import nn

from multitower.errors import UserError


def optimizer_slots(optimizer: torch.optim.Optimizer) -> int:
    """Parameter-sized tensors the optimizer keeps per parameter once it has stepped:
    SGD 0 (1 with momentum), Adagrad 1, Adam/AdamW 2. Counted from the configuration,
    because the state is created lazily at the first step."""
    defaults = optimizer.defaults
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return 2
    if isinstance(optimizer, torch.optim.Adagrad):
        return 1
    return 1 if defaults.get("momentum", 0) else 0


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters + gradients + optimizer state of `model` (activations not counted)."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return param_bytes * (2 + optimizer_slots(optimizer))


def check_memory_budget(model: nn.Module, optimizer: torch.optim.Optimizer, budget_bytes: int, rank: int) -> None:
    """Refuse, in one line, a process whose model part does not fit the budget (0 = no limit).
    Called after strategy.wrap, so a pipeline stage counts only its own layers."""
    needed = training_state_bytes(model, optimizer)
    if budget_bytes and needed > budget_bytes:
        raise UserError(f"rank {rank} would hold {needed:,} bytes of parameters, gradients and optimizer state, "
                        f"over --max-memory-per-device {budget_bytes:,}; split the model with --strategy pipeline "
                        f"--stages S --workers S, or raise the budget")
