"""The training loop (the tutorial's train()), the same for every strategy:
batch -> strategy.step -> learning rate -> moving average -> log -> summaries -> checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from multitower.data.loader import TrainBatches
from multitower.data.records import Dataset, open_dataset
from multitower.errors import Interrupted, PeerLost, PeerStopped, UserError, first_line, is_communication_error
from multitower.faults import maybe_inject
from multitower.models import model_from_config
from multitower.parallel import STRATEGIES
from multitower.parallel.memory import check_memory_budget
from multitower.files import atomic_write_bytes
from multitower.train.run_dir import HELD_BY_LAUNCHER, RunDirLock, check_run_dir, remove_leftovers, write_status
from multitower.train.checkpoint import CheckpointDir
from multitower.train.ema import ExponentialMovingAverage, LossAverage
from multitower.train.lookahead import Lookahead
from multitower.train.recipe import get_recipe, steps_for_epochs
from multitower.train.summaries import Summaries, capture_activations
from multitower.heartbeat import Heartbeat


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    step: int
    loss: float
    wall_time_s: float
    examples_per_sec: float


def resolve_device(name: str) -> torch.device:
    """The device of this process: with several GPUs, worker LOCAL_RANK takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def threads_per_worker(requested: int, workers: int) -> int:
    """Divide this machine's cores among the workers on it, so that they do not oversubscribe them."""
    if requested:
        return requested
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", workers))
    return max(1, len(os.sched_getaffinity(0)) // local_workers)


def describe_data(dataset: Dataset) -> str:
    kind = "GENERATED (synthetic) data, not CIFAR-10" if dataset.generated else f"{dataset.fmt.name} data"
    return f"data: {kind} from {dataset.root}"


def prepare_run_dir(run_dir: Path, cfg: Config) -> None:
    """With the run's lock held: the configuration written, a crash's debris removed."""
    remove_leftovers(run_dir)
    atomic_write_bytes(run_dir / "config.json", cfg.to_json().encode())


def check_batch_fits(cfg: Config, train_examples: int) -> None:
    if cfg.data.batch_size > train_examples:
        raise UserError(f"--batch-size {cfg.data.batch_size} is more than the {train_examples} training "
                        f"examples of {cfg.data.dir}; use --batch-size {train_examples} or less")


def check_steps_ahead(cfg: Config, checkpoint_step: int | None, restarted: bool) -> None:
    """A resume must have steps left to train (a restart may find the run already done)."""
    if checkpoint_step is None or not cfg.run.resume:
        return
    if cfg.run.steps < checkpoint_step or (cfg.run.steps == checkpoint_step and not restarted):
        raise UserError(f"{cfg.run.run_dir} is already at step {checkpoint_step}; --steps {cfg.run.steps} "
                        f"leaves nothing to train: pass --steps above {checkpoint_step} to extend it")


def process_label(cfg: Config) -> str:
    """What this process is, for messages naming it (roles are fixed where processes start)."""
    rank = int(os.environ.get("RANK", 0))
    if cfg.parallel.strategy == "downpour" and rank >= cfg.parallel.workers:
        return f"parameter server {rank - cfg.parallel.workers}"
    return ""


def resolve_steps(cfg: Config, train_examples: int) -> Config:
    """cfg with run.steps set from run.epochs when that is given (else unchanged)."""
    if not cfg.run.epochs:
        return cfg
    steps = steps_for_epochs(cfg.run.epochs, train_examples, cfg.data.batch_size)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=steps))


def train(cfg: Config, on_step=None) -> TrainResult:
    """Train as cfg says. on_step(step, model, ema) -> bool, if given, is called after every
    step (after the moving average, before any checkpoint); True ends the run there, with a
    final checkpoint (the time-to-accuracy benchmark evaluates and stops through it; one process).

    A failure caused by another process of the job (a collective that timed out or lost its
    peer) is raised as PeerStopped naming that process, or PeerLost."""
    cfg.validate()
    if cfg.data.dir:  # the run names its data absolutely: eval and resume work from anywhere
        cfg = cfg.with_values({"data.dir": str(Path(cfg.data.dir).resolve())})
    restarted = current_attempt() > 0
    if restarted:
        # The elastic agent restarted the worker group after a failure: continue the
        # run from its last checkpoint rather than refusing the existing run directory.
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))
    heartbeat = Heartbeat.from_environment(cfg.parallel.timeout_s).start(process_label(cfg))
    try:
        result = _train(cfg, on_step, heartbeat, restarted)
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


def _train(cfg: Config, on_step, heartbeat: Heartbeat, restarted: bool) -> TrainResult:
    device = resolve_device(cfg.parallel.device)
    torch.set_num_threads(threads_per_worker(cfg.parallel.threads, cfg.parallel.workers))
    dataset = open_dataset(cfg.data.dir, label=cfg.data.label)
    train_split = dataset.split("train")
    check_batch_fits(cfg, len(train_split))
    cfg = resolve_steps(cfg, len(train_split))
    # Model, input pipeline, loss, optimizer, schedule and eval logits (train/recipe.py).
    recipe = get_recipe(cfg.optim.recipe)
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by the launcher in each worker
    strategy_name = cfg.parallel.resolved_strategy(world_size)
    if strategy_name not in STRATEGIES:
        raise UserError(f"unknown --strategy {strategy_name!r}; known: auto, {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[strategy_name](cfg.parallel, device, recipe.make_loss(cfg))
    if not strategy.trains:
        # A process with another role (downpour's parameter servers) serves the workers
        # until they are done; it reads no data and writes nothing.
        start_time = time.perf_counter()
        strategy.serve()
        return TrainResult(step=0, loss=float("nan"), wall_time_s=time.perf_counter() - start_time,
                           examples_per_sec=0.0)
    run_dir = Path(cfg.run.run_dir)
    checkpoints = CheckpointDir(run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
    check_steps_ahead(cfg, checkpoints.latest_step() if cfg.run.resume else None, restarted)
    lock = None
    if strategy.is_rank0:
        check_run_dir(run_dir, cfg)
        if os.environ.get(HELD_BY_LAUNCHER) != str(run_dir.resolve()):
            lock = RunDirLock(run_dir).acquire()  # rank 0 is the run's one writer
        print(describe_data(dataset), flush=True)
        prepare_run_dir(run_dir, cfg)
    try:
        return _train_locked(cfg, on_step, heartbeat, device, dataset, train_split, recipe, strategy, checkpoints)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg, on_step, heartbeat, device, dataset, train_split, recipe, strategy,
                  checkpoints) -> TrainResult:
    run_dir = Path(cfg.run.run_dir)
    torch.manual_seed(cfg.run.seed)  # the initial weights depend on the seed alone
    model = model_from_config(cfg.model, num_classes=dataset.fmt.num_classes).to(device)
    recipe.prepare_model(model, train_split, recipe)  # e.g. fit the whitening layer (deterministic)
    optimizer = recipe.make_optimizer(model, cfg)
    strategy.wrap(model, optimizer)
    # After wrap: a pipeline stage holds only its own layers.
    check_memory_budget(model, optimizer, cfg.parallel.max_memory_per_device, strategy.rank)
    ema = ExponentialMovingAverage(model, cfg.optim.ema_decay)
    # A recipe's Lookahead: on every process's own weights, or rank 0's alone where the
    # processes share one set (hogwild).
    lookahead = None
    if recipe.lookahead is not None and (strategy.is_rank0 or not strategy.shares_parameters):
        steps_per_epoch = steps_for_epochs(1, len(train_split), cfg.data.batch_size)
        lookahead = Lookahead(recipe.lookahead, cfg.run.steps, steps_per_epoch)
    loss_avg, ce_avg = LossAverage(cfg.optim.loss_average_decay), LossAverage(cfg.optim.loss_average_decay)

    step = 0
    if cfg.run.resume and checkpoints.entries():
        state = checkpoints.load(map_location=device)
        strategy.load_state_dict(state)
        # Where each process kept its own (local-sgd), its own moving average and Lookahead.
        own = strategy.own_replica(state) or {"ema": state["ema"], "lookahead": state.get("lookahead")}
        ema.load_state_dict(own["ema"])
        if lookahead is not None:
            lookahead.load_state_dict(own.get("lookahead"))
        loss_avg.value, ce_avg.value = state["loss_average"], state["cross_entropy_average"]
        torch.set_rng_state(state["rng"])
        step = state["step"]
        if strategy.is_rank0:
            restarts = current_attempt()
            after = f" (restart {restarts} after a worker failure)" if restarts else ""
            print(f"resumed {run_dir} at step {step}{after}", flush=True)

    lr_at = recipe.make_schedule(cfg, len(train_split))
    summaries = Summaries(run_dir) if strategy.is_rank0 else None
    show_bar = strategy.is_rank0 and (cfg.run.progress == "on" or (cfg.run.progress == "auto" and sys.stderr.isatty()))
    bar = tqdm(total=cfg.run.steps, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True)
    say = bar.write if show_bar else (lambda line: print(line, flush=True))

    def save_checkpoint() -> None:
        nonlocal saved_step
        state = strategy.state_dict()  # on every rank: a strategy may need a collective to gather it
        ema_state = strategy.gather_named_tensors(ema.state_dict())  # a collective where ranks hold parts
        lookahead_state = lookahead.state_dict() if lookahead is not None else None
        replicas = strategy.replica_states({"ema": ema.state_dict(), "lookahead": lookahead_state})  # collective
        if strategy.is_rank0:
            if lookahead is not None:
                state = {**state, "lookahead": lookahead_state}
            if replicas is not None:
                state = {**state, "replicas": replicas}
            checkpoints.save({**state, "ema": ema_state, "rng": torch.get_rng_state(),
                              "loss_average": loss_avg.value, "cross_entropy_average": ce_avg.value,
                              "config": cfg.to_json(), "model_name": cfg.model.name,
                              "data_position": {"global_step": step, "global_batch_size": cfg.data.batch_size,
                                                "seed": cfg.run.seed}}, step)
            saved_step = step

    saved_step = checkpoints.latest_step() if strategy.is_rank0 else None
    if strategy.is_rank0:
        write_status(run_dir, "running", step, saved_step)
    batches = TrainBatches(train_split, global_batch_size=cfg.data.batch_size, rank=strategy.rank,
                           world_size=strategy.world_size, seed=cfg.run.seed, start_step=step,
                           prefetch=cfg.data.prefetch, device=device, augment=recipe.augment,
                           augment_on=cfg.data.augment_on)
    start_time = window_start = time.perf_counter()
    start_step, window_steps, window_examples, data_wait_s, comm_s = step, 0, 0, 0.0, 0.0
    window_extra: dict[str, list[float]] = {}  # StepMetrics.extra: key -> values this window
    loss_value = mean_loss = float("nan")
    try:
        batch_iter = iter(batches)
        while step < cfg.run.steps:
            heartbeat.beat(step + 1)
            wait_start = time.perf_counter()
            batch = next(batch_iter)
            data_wait_s += time.perf_counter() - wait_start
            lr = lr_at(step)
            epoch = batches.epoch_of(step)
            for group in optimizer.param_groups:  # a recipe may scale a group's lr (fast: BN shifts)
                done = epoch >= group.get("train_epochs", math.inf)  # (fast: the whitening bias)
                group["lr"] = 0.0 if done else lr * group.get("lr_scale", 1.0)
            summarize = summaries is not None and cfg.run.summary_every and step % cfg.run.summary_every == 0
            with capture_activations(model) if summarize else contextlib.nullcontext({}) as activations:
                metrics = strategy.step(batch)
            step += 1
            maybe_inject(strategy.rank, step)
            if lookahead is not None:
                lookahead.after_step(model, step)
            ema.update(model, step)
            window_steps += 1
            window_examples += metrics.examples
            comm_s += metrics.comm_s
            for key, value in metrics.extra.items():
                window_extra.setdefault(key, []).append(value)

            # One host sync per step on CPU is free; on CUDA only when logging or summarising.
            if device.type == "cpu" or summarize or step % cfg.run.log_every == 0 or step == cfg.run.steps:
                loss_value = metrics.loss.item()
                if not math.isfinite(loss_value):
                    last = checkpoints.latest_step()
                    kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was written"
                    raise TrainingDiverged(f"loss is {loss_value} at step {step}; {kept} in {checkpoints.directory}")
                loss_avg.update(loss_value)
                ce_avg.update(metrics.cross_entropy.item())

            if summarize:
                summaries.training_summaries(step, model, activations, batch.images)
                summaries.scalars({"learning_rate": lr, "total_loss (raw)": loss_value,
                                   "total_loss": loss_avg.value,
                                   "cross_entropy (raw)": metrics.cross_entropy.item(),
                                   "cross_entropy": ce_avg.value}, step)
            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                elapsed = time.perf_counter() - window_start
                # Collectives: every rank takes part, rank 0 writes. Throughput per rank
                # shows a straggler; the loss is the mean over all shards of the batch.
                rank_examples_per_sec = strategy.all_ranks(window_examples / strategy.world_size / elapsed)
                rank_comm_fraction = strategy.all_ranks(comm_s / elapsed)
                mean_loss = sum(strategy.all_ranks(loss_value)) / strategy.world_size
                record = {"step": step, "loss": mean_loss, "loss_avg": loss_avg.value,
                          "cross_entropy": ce_avg.value, "lr": lr,
                          "examples_per_sec": window_examples / elapsed, "sec_per_batch": elapsed / window_steps,
                          "data_wait_fraction": data_wait_s / elapsed,
                          "comm_fraction": max(rank_comm_fraction),
                          "rank_examples_per_sec": rank_examples_per_sec,
                          "world_size": strategy.world_size, "wall_time": time.time(),
                          **{key: sum(values) / len(values) for key, values in window_extra.items()}}
                if summaries is not None:
                    summaries.append_jsonl("metrics.jsonl", record)
                    write_status(run_dir, "running", step, saved_step)
                    line = (f"step {step}, loss = {mean_loss:.2f} (avg {loss_avg.value:.2f}) "
                            f"({record['examples_per_sec']:.1f} examples/sec; {record['sec_per_batch']:.3f} sec/batch)")
                    if strategy.world_size > 1:
                        line += (f" [per rank: {', '.join(f'{r:.0f}' for r in rank_examples_per_sec)} examples/sec;"
                                 f" comm {100 * record['comm_fraction']:.0f}% of step time]")
                    say(line)
                window_start, window_steps, window_examples, data_wait_s, comm_s = time.perf_counter(), 0, 0, 0.0, 0.0
                window_extra = {}
            bar.update(1)
            if on_step is not None and on_step(step, model, ema):
                break
            if step % cfg.run.checkpoint_every == 0 and step < cfg.run.steps:
                save_checkpoint()
        save_checkpoint()
        if strategy.is_rank0:
            write_status(run_dir, "finished", step, step)
    except BaseException as exc:
        if strategy.is_rank0:
            state = "interrupted" if isinstance(exc, (KeyboardInterrupt, Interrupted)) else "failed"
            with contextlib.suppress(OSError):  # e.g. the disk that is full
                write_status(run_dir, state, step, checkpoints.latest_step(), first_line(exc) if str(exc) else type(exc).__name__)
        raise
    finally:
        batches.close()
        bar.close()
        if summaries is not None:
            summaries.close()
        strategy.close()
    wall = time.perf_counter() - start_time
    return TrainResult(step=step, loss=mean_loss, wall_time_s=wall,
                       examples_per_sec=(step - start_step) * cfg.data.batch_size / max(wall, 1e-9))
