"""ResNet-18 (the CIFAR variant: 11.2M parameters, 44.7 MB of gradients a step, ten times
the tutorial's network) trained through multitower's Python API with any strategy.

    python examples/resnet18.py --strategy sync --workers 2 --steps 200
    python examples/resnet18.py --strategy local-sgd --workers 2 --sync-every 8
    python examples/resnet18.py --strategy downpour --workers 2 --ps 2
    python examples/resnet18.py --strategy pipeline --workers 2        # 2 stages: stem..layer3 | layer4..fc

The network is yours, not multitower's: a factory of an nn.Module, given the number of
classes. Its top-level children run in order (forward applies them one after the other),
which is all the pipeline strategy needs to cut it between stages. The data: CIFAR-10
records (`multitower data import ...`) when --data names them or data/cifar10 exists,
else a generated set, said so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import multitower as mt


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (He et al. 2016)."""

    def __init__(self, channels_in: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Sequential):
    """CIFAR ResNet-18: a 3x3 stem (no max-pool: 32x32 inputs are small), four stages of two
    blocks (64, 128, 256, 512 channels), global average pooling, one linear layer."""

    def __init__(self, num_classes: int = 10):
        def stage(channels_in, channels, stride):
            return nn.Sequential(BasicBlock(channels_in, channels, stride), BasicBlock(channels, channels))
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.layer1, self.layer2 = stage(64, 64, 1), stage(64, 128, 2)
        self.layer3, self.layer4 = stage(128, 256, 2), stage(256, 512, 2)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(512, num_classes)


def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet18(num_classes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="sync", help="single, sync, local-sgd, downpour, pipeline, hogwild")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--data", default="", help="CIFAR-10 records (default: data/cifar10, else generated)")
    p.add_argument("--run-dir", default="runs/resnet18")
    p.add_argument("--sync-every", type=int, default=8, help="local-sgd: steps between averages")
    p.add_argument("--ps", type=int, default=2, help="downpour: parameter servers")
    a = p.parse_args(argv)
    data = a.data or ("data/cifar10" if Path("data/cifar10/multitower.json").exists() else "")
    if not data:
        from multitower.data.sources import make_synthetic
        data = "data/synthetic"
        if not Path(data, "multitower.json").exists():
            make_synthetic(data)
        print(f"no CIFAR-10 records given: training on GENERATED data ({data})")
    own = {"local-sgd": {"sync_every": a.sync_every}, "downpour": {"ps": a.ps}}.get(a.strategy, {})
    result = mt.fit(model=resnet18, data=data, recipe="plain", strategy=a.strategy, workers=a.workers,
                    steps=a.steps, batch_size=a.batch_size, run_dir=a.run_dir, checkpoint_every=max(1, a.steps // 2),
                    summary_every=0, **own)
    print(f"trained {result.step} steps, {result.examples_per_sec:.1f} examples/sec")
    evaluation = mt.evaluate(a.run_dir, model=resnet18)
    print(f"precision @ 1 on {evaluation.split}: {evaluation.precision_at_1:.3f} ({evaluation.weights} weights)")


if __name__ == "__main__":
    main()
