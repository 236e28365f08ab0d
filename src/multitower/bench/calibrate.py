"""Measure the alpha and beta of this machine's gloo all-reduce: 2 processes on loopback.

Each message size is all-reduced back to back by both ranks (a loop of several calls per
sample, so that the start skew between the ranks is spread over many of them); rank 0's
median time per call is then fitted to the ring model t = 2(n-1)/n * bytes/beta +
2(n-1) * alpha by least squares on the relative error, so that 1 KB messages (where
alpha shows) weigh as much as 16 MB ones (where beta shows). The process's CPU time per
call (all its threads: gloo's, and the kernel's TCP work done on its behalf) over the bytes
it sends gives the link's cpu_s_per_byte: what communication takes from the compute cores.
One message size (OVERLAP_BYTES) is all-reduced again with each rank's core idle and with
it computing (a thread of matrix products beside the all-reduce, as backward runs beside
DDP's), in turn: idle over busy time is the link's overlap_efficiency. The products done
beside the busy all-reduce, against as many seconds of them alone just after, give the
compute the transfer took from the core, per byte sent: the link's beside_cpu_s_per_byte
(over shaped links about twice its CPU time: gloo's thread wakes for every few packets on
a core the compute holds).

With hook="bf16" each call is what DDP's bf16_compress_hook does to a gradient bucket (sync
--grad-compression bf16): the float32 bucket cast to bfloat16 and divided by the ranks, that
all-reduced (gloo sums bfloat16 element by element), the result copied back into the
bucket. A message of m bytes is then the m bfloat16 bytes on the wire (a 2m-byte bucket),
and the casts and the slower sums land in the CPU per byte: the link as that job sees it.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from multitower.bench.cost_model import Link, ring_bytes_per_rank
from multitower.errors import UserError

MESSAGE_BYTES = [1024 * 4 ** k for k in range(8)]  # 1 KB ... 16 MB
CPU_FIT_BYTES = 2 ** 20  # messages from 1 MiB up give cpu_s_per_byte (below, per-call costs weigh in)
OVERLAP_BYTES = 4 * 2 ** 20  # the size overlap_efficiency is timed at: a gradient bucket's (cifar10-tf: 3.8 MB)
ALONE_S = 0.05  # the shortest window the busy core's pace alone is counted over (a product ~0.2-1 ms)
HOOKS = ("none", "bf16")  # what one call all-reduces: the float32 message, or the bf16 hook's (module docstring)


class _Message:
    """One calibration message of `nbytes` on the wire, and how one call all-reduces it."""

    def __init__(self, nbytes: int, hook: str):
        if hook not in HOOKS:
            raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
        self.hook = hook
        elements = max(1, nbytes // (2 if hook == "bf16" else 4))
        self.bucket = torch.ones(elements, dtype=torch.float32)  # the bucket, float32 either way

    def all_reduce(self) -> None:
        if self.hook == "none":
            dist.all_reduce(self.bucket)
            return
        # DDP's own hook, the one sync --grad-compression bf16 registers; it takes a 1-tuple
        # of the bucket's buffer where DDP passes a GradBucket.
        default_hooks.bf16_compress_hook(None, (self.bucket,)).wait()


def fit_alpha_beta(sizes_bytes: list[float], times_s: list[float], world_size: int = 2) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) of the ring model fitted to per-call times, minimising
    the sum of squared relative errors ((a + b*m - t) / t)^2 over a = 2(n-1)alpha and
    b = 2(n-1)/n / beta. Raises UserError when the timings give no positive fit."""
    if len(sizes_bytes) != len(times_s) or len(sizes_bytes) < 2:
        raise UserError(f"need at least 2 (size, time) pairs to fit alpha and beta, got {len(times_s)}")
    # Weighted normal equations for t ~ a + b m with weights 1/t^2.
    s00 = s01 = s11 = r0 = r1 = 0.0
    for m, t in zip(sizes_bytes, times_s):
        weight = 1.0 / (t * t)
        s00 += weight
        s01 += weight * m
        s11 += weight * m * m
        r0 += weight * t
        r1 += weight * m * t
    det = s00 * s11 - s01 * s01
    if det <= 0:
        raise UserError("message sizes must differ to fit alpha and beta")
    a = (r0 * s11 - r1 * s01) / det
    b = (s00 * r1 - s01 * r0) / det
    if b <= 0:
        raise UserError(f"all-reduce time does not grow with message size (slope {b:.3g} s/byte): "
                        f"the machine is too noisy to calibrate now; try again or pass --bandwidth-gbps")
    steps = world_size - 1
    alpha = max(a, 0.0) / (2 * steps)  # a noisy negative intercept means alpha below resolution
    beta = 2 * steps / world_size / b
    return alpha, beta


def _calls_per_sample(nbytes: int) -> int:
    # ~4 MB of traffic per sample, between 2 and 100 calls.
    return max(2, min(100, 4 * 2 ** 20 // max(nbytes, 1)))


class _BusyCore:
    """A thread that computes (float32 matrix products on torch's threads) while `busy` is
    set: the load backward puts on the cores beside an overlapped all-reduce."""

    def __init__(self):
        self.busy, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="busy-core", daemon=True)

    def _run(self) -> None:
        a = torch.randn(256, 256)
        while not self._stop.is_set():
            if not self.busy.wait(timeout=0.1):
                continue
            for _ in range(8):
                torch.mm(a, a)
                self.products += 1  # one thread writes it; readers take differences

    products = 0  # matrix products done so far: the compute's progress

    def __enter__(self) -> "_BusyCore":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()  # before the process group goes: no thread left in torch at exit


def _time_overlap(message: _Message, samples: int) -> dict:
    """Median seconds of one all-reduce of `message` with this rank's core idle and busy
    (_BusyCore), the two alternating (both ranks in the same state, a barrier between)."""
    idle, busy, lost = [], [], []
    with _BusyCore() as core:
        for sample in range(samples):
            for computing in ((False, True) if sample % 2 == 0 else (True, False)):
                (core.busy.set if computing else core.busy.clear)()
                dist.barrier()
                start, products = time.perf_counter(), core.products
                message.all_reduce()
                took = time.perf_counter() - start
                (busy if computing else idle).append(took)
                if computing:
                    # The compute's pace beside the all-reduce against its pace alone just
                    # after (at least ALONE_S, for enough products to count): the compute
                    # seconds the transfer took from the core, at most the call's time. One
                    # figure for every busy call, so their medians compare.
                    beside = (core.products - products) / took
                    start, products = time.perf_counter(), core.products
                    time.sleep(max(took, ALONE_S))
                    alone = (core.products - products) / (time.perf_counter() - start)
                    lost.append(took * max(0.0, 1 - beside / alone) if alone > 0 else 0.0)
                    dist.barrier()  # the other rank's pause ends too: no traffic while either measures alone
        core.busy.clear()
    return {"overlap_idle_s": statistics.median(idle), "overlap_busy_s": statistics.median(busy),
            "overlap_compute_lost_s": statistics.median(lost)}


def _worker(rank: int, world_size: int, store_path: str, sizes: list[int], samples: int, out_path: str,
            hook: str = "none") -> None:
    torch.set_num_threads(1)  # gloo's own threads do the work; keep the ranks off each other's core
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                            world_size=world_size)
    try:
        medians = {}
        for nbytes in sizes:
            message = _Message(nbytes, hook)
            calls = _calls_per_sample(nbytes)
            for _ in range(2):  # warm-up: connections, buffers
                message.all_reduce()
            per_call, cpu_per_call = [], []
            for _ in range(samples):
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    message.all_reduce()
                per_call.append((time.perf_counter() - start) / calls)
                cpu_per_call.append((time.process_time() - cpu_start) / calls)
            medians[nbytes] = {"median_s": statistics.median(per_call), "all_s": per_call, "calls": calls,
                               "cpu_median_s": statistics.median(cpu_per_call)}
        overlap_sizes = [m for m in sizes if CPU_FIT_BYTES <= m <= OVERLAP_BYTES]
        if overlap_sizes:
            nbytes = max(overlap_sizes)
            medians[nbytes].update(_time_overlap(_Message(nbytes, hook), samples))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({str(k): v for k, v in medians.items()}, f)
    finally:
        dist.destroy_process_group()


def cpu_per_byte(timings: dict[int, dict], world_size: int = 2) -> float:
    """Median over the messages of CPU_FIT_BYTES and up of a rank's CPU seconds per call over
    the bytes it sends per call (ring_bytes_per_rank); 0.0 if none was timed that large."""
    rates = [t["cpu_median_s"] / ring_bytes_per_rank(m, world_size) for m, t in timings.items()
             if m >= CPU_FIT_BYTES and "cpu_median_s" in t]
    return statistics.median(rates) if rates else 0.0


def answer_cpu_per_byte(samples: list[dict]) -> float:
    """Link.answer_cpu_s_per_byte from an rpc calibration's samples (bench/interconnect's
    calibrate_rpc: the answering side's CPU seconds per call, "server_cpu_s"): the median
    over the messages of CPU_FIT_BYTES and up of those seconds over the request's bytes;
    0.0 where the answering side was not timed (a gloo calibration)."""
    rates = [t["server_cpu_s"] / t["bytes"] for t in samples if t["bytes"] >= CPU_FIT_BYTES and "server_cpu_s" in t]
    return statistics.median(rates) if rates else 0.0


def beside_cpu_per_byte(timings: dict[int, dict], world_size: int = 2) -> float | None:
    """Link.beside_cpu_s_per_byte from _time_overlap's figures: the compute seconds the
    all-reduce took from its rank's busy core, over the bytes the rank sent; None where
    none were timed."""
    timed = [(m, t) for m, t in timings.items() if "overlap_compute_lost_s" in t]
    if not timed:
        return None
    nbytes, figures = timed[0]
    return figures["overlap_compute_lost_s"] / ring_bytes_per_rank(nbytes, world_size)


def overlap_efficiency(timings: dict[int, dict]) -> float:
    """Link.overlap_efficiency from _time_overlap's figures (idle over busy seconds, at most
    1); 1.0 where none were timed."""
    timed = [t for t in timings.values() if "overlap_busy_s" in t]
    if not timed:
        return 1.0
    return min(1.0, timed[0]["overlap_idle_s"] / timed[0]["overlap_busy_s"])


def measure_allreduce(sizes: list[int] = MESSAGE_BYTES, samples: int = 5, world_size: int = 2) -> dict:
    """Spawn `world_size` gloo processes on a FileStore; return the timings and the fit
    (alpha_s, beta_Bps, cpu_s_per_byte) as a JSON-ready dict."""
    with tempfile.TemporaryDirectory(prefix="multitower-calibrate-") as tmp:
        out_path = os.path.join(tmp, "timings.json")
        mp.spawn(_worker, nprocs=world_size, join=True,
                 args=(world_size, os.path.join(tmp, "store"), list(sizes), samples, out_path))
        with open(out_path) as f:
            timings = {int(k): v for k, v in json.load(f).items()}
    sizes = sorted(timings)
    times = [timings[m]["median_s"] for m in sizes]
    alpha, beta = fit_alpha_beta(sizes, times, world_size)
    fitted = [2 * (world_size - 1) / world_size * m / beta + 2 * (world_size - 1) * alpha for m in sizes]
    cpu_s_per_byte = cpu_per_byte(timings, world_size)
    return {"backend": "gloo", "transport": "loopback", "world_size": world_size,
            "alpha_s": alpha, "beta_Bps": beta, "cpu_s_per_byte": cpu_s_per_byte,
            "beside_cpu_s_per_byte": beside_cpu_per_byte(timings, world_size),
            "overlap_efficiency": overlap_efficiency(timings),
            "latency_us": alpha * 1e6, "bandwidth_gbps": beta * 8 / 1e9, "cpu_ns_per_byte": cpu_s_per_byte * 1e9,
            "samples": [{"bytes": m, "median_s": timings[m]["median_s"], "fitted_s": f,
                         "cpu_median_s": timings[m]["cpu_median_s"],
                         "calls_per_sample": timings[m]["calls"], "all_s": timings[m]["all_s"],
                         **{k: v for k, v in timings[m].items() if k.startswith("overlap_")}}
                        for m, f in zip(sizes, fitted)]}


def calibrated_link(name: str, calibration: dict) -> Link:
    """The Link a calibration (measure_allreduce's dict, or bench/interconnect's) measured.
    cpu_s_per_byte, overlap_efficiency, beside_cpu_s_per_byte: absent from files written
    before they were measured; answer_cpu_s_per_byte from the samples of an rpc calibration
    (0 for others)."""
    beside = calibration.get("beside_cpu_s_per_byte")
    return Link(name, float(calibration["beta_Bps"]), float(calibration["alpha_s"]),
                float(calibration.get("cpu_s_per_byte", 0.0)), float(calibration.get("overlap_efficiency", 1.0)),
                None if beside is None else float(beside), answer_cpu_per_byte(calibration.get("samples", [])))


def link_from_calibration(path: str | Path) -> Link:
    """The Link recorded by `multitower plan --calibrate` in a JSON file."""
    path = Path(path)
    try:
        return calibrated_link(f"measured ({path.name})", json.loads(path.read_text()))
    except FileNotFoundError:
        raise UserError(f"--calibration {path}: no such file; make one with `multitower plan --calibrate`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--calibration {path} is not a calibration JSON ({exc})") from None
