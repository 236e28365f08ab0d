"""The single-worker training loop: exact resume, divergence, run-directory safety,
summaries, and that it learns."""

import dataclasses
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from multitower.config import Config, DataConfig, RunConfig
from multitower.errors import UserError
from multitower.train.checkpoint import CheckpointDir
from multitower.train.loop import TrainingDiverged, train
from multitower.train.recipe import TUTORIAL


def make_cfg(data_dir, run_dir, steps, **run_kwargs) -> Config:
    run = dict(run_dir=str(run_dir), steps=steps, log_every=10, summary_every=0,
               checkpoint_every=1000, progress="off")
    run.update(run_kwargs)
    return Config(data=DataConfig(dir=str(data_dir), batch_size=16), run=RunConfig(**run))


def final_state(run_dir) -> dict:
    return CheckpointDir(run_dir / "checkpoints").load()


def test_resume_is_bitwise_equal_to_a_straight_run(synth_dir, tmp_path):
    train(make_cfg(synth_dir, tmp_path / "straight", 100))
    train(make_cfg(synth_dir, tmp_path / "split", 50))
    train(make_cfg(synth_dir, tmp_path / "split", 100, resume=True))
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert straight["step"] == resumed["step"] == 100
    for part in ("model", "ema"):
        for name, tensor in straight[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}/{name} differs after resume"
    assert straight["loss_average"] == resumed["loss_average"]


def test_existing_run_is_never_overwritten(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(make_cfg(synth_dir, run_dir, 2))
    with pytest.raises(UserError, match="already holds a run"):
        train(make_cfg(synth_dir, run_dir, 4))
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UserError, match="not a multitower run directory"):
        train(make_cfg(synth_dir, other, 2))
    assert (other / "holiday.jpg").read_bytes() == b"not ours"


def test_resume_refuses_a_run_of_another_model(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(make_cfg(synth_dir, run_dir, 2))
    cfg = make_cfg(synth_dir, run_dir, 4, resume=True)
    cfg.model.width = 2
    with pytest.raises(UserError, match="holds a run of model"):
        train(cfg)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = TUTORIAL.loss  # the tutorial recipe's tower_loss

    def poisoned(model, logits, labels):
        calls["n"] += 1
        total, ce = real_loss(model, logits, labels)
        return (total * float("nan"), ce) if calls["n"] == 7 else (total, ce)

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="loss is nan at step 7; the last good checkpoint is step 6"):
        train(make_cfg(synth_dir, run_dir, 20, checkpoint_every=2), recipe=dataclasses.replace(TUTORIAL, loss=poisoned))
    entries = CheckpointDir(run_dir / "checkpoints").entries()
    assert [e.step for e in entries][-1] == 6
    state = final_state(run_dir)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


def test_summaries_and_metrics_are_written(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(make_cfg(synth_dir, run_dir, 20, summary_every=10, checkpoint_every=10))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    for key in ("loss", "loss_avg", "lr", "examples_per_sec", "sec_per_batch", "data_wait_fraction"):
        assert key in records[0]
    events = EventAccumulator(str(run_dir / "events"), size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for scalar in ("learning_rate", "total_loss", "total_loss (raw)", "cross_entropy", "conv1/sparsity"):
        assert scalar in tags["scalars"], scalar
    for histogram in ("conv1/activations", "local3/weight", "local3/weight/gradients"):
        assert histogram in tags["histograms"], histogram
    assert "images" in tags["images"]
    # Speed and where the time went, at every log line, beside the tutorial's summaries.
    for scalar in ("throughput/examples_per_sec", "throughput/comm_fraction", "throughput/data_wait_fraction"):
        assert [e.step for e in events.Scalars(scalar)] == [10, 20], scalar
    # The run's settings and results for TensorBoard's HParams view, in the same run.
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == 0.1 and start.hparams["model.name"].string_value == "cifar10-tf"
    assert "run.run_dir" not in start.hparams  # where it wrote is no setting to compare runs by
    assert [e.step for e in CheckpointDir(run_dir / "checkpoints").entries()] == [10, 20]
    assert json.loads((run_dir / "config.json").read_text())["data"]["batch_size"] == 16


def test_it_learns_the_generated_data(synth_dir, tmp_path):
    from multitower.eval import evaluate_run
    run_dir = tmp_path / "run"
    cfg = make_cfg(synth_dir, run_dir, 150, checkpoint_every=150)
    cfg.data.batch_size = 64
    train(cfg)
    # The total loss starts near 4.7, of which ~2.2 is weight decay; judge the cross-entropy.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["cross_entropy"] < 1.5, f"cross-entropy {records[-1]['cross_entropy']} vs chance 2.30"
    evaluation = evaluate_run(run_dir, use_ema=False)
    assert evaluation.precision_at_1 > 0.5, evaluation.table()
