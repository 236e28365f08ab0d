"""Parallel training strategies, one module each, behind parallel.base.Strategy."""

from multitower.parallel.downpour import Downpour
from multitower.parallel.hogwild import Hogwild
from multitower.parallel.local_sgd import LocalSGD
from multitower.parallel.pipeline import Pipeline
from multitower.parallel.single import Single
from multitower.parallel.sync import Sync

# The registry is a plain dict: name -> class taking (ParallelConfig, device, loss_fn).
STRATEGIES = {"single": Single, "sync": Sync, "local-sgd": LocalSGD, "hogwild": Hogwild, "downpour": Downpour,
              "pipeline": Pipeline}
