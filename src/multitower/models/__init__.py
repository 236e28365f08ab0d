"""Models: the built-in registry, or your own by import path.

build_model("cifar10-tf") is the TF tutorial's network; "airbench" the fast recipe's
(airbench94's whitened VGG-like net on 32x32 images). Any other name is an import path
of a factory of your own, "package.module:factory" or "path/to/file.py:factory" (the
CLI's --model, and config.json's model.name); multitower.fit also takes the factory
itself. A factory is called in every process, after the seed is set, with the keyword
arguments of num_classes and image_size it accepts.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from torch import nn

from multitower.errors import UserError
from multitower.models.airbench import Airbench
from multitower.models.cifar10_tf import Cifar10TF

MODELS: dict[str, type[nn.Module]] = {"cifar10-tf": Cifar10TF, "airbench": Airbench}


def import_path(factory: Callable) -> str:
    """The import path that names `factory` in config.json ("module:qualified.name"; for a
    factory defined in the script being run, that script's file: "path/to/script.py:name",
    so that `multitower eval` can import it too)."""
    module = factory.__module__
    if module in ("__main__", "__mp_main__"):
        script = getattr(sys.modules.get(module), "__file__", None)
        if script:
            return f"{Path(script).resolve()}:{factory.__qualname__}"
    return f"{module}:{factory.__qualname__}"


def resolve(name: str) -> Callable[..., nn.Module]:
    """The factory a model name stands for: a registry class, or the object an import
    path names; a one-line UserError for a name that is neither."""
    if name in MODELS:
        return MODELS[name]
    module_name, colon, attribute = name.rpartition(":")
    if not colon or not module_name or not attribute:
        raise UserError(f"unknown model {name!r}: give one of {', '.join(sorted(MODELS))}, or a factory of your "
                        f"own as package.module:factory or path/to/file.py:factory")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"--model {name}: no file {path}")
            module = sys.modules.get(f"multitower_user_{path.stem}")
            if module is None:
                spec = importlib.util.spec_from_file_location(f"multitower_user_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module  # before running it: dataclasses and pickling look it up
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - an import runs the user's code: anything may fail
        raise UserError(f"--model {name}: importing {module_name} failed: {type(error).__name__}: {error}") from None
    target = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UserError(f"--model {name}: {module_name} has no {attribute}")
    if not callable(target):
        raise UserError(f"--model {name}: {attribute} is not callable (a factory of an nn.Module)")
    return target


def build_model(name_or_factory, num_classes: int = 10, image_size: int | tuple[int, int] | None = None,
                **kwargs) -> nn.Module:
    """A freshly initialised model: from the registry (kwargs go to its constructor, e.g.
    width=2 for Cifar10TF, widths=(32, 128, 128) for Airbench), an import path, or a
    factory, given the num_classes (and image_size) it accepts."""
    factory = resolve(name_or_factory) if isinstance(name_or_factory, str) else name_or_factory
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    offered = {"num_classes": num_classes, **({"image_size": image_size} if image_size is not None else {}), **kwargs}
    arguments = {key: value for key, value in offered.items() if takes_any or key in accepted}
    model = factory(**arguments)
    if not isinstance(model, nn.Module):
        raise UserError(f"the model factory {getattr(factory, '__name__', factory)!r} returned "
                        f"{type(model).__name__}, not a torch.nn.Module")
    return model


def model_from_config(model_cfg, num_classes: int = 10, input_shape: tuple[int, int, int] | None = None,
                      factory: Callable | None = None) -> nn.Module:
    """build_model for a config.ModelConfig (its name, or `factory` when a Python caller gave
    one): width and widths for the built-ins, image_size from the (C, H, W) of the inputs
    the model sees (after the recipe's crop: the tutorial's 24x24)."""
    kwargs = {}
    if model_cfg.name in MODELS:
        kwargs["width"] = model_cfg.width
        if getattr(model_cfg, "widths", None):
            kwargs["widths"] = tuple(model_cfg.widths)
    image_size = None
    if input_shape is not None:
        _, height, width = input_shape
        image_size = height if height == width else (height, width)
    return build_model(factory or model_cfg.name, num_classes=num_classes, image_size=image_size, **kwargs)


__all__ = ["MODELS", "Airbench", "Cifar10TF", "build_model", "import_path", "model_from_config", "resolve"]
