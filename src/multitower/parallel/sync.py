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

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from multitower.config import ParallelConfig
from multitower.data.loader import Batch
from multitower.errors import UserError
from multitower.parallel.base import LossFn, StepMetrics, Strategy
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
            return future.then(finished)
        return timed_hook

    def take(self) -> tuple[float, int]:
        """Seconds with communication in flight and bytes since the last call."""
        with self._lock:
            intervals, self._intervals = sorted(self._intervals), []
            sent, self.bytes = self.bytes, 0
        busy, end = 0.0, float("-inf")
        for lo, hi in intervals:
            if hi > end:
                busy += hi - max(lo, end)
                end = hi
        return busy, sent


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

    def __init__(self, cfg: ParallelConfig, device: torch.device, loss_fn: LossFn):
        super().__init__(cfg, device, loss_fn)
        self.ddp: DistributedDataParallel | None = None
        self.timer: CommTimer | None = None

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = self.fast.prepare_model(model), optimizer  # before DDP sees it
        # DDP broadcasts rank 0's parameters at construction: all replicas start equal.
        self.ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
        compression = self.cfg.grad_compression
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

    def step(self, batch: Batch) -> StepMetrics:
        self.optimizer.zero_grad(set_to_none=True)
        accumulate = self.cfg.accumulate
        images, labels = batch.images.chunk(accumulate), batch.labels.chunk(accumulate)
        if len(images) != accumulate:
            raise UserError(f"--accumulate {accumulate} needs at least that many examples per worker, "
                            f"got {batch.labels.shape[0]}")
        total = torch.zeros((), device=self.device)
        cross_entropy = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(zip(images, labels)):
            # Gradients are all-reduced only on the last micro-batch (DDP's no_sync).
            sync_now = i == accumulate - 1
            with contextlib.nullcontext() if sync_now else self.ddp.no_sync():
                with self.fast.autocast():
                    loss, ce = self.loss_fn(self.model, self.ddp(self.fast.images(x)), y)
                self.fast.backward(loss * (y.shape[0] / batch.labels.shape[0]))
            total += loss.detach() * (y.shape[0] / batch.labels.shape[0])
            cross_entropy += ce.detach() * (y.shape[0] / batch.labels.shape[0])
        self.fast.step(self.optimizer)
        comm_s, sent = self.timer.take()
        return StepMetrics(loss=total, cross_entropy=cross_entropy,
                           examples=batch.labels.shape[0] * self.world_size, comm_s=comm_s,
                           extra={"comm_bytes": float(sent)})
    def state_dict(self) -> dict:
        """The base's, of the unwrapped module (the same keys at any world size), and every
        replica's digest, which should all be equal (parallel/replicas.py). A collective."""
        digests = replica_digests(self.model, self.world_size)
        if self.is_rank0 and len(set(digests)) > 1:
            apart = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
            print(f"warning: the weights of rank(s) {', '.join(map(str, apart))} differ from rank 0's: the "
                  f"synchronous replicas went apart; the checkpoint holds rank 0's", flush=True)
        return {**super().state_dict(), "replica_digests": digests}
