"""The fast recipe (airbench): whitening, augmentation, loss, schedule, flip TTA, moving
average of BN statistics, exact resume, and short CLI runs (single and 2-worker strategies)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from multitower.cli import main
from multitower.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from multitower.data.fast_augment import FlipTranslate, normalize
from multitower.data.loader import TrainBatches
from multitower.data.records import open_dataset
from multitower.errors import UserError
from multitower.models import build_model
from multitower.models.airbench import Whitening
from multitower.train.checkpoint import CheckpointDir
from multitower.train.ema import ExponentialMovingAverage
from multitower.train import loop
from multitower.train import recipe as recipe_module
from multitower.train.lookahead import LookaheadSchedule
from multitower.train.loop import train
from multitower.train.recipe import (FAST, FAST_RECIPE, flip_tta_logits, label_smoothing_loss, steps_for_epochs,
                                     warmup_linear_decay)

TINY = [8, 16, 16]  # widths small enough for a test on 2 cores


def train_images(synth_dir, count=1000):
    raw, labels = open_dataset(synth_dir).split("train").gather(torch.arange(count).numpy())
    return raw, labels


def test_whitening_layer_whitens_the_patches_it_was_fit_on(synth_dir):
    raw, _ = train_images(synth_dir)
    images = normalize(raw)
    layer = Whitening(3, 2, eps=1e-6)
    layer.fit(images)
    out = layer(images)  # [N, 24, 31, 31]
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = half.T @ half / half.shape[0] - torch.outer(half.mean(0), half.mean(0))
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=2e-3), covariance.diag()
    assert half.mean(0).abs().max() < 1e-3  # the bias centres the patches
    assert torch.equal(out[:, 12:], -out[:, :12])  # second half: the negatives
    # In the state_dict (so checkpoints and eval reproduce it); the filters are never trained,
    # the bias is a parameter (the recipe trains it for its first epochs).
    model = build_model("airbench", widths=TINY)
    model.fit_whitening(images)
    assert "whiten.weight" in model.state_dict() and "whiten.bias" in model.state_dict()
    assert [name for name, _ in model.named_parameters() if "whiten" in name] == ["whiten.bias"]


def test_translate_and_flip_equal_reflect_pad_crop_flip_per_image():
    aug = FlipTranslate(pad=2)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    draws = aug.sample(16, torch.Generator().manual_seed(3))
    out = aug.translate_and_flip(images, draws)
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    for i in range(16):
        y, x = 2 + int(draws.shift_y[i]), 2 + int(draws.shift_x[i])
        expected = padded[i, :, y:y + 32, x:x + 32]
        if draws.flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i].float(), expected), i
    assert draws.shift_y.abs().max() <= 2 and draws.flip.any() and not draws.flip.all()
    # Training input: float32, per-channel normalised, 32x32; the draws slice per rank.
    assert aug.apply(images, draws).shape == (16, 3, 32, 32)
    assert torch.equal(aug.apply(images[4:8], draws[4:8]), aug.apply(images, draws)[4:8])
    assert torch.allclose(aug.eval_transform(images)[:, 0], (images[:, 0] / 255.0 - 0.4914) / 0.2470, atol=1e-5)


def test_loader_uses_the_recipes_augmentation(synth_dir):
    split = open_dataset(synth_dir).split("train")
    batch = TrainBatches(split, global_batch_size=8, prefetch=0, augment=FAST_RECIPE.augment).batch_at(0)
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32


def test_label_smoothing_loss_is_the_formula():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    loss, cross_entropy = label_smoothing_loss(0.2)(None, logits, labels)
    log_p = logits.log_softmax(-1)
    nll = -log_p[torch.arange(6), labels]
    expected = (0.8 * nll + 0.2 * (-log_p.mean(-1))).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(cross_entropy, nll.mean(), atol=1e-6)


@pytest.mark.parametrize("end", [0.0, 0.07])
def test_learning_rate_warms_up_then_decays_linearly(end):
    total, warmup, peak = 100, 20, 2.0
    lrs = [warmup_linear_decay(s, peak, total, warmup, start_factor=0.2, end_factor=end) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.4) and lrs[warmup] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # rising
    assert all(a > b for a, b in zip(lrs[warmup:total], lrs[warmup + 1:]))  # falling
    assert lrs[total] == pytest.approx(end * peak)
    assert lrs[total - 1] == pytest.approx(end * peak + (1 - end) * peak / (total - warmup))
    steps = [lrs[s] - lrs[s + 1] for s in range(warmup, total)]
    assert max(steps) - min(steps) < 1e-9  # linear
    # The recipe's schedule over a configured run: airbench's triangle 0.2 -> 1 at 23% -> 0.07.
    cfg = Config(optim=OptimConfig(recipe="fast", lr=1.0), run=RunConfig(steps=100))
    lr_at = FAST_RECIPE.make_schedule(cfg, 1000)
    assert lr_at(0) == pytest.approx(FAST.warmup_start) and lr_at(23) == pytest.approx(1.0)
    assert lr_at(100) == pytest.approx(FAST.final_lr_fraction) == pytest.approx(0.07)
    assert steps_for_epochs(10, 45000, 512) == 870 and steps_for_epochs(0.5, 2048, 128) == 8


def test_flip_tta_is_the_mean_of_the_two_logits():
    torch.manual_seed(0)
    model = build_model("airbench", widths=TINY).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
        assert torch.allclose(flip_tta_logits(model, images), expected, atol=1e-6)
        assert not torch.allclose(model(images), expected, atol=1e-4)


def test_optimizer_nesterov_weight_decay_and_faster_bn_shifts():
    model = build_model("airbench", widths=TINY)
    cfg = Config(optim=OptimConfig(recipe="fast", lr=0.5))
    optimizer = FAST_RECIPE.make_optimizer(model, cfg)
    weights, shifts, whitening = optimizer.param_groups
    assert all(g["nesterov"] and g["momentum"] == FAST.momentum for g in optimizer.param_groups)
    assert shifts["lr_scale"] == FAST.bias_lr_scale and all(p.dim() == 1 for p in shifts["params"])
    # every parameter shrinks by the same lr x weight decay per step
    assert weights["weight_decay"] == pytest.approx(shifts["weight_decay"] * shifts["lr_scale"])
    assert whitening["params"] == [model.whiten.bias] and whitening["train_epochs"] == FAST.whitening_bias_epochs == 3
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_moving_average_covers_batch_norm_statistics():
    torch.manual_seed(0)
    model = build_model("airbench", widths=TINY)
    ema = ExponentialMovingAverage(model, 0.5)
    assert "block1.norm1.running_mean" in ema.shadow and "block1.norm1.num_batches_tracked" not in ema.shadow
    before = ema.shadow["block1.norm1.running_var"].clone()
    model.train()(torch.randn(8, 3, 32, 32))  # updates the running statistics
    ema.update(model, 1000)
    current = model.state_dict()["block1.norm1.running_var"]
    assert torch.allclose(ema.shadow["block1.norm1.running_var"], (before + current) / 2)
    assert torch.equal(ema.shadow["whiten.weight"], model.whiten.weight)  # constants stay constant


def fast_cfg(data_dir, run_dir, steps, **run_kwargs) -> Config:
    run = dict(run_dir=str(run_dir), steps=steps, log_every=2, summary_every=0, checkpoint_every=1000,
               progress="off")
    run.update(run_kwargs)
    return Config(data=DataConfig(dir=str(data_dir), batch_size=32),
                  model=ModelConfig(name="airbench", widths=TINY),
                  optim=OptimConfig(recipe="fast", lr=FAST_RECIPE.default_lr(32), ema_decay=0.99),
                  run=RunConfig(**run))


class Stop(Exception):
    pass


def test_fast_recipe_resumes_bitwise(synth_dir, tmp_path, monkeypatch):
    # The schedule spans the whole run, so the interrupted run is one of 6 steps stopped after
    # its step-3 checkpoint (not a run of 3 steps, whose learning rate reaches 0 at step 3).
    # Lookahead from the start, every 2 steps: its slow weights (taken at step 2) must come
    # back from the checkpoint for the resumed steps 4-6 to match.
    monkeypatch.setitem(recipe_module.RECIPES, "fast",
                        dataclasses.replace(FAST_RECIPE, lookahead=LookaheadSchedule(every=2, start_epoch=0)))
    train(fast_cfg(synth_dir, tmp_path / "straight", 6))

    def stop_at_4(rank, step):
        if step == 4:
            raise Stop()
    monkeypatch.setattr(loop, "maybe_inject", stop_at_4)
    with pytest.raises(Stop):
        train(fast_cfg(synth_dir, tmp_path / "split", 6, checkpoint_every=3))
    monkeypatch.setattr(loop, "maybe_inject", lambda rank, step: None)
    assert CheckpointDir(tmp_path / "split" / "checkpoints").load()["lookahead"] is not None
    train(fast_cfg(synth_dir, tmp_path / "split", 6, checkpoint_every=3, resume=True))
    straight = CheckpointDir(tmp_path / "straight" / "checkpoints").load()
    resumed = CheckpointDir(tmp_path / "split" / "checkpoints").load()
    assert straight["step"] == resumed["step"] == 6
    assert "block2.norm1.running_var" in straight["model"] and "whiten.weight" in straight["model"]
    # The run ends on Lookahead's slow weights.
    assert all(torch.equal(straight["model"][name], slow) for name, slow in straight["lookahead"].items())
    for part in ("model", "ema", "lookahead"):
        for name, tensor in straight[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}/{name} differs after resume"
    assert straight["optimizer"]["state"] and all(torch.equal(a["momentum_buffer"], b["momentum_buffer"]) for a, b in
                           zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()))


def test_whitening_bias_trains_for_its_first_epochs_only(synth_dir, tmp_path):
    # 2,048 training images at batch 256: 8 steps per epoch; the bias trains in epochs 0-2.
    cfg = fast_cfg(synth_dir, tmp_path / "run", 32)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=256))
    biases = []

    def record_bias(step, model, ema) -> bool:
        biases.append(model.whiten.bias.detach().clone())
        return False  # never stop the run

    train(cfg, on_step=record_bias)
    moved = [not torch.equal(a, b) for a, b in zip(biases, biases[1:])]  # moved[i]: at step i + 2
    assert all(moved[:23]) and not any(moved[23:]), moved
    assert not torch.equal(biases[0], biases[-1])


def test_resume_refuses_another_recipe(synth_dir, tmp_path):
    train(fast_cfg(synth_dir, tmp_path / "run", 1))
    cfg = Config(data=DataConfig(dir=str(synth_dir), batch_size=32),
                 run=RunConfig(run_dir=str(tmp_path / "run"), steps=2, resume=True, progress="off"))
    with pytest.raises(UserError, match="holds a run of model airbench"):
        train(cfg)


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "downpour", "--workers", "2"], "cannot run with --strategy downpour"),
    (["--strategy", "pipeline", "--workers", "2"], "cannot run with --strategy pipeline"),
    (["--model", "cifar10-tf"], "--model cifar10-tf has none; use --model airbench"),
    (["--steps", "3", "--epochs", "1"], "not both"),
    (["--widths", "8,16"], "--widths must be three"),
    (["--epochs", "-1"], "--epochs must be positive"),
])
def test_bad_combinations_are_one_line(capsys, synth_dir, tmp_path, argv, message):
    code = main(["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--recipe", "fast",
                 "--dry-run", *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_dry_run_derives_steps_from_epochs(capsys, synth_dir, tmp_path):
    code = main(["train", "--data", str(synth_dir), "--run-dir", str(tmp_path / "run"), "--recipe", "fast",
                 "--batch-size", "128", "--epochs", "3", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "recipe fast, airbench" in out and "global batch 128, 48 steps" in out


def cli(*argv, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "multitower", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_fast_recipe_trains_and_evaluates_through_the_cli(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    trained = cli("train", "--recipe", "fast", "--data", str(synth_dir), "--run-dir", str(run_dir),
                  "--widths", "16,32,32", "--batch-size", "128", "--epochs", "3", "--log-every", "8",
                  "--summary-every", "24")
    assert trained.returncode == 0, trained.stderr
    assert "step 48, loss =" in trained.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["optim"]["recipe"] == "fast" and config["run"]["steps"] == 48
    assert config["model"] == {"name": "airbench", "width": 1, "widths": [16, 32, 32]}
    evaluated = cli("eval", str(run_dir), "--once")
    assert evaluated.returncode == 0, evaluated.stderr
    record = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 48 and record["precision_at_1"] > 0.6, record["precision_at_1"]  # chance: 0.1


@pytest.mark.parametrize("strategy", [
    "sync", pytest.param("local-sgd", marks=pytest.mark.slow), pytest.param("hogwild", marks=pytest.mark.slow)])
def test_fast_recipe_with_two_workers(synth_dir, tmp_path, strategy):
    run_dir = tmp_path / strategy
    trained = cli("train", "--recipe", "fast", "--data", str(synth_dir), "--run-dir", str(run_dir),
                  "--strategy", strategy, "--workers", "2", "--device", "cpu", "--widths", ",".join(map(str, TINY)),
                  "--batch-size", "64", "--steps", "8", "--log-every", "4", "--summary-every", "0")
    assert trained.returncode == 0, trained.stderr
    assert "step 8, loss =" in trained.stdout
    state = CheckpointDir(run_dir / "checkpoints").load()
    assert state["step"] == 8 and "block3.norm2.running_mean" in state["ema"]
    evaluated = cli("eval", str(run_dir), "--once")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "precision @ 1" in evaluated.stdout


def test_local_sgd_fast_recipe_resumes_bitwise_after_a_crash(synth_dir, tmp_path):
    """Rank 1 is killed at step 19 of 20 (2 workers, averaging every 4 steps, a checkpoint
    at step 18); the launcher restarts both from step 18, where the replicas differ (last
    averaged at 16) and each has its own momentum and Lookahead slow weights (taken at step
    15: 4 steps per epoch, from epoch 3). The run must end bitwise as one that never crashed."""
    common = ["train", "--recipe", "fast", "--data", str(synth_dir), "--strategy", "local-sgd", "--workers", "2",
              "--sync-every", "4", "--device", "cpu", "--widths", ",".join(map(str, TINY)), "--batch-size", "512",
              "--steps", "20", "--checkpoint-every", "18", "--log-every", "10", "--summary-every", "0"]
    crashed = cli(*common, "--run-dir", str(tmp_path / "crashed"), "--max-restarts", "1",
                  env={"MULTITOWER_FAULT": "1:19:kill"})
    assert crashed.returncode == 0, crashed.stderr
    assert "at step 18 (restart 1 after a worker failure)" in crashed.stdout, crashed.stdout
    straight = cli(*common, "--run-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    at_18 = CheckpointDir(tmp_path / "straight" / "checkpoints").load(step=18)
    replicas = at_18["replicas"]
    assert len(replicas) == 2 and all(r["lookahead"] is not None for r in replicas)
    assert not torch.equal(replicas[0]["model"]["head.weight"], replicas[1]["model"]["head.weight"])
    a = CheckpointDir(tmp_path / "crashed" / "checkpoints").load()
    b = CheckpointDir(tmp_path / "straight" / "checkpoints").load()
    assert a["step"] == b["step"] == 20
    for rank in (0, 1):
        mine, theirs = a["replicas"][rank], b["replicas"][rank]
        for part in ("model", "ema", "lookahead"):
            for name, tensor in theirs[part].items():
                assert torch.equal(mine[part][name], tensor), f"rank {rank} {part}/{name} differs after the restart"
        for key, state in theirs["optimizer"]["state"].items():
            assert torch.equal(mine["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), f"model/{name} differs after the restart"
