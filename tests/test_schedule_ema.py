"""The tutorial's learning-rate staircase and moving averages, against hand computation."""

import pytest
import torch
from torch import nn

from multitower.train.ema import ExponentialMovingAverage, LossAverage, tf_ema_decay
from multitower.train.schedule import decay_steps_for, staircase_lr


def test_decay_steps_as_the_tutorial_counts_them():
    # cifar10.py: num_batches_per_epoch = 50000 / 128; int(num_batches_per_epoch * 350)
    assert decay_steps_for(50000, 128, 350.0) == 136718
    assert decay_steps_for(45000, 128, 350.0) == int(45000 / 128 * 350)


def test_staircase_learning_rate():
    assert staircase_lr(0, 0.1, 100, 0.1) == 0.1
    assert staircase_lr(99, 0.1, 100, 0.1) == 0.1
    assert staircase_lr(100, 0.1, 100, 0.1) == pytest.approx(0.01)
    assert staircase_lr(250, 0.1, 100, 0.1) == pytest.approx(0.001)


def test_tf_num_updates_rule():
    assert tf_ema_decay(0.9999, 0) == pytest.approx(0.1)
    assert tf_ema_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert tf_ema_decay(0.9999, 10**7) == 0.9999


def test_moving_average_of_weights_by_hand():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = ExponentialMovingAverage(model, decay=0.9999)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 6.0]]))
    ema.update(model, global_step=1)  # decay 2/11: shadow = 1 + (9/11) * (3 - 1)
    assert torch.allclose(ema.shadow["weight"], torch.tensor([[1 + 18 / 11, 2 + 36 / 11]]))
    evaluated = nn.Linear(2, 1, bias=False)
    ema.copy_to(evaluated)
    assert torch.equal(evaluated.weight, ema.shadow["weight"])
    restored = ExponentialMovingAverage(nn.Linear(2, 1, bias=False), 0.9999)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_loss_average_starts_at_first_value():
    avg = LossAverage(0.9)
    assert avg.update(2.0) == 2.0
    assert avg.update(1.0) == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)
