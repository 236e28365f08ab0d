"""Faults injected at (rank, step) into real multi-process jobs, for every strategy: a
process killed under --max-restarts is recovered from the newest checkpoint; a frozen
process (SIGSTOP) is named, within --timeout plus a few seconds; every failure ends in
one line on stderr; signals to the launcher stop the job in one line; status.json tells
the truth throughout. (Rank 2 is downpour's parameter server: its "step" is the pushes
it has applied, see multitower/faults.py.)"""

import re
import signal
import time

import pytest
import torch

from helpers import children_of, error_lines, multitower, start_multitower, status, still_running, wait_for_step
from multitower.procs import parent_of
from multitower.train.checkpoint import CheckpointDir

COMMON = ["--batch-size", "32", "--summary-every", "0", "--log-every", "4", "--checkpoint-every", "8"]
STRATEGIES = {
    "sync": ["--workers", "2"],
    "local-sgd": ["--strategy", "local-sgd", "--workers", "2", "--sync-every", "2"],
    "hogwild": ["--strategy", "hogwild", "--workers", "2"],
    "pipeline": ["--strategy", "pipeline", "--stages", "2", "--workers", "2"],
    "downpour": ["--strategy", "downpour", "--workers", "2", "--ps", "1"],
}
# (strategy, the rank a fault hits, its step): the workers at step 12, after the checkpoint of
# step 8; downpour's server after 24 pushes (2 workers push every step: about step 12).
VICTIMS = [("sync", 1, 12), ("local-sgd", 1, 12), ("hogwild", 1, 12), ("pipeline", 1, 12),
           ("downpour", 1, 12), ("downpour", 2, 24)]
IDS = [f"{strategy}-rank{rank}" for strategy, rank, _ in VICTIMS]


def train_args(synth_dir, run_dir, strategy, steps, *extra):
    return ["train", "--data", synth_dir, "--run-dir", run_dir, "--steps", steps, *COMMON,
            *STRATEGIES[strategy], *extra]


@pytest.mark.parametrize("strategy, rank, step", VICTIMS, ids=IDS)
def test_a_killed_process_is_restarted_from_the_newest_checkpoint(synth_dir, tmp_path, strategy, rank, step):
    crashed = multitower(*train_args(synth_dir, tmp_path / "crashed", strategy, 20, "--max-restarts", "1"),
                         env={"MULTITOWER_FAULT": f"{rank}:{step}:kill"})
    assert crashed.returncode == 0, crashed.stderr
    # The newest checkpoint before the fault or soon after it. Asynchronous workers do not wait
    # for a dead peer: the survivors may finish (checkpoint 20) before the launcher, which looks
    # every 0.5 s, sees the death; the restart then has nothing left to train, and says so.
    resumed = re.search(r"resumed .* at step (\d+) \(restart 1 after a worker failure\)", crashed.stdout)
    asynchronous = strategy in ("hogwild", "downpour") and rank == 1
    assert resumed and int(resumed[1]) in ((8, 16, 20) if asynchronous else (8, 16)), crashed.stdout
    if int(resumed[1]) == 20:
        assert "done: step 20, no step left to train" in crashed.stdout, crashed.stdout
    assert status(tmp_path / "crashed")["state"] == "finished"
    final = CheckpointDir(tmp_path / "crashed" / "checkpoints").load()
    assert final["step"] == 20
    if strategy in ("sync", "local-sgd", "pipeline"):  # deterministic: the crash changes nothing
        straight = multitower(*train_args(synth_dir, tmp_path / "straight", strategy, 20))
        assert straight.returncode == 0, straight.stderr
        control = CheckpointDir(tmp_path / "straight" / "checkpoints").load()
        for name, tensor in control["model"].items():
            assert torch.equal(final["model"][name], tensor), f"{name} differs after the crash and restart"


@pytest.mark.parametrize("strategy, rank, step", VICTIMS, ids=IDS)
def test_a_frozen_process_is_named_within_the_timeout(synth_dir, tmp_path, strategy, rank, step):
    """SIGSTOP freezes the whole process (its heartbeat thread too): the job must end
    within --timeout plus a few seconds, in one line naming that rank."""
    timeout_s = 6
    run_dir = tmp_path / "run"
    job = start_multitower(*train_args(synth_dir, run_dir, strategy, 2000, "--timeout", timeout_s),
                           env={"MULTITOWER_FAULT": f"{rank}:{step}:stop"})
    seen = wait_for_step(job, run_dir, 8)  # the fault comes after this record
    _, stderr = job.communicate(timeout=120)
    elapsed = time.monotonic() - seen
    lines = error_lines(stderr)
    assert job.returncode == 2 and len(lines) == 1, stderr
    assert re.search(rf"multitower: error: rank {rank} \(.*pid \d+\) stopped responding", lines[0]), lines[0]
    assert f"--timeout {timeout_s} s" in lines[0]
    # The verdict comes at the timeout, and the agent no longer waits 30 s for the frozen process.
    assert elapsed < timeout_s + 12, f"{elapsed:.1f} s from step 8 to the verdict"
    print(f"{strategy}: frozen rank {rank} named {elapsed:.1f} s after step 8 (--timeout {timeout_s})")
    assert status(run_dir)["state"] == "failed" and status(run_dir)["checkpoint_step"] >= 8


@pytest.mark.parametrize("strategy", ["sync", "downpour", "pipeline"])
def test_a_killed_process_without_restarts_is_one_line_naming_it(synth_dir, tmp_path, strategy):
    """The survivors' lost connections are no traceback: one line, the killed rank named."""
    result = multitower(*train_args(synth_dir, tmp_path / "run", strategy, 40), env={"MULTITOWER_FAULT": "1:10:kill"})
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("multitower: error: worker rank 1 failed: killed by SIGKILL"), lines[0]
    # (downpour's other worker trains on until the launcher stops it: a later checkpoint)
    newest = int(re.search(r"newest checkpoint: step (\d+); --resume continues", lines[0]).group(1))
    written = status(tmp_path / "run")
    assert newest >= 8 and written["state"] == "failed" and written["checkpoint_step"] == newest, written
    assert written["message"] == lines[0].removeprefix("multitower: error: ")


def test_a_bug_on_one_rank_is_one_line_and_its_traceback_is_logged(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = multitower(*train_args(synth_dir, run_dir, "sync", 40), env={"MULTITOWER_FAULT": "1:5:raise"})
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    log = run_dir / "logs" / "rank-1.log"
    assert lines[0] == (f"multitower: error: worker rank 1 failed: InjectedFault: injected fault on rank 1 at "
                        f"step 5 (an internal error; traceback in {log})"), lines[0]
    assert "Traceback (most recent call last)" in log.read_text() and "maybe_inject" in log.read_text()
    debug = multitower(*train_args(synth_dir, tmp_path / "debug", "sync", 40), "--debug",
                       env={"MULTITOWER_FAULT": "1:5:raise"})
    assert "Traceback (most recent call last)" in debug.stderr  # --debug prints it too


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_launcher_stops_the_job_in_one_line(synth_dir, tmp_path, sig):
    run_dir = tmp_path / "run"
    job = start_multitower(*train_args(synth_dir, run_dir, "sync", 2000))
    wait_for_step(job, run_dir, 12)
    sent = time.monotonic()
    job.send_signal(sig)
    _, stderr = job.communicate(timeout=60)
    lines = error_lines(stderr)
    assert job.returncode == 128 + sig and len(lines) == 1, stderr
    assert lines[0].startswith(f"multitower: error: interrupted by {sig.name}: the workers were stopped; "
                               f"the newest checkpoint is step 8; --resume continues"), lines[0]
    assert time.monotonic() - sent < 10
    assert status(run_dir)["state"] == "interrupted" and status(run_dir)["checkpoint_step"] == 8
    resumed = multitower(*train_args(synth_dir, run_dir, "sync", 16, "--resume"))
    assert resumed.returncode == 0 and "at step 8" in resumed.stdout, resumed.stderr


def test_sigterm_to_a_single_process_run_is_one_line(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = start_multitower("train", "--data", synth_dir, "--run-dir", run_dir, "--steps", 2000, *COMMON)
    wait_for_step(job, run_dir, 12)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM and error_lines(stderr) == [
        f"multitower: error: interrupted by SIGTERM; the newest checkpoint is step 8 in {run_dir}; "
        f"--resume continues"], stderr
    assert status(run_dir)["state"] == "interrupted" and status(run_dir)["checkpoint_step"] == 8


def test_status_advances_while_the_run_trains(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = start_multitower(*train_args(synth_dir, run_dir, "sync", 2000))
    try:
        wait_for_step(job, run_dir, 12)
        now = status(run_dir)
        assert now["state"] == "running" and now["step"] >= 12 and now["checkpoint_step"] == 8, now
        # Written by rank 0, a worker of the launcher (which holds the run directory's lock).
        assert parent_of(now["pid"]) == job.pid
    finally:
        job.kill()
        job.wait()


def test_workers_do_not_outlive_a_killed_launcher(synth_dir, tmp_path):
    """kill -9 of the launcher leaves it no chance to stop its workers: each ends within
    seconds of its parent (torch's SIGINT on the parent's death, else heartbeat's
    end_with_launcher), not after --timeout (300 s here): in CI a worker once slept on."""
    run_dir = tmp_path / "run"
    job = start_multitower(*train_args(synth_dir, run_dir, "sync", 2000))
    try:
        wait_for_step(job, run_dir, 4)
        workers = children_of(job.pid)
        assert len(workers) >= 2, workers  # (and torch's resource tracker, where there is one)
    finally:
        job.kill()
        job.wait()
    alive = still_running(workers, timeout_s=15)
    assert not alive, f"workers {alive} outlived their launcher by 15 s"
