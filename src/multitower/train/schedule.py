"""The tutorial's learning-rate schedule: tf.train.exponential_decay(staircase=True)."""

from __future__ import annotations


def decay_steps_for(train_examples: int, batch_size: int, epochs_per_decay: float) -> int:
    """Steps between decays, computed as the tutorial does:
    int(num_examples_per_epoch / batch_size * NUM_EPOCHS_PER_DECAY)
    (50,000 examples, batch 128, 350 epochs -> 136,718 steps)."""
    return max(1, int(train_examples / batch_size * epochs_per_decay))


def staircase_lr(step: int, initial_lr: float, decay_steps: int, decay_factor: float) -> float:
    """lr = initial_lr * decay_factor ** floor(step / decay_steps)."""
    return initial_lr * decay_factor ** (step // decay_steps)
