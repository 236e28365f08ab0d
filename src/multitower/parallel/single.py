"""One worker, one device: the tutorial's single-tower training (cifar10_train.py).
Everything it does is the base Strategy's: forward, backward, the optimizer's step."""

from __future__ import annotations

import os

from multitower.config import Config
from multitower.errors import UserError
from multitower.parallel.base import Strategy


class Single(Strategy):
    name = "single"
    joins_group = False

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        workers = max(cfg.parallel.workers, int(os.environ.get("WORLD_SIZE", 1)))  # (torchrun's)
        if workers > 1:
            # Each process would train on its own with no one to talk to: racing writers.
            raise UserError(f"--strategy single trains one process, not --workers {workers}: "
                            f"drop --workers, or pick a strategy for several (sync, local-sgd, hogwild, ...)")
