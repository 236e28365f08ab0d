"""`multitower plan --validate`: predict this machine's own 1- and 2-worker sync runs of
the model at batch 128, then run the real thing and report the prediction error.

On a CPU the workers of one machine share its cores (train gives each cores / N
threads), so a worker's compute time per example at N workers is not the 1-worker
figure. It is measured for each N the way the run will have it: N copies of the
profiling step running at once, each at cores / N threads on batch B / N (on 2 cores:
one process at 2 threads for N = 1; two processes at 1 thread each for N = 2), and the
slowest copy counts, since a synchronous step waits for it. The link is this machine's
gloo on loopback, calibrated here (bench/calibrate.py) or read from --calibration.
The measured runs are `multitower train` on generated data, read from metrics.jsonl
with the first log windows (warm-up) dropped. Profiles and runs alternate, round by
round, and medians over the rounds are compared: on a shared machine other work
comes and goes, and 2 OpenMP threads suffer far more from a stolen core (they wait
for each other) than 1. Not modelled: the input pipeline's
thread (~0.04 ms/example on one core here, ~1% of the step) and the EMA update.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.multiprocessing as mp

from multitower.bench.cost_model import Cluster, Knobs, Workload, predict_sync
from multitower.errors import UserError
from multitower.plan import PlanOptions, ddp_last_bucket_share, model_bytes, profile_compute

WARMUP_STEPS = 10  # metrics records at or before this step are dropped
LOG_EVERY = 5


def _profile_copy(rank: int, barrier, opts: PlanOptions, batch: int, threads: int, out_dir: str) -> None:
    barrier.wait()  # the copies contend for the cores only if they run at the same time
    seconds = profile_compute(opts.model, opts.width, batch, threads, opts.profile_steps,
                              reps=opts.profile_reps).s_per_example
    Path(out_dir, f"{rank}.json").write_text(json.dumps(seconds))


def concurrent_compute_s(opts: PlanOptions, copies: int, threads: int, batch: int) -> float:
    """Seconds per example of the slowest of `copies` profiling processes run at once."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="multitower-profile-") as tmp:
        mp.spawn(_profile_copy, nprocs=copies, join=True, args=(ctx.Barrier(copies), opts, batch, threads, tmp))
        return max(json.loads(Path(tmp, f"{rank}.json").read_text()) for rank in range(copies))


def measured_run(data_dir: str, run_dir: Path, workers: int, batch: int, steps: int) -> dict:
    """Run `multitower train` for real; median examples/sec and comm fraction after warm-up."""
    command = [sys.executable, "-m", "multitower", "train", "--data", data_dir, "--run-dir", str(run_dir),
               "--workers", str(workers), "--batch-size", str(batch), "--steps", str(steps),
               "--log-every", str(LOG_EVERY), "--summary-every", "0", "--checkpoint-every", str(steps),
               "--progress", "off"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"the measured {workers}-worker run failed: {last}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] > WARMUP_STEPS] or records
    return {"examples_per_sec": statistics.median(r["examples_per_sec"] for r in kept),
            "all_examples_per_sec": [r["examples_per_sec"] for r in kept],
            "comm_fraction": statistics.median(r["comm_fraction"] for r in kept)}


def validate(opts: PlanOptions, workers: tuple[int, ...] = (1, 2), steps: int = 30, data_dir: str = "",
             reps: int = 2) -> dict:
    """Predict and measure sync training at each worker count on this machine. Each of `reps`
    rounds profiles and then runs every worker count, so that a burst of other work on the
    machine lands on both sides; medians over the rounds are compared."""
    from multitower.bench.calibrate import calibrated_link, link_from_calibration, measure_allreduce
    from multitower.data.sources import make_synthetic
    cores = len(os.sched_getaffinity(0))
    if steps <= WARMUP_STEPS + LOG_EVERY:
        raise UserError(f"--validate-steps must exceed {WARMUP_STEPS + LOG_EVERY} (warm-up plus one log window), "
                        f"got {steps}")
    if reps < 1:
        raise UserError(f"--validate-reps must be at least 1, got {reps}")
    for n in workers:
        if opts.batch_size % n:
            raise UserError(f"--batch-size {opts.batch_size} must divide evenly over {n} workers")
    load_before = os.getloadavg()
    if opts.calibration:
        link, calibration = link_from_calibration(opts.calibration), {"file": opts.calibration}
    else:
        calibration = measure_allreduce()
        link = calibrated_link("gloo loopback (calibrated)", calibration)
    param_bytes, _ = model_bytes(opts.model, opts.width)
    last_bucket = ddp_last_bucket_share(opts.model, opts.width)
    # Profile as many steps as the measured window holds, so both sides average the machine's
    # other load over about the same time.
    profile_opts = dataclasses.replace(opts, profile_steps=max(opts.profile_steps, steps - WARMUP_STEPS))
    samples: dict[int, dict[str, list]] = {n: {"compute": [], "measured": [], "comm": []} for n in workers}
    with tempfile.TemporaryDirectory(prefix="multitower-validate-") as tmp:
        data = data_dir or str(make_synthetic(Path(tmp, "synthetic"), train=4096, val=128, seed=0).root)
        for rep in range(reps):
            for n in workers:
                threads, batch = max(1, cores // n), opts.batch_size // n
                samples[n]["compute"].append(concurrent_compute_s(profile_opts, n, threads, batch))
                measured = measured_run(data, Path(tmp, f"run-{n}-{rep}"), n, opts.batch_size, steps)
                samples[n]["measured"].append(measured["examples_per_sec"])
                samples[n]["comm"].append(measured["comm_fraction"])
    rows = []
    for n in workers:
        threads, batch = max(1, cores // n), opts.batch_size // n
        compute_s = statistics.median(samples[n]["compute"])
        measured_rate = statistics.median(samples[n]["measured"])
        work = Workload(compute_s, param_bytes, batch, last_bucket_share=last_bucket)
        cluster = Cluster(n, n, link, link)  # one node, every worker on loopback
        overlapped = predict_sync(work, cluster, Knobs(overlap=True))
        serial = predict_sync(work, cluster, Knobs(overlap=False))
        primary = overlapped if opts.overlap else serial
        rows.append({"workers": n, "threads_per_worker": threads, "batch_per_worker": batch,
                     "compute_s_per_example": compute_s, "compute_s_per_example_all": samples[n]["compute"],
                     "allreduce_s": overlapped.comm_s,
                     "predicted_images_per_sec": primary.images_per_sec,
                     "predicted_overlapped_images_per_sec": overlapped.images_per_sec,
                     "predicted_serial_images_per_sec": serial.images_per_sec,
                     "predicted_comm_fraction": primary.comm_s / primary.step_s,
                     "measured_images_per_sec": measured_rate, "measured_all_images_per_sec": samples[n]["measured"],
                     "measured_comm_fraction": statistics.median(samples[n]["comm"]),
                     "error": primary.images_per_sec / measured_rate - 1})
    return {"model": opts.model, "global_batch": opts.batch_size, "steps": steps, "reps": reps, "cores": cores,
            "overlap": opts.overlap, "link": {"alpha_s": link.latency_s, "beta_Bps": link.bandwidth_Bps},
            "calibration": calibration, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "target_error": 0.25, "rows": rows}


def format_validation(result: dict) -> str:
    link = result["link"]
    lines = [f"{result['model']}, global batch {result['global_batch']}, {result['cores']} cores, "
             f"medians of {result['reps']} round(s); gloo loopback "
             f"alpha {link['alpha_s'] * 1e6:.1f} us, beta {link['beta_Bps'] * 8 / 1e9:.2f} Gbit/s; "
             f"all-reduce {'overlapped with' if result['overlap'] else 'after'} backward",
             f"{'workers':>7} {'threads':>7} {'ms/example':>10} {'predicted':>10} {'(serial)':>9} {'measured':>9} "
             f"{'error':>6} {'comm% pred':>10} {'comm% meas':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['workers']:>7} {r['threads_per_worker']:>7} {r['compute_s_per_example'] * 1e3:>10.3f} "
                     f"{r['predicted_images_per_sec']:>10.1f} {r['predicted_serial_images_per_sec']:>9.1f} "
                     f"{r['measured_images_per_sec']:>9.1f} {100 * r['error']:>+5.0f}% "
                     f"{100 * r['predicted_comm_fraction']:>10.1f} {100 * r['measured_comm_fraction']:>10.1f}")
    worst = max(abs(r["error"]) for r in result["rows"])
    verdict = "within" if worst <= result["target_error"] else "OUTSIDE"
    lines.append(f"images/sec; worst error {100 * worst:.0f}%, {verdict} the {100 * result['target_error']:.0f}% target. "
                 f"Load average {result['load_average_before'][0]:.1f} before, {result['load_average_after'][0]:.1f} "
                 f"after on {result['cores']} cores (other work on the machine skews both sides)")
    return "\n".join(lines)


def run_validation(opts: PlanOptions, steps: int, data_dir: str = "", reps: int = 2) -> str:
    """`plan --validate`: validate, write plan_validation.json, return the table."""
    from multitower.bench.measure import environment, write_json
    result = validate(opts, steps=steps, data_dir=data_dir, reps=reps)
    path = write_json(Path(opts.out_dir) / "plan_validation.json",
                      {"benchmark": "plan_validation", "environment": environment(), **result})
    return f"{format_validation(result)}\nwrote {path}"
