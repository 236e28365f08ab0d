"""Model registry: build_model("cifar10-tf") is the TF tutorial's network."""

from __future__ import annotations

from torch import nn

from multitower.errors import UserError
from multitower.models.cifar10_tf import Cifar10TF

MODELS: dict[str, type[nn.Module]] = {"cifar10-tf": Cifar10TF}


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """A freshly initialised model from the registry (kwargs go to its constructor,
    e.g. width=2 for Cifar10TF)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "Cifar10TF", "build_model"]
