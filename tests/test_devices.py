"""`multitower devices`: the machine's training resources, as a table and as JSON."""

import json

import pytest
import torch

from multitower.cli import main
from multitower.devices import parse_cpuinfo, parse_meminfo

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_tile amx_bf16
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_tile amx_bf16
"""


def test_cpuinfo_flags_become_isa_features():
    parsed = parse_cpuinfo(CPUINFO)
    assert parsed["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert parsed["isa"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True}
    older = parse_cpuinfo("model name : AMD EPYC\nflags : fpu avx avx2\n")
    assert older["isa"]["avx2"] and not older["isa"]["avx512f"] and not older["isa"]["amx_tile"]
    assert parse_cpuinfo("")["model"] == "unknown"


def test_meminfo_in_bytes():
    parsed = parse_meminfo("MemTotal:       24683656 kB\nMemFree:  1 kB\nMemAvailable:   21274856 kB\n")
    assert parsed == {"total_bytes": 24683656 * 1024, "available_bytes": 21274856 * 1024}
    assert parse_meminfo("") == {"total_bytes": None, "available_bytes": None}


def test_table_lists_every_resource(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for key in ("CPU", "cores", "ISA", "avx2", "avx512f", "amx", "memory", "CUDA", "cuDNN", "NCCL", "gloo",
                "train would use"):
        assert key in out, key
    if not torch.cuda.is_available():
        assert "GPUs" in out and "none" in out
        assert "device cpu, backend gloo, 1 worker(s)" in out


def test_json_parses_and_names_the_defaults(capsys):
    assert main(["devices", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"cpu", "memory", "gpus", "backends", "train_default", "versions"}
    assert info["cpu"]["cores"] >= 1 and set(info["cpu"]["isa"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert set(info["backends"]) == {"cuda", "cudnn", "nccl", "gloo", "mpi"}
    assert info["backends"]["gloo"]["available"] is True
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU defaults below do not apply")
    assert info["gpus"] == []
    assert info["train_default"]["backend"] == "gloo" and info["train_default"]["device"] == "cpu"
    assert info["train_default"]["workers"] == 1
    assert info["train_default"]["threads_per_worker"] == info["cpu"]["cores"]


def test_workers_beyond_the_gpus_wrap_around_and_talk_over_gloo(monkeypatch):
    """2 workers on 1 GPU (benchmarks/gpu_check.sh runs it): both take cuda:0, and the group
    is gloo, since NCCL refuses two ranks on one device; one worker per GPU keeps NCCL."""
    from multitower.parallel.process_group import backend_for
    from multitower.train.build import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for local_rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert resolve_device("cuda") == torch.device("cuda", 0)
    assert backend_for(torch.device("cuda", 0)) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"
