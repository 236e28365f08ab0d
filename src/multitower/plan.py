"""`multitower plan`: how each parallel strategy would scale from 1 to 1024 devices.

Inputs: the model's compute time per example on the device at hand (a short profiling
run of its real forward + backward + update, a benchmark JSON, or a number), its
parameter bytes, and the links between devices (presets, measured figures, or a
calibration made here by `--calibrate`). Output: predicted step time, images/sec and
scaling efficiency of every strategy at 1, 2, 4, ... devices, and the winner at each,
as a table, a JSON file and a PNG plot. The formulas are in bench/cost_model.py.

Every device is assumed to be like the one measured: on a CPU, "a device" is this
whole machine (all its cores); several workers sharing one machine's cores are what
`--validate` (bench/validate_plan.py) models instead.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from multitower.bench.cost_model import LINKS, STRATEGY_NAMES, Knobs, Link, Workload, scan
from multitower.parallel.downpour import DownpourOptions
from multitower.parallel.local_sgd import LocalSGDOptions
from multitower.parallel.pipeline import PipelineOptions
from multitower.errors import UserError

STRATEGY_COLOURS = {"sync": "#1f77b4", "pipeline": "#9467bd", "local-sgd": "#2ca02c", "downpour": "#ff7f0e"}
STRATEGY_MARKERS = {"sync": "o", "pipeline": "s", "local-sgd": "^", "downpour": "D"}


@dataclass
class PlanOptions:
    """Everything `multitower plan` needs; cli.py fills it from the flags."""
    model: str = "cifar10-tf"
    """Model from the registry in multitower.models."""
    width: int = 1
    """Channel multiplier of the model."""
    batch_size: int = 128
    """The global batch, examples per step over all devices, split among them, as train's
    --batch-size (with weak_scaling: each device's)."""
    weak_scaling: bool = False
    """Grow the global batch with the devices: each keeps batch_size examples per step."""
    compute_ms_per_example: float = 0.0
    """Milliseconds of forward + backward + update per example on one device; 0 = measure it."""
    from_benchmark: str = ""
    """A benchmarks/train_step.py JSON to read the compute time from (its eager fp32 step)."""
    threads: int = 0
    """CPU threads of the profiling run; 0 = all cores of this process."""
    profile_steps: int = 5
    """Steps in each repetition of the profiling run."""
    profile_reps: int = 5
    """Timed repetitions of the profiling run (the median counts; one untimed before)."""
    link: str = "25gbe"
    """Link between nodes: a key of cost_model.LINKS."""
    intra_link: str = "pcie4"
    """Link between the devices of one node: a key of cost_model.LINKS."""
    devices_per_node: int = 1
    """Devices in one node (8 for a typical GPU server)."""
    nics_per_node: int = 1
    """Inter-node links per node (their bandwidths add up)."""
    bandwidth_gbps: float = 0.0
    """Measured inter-node bandwidth in Gbit/s, replacing the preset's; 0 = the preset's."""
    latency_us: float = 0.0
    """Measured inter-node latency per message in microseconds, replacing the preset's; 0 = the preset's."""
    calibration: str = ""
    """A JSON written by `plan --calibrate` whose alpha, beta and CPU per byte become the inter-node link."""
    overlap: bool = True
    """Sync: all-reduce overlapped with backward (DDP), or after it."""
    # The strategy settings: train's names, defaults and meanings (each strategy's Options).
    sync_every: int = LocalSGDOptions.sync_every
    """Local SGD: steps between weight averages (K)."""
    ps: int = DownpourOptions.ps
    """Downpour: parameter servers."""
    ps_period: int = DownpourOptions.n_push
    """Downpour: steps between a worker's push + fetch (train's --n-push = --n-fetch)."""
    stages: int = PipelineOptions.stages
    """Pipeline: stages per model replica (S)."""
    microbatches: int = PipelineOptions.microbatches
    """Pipeline: micro-batches per replica's share of the step's batch (M)."""
    tolerance: float = 0.05
    """An exact strategy within this fraction of the fastest wins over an approximate one."""
    max_devices: int = 1024
    """Largest device count in the table."""
    out_dir: str = "bench-results"
    """Directory for plan.json and plan.png (and the calibration and validation JSON)."""

    def validate(self) -> "PlanOptions":
        for flag, value in {"--batch-size": self.batch_size, "--profile-steps": self.profile_steps,
                            "--profile-reps": self.profile_reps,
                            "--devices-per-node": self.devices_per_node, "--nics-per-node": self.nics_per_node,
                            "--sync-every": self.sync_every, "--ps": self.ps, "--ps-period": self.ps_period,
                            "--max-devices": self.max_devices, "--width": self.width}.items():
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        for flag, value in {"--compute-ms-per-example": self.compute_ms_per_example, "--threads": self.threads,
                            "--bandwidth-gbps": self.bandwidth_gbps, "--latency-us": self.latency_us,
                            "--microbatches": self.microbatches}.items():
            if value < 0:
                raise UserError(f"{flag} must be 0 (the default) or positive, got {value}")
        if self.stages < 2:
            raise UserError(f"--stages must be at least 2 (one stage is plain data parallelism), got {self.stages}")
        if not 0 <= self.tolerance < 1:
            raise UserError(f"--tolerance must be a fraction in [0, 1), got {self.tolerance}")
        for flag, name in (("--link", self.link), ("--intra-link", self.intra_link)):
            if name not in LINKS:
                raise UserError(f"unknown {flag} {name!r}; presets: {', '.join(LINKS)}")
        return self


def child_output_bytes(model) -> dict[str, int]:
    """Bytes each top-level child of `model` outputs for one example (what a pipeline stage
    ending there sends on), from one forward of a zero image at the model's input size
    (its image_size; 32x32 where it has none, as airbench)."""
    import torch
    sent: dict[str, int] = {}
    hooks = [child.register_forward_hook(lambda _m, _i, out, name=name: sent.__setitem__(
        name, out[0].numel() * out.element_size())) for name, child in model.named_children()]
    side = getattr(model, "image_size", 32)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side))
    finally:
        for hook in hooks:
            hook.remove()
    return sent


def model_bytes(model_name: str, width: int) -> tuple[int, float]:
    """(parameter bytes, mean activation bytes per example at the boundaries between the
    model's top-level children, i.e. what a pipeline stage would send on)."""
    from multitower.models import build_model
    model = build_model(model_name, width=width)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    boundary_bytes = list(child_output_bytes(model).values())[:-1]  # the last child's output is the logits
    return param_bytes, (statistics.mean(boundary_bytes) if boundary_bytes else 0.0)


# DDP's bucket sizes as train's sync strategy leaves them (DistributedDataParallel's defaults).
DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 * 1024 * 1024   # bucket_cap_mb=25


def ddp_bucket_bytes(param_bytes_in_ready_order: list[int]) -> list[int]:
    """The buckets DDP rebuilds after its first step, in the order their all-reduces start:
    parameters taken in the order their gradients become ready, a bucket closed once it
    holds DDP_FIRST_BUCKET_BYTES (the first) or DDP_BUCKET_BYTES (the others)."""
    buckets, current = [], 0
    for nbytes in param_bytes_in_ready_order:
        current += nbytes
        if current >= (DDP_FIRST_BUCKET_BYTES if not buckets else DDP_BUCKET_BYTES):
            buckets.append(current)
            current = 0
    return buckets + [current] if current else buckets


@functools.lru_cache(maxsize=None)  # builds the model; the interconnect benchmark asks per cell
def ddp_last_bucket_share(model_name: str, width: int) -> float:
    """Workload.last_bucket_share: the last DDP bucket's share of the parameter bytes,
    gradients taken as ready in the reverse of the parameters' order (backward runs from
    the last layer to the first). cifar10-tf: 429,312 of 4,273,192 bytes (conv1 and conv2;
    DDP's rebuilt_bucket_sizes on 2 ranks: 3843880, 429312)."""
    from multitower.models import build_model
    sizes = [p.numel() * p.element_size() for p in build_model(model_name, width=width).parameters()
             if p.requires_grad]
    buckets = ddp_bucket_bytes(sizes[::-1])
    return buckets[-1] / sum(buckets) if buckets else 0.0


@functools.lru_cache(maxsize=None)
def input_bytes_per_example(model_name: str, width: int) -> float:
    """What one example's input weighs as the loader hands it over (3 x side x side float32
    images at the model's input size, an int64 label): what a pipeline rank all-gathers."""
    from multitower.models import build_model
    side = getattr(build_model(model_name, width=width), "image_size", 32)
    return 3 * side * side * 4 + 8


def pipeline_cut(model_name: str, width: int, stages: int) -> dict:
    """How `train --strategy pipeline --stages S` cuts the model (its default --balance
    params, parallel/pipeline.plan_stages), as Workload's pipeline fields: each stage's
    share of the forward multiply-adds and of the parameter bytes, and the bytes per example
    each boundary sends on. Empty where S stages cannot be cut (then taken as balanced)."""
    from multitower.models import build_model
    from multitower.parallel.pipeline import plan_stages
    model = build_model(model_name, width=width)
    try:
        groups, macs = plan_stages(model, stages)
    except UserError:
        return {"stage_compute_shares": (), "stage_param_shares": (), "boundary_bytes_per_example": ()}
    children = dict(model.named_children())
    macs_of = dict(zip(children, macs))
    params = {name: sum(p.numel() * p.element_size() for p in child.parameters()) for name, child in children.items()}
    sent = child_output_bytes(model)
    return {"stage_compute_shares": tuple(sum(macs_of[n] for n in g) / sum(macs) for g in groups),
            "stage_param_shares": tuple(sum(params[n] for n in g) / sum(params.values()) for g in groups),
            "boundary_bytes_per_example": tuple(float(sent[g[-1]]) for g in groups[:-1])}


# Repetitions of a profile further apart than this (max - min over the median) are said
# to be: on this shared 2-core machine four profiles minutes apart once ranged 4.3 to 12.1
# ms/example, and a plan from any one of them alone is off by up to 2.8x.
PROFILE_SPREAD_WARN = 0.20


@dataclass
class Profile:
    """What profile_compute measured."""
    s_per_example: float
    """Median over the repetitions: seconds of one training step per example."""
    all_s_per_example: list[float]
    """Each repetition's figure, in the order they ran."""
    step: str
    """The step timed, in words: precision and memory format as train runs them."""
    backward_share: float = Workload.backward_fraction
    """The share of the step's time in backward (bench/step.timed_backward_share), timed over
    one more repetition: Workload.backward_fraction."""

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median of the repetitions."""
        return (max(self.all_s_per_example) - min(self.all_s_per_example)) / self.s_per_example

    def warning(self) -> str | None:
        """A line to print when the repetitions spread more than PROFILE_SPREAD_WARN."""
        if self.spread <= PROFILE_SPREAD_WARN:
            return None
        low, high = min(self.all_s_per_example) * 1e3, max(self.all_s_per_example) * 1e3
        return (f"warning: the profile's {len(self.all_s_per_example)} repetitions spread {100 * self.spread:.0f}% "
                f"({low:.3f} .. {high:.3f} ms/example; the plan uses the median): other work is sharing this "
                f"machine; rerun when it is idle, or pass --compute-ms-per-example")


def profile_compute(model_name: str, width: int, batch_size: int, threads: int, steps: int = 5,
                    warmup: int = 1, reps: int = 5, channels_last: bool | None = None, split=None) -> Profile:
    """The real training step, as `multitower train` runs it with one worker (bench/step.py:
    the Single strategy's step with train's fast path, the loss read and the EMA update), on a
    fixed random batch at `threads` CPU threads (or the GPU when present): `warmup` untimed
    and `reps` timed repetitions of `steps` steps each; the median repetition counts.
    `channels_last`: the memory format (None: train's default; False for the strategies that
    keep NCHW). `split`: batches from these records through train's loader instead of the
    fixed batch, the loader's thread sharing the cores as it does in train."""
    import torch
    from multitower.bench.measure import median_rate
    from multitower.bench.step import training_step
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    setting = None if channels_last is None else {"channels_last": channels_last}
    try:
        step = training_step(batch_size, steps, device, model=model_name, width=width, lr=0.01, setting=setting,
                             split=split)
        try:
            rates = median_rate(step.run, repetitions=reps, warmup=warmup)["all"]
            backward_share = step.backward_share()
        finally:
            step.close()
    finally:
        torch.set_num_threads(previous_threads)
    seconds = [1 / rate for rate in rates]
    layout = "channels_last" if step.fast.channels_last else "NCHW"
    return Profile(statistics.median(seconds), seconds, f"train's step: {step.fast.precision}, {layout}", backward_share)


def keeps_nchw(strategy: str) -> bool:
    """Whether `strategy` runs its step in NCHW where train's default is channels_last (its
    class refuses --channels-last: its flat buffers, server copies or stage boundaries)."""
    from multitower.parallel import STRATEGIES
    return "--channels-last" in STRATEGIES[strategy].refuses


def compute_from_benchmark(path: str) -> float:
    """Seconds per example from a benchmarks/train_step.py result (its plain eager step)."""
    try:
        data = json.loads(Path(path).read_text())
        return 1.0 / float(data["eager_fp32_images_per_sec"]["median"])
    except FileNotFoundError:
        raise UserError(f"--from-benchmark {path}: no such file; make one with `make bench`") from None
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise UserError(f"--from-benchmark {path} is not a train_step benchmark JSON ({exc!r})") from None


def links_from(opts: PlanOptions) -> tuple[Link, Link]:
    """(intra-node, inter-node) links: presets, overridden by a calibration or measured figures."""
    intra, inter = LINKS[opts.intra_link], LINKS[opts.link]
    if opts.calibration:
        from multitower.bench.calibrate import link_from_calibration
        inter = link_from_calibration(opts.calibration)
    if opts.bandwidth_gbps or opts.latency_us:
        inter = replace(inter, name=f"{inter.name}, measured",
                        bandwidth_Bps=opts.bandwidth_gbps * 1e9 / 8 if opts.bandwidth_gbps else inter.bandwidth_Bps,
                        latency_s=opts.latency_us * 1e-6 if opts.latency_us else inter.latency_s)
    return intra, inter


def describe_inputs(opts: PlanOptions) -> str:
    """The plan's inputs in words (what --dry-run prints)."""
    intra, inter = links_from(opts)
    if opts.compute_ms_per_example:
        compute = f"{opts.compute_ms_per_example:g} ms/example (given)"
    elif opts.from_benchmark:
        compute = f"read from {opts.from_benchmark}"
    else:
        compute = (f"measured: train's step of {opts.model} at batch {opts.batch_size}, {opts.profile_reps} "
                   f"repetitions of {opts.profile_steps} steps (median), "
                   f"{opts.threads or len(os.sched_getaffinity(0))} threads")
    scaling = (f"{opts.batch_size} examples per device" if opts.weak_scaling
               else f"global batch {opts.batch_size} split over the devices")
    return "\n".join([
        f"model: {opts.model} (width {opts.width}); {scaling}",
        f"compute: {compute}",
        f"devices: 1 .. {opts.max_devices}, {opts.devices_per_node} per node, {opts.nics_per_node} NIC(s) per node",
        f"intra-node link: {intra.describe()}",
        f"inter-node link: {inter.describe()}",
        f"sync: all-reduce {'overlapped with' if opts.overlap else 'after'} backward; local SGD K={opts.sync_every}; "
        f"downpour {opts.ps} server(s), exchange every {opts.ps_period} step(s); pipeline S={opts.stages}, "
        f"M={opts.microbatches}"])


def make_plan(opts: PlanOptions) -> dict:
    """Measure (or read) the inputs and predict every strategy at every device count."""
    param_bytes, activation_bytes = model_bytes(opts.model, opts.width)
    profile = nchw_profile = None
    by_strategy: tuple[tuple[str, float], ...] = ()
    backward_fraction = Workload.backward_fraction  # the rule of thumb, unless a profile measures it
    if opts.compute_ms_per_example:
        compute_s, source = opts.compute_ms_per_example / 1e3, "given"
    elif opts.from_benchmark:
        compute_s, source = compute_from_benchmark(opts.from_benchmark), opts.from_benchmark
    else:
        profile = profile_compute(opts.model, opts.width, opts.batch_size, opts.threads, opts.profile_steps,
                                  reps=opts.profile_reps)
        compute_s, source = profile.s_per_example, f"measured, {profile.step}"
        backward_fraction = profile.backward_share
        nchw = [name for name in STRATEGY_NAMES if keeps_nchw(name)]
        if nchw and "channels_last" in profile.step:  # those strategies run another step: time it
            nchw_profile = profile_compute(opts.model, opts.width, opts.batch_size, opts.threads,
                                           opts.profile_steps, reps=opts.profile_reps, channels_last=False)
            by_strategy = tuple((name, nchw_profile.s_per_example) for name in nchw)
            source += f"; {', '.join(nchw)}: {nchw_profile.s_per_example * 1e3:.3f} ms/example in NCHW"
    workload = Workload(compute_s, param_bytes, opts.batch_size, activation_bytes,
                        input_bytes_per_example=input_bytes_per_example(opts.model, opts.width),
                        backward_fraction=backward_fraction,
                        last_bucket_share=ddp_last_bucket_share(opts.model, opts.width),
                        compute_by_strategy=by_strategy, **pipeline_cut(opts.model, opts.width, opts.stages))
    intra, inter = links_from(opts)
    knobs = Knobs(opts.overlap, opts.sync_every, opts.ps, opts.ps_period, opts.stages, opts.microbatches)
    rows = scan(workload, opts.max_devices, opts.devices_per_node, intra, inter, knobs, opts.nics_per_node,
                opts.tolerance, strong_scaling_batch=None if opts.weak_scaling else opts.batch_size)
    return {"inputs": {"model": opts.model, "width": opts.width, "compute_s_per_example": compute_s,
                       "compute_source": source,
                       "profile": None if profile is None else {**asdict(profile), "spread": profile.spread,
                                                                "warning": profile.warning()},
                       "nchw_profile": None if nchw_profile is None else asdict(nchw_profile),
                       "compute_by_strategy": dict(by_strategy),
                       "param_bytes": param_bytes,
                       "activation_bytes_per_example": activation_bytes,
                       "intra_link": asdict(intra), "inter_link": asdict(inter), "knobs": asdict(knobs),
                       "options": asdict(opts)},
            "rows": [{**{k: v for k, v in row.items() if k != "predictions"},
                      "predictions": {name: asdict(p) for name, p in row["predictions"].items()}}
                     for row in rows]}


def format_table(plan: dict) -> str:
    """One line per device count: images/sec and efficiency of each strategy, and the winner."""
    inputs = plan["inputs"]
    head = (f"{inputs['model']}: {inputs['compute_s_per_example'] * 1e3:.3f} ms/example ({inputs['compute_source']}), "
            f"{inputs['param_bytes'] / 1e6:.2f} MB of parameters")
    lines = [head, f"{'devices':>7}  {'nodes x per':<11}  {'batch/dev':>9}  "
             + "  ".join(f"{name + ' img/s (eff)':>24}" for name in STRATEGY_NAMES) + "  winner"]
    for row in plan["rows"]:
        cells = []
        for name in STRATEGY_NAMES:
            p = row["predictions"].get(name)
            cells.append(f"{'-':>24}" if p is None else f"{p['images_per_sec']:>16,.0f} ({100 * p['efficiency']:>3.0f}%)")
        layout = f"{row['nodes']} x {row['devices_per_node']}"
        lines.append(f"{row['devices']:>7}  {layout:<11}  {row['batch_per_device']:>9g}  " + "  ".join(cells)
                     + f"  {row['winner']}")
    lines.append("eff = images/sec / (devices x one device's compute-only images/sec); throughput only: local SGD and "
                 "downpour usually need more steps to the same accuracy")
    warning = (inputs.get("profile") or {}).get("warning")
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def plan_figure(plan: dict):
    """Four panels: images/sec (log-log, with linear scaling dashed) and scaling efficiency,
    each device count's winner ringed; below them what tells the strategies apart where the
    first two coincide (on a CPU, compute dwarfs communication and sync, local SGD and
    downpour all draw 100%): communication per step in ms (log), and its exposed part, not
    hidden behind compute, as a share of the step (symlog: 0 is sync hiding it all). Each
    strategy has its own hollow marker, so that lines drawn over each other still show."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = plan["rows"]
    fig, ((ax_rate, ax_eff), (ax_comm, ax_exposed)) = plt.subplots(2, 2, figsize=(12, 8.4), constrained_layout=True)
    devices = [r["devices"] for r in rows]
    one_device = 1 / plan["inputs"]["compute_s_per_example"]  # images/sec of one device, compute only
    ax_rate.plot(devices, [n * one_device for n in devices], "k--", lw=1, label="linear scaling")
    for name in STRATEGY_NAMES:
        points = [(r["devices"], r["predictions"][name]) for r in rows if name in r["predictions"]]
        if not points:
            continue
        xs = [n for n, _ in points]
        style = dict(color=STRATEGY_COLOURS[name], marker=STRATEGY_MARKERS[name], ms=7, mfc="none", mew=1.5, lw=1.5,
                     label=name)
        ax_rate.plot(xs, [p["images_per_sec"] for _, p in points], **style)
        ax_eff.plot(xs, [100 * p["efficiency"] for _, p in points], **style)
        talking = [(n, p) for n, p in points if p["comm_s"] > 0]  # one device: nothing to draw on a log axis
        ax_comm.plot([n for n, _ in talking], [1e3 * p["comm_s"] for _, p in talking], **style)
        ax_exposed.plot(xs, [100 * p["exposed_comm_s"] / p["step_s"] for _, p in points], **style)
        wins = [(n, p) for n, p in points if any(r["devices"] == n and r["winner"] == name for r in rows)]
        for ax, key, scale in ((ax_rate, "images_per_sec", 1), (ax_eff, "efficiency", 100)):
            ax.scatter([n for n, _ in wins], [scale * p[key] for _, p in wins], s=220, facecolors="none",
                       edgecolors=STRATEGY_COLOURS[name], linewidths=2)
    per_node = plan["inputs"]["options"]["devices_per_node"]
    for ax in (ax_rate, ax_eff, ax_comm, ax_exposed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(devices, [str(n) for n in devices])
        ax.minorticks_off()
        ax.set_xlabel("devices")
        ax.grid(True, which="both", alpha=0.3)
        if 1 < per_node < devices[-1]:
            ax.axvline(per_node, color="grey", ls=":", lw=1)
            ax.annotate(" node full", (per_node, 1), xycoords=("data", "axes fraction"), va="top", fontsize=8,
                        color="grey")
    ax_rate.set_yscale("log")
    ax_rate.set_ylabel("images / sec (all devices)")
    ax_eff.set_ylabel("scaling efficiency (%)")
    ax_eff.set_ylim(0, 105)
    ax_comm.set_yscale("log")
    ax_comm.set_ylabel("communication per step (ms), hidden or not")
    ax_exposed.set_yscale("symlog", linthresh=0.1)  # linear below 0.1%, where a hidden all-reduce sits at 0
    ax_exposed.set_ylim(0, 100)
    ax_exposed.set_ylabel("exposed communication (% of step time;\n0: all hidden behind compute)")
    ax_rate.legend(fontsize=8, loc="upper left")
    inputs = plan["inputs"]
    fig.suptitle(f"{inputs['model']}: {inputs['compute_s_per_example'] * 1e3:.2f} ms/example, "
                 f"{inputs['param_bytes'] / 1e6:.1f} MB params; intra {inputs['intra_link']['name']}, "
                 f"inter {inputs['inter_link']['name']} (ringed: the winner)", fontsize=10)
    return fig


def plot(plan: dict, path: Path) -> Path:
    """plan_figure as a PNG at `path`."""
    import matplotlib.pyplot as plt
    fig = plan_figure(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def run(opts: PlanOptions) -> str:
    """The plan command's work: predict, write plan.json and plan.png, return the table."""
    from multitower.bench.measure import environment, write_json
    plan = make_plan(opts)
    out = Path(opts.out_dir)
    json_path = write_json(out / "plan.json", {"benchmark": "plan", "environment": environment(), **plan})
    png_path = plot(plan, out / "plan.png")
    return f"{format_table(plan)}\nwrote {json_path} and {png_path}"


def calibrate(opts: PlanOptions) -> str:
    """`plan --calibrate`: fit this machine's gloo loopback alpha and beta; write the JSON."""
    from multitower.bench.calibrate import measure_allreduce
    from multitower.bench.measure import environment, write_json
    result = measure_allreduce()
    path = write_json(Path(opts.out_dir) / "plan_calibration.json",
                      {"benchmark": "plan_calibration", "environment": environment(), **result})
    lines = [f"{'message':>10}  {'measured':>10}  {'fitted':>10}  {'error':>6}"]
    for s in result["samples"]:
        lines.append(f"{s['bytes'] / 1024:>8,.0f}KB  {s['median_s'] * 1e3:>8.3f}ms  {s['fitted_s'] * 1e3:>8.3f}ms  "
                     f"{100 * (s['fitted_s'] / s['median_s'] - 1):>+5.0f}%")
    lines.append(f"gloo all-reduce, 2 processes on loopback: alpha = {result['latency_us']:.1f} us per message, "
                 f"beta = {result['bandwidth_gbps']:.2f} Gbit/s ({result['beta_Bps'] / 1e9:.2f} GB/s), "
                 f"{result['cpu_ns_per_byte']:.2f} ns of CPU per byte sent")
    lines.append(f"wrote {path}; use it with `multitower plan --calibration {path}`")
    return "\n".join(lines)
