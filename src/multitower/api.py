"""multitower from Python: your model, your data, your loss and optimizer, any strategy.

    import multitower as mt
    result = mt.fit(model=make_resnet18, data=mt.ImageData(train=train_set, val=val_set),
                    strategy="sync", workers=2, steps=500, run_dir="runs/resnet")
    print(mt.evaluate("runs/resnet", model=make_resnet18, data=...).precision_at_1)

fit() runs in this process, or, with workers > 1 (or downpour's servers), starts the job's
processes through multitower's launcher (torch's elastic agent, as `multitower train
--workers N`); under torchrun each process calls fit() and trains as one worker. In
spawned workers your factories and data arrive pickled: define them at a module's top
level (not as lambdas), under an `if __name__ == "__main__":` guard in a script, as
torch.multiprocessing requires. Every setting of `multitower train` is a keyword (its flag
without dashes: batch_size, lr, strategy, sync_every, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from multitower.config import Config
from multitower.errors import UserError
from multitower.eval import EvalResult, evaluate_run
from multitower.models import import_path
from multitower.train.loop import TrainResult, train
from multitower.train.recipe import RECIPES, Recipe, get_recipe


def settings_of(**keywords) -> dict[str, Any]:
    """Keywords by setting name -> Config paths: batch_size -> data.batch_size,
    sync_every -> parallel.options.sync_every (a strategy's own), ..."""
    from multitower.parallel import owners_of
    fields = {}
    for section, values in Config().to_dict().items():
        for name in values:
            fields.setdefault(name, f"{section}.{name}")
    fields.update({"timeout": "parallel.timeout_s", "data_dir": "data.dir"})
    paths = {}
    for name, value in keywords.items():
        if name in fields and name != "options":
            paths[fields[name]] = value
        elif owners_of(name):
            paths[f"parallel.options.{name}"] = value
        else:
            raise UserError(f"fit() has no setting {name!r}: the settings are train's flags without dashes "
                            f"(batch_size, lr, strategy, workers, steps, run_dir, sync_every, ...)")
    return paths


def fit(model: Callable[..., nn.Module] | str | None = None, data: Any = None, *,
        recipe: Recipe | str = "plain", loss: Callable | None = None, optimizer: Callable | None = None,
        config: Config | None = None, **settings) -> TrainResult:
    """Train `model` on `data` as `recipe` says, with any strategy.

    model: a factory of an nn.Module (called in every process with the num_classes and
        image_size it accepts), an import path "package.module:factory", or a built-in name;
        default: the recipe's.
    data: multitower.ImageData (map-style datasets of (image, label)), or a data-set
        directory made by `multitower data`.
    recipe: "plain" (any model and size), "tutorial", "fast", or a Recipe of your own.
    loss: (logits, labels) -> loss (e.g. torch.nn.functional.cross_entropy), or a
        multitower.Loss; default: the recipe's.
    optimizer: params -> torch.optim.Optimizer; its lr is the peak of the recipe's schedule.
    config / settings: a Config, and train's settings by name on top of it (strategy="sync",
        workers=2, steps=..., run_dir=..., batch_size=..., resume=True, ...).
    """
    base = get_recipe(recipe) if isinstance(recipe, str) else recipe
    own = base.with_overrides(loss=loss, optimizer=optimizer)
    factory = None if model is None or isinstance(model, str) else model
    values = {"optim.recipe": base.name, **settings_of(**settings)}
    if model is not None:
        values["model.name"] = model if isinstance(model, str) else import_path(model)
    elif "model.name" not in values and config is None:
        values["model.name"] = base.defaults.get("model", Config().model.name)
    if isinstance(data, (str, Path)):
        values["data.dir"] = str(Path(data).resolve())
        data = None
    cfg = (config or Config()).with_values(values)
    if "optim.lr" not in values and config is None:
        cfg = cfg.with_values({"optim.lr": base.default_lr(cfg.data.batch_size)})
    # A built-in recipe travels by name; a recipe of your own, your data and your factory, as objects.
    given = {"recipe": None if own is RECIPES.get(own.name) else own, "data": data, "model": factory}
    given = {key: value for key, value in given.items() if value is not None}
    from multitower.launch import in_launched_worker, launch, run_worker
    from multitower.parallel import processes
    from multitower.train.build import check_config
    check_config(cfg, own)
    if in_launched_worker():
        return run_worker(cfg, **given)
    if processes(cfg.parallel) > 1:
        return TrainResult(**launch(cfg, given))
    return train(cfg, **given)


def evaluate(run_dir: str | Path, *, model: Callable[..., nn.Module] | None = None, data: Any = None,
             recipe: Recipe | None = None, split: str | None = None, step: int | None = None,
             use_ema: bool = True, device: str = "auto", batch_size: int = 500, write: bool = True) -> EvalResult:
    """Evaluate a run's newest (or `step`'s) checkpoint, as `multitower eval --once`: the
    moving-average weights by default; `model`, `data` and `recipe` as given to fit() where
    the run's config.json cannot name them (a factory defined in a script, an ImageData)."""
    return evaluate_run(run_dir, split=split, step=step, device=device, batch_size=batch_size, use_ema=use_ema,
                        write=write, data=data, recipe=recipe, model=model)


__all__ = ["evaluate", "fit", "settings_of"]
