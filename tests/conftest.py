"""Shared fixtures: a small generated data set and the path of the real CIFAR-10 images."""

from pathlib import Path

import pytest

# Read at run time only, never copied: tests that use it are skipped when it is absent.
SHARED_CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10-jpeg" / "train"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A generated data set of 2,048 training and 512 validation images."""
    from multitower.data.sources import make_synthetic
    out = tmp_path_factory.mktemp("data") / "synthetic"
    make_synthetic(out, train=2048, val=512, seed=0)
    return out
