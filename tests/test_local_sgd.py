"""Local SGD on real gloo: replicas are bitwise equal right after an average and apart
between averages; K=1 is synchronous data parallelism; warm-up steps are sync steps;
checkpoints hold the mean of the replicas; the CLI end to end with eval; one-line errors."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils import parameters_to_vector

from helpers import build, multitower
from multitower.cli import main
from multitower.models import build_model

GLOBAL_BATCH = 32
# (sync_every K, warm-up W, steps): averages after steps W+K, W+2K, ...
SCENARIOS = {"k2-w2": (2, 2, 6), "k1": (1, 0, 3)}
CHANNELS_LAST = "k1-channels-last"  # "k1" again with --channels-last: the fast path applies here too
CHECKPOINT_AFTER = 5  # in "k2-w2": a step between averages, where replicas differ


def flat(model) -> torch.Tensor:
    """All parameters as one vector in NCHW order, whatever their memory format."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_steps(data_dir, steps, checkpoint_after=None, **settings):
    """`steps` steps of the tutorial's network as train builds it; the flat parameters after
    each, and the comm_s and checkpointed model (flat) at `checkpoint_after`."""
    run = build(data_dir, batch_size=GLOBAL_BATCH, **settings)
    model, strategy = run.model, run.strategy
    out = {"params": [], "comm_s": [], "checkpoint": None, "after_checkpoint": None,
           "conv_channels_last": model.conv1.weight.is_contiguous(memory_format=torch.channels_last)}
    with run.batches() as batches:
        for step, batch in zip(range(1, steps + 1), batches):
            metrics = strategy.step(batch)
            out["params"].append(flat(model))
            out["comm_s"].append(metrics.comm_s)
            if step == checkpoint_after:
                mean = strategy.mean_of_replicas()  # a collective: every rank gets the mean
                out["checkpoint"] = torch.cat([mean[n].reshape(-1) for n, _ in model.named_parameters()])
                state = strategy.checkpoint_state({"ema": run.ema.state_dict(), "lookahead": None})  # a collective
                out["rank0_writes_the_mean"] = state is None or all(torch.equal(state["model"][n], t)
                                                                    for n, t in mean.items())
                out["after_checkpoint"] = flat(model)
    out["params"] = torch.stack(out["params"])
    out["conv_channels_last_at_end"] = model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    return out


def spawned_worker(rank, world_size, tmp_dir, data_dir):
    results = {}
    for name, (every, warmup, steps) in {**SCENARIOS, CHANNELS_LAST: SCENARIOS["k1"]}.items():  # one group each
        store = dist.FileStore(os.path.join(tmp_dir, f"store-{name}"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        results[name] = run_steps(data_dir, steps, checkpoint_after=CHECKPOINT_AFTER if name == "k2-w2" else None,
                                  strategy="local-sgd", workers=world_size, sync_every=every, local_sgd_warmup=warmup,
                                  channels_last=name == CHANNELS_LAST)
        dist.destroy_process_group()
    torch.save(results, os.path.join(tmp_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, synth_dir):
    tmp = tmp_path_factory.mktemp("local_sgd")
    mp.spawn(spawned_worker, nprocs=2, join=True, args=(2, str(tmp), str(synth_dir)))
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single_worker(synth_dir):
    """The trusted control: one worker, the whole global batch, plain SGD."""
    return run_steps(synth_dir, 6, channels_last=False)


def test_replicas_are_equal_right_after_an_average_and_apart_between(two_workers):
    rank0, rank1 = (w["k2-w2"] for w in two_workers)
    # K=2, W=2: steps 1-2 are synchronous, 3 and 5 local, averages after 4 and 6.
    for step in (1, 2, 4, 6):
        assert torch.equal(rank0["params"][step - 1], rank1["params"][step - 1]), f"replicas differ after step {step}"
    for step in (3, 5):
        apart = (rank0["params"][step - 1] - rank1["params"][step - 1]).abs().max().item()
        assert apart > 1e-4, f"replicas after local step {step} are {apart} apart: they did not train locally"
    # Averaging is communication, local steps are not (their hook returns at once).
    for step in (1, 2, 4, 6):
        assert rank0["comm_s"][step - 1] > 0


def test_checkpoint_holds_the_mean_of_the_replicas_and_leaves_them_alone(two_workers):
    rank0, rank1 = (w["k2-w2"] for w in two_workers)
    mean = (rank0["params"][CHECKPOINT_AFTER - 1] + rank1["params"][CHECKPOINT_AFTER - 1]) / 2
    assert torch.equal(rank0["checkpoint"], rank1["checkpoint"])
    assert rank0["rank0_writes_the_mean"] and rank1["rank0_writes_the_mean"]
    torch.testing.assert_close(rank0["checkpoint"], mean, rtol=0, atol=1e-7)
    # The mean is computed on a copy: the training replicas stay as they were.
    for rank in (rank0, rank1):
        assert torch.equal(rank["after_checkpoint"], rank["params"][CHECKPOINT_AFTER - 1])
    assert not torch.equal(rank0["params"][CHECKPOINT_AFTER - 1], rank0["checkpoint"])


def test_k1_and_warm_up_steps_match_synchronous_training(two_workers, single_worker):
    # With plain SGD, averaging weights after a step averages the gradients: 2 x 16
    # with K=1 is 1 x 32 up to rounding (~2e-5 after 5 steps, as in test_sync).
    for step in range(1, 4):
        for rank in (0, 1):
            torch.testing.assert_close(two_workers[rank]["k1"]["params"][step - 1],
                                       single_worker["params"][step - 1], rtol=1e-3, atol=5e-5,
                                       msg=f"K=1, rank {rank}, step {step}: differs from 1 x 32")
    for step in (1, 2):  # warm-up steps: gradients all-reduced, as in sync
        torch.testing.assert_close(two_workers[0]["k2-w2"]["params"][step - 1],
                                   single_worker["params"][step - 1], rtol=1e-3, atol=5e-5)
    torch.manual_seed(0)
    initial = parameters_to_vector(build_model("cifar10-tf").parameters())
    assert (single_worker["params"][-1] - initial).abs().max() > 1e-3, "weights did not move: vacuous comparison"
    # A local step is not a sync step: step 3 of k2-w2 differs from the control.
    assert (two_workers[0]["k2-w2"]["params"][2] - single_worker["params"][2]).abs().max() > 1e-4


def test_cli_trains_with_two_workers_and_eval_reads_the_run(capsys, synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    trained = multitower("train", "--data", str(synth_dir), "--run-dir", str(run_dir), "--steps", "4",
                         "--batch-size", str(GLOBAL_BATCH), "--summary-every", "0", "--log-every", "4",
                         "--strategy", "local-sgd", "--sync-every", "4", "--workers", "2")
    assert trained.returncode == 0, trained.stderr
    assert "step 4, loss =" in trained.stdout and "per rank:" in trained.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["world_size"] == 2 and 0 < records[-1]["comm_fraction"] <= 1
    assert json.loads((run_dir / "config.json").read_text())["parallel"]["options"] == {"sync_every": 4}
    # `multitower eval --once`, in this process (a second interpreter would only add start-up time).
    assert main(["eval", str(run_dir), "--once", "--device", "cpu"]) == 0
    assert "step 4: precision @ 1" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--sync-every", "0"], "--sync-every must be at least 1 step, got 0"),
    (["--local-sgd-warmup", "-1"], "--local-sgd-warmup must be 0 or more steps, got -1"),
    ([], "--strategy local-sgd runs several worker processes: pass --workers 2 or more"),
])
def test_bad_settings_are_one_line_errors(capsys, synth_dir, tmp_path, flags, message):
    code = main(["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--strategy", "local-sgd",
                 "--batch-size", "16", "--steps", "1", "--progress", "off", *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err


def test_dry_run(capsys, synth_dir, tmp_path):
    code = main(["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--strategy", "local-sgd",
                 "--workers", "2", "--sync-every", "8", "--dry-run"])
    assert code == 0 and "strategy local-sgd x 2" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_channels_last_trains_the_same_replicas(two_workers):
    """--channels-last reaches local SGD's replicas (conv weights in NHWC order) and changes
    only the summation order: the same weights as NCHW to float32 rounding, and the
    replicas equal after every average (K=1)."""
    for rank in range(2):
        assert two_workers[rank][CHANNELS_LAST]["conv_channels_last"]
        assert two_workers[rank][CHANNELS_LAST]["conv_channels_last_at_end"]  # still, after the averages
        assert not two_workers[rank]["k1"]["conv_channels_last"]
        assert torch.allclose(two_workers[rank][CHANNELS_LAST]["params"], two_workers[rank]["k1"]["params"],
                              rtol=1e-4, atol=1e-5)
    assert torch.equal(two_workers[0][CHANNELS_LAST]["params"], two_workers[1][CHANNELS_LAST]["params"])
