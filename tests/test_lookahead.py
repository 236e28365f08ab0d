"""Lookahead as airbench94 schedules it (train/lookahead.py), against a restatement of
airbench's epoch loop; its state survives a checkpoint (the loop test is in test_fast_recipe)."""

import math

import pytest
import torch
from torch import nn

from multitower.train.ema import averaged_tensors
from multitower.train.lookahead import Lookahead, LookaheadSchedule


def averaged(model):
    return dict(averaged_tensors(model))  # what Lookahead covers: as the moving average


def reference(start, deltas, total, steps_per_epoch, schedule):
    """airbench94's loop: epochs of steps_per_epoch updates, stopping at `total`; from epoch
    `start_epoch`, every `every` steps the first time copy the weights, later lerp the copy
    towards them and restart from it; after each epoch (and the last, cut short) restart
    from the copy. Returns the weights after every step."""
    weights = {n: t.clone() for n, t in start.items()}
    slow, step, history = None, 0, []
    for epoch in range(math.ceil(total / steps_per_epoch)):
        for _ in range(steps_per_epoch):
            for n in weights:
                weights[n] += deltas[step][n]
            step += 1
            if epoch >= schedule.start_epoch and step % schedule.every == 0:
                if slow is None:
                    slow = {n: t.clone() for n, t in weights.items()}
                else:
                    rho = schedule.decay_base ** schedule.every * (step / total) ** schedule.decay_power
                    for n in weights:
                        slow[n].lerp_(weights[n], 1 - rho)
                        weights[n].copy_(slow[n])
            last_of_epoch = step % steps_per_epoch == 0 or step >= total
            if last_of_epoch and slow is not None:
                for n in weights:
                    weights[n].copy_(slow[n])
            history.append({n: t.clone() for n, t in weights.items()})
            if step >= total:
                return history
    return history


def test_lookahead_follows_airbench_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    total, steps_per_epoch = 37, 8  # 4 full epochs and a last one cut short at 5 steps
    schedule = LookaheadSchedule(every=3, start_epoch=1)
    deltas = [{n: 0.1 * torch.randn_like(t) for n, t in averaged(model).items()} for _ in range(total)]
    expected = reference(averaged(model), deltas, total, steps_per_epoch, schedule)
    lookahead = Lookahead(schedule, total, steps_per_epoch)
    assert "1.running_var" in averaged(model) and "1.num_batches_tracked" not in averaged(model)
    restarts = 0
    with torch.no_grad():
        for step in range(1, total + 1):
            for n, t in averaged(model).items():  # the "optimizer" and the BN statistics move
                t += deltas[step - 1][n]
            moved = {n: t.clone() for n, t in averaged(model).items()}
            lookahead.after_step(model, step)
            restarts += any(not torch.equal(moved[n], t) for n, t in averaged(model).items())
            for n, t in averaged(model).items():
                assert torch.allclose(t, expected[step - 1][n], rtol=0, atol=1e-12), (step, n)
    assert lookahead.slow is not None and restarts >= 8  # it did restart the weights, many times
    assert all(torch.equal(t, lookahead.slow[n]) for n, t in averaged(model).items())  # ends on the slow weights
    # airbench's default: every 5 steps from epoch 3, decay 0.95^5 (0.77) at the end, cubic in between.
    default = LookaheadSchedule()
    assert (default.every, default.start_epoch) == (5, 3)
    assert default.decay(100, 100) == pytest.approx(0.95 ** 5) and default.decay(50, 100) == pytest.approx(0.95 ** 5 / 8)


def test_lookahead_state_round_trips():
    model = nn.Linear(3, 2)
    lookahead = Lookahead(LookaheadSchedule(every=1, start_epoch=0), total_steps=10, steps_per_epoch=4)
    assert lookahead.state_dict() is None  # nothing before the first sync step
    lookahead.after_step(model, 1)
    state = lookahead.state_dict()
    other = Lookahead(LookaheadSchedule(every=1, start_epoch=0), total_steps=10, steps_per_epoch=4)
    other.load_state_dict(state)
    assert set(other.slow) == {"weight", "bias"} and all(torch.equal(other.slow[n], state[n]) for n in state)
    other.slow["weight"].add_(1)  # a copy, not the caller's tensors
    assert not torch.equal(other.slow["weight"], state["weight"])
