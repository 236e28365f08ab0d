"""Benchmark: every strategy across emulated nodes, over links of four rates, measured and as
`multitower plan` predicts it.

    sudo .venv/bin/python benchmarks/interconnect.py [--quick] [--data DIR] [--out-dir bench-results]
        [--strategies sync,sync-bf16] [--links unshaped,1gbit] [--nodes 2] [--reps 3] [--accuracy-seconds 0]

For 2 and 4 nodes and links unshaped / 1gbit / 200mbit / 50mbit (`multitower cluster`,
one worker process per node, global batch 128 of cifar10-tf), each strategy's job
    sync, sync --grad-compression bf16, local-sgd (--sync-every 4),
    downpour (its one server on a node of its own: --ps-node, so N + 1 nodes),
    pipeline (2 stages; on 4 nodes 2 stages x 2 replicas)
is run, and its images/sec, communication share of step time and bytes per step per
worker are read from metrics.jsonl (the first log window, warm-up, dropped). Beside it,
plan's cost model (bench/cost_model.py) predicts the same job from inputs measured here:
the link's alpha, beta and CPU per byte calibrated across the emulated link (gloo
all-reduce, 2 nodes; the same with the bf16 compression hook's casts, for sync-bf16; and
downpour's rpc exchange), and the compute per example of train's
step, in the strategy's memory format and fed by train's loader, with one copy per worker
process pinned to its node's cores, all at once (bench/interconnect.py). Then, at 50 Mbit/s on 2 nodes, each
strategy trains for the same wall time on the data set, and its validation precision @ 1
is measured: throughput alone does not pick a strategy.

Writes OUT_DIR/interconnect.json and interconnect.png (images/sec against bandwidth per
strategy, measured points over predicted lines) and prints the table. Each cell is
bracketed by profiles of its compute, just before and just after it, whose mean predicts
it: the machine's speed drifts over minutes, and other work on it then lands on both
sides of a comparison. Each cell runs --reps times (default 3), interleaved: a node count's
strategies once each, then again. A cell reports the median of its repetitions' images/sec,
is predicted from the median of their profiles, and keeps their spread (max / min - 1):
how far the machine moved it between repetitions, the noise its error is read against.
Needs root (network namespaces); --quick: 2 nodes, two links, short cells, one
repetition, ~10 min; the whole matrix with 3 repetitions ~2 h.
--strategies, --links, --nodes run a part of the matrix (its winners then among those
strategies only); --accuracy-seconds 0 skips the precision runs. --repredict JSON runs
nothing: a stored run's cells predicted again from its own measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from multitower.bench.calibrate import answer_cpu_per_byte, calibrated_link
from multitower.bench.interconnect import GLOBAL_BATCH, LOCAL_SGD_PERIOD, PIPELINE_STAGES, STRATEGIES, CellFailed, \
    Setup, calibrate_link, calibrate_rpc, pinned_compute_s, predict, run_cell, trained_wall_s
from multitower.bench.measure import benchmark_data, environment, write_json
from multitower.cluster.network import check_rights, parse_rate
from multitower.plan import model_bytes, pipeline_cut

LINKS = ("unshaped", "1gbit", "200mbit", "50mbit")
TARGET = 0.15  # the planner's error allowed in every cell (issue 17)
WINDOW_S = 4.0  # a log window's wished length: three measured windows take ~12 s
WINDOW_STEPS = (3, 40)  # a log window's fewest and most steps: at most ~3 s of an unshaped cell


def choices(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """A comma-separated flag's values, each one of `allowed`, in `allowed`'s order."""
    given = [part.strip() for part in text.split(",") if part.strip()]
    wrong = [part for part in given if part not in allowed]
    if wrong or not given:
        raise argparse.ArgumentTypeError(f"{flag} takes a comma-separated list of {', '.join(allowed)}; "
                                         f"got {text!r}")
    return tuple(a for a in allowed if a in given)


def layout_of(strategy: str) -> str:
    """Which profile a strategy's cells are predicted from: its own step (downpour, pipeline:
    NCHW), or the data-parallel step that sync, sync-bf16 and local-sgd share."""
    return strategy if strategy in ("downpour", "pipeline") else "data"


def cell_steps(predicted_step_s: float, windows: int, quick: bool, period: int = 1) -> tuple[int, int]:
    """(steps, log_every) of a cell: one warm-up window and `windows` measured ones of
    WINDOW_STEPS steps each, sized by the predicted step time to last WINDOW_S, and a
    multiple of `period` (local SGD's --sync-every): every window then holds the same share
    of averaging steps. (A 3-step window of a job averaging every 4 steps held 0 or 1 of
    them: the quick run's 2 measured windows held 2 in 6 steps, and the cell read a third
    more traffic per step than the job makes. Capped at 10 steps, an unshaped cell's
    windows lasted 0.6-0.9 s: a 2-node local SGD cell measured 1683 and 2504 images/s in
    two runs 20 minutes apart, its profiles 0.85 and 0.80 ms an example.)"""
    fewest, most = WINDOW_STEPS
    log_every = 3 if quick else min(most, max(fewest, round(WINDOW_S / max(predicted_step_s, 1e-3))))
    log_every = period * max(1, round(log_every / period))
    return (windows + 1) * log_every, log_every


def run_matrix(args, data_dir: str) -> dict:
    """Per link: calibrate it (gloo's all-reduce, the bf16 hook's, downpour's rpc); per node
    count, each strategy's cell, bracketed by profiles of its compute (the data-parallel
    step in channels_last, downpour's in NCHW, the pipeline's NCHW micro-batches) just
    before and just after it, whose mean predicts it: the machine's speed drifts over
    minutes, and a profile next to its cell drifts with it. A cell's after profile is the
    next cell's before where the two share a layout."""
    param_bytes, activation_bytes = model_bytes("cifar10-tf", 1)
    cut = pipeline_cut("cifar10-tf", 1, PIPELINE_STAGES)
    links = args.links or (("unshaped", "50mbit") if args.quick else LINKS)
    node_counts = args.nodes or ((2,) if args.quick else (2, 4))
    samples = 3 if args.quick else 5
    result = {"param_bytes": param_bytes, "activation_bytes_per_example": activation_bytes, "pipeline_cut": cut,
              "calibrations": {}, "bf16_calibrations": {}, "rpc_calibrations": {}, "cells": [], "failures": []}
    steps, reps = (5, 3) if args.quick else (10, 5)
    with tempfile.TemporaryDirectory(prefix="multitower-interconnect-") as tmp:
        for link in links:
            rate = parse_rate(link)
            result["calibrations"][link] = calibrate_link(rate, samples)
            result["rpc_calibrations"][link] = calibrate_rpc(rate, samples)
            if "sync-bf16" in args.strategies:
                result["bf16_calibrations"][link] = calibrate_link(rate, samples, hook="bf16")
            say_calibrations(link, result)
            gloo, rpc, bf16 = links_of(link, result)
            for nodes in node_counts:
                last = {}  # layout -> its profile, while no cell has run since it was taken
                runs: dict[str, list[dict]] = {strategy: [] for strategy in args.strategies}
                for rep in range(args.reps):  # interleaved: every strategy once, then again
                    for strategy in args.strategies:
                        setup, layout = Setup(strategy, nodes), layout_of(strategy)
                        profiled = Setup("sync" if layout == "data" else strategy, nodes)
                        before = last.get(layout) or pinned_compute_s(profiled, data_dir, steps, reps)
                        guess = predict(setup, before["s_per_example"], gloo, param_bytes, activation_bytes, cut,
                                        rpc, before["backward_share"], bf16)
                        period = LOCAL_SGD_PERIOD if strategy == "local-sgd" else 1
                        steps_run, log_every = cell_steps(guess.step_s, 2 if args.quick else 3, args.quick, period)
                        name = f"{strategy}-{nodes}-{link}-{rep}"
                        measured = cell_run(result, args.out_dir, name, lambda run_dir: run_cell(
                            setup, link, data_dir, run_dir, steps_run, log_every, warmup_steps=log_every),
                            Path(tmp, name))
                        after = pinned_compute_s(profiled, data_dir, steps, reps)
                        last = {layout: after}
                        run = {"strategy": strategy, "nodes": nodes, "cluster_nodes": setup.cluster_nodes,
                               "link": link, "rate_bps": rate, "rep": rep, "steps": steps_run,
                               "log_every": log_every,
                               "compute_s_per_example": (before["s_per_example"] + after["s_per_example"]) / 2,
                               "backward_share": (before["backward_share"] + after["backward_share"]) / 2,
                               "compute": {"before": before, "after": after}, "measured": asdict(measured)}
                        run["error"] = predict_cell(run, gloo, rpc, bf16, param_bytes, activation_bytes,
                                                    cut).images_per_sec / measured.images_per_sec - 1
                        runs[strategy].append(run)
                        print(f"  {nodes} nodes {strategy:>9} (repetition {rep + 1} of {args.reps}): measured "
                              f"{measured.images_per_sec:7.1f} img/s ({100 * run['error']:+.0f}% predicted), comm "
                              f"{100 * measured.comm_fraction:.0f}%, {measured.bytes_per_step / 1e6:.2f} "
                              f"MB/step/worker; {run['compute_s_per_example'] * 1e3:.2f} ms/example "
                              f"({before['s_per_example'] * 1e3:.2f} before, {after['s_per_example'] * 1e3:.2f} "
                              f"after); {measured.wall_s:.0f} s", flush=True)
                for strategy in args.strategies:
                    cell = median_cell(runs[strategy])
                    predicted = predict_cell(cell, gloo, rpc, bf16, param_bytes, activation_bytes, cut)
                    cell.update({"predicted": asdict(predicted),
                                 "predicted_comm_fraction": predicted.exposed_comm_s / predicted.step_s,
                                 "error": predicted.images_per_sec / cell["measured"]["images_per_sec"] - 1})
                    result["cells"].append(cell)
                    print(f"  {nodes} nodes {strategy:>9}: measured {cell['measured']['images_per_sec']:7.1f} "
                          f"img/s (median of {args.reps}, spread {100 * cell['spread']:.0f}%), predicted "
                          f"{predicted.images_per_sec:7.1f} ({100 * cell['error']:+.0f}%), comm "
                          f"{100 * cell['measured']['comm_fraction']:.0f}% (predicted exposed "
                          f"{100 * cell['predicted_comm_fraction']:.0f}%)", flush=True)
    return result


def cell_run(result: dict, out_dir: str, name: str, run, run_dir: Path):
    """run(run_dir), and once more in a new run dir should the job fail: a cell that fails
    now and then would otherwise end an hour's run. Each failure's whole output is kept
    (OUT_DIR/failed-NAME-K.log) and listed in the result's "failures"; a second one ends the
    benchmark."""
    for attempt in range(2):
        try:
            return run(run_dir.with_name(f"{run_dir.name}-again") if attempt else run_dir)
        except CellFailed as failure:
            log = Path(out_dir, f"failed-{name}-{attempt}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(failure.output)
            result["failures"].append({"cell": name, "attempt": attempt, "line": str(failure), "log": str(log)})
            print(f"  {failure} (its output: {log}){'; once more' if not attempt else ''}", flush=True)
            if attempt:
                raise


def median_cell(runs: list[dict]) -> dict:
    """One cell from its repetitions: the median of each measured rate and of the compute
    profiled around them (what the cell is predicted from), the repetitions kept, and the
    spread, max / min - 1 of the measured images/sec: how far the machine moved the cell
    between repetitions, to read its error against."""
    rates = [r["measured"]["images_per_sec"] for r in runs]
    first = runs[0]
    return {**{k: first[k] for k in ("strategy", "nodes", "cluster_nodes", "link", "rate_bps", "steps", "log_every")},
            "compute_s_per_example": statistics.median(r["compute_s_per_example"] for r in runs),
            "backward_share": statistics.median(r["backward_share"] for r in runs),
            "measured": {"images_per_sec": statistics.median(rates),
                         "comm_fraction": statistics.median(r["measured"]["comm_fraction"] for r in runs),
                         "bytes_per_step": statistics.mean(r["measured"]["bytes_per_step"] for r in runs),
                         "wall_s": sum(r["measured"]["wall_s"] for r in runs)},
            "spread": max(rates) / min(rates) - 1, "repetitions": runs}


def links_of(link: str, result: dict):
    """(gloo link, rpc link, bf16 hook's link or None) that `link`'s cells are predicted over,
    from a run's calibrations."""
    bf16 = result.get("bf16_calibrations", {}).get(link)
    return (calibrated_link(f"{link}, calibrated", result["calibrations"][link]),
            calibrated_link(f"{link}, rpc calibrated", result["rpc_calibrations"][link]),
            calibrated_link(f"{link}, bf16 hook calibrated", bf16) if bf16 else None)


def say_calibrations(link: str, result: dict) -> None:
    """Print `link`'s calibrations as the run measured them."""
    def line(c: dict, overlap: bool = True) -> str:
        return (f"alpha {c['latency_us']:.0f} us, beta {c['bandwidth_gbps']:.3f} Gbit/s, {c['cpu_ns_per_byte']:.2f} "
                f"ns CPU/byte" + (f", overlap {c['overlap_efficiency']:.2f}" if overlap else "")
                + (f", {c['beside_cpu_s_per_byte'] * 1e9:.2f} ns/byte lost by compute beside it"
                   if c.get("beside_cpu_s_per_byte") is not None else ""))
    rpc = result['rpc_calibrations'][link]
    answering = answer_cpu_per_byte(rpc["samples"])
    answer = f", {answering * 1e9:.2f} ns CPU/byte answering" if answering else ""
    print(f"{link}: gloo: {line(result['calibrations'][link])}; rpc (no overlap timed): "
          f"{line(rpc, overlap=False)}{answer}", flush=True)
    if link in result["bf16_calibrations"]:
        print(f"{link}: the bf16 hook (per bf16 byte): {line(result['bf16_calibrations'][link])}", flush=True)


def predict_cell(cell: dict, link, rpc_link, bf16_link, param_bytes: float, activation_bytes: float, cut: dict):
    """A cell's prediction from what was measured for it: its compute and backward share
    (the mean of the profiles around it) and its link's calibrations."""
    return predict(Setup(cell["strategy"], cell["nodes"]), cell["compute_s_per_example"], link, param_bytes,
                   activation_bytes, cut, rpc_link, cell["backward_share"], bf16_link)


def repredict(path: Path) -> None:
    """Predict every cell of a stored run again with this tree's cost model, from the run's
    own measured inputs (calibrations, compute, backward share), next to its measured and
    stored predicted images/sec; sync-bf16 also over the float32 link (the model before the
    bf16 hook's link was calibrated); sync and sync-bf16 also without the links' compute lost
    beside a transfer (beside_cpu_s_per_byte; the model before it was calibrated); downpour also
    without its server's answers (answer_cpu_s_per_byte; the model before it counted them);
    each cell's predicted exposed share of the step; then each link as calibrated. Cores are
    divided as on this machine, so the run must come from a machine with as many."""
    result = json.loads(path.read_text())
    cores = len(os.sched_getaffinity(0))
    if result["environment"]["cores"] != cores:
        raise SystemExit(f"--repredict: {path} was measured on {result['environment']['cores']} cores, this "
                         f"process has {cores}: the emulated nodes would share cores differently")
    fixed = (result["param_bytes"], result["activation_bytes_per_example"], result["pipeline_cut"])
    print(f"{'nodes':>5} {'link':>8} {'strategy':>9} {'measured':>9} {'stored':>9} {'now':>9} {'error':>6} "
          f"{'bf16 over float32 link':>22} {'CPU time only':>15} {'no server answers':>17} {'exposed':>7}")
    within, without_beside, compared, again = 0, 0, 0, []
    for c in result["cells"]:
        link, rpc_link, bf16_link = links_of(c["link"], result)
        prediction = predict_cell(c, link, rpc_link, bf16_link, *fixed)
        now = prediction.images_per_sec
        again.append({**c, "predicted": {"images_per_sec": now}})
        measured = c["measured"]["images_per_sec"]
        within += abs(now / measured - 1) <= TARGET
        old = ""
        if c["strategy"] == "sync-bf16":
            float32 = predict_cell(c, link, rpc_link, None, *fixed).images_per_sec
            old = f"{float32:.1f} ({100 * (float32 / measured - 1):+.0f}%)"
        cpu_only, plain = "", now
        measured_beside = (bf16_link if c["strategy"] == "sync-bf16" and bf16_link else link).beside_cpu_s_per_byte
        if c["strategy"] in ("sync", "sync-bf16") and measured_beside is not None:  # else the same prediction
            plain = predict_cell(c, replace(link, beside_cpu_s_per_byte=None), rpc_link,
                                 bf16_link and replace(bf16_link, beside_cpu_s_per_byte=None), *fixed).images_per_sec
            cpu_only = f"{plain:.1f} ({100 * (plain / measured - 1):+.0f}%)"
            compared += 1
        without_beside += abs(plain / measured - 1) <= TARGET
        unanswered = ""
        if c["strategy"] == "downpour" and rpc_link.answer_cpu_s_per_byte:
            alone = predict_cell(c, link, replace(rpc_link, answer_cpu_s_per_byte=0.0), bf16_link, *fixed).images_per_sec
            unanswered = f"{alone:.1f} ({100 * (alone / measured - 1):+.0f}%)"
        print(f"{c['nodes']:>5} {c['link']:>8} {c['strategy']:>9} {measured:>9.1f} "
              f"{c['predicted']['images_per_sec']:>9.1f} {now:>9.1f} {100 * (now / measured - 1):>+5.0f}% {old:>22} "
              f"{cpu_only:>15} {unanswered:>17} {100 * prediction.exposed_comm_s / prediction.step_s:>6.0f}%")
    for name in dict.fromkeys(c["link"] for c in result["cells"]):
        print("  " + "; ".join(link.describe() for link in links_of(name, result) if link is not None))
    agree = winners(again)
    print(f"predicted now: within {100 * TARGET:.0f}% in {within} of {len(result['cells'])} cells; the measured "
          f"winner predicted in {sum(w['agree'] for w in agree)} of {len(agree)} settings"
          + (f"; with the CPU time only in place of the compute lost beside a transfer, within "
             f"{100 * TARGET:.0f}% in {without_beside}" if compared else "")
          + "".join(f"\n  {winner_line(w)}" for w in agree if not w["agree"]))


def winners(cells: list[dict]) -> list[dict]:
    """Per (nodes, link): the strategy with the most measured images/sec, and the predicted one."""
    rows = []
    for key in sorted({(c["nodes"], c["link"]) for c in cells}, key=lambda k: (k[0], LINKS.index(k[1]))):
        group = [c for c in cells if (c["nodes"], c["link"]) == key]
        measured = max(group, key=lambda c: c["measured"]["images_per_sec"])["strategy"]
        predicted = max(group, key=lambda c: c["predicted"]["images_per_sec"])["strategy"]
        rows.append({"nodes": key[0], "link": key[1], "measured": measured, "predicted": predicted,
                     "agree": measured == predicted})
    return rows


def winner_line(w: dict) -> str:
    """One winners() row as the table and --repredict print it."""
    return f"{w['nodes']} nodes, {w['link']}: measured winner {w['measured']}, predicted {w['predicted']}"


def accuracy_runs(args, data_dir: str, cells: list[dict]) -> list[dict]:
    """At 50 Mbit/s on 2 nodes: each strategy trains for args.accuracy_seconds (its steps
    from the throughput measured there), then `eval --once` gives its precision @ 1."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="multitower-accuracy-") as tmp:
        for strategy in STRATEGIES:
            cell = next((c for c in cells if c["strategy"] == strategy and c["nodes"] == 2 and c["link"] == "50mbit"),
                        None)
            if cell is None:
                continue
            setup = Setup(strategy, 2)
            steps = max(5, round(args.accuracy_seconds * cell["measured"]["images_per_sec"] / GLOBAL_BATCH))
            run_dir = Path(tmp, strategy)
            command = [sys.executable, "-m", "multitower", "cluster", *setup.cluster_flags(), "--link", "50mbit",
                       "--", "train", "--data", data_dir, "--run-dir", str(run_dir), *setup.train_flags(),
                       "--steps", str(steps), "--log-every", str(max(1, steps // 4)), "--summary-every", "0",
                       "--checkpoint-every", str(steps), "--progress", "off"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{strategy}'s accuracy run failed: {done.stderr.strip().splitlines()[-1:]}")
            evaluated = subprocess.run([sys.executable, "-m", "multitower", "eval", str(run_dir), "--once",
                                        "--progress", "off"], capture_output=True, text=True, check=True)
            precision = float(evaluated.stdout.split("precision @ 1 = ")[1].split()[0])
            rows.append({"strategy": strategy, "steps": steps, "train_wall_s": trained_wall_s(done.stdout),
                         "precision_at_1": precision})
            print(f"  {strategy:>9}: {steps} steps in {rows[-1]['train_wall_s']} s, precision @ 1 = {precision:.4f}",
                  flush=True)
    return rows


def table(result: dict) -> str:
    lines = [f"{'nodes':>5} {'link':>8} {'strategy':>9} {'measured':>9} {'spread':>6} {'predicted':>9} {'error':>6} "
             f"{'comm% meas':>10} {'comm% pred':>10} {'MB/step':>8}"]
    for c in result["cells"]:
        spread = f"{100 * c['spread']:.0f}%" if "spread" in c else "-"
        lines.append(f"{c['nodes']:>5} {c['link']:>8} {c['strategy']:>9} {c['measured']['images_per_sec']:>9.1f} "
                     f"{spread:>6} {c['predicted']['images_per_sec']:>9.1f} {100 * c['error']:>+5.0f}% "
                     f"{100 * c['measured']['comm_fraction']:>10.0f} {100 * c['predicted_comm_fraction']:>10.0f} "
                     f"{c['measured']['bytes_per_step'] / 1e6:>8.2f}")
    within = sum(abs(c["error"]) <= TARGET for c in result["cells"])
    noisy = sum(c.get("spread", 0.0) > TARGET for c in result["cells"])
    lines.append(f"images/sec of all workers (median of {result.get('reps', 1)} interleaved repetitions; spread: "
                 f"their max / min - 1); planner within {100 * TARGET:.0f}% in {within} of {len(result['cells'])} "
                 f"cells; {noisy} cells spread more than {100 * TARGET:.0f}% between repetitions")
    lines += [winner_line(w) + ("" if w["agree"] else "  (DIFFERENT)") for w in result["winners"]]
    lines += [f"failed, then run again: {f['cell']}: {f['line']} ({f['log']})" for f in result.get("failures", [])]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Images/sec against link bandwidth (the calibrated beta), one panel per node count:
    each strategy's prediction as a line, its measurements as points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from multitower.plan import STRATEGY_COLOURS
    colours = {**STRATEGY_COLOURS, "sync-bf16": "#17becf"}
    node_counts = sorted({c["nodes"] for c in result["cells"]})
    fig, axes = plt.subplots(1, len(node_counts), figsize=(6.2 * len(node_counts), 4.6), squeeze=False,
                             constrained_layout=True)
    for ax, nodes in zip(axes[0], node_counts):
        for strategy in STRATEGIES:
            points = sorted((result["calibrations"][c["link"]]["bandwidth_gbps"], c) for c in result["cells"]
                            if c["nodes"] == nodes and c["strategy"] == strategy)
            if not points:
                continue
            xs = [x for x, _ in points]
            ax.plot(xs, [c["predicted"]["images_per_sec"] for _, c in points], "-", color=colours[strategy], lw=1.5,
                    label=f"{strategy} (predicted)")
            ax.plot(xs, [c["measured"]["images_per_sec"] for _, c in points], "o", color=colours[strategy], ms=7,
                    mfc="none", mew=1.8, label=f"{strategy} (measured)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth, Gbit/s (calibrated; rightmost: unshaped veth)")
        ax.set_ylabel("images / sec (all workers)")
        ax.set_title(f"{nodes} nodes (downpour: + 1 server node)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    env = result["environment"]
    fig.suptitle(f"cifar10-tf, global batch {GLOBAL_BATCH}, one worker per emulated node; {env['cores']} cores "
                 f"({env['cpu']}), shared by all nodes", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 nodes, links unshaped and 50mbit, short cells")
    parser.add_argument("--data", default=None, help="data set (default: data/cifar10, else a generated one)")
    parser.add_argument("--out-dir", default="bench-results", help="where the JSON and PNG go (default: %(default)s)")
    parser.add_argument("--accuracy-seconds", type=float, default=None,
                        help="training time of each strategy's precision run at 50 Mbit/s (default: 180, quick 30; "
                             "0: none)")
    parser.add_argument("--strategies", type=lambda text: choices(text, STRATEGIES, "--strategies"),
                        default=STRATEGIES, help=f"comma-separated, of {', '.join(STRATEGIES)} (default: all)")
    parser.add_argument("--links", type=lambda text: choices(text, LINKS, "--links"), default=None,
                        help=f"comma-separated, of {', '.join(LINKS)} (default: all; quick: unshaped,50mbit)")
    parser.add_argument("--nodes", type=lambda text: tuple(int(n) for n in choices(text, ("2", "4"), "--nodes")),
                        default=None, help="comma-separated node counts, of 2, 4 (default: both; quick: 2)")
    parser.add_argument("--reps", type=int, default=None,
                        help="interleaved repetitions of each cell, whose median it reports (default: 3; quick: 1)")
    parser.add_argument("--repredict", type=Path, default=None, metavar="JSON",
                        help="run nothing: predict a stored run's cells again with this tree's model, from its own "
                             "measurements (no root needed)")
    args = parser.parse_args()
    if args.repredict is not None:
        repredict(args.repredict)
        return
    if args.accuracy_seconds is None:
        args.accuracy_seconds = 30.0 if args.quick else 180.0
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.reps < 1:
        parser.error(f"--reps must be 1 or more, got {args.reps}")
    check_rights()
    data_dir, generated = benchmark_data(args.data)
    out_dir = Path(args.out_dir)
    load_before, started = os.getloadavg(), time.monotonic()
    result = {"benchmark": "interconnect", "environment": environment(), "quick": args.quick, "data": data_dir,
              "generated_data": generated, "global_batch": GLOBAL_BATCH, "target_error": TARGET, "reps": args.reps,
              "command": " ".join(["benchmarks/interconnect.py", *sys.argv[1:]])}
    result.update(run_matrix(args, data_dir))
    result["winners"] = winners(result["cells"])
    result["accuracy"] = []
    if args.accuracy_seconds > 0:
        print("precision @ 1 at 50 Mbit/s, 2 nodes, the same training time each:", flush=True)
        result["accuracy"] = accuracy_runs(args, data_dir, result["cells"])
    result.update({"load_average_before": load_before, "load_average_after": os.getloadavg(),
                   "wall_s": time.monotonic() - started})
    json_path = write_json(out_dir / "interconnect.json", result)
    plot(result, out_dir / "interconnect.png")
    print(table(result))
    print(f"wrote {json_path} and {out_dir / 'interconnect.png'} ({result['wall_s'] / 60:.0f} min; load average "
          f"{load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after)")


if __name__ == "__main__":
    main()
