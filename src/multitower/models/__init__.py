"""Model registry: build_model("cifar10-tf") is the TF tutorial's network; "airbench" the
fast recipe's (airbench94's whitened VGG-like net on 32x32 images)."""

from __future__ import annotations

from torch import nn

from multitower.errors import UserError
from multitower.models.airbench import Airbench
from multitower.models.cifar10_tf import Cifar10TF

MODELS: dict[str, type[nn.Module]] = {"cifar10-tf": Cifar10TF, "airbench": Airbench}


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """A freshly initialised model from the registry (kwargs go to its constructor,
    e.g. width=2 for Cifar10TF, widths=(32, 128, 128) for Airbench)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def model_from_config(model_cfg, num_classes: int = 10) -> nn.Module:
    """build_model from a config.ModelConfig: name, width, and widths when given."""
    kwargs = {"width": model_cfg.width}
    if getattr(model_cfg, "widths", None):
        kwargs["widths"] = tuple(model_cfg.widths)
    return build_model(model_cfg.name, num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "Airbench", "Cifar10TF", "build_model", "model_from_config"]
