"""Settings of a training process on its host: what `multitower train` sets once per process,
and the step benchmarks too (bench/step.py), so that they time what train runs.

Freed memory kept for reuse (glibc). torch's CPU allocator is plain malloc/free, and a
training step allocates and frees the same large tensors every step (cifar10-tf at batch
128: activations up to 19 MB each, ~55 MB in all). glibc returns such blocks to the kernel
(munmap, or trimming the top of the heap), so the next step faults every page back in,
zeroed: ~12,400 page faults and ~30 ms of kernel time per step on this repo's 2-core Xeon,
~15% of the step's CPU time; kept, under 200 faults and ~2 ms (issue 20). The same cure as
the jemalloc / tcmalloc preload that Intel's PyTorch CPU tuning guide recommends, with no
library to install: mallopt(3) settings that keep what the heap grew to and serve large
blocks from it instead of fresh mappings. The process's
resident memory stays at its peak (the step's, once warm), as a CUDA caching allocator's
does; benchmarks/train_e2e.py reports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource

import torch

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
KEEP_BYTES = 1 << 40  # a trim threshold no heap reaches: the top of the heap is never given back
TOP_PAD_BYTES = 64 << 20  # the heap grows by at least this much at a time


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module's docstring); once per
    process. False where the C library is not glibc (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl and others have other knobs
    except (OSError, AttributeError, TypeError):
        return False
    # Measured on the cifar10-tf step (page faults per step): glibc's defaults 12,400; the
    # trim threshold alone, or with the mmap threshold at its 32 MiB maximum, 10,500-18,000;
    # with the top pad too, 0-180. Blocks above the mmap threshold would be fresh mappings
    # each step: M_MMAP_MAX 0 takes every block from the heap; the top pad makes the heap
    # grow in 64 MiB strides rather than to each request's size.
    return (bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
            and bool(mallopt(M_TOP_PAD, TOP_PAD_BYTES)))


def configure_process(threads: int) -> None:
    """A training process's settings: `threads` intra-op threads, freed memory kept."""
    torch.set_num_threads(threads)
    keep_freed_memory()


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak memory so far, for metrics.jsonl: the resident set (bytes; Linux
    reports it in KiB) and, on a GPU, torch.cuda.max_memory_allocated (no sync)."""
    peaks = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peaks["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peaks
