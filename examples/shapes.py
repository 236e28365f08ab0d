"""Your own data at its own resolution: a data set that is not CIFAR-10, as a map-style
dataset of PIL images, trained and evaluated through multitower's Python API.

    python examples/shapes.py                                  # 1 process
    python examples/shapes.py --strategy sync --workers 2      # 2 synchronous workers

The data: 48x64 RGB pictures of four shapes (disc, square, triangle, bar), drawn at random
sizes, places and colours on noise, generated here (nothing is downloaded). Any map-style
dataset of (image, label) works the same way: a torchvision dataset, a list of pairs,
your own class; images are PIL images, uint8 arrays or tensors. They are never resized
unless you ask (image_size=[h, w]).
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw
from torch import nn

import multitower as mt

SHAPES = ("disc", "square", "triangle", "bar")
HEIGHT, WIDTH = 48, 64


class Shapes:
    """`count` pictures, each made from its index (the same on every process)."""

    classes = list(SHAPES)

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, index])
        label = index % len(SHAPES)
        noise = rng.integers(0, 96, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        size = int(rng.integers(10, 20))
        x, y = int(rng.integers(size, WIDTH - size)), int(rng.integers(size, HEIGHT - size))
        colour = tuple(int(c) for c in rng.integers(120, 256, 3))
        if SHAPES[label] == "disc":
            draw.ellipse((x - size, y - size, x + size, y + size), fill=colour)
        elif SHAPES[label] == "square":
            draw.rectangle((x - size, y - size, x + size, y + size), fill=colour)
        elif SHAPES[label] == "triangle":
            draw.polygon([(x, y - size), (x - size, y + size), (x + size, y + size)], fill=colour)
        else:
            draw.rectangle((x - size, y - size // 4, x + size, y + size // 4), fill=colour)
        return image, label


def small_cnn(num_classes: int = 4) -> nn.Module:
    """Three conv blocks and a linear layer; adaptive pooling makes it indifferent to the
    input's size (here 48x64)."""
    def block(channels_in, channels):
        return nn.Sequential(nn.Conv2d(channels_in, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def shapes_data(train: int = 2000, val: int = 400) -> mt.ImageData:
    return mt.ImageData(train=Shapes(train, seed=0), val=Shapes(val, seed=1), name="shapes (48x64)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--run-dir", default="runs/shapes")
    a = p.parse_args(argv)
    data = shapes_data(a.train_images)
    result = mt.fit(model=small_cnn, data=data, recipe="plain", strategy=a.strategy, workers=a.workers,
                    steps=a.steps, batch_size=64, run_dir=a.run_dir, checkpoint_every=a.steps, log_every=10,
                    summary_every=0)
    print(f"trained {result.step} steps, {result.examples_per_sec:.1f} examples/sec")
    evaluation = mt.evaluate(a.run_dir, model=small_cnn, data=data)
    print(evaluation.table())


if __name__ == "__main__":
    main()
