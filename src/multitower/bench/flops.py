"""Forward multiply-accumulates per example, counted with forward hooks.

Every module with its own weight of 2+ dimensions, parameter or buffer (convolutions,
dense layers such as cifar10_tf.Local) costs one dot product over weight[0] per output element:
output elements x weight[0].numel(). Everything else (pooling, LRN, ReLU, norms) counts 0.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def layer_macs(model: nn.Module, image_size: int) -> list[int]:
    """The forward MACs of one example of each top-level child of `model`, in order,
    from one forward of a zero [1, 3, image_size, image_size] input through a copy of
    the model (in eval mode, so e.g. norm statistics of `model` stay untouched)."""
    probe = copy.deepcopy(model).eval()
    children = list(probe.children())
    macs = [0] * len(children)
    for i, child in enumerate(children):
        for module in child.modules():
            weight = module._parameters.get("weight", module._buffers.get("weight"))  # airbench's whitening: a buffer
            if weight is not None and weight.dim() >= 2:
                def count(module, args, output, i=i, per_output=weight[0].numel()):
                    macs[i] += output.numel() * per_output  # batch of 1: every element is one dot product
                module.register_forward_hook(count)
    parameter = next(probe.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    with torch.no_grad():
        probe(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype))
    return macs
