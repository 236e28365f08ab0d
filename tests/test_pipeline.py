"""Pipeline parallelism on real gloo: one step of 2 stages x 4 micro-batches, and of 2
data-parallel replicas of 2 stages, equals one single-device step on the same global
batch (gradients and updated weights of every stage), checkpoints gather into the full
model's format, per-stage peak memory, balanced cuts, the memory budget, the schedule
trap, and the CLI end to end (with an exact resume)."""

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import build, multitower
from multitower.config import Config
from multitower.errors import UserError
from multitower.models import build_model
from multitower.models.cifar10_tf import LAYER_NAMES
from multitower.parallel.memory import SavedTensorPeak, check_memory_budget, training_state_bytes
from multitower.bench.flops import layer_macs
from multitower.parallel.pipeline import BusyClock, Pipeline, plan_stages, split_layers

GLOBAL_BATCH = 16
MICROBATCHES = 4


def first_batch(run):
    with run.batches() as batches:
        return next(iter(batches))


def pipeline_worker(rank, world_size, store_path, data_dir, out_dir, schedule, stages, microbatches):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    settings = dict(strategy="pipeline", workers=world_size, stages=stages, microbatches=microbatches,
                    schedule=schedule, batch_size=GLOBAL_BATCH)
    run = build(data_dir, **settings)
    model, strategy = run.model, run.strategy
    metrics = strategy.step(first_batch(run))
    run.ema.update(model, 1)
    out = {"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
           "params": {n: p.detach().clone() for n, p in model.named_parameters()},
           "loss": float(metrics.loss), "extra": metrics.extra, "examples": metrics.examples,
           "stage": strategy.stage_index, "replica": strategy.replica}
    state = strategy.checkpoint_state({"ema": run.ema.state_dict(), "lookahead": None})  # collectives: every rank
    state = {**state, "step": 1} if state is not None else None
    if rank == 0:
        out["state"], out["ema"] = state, state["ema"]
    # A fresh run (other initial weights) takes its stage's part of the full checkpoint.
    fresh = build(data_dir, seed=1, **settings)
    state_all = [state]
    dist.broadcast_object_list(state_all, src=0)
    own = fresh.strategy.load(state_all[0])
    out["reloaded"] = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    out["reloaded_ema"] = own["ema"]
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    fresh.strategy.close()


def run_pipeline(tmp_path, synth_dir, schedule="gpipe", stages=2, replicas=1, microbatches=MICROBATCHES):
    world = stages * replicas
    tag = f"{schedule}-{stages}x{replicas}"
    out = tmp_path / f"out-{tag}"
    out.mkdir()
    mp.spawn(pipeline_worker, nprocs=world, join=True,
             args=(world, str(tmp_path / f"store-{tag}"), str(synth_dir), str(out), schedule, stages, microbatches))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def single_step(synth_dir):
    run = build(synth_dir, channels_last=False, batch_size=GLOBAL_BATCH)
    model = run.model
    with SavedTensorPeak(model) as saved:  # measured as the pipeline measures each stage
        metrics = run.strategy.step(first_batch(run))
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "model": model.state_dict(), "loss": float(metrics.loss),
            "peak_bytes": saved.peak + training_state_bytes(model, run.optimizer)}


@pytest.fixture(scope="module")
def gpipe(tmp_path_factory, synth_dir):
    return run_pipeline(tmp_path_factory.mktemp("pipeline"), synth_dir)


def test_every_stage_matches_the_single_device_step(gpipe, single_step):
    seen = set()
    for rank, out in enumerate(gpipe):
        assert out["grads"], f"stage {rank} holds no parameters"
        for name, grad in out["grads"].items():
            torch.testing.assert_close(grad, single_step["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(out["params"][name], single_step["model"][name], rtol=1e-5, atol=1e-7, msg=name)
            seen.add(name)
    assert seen == set(single_step["grads"])  # every parameter lives on exactly one stage
    for out in gpipe:
        assert out["loss"] == pytest.approx(single_step["loss"], rel=1e-5)


def test_checkpoint_is_the_full_model_and_each_stage_reloads_its_part(gpipe, single_step):
    state = gpipe[0]["state"]
    assert list(state["model"]) == list(single_step["model"])  # same keys, same order
    for name, tensor in single_step["model"].items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-5, atol=1e-7)
    assert set(gpipe[0]["ema"]) == set(single_step["model"])  # the EMA covers the full model
    # The optimizer state loads into one optimizer over the full model, as a single run's does.
    full = build_model("cifar10-tf")
    torch.optim.SGD(full.parameters(), lr=0.1).load_state_dict(state["optimizer"])
    for out in gpipe:
        for name, tensor in out["reloaded"].items():
            torch.testing.assert_close(tensor, out["params"][name])


def test_bubble_and_parameter_bytes_are_reported(gpipe):
    extra = gpipe[0]["extra"]
    assert extra["bubble_fraction_theory"] == pytest.approx(1 / 5)  # (S-1)/(M+S-1), S=2, M=4
    idle = [extra["stage0_idle_fraction"], extra["stage1_idle_fraction"]]
    # Each stage must wait at some point of a GPipe step: stage 1 for stage 0's first
    # micro-batch forward, stage 0 for stage 1's first gradient. So neither is 0 or 1.
    assert all(0 < f < 1 for f in idle), idle
    assert extra["bubble_fraction"] == pytest.approx(sum(idle) / 2)
    total = sum(p.numel() * 4 for p in build_model("cifar10-tf").parameters())
    assert extra["stage0_param_bytes"] + extra["stage1_param_bytes"] == total


class _Sleepy(torch.nn.Module):
    """A linear layer whose forward takes `delay` seconds more than it needs to."""

    def __init__(self, delay: float):
        super().__init__()
        self.linear, self.delay = torch.nn.Linear(4, 4), delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.linear(x)


def test_busy_clock_counts_compute_and_not_the_waits_between():
    stage = _Sleepy(0.05)
    clock = BusyClock(stage)
    x = torch.randn(2, 4)
    for _ in range(2):  # two micro-batches, with a wait before each backward
        out = stage(x)
        time.sleep(0.1)  # waiting for the next stage's gradient: not busy
        out.sum().backward()
    busy = clock.take()
    assert 0.1 <= busy < 0.2, busy  # the two sleeping forwards (+ two tiny backwards)
    assert clock.take() == 0.0  # take() resets


def test_each_stage_peaks_below_one_device(gpipe, single_step):
    extra, single = gpipe[0]["extra"], single_step["peak_bytes"]
    peaks = [extra["stage0_peak_bytes"], extra["stage1_peak_bytes"]]
    # Stage 0 keeps the convolutions' activations, stage 1 most of the weights: each
    # holds well under one device's peak (measured: 0.55 and 0.45), and together about
    # one device's (GPipe keeps every micro-batch's activations until backward).
    assert all(0 < peak < 0.9 * single for peak in peaks), (peaks, single)
    assert 0.9 * single < sum(peaks) < 1.1 * single, (peaks, single)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, synth_dir):
    # 2 replicas x 2 stages, 2 micro-batches of 4 per replica: the same global batch of 16.
    return run_pipeline(tmp_path_factory.mktemp("replicas"), synth_dir, stages=2, replicas=2, microbatches=2)


def test_replicas_of_the_pipeline_match_the_single_device_step(replicated, single_step):
    assert [(out["stage"], out["replica"]) for out in replicated] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    seen = set()
    for out in replicated:
        for name, grad in out["grads"].items():
            torch.testing.assert_close(grad, single_step["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(out["params"][name], single_step["model"][name], rtol=1e-5, atol=1e-7, msg=name)
            seen.add(name)
        assert out["loss"] == pytest.approx(single_step["loss"], rel=1e-5)
        assert out["examples"] == GLOBAL_BATCH
    assert seen == set(single_step["grads"])
    # The gradient average leaves the replicas bitwise equal.
    for stage_out, twin in zip(replicated[:2], replicated[2:]):
        for name, tensor in stage_out["params"].items():
            assert torch.equal(tensor, twin["params"][name]), name
    extra = replicated[0]["extra"]
    assert extra["bubble_fraction_theory"] == pytest.approx(1 / 3)  # S=2, M=2
    # Per rank: the gradients of its stage all-reduced, plus activations and their gradients.
    assert extra["comm_bytes"] > (extra["stage0_param_bytes"] + extra["stage1_param_bytes"]) / 2


def test_replicated_checkpoint_comes_from_replica_0_and_reloads_everywhere(replicated, single_step):
    state = replicated[0]["state"]
    assert list(state["model"]) == list(single_step["model"])
    for name, tensor in single_step["model"].items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-5, atol=1e-7)
    assert set(replicated[0]["ema"]) == set(single_step["model"])
    for out in replicated:
        for name, tensor in out["reloaded"].items():
            assert torch.equal(tensor, out["params"][name]), name


def test_cuts_balance_parameters_or_follow_the_names():
    model = build_model("cifar10-tf")
    names = [n for n, _ in model.named_children()]
    counts = [sum(p.numel() for p in c.parameters()) for c in model.children()]
    assert names == list(LAYER_NAMES)
    # local3 alone is 83% of the model: the best 2-way cut puts it on the second stage.
    assert split_layers(names, counts, 2)[1][0] == "local3"
    assert split_layers(names, counts, 2, ("local4",))[1] == ["local4", "softmax_linear"]
    assert [len(g) for g in split_layers(names, counts, 5)] and len(split_layers(names, counts, 5)) == 5
    with pytest.raises(UserError, match="some stage would hold none"):
        split_layers(names, counts, 6)
    with pytest.raises(UserError, match="not a layer"):
        split_layers(names, counts, 2, ("local9",))
    with pytest.raises(UserError, match="no parameters"):
        split_layers(names, counts, 3, ("pool1", "conv2"))


def test_flop_weights_are_each_layers_forward_macs():
    model = build_model("cifar10-tf")
    assert tuple(model.conv1.weight.shape) == (64, 3, 5, 5) and tuple(model.conv2.weight.shape) == (64, 64, 5, 5)
    assert tuple(model.local3.weight.shape) == (384, 2304) and tuple(model.local4.weight.shape) == (192, 384)
    # conv1: 24x24x64 outputs of 5x5x3; conv2 after pool1: 12x12x64 of 5x5x64; the rest dense.
    expected = [24 * 24 * 64 * 75, 0, 0, 12 * 12 * 64 * 1600, 0, 0, 2304 * 384, 384 * 192, 192 * 10]
    assert layer_macs(model, 24) == expected
    assert layer_macs(build_model("cifar10-tf", width=2), 24)[3] == 12 * 12 * 128 * 3200


def test_flops_balance_isolates_conv2():
    model = build_model("cifar10-tf")
    # conv2 is ~80% of the MACs: S=2 can only put conv1 (and the free layers after it) apart.
    groups, macs = plan_stages(model, 2, balance="flops")
    assert groups == [["conv1", "pool1", "norm1"], ["conv2", "norm2", "pool2", "local3", "local4", "softmax_linear"]]
    assert model.training and not model.conv1._forward_hooks  # the probe ran on a copy
    assert groups[1] != plan_stages(model, 2)[0][1]  # params: local3 starts stage 1
    groups, _ = plan_stages(model, 3, balance="flops")
    assert groups == [["conv1", "pool1", "norm1"], ["conv2", "norm2", "pool2"], ["local3", "local4", "softmax_linear"]]
    # --cut still wins, and every stage must still hold parameters.
    assert plan_stages(model, 2, "local4", balance="flops")[0][1] == ["local4", "softmax_linear"]
    with pytest.raises(UserError, match="some stage would hold none"):
        plan_stages(model, 6, balance="flops")
    with pytest.raises(UserError, match="--balance must be one of params, flops, got 'compute'"):
        Pipeline.check(Config().with_values({"parallel.strategy": "pipeline", "parallel.workers": 2,
                                             "parallel.options.balance": "compute"}))


def test_memory_budget_refuses_the_whole_model_and_admits_a_stage():
    model = build_model("cifar10-tf", width=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    whole = training_state_bytes(model, optimizer)
    assert whole == 2 * 4 * sum(p.numel() for p in model.parameters())  # SGD: no slots
    with pytest.raises(UserError, match="over --max-memory-per-device"):
        check_memory_budget(model, optimizer, whole - 1, rank=0)
    del model.local3  # what pipeline stage 1 of 2 does not hold
    check_memory_budget(model, optimizer, whole // 2, rank=0)


def test_config_refuses_mismatched_workers():
    def check(workers, batch_size=128, microbatches=4):
        Pipeline.check(Config().with_values({"parallel.strategy": "pipeline", "parallel.workers": workers,
                                             "data.batch_size": batch_size, "parallel.options.stages": 2,
                                             "parallel.options.microbatches": microbatches}))
    with pytest.raises(UserError, match="--workers 2"):
        check(1)
    with pytest.raises(UserError, match="stages x replicas; got 3"):
        check(3, batch_size=129)
    check(4, 16, 4)  # 2 replicas x 4 micro-batches of 2
    with pytest.raises(UserError, match="--microbatches 16 x 2 replica"):
        check(4, 16, 16)


@pytest.mark.slow
def test_1f1b_matches_the_single_device_step(tmp_path, synth_dir, single_step):
    for out in run_pipeline(tmp_path, synth_dir, "1f1b"):
        for name, grad in out["grads"].items():
            torch.testing.assert_close(grad, single_step["grads"][name], rtol=1e-4, atol=1e-6, msg=name)


def trap_worker(rank, world_size, store_path, out_dir, loss_on_every_rank):
    """Two Linear stages with static shapes; the first stage's schedule gets the loss only
    when loss_on_every_rank (the library's rule: no loss_fn, no backward on that rank)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    torch.manual_seed(rank)
    layer = torch.nn.Linear(4, 4)
    # One micro-batch. Static examples must say requires_grad where a gradient crosses a
    # stage boundary (stage 0's output, stage 1's input), or no gradient is exchanged:
    # another way to end a step without gradients on stage 0.
    stage = PipelineStage(layer, rank, world_size, torch.device("cpu"),
                          input_args=torch.zeros(2, 4, requires_grad=rank > 0),
                          output_args=torch.zeros(2, 4, requires_grad=True))
    loss_fn = lambda out, target: torch.nn.functional.mse_loss(out, target)  # noqa: E731
    last = rank == world_size - 1
    schedule = ScheduleGPipe(stage, 2, loss_fn=loss_fn if (last or loss_on_every_rank) else None)
    try:
        schedule.step(*(() if rank else (torch.ones(4, 4),)), target=torch.zeros(4, 4) if last else None)
    except RuntimeError:
        # Without a loss the first stage never receives the gradient the last one sends;
        # it finishes its step and exits, so the last stage's send fails ("Connection closed").
        assert last and not loss_on_every_rank
    torch.save(layer.weight.grad is not None, os.path.join(out_dir, f"rank{rank}.pt"))
    if loss_on_every_rank:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("loss_on_every_rank", [False, True])
def test_library_trap_first_stage_needs_the_loss_fn_too(tmp_path, loss_on_every_rank):
    mp.spawn(trap_worker, nprocs=2, join=True, args=(2, str(tmp_path / "store"), str(tmp_path), loss_on_every_rank))
    has_grad = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert has_grad == [loss_on_every_rank, True]


@pytest.mark.slow
def test_cli_budget_refuses_one_device_then_trains_split_and_evaluates(synth_dir, tmp_path):
    # width 2: 4,258,314 parameters, 34.1 MB of weights + gradients (SGD keeps no slots);
    # the larger stage (local3..softmax_linear) needs 30.7 MB.
    common = ["train", "--data", str(synth_dir), "--batch-size", "16", "--summary-every", "0", "--width", "2",
              "--max-memory-per-device", "32000000", "--progress", "off"]
    refused = multitower(*common, "--run-dir", str(tmp_path / "one"), "--steps", "1")
    assert refused.returncode != 0 and "over --max-memory-per-device 32,000,000" in refused.stderr
    run_dir = tmp_path / "pipe"
    args = [*common, "--run-dir", str(run_dir), "--strategy", "pipeline", "--stages", "2", "--workers", "2",
            "--microbatches", "4", "--log-every", "3", "--checkpoint-every", "3"]
    trained = multitower(*args, "--steps", "6")
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["bubble_fraction_theory"] == pytest.approx(0.2)
    assert 0 <= records[-1]["bubble_fraction"] < 1 and records[-1]["stage1_param_bytes"] > 0
    resumed = multitower(*args, "--steps", "8", "--resume")
    assert resumed.returncode == 0 and "at step 6" in resumed.stdout, resumed.stderr[-3000:]
    evaluated = multitower("eval", str(run_dir), "--once")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "step 8: precision @ 1" in evaluated.stdout
    from multitower.train.checkpoint import CheckpointDir
    state = CheckpointDir(run_dir / "checkpoints").load()
    assert set(state["ema"]) == set(state["model"]) == set(build_model("cifar10-tf", width=2).state_dict())


@pytest.mark.slow
def test_cli_balance_flops_cuts_after_norm1_and_logs_the_shares(synth_dir, tmp_path):
    result = multitower("train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--steps", "1",
                        "--batch-size", "16", "--summary-every", "0", "--progress", "off", "--strategy", "pipeline",
                        "--stages", "2", "--workers", "2", "--microbatches", "2", "--balance", "flops")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline stage 0/2: conv1, pool1, norm1 (19,456 parameter bytes, 15% of the forward FLOPs)" in result.stdout
    assert "pipeline stage 1/2: conv2, norm2, pool2, local3, local4, softmax_linear (" in result.stdout
    assert "85% of the forward FLOPs)" in result.stdout


@pytest.mark.slow
def test_cli_replicated_pipeline_resumes_bitwise(synth_dir, tmp_path):
    """2 replicas x 2 stages through the launcher: 6 steps straight, and 3 + 3 with
    --resume, end in bitwise equal weights, moving averages and loss averages."""
    def run(run_dir, steps, *extra):
        result = multitower("train", "--data", str(synth_dir), "--run-dir", str(run_dir), "--steps", str(steps),
                            "--batch-size", "16", "--summary-every", "0", "--log-every", "3",
                            "--checkpoint-every", "3", "--progress", "off", "--strategy", "pipeline",
                            "--stages", "2", "--workers", "4", "--microbatches", "2", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return result
    run(tmp_path / "straight", 6)
    run(tmp_path / "split", 3)
    assert "at step 3" in run(tmp_path / "split", 6, "--resume").stdout
    from multitower.train.checkpoint import CheckpointDir
    straight = CheckpointDir(tmp_path / "straight" / "checkpoints").load()
    split = CheckpointDir(tmp_path / "split" / "checkpoints").load()
    assert straight["step"] == split["step"] == 6
    for part in ("model", "ema"):
        assert set(straight[part]) == set(build_model("cifar10-tf").state_dict())
        for name, tensor in straight[part].items():
            assert torch.equal(tensor, split[part][name]), f"{part}/{name} differs after resume"
    assert straight["loss_average"] == split["loss_average"]
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["world_size"] == 4 and records[-1]["comm_bytes"] > 0
    assert records[-1]["stage0_peak_bytes"] > 0 and records[-1]["stage1_peak_bytes"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--workers", "1"], "pass --workers 2"),
    (["--workers", "3"], "pass --workers 2, 4, ..."),
    (["--workers", "4", "--microbatches", "16"], "--microbatches 16 x 2 replica(s)"),
    (["--workers", "2", "--cut", "local9"], "--cut local9: not a layer"),
    (["--workers", "2", "--microbatches", "3"], "must divide evenly into --microbatches 3"),
    (["--workers", "6", "--stages", "6", "--batch-size", "12", "--microbatches", "2"], "some stage would hold none"),
])
def test_cli_errors_are_one_line_before_any_process_starts(capsys, synth_dir, tmp_path, extra, message):
    from multitower.cli import main
    code = main(["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--strategy", "pipeline",
                 "--stages", "2", "--batch-size", "16", *extra, "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
