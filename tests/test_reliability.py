"""Faults injected on purpose: a killed worker, a hung worker, a full disk, corrupted
data files and malformed flags. Each must lose at most the work since the last
checkpoint and end with one clear line, never a hang or a traceback."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import start_multitower, wait_for_step
from multitower.cli import main
from multitower.train import checkpoint as checkpoint_module
from multitower.train.checkpoint import CheckpointDir

ARGS = ["--batch-size", "32", "--summary-every", "0", "--log-every", "5", "--checkpoint-every", "10"]


def multitower(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "multitower", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_killed_worker_is_restarted_and_the_result_is_bitwise_unchanged(synth_dir, tmp_path):
    common = ["train", "--data", str(synth_dir), "--steps", "20", "--workers", "2", *ARGS]
    crashed = multitower(*common, "--run-dir", str(tmp_path / "crashed"), "--max-restarts", "1",
                         env={"MULTITOWER_FAULT": "1:15:kill"})  # kill -9 rank 1 at step 15
    assert crashed.returncode == 0, crashed.stderr
    assert "resumed" in crashed.stdout and "at step 10 (restart 1 after a worker failure)" in crashed.stdout
    straight = multitower(*common, "--run-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    a = CheckpointDir(tmp_path / "crashed" / "checkpoints").load()
    b = CheckpointDir(tmp_path / "straight" / "checkpoints").load()
    assert a["step"] == b["step"] == 20
    for part in ("model", "ema"):
        for name, tensor in b[part].items():
            assert torch.equal(a[part][name], tensor), f"{part}/{name} differs after the crash and restart"


def test_killed_worker_without_restarts_fails_naming_it(synth_dir, tmp_path):
    result = multitower("train", "--data", str(synth_dir), "--steps", "20", "--workers", "2", *ARGS,
                        "--run-dir", str(tmp_path / "run"), env={"MULTITOWER_FAULT": "1:3:kill"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("multitower: error: worker rank 1 failed: killed by SIGKILL")


def test_hung_worker_ends_the_job_within_the_timeout_naming_it(synth_dir, tmp_path):
    start = time.monotonic()
    result = multitower("train", "--data", str(synth_dir), "--steps", "50", "--workers", "2", *ARGS,
                        "--run-dir", str(tmp_path / "run"), "--timeout", "8",
                        env={"MULTITOWER_FAULT": "1:4:hang"}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(r"multitower: error: rank 1 \(node 0, pid \d+\) stopped responding after starting step 4; "
                        r"rank 0 \(node 0, pid \d+\) gave up waiting for it \(--timeout 8 s\)", lines[0]), lines[0]
    assert time.monotonic() - start < 90


def test_a_worker_stuck_in_its_teardown_after_training_exits_within_the_timeout_saying_where(synth_dir, tmp_path):
    """Under torchrun (as on every node of a multi-node job), rank 1 never returns from its
    teardown (the "linger" fault): the run is trained and saved, so after --timeout it ends
    itself with status 0, its threads' stacks logged. Without the bound torchrun's agent
    waited for it for ever (across nodes: the other agents 300 s, then the job failed)."""
    run_dir = tmp_path / "run"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--log-dir", str(tmp_path / "torchrun-logs"), "-m", "multitower", "train", "--data", str(synth_dir),
         "--steps", "10", *ARGS, "--run-dir", str(run_dir), "--timeout", "5", "--progress", "off"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "MULTITOWER_FAULT": "1:0:linger"})
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 90
    log = run_dir / "logs" / "rank-1.log"
    assert f"multitower: warning: rank 1: its teardown after training hung for 5 s (every thread's stack: {log}); " \
           "it exits, its work saved" in result.stderr.splitlines(), result.stderr
    stacks = log.read_text()
    assert "still in its teardown 5 s after training ended" in stacks and "in maybe_linger" in stacks, stacks
    assert CheckpointDir(run_dir / "checkpoints").latest_step() == 10
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert not (run_dir / "logs" / "rank-0.log").exists()  # rank 0 ended in time: nothing to log


# torch.save on a full disk raises RuntimeError from its zip writer (torch 2.13), our own
# writes OSError: both must end in the same one line.
FULL_DISK = {"OSError": OSError(28, "No space left on device"),
             "RuntimeError": RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                                          "writing file data/3: file write failed")}


@pytest.mark.parametrize("raised", FULL_DISK, ids=list(FULL_DISK))
def test_full_disk_fails_the_save_cleanly(synth_dir, tmp_path, monkeypatch, capsys, raised):
    real_save = torch.save
    calls = {"n": 0}

    def save_until_disk_is_full(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            with open(path, "wb") as f:  # a partial write, then the device is full
                f.write(b"\0" * 1000)
            raise FULL_DISK[raised]
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_disk_is_full)
    run_dir = tmp_path / "run"
    code = main(["train", "--data", str(synth_dir), "--steps", "30", *ARGS, "--run-dir", str(run_dir),
                 "--progress", "off"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "could not write the checkpoint of step 20" in err[0] and "latest: step 10" in err[0]
    monkeypatch.undo()
    entries = CheckpointDir(run_dir / "checkpoints").entries()
    assert [e.step for e in entries] == [10]
    assert CheckpointDir(run_dir / "checkpoints").load()["step"] == 10
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["index.json", "step-00000010.pt"]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


RECORD = 3073  # CIFAR-10: 1 label byte + 3,072 image bytes


def copy_data(good, dst):
    dst.mkdir()
    for f in good.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst / "data_batch_1.bin"


def truncated(path):
    path.write_bytes(path.read_bytes()[:-100])


def empty(path):
    path.write_bytes(b"")


def label_out_of_range(path):
    data = bytearray(path.read_bytes())
    data[5 * RECORD] = 200
    path.write_bytes(bytes(data))


def random_bytes(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 7 * RECORD + 11, dtype=np.uint8).tobytes())


def missing_files(path):
    for f in path.parent.iterdir():
        f.unlink()


def bad_manifest(path):
    (path.parent / "multitower.json").write_text("{ not json")


def one_record_short(path):
    path.write_bytes(path.read_bytes()[:-RECORD])  # still whole records: only the manifest's count knows


@pytest.mark.parametrize("corrupt", [truncated, empty, label_out_of_range, random_bytes, missing_files,
                                     bad_manifest, one_record_short], ids=lambda f: f.__name__)
def test_corrupted_data_is_one_line_and_exit_2(synth_dir, tmp_path, capsys, corrupt):
    bad = tmp_path / "bad"
    corrupt(copy_data(synth_dir, bad))
    attempts = [["train", "--data", str(bad), "--dry-run"],
                ["train", "--data", str(bad), "--steps", "2", "--run-dir", str(tmp_path / "run")]]
    if any(bad.iterdir()):
        attempts.append(["data", "synth", "--out", str(bad)])  # a non-empty directory is never overwritten
    for argv in attempts:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("multitower: error:") and "Traceback" not in err, err
    # Nothing half-made that later looks valid: the refused run wrote no checkpoint.
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--steps", "many"], ["train", "--batch-size", "-4", "--data", "x"], ["train", "--lr", "fast"],
    ["train", "--device", "tpu"], ["train", "--grad-compression", "zip"], ["train", "--accumulate", "0", "--data", "x"],
    ["eval"], ["eval", "run", "--interval", "soon"], ["data"], ["data", "import"], ["data", "synth", "--out"],
    ["frobnicate"], ["train", "--timeout", "0", "--data", "x"], ["train", "--max-restarts", "-1", "--data", "x"],
    ["train", "--timeout", "0.000001", "--data", "x"], ["train", "--timeout", "0.000001", "--data", "x", "--workers", "2"],
])
def test_malformed_arguments_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("multitower: error:"), err


def test_a_record_file_truncated_while_training_is_one_line(synth_dir, tmp_path):
    """A memory-mapped file that shrinks under a running job would kill it with SIGBUS at
    the next read past its new end; the loader notices the change first."""
    data = tmp_path / "data"
    copy_data(synth_dir, data)
    run_dir = tmp_path / "run"
    job = start_multitower("train", "--data", data, "--run-dir", run_dir, "--steps", 2000, *ARGS, "--workers", 2)
    wait_for_step(job, run_dir, 10)
    with open(data / "data_batch_1.bin", "r+b") as f:
        f.truncate(100 * RECORD)
    _, stderr = job.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert job.returncode == 2 and len(lines) == 1, stderr
    assert re.fullmatch(rf"multitower: error: worker rank \d failed: {data / 'data_batch_1.bin'} changed size while "
                        rf"in use \(from [\d,]+ to 307,300 bytes: another program truncated or rewrote it\); "
                        rf"re-create the data set, then --resume \[newest checkpoint: step \d+; --resume continues\]",
                        lines[0]), lines[0]


def _listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the listening TCP sockets
    that processes `pids` hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass  # the process ended meanwhile
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.append(fields[1].split(":")[0])
    return addresses


def _process_tree(root: int) -> list[int]:
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        for task in os.listdir(f"/proc/{pid}/task") if os.path.exists(f"/proc/{pid}/task") else []:
            try:
                queue += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_every_listening_socket_of_a_job_is_on_loopback(synth_dir, tmp_path):
    """The launcher's rendezvous store, the workers' store and gloo's pairs all listen on
    127.0.0.1 (TCPStore alone would bind every interface)."""
    job = subprocess.Popen([sys.executable, "-m", "multitower", "train", "--data", str(synth_dir), "--workers", "2",
                            "--steps", "2000", *ARGS, "--run-dir", str(tmp_path / "run")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(seen) < 4:  # 2 stores + each worker's gloo listener
            time.sleep(0.5)
            seen = _listening_addresses(_process_tree(job.pid))
        assert len(seen) >= 4, f"the job's listening sockets did not all appear: {seen}"
        loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 in /proc's byte order
        assert set(seen) <= loopback, f"a socket listens beyond loopback: {seen}"
    finally:
        job.kill()
        job.wait()
