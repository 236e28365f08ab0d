"""Checkpoints: atomic, checksummed, never executing code, falling back past a bad one."""

import json
import os
import pickle

import pytest
import torch

from multitower.errors import UserError
from multitower.train import checkpoint as ckpt_mod
from multitower.train.checkpoint import CheckpointDir, load_checkpoint_file


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "config": "{}"}


def test_round_trip_and_keep_last_k(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpts.save(state(step), step)
    assert [e.step for e in ckpts.entries()] == [20, 30]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step-00000020.pt", "step-00000030.pt"]
    loaded = ckpts.load()
    assert loaded["step"] == 30 and torch.equal(loaded["model"]["w"], torch.full((3,), 30.0))
    assert ckpts.load(20)["step"] == 20
    with pytest.raises(UserError, match="no checkpoint of step 10"):
        ckpts.load(10)


def test_corrupted_newest_falls_back_to_previous(tmp_path, capsys):
    ckpts = CheckpointDir(tmp_path, keep=3)
    ckpts.save(state(1), 1)
    newest = ckpts.save(state(2), 2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle
    newest.write_bytes(bytes(data))
    assert ckpts.load()["step"] == 1
    assert "corrupted" in capsys.readouterr().out
    with pytest.raises(UserError, match="corrupted"):
        ckpts.load(2)


def test_truncated_newest_falls_back(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=3)
    ckpts.save(state(1), 1)
    newest = ckpts.save(state(2), 2)
    newest.write_bytes(newest.read_bytes()[:100])
    assert ckpts.load()["step"] == 1


def test_crash_while_writing_keeps_previous_latest(tmp_path, monkeypatch):
    ckpts = CheckpointDir(tmp_path, keep=3)
    ckpts.save(state(1), 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device; earlier checkpoints are intact \\(latest: step 1\\)"):
        ckpts.save(state(2), 2)
    monkeypatch.undo()
    assert [e.step for e in ckpts.entries()] == [1]
    assert ckpts.load()["step"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "temporary file left behind"


def test_crash_between_file_and_index_leaves_previous_latest(tmp_path, monkeypatch):
    ckpts = CheckpointDir(tmp_path, keep=3)
    ckpts.save(state(1), 1)
    real_replace = os.replace

    def fail_on_index(src, dst):
        if str(dst).endswith("index.json"):
            raise OSError(5, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", fail_on_index)
    with pytest.raises(UserError, match="could not write the checkpoint of step 2"):
        ckpts.save(state(2), 2)
    monkeypatch.undo()
    assert ckpts.load()["step"] == 1
    assert not (tmp_path / "step-00000002.pt").exists(), "an unindexed checkpoint file was left behind"


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_never_executes_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": Exploit()}, path)
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint_file(path)
    path.write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint_file(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="not a multitower checkpoint"):
        load_checkpoint_file(path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable") as err:
        CheckpointDir(tmp_path).entries()
    assert "\n" not in str(err.value)


def test_index_lists_checksums(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(state(1), 1)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["checkpoints"][0]["sha256"]) == 64
