"""Your own data: a map-style dataset of (image, label) pairs, as the loader reads data.

The loader reads an ExampleSource: len() and gather(indices) -> (uint8 images [B, C, H, W],
int64 labels [B]); data/records.py's splits are one. ImageData wraps any map-style
dataset (torchvision's, a list, your own class with __getitem__ and __len__) into the same
shape: images may be PIL images, uint8 arrays or tensors (HWC or CHW), or float tensors
in [0, 1] (quantised to uint8, as the augmentations work on uint8). Resized makes any
source read at another resolution, only when asked (--image-size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from multitower.errors import UserError


def _to_chw_uint8(image: Any, index: int) -> torch.Tensor:
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image (copied: torch wants it writable)
        image = np.array(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, copy=True))
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.dim() == 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)  # HWC -> CHW
    if tensor.dim() != 3:
        raise UserError(f"example {index}: an image must be 2-D or 3-D (HWC or CHW), got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point:
        if tensor.min() < 0 or tensor.max() > 1:
            raise UserError(f"example {index}: a float image must lie in [0, 1] (it is quantised to uint8), "
                            f"got {float(tensor.min()):.3g}..{float(tensor.max()):.3g}")
        tensor = (tensor * 255).round()
    return tensor.to(torch.uint8).contiguous()


class MapSource:
    """An ExampleSource over a map-style dataset of (image, label) pairs."""

    def __init__(self, dataset, name: str = "data"):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise UserError(f"{name} must be a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise UserError(f"{name} is empty")
        self.dataset, self.name = dataset, name
        first, _ = self._example(0)
        self.image_shape = tuple(first.shape)

    def _example(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[int(index)]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"{self.name}[{index}] must be an (image, label) pair, got {type(item).__name__}")
        image, label = item
        return _to_chw_uint8(image, index), int(label)

    def __len__(self) -> int:
        return len(self.dataset)

    def gather(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for index in np.asarray(indices).reshape(-1):
            image, label = self._example(index)
            if tuple(image.shape) != self.image_shape:
                raise UserError(f"{self.name}[{index}] is {tuple(image.shape)}, the first image "
                                f"{self.image_shape}: give images of one size (or --image-size)")
            images.append(image)
            labels.append(label)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)

    @property
    def labels(self) -> np.ndarray:
        """Every label (one pass over the dataset: made once, for the class count)."""
        if not hasattr(self, "_labels"):
            self._labels = np.array([int(self.dataset[i][1]) for i in range(len(self))], dtype=np.int64)
        return self._labels


class Resized:
    """Another source read at (height, width): each gathered batch resized (bilinear,
    antialiased) on the uint8 images."""

    def __init__(self, source, size: tuple[int, int]):
        self.source, self.size = source, tuple(size)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self):
        return self.source.labels

    def gather(self, indices):
        images, labels = self.source.gather(indices)
        resized = F.interpolate(images.float(), size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return resized.round().clamp_(0, 255).to(torch.uint8), labels


@dataclass
class ImageData:
    """A data set of your own for multitower.fit: map-style datasets of (image, label)."""

    train: Any
    """The training examples."""
    val: Any = None
    """Held-out examples for evaluation (eval's default split), or None."""
    class_names: list[str] | None = None
    """Names of the labels 0, 1, ...; default: the dataset's `classes`, else the numbers."""
    name: str = "your data"
    """How logs and reports name it."""
    generated: bool = False
    _splits: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._splits = {"train": MapSource(self.train, f"{self.name} (train)")}
        if self.val is not None:
            self._splits["val"] = MapSource(self.val, f"{self.name} (val)")
        if self.class_names is None:
            classes = getattr(self.train, "classes", None)
            count = int(self._splits["train"].labels.max()) + 1 if classes is None else len(classes)
            self.class_names = list(classes) if classes is not None else [str(i) for i in range(count)]

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def split(self, name: str):
        if name not in self._splits:
            raise UserError(f"{self.name} has no {name!r} split; it has {', '.join(self._splits)}")
        return self._splits[name]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._splits["train"].image_shape

    @property
    def root(self) -> str:
        return self.name

    def describe(self) -> str:
        c, h, w = self.image_shape
        return f"data: {self.name} ({len(self._splits['train'])} training examples, {c}x{h}x{w} images)"
