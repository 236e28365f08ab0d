"""The fixed-length binary record format of CIFAR-10/100 (the TF tutorial's
FixedLengthRecordReader + read_cifar10), read through memory maps.

A record is the label byte(s) followed by a 3x32x32 image stored depth-major:
1024 red bytes, then 1024 green, then 1024 blue, each plane row by row. CIFAR-10
records are 1 + 3072 = 3073 bytes; CIFAR-100 records carry a coarse label byte
then a fine label byte, 3074 bytes. Files are validated once on open (size,
labels) so a corrupt download fails with one line instead of a bad training run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multitower.errors import UserError
from multitower.files import replacing

MANIFEST_NAME = "multitower.json"
CIFAR10_CLASS_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
# Our writers split the train set into files of 10,000 records, like the
# official data_batch_1..5.bin (5 x 10,000 = 50,000).
RECORDS_PER_FILE = 10_000
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class RecordFormat:
    """The byte layout of one record: label byte(s), then a depth-major image.

    `label_index` picks which label byte is the label; the others are carried
    but ignored (CIFAR-100's coarse byte 0 when training on fine labels).
    """

    name: str
    label_bytes: int
    label_index: int
    num_classes: int
    image_shape: tuple[int, int, int] = (3, 32, 32)
    """(channels, height, width): CIFAR's 3x32x32, or what an import kept (its manifest's
    "image_shape"), so that data at another resolution is never squashed silently."""

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def record_bytes(self) -> int:
        return self.label_bytes + self.image_bytes


CIFAR10 = RecordFormat("cifar10", label_bytes=1, label_index=0, num_classes=10)
CIFAR100_FINE = RecordFormat("cifar100", label_bytes=2, label_index=1, num_classes=100)
CIFAR100_COARSE = RecordFormat("cifar100", label_bytes=2, label_index=0, num_classes=20)


class RecordFile:
    """One .bin file of fixed-length records, memory-mapped read-only.

    Opening validates the size and scans the label column (one vectorised pass;
    about 10 ms for 10,000 records once the file is in the page cache). Pickling
    sends only the path, so DataLoader workers re-map the file instead of
    receiving a 30 MB copy of it.
    """

    def __init__(self, path: str | os.PathLike, fmt: RecordFormat = CIFAR10):
        self.path = Path(path)
        self.fmt = fmt
        self._file, self._raw = _map_records(self.path, fmt)
        self._pixels = _plain_view(self._raw, fmt)
        label_column = self._raw[:, fmt.label_index]
        _check_labels(self.path, fmt, label_column)
        self._labels = label_column.astype(np.int64)

    def __len__(self) -> int:
        return self._raw.shape[0]

    @property
    def images(self) -> np.ndarray:
        """uint8 [N, 3, 32, 32]: a view into the memory map, not a copy."""
        return self._raw[:, self.fmt.label_bytes:].reshape((len(self),) + tuple(self.fmt.image_shape))

    @property
    def labels(self) -> np.ndarray:
        """int64 [N], read once on open."""
        return self._labels

    def __getstate__(self):
        return {"path": self.path, "fmt": self.fmt, "labels": self._labels}

    def __setstate__(self, state):
        self.path, self.fmt, self._labels = state["path"], state["fmt"], state["labels"]
        self._file, self._raw = _map_records(self.path, self.fmt)
        self._pixels = _plain_view(self._raw, self.fmt)
        if self._raw.shape[0] != len(self._labels):
            raise UserError(f"{self.path} changed size while in use; re-create the data set")

    def __repr__(self) -> str:
        return f"RecordFile({str(self.path)!r}, {self.fmt.name}, {len(self)} records)"

    def check_unchanged(self) -> None:
        """One-line UserError if the mapped file shrank or grew since it was opened (another
        program truncated or rewrote it): reading a page past a shrunken file's end would
        kill the process with SIGBUS instead. One fstat (microseconds) per batch per file."""
        size = os.fstat(self._file.fileno()).st_size
        expected = self._raw.shape[0] * self.fmt.record_bytes
        if size != expected:
            raise UserError(f"{self.path} changed size while in use (from {expected:,} to {size:,} bytes: "
                            f"another program truncated or rewrote it); re-create the data set, then --resume")


def _map_records(path: Path, fmt: RecordFormat):
    """(open file, memory map of it as uint8 [N, record_bytes]) after checking its size; the
    file stays open so that check_unchanged can fstat the very inode that is mapped."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    size = path.stat().st_size
    record = fmt.record_bytes
    if size == 0:
        raise UserError(f"{path}: file is empty (0 bytes); re-create the data set")
    if size % record:
        partial_start = size - size % record
        hint = ""
        for other in (3073, 3074):
            if other != record and size % other == 0:
                hint = f" (it is a multiple of {other} bytes: wrong format, CIFAR-10 vs CIFAR-100?)"
        raise UserError(
            f"{path}: size {size} bytes is not a multiple of the {record}-byte {fmt.name} record; "
            f"a partial record starts at byte offset {partial_start}{hint}; "
            "the file is truncated or corrupt, re-create the data set")
    stream = open(path, "rb")
    return stream, np.memmap(stream, dtype=np.uint8, mode="r", shape=(size // record, record))


def _plain_view(raw: np.ndarray, fmt: RecordFormat) -> np.ndarray:
    """The images as a plain ndarray over the same mapping: fancy-indexing it skips
    np.memmap's Python-level __getitem__, about 4x faster for a 128-image batch."""
    return np.asarray(raw)[:, fmt.label_bytes:].reshape((raw.shape[0],) + tuple(fmt.image_shape))


def _check_labels(path: Path, fmt: RecordFormat, label_column: np.ndarray) -> None:
    bad = np.flatnonzero(label_column >= fmt.num_classes)
    if bad.size:
        index = int(bad[0])
        raise UserError(
            f"{path}: record {index} at byte offset {index * fmt.record_bytes} has label "
            f"{int(label_column[index])} (label byte {fmt.label_index}); {fmt.name} labels must be "
            f"0..{fmt.num_classes - 1} ({bad.size} bad records); the file is corrupt or another format")


def write_records(path, images, labels, fmt: RecordFormat = CIFAR10, coarse_labels=None) -> None:
    """Write `images` (uint8 [N, *fmt.image_shape]) and `labels` as one .bin file, atomically.

    The label goes in byte `fmt.label_index`. For CIFAR-100 fine labels,
    `coarse_labels` fill byte 0 (zeros when None). The file appears at `path`
    only once complete: it is written to path + ".tmp-<pid>", fsynced, renamed.
    """
    path = Path(path)
    images = np.asarray(images)
    labels = np.asarray(labels)
    count = images.shape[0] if images.ndim else 0
    if images.dtype != np.uint8 or images.shape != (count,) + tuple(fmt.image_shape):
        raise UserError(f"write_records({path}): images must be uint8 [N, {', '.join(map(str, fmt.image_shape))}], "
                        f"got {images.dtype} {images.shape}")
    if labels.shape != (count,):
        raise UserError(f"write_records({path}): {count} images but labels have shape {labels.shape}")
    _check_label_values(path, "labels", labels, fmt.num_classes)

    records = np.empty((count, fmt.record_bytes), dtype=np.uint8)
    records[:, :fmt.label_bytes] = 0
    records[:, fmt.label_index] = labels
    if coarse_labels is not None:
        if fmt.label_bytes != 2 or fmt.label_index != 1:
            raise UserError(
                f"write_records({path}): coarse_labels only apply to CIFAR-100 with fine labels, not {fmt}")
        coarse_labels = np.asarray(coarse_labels)
        if coarse_labels.shape != (count,):
            raise UserError(
                f"write_records({path}): {count} images but coarse_labels have shape {coarse_labels.shape}")
        _check_label_values(path, "coarse_labels", coarse_labels, CIFAR100_COARSE.num_classes)
        records[:, 0] = coarse_labels
    records[:, fmt.label_bytes:] = images.reshape(count, -1)

    with replacing(path) as temporary:
        records.tofile(temporary)


def _check_label_values(path: Path, what: str, values: np.ndarray, num_classes: int) -> None:
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise UserError(
            f"write_records({path}): {what} must lie in 0..{num_classes - 1}, "
            f"got {values.min()}..{values.max()}")


class Split:
    """One split (train, val or test): several RecordFiles read as one sequence."""

    def __init__(self, files: list[RecordFile]):
        self.files = list(files)
        sizes = [len(f) for f in self.files]
        # starts[i] is the global index of file i's first record; starts[-1] = N.
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._labels = (np.concatenate([f.labels for f in self.files])
                        if self.files else np.empty(0, np.int64))

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def labels(self) -> np.ndarray:
        """int64 [N]: every label of the split, concatenated in file order."""
        return self._labels

    def gather(self, indices):
        """Read the examples at `indices` as (uint8 [B, C, H, W], int64 [B]) tensors.

        One fancy-index per file touched (at most 5 for CIFAR-10 train), never a
        Python loop over examples; the output order follows `indices`.
        """
        import torch  # here, not at module level: image-decoding workers import this module

        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(
                f"gather: indices must lie in 0..{len(self) - 1}, got {indices.min()}..{indices.max()}")
        first = tuple(self.files[0].fmt.image_shape) if self.files else (3, 32, 32)
        images = np.empty((indices.size,) + first, dtype=np.uint8)
        if len(self.files) == 1:
            self.files[0].check_unchanged()
            images[:] = self.files[0]._pixels[indices]
        else:
            file_of = np.searchsorted(self._starts, indices, side="right") - 1
            for number in np.unique(file_of):
                chosen = np.flatnonzero(file_of == number)
                local = indices[chosen] - self._starts[number]
                self.files[number].check_unchanged()
                images[chosen] = self.files[number]._pixels[local]
        return torch.from_numpy(images), torch.from_numpy(self._labels[indices])

    def __repr__(self) -> str:
        return f"Split({len(self.files)} files, {len(self)} records)"


class Dataset:
    """One data-set directory: its splits, class names and manifest.

    `manifest` is the parsed multitower.json ({} for the official layouts, which
    have none); `generated` is True for synthetic data.
    """

    def __init__(self, root: Path, fmt: RecordFormat, class_names: list[str],
                 manifest: dict, split_files: dict[str, list[RecordFile]]):
        self.root = root
        self.fmt = fmt
        self.class_names = class_names
        self.manifest = manifest
        self.generated = bool(manifest.get("generated", False))
        self._splits = {name: Split(files) for name, files in split_files.items()}

    @property
    def splits(self) -> list[str]:
        return [name for name in SPLIT_NAMES if name in self._splits]

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise UserError(
                f"{self.root} has no '{name}' split; it has: {', '.join(self.splits) or 'none'}")
        return self._splits[name]

    @property
    def num_classes(self) -> int:
        return self.fmt.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        return tuple(self.fmt.image_shape)

    def describe(self) -> str:
        kind = "GENERATED (synthetic) data, not CIFAR-10" if self.generated else f"{self.fmt.name} data"
        c, h, w = self.image_shape
        size = "" if (c, h, w) == (3, 32, 32) else f", {c}x{h}x{w} images"
        return f"data: {kind} from {self.root}{size}"

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(self._splits[name])}" for name in self.splits)
        kind = " generated" if self.generated else ""
        return f"Dataset({str(self.root)!r}, {self.fmt.name}{kind}, {sizes})"


# Official archives unpack into these folders; users often point at their parent.
_OFFICIAL_SUBDIRS = ("cifar-10-batches-bin", "cifar-100-binary")
_TRAIN_BATCH = re.compile(r"data_batch_(\d+)\.bin")


def open_dataset(root, label: str = "fine") -> Dataset:
    """Open and validate a data-set directory (ours, or an official CIFAR-10/100 one).

    `label` picks CIFAR-100's fine (100) or coarse (20) labels; CIFAR-10 ignores it.
    Every record file is opened, size-checked and label-scanned here, so a
    corrupt data set fails now rather than mid-training.
    """
    if label not in ("fine", "coarse"):
        raise UserError(f"label must be 'fine' or 'coarse', got {label!r}")
    root = Path(root)
    if not root.exists():
        raise UserError(f"data set {root} does not exist; download, import or generate it first")
    if not root.is_dir():
        raise UserError(f"data set {root} is not a directory")
    root = _descend_into_official_folder(root)

    manifest = _read_manifest(root)
    layout = _detect_layout(root, manifest)
    if layout == "cifar100":
        fmt = CIFAR100_FINE if label == "fine" else CIFAR100_COARSE
        split_paths = {"train": [root / "train.bin"], "val": [root / "val.bin"], "test": [root / "test.bin"]}
        names_file = root / f"{label}_label_names.txt"
    else:
        fmt = CIFAR10
        batches = sorted((int(m.group(1)), p) for p in root.iterdir()
                         if (m := _TRAIN_BATCH.fullmatch(p.name)))
        split_paths = {"train": [p for _, p in batches], "val": [root / "val_batch.bin"],
                       "test": [root / "test_batch.bin"]}
        names_file = root / "batches.meta.txt"
    split_paths = {name: paths for name, paths in split_paths.items()
                   if paths and all(p.exists() for p in paths)}
    if not split_paths:
        raise UserError(f"{root} holds no record files ({_expected_files(layout)})")

    if "image_shape" in manifest:  # an import that kept its images' own resolution
        shape = manifest["image_shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
            raise UserError(f"{root / MANIFEST_NAME}: image_shape must be [channels, height, width], got {shape!r}")
        fmt = dataclasses.replace(fmt, image_shape=tuple(shape))
    class_names = _read_class_names(root, names_file, manifest)
    if layout == "cifar10" and len(class_names) != CIFAR10.num_classes:
        # Our imports may hold any number of classes; the record layout stays CIFAR-10's.
        if not 2 <= len(class_names) <= 256:
            raise UserError(f"{names_file}: {len(class_names)} class names; need 2..256 (one label byte)")
        fmt = dataclasses.replace(fmt, num_classes=len(class_names))
    elif len(class_names) != fmt.num_classes:
        raise UserError(
            f"{names_file}: {len(class_names)} class names, expected {fmt.num_classes}; the file is corrupt")

    split_files = {name: [RecordFile(p, fmt) for p in paths] for name, paths in split_paths.items()}
    _check_manifest_counts(root, manifest, split_files)
    return Dataset(root, fmt, class_names, manifest, split_files)


def _descend_into_official_folder(root: Path) -> Path:
    if (root / MANIFEST_NAME).exists() or any(root.glob("*.bin")):
        return root
    present = [root / name for name in _OFFICIAL_SUBDIRS if (root / name).is_dir()]
    if len(present) > 1:
        raise UserError(f"{root} holds both {present[0].name}/ and {present[1].name}/; point at one of them")
    return present[0] if present else root


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable manifest ({_one_line(error)}); re-create the data set") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: manifest must be a JSON object; re-create the data set")
    return manifest


def _detect_layout(root: Path, manifest: dict) -> str:
    if manifest:
        layout = manifest.get("format")
        if layout not in ("cifar10", "cifar100"):
            raise UserError(f"{root / MANIFEST_NAME}: unknown format {layout!r}; expected 'cifar10' or 'cifar100'")
        return layout
    if (root / "train.bin").exists() or (root / "test.bin").exists():
        return "cifar100"
    if (root / "test_batch.bin").exists() or any(_TRAIN_BATCH.fullmatch(p.name) for p in root.iterdir()):
        return "cifar10"
    raise UserError(
        f"{root} is not a data set: no {MANIFEST_NAME}, data_batch_*.bin or train.bin; "
        "download, import or generate one first")


def _expected_files(layout: str) -> str:
    if layout == "cifar100":
        return "expected train.bin, val.bin or test.bin"
    return "expected data_batch_*.bin, val_batch.bin or test_batch.bin"


def _read_class_names(root: Path, names_file: Path, manifest: dict) -> list[str]:
    if names_file.exists():
        try:
            text = names_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{names_file}: unreadable ({_one_line(error)})") from None
        # The official batches.meta.txt ends with blank lines: skip them.
        return [line.strip() for line in text.splitlines() if line.strip()]
    if manifest.get("class_names"):
        return [str(name) for name in manifest["class_names"]]
    if names_file.name == "batches.meta.txt":
        return list(CIFAR10_CLASS_NAMES)
    raise UserError(f"{names_file}: missing; the CIFAR-100 folder is incomplete, re-download it")


def _check_manifest_counts(root: Path, manifest: dict, split_files: dict) -> None:
    """A manifest that promises more records than are on disk means a damaged copy."""
    expected = manifest.get("splits") or {}
    for name, count in expected.items():
        actual = sum(len(f) for f in split_files.get(name, []))
        if actual != count:
            raise UserError(
                f"{root}: {MANIFEST_NAME} lists {count} '{name}' records but the files hold {actual}; "
                "the data set is incomplete or was modified, re-create it")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
