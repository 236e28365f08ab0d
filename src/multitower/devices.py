"""`multitower devices`: what this machine offers for training, and what `train` would
pick on it by default (device, process-group backend, workers, threads per worker).

Reads /proc/cpuinfo and /proc/meminfo (Linux) and asks torch about CUDA, cuDNN, NCCL
and gloo; starts nothing on a GPU beyond reading its properties.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
import torch.distributed as dist

# /proc/cpuinfo flag names of the instruction sets that matter to torch's CPU kernels:
# AVX2 and AVX-512F for fp32 GEMMs; AVX-512 BF16 and AMX (tiles, bf16) for bf16 matmuls.
ISA_FLAGS = {"avx2": "avx2", "avx512f": "avx512f", "avx512_bf16": "avx512_bf16",
             "amx_tile": "amx_tile", "amx_bf16": "amx_bf16"}


def parse_cpuinfo(text: str) -> dict:
    """CPU model and instruction-set flags from the text of /proc/cpuinfo."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86, arm64
            flags = set(value.split())
    return {"model": model, "isa": {name: flag in flags for name, flag in ISA_FLAGS.items()}}


def parse_meminfo(text: str) -> dict:
    """Total and available memory in bytes from the text of /proc/meminfo (kB figures)."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable") and rest.split():
            values[key] = int(rest.split()[0]) * 1024
    return {"total_bytes": values.get("MemTotal"), "available_bytes": values.get("MemAvailable")}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def gpus() -> list[dict]:
    found = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found.append({"index": index, "name": props.name, "memory_bytes": props.total_memory,
                          "compute_capability": f"{props.major}.{props.minor}",
                          "multiprocessors": props.multi_processor_count})
    return found


def backends() -> dict:
    cuda = torch.cuda.is_available()
    nccl = dist.is_available() and dist.is_nccl_available()
    nccl_version = None
    if nccl and cuda:
        version = torch.cuda.nccl.version()
        nccl_version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    cudnn = torch.backends.cudnn.is_available()
    return {"cuda": {"available": cuda, "version": torch.version.cuda},
            "cudnn": {"available": cudnn, "version": torch.backends.cudnn.version() if cudnn else None},
            "nccl": {"available": nccl, "version": nccl_version},
            "gloo": {"available": dist.is_available() and dist.is_gloo_available()},
            "mpi": {"available": dist.is_available() and dist.is_mpi_available()}}


def describe() -> dict:
    """Everything `multitower devices --json` prints."""
    cores = len(os.sched_getaffinity(0))
    cpu = parse_cpuinfo(_read("/proc/cpuinfo"))
    if cpu["model"] == "unknown":
        cpu["model"] = platform.processor() or "unknown"
    cpu.update({"cores": cores, "logical_cpus": os.cpu_count(),
                "torch_capability": torch.backends.cpu.get_cpu_capability()})
    found_gpus = gpus()
    # What `train` does with its defaults (--device auto, --threads 0): see
    # train/loop.py resolve_device, threads_per_worker and parallel/sync.py init_process_group.
    if found_gpus:
        default = {"device": "cuda", "backend": "nccl", "workers": len(found_gpus),
                   "threads_per_worker": max(1, cores // len(found_gpus)),
                   "note": f"--workers {len(found_gpus)}: one worker per GPU (train's --workers default is 1)"}
    else:
        default = {"device": "cpu", "backend": "gloo", "workers": 1, "threads_per_worker": cores,
                   "note": "one worker using every core; --workers N splits the cores N ways"}
    return {"cpu": cpu, "memory": parse_meminfo(_read("/proc/meminfo")), "gpus": found_gpus,
            "backends": backends(), "train_default": default,
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}


def _gib(value) -> str:
    return "unknown" if value is None else f"{value / 2 ** 30:.1f} GiB"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_table(info: dict) -> str:
    """Two columns, what and value, as `multitower devices` prints them."""
    cpu, mem, b, default = info["cpu"], info["memory"], info["backends"], info["train_default"]
    rows = [("CPU", cpu["model"]),
            ("cores (this process may use)", f"{cpu['cores']} of {cpu['logical_cpus']} logical CPUs"),
            ("ISA", ", ".join(f"{name} {_yes(on)}" for name, on in cpu["isa"].items())),
            ("torch CPU kernels", cpu["torch_capability"]),
            ("memory", f"{_gib(mem['total_bytes'])} total, {_gib(mem['available_bytes'])} available")]
    if info["gpus"]:
        for g in info["gpus"]:
            rows.append((f"GPU {g['index']}", f"{g['name']}, {_gib(g['memory_bytes'])}, compute capability "
                                              f"{g['compute_capability']}, {g['multiprocessors']} SMs"))
    else:
        rows.append(("GPUs", "none (torch sees no CUDA device)"))
    rows += [("CUDA", f"{_yes(b['cuda']['available'])} (torch built with {b['cuda']['version'] or 'no CUDA'})"),
             ("cuDNN", f"{_yes(b['cudnn']['available'])}" + (f" {b['cudnn']['version']}" if b['cudnn']['version'] else "")),
             ("NCCL", f"{_yes(b['nccl']['available'])}" + (f" {b['nccl']['version']}" if b['nccl']['version'] else "")),
             ("gloo", _yes(b["gloo"]["available"])),
             ("MPI", _yes(b["mpi"]["available"])),
             ("torch / python", f"{info['versions']['torch']} / {info['versions']['python']}"),
             ("train would use", f"device {default['device']}, backend {default['backend']}, "
                                 f"{default['workers']} worker(s) x {default['threads_per_worker']} thread(s)"),
             ("", default["note"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(as_json: bool) -> str:
    info = describe()
    return json.dumps(info, indent=2) if as_json else format_table(info)
