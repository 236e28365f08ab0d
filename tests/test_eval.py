"""Evaluation of the moving-average weights: once, continuous, per class."""

import json

import pytest
import torch

from multitower.config import Config, DataConfig, RunConfig
from multitower.errors import UserError
from multitower.eval import evaluate_run, watch
from multitower.train.checkpoint import CheckpointDir
from multitower.train.loop import train


@pytest.fixture(scope="module")
def trained_run(synth_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    train(Config(data=DataConfig(dir=str(synth_dir), batch_size=32),
                 run=RunConfig(run_dir=str(run_dir), steps=30, checkpoint_every=10, summary_every=0,
                               progress="off")))
    return run_dir


def test_once_reports_per_class_and_confusion(trained_run):
    result = evaluate_run(trained_run, write=False)
    assert result.step == 30 and result.split == "val" and result.examples == 512
    confusion = torch.tensor(result.confusion)
    assert confusion.sum() == 512
    assert result.precision_at_1 == pytest.approx(float(confusion.diag().sum()) / 512)
    row_sums = confusion.sum(dim=1).float()
    assert torch.allclose(torch.tensor(result.per_class_accuracy), confusion.diag() / row_sums)
    assert len(result.class_names) == 10 and result.class_names[0] in result.table()


def test_ema_and_raw_weights_differ(trained_run):
    ema = evaluate_run(trained_run, write=False)
    raw = evaluate_run(trained_run, use_ema=False, write=False)
    assert (ema.confusion != raw.confusion) or ema.weights != raw.weights
    assert ema.weights == "ema" and raw.weights == "raw"


def test_watch_evaluates_each_checkpoint_once(trained_run):
    results = watch(trained_run, interval_s=0.01, report=lambda _line: None)
    assert [r.step for r in results] == [10, 20, 30]
    lines = [json.loads(line) for line in (trained_run / "eval.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in lines] == [10, 20, 30]
    # Restarted, the watcher finds nothing new to evaluate on a finished run.
    assert watch(trained_run, interval_s=0.01, report=lambda _line: None) == []
    # One TensorBoard run: the evaluations' scalars beside the training's, in events/.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    runs = EventMultiplexer().AddRunsFromDirectory(str(trained_run / "events"))
    runs.Reload()
    assert list(runs.Runs()) == ["."], runs.Runs()
    tags = runs.Runs()["."]["scalars"]
    assert "eval/precision @ 1 (val)" in tags and "throughput/examples_per_sec" in tags, tags
    assert [e.step for e in runs.Scalars(".", "eval/precision @ 1 (val)")] == [10, 20, 30]


def test_eval_of_a_run_of_another_shape_is_a_clear_error(trained_run, tmp_path):
    state = CheckpointDir(trained_run / "checkpoints").load()
    cfg = json.loads((trained_run / "config.json").read_text())
    cfg["model"]["width"] = 2
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.json").write_text(json.dumps(cfg))
    CheckpointDir(other / "checkpoints").save({k: v for k, v in state.items() if k not in ("step", "format_version")}, 5)
    with pytest.raises(UserError, match="does not fit model"):
        evaluate_run(other, write=False)
    with pytest.raises(UserError, match="not a multitower run directory"):
        evaluate_run(tmp_path, write=False)
