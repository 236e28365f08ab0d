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


class _Saved:
    """A tensor autograd saved for backward, as the pack hook hands it over; the graph
    drops it once backward has used it, which releases its bytes in the tracker."""
    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor: torch.Tensor, key: int, tracker: "SavedTensorPeak"):
        self.tensor, self.key, self.tracker = tensor, key, tracker

    def __del__(self):
        self.tracker._release(self.key)


class SavedTensorPeak:
    """Peak bytes of the tensors autograd keeps for backward (the activations) while
    `with tracker:` runs a step: CPU has no allocator statistics, and these are what
    grows with the batch. A storage counts once however many ops save it (a view and its
    base; the output one op saves and the next op saves as its input), and parameters
    are left out: training_state_bytes counts them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._storages: dict[int, list[int]] = {}  # storage address -> [saved references, bytes]
        self.live = 0
        self.peak = 0

    def __enter__(self) -> "SavedTensorPeak":
        self.peak = self.live
        self._params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        # Held detached: an op that saves its own output (ReLU, log-softmax) would otherwise
        # make a cycle output -> grad_fn -> this object -> output that no collector sees
        # through, and a graph that never runs backward (the pipeline's shape inference
        # forward) would stay alive. Autograd reattaches the graph on unpack.
        if key in self._params:
            return _Saved(tensor.detach(), -1, self)
        entry = self._storages.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Saved(tensor.detach(), key, self)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._storages[key]


def measured_peak_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                        saved: SavedTensorPeak) -> int:
    """One device's peak memory in the last step: the allocator's peak on CUDA (reset
    before the step by the caller); on CPU the saved-tensor peak plus parameters, gradients
    and optimizer state."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return saved.peak + training_state_bytes(model, optimizer)
