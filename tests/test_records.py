"""The fixed-length record format: byte layout, memory maps, splits, validation errors."""

import json
import pickle
import time

import numpy as np
import pytest

from multitower.data.records import (
    CIFAR10, CIFAR100_COARSE, CIFAR100_FINE, RecordFile, Split, open_dataset, write_records,
)
from multitower.errors import UserError


def random_images(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"


def make_cifar10_dir(root, sizes=(5, 7, 3), test=4, names=True):
    """A CIFAR-10 folder in the official layout (no manifest), with known contents."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for number, size in enumerate(sizes, start=1):
        batch = random_images(size, seed=number)
        batch_labels = np.arange(size) % 10
        write_records(root / f"data_batch_{number}.bin", batch, batch_labels)
        images.append(batch)
        labels.append(batch_labels)
    if test:
        write_records(root / "test_batch.bin", random_images(test, seed=99), np.zeros(test, int))
    if names:
        (root / "batches.meta.txt").write_text("\n".join("abcdefghij") + "\n\n")
    return np.concatenate(images), np.concatenate(labels)


# --- format and round trips ---------------------------------------------------------------

def test_record_sizes():
    assert CIFAR10.record_bytes == 3073
    assert CIFAR100_FINE.record_bytes == CIFAR100_COARSE.record_bytes == 3074
    assert (CIFAR100_FINE.num_classes, CIFAR100_COARSE.num_classes) == (100, 20)


def test_cifar10_round_trip(tmp_path):
    images, labels = random_images(25), np.arange(25) % 10
    write_records(tmp_path / "a.bin", images, labels)
    records = RecordFile(tmp_path / "a.bin")
    assert len(records) == 25
    assert (tmp_path / "a.bin").stat().st_size == 25 * 3073
    np.testing.assert_array_equal(records.images, images)
    np.testing.assert_array_equal(records.labels, labels)
    assert records.images.dtype == np.uint8 and records.labels.dtype == np.int64
    assert list(tmp_path.iterdir()) == [tmp_path / "a.bin"]  # no temporary left behind


def test_cifar10_byte_layout_by_hand(tmp_path):
    images = np.zeros((2, 3, 32, 32), np.uint8)
    images[0, 0], images[0, 1], images[0, 2] = 10, 20, 30  # red, green, blue planes
    images[0, 1, 2, 5] = 77  # green, row 2, column 5
    images[1] = 200
    images[1, 2, 31, 31] = 9  # blue, last pixel
    write_records(tmp_path / "two.bin", images, [3, 8])
    data = (tmp_path / "two.bin").read_bytes()
    assert len(data) == 2 * 3073
    first, second = data[:3073], data[3073:]
    assert first[0] == 3 and second[0] == 8  # label byte first
    assert set(first[1:1025]) == {10}  # then 1024 red bytes
    assert first[1 + 1024 + 2 * 32 + 5] == 77  # green plane is row-major
    assert first[1 + 1024 + 2 * 32 + 4] == 20
    assert set(first[1 + 2048:]) == {30}
    assert second[-1] == 9 and set(second[1:-1]) == {200}


def test_cifar100_byte_layout_and_label_choice(tmp_path):
    images = random_images(3)
    fine, coarse = np.array([0, 57, 99]), np.array([19, 3, 0])
    write_records(tmp_path / "train.bin", images, fine, CIFAR100_FINE, coarse_labels=coarse)
    data = (tmp_path / "train.bin").read_bytes()
    assert len(data) == 3 * 3074
    assert (data[3074], data[3074 + 1]) == (3, 57)  # coarse byte, then fine byte
    assert data[3074 + 2:3074 + 2 + 1024] == images[1, 0].tobytes()

    as_fine = RecordFile(tmp_path / "train.bin", CIFAR100_FINE)
    as_coarse = RecordFile(tmp_path / "train.bin", CIFAR100_COARSE)
    np.testing.assert_array_equal(as_fine.labels, fine)
    np.testing.assert_array_equal(as_coarse.labels, coarse)
    np.testing.assert_array_equal(as_fine.images, images)


def test_write_rejects_bad_arrays(tmp_path):
    with pytest.raises(UserError) as excinfo:
        write_records(tmp_path / "x.bin", random_images(2), [0, 10])
    assert_one_line_error(excinfo, "0..9")
    with pytest.raises(UserError):
        write_records(tmp_path / "x.bin", random_images(2).astype(np.float32), [0, 1])
    with pytest.raises(UserError):
        write_records(tmp_path / "x.bin", random_images(2), [0, 1, 2])
    assert not list(tmp_path.iterdir())


def test_images_are_a_memory_map_not_a_copy(tmp_path):
    write_records(tmp_path / "a.bin", np.zeros((4, 3, 32, 32), np.uint8), [1, 2, 3, 4])
    records = RecordFile(tmp_path / "a.bin")
    images = records.images
    assert isinstance(images, np.memmap)
    assert not images.flags.writeable
    # Change the file under the open mapping: a copy would not see it.
    with open(tmp_path / "a.bin", "r+b") as stream:
        stream.seek(2 * 3073 + 1 + 1024 + 5)  # record 2, green plane, pixel (0, 5)
        stream.write(bytes([123]))
    assert images[2, 1, 0, 5] == 123
    assert records.images[2].sum() == 123


def test_pickled_record_file_remaps_instead_of_copying(tmp_path):
    write_records(tmp_path / "a.bin", random_images(100), np.arange(100) % 10)
    records = RecordFile(tmp_path / "a.bin")
    payload = pickle.dumps(records)
    assert len(payload) < 100 * 3073 / 10  # path and labels, not the 307 kB of pixels
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone.images, records.images)
    np.testing.assert_array_equal(clone.labels, records.labels)


# --- splits ---------------------------------------------------------------------------------

def test_split_gather_matches_naive_concatenation(tmp_path):
    sizes = (5, 7, 3)
    files = []
    for number, size in enumerate(sizes):
        write_records(tmp_path / f"{number}.bin", random_images(size, seed=number), (np.arange(size) + number) % 10)
        files.append(RecordFile(tmp_path / f"{number}.bin"))
    split = Split(files)
    all_images = np.concatenate([f.images for f in files])
    all_labels = np.concatenate([f.labels for f in files])
    assert len(split) == 15
    np.testing.assert_array_equal(split.labels, all_labels)

    indices = np.array([14, 0, 5, 4, 12, 11, 5, 7, 0, 13])  # file edges, repeats, any order
    images, labels = split.gather(indices)
    assert images.dtype.is_floating_point is False and tuple(images.shape) == (10, 3, 32, 32)
    np.testing.assert_array_equal(images.numpy(), all_images[indices])
    np.testing.assert_array_equal(labels.numpy(), all_labels[indices])

    everything = np.random.default_rng(0).permutation(15)
    np.testing.assert_array_equal(split.gather(everything)[0].numpy(), all_images[everything])
    assert tuple(split.gather(np.array([], np.int64))[0].shape) == (0, 3, 32, 32)
    with pytest.raises(IndexError):
        split.gather([15])


def test_gather_returns_fresh_memory(tmp_path):
    write_records(tmp_path / "a.bin", random_images(4), [0, 1, 2, 3])
    split = Split([RecordFile(tmp_path / "a.bin")])
    images, _ = split.gather([1, 2])
    images[:] = 0  # writable tensor, independent of the read-only mapping
    assert split.files[0].images[1].any()


# --- data-set directories -------------------------------------------------------------------

def test_open_official_cifar10_layout(tmp_path):
    images, labels = make_cifar10_dir(tmp_path / "cifar-10-batches-bin")
    for root in (tmp_path / "cifar-10-batches-bin", tmp_path):  # the parent folder works too
        dataset = open_dataset(root)
        assert dataset.root == tmp_path / "cifar-10-batches-bin"
        assert dataset.splits == ["train", "test"]
        assert dataset.class_names == list("abcdefghij")
        assert dataset.manifest == {} and dataset.generated is False
        train = dataset.split("train")
        assert len(train) == 15 and len(dataset.split("test")) == 4
        np.testing.assert_array_equal(train.gather(np.arange(15))[0].numpy(), images)


def test_train_batches_in_numeric_order(tmp_path):
    for number in (1, 2, 10):
        write_records(tmp_path / f"data_batch_{number}.bin", random_images(1, seed=number), [number % 10])
    dataset = open_dataset(tmp_path)
    assert [f.path.name for f in dataset.split("train").files] == [
        "data_batch_1.bin", "data_batch_2.bin", "data_batch_10.bin"]
    assert dataset.class_names[0] == "airplane"  # default CIFAR-10 names without batches.meta.txt


def test_open_official_cifar100_layout(tmp_path):
    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    write_records(root / "train.bin", random_images(6), np.arange(6) * 15, CIFAR100_FINE,
                  coarse_labels=np.arange(6) * 3)
    write_records(root / "test.bin", random_images(2), [1, 2], CIFAR100_FINE, coarse_labels=[0, 0])
    (root / "fine_label_names.txt").write_text("".join(f"fine{i}\n" for i in range(100)))
    (root / "coarse_label_names.txt").write_text("".join(f"coarse{i}\n" for i in range(20)))

    fine = open_dataset(tmp_path)
    assert fine.fmt.num_classes == 100 and fine.fmt.record_bytes == 3074
    assert fine.class_names[99] == "fine99"
    np.testing.assert_array_equal(fine.split("train").labels, np.arange(6) * 15)
    coarse = open_dataset(root, label="coarse")
    assert coarse.fmt.num_classes == 20 and coarse.class_names[0] == "coarse0"
    np.testing.assert_array_equal(coarse.split("train").labels, np.arange(6) * 3)
    with pytest.raises(UserError):
        open_dataset(root, label="middle")


def test_manifest_is_read_and_checked(tmp_path):
    make_cifar10_dir(tmp_path, sizes=(5,), test=0)
    write_records(tmp_path / "val_batch.bin", random_images(2), [0, 1])
    manifest = {"format": "cifar10", "source": "generated", "generated": True,
                "splits": {"train": 5, "val": 2}}
    (tmp_path / "multitower.json").write_text(json.dumps(manifest))
    dataset = open_dataset(tmp_path)
    assert dataset.generated is True and dataset.manifest["source"] == "generated"
    assert dataset.splits == ["train", "val"]

    manifest["splits"]["train"] = 50000
    (tmp_path / "multitower.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as excinfo:
        open_dataset(tmp_path)
    assert_one_line_error(excinfo, "50000", "train")

    (tmp_path / "multitower.json").write_text("{not json")
    with pytest.raises(UserError) as excinfo:
        open_dataset(tmp_path)
    assert_one_line_error(excinfo, "multitower.json")


def test_missing_split_names_the_ones_present(tmp_path):
    make_cifar10_dir(tmp_path, test=0)
    with pytest.raises(UserError) as excinfo:
        open_dataset(tmp_path).split("test")
    assert_one_line_error(excinfo, str(tmp_path), "'test'", "train")


# --- validation errors ----------------------------------------------------------------------

def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError) as excinfo:
        RecordFile(tmp_path / "nope.bin")
    assert_one_line_error(excinfo, "nope.bin")
    with pytest.raises(UserError) as excinfo:
        open_dataset(tmp_path / "nowhere")
    assert_one_line_error(excinfo, "nowhere", "does not exist")
    with pytest.raises(UserError) as excinfo:
        open_dataset(tmp_path)  # exists, but empty
    assert_one_line_error(excinfo, "not a data set")


def test_size_not_a_multiple_names_file_and_offset(tmp_path):
    write_records(tmp_path / "data_batch_1.bin", random_images(3), [0, 1, 2])
    with open(tmp_path / "data_batch_1.bin", "ab") as stream:
        stream.write(b"\0" * 100)  # a partial fourth record
    with pytest.raises(UserError) as excinfo:
        RecordFile(tmp_path / "data_batch_1.bin")
    assert_one_line_error(excinfo, "data_batch_1.bin", 3 * 3073 + 100, "3073", f"byte offset {3 * 3073}")
    with pytest.raises(UserError):
        open_dataset(tmp_path)  # the data set refuses to open too


def test_label_out_of_range_names_record_and_offset(tmp_path):
    write_records(tmp_path / "a.bin", random_images(5), [0, 1, 2, 3, 4])
    with open(tmp_path / "a.bin", "r+b") as stream:
        stream.seek(3 * 3073)
        stream.write(bytes([42]))
    with pytest.raises(UserError) as excinfo:
        RecordFile(tmp_path / "a.bin")
    assert_one_line_error(excinfo, "a.bin", "record 3", f"byte offset {3 * 3073}", "42", "0..9")


def test_cifar100_label_out_of_range(tmp_path):
    write_records(tmp_path / "train.bin", random_images(2), [5, 6], CIFAR100_FINE, coarse_labels=[1, 1])
    with open(tmp_path / "train.bin", "r+b") as stream:
        stream.seek(3074 + 1)
        stream.write(bytes([100]))  # fine labels stop at 99
    with pytest.raises(UserError) as excinfo:
        RecordFile(tmp_path / "train.bin", CIFAR100_FINE)
    assert_one_line_error(excinfo, "record 1", "byte offset 3074", "100", "0..99")
    assert len(RecordFile(tmp_path / "train.bin", CIFAR100_COARSE)) == 2  # coarse byte is fine


def test_empty_file(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(UserError) as excinfo:
        RecordFile(tmp_path / "data_batch_1.bin")
    assert_one_line_error(excinfo, "data_batch_1.bin", "empty")


def test_label_scan_is_fast_on_50k_records(tmp_path):
    images = np.zeros((50_000, 3, 32, 32), np.uint8)
    write_records(tmp_path / "big.bin", images, np.arange(50_000) % 10)
    start = time.perf_counter()
    records = RecordFile(tmp_path / "big.bin")
    assert len(records) == 50_000
    # Vectorised: ~20 ms on 2 cores; a per-record Python loop over the memmap
    # takes seconds. 1 s leaves room for a loaded CI machine.
    assert time.perf_counter() - start < 1.0
