"""A run directory has one writer, a resume continues the same run, and what a crash
leaves behind is cleaned up: the lock, the resume rules, leftovers, early refusals."""

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from helpers import (children_of, error_lines, metrics, multitower, start_multitower, status, still_running,
                     wait_for_step)
from multitower.cli import main
from multitower.launch import AgentLogDir
from multitower.train.checkpoint import CheckpointDir
from multitower.train.run_dir import RunDirLock, is_locked, run_state

COMMON = ["--batch-size", "32", "--log-every", "5", "--checkpoint-every", "10"]


def train_args(synth_dir, run_dir, steps, *extra):
    return [str(a) for a in ["train", "--data", synth_dir, "--run-dir", run_dir, "--steps", steps, *COMMON, *extra]]


def test_a_second_train_on_a_busy_run_directory_is_refused(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    temp = tmp_path / "tmp"  # the launchers' temporary folder, to see what they leave there
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    first = start_multitower(*train_args(synth_dir, run_dir, 2000, "--workers", "2", "--summary-every", "0"),
                             env=env)
    try:
        wait_for_step(first, run_dir, 10)
        second = multitower(*train_args(synth_dir, run_dir, 3000, "--resume"), env=env)
        lines = error_lines(second.stderr)
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"multitower: error: {run_dir} is in use by another multitower train "
                                   f"(pid {first.pid} on "), lines[0]
        assert run_state(run_dir) == "running"
        workers = children_of(first.pid)
    finally:
        first.send_signal(signal.SIGKILL)  # the launcher dies without a word; its workers follow
        first.wait()
    # The workers end within seconds of their launcher (heartbeat.end_with_launcher), and
    # the kernel released the dead launcher's lock: a resume may go on, and no step is
    # recorded twice.
    assert not still_running(workers, timeout_s=15), "the killed launcher's workers lived on"
    wait_until_unlocked(run_dir)
    # The workers die with their launcher (torch sets their parent-death signal, SIGINT):
    # rank 0 says "interrupted" if it could, else a "running" that nobody holds reads "stopped".
    assert run_state(run_dir) in ("interrupted", "stopped")
    # The killed launcher could not remove its agent's folder; the next launch does, once
    # it is older than a live launcher's unlocked first moments.
    [left] = [p for p in temp.iterdir()]
    assert left.name.startswith(AgentLogDir.PREFIX), left
    old = time.time() - AgentLogDir.MIN_AGE_S - 1
    os.utime(left, (old, old))
    end = CheckpointDir(run_dir / "checkpoints").latest_step() + 20
    resumed = multitower(*train_args(synth_dir, run_dir, end, "--resume", "--workers", "2"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(temp.iterdir()), "the launchers left folders behind"
    # One writer at a time: the records rise, drop once where the resume went back to the
    # newest checkpoint, and rise again to the end.
    steps = [r["step"] for r in metrics(run_dir)]
    drops = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(drops) <= 1 and steps[-1] == end, steps
    assert status(run_dir)["state"] == "finished"


def wait_until_unlocked(run_dir, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while is_locked(run_dir):
        assert time.monotonic() < deadline, "the killed job's lock was never released"
        time.sleep(0.2)


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    run_dir = tmp_path / "run"
    held = RunDirLock(run_dir).acquire()
    with pytest.raises(Exception, match=rf"is in use by another multitower train \(pid {os.getpid()} on "):
        RunDirLock(run_dir).acquire()
    assert is_locked(run_dir)
    held.release()
    assert not is_locked(run_dir)
    with RunDirLock(run_dir):  # free again
        pass


def test_resume_takes_its_configuration_from_the_run(synth_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_args(synth_dir, run_dir, 20, "--summary-every", "50", "--lr", "0.05", "--seed", "3",
                           "--progress", "off")) == 0
    # Nothing retyped: every setting is the run's, not a default; --steps extends it.
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--steps", "30", "--progress", "off"]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["run"]["summary_every"], config["optim"]["lr"], config["run"]["seed"], config["run"]["steps"]) == \
        (50, 0.05, 3, 30)
    assert config["data"]["dir"] == str(synth_dir.resolve())  # absolute: eval works from anywhere
    capsys.readouterr()
    # A change to the trajectory is refused in one line naming the flags; harmless ones pass.
    for flags, named in ((["--lr", "0.1"], "--lr 0.05"), (["--batch-size", "64", "--seed", "4"], "--batch-size 32, --seed 3"),
                         (["--recipe", "fast"], "--recipe tutorial")):
        assert main(["train", "--run-dir", str(run_dir), "--resume", "--steps", "40", *flags]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and named in err[0], err
    other_data = tmp_path / "other"
    multitower("data", "synth", "--out", other_data, "--train", 256, "--val", 64)
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--steps", "40", "--data", str(other_data)]) == 2
    assert f"--data {synth_dir.resolve()}" in capsys.readouterr().err
    # Going backwards, or nowhere, trains nothing: one line, not "loss nan".
    for steps in ("10", "30"):
        assert main(["train", "--run-dir", str(run_dir), "--resume", "--steps", steps]) == 2
        assert capsys.readouterr().err.strip() == (
            f"multitower: error: {run_dir} is already at step 30; --steps {steps} leaves nothing to train: "
            f"pass --steps above 30 to extend it")
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--steps", "35", "--log-every", "7",
                 "--threads", "1", "--progress", "off"]) == 0
    # eval from another directory finds the data by the run's absolute path.
    evaluated = multitower("eval", run_dir.resolve(), "--once", cwd=tmp_path / "run" / "checkpoints")
    assert evaluated.returncode == 0 and "step 35: precision @ 1" in evaluated.stdout, evaluated.stderr


def test_what_a_crash_mid_write_leaves_is_removed_at_the_next_start(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert main(train_args(synth_dir, run_dir, 10, "--progress", "off")) == 0
    checkpoints = run_dir / "checkpoints"
    debris = [checkpoints / ".step-00000020.pt.tmp-4242", checkpoints / "step-00000020.pt",
              checkpoints / ".index.json.tmp-4242", run_dir / ".status.json.tmp-4242"]
    for path in debris:
        path.write_bytes(b"\0" * 1000)
    assert main(train_args(synth_dir, run_dir, 20, "--resume", "--checkpoint-every", "100", "--progress", "off")) == 0
    assert not any(path.exists() for path in debris if path.name != "step-00000020.pt")
    # step-20 is now the real final checkpoint, named by the index and loadable.
    assert CheckpointDir(checkpoints).load()["step"] == 20
    assert sorted(p.name for p in checkpoints.iterdir()) == ["index.json", "step-00000010.pt", "step-00000020.pt"]


def test_a_batch_larger_than_the_data_set_is_refused_before_the_run_directory_is_made(synth_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    for extra in ([], ["--workers", "2"], ["--dry-run"]):
        assert main(["train", "--data", str(synth_dir), "--run-dir", str(run_dir), "--batch-size", "4096", *extra]) == 2
        assert capsys.readouterr().err.strip() == (
            f"multitower: error: --batch-size 4096 is more than the 2048 training examples of "
            f"{synth_dir.resolve()}; use --batch-size 2048 or less")
        assert not run_dir.exists()


def test_a_launch_removes_the_agent_folders_of_launchers_that_are_gone_and_no_others(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = time.time() - AgentLogDir.MIN_AGE_S - 1
    dead = tmp_path / f"{AgentLogDir.PREFIX}dead"  # its launcher was SIGKILLed: nobody holds it
    (dead / "run-id" / "attempt_0" / "0").mkdir(parents=True)
    young = tmp_path / f"{AgentLogDir.PREFIX}young"  # made, not yet locked, by a launcher starting
    young.mkdir()
    live = AgentLogDir()  # a launcher running: its folder is locked
    other = tmp_path / "torchelastic_abc"  # not ours
    other.mkdir()
    for path in (dead, Path(live.path), other):
        os.utime(path, (old, old))
    try:
        mine = AgentLogDir()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [young.name, Path(live.path).name, Path(mine.path).name, other.name])
        mine.remove()
    finally:
        live.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, other.name])
