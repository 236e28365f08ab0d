"""Hogwild on real processes: one model in shared memory (a write by one worker is seen
by the other with no communication), lock-free training that learns, the shared file
gone after the run (and after a killed worker), one-line refusals."""

import glob
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils import parameters_to_vector

from helpers import build, multitower
from multitower.cli import main
from multitower.config import Config, ParallelConfig
from multitower.data.loader import EvalBatches
from multitower.data.records import open_dataset
from multitower.errors import UserError
from multitower.models.cifar10_tf import tower_loss
from multitower.parallel.hogwild import FILE_PREFIX, SHARED_DIR, Hogwild

GLOBAL_BATCH = 32
STEPS = 40  # per worker: 80 lock-free updates of 16 examples on the shared model
LR = 0.05  # at 0.1, updates made stale by a loaded machine undid the learning (ce 2.52 once)
MARK = 7.0  # what rank 0 writes into a shared parameter for rank 1 to read


def shared_files() -> set[str]:
    return set(glob.glob(os.path.join(SHARED_DIR, FILE_PREFIX + "*")))


@torch.no_grad()
def cross_entropy_on(model, split) -> float:
    """Mean cross-entropy of `model` on the first 256 examples of `split`."""
    batch = next(iter(EvalBatches(split, batch_size=256, prefetch=0)))
    return torch.nn.functional.cross_entropy(model(batch.images), batch.labels).item()


def spawned_worker(rank, world_size, tmp_dir, data_dir):
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp_dir, "store"), world_size),
                            rank=rank, world_size=world_size)
    # A seed per rank: different initial weights on each rank, of which rank 0's must win.
    run = build(data_dir, strategy="hogwild", workers=world_size, batch_size=GLOBAL_BATCH, seed=rank, lr=LR)
    model, strategy = run.model, run.strategy
    out = {"file_left_after_wrap": os.path.exists(strategy.buffer_path),
           "initial": parameters_to_vector(model.parameters()).clone()}
    dataset = open_dataset(data_dir)
    out["ce_before"] = cross_entropy_on(model, dataset.split("val"))
    dist.barrier()  # nobody trains before both have measured the initial model

    # Rank 0 writes; rank 1 reads after a barrier, which orders but carries no data.
    bias = model.softmax_linear.bias
    original = bias[3].item()
    if rank == 0:
        with torch.no_grad():
            bias[3] = MARK
    dist.barrier()
    out["seen_bias"] = bias[3].item()
    dist.barrier()  # rank 1 has read: rank 0 puts the initial value back
    if rank == 0:
        with torch.no_grad():
            bias[3] = original
    dist.barrier()

    with run.batches() as batches:
        for _, batch in zip(range(STEPS), batches):
            strategy.step(batch)
    dist.barrier()  # both finished: the shared model is final
    out["final"] = parameters_to_vector(model.parameters()).clone()
    out["ce_after"] = cross_entropy_on(model, dataset.split("val"))
    checkpoint = strategy.checkpoint_state({"ema": run.ema.state_dict()})["model"]
    out["checkpoint_equal"] = all(torch.equal(v, model.state_dict()[k]) for k, v in checkpoint.items())
    strategy.close()
    torch.save(out, os.path.join(tmp_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, synth_dir):
    tmp = tmp_path_factory.mktemp("hogwild")
    before = shared_files()
    mp.spawn(spawned_worker, nprocs=2, join=True, args=(2, str(tmp), str(synth_dir)))
    left = shared_files() - before
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)], left


def test_the_model_is_shared_memory(two_workers):
    (rank0, rank1), _ = two_workers
    assert torch.equal(rank0["initial"], rank1["initial"]), "rank 1 does not see rank 0's initial weights"
    assert rank1["seen_bias"] == MARK, "rank 1 did not see the value rank 0 wrote"
    assert torch.equal(rank0["final"], rank1["final"])
    assert (rank0["final"] - rank0["initial"]).abs().max() > 1e-3
    assert rank0["checkpoint_equal"] and rank1["checkpoint_equal"]


def test_it_learns_and_leaves_no_file(two_workers):
    (rank0, _), left = two_workers
    # 80 updates at lr 0.05 took the generated data's cross-entropy from chance (2.31) to
    # 1.20-1.50 with the machine's two cores also running two or three busy loops (the
    # workers preempted mid-step, their updates stale). At lr 0.1 and 60 updates the same
    # load left it at 1.8-2.5. Asserted: a clear fall from chance.
    assert rank0["ce_before"] > 2.2 and rank0["ce_after"] < 1.9, (rank0["ce_before"], rank0["ce_after"])
    assert not rank0["file_left_after_wrap"], "the shared file outlived the mapping step"
    assert not left, f"shared files left behind: {left}"


def train_args(synth_dir, run_dir, steps, batch_size=GLOBAL_BATCH):
    return ["train", "--data", str(synth_dir), "--run-dir", str(run_dir), "--steps", str(steps),
            "--batch-size", str(batch_size), "--summary-every", "0", "--log-every", "10",
            "--strategy", "hogwild", "--workers", "2"]


def test_a_killed_worker_leaves_no_shared_file(synth_dir, tmp_path):
    before = shared_files()
    result = multitower(*train_args(synth_dir, tmp_path / "run", 50), env={"MULTITOWER_FAULT": "1:3:kill"})
    assert result.returncode == 2 and "worker rank 1 failed: killed by SIGKILL" in result.stderr, result.stderr
    assert not shared_files() - before


@pytest.mark.slow
def test_cli_run_learns_and_eval_reads_it(capsys, synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    before = shared_files()
    trained = multitower(*train_args(synth_dir, run_dir, 150, batch_size=64))
    assert trained.returncode == 0, trained.stderr
    assert not shared_files() - before
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # 150 lock-free steps: the running cross-entropy ended at 1.63 once on a loaded 2-core
    # machine (2026-12-01), where 1.5 had been the bound; chance is 2.30.
    assert records[-1]["cross_entropy"] < 1.8, f"cross-entropy {records[-1]['cross_entropy']} vs chance 2.30"
    assert main(["eval", str(run_dir), "--once", "--raw-weights", "--device", "cpu"]) == 0
    assert "step 150: precision @ 1" in capsys.readouterr().out


def test_refusals_are_one_line_user_errors(monkeypatch):
    with pytest.raises(UserError, match="use --device cpu"):
        Hogwild(ParallelConfig(), torch.device("cuda", 0), tower_loss)
    with pytest.raises(UserError, match="use --device cpu"):  # and before any process starts
        Hogwild.check(Config().with_values({"parallel.strategy": "hogwild", "parallel.device": "cuda"}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of two workers
    with pytest.raises(UserError, match="runs on one machine, but this job spans 4 workers of which 2 are here"):
        Hogwild(ParallelConfig(), torch.device("cpu"), tower_loss)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(UserError, match="pass --workers 2 or more"):
        Hogwild(ParallelConfig(), torch.device("cpu"), tower_loss)


def test_dry_run(capsys, synth_dir, tmp_path):
    code = main(["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--strategy", "hogwild",
                 "--workers", "2", "--dry-run"])
    assert code == 0 and "strategy hogwild x 2" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
