"""Synchronous data parallelism: the tutorial's towers and average_gradients, as
DistributedDataParallel.

Every worker holds a full replica and computes gradients on its shard of the global
batch; DDP all-reduces them in buckets while backward is still running (the
tutorial's average_gradients, overlapped with compute), so every replica applies
the same averaged update. One process per device: gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from multitower.config import Config, ParallelConfig, check_choice
from multitower.errors import UserError
from multitower.flags import Flag, whole_number
from multitower.parallel.base import LossFn, Strategy
from multitower.parallel.replicas import replica_digests


class CommTimer:
    """Wall time during which at least one all-reduce is in flight, and bytes sent.

    Wraps a DDP communication hook: a bucket's interval runs from the moment DDP hands
    it to the hook until its future completes. Intervals of overlapping buckets are
    merged, so the total is the time communication was going on, not a sum. Bytes are
    what this rank contributes to the all-reduces: the bucket at 4 bytes an element,
    2 for bf16, and for PowerSGD the elements of its P and Q factors (read from the
    PowerSGD state's public counters) once compression has started."""

    def __init__(self, bytes_per_element: float | None = None):
        self.bytes_per_element = bytes_per_element  # None: the buffer's own element size
        self._lock = threading.Lock()  # futures complete on the backend's threads
        self._intervals: list[tuple[float, float]] = []
        self._futures: list[torch.futures.Future] = []  # this step's, for drain()
        self.bytes = 0

    def wrap(self, hook):
        def timed_hook(state, bucket):
            start = time.perf_counter()
            buffer = bucket.buffer()
            size = buffer.element_size() if self.bytes_per_element is None else self.bytes_per_element
            compressed_before = getattr(state, "total_numel_after_compression", None)
            future = hook(state, bucket)
            compressed = getattr(state, "total_numel_after_compression", None)
            if compressed is not None and compressed != compressed_before:
                sent = (compressed - compressed_before) * buffer.element_size()
            else:
                sent = buffer.numel() * size
            with self._lock:
                self.bytes += int(sent)

            def finished(fut):
                with self._lock:
                    self._intervals.append((start, time.perf_counter()))
                return fut.value()
            chained = future.then(finished)
            with self._lock:
                self._futures.append(chained)
            return chained
        return timed_hook

    def drain(self) -> None:
        """Wait, the GIL released, until every all-reduce handed to a hook has completed or
        failed. The hooks' callbacks run Python on gloo's thread; a process group destroyed
        while one is pending deadlocks: its destructor joins that thread holding the GIL,
        which the callback waits for (seen: a worker interrupted mid-backward, SIGINT from
        its killed launcher, hung in ~ProcessGroupGloo for minutes, no thread able to run)."""
        with self._lock:
            pending = list(self._futures)
        for future in pending:  # completed ones return at once
            try:
                future.wait()
            except Exception:  # noqa: BLE001 - a failed all-reduce: done all the same
                pass

    def take(self) -> tuple[float, int]:
        """Seconds with communication in flight and bytes since the last call."""
        with self._lock:
            intervals, self._intervals = sorted(self._intervals), []
            sent, self.bytes = self.bytes, 0
            self._futures = []  # the step is over: DDP has waited for every bucket
        busy, end = 0.0, float("-inf")
        for lo, hi in intervals:
            if hi > end:
                busy += hi - max(lo, end)
                end = hi
        return busy, sent


@dataclass
class SyncOptions:
    grad_compression: str = "none"
    """Gradient all-reduce compression: "none", "bf16" (half the bytes) or "powersgd" (rank 1,
    after 10 exact steps, with error feedback)."""
    accumulate: int = 1
    """Micro-batches per step on each worker; gradients are all-reduced once, after the last."""


COMPRESSIONS = ("none", "bf16", "powersgd")


def one_bucket_at_a_time(hook):
    """`hook`, its buckets' communication run one after the other, in bucket order.

    PowerSGD's hook chains three all-reduces per bucket (the uncompressed tensors, then P,
    then Q), the later ones issued from the previous one's completion callback, on gloo's
    threads; meanwhile DDP hands it the next bucket from the autograd thread. Which of the
    two collectives each rank issues first is a race, and gloo needs the same order on
    every rank: two workers crashed after a few compressed steps with "op.preamble.length
    <= op.nbytes. 2880 vs 128 ... collective mismatch" (torch 2.13, DDP + powerSGD_hook, no
    multitower code; one node or two). Here bucket k's hook starts when bucket k-1's chain
    has completed; the arithmetic is unchanged."""
    previous: list[torch.futures.Future | None] = [None]

    def ordered(state, bucket):
        done: torch.futures.Future = torch.futures.Future()

        def finish(inner: torch.futures.Future) -> None:
            try:
                done.set_result(inner.value())
            except Exception as exc:  # noqa: BLE001 - a failed collective fails DDP's wait
                done.set_exception(exc)

        def start(_=None) -> None:
            try:
                hook(state, bucket).add_done_callback(finish)
            except Exception as exc:  # noqa: BLE001
                done.set_exception(exc)

        before, previous[0] = previous[0], done
        if before is None:
            start()
        else:
            before.add_done_callback(start)  # inline if it has completed already
        return done
    return ordered


class Sync(Strategy):
    name = "sync"
    Options = SyncOptions
    FLAGS = (
        Flag("--grad-compression", "parallel.options.grad_compression", "sync: gradient all-reduce compression",
             choices=COMPRESSIONS),
        Flag("--accumulate", "parallel.options.accumulate",
             "sync: micro-batches per step per worker, one all-reduce after the last", type=whole_number),
    )

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        options = cls.options_of(cfg.parallel)
        check_choice("--grad-compression", options.grad_compression, COMPRESSIONS)
        if options.accumulate < 1:
            raise UserError(f"--accumulate must be at least 1, got {options.accumulate}")
        if cfg.data.batch_size % (cfg.parallel.workers * options.accumulate):
            raise UserError(f"--batch-size {cfg.data.batch_size} is the global batch and must divide evenly "
                            f"among --workers {cfg.parallel.workers} x --accumulate {options.accumulate} micro-batches")

    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        super().__init__(cfg, device, loss_fn)
        self.ddp: DistributedDataParallel | None = None
        self.timer: CommTimer | None = None

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().wrap(model, optimizer)  # the fast path's layout before DDP sees the model
        # DDP broadcasts rank 0's parameters at construction: all replicas start equal.
        self.ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
        compression = self.options.grad_compression
        if compression == "none":
            hook, state, per_element = default_hooks.allreduce_hook, None, None
        elif compression == "bf16":
            hook, state, per_element = default_hooks.bf16_compress_hook, None, 2
        else:  # powersgd: rank-1 approximations after 10 exact warm-up steps
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                                start_powerSGD_iter=10, use_error_feedback=True,
                                                warm_start=True, random_seed=0)
            hook, per_element = one_bucket_at_a_time(powerSGD_hook.powerSGD_hook), None
        self.timer = CommTimer(per_element)
        self.ddp.register_comm_hook(state, self.timer.wrap(hook))

    @property
    def module(self) -> nn.Module:
        return self.ddp

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0):
        """--accumulate K: K micro-batches, gradients all-reduced only with the last one
        (DDP's no_sync on the others)."""
        accumulate = self.options.accumulate
        if accumulate == 1:
            return super().forward_backward(images, labels, weight)
        chunks = list(zip(images.chunk(accumulate), labels.chunk(accumulate)))
        if len(chunks) != accumulate:
            raise UserError(f"--accumulate {accumulate} needs at least that many examples per worker, "
                            f"got {labels.shape[0]}")
        total = torch.zeros((), device=self.device)
        cross_entropy = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(chunks):
            share = weight * y.shape[0] / labels.shape[0]
            with contextlib.nullcontext() if i == accumulate - 1 else self.ddp.no_sync():
                loss, ce = super().forward_backward(x, y, share)
            total += loss * (y.shape[0] / labels.shape[0])
            cross_entropy += ce * (y.shape[0] / labels.shape[0])
        return total, cross_entropy

    def after_update(self) -> tuple[float, dict[str, float]]:
        comm_s, sent = self.timer.take()
        return comm_s, {"comm_bytes": float(sent)}

    def close(self) -> None:
        if self.timer is not None:
            self.timer.drain()  # before the process group can go (CommTimer.drain)
        super().close()

    def checkpoint_state(self, loop_state: dict) -> dict | None:
        """The base's, of the unwrapped module (the same keys at any world size), and every
        replica's digest, which should all be equal (parallel/replicas.py). A collective."""
        digests = replica_digests(self.model, self.world_size)
        if self.is_rank0 and len(set(digests)) > 1:
            apart = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
            print(f"warning: the weights of rank(s) {', '.join(map(str, apart))} differ from rank 0's: the "
                  f"synchronous replicas went apart; the checkpoint holds rank 0's", flush=True)
        return {**super().checkpoint_state(loop_state), "replica_digests": digests}
