"""Faults across emulated nodes, done from outside as on real machines: a node's workers
killed (a crash there), a whole node killed with its launcher (the machine is gone), a
node's link cut at the switch for longer than --timeout. With --max-restarts the job goes
on from the newest checkpoint (with an elastic node range, on the nodes left); otherwise
it ends in one line naming the node, within --timeout plus a few seconds, and the run can
be resumed. The times from fault to verdict or recovery are printed (pytest -s).
Skipped, with the reason, where namespaces cannot be made."""

import re
import time

import pytest
import torch

from cluster_job import ClusterJob, cut_link, kill_node, kill_workers
from helpers import error_lines, metrics, multitower, start_multitower, status
from multitower.train.checkpoint import CheckpointDir
from test_cluster import namespaces, ours_left  # noqa: F401 - a fixture

CHECKPOINT_EVERY = 8
COMMON = ["--batch-size", "32", "--summary-every", "0", "--log-every", "2", "--checkpoint-every",
          str(CHECKPOINT_EVERY), "--workers", "2"]


def train_args(synth_dir, run_dir, steps, *extra):
    return ["train", "--data", synth_dir, "--run-dir", run_dir, "--steps", steps, *COMMON, *extra]


def wait_for_step(job: ClusterJob, run_dir, step: int, timeout_s: float = 180) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = metrics(run_dir)
        if records and records[-1]["step"] >= step:
            return time.monotonic()
        if job.process.poll() is not None:
            raise AssertionError(f"the job ended before step {step}: {job.err[-3:]} {job.out[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def trained_twice(run_dir) -> int:
    """Steps logged before a restart and logged again after it (metrics.jsonl keeps both)."""
    steps = [r["step"] for r in metrics(run_dir)]
    restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    return 0 if restart is None else steps[restart - 1] - steps[restart] + 2  # log every 2 steps


def test_a_node_killed_under_max_restarts_recovers(namespaces, synth_dir, tmp_path):
    """Node 1's worker is SIGKILLed after step 10: both nodes restart their workers (the same
    attempt number on both, cluster/agent.py), resume from step 8 and end bitwise equal to a
    run that never crashed; at most one checkpoint interval is trained twice."""
    run_dir = tmp_path / "crashed"
    job = ClusterJob("--nodes", "2", "--link", "1gbit", "--", *train_args(synth_dir, run_dir, 20, "--max-restarts", "1"))
    straight = start_multitower(*train_args(synth_dir, tmp_path / "straight", 20))
    try:
        wait_for_step(job, run_dir, 10)
        killed_at = time.monotonic()
        assert kill_workers(job, 1), "node 1 had no worker to kill"
        assert job.wait(timeout=300) == 0, "\n".join(job.err) + job.out[-3000:]
    finally:
        job.stop()
    resumed_at = job.first_line_at(r"\[node 0\] resumed .* at step \d+ \(restart 1 after a worker failure\)")
    assert resumed_at is not None, job.out[-3000:]
    print(f"node 1's workers killed: the job resumed {resumed_at - killed_at:.1f} s later")
    assert re.search(r"resumed .* at step (8|16) \(restart 1", job.out)
    assert 0 < trained_twice(run_dir) <= CHECKPOINT_EVERY, [r["step"] for r in metrics(run_dir)]
    assert status(run_dir)["state"] == "finished"
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    crashed, control = (CheckpointDir(path / "checkpoints").load() for path in (run_dir, tmp_path / "straight"))
    assert crashed["step"] == control["step"] == 20
    for name, tensor in control["model"].items():
        assert torch.equal(crashed["model"][name], tensor), f"{name} differs after the crash and restart"
    assert not ours_left()


@pytest.mark.slow
def test_a_node_killed_without_restarts_is_one_line_naming_it(namespaces, synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = ClusterJob("--nodes", "2", "--", *train_args(synth_dir, run_dir, 400))
    try:
        wait_for_step(job, run_dir, 10)
        killed_at = time.monotonic()
        pid = kill_workers(job, 1)[0]
        code = job.wait(timeout=120)
    finally:
        job.stop()
    print(f"node 1's workers killed: the job ended {time.monotonic() - killed_at:.1f} s later")
    assert code == 1 and error_lines("\n".join(job.err)) == [
        f"multitower: error: node 1 (198.18.0.101) failed with exit status 1: rank 1 (pid {pid}) was killed by "
        f"SIGKILL (out of memory, or killed)"], job.err
    assert status(run_dir)["state"] == "failed" and status(run_dir)["checkpoint_step"] == 8
    assert not ours_left()


@pytest.mark.slow
def test_a_lost_machine_with_an_elastic_node_range_goes_on_from_the_newest_checkpoint(namespaces, synth_dir,
                                                                                       tmp_path):
    """--min-nodes 1 (torchrun's --nnodes 1:2): node 1 is killed whole after step 10; node 0
    restarts alone, as a 1-worker job, from the checkpoint of step 8. (Node 0 itself cannot
    be the one lost: its agent serves the rendezvous.)"""
    run_dir = tmp_path / "run"
    job = ClusterJob("--nodes", "2", "--min-nodes", "1", "--", *train_args(synth_dir, run_dir, 20, "--max-restarts", "1"))
    try:
        wait_for_step(job, run_dir, 10)
        killed_at = time.monotonic()
        kill_node(job, 1)
        assert job.wait(timeout=300) == 0, "\n".join(job.err) + job.out[-3000:]
    finally:
        job.stop()
    assert "[cluster] node 1 (198.18.0.101) is lost (SIGKILL): the job goes on with the 1 node(s) left" in job.out
    resumed_at = job.first_line_at(r"\[node 0\] resumed .* at step (8|16) \(restart 1 after a worker failure\)")
    assert resumed_at is not None, job.out[-3000:]
    print(f"node 1 killed whole: node 0 resumed alone {resumed_at - killed_at:.1f} s later")
    records = metrics(run_dir)
    assert records[-1]["step"] == 20 and records[-1]["world_size"] == 1 and records[0]["world_size"] == 2
    assert 0 < trained_twice(run_dir) <= CHECKPOINT_EVERY
    assert CheckpointDir(run_dir / "checkpoints").load()["step"] == 20
    assert not ours_left()


@pytest.mark.slow
def test_a_lost_machine_without_an_elastic_range_is_one_line_naming_it(namespaces, synth_dir, tmp_path):
    """With --max-restarts node 0 restarts and waits for node 1 in the rendezvous: the job
    still ends at once, in one line, rather than after the rendezvous' 120 s."""
    run_dir = tmp_path / "run"
    job = ClusterJob("--nodes", "2", "--", *train_args(synth_dir, run_dir, 400, "--max-restarts", "1"))
    try:
        wait_for_step(job, run_dir, 10)
        killed_at = time.monotonic()
        kill_node(job, 1)
        code = job.wait(timeout=120)
    finally:
        job.stop()
    ended_s = time.monotonic() - killed_at
    print(f"node 1 killed whole: the job ended {ended_s:.1f} s later")
    assert code == 128 + 9 and error_lines("\n".join(job.err)) == [
        "multitower: error: node 1 (198.18.0.101) failed with SIGKILL: its launcher was killed with everything on "
        "the node (the machine went down?)"], job.err
    assert ended_s < 30
    assert not ours_left()


@pytest.mark.slow
def test_a_cut_link_stops_every_process_within_the_timeout_naming_the_node(namespaces, synth_dir, tmp_path):
    """Node 1's cable is pulled (its switch port down) for longer than --timeout: each side
    names the other as unreachable, every process stops within the timeout plus a few
    seconds, the newest checkpoint is intact, and --resume once the link is back (a new
    cluster) continues the run."""
    timeout_s = 10
    run_dir = tmp_path / "run"
    job = ClusterJob("--nodes", "2", "--link", "1gbit", "--",
                     *train_args(synth_dir, run_dir, 400, "--timeout", timeout_s))
    try:
        wait_for_step(job, run_dir, 10)
        cut_at = time.monotonic()
        cut_link(job, 1)
        code = job.wait(timeout=120)
    finally:
        job.stop()
    ended_s = time.monotonic() - cut_at
    print(f"node 1's link cut: every process stopped {ended_s:.1f} s later (--timeout {timeout_s})")
    lines = error_lines("\n".join(job.err))
    assert code == 1 and len(lines) == 1, job.err
    assert re.fullmatch(r"multitower: error: node 1 \(198\.18\.0\.101\) stopped responding, as node 0 reports: rank 1 "
                        r"\(node 1, pid \d+\) stopped responding during step \d+: no sign of life for 1\d s \(frozen, "
                        rf"killed, or its machine unreachable\); rank 0 \(node 0, pid \d+\) gave up waiting "
                        rf"\(--timeout {timeout_s} s\)", lines[0]), lines[0]
    # Node 1's own worker named node 0, whose store it lost, before anything stopped it.
    assert re.search(r"\[node 1\] multitower: error: rank 1 \(node 1, pid \d+\) lost the launcher's store at "
                     r"198\.18\.0\.100:\d+ \(node 0\) for 1\d s: node 0, or the link to it, is down", job.out), job.out
    assert ended_s < timeout_s + 12, f"{ended_s:.1f} s from the cut to the end"
    written = status(run_dir)
    assert written["state"] == "failed" and written["message"] == lines[0].removeprefix("multitower: error: ")
    newest = CheckpointDir(run_dir / "checkpoints").load()  # its checksum verified
    assert newest["step"] == written["checkpoint_step"] >= 8
    resumed = multitower("cluster", "--nodes", "2", "--link", "1gbit", "--",
                         *train_args(synth_dir, run_dir, newest["step"] + 4, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"[node 0] resumed {run_dir} at step {newest['step']}" in resumed.stdout
    assert CheckpointDir(run_dir / "checkpoints").load()["step"] == newest["step"] + 4
    assert not ours_left()
