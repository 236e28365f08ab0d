"""Parallel training strategies, one module each, behind parallel.base.Strategy."""

from __future__ import annotations

import dataclasses

from multitower.config import ParallelConfig
from multitower.errors import UserError
from multitower.parallel.base import Strategy
from multitower.parallel.downpour import Downpour
from multitower.parallel.hogwild import Hogwild
from multitower.parallel.local_sgd import LocalSGD
from multitower.parallel.pipeline import Pipeline
from multitower.parallel.single import Single
from multitower.parallel.sync import Sync

# The registry is a plain dict: name -> class taking (ParallelConfig, device, loss_fn).
STRATEGIES: dict[str, type[Strategy]] = {"single": Single, "sync": Sync, "local-sgd": LocalSGD,
                                         "hogwild": Hogwild, "downpour": Downpour, "pipeline": Pipeline}


def strategy_class(cfg: ParallelConfig, world_size: int | None = None) -> type[Strategy]:
    """The class of cfg.strategy ("auto": single for one process, sync for several; by
    default as many as --workers); a setting of another strategy's is a one-line error."""
    name = cfg.resolved_strategy(cfg.workers if world_size is None else world_size)
    if name not in STRATEGIES:
        raise UserError(f"unknown --strategy {name!r}; known: auto, {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    foreign = sorted(set(cfg.options) - {f.name for f in dataclasses.fields(cls.Options)})
    if foreign:  # a setting of another strategy: say whose
        owners = owners_of(foreign[0])
        used_by = f"it is for --strategy {' or '.join(owners)}" if owners else "no strategy has it"
        auto = f" (auto, for {cfg.workers} worker{'s' if cfg.workers > 1 else ''})" if cfg.strategy == "auto" else ""
        raise UserError(f"--strategy {name}{auto} takes no --{foreign[0].replace('_', '-')}: {used_by}; drop the flag")
    return cls


def owners_of(option: str) -> list[str]:
    """The strategies whose Options have a setting of this name."""
    return [name for name, cls in STRATEGIES.items() if option in {f.name for f in dataclasses.fields(cls.Options)}]


def processes(cfg: ParallelConfig) -> int:
    """Processes the launcher starts: the workers, and any others the strategy needs."""
    return strategy_class(cfg).processes(cfg)
