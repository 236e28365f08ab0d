"""Sharded, seeded, resumable batches, made by a background thread.

The data of a training step depends only on (seed, step), never on the world size or
on what ran before:
  epoch e = step // steps_per_epoch visits the examples in the order
      torch.randperm(len(source), generator=Generator().manual_seed(derive_seed(seed, PERMUTATION, e)));
  the global batch of `step` is that order's slice [(step % steps_per_epoch) * G, ... + G);
  its distortions are augment.sample(G, Generator().manual_seed(derive_seed(seed, DISTORTION, step)), visit)
      drawn for the whole global batch (augment: the tutorial's sample_distortions by default,
      or a recipe's, e.g. data/fast_augment.FlipTranslate), where visit (augment.Visit) holds
      the epoch and a coin per example fixed for the run (example_coins), for draws that
      depend on the example (the fast recipe's alternating flip);
  rank r takes the contiguous slice [r * B, (r + 1) * B), B = G // world_size, of both.
So N workers with batch B see exactly what one worker with batch N*B sees, and a run
resumed at step s (start_step=s) goes on with exactly the next examples.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from multitower.config import AUGMENT_PLACES, check_choice
from multitower.data.augment import TutorialDistortions, Visit
from multitower.errors import UserError

_MASK64 = (1 << 64) - 1

# Stream tags keep the permutation of epoch k and the distortions of step k apart.
PERMUTATION = 1
DISTORTION = 2
EXAMPLE_COINS = 3


@runtime_checkable
class ExampleSource(Protocol):
    """Where examples come from: a fixed number of (image, label) pairs, read by index."""

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at `indices` (int64), in that order: uint8 [B,3,32,32] and int64 [B]."""
        ...


@dataclass
class Batch:
    """The examples of one step on one rank, ready for the network."""

    images: torch.Tensor  # float32 [B,3,24,24] (tutorial) or [B,3,32,32] (fast recipe), on the loader's device
    labels: torch.Tensor  # int64 [B], on the loader's device
    step: int  # the global step (training) or the batch number (evaluation)
    epoch: int
    indices: np.ndarray | None = None  # int64 [B], the examples' positions in the source


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al. 2014): a bijection on 64-bit integers that
    spreads every input bit over the whole output."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """_splitmix64 on every element of a uint64 array (numpy wraps uint64 arithmetic)."""
    u = np.uint64
    x = x + u(0x9E3779B97F4A7C15)
    x = (x ^ (x >> u(30))) * u(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> u(27))) * u(0x94D049BB133111EB)
    return x ^ (x >> u(31))


def example_coins(seed: int, examples: np.ndarray) -> torch.Tensor:
    """One fair coin per example, fixed for the run (the same in every epoch and on every
    rank): the top bit of SplitMix64 of the example's position mixed with the run's seed."""
    key = np.uint64(derive_seed(seed, EXAMPLE_COINS, 0))
    mixed = _splitmix64_array(np.asarray(examples).astype(np.uint64) ^ key)
    return torch.from_numpy((mixed >> np.uint64(63)).astype(bool))


def derive_seed(seed: int, stream: int, counter: int) -> int:
    """A 63-bit generator seed for item `counter` of `stream` under the run's `seed`.

    Chained SplitMix64 rounds, each a bijection, so seeds that differ only in one of the
    three inputs never collide before the final shift to 63 bits (which keeps the seed a
    non-negative int64); seeds 0, 1, 2, ... give unrelated streams, not shifted copies.
    """
    mixed = _splitmix64(seed & _MASK64)
    mixed = _splitmix64(mixed ^ (stream & _MASK64))
    mixed = _splitmix64(mixed ^ (counter & _MASK64))
    return mixed >> 1


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """Move a host batch to `device`; for CUDA, through pinned memory so the copy can
    overlap the previous step's compute."""
    if device.type == "cpu":
        return images, labels
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def augments_on_device(augment_on: str, device: torch.device) -> bool:
    """Where a batch is augmented (or eval-transformed): "host" in the loader's thread, then
    copied as float32; "device" after copying the uint8 images (4x fewer bytes) and the
    draws, by the same torch ops on the device, which frees the CPU cores for reading and
    the copy; "auto" (the default) picks the device for a GPU. A CPU device is the host."""
    check_choice("--augment-on", augment_on, AUGMENT_PLACES)
    return device.type != "cpu" and (augment_on == "device" or (augment_on == "auto" and device.type == "cuda"))


def _check_source(source, what: str) -> int:
    if not isinstance(source, ExampleSource):
        raise TypeError(f"{what} needs a source with __len__ and gather(indices), got {type(source).__name__}")
    return len(source)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}={value!r} must be a positive integer")


def _check_rank(rank, world_size) -> None:
    _check_positive("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise UserError(f"rank={rank!r} is out of range for world_size={world_size}; use 0..{world_size - 1}")


def _check_prefetch(prefetch) -> None:
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise UserError(f"prefetch={prefetch!r} must be an integer >= 0 (0 makes batches in the caller's thread)")


T = TypeVar("T")

_END = object()  # the producer's last item when its keys run out


class _Failure:
    """An exception from the producer, carried through the queue to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def _produce(make: Callable[[int], T], keys: Iterable[int], out: queue.Queue, stop: threading.Event) -> None:
    """The producer thread: make each key's item and queue it until the keys run out or
    `stop` is set. It holds no reference to the consumer, so dropping the consumer lets
    its finaliser stop this thread."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)  # wake every 50 ms to notice `stop`
                return True
            except queue.Full:
                pass
        return False

    try:
        for key in keys:
            if stop.is_set() or not put(make(key)):
                return
        put(_END)
    except BaseException as error:  # noqa: BLE001 - everything goes to the consumer
        put(_Failure(error))


class _ProducerJob:
    """A producer running on a parked thread: is_alive() and join() like a Thread's."""

    def __init__(self):
        self._finished = threading.Event()

    def is_alive(self) -> bool:
        return not self._finished.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._finished.wait(timeout)


class _ParkedThreads:
    """Daemon threads that never exit: a finished producer parks its thread for the next.

    Why: a daemon thread still inside a torch op when the interpreter finalises aborts
    the whole process ("terminate called without an active exception": the op needs the
    GIL, Python ends the thread with pthread_exit, the unwind hits a noexcept C++ frame).
    So (1) at exit, an atexit hook stops every producer and waits for its current batch,
    and (2) producers run on parked threads that never exit: a parked thread waits on a
    queue without the GIL, where the end of the process simply stops it.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._started = 0
        self._active: dict[_ProducerJob, threading.Event] = {}
        atexit.register(self.stop_all)

    def submit(self, fn: Callable[..., None], *args, stop: threading.Event) -> _ProducerJob:
        """Run fn(*args) on a parked thread; `stop` is the event that makes fn return."""
        job = _ProducerJob()
        with self._lock:
            self._active[job] = stop
            if self._idle:
                self._idle -= 1
            else:
                self._started += 1
                threading.Thread(target=self._serve, name=f"batches-{self._started}", daemon=True).start()
        self._jobs.put((fn, args, job))
        return job

    def _serve(self) -> None:
        while True:
            fn, args, job = self._jobs.get()
            try:
                fn(*args)
            finally:
                with self._lock:
                    del self._active[job]
                    self._idle += 1
                job._finished.set()

    def running(self) -> int:
        """Producers currently running (for tests and diagnostics)."""
        with self._lock:
            return len(self._active)

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """Stop every producer and wait for the batch each is making (called at exit)."""
        with self._lock:
            active = list(self._active.items())
        for _job, stop in active:
            stop.set()
        for job, _stop in active:
            job.join(timeout_s)


_PRODUCER_THREADS = _ParkedThreads()


def running_producers() -> int:
    return _PRODUCER_THREADS.running()


class _Prefetcher(Iterator[T]):
    """Iterates make(key) for key in keys, made `depth` items ahead by a daemon thread.

    An exception in make() is raised again in the consumer: the same object, so its type
    (a UserError stays a UserError) and the producer's traceback are kept. close(),
    garbage collection and the end of the keys all stop the thread.
    """

    def __init__(self, make: Callable[[int], T], keys: Iterable[int], depth: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._producer = _PRODUCER_THREADS.submit(_produce, make, keys, self._queue, self._stop, stop=self._stop)
        # Stop the thread when this iterator is garbage collected (a `for` loop left by break).
        self._finalizer = weakref.finalize(self, self._stop.set)

    @property
    def producer(self) -> _ProducerJob:
        return self._producer

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._producer.is_alive() and self._queue.empty():
                    self._done = True  # stopped by close() from another thread
                    raise StopIteration from None
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self, timeout: float = 5.0) -> None:
        """Stop the producer and wait up to `timeout` seconds for it (it may be inside one
        make() call; the thread is a daemon, so a stuck read cannot hang the exit)."""
        self._done = True
        self._stop.set()
        self._producer.join(timeout)


class _Synchronous(Iterator[T]):
    """prefetch=0: make each item in the caller's thread, for debugging and profiling."""

    def __init__(self, make: Callable[[int], T], keys: Iterable[int]):
        self._make, self._keys = make, iter(keys)

    def __next__(self) -> T:
        return self._make(next(self._keys))

    def close(self) -> None:
        self._keys = iter(())


class _Batches:
    """What TrainBatches and EvalBatches share: the iterators they started and close()."""

    def __init__(self, prefetch: int, device, augment_on: str):
        _check_prefetch(prefetch)
        self.prefetch = prefetch
        self.device = torch.device(device)
        self.augment_on_device = augments_on_device(augment_on, self.device)
        self._iterators: weakref.WeakSet = weakref.WeakSet()

    def _transformed(self, transform, raw_images: torch.Tensor, labels: torch.Tensor, *draws):
        """transform(raw_images, *draws) and labels on the device, the transform run on the
        host or on the device (augments_on_device)."""
        if not self.augment_on_device:
            return _to_device(transform(raw_images, *draws), labels, self.device)
        raw_images, labels = _to_device(raw_images, labels, self.device)
        draws = [d.to(self.device, non_blocking=True) for d in draws]
        return transform(raw_images, *draws), labels

    def _iterate(self, make: Callable[[int], Batch], keys: Iterable[int], name: str) -> Iterator[Batch]:
        if self.prefetch == 0:
            iterator: Iterator[Batch] = _Synchronous(make, keys)
        else:
            iterator = _Prefetcher(make, keys, self.prefetch, name)
        self._iterators.add(iterator)
        return iterator

    def close(self) -> None:
        """Stop every background thread this object started."""
        for iterator in list(self._iterators):
            iterator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TrainBatches(_Batches):
    """The infinite training stream of one rank: batch_at(start_step), batch_at(start_step + 1), ...

    The remainder of each epoch (len(source) % global_batch_size examples, a different
    set each epoch) is dropped, as the tutorial's queue-based input did in effect.
    """

    def __init__(
        self,
        source: ExampleSource,
        *,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        prefetch: int = 2,
        device="cpu",
        augment=None,
        augment_on: str = "auto",
    ):
        super().__init__(prefetch, device, augment_on)
        num_examples = _check_source(source, "TrainBatches")
        # sample(n, generator, visit) -> draws that slice per rank; apply(uint8 images, draws) -> float.
        self.augment = augment if augment is not None else TutorialDistortions()
        _check_positive("global_batch_size", global_batch_size)
        _check_rank(rank, world_size)
        if global_batch_size % world_size:
            raise UserError(
                f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}; "
                f"use a multiple of {world_size}"
            )
        if global_batch_size > num_examples:
            raise UserError(
                f"global_batch_size={global_batch_size} is larger than the {num_examples} examples; "
                f"use at most {num_examples}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed={seed!r} must be an integer")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise UserError(f"start_step={start_step!r} must be an integer >= 0")
        self.source = source
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self._cached_order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> torch.Tensor:
        # One randperm(50000) costs ~1 ms; cache the current epoch's. The tuple is replaced
        # whole, so the producer thread and a caller of batch_at never see a torn pair.
        cached = self._cached_order
        if cached is None or cached[0] != epoch:
            generator = _seeded(derive_seed(self.seed, PERMUTATION, epoch))
            cached = (epoch, torch.randperm(self.num_examples, generator=generator))
            self._cached_order = cached
        return cached[1]

    def _rank_slice(self) -> slice:
        return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)

    def global_indices_at(self, step: int) -> np.ndarray:
        """The positions in the source of the whole global batch of `step` (all ranks)."""
        if step < 0:
            raise ValueError(f"step={step} is negative")
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        return self._order(epoch)[start : start + self.global_batch_size].numpy()

    def indices_at(self, step: int) -> np.ndarray:
        """The positions in the source of this rank's examples at `step`, in batch order."""
        return self.global_indices_at(step)[self._rank_slice()].copy()

    def batch_at(self, step: int) -> Batch:
        """This rank's batch for `step`, made synchronously; iteration yields the same."""
        everyone = self.global_indices_at(step)
        indices = everyone[self._rank_slice()].copy()
        generator = _seeded(derive_seed(self.seed, DISTORTION, step))
        visit = Visit(epoch=self.epoch_of(step), coins=example_coins(self.seed, everyone))
        draws = self.augment.sample(self.global_batch_size, generator, visit)[self._rank_slice()]
        # The source gets its own copy: it may sort or reuse the array.
        raw_images, labels = self.source.gather(indices.copy())
        images, labels = self._transformed(self.augment.apply, raw_images, labels, draws)
        return Batch(images=images, labels=labels, step=step, epoch=self.epoch_of(step), indices=indices)

    def __iter__(self) -> Iterator[Batch]:
        return self._iterate(self.batch_at, itertools.count(self.start_step), f"train-batches-rank{self.rank}")


class EvalBatches(_Batches):
    """One pass over the source for evaluation: `transform` (default: the tutorial's central
    crop and standardisation; a recipe's eval_transform, e.g. the fast recipe's normalisation).

    Rank r reads the contiguous shard [r*n // W, (r+1)*n // W) of the n examples in
    order, in batches of `batch_size` (the last one may be smaller), so the shards cover
    every example exactly once. Shards differ by at most one example, so ranks may make
    different numbers of batches: combine the results after the pass, not per batch.
    """

    def __init__(self, source: ExampleSource, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device="cpu", prefetch: int = 2, transform=None, augment_on: str = "auto"):
        super().__init__(prefetch, device, augment_on)
        num_examples = _check_source(source, "EvalBatches")
        self.transform = transform if transform is not None else TutorialDistortions().eval_transform
        _check_positive("batch_size", batch_size)
        _check_rank(rank, world_size)
        self.source = source
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shard_start = num_examples * rank // world_size
        self.shard_stop = num_examples * (rank + 1) // world_size

    @property
    def num_examples(self) -> int:
        """How many examples this rank evaluates."""
        return self.shard_stop - self.shard_start

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def batch_at(self, number: int) -> Batch:
        """Batch `number` (0-based) of this rank's shard."""
        start = self.shard_start + number * self.batch_size
        stop = min(start + self.batch_size, self.shard_stop)
        if number < 0 or start >= stop:
            raise IndexError(f"batch {number} is out of range: this rank has {len(self)} batches")
        indices = np.arange(start, stop, dtype=np.int64)
        raw_images, labels = self.source.gather(indices.copy())
        images, labels = self._transformed(self.transform, raw_images, labels)
        return Batch(images=images, labels=labels, step=number, epoch=0, indices=indices)

    def __iter__(self) -> Iterator[Batch]:
        return self._iterate(self.batch_at, range(len(self)), f"eval-batches-rank{self.rank}")
