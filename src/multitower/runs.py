"""What a run directory holds, read for `multitower report` (report.py): its config, its
metrics and evaluation records, its newest checkpoint and status, and from them the
facts a reader wants, not the raw records:

- training time (training_clock): a resumed run's records are one clock, but the hours
  between a run's end and its resume are not the run's;
- the world size the records saw: a run started by torchrun (whose config says
  --workers 1) trained as the 2-worker sync run it was;
- whether the last evaluation is stale (older than the training since);
- the config keys that differ between runs, floats rounded, how-it-was-run keys left out.

Plain JSON only: no torch import, so the report starts in a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from multitower.errors import UserError

# config.json keys that say how a run was run, not what it trained: left out of the
# differences (every resumed run differs in run.resume, every run in run.run_dir).
NOISE_KEYS = frozenset({"run.progress", "run.resume", "run.run_dir"})
# A record whose clock gap since the previous one exceeds its own window (sec_per_batch x
# steps) by more than this many seconds plus RESUME_SHARE of the window starts a new
# segment. Inside a segment the loop's time is all inside the windows (checkpoints and
# summaries included) and the gap exceeds the window only by the log line's own
# collectives and write, milliseconds; a resume adds process start-up, seconds at least.
RESUME_SLACK_S = 2.0
RESUME_SHARE = 0.25


def training_clock(metrics: list[dict], log_every: int) -> tuple[list[float], list[int]]:
    """(seconds of training up to each metrics record, indices of the records that start a
    resumed segment). Inside a segment a record adds its clock gap; the first record of a
    segment (its step does not follow on, or its gap is too long: RESUME_SLACK_S) adds only
    its own window, so the downtime and start-up before a resume are left out. A window's
    steps are the step difference; after a step that went back (a resume from an older
    checkpoint) at most log_every, the steps since the log step before it."""
    elapsed: list[float] = []
    resumes: list[int] = []
    for i, record in enumerate(metrics):
        spb = record.get("sec_per_batch", 0.0)
        if i == 0:
            elapsed.append(record["step"] * spb)  # the run started at step 0
            continue
        previous = metrics[i - 1]
        steps = record["step"] - previous["step"]
        if steps <= 0:
            steps = (record["step"] - 1) % max(1, log_every) + 1
        window = steps * spb
        gap = record["wall_time"] - previous["wall_time"]
        if record["step"] <= previous["step"] or gap > window * (1 + RESUME_SHARE) + RESUME_SLACK_S:
            resumes.append(i)
            elapsed.append(elapsed[-1] + window)
        else:
            elapsed.append(elapsed[-1] + gap)
    return elapsed, resumes


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

    checkpoint_step: int | None = None   # the newest in checkpoints/index.json

    @property
    def world_size(self) -> int:
        """Processes that trained, as the records saw them (WORLD_SIZE: torchrun's too);
        the config's --workers for a run without records."""
        sizes = [m["world_size"] for m in self.metrics if "world_size" in m]
        return int(sizes[-1]) if sizes else int(self.config.get("parallel", {}).get("workers", 1))

    @property
    def strategy(self) -> str:
        strategy = self.config.get("parallel", {}).get("strategy", "?")
        if strategy == "auto":  # as ParallelConfig.resolved_strategy(world_size) does in train()
            return "sync" if self.world_size > 1 else "single"
        return strategy

    @property
    def last_eval(self) -> dict | None:
        return max(self.evals, key=lambda e: e.get("step", 0)) if self.evals else None

    @property
    def trained_step(self) -> int:
        """The furthest step the run is known to have reached (records, checkpoints, status)."""
        return max([m["step"] for m in self.metrics[-1:]] + [self.checkpoint_step or 0]
                   + [int(self.status.get("step", 0) or 0)])

    @property
    def stale(self) -> bool:
        """Evaluated, but at an older step than the run has trained to since."""
        return self.last_eval is not None and self.last_eval["step"] < self.trained_step

    def _clock(self) -> tuple[list[float], list[int]]:
        return training_clock(self.metrics, int(self.config.get("run", {}).get("log_every", 1) or 1))

    def elapsed_s(self) -> list[float]:
        """Seconds of training up to each metrics record, downtime before a resume left out."""
        return self._clock()[0]

    def resumes(self) -> list[int]:
        """Indices of the metrics records that start a resumed segment."""
        return self._clock()[1]

    def downtime_s(self) -> float:
        """Clock seconds between the first and last records that training_clock left out."""
        if len(self.metrics) < 2:
            return 0.0
        elapsed = self.elapsed_s()
        clock = self.metrics[-1]["wall_time"] - self.metrics[0]["wall_time"]
        return max(0.0, clock - (elapsed[-1] - elapsed[0]))

    def elapsed_at_steps(self, steps: list[int]) -> list[float]:
        """Training seconds at each of `steps`, interpolated between records; where a resume
        went back over steps, the later records stand."""
        import numpy as np
        latest: dict[int, float] = {}
        for record, seconds in zip(self.metrics, self.elapsed_s()):
            latest[record["step"]] = seconds
        known = sorted(latest)
        return list(np.interp(steps, known, [latest[k] for k in known]))


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
    return Run(path, name, colour, config, metrics, evals, status, generated, newest_checkpoint(path))


def newest_checkpoint(run_dir: Path) -> int | None:
    """The newest step in checkpoints/index.json (train/checkpoint.py's layout, read as JSON
    so that the report needs no torch); None without a readable index."""
    try:
        index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
        return max((int(e["step"]) for e in index["checkpoints"]), default=None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def rounded(value):
    """`value` with every float cut to 6 significant digits: 1.5 x 512 / 1024 computed as
    0.7500000000000001 is 0.75, and differs from nothing that is 0.75."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def config_differences(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(dotted key, each run's value) for the config.json keys whose values differ, floats
    rounded (rounded), how-it-was-run keys (NOISE_KEYS) left out."""
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats) - NOISE_KEYS)
    rows = []
    for key in keys:
        values = [json.dumps(rounded(f[key])) if key in f else "(absent)" for f in flats]
        if len(set(values)) > 1:
            rows.append((key, values))
    return rows
