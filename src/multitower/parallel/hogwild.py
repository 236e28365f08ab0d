"""Hogwild!: worker processes on one machine update ONE model in shared memory, without
locks (Niu et al. 2011, https://arxiv.org/abs/1106.5730): the chapter's A3C-style
single-node multi-core data parallelism, as in PyTorch's mnist_hogwild example.

That example forks workers from a parent that calls model.share_memory_(). Ours are
started by torch's elastic launcher and inherit nothing, so the parameters are shared
through a file instead: rank 0 writes its initial parameters as one flat float32 file in
/dev/shm, every rank maps it (torch.from_file, shared=True) and points its parameters
at views of the mapping, and a gloo barrier orders the writing before any use. Then
each worker computes gradients on its own shard (its rank's slice of every global
batch) in private memory, and its optimizer writes the update straight into the shared
parameters: no lock, no collective. The paper's argument for why lost updates do not
matter assumes sparse updates; ours are dense, so concurrent writes to the same weight
do clobber each other now and then: the price of never waiting.

Once every rank has mapped the file, rank 0 unlinks it: the memory lives on until the
last worker exits, and nothing is left in /dev/shm even if a worker is killed later.

What "step" means here: the loop's global_step counts this worker's own updates, each
on --batch-size / workers examples; the shared model has received about
workers x global_step updates. The learning-rate schedule follows the per-worker count.
Workers wait for each other only at log lines (the loop's all-gather of metrics).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

from multitower.config import Config, ParallelConfig
from multitower.errors import UserError
from multitower.parallel.base import LossFn, Strategy

# Memory-backed on Linux, so the "file" is just shared pages; elsewhere a temp file.
SHARED_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
FILE_PREFIX = "multitower-hogwild-"


class Hogwild(Strategy):
    name = "hogwild"
    refuses = {"--channels-last": "maps its parameters onto one flat shared buffer in NCHW order",
               "--compile": "is not built to compile its workers' models (single, sync and local-sgd are)"}
    shares_parameters = True
    ends_in_step = False

    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        if device.type != "cpu":
            raise UserError(f"--strategy hogwild shares CPU memory between processes; got device {device}, "
                            f"use --device cpu")
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_world_size != world_size:
            raise UserError(f"--strategy hogwild runs on one machine, but this job spans {world_size} workers "
                            f"of which {local_world_size} are here; use --strategy local-sgd or sync across machines")
        # gloo only orders initialisation and gathers metrics; no gradient goes through it.
        super().__init__(cfg, device, loss_fn)
        self.shared: torch.Tensor | None = None  # the flat float32 mapping all parameters view
        self.buffer_path: str | None = None  # gone once every rank has mapped it

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        if cfg.parallel.device == "cuda":
            raise UserError("--strategy hogwild shares CPU memory between processes; use --device cpu")

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in params):
            raise UserError("--strategy hogwild shares float32 parameters only")
        numel = sum(p.numel() for p in params)
        path = [None]
        try:
            if self.is_rank0:
                fd, path[0] = tempfile.mkstemp(prefix=FILE_PREFIX, suffix=".f32", dir=SHARED_DIR)
                with os.fdopen(fd, "wb") as f:
                    f.write(torch.cat([p.detach().reshape(-1) for p in params]).numpy().tobytes())
            dist.broadcast_object_list(path, src=0)
            self.buffer_path = path[0]
            self.shared = torch.from_file(self.buffer_path, shared=True, size=numel, dtype=torch.float32)
            offset = 0
            for p in params:
                # Re-pointing .data keeps the Parameter objects, so the optimizer (built on
                # them) now updates the shared memory in place; torch's model averager
                # re-points parameters the same way.
                p.data = self.shared[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            dist.barrier()  # every rank has mapped the file: rank 0 may unlink it
        finally:
            if self.is_rank0 and path[0] is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path[0])

    # step: the base's, whose optimizer writes into the shared parameters, without a lock.

    def after_update(self) -> tuple[float, dict[str, float]]:
        return 0.0, {"comm_bytes": 0.0}  # shared memory: nothing crosses a network

    def checkpoint_state(self, loop_state: dict) -> dict | None:
        """A copy of the shared parameters, taken tensor by tensor while the other workers
        keep updating them: consistent to within the few updates that land meanwhile,
        which is all Hogwild's model ever is. The optimizer is this rank's."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), **self.fast.state_dict(), **loop_state}

    def load(self, state: dict) -> dict:
        if self.is_rank0:  # one writer into the shared parameters
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.fast.load_state_dict(state)
        dist.barrier()  # nobody trains on the parameters before they are loaded
        return {"ema": state["ema"], "lookahead": state.get("lookahead")}
