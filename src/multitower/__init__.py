"""multitower: train deep networks on CPU cores, GPUs and machines with the classic
parallel strategies (synchronous towers, Downpour SGD, local SGD, Hogwild, pipelines) on
PyTorch's torch.distributed; TensorFlow's CIFAR-10 multi-GPU tutorial reproduced.

The public API (imported lazily: `import multitower` alone does not import torch):

    fit(model, data, recipe=..., loss=..., optimizer=..., **settings) -> TrainResult
    evaluate(run_dir, model=..., data=...) -> EvalResult
    Config (and its sections DataConfig, ModelConfig, OptimConfig, ParallelConfig, RunConfig)
    ImageData (your map-style datasets), Loss (a loss split for pipelines), Recipe
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "fit": "multitower.api", "evaluate": "multitower.api",
    "Config": "multitower.config", "DataConfig": "multitower.config", "ModelConfig": "multitower.config",
    "OptimConfig": "multitower.config", "ParallelConfig": "multitower.config", "RunConfig": "multitower.config",
    "ImageData": "multitower.data.datasets", "Loss": "multitower.losses", "Recipe": "multitower.train.recipe",
    "RECIPES": "multitower.train.recipe", "TrainResult": "multitower.train.loop", "EvalResult": "multitower.eval",
    "UserError": "multitower.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    # PEP 562: the API's names resolve on first use, so the CLI's --help stays fast.
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'multitower' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
