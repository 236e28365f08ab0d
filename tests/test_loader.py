"""Training and evaluation batches: determinism, sharding, resumption, the prefetch thread."""

import gc
import time
import traceback

import numpy as np
import pytest
import torch

from multitower.data.augment import TutorialDistortions, eval_transform
from multitower.data.loader import (
    DISTORTION,
    PERMUTATION,
    Batch,
    EvalBatches,
    ExampleSource,
    TrainBatches,
    augments_on_device,
    derive_seed,
    example_coins,
    running_producers,
)
from multitower.data.fast_augment import FlipTranslate, normalize
from multitower.errors import UserError


class ArraySource:
    """n random images in memory; each label is the example's own index, to check pairing."""

    def __init__(self, n: int, fail_on: int | None = None, error: type[Exception] = RuntimeError):
        g = torch.Generator().manual_seed(n)
        self.images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(n, dtype=torch.int64)
        self.fail_on, self.error = fail_on, error

    def __len__(self):
        return len(self.labels)

    def gather(self, indices: np.ndarray):
        assert indices.dtype == np.int64
        if self.fail_on is not None and self.fail_on in indices:
            raise self.error(f"cannot read example {self.fail_on}")
        chosen = torch.from_numpy(indices.copy())
        indices[:] = 0  # a source may reuse its argument (e.g. sort it in place); the loader must not care
        return self.images[chosen], self.labels[chosen]


def assert_same_batch(a: Batch, b: Batch):
    assert (a.step, a.epoch) == (b.step, b.epoch)
    assert np.array_equal(a.indices, b.indices)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.images, b.images)  # bitwise


def test_source_protocol():
    assert isinstance(ArraySource(4), ExampleSource)
    with pytest.raises(TypeError, match="gather"):
        TrainBatches([1, 2, 3], global_batch_size=1)


def test_batch_at_is_deterministic_and_labels_follow_indices():
    source = ArraySource(50)
    a = TrainBatches(source, global_batch_size=8, seed=3).batch_at(11)
    b = TrainBatches(source, global_batch_size=8, seed=3).batch_at(11)
    assert_same_batch(a, b)
    assert a.images.shape == (8, 3, 24, 24) and a.images.dtype == torch.float32
    assert torch.equal(a.labels, torch.from_numpy(a.indices))
    c = TrainBatches(source, global_batch_size=8, seed=4).batch_at(11)
    assert not np.array_equal(a.indices, c.indices)


def test_iteration_from_start_step_matches_batch_at():
    source = ArraySource(40)
    reference = TrainBatches(source, global_batch_size=8, seed=1)
    with TrainBatches(source, global_batch_size=8, seed=1, start_step=3, prefetch=2) as batches:
        got = [batch for _, batch in zip(range(9), batches)]  # runs over two epoch boundaries
    assert [b.step for b in got] == list(range(3, 12))
    assert [b.epoch for b in got] == [0, 0, 1, 1, 1, 1, 1, 2, 2]
    for batch in got:
        assert_same_batch(batch, reference.batch_at(batch.step))


def test_synchronous_iteration_matches_prefetched():
    source = ArraySource(40)
    with TrainBatches(source, global_batch_size=8, seed=1, prefetch=0) as sync_batches, \
            TrainBatches(source, global_batch_size=8, seed=1, prefetch=3) as prefetched:
        for a, b, _ in zip(sync_batches, prefetched, range(6)):
            assert_same_batch(a, b)


def test_every_example_once_per_epoch_and_epochs_differ():
    source = ArraySource(103)  # 103 // 10 = 10 steps; 3 examples dropped, a different 3 each epoch
    batches = TrainBatches(source, global_batch_size=10, seed=0)
    assert batches.steps_per_epoch == 10
    orders = []
    for epoch in range(3):
        seen = np.concatenate([batches.indices_at(epoch * 10 + s) for s in range(10)])
        assert len(np.unique(seen)) == 100 and seen.min() >= 0 and seen.max() < 103
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert batches.batch_at(25).epoch == 2


def test_global_batch_is_split_across_ranks_bitwise():
    source = ArraySource(64)
    single = TrainBatches(source, global_batch_size=16, seed=9)
    ranks = [TrainBatches(source, global_batch_size=16, rank=r, world_size=2, seed=9) for r in range(2)]
    for step in (0, 5, 17):  # 17 is in epoch 4
        whole = single.batch_at(step)
        parts = [r.batch_at(step) for r in ranks]
        assert all(p.images.shape[0] == 8 for p in parts)
        assert np.array_equal(np.concatenate([p.indices for p in parts]), whole.indices)
        assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
        assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
    four = [TrainBatches(source, global_batch_size=16, rank=r, world_size=4, seed=9).batch_at(3) for r in range(4)]
    assert torch.equal(torch.cat([p.images for p in four]), single.batch_at(3).images)


def test_close_stops_the_thread():
    batches = TrainBatches(ArraySource(40), global_batch_size=8, prefetch=2)
    iterator = iter(batches)
    next(iterator)
    time.sleep(0.1)  # let the producer fill the queue and block on it
    assert iterator.producer.is_alive()
    started = time.perf_counter()
    batches.close()
    assert not iterator.producer.is_alive()
    assert time.perf_counter() - started < 1.0
    with pytest.raises(StopIteration):
        next(iterator)


def test_context_manager_and_break_stop_the_thread():
    with TrainBatches(ArraySource(40), global_batch_size=8) as batches:
        iterator = iter(batches)
        next(iterator)
        producer = iterator.producer
    assert not producer.is_alive()

    def first_batch_then_break():
        for _ in TrainBatches(ArraySource(40), global_batch_size=8):
            break

    first_batch_then_break()
    gc.collect()
    deadline = time.perf_counter() + 2.0
    while running_producers() and time.perf_counter() < deadline:
        time.sleep(0.02)
    assert running_producers() == 0


@pytest.mark.parametrize("error", [RuntimeError, UserError])
def test_source_error_surfaces_in_the_consumer(error):
    source = ArraySource(40, fail_on=None, error=error)
    batches = TrainBatches(source, global_batch_size=8, seed=0)
    source.fail_on = int(batches.indices_at(2)[0])  # the third batch cannot be read
    with batches:
        iterator = iter(batches)
        assert [next(iterator).step for _ in range(2)] == [0, 1]
        with pytest.raises(error, match=f"cannot read example {source.fail_on}") as caught:
            next(iterator)
        assert "gather" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
        assert not iterator.producer.is_alive()


@pytest.mark.parametrize("kwargs,message", [
    (dict(global_batch_size=10, world_size=3), "not divisible by world_size=3"),
    (dict(global_batch_size=8, world_size=0), "world_size=0"),
    (dict(global_batch_size=8, rank=2, world_size=2), "rank=2 is out of range"),
    (dict(global_batch_size=8, rank=-1, world_size=2), "rank=-1 is out of range"),
    (dict(global_batch_size=48), "global_batch_size=48 is larger than the 40 examples"),
    (dict(global_batch_size=0), "global_batch_size=0"),
    (dict(global_batch_size=8, start_step=-1), "start_step=-1"),
    (dict(global_batch_size=8, prefetch=-1), "prefetch=-1"),
    (dict(global_batch_size=8, augment_on="gpu"), "--augment-on must be one of auto, host, device, got 'gpu'"),
])
def test_train_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        TrainBatches(ArraySource(40), **kwargs)


def test_derived_seeds_do_not_collide():
    seeds = {derive_seed(seed, stream, counter)
             for seed in range(64) for stream in (PERMUTATION, DISTORTION) for counter in range(64)}
    assert len(seeds) == 64 * 2 * 64
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(-1, PERMUTATION, 0) != derive_seed(0, PERMUTATION, 0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_eval_covers_every_example_once(world_size):
    source = ArraySource(103)
    seen, batch_counts = [], []
    for rank in range(world_size):
        with EvalBatches(source, batch_size=8, rank=rank, world_size=world_size) as batches:
            got = list(batches)
        assert len(got) == len(batches)
        assert all(len(b.labels) == 8 for b in got[:-1]) and 1 <= len(got[-1].labels) <= 8
        for batch in got:
            expected = eval_transform(source.images[torch.from_numpy(batch.indices)])
            assert torch.equal(batch.images, expected)
            assert torch.equal(batch.labels, torch.from_numpy(batch.indices))
        seen.extend(np.concatenate([b.indices for b in got]))
        batch_counts.append(len(got))
    assert sorted(seen) == list(range(103))  # each index once: no repeats, none missing
    assert max(batch_counts) - min(batch_counts) <= 1


def test_eval_errors():
    with pytest.raises(UserError, match="batch_size=0"):
        EvalBatches(ArraySource(10), batch_size=0)
    with pytest.raises(UserError, match="rank=3 is out of range"):
        EvalBatches(ArraySource(10), batch_size=4, rank=3, world_size=3)


def test_alternating_flip_mirrors_every_image_in_every_other_epoch():
    # pad=0: no translation, so each training image is its normalised original or its mirror.
    source = ArraySource(40)
    batches = TrainBatches(source, global_batch_size=10, seed=5, augment=FlipTranslate(pad=0))
    flipped = {}  # example -> [mirrored in epoch 0, 1, 2, 3]
    for step in range(4 * batches.steps_per_epoch):
        batch = batches.batch_at(step)
        plain = normalize(source.images[torch.from_numpy(batch.indices)])
        for example, image, original in zip(batch.indices, batch.images, plain):
            mirrored = torch.equal(image, original.flip(-1))
            assert mirrored or torch.equal(image, original)
            flipped.setdefault(int(example), []).append(mirrored)
    assert len(flipped) == 40 and all(len(f) == 4 for f in flipped.values())
    assert all(f == [f[0], not f[0], f[0], not f[0]] for f in flipped.values())  # alternates
    first = [f[0] for f in flipped.values()]
    assert 10 <= sum(first) <= 30  # epoch 0: a fair coin per image (binomial(40, 1/2))
    # The coins are the run's: another seed picks other images; every rank sees the same.
    assert not torch.equal(example_coins(5, np.arange(40)), example_coins(6, np.arange(40)))
    ranks = [TrainBatches(source, global_batch_size=10, rank=r, world_size=2, seed=5,
                          augment=FlipTranslate(pad=0)).batch_at(7) for r in range(2)]
    assert torch.equal(torch.cat([b.images for b in ranks]), batches.batch_at(7).images)
    # Without alternation each draw flips at random: some image shows the same view twice running.
    random_flips = TrainBatches(source, global_batch_size=10, seed=5,
                                augment=FlipTranslate(pad=0, alternate_flip=False))
    views = {}
    for step in range(2 * random_flips.steps_per_epoch):
        batch = random_flips.batch_at(step)
        plain = normalize(source.images[torch.from_numpy(batch.indices)])
        for example, image, original in zip(batch.indices, batch.images, plain):
            views.setdefault(int(example), []).append(torch.equal(image, original))
    assert any(v[0] == v[1] for v in views.values())


@pytest.mark.parametrize("augment", [TutorialDistortions(), FlipTranslate()], ids=["tutorial", "fast"])
def test_augmentation_on_the_device_makes_every_tensor_there(augment):
    """--augment-on device copies the uint8 images and the draws, then augments where the
    batch goes. On the meta device (no GPU here; tests/test_cuda.py compares values on one)
    any op that made a tensor on the host would fail ("not on the expected device")."""
    source = ArraySource(64)
    for augment_on in ("host", "device"):
        with TrainBatches(source, global_batch_size=16, seed=3, prefetch=0, device="meta", augment=augment,
                          augment_on=augment_on) as batches:
            batch = batches.batch_at(5)
            assert batches.augment_on_device == (augment_on == "device")
        with EvalBatches(source, batch_size=16, prefetch=0, device="meta", transform=augment.eval_transform,
                         augment_on=augment_on) as evaluation:
            evaluated = evaluation.batch_at(0)
        size = 24 if isinstance(augment, TutorialDistortions) else 32
        for b in (batch, evaluated):
            assert b.images.device.type == b.labels.device.type == "meta"
            assert b.images.shape == (16, 3, size, size) and b.images.dtype == torch.float32


def test_where_batches_are_augmented():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert augments_on_device("auto", cuda) and augments_on_device("device", cuda)
    assert not augments_on_device("host", cuda)
    assert not any(augments_on_device(place, cpu) for place in ("auto", "host", "device"))  # the CPU is the host
