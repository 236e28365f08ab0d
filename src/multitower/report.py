"""`multitower report RUN_DIR ... --out report.html`: one self-contained HTML page
comparing runs, to look at rather than read logs.

It shows each run's summary, the configuration keys that differ between the runs, loss
and precision@1 against steps and against wall time, throughput, the fractions of step
time spent communicating and waiting for data, and, from each run's last evaluation,
per-class accuracy and the confusion matrix. Plots are matplotlib PNGs embedded as
base64 and the CSS is inline: the file needs no server and fetches nothing. A run
without eval.jsonl (or metrics.jsonl) is shown as "not evaluated" (or "no metrics").
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from multitower.errors import UserError

# matplotlib's tab10, the runs' colours in order.
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


@dataclass
class Run:
    path: Path
    name: str
    colour: str
    config: dict
    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    generated_data: bool | None = None   # None: the data set's metadata is not reachable

    @property
    def strategy(self) -> str:
        parallel = self.config.get("parallel", {})
        strategy = parallel.get("strategy", "?")
        if strategy == "auto":  # as ParallelConfig.resolved_strategy does
            return "sync" if parallel.get("workers", 1) > 1 else "single"
        return strategy

    @property
    def last_eval(self) -> dict | None:
        return max(self.evals, key=lambda e: e.get("step", 0)) if self.evals else None

    def elapsed_s(self) -> list[float]:
        """Seconds since the run started at each metrics record: wall_time minus the start,
        taken as the first record's time less its window (step x sec_per_batch)."""
        if not self.metrics:
            return []
        first = self.metrics[0]
        start = first["wall_time"] - first["step"] * first.get("sec_per_batch", 0.0)
        return [m["wall_time"] - start for m in self.metrics]


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a .jsonl file; a torn last line (a run still writing) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def load_run(path: str | Path, name: str, colour: str) -> Run:
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} is not a multitower run directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise UserError(f"{config_path} is unreadable: {exc}") from None
    status = {}
    if (path / "status.json").exists():
        try:
            status = json.loads((path / "status.json").read_text())
        except ValueError:
            status = {}
    generated = None
    data_meta = Path(config.get("data", {}).get("dir", "")) / "multitower.json"
    if data_meta.is_file():
        try:
            generated = bool(json.loads(data_meta.read_text()).get("generated", False))
        except ValueError:
            generated = None
    metrics = [m for m in _read_jsonl(path / "metrics.jsonl") if "step" in m and "wall_time" in m]
    evals = [e for e in _read_jsonl(path / "eval.jsonl") if "precision_at_1" in e]
    return Run(path, name, colour, config, metrics, evals, status, generated)


def run_names(paths: list[Path]) -> list[str]:
    """Directory names, with parents added until they are unique."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(dotted key, each run's value) for the config.json keys whose values differ."""
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats))
    rows = []
    for key in keys:
        values = [json.dumps(f[key]) if key in f else "(absent)" for f in flats]
        if len(set(values)) > 1:
            rows.append((key, values))
    return rows


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(ncols: int, height: float = 3.6):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False})
    fig, axes = plt.subplots(1, ncols, figsize=(11, height), constrained_layout=True, squeeze=False)
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
    by_step.set_xlabel("step")
    by_time.set_xlabel(f"wall time ({unit})")
    by_step.set_ylabel(ylabel)
    by_step.legend(fontsize=8, loc="best")
    _step_axes(by_step, by_time)
    return _png(fig)


def plot_precision(runs: list[Run]) -> str:
    """precision@1 of every evaluation against steps and wall time (interpolated from
    the metrics records, since eval.jsonl has no clock)."""
    import numpy as np
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
            times = np.interp(steps, [m["step"] for m in run.metrics], [s / seconds for s in run.elapsed_s()])
            by_time.plot(times, precision, color=run.colour, lw=2, marker="o", ms=5, label=run.name)
    by_step.set_xlabel("step")
    by_time.set_xlabel(f"wall time ({unit})")
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
    share.legend(fontsize=7)
    _step_axes(rate, share)
    return _png(fig)


def plot_per_class(runs: list[Run]) -> str:
    """Grouped bars: accuracy of each class at each evaluated run's last evaluation."""
    import numpy as np
    evaluated = [r for r in runs if r.last_eval]
    names = evaluated[0].last_eval["class_names"]
    fig, (ax,) = _figure(1, height=3.4)
    width = 0.8 / len(evaluated)
    x = np.arange(len(names))
    for i, run in enumerate(evaluated):
        acc = [100 * a for a in run.last_eval["per_class_accuracy"]][:len(names)]
        bars = ax.bar(x[:len(acc)] + (i - (len(evaluated) - 1) / 2) * width, acc, width, color=run.colour,
                      label=f"{run.name} (step {run.last_eval['step']})")
        if len(evaluated) * len(names) <= 40:  # room to write each bar's value
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    crowded = len(names) * max(len(n) for n in names) > 90  # names would overlap side by side
    ax.set_xticks(x, names, rotation=25 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_confusion(run: Run) -> str:
    """Row-normalised confusion matrix of the run's last evaluation, counts written in."""
    import numpy as np
    e = run.last_eval
    counts = np.array(e["confusion"], dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = e["class_names"]
    size = min(5.5, 1.6 + 0.38 * len(names))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(size + 0.6, size), constrained_layout=True)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 12:
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, f"{count:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "#333333")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.grid(False)
    ax.set_title(f"{run.name}: step {e['step']}, {e.get('split', '?')} split", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return _png(fig)


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
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 3px; margin-right: 7px;
          vertical-align: -1px; }
.tag { display: inline-block; padding: 1px 7px; border-radius: 9px; font-size: 12px; background: #e8edf6; }
.tag.finished { background: #dff3e4; color: #1b6b34; }
.tag.failed { background: #fbe0e0; color: #9b1c1c; }
.tag.running { background: #fff3d6; color: #8a5a00; }
.tag.generated { background: #fff3d6; color: #8a5a00; }
.missing { color: #8a93a3; font-style: italic; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.grid figure { margin: 0; flex: 1 1 320px; max-width: 520px; }
.grid img { width: 100%; }
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
        elapsed = run.elapsed_s()
        rate = _median_after_warmup(run, "examples_per_sec")
        comm = _median_after_warmup(run, "comm_fraction")
        rows.append(
            f"<tr><td>{_swatch(run)}<br><code>{_esc(run.path)}</code></td><td>{_esc(run.strategy)}</td>"
            f"<td class=num>{_esc(cfg.get('parallel', {}).get('workers', '?'))}</td>"
            f"<td class=num>{_esc(cfg.get('data', {}).get('batch_size', '?'))}</td>"
            f"<td class=num>{(last or {}).get('step', 0)} / {_esc(cfg.get('run', {}).get('steps', '?'))}</td>"
            f'<td><span class="tag {_esc(state)}">{_esc(state)}</span></td><td>{data}</td>'
            f"<td class=num>{_fmt(last and last.get('loss_avg'), '{:.3f}', '<span class=missing>no metrics</span>')}</td>"
            f"<td class=num>{precision}</td><td class=num>{_fmt(rate, '{:,.1f}')}</td>"
            f"<td class=num>{_fmt(comm if comm is None else 100 * comm, '{:.1f}%')}</td>"
            f"<td class=num>{_fmt(elapsed[-1] if elapsed else None, '{:.1f} s')}</td></tr>")
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


def _img(png_b64: str, alt: str) -> str:
    return f'<img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{png_b64}">'


def render(runs: list[Run]) -> str:
    """The whole HTML page."""
    with_metrics = [r for r in runs if r.metrics]
    evaluated = [r for r in runs if r.last_eval]
    not_evaluated = ", ".join(_esc(r.name) for r in runs if not r.last_eval)
    no_metrics = ", ".join(_esc(r.name) for r in runs if not r.metrics)
    missing_metrics = f' <span class="missing">No metrics: {no_metrics}.</span>' if no_metrics else ""
    missing_eval = f' <span class="missing">Not evaluated: {not_evaluated}.</span>' if not_evaluated else ""
    parts = [_section("Runs", "Throughput and communication are medians over the log windows after the first "
                      "(warm-up); precision is the last evaluation's.", summary_table(runs)),
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
        figures = "".join(f"<figure>{_img(plot_confusion(r), 'confusion matrix of ' + r.name)}</figure>"
                          for r in evaluated)
        parts.append(_section("Per-class accuracy", "At each run's last evaluation." + missing_eval,
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
        lines.append(f"{run.name}: {run.strategy}, {len(run.metrics)} metrics records, "
                     + (f"last evaluated at step {evaluation['step']}" if evaluation else "not evaluated"))
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
