"""Shared fixtures: a small generated data set, the path of the real CIFAR-10 images, and
the CPU-only rule below."""

import os
import time
import uuid
from pathlib import Path

import pytest

from multitower.procs import parent_of

# Read at run time only, never copied: tests that use it are skipped when it is absent.
SHARED_CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10-jpeg" / "train"

# Modules that test the machine's real devices; every other test runs on the CPU alone.
SEES_REAL_DEVICES = {"test_cuda.py", "test_devices.py"}


@pytest.fixture(autouse=True)
def cpu_only(request, monkeypatch):
    """Outside the CUDA tests, hide any GPU: `--device auto` then means the CPU in this
    process (torch.cuda.is_available) and in the jobs a test starts (CUDA_VISIBLE_DEVICES),
    so the CPU suite computes the same on a GPU machine as on a CPU-only one."""
    if Path(str(request.node.fspath)).name in SEES_REAL_DEVICES:
        return
    import torch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A generated data set of 2,048 training and 512 validation images."""
    from multitower.data.sources import make_synthetic
    out = tmp_path_factory.mktemp("data") / "synthetic"
    make_synthetic(out, train=2048, val=512, seed=0)
    return out


def _processes_marked(marker: bytes) -> list[str]:
    """Processes (other than this one) whose environment carries `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker not in f.read():
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
            if parent_of(int(pid)) == os.getpid() and "multiprocessing.resource_tracker" in command:
                continue  # this process's own, for the tests that mp.spawn: it lives as long as we do
            found.append(f"{pid}: {command}")
        except OSError:
            pass
    return found


SESSION_MARKER = uuid.uuid4().hex


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(monkeypatch):
    """Every job a test starts (and every worker of it) must be gone when the test ends:
    a worker left behind holds memory, a core, and perhaps a run directory."""
    if not os.path.isdir("/proc"):
        yield
        return
    marker = f"MULTITOWER_TEST_SESSION={SESSION_MARKER}"
    monkeypatch.setenv("MULTITOWER_TEST_SESSION", SESSION_MARKER)
    yield
    deadline = time.monotonic() + 15
    while (left := _processes_marked(marker.encode())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes outlived the test: {left}"
