"""`multitower report RUN_DIR ... --out report.html`: one self-contained HTML page
comparing runs, to look at rather than read logs.

It shows each run's summary, the configuration keys that differ between the runs, loss
and precision@1 against steps and against wall time, throughput, the fractions of step
time spent communicating and waiting for data, and, from each run's last evaluation,
per-class accuracy and the confusion matrix. Plots are matplotlib PNGs embedded as
base64 and the CSS is inline: the file needs no server and fetches nothing. A run
without eval.jsonl (or metrics.jsonl) is shown as "not evaluated" (or "no metrics"),
and one whose last evaluation is older than its training as "stale". What is read from
the run directories, and what it means (training time, world size), is runs.py's.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import statistics
from pathlib import Path

from multitower.errors import UserError
from multitower.runs import Run, config_differences, load_run, run_names

# matplotlib's tab10, the runs' colours in order.
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
# PNG pixels per inch of every plot; with CONFUSION_LABEL_PT that makes the confusion
# matrices' class names 9 x 100 / 72 = 12.5 px, shown at that size (the page does not
# shrink them: at 7 pt shrunk into a third of the page they were ~6 px).
DPI = 100
CONFUSION_LABEL_PT = 9
def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    """matplotlib.pyplot without a display, in the report's style."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False})
    return plt


def _figure(ncols: int, height: float = 3.6):
    fig, axes = _pyplot().subplots(1, ncols, figsize=(11, height), constrained_layout=True, squeeze=False)
    return fig, list(axes[0])


def time_unit(runs: list[Run]) -> tuple[str, float]:
    """(unit name, seconds per unit) for wall-time axes: seconds, minutes or hours."""
    longest = max((r.elapsed_s()[-1] for r in runs if r.metrics), default=0.0)
    if longest < 180:
        return "seconds", 1.0
    return ("minutes", 60.0) if longest < 3 * 3600 else ("hours", 3600.0)


def _step_axes(*axes) -> None:
    for ax in axes:
        ax.set_xlim(left=0)


def _mark_resumes(ax, run: Run, seconds: float) -> None:
    """A dotted line in the run's colour where each resumed segment starts on a wall-time axis."""
    elapsed = run.elapsed_s()
    for i in run.resumes():
        start = elapsed[i - 1] / seconds  # the training time at which the segment took over
        ax.axvline(start, color=run.colour, ls=":", lw=1.2)
        ax.annotate(" resumed", (start, 1), xycoords=("data", "axes fraction"), va="top", fontsize=8,
                    color=run.colour)


def plot_curves(runs: list[Run], key: str, ylabel: str, smooth_key: str | None = None) -> str:
    """`key` against steps (left) and wall time (right), one colour per run; with
    `smooth_key` the raw values are drawn faint and the smoothed ones solid."""
    fig, (by_step, by_time) = _figure(2)
    unit, seconds = time_unit(runs)
    for run in runs:
        if not run.metrics:
            continue
        steps = [m["step"] for m in run.metrics]
        times = [s / seconds for s in run.elapsed_s()]
        for ax, xs in ((by_step, steps), (by_time, times)):
            if smooth_key:
                ax.plot(xs, [m[key] for m in run.metrics], color=run.colour, alpha=0.25, lw=1)
                ax.plot(xs, [m[smooth_key] for m in run.metrics], color=run.colour, lw=2, label=run.name)
            else:
                ax.plot(xs, [m[key] for m in run.metrics], color=run.colour, lw=2, marker="o", ms=3, label=run.name)
        _mark_resumes(by_time, run, seconds)
    by_step.set_xlabel("step")
    by_time.set_xlabel(f"training time ({unit}; downtime before a resume left out)")
    by_step.set_ylabel(ylabel)
    by_step.legend(fontsize=8, loc="best")
    _step_axes(by_step, by_time)
    return _png(fig)


def plot_precision(runs: list[Run]) -> str:
    """precision@1 of every evaluation against steps and wall time (interpolated from
    the metrics records, since eval.jsonl has no clock)."""
    fig, (by_step, by_time) = _figure(2)
    unit, seconds = time_unit(runs)
    low, high = 100.0, 0.0
    for run in runs:
        if not run.evals:
            continue
        evals = sorted(run.evals, key=lambda e: e["step"])
        steps = [e["step"] for e in evals]
        precision = [100 * e["precision_at_1"] for e in evals]
        low, high = min(low, *precision), max(high, *precision)
        by_step.plot(steps, precision, color=run.colour, lw=2, marker="o", ms=5, label=run.name)
        if run.metrics:
            times = [t / seconds for t in run.elapsed_at_steps(steps)]
            by_time.plot(times, precision, color=run.colour, lw=2, marker="o", ms=5, label=run.name)
            _mark_resumes(by_time, run, seconds)
    by_step.set_xlabel("step")
    by_time.set_xlabel(f"training time ({unit}; downtime before a resume left out)")
    by_step.set_ylabel("precision @ 1 (%)")
    by_step.legend(fontsize=8, loc="best")
    for ax in (by_step, by_time):  # room around the points, within 0..100
        ax.set_ylim(max(0.0, low - 10), min(100.0, high + 10))
    _step_axes(by_step, by_time)
    return _png(fig)


def plot_throughput(runs: list[Run]) -> str:
    """examples/sec (left); comm fraction solid and data-wait fraction dashed (right)."""
    fig, (rate, share) = _figure(2)
    for run in runs:
        if not run.metrics:
            continue
        steps = [m["step"] for m in run.metrics]
        rate.plot(steps, [m["examples_per_sec"] for m in run.metrics], color=run.colour, lw=2, marker="o", ms=3,
                  label=run.name)
        share.plot(steps, [100 * m.get("comm_fraction", 0.0) for m in run.metrics], color=run.colour, lw=2,
                   label=f"{run.name}: communication")
        share.plot(steps, [100 * m.get("data_wait_fraction", 0.0) for m in run.metrics], color=run.colour, lw=1.5,
                   ls="--", label=f"{run.name}: data wait")
    rate.set_xlabel("step")
    rate.set_ylabel("examples / sec (all workers)")
    rate.set_ylim(bottom=0)
    share.set_xlabel("step")
    share.set_ylabel("% of step time")
    share.set_ylim(bottom=0)
    rate.legend(fontsize=8)
    share.legend(fontsize=8)
    _step_axes(rate, share)
    return _png(fig)


def per_class_groups(runs: list[Run]) -> list[tuple[list[str], list[Run]]]:
    """The evaluated runs grouped by the class names of their data set, in the runs' order:
    bars side by side only where they count the same classes."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        if run.last_eval:
            groups.setdefault(tuple(run.last_eval["class_names"]), []).append(run)
    return [(list(names), members) for names, members in groups.items()]


def group_title(names: list[str], members: list[Run]) -> str:
    """"10 classes of synthetic": the count and the data sets' folder names of one group."""
    data = sorted({Path(r.config.get("data", {}).get("dir", "?")).name for r in members})
    return f"{len(names)} classes of {', '.join(data)}"


def per_class_figure(runs: list[Run]):
    """Grouped bars of each class's accuracy at each run's last evaluation: one panel per
    set of class names (per_class_groups), each labelled with its own names."""
    import numpy as np
    groups = per_class_groups(runs)
    fig, axes = _pyplot().subplots(len(groups), 1, figsize=(11, 3.4 * len(groups)), constrained_layout=True,
                                   squeeze=False)
    for ax, (names, members) in zip(axes[:, 0], groups):
        width = 0.8 / len(members)
        x = np.arange(len(names))
        for i, run in enumerate(members):
            acc = [100 * a for a in run.last_eval["per_class_accuracy"]][:len(names)]
            bars = ax.bar(x[:len(acc)] + (i - (len(members) - 1) / 2) * width, acc, width, color=run.colour,
                          label=f"{run.name} (step {run.last_eval['step']})")
            if len(members) * len(names) <= 40:  # room to write each bar's value
                ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=1)
        crowded = len(names) * max(len(n) for n in names) > 90  # names would overlap side by side
        ax.set_xticks(x, names, rotation=25 if crowded else 0, ha="right" if crowded else "center")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        if len(groups) > 1:
            ax.set_title(group_title(names, members), fontsize=9, loc="left")
    return fig


def plot_per_class(runs: list[Run]) -> str:
    return _png(per_class_figure(runs))


def confusion_figure(run: Run):
    """Row-normalised confusion matrix of the run's last evaluation, counts written in;
    sized so that shown at its own pixel size its class names are CONFUSION_LABEL_PT."""
    import numpy as np
    e = run.last_eval
    counts = np.array(e["confusion"], dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = e["class_names"]
    # Up to 30 names fit a 5-inch figure at 9 pt; beyond, every k-th is written (CIFAR-100: 4th).
    every = -(-len(names) // 30)
    side = min(4.1, 2.2 + 0.3 * len(names))  # with the colour bar 5 in = 500 px: two fit side by side
    fig, ax = _pyplot().subplots(figsize=(side + 0.9, side), constrained_layout=True)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 12:
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, f"{count:.0f}", ha="center", va="center", fontsize=CONFUSION_LABEL_PT - 1,
                    color="white" if share[i, j] > 0.5 else "#333333")
    ticks = list(range(0, len(names), every))
    ax.set_xticks(ticks, [names[t] for t in ticks], rotation=90, fontsize=CONFUSION_LABEL_PT)
    ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=CONFUSION_LABEL_PT)
    ax.set_xlabel("predicted", fontsize=CONFUSION_LABEL_PT)
    ax.set_ylabel("true", fontsize=CONFUSION_LABEL_PT)
    ax.grid(False)
    ax.set_title(f"{run.name}: step {e['step']}, {e.get('split', '?')} split", fontsize=CONFUSION_LABEL_PT + 1)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("share of the true class", fontsize=CONFUSION_LABEL_PT)
    bar.ax.tick_params(labelsize=CONFUSION_LABEL_PT - 1)
    return fig


def plot_confusion(run: Run) -> tuple[str, int]:
    """(PNG as base64, its width in pixels) of confusion_figure."""
    fig = confusion_figure(run)
    width_px = round(fig.get_size_inches()[0] * DPI)
    return _png(fig), width_px


def _median_after_warmup(run: Run, key: str) -> float | None:
    records = run.metrics[1:] if len(run.metrics) > 1 else run.metrics  # the first window holds the warm-up
    values = [m[key] for m in records if key in m]
    return statistics.median(values) if values else None


def _fmt(value, pattern: str, missing: str = "&mdash;") -> str:
    return missing if value is None else pattern.format(value)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d2330; background: #f4f6f9; margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
header { background: #1d2a44; color: #fff; padding: 22px 28px; }
header .inner { max-width: 1120px; margin: 0 auto; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header p { margin: 0; color: #b8c3d9; font-size: 13px; }
section { background: #fff; border-radius: 10px; box-shadow: 0 1px 3px rgba(20, 30, 50, .12);
          padding: 16px 20px 18px; margin: 18px 0; }
h2 { font-size: 16px; margin: 0 0 4px; }
p.caption { color: #5b6577; margin: 0 0 10px; font-size: 13px; }
img.plot { width: 100%; display: block; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { padding: 6px 10px; border-bottom: 1px solid #e5e8ee; text-align: left; vertical-align: top; }
th { color: #5b6577; font-weight: 600; background: #f8f9fb; }
td.num { text-align: right; white-space: nowrap; }
tr:nth-child(even) td { background: #fbfcfd; }
code { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; }
td code { overflow-wrap: anywhere; }  /* a long run path must not push the table past the page */
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 3px; margin-right: 7px;
          vertical-align: -1px; }
.tag { display: inline-block; padding: 1px 7px; border-radius: 9px; font-size: 12px; background: #e8edf6; }
.tag.finished { background: #dff3e4; color: #1b6b34; }
.tag.failed { background: #fbe0e0; color: #9b1c1c; }
.tag.running { background: #fff3d6; color: #8a5a00; }
.tag.generated { background: #fff3d6; color: #8a5a00; }
.missing { color: #8a93a3; font-style: italic; }
.tag.stale { background: #fbe0e0; color: #9b1c1c; white-space: normal; }
td .note { display: block; white-space: normal; color: #8a93a3; font-size: 12px; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.grid figure { margin: 0; flex: 0 1 auto; max-width: 100%; }
img.natural { display: block; max-width: 100%; height: auto; }  /* its own pixel size: labels stay legible */
footer { color: #8a93a3; font-size: 12px; text-align: center; }
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _swatch(run: Run) -> str:
    return f'<span class="swatch" style="background:{run.colour}"></span>{_esc(run.name)}'


def summary_table(runs: list[Run]) -> str:
    head = ("<tr><th>run</th><th>strategy</th><th>workers</th><th>global batch</th><th>steps</th><th>status</th>"
            "<th>data</th><th class=num>loss (avg)</th><th class=num>precision @ 1</th>"
            "<th class=num>examples/sec</th><th class=num>comm</th><th class=num>wall time</th></tr>")
    rows = []
    for run in runs:
        cfg = run.config
        last = run.metrics[-1] if run.metrics else None
        state = run.status.get("state", "unknown")
        data = {True: '<span class="tag generated">generated</span>', False: "real",
                None: '<span class="missing">unknown</span>'}[run.generated_data]
        evaluation = run.last_eval
        precision = (f"{100 * evaluation['precision_at_1']:.1f}% <span class=missing>(step {evaluation['step']})</span>"
                     if evaluation else '<span class="missing">not evaluated</span>')
        if run.stale:
            precision += (f'<br><span class="tag stale" title="multitower eval {_esc(run.path)} --once">stale: '
                          f"trained to step {run.trained_step}</span>")
        elapsed = run.elapsed_s()
        wall = _fmt(elapsed[-1] if elapsed else None, "{:.1f} s")
        if run.resumes():
            segments = len(run.resumes()) + 1
            wall += f'<span class="note">{segments} segments; {run.downtime_s():,.0f} s between them left out</span>'
        rate = _median_after_warmup(run, "examples_per_sec")
        comm = _median_after_warmup(run, "comm_fraction")
        rows.append(
            f"<tr><td>{_swatch(run)}<br><code>{_esc(run.path)}</code></td><td>{_esc(run.strategy)}</td>"
            f"<td class=num>{run.world_size}</td>"
            f"<td class=num>{_esc(cfg.get('data', {}).get('batch_size', '?'))}</td>"
            f"<td class=num>{(last or {}).get('step', 0)} / {_esc(cfg.get('run', {}).get('steps', '?'))}</td>"
            f'<td><span class="tag {_esc(state)}">{_esc(state)}</span></td><td>{data}</td>'
            f"<td class=num>{_fmt(last and last.get('loss_avg'), '{:.3f}', '<span class=missing>no metrics</span>')}</td>"
            f"<td class=num>{precision}</td><td class=num>{_fmt(rate, '{:,.1f}')}</td>"
            f"<td class=num>{_fmt(comm if comm is None else 100 * comm, '{:.1f}%')}</td>"
            f"<td class=num>{wall}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def differences_table(runs: list[Run]) -> str:
    if len(runs) < 2:
        return '<p class="missing">One run: nothing to compare.</p>'
    rows = config_differences(runs)
    if not rows:
        return '<p class="missing">The runs have identical configurations.</p>'
    head = "<tr><th>config.json key</th>" + "".join(f"<th>{_swatch(r)}</th>" for r in runs) + "</tr>"
    body = "".join(f"<tr><td><code>{_esc(key)}</code></td>" + "".join(f"<td><code>{_esc(v)}</code></td>" for v in values)
                   + "</tr>" for key, values in rows)
    return f"<table>{head}{body}</table>"


def _section(title: str, caption: str, body: str) -> str:
    return f"<section><h2>{_esc(title)}</h2><p class=caption>{caption}</p>{body}</section>"


def _img(png_b64: str, alt: str, width_px: int | None = None) -> str:
    """A plot as wide as the page, or, given its `width_px`, at its own size (class natural)."""
    if width_px is None:
        return f'<img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{png_b64}">'
    return f'<img class="natural" width="{width_px}" alt="{_esc(alt)}" src="data:image/png;base64,{png_b64}">'


def render(runs: list[Run]) -> str:
    """The whole HTML page."""
    with_metrics = [r for r in runs if r.metrics]
    evaluated = [r for r in runs if r.last_eval]
    not_evaluated = ", ".join(_esc(r.name) for r in runs if not r.last_eval)
    no_metrics = ", ".join(_esc(r.name) for r in runs if not r.metrics)
    missing_metrics = f' <span class="missing">No metrics: {no_metrics}.</span>' if no_metrics else ""
    missing_eval = f' <span class="missing">Not evaluated: {not_evaluated}.</span>' if not_evaluated else ""
    stale = ", ".join(_esc(r.name) for r in runs if r.stale)
    stale_note = (f' <span class="missing">Stale (trained on since the last evaluation): {stale}; '
                  "run <code>multitower eval RUN_DIR --once</code>.</span>" if stale else "")
    parts = [_section("Runs", "Throughput and communication are medians over the log windows after the first "
                      "(warm-up); precision is the last evaluation's; workers are the processes that trained; "
                      "wall time is training time, downtime before a resume left out." + stale_note,
                      summary_table(runs)),
             _section("Configuration differences", "Only the config.json keys whose values differ.",
                      differences_table(runs))]
    if with_metrics:
        parts.append(_section("Loss", "Total loss (cross-entropy + weight decay): faint raw, solid its moving "
                              "average; against steps and against wall time." + missing_metrics,
                              _img(plot_curves(with_metrics, "loss", "total loss", smooth_key="loss_avg"), "loss")))
    if evaluated:
        parts.append(_section("Precision @ 1", "Each evaluation of the moving-average weights; wall time "
                              "interpolated from the training log." + missing_eval,
                              _img(plot_precision(evaluated), "precision at 1")))
    if with_metrics:
        parts.append(_section("Throughput and communication", "Examples per second over all workers (left); "
                              "share of step time with an all-reduce in flight (solid) and waiting for data "
                              "(dashed), the slowest rank's." + missing_metrics,
                              _img(plot_throughput(with_metrics), "throughput")))
    if evaluated:
        figures = ""
        for run in evaluated:
            png, width_px = plot_confusion(run)
            figures += f"<figure>{_img(png, 'confusion matrix of ' + run.name, width_px)}</figure>"
        groups = per_class_groups(evaluated)
        panels = ("; one panel per set of class names: " + "; ".join(
            f"{_esc(group_title(names, members))} ({', '.join(_esc(r.name) for r in members)})"
            for names, members in groups) + ".") if len(groups) > 1 else "."
        parts.append(_section("Per-class accuracy", "At each run's last evaluation" + panels + missing_eval,
                              _img(plot_per_class(evaluated), "per-class accuracy")))
        parts.append(_section("Confusion matrices", "Rows: true class, columns: predicted; shade: share of the "
                              "true class, numbers: counts.", f'<div class="grid">{figures}</div>'))
    else:
        parts.append(_section("Evaluation", "", '<p class="missing">No run was evaluated '
                              "(run <code>multitower eval RUN_DIR --once</code>): not evaluated.</p>"))
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>multitower report</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
            f'<header><div class="inner"><h1>multitower report</h1><p>{len(runs)} run(s): '
            + ", ".join(_esc(r.name) for r in runs) + f" &middot; generated {generated}</p></div></header>"
            f"<main>{''.join(parts)}<footer>Self-contained: plots embedded, no external resources.</footer>"
            f"</main></body></html>")


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    if not run_dirs:
        raise UserError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    names = run_names(paths)
    return [load_run(p, name, RUN_COLOURS[i % len(RUN_COLOURS)]) for i, (p, name) in enumerate(zip(paths, names))]


def check_runs(run_dirs: list[str | Path]) -> str:
    """What `report --dry-run` prints: one line per run, what the report would show of it."""
    lines = []
    for run in load_runs(run_dirs):
        evaluation = run.last_eval
        stale = f", stale: trained to step {run.trained_step} since" if run.stale else ""
        lines.append(f"{run.name}: {run.strategy}, {run.world_size} worker{'s' if run.world_size > 1 else ''}, "
                     f"{len(run.metrics)} metrics records, "
                     + (f"last evaluated at step {evaluation['step']}{stale}" if evaluation else "not evaluated"))
    return "\n".join(lines)


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Load the runs, render the page, write it atomically; return its path."""
    runs = load_runs(run_dirs)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out}/report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    from multitower.files import atomic_write_bytes
    atomic_write_bytes(out, render(runs).encode("utf-8"))
    return out
