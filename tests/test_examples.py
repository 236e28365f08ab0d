"""The examples/ scripts run as a user runs them, for a few steps: a ResNet-18 of the
user's own under every strategy that needs it, and a data set that is not CIFAR-10."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import multitower

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name, *args, timeout=600):
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("strategy", ["sync", "local-sgd", "downpour", "pipeline"])
def test_resnet18_trains_with_each_strategy_and_evaluates(synth_dir, tmp_path, strategy):
    run_dir = tmp_path / "run"
    result = example("resnet18.py", "--strategy", strategy, "--workers", 2, "--steps", 2, "--batch-size", 16,
                     "--data", synth_dir, "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 2 steps" in result.stdout and "precision @ 1 on val" in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["name"] == f"{EXAMPLES / 'resnet18.py'}:resnet18"
    assert config["parallel"]["strategy"] == strategy and config["optim"]["recipe"] == "plain"
    if strategy == "pipeline":  # cut where the parameters balance: layer4 holds 75% of them
        assert "pipeline stage 1/2: layer4, pool, flatten, fc" in result.stdout, result.stdout
    # The run names its model by the script's path: the command line evaluates it too.
    evaluated = multitower("eval", run_dir, "--once")
    assert evaluated.returncode == 0 and "step 2: precision @ 1" in evaluated.stdout, evaluated.stderr


def test_a_data_set_of_another_resolution_trains_and_evaluates(tmp_path):
    result = example("shapes.py", "--steps", 30, "--train-images", 512, "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: shapes (48x64) (512 training examples, 3x48x64 images)" in result.stdout
    precision = float(result.stdout.split("precision @ 1 = ")[1].split()[0])
    assert precision > 0.4, result.stdout  # 4 classes: chance is 0.25; ~0.8 seen after 30 steps
