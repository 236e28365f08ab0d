"""Where the time of a cifar10-tf training step goes: a per-op profile (torch.profiler) of
multitower's own step, against the time the step's FLOPs would take at this machine's
measured fp32 matmul peak. Prints a table and writes JSON.

    python benchmarks/profile_step.py [--batch-size 128] [--steps 10] [--nchw] [--compile]

The step is train_step.py's candidate (data, the Single strategy's forward/backward/SGD,
the EMA), profiled after warm-up. Ops are grouped by kind (convolution, dense matmul,
max-pool, elementwise, optimizer/EMA, copies ...) by their aten names; each row is self
CPU time per step and its share. The LRN's forward and backward are timed as ranges on
top (their ops are counted in the groups; in channels_last its fused kernels are a
group of their own). The last lines say how far the step is from the
FLOP bound and which groups stand between: on a CPU, whatever is not a convolution or
matmul is memory-bound work that a faster GEMM cannot shorten.

--compile additionally times torch.compile's step against eager (same process,
median of --reps); compilation time is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from train_step import matmul_peak_flops, train_flops_per_example

from multitower.bench.measure import environment, write_json
from multitower.bench.step import training_step
from multitower.data.records import open_dataset
from multitower.data.sources import make_synthetic
from multitower.models import tf_ops

# aten op name (substring) -> group; the first match wins, so specific names come first.
GROUPS = [
    ("convolution", ("convolution", "conv2d", "mkldnn_conv", "conv_depthwise", "slow_conv")),
    ("dense matmul", ("addmm", "mm", "matmul", "linear", "bmm")),
    ("max-pool", ("max_pool", "pool2d")),
    ("softmax / loss", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("optimizer / EMA", ("_foreach", "sgd", "lerp")),
    ("copies / layout", ("copy_", "contiguous", "clone", "to_copy", "_to_copy", "empty", "zeros", "cat",
                         "constant_pad", "pad", "permute", "reshape", "view", "index")),
    ("elementwise", ("add", "mul", "sub", "div", "relu", "threshold", "pow", "sum", "mean", "fill", "where",
                     "sqrt", "exp", "neg", "clamp", "maximum", "sign")),
]


def group_of(name: str) -> str:
    short = name.removeprefix("aten::").lower()
    for group, keys in GROUPS:
        if any(k in short for k in keys):
            return group
    return "other"


def _annotated(function, label: str):
    """A static method that runs `function` inside a profiler range named `label`."""
    def run(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)
    return staticmethod(run)


def profile_step(split, batch_size: int, steps: int, setting) -> tuple[list[dict], dict[str, float], float]:
    """(per-op rows, ms per step inside each annotated range, wall seconds per step). The
    hand-written LRN's ops are elementwise aten ops like any other; its forward and
    backward are annotated (here only) so that their total shows. The fused CPU kernels
    (channels_last) are no aten op: their range's own time is a row of its own."""
    step = training_step(batch_size, steps, torch.device("cpu"), setting=setting, split=split)
    run = step.run
    functions = {"LRN": tf_ops._LRN, "LRN fused": tf_ops._FusedLRN}
    original = {name: (f.forward, f.backward) for name, f in functions.items()}
    for name, f in functions.items():
        f.forward = _annotated(original[name][0], f"{name} forward")
        f.backward = _annotated(original[name][1], f"{name} backward")
    try:
        run()  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        wall = time.perf_counter() - start
    finally:
        for name, f in functions.items():
            f.forward, f.backward = (staticmethod(m) for m in original[name])
        step.close()
    ranges = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key.startswith("LRN ")}
    rows = []
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0 and event.key.startswith("aten::"):
            rows.append({"op": event.key, "group": group_of(event.key), "calls_per_step": event.count / steps,
                         "self_ms_per_step": event.self_cpu_time_total / 1e3 / steps})
        elif event.key.startswith("LRN fused"):
            # The numba kernels are no aten op: their time is the range's own (self) time.
            rows.append({"op": f"{event.key} (kernels)", "group": "LRN fused kernels",
                         "calls_per_step": event.count / steps,
                         "self_ms_per_step": event.self_cpu_time_total / 1e3 / steps})
    return sorted(rows, key=lambda r: -r["self_ms_per_step"]), ranges, wall / steps


def compile_ratio(split, batch_size: int, steps: int, reps: int, setting) -> dict:
    """Eager vs torch.compile of the model inside the same step (median of reps each)."""
    eager_step = training_step(batch_size, steps, torch.device("cpu"), setting=setting, split=split)
    compiled_step = training_step(batch_size, steps, torch.device("cpu"), setting={**setting, "compile": "default"},
                                  split=split)
    eager, compiled = eager_step.run, compiled_step.run
    try:
        eager()
        start = time.perf_counter()
        compiled()  # compiles on the first call
        compile_s = time.perf_counter() - start
        rates = {"eager": [], "compiled": []}
        for _ in range(reps):
            for name, run in (("eager", eager), ("compiled", compiled)):
                t = time.perf_counter()
                images = run()
                rates[name].append(images / (time.perf_counter() - t))
    finally:
        eager_step.close()
        compiled_step.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"eager_images_per_sec": med["eager"], "compiled_images_per_sec": med["compiled"],
            "ratio": med["compiled"] / med["eager"], "first_call_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (after as many warm-up steps)")
    parser.add_argument("--nchw", action="store_true",
                        help="profile the NCHW step (default: channels_last, the CPU default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile against eager (slow)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions for --compile's timing")
    parser.add_argument("--top", type=int, default=15, help="ops listed individually")
    parser.add_argument("--out", default="bench-results/profile_step.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        split = open_dataset(make_synthetic(f"{tmp}/synthetic", train=4096, val=64).root).split("train")
        setting = {"precision": "fp32", "channels_last": not args.nchw}
        rows, ranges, step_s = profile_step(split, args.batch_size, args.steps, setting)
        compiled = compile_ratio(split, args.batch_size, args.steps, args.reps, setting) if args.compile else None

    peak = matmul_peak_flops(torch.float32, torch.device("cpu"))
    flop_bound_s = train_flops_per_example() * args.batch_size / peak
    groups: dict[str, float] = {}
    for r in rows:
        groups[r["group"]] = groups.get(r["group"], 0.0) + r["self_ms_per_step"]
    total_ms = sum(groups.values())
    layout = "NCHW" if args.nchw else "channels_last"
    print(f"cifar10-tf training step, batch {args.batch_size}, fp32 {layout}, {torch.get_num_threads()} threads: "
          f"{step_s * 1e3:.1f} ms/step wall ({args.batch_size / step_s:.0f} images/s), {total_ms:.1f} ms in aten ops")
    print(f"\n{'group':<22}{'ms/step':>9}{'share':>8}")
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{group:<22}{ms:>9.1f}{ms / total_ms:>8.1%}")
    for label, ms in sorted(ranges.items()):
        print(f"  {label:<20}{ms:>9.1f}{ms / total_ms:>8.1%}   (counted above, in its ops or kernels)")
    print(f"\n{'op':<40}{'group':<22}{'calls':>6}{'ms/step':>9}")
    for r in rows[:args.top]:
        print(f"{r['op']:<40}{r['group']:<22}{r['calls_per_step']:>6.0f}{r['self_ms_per_step']:>9.1f}")
    gemm_ms = groups.get("convolution", 0.0) + groups.get("dense matmul", 0.0)
    print(f"\nFLOP bound: {flop_bound_s * 1e3:.1f} ms/step at the measured fp32 matmul peak "
          f"({peak / 1e9:.1f} GFLOP/s); the step takes {step_s / flop_bound_s:.2f}x that. Convolutions and "
          f"matmuls take {gemm_ms:.1f} ms ({gemm_ms / max(total_ms, 1e-9):.0%}); the other "
          f"{total_ms - gemm_ms:.1f} ms are memory-bound ops a faster GEMM cannot shorten.")
    if compiled:
        print(f"torch.compile: {compiled['ratio']:.2f}x eager ({compiled['compiled_images_per_sec']:.0f} vs "
              f"{compiled['eager_images_per_sec']:.0f} images/s) after a {compiled['first_call_s']:.0f} s first call")
    path = write_json(args.out, {
        "benchmark": "profile_step", "batch_size": args.batch_size, "steps": args.steps, "layout": layout,
        "threads": torch.get_num_threads(), "step_ms": step_s * 1e3, "aten_ms_per_step": total_ms,
        "groups_ms_per_step": groups, "annotated_ranges_ms_per_step": ranges, "ops": rows, "matmul_peak_fp32_flops": peak,
        "flop_bound_ms_per_step": flop_bound_s * 1e3, "step_over_flop_bound": step_s / flop_bound_s,
        "torch_compile": compiled, "environment": environment()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
