"""The training loop (the tutorial's train()), the same for every strategy:
batch -> strategy.step -> learning rate -> moving average -> log -> summaries -> checkpoint.

train() decides this process's role first (downpour's parameter servers serve and never
enter the loop), builds the run (train/build.py), takes the run directory if it is rank 0
(the run's one writer), then loops. A failure caused by another process of the job (a
collective that timed out or lost its peer) is raised as PeerStopped naming that
process, or PeerLost.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from multitower.attempt import current_attempt
from multitower.config import Config
from multitower.data.loader import augments_on_device
from multitower.errors import Interrupted, PeerLost, PeerStopped, UserError, first_line, is_communication_error
from multitower.faults import maybe_inject, maybe_linger
from multitower.files import atomic_write_bytes
from multitower.heartbeat import Heartbeat, TeardownBound, end_with_launcher
from multitower.parallel import strategy_class
from multitower.train.build import Run, build_run, world_size
from multitower.train.checkpoint import CheckpointDir
from multitower.train.ema import LossAverage
from multitower.train.host import peak_memory
from multitower.train.run_dir import HELD_BY_LAUNCHER, RunDirLock, check_run_dir, rank_log, remove_leftovers, write_status
from multitower.train.summaries import Summaries, capture_activations


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    step: int
    loss: float
    """The last log window's mean loss; NaN when this process trained no step."""
    wall_time_s: float
    examples_per_sec: float
    steps_trained: int = 0
    """Steps this process ran: 0 for a parameter server, or for a restart that found the run
    already at its last step."""


def check_steps_ahead(cfg: Config, checkpoint_step: int | None, restarted: bool) -> None:
    """A resume must have steps left to train (a restart may find the run already done)."""
    if checkpoint_step is None or not cfg.run.resume:
        return
    if cfg.run.steps < checkpoint_step or (cfg.run.steps == checkpoint_step and not restarted):
        raise UserError(f"{cfg.run.run_dir} is already at step {checkpoint_step}; --steps {cfg.run.steps} "
                        f"leaves nothing to train: pass --steps above {checkpoint_step} to extend it")


def train(cfg: Config, on_step=None, *, recipe=None, data=None, model=None) -> TrainResult:
    """Train as cfg says (recipe, data, model: a Python caller's own, else cfg's by name).
    on_step(step, model, ema) -> bool, if given, is called after every step (after the
    moving average, before any checkpoint); True ends the run there, with a final checkpoint
    (the time-to-accuracy benchmark evaluates and stops through it; one process)."""
    cfg.validate()
    if cfg.data.dir:  # the run names its data absolutely: eval and resume work from anywhere
        cfg = cfg.with_values({"data.dir": str(Path(cfg.data.dir).resolve())})
    restarted = current_attempt() > 0
    if restarted:
        # The elastic agent restarted the worker group after a failure: continue the
        # run from its last checkpoint rather than refusing the existing run directory.
        cfg = cfg.with_values({"run.resume": True})
    cls, rank = strategy_class(cfg.parallel, world_size()), int(os.environ.get("RANK", 0))
    serving = cls.serves(cfg.parallel, rank)
    label = f"parameter server {rank - cfg.parallel.workers}" if serving else ""
    end_with_launcher()
    heartbeat = Heartbeat.from_environment(cfg.parallel.timeout_s).start(label)
    start = time.perf_counter()
    try:
        if serving:  # a role decided where the process starts: it serves, it never trains
            cls.serve(cfg.parallel)
            result = TrainResult(step=0, loss=float("nan"), wall_time_s=time.perf_counter() - start,
                                 examples_per_sec=0.0)
        else:
            result = _train(cfg, on_step, heartbeat, restarted, recipe=recipe, data=data, model=model)
    except Exception as exc:
        if not is_communication_error(exc):
            heartbeat.stop(failing=True)
            raise
        # Name the process that caused it: one with no sign of life, or one behind. (Still
        # beating meanwhile: peers judging at the same moment must not take us for it.)
        me = heartbeat.describe(heartbeat.rank)
        verdict = heartbeat.verdict()
        heartbeat.stop(failing=True)
        if verdict:
            raise PeerStopped(f"{verdict}; {me} gave up waiting for it "
                              f"(--timeout {cfg.parallel.timeout_s:g} s)") from None
        raise PeerLost(f"{me} lost its connection to another process of the job: {first_line(exc)}") from None
    except BaseException:
        heartbeat.stop(failing=True)
        raise
    heartbeat.close()
    return result


def device_placement(run: Run) -> str:
    """Where this rank's tensors and ops live (the tutorial's --log_device_placement)."""
    import torch.distributed as dist
    strategy, model, fast = run.strategy, run.model, run.strategy.fast
    rank = os.environ.get("RANK", "0")
    backend = dist.get_backend() if dist.is_initialized() else "none (one process)"
    params = {str(p.device) for p in model.parameters()}
    layout = "channels_last" if fast.channels_last else "NCHW"
    slots = {str(t.device) for state in run.optimizer.state.values() for t in state.values()
             if isinstance(t, torch.Tensor)} or params
    if augments_on_device(run.cfg.data.augment_on, run.device):
        batches = "the device, after their uint8 images are copied"
    else:
        batches = "the host (loader thread)" + (", then copied" if run.device.type != "cpu" else "")
    return (f"rank {rank} (node {os.environ.get('GROUP_RANK', '0')}, pid {os.getpid()}): {strategy.name} on "
            f"{run.device}, process group {backend}, {torch.get_num_threads()} threads; "
            f"{sum(1 for _ in model.parameters())} parameter tensors on {', '.join(sorted(params))} ({layout}); "
            f"optimizer state on {', '.join(sorted(slots))}; forward/backward ops on {run.device} in "
            f"{fast.precision}; batches augmented on {batches}")


def _train(cfg: Config, on_step, heartbeat: Heartbeat, restarted: bool, **given) -> TrainResult:
    run = build_run(cfg, **given)
    cfg, strategy = run.cfg, run.strategy
    if cfg.run.log_device_placement:
        # One write of the whole line: the ranks share a stdout, and print's separate write
        # of the newline let another rank's line in between (seen in a test run).
        sys.stdout.write(device_placement(run) + "\n")
        sys.stdout.flush()
    run_dir = Path(cfg.run.run_dir)
    checkpoints = CheckpointDir(run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
    lock = None
    try:
        check_steps_ahead(cfg, checkpoints.latest_step() if cfg.run.resume else None, restarted)
        if strategy.is_rank0:
            check_run_dir(run_dir, cfg, run.strategy_class)
            if os.environ.get(HELD_BY_LAUNCHER) != str(run_dir.resolve()):
                lock = RunDirLock(run_dir).acquire()  # rank 0 is the run's one writer
            print(run.data.describe(), flush=True)
            remove_leftovers(run_dir)  # what a crash mid-write left, now that we hold the run
            atomic_write_bytes(run_dir / "config.json", cfg.to_json().encode())
        result = _loop(run, on_step, heartbeat, checkpoints)
        if strategy.ends_in_step:
            heartbeat.bound_teardown(TeardownBound(rank_log(run_dir, strategy.rank), strategy.rank,
                                                    cfg.parallel.timeout_s))
        maybe_linger(strategy.rank)
        return result
    finally:
        if lock is not None:
            lock.release()
        strategy.close()


class Checkpoints:
    """What the loop writes at a checkpoint: the strategy's part (a collective where ranks
    hold parts or replicas differ) and the loop's own: RNG, loss averages, config, data position."""

    def __init__(self, run: Run, directory: CheckpointDir, loss_avg: LossAverage, ce_avg: LossAverage):
        self.run, self.directory, self.loss_avg, self.ce_avg = run, directory, loss_avg, ce_avg
        self.saved_step = directory.latest_step() if run.strategy.is_rank0 else None

    def restore(self, device) -> int:
        """Load the newest checkpoint into every part; its step (0 without one)."""
        run = self.run
        if not (run.cfg.run.resume and self.directory.entries()):
            return 0
        state = self.directory.load(map_location=device)
        own = run.strategy.load(state)  # this process's moving average and Lookahead
        run.ema.load_state_dict(own["ema"])
        if run.lookahead is not None:
            run.lookahead.load_state_dict(own.get("lookahead"))
        self.loss_avg.value, self.ce_avg.value = state["loss_average"], state["cross_entropy_average"]
        torch.set_rng_state(state["rng"])
        if run.strategy.is_rank0:
            restarts = current_attempt()
            after = f" (restart {restarts} after a worker failure)" if restarts else ""
            print(f"resumed {run.cfg.run.run_dir} at step {state['step']}{after}", flush=True)
        return state["step"]

    def save(self, step: int) -> None:
        run, cfg = self.run, self.run.cfg
        lookahead = run.lookahead.state_dict() if run.lookahead is not None else None
        state = run.strategy.checkpoint_state({"ema": run.ema.state_dict(), "lookahead": lookahead})  # every rank
        if not run.strategy.is_rank0:
            return
        self.directory.save({**state, "rng": torch.get_rng_state(), "loss_average": self.loss_avg.value,
                             "cross_entropy_average": self.ce_avg.value, "config": cfg.to_json(),
                             "model_name": cfg.model.name,
                             "data_position": {"global_step": step, "global_batch_size": cfg.data.batch_size,
                                               "seed": cfg.run.seed}}, step)
        self.saved_step = step


class LogWindow:
    """What happened since the last log line: examples, time waiting for data and for
    communication, each step's extra metrics."""

    def __init__(self):
        self.start, self.steps, self.examples, self.data_wait_s, self.comm_s = time.perf_counter(), 0, 0, 0.0, 0.0
        self.extra: dict[str, list[float]] = {}

    def add(self, metrics, data_wait_s: float) -> None:
        self.steps += 1
        self.examples += metrics.examples
        self.data_wait_s += data_wait_s
        self.comm_s += metrics.comm_s
        for key, value in metrics.extra.items():
            self.extra.setdefault(key, []).append(value)

    def record(self, step: int, strategy, loss_value: float, loss_avg, ce_avg, lr: float) -> dict:
        """The metrics.jsonl record. Collectives: every rank takes part, rank 0 writes.
        Throughput per rank shows a straggler; the loss is the mean over all shards; the
        peak memory is rank 0's process's."""
        elapsed = time.perf_counter() - self.start
        rank_examples_per_sec = strategy.all_ranks(self.examples / strategy.world_size / elapsed)
        rank_comm_fraction = strategy.all_ranks(self.comm_s / elapsed)
        mean_loss = sum(strategy.all_ranks(loss_value)) / strategy.world_size
        return {"step": step, "loss": mean_loss, "loss_avg": loss_avg.value, "cross_entropy": ce_avg.value, "lr": lr,
                "examples_per_sec": self.examples / elapsed, "sec_per_batch": elapsed / self.steps,
                "data_wait_fraction": self.data_wait_s / elapsed, "comm_fraction": max(rank_comm_fraction),
                "rank_examples_per_sec": rank_examples_per_sec, "world_size": strategy.world_size,
                "wall_time": time.time(), **peak_memory(strategy.device),
                **{key: sum(v) / len(v) for key, v in self.extra.items()}}


def log_line(record: dict, world_size: int) -> str:
    line = (f"step {record['step']}, loss = {record['loss']:.2f} (avg {record['loss_avg']:.2f}) "
            f"({record['examples_per_sec']:.1f} examples/sec; {record['sec_per_batch']:.3f} sec/batch)")
    if world_size > 1:
        line += (f" [per rank: {', '.join(f'{r:.0f}' for r in record['rank_examples_per_sec'])} examples/sec;"
                 f" comm {100 * record['comm_fraction']:.0f}% of step time]")
    return line


# Settings that say nothing about how a run trains (where it writes, how it shows progress).
NOT_HPARAMS = {"run.run_dir", "run.resume", "run.progress", "run.log_every", "run.summary_every",
               "run.checkpoint_every", "run.keep_checkpoints", "run.log_device_placement", "data.prefetch"}


def hparams_of(cfg: Config) -> dict:
    """The run's settings as TensorBoard hparams (numbers, strings and booleans only)."""
    values = {}
    for path, value in cfg.flat().items():
        if path in NOT_HPARAMS:
            continue
        values[path] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


def set_learning_rates(optimizer, lr: float, epoch: int) -> None:
    """A group's lr is the schedule's times its lr_scale (fast: batch-norm shifts at 64x),
    and 0 once its "train_epochs" are over (fast: the whitening bias)."""
    for group in optimizer.param_groups:
        done = epoch >= group.get("train_epochs", math.inf)
        group["lr"] = 0.0 if done else lr * group.get("lr_scale", 1.0)


def _loop(run: Run, on_step, heartbeat: Heartbeat, directory: CheckpointDir) -> TrainResult:
    cfg, strategy, model, device = run.cfg, run.strategy, run.model, run.device
    run_dir, every = Path(cfg.run.run_dir), cfg.run
    loss_avg, ce_avg = LossAverage(cfg.optim.loss_average_decay), LossAverage(cfg.optim.loss_average_decay)
    checkpoints = Checkpoints(run, directory, loss_avg, ce_avg)
    step = start_step = checkpoints.restore(device)
    summaries = Summaries(run_dir) if strategy.is_rank0 else None
    show_bar = strategy.is_rank0 and (every.progress == "on" or (every.progress == "auto" and sys.stderr.isatty()))
    bar = tqdm(total=every.steps, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True)
    say = bar.write if show_bar else (lambda line: print(line, flush=True))
    if strategy.is_rank0:
        write_status(run_dir, "running", step, checkpoints.saved_step)
    batches = run.batches(start_step=step)
    start_time, window = time.perf_counter(), LogWindow()
    loss_value = mean_loss = float("nan")
    try:
        batch_iter = iter(batches)
        while step < every.steps:
            heartbeat.beat(step + 1)
            wait_start = time.perf_counter()
            batch = next(batch_iter)
            data_wait_s = time.perf_counter() - wait_start
            lr = run.lr_at(step)
            set_learning_rates(run.optimizer, lr, batches.epoch_of(step))
            summarize = summaries is not None and every.summary_every and step % every.summary_every == 0
            with capture_activations(model) if summarize else contextlib.nullcontext({}) as activations:
                metrics = strategy.step(batch)
            step += 1
            maybe_inject(strategy.rank, step)
            if run.lookahead is not None:
                run.lookahead.after_step(model, step)
            run.ema.update(model, step)
            window.add(metrics, data_wait_s)
            log_now = step % every.log_every == 0 or step == every.steps
            # One host sync per step on CPU is free; on CUDA only when logging or summarising.
            if device.type == "cpu" or summarize or log_now:
                loss_value = metrics.loss.item()
                if not math.isfinite(loss_value):
                    last = directory.latest_step()
                    kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was written"
                    raise TrainingDiverged(f"loss is {loss_value} at step {step}; {kept} in {directory.directory}")
                loss_avg.update(loss_value)
                ce_avg.update(metrics.cross_entropy.item())
            if summarize:
                summaries.training_summaries(step, model, activations, batch.images)
                summaries.scalars({"learning_rate": lr, "total_loss (raw)": loss_value, "total_loss": loss_avg.value,
                                   "cross_entropy (raw)": metrics.cross_entropy.item(),
                                   "cross_entropy": ce_avg.value}, step)
            if log_now:
                record = window.record(step, strategy, loss_value, loss_avg, ce_avg, lr)
                mean_loss = record["loss"]
                if summaries is not None:
                    # status.json first: a reader who sees step S in metrics.jsonl finds status at S too.
                    write_status(run_dir, "running", step, checkpoints.saved_step)
                    summaries.append_jsonl("metrics.jsonl", record)
                    summaries.throughput(record)
                    say(log_line(record, strategy.world_size))
                bar.set_postfix(loss=f"{loss_avg.value:.3f}", refresh=False)
                window = LogWindow()
            bar.update(1)
            if on_step is not None and on_step(step, model, run.ema):
                break
            if step % every.checkpoint_every == 0 and step < every.steps:
                checkpoints.save(step)
        checkpoints.save(step)
        if strategy.is_rank0:
            write_status(run_dir, "finished", step, step)
            summaries.hparams(hparams_of(cfg), loss_avg.value)
    except BaseException as exc:
        if strategy.is_rank0:
            state = "interrupted" if isinstance(exc, (KeyboardInterrupt, Interrupted)) else "failed"
            with contextlib.suppress(OSError):  # e.g. the disk that is full
                write_status(run_dir, state, step, directory.latest_step(),
                             first_line(exc) if str(exc) else type(exc).__name__)
        raise
    finally:
        batches.close()
        bar.close()
        if summaries is not None:
            summaries.close()
    wall = time.perf_counter() - start_time
    return TrainResult(step=step, loss=mean_loss, wall_time_s=wall,
                       examples_per_sec=(step - start_step) * cfg.data.batch_size / max(wall, 1e-9),
                       steps_trained=step - start_step)
