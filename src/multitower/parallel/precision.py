"""The step's numeric fast path, shared by the strategies: autocast precision and
memory format, so that no strategy re-implements them.

precision="bf16" runs forward (and so backward) under torch.autocast: convs and
matmuls in bfloat16, master weights, gradients and the optimizer in float32, and the
loss in float32 (tower_loss casts the logits). On CUDA this is bf16 AMP; bf16 needs
no loss scaling (fp32's exponent range). On a CPU whose oneDNN lacks bf16 kernels
(this repo's 2-core AVX2 test machine: torch.ops.mkldnn._is_mkldnn_bf16_supported()
is False) autocast falls back to aten's slow convolution and runs ~5x slower than
fp32; hence the fp32 default.

precision="fp16" is the same autocast in float16 with dynamic loss scaling
(torch.amp.GradScaler): the loss is multiplied by the scale before backward, the
optimizer steps on unscaled gradients and skips a step whose gradients overflowed,
and the scale halves on an overflow and doubles after 2,000 clean steps. For GPUs
without bf16 (before Ampere). The scaler's state is part of the checkpoint.

channels_last=True stores the conv weights and input images as NHWC: oneDNN's
native layout on CPU (no reorder per conv; measured 1.08-1.13x on the cifar10-tf step)
and the tensor cores' layout on CUDA. Same function, same parameter shapes:
state_dict keys and shapes are unchanged, only strides differ. None (the default)
picks by measurement: on, on CPU and CUDA alike (an H200 ran fp32 cifar10-tf 1.06x and
airbench 1.45x faster in NHWC), but only for a strategy that applies it (hogwild,
downpour and pipeline keep NCHW buffers: their `refuses` names --channels-last).

compile="default"/"max-autotune"/"reduce-overhead" compiles the model's forward in place
(nn.Module.compile: parameter names, state_dict keys and checkpoints are unchanged; autograd
compiles the backward with it) in that torch.compile mode; "reduce-overhead" records CUDA
graphs and needs a CUDA device. Off by default: on this repo's 2-core CPU the compiled
cifar10-tf step ran at 0.18x eager (benchmarks/profile_step.py --compile); on an H200
"default" ran 1.21x and "reduce-overhead" 1.92x eager, paid for with tens of seconds
of compiling in every run (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from multitower.config import COMPILE_MODES, PRECISIONS, check_choice
from multitower.errors import UserError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FastPath:
    """Built by a strategy from its ParallelConfig; used in wrap() and step()."""

    def __init__(self, precision: str, channels_last: bool, device: torch.device, compile_mode: str = "off"):
        check_choice("--precision", precision, PRECISIONS)
        check_choice("--compile", compile_mode, COMPILE_MODES)
        if compile_mode == "reduce-overhead" and device.type != "cuda":
            raise UserError(f"--compile reduce-overhead records CUDA graphs: it needs a CUDA device, not {device}")
        self.compile_mode = compile_mode
        self.precision = precision
        self.channels_last = channels_last
        self.device = device
        # fp16's narrow exponent range needs loss scaling; bf16 has fp32's.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        if device.type == "cuda":
            # Every step has the same shapes: let cuDNN time its algorithms once and keep the fastest.
            torch.backends.cudnn.benchmark = True

    @classmethod
    def from_config(cls, cfg, device: torch.device, allows_channels_last: bool = True) -> "FastPath":
        # getattr: a ParallelConfig written before these fields existed (an old checkpoint's).
        precision, channels_last = getattr(cfg, "precision", "fp32"), getattr(cfg, "channels_last", False)
        if channels_last is None:  # measured faster on CPU and CUDA: see the module's docstring
            channels_last = allows_channels_last
        return cls(precision, bool(channels_last), device, getattr(cfg, "compile", "off"))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The layout (apply_layout), then torch.compile in place if asked. Call once, before
        DDP wraps the model."""
        self.apply_layout(model)
        if self.compile_mode != "off":
            model.compile(mode=None if self.compile_mode == "default" else self.compile_mode)
        return model

    def apply_layout(self, model: nn.Module) -> nn.Module:
        """Converts 4-D parameters to channels_last in place (the Parameter objects stay
        the same, so an optimizer built on them keeps working)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """The batch in the model's memory format (a copy only when channels_last)."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def autocast(self):
        """The context forward and loss run in: bf16/fp16 autocast, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), of the scaled loss under fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(); under fp16 on unscaled gradients, skipped when they overflowed."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        """What a checkpoint must keep for an exact resume: the loss scaler's state, if any."""
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
